"""Measuring compressed models against FP32 for the benchmarks: fidelity (cosine, SQNR, top-1 agreement) on held-out
samples, and batch-1 latency interleaved round by round while watching how busy the shared host is."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers import THREADS, OvRuntime, Peer, make_runtime

log = logging.getLogger("bench.measure")


# --------------------------------------------------------------------------------------------------- measuring
def _first(x: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    return np.asarray(next(iter(x.values())) if isinstance(x, Mapping) else x)


def fidelity(outputs: Mapping[str, np.ndarray] | np.ndarray, reference: Mapping[str, np.ndarray] | np.ndarray,
             classification: bool, *, per_sample: bool = False) -> dict:
    """Mean cosine, SQNR (dB, capped at 200) and top-1 agreement (classifiers with (N, classes) outputs, else None)
    of ``outputs`` against ``reference`` (arrays, or output dicts: the first output is compared). With ``per_sample``
    also each sample's value of the headline metric (``per_sample``: 1/0 top-1 agreement for classifiers, else the
    cosine), for paired comparisons of two variants on the same samples."""
    from edgekit.verify import sample_cosines, sqnr_db

    out, ref = _first(outputs), _first(reference)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    cos = sample_cosines(ref, out)
    agree = (out.argmax(1) == ref.argmax(1)).astype(np.float64) if classification and ref.ndim == 2 else None
    rec = {"mean_cosine": float(cos.mean()), "sqnr_db": sqnr_db(ref, out),
           "top1_agreement": None if agree is None else float(agree.mean())}
    if per_sample:
        rec["per_sample"] = [round(float(v), 6) for v in (cos if agree is None else agree)]
    return rec


def run_samples(rt, feeds: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """The first output of ``rt`` on each feed (batch 1 each), concatenated."""
    return np.concatenate([_first(rt.run(f)) for f in feeds])


class CpuMonitor:
    """How busy other processes keep the CPUs: machine-wide busy time from /proc/stat minus this process's own CPU
    time, as a share of all CPUs over the interval since the last reading (None where /proc/stat is missing)."""

    def __init__(self) -> None:
        self._last = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (sum(vals) - vals[3] - vals[4]) / tick  # all but idle and iowait, steal included
        return busy, time.process_time(), time.perf_counter()

    def foreign(self) -> float | None:
        """Share of the machine's CPU time used by other processes since the previous call (or creation)."""
        now, prev = self._snapshot(), self._last
        self._last = now
        if now is None or prev is None or now[2] <= prev[2]:
            return None
        other = (now[0] - prev[0]) - (now[1] - prev[1])
        return round(min(1.0, max(0.0, other / ((now[2] - prev[2]) * (os.cpu_count() or 1)))), 3)


def wait_for_idle(max_s: float, *, threshold: float = 0.15, window_s: float = 2.0) -> float:
    """Sleep in ``window_s`` steps until other processes use less than ``threshold`` of the CPUs (or ``max_s`` is
    spent, or load cannot be read). Returns the seconds waited."""
    mon = CpuMonitor()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_s:
        time.sleep(window_s)
        f = mon.foreign()
        if f is None or f < threshold:
            break
    return round(time.perf_counter() - t0, 1)


