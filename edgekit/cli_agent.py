"""``edgekit agent ...``: the device-side commands (no torch needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

log = logging.getLogger("edgekit")

_STATE = click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                      help="The agent's state folder (slots, queue, counters), e.g. /var/lib/edgekit.")


def _open(state_dir: Path, pubkeys=(), adapt: str | None = None, when: str | None = None, *, boot: bool = False):
    from edgekit.agent import Agent, AgentConfig

    config = AgentConfig.load(state_dir)
    changed = False
    if pubkeys:  # absolute: the saved config must not depend on where the next command runs
        config.trusted_keys = tuple(str(Path(p).resolve()) for p in pubkeys)
        config.public_keys()  # a missing or malformed key is refused before it is saved
        changed = True
    if adapt is not None:
        tiers = tuple(t for t in adapt.split(",") if t and t != "none")
        config = AgentConfig.from_dict({**config.to_dict(), "adapt": tiers})
        changed = True
    if when is not None:
        config = AgentConfig.from_dict({**config.to_dict(), "adapt_when": when})
        changed = True
    return Agent.open(state_dir, config if changed else None, boot=boot)


def _existing(state_dir: Path) -> Path:
    """``state_dir`` for commands that only read or change an agent's state: a typo must not create a new one."""
    if not state_dir.is_dir():
        from edgekit.errors import AgentError

        raise AgentError(f"no agent state in {state_dir}",
                         hint="check --state; `edgekit agent install BUNDLE --state DIR` makes a new one")
    return state_dir


_PUBKEY = click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                       help="Trusted public key (repeatable); bundles must be signed by one. Saved in the state.")


@click.group()
def agent() -> None:
    """Run bundles on this device: install with rollback, serve, watch drift, adapt, queue uploads."""


@agent.command("install")
@click.argument("bundle", metavar="BUNDLE")
@_STATE
@_PUBKEY
@click.option("--no-probation", is_flag=True, help="Commit at once instead of comparing with the previous model.")
@click.option("--json", "as_json", is_flag=True)
def agent_install(bundle: str, state_dir: Path, pubkeys, no_probation: bool, as_json: bool) -> None:
    """Verify BUNDLE (.ekb, folder or http(s) URL; downloads resume) and install it into the inactive slot."""
    import shutil

    from edgekit.fsutil import new_folders

    new = (new_folders(state_dir) or [None])[-1]  # a new state folder is kept only if the bundle installs
    try:
        a = _open(state_dir, pubkeys)
        try:
            res = a.install(bundle, probation=not no_probation)
        finally:
            a.close()
    except BaseException:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        raise
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
    elif res["installed"]:
        extra = " (on probation: the first requests are compared with the previous model)" if res["probation"] else ""
        click.echo(f"installed version {res['version']} into slot {res['slot']}{extra}")
    else:
        click.echo(f"not installed: {res['reason']} (version {res['version']})")


@agent.command("status")
@_STATE
@click.option("--json", "as_json", is_flag=True)
def agent_status(state_dir: Path, as_json: bool) -> None:
    """What this device serves, its slots, queue and counters."""
    a = _open(_existing(state_dir))
    try:
        st = a.status()
    finally:
        a.close()
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    m = st["model"]
    if m is None:
        click.echo("no model installed")
    else:
        click.echo(f"serving {m['name']} version {m['version']} from slot {m['slot']} ({m['runtime']}: "
                   f"{', '.join(m['providers'])})")
        click.echo(f"  signature: {m['signature']}")
    s = st["slots"]
    click.echo(f"slots: active {s['active']}, rollback target {s['previous']}"
               + (f", on probation {s['probation']}" if s["probation"] else ""))
    click.echo(f"upload queue: {st['queue']['size']} samples, {st['queue']['bytes_today']} bytes today "
               f"(budget {st['queue']['budget_per_day']})")
    click.echo(f"counters: {st['counters']}")
    for e in st["events"][:5]:
        click.echo(f"  {e['kind']}: {e['detail']}")


