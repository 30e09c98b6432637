"""benchmarks/sync.py: its pure helpers (percentiles, /proc parsing, the measured window, the goal) and one short
live run against a real replica process on SQLite."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest

from tests.bench_scripts import load_benchmark


def _load():
    return load_benchmark("sync")


def test_percentile_matches_numpy_linear():
    bench = _load()
    assert math.isnan(bench.percentile([], 50))
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile(list(range(1, 11)), 50) == pytest.approx(5.5)
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 101, 1000):
        v = list(rng.exponential(5.0, n))
        for q in (0, 1, 50, 90, 99, 100):
            assert bench.percentile(v, q) == pytest.approx(float(np.percentile(v, q)))


def test_parse_proc_stat_counts_fields_after_the_last_parenthesis():
    bench = _load()
    tick = os.sysconf("SC_CLK_TCK")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime ...
    line = f"4242 (we ird) (proc)) S 17 4242 4242 0 -1 4194560 100 0 0 0 {3 * tick} {tick} {2 * tick} {tick} 20 0 1 0"
    assert bench.parse_proc_stat(line) == (4242, 17, pytest.approx(4.0))
    assert bench.parse_proc_stat(line, children=True) == (4242, 17, pytest.approx(7.0))


def test_proc_cpu_follows_this_process():
    bench = _load()
    before, t0 = bench.proc_cpu(os.getpid()), os.times()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    after, t1 = bench.proc_cpu(os.getpid()), os.times()
    own = (t1.user + t1.system) - (t0.user + t0.system)
    assert after - before == pytest.approx(own, abs=0.05) and after - before > 0.2
    busy, steal, total = bench.machine_cpu()
    assert 0 <= busy <= total and 0 <= steal <= total


def test_summarize_keeps_the_window_and_counts_errors():
    bench = _load()
    records = [(0.5, 1.2, 200),  # started before the window
               (1.0, 1.010, 200), (1.1, 1.130, 200), (1.2, 1.205, 500), (1.3, 1.3, 0), (1.4, 1.420, 200),
               (2.9, 3.1, 200)]  # ended after it
    res = bench.summarize(records, 1.0, 3.0)
    assert (res["requests"], res["ok"], res["errors"]) == (5, 3, 2)
    assert res["rate_per_s"] == pytest.approx(1.5)  # 3 successful heartbeats in 2 s
    assert res["latency_ms"]["p50"] == pytest.approx(20.0) and res["latency_ms"]["max"] == pytest.approx(30.0)


def test_goal_needs_the_p99_and_a_rate_measured_or_projected():
    bench = _load()

    def hb(rate, p99, projected):
        return {"rate_per_s": rate, "latency_ms": {"p99": p99}, "projected_2core_per_s": projected}

    assert bench.verdicts(hb(1600, 20, 1700)) == {"measured": True, "projected": True, "pass": True}
    assert bench.verdicts(hb(800, 20, 1700)) == {"measured": False, "projected": True, "pass": True}
    assert bench.verdicts(hb(1600, 60, 1700))["pass"] is False  # the p99 is never projected away
    assert bench.verdicts(hb(800, 20, 1200))["pass"] is False


def test_quick_run_on_sqlite(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "sync.json"
    rc = bench.main(["--quick", "--backends", "sqlite", "--duration", "2", "--warmup", "1", "--devices", "20",
                     "--concurrency", "8", "--blob-mib", "4", "--piece-mib", "1", "--no-check", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["environment"]["versions"]["fastapi"] and doc["config"]["backends"] == ["sqlite"]
    r = doc["results"]["sqlite"]
    hb = r["heartbeat"]
    assert hb["devices"] == 20 and hb["concurrency"] == 8
    assert hb["rate_per_s"] > 0 and hb["ok"] > 10 and hb["errors"] == 0
    lat = hb["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert hb["cpu_cores"]["server"] > 0 and hb["per_server_cpu_s"] > 0
    assert hb["projected_2core_per_s"] == pytest.approx(2 * hb["per_server_cpu_s"])
    assert set(hb["goal"]) == {"measured", "projected", "pass"}
    for kind in ("plain", "resumed"):
        assert r["download"][kind]["verified"] and r["download"][kind]["mb_per_s"] > 0
    assert 0 < r["download"]["resumed"]["interrupted_at"] < 4 << 20
    table = capsys.readouterr().out
    assert "| heartbeats/s, measured" in table and "| downloads sha256-verified | yes |" in table
