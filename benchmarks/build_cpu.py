#!/usr/bin/env python
"""Benchmark edgekit's INT8 build for cpu-x86 against ONNX Runtime's own ``quantize_static``.

For each built-in model (EfficientNet-Lite0 on the built-in real photos, the digits CNN on sklearn digits):

1. run the real pipeline, ``edgekit.build.build(BuildRequest(precision="int8", target="cpu-x86"))``, and take the
   bundled ``<out>/<name>/model.onnx`` (edgekit INT8);
2. export the FP32 ONNX exactly as the pipeline does (``load_model`` + ``export_onnx``) and quantize it with
   ONNX Runtime's ``quantize_static`` after ``quant_pre_process``, on the same 64 calibration samples:
   * ``ort-default``: every setting left at its default (QDQ, MinMax, per-tensor, int8 activations and weights);
   * ``ort-per-channel``: the same with ``per_channel=True``;
3. evaluate all of them on the model's default held-out evaluation set: top-1 agreement with the FP32 ONNX
   outputs and with the original torch outputs, logit SQNR, mean cosine, accuracy (digits has labels), size;
4. time batch-1 (and batch-8) inference in ONNX Runtime (CPU EP, default threads), all four sessions
   interleaved round by round with ``edgekit.agent.runtime.compare_latency``, the order rotated every round;
5. print tables, optionally write JSON (``--json``), and exit 1 when a goal is missed:
   EfficientNet-Lite0: edgekit size <= 0.30x FP32, batch-1 latency <= 0.75x FP32, top-1 agreement >= ort-default's;
   digits-cnn: edgekit accuracy within 1 point of FP32.

Run from the repository root: ``.venv/bin/python benchmarks/build_cpu.py`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")

MODELS = ("efficientnet-lite0", "digits-cnn")
VARIANTS = ("fp32", "edgekit-int8", "ort-default", "ort-per-channel")
CALIB_SAMPLES = 64
EVAL_BATCH = 16

# per-model timing: per_round for batch 1 and batch 8 (digits runs in ~30 us, so it needs many more calls)
PER_ROUND = {
    "efficientnet-lite0": {1: 30, 8: 6},
    "digits-cnn": {1: 1000, 8: 500},
}

# the goals this benchmark checks (see the module docstring)
EFFNET_MAX_SIZE_RATIO = 0.30
EFFNET_MAX_LATENCY_RATIO = 0.75
DIGITS_MAX_ACCURACY_DROP = 0.01


# --------------------------------------------------------------------------------------------------- helpers
class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol: one sample per call, as a plain user would write it."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


def ort_quantize(fp32_path: Path, out_path: Path, calib, work: Path, *, per_channel: bool) -> Path:
    """The baseline: ``quant_pre_process`` then ``quantize_static`` with defaults (only ``per_channel`` varies)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / f"{out_path.stem}-pre.onnx"
    quant_pre_process(str(fp32_path), str(pre))
    kwargs = {"per_channel": True} if per_channel else {}
    quantize_static(str(pre), str(out_path), _Reader(calib.feeds()), **kwargs)
    return out_path


