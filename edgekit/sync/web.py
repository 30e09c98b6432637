"""The fleet web page for operators, and the admin JSON it reads.

``GET /fleet`` is one self-contained HTML file (``static/fleet.html``: inline CSS and JavaScript, no external
resources); it holds no data. The page asks for an admin token and reads everything from two admin routes:

- ``GET /v1/fleets``: the fleets with their device counts;
- ``GET /v1/fleets/{fleet}/overview``: devices (totals by version, online and drift alarm, plus the most recently
  seen ones with their health), rollouts (with the active one's stage health), releases and deltas, cloud jobs.

It aborts the active rollout through the existing ``POST /v1/fleets/{fleet}/rollouts/abort``. The page is served
with a Content-Security-Policy that lets only its own inline script and style run and only this origin be fetched.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from edgekit.sync.db import Device, Fleet, Job, Release, Rollout, utcnow
from edgekit.sync.protocol import API
from edgekit.sync.rollout import stage_health
from edgekit.sync.service import Service, SyncError, fleet_name

PAGE = Path(__file__).resolve().parent / "static" / "fleet.html"
DEVICES_SHOWN = 500  # the most recently seen; the totals count every device
ROLLOUTS_SHOWN = 50
RELEASES_SHOWN = 200
JOBS_SHOWN = 100
FLEETS_SHOWN = 1000


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (the hashes of its one inline script and style)."""
    html = PAGE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def install(app: FastAPI, svc: Service, admin: Callable[..., None]) -> None:
    """Add the fleet page (``/fleet``) and its admin JSON routes to ``app``; ``admin`` is the app's admin-token
    dependency."""

    @app.get("/fleet", response_class=HTMLResponse)
    @app.get("/fleet/", response_class=HTMLResponse)
    def fleet_page() -> HTMLResponse:
        """The fleet web page for operators (public: it holds no data; it reads the admin routes below)."""
        html, csp = _page()
        return HTMLResponse(html, headers={
            "Content-Security-Policy": csp, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"})

    @app.get(f"{API}/fleets", dependencies=[Depends(admin)])
    def fleets() -> JSONResponse:
        """Every fleet (the first 1000 by name) with its number of devices."""
        with svc.sessions() as s:
            counts = (select(Device.fleet, func.count().label("n")).group_by(Device.fleet).subquery())
            rows = s.execute(
                select(Fleet.name, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.fleet == Fleet.name)
                .order_by(Fleet.name)
                .limit(FLEETS_SHOWN)
            ).all()
        return JSONResponse({"fleets": [{"name": n, "devices": int(c)} for n, c in rows]},
                            headers={"Cache-Control": "no-store"})

    @app.get(f"{API}/fleets/{{fleet}}/overview", dependencies=[Depends(admin)])
    def fleet_overview(fleet: str) -> JSONResponse:
        """Everything the fleet page shows, in one call."""
        fleet_name(fleet)
        with svc.sessions() as s:
            body = overview(s, fleet, svc.cfg.online_s)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


def overview(s: Session, fleet: str, online_s: int) -> dict:
    """The fleet page's data: a bounded number of rows whatever the fleet's size (totals come from aggregates)."""
    f = s.get(Fleet, fleet)
    if f is None:
        raise SyncError(f"no fleet {fleet!r}", 404)
    now = utcnow()
    versions = dict(s.execute(select(Release.id, Release.version).where(Release.fleet == fleet)).all())
    return {
        "fleet": fleet,
        "generated_at": _iso(now),
        "online_s": online_s,
        "current_release": {"id": f.current_release, "version": versions.get(f.current_release)}
        if f.current_release else None,
        "devices": _devices(s, fleet, now - dt.timedelta(seconds=online_s)),
        "rollouts": _rollouts(s, fleet, versions),
        "releases": _releases(s, fleet, versions),
        "jobs": _jobs(s, fleet),
    }


def _devices(s: Session, fleet: str, online_since: dt.datetime) -> dict:
    online = Device.last_seen.is_not(None) & (Device.last_seen >= online_since)
    by_version = [
        {"version": v, "devices": int(n), "online": int(o or 0), "drift": int(d or 0)}
        for v, n, o, d in s.execute(
            select(Device.version, func.count(), func.sum(case((online, 1), else_=0)),
                   func.sum(case((Device.tel_drift.is_(True), 1), else_=0)))
            .where(Device.fleet == fleet)
            .group_by(Device.version)
        ).all()
    ]
    by_version.sort(key=lambda r: (-r["devices"], r["version"] or ""))
    cols = (Device.id, Device.name, Device.version, Device.last_seen, Device.enrolled_at, Device.tel_version,
            Device.tel_requests, Device.tel_errors, Device.tel_p50_ms, Device.tel_p90_ms, Device.tel_drift)
    rows = s.execute(
        select(*cols).where(Device.fleet == fleet)
        .order_by(Device.last_seen.desc().nulls_last(), Device.id)
        .limit(DEVICES_SHOWN)
    ).all()
    shown = [
        {
            "id": r.id, "name": r.name, "version": r.version, "last_seen": _iso(r.last_seen),
            "enrolled_at": _iso(r.enrolled_at),
            "online": r.last_seen is not None and r.last_seen >= online_since,
            "drift": bool(r.tel_drift), "telemetry_version": r.tel_version,
            "requests": int(r.tel_requests or 0), "errors": int(r.tel_errors or 0),
            "error_rate": (r.tel_errors or 0) / r.tel_requests if r.tel_requests else None,
            "p50_ms": r.tel_p50_ms, "p90_ms": r.tel_p90_ms,
        }
        for r in rows
    ]
    return {
        "total": sum(v["devices"] for v in by_version),
        "online": sum(v["online"] for v in by_version),
        "drift": sum(v["drift"] for v in by_version),
        "by_version": by_version,
        "shown": shown,
        "limit": DEVICES_SHOWN,
    }


def _rollouts(s: Session, fleet: str, versions: dict[int, str]) -> list[dict]:
    out = []
    rows = s.scalars(select(Rollout).where(Rollout.fleet == fleet).order_by(Rollout.id.desc()).limit(ROLLOUTS_SHOWN))
    for i, r in enumerate(rows.all()):
        item = {
            "id": r.id, "release_id": r.release_id, "version": versions.get(r.release_id),
            "previous_id": r.previous_id, "previous_version": versions.get(r.previous_id),
            "stages": list(r.stages), "stage": r.stage, "percent": r.stages[r.stage], "status": r.status,
            "reason": r.reason, "gates": r.gates, "created_at": _iso(r.created_at), "updated_at": _iso(r.updated_at),
            "stage_started_at": _iso(r.stage_started_at), "health": None,
        }
        if i == 0 and r.status == "active":  # only the latest rollout can be active
            item["health"] = stage_health(s, r)
        out.append(item)
    return out


def _releases(s: Session, fleet: str, versions: dict[int, str]) -> list[dict]:
    rows = s.scalars(select(Release).where(Release.fleet == fleet).order_by(Release.id.desc()).limit(RELEASES_SHOWN))
    return [
        {
            "id": r.id, "name": r.name, "version": r.version, "target": r.target, "sha256": r.sha256,
            "size": r.size, "created_at": _iso(r.created_at), "origin": r.origin or "",
            "base_release_id": r.base_release_id, "base_version": versions.get(r.base_release_id),
            "delta_target": r.delta_target, "delta_sha256": r.delta_sha256, "delta_size": r.delta_size,
            "delta_share": r.delta_size / r.size if r.delta_size is not None and r.size else None,
        }
        for r in rows.all()
    ]


def _jobs(s: Session, fleet: str) -> dict:
    cols = (Job.id, Job.kind, Job.status, Job.step, Job.attempts, Job.error, Job.runner, Job.created_at,
            Job.updated_at)
    rows = s.execute(select(*cols).where(Job.fleet == fleet).order_by(Job.id.desc()).limit(JOBS_SHOWN)).all()
    by_status = dict(s.execute(select(Job.status, func.count()).where(Job.fleet == fleet).group_by(Job.status)).all())
    return {
        "by_status": {k: int(v) for k, v in by_status.items()},
        "shown": [
            {"id": r.id, "kind": r.kind, "status": r.status, "step": r.step, "attempts": r.attempts,
             "error": r.error, "runner": r.runner, "created_at": _iso(r.created_at), "updated_at": _iso(r.updated_at)}
            for r in rows
        ],
        "limit": JOBS_SHOWN,
    }
