"""Dependency-free SVG scatter plots with a Pareto front, for the HTML report and the benchmarks.

Standard library only. The output is a standalone ``<svg>`` document (no scripts, no external fonts or styles),
the same bytes for the same input.

    svg = scatter_svg(
        [{"name": "edgekit", "points": [(0.26, 0.999, "int8"), (0.14, 0.97, "int4")], "marker": "circle"},
         {"name": "ONNX Runtime", "points": [(0.26, 0.993, "dynamic")], "marker": "square"}],
        title="MiniLM: size vs fidelity", x_label="size (x FP32)", y_label="mean cosine", highlight="int8")

Points whose coordinates are not finite numbers (NaN, inf; and x <= 0 on a log axis) are left out.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence

__all__ = ["MARKERS", "PALETTE", "nice_ticks", "pareto_front", "scatter_svg"]

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("circle", "square", "triangle", "diamond", "cross")

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # not allowed in XML 1.0


def _esc(text: object) -> str:
    """Text or attribute value, XML-escaped (quotes included), with characters XML 1.0 forbids removed."""
    return html.escape(_CONTROL.sub("", str(text)), quote=True)


def _num(v: float) -> str:
    """A coordinate: two decimals, no trailing zeros, never '-0' (deterministic and compact)."""
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _finite(*vals: object) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in vals)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------- Pareto
def pareto_front(points: Sequence[Sequence[float]], minimize_x: bool = True, maximize_y: bool = True) -> list[int]:
    """Indices of the non-dominated points, ordered along the front (from the best x to the worst).

    ``points`` are ``(x, y)`` or ``(x, y, label, ...)``. A point is dominated when another is at least as good in
    both coordinates and strictly better in one; identical points do not dominate each other (all are kept).
    Points with a non-finite coordinate are ignored.
    """
    sx = 1.0 if minimize_x else -1.0
    sy = 1.0 if maximize_y else -1.0
    cand = []
    for i, p in enumerate(points):
        x, y = p[0], p[1]
        if _finite(x, y):
            cand.append((sx * float(x), -sy * float(y), i))  # minimise both in this space
    cand.sort()
    front: list[int] = []
    best = math.inf  # the smallest transformed y seen so far (at a smaller or equal x)
    last: tuple[float, float] | None = None
    for x, y, i in cand:
        if y < best:
            front.append(i)
            best, last = y, (x, y)
        elif (x, y) == last:  # a duplicate of the latest front point
            front.append(i)
    return front


# --------------------------------------------------------------------------------------------------- ticks
def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10.0 * mag


def nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """A rounded axis range covering ``[lo, hi]`` and its ticks at steps of 1, 2, 2.5 or 5 x 10^k."""
    if not _finite(lo, hi):
        lo, hi = 0.0, 1.0
    if lo > hi:
        lo, hi = hi, lo
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):  # one value: open a window around it
        pad = abs(lo) * 0.1 if lo else 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    n = int(round((stop - start) / step))
    ticks = [_clean(start + k * step, step) for k in range(n + 1)]
    return ticks[0], ticks[-1], ticks


def _clean(v: float, step: float) -> float:
    digits = max(0, -math.floor(math.log10(step)) + 2)
    v = round(v, digits)
    return 0.0 if v == 0 else v


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Decade-aligned range for a log axis; ticks at 1, 2, 5 x 10^k when it spans few decades."""
    if lo == hi:
        lo, hi = lo / 2, hi * 2
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if b == a:
        b = a + 1
    mults = (1, 2, 5) if b - a <= 3 else (1,)
    ticks = [m * 10.0**e for e in range(a, b + 1) for m in mults if m * 10.0**e <= 10.0**b * (1 + 1e-9)]
    # tighten to the data: the first tick at or below lo, the last at or above hi
    below = [t for t in ticks if t <= lo * (1 + 1e-9)]
    above = [t for t in ticks if t >= hi * (1 - 1e-9)]
    t0, t1 = (below[-1] if below else ticks[0]), (above[0] if above else ticks[-1])
    ticks = [float(f"{t:.12g}") for t in ticks if t0 <= t <= t1]
    return ticks[0], ticks[-1], ticks


