"""edgekit.svgplot: Pareto fronts against brute force, and SVG that parses, with one marker per plotted point."""

from __future__ import annotations

import ast
import math
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgekit.svgplot import nice_ticks, pareto_front, scatter_svg

SVG = "{http://www.w3.org/2000/svg}"


def brute_front(points, minimize_x=True, maximize_y=True):
    def better_eq(a, b):  # a at least as good as b in both coordinates
        return (a[0] <= b[0] if minimize_x else a[0] >= b[0]) and (a[1] >= b[1] if maximize_y else a[1] <= b[1])

    finite = [i for i, p in enumerate(points) if math.isfinite(p[0]) and math.isfinite(p[1])]
    return {i for i in finite
            if not any(better_eq(points[j], points[i]) and tuple(points[j][:2]) != tuple(points[i][:2])
                       for j in finite)}


@pytest.mark.parametrize("minimize_x", [True, False])
@pytest.mark.parametrize("maximize_y", [True, False])
def test_pareto_front_matches_brute_force(minimize_x, maximize_y):
    rng = random.Random(1234)
    for trial in range(200):
        n = rng.randint(0, 30)
        grid = trial % 2 == 0  # coarse grid: many ties in x, in y, and duplicate points
        pts = [((rng.randint(0, 5), rng.randint(0, 5)) if grid else (rng.random(), rng.random())) for _ in range(n)]
        if n and trial % 5 == 0:
            pts[rng.randrange(n)] = (math.nan, 0.5)
        got = pareto_front(pts, minimize_x=minimize_x, maximize_y=maximize_y)
        assert len(got) == len(set(got))
        assert set(got) == brute_front(pts, minimize_x, maximize_y), pts
        xs = [pts[i][0] for i in got]  # ordered along the front, best x first
        assert xs == sorted(xs, reverse=not minimize_x)


def test_pareto_front_small_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 2.0, "only")]) == [0]
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]  # identical points do not dominate each other
    assert pareto_front([(1, 1), (1, 2)]) == [1]  # same x, higher y wins
    assert pareto_front([(1, 1), (2, 1)]) == [0]  # same y, smaller x wins
    assert pareto_front([(math.nan, 1), (1, math.inf), (2, 0.5)]) == [2]


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def markers(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == "marker"]


SERIES = [
    {"name": "edgekit", "points": [(0.26, 0.999, "int8"), (0.14, 0.97, "int4"), (0.5, 0.9999, "fp16")],
     "marker": "circle"},
    {"name": "ORT", "points": [(0.257, 0.965, "dynamic"), (0.607, 0.975, "nbits")], "marker": "square"},
    {"name": "NNCF", "points": [(0.255, 0.9995, "w8"), (0.2, 0.962, "w4")], "marker": "triangle"},
    {"name": "other", "points": [(0.3, 0.98, "d"), (0.35, 0.985, None), (0.4, 0.99)], "marker": "diamond"},
    {"name": "x", "points": [(0.45, 0.95, "c")], "marker": "cross"},
]


def test_scatter_parses_with_one_marker_per_point_legend_front_and_highlight():
    svg = scatter_svg(SERIES, title="MiniLM", x_label="size (x FP32)", y_label="cosine", highlight="int8")
    root = parse(svg)
    assert len(markers(root)) == sum(len(s["points"]) for s in SERIES)
    legend = [e for e in root.iter() if e.get("class") == "legend-marker"]
    assert len(legend) == len(SERIES)
    texts = ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]
    assert {"MiniLM", "size (x FP32)", "cosine", "edgekit", "ORT", "NNCF", "int8", "w4"} <= set(texts)
    front = [e for e in root.iter(f"{SVG}path") if e.get("class") == "front"]
    assert len(front) == 1
    # the front runs through int4 (0.14), w8 (0.255), fp16 (0.5): 2 steps of 2 segments each after the move
    assert front[0].get("d").count("L") == 4
    assert len([e for e in root.iter() if e.get("class") == "highlight"]) == 1
    bold = [e for e in root.iter(f"{SVG}text") if e.get("font-weight") == "bold" and e.text == "int8"]
    assert len(bold) == 1


def test_scatter_options_and_determinism():
    a = scatter_svg(SERIES, title="t", x_label="ms", y_label="y", log_x=True, front=False, highlight=None)
    b = scatter_svg(SERIES, title="t", x_label="ms", y_label="y", log_x=True, front=False, highlight=None)
    assert a == b
    root = parse(a)
    assert root.get("width") == "520" and root.get("height") == "360"
    assert not [e for e in root.iter() if e.get("class") in ("front", "highlight")]
    assert len(markers(root)) == sum(len(s["points"]) for s in SERIES)
    root = parse(scatter_svg(SERIES, width=800, height=500, highlight="no such label"))
    assert root.get("viewBox") == "0 0 800 500"
    assert not [e for e in root.iter() if e.get("class") == "highlight"]


