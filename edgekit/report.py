"""The build report: ``report.json`` (plain data) and a self-contained ``report.html`` (no external assets)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from edgekit.fsutil import atomic_write_text


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    j = atomic_write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    h = atomic_write_text(folder / "report.html", render_html(report))
    return j, h


def _e(x) -> str:
    return html.escape(str(x))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _bar_svg(rows: list[tuple[str, float, str]], unit: str) -> str:
    """A horizontal bar chart as inline SVG: (label, value, colour)."""
    if not rows:
        return ""
    top = max(v for _, v, _ in rows) or 1.0
    h = 26 * len(rows) + 10
    parts = [f'<svg width="560" height="{h}" role="img" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, v, colour) in enumerate(rows):
        w = 360 * v / top
        y = 6 + 26 * i
        parts.append(f'<text x="0" y="{y + 15}" font-size="13">{_e(label)}</text>')
        parts.append(f'<rect x="110" y="{y}" width="{w:.1f}" height="20" fill="{colour}"/>')
        parts.append(f'<text x="{116 + w:.1f}" y="{y + 15}" font-size="13">{v:.3g} {_e(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _budget_line(kind: str, b: dict) -> str:
    met = '<span class="pass">met</span>' if b["met"] else '<span class="fail">not met</span>'
    if kind == "size":
        text = f"size {b['actual_mb']:.2f} MB, budget {b['budget_mb']} MB: {met}"
    elif kind == "latency":
        text = f"latency {b['actual_ms']:.3f} ms, budget {b['budget_ms']} ms: {met} ({_e(b.get('note', ''))})"
    else:
        text = f"{_e(kind)}: {_e(b)}"
    return f"<li>{text}</li>"


def _allocation_html(alloc: dict | None) -> str:
    """Solver, budget, additivity check (with a predicted-vs-measured scatter) and the measured rounds."""
    if not alloc:
        return ""
    add = alloc.get("additivity") or {}
    parts = [f"<h3>Allocation</h3><p>Solver <b>{_e(alloc['solver'])}</b>, distortion metric {_e(alloc['metric'])}; "
             f"budget {_e({k: v for k, v in alloc['budget'].items() if k != 'predicted'})}; "
             f"predicted {_e(alloc['budget'].get('predicted', {}))}"
             + (f"; latencies from {_e(alloc.get('hardware_table') or 'roofline estimates')}" if alloc.get("cost")
                else "") + ".</p>"]
    if add.get("samples"):
        parts.append(f"<p>Additivity check over {add['samples']} random multi-layer mixes: Pearson "
                     f"{add['pearson']:.3f}, mean relative error {100 * add['mean_rel_error']:.1f}% "
                     f"(sum of single-layer distortions vs measured joint distortion).</p>")
        parts.append(_scatter_svg(add["predicted"], add["measured"]))
    parts.append(_pareto_html(alloc.get("pareto") or {}, alloc["metric"]))
    for rnd in alloc.get("latency_rounds") or []:
        parts.append(f"<p>measured: {_e(rnd)}</p>")
    return "".join(parts)


def _structure_html(st: dict | None) -> str:
    """What pruning, removal, low rank and the recovery fine-tune did (joint-space plans only)."""
    if not st:
        return ""
    items = []
    if st.get("pruned"):
        items.append("channel groups pruned (channels before → kept): " + ", ".join(
            f"{_e(g)} {a}→{b}" for g, (a, b) in st["pruned"].items()))
    if st.get("dropped"):
        items.append("residual branches removed: " + ", ".join(_e(d) for d in st["dropped"]))
    if st.get("factorized"):
        items.append("low-rank layers (rank): " + ", ".join(f"{_e(k)} ({v})" for k, v in st["factorized"].items()))
    if st.get("sparse"):
        items.append("N:M sparse layers: " + ", ".join(f"{_e(k)} ({_e(v)})" for k, v in st["sparse"].items()))
    rec = st.get("recover")
    if rec:
        kept = " — no improvement, the untrained weights were kept" if rec.get("kept_original") else ""
        items.append(f"recovery fine-tune: {rec['steps']} steps in {rec['seconds']} s, held-out distillation loss "
                     f"{rec['loss_before']:.4g} before → {rec['loss_after']:.4g} after{kept}")
    return "<h3>Structure</h3><ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _pareto_html(pareto: dict, metric: str) -> str:
    """Two Pareto plots from the tables: predicted distortion vs size and vs latency, the front (least distortion for
    a grid of size budgets, each solved exactly) with the uniform plans and the chosen one marked."""
    from edgekit.svgplot import scatter_svg

    if not pareto.get("front"):
        return ""
    svgs = []
    for key, label, scale in (("bytes", "weights, MB", 1e-6), ("latency_ms", "layer latency sum, ms", 1.0)):
        series = [{"name": "front (solved)", "marker": "circle",
                   "points": [(p[key] * scale, p["distortion"], "") for p in pareto["front"]]}]
        series += [{"name": name, "marker": "square" if name != "chosen" else "diamond",
                    "points": [(p[key] * scale, p["distortion"], name)]} for name, p in pareto["plans"].items()]
        svgs.append(scatter_svg(series, title=f"predicted {metric} vs {label}", x_label=label,
                                y_label=f"predicted {metric} (sum over layers)", maximize_y=False, highlight="chosen",
                                width=440, height=320))
    return ("<p>Predicted trade-offs from the tables (lower is better); the chosen plan is ringed. Verification below "
            "measures the chosen plan for real.</p><div class=\"grid\">" + "".join(f"<div>{s}</div>" for s in svgs)
            + "</div>")


def _scatter_svg(xs: list[float], ys: list[float]) -> str:
    """Predicted (x) vs measured (y) distortion, with the diagonal."""
    top = max([*xs, *ys, 1e-30])
    size, pad = 220, 24
    pts = "".join(f'<circle cx="{pad + size * x / top:.1f}" cy="{pad + size - size * y / top:.1f}" r="3.5" '
                  f'fill="#2f7d32"/>' for x, y in zip(xs, ys))
    return (f'<svg width="{size + 2 * pad}" height="{size + 2 * pad}" role="img" xmlns="http://www.w3.org/2000/svg">'
            f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#9aa5b1"/>'
            f'<line x1="{pad}" y1="{pad + size}" x2="{pad + size}" y2="{pad}" stroke="#9aa5b1" stroke-dasharray="4"/>'
            f'{pts}<text x="{pad}" y="{size + 2 * pad - 4}" font-size="11">sum of single-layer (predicted)</text>'
            f'<text x="2" y="{pad - 8}" font-size="11">measured joint</text></svg>')


def _pq(x) -> str:
    return "" if x is None else f"{x:.3f}"


def render_html(r: dict) -> str:
    v = r["verification"]
    lat = r.get("latency") or {}
    size = r["size"]
    status = "PASS" if v["passed"] else "FAIL"
    alloc = r.get("allocation")
    has_cost = bool(alloc and alloc.get("cost"))
    rows = []
    for layer in r["layers"]:
        cls = "q" if layer["option"] != "fp32" else ""
        extra = ""
        if alloc:
            d = layer.get("distortion")
            extra = f'<td class="n">{"" if d is None else format(d, ".3g")}</td>'
        if has_cost:
            extra += (f'<td class="n">{layer.get("bytes") or 0:,}</td><td class="n">{layer.get("latency_ms") or 0:.4f}'
                      f'</td><td>{_e(layer.get("latency_source", ""))}</td>')
        rows.append(
            f'<tr class="{cls}"><td>{_e(layer["name"])}</td><td>{_e(layer["op_type"])}</td><td>{_e(layer["kind"])}</td>'
            f'<td>{_e("×".join(map(str, layer["weight_shape"])))}</td><td class="n">{layer["params"]:,}</td>'
            f'<td class="n">{layer["macs"]:,}</td><td>{_e(layer.get("compression", ""))}</td>'
            f'<td class="n">{_pq(layer.get("pq_index"))}</td><td>{_e(layer["option"])}</td>{extra}'
            f'<td>{_e(layer["reason"])}</td></tr>'
        )
    layer_head = ("<th>layer</th><th>op</th><th>kind</th><th>weight</th><th>params</th><th>MACs</th>"
                  "<th title='what the plan does to the layer: float, quantize, prune, low-rank, sparse, drop'>"
                  "compression</th><th title='PQ Index of the FP32 weight (0: every magnitude equal, nothing to "
                  "prune; higher: the mass sits in few weights, more headroom for pruning)'>PQ index</th>"
                  "<th>option</th>"
                  + ("<th>distortion</th>" if alloc else "")
                  + ("<th>bytes</th><th>latency ms</th><th>latency source</th>" if has_cost else "")
                  + "<th>reason</th>")
    metrics = "".join(
        f"<tr><td>{_e(o['name'])}</td><td class='n'>{o['sqnr_db']:.2f}</td><td class='n'>{o['cosine']:.5f}</td>"
        f"<td class='n'>{o['max_abs']:.4g}</td><td class='n'>"
        f"{'' if o['top1_agreement'] is None else format(o['top1_agreement'], '.1%')}</td></tr>"
        for o in v["outputs"]
    )
    acc = "".join(
        f"<p>Top-1 agreement of {_e(o['name'])} per source of the held-out samples: "
        + ", ".join(f"{_e(k)} {x:.1%}" for k, x in o["top1_by_group"].items()) + ".</p>"
        for o in v["outputs"] if o.get("top1_by_group")
    )
    if v.get("accuracy") is not None:
        acc += (f"<p>Accuracy on labelled held-out data: <b>{v['accuracy']:.2%}</b> "
               f"(original {v['accuracy_reference']:.2%}, drop {v['accuracy_drop']:.2%}).</p>")
    size_svg = _bar_svg([("FP32", size["fp32_bytes"] / 1e6, "#9aa5b1"),
                         (r["precision"]["chosen"].upper(), size["artifact_bytes"] / 1e6, "#2f7d32")], "MB")
    lat_svg = ""
    if lat:
        lat_svg = _bar_svg([("FP32", lat["fp32"]["median_ms"], "#9aa5b1"),
                            (r["precision"]["chosen"].upper(), lat["chosen"]["median_ms"], "#2f7d32")], "ms")
    budgets = "".join(_budget_line(k, b) for k, b in (r.get("budgets") or {}).items())
    tried = "".join(
        f"<li>{_e(t['precision'])}: {_mb(t['size_bytes'])}, {_e(t['verification'])}</li>"
        for t in r["precision"]["tried"]
    )
    failures = "".join(f"<li>{_e(f)}</li>" for f in v["failures"]) or "<li>none</li>"
    tol = ", ".join(f"{_e(k)} {_e(val)}" for k, val in v["tolerances"].items() if val is not None)
    lat_text = (f"<p>Batch-1 latency in ONNX Runtime on the build host ({_e(lat.get('host', ''))}), interleaved runs, "
                f"median: FP32 {lat['fp32']['median_ms']:.3f} ms, chosen {lat['chosen']['median_ms']:.3f} ms "
                f"(<b>{lat['ratio']:.2f}×</b>).</p>") if lat else "<p>Latency not measured.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgekit report — {_e(r['model']['source'])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1b1f23}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #d0d7de;padding:3px 7px}}
th{{background:#f3f4f6}} td.n{{text-align:right;font-variant-numeric:tabular-nums}} tr.q td{{background:#eef7ee}}
.pass{{color:#2f7d32}} .fail{{color:#b42318}} .grid{{display:flex;gap:2em;flex-wrap:wrap}}
</style></head><body>
<h1>edgekit build report</h1>
<p>Model <code>{_e(r['model']['source'])}</code> (sha256 {_e(r['model']['sha256'][:16])}…) for target
<b>{_e(r['target']['name'])}</b> via {_e(r['target']['runtime'])}. Precision requested
<b>{_e(r['precision']['requested'])}</b>, chosen <b>{_e(r['precision']['chosen'])}</b>.</p>
<h2>Verification: <span class="{status.lower()}">{status}</span></h2>
<p>{_e(v['samples'])} held-out samples from {_e(v['data_source'])}; tolerances ({_e(v['tolerance_class'])}): {tol}.</p>
<table><tr><th>output</th><th>SQNR dB</th><th>cosine</th><th>max abs</th><th>top-1 agreement</th></tr>{metrics}</table>
{acc}<p>Failures:</p><ul>{failures}</ul>
<h2>Size and latency</h2>
<div class="grid"><div><h3>Artifact size</h3>{size_svg}<p>{_mb(size['fp32_bytes'])} → {_mb(size['artifact_bytes'])}
(<b>{size['ratio']:.2f}×</b>)</p></div><div><h3>Latency</h3>{lat_svg}{lat_text}</div></div>
<h3>Budgets of the target</h3><ul>{budgets or '<li>none set</li>'}</ul>
<h3>Precisions tried</h3><ul>{tried}</ul>
<h2>Layers ({r['totals']['layers']}, {r['totals']['quantized_layers']} quantized;
{r['totals']['params']:,} parameters; {r['totals']['macs']:,} MACs per sample)</h2>
{_allocation_html(alloc)}{_structure_html(r.get("structure"))}
<table><tr>{layer_head}</tr>
{''.join(rows)}</table>
<h2>Data and lineage</h2>
<ul><li>calibration: {_e(r['data']['calibration']['source'])} ({r['data']['calibration']['samples']} samples)</li>
<li>evaluation: {_e(r['data']['evaluation']['source'])} ({r['data']['evaluation']['samples']} samples)</li>
<li>versions: {_e(', '.join(f'{k} {val}' for k, val in r['versions'].items()))}</li>
<li>build time: {r['build_seconds']} s</li></ul>
</body></html>
"""
