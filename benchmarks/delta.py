#!/usr/bin/env python
"""How small a delta is: EfficientNet-Lite0 built for jetson-orin-nano (its float biases are the manifest's refittable
weights), every bias changed as an adaptation job would change it (Gaussian, ``--change`` times the tensor's mean
magnitude), ``edgekit.delta.make_delta`` at ``--error-bound``, then installed by the agent onto the base.

Prints the delta's bytes against the full bundle's, the bits chosen per tensor, and whether the agent serves the
result bundle's model after installing the delta. Issue 9 asks for deltas of at most 1 % of the full bundle.

    .venv/bin/python benchmarks/delta.py [--change 0.02] [--error-bound 1e-3] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

MAX_RATIO = 0.01


def run(work: Path, change: float, error_bound: float) -> dict:
    import onnx
    from onnx import numpy_helper

    from edgekit.agent import Agent, AgentConfig
    from edgekit.build import BuildRequest, build
    from edgekit.bundle import open_bundle, pack, seal
    from edgekit.context import Context
    from edgekit.delta import make_delta
    from edgekit.fsutil import sha256_file
    from edgekit.keys import dev_key, load_private_key

    ctx = Context()
    key = load_private_key(dev_key(ctx.cache_dir))
    built = build(BuildRequest(target="jetson-orin-nano", out=work / "base", measure_latency=False), ctx)
    base = open_bundle(built.archive, workdir=work / "base-open")
    adapted = work / "adapted"
    shutil.copytree(base.root, adapted)
    for name in ("manifest.json", "manifest.sig"):
        (adapted / name).unlink()
    model = onnx.load(str(adapted / "model.onnx"))
    refit = set(base.manifest["engine"]["refittable"])
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name in refit:
            a = numpy_helper.to_array(init)
            new = a + rng.normal(0, change, a.shape) * np.abs(a).mean()
            init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    onnx.save(model, str(adapted / "model.onnx"))
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", "schema_version")}
    manifest["version"] += 1
    manifest["artifact"] = {**manifest["artifact"], "sha256": sha256_file(adapted / "model.onnx"),
                            "size": (adapted / "model.onnx").stat().st_size}
    seal(adapted, manifest, key)
    res = make_delta(built.archive, pack(adapted, work / "adapted.ekb"), work / "release", key,
                     error_bound=error_bound)
    agent = Agent.open(work / "state", AgentConfig())
    try:
        agent.install(built.archive, probation=False)
        agent.install(res.delta, probation=False)
        served = agent.status()["model"]["sha256"]
    finally:
        agent.close()
    want = json.loads((res.bundle_dir / "manifest.json").read_text())["artifact"]["sha256"]
    return {"changed_tensors": len(refit), "change": change, "error_bound": error_bound,
            "bits_histogram": dict(collections.Counter(res.stats["bits"].values())),
            **{k: v for k, v in res.stats.items() if k != "bits"}, "agent_serves_result": served == want}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--change", type=float, default=0.02)
    ap.add_argument("--error-bound", type=float, default=1e-3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgekit-delta-bench-") as tmp:
        res = run(Path(tmp), args.change, args.error_bound)
    print(f"{res['changed_tensors']} tensors changed; delta {res['delta_bytes']} bytes = {res['ratio']:.2%} of the "
          f"full bundle ({res['full_bytes']} bytes); bits {res['bits_histogram']}; "
          f"agent serves the result: {res['agent_serves_result']}")
    ok = res["ratio"] <= MAX_RATIO and res["agent_serves_result"]
    print(f"  {'PASS' if ok else 'MISS'}  delta <= {MAX_RATIO:.0%} of the full bundle and installed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
