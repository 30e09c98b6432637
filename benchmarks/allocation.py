"""Allocated plans against uniform baselines and the peers' tools, in one run: fidelity vs measured latency and size.

    .venv/bin/python benchmarks/allocation.py --model minilm --json benchmarks/results/allocation_minilm.json \
        --svg benchmarks/results/allocation_minilm
    .venv/bin/python benchmarks/allocation.py --model efficientnet \
        --json benchmarks/results/allocation_efficientnet.json --svg benchmarks/results/allocation_efficientnet

edgekit's rows are made by the library itself (``edgekit.mixed.allocate`` under each budget, ``apply_plan`` for the
uniform plans); the peers' rows by ``benchmarks/peers.py`` (ONNX Runtime's quantizers, OpenVINO + NNCF where they
install). Every model is evaluated on the same held-out samples against the same FP32 ONNX model and timed at batch
1 interleaved with FP32 in the same run (``peers.evaluate``), so only ratios are compared. Two Pareto plots (fidelity
vs latency and vs size, SVG) mark the uniform baselines and the allocated plans.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import measure  # noqa: E402
from benchmarks import peers as P  # noqa: E402

log = logging.getLogger("allocation")

BUDGETS = {
    "minilm": ["avg-bits=4.25", "avg-bits=4.5", "avg-bits=5", "avg-bits=6", "latency=0.6x"],
    "efficientnet": ["latency=0.6x", "avg-bits=5", "avg-bits=7", "size=5MB"],
}
PEERS = {
    "minilm": ["ort-dynamic-pc", "ort-nbits4-rtn-b32", "ort-nbits4-rtn-b128", "ort-nbits4-hqq-b128", "ov-fp32",
               "nncf-w8", "nncf-w4-asym-g128"],
    "efficientnet": ["ort-static", "ov-default", "nncf-int8"],
}
MINILM_EVAL = 64  # held-out sentences: every 4th of make_data's 256 (10 hand-written, 54 from the Python reference)


def prepare(name: str, work: Path, ctx):
    """FP32 ONNX, calibration and evaluation data, and what ``allocate`` needs to know of the model."""
    from edgekit.data import Dataset
    from edgekit.fsutil import sha256_file
    from edgekit.inventory import layer_inventory

    if name == "minilm":
        import numpy as np

        prep = P.prepare_minilm(work, MINILM_EVAL, ctx)
        with np.load(work / "minilm-sentences.npz") as z:  # make_data's order: hand-written, then the reference ones
            everything = {k: z[k] for k in prep.calib.inputs}
        n = len(next(iter(everything.values())))
        held = np.arange(n) % (n // MINILM_EVAL) == 0  # every 4th sentence: both kinds in both sets
        evald = Dataset("eval", {k: v[held][:MINILM_EVAL] for k, v in everything.items()}, None, "minilm")
        calib = Dataset("calib", {k: v[~held] for k, v in everything.items()}, None, "minilm")
        prep = replace(prep, calib=calib, evaluation=evald)
        task = "embedding"
    else:
        prep = P.prepare_efficientnet(work, 512, ctx)
        task = "classification"
    model = SimpleNamespace(sha256=sha256_file(prep.fp32_path), task=task)
    return prep, model, layer_inventory(prep.fp32_path)


def edgekit_rows(name: str, prep, model, layers, work: Path, ctx) -> list:
    """Plans under each budget, plus uniform int8 and uniform 4-bit (RTN and GPTQ) where the target allows."""
    from edgekit.compress.quant import W8A8Config
    from edgekit.export.onnx import describe
    from edgekit.mixed import allocate, apply_plan
    from edgekit.plan import LayerChoice, Plan
    from edgekit.tables import parse_budget
    from edgekit.targets import load_target
    from edgekit.wonly import LowBitQuantizer, WeightOnlyConfig

    profile = load_target("cpu-x86")
    fp32 = describe(prep.fp32_path)
    cfg = W8A8Config()
    rows = []
    for spec in BUDGETS[name]:
        t0 = time.perf_counter()
        plan, analysis = allocate(budget=parse_budget([spec]), solver="auto", profile=profile, model=model, fp32=fp32,
                                  layers=layers, calib=prep.calib, work=work / spec.replace("=", "-"), cfg=cfg, ctx=ctx)
        made = analysis.get("applied")
        art = made[1] if made and made[0] == plan.layers else apply_plan(
            plan, fp32, prep.calib, work / f"ek-{spec.replace('=', '-')}.onnx", cfg, ctx)
        notes = {"tool": "edgekit allocate", "solver": plan.solver, "options": _count(plan),
                 "make_s": round(time.perf_counter() - t0, 1)}
        rows.append(P.Peer(f"edgekit {spec}", art.path, art.size, notes, "onnxruntime"))
    # uniform baselines: int8 of the model's family, 4-bit on every layer that takes it (RTN and GPTQ)
    from edgekit.allocate import layer_options, quant_family

    family = quant_family(layers, profile)
    options = layer_options(layers, profile, family)
    int8 = "w8a8" if family == "static" else "w8a8d"
    uniform = {"uniform int8": lambda o: int8 if int8 in o else "fp32"}
    if name == "minilm":
        uniform["uniform 4-bit RTN g32"] = lambda o: "w4g32" if "w4g32" in o else "fp32"
        uniform["uniform 4-bit GPTQ g32"] = uniform["uniform 4-bit RTN g32"]
    for label, pick in uniform.items():
        choices = tuple(LayerChoice(layer.name, pick(options[layer.name])) for layer in layers)
        settings = {"weight_only": WeightOnlyConfig(method="rtn" if "RTN" in label else "gptq").to_dict()}
        plan = Plan(model_sha256=model.sha256, target=profile.name, precision="mixed", layers=choices,
                    activations={**(cfg.to_dict() if family == "static" else {}), **settings})
        quantizer = None
        if "4-bit" in label:
            quantizer = LowBitQuantizer(__import__("onnx").load(str(prep.fp32_path)),
                                        [x for x in layers if options[x.name] != ["fp32"]], prep.calib,
                                        WeightOnlyConfig.from_dict(settings["weight_only"]),
                                        model_sha256=model.sha256, ctx=ctx)
        art = apply_plan(plan, fp32, prep.calib, work / f"{label.replace(' ', '-')}.onnx", cfg, ctx, quantizer)
        rows.append(P.Peer(label, art.path, art.size, {"tool": "edgekit", "options": _count(plan)}, "onnxruntime"))
    return rows


def _count(plan) -> dict:
    out: dict[str, int] = {}
    for c in plan.layers:
        out[c.option] = out.get(c.option, 0) + 1
    return out


def _metric(rec: dict, classification: bool) -> float | None:
    return rec.get("top1_agreement") if classification else rec.get("mean_cosine")


def plots(results: dict, classification: bool, prefix: str) -> list[Path]:
    from edgekit.svgplot import scatter_svg

    ylabel = "top-1 agreement with FP32" if classification else "mean cosine to FP32"
    groups = {"edgekit (allocated)": [], "edgekit (uniform)": [], "peers": []}
    for name, rec in results.items():
        y = _metric(rec, classification)
        lat = (rec.get("latency_batch1") or {}).get("ratio_vs_fp32")
        if y is None or lat is None:
            continue
        key = "edgekit (allocated)" if name.startswith("edgekit ") else "edgekit (uniform)" \
            if name.startswith("uniform") else "peers"
        groups[key].append((name, lat, rec.get("size_ratio_vs_fp32") or 1.0, y))
    written = []
    for axis, idx, xlabel in (("latency", 1, "latency x FP32 (batch 1, same run)"), ("size", 2, "size x FP32")):
        series = [{"name": g, "points": [(p[idx], p[3], p[0]) for p in pts],
                   "marker": {"edgekit (allocated)": "circle", "edgekit (uniform)": "square"}.get(g, "triangle")}
                  for g, pts in groups.items() if pts]
        svg = scatter_svg(series, title=f"{'top-1' if classification else 'cosine'} vs {axis}", x_label=xlabel,
                          y_label=ylabel)
        path = Path(f"{prefix}_{axis}.svg")
        path.write_text(svg)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(BUDGETS))
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--svg", help="write PREFIX_latency.svg and PREFIX_size.svg (Pareto plots)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--no-peers", action="store_true", help="edgekit's rows only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgekit.context import Context

    ctx = Context()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-alloc-bench-") as tmp:
        work = Path(tmp)
        prep, model, layers = prepare(args.model, work, ctx)
        rows = edgekit_rows(args.model, prep, model, layers, work, ctx)
        if not args.no_peers:
            family = "transformer" if args.model == "minilm" else "cnn"
            rows += P.build_peers(prep.fp32_path, prep.calib.feeds()[:32], work / "peers", family=family,
                                  only=PEERS[args.model])
        feeds = {k: v[:1] for k, v in prep.evaluation.inputs.items()}
        results = measure.evaluate(rows, prep.fp32_path, prep.evaluation.feeds(), classification=prep.classification,
                             latency_feeds=feeds, rounds=args.rounds, per_round=args.per_round)
    metric = "top1_agreement" if prep.classification else "mean_cosine"
    print(f"\n{prep.description}: {len(prep.evaluation)} held-out samples, {metric}; ratios vs FP32 in this run\n")
    print(f"| {'variant':32s} | size x FP32 | {metric:14s} | SQNR dB | latency x FP32 (range) |")
    print(f"|{'-' * 34}|------------:|{'-' * 15}:|--------:|-----------------------:|")
    for name, rec in results.items():
        lat = rec.get("latency_batch1") or {}
        y = rec.get(metric)
        err = (rec.get("notes") or {}).get("error")
        if err:
            print(f"| {name:32s} | failed: {err[:80]}")
            continue
        print(f"| {name:32s} | {rec.get('size_ratio_vs_fp32', 1.0):11.3f} | {y if y is None else round(y, 4)!s:>14} "
              f"| {rec.get('sqnr_db', 0):7.1f} | {lat.get('ratio_vs_fp32', float('nan')):.3f} "
              f"({lat.get('ratio_min', float('nan')):.2f}-{lat.get('ratio_max', float('nan')):.2f}) |")
    out = {"model": args.model, "description": prep.description, "eval_samples": len(prep.evaluation),
           "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "seconds": round(
               time.perf_counter() - t0, 1), "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    if args.svg:
        for path in plots(results, prep.classification, args.svg):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
