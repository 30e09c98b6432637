"""Installing bundles on the device: fetch, verify, unpack into the inactive slot, switch atomically, roll back.

Layout of the state folder::

    state.db            the slot pointer and everything else durable (``state.State``)
    slots/a, slots/b    two verified, unpacked bundles; the pointer says which one serves
    slots/.staging-*    an install in progress (removed at the next start if it was interrupted)
    downloads/          partial downloads, resumed with HTTP Range

The pointer in the database is the only commit point. An install writes nothing the pointer names until the new
bundle is fully unpacked, verified and fsynced, and it first drops the rollback target if that is the slot it is
about to overwrite. So a crash or power loss at any step leaves the pointer naming a complete, verified slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from edgekit.agent.state import Slots, State
from edgekit.bundle import OpenedBundle, open_bundle
from edgekit.errors import BundleError, UpdateError

log = logging.getLogger(__name__)

SLOT_NAMES = ("a", "b")
MAX_DOWNLOAD_BYTES = 4 << 30


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for current, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(current, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(current))


def other(slot: str | None) -> str:
    return "b" if slot == "a" else "a"


class Slotted:
    """The two slots of a state folder and the pointer to them."""

    def __init__(self, state: State, trusted_keys=None) -> None:
        self.state = state
        self.trusted_keys = trusted_keys
        self.dir = state.root / "slots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.downloads = state.root / "downloads"

    def cleanup(self) -> None:
        """Remove what an interrupted install left behind."""
        for leftover in self.dir.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def open_slot(self, slot: str) -> OpenedBundle:
        """Verify a slot's bundle again (signature, trust, every file hash) before it serves."""
        return open_bundle(self.dir / slot, trusted_keys=self.trusted_keys)

    # -- install ----------------------------------------------------------------------------------------------
    def _base(self) -> Path | None:
        """The serving slot's folder: what a delta applies to."""
        active = self.state.slots().active
        if active is None or not (self.dir / active / "manifest.json").is_file():
            return None
        return self.dir / active

    def stage(self, source: str | Path) -> tuple[Path, OpenedBundle]:
        """Fetch (a URL) or read (a path) a bundle, verify it and unpack it into a new staging folder. A delta
        (``edgekit.delta``) is rebuilt from the serving bundle first and must then verify as the full bundle."""
        from edgekit.delta import expand, is_delta

        fetched = str(source).startswith(("http://", "https://"))
        local = self.fetch(str(source)) if fetched else Path(source)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.dir))
        try:
            target = staging / "bundle"
            if local.is_dir():
                shutil.copytree(local, target, symlinks=True)
                opened = open_bundle(target, trusted_keys=self.trusted_keys)
            elif is_delta(local):
                expand(local, self._base(), target)
                opened = open_bundle(target, trusted_keys=self.trusted_keys)
            else:
                opened = open_bundle(local, trusted_keys=self.trusted_keys, workdir=target)
            _fsync_tree(staging)
            if fetched:
                local.unlink(missing_ok=True)
            return target, opened
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def place(self, staged: Path) -> str:
        """Move a staged bundle into the inactive slot; returns the slot. The pointer is not changed, except that
        a rollback target living in that slot is dropped first."""
        slots = self.state.slots()
        slot = other(slots.active)
        if slots.previous == slot:
            self.state.set_slots(replace(slots, previous=None), ("slot", f"dropped rollback target {slot}"))
        final = self.dir / slot
        if final.exists():
            trash = self.dir / f".trash-{slot}-{os.getpid()}"
            os.replace(final, trash)
            _fsync_dir(self.dir)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staged, final)
        _fsync_dir(self.dir)
        shutil.rmtree(staged.parent, ignore_errors=True)
        return slot

    # -- fetch ------------------------------------------------------------------------------------------------
    def fetch(self, url: str, *, timeout: float = 30.0) -> Path:
        """Download ``url`` into downloads/, resuming a partial download with an HTTP Range request."""
        self.downloads.mkdir(parents=True, exist_ok=True)
        name = Path(urllib.request.urlparse(url).path).name or "bundle.ekb"
        part = self.downloads / f"{name}.part"
        done = self.downloads / name
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                mode = "ab" if have and resp.status == 206 else "wb"
                if mode == "wb":
                    have = 0
                with open(part, mode) as f:
                    while block := resp.read(1 << 20):
                        have += len(block)
                        if have > MAX_DOWNLOAD_BYTES:
                            raise UpdateError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes; refusing it")
                        f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # the partial file is already complete
                pass
            else:
                raise UpdateError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise UpdateError(f"cannot download {url}: {exc}", hint="run the install again to resume") from None
        os.replace(part, done)
        return done

    # -- pointer changes ----------------------------------------------------------------------------------------
    def switch(self, slot: str, version, *, probation: bool) -> Slots:
        old = self.state.slots()
        new = Slots(active=slot, previous=old.active,
                    probation={"version": version, "boots": 0, "requests": 0} if probation else None)
        self.state.set_slots(new, ("switch", f"slot {slot} (version {version}) serves; previous {old.active}"))
        return new

    def commit(self, detail: str) -> None:
        slots = self.state.slots()
        self.state.set_slots(replace(slots, probation=None), ("commit", detail))

    def rollback(self, reason: str) -> Slots:
        slots = self.state.slots()
        if slots.previous is None:
            raise UpdateError(f"cannot roll back ({reason}): there is no previous model on this device")
        new = Slots(active=slots.previous, previous=None, probation=None)
        self.state.set_slots(new, ("rollback", f"back to slot {slots.previous}: {reason}"))
        return new

    def recover(self, max_boots: int = 2, *, count_boot: bool = True) -> tuple[Slots, OpenedBundle | None]:
        """At start: count a boot during probation (roll back after ``max_boots``: the new model keeps taking the
        agent down), check the active slot and fall back to the previous one if it is unreadable. Returns the
        pointer and the opened active bundle."""
        self.cleanup()
        slots = self.state.slots()
        if slots.probation is not None and count_boot:
            boots = int(slots.probation.get("boots", 0)) + 1
            if boots >= max_boots and slots.previous is not None:
                slots = self.rollback(f"the agent restarted {boots} times during probation")
            else:
                slots = replace(slots, probation={**slots.probation, "boots": boots})
                self.state.set_slots(slots)
        if slots.active is None:
            return slots, None
        try:
            return slots, self.open_slot(slots.active)
        except BundleError as exc:
            log.error("the active slot %s is unusable: %s", slots.active, exc)
            if slots.previous is None:
                return slots, None
            with contextlib.suppress(BundleError):
                prev = self.open_slot(slots.previous)
                return self.rollback(f"active slot unusable: {exc.message}"), prev
            return slots, None
