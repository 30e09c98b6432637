#!/usr/bin/env python
"""One run, three targets: `edgekit build` of the default model (EfficientNet-Lite0) for cpu-x86 (ONNX Runtime
INT8), jetson-orin-nano (TensorRT-ready INT8 ONNX) and cpu-arm64 (TFLite INT8), on the same calibration and evaluation
photos, and what issue 8 asks of them:

- jetson-orin-nano: the TensorRT-ready graph passes pre-flight (``export.trt_preflight.check`` on the bundled file)
  and host verification, and the manifest has an ``engine`` section;
- cpu-arm64: an int8 ``.tflite`` that runs in ``ai-edge-litert``, at most 30 % of the FP32 size, whose top-1
  agreement with FP32 on real photos is within 3 points of ONNX Runtime's INT8 (the cpu-x86 build) or better.

Top-1 agreement is each bundle's own host verification (``verification.json``: every artifact run on the same
evaluation photos against the same torch reference). FP32 size is the exported FP32 ONNX (the FP32 ``.tflite`` is
within 1 % of it). Prints a table, writes ``--json``, exits 1 when a goal is missed.

    .venv/bin/python benchmarks/targets.py [--eval-samples 256] [--json benchmarks/results/targets.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("cpu-x86", "jetson-orin-nano", "cpu-arm64")
TFLITE_MAX_SIZE = 0.30
TFLITE_MAX_GAP = 0.03


def _build(target: str, out: Path, eval_samples: int) -> dict:
    from edgekit.build import BuildRequest, build
    from edgekit.context import Context

    t0 = time.time()
    res = build(BuildRequest(target=target, out=out / target, precision="int8", eval_samples=eval_samples,
                             measure_latency=False), Context())
    art = res.manifest["artifact"]
    ver = json.loads((res.bundle_dir / "verification.json").read_text())
    out_metrics = ver["outputs"][0]
    row = {"target": target, "runtime": res.manifest["runtime"], "format": art["format"], "size_bytes": art["size"],
           "fp32_bytes": res.report["size"]["fp32_bytes"], "top1_agreement": out_metrics["top1_agreement"],
           "cosine": out_metrics["cosine"], "sqnr_db": out_metrics["sqnr_db"], "passed": ver["passed"],
           "samples": ver.get("samples"), "seconds": round(time.time() - t0, 1)}
    row["size_ratio"] = row["size_bytes"] / row["fp32_bytes"]
    if target == "jetson-orin-nano":
        import onnx

        from edgekit.export.trt_preflight import check

        problems = check(onnx.load(str(res.bundle_dir / art["path"])), res.manifest["engine"]["tensorrt_version"],
                         res.manifest["engine"]["sm"])
        row["preflight_problems"] = [str(p) for p in problems]
        row["engine"] = res.manifest.get("engine", {}).get("flags")
    if target == "cpu-arm64":
        from edgekit.agent.backends import LiteRtRuntime

        rt = LiteRtRuntime(res.bundle_dir / art["path"])
        row["litert_runs"] = bool(rt.output_names)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgekit-targets-") as tmp:
        rows = {t: _build(t, Path(tmp), args.eval_samples) for t in TARGETS}
    print(f"{'target':<18} {'runtime':<12} {'format':<14} {'size':>6} {'top-1':>7} {'cosine':>7} {'verified':>8}")
    for r in rows.values():
        print(f"{r['target']:<18} {r['runtime']:<12} {r['format']:<14} {r['size_ratio']:>5.2f}x "
              f"{r['top1_agreement']:>7.1%} {r['cosine']:>7.4f} {str(r['passed']):>8}")
    ort, trt, tfl = rows["cpu-x86"], rows["jetson-orin-nano"], rows["cpu-arm64"]
    goals = {
        "jetson: pre-flight passes": not trt["preflight_problems"],
        "jetson: host verification passes": trt["passed"],
        "jetson: manifest says how to build the engine": bool(trt.get("engine")),
        "cpu-arm64: int8 .tflite runs in ai-edge-litert": tfl["format"] == "tflite" and tfl["litert_runs"],
        f"cpu-arm64: size <= {TFLITE_MAX_SIZE:.0%} of FP32": tfl["size_ratio"] <= TFLITE_MAX_SIZE,
        f"cpu-arm64: top-1 within {TFLITE_MAX_GAP:.0%} of ORT INT8 ({ort['top1_agreement']:.1%})":
            tfl["top1_agreement"] >= ort["top1_agreement"] - TFLITE_MAX_GAP,
    }
    for name, ok in goals.items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "goals": goals}, indent=1) + "\n")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
