#!/usr/bin/env python
"""Fleet simulator at scale (issue 9): ``--devices`` virtual devices (the real agent and sync client, real HTTP)
through a staged rollout with injected faults — dropped connections, slow links, a server restart mid-rollout, power
loss mid-download — and the report: rollout time, bytes moved, lost messages (must be 0), stuck devices (must be 0).

The two releases are the test suite's tiny INT8 / FP32 CNN bundles (``tests/agent_bundles.py``): the fleet, not the
model, is what is measured.

    .venv/bin/python benchmarks/fleet_sim.py --devices 1000 --json benchmarks/results/fleet_sim.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    from edgekit.sync.simulate import SimConfig, simulate
    from tests.agent_bundles import build_bundles

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--drop-rate", type=float, default=0.05)
    ap.add_argument("--slow-share", type=float, default=0.05)
    ap.add_argument("--power-loss", type=float, default=0.02)
    ap.add_argument("--stage-seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    cfg = SimConfig(devices=args.devices, threads=args.threads, drop_rate=args.drop_rate, slow_share=args.slow_share,
                    power_loss=args.power_loss, stage_seconds=args.stage_seconds, stages=(1, 10, 50, 100))
    with tempfile.TemporaryDirectory(prefix="edgekit-fleet-sim-") as tmp:
        bundles = build_bundles(Path(tmp) / "bundles")
        t0 = time.monotonic()
        report = simulate(Path(tmp) / "sim", bundles["v1"], bundles["v2"], cfg).to_dict()
        report["wall_s"] = round(time.monotonic() - t0, 1)
    report["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    ok = report["rollout_status"] == "completed" and report["lost_messages"] == 0 and report["stuck"] == 0
    print(f"{'PASS' if ok else 'MISS'}: staged rollout to {args.devices} devices with faults, "
          f"{report['lost_messages']} lost messages, {report['stuck']} stuck")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
