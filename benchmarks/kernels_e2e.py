#!/usr/bin/env python3
"""End to end through the ``ai.edgekit`` kernels: MiniLM (all-MiniLM-L6-v2, sequence 128, batch 1) with a mixed
low-bit plan of at most 4 average weight bits, against ONNX Runtime FP32 and ``quantize_dynamic`` INT8, in one run.

    python benchmarks/kernels_e2e.py [--bits 4.25,4.35,4.45] [--max-code-bits 4] [--rounds 20] [--per-round 5]
                                     [--json PATH]

1. Exports MiniLM the pipeline's way and splits the real sentences into calibration and evaluation sets
   (``benchmarks/allocation.prepare``).
2. Solves edgekit's allocation for ``--budget avg-bits=<bits>`` on ``cpu-x86`` (GPTQ weight-only options, the
   measured sensitivity tables) under each of ``--bits`` and keeps the plan of the largest budget whose average
   *code* bits (scales and zero points not counted) stay within ``--max-code-bits`` (the issue's "≤ 4 average
   bits"; edgekit's avg-bits budget counts the scales too), then builds it twice: with ``ai.edgekit::MatMulLowBit``
   nodes (``apply_plan(edgekit_kernels=True)``: the native library, ``accuracy_level`` 4 = 8-bit activations with
   VNNI, and the library's fused epilogues: GELU, residual + LayerNorm, Q/K/V as one op) and with ONNX Runtime's
   ``com.microsoft.MatMulNBits`` (the same weights). ``--options`` fixes the plan instead (``fixed_plan``); the
   recorded run that meets the targets used
   ``--options 384x384=w4g32,linear=w4g128,word_embedding=w4g128,embedding=w4g32``.
3. Builds ORT's ``quantize_dynamic`` (QInt8 weights, per-tensor) peer.
4. Times every variant (each its own session: ``--threads`` intra-op threads, thread spinning off unless ``--spin``,
   the native library registered for all alike) at batch 1 interleaved with FP32
   (``benchmarks/measure.interleaved_latency``: rounds with
   rotated order, quiet rounds only) and measures mean cosine similarity of the sentence embeddings against FP32 on
   the evaluation sentences.

Issue 7's end-to-end target: the ai.edgekit plan >= 2x faster than FP32, no slower than ``quantize_dynamic``, mean
cosine >= 0.985. The script prints each check and exits 1 when one fails (or the native library is missing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers as P  # noqa: E402

log = logging.getLogger("kernels_e2e")
SPEEDUP_VS_FP32 = 2.0
MIN_COSINE = 0.985


def _code_bits(plan, layers) -> float:
    """The plan's average weight code bits over its layers (scales and zero points not counted)."""
    from edgekit.wonly import weight_only

    params = {layer.name: layer.params for layer in layers}
    bits = {c.layer: (weight_only(c.option) or (8 if c.option.startswith("w8") else 32,))[0] for c in plan.layers}
    return sum(bits[n] * params[n] for n in bits) / sum(params[n] for n in bits)


def _selects(selector: str, layer, largest_embedding: str) -> bool:
    """Whether ``--options`` selector matches ``layer``: ``linear``/``embedding`` (its kind), ``word_embedding`` (the
    largest embedding table), or a weight shape ``RxC`` (e.g. ``384x1536``: MiniLM's FFN up-projection)."""
    if selector in ("linear", "embedding"):
        return layer.kind == selector
    if selector == "word_embedding":
        return layer.name == largest_embedding
    return "x".join(str(d) for d in layer.weight_shape) == selector


def fixed_plan(model, layers, spec: str):
    """A plan fixed by ``spec``: ``LINEAR/EMBEDDING`` (one option for every linear layer and one for every
    embedding, e.g. ``w4g32/w4g128``), or comma-separated ``SELECTOR=OPTION`` rules, the first match winning, e.g.
    ``384x384=w4g32,linear=w4g128,word_embedding=w4g128,embedding=w4g32`` (see ``_selects``)."""
    from edgekit.plan import LayerChoice, Plan

    if "=" not in spec:
        linear, embedding = spec.split("/")
        spec = f"linear={linear},embedding={embedding}"
    rules = [tuple(r.split("=", 1)) for r in spec.split(",") if r.strip()]
    embeddings = [layer for layer in layers if layer.kind == "embedding"]
    largest = max(embeddings, key=lambda layer: layer.params).name if embeddings else ""
    choices = []
    for layer in layers:
        option = next((o for sel, o in rules if _selects(sel.strip(), layer, largest)), None)
        if option is None:
            raise SystemExit(f"--options {spec}: no rule matches layer {layer.name} ({layer.kind}, "
                             f"{'x'.join(map(str, layer.weight_shape))})")
        choices.append(LayerChoice(layer.name, option.strip(), "fixed by --options"))
    return Plan(model.sha256, "cpu-x86", "mixed", tuple(choices), solver="fixed")


