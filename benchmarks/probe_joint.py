"""Measure, on this machine, the layer shapes the joint option space prices, and merge them into the target's
hardware table (``hardware/cpu-x86.json``):

    .venv/bin/python benchmarks/probe_joint.py [--models efficientnet digits minilm] [--out hardware/cpu-x86.json]

For each model: the model itself, the model with every channel group narrowed to each of ``edgekit.joint``'s
``KEEP_FRACTIONS`` (rounded to the target's ``channel_multiple``), and the model with every low-rank candidate
factorized at each candidate rank. ``edgekit.probe.probe`` times every weighted layer of each (one-layer units,
interleaved, under ONNX Runtime's profiler) and the table gets one entry per layer signature. The unchanged models are
measured again in the same run, so narrowed and original layers are timed under the same conditions; their entries
replace the older ones. Timing does not depend on which channels are kept, so the first N are.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPTIONS = {"efficientnet": ["fp32", "w8a8"], "digits": ["fp32", "w8a8"],
           "minilm": ["fp32", "w8a8d", "w4g32", "w4g64", "w4g128", "w2g32", "w2g64"]}


def variants(name: str, model, multiple: int):
    """(label, ModelProto) for the model, its narrowed versions and its factorized versions."""
    import numpy as np

    from edgekit.compress import channels, graphedit
    from edgekit.cost import layer_geometry
    from edgekit.inventory import layer_inventory
    from edgekit.joint import KEEP_FRACTIONS, rank_candidates

    yield name, model
    groups = channels.channel_groups(model)
    for f in KEEP_FRACTIONS:
        keep = {}
        for g in groups:
            n = channels.round_channels(math.ceil(f * g.channels), g.channels, multiple)
            if n < g.channels:
                keep[g.name] = np.arange(n)
        if keep:
            yield f"{name}-keep{int(f * 100)}", channels.prune_channels(model, keep)
    geo = layer_geometry(model)
    grouped = {layer for g in groups for layer in g.layers}
    cands = {x.name: rank_candidates(x, geo.get(x.name)) for x in layer_inventory(model) if x.name not in grouped}
    cands = {k: v for k, v in cands.items() if v}
    for i in range(max((len(v) for v in cands.values()), default=0)):
        m = model
        for layer, ranks in cands.items():
            if i < len(ranks):
                m = graphedit.factorize(m, layer, *graphedit.lowrank_factors(m, layer, ranks[i]))
        yield f"{name}-rank{i}", m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet", "digits", "minilm"], choices=sorted(OPTIONS))
    ap.add_argument("--out", type=Path, default=ROOT / "hardware" / "cpu-x86.json")
    ap.add_argument("--target", default="cpu-x86", help="channel multiple, and whether layers run as ai.edgekit "
                    "kernels (a profile whose custom_op_domains name ai.edgekit)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import onnx

    from benchmarks.joint_space import prepare
    from edgekit.context import Context
    from edgekit.cost import HardwareTable
    from edgekit.probe import probe
    from edgekit.targets import load_target

    target = load_target(args.target)
    multiple = target.hardware.channel_multiple
    label = str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out)
    base = HardwareTable.load(args.out, label=label) if args.out.exists() else HardwareTable(label=label)
    table = HardwareTable(meta=dict(base.meta), label=base.label)
    ctx = Context(progress=False)
    with tempfile.TemporaryDirectory(prefix="edgekit-probe-joint-") as tmp:
        for name in args.models:
            work = Path(tmp) / name
            work.mkdir()
            prep, _, _ = prepare(name, work, ctx)
            for label, m in variants(name, onnx.load(str(prep.fp32_path)), multiple):
                path = work / f"{label}.onnx"
                onnx.save(m, str(path))
                table = probe(path, OPTIONS[name], table=table, edgekit_ops=target.edgekit_kernels)
                merged = base.merge(table)
                merged.meta["command"] = "benchmarks/probe_joint.py " + " ".join(argv or sys.argv[1:])
                args.out.write_text(json.dumps(merged.to_dict(), indent=1, sort_keys=True) + "\n")
                print(f"probed {label}: {len(table.entries)} signatures", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
