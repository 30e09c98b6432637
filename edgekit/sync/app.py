"""HTTP in front of ``edgekit.sync.service``: FastAPI routes, authentication, streaming uploads and Range downloads.

Admin routes take ``Authorization: Bearer <admin token>``; device routes a device token (``POST /v1/auth/token``
with a signed challenge). Every error is JSON ``{"error": ..., "hint": ...}`` with a 4xx status; request bodies are
bounded. The OpenAPI spec is at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.errors import EdgekitError
from edgekit.sync.auth import bearer
from edgekit.sync.blobs import BlobNotFound, BlobTooLarge
from edgekit.sync.db import Device, Fleet, Release, utcnow
from edgekit.sync.protocol import (
    API,
    NAME,
    AdaptJobCreate,
    ChallengeRequest,
    ChallengeResponse,
    DeviceInfo,
    EnrollRequest,
    EnrollResponse,
    EnrollTokenCreate,
    EnrollTokenResponse,
    ErrorBody,
    FleetStatus,
    Heartbeat,
    HeartbeatResponse,
    JobInfo,
    ReleaseInfo,
    RolloutCreate,
    RolloutInfo,
    SampleAck,
    TokenRequest,
    TokenResponse,
)
from edgekit.sync.rollout import latest_rollout, stage_health
from edgekit.sync.service import FLEET_NAME, DbMetadataStore, Service, ServiceConfig, SyncError, fleet_name

log = logging.getLogger(__name__)

METADATA_NAME = re.compile(r"^(?:[0-9]{1,10}\.root|timestamp|[0-9]{1,10}\.snapshot|[0-9]{1,10}\.targets)\.json$")
TARGET_NAME = re.compile(r"^([0-9a-f]{64})\.[A-Za-z0-9._-]{1,200}$")
ERRORS = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}


async def _spool(request: Request, limit: int) -> tempfile.SpooledTemporaryFile:
    """The request body in a spooled temporary file (on disk past 1 MiB), refused as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise SyncError(f"the body is {int(declared):,} bytes; the limit is {limit:,}", 413)
    f = tempfile.SpooledTemporaryFile(max_size=1 << 20)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            f.close()
            raise SyncError(f"the body passed the limit of {limit:,} bytes", 413)
        f.write(chunk)
    f.seek(0)
    return f


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive from a single ``bytes=`` range; None for the whole body."""
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d{0,19})-(\d{0,19})", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise SyncError("only single byte ranges (bytes=START-END) are supported", 416)
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        start, end = max(0, size - n), size - 1
    else:
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    if size == 0 or start > end or start >= size:
        raise SyncError(f"range not satisfiable for {size} bytes", 416)
    return start, end


def create_app(cfg: ServiceConfig | None = None, service: Service | None = None) -> FastAPI:
    svc = service or Service(cfg or ServiceConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(svc.cfg.tick_s)
                try:
                    await run_in_threadpool(svc.tick)
                except Exception:  # noqa: BLE001 - the ticker must outlive one failure
                    log.exception("rollout/TUF tick failed")

        task = asyncio.create_task(ticker())
        yield
        task.cancel()

    app = FastAPI(
        title="edgekit sync",
        version="1",
        lifespan=lifespan,
        description="Enrollment, signed releases (TUF), resumable blobs and staged rollouts for edgekit agents.",
    )
    app.state.service = svc

    @app.exception_handler(SyncError)
    async def _sync_error(_r: Request, exc: SyncError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=exc.status)

    @app.exception_handler(EdgekitError)
    async def _edgekit_error(_r: Request, exc: EdgekitError) -> JSONResponse:
        status = 413 if isinstance(exc, BlobTooLarge) else 404 if isinstance(exc, BlobNotFound) else 400
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Routing (404, 405) and body-parsing errors in the same JSON shape as every other error."""
        status, detail = exc.status_code, str(exc.detail)
        if status == 400 and "parsing the body" in detail:
            status, detail = 422, "the body is not valid JSON (UTF-8)"
        return JSONResponse({"error": detail, "hint": None}, status_code=status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(map(str, e.get("loc", ()))), "msg": str(e.get("msg", ""))} for e in exc.errors()[:20]]
        return JSONResponse({"error": "invalid request", "hint": json.dumps(errors)[:2000]}, status_code=422)

    def admin(authorization: str | None = Header(None)) -> None:
        if not svc.admin_ok(bearer(authorization)):
            raise SyncError("an admin token is required", 401, hint="Authorization: Bearer <admin token>")

    async def device(authorization: str | None = Header(None)) -> str:  # a MAC check: no thread hand-off
        return svc.device_for(bearer(authorization))

    # -- public -----------------------------------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post(f"{API}/enroll", response_model=EnrollResponse, responses=ERRORS)
    def enroll(req: EnrollRequest) -> EnrollResponse:
        dev, root = svc.enroll(req.token, req.public_key, req.name)
        return EnrollResponse(
            device_id=dev.id,
            fleet=dev.fleet,
            trusted_root=root,
            metadata_path=f"/tuf/{dev.fleet}/",
            blobs_path=f"{API}/blobs/",
        )

    @app.post(f"{API}/auth/challenge", response_model=ChallengeResponse, responses=ERRORS)
    def challenge(req: ChallengeRequest) -> ChallengeResponse:
        nonce, exp = svc.challenge(req.device_id)
        return ChallengeResponse(nonce=nonce, expires_at=exp)

    @app.post(f"{API}/auth/token", response_model=TokenResponse, responses=ERRORS)
    def token(req: TokenRequest) -> TokenResponse:
        tok, exp = svc.device_token(req.device_id, req.nonce, req.signature)
        return TokenResponse(token=tok, expires_at=exp)

    # -- devices ----------------------------------------------------------------------------------------------------
    @app.post(f"{API}/heartbeat", response_model=HeartbeatResponse, responses=ERRORS)
    async def heartbeat(hb: Heartbeat, device_id: str = Depends(device)) -> Response:
        # one prepared UPDATE of ~0.1 ms: run in the event loop itself, without a thread hand-off per request (the
        # busiest route; a longer wait on the database lock would hold the loop, hence the short busy timeout)
        desired = svc.heartbeat(device_id, hb)
        body = HeartbeatResponse(desired=desired, poll_after_s=svc.cfg.heartbeat_s, etag=_etag(desired))
        return Response(body.model_dump_json(), media_type="application/json")  # serialized once, in pydantic-core

    @app.get(
        f"{API}/desired", response_model=HeartbeatResponse, responses={304: {"description": "unchanged"}, **ERRORS}
    )
    async def desired(
        device_id: str = Depends(device),
        wait: float = Query(0.0, ge=0, le=60),
        if_none_match: str | None = Header(None),
    ) -> Response:
        """Long poll: with ``If-None-Match`` and ``wait``, answers 304 after ``wait`` seconds without a change."""
        loop_until = asyncio.get_running_loop().time() + wait
        fleet = (await run_in_threadpool(svc.touch, device_id)).fleet  # last-seen: once per poll, not per check
        while True:
            d = await run_in_threadpool(_desired_of, fleet, device_id)
            tag = _etag(d)
            if tag != (if_none_match or "").strip('"') or asyncio.get_running_loop().time() >= loop_until:
                break
            await asyncio.sleep(min(1.0, svc.cfg.tick_s))
        if tag == (if_none_match or "").strip('"'):
            return Response(status_code=304, headers={"ETag": f'"{tag}"'})
        body = HeartbeatResponse(desired=d, poll_after_s=svc.cfg.heartbeat_s, etag=tag)
        return JSONResponse(body.model_dump(mode="json"), headers={"ETag": f'"{tag}"'})

    def _desired_of(fleet: str, device_id: str):  # noqa: ANN202 - Desired | None
        with svc.sessions() as s:  # read-only; mostly answered from the fleet state cached for a second
            return svc.desired_of(s, fleet, device_id)

    @app.get(
        f"{API}/blobs/{{sha256}}", responses={206: {"description": "partial"}, 416: {"model": ErrorBody}, **ERRORS}
    )
    def blob(sha256: str, device_id: str = Depends(device), range_: str | None = Header(None, alias="range")):
        dev = svc.touch(device_id)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not svc.fleet_has_blob(dev.fleet, sha256):
            raise SyncError("no such release blob for this device's fleet", 404)
        return _send(sha256, range_)

    @app.post(
        f"{API}/samples",
        response_model=SampleAck,
        responses={413: {"model": ErrorBody}, 429: {"model": ErrorBody}, **ERRORS},
    )
    async def samples(
        request: Request, device_id: str = Depends(device), meta: str = Query("{}", max_length=4000)
    ) -> SampleAck:
        try:
            meta_obj = json.loads(meta, parse_constant=_no_constants)  # NaN/Infinity: PostgreSQL's json refuses them
        except (ValueError, RecursionError):
            raise SyncError("meta must be a JSON object", 422) from None
        if not isinstance(meta_obj, dict):
            raise SyncError("meta must be a JSON object", 422)
        body = await _spool(request, svc.cfg.max_sample_bytes)
        try:
            sid, sha, size, left = await run_in_threadpool(svc.add_sample, device_id, body, meta_obj)
        finally:
            body.close()
        return SampleAck(id=sid, sha256=sha, size=size, bytes_left_today=max(0, left))

    # -- TUF repository (devices of the fleet, and admins) --------------------------------------------------------
    def tuf_reader(fleet: str, authorization: str | None = Header(None)) -> str:
        token = bearer(authorization)
        if svc.admin_ok(token):
            if not FLEET_NAME.fullmatch(fleet):  # never reaches a query (PostgreSQL refuses NUL in text)
                raise SyncError("no such fleet", 404)
            return fleet
        dev = svc.touch(svc.device_for(token))
        if dev.fleet != fleet:
            raise SyncError("this device belongs to another fleet", 403)
        return fleet

    @app.get("/tuf/{fleet}/targets/{name}", responses=ERRORS)
    def tuf_target(name: str, fleet: str = Depends(tuf_reader), range_: str | None = Header(None, alias="range")):
        m = TARGET_NAME.match(name)
        if not m:
            raise SyncError("not a target of this repository", 404)
        if not svc.fleet_has_blob(fleet, m.group(1)):
            raise SyncError("not a target of this repository", 404)
        return _send(m.group(1), range_)

    @app.get("/tuf/{fleet}/{name}", responses=ERRORS)
    def tuf_metadata(name: str, fleet: str = Depends(tuf_reader)) -> Response:
        if not METADATA_NAME.match(name):
            raise SyncError("no such metadata", 404)
        with svc.sessions() as s:
            data = DbMetadataStore(s, fleet).get(name)
        if data is None:
            raise SyncError("no such metadata", 404)
        return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})

    def _send(sha256: str, range_header: str | None) -> Response:
        size = svc.store.size(sha256)
        if size is None:
            raise SyncError("the blob is missing from the store", 404)
        rng = _range(range_header, size)
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
        if rng is None:
            headers["Content-Length"] = str(size)
            return StreamingResponse(
                svc.store.open_range(sha256), media_type="application/octet-stream", headers=headers
            )
        start, end = rng
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(
            svc.store.open_range(sha256, start, end),
            status_code=206,
            media_type="application/octet-stream",
            headers=headers,
        )

    # -- admin ------------------------------------------------------------------------------------------------------
    @app.post(
        f"{API}/fleets/{{fleet}}/tokens",
        response_model=EnrollTokenResponse,
        dependencies=[Depends(admin)],
        responses=ERRORS,
    )
    def enroll_token(fleet: str, req: EnrollTokenCreate) -> EnrollTokenResponse:
        tok, exp = svc.enroll_token(fleet_name(fleet), req.ttl_s)
        return EnrollTokenResponse(token=tok, fleet=fleet, expires_at=exp)

    @app.post(
        f"{API}/fleets/{{fleet}}/releases",
        response_model=ReleaseInfo,
        dependencies=[Depends(admin)],
        responses={409: {"model": ErrorBody}, 413: {"model": ErrorBody}, **ERRORS},
    )
    async def publish(
        fleet: str, request: Request, name: str = Query(..., pattern=NAME), version: str = Query(..., pattern=NAME)
    ) -> ReleaseInfo:
        """The body is the bundle (``.ekb``), streamed; it becomes a signed TUF target of the fleet."""
        fleet_name(fleet)
        body = await _spool(request, svc.cfg.max_bundle_bytes)
        try:
            r = await run_in_threadpool(svc.publish, fleet, body, name, version)
        finally:
            body.close()
        return _release_info(r)

    @app.put(f"{API}/fleets/{{fleet}}/{{asset}}", dependencies=[Depends(admin)],
             responses={413: {"model": ErrorBody}, **ERRORS})
    async def fleet_asset(fleet: str, asset: str, request: Request) -> dict:
        """``teacher`` (the ONNX model cloud jobs distill from) or ``replay`` (an .npz of source-domain inputs)."""
        fleet_name(fleet)
        if asset not in ("teacher", "replay"):
            raise SyncError(f"no fleet asset {asset!r}; PUT teacher or replay", 404)
        body = await _spool(request, svc.cfg.max_model_bytes)
        try:
            sha, size = await run_in_threadpool(svc.set_fleet_asset, fleet, asset, body)
        finally:
            body.close()
        return {"fleet": fleet, "asset": asset, "sha256": sha, "size": size}

    @app.post(f"{API}/fleets/{{fleet}}/jobs", response_model=JobInfo, dependencies=[Depends(admin)],
              responses={409: {"model": ErrorBody}, **ERRORS})
    def create_job(fleet: str, req: AdaptJobCreate) -> JobInfo:
        """Start a cloud adaptation job (or return the one already made for the same inputs)."""
        job, _ = svc.jobs.create(fleet_name(fleet), req)
        return JobInfo.model_validate(job, from_attributes=True)

    @app.get(f"{API}/fleets/{{fleet}}/jobs", response_model=list[JobInfo], dependencies=[Depends(admin)],
             responses=ERRORS)
    def list_jobs(fleet: str, limit: int = Query(50, ge=1, le=1000)) -> list[JobInfo]:
        from edgekit.sync.db import Job

        with svc.sessions() as s:
            if s.get(Fleet, fleet_name(fleet)) is None:  # as GET /v1/fleets/{fleet} answers
                raise SyncError(f"no fleet {fleet!r}", 404)
            rows = s.query(Job).filter(Job.fleet == fleet).order_by(Job.id.desc()).limit(limit).all()
            return [JobInfo.model_validate(j, from_attributes=True) for j in rows]

    @app.get(f"{API}/fleets/{{fleet}}/jobs/{{job_id}}", response_model=JobInfo, dependencies=[Depends(admin)],
             responses=ERRORS)
    def get_job(fleet: str, job_id: int) -> JobInfo:
        from edgekit.sync.db import Job

        with svc.sessions() as s:
            job = s.get(Job, job_id)
            if job is None or job.fleet != fleet_name(fleet):
                raise SyncError(f"fleet {fleet!r} has no job {job_id}", 404)
            return JobInfo.model_validate(job, from_attributes=True)

    @app.get(f"{API}/fleets/{{fleet}}/events", dependencies=[Depends(admin)], responses=ERRORS)
    def fleet_events(fleet: str, after: int = Query(0, ge=0, le=2**62),
                     limit: int = Query(1000, ge=1, le=10_000)) -> dict:
        """The events the fleet's devices reported (installed, install failed, rolled back), oldest first, in pages:
        pass the answer's ``next`` as ``after``."""
        from edgekit.sync.db import DeviceEvent

        fleet_name(fleet)
        with svc.sessions() as s:
            rows = (s.query(DeviceEvent).join(Device, Device.id == DeviceEvent.device_id)
                    .filter(Device.fleet == fleet, DeviceEvent.id > after).order_by(DeviceEvent.id).limit(limit).all())
            events = [{"id": e.id, "device_id": e.device_id, "kind": e.kind, "version": e.version, "detail": e.detail,
                       "at": e.at.isoformat()} for e in rows]
        return {"events": events, "next": events[-1]["id"] if len(events) == limit else None}

    @app.post(
        f"{API}/fleets/{{fleet}}/rollouts", response_model=RolloutInfo, dependencies=[Depends(admin)], responses=ERRORS
    )
    def start_rollout(fleet: str, req: RolloutCreate) -> RolloutInfo:
        r = svc.start_rollout(fleet_name(fleet), req)
        with svc.sessions() as s:
            return _rollout_info(s, s.get(type(r), r.id))

    @app.post(
        f"{API}/fleets/{{fleet}}/rollouts/abort",
        response_model=RolloutInfo,
        dependencies=[Depends(admin)],
        responses={409: {"model": ErrorBody}, **ERRORS},
    )
    def abort_rollout(fleet: str) -> RolloutInfo:
        r = svc.abort_rollout(fleet_name(fleet), "aborted by an admin")
        with svc.sessions() as s:
            return _rollout_info(s, s.get(type(r), r.id))

    @app.get(f"{API}/fleets/{{fleet}}", response_model=FleetStatus, dependencies=[Depends(admin)], responses=ERRORS)
    def fleet_status(fleet: str) -> FleetStatus:
        fleet_name(fleet)
        with svc.sessions() as s:
            f = s.get(Fleet, fleet)
            if f is None:
                raise SyncError(f"no fleet {fleet!r}", 404)
            now = utcnow()
            devices = s.query(Device).filter(Device.fleet == fleet).order_by(Device.enrolled_at).limit(10000).all()
            versions: dict[str, int] = {}
            for d in devices:
                versions[d.version or "none"] = versions.get(d.version or "none", 0) + 1
            r = latest_rollout(s, fleet)
            cur = s.get(Release, f.current_release) if f.current_release else None
            return FleetStatus(
                fleet=fleet,
                versions=versions,
                current_release=_release_info(cur) if cur else None,
                rollout=_rollout_info(s, r) if r else None,
                devices=[
                    DeviceInfo(
                        id=d.id,
                        name=d.name,
                        version=d.version,
                        last_seen=d.last_seen,
                        online=d.last_seen is not None and (now - d.last_seen).total_seconds() < svc.cfg.online_s,
                    )
                    for d in devices
                ],
            )

    from edgekit.sync.web import install as install_web  # the fleet page and the JSON it reads

    install_web(app, svc, admin)
    return app