def build_variants(work: Path, budgets: list[float], max_code_bits: float, ctx, options: str | None = None
                   ) -> tuple[object, dict, dict]:
    """(prepared MiniLM, {name: artifact path}, plan notes). The plan: edgekit's allocation under the largest
    ``avg-bits`` budget of ``budgets`` (which count scales and zero points) whose average code bits stay within
    ``max_code_bits``; or, with ``options``, the plan ``fixed_plan`` makes of them."""
    from benchmarks.allocation import prepare
    from edgekit.compress.quant import W8A8Config
    from edgekit.export.onnx import describe
    from edgekit.mixed import allocate, apply_plan
    from edgekit.tables import parse_budget
    from edgekit.targets import load_target

    prep, model, layers = prepare("minilm", work, ctx)
    fp32 = describe(prep.fp32_path)
    cfg = W8A8Config()
    plan, tried = None, []
    if options:
        plan = fixed_plan(model, layers, options)
        budgets = []
        if _code_bits(plan, layers) > max_code_bits + 1e-9:
            raise SystemExit(f"--options {options} has {_code_bits(plan, layers):.3f} average code bits")
    for bits in sorted(budgets):
        candidate, _ = allocate(budget=parse_budget([f"avg-bits={bits}"]), solver="auto",
                                profile=load_target("cpu-x86"), model=model, fp32=fp32, layers=layers,
                                calib=prep.calib, work=work / f"alloc-{bits}", cfg=cfg, ctx=ctx)
        code = _code_bits(candidate, layers)
        tried.append({"avg_bits_budget": bits, "avg_code_bits": round(code, 3)})
        if code <= max_code_bits + 1e-9:
            plan = candidate
    if plan is None:
        raise SystemExit(f"no budget of {budgets} gives a plan within {max_code_bits} average code bits: {tried}")
    options = {c.layer: c.option for c in plan.layers}
    paths = {"fp32": Path(prep.fp32_path)}
    for name, native in (("edgekit ai.edgekit", True), ("edgekit MatMulNBits", False)):
        art = apply_plan(plan, fp32, prep.calib, work / name.replace(" ", "-") / "model.onnx", cfg, ctx,
                         edgekit_kernels=native)
        paths[name] = Path(art.path)
    (work / "peers").mkdir(parents=True, exist_ok=True)
    peer = P.ort_dynamic(prep.fp32_path, work / "peers")
    if not peer.ok:
        raise RuntimeError(f"quantize_dynamic failed: {peer.notes}")
    paths["ort quantize_dynamic int8"] = Path(peer.path)
    counts: dict[str, int] = {}
    for o in options.values():
        counts[o] = counts.get(o, 0) + 1
    return prep, paths, {"options": counts, "avg_bits_with_scales": plan.budget.get("avg_bits"),
                         "avg_code_bits": round(_code_bits(plan, layers), 3), "layers": len(options),
                         "budgets_tried": tried}


class SessionRuntime:
    """One ONNX Runtime CPU session with ``run(feeds)``, made like ``edgekit.agent.runtime.OrtRuntime`` (the same
    model preparation and disabled optimizers) but with intra-op thread spinning off for every variant: each
    variant has its own thread pool, and with spinning on (ORT's default) the pool of the variant that had just run
    keeps a core busy while the next one runs (2 cores here), which slows whichever variant follows."""

    def __init__(self, path: Path, threads: int, spin: bool = False) -> None:
        import onnxruntime as ort

        from edgekit.agent.runtime import DISABLED_OPTIMIZERS, prepare_model
        from edgekit.kernels import ort_native

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        native = ort_native.register_native(so)  # every variant alike (unused by models without ai.edgekit ops)
        source = prepare_model(path, so, native_registered=native)
        self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))


