#!/usr/bin/env python
"""TFLite (LiteRT) INT8 export against edgekit's ONNX Runtime INT8, on EfficientNet-Lite0 and real photos, one run.

1. loads ``builtin:efficientnet-lite0``, its calibration photos (``--calib-samples``, default 64) and held-out
   evaluation photos (``--eval-samples``, default 128; disjoint source photographs);
2. **fp32 (torch)**: the reference outputs, from the torch module;
3. **ort-int8**: the pipeline's way (as ``edgekit.build``): ``export_onnx`` -> ``layer_inventory`` -> the uniform
   int8 plan for ``cpu-arm64`` (``uniform_plan``) -> ``edgekit.mixed.apply_plan`` with ``W8A8Config``;
   **ort-fp32** is the exported FP32 ONNX (for sizes and timing);
4. **tflite-fp32**: ``export_tflite`` without a plan; **tflite-int8**: ``export_tflite`` with *the same plan*
   and the same calibration samples;
5. top-1 agreement with fp32 (torch), mean cosine and SQNR of the logits, file sizes and ratios to their FP32;
6. batch-1 latency, 2 threads, every runtime interleaved round by round (``compare_latency``, order rotated);
7. checks: tflite-int8 size <= 30 % of tflite-fp32; tflite-int8 agreement >= ort-int8's minus 3 points. Exit 1
   when one is missed (``--no-check``: report only). ``--json PATH`` saves everything.

Run from the repository root: ``.venv/bin/python benchmarks/tflite_vs_ort.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench")

MODEL = "builtin:efficientnet-lite0"
TARGET = "cpu-arm64"
MAX_SIZE_RATIO = 0.30
MAX_AGREEMENT_GAP = 0.03
THREADS = 2


def logits_metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    from edgekit.verify import mean_cosine, sqnr_db

    return {"top1_agreement": round(float((ref.argmax(1) == out.argmax(1)).mean()), 4),
            "cosine": round(mean_cosine(ref, out), 5), "sqnr_db": round(sqnr_db(ref, out), 2)}


def run(work: Path, calib_n: int, eval_n: int, rounds: int, per_round: int) -> dict:
    from edgekit.agent.backends import LiteRtRuntime
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.allocate import uniform_plan
    from edgekit.compress.quant import W8A8Config
    from edgekit.context import Context
    from edgekit.data import load_data
    from edgekit.export.onnx import export_onnx
    from edgekit.export.tflite import export_tflite
    from edgekit.inventory import layer_inventory
    from edgekit.mixed import apply_plan
    from edgekit.model import load_model
    from edgekit.targets import load_target
    from edgekit.verify import run_artifact, run_reference

    ctx = Context(seed=0)
    timings: dict[str, float] = {}

    def timed(key, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[key] = round(time.perf_counter() - t0, 1)
        return out

    model = load_model(MODEL, ctx=ctx)
    calib = load_data(model.default_calib, model.inputs, model.preprocessing, role="calibration", limit=calib_n,
                      seed=ctx.seed)
    evald = load_data(model.default_eval, model.inputs, model.preprocessing, role="evaluation", limit=eval_n,
                      seed=ctx.seed)
    ref = next(iter(timed("torch_reference_s", run_reference, model, evald, ctx).values()))

    ort_fp32 = timed("onnx_export_s", export_onnx, model, work / "model-fp32.onnx")
    layers = layer_inventory(ort_fp32.path)
    cfg = W8A8Config(calib_samples=calib_n)
    plan = uniform_plan(layers, load_target(TARGET), "int8", model_sha256=model.sha256, activations=cfg.to_dict())
    ort_int8 = timed("ort_int8_s", apply_plan, plan, ort_fp32, calib, work / "model-int8.onnx", cfg, ctx)
    tfl_fp32 = timed("tflite_fp32_s", export_tflite, model.module, model.inputs, model.output_names,
                     work / "model-fp32.tflite", ctx=ctx)
    tfl_int8 = timed("tflite_int8_s", export_tflite, model.module, model.inputs, model.output_names,
                     work / "model-int8.tflite", plan=plan, calib=calib, ctx=ctx)
    artifacts = {"ort-fp32": ort_fp32, "ort-int8": ort_int8, "tflite-fp32": tfl_fp32, "tflite-int8": tfl_int8}
    fp32_of = {"ort-int8": "ort-fp32", "tflite-int8": "tflite-fp32"}

    variants = {}
    for name, art in artifacts.items():
        out = next(iter(run_artifact(art, evald, ctx).values()))
        variants[name] = {"path": art.path.name, "size_bytes": art.size, **logits_metrics(ref, out)}
        if name in fp32_of:
            variants[name]["size_ratio"] = round(art.size / artifacts[fp32_of[name]].size, 4)
    runtimes = {k: (LiteRtRuntime(a.path, threads=THREADS) if a.format == "tflite" else OrtRuntime(a.path,
                                                                                                  threads=THREADS))
                for k, a in artifacts.items()}
    from benchmarks.measure import interleaved_latency

    latency = interleaved_latency(runtimes, {model.inputs[0].name: evald.inputs[model.inputs[0].name][:1]},
                                  rounds=rounds, per_round=per_round, baseline="ort-fp32", quiet_share=None)
    for k, v in latency.items():
        variants[k]["latency"] = v
    gap = variants["ort-int8"]["top1_agreement"] - variants["tflite-int8"]["top1_agreement"]
    checks = {
        "tflite_int8_size_ratio": {"value": variants["tflite-int8"]["size_ratio"], "max": MAX_SIZE_RATIO,
                                   "passed": variants["tflite-int8"]["size_ratio"] <= MAX_SIZE_RATIO},
        "agreement_gap_vs_ort_int8": {"value": round(gap, 4), "max": MAX_AGREEMENT_GAP,
                                      "passed": gap <= MAX_AGREEMENT_GAP + 1e-9},
    }
    return {"model": MODEL, "target": TARGET, "plan_layers": len(plan.layers),
            "quantized_layers": sum(c.option != "fp32" for c in plan.layers),
            "data": {"calibration": {"source": calib.source, "samples": len(calib)},
                     "evaluation": {"source": evald.source, "samples": len(evald)}},
            "reference": "fp32 (torch)", "variants": variants, "checks": checks, "timings_s": timings}


def print_results(res: dict) -> None:
    v = res["variants"]
    print(f"\n{res['model']} on {res['data']['evaluation']['samples']} evaluation photos "
          f"({res['data']['calibration']['samples']} calibration photos); reference: fp32 (torch)")
    print(f"{'variant':<12} {'size MB':>8} {'vs fp32':>8} {'top-1 agr':>9} {'cosine':>8} {'SQNR dB':>8} "
          f"{'b1 ms':>8}")
    for name, r in v.items():
        ratio = f"{r['size_ratio']:.1%}" if "size_ratio" in r else "-"
        print(f"{name:<12} {r['size_bytes'] / 1e6:>8.2f} {ratio:>8} {r['top1_agreement']:>9.1%} {r['cosine']:>8.4f} "
              f"{r['sqnr_db']:>8.2f} {r['latency']['median_ms']:>8.2f}")
    for name, c in res["checks"].items():
        print(f"check {name}: {c['value']:.4f} (max {c['max']}) — {'PASS' if c['passed'] else 'FAIL'}")
    print("timings (s): " + ", ".join(f"{k} {t}" for k, t in res["timings_s"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration photos (default 64)")
    ap.add_argument("--eval-samples", type=int, default=128, help="evaluation photos (default 128; at least 128)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--per-round", type=int, default=20, help="timed batch-1 runs per runtime and round (default 20)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH")
    ap.add_argument("--keep", type=Path, default=None, help="keep the artifacts in this folder")
    ap.add_argument("--no-check", action="store_true", help="report only; exit 0 even when a check fails")
    ap.add_argument("-v", "--verbose", action="store_true", help="log edgekit's progress")
    args = ap.parse_args(argv)
    if args.eval_samples < 128:
        ap.error("--eval-samples must be at least 128")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from benchmarks.build_cpu import environment

    env = {**environment(("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torchao")), "threads": THREADS}
    print(f"edgekit tflite_vs_ort — {env['date']} — {env['cpu'].get('model name', '?')}, {env['cpu_count']} CPUs, "
          f"{THREADS} threads — "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    with tempfile.TemporaryDirectory(prefix="edgekit-tflite-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(work, args.calib_samples, args.eval_samples, args.rounds, args.per_round)
    print_results(res)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, **res}, indent=2) + "\n")
        print(f"results written to {path}")
    passed = all(c["passed"] for c in res["checks"].values())
    return 0 if passed or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