def node_counts(path: Path) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def activation_dtypes(path: Path) -> str:
    """The element types of the QuantizeLinear outputs (i.e. of the quantized activations), e.g. 'uint8'."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    kinds = set()
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) >= 3 and n.input[2] in inits:
            kinds.add(onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name)
    return "/".join(sorted(kinds)) or "-"


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@dataclass
class VariantResult:
    name: str
    path: Path
    size_bytes: int
    activations: str
    nodes: dict[str, int]
    metrics: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- latency
def interleaved_latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int, per_round: int,
                        threads: int | None = None) -> dict:
    """Time every session on ``feeds`` with compare_latency, one round per call, rotating the order each round.

    Returns per variant: median_ms (median of the per-round medians), p90_ms (median of round p90s), the
    round medians, and the ratio to fp32 (overall, and min/max of the per-round ratios).
    """
    from edgekit.agent.runtime import OrtRuntime, compare_latency

    runtimes = {k: OrtRuntime(p, threads=threads) for k, p in paths.items()}  # CPUExecutionProvider
    names = list(runtimes)
    per_round_med: dict[str, list[float]] = {k: [] for k in names}
    per_round_p90: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        stats = compare_latency({k: runtimes[k] for k in order}, feeds, rounds=1, per_round=per_round,
                                warmup=10 if r == 0 else 2)
        for k, s in stats.items():
            per_round_med[k].append(s.median_ms)
            per_round_p90[k].append(s.p90_ms)
    out = {}
    base = per_round_med["fp32"]
    for k in names:
        med = statistics.median(per_round_med[k])
        ratios = [a / b for a, b in zip(per_round_med[k], base)]
        out[k] = {
            "median_ms": round(med, 4),
            "p90_ms": round(statistics.median(per_round_p90[k]), 4),
            "round_medians_ms": [round(x, 4) for x in per_round_med[k]],
            "ratio_vs_fp32": round(med / statistics.median(base), 4),
            "ratio_min": round(min(ratios), 4),
            "ratio_max": round(max(ratios), 4),
            "runs": rounds * per_round,
        }
    return out


# --------------------------------------------------------------------------------------------------- one model
def bench_model(name: str, work: Path, rounds: int, batches: tuple[int, ...], ctx, threads: int | None) -> dict:
    from edgekit.build import BuildRequest, build
    from edgekit.data import load_data
    from edgekit.export.onnx import export_onnx
    from edgekit.model import load_model
    from edgekit.verify import mean_cosine, run_reference, sqnr_db

    spec = f"builtin:{name}"
    timings = {}
    # 1. edgekit's pipeline, as a user runs it (no latency measurement: this script times it below)
    t0 = time.perf_counter()
    result = build(BuildRequest(model=spec, target="cpu-x86", precision="int8", out=work / "edgekit",
                                measure_latency=False), ctx)
    timings["edgekit_build_s"] = round(time.perf_counter() - t0, 1)
    edgekit_path = result.bundle_dir / "model.onnx"
    log.info("%s: edgekit build %s", name, result.verification.summary())

    # 2. the FP32 export (the pipeline's way) and the two ORT baselines on the same calibration data
    model = load_model(spec, ctx=ctx)
    fp32 = export_onnx(model, work / f"{name}-fp32.onnx")
    calib = load_data(model.default_calib, model.inputs, model.preprocessing, role="calibration",
                      limit=CALIB_SAMPLES, seed=ctx.seed)
    evald = load_data(model.default_eval, model.inputs, model.preprocessing, role="evaluation", seed=ctx.seed)
    paths = {"fp32": fp32.path, "edgekit-int8": edgekit_path}
    t0 = time.perf_counter()
    paths["ort-default"] = ort_quantize(fp32.path, work / f"{name}-ort-default.onnx", calib, work, per_channel=False)
    timings["ort_default_quantize_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    paths["ort-per-channel"] = ort_quantize(fp32.path, work / f"{name}-ort-per-channel.onnx", calib, work,
                                            per_channel=True)
    timings["ort_per_channel_quantize_s"] = round(time.perf_counter() - t0, 1)

    # 3. accuracy on the held-out set
    from edgekit.agent.runtime import OrtRuntime

    torch_out = next(iter(run_reference(model, evald, ctx).values()))
    outs = {k: next(iter(OrtRuntime(p).run_batches(evald.batches(EVAL_BATCH)).values())) for k, p in paths.items()}
    ref = outs["fp32"]
    labels = evald.labels
    variants: dict[str, VariantResult] = {}
    for k in VARIANTS:
        p = paths[k]
        v = VariantResult(k, p, p.stat().st_size, activation_dtypes(p), node_counts(p))
        o = outs[k]
        v.metrics = {
            "top1_vs_fp32": top1(ref, o),
            "top1_vs_torch": top1(torch_out, o),
            "sqnr_db_vs_fp32": round(sqnr_db(ref, o), 2),
            "sqnr_db_vs_torch": round(sqnr_db(torch_out, o), 2),
            "cosine_vs_fp32": round(mean_cosine(ref, o), 5),
            "accuracy": None if labels is None else float((o.argmax(1) == labels).mean()),
            "size_ratio_vs_fp32": round(p.stat().st_size / fp32.size, 4),
        }
        variants[k] = v

    # 4. latency, all four interleaved
    t0 = time.perf_counter()
    latency = {}
    for b in batches:
        feeds = {k: v[:b] for k, v in evald.inputs.items()}
        latency[b] = interleaved_latency(paths, feeds, rounds, PER_ROUND[name][b], threads)
        for k, lat in latency[b].items():
            variants[k].latency[f"batch{b}"] = lat
    timings["latency_s"] = round(time.perf_counter() - t0, 1)

    return {
        "model": spec,
        "calibration": {"source": calib.source, "samples": len(calib), "sha256": calib.sha256()},
        "evaluation": {"source": evald.source, "samples": len(evald), "labels": labels is not None,
                       "sha256": evald.sha256()},
        "edgekit_build": {"plan_precision": result.plan.precision,
                          "quantized_layers": result.report["totals"]["quantized_layers"],
                          "layers": result.report["totals"]["layers"],
                          "verification": result.verification.summary(),
                          "report_fp32_bytes": result.report["size"]["fp32_bytes"],
                          "report_ratio": result.report["size"]["ratio"]},
        "fp32_bytes": fp32.size,
        "variants": {k: {"size_bytes": v.size_bytes, "activations": v.activations,
                         "qdq_nodes": v.nodes.get("QuantizeLinear", 0) + v.nodes.get("DequantizeLinear", 0),
                         "nodes": sum(v.nodes.values()), **v.metrics, "latency": v.latency}
                     for k, v in variants.items()},
        "timings": timings,
    }


# --------------------------------------------------------------------------------------------------- report
def print_model(res: dict, batches: tuple[int, ...]) -> None:
    v = res["variants"]
    ev = res["evaluation"]
    print(f"\n=== {res['model']}  (eval: {ev['source']} x{ev['samples']}, calib: {res['calibration']['source']} "
          f"x{res['calibration']['samples']}) ===")
    print(f"edgekit build: {res['edgekit_build']['verification']}  "
          f"[{res['edgekit_build']['quantized_layers']}/{res['edgekit_build']['layers']} layers w8a8]")
    has_acc = v["fp32"]["accuracy"] is not None
    head = (f"{'variant':<16} {'act':>5} {'size B':>9} {'size x':>7} {'top1/fp32':>9} {'top1/torch':>10} "
            f"{'SQNR dB':>8} {'cosine':>8}" + (f" {'acc':>7}" if has_acc else ""))
    for b in batches:
        head += f" {f'b{b} ms':>9} {f'b{b} x':>6} {f'b{b} x range':>12}"
    print(head)
    print("-" * len(head))
    for k in VARIANTS:
        r = v[k]
        line = (f"{k:<16} {r['activations'] if k != 'fp32' else '-':>5} {r['size_bytes']:>9} "
                f"{r['size_ratio_vs_fp32']:>7.3f} {r['top1_vs_fp32']:>9.1%} {r['top1_vs_torch']:>10.1%} "
                f"{min(r['sqnr_db_vs_fp32'], 999):>8.1f} {r['cosine_vs_fp32']:>8.4f}")
        if has_acc:
            line += f" {r['accuracy']:>7.1%}"
        for b in batches:
            lat = r["latency"][f"batch{b}"]
            rng = f"{lat['ratio_min']:.2f}-{lat['ratio_max']:.2f}"
            line += f" {lat['median_ms']:>9.4f} {lat['ratio_vs_fp32']:>6.3f} {rng:>12}"
        print(line)
    if res["edgekit_build"]["report_fp32_bytes"] != res["fp32_bytes"]:
        print(f"WARNING: this script's FP32 export ({res['fp32_bytes']} B) differs in size from the pipeline's "
              f"({res['edgekit_build']['report_fp32_bytes']} B)")
    print(f"(timings: {res['timings']})")


def check_goals(results: dict) -> list[str]:
    missed = []
    eff = results.get("efficientnet-lite0")
    if eff is not None:
        v = eff["variants"]
        ek = v["edgekit-int8"]
        if ek["size_ratio_vs_fp32"] > EFFNET_MAX_SIZE_RATIO:
            missed.append(f"efficientnet-lite0: edgekit INT8 size {ek['size_ratio_vs_fp32']:.3f}x FP32 "
                          f"> {EFFNET_MAX_SIZE_RATIO}x")
        lat = ek["latency"]["batch1"]
        if lat["ratio_vs_fp32"] > EFFNET_MAX_LATENCY_RATIO:
            missed.append(f"efficientnet-lite0: edgekit INT8 batch-1 latency {lat['ratio_vs_fp32']:.3f}x FP32 "
                          f"> {EFFNET_MAX_LATENCY_RATIO}x ({lat['median_ms']} ms vs "
                          f"{v['fp32']['latency']['batch1']['median_ms']} ms)")
        if ek["top1_vs_fp32"] < v["ort-default"]["top1_vs_fp32"]:
            missed.append(f"efficientnet-lite0: edgekit INT8 top-1 agreement {ek['top1_vs_fp32']:.1%} "
                          f"< ORT default quantize_static's {v['ort-default']['top1_vs_fp32']:.1%}")
    dig = results.get("digits-cnn")
    if dig is not None:
        v = dig["variants"]
        drop = v["fp32"]["accuracy"] - v["edgekit-int8"]["accuracy"]
        if drop > DIGITS_MAX_ACCURACY_DROP + 1e-12:
            missed.append(f"digits-cnn: edgekit INT8 accuracy {v['edgekit-int8']['accuracy']:.1%} is "
                          f"{drop:.1%} below FP32's {v['fp32']['accuracy']:.1%} (> 1 point)")
    return missed


def environment(packages: tuple[str, ...] = ()) -> dict:
    """The host, its CPU, and the versions of edgekit's main packages plus ``packages``."""
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping") and key not in cpu:
                cpu[key] = val.strip()
            if key == "flags" and "flags" not in cpu:
                flags = val.split()
                cpu["flags"] = [f for f in flags if f.startswith(("avx512", "avx_vnni", "amx"))]
    except OSError:
        pass
    vers = {}
    for pkg in ("edgekit", "torch", "onnx", "onnxruntime", "onnxscript", "numpy", *packages):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "loadavg_at_start": load,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "versions": vers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {', '.join(MODELS)} (default: both)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per batch size (default 7)")
    ap.add_argument("--batches", default="1,8", help="batch sizes to time (default 1,8; 1 is required for the goals)")
    ap.add_argument("--json", nargs="?", const="benchmarks/results/build_cpu.json", default=None, metavar="PATH",
                    help="write results as JSON (default path benchmarks/results/build_cpu.json)")
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads for the timing (default: ORT's default, one per core)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the artifacts in this folder instead of a temp dir")
    ap.add_argument("--no-check", action="store_true", help="report only; exit 0 even when a goal is missed")
    ap.add_argument("-v", "--verbose", action="store_true", help="log edgekit's progress")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    models = [m.strip().removeprefix("builtin:") for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    batches = tuple(int(b) for b in args.batches.split(","))
    if 1 not in batches:
        ap.error("--batches must include 1 (the goals are on batch-1 latency)")
    if any(b not in (1, 8) for b in batches):
        ap.error("--batches supports 1 and 8")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    from edgekit.context import Context

    ctx = Context(seed=0, progress=False)
    env = environment()
    print(f"edgekit build_cpu benchmark — {env['date']} — {env['cpu'].get('model name', '?')} "
          f"(family {env['cpu'].get('cpu family', '?')} model {env['cpu'].get('model', '?')}), "
          f"{env['cpu_count']} CPUs — {', '.join(f'{k} {v}' for k, v in env['versions'].items())}")
    print(f"rounds={args.rounds} batches={batches} per_round={ {m: PER_ROUND[m] for m in models} } "
          f"threads={args.threads or 'ORT default'}")
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        work = args.keep if args.keep is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for m in models:
            try:
                results[m] = bench_model(m, work, args.rounds, batches, ctx, args.threads)
            except Exception as exc:  # e.g. the build's own verification failed: a missed goal, reported as such
                log.debug("benchmark of %s failed", m, exc_info=True)
                failed.append(f"{m}: benchmark failed: {type(exc).__name__}: {exc}")
                print(f"\nFAILED: {failed[-1]}", file=sys.stderr)
                continue
            print_model(results[m], batches)
    missed = failed + check_goals(results)
    total = round(time.perf_counter() - t_start, 1)
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(f"\ntotal {total} s (load average at start {env['loadavg_at_start']}, at end {load})")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"environment": env,
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "settings": {"rounds": args.rounds, "threads": args.threads, "batches": list(batches),
                            "per_round": {m: PER_ROUND[m] for m in models}, "calib_samples": CALIB_SAMPLES},
               "baselines": {
                   "ort-default": "onnxruntime.quantization.quant_pre_process (defaults) then quantize_static with "
                                  "defaults: QDQ, MinMax, per_channel=False, QInt8 activations, QInt8 weights",
                   "ort-per-channel": "same as ort-default with per_channel=True"},
               "results": results, "goals_missed": missed, "total_s": total, "loadavg_at_end": load}
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    if missed:
        print("\nGOALS MISSED:\n  " + "\n  ".join(missed), file=sys.stderr)
        return 0 if args.no_check else 1
    print("all goals met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