def run(args) -> dict:
    from benchmarks.measure import fidelity, interleaved_latency, run_samples
    from edgekit.context import Context
    from edgekit.kernels import ort_native

    if ort_native.library_path() is None:
        raise SystemExit("the native ai.edgekit library is not built: python runtimes/onnxruntime/build.py")
    ctx = Context(seed=0, progress=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-kernels-e2e-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        budgets = [float(b) for b in str(args.bits).split(",") if b.strip()]
        prep, paths, plan_notes = build_variants(work, budgets, args.max_code_bits, ctx, args.options)
        runtimes = {name: SessionRuntime(path, args.threads, args.spin) for name, path in paths.items()}
        feeds = prep.evaluation.feeds()
        reference = run_samples(runtimes["fp32"], feeds)
        quality = {name: fidelity(run_samples(rt, feeds), reference, classification=False)
                   for name, rt in runtimes.items()}
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        timing = interleaved_latency(runtimes, feeds[0], rounds=args.rounds, per_round=args.per_round,
                                     idle_wait_s=args.idle_wait)
    ours, peer = "edgekit ai.edgekit", "ort quantize_dynamic int8"
    speedup = 1.0 / timing[ours]["ratio_median_of_rounds"]
    vs_peer = timing[peer]["median_ms"] / timing[ours]["median_ms"]
    checks = {
        f"ai.edgekit >= {SPEEDUP_VS_FP32}x FP32": speedup >= SPEEDUP_VS_FP32,
        "ai.edgekit no slower than quantize_dynamic": vs_peer >= 1.0,
        f"ai.edgekit mean cosine >= {MIN_COSINE}": quality[ours]["mean_cosine"] >= MIN_COSINE,
    }
    return {"command": " ".join(["benchmarks/kernels_e2e.py", *sys.argv[1:]]), "environment": P.environment(),
            "isa": ort_native.best_isa(), "threads": args.threads, "spinning": bool(args.spin),
            "plan": plan_notes, "sizes": sizes, "quality": quality,
            "timing": timing, "speedup_vs_fp32": round(speedup, 3), "speed_vs_quantize_dynamic": round(vs_peer, 3),
            "checks": checks, "seconds": round(time.perf_counter() - t0, 1)}


def summary(res: dict) -> str:
    lines = [f"MiniLM seq 128, batch 1; plan {res['plan']} (ISA {res['isa']})",
             f"{'variant':30s} {'size MB':>8s} {'median ms':>10s} {'x FP32':>7s} {'cosine':>8s}"]
    for name, t in res["timing"].items():
        ratio = t["ratio_median_of_rounds"]
        lines.append(f"{name:30s} {res['sizes'][name] / 1e6:8.2f} {t['median_ms']:10.3f} {ratio:7.3f} "
                     f"{res['quality'][name]['mean_cosine']:8.4f}")
    lines.append(f"ai.edgekit speed-up vs FP32 {res['speedup_vs_fp32']}x; vs quantize_dynamic "
                 f"{res['speed_vs_quantize_dynamic']}x")
    lines += [f"{'MET ' if ok else 'MISS'} {name}" for name, ok in res["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4.25,4.35,4.45",
                    help="comma-separated avg-bits budgets to allocate under (they count scales and zero points); "
                         "the largest whose plan stays within --max-code-bits is kept")
    ap.add_argument("--options", metavar="SPEC",
                    help="instead of allocating, a fixed plan: LINEAR/EMBEDDING (e.g. w4g32/w4g128), or "
                         "SELECTOR=OPTION rules, first match wins (selectors: linear, embedding, word_embedding, a "
                         "weight shape RxC), e.g. 384x384=w4g32,linear=w4g128,word_embedding=w4g128,embedding=w4g32")
    ap.add_argument("--max-code-bits", type=float, default=4.0,
                    help="the issue's limit: average weight code bits of the plan (default 4)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-wait", type=float, default=30.0, help="seconds, in all, to wait for quiet rounds")
    ap.add_argument("--spin", action="store_true", help="let ORT's intra-op threads spin (default off, all variants)")
    ap.add_argument("--work", type=Path, help="keep the models in this directory (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args)
    print(summary(res), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
