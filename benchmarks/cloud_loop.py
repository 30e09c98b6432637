#!/usr/bin/env python
"""The cloud-edge loop on digits-C, measured by the fleet simulator (issue 9's first done-when).

A fleet of ``--devices`` virtual devices (the real agent with its default on-device adaptation and upload selection,
the real sync client, real HTTP through the fault proxy) serves the built-in ``digits-bn`` INT8 model. Then:

1. **Shift.** Every device's inputs are digits corrupted by ``--corruption`` at ``--severity`` (``edgekit.corrupt``).
   Phase A measures the fleet's online accuracy on its share of the corrupted *evaluation* digits (uploads paused:
   nothing measured reaches the cloud).
2. **Uploads.** Each device serves its share of corrupted *training* digits; its agent selects samples for upload
   (``SelectConfig(every=2)``: the share must stay at or under 30 %) and the sync client sends them.
3. **Cloud job.** The operator registers the FP32 model as the teacher and clean calibration digits as the replay set;
   an adaptation job (``edgekit.sync.jobs``) distills and publishes a release with its delta.
4. **Rollout.** The release goes out in stages (10, 50, 100 %) with faults on: dropped connections, slow links, a
   service restart, power loss mid-download. Devices serving the base install the delta.
5. Phase C measures the fleet's accuracy again on the same evaluation shares.

Prints accuracy before/after, the uploaded share, the delta's bytes against the full bundle's, how devices installed
(delta or full), lost messages and stuck devices. Goal: accuracy up, uploads <= 30 %, delta <= 1 %, 0 lost, 0 stuck.

    .venv/bin/python benchmarks/cloud_loop.py --devices 50 --json benchmarks/results/cloud_loop.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_UPLOAD_SHARE, MAX_DELTA_RATIO = 0.30, 0.01


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _serve(device, x: np.ndarray, y: np.ndarray) -> int:
    """Requests one at a time, as a camera would; returns how many were right."""
    name = device.agent.model.outputs[0].name
    return sum(int(np.argmax(device.agent.infer({"input": x[i:i + 1]})[name])) == y[i] for i in range(len(x)))


def _shares(n: int, devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), devices)


def run(work: Path, args: argparse.Namespace) -> dict:
    from edgekit import corrupt
    from edgekit.agent import AgentConfig
    from edgekit.agent.select import SelectConfig
    from edgekit.build import BuildRequest, build
    from edgekit.bundle import read_manifest
    from edgekit.context import Context
    from edgekit.datasets import digits
    from edgekit.export.onnx import export_onnx
    from edgekit.model import load_model
    from edgekit.sync.simulate import SimConfig, Simulator, prepare_work
    from edgekit.zoo import get_builtin

    cfg = SimConfig(devices=args.devices, threads=args.threads, drop_rate=args.drop_rate, slow_share=0.05,
                    power_loss=args.power_loss, stages=(10, 50, 100), stage_seconds=args.stage_seconds)
    agent_cfg = AgentConfig(select=SelectConfig(every=2, time_share=None, warmup=20))
    sim = Simulator(prepare_work(work / "sim"), cfg, agent_cfg)
    out: dict = {"devices": args.devices, "corruption": args.corruption, "severity": args.severity}
    try:
        ctx = Context(seed=0)
        built = build(BuildRequest(model="builtin:digits-bn", out=work / "build", precision="int8",
                                   measure_latency=False, key=sim.service.release_key), ctx)
        export_onnx(load_model("builtin:digits-bn", ctx=ctx), work / "teacher.onnx")
        pre = get_builtin("digits-bn").preprocessing
        rng = np.random.default_rng(0)
        tr, ty = digits("train")
        ev, ey = digits("evaluation")
        cal, _ = digits("calibration")
        x_up = pre.apply(corrupt.corrupt(tr, args.corruption, args.severity, seed=11))
        x_ev = pre.apply(corrupt.corrupt(ev, args.corruption, args.severity, seed=5))
        # each device's traffic: --stream corrupted training digits drawn at random (the fleet sees the same shift)
        up_shares = [rng.choice(len(x_up), args.stream, replace=False) for _ in range(args.devices)]
        ev_shares = _shares(len(x_ev), args.devices, rng)

        sim.enroll()
        base = sim.publish(built.archive)
        drop = sim.proxy.drop_rate
        sim.proxy.drop_rate = 0.0
        sim.rollout(base["id"], (100,), 0)
        base_version = str(read_manifest(built.archive)["version"])
        sim.settle(base_version)

        def phase(shares, xs, ys, uploads: bool) -> float:
            right = []

            def one(d) -> None:  # noqa: ANN001 - Device
                d.agent.pause_uploads(not uploads)
                right.append(_serve(d, xs[shares[d.index]], ys[shares[d.index]]))
                d.agent.pause_uploads(False)

            list(sim.pool.map(one, sim.devices))
            return sum(right) / len(xs)

        t0 = time.monotonic()
        out["accuracy_before"] = phase(ev_shares, x_ev, ey, uploads=False)
        right = []

        def serve_stream(d) -> None:  # noqa: ANN001 - Device
            right.append(_serve(d, x_up[up_shares[d.index]], ty[up_shares[d.index]]))

        list(sim.pool.map(serve_stream, sim.devices))
        out["accuracy_uploads_phase"] = sum(right) / (args.stream * args.devices)
        for _ in range(3):  # uploads flushed by the clients' syncs
            sim.round()
        seen = sum(d.agent.status()["queue"]["seen"] for d in sim.devices)
        with sqlite3.connect(work / "sim" / "service" / "sync.db") as db:  # the service is ours: its database
            uploaded = db.execute("select count(*) from samples").fetchone()[0]
        out["uploaded"] = uploaded
        out["upload_share"] = uploaded / (args.stream * args.devices)
        out["selector_seen"] = seen

        token = {"Content-Type": "application/octet-stream"}
        sim.admin("PUT", f"/v1/fleets/{cfg.fleet}/teacher", (work / "teacher.onnx").read_bytes(), token)
        sim.admin("PUT", f"/v1/fleets/{cfg.fleet}/replay", _npz(input=pre.apply(cal)), token)
        job = sim.admin("POST", f"/v1/fleets/{cfg.fleet}/jobs", {"min_samples": 32})
        while job["status"] in ("queued", "running"):
            time.sleep(1.0)
            job = sim.admin("GET", f"/v1/fleets/{cfg.fleet}/jobs/{job['id']}")
        out["job"] = {"status": job["status"], "error": job["error"], "attempts": job["attempts"],
                      "metrics": job["state"].get("trained", {}).get("metrics"),
                      "seconds": job["state"].get("trained", {}).get("seconds")}
        if job["status"] != "succeeded":
            return out
        pk = job["state"]["packaged"]
        out.update(delta_bytes=pk["delta_size"], full_bytes=pk["bundle_size"], delta_ratio=pk["delta_ratio"],
                   delta_bits=pk["bits"])
        release = {"id": job["state"]["published"]["release_id"], "size": pk["delta_size"]}
        sim.proxy.drop_rate = drop
        sim.run_rollout(release)
        version = job["state"]["published"]["version"]
        sim.settle(version)
        out["accuracy_after"] = phase(ev_shares, x_ev, ey, uploads=False)
        report = sim.finish(version)
        out["sim"] = report.to_dict()
        details = [e["detail"] for e in sim.events() if e["kind"] == "installed" and e["version"] == version]
        out["installed_via"] = {"delta": sum('"via": "delta"' in d for d in details),
                                "full": sum('"via": "full"' in d for d in details)}
        out["loop_s"] = round(time.monotonic() - t0, 1)
        return out
    finally:
        sim.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--stream", type=int, default=100, help="requests per device while uploads are on")
    ap.add_argument("--corruption", default="contrast")
    ap.add_argument("--severity", type=int, default=4)
    ap.add_argument("--drop-rate", type=float, default=0.05)
    ap.add_argument("--power-loss", type=float, default=0.05)
    ap.add_argument("--stage-seconds", type=float, default=3.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgekit-cloud-loop-") as tmp:
        res = run(Path(tmp), args)
    print(json.dumps(res, indent=1, default=str))
    sim = res.get("sim", {})
    checks = {
        "accuracy rises": res.get("accuracy_after", 0) > res.get("accuracy_before", 1),
        f"uploads <= {MAX_UPLOAD_SHARE:.0%}": res.get("upload_share", 1) <= MAX_UPLOAD_SHARE,
        f"delta <= {MAX_DELTA_RATIO:.0%} of the bundle": res.get("delta_ratio", 1) <= MAX_DELTA_RATIO,
        "0 lost messages, 0 stuck": sim.get("lost_messages") == 0 and sim.get("stuck") == 0,
    }
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**res, "checks": checks}, indent=1, default=str) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
