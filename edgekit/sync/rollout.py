"""Staged rollouts: which release each device should run, and when a rollout advances, completes or aborts.

A rollout moves a fleet from its current release (the last completed rollout's) to a new one through stages of
percentages (1 → 10 → 50 → 100 %). A device takes part in a stage when its cohort — a hash of its id and the
rollout's, 0–99, stable for the rollout and independent between rollouts — is below the stage's percentage.

A stage advances once it has lasted ``stage_minutes`` and enough of its devices heartbeat on the new release
(``min_reports``), while every gate holds: install failures, and on the devices that served requests on it the error
rate (requests and errors counted per device and version by the service), the p90 latency against the devices still
on the previous release, and the share of devices whose drift alarm is on. A broken gate aborts the rollout, and
every device's desired release falls back to the previous one (the agents install it: rollback). A stage without
progress for ``stage_timeout_minutes`` aborts too, so nothing stays "in progress" forever.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import statistics

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgekit.sync.db import Device, DeviceEvent, Fleet, Release, Rollout, utcnow
from edgekit.sync.protocol import Gates


def cohort(device_id: str, rollout_id: int) -> int:
    return int(hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()[:8], 16) % 100


def latest_rollout(s: Session, fleet: str) -> Rollout | None:
    return s.scalars(select(Rollout).where(Rollout.fleet == fleet).order_by(Rollout.id.desc()).limit(1)).first()


def desired_release_id(fleet: Fleet, rollout: Rollout | None, device_id: str) -> int | None:
    if rollout is not None and rollout.status == "active":
        if cohort(device_id, rollout.id) < rollout.stages[rollout.stage]:
            return rollout.release_id
        return rollout.previous_id
    return fleet.current_release  # completed (it became current) or aborted (back to the previous one)


def start(
    s: Session,
    fleet: Fleet,
    release: Release,
    stages: list[int],
    gates: Gates,
    stage_minutes: float,
    stage_timeout_minutes: float,
) -> Rollout:
    """A new rollout of ``release``; an active one is superseded (aborted)."""
    now = utcnow()
    current = latest_rollout(s, fleet.name)
    if current is not None and current.status == "active":
        abort(s, current, f"superseded by a rollout of release {release.id}")
    r = Rollout(
        fleet=fleet.name,
        release_id=release.id,
        previous_id=fleet.current_release,
        stages=list(stages),
        stage=0,
        stage_started_at=now,
        status="active",
        reason="",
        gates={**gates.model_dump(), "stage_minutes": stage_minutes, "stage_timeout_minutes": stage_timeout_minutes},
        created_at=now,
        updated_at=now,
    )
    s.add(r)
    s.flush()
    return r


def abort(s: Session, rollout: Rollout, reason: str) -> None:
    rollout.status = "aborted"
    rollout.reason = reason[:500]
    rollout.updated_at = utcnow()


def stage_health(s: Session, rollout: Rollout) -> dict:
    """The gates' inputs for the rollout's current stage."""
    release = s.get(Release, rollout.release_id)
    previous = s.get(Release, rollout.previous_id) if rollout.previous_id else None
    devices = s.scalars(select(Device).where(Device.fleet == rollout.fleet)).all()
    pct = rollout.stages[rollout.stage]
    targeted = [d for d in devices if cohort(d.id, rollout.id) < pct]
    on_new = [d for d in targeted if d.version == release.version]
    failed = (
        s.scalar(
            select(func.count(func.distinct(DeviceEvent.device_id))).where(
                DeviceEvent.kind == "install_failed",
                DeviceEvent.version == release.version,
                DeviceEvent.at >= rollout.created_at,
                DeviceEvent.device_id.in_([d.id for d in targeted]),
            )
        )
        or 0
    )
    # a device reports once it heartbeats on the new release (installed and alive, even without traffic yet); the
    # error, latency and drift gates read the ones that served requests on it
    reporting = [d for d in on_new if d.tel_version == release.version]
    serving = [d for d in reporting if d.tel_requests > 0]
    requests = sum(d.tel_requests for d in serving)
    errors = sum(d.tel_errors for d in serving)
    p90_new = [d.tel_p90_ms for d in serving if d.tel_p90_ms]
    p90_old = [d.tel_p90_ms for d in devices if previous is not None and d.version == previous.version
               and d.tel_version == previous.version and d.tel_p90_ms]
    drift_share = sum(d.tel_drift for d in serving) / len(serving) if serving else 0.0
    return {
        "percent": pct,
        "targeted": len(targeted),
        "on_new": len(on_new),
        "reporting": len(reporting),
        "serving": len(serving),
        "install_failures": int(failed),
        "install_failure_rate": failed / max(1, len(on_new) + failed),
        "error_rate": errors / requests if requests else 0.0,
        "latency_ratio": (statistics.median(p90_new) / statistics.median(p90_old)) if p90_new and p90_old else None,
        "drift_share": drift_share,
    }


def evaluate(s: Session, rollout: Rollout, now: dt.datetime | None = None) -> str:
    """Advance, complete or abort an active rollout from its stage's health; returns what happened."""
    if rollout.status != "active":
        return rollout.status
    now = now or utcnow()
    g = rollout.gates
    h = stage_health(s, rollout)
    broken = []
    if h["install_failures"] and h["install_failure_rate"] > g["max_install_failure_rate"]:
        broken.append(f"install failures {h['install_failures']} ({h['install_failure_rate']:.0%})")
    if h["error_rate"] > g["max_error_rate"]:
        broken.append(f"error rate {h['error_rate']:.1%} > {g['max_error_rate']:.1%}")
    if h["latency_ratio"] is not None and h["latency_ratio"] > g["max_latency_ratio"]:
        broken.append(f"p90 latency {h['latency_ratio']:.2f}x the previous release's")
    if h["serving"] and h["drift_share"] > g["max_drift_share"]:
        broken.append(f"drift alarm on {h['drift_share']:.0%} of devices")
    if broken:
        abort(s, rollout, f"stage {h['percent']} %: " + "; ".join(broken))
        return "aborted"
    elapsed = now - rollout.stage_started_at
    needed = min(g["min_reports"], h["targeted"])
    if elapsed >= dt.timedelta(minutes=g["stage_minutes"]) and h["reporting"] >= needed:
        if rollout.stage + 1 >= len(rollout.stages):
            rollout.status = "completed"
            rollout.reason = f"all stages passed ({h['reporting']} devices reporting healthy)"
            fleet = s.get(Fleet, rollout.fleet)
            fleet.current_release = rollout.release_id
        else:
            rollout.stage += 1
            rollout.stage_started_at = now
        rollout.updated_at = now
        return "completed" if rollout.status == "completed" else "advanced"
    if elapsed >= dt.timedelta(minutes=g["stage_timeout_minutes"]):
        abort(
            s,
            rollout,
            f"timeout: stage {h['percent']} % had {h['reporting']} of {needed} healthy reports "
            f"after {elapsed.total_seconds() / 60:.0f} minutes",
        )
        return "aborted"
    return "waiting"
