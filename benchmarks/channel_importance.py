"""Which channels to keep: activation importance on the calibration photos against the training distribution's
BatchNorm statistics (``edgekit.compress.bnstats``), on EfficientNet-Lite0 with the widths of a recorded plan.

    .venv/bin/python benchmarks/channel_importance.py \\
        --plan benchmarks/results/joint_space_session25_edgekit.json --json benchmarks/results/channel_importance.json

The plan's ``+ch<N>`` widths (by default the FP32 "pruned for 1.3x" plan of the given ``joint_space.py`` results) are
applied twice, as ``edgekit.structure`` applies them (pruning, then the least-squares refit of the consumers on the
calibration crops), once ranking channels by their centred activations on the 64 calibration crops and once by
BatchNorm statistics; each pruned model is scored by top-1 agreement with FP32 on the evaluation crops (other
photographs). ``--single`` also scores every group alone at its width.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers as P  # noqa: E402

DEFAULT_PLAN = Path(__file__).parent / "results" / "joint_space_session25_edgekit.json"
VARIANT = "pruned fp32 for 1.3x"


def plan_widths(path: Path, variant: str = VARIANT) -> dict[str, int]:
    """``{producer layer: kept channels}`` from a ``joint_space.py`` results file's variant."""
    res = json.loads(Path(path).read_text())["results"]["efficientnet"]["variants"][variant]
    return {layer: int(opt.split("+ch")[1]) for layer, opt in res["notes"]["options"].items() if "+ch" in opt}


def predictions(model, data) -> np.ndarray:
    """Top-1 class per sample of ``data``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = data.inputs[name]
    return np.concatenate([sess.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)]).argmax(1)


def top1(model, data, reference: np.ndarray) -> float:
    return float((predictions(model, data) == reference).mean())


def main(argv=None) -> int:
    import onnx

    from edgekit.compress import bnstats, channels, refit
    from edgekit.context import Context
    from edgekit.structure import refit_feeds, sample_feeds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="joint_space.py results JSON with the widths")
    ap.add_argument("--variant", default=VARIANT, help="which variant of the results holds the plan")
    ap.add_argument("--eval", type=int, default=128, help="evaluation crops")
    ap.add_argument("--single", action="store_true", help="also every group alone at its width")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-channel-importance"))
    args = ap.parse_args(argv)

    ctx = Context(seed=0, progress=False)
    args.work.mkdir(parents=True, exist_ok=True)
    prep = P.prepare_efficientnet(args.work, args.eval, ctx)
    model = onnx.load(str(prep.fp32_path))
    stats = bnstats.load(prep.fp32_path)
    if stats is None:
        print("the export recorded no BatchNorm statistics", file=sys.stderr)
        return 1
    groups = {g.producer: g for g in channels.channel_groups(model)}
    widths = {groups[layer].name: n for layer, n in plan_widths(args.plan, args.variant).items() if layer in groups}
    chosen = [g for g in groups.values() if g.name in widths]
    importance = {
        "activations": channels.channel_importance(model, chosen, sample_feeds(prep.calib), centered=True),
        "batchnorm": bnstats.importance(model, chosen, stats),
    }
    fit, sources = refit_feeds(prep.calib)
    reference = predictions(model, prep.evaluation)

    def pruned(kind: str, which: dict[str, int]):
        keep = {g: np.sort(np.argsort(-importance[kind][g], kind="stable")[:n]) for g, n in which.items()}
        return refit.prune_and_refit(model, keep, fit, groups=list(groups.values()), sources=sources)[0]

    out: dict = {"plan": str(args.plan), "variant": args.variant, "widths": widths, "eval_crops": len(reference),
                 "whole_plan": {}, "single": {}}
    for kind in importance:
        t0 = time.perf_counter()
        out["whole_plan"][kind] = top1(pruned(kind, widths), prep.evaluation, reference)
        print(f"whole plan, {kind:11s}: top-1 {out['whole_plan'][kind]:.1%} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    if args.single:
        for g, n in widths.items():
            out["single"][g] = {kind: top1(pruned(kind, {g: n}), prep.evaluation, reference) for kind in importance}
            print(f"{g:28s} {n:5d}: " + ", ".join(f"{k} {v:.1%}" for k, v in out["single"][g].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
