"""What the joint allocator's measurements say about single structural edits of EfficientNet-Lite0, against what the
edits do to photographs it never saw; and block removal on top of uniform INT8, timed.

    .venv/bin/python benchmarks/structure_probe.py --json benchmarks/results/structure_probe.json \
        --drops 14+4,14+10,14+4+10

Part 1 (``edits``). Every removable residual block dropped, and every channel group at half width (refit as
``edgekit.structure`` refits it, ``structure.refit_feeds``), each alone on the FP32 model. Each edit's distortion to
FP32 (relative MSE and KL of the logits) is measured on three sets:

- ``held_out``: the calibration crops the refit did not see (``structure.held_out``: whole photographs held out);
- ``probe``: 16 inputs that match the training data's BatchNorm statistics (``datafree.probe_samples``);
- ``evaluation``: 128 crops of *other* photographs (the evaluation split), with top-1 agreement there too.

Where ``held_out`` is far below ``evaluation`` the allocator, measuring on calibration data alone, took the edit for
nearly free. Part 2 (``drops``): uniform INT8 with the given blocks removed (``--drops``, ``+``-joined block numbers),
top-1 agreement with FP32 on the evaluation crops, and latency timed interleaved with FP32 and uniform INT8
(``compare_latency``, ``--repeats`` times, each a median of ``--rounds`` × ``--per-round`` calls).

Part 3 (``--pairs``, with ``--no-edits`` to run it alone): every single block and pair of blocks removed from uniform
INT8, scored on each set (and on the probe both through the INT8 artifact and as the edited FP32 graph), with the
Spearman correlation of each measure with the evaluation photos' top-1 loss over the pairs: whether anything computable
from calibration data tells which pairs the evaluation photos tolerate.

    .venv/bin/python benchmarks/structure_probe.py --no-edits --pairs --bar 0.833 \
        --json benchmarks/results/structure_pairs.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import peers as P  # noqa: E402

log = logging.getLogger("structure_probe")

SETS = ("held_out", "probe", "evaluation")
METRICS = ("mse", "kl")


def top1(ref: np.ndarray, out: np.ndarray) -> float:
    """Share of samples whose arg-max class is the reference's."""
    n = len(ref)
    return float(np.mean(ref.reshape(n, -1).argmax(1) == out.reshape(n, -1).argmax(1)))


def score(edited, sets: dict, refs: dict) -> dict:
    """An edited model's distortion to FP32 on every set (both metrics), and top-1 agreement on the evaluation set."""
    from edgekit.analyze import _run

    row: dict = {}
    for name, data in sets.items():
        got = pair_scores(refs[name], _run(edited, data))
        row[name] = {m: got[m] for m in METRICS}
        if name == "evaluation":
            row["top1_evaluation"] = got["top1"]
    return row


def optimism(rows: dict) -> dict:
    """Per edit: evaluation MSE over held-out MSE (how much the calibration crops understate the edit)."""
    return {k: round(r["evaluation"]["mse"] / max(r["held_out"]["mse"], 1e-9), 2) for k, r in rows.items()}


def edits(prep, probe, keep_fraction: float = 0.5) -> dict:
    import onnx

    from edgekit import mixed
    from edgekit.analyze import _run
    from edgekit.compress import channels, graphedit, refit
    from edgekit.structure import held_out, refit_feeds, sample_feeds

    model = onnx.load(str(prep.fp32_path))
    sets = {"held_out": held_out(prep.calib, mixed.SENSITIVITY_SAMPLES)[0], "probe": probe,
            "evaluation": prep.evaluation}
    sets = {k: v for k, v in sets.items() if v is not None}
    refs = {k: _run(model, v) for k, v in sets.items()}
    rows: dict = {}
    for unit in graphedit.removable_units(model):
        rows[f"drop {unit.name}"] = score(graphedit.remove_units(model, [unit.name]), sets, refs)
        log.info("drop %s: %s", unit.name, rows[f"drop {unit.name}"])
    groups = channels.channel_groups(model)
    importance = channels.channel_importance(model, groups, sample_feeds(prep.calib), centered=True)
    fit_feeds, sources = refit_feeds(prep.calib)
    for g in groups:
        n = channels.round_channels(int(np.ceil(keep_fraction * g.channels)), g.channels, 16)
        if n >= g.channels:
            continue
        order = np.argsort(-importance[g.name], kind="stable")
        edited, _ = refit.prune_and_refit(model, {g.name: np.sort(order[:n])}, fit_feeds, groups=[g],
                                          sources=sources)
        rows[f"{g.name}@{n}"] = score(edited, sets, refs)
        log.info("%s at %d of %d: %s", g.name, n, g.channels, rows[f"{g.name}@{n}"])
    return rows