def _tick_label(v: float, ticks: Sequence[float]) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    steps = [abs(b - a) for a, b in zip(ticks, ticks[1:]) if b != a]
    step = min(steps) if steps else abs(v)
    decimals = min(6, max(0, -math.floor(math.log10(step) + 1e-9)))
    if any(round(t, decimals) != round(t, decimals + 1) for t in ticks):  # e.g. a 2.5 step
        decimals += 1
    return f"{v:.{decimals}f}"


# --------------------------------------------------------------------------------------------------- markers
def _marker(kind: str, x: float, y: float, r: float, color: str, cls: str, tip: str = "") -> str:
    """One marker element of class ``cls``; ``tip`` becomes its tooltip (a ``<title>`` child)."""
    fill = f'fill="{color}" stroke="#ffffff" stroke-width="0.8"'
    if kind == "square":
        tag, attrs = "rect", (f'x="{_num(x - r)}" y="{_num(y - r)}" width="{_num(2 * r)}" height="{_num(2 * r)}" '
                              f"{fill}")
    elif kind in ("triangle", "diamond"):
        if kind == "triangle":
            pts = [(x, y - 1.2 * r), (x + 1.1 * r, y + 0.8 * r), (x - 1.1 * r, y + 0.8 * r)]
        else:
            pts = [(x, y - 1.3 * r), (x + 1.3 * r, y), (x, y + 1.3 * r), (x - 1.3 * r, y)]
        tag, attrs = "polygon", f'points="{" ".join(f"{_num(a)},{_num(b)}" for a, b in pts)}" {fill}'
    elif kind == "cross":
        d = (f"M{_num(x - r)},{_num(y - r)}L{_num(x + r)},{_num(y + r)}"
             f"M{_num(x - r)},{_num(y + r)}L{_num(x + r)},{_num(y - r)}")
        tag, attrs = "path", f'd="{d}" fill="none" stroke="{color}" stroke-width="2.2"'
    else:
        tag, attrs = "circle", f'cx="{_num(x)}" cy="{_num(y)}" r="{_num(r)}" {fill}'
    if tip:
        return f'<{tag} class="{cls}" {attrs}><title>{_esc(tip)}</title></{tag}>'
    return f'<{tag} class="{cls}" {attrs}/>'


# --------------------------------------------------------------------------------------------------- plot
def _tip(series: Sequence[dict], si: int, x: float, y: float, label: str) -> str:
    name = str(series[si].get("name", f"series {si + 1}"))
    return f"{name}: {label + ' ' if label else ''}({x:g}, {y:g})"


def _points(series: Iterable[dict], log_x: bool) -> list[tuple[int, float, float, str]]:
    """(series index, x, y, label) of every plottable point."""
    out = []
    for si, s in enumerate(series):
        for p in s.get("points", ()):
            x, y = p[0], p[1]
            label = "" if len(p) < 3 or p[2] is None else str(p[2])
            if not _finite(x, y) or (log_x and float(x) <= 0):
                continue
            out.append((si, float(x), float(y), label))
    return out


def _padded(vals: Sequence[float], frac: float = 0.04) -> tuple[float, float]:
    """The range of ``vals`` widened by ``frac`` of its span on each side, so no point sits on the frame."""
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * frac
    return lo - pad, hi + pad


