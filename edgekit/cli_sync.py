"""``edgekit sync ...``: run the sync service and administer fleets (tokens, publishing, rollouts, status)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

DEFAULT_SERVER = "http://127.0.0.1:8400"
DEFAULT_DATA = Path("edgekit-sync")
TOKEN_FILE = "admin.token"

_SERVER = click.option("--server", default=lambda: os.environ.get("EDGEKIT_SYNC_SERVER", DEFAULT_SERVER),
                       show_default=f"$EDGEKIT_SYNC_SERVER or {DEFAULT_SERVER}", help="The sync service's URL.")
_TOKEN = click.option("--admin-token", envvar="EDGEKIT_SYNC_ADMIN_TOKEN",
                      help=f"Admin token (default: $EDGEKIT_SYNC_ADMIN_TOKEN, else {DEFAULT_DATA}/{TOKEN_FILE}).")
_DATA = click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA,
                     show_default=True, help="The service's data folder (SQLite file, blobs, keys, admin token).")
_FLEET = click.option("--fleet", required=True, help="Fleet name (letters, digits, '.', '_', '-').")


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

        raise SyncClientError(f"cannot reach {server}: {exc}", hint="is `edgekit sync serve` running there?") from None
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
def sync_serve(db: str | None, store: str | None, keys: Path | None, data: Path, host: str, port: int,
               workers: int) -> None:
    """Serve the sync API. Embedded by default: SQLite and blobs in the data folder, nothing to set up. Prints the
    admin token the first time (also written to DATA/admin.token)."""
    import secrets

    import uvicorn

    from edgekit.fsutil import atomic_write_bytes

    data.mkdir(parents=True, exist_ok=True)
    token_path = data / TOKEN_FILE
    token = os.environ.get("EDGEKIT_SYNC_ADMIN_TOKEN")
    if not token and token_path.exists():
        token = token_path.read_text().strip()
    if not token:
        token = "eka_" + secrets.token_urlsafe(32)
        atomic_write_bytes(token_path, (token + "\n").encode(), mode=0o600)
        click.echo(f"admin token (also in {token_path}): {token}", err=True)
    os.environ["EDGEKIT_SYNC_CONFIG"] = json.dumps({
        "db": db or f"sqlite:///{(data / 'sync.db').resolve()}", "store": store or str((data / "blobs").resolve()),
        "keys": str((keys or data / "keys").resolve()), "admin_token": token})
    from edgekit.sync.app import app_from_env

    app_from_env()  # migrate and create keys once, before workers start
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
    from edgekit.errors import ConfigError

    try:
        pct = [int(x) for x in stages.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--stages must be comma-separated percentages, not {stages!r}") from None
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
