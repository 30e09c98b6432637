"""Fleet simulator (issue 9, part 4): N virtual devices — the real agent and sync client, over real HTTP — against a
sync service, with faults injected, through one staged rollout.

The simulator starts the service itself (``uvicorn`` in a child process over a data folder) so that it can restart
it, and puts ``edgekit.sync.faults.FaultProxy`` between the devices and the service:

- **dropped connections**: a share of connections is cut (RST) at a random point of the response;
- **slow links**: a share of connections is throttled;
- **server restart mid-rollout**: the service process is killed (SIGKILL) and started again on the same data folder
  once the rollout's stage 1 has begun; devices see refused connections meanwhile;
- **power loss mid-download**: a share of devices loses power during the new release's download (the download stops
  at a random byte); the device "reboots": its agent and client objects are dropped and opened again from its state
  folder, and the next sync resumes the partial file.

Each device runs ``SyncClient.sync_once`` in rounds (a pool of threads drives them). At the end every device syncs
until it serves the fleet's desired release (or the timeout passes), and the report counts: rollout time, bytes
moved through the proxy (both directions), faults injected, events the devices queued against events the service
stored (**lost messages**, must be 0) and devices not on the desired release (**stuck**, must be 0).

``benchmarks/cloud_loop.py`` drives the same ``Simulator`` through the cloud-edge loop: its devices serve requests
(their agents' upload selection sends samples up at the next sync), a cloud job runs, and its delta goes out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
ADMIN = "eka_simulator-admin-token-0123456789"


@dataclass
class SimConfig:
    devices: int = 100
    threads: int = 32
    drop_rate: float = 0.05
    slow_share: float = 0.05
    slow_bytes_per_s: int = 200_000
    power_loss: float = 0.02  # share of devices that lose power during the new release's download
    restart: bool = True  # kill and restart the service once the rollout has begun
    stages: tuple[int, ...] = (10, 50, 100)
    stage_seconds: float = 3.0
    timeout_s: float = 900.0
    seed: int = 0
    fleet: str = "sim"


@dataclass
class SimReport:
    devices: int
    rollout_s: float | None = None
    rollout_status: str = ""
    rounds: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    release_bytes: int = 0  # release payload received by the devices' clients
    faults: dict = field(default_factory=dict)
    events_queued: int = 0
    events_stored: int = 0
    lost_messages: int = 0
    stuck: int = 0
    sync_errors: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``edgekit.sync.app`` under uvicorn in a child process over ``data``; ``restart()`` kills it hard."""

    def __init__(self, data: Path, **cfg) -> None:
        self.data, self.port, self.proc = Path(data), _free_port(), None
        self.config = {"db": f"sqlite:///{(self.data / 'sync.db').resolve()}",
                       "store": str((self.data / "blobs").resolve()), "keys": str((self.data / "keys").resolve()),
                       "admin_token": ADMIN, "tick_s": 1.0, "heartbeat_s": 5, **cfg}
        self.restarts = 0

    @property
    def release_key(self) -> Path:
        """The key the service signs its jobs' releases with (made before the first start, so that base releases
        can be signed with it too)."""
        return self.data / "keys" / "release.key"

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if not self.release_key.exists():
            from edgekit.keys import generate_keypair

            generate_keypair(self.release_key.parent, name="release")
        env = {**os.environ, "EDGEKIT_SYNC_CONFIG": json.dumps(self.config)}
        self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, this package
            [sys.executable, "-m", "uvicorn", "edgekit.sync.app:app_from_env", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"], env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if self.proc.poll() is not None:
                raise RuntimeError("the sync service did not start")
            time.sleep(0.1)
        raise RuntimeError("the sync service did not start within 60 s")

    def restart(self) -> None:
        self.stop(hard=True)
        self.restarts += 1
        self.start()

    def stop(self, hard: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


class PowerLoss(Exception):
    pass


class Device:
    """One virtual device: a state folder, an Agent and a SyncClient, re-opened after a power loss."""

    def __init__(self, root: Path, index: int, agent_config) -> None:  # noqa: ANN001 - AgentConfig
        self.root, self.index, self.agent_config = root, index, agent_config
        self.agent = self.client = None
        self.queued: list[tuple[str, str]] = []  # (kind, version) of every event its client queued
        self.power_loss_at: int | None = None  # bytes into the next release download
        self.lock = threading.Lock()

    def open(self) -> None:
        from edgekit.agent import Agent
        from edgekit.sync.client import SyncClient

        self.agent = Agent.open(self.root, self.agent_config)
        self.client = SyncClient(self.root, timeout=20, attempts=4, backoff=0.2)
        original = self.client._queue_event

        def counted(event: dict) -> None:
            original(event)
            self.queued.append((event["kind"], str(event.get("version", ""))))

        self.client._queue_event = counted

    def reboot(self) -> None:
        with contextlib.suppress(Exception):
            self.agent.close()
        self.open()

    def sync(self) -> dict | None:
        with self.lock:
            if self.power_loss_at is not None:
                start, limit = self.client.downloaded, self.power_loss_at

                def count(n: int) -> None:
                    self.client.downloaded += n
                    if self.client.downloaded - start >= limit:
                        raise PowerLoss

                self.client._count = count
            try:
                out = self.client.sync_once(self.agent)
            except PowerLoss:
                self.power_loss_at = None
                self.reboot()
                return None
            return out

    def serving(self) -> str | None:
        m = self.agent.status()["model"]
        return None if m is None else str(m["version"])


def _admin(url: str, method: str, path: str, body=None, headers: dict | None = None,  # noqa: ANN001, ANN202
           token: str = ADMIN):
    from edgekit.sync.client import http_call, http_error

    hdrs = {"Authorization": f"Bearer {token}", **(headers or {})}
    if isinstance(body, dict):
        body, hdrs["Content-Type"] = json.dumps(body).encode(), "application/json"
    for attempt in range(20):
        try:
            status, _, data = http_call(method, url + path, body, hdrs, 60)
        except OSError:
            time.sleep(0.5 * (attempt + 1))
            continue
        if status == 200:
            return json.loads(data)
        if status < 500:
            raise http_error(status, data, f"{method} {path}")
        time.sleep(0.5)
    raise RuntimeError(f"{method} {path} failed 20 times")


class Simulator:
    """Virtual devices against the service this simulator starts, or, with ``server`` (and ``admin_token``), against
    one that runs elsewhere (then the restart fault is not available)."""

    def __init__(self, work: Path, cfg: SimConfig, agent_config=None, *, server: str | None = None,  # noqa: ANN001
                 admin_token: str | None = None) -> None:
        from urllib.parse import urlsplit

        from edgekit.agent import AgentConfig
        from edgekit.errors import ConfigError
        from edgekit.sync.faults import FaultProxy

        self.work, self.cfg = Path(work), cfg
        if server is None:
            self.service: ServiceProcess | None = ServiceProcess(self.work / "service")
            self.service.start()
            self.url, self.token = f"http://127.0.0.1:{self.service.port}", ADMIN
        else:
            parts = urlsplit(server)
            if parts.scheme != "http" or not parts.hostname or not admin_token:
                raise ConfigError(f"cannot simulate against {server!r}",
                                  hint="pass an http://HOST:PORT server and its --admin-token")
            self.service, self.url, self.token = None, server.rstrip("/"), admin_token
            cfg.restart = False  # not ours to restart
        host, port = (("127.0.0.1", self.service.port) if self.service else
                      (urlsplit(self.url).hostname, urlsplit(self.url).port or 80))
        self.proxy = FaultProxy(host, port, drop_rate=cfg.drop_rate, slow_share=cfg.slow_share,
                                slow_bytes_per_s=cfg.slow_bytes_per_s, seed=cfg.seed)
        self.proxy.start()  # admin calls go direct; devices through the proxy
        self.agent_config = agent_config or AgentConfig(adapt=(), adapt_when="never", upload=False)
        self.devices: list[Device] = []
        self.report = SimReport(devices=cfg.devices)
        self.pool = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="sim-device")
        self.rng = random.Random(cfg.seed)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.agent.close()
        self.proxy.stop()
        if self.service is not None:
            self.service.stop()

    def admin(self, method: str, path: str, body=None, headers: dict | None = None):  # noqa: ANN001, ANN201
        return _admin(self.url, method, path, body, headers, token=self.token)

    # -- setup ------------------------------------------------------------------------------------------------------
    def enroll(self) -> None:
        from edgekit.sync.client import SyncClient

        def one(i: int) -> Device:
            root = self.work / "devices" / f"d{i:05d}"
            for attempt in range(10):
                tok = self.admin("POST", f"/v1/fleets/{self.cfg.fleet}/tokens", {"ttl_s": 3600})["token"]
                try:
                    SyncClient.enroll(self.proxy.url, tok, root, name=f"sim-{i}", timeout=20)
                    break
                except Exception:  # noqa: BLE001 - a dropped connection: enroll again with a new token
                    time.sleep(0.1 * (attempt + 1))
            d = Device(root, i, self.agent_config)
            d.open()
            return d

        self.devices = list(self.pool.map(one, range(self.cfg.devices)))

    def publish(self, bundle: Path) -> dict:
        from edgekit.bundle import read_manifest

        m = read_manifest(bundle)
        q = f"name={m['name']}&version={m['version']}"
        rel = self.admin("POST", f"/v1/fleets/{self.cfg.fleet}/releases?{q}", bundle.read_bytes(),
                     {"Content-Type": "application/octet-stream"})
        return rel

    def rollout(self, release_id: int, stages: tuple[int, ...], stage_seconds: float) -> dict:
        return self.admin("POST", f"/v1/fleets/{self.cfg.fleet}/rollouts",
                      {"release_id": release_id, "stages": list(stages), "stage_minutes": stage_seconds / 60,
                       "gates": {"min_reports": 1, "max_latency_ratio": 100.0}})

    # -- running ----------------------------------------------------------------------------------------------------
    def round(self, between: Callable[[Device], None] | None = None) -> None:
        def one(d: Device) -> None:
            if between is not None:
                between(d)
            try:
                d.sync()
            except Exception as exc:  # noqa: BLE001 - a device's sync failing is part of the weather
                self.report.sync_errors += 1
                log.debug("device %d: %s", d.index, exc)

        list(self.pool.map(one, self.devices))
        self.report.rounds += 1

    def status(self) -> dict:
        return self.admin("GET", f"/v1/fleets/{self.cfg.fleet}")

    def run_rollout(self, release: dict, between: Callable[[Device], None] | None = None) -> None:
        """Stage ``release`` out to the fleet with every fault on; returns once it completed (or timed out)."""
        for d in self.rng.sample(self.devices, int(round(self.cfg.power_loss * len(self.devices)))):
            d.power_loss_at = self.rng.randint(1, max(1, release["size"] - 1))
        self.report.faults["power_loss"] = sum(d.power_loss_at is not None for d in self.devices)
        t0 = time.monotonic()
        ro = self.rollout(release["id"], self.cfg.stages, self.cfg.stage_seconds)
        restart = None
        while time.monotonic() - t0 < self.cfg.timeout_s:
            if restart is None and self.cfg.restart and self.report.rounds and ro and ro["status"] == "active":
                # mid-rollout, while the devices sync: killed, down for a moment, started again on the same data
                restart = threading.Timer(0.05, self.service.restart)
                restart.start()
            self.round(between)
            if restart is not None:
                restart.join()
            ro = self.status()["rollout"]
            if ro and ro["status"] != "active":
                break
        self.report.rollout_s = round(time.monotonic() - t0, 1)
        self.report.rollout_status = ro["status"] if ro else "none"

    def settle(self, version: str, max_rounds: int = 20) -> None:
        """Sync every device until it serves ``version`` and has delivered its events."""
        for _ in range(max_rounds):
            self.round()
            if all(d.serving() == version for d in self.devices):
                break
        self.round()  # one more heartbeat each: queued events delivered

    def events(self) -> list[dict]:
        """Every event the service stored for the fleet (``GET /v1/fleets/{fleet}/events``, page by page)."""
        out, after = [], 0
        while True:
            page = self.admin("GET", f"/v1/fleets/{self.cfg.fleet}/events?after={after}&limit=10000")
            out += page["events"]
            if page["next"] is None:
                return out
            after = page["next"]

    def finish(self, version: str) -> SimReport:
        r = self.report
        r.stuck = sum(d.serving() != version for d in self.devices)
        r.events_queued = sum(len(d.queued) for d in self.devices)
        stored = {(e["device_id"], e["kind"], e["version"]) for e in self.events()}
        r.events_stored = len(stored)
        # at-least-once delivery: an event whose answer was lost is sent again (stored twice); lost is one never
        # stored and no longer pending on its device
        r.lost_messages = sum(1 for d in self.devices for kind, version in d.queued
                              if (d.client.info["device_id"], kind, version) not in stored
                              and {"kind": kind, "version": version} not in
                              [{"kind": e["kind"], "version": e["version"]} for e in d.client._events()])
        st = self.proxy.stats()
        r.bytes_down, r.bytes_up = st["bytes_down"], st["bytes_up"]
        r.faults.update(dropped=st["dropped"], slow=st["slow"], refused=st["refused"],
                        restarts=self.service.restarts if self.service else 0)
        r.release_bytes = sum(d.client.downloaded for d in self.devices)
        return r


MARKER = ".edgekit-simulator"


def check_work(work: Path) -> bool:
    """Whether ``work`` holds a previous simulation (to be emptied); a ConfigError for any other non-empty folder."""
    from edgekit.errors import ConfigError

    work = Path(work)
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise ConfigError(f"{work} is not empty and is not a simulator's work folder",
                              hint="pass --work with a new folder (the simulator empties its own on the next run)")
        return True
    return False


def prepare_work(work: Path) -> Path:
    """An empty ``work`` folder: a previous simulation's is emptied; any other non-empty folder is refused."""
    work = Path(work)
    if check_work(work):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("edgekit sync simulate's work folder: emptied on the next run\n")
    return work


def simulate(work: Path, base: Path, new: Path, cfg: SimConfig, *, server: str | None = None,
             admin_token: str | None = None) -> SimReport:
    """Enroll ``cfg.devices`` devices, roll ``base`` out fault-free, then ``new`` with faults; the report. With
    ``server``, against that service (its fleet ``cfg.fleet`` must be new: the versions must not exist there)."""
    from edgekit.bundle import read_manifest
    from edgekit.sync.protocol import check_fleet, check_rollout

    # bad input is refused before the work folder is touched or a service started
    check_work(work)
    check_fleet(cfg.fleet)
    check_rollout(list(cfg.stages), cfg.stage_seconds / 60, time_option="--stage-seconds",
                  time_shown=f"{cfg.stage_seconds:g} seconds")
    base_version, version = (str(read_manifest(b)["version"]) for b in (base, new))  # verified: a broken bundle fails
    work = prepare_work(work)
    sim = Simulator(work, cfg, server=server, admin_token=admin_token)
    try:
        sim.enroll()
        rel = sim.publish(base)
        drop, sim.proxy.drop_rate = sim.proxy.drop_rate, 0.0
        sim.rollout(rel["id"], (100,), 0)
        sim.settle(base_version)
        sim.proxy.drop_rate = drop
        rel2 = sim.publish(new)
        sim.run_rollout(rel2)
        sim.settle(version)
        return sim.finish(version)
    finally:
        sim.close()