def interleaved_latency(runtimes: Mapping[str, Any], feeds: Mapping[str, np.ndarray], *, rounds: int,
                        per_round: int, baseline: str = "fp32", idle_wait_s: float = 0.0,
                        quiet_share: float | None = 0.1, load_log: list[dict] | None = None) -> dict[str, dict]:
    """build_cpu's interleaved timing for any runtimes with ``run(feeds)``: one ``compare_latency`` round per call,
    the order rotated every round. Median of the round medians, its ratio to ``baseline``, the per-round ratio range
    and the median of the per-round ratios.

    The host's cores are shared, and a busy neighbour on one of two cores slows a 2-thread runtime by up to 3x, and
    not every runtime alike. So before each round it waits (``idle_wait_s`` in all) for other processes to go quiet,
    and it measures each round's share of CPU used by other processes: when at least two rounds stayed under
    ``quiet_share``, only those rounds are summarised (``rounds_used``; None summarises all). ``load_log`` receives
    each round's share and wait."""
    from edgekit.agent.runtime import compare_latency

    names = list(runtimes)
    med: dict[str, list[float]] = {k: [] for k in names}
    p90: dict[str, list[float]] = {k: [] for k in names}
    loads: list[float | None] = []
    budget = float(idle_wait_s)
    for r in range(rounds):
        waited = wait_for_idle(budget, threshold=quiet_share or 0.15) if budget > 0 else 0.0
        budget -= waited
        mon = CpuMonitor()
        order = names[r % len(names):] + names[: r % len(names)]
        stats = compare_latency({k: runtimes[k] for k in order}, feeds, rounds=1, per_round=per_round,
                                warmup=10 if r == 0 else 2)
        loads.append(mon.foreign())
        if load_log is not None:
            load_log.append({"round": r, "foreign_cpu_share": loads[-1], "waited_s": waited})
        for k, s in stats.items():
            med[k].append(s.median_ms)
            p90[k].append(s.p90_ms)
    used = list(range(rounds))
    if quiet_share is not None:
        quiet = [r for r, f in enumerate(loads) if f is not None and f < quiet_share]
        if len(quiet) >= 2:
            used = quiet
    base = [med[baseline][r] for r in used]
    out = {}
    for k in names:
        mk = [med[k][r] for r in used]
        m = statistics.median(mk)
        ratios = [a / b for a, b in zip(mk, base)]
        out[k] = {"median_ms": round(m, 4), "p90_ms": round(statistics.median([p90[k][r] for r in used]), 4),
                  "round_medians_ms": [round(x, 4) for x in med[k]], "rounds_used": used,
                  "ratio_vs_fp32": round(m / statistics.median(base), 4),
                  "ratio_median_of_rounds": round(statistics.median(ratios), 4),
                  "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
                  "runs": len(used) * per_round}
    return out


def evaluate(peers: Sequence[Peer], fp32_path: Path, eval_feeds: Sequence[Mapping[str, np.ndarray]], *,
             classification: bool, latency_feeds: Mapping[str, np.ndarray] | None = None, rounds: int = 5,
             per_round: int = 20, threads: int | None = THREADS, idle_wait_s: float = 0.0,
             load_log: list[dict] | None = None, per_sample: bool = False) -> dict[str, dict]:
    """Fidelity of every peer to the FP32 ONNX model (ONNX Runtime) on ``eval_feeds``, one sample at a time (with
    ``per_sample``, each sample's value too: ``fidelity``), and (with ``latency_feeds``) batch-1 latency interleaved
    with FP32. Returns name -> record (``fp32`` included)."""
    from edgekit.agent.runtime import OrtRuntime

    fp32 = Path(fp32_path)
    runtimes: dict[str, Any] = {"fp32": OrtRuntime(fp32, threads=threads)}
    ref = run_samples(runtimes["fp32"], eval_feeds)
    results: dict[str, dict] = {"fp32": {"name": "fp32", "path": fp32.name, "size_bytes": fp32.stat().st_size,
                                         "runtime": "onnxruntime", "config": {}, "notes": {"tool": "FP32 ONNX"},
                                         **fidelity(ref, ref, classification)}}
    for p in peers:
        rec = p.to_dict()
        results[p.name] = rec
        if not p.ok:
            continue
        try:
            rt = make_runtime(p, threads=threads)
            rec.update(fidelity(run_samples(rt, eval_feeds), ref, classification, per_sample=per_sample))
        except Exception as exc:  # noqa: BLE001 - e.g. an op the runtime cannot run
            rec["notes"]["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("peer %s failed to run: %s", p.name, rec["notes"]["error"])
            continue
        if isinstance(rt, OvRuntime):
            rec["config"]["compiled_precision"] = rt.precision
            rec["config"]["threads"] = rt.threads
        runtimes[p.name] = rt
    fsize = results["fp32"]["size_bytes"]
    for rec in results.values():
        if rec.get("size_bytes"):
            rec["size_ratio_vs_fp32"] = round(rec["size_bytes"] / fsize, 4)
    if latency_feeds is not None:
        lat = interleaved_latency(runtimes, latency_feeds, rounds=rounds, per_round=per_round,
                                  idle_wait_s=idle_wait_s, load_log=load_log)
        for k, v in lat.items():
            results[k]["latency_batch1"] = v
    return results
