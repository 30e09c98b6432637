#!/usr/bin/env python3
"""The ``ai.edgekit`` int8 convolutions (``QLinearDepthwiseConv``, ``QLinearConvDirect``) against ONNX Runtime's own
``QLinearConv``, per layer and end to end on EfficientNet-Lite0, in one run.

    .venv/bin/python benchmarks/qconv.py [--rounds 15] [--per-round 20] [--json benchmarks/results/qconv.json]

1. Per layer: every distinct depthwise shape of EfficientNet-Lite0 and its stem (batch 1), random int8 parameters.
   The edgekit op takes and gives NHWC uint8; the baseline is the same layer as ONNX Runtime runs it inside a
   quantized model: ``Transpose(NHWC -> NCHW) -> QLinearConv -> Transpose(NCHW -> NHWC)``, which ONNX Runtime's
   layout optimizer turns into its channels-last int8 convolution with the transposes cancelled. Outputs must be
   equal (the ops are bit-exact). A call from Python costs ~30 us beside the kernel, as much as a whole small
   layer, so layers are timed by ONNX Runtime's profiler: the kernel time of every node of the model, per run (the
   median over ``rounds x per-round`` runs, the two models alternating round by round), 2 intra-op threads.
2. End to end: EfficientNet-Lite0 (the built-in photos) as FP32, as the uniform static INT8 plan exported for
   ``cpu-x86`` (every convolution ONNX Runtime's ``QLinearConv``) and the same plan for ``cpu-x86-edgekit`` (its
   depthwise convolutions and stem as the ``ai.edgekit`` ops); top-1 agreement with FP32 on the evaluation crops
   (the two INT8 files must agree with each other on every crop) and batch-1 latency, timed interleaved.

Prints a table and ratios against the baselines measured in the same run; exits 1 when outputs differ or the native
library is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("qconv")

# (name, H, W, Cin, Cout, k, stride, pads [t, l, b, r], depthwise): EfficientNet-Lite0's depthwise layers (distinct
# shapes; blocks with the same shape share a row) and its stem, as exported (TF-style "same" padding: 0, 0, 1, 1 for
# stride 2).
LAYERS = [
    ("stem 224x224x3 -> 32, 3x3 s2", 224, 224, 3, 32, 3, 2, (0, 0, 1, 1), False),
    ("dw block 0: 112x112x32 3x3", 112, 112, 32, 32, 3, 1, (1, 1, 1, 1), True),
    ("dw block 1: 112x112x96 3x3 s2", 112, 112, 96, 96, 3, 2, (0, 0, 1, 1), True),
    ("dw block 2: 56x56x144 3x3", 56, 56, 144, 144, 3, 1, (1, 1, 1, 1), True),
    ("dw block 3: 56x56x144 5x5 s2", 56, 56, 144, 144, 5, 2, (1, 1, 2, 2), True),
    ("dw block 4: 28x28x240 5x5", 28, 28, 240, 240, 5, 1, (2, 2, 2, 2), True),
    ("dw block 5: 28x28x240 3x3 s2", 28, 28, 240, 240, 3, 2, (0, 0, 1, 1), True),
    ("dw blocks 6-7: 14x14x480 3x3", 14, 14, 480, 480, 3, 1, (1, 1, 1, 1), True),
    ("dw block 8: 14x14x480 5x5", 14, 14, 480, 480, 5, 1, (2, 2, 2, 2), True),
    ("dw blocks 9-10: 14x14x672 5x5", 14, 14, 672, 672, 5, 1, (2, 2, 2, 2), True),
    ("dw block 11: 14x14x672 5x5 s2", 14, 14, 672, 672, 5, 2, (1, 1, 2, 2), True),
    ("dw blocks 12-14: 7x7x1152 5x5", 7, 7, 1152, 1152, 5, 1, (2, 2, 2, 2), True),
    ("dw block 15: 7x7x1152 3x3", 7, 7, 1152, 1152, 3, 1, (1, 1, 1, 1), True),
]


def layer_models(rng, H, W, cin, cout, k, stride, pads, depthwise):
    """(edgekit model, ONNX Runtime model, input): the same int8 layer, NHWC uint8 in and out."""
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from edgekit.kernels import qconv

    w = rng.integers(-127, 128, (cout, 1 if depthwise else cin, k, k), dtype=np.int8)
    inits = [nh.from_array(np.array(0.05, np.float32), "xs"), nh.from_array(np.array(117, np.uint8), "xz"),
             nh.from_array(w, "w"), nh.from_array(rng.uniform(0.002, 0.02, cout).astype(np.float32), "ws"),
             nh.from_array(np.zeros(cout, np.int8), "wz"), nh.from_array(np.array(0.4, np.float32), "ys"),
             nh.from_array(np.array(3, np.uint8), "yz"),
             nh.from_array(rng.integers(-20000, 20000, cout).astype(np.int32), "b")]
    names = ["xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": list(pads)}
    x_info = oh.make_tensor_value_info("x", TP.UINT8, [1, H, W, cin])
    y_info = oh.make_tensor_value_info("y", TP.UINT8, None)
    op = qconv.OP_DEPTHWISE if depthwise else qconv.OP_DIRECT
    ours = oh.make_model(oh.make_graph([oh.make_node(op, ["x", *names], ["y"], domain=qconv.DOMAIN, **attrs)], "e",
                                       [x_info], [y_info], inits),
                         opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(qconv.DOMAIN, 1)])
    nodes = [oh.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
             oh.make_node("QLinearConv", ["xc", *names], ["yc"], group=cout if depthwise else 1, **attrs),
             oh.make_node("Transpose", ["yc"], ["y"], perm=[0, 2, 3, 1])]
    theirs = oh.make_model(oh.make_graph(nodes, "o", [x_info], [y_info], inits),
                           opset_imports=[oh.make_opsetid("", 17)])
    return ours, theirs, {"x": rng.integers(0, 256, (1, H, W, cin), dtype=np.uint8)}


def kernel_times(sessions: dict, feeds: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median per-run kernel time (us, all nodes) of each profiling session, the sessions alternating by round."""
    import bisect
    from collections import defaultdict

    for sess in sessions.values():
        for _ in range(5):
            sess.run(None, feeds)
    for _ in range(rounds):
        for sess in sessions.values():
            for _ in range(per_round):
                sess.run(None, feeds)
    out = {}
    for name, sess in sessions.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
        per_run: dict[int, float] = defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_run[bisect.bisect_right(starts, e["ts"])] += e["dur"]
        times = [per_run[i] for i in sorted(per_run)][5:]  # after the warm-up runs
        out[name] = float(np.median(times))
    return out