_SPOTS = (  # (dx, dy of the text anchor from the marker centre, text-anchor), nearest ring first
    ((7, -6, "start"), (7, 12, "start"), (-7, -6, "end"), (-7, 12, "end"), (0, -9, "middle"), (0, 18, "middle"),
     (10, 3, "start"), (-10, 3, "end")),
    ((16, -16, "start"), (16, 24, "start"), (-16, -16, "end"), (-16, 24, "end"), (0, -22, "middle"),
     (0, 32, "middle"), (26, 3, "start"), (-26, 3, "end")),
    ((28, -28, "start"), (28, 36, "start"), (-28, -28, "end"), (-28, 36, "end"), (0, -36, "middle"),
     (0, 46, "middle"), (44, 3, "start"), (-44, 3, "end")),
)


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(cx: float, cy: float, text: str, taken: list[tuple[float, float, float, float]],
                 bounds: tuple[float, float, float, float]) -> tuple[float, float, str, bool]:
    """Where to write a point's label: the first spot around the marker, nearest ring first, whose box stays in
    ``bounds`` and overlaps nothing in ``taken`` (markers, labels, the legend); else the first spot in bounds.
    Returns x, baseline y, text-anchor, and whether it sits away from the marker (wants a leader line)."""
    w, h = 5.6 * len(text) + 2, 10.0
    fallback = None
    for ring, spots in enumerate(_SPOTS):
        for dx, dy, anchor in spots:
            x, y = cx + dx, cy + dy
            x_lo = x if anchor == "start" else x - w if anchor == "end" else x - w / 2
            box = (x_lo, y - h + 2, x_lo + w, y + 2)
            if box[0] < bounds[0] or box[2] > bounds[2] or box[1] < bounds[1] or box[3] > bounds[3]:
                continue
            if fallback is None:
                fallback = (x, y, anchor, box)
            if not any(_overlaps(box, t) for t in taken):
                taken.append(box)
                return x, y, anchor, ring > 0
    x, y, anchor, box = fallback or (cx + 7, cy - 6, "start", (cx + 7, cy - 14, cx + 7 + w, cy - 4))
    taken.append(box)
    return x, y, anchor, False


