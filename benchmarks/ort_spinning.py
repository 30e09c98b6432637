"""How ONNX Runtime's spinning intra-op threads skew interleaved latency comparisons, and what fixes it.

    .venv/bin/python benchmarks/ort_spinning.py --json benchmarks/results/ort_spinning.json

Every comparison in edgekit (the allocators' rounds, ``benchmarks/joint_space.py``) times a compressed model against
FP32 in the same process, with several sessions loaded. By default each session's intra-op threads keep spinning for
a while after a run returns; on 2 cores an idle session's spinning threads take the cores from the session being
timed. This script times EfficientNet-Lite0's edgekit uniform INT8 and ONNX Runtime's ``quantize_static`` (the same
graph: they must time the same) in pairs with FP32, with ``--idle`` extra sessions loaded, under three session
setups, each in its own interleaved run, ``--repeats`` times:

- ``spin``: ONNX Runtime's default (threads spin between runs);
- ``off``: ``session.intra_op.allow_spinning = 0`` (threads never spin);
- ``stop``: ``session.force_spinning_stop = 1`` (threads spin during a run and stop when it returns), what
  ``edgekit.agent.runtime.session_options`` sets.

It also times each model alone (one session at a time) under the three setups: what spinning buys a single model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETUPS = {"spin": {}, "off": {"session.intra_op.allow_spinning": "0"}, "stop": {"session.force_spinning_stop": "1"}}


def session(path: Path, setup: str, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    for key, value in SETUPS[setup].items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _block(sess, feed: dict, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired(paths: dict[str, Path], fp32: Path, feed: dict, setup: str, *, idle: int, rounds: int,
           calls: int) -> dict:
    """Each variant's latency / FP32 (median of per-block ratios; blocks of ``calls`` alternating with FP32,
    variants interleaved), with ``idle`` extra FP32 sessions loaded and warmed."""
    ref = session(fp32, setup)
    variants = {name: session(p, setup) for name, p in paths.items()}
    extra = [session(fp32, setup) for _ in range(idle)]
    for s in [ref, *variants.values(), *extra]:
        for _ in range(3):
            s.run(None, feed)
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    fp32_ms: list[float] = []
    for r in range(rounds):
        for i, (name, s) in enumerate(variants.items()):
            if (r + i) % 2:
                a, b = _block(s, feed, calls), _block(ref, feed, calls)
            else:
                b, a = _block(ref, feed, calls), _block(s, feed, calls)
            ratios[name].append(a / b)
            fp32_ms.append(b)
    return {"ratio_vs_fp32": {n: round(statistics.median(v), 4) for n, v in ratios.items()},
            "fp32_ms": round(statistics.median(fp32_ms), 3)}


def alone(paths: dict[str, Path], feed: dict, *, repeats: int, calls: int) -> dict:
    """Median latency (ms) of each model in a fresh session, the three setups alternating, ``repeats`` times."""
    out: dict[str, dict[str, list[float]]] = {n: {s: [] for s in SETUPS} for n in paths}
    for _ in range(repeats):
        for name, p in paths.items():
            for setup in SETUPS:
                s = session(p, setup)
                for _ in range(5):
                    s.run(None, feed)
                out[name][setup].append(_block(s, feed, calls))
                del s
    return {n: {s: round(statistics.median(v), 3) for s, v in d.items()} for n, d in out.items()}


def build_models(work: Path) -> tuple[Path, dict[str, Path], dict]:
    """EfficientNet-Lite0 FP32, edgekit's uniform INT8 and ONNX Runtime's ``quantize_static`` of it."""
    from benchmarks import peers as P
    from edgekit.allocate import uniform_plan
    from edgekit.compress.quant import W8A8Config
    from edgekit.context import Context
    from edgekit.export.onnx import describe
    from edgekit.fsutil import sha256_file
    from edgekit.inventory import layer_inventory
    from edgekit.mixed import apply_plan
    from edgekit.targets import load_target

    ctx = Context(seed=0, progress=False)
    prep = P.prepare_efficientnet(work, 1, ctx)
    cfg = W8A8Config()
    plan = uniform_plan(layer_inventory(prep.fp32_path), load_target("cpu-x86"), "int8",
                        model_sha256=sha256_file(prep.fp32_path), activations=cfg.to_dict())
    int8 = apply_plan(plan, describe(prep.fp32_path), prep.calib, work / "uniform-int8.onnx", cfg, ctx)
    peer = P.ort_static(prep.fp32_path, work, prep.calib.feeds())
    feed = {k: v[:1] for k, v in prep.evaluation.inputs.items()}
    return Path(prep.fp32_path), {"edgekit uniform int8": Path(int8.path), "ort quantize_static": peer.path}, feed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--idle", type=int, default=6, help="extra sessions loaded during the paired timing")
    ap.add_argument("--repeats", type=int, default=2, help="paired runs per setup (setups alternate)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgekit-spin-") as tmp:
        fp32, variants, feed = build_models(Path(tmp))
        runs = {s: [] for s in SETUPS}
        for _ in range(args.repeats):
            for setup in SETUPS:
                res = paired(variants, fp32, feed, setup, idle=args.idle, rounds=args.rounds, calls=args.calls)
                runs[setup].append(res)
                print(f"{setup:5s} fp32 {res['fp32_ms']:.2f} ms  " +
                      "  ".join(f"{n}: {r:.3f}x" for n, r in res["ratio_vs_fp32"].items()), flush=True)
        single = alone({"fp32": fp32, **variants}, feed, repeats=3, calls=30)
        for name, d in single.items():
            print(f"alone {name:22s} " + "  ".join(f"{s} {ms:.3f} ms" for s, ms in d.items()))
    out = {"command": " ".join(["benchmarks/ort_spinning.py", *(argv or sys.argv[1:])]), "idle_sessions": args.idle,
           "paired": runs, "alone_ms": single,
           "spread": {s: float(np.ptp([r["ratio_vs_fp32"]["edgekit uniform int8"] for r in v] +
                                      [r["ratio_vs_fp32"]["ort quantize_static"] for r in v]))
                      for s, v in runs.items()}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
