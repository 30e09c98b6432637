"""Installing a Debian package for a test that needs a real program (PostgreSQL, Chromium), where we may."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# apt-get's words for package lists that are missing or out of date (an `apt-get update` fixes those, nothing else)
_STALE_LISTS = ("Unable to locate package", "has no installation candidate", "Failed to fetch", "404  Not Found")


def can_install() -> bool:
    """Root on Debian/Ubuntu with apt-get (CI images)."""
    return (hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/etc/debian_version").exists()
            and shutil.which("apt-get") is not None)


def apt_install(package: str) -> None:
    """``apt-get install -y --no-install-recommends PACKAGE``, updating the package lists first when there are none
    and again when apt says they are stale; a RuntimeError with apt's output when it fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=900)

    def update() -> None:
        r = apt("update")
        if r.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{r.stdout}{r.stderr}")

    if not any(Path("/var/lib/apt/lists").glob("*_Packages*")):  # a fresh image: no package lists at all
        update()
    install = ("install", "-y", "--no-install-recommends", package)
    r = apt(*install)
    if r.returncode != 0 and any(s in r.stdout + r.stderr for s in _STALE_LISTS):
        update()
        r = apt(*install)
    if r.returncode != 0:
        raise RuntimeError(f"apt-get install {package} failed:\n{r.stdout}{r.stderr}")