def drops(prep, combos: list[list[str]], work: Path, ctx, *, repeats: int, rounds: int, per_round: int) -> dict:
    from benchmarks.measure import run_samples
    from edgekit.agent.runtime import OrtRuntime, compare_latency
    from edgekit.allocate import uniform_plan
    from edgekit.compress.quant import W8A8Config
    from edgekit.export.onnx import describe
    from edgekit.inventory import layer_inventory
    from edgekit.mixed import apply_plan
    from edgekit.plan import LayerChoice
    from edgekit.targets import load_target

    fp32 = describe(prep.fp32_path)
    uniform = uniform_plan(layer_inventory(prep.fp32_path), load_target("cpu-x86"), "int8", model_sha256=fp32.sha256)
    paths = {"fp32": Path(prep.fp32_path),
             "uniform int8": Path(apply_plan(uniform, fp32, prep.calib, work / "u8.onnx", W8A8Config(), ctx).path)}
    for blocks in combos:
        drop = {f"_blocks.{b}" for b in blocks}
        choices = tuple(LayerChoice(c.layer, "drop", "dropped") if c.layer.rsplit(".", 1)[0] in drop else c
                        for c in uniform.layers)
        key = "int8 - " + "+".join(blocks)
        art = apply_plan(replace(uniform, layers=choices), fp32, prep.calib, work / f"drop-{'-'.join(blocks)}.onnx",
                         W8A8Config(), ctx)
        paths[key] = Path(art.path)
    feeds = prep.evaluation.feeds()
    ref = run_samples(OrtRuntime(paths["fp32"]), feeds)
    rows = {k: {"top1_evaluation": None if k == "fp32" else round(top1(ref, run_samples(OrtRuntime(p), feeds)), 4),
                "size_bytes": p.stat().st_size, "vs_fp32": [], "vs_int8": [], "fp32_ms": []} for k, p in paths.items()}
    x = {k: v[:1] for k, v in prep.calib.inputs.items()}
    runtimes = {k: OrtRuntime(p) for k, p in paths.items()}
    for _ in range(repeats):
        stats = compare_latency(runtimes, x, rounds=rounds, per_round=per_round)
        for k, row in rows.items():
            row["vs_fp32"].append(round(stats[k].median_ms / stats["fp32"].median_ms, 4))
            row["vs_int8"].append(round(stats[k].median_ms / stats["uniform int8"].median_ms, 4))
            row["fp32_ms"].append(round(stats["fp32"].median_ms, 3))
    return rows