def per_layer(rounds: int, per_round: int, work: Path) -> list[dict]:
    import onnxruntime as ort

    from edgekit.agent.runtime import prepare_model, session_options

    rng = np.random.default_rng(0)
    rows = []
    for name, H, W, cin, cout, k, stride, pads, depthwise in LAYERS:
        ours, theirs, feeds = layer_models(rng, H, W, cin, cout, k, stride, pads, depthwise)
        sessions = {}
        for key, model in (("onnxruntime", theirs), ("edgekit", ours)):
            opts = session_options(2)
            opts.enable_profiling = True
            opts.profile_file_prefix = str(work / f"profile-{key}")
            sessions[key] = ort.InferenceSession(prepare_model(model.SerializeToString(), opts), opts,
                                                 providers=["CPUExecutionProvider"])
        outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
        t = kernel_times(sessions, feeds, rounds, per_round)
        macs = int(outs["edgekit"].size * k * k * (1 if depthwise else cin))
        row = {"layer": name, "equal": bool(np.array_equal(outs["edgekit"], outs["onnxruntime"])), "macs": macs,
               "onnxruntime_us": round(t["onnxruntime"], 1), "edgekit_us": round(t["edgekit"], 1),
               "speedup": round(t["onnxruntime"] / t["edgekit"], 2)}
        row["edgekit_gmacs"] = round(macs / row["edgekit_us"] / 1e3, 1)
        log.info("%s", row)
        rows.append(row)
    return rows


