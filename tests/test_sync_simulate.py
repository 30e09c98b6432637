"""The fleet simulator (``edgekit sync simulate``): virtual devices running the real agent and sync client over real
HTTP through a staged rollout with dropped connections, slow links, a server restart and power loss mid-download;
nothing may be lost and no device may be left behind."""

from __future__ import annotations

import json
import threading

import pytest

from tests.agent_bundles import build_bundles

pytestmark = pytest.mark.e2e


def test_simulated_fleet_rollout_with_faults(tmp_path, run_cli):
    bundles = build_bundles(tmp_path / "bundles")
    res = run_cli("sync", "simulate", "--devices", 16, "--base", bundles["v1"], "--new", bundles["v2"],
                  "--work", tmp_path / "sim", "--drop-rate", 0.1, "--power-loss", 0.15, "--stages", "25,100",
                  "--stage-seconds", 1, "--json")
    report = json.loads(res.stdout)
    assert report["rollout_status"] == "completed"
    assert report["lost_messages"] == 0 and report["stuck"] == 0
    assert report["faults"]["restarts"] == 1 and report["faults"]["power_loss"] >= 2
    assert report["faults"]["dropped"] > 0
    # every device installed the new release once: its event reached the service
    assert report["events_stored"] >= 2 * 16  # installed v1, installed v2


def test_simulate_refuses_a_work_folder_it_did_not_make(tmp_path, run_cli):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    bundles = tmp_path / "x.ekb"
    bundles.write_bytes(b"not read")
    res = run_cli("sync", "simulate", "--base", bundles, "--new", bundles, "--work", tmp_path / "mine", code=3)
    assert "not a simulator's work folder" in res.output and (tmp_path / "mine" / "notes.txt").exists()


def test_simulate_against_a_running_service(tmp_path, run_cli):
    """--server: the devices talk to a service that runs elsewhere (here a live test server); the events are read
    back through its admin API."""
    from tests.sync_server import ADMIN, LiveServer

    bundles = build_bundles(tmp_path / "bundles")
    with LiveServer(tmp_path / "srv") as srv:  # its own ticker is off: the rollout's gates are ticked here
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(0.5):
                srv.service.tick()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            res = run_cli("sync", "simulate", "--devices", 6, "--base", bundles["v1"], "--new", bundles["v2"],
                          "--work", tmp_path / "sim", "--server", srv.url, "--admin-token", ADMIN, "--fleet", "ext",
                          "--stages", "50,100", "--stage-seconds", 0.5, "--json")
        finally:
            stop.set()
            ticker.join()
    report = json.loads(res.stdout)
    assert report["rollout_status"] == "completed" and report["faults"]["restarts"] == 0
    assert report["lost_messages"] == 0 and report["stuck"] == 0 and report["events_stored"] >= 12