def ranks(values: list[float]) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    v = np.asarray(values, np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=np.float64)
    for x in np.unique(v):
        tie = v == x
        r[tie] = r[tie].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (0.0 when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


PAIR_METRICS = ("mse", "kl", "top1")


def pair_scores(ref: np.ndarray, out: np.ndarray) -> dict:
    """Relative MSE and KL of the logits (``analyze.distortion``) and top-1 agreement, of ``out`` against ``ref``."""
    from edgekit.analyze import distortion

    return {"mse": round(distortion(ref, out, "mse"), 5), "kl": round(distortion(ref, out, "kl"), 5),
            "top1": round(top1(ref, out), 4)}


def pairs(prep, probe, work: Path, ctx, *, bar: float | None) -> dict:
    """Every single block and every pair of blocks removed from uniform INT8 (no timing): top-1 agreement with FP32,
    relative MSE and KL of the logits on the evaluation crops, the held-out calibration crops, all calibration crops,
    the probe as the INT8 artifact runs it (``probe_int8``: clipped, see ``JointAllocator``) and the probe on the edited
    FP32 graph (``probe_float``: what the allocator measures). Then how well each measure ranks the pairs as
    evaluation top-1 does (Spearman's correlation with the evaluation's top-1 loss, over the pairs), and which pairs
    reach ``bar`` evaluation top-1."""
    import itertools

    import onnx

    from edgekit.allocate import uniform_plan
    from edgekit.analyze import _run
    from edgekit.compress import graphedit
    from edgekit.compress.quant import W8A8Config
    from edgekit.export.onnx import describe
    from edgekit.inventory import layer_inventory
    from edgekit.mixed import apply_plan
    from edgekit.plan import LayerChoice
    from edgekit.structure import held_out
    from edgekit.targets import load_target

    model = onnx.load(str(prep.fp32_path))
    fp32 = describe(prep.fp32_path)
    uniform = uniform_plan(layer_inventory(prep.fp32_path), load_target("cpu-x86"), "int8", model_sha256=fp32.sha256)
    sets = {"evaluation": prep.evaluation, "held_out": held_out(prep.calib)[0], "calibration": prep.calib,
            "probe_int8": probe}
    refs = {k: _run(model, v) for k, v in sets.items()}
    probe_ref = _run(model, probe)
    units = [u.name for u in graphedit.removable_units(model)]
    combos = [()] + [(u,) for u in units] + list(itertools.combinations(units, 2))
    rows: dict = {}
    for combo in combos:
        choices = tuple(LayerChoice(c.layer, "drop", "dropped") if c.layer.rsplit(".", 1)[0] in combo else c
                        for c in uniform.layers)
        key = "+".join(u.rsplit(".", 1)[-1] for u in combo) or "none"
        art = apply_plan(replace(uniform, layers=choices), fp32, prep.calib, work / "pairs" / f"{key}.onnx",
                         W8A8Config(), ctx)
        q = onnx.load(str(art.path))
        row = {}
        for name, data in sets.items():
            row[name] = pair_scores(refs[name], _run(q, data))
        edited = graphedit.remove_units(model, list(combo)) if combo else model
        row["probe_float"] = pair_scores(probe_ref, _run(edited, probe))
        rows[key] = row
        log.info("INT8 - %s: %s", key, row)
    two = [k for k in rows if "+" in k]
    loss = [1.0 - rows[k]["evaluation"]["top1"] for k in two]
    agreement: dict = {}
    for name in [*sets, "probe_float"]:
        for metric in PAIR_METRICS:
            score = [1.0 - rows[k][name][metric] if metric == "top1" else rows[k][name][metric] for k in two]
            best = [two[i] for i in np.argsort(score, kind="stable")[:3]]
            agreement[f"{name} {metric}"] = {"spearman_vs_evaluation_top1_loss": round(spearman(loss, score), 3),
                                             "best_three": best,
                                             "their_evaluation_top1": [rows[k]["evaluation"]["top1"] for k in best]}
    out = {"rows": rows, "agreement": agreement}
    if bar is not None:
        out["bar"] = bar
        out["pairs_at_bar"] = sorted((k for k in two if rows[k]["evaluation"]["top1"] >= bar),
                                     key=lambda k: -rows[k]["evaluation"]["top1"])
    return out


def parse_drops(text: str) -> list[list[str]]:
    """``"14+4,10"`` -> ``[["14", "4"], ["10"]]`` (block numbers of EfficientNet-Lite0's ``_blocks.<n>``)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        blocks = part.split("+")
        if not all(b.isdigit() for b in blocks):
            raise SystemExit(f"--drops: {part!r} is not block numbers joined by '+'")
        out.append(blocks)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--drops", default="", help="INT8 block-removal combinations, e.g. 14+4,14+4+10 (empty: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings of the drop variants")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--no-edits", action="store_true", help="skip part 1")
    ap.add_argument("--pairs", action="store_true", help="part 3: every pair of blocks removed from uniform INT8")
    ap.add_argument("--bar", type=float, help="with --pairs: list the pairs at or above this evaluation top-1")
    args = ap.parse_args(argv)
    combos = parse_drops(args.drops)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from edgekit.context import Context
    from edgekit.datafree import probe_samples
    from edgekit.model import load_model

    ctx = Context(seed=0, progress=False)
    import tempfile

    res: dict = {"command": " ".join(["benchmarks/structure_probe.py", *(argv or sys.argv[1:])])}
    with tempfile.TemporaryDirectory(prefix="edgekit-structure-probe-") as tmp:
        work = Path(tmp)
        prep = P.prepare_efficientnet(work, 128, ctx)
        probe = None
        if not args.no_edits or args.pairs:
            t0 = time.perf_counter()
            m = load_model("builtin:efficientnet-lite0", ctx=ctx)
            probe = probe_samples(m.module, m.inputs, seed=ctx.seed)
            res["probe_seconds"] = round(time.perf_counter() - t0, 1)
        if not args.no_edits:
            res["edits"] = edits(prep, probe)
            res["evaluation_over_held_out_mse"] = optimism(res["edits"])
        if args.pairs:
            res["pairs"] = pairs(prep, probe, work, ctx, bar=args.bar)
        if combos:
            res["drops"] = drops(prep, combos, work, ctx, repeats=args.repeats, rounds=args.rounds,
                                 per_round=args.per_round)
    for k, r in res.get("edits", {}).items():
        print(f"{k:36s} " + "  ".join(f"{s} {r[s]['mse']:.4f}/{r[s]['kl']:.4f}" for s in SETS if s in r) +
              f"  top-1 {r['top1_evaluation']:.3f}")
    for k, r in res.get("drops", {}).items():
        print(f"{k:24s} top-1 {r['top1_evaluation']}  vs FP32 {r['vs_fp32']}  vs INT8 {r['vs_int8']}  "
              f"FP32 ms {r['fp32_ms']}")
    if "pairs" in res:
        for k, a in res["pairs"]["agreement"].items():
            print(f"{k:22s} Spearman {a['spearman_vs_evaluation_top1_loss']:+.3f}  best three {a['best_three']} "
                  f"(evaluation top-1 {a['their_evaluation_top1']})")
        if "pairs_at_bar" in res["pairs"]:
            print(f"pairs at evaluation top-1 >= {args.bar}: {res['pairs']['pairs_at_bar']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