def end_to_end(work: Path, rounds: int, per_round: int) -> dict:
    from benchmarks import peers as P
    from benchmarks.measure import interleaved_latency
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.allocate import uniform_plan
    from edgekit.compress.quant import W8A8Config
    from edgekit.context import Context
    from edgekit.export.onnx import describe
    from edgekit.inventory import layer_inventory
    from edgekit.mixed import apply_plan
    from edgekit.targets import load_target

    ctx = Context(seed=0, progress=False)
    prep = P.prepare_efficientnet(work, 128, ctx)
    fp32 = describe(prep.fp32_path)
    paths = {"fp32": Path(prep.fp32_path)}
    for target in ("cpu-x86", "cpu-x86-edgekit"):
        plan = uniform_plan(layer_inventory(prep.fp32_path), load_target(target), "int8", model_sha256=fp32.sha256)
        art = apply_plan(plan, fp32, prep.calib, work / target / "int8.onnx", W8A8Config(), ctx)
        paths[f"int8 {target}"] = Path(art.path)
    rt = {k: OrtRuntime(p) for k, p in paths.items()}
    feeds = prep.evaluation.feeds()
    outs = {k: np.concatenate([list(r.run(f).values())[0] for f in feeds]) for k, r in rt.items()}
    top = outs["fp32"].argmax(-1)
    out = {"top1": {k: round(float((v.argmax(-1) == top).mean()), 4) for k, v in outs.items() if k != "fp32"},
           "int8_outputs_equal": bool(np.array_equal(outs["int8 cpu-x86"], outs["int8 cpu-x86-edgekit"])),
           "sizes": {k: p.stat().st_size for k, p in paths.items()}}
    t = interleaved_latency(rt, {k: v[:1] for k, v in prep.calib.inputs.items()}, rounds=rounds, per_round=per_round)
    out["latency_ms"] = {k: round(v["median_ms"], 3) for k, v in t.items()}
    out["vs_fp32"] = {k: round(v["median_ms"] / t["fp32"]["median_ms"], 3) for k, v in t.items()}
    out["edgekit_vs_ort_int8"] = round(t["int8 cpu-x86"]["median_ms"] / t["int8 cpu-x86-edgekit"]["median_ms"], 3)
    out["rounds"] = {k: v.get("rounds_used") for k, v in t.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per comparison")
    ap.add_argument("--per-round", type=int, default=20, help="calls per variant per round")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--skip-e2e", action="store_true", help="per-layer part only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from benchmarks import peers as P
    from edgekit.kernels import ort_native

    if ort_native.library_path() is None:
        print("the native library is not built (python runtimes/onnxruntime/build.py)", file=sys.stderr)
        return 1
    res = {"command": " ".join(["benchmarks/qconv.py", *(argv if argv is not None else sys.argv[1:])]),
           "environment": P.environment(), "isa": ort_native.best_isa()}
    with tempfile.TemporaryDirectory(prefix="edgekit-qconv-prof-") as tmp:
        res["layers"] = per_layer(args.rounds, args.per_round, Path(tmp))
    print(f"{'layer':34s} {'ORT us':>8s} {'edgekit us':>10s} {'speed-up':>8s} {'GMAC/s':>7s} equal")
    for r in res["layers"]:
        print(f"{r['layer']:34s} {r['onnxruntime_us']:8.1f} {r['edgekit_us']:10.1f} {r['speedup']:7.2f}x "
              f"{r['edgekit_gmacs']:7.1f} {r['equal']}")
    ok = all(r["equal"] for r in res["layers"])
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory(prefix="edgekit-qconv-") as tmp:
            res["end_to_end"] = e2e = end_to_end(Path(tmp), args.rounds, args.per_round)
        print(json.dumps(e2e, indent=1))
        ok = ok and e2e["int8_outputs_equal"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
