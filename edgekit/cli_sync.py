"""``edgekit sync ...``: run the sync service and administer fleets (tokens, publishing, rollouts, status)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

DEFAULT_SERVER = "http://127.0.0.1:8400"
DEFAULT_DATA = Path("edgekit-sync")
TOKEN_FILE = "admin.token"


def _check_server(_ctx, _param, value: str | None) -> str | None:  # noqa: ANN001 - click's callback signature
    from edgekit.sync.client import check_server_url

    return None if value is None else check_server_url(value)


def _check_fleet(_ctx, _param, value: str | None) -> str | None:  # noqa: ANN001
    from edgekit.sync.protocol import check_fleet

    return None if value is None else check_fleet(value)


def _stages(text: str, option: str = "--stages") -> list[int]:
    from edgekit.errors import ConfigError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated percentages, not {text!r}") from None


_SERVER = click.option("--server", default=lambda: os.environ.get("EDGEKIT_SYNC_SERVER", DEFAULT_SERVER),
                       show_default=f"$EDGEKIT_SYNC_SERVER or {DEFAULT_SERVER}", help="The sync service's URL.",
                       callback=_check_server)
_TOKEN = click.option("--admin-token", envvar="EDGEKIT_SYNC_ADMIN_TOKEN",
                      help=f"Admin token (default: $EDGEKIT_SYNC_ADMIN_TOKEN, else {DEFAULT_DATA}/{TOKEN_FILE}).")
_DATA = click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA,
                     show_default=True, help="The service's data folder (SQLite file, blobs, keys, admin token).")
_FLEET = click.option("--fleet", required=True, callback=_check_fleet,
                      help="Fleet name (letters, digits, '.', '_', '-').")


def _admin_token(token: str | None, data: Path) -> str:
    from edgekit.errors import ConfigError

    if token:
        return token
    path = data / TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    raise ConfigError("no admin token", hint=f"pass --admin-token, set EDGEKIT_SYNC_ADMIN_TOKEN, or run where "
                                             f"{path} exists (edgekit sync serve writes it)")


def _admin_call(server: str, token: str, method: str, path: str, body=None, *,  # noqa: ANN001
                headers: dict | None = None) -> dict:
    from edgekit.sync.client import http_call, http_error

    hdrs = {"Authorization": f"Bearer {token}", **(headers or {})}
    data = body
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    try:
        status, _, resp = http_call(method, server.rstrip("/") + path, data, hdrs, 600)
    except OSError as exc:
        from edgekit.sync.client import SyncClientError

        raise SyncClientError(f"cannot reach {server}: {getattr(exc, 'reason', exc)}",
                              hint="is `edgekit sync serve` running there?") from None
    if status != 200:
        raise http_error(status, resp, f"{method} {path}")
    return json.loads(resp)


@click.group()
def sync() -> None:
    """The sync service fleets talk to: enrollment, signed releases (TUF), resumable downloads, staged rollouts."""


@sync.command("serve")
@click.option("--db", help="Database URL (default: sqlite:///DATA/sync.db; or postgresql://user@host/db).")
@click.option("--store", help="Blob store: a folder (default DATA/blobs) or s3://bucket/prefix.")
@click.option("--keys", type=click.Path(file_okay=False, path_type=Path),
              help="TUF signing keys folder (default DATA/keys; root.pem may be kept offline once created).")
@_DATA
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8400, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (use PostgreSQL for more than one).")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run cloud jobs' training on this Ray cluster (ray.init address; 'local' starts one here). "
                   "Default: in the service's own process.")
def sync_serve(db: str | None, store: str | None, keys: Path | None, data: Path, host: str, port: int,
               workers: int, ray_address: str | None) -> None:
    """Serve the sync API. Embedded by default: SQLite and blobs in the data folder, nothing to set up. Prints the
    admin token the first time (also written to DATA/admin.token)."""
    import secrets

    import uvicorn

    from edgekit.fsutil import atomic_write_bytes

    token_path = data / TOKEN_FILE
    token = os.environ.get("EDGEKIT_SYNC_ADMIN_TOKEN")
    if not token and token_path.exists():
        token = token_path.read_text().strip()
    new_token = not token
    if new_token:
        token = "eka_" + secrets.token_urlsafe(32)
    os.environ["EDGEKIT_SYNC_CONFIG"] = json.dumps({
        "db": db or f"sqlite:///{(data / 'sync.db').resolve()}", "store": store or str((data / "blobs").resolve()),
        "keys": str((keys or data / "keys").resolve()), "admin_token": token, "ray": ray_address})
    from edgekit.sync.app import app_from_env

    app_from_env()  # migrate and create keys once, before workers start (a bad --db fails here, nothing written)
    if new_token:
        atomic_write_bytes(token_path, (token + "\n").encode(), mode=0o600)
        click.echo(f"admin token (also in {token_path}): {token}", err=True)
    click.echo(f"edgekit sync serving on http://{host}:{port} (data {data})", err=True)
    uvicorn.run("edgekit.sync.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning")


@sync.command("token")
@_FLEET
@click.option("--ttl", type=click.IntRange(60, 30 * 86400), default=3600, show_default=True, help="Seconds.")
@_SERVER
@_TOKEN
@_DATA
def sync_token(fleet: str, ttl: int, server: str, admin_token: str | None, data: Path) -> None:
    """Print a single-use, expiring enrollment token for FLEET (the fleet is created if new)."""
    res = _admin_call(server, _admin_token(admin_token, data), "POST", f"/v1/fleets/{fleet}/tokens", {"ttl_s": ttl})
    click.echo(res["token"])


@sync.command("publish")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_FLEET
@click.option("--stages", default="1,10,50,100", show_default=True, help="Rollout percentages, ending at 100.")
@click.option("--stage-minutes", type=float, default=10.0, show_default=True, help="Minimum minutes per stage.")
@click.option("--no-rollout", is_flag=True, help="Only upload and sign the release.")
@_SERVER
@_TOKEN
@_DATA
def sync_publish(bundle: Path, fleet: str, stages: str, stage_minutes: float, no_rollout: bool, server: str,
                 admin_token: str | None, data: Path) -> None:
    """Upload BUNDLE (.ekb from `edgekit build`) as a signed release of FLEET and start a staged rollout."""
    import tempfile

    from edgekit.bundle import open_bundle
    from edgekit.sync.protocol import check_rollout

    pct = _stages(stages)
    if not no_rollout:  # the service's rules, before the release is uploaded and signed
        check_rollout(pct, stage_minutes)
    with tempfile.TemporaryDirectory() as tmp:  # a broken or tampered bundle is refused before it is uploaded
        manifest = open_bundle(bundle, workdir=Path(tmp) / "bundle").manifest
    name, version = str(manifest.get("name", "model")), str(manifest.get("version", "1"))
    token = _admin_token(admin_token, data)
    from urllib.parse import urlencode

    with open(bundle, "rb") as f:  # streamed by urllib from the file object
        query = urlencode({"name": name, "version": version})
        rel = _admin_call(server, token, "POST", f"/v1/fleets/{fleet}/releases?{query}", f,
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(bundle.stat().st_size)})
    click.echo(f"release {rel['id']}: {rel['name']} {rel['version']} ({rel['size']:,} bytes, sha256 "
               f"{rel['sha256'][:12]}), signed as TUF target {rel['target']}")
    if no_rollout:
        return
    ro = _admin_call(server, token, "POST", f"/v1/fleets/{fleet}/rollouts",
                     {"release_id": rel["id"], "stages": pct, "stage_minutes": stage_minutes})
    click.echo(f"rollout {ro['id']}: stages {ro['stages']}, now at {ro['percent']} %")


@sync.command("status")
@_FLEET
@click.option("--json", "as_json", is_flag=True)
@_SERVER
@_TOKEN
@_DATA
def sync_status(fleet: str, as_json: bool, server: str, admin_token: str | None, data: Path) -> None:
    """Devices, versions and rollout progress of FLEET."""
    st = _admin_call(server, _admin_token(admin_token, data), "GET", f"/v1/fleets/{fleet}")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    cur = st["current_release"]
    click.echo(f"fleet {fleet}: {len(st['devices'])} devices, current release "
               f"{cur['version'] if cur else 'none'}; versions {st['versions']}")
    ro = st["rollout"]
    if ro:
        click.echo(f"rollout {ro['id']} of version {ro['version']}: {ro['status']}, stage {ro['stage'] + 1}/"
                   f"{len(ro['stages'])} ({ro['percent']} %) {ro['reason']}")
    for d in st["devices"]:
        click.echo(f"  {d['id'][:12]}  {d['name'] or '-':<16} version {d['version'] or '-':<10} "
                   f"{'online' if d['online'] else 'offline'}  last seen {d['last_seen'] or 'never'}")


@sync.command("teacher")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_FLEET
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An .npz of source-domain inputs (model layout, stacked on axis 0) for the replay buffer and the "
                   "teacher's source statistics.")
@_SERVER
@_TOKEN
@_DATA
def sync_teacher(model: Path, fleet: str, replay: Path | None, server: str, admin_token: str | None,
                 data: Path) -> None:
    """Register MODEL (ONNX, e.g. the build's FP32 original or a larger model) as what FLEET's cloud adaptation jobs
    distill from."""
    token = _admin_token(admin_token, data)
    for asset, path in (("teacher", model), ("replay", replay)):
        if path is None:
            continue
        with open(path, "rb") as f:
            res = _admin_call(server, token, "PUT", f"/v1/fleets/{fleet}/{asset}", f,
                              headers={"Content-Type": "application/octet-stream",
                                       "Content-Length": str(path.stat().st_size)})
        click.echo(f"{asset} of fleet {fleet}: {path.name} ({res['size']:,} bytes, sha256 {res['sha256'][:12]})")


@sync.command("adapt")
@_FLEET
@click.option("--release", "release_id", type=int, help="The release to adapt (default: the fleet's current one).")
@click.option("--steps", type=click.IntRange(0, 100_000), default=150, show_default=True)
@click.option("--min-samples", type=click.IntRange(8), default=32, show_default=True)
@click.option("--rollout", "stages", help="Start a staged rollout of the result, e.g. 10,100 (default: only publish).")
@click.option("--stage-minutes", type=float, default=10.0, show_default=True)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the job to end.")
@click.option("--json", "as_json", is_flag=True)
@_SERVER
@_TOKEN
@_DATA
def sync_adapt(fleet: str, release_id: int | None, steps: int, min_samples: int, stages: str | None,
               stage_minutes: float, wait: bool, as_json: bool, server: str, admin_token: str | None,
               data: Path) -> None:
    """Start a cloud adaptation job: FLEET's teacher distilled into the deployed model on the samples its devices
    uploaded; published as a release and a delta only if the held-out uploads show an improvement."""
    import time

    token = _admin_token(admin_token, data)
    body: dict = {"min_samples": min_samples, "config": {"steps": steps}, "stage_minutes": stage_minutes}
    if release_id is not None:
        body["release_id"] = release_id
    if stages:
        body["rollout"] = _stages(stages, "--rollout")
    job = _admin_call(server, token, "POST", f"/v1/fleets/{fleet}/jobs", body)
    seen = (job["status"], job["step"])
    click.echo(f"job {job['id']}: {job['status']}{', step ' + job['step'] if job['step'] else ''}", err=True)
    while wait and job["status"] in ("queued", "running"):
        time.sleep(1.0)
        job = _admin_call(server, token, "GET", f"/v1/fleets/{fleet}/jobs/{job['id']}")
        if (job["status"], job["step"]) != seen:  # progress: trained → packaged → published
            seen = (job["status"], job["step"])
            click.echo(f"job {job['id']}: {job['status']}{', step ' + job['step'] if job['step'] else ''}", err=True)
    if as_json:
        click.echo(json.dumps(job, indent=2))
    else:
        click.echo(_job_line(job))
    if job["status"] == "failed":
        raise SystemExit(1)


@sync.command("jobs")
@_FLEET
@click.option("--json", "as_json", is_flag=True)
@_SERVER
@_TOKEN
@_DATA
def sync_jobs(fleet: str, as_json: bool, server: str, admin_token: str | None, data: Path) -> None:
    """FLEET's cloud jobs, newest first."""
    jobs = _admin_call(server, _admin_token(admin_token, data), "GET", f"/v1/fleets/{fleet}/jobs")
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    for job in jobs:
        click.echo(_job_line(job))


def _job_line(job: dict) -> str:
    line = f"job {job['id']} ({job['kind']}): {job['status']}, step {job['step'] or '-'}"
    m = job.get("state", {}).get("trained", {}).get("metrics")
    if m:
        line += (f"; held-out KL {m['heldout_kl_before']:.3f} -> {m['heldout_kl_after']:.3f}, agreement with the "
                 f"teacher {m['heldout_agreement_before']:.0%} -> {m['heldout_agreement_after']:.0%}")
    pk = job.get("state", {}).get("packaged", {})
    if "delta_size" in pk:
        line += f"; delta {pk['delta_size']:,} bytes ({pk['delta_ratio']:.2%} of the bundle)"
    pub = job.get("state", {}).get("published")
    if pub:
        line += f"; release {pub['release_id']} (version {pub['version']})"
    if job.get("error"):
        line += f"; {job['error']}"
    return line


@sync.command("simulate")
@click.option("--devices", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The release the fleet starts on (.ekb).")
@click.option("--new", "new", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The release rolled out with faults (.ekb).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("out/fleet-sim"),
              show_default=True, help="Folder for the service and the devices' state (emptied first).")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Share of connections cut mid-response.")
@click.option("--slow-share", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Share of connections throttled.")
@click.option("--power-loss", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Share of devices that lose power during the download.")
@click.option("--no-restart", is_flag=True, help="Do not restart the service mid-rollout.")
@click.option("--stages", default="1,10,50,100", show_default=True)
@click.option("--stage-seconds", type=float, default=5.0, show_default=True)
@click.option("--fleet", default="sim", show_default=True, callback=_check_fleet,
              help="The fleet the virtual devices enroll in.")
@click.option("--server", help="Simulate against this running service (http://HOST:PORT; needs --admin-token) "
                                "instead of one this command starts. No restart fault then.")
@click.option("--admin-token", envvar="EDGEKIT_SYNC_ADMIN_TOKEN", help="The --server's admin token.")
@click.option("--json", "as_json", is_flag=True)
def sync_simulate(devices: int, base: Path, new: Path, work: Path, drop_rate: float, slow_share: float,
                  power_loss: float, no_restart: bool, stages: str, stage_seconds: float, fleet: str,
                  server: str | None, admin_token: str | None, as_json: bool) -> None:
    """Run DEVICES virtual devices (the real agent and sync client over real HTTP, through a fault-injecting proxy)
    against a sync service (one this command starts, or --server), roll BASE out, then NEW in stages with injected
    faults, and report rollout time, bytes moved, lost messages and stuck devices (exit 1 unless the rollout
    completed with none lost or stuck)."""
    from edgekit.sync.simulate import SimConfig, simulate

    pct = tuple(_stages(stages))
    cfg = SimConfig(devices=devices, drop_rate=drop_rate, slow_share=slow_share, power_loss=power_loss,
                    restart=not no_restart, stages=pct, stage_seconds=stage_seconds, fleet=fleet)
    report = simulate(work, base, new, cfg, server=server, admin_token=admin_token).to_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{devices} devices: rollout {report['rollout_status']} in {report['rollout_s']} s; "
                   f"{report['bytes_down']:,} bytes down, {report['bytes_up']:,} up; faults {report['faults']}; "
                   f"lost messages {report['lost_messages']}, stuck devices {report['stuck']}")
    if report["rollout_status"] != "completed" or report["lost_messages"] or report["stuck"]:
        raise SystemExit(1)
