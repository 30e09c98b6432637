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


def _place_label(cx: float, cy: float, text: str, taken: list[tuple[float, float, float, float]],
                 bounds: tuple[float, float, float, float]) -> tuple[float, float, str]:
    """Where to write a point's label: the first of eight spots around the marker whose box stays in ``bounds`` and
    overlaps no label placed before (else the first spot that stays in bounds). Returns x, baseline y, anchor."""
    w, h = 5.6 * len(text) + 2, 10.0
    spots = [(7, -6, "start"), (7, 12, "start"), (-7, -6, "end"), (-7, 12, "end"), (0, -9, "middle"),
             (0, 18, "middle"), (10, 3, "start"), (-10, 3, "end")]
    fallback = None
    for dx, dy, anchor in spots:
        x, y = cx + dx, cy + dy
        x_lo = x if anchor == "start" else x - w if anchor == "end" else x - w / 2
        box = (x_lo, y - h + 2, x_lo + w, y + 2)
        if box[0] < bounds[0] or box[2] > bounds[2] or box[1] < bounds[1] or box[3] > bounds[3]:
            continue
        if fallback is None:
            fallback = (x, y, anchor, box)
        if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
            taken.append(box)
            return x, y, anchor
    x, y, anchor, box = fallback or (cx + 7, cy - 6, "start", (cx + 7, cy - 14, cx + 7 + w, cy - 4))
    taken.append(box)
    return x, y, anchor


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
    left, right, top, bottom = 62.0, 16.0, 34.0 if title else 16.0, 46.0 if x_label else 30.0
    pw, ph = max(10.0, width - left - right), max(10.0, height - top - bottom)

    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    if log_x:
        x0, x1, xt = _log_ticks(min(xs), max(xs)) if xs else (1.0, 10.0, [1.0, 10.0])
    else:
        x0, x1, xt = nice_ticks(*_padded(xs), max(3, int(pw // 80))) if xs else nice_ticks(0.0, 1.0)
    y0, y1, yt = nice_ticks(*_padded(ys), max(3, int(ph // 50))) if ys else nice_ticks(0.0, 1.0)

    def px(x: float) -> float:
        if log_x:
            return left + (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * pw
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">']
    out.append(f"<title>{_esc(title or 'scatter plot')}</title>")
    out.append(f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>')
    if title:
        out.append(f'<text class="title" x="{_num(width / 2)}" y="20" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{_esc(title)}</text>')

    # grid, ticks, axes
    out.append('<g class="grid" stroke="#e3e3e3" stroke-width="1">')
    for t in xt:
        out.append(f'<line x1="{_num(px(t))}" y1="{_num(top)}" x2="{_num(px(t))}" y2="{_num(top + ph)}"/>')
    for t in yt:
        out.append(f'<line x1="{_num(left)}" y1="{_num(py(t))}" x2="{_num(left + pw)}" y2="{_num(py(t))}"/>')
    out.append("</g>")
    out.append('<g class="axes" stroke="#333333" stroke-width="1">')
    out.append(f'<line x1="{_num(left)}" y1="{_num(top + ph)}" x2="{_num(left + pw)}" y2="{_num(top + ph)}"/>')
    out.append(f'<line x1="{_num(left)}" y1="{_num(top)}" x2="{_num(left)}" y2="{_num(top + ph)}"/>')
    out.append("</g>")
    out.append('<g class="ticks" fill="#333333">')
    for t in xt:
        lab = _tick_label(t, xt) if not log_x else f"{t:g}"
        out.append(f'<text x="{_num(px(t))}" y="{_num(top + ph + 15)}" text-anchor="middle">{_esc(lab)}</text>')
    for t in yt:
        out.append(f'<text x="{_num(left - 6)}" y="{_num(py(t) + 4)}" text-anchor="end">'
                   f"{_esc(_tick_label(t, yt))}</text>")
    out.append("</g>")
    if x_label:
        out.append(f'<text class="x-label" x="{_num(left + pw / 2)}" y="{_num(height - 10)}" '
                   f'text-anchor="middle">{_esc(x_label + (" (log scale)" if log_x else ""))}</text>')
    if y_label:
        cx, cy = 14.0, top + ph / 2
        out.append(f'<text class="y-label" x="{_num(cx)}" y="{_num(cy)}" text-anchor="middle" '
                   f'transform="rotate(-90 {_num(cx)} {_num(cy)})">{_esc(y_label)}</text>')
    if not pts:
        out.append(f'<text class="empty" x="{_num(left + pw / 2)}" y="{_num(top + ph / 2)}" text-anchor="middle" '
                   f'fill="#777777">no data</text>')

    # Pareto front over all points: from each front point across to the next one's x, then to the next point
    if front and pts:
        idx = pareto_front([(p[1], p[2]) for p in pts], minimize_x=minimize_x, maximize_y=maximize_y)
        if idx:
            fp = [(px(pts[i][1]), py(pts[i][2])) for i in idx]
            d = f"M{_num(fp[0][0])},{_num(fp[0][1])}"
            for (_, ya), (xb, yb) in zip(fp, fp[1:]):
                d += f"L{_num(xb)},{_num(ya)}L{_num(xb)},{_num(yb)}"
            out.append(f'<path class="front" d="{d}" fill="none" stroke="#555555" stroke-width="1.2" '
                       f'stroke-dasharray="5,3"><title>Pareto front</title></path>')

    # highlight rings under the markers
    if highlight is not None:
        for _, x, y, label in pts:
            if label == str(highlight):
                out.append(f'<circle class="highlight" cx="{_num(px(x))}" cy="{_num(py(y))}" r="10" '
                           f'fill="#FFD54F" fill-opacity="0.55" stroke="#B8860B" stroke-width="1.5"/>')

    # points and their labels
    colors = [s.get("color") or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    kinds = [s.get("marker") if s.get("marker") in MARKERS else MARKERS[i % len(MARKERS)]
             for i, s in enumerate(series)]
    out.append('<g class="points">')
    for si, x, y, label in pts:
        out.append(_marker(kinds[si], px(x), py(y), 4.5, colors[si], "marker", _tip(series, si, x, y, label)))
    out.append("</g>")
    # labels after all markers (on top), placed so that they do not overlap one another
    out.append('<g class="point-labels" font-size="10" fill="#222222">')
    taken = [(px(x) - 4.5, py(y) - 4.5, px(x) + 4.5, py(y) + 4.5) for _, x, y, _label in pts]
    for _, x, y, label in pts:
        if not label:
            continue
        tx, ty, anchor = _place_label(px(x), py(y), label, taken, (left, top, float(width), top + ph + 4))
        bold = ' font-weight="bold"' if highlight is not None and label == str(highlight) else ""
        out.append(f'<text class="point-label" x="{_num(tx)}" y="{_num(ty)}" text-anchor="{anchor}"{bold}>'
                   f"{_esc(label)}</text>")
    out.append("</g>")

    # legend in the plot corner that covers the fewest points
    if series:
        names = [str(s.get("name", f"series {i + 1}")) for i, s in enumerate(series)]
        lw = 28 + 6.2 * max(len(n) for n in names)
        lh = 8 + 16 * len(names)
        corners = [(left + pw - lw - 6, top + 6), (left + 6, top + 6), (left + pw - lw - 6, top + ph - lh - 6),
                   (left + 6, top + ph - lh - 6)]

        def covered(c: tuple[float, float]) -> int:
            return sum(c[0] - 8 <= px(x) <= c[0] + lw + 8 and c[1] - 8 <= py(y) <= c[1] + lh + 8
                       for _, x, y, _ in pts)

        lx, ly = min(corners, key=covered)  # min keeps the first of equals: deterministic
        out.append('<g class="legend">')
        out.append(f'<rect x="{_num(lx)}" y="{_num(ly)}" width="{_num(lw)}" height="{_num(lh)}" fill="#ffffff" '
                   f'fill-opacity="0.85" stroke="#cccccc"/>')
        for i, n in enumerate(names):
            yy = ly + 12 + 16 * i
            out.append(_marker(kinds[i], lx + 12, yy, 4.5, colors[i], "legend-marker"))
            out.append(f'<text x="{_num(lx + 24)}" y="{_num(yy + 4)}">{_esc(n)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