def app_from_env() -> FastAPI:
    """The app for ``edgekit sync serve`` (uvicorn's factory, in every worker): the config comes as JSON in
    ``EDGEKIT_SYNC_CONFIG``."""
    import os
    from pathlib import Path

    raw = json.loads(os.environ.get("EDGEKIT_SYNC_CONFIG", "{}"))
    if "keys" in raw:
        raw["keys"] = Path(raw["keys"])
    return create_app(ServiceConfig(**raw))


def _etag(desired) -> str:  # noqa: ANN001 - Desired | None
    key = "none" if desired is None else f"{desired.release_id}:{desired.sha256}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _release_info(r: Release) -> ReleaseInfo:
    return ReleaseInfo.model_validate(r, from_attributes=True)


ROLLOUT_FIELDS = ("id", "release_id", "previous_id", "stages", "stage", "status", "reason", "stage_started_at")


def _rollout_info(s, r) -> RolloutInfo:  # noqa: ANN001 - Session, Rollout
    info = RolloutInfo.model_validate({**{k: getattr(r, k) for k in ROLLOUT_FIELDS},
                                       "version": s.get(Release, r.release_id).version,
                                       "percent": r.stages[r.stage]})
    if r.status == "active" and not info.reason:  # progress: the current stage's health
        info.reason = json.dumps(stage_health(s, r), default=str)
    return info