def test_text_is_escaped():
    nasty = 'a<b>&"c\' \x01d'
    svg = scatter_svg([{"name": nasty, "points": [(1, 2, nasty)]}], title=nasty, x_label=nasty, y_label=nasty,
                      highlight=nasty)
    root = parse(svg)
    texts = ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]
    assert texts.count("a<b>&\"c' d") >= 4  # title, axis labels, legend, point label (control char dropped)
    assert "<b>" not in svg


def test_single_point_equal_x_and_nan():
    root = parse(scatter_svg([{"name": "one", "points": [(3.0, 0.5, "p")]}], title="single"))
    assert len(markers(root)) == 1
    root = parse(scatter_svg([{"name": "same x", "points": [(2.0, 0.1, "a"), (2.0, 0.9, "b"), (2.0, 0.5, "c")]}]))
    assert len(markers(root)) == 3
    root = parse(scatter_svg([{"name": "same y", "points": [(1.0, 0.7), (2.0, 0.7)]}], log_x=True))
    assert len(markers(root)) == 2
    nan_pts = [(math.nan, 1.0, "nx"), (1.0, math.nan, "ny"), (math.inf, 1.0, "inf"), (1.0, 2.0, "ok")]
    svg = scatter_svg([{"name": "s", "points": nan_pts}], highlight="nx")
    root = parse(svg)
    assert len(markers(root)) == 1
    assert "nan" not in svg.lower() and "inf" not in svg.lower()  # nothing non-finite written
    # log axis: non-positive x left out
    root = parse(scatter_svg([{"name": "log", "points": [(0.0, 1.0), (-1.0, 1.0), (10.0, 1.0)]}], log_x=True))
    assert len(markers(root)) == 1


def test_empty_plots_still_parse():
    for series in ([], [{"name": "empty", "points": []}], [{"name": "all nan", "points": [(math.nan, math.nan)]}]):
        root = parse(scatter_svg(series, title="nothing"))
        assert markers(root) == []


def test_nice_ticks():
    lo, hi, ticks = nice_ticks(0.962, 0.9999)
    assert lo <= 0.962 and hi >= 0.9999 and ticks[0] == lo and ticks[-1] == hi
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    assert nice_ticks(0, 10)[2] == [0, 2, 4, 6, 8, 10]
    lo, hi, ticks = nice_ticks(5.0, 5.0)
    assert lo < 5.0 < hi and len(ticks) >= 2


def test_svgplot_imports_only_the_standard_library():
    import sys

    src = Path(__file__).resolve().parents[1] / "edgekit" / "svgplot.py"
    tree = ast.parse(src.read_text())
    mods = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert mods - {"__future__"} <= set(sys.stdlib_module_names), mods


def test_legend_moves_under_the_plot_when_every_corner_has_points():
    corners = [(0, 0, "a"), (0, 1, "b"), (1, 0, "c"), (1, 1, "d"), (0.5, 0.5, "e")]
    series = [{"name": f"series {i}", "points": [p]} for i, p in enumerate(corners)]
    root = parse(scatter_svg(series, x_label="x", y_label="y"))
    axis_y = max(float(e.get("y1")) for e in root.iter(f"{SVG}line") if e.get("x1") != e.get("x2"))
    legend = [e for e in root.iter() if e.get("class") == "legend-marker"]
    assert len(legend) == 5
    assert all(float(e.get("cy") or e.get("y") or 0) > axis_y for e in legend if e.tag == f"{SVG}circle")
    # a free corner keeps the legend inside the plot
    root = parse(scatter_svg([{"name": "one", "points": [(0, 0, "a"), (1, 0.2, "b")]}]))
    legend = [e for e in root.iter() if e.get("class") == "legend-marker"]
    axis_y = max(float(e.get("y1")) for e in root.iter(f"{SVG}line") if e.get("x1") != e.get("x2"))
    assert float(legend[0].get("cy")) < axis_y


def test_crowded_labels_stay_on_the_canvas():
    pts = [(1 + 0.01 * i, 0.5 + 0.001 * i, f"label number {i}") for i in range(12)]
    svg = scatter_svg([{"name": "crowd", "points": pts}], width=300, height=200)
    root = parse(svg)
    labels = [e for e in root.iter(f"{SVG}text") if e.get("class") == "point-label"]
    assert len(labels) == 12
    assert all(0 <= float(e.get("x")) <= 300 and 0 <= float(e.get("y")) <= 200 for e in labels)