@agent.command("rollback")
@_STATE
def agent_rollback(state_dir: Path) -> None:
    """Go back to the previous model now."""
    a = _open(_existing(state_dir))
    try:
        res = a.rollback("requested from the command line")
    finally:
        a.close()
    click.echo(f"serving version {res['version']} from slot {res['slot']}")


@agent.command("run")
@_STATE
@_PUBKEY
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--install", "install_bundle", metavar="BUNDLE", help="Install this bundle first.")
@click.option("--adapt", metavar="TIERS", help="Adaptation tiers, comma-separated: norm, lame, tent, or none.")
@click.option("--adapt-when", type=click.Choice(["drift", "always", "never"]), help="When to adapt.")
def agent_run(state_dir: Path, pubkeys, port: int, host: str, install_bundle: str | None, adapt: str | None,
              adapt_when: str | None) -> None:
    """Serve POST /infer, GET /health, GET /metrics (Prometheus) and GET /status over HTTP until interrupted."""
    from edgekit.agent.server import make_server

    a = _open(state_dir, pubkeys, adapt, adapt_when, boot=True)
    try:  # listen first: a bundle is installed only when the agent can then serve it
        server = make_server(a, host, port)
    except OSError as exc:
        a.close()
        import errno

        from edgekit.errors import AgentError

        busy = exc.errno == errno.EADDRINUSE
        raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                         hint="choose another --port, or stop what is using it" if busy
                         else "check --host: an address of this machine, such as 127.0.0.1 or 0.0.0.0") from None
    if install_bundle:
        try:
            res = a.install(install_bundle)
        except BaseException:
            server.server_close()
            a.close()
            raise
        log.info("installed version %s", res.get("version"))
    click.echo(f"edgekit agent listening on http://{host}:{server.server_address[1]} (state {state_dir})", err=True)
    import threading

    from edgekit.sync.client import SyncClient, enrolled

    stop = threading.Event()
    syncing = None
    if enrolled(state_dir):  # enrolled with a sync server: heartbeats, installs and uploads in the background
        syncing = threading.Thread(target=SyncClient(state_dir).run, args=(a, stop), name="edgekit-sync", daemon=True)
        syncing.start()
        click.echo("syncing with the enrolled server", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
        if syncing is not None:
            syncing.join(timeout=30)
        a.close()


@agent.command("enroll")
@click.option("--server", required=True, help="The sync service's URL, e.g. http://host:8400.")
@click.option("--token", required=True, help="A single-use enrollment token (`edgekit sync token --fleet F`).")
@_STATE
@click.option("--name", default="", help="A name for this device in the fleet's status.")
def agent_enroll(server: str, token: str, state_dir: Path, name: str) -> None:
    """Register this device with a sync server: it keeps its own key and pins the fleet's TUF root."""
    from edgekit.sync.client import SyncClient

    c = SyncClient.enroll(server, token, state_dir, name=name)
    click.echo(f"enrolled as device {c.info['device_id'][:12]} in fleet {c.info['fleet']} ({server})")


@agent.command("sync")
@_STATE
@click.option("--once", is_flag=True, help="One heartbeat (install the desired release, upload samples), then exit.")
@click.option("--json", "as_json", is_flag=True)
def agent_sync(state_dir: Path, once: bool, as_json: bool) -> None:
    """Talk to the sync server this state is enrolled with: heartbeats, verified installs, sample uploads."""
    from edgekit.sync.client import SyncClient

    client = SyncClient(state_dir)
    a = _open(state_dir)
    try:
        if once:
            res = client.sync_once(a)
            if as_json:
                click.echo(json.dumps(res, indent=2, default=str))
            else:
                click.echo(f"serving {res['version']}, desired {res['desired']}, installed {res['installed']}, "
                           f"uploaded {res['uploaded']} samples")
        else:
            try:
                client.run(a)
            except KeyboardInterrupt:
                pass
    finally:
        a.close()
