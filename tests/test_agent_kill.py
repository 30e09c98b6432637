"""Kill test: SIGKILL the agent at random points of its install/update/serve loop, many times over. Every restart
must serve a valid model, and the upload queue must hold every sample whose enqueue had returned."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.agent_bundles import build_bundles
from tests.conftest import TESTS_DIR

KILLS = 60


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, test_models_importable):
    return build_bundles(tmp_path_factory.mktemp("kill-bundles"))


@pytest.mark.e2e
def test_sigkill_at_random_points_never_loses_the_model_or_acknowledged_samples(bundles, tmp_path):
    from edgekit.agent import Agent
    from edgekit.agent.state import State

    state = tmp_path / "state"
    first = Agent.open(state)
    first.install(bundles["v1"])
    first.close()
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    worker = str(TESTS_DIR / "agent_kill_worker.py")
    rnd = random.Random(0)
    acked: set[int] = set()
    installs_killed = 0
    for k in range(KILLS):
        proc = subprocess.Popen([sys.executable, worker, str(state), str(bundles["v1"]), str(bundles["v2"]), str(k)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ready = proc.stdout.readline().split()
        if ready[:1] != ["READY"]:
            proc.kill()
            pytest.fail(f"restart {k} did not come up serving: {ready} {proc.stderr.read()[-2000:]}")
        assert ready[2] == "OK", f"restart {k} serves a model with invalid output"
        assert ready[1] in ("1", "2")
        time.sleep(rnd.uniform(0.0, 0.6))  # somewhere in the install / switch / probation / queue loop
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        lines = out.splitlines()
        installs_killed += len(lines) > 0
        acked |= {int(line.split()[1]) for line in lines if line.startswith("ACK ")}
        queued = set(State(state).queue_ids())
        missing = acked - queued
        assert not missing, f"after kill {k} the queue lost acknowledged samples {sorted(missing)[:10]}"
    assert len(acked) > KILLS  # the loop really ran between kills
    final = Agent.open(state)
    assert final.status()["model"]["version"] in (1, 2)
    assert not list((state / "slots").glob(".*")), "an interrupted install left files behind after recovery"