class _Frame:
    """The plot area inside the canvas and the data-to-pixel mapping."""

    def __init__(self, xs: list[float], ys: list[float], *, left: float, top: float, width: float, height: float,
                 log_x: bool) -> None:
        self.left, self.top, self.pw, self.ph, self.log_x = left, top, max(10.0, width), max(10.0, height), log_x
        if log_x:
            self.x0, self.x1, self.xt = _log_ticks(min(xs), max(xs)) if xs else (1.0, 10.0, [1.0, 10.0])
        else:
            self.x0, self.x1, self.xt = (nice_ticks(*_padded(xs), max(3, int(self.pw // 80))) if xs
                                         else nice_ticks(0.0, 1.0))
        self.y0, self.y1, self.yt = (nice_ticks(*_padded(ys), max(3, int(self.ph // 50))) if ys
                                     else nice_ticks(0.0, 1.0))

    def px(self, x: float) -> float:
        if self.log_x:
            span = math.log10(self.x1) - math.log10(self.x0)
            return self.left + (math.log10(x) - math.log10(self.x0)) / span * self.pw
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, y: float) -> float:
        return self.top + self.ph - (y - self.y0) / (self.y1 - self.y0) * self.ph


def _legend_rows(names: Sequence[str], avail: float) -> list[list[tuple[int, float]]]:
    """Legend entries (index, x offset) wrapped into rows no wider than ``avail``."""
    rows: list[list[tuple[int, float]]] = [[]]
    x = 0.0
    for i, n in enumerate(names):
        w = 22 + 6.2 * len(n) + 14
        if rows[-1] and x + w > avail:
            rows.append([])
            x = 0.0
        rows[-1].append((i, x))
        x += w
    return rows


def scatter_svg(
    series: Sequence[dict],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    log_x: bool = False,
    front: bool = True,
    highlight: str | None = None,
    width: int = 520,
    height: int = 360,
    minimize_x: bool = True,
    maximize_y: bool = True,
) -> str:
    """A standalone SVG scatter plot.

    ``series``: ``[{"name": str, "points": [(x, y, label), ...], "marker": one of MARKERS, "color": "#rrggbb"}]``
    (``marker`` and ``color`` optional: by position). Every plotted point has one element of class ``marker``,
    labelled with its text. ``front`` draws the Pareto front of all the points (``minimize_x``/``maximize_y`` say
    which way is better) as a dashed step line; ``highlight`` rings the point(s) with that label.
    """
    series = list(series)
    pts = _points(series, log_x)
    width, height = int(width), int(height)
    left, right, top = 62.0, 16.0, (34.0 if title else 16.0)
    axis_bottom = 46.0 if x_label else 30.0  # tick labels and the axis label under the plot
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    names = [str(s.get("name", f"series {i + 1}")) for i, s in enumerate(series)]
    colors = [s.get("color") or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    kinds = [s.get("marker") if s.get("marker") in MARKERS else MARKERS[i % len(MARKERS)]
             for i, s in enumerate(series)]

    def frame(bottom: float) -> _Frame:
        return _Frame(xs, ys, left=left, top=top, width=width - left - right, height=height - top - bottom,
                      log_x=log_x)

    # the legend goes in the plot corner that covers no point; when every corner does, in rows under the plot
    f = frame(axis_bottom)
    legend_box: tuple[float, float, float, float] | None = None
    legend_rows: list[list[tuple[int, float]]] = []
    if names:
        lw, lh = 28 + 6.2 * max(len(n) for n in names), 8 + 16 * len(names)
        corners = [(f.left + f.pw - lw - 6, f.top + 6), (f.left + 6, f.top + 6),
                   (f.left + f.pw - lw - 6, f.top + f.ph - lh - 6), (f.left + 6, f.top + f.ph - lh - 6)]

        def covered(c: tuple[float, float]) -> int:
            return sum(c[0] - 8 <= f.px(x) <= c[0] + lw + 8 and c[1] - 8 <= f.py(y) <= c[1] + lh + 8
                       for _, x, y, _ in pts)

        best = min(corners, key=covered)  # min keeps the first of equals: deterministic
        if covered(best) == 0 and lh <= f.ph:
            legend_box = (best[0], best[1], best[0] + lw, best[1] + lh)
        else:
            legend_rows = _legend_rows(names, f.pw)
            f = frame(axis_bottom + 16 * len(legend_rows) + 4)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">']
    out.append(f"<title>{_esc(title or 'scatter plot')}</title>")
    out.append(f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>')
    if title:
        out.append(f'<text class="title" x="{_num(width / 2)}" y="20" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{_esc(title)}</text>')

    # grid, ticks, axes
    bottom_y = f.top + f.ph
    out.append('<g class="grid" stroke="#e3e3e3" stroke-width="1">')
    for t in f.xt:
        out.append(f'<line x1="{_num(f.px(t))}" y1="{_num(f.top)}" x2="{_num(f.px(t))}" y2="{_num(bottom_y)}"/>')
    for t in f.yt:
        out.append(f'<line x1="{_num(f.left)}" y1="{_num(f.py(t))}" x2="{_num(f.left + f.pw)}" '
                   f'y2="{_num(f.py(t))}"/>')
    out.append("</g>")
    out.append('<g class="axes" stroke="#333333" stroke-width="1">')
    out.append(f'<line x1="{_num(f.left)}" y1="{_num(bottom_y)}" x2="{_num(f.left + f.pw)}" y2="{_num(bottom_y)}"/>')
    out.append(f'<line x1="{_num(f.left)}" y1="{_num(f.top)}" x2="{_num(f.left)}" y2="{_num(bottom_y)}"/>')
    out.append("</g>")
    out.append('<g class="ticks" fill="#333333">')
    for t in f.xt:
        lab = _tick_label(t, f.xt) if not log_x else f"{t:g}"
        out.append(f'<text x="{_num(f.px(t))}" y="{_num(bottom_y + 15)}" text-anchor="middle">{_esc(lab)}</text>')
    for t in f.yt:
        out.append(f'<text x="{_num(f.left - 6)}" y="{_num(f.py(t) + 4)}" text-anchor="end">'
                   f"{_esc(_tick_label(t, f.yt))}</text>")
    out.append("</g>")
    if x_label:
        out.append(f'<text class="x-label" x="{_num(f.left + f.pw / 2)}" y="{_num(bottom_y + 36)}" '
                   f'text-anchor="middle">{_esc(x_label + (" (log scale)" if log_x else ""))}</text>')
    if y_label:
        cx, cy = 14.0, f.top + f.ph / 2
        out.append(f'<text class="y-label" x="{_num(cx)}" y="{_num(cy)}" text-anchor="middle" '
                   f'transform="rotate(-90 {_num(cx)} {_num(cy)})">{_esc(y_label)}</text>')
    if not pts:
        out.append(f'<text class="empty" x="{_num(f.left + f.pw / 2)}" y="{_num(f.top + f.ph / 2)}" '
                   f'text-anchor="middle" fill="#777777">no data</text>')

    # Pareto front over all points: from each front point across to the next one's x, then to the next point
    if front and pts:
        idx = pareto_front([(p[1], p[2]) for p in pts], minimize_x=minimize_x, maximize_y=maximize_y)
        if idx:
            fp = [(f.px(pts[i][1]), f.py(pts[i][2])) for i in idx]
            d = f"M{_num(fp[0][0])},{_num(fp[0][1])}"
            for (_, ya), (xb, yb) in zip(fp, fp[1:]):
                d += f"L{_num(xb)},{_num(ya)}L{_num(xb)},{_num(yb)}"
            out.append(f'<path class="front" d="{d}" fill="none" stroke="#555555" stroke-width="1.2" '
                       f'stroke-dasharray="5,3"><title>Pareto front</title></path>')

    # highlight rings under the markers
    if highlight is not None:
        for _, x, y, label in pts:
            if label == str(highlight):
                out.append(f'<circle class="highlight" cx="{_num(f.px(x))}" cy="{_num(f.py(y))}" r="10" '
                           f'fill="#FFD54F" fill-opacity="0.55" stroke="#B8860B" stroke-width="1.5"/>')

    # points, then their labels on top, placed clear of the markers, of one another and of the legend
    out.append('<g class="points">')
    for si, x, y, label in pts:
        out.append(_marker(kinds[si], f.px(x), f.py(y), 4.5, colors[si], "marker", _tip(series, si, x, y, label)))
    out.append("</g>")
    taken = [(f.px(x) - 5, f.py(y) - 5, f.px(x) + 5, f.py(y) + 5) for _, x, y, _label in pts]
    if legend_box is not None:
        taken.append(legend_box)
    leaders, labels = [], []
    for _, x, y, label in pts:
        if not label:
            continue
        cx, cy = f.px(x), f.py(y)
        tx, ty, anchor, far = _place_label(cx, cy, label, taken, (f.left, f.top, float(width), bottom_y + 4))
        if far:
            leaders.append(f'<line x1="{_num(cx)}" y1="{_num(cy)}" x2="{_num(tx)}" y2="{_num(ty - 4)}"/>')
        bold = ' font-weight="bold"' if highlight is not None and label == str(highlight) else ""
        labels.append(f'<text class="point-label" x="{_num(tx)}" y="{_num(ty)}" text-anchor="{anchor}"{bold}>'
                      f"{_esc(label)}</text>")
    if leaders:
        out += ['<g class="leaders" stroke="#9e9e9e" stroke-width="0.7">', *leaders, "</g>"]
    out += ['<g class="point-labels" font-size="10" fill="#222222">', *labels, "</g>"]

    # the legend
    if legend_box is not None:
        lx, ly = legend_box[0], legend_box[1]
        out.append('<g class="legend">')
        out.append(f'<rect x="{_num(lx)}" y="{_num(ly)}" width="{_num(legend_box[2] - lx)}" '
                   f'height="{_num(legend_box[3] - ly)}" fill="#ffffff" fill-opacity="0.85" stroke="#cccccc"/>')
        for i, n in enumerate(names):
            yy = ly + 12 + 16 * i
            out.append(_marker(kinds[i], lx + 12, yy, 4.5, colors[i], "legend-marker"))
            out.append(f'<text x="{_num(lx + 24)}" y="{_num(yy + 4)}">{_esc(n)}</text>')
        out.append("</g>")
    elif legend_rows:
        out.append('<g class="legend">')
        for r, row in enumerate(legend_rows):
            yy = bottom_y + axis_bottom + 8 + 16 * r
            for i, dx in row:
                out.append(_marker(kinds[i], f.left + dx + 6, yy, 4.5, colors[i], "legend-marker"))
                out.append(f'<text x="{_num(f.left + dx + 16)}" y="{_num(yy + 4)}">{_esc(names[i])}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
