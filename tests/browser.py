"""A real headless Chromium for the web pages' tests, driven with Playwright (Python) over the system's browser.

Use it with ``from tests.browser import browser, page  # noqa: F401``: ``page`` is a fresh page (own context: own
cookies and storage) per test, in one browser per test session. Playwright downloads no browser here: it drives the
system's Chromium (Debian's ``chromium`` package; installed with apt-get where we may, as root on Debian/Ubuntu, e.g.
CI images). Without a browser or the ``playwright`` package the test is skipped with the reason — and fails in CI
(``CI`` set), where both must be there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.debian import apt_install, can_install

# the system's Chromium first; EDGEKIT_CHROMIUM names another binary
CANDIDATES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
# flags that work headless as root on a machine without a network, display or GPU
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)
LAUNCH_TIMEOUT_MS = 60_000


def chromium_path() -> Path | None:
    """The Chromium binary: ``$EDGEKIT_CHROMIUM``, else the first of :data:`CANDIDATES` on PATH or in /usr/bin."""
    if (named := os.environ.get("EDGEKIT_CHROMIUM")) and Path(named).is_file():
        return Path(named)
    for name in CANDIDATES:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if found:
            return Path(found)
    return None


def ensure_chromium_installed() -> Path:
    """Return :func:`chromium_path`, installing Debian's ``chromium`` first where we may (root, Debian/Ubuntu)."""
    if (found := chromium_path()) is not None:
        return found
    if not can_install():
        raise RuntimeError(
            "no Chromium found (chromium, chromium-browser, google-chrome on PATH or in /usr/bin; or "
            "$EDGEKIT_CHROMIUM) and it cannot be installed here (that needs root on Debian/Ubuntu); install one "
            "(apt-get install chromium, brew install --cask chromium, ...) or set EDGEKIT_CHROMIUM to its binary"
        )
    apt_install("chromium")
    if (found := chromium_path()) is None:
        raise RuntimeError("apt-get installed chromium, but its binary is still not found")
    return found


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class Browser:
    """Playwright driving one headless Chromium, with a new empty profile in a temporary folder."""

    def __init__(self, executable: Path) -> None:
        self.executable = executable
        self._pw: Any = None
        self._context: Any = None
        self.profile: Path | None = None

    def start(self) -> Browser:
        from playwright.sync_api import sync_playwright  # the driver ships in the wheel; no browser download

        self.profile = Path(tempfile.mkdtemp(prefix="edgekit-chromium-"))
        atexit.register(self.stop)
        try:
            self._pw = sync_playwright().start()
            # a persistent context over our own empty profile folder: Playwright's launch() would make its own
            self._context = self._pw.chromium.launch_persistent_context(
                str(self.profile), executable_path=str(self.executable), headless=True, args=list(FLAGS),
                timeout=LAUNCH_TIMEOUT_MS, viewport={"width": 1400, "height": 1000}, service_workers="block",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def new_page(self) -> Any:
        """A new tab; its storage (sessionStorage) is its own, the profile's cookies are cleared."""
        self._context.clear_cookies()
        return self._context.new_page()

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for close in (lambda: self._context.close(), lambda: self._pw.stop()):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing what may not have started
                pass
        self._context = self._pw = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None


_SESSION: dict[str, Any] = {}


@pytest.fixture(scope="session")
def browser(request: pytest.FixtureRequest) -> Browser:
    """The session's headless Chromium; skips the test without one (fails it in CI, where it must work)."""
    if "error" in _SESSION:
        _unavailable(_SESSION["error"])
    if "browser" not in _SESSION:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as e:
            _SESSION["error"] = f"the playwright package is not installed ({e}): pip install -e '.[dev]'"
            _unavailable(_SESSION["error"])
        try:
            b = Browser(ensure_chromium_installed()).start()
        except Exception as e:  # do not try (and maybe apt-get install) again for every test
            _SESSION["error"] = f"no headless Chromium for the tests: {e}"
            _unavailable(_SESSION["error"])

        def stop() -> None:
            _SESSION.clear()
            b.stop()

        _SESSION["browser"] = b
        request.config.add_cleanup(stop)
    return _SESSION["browser"]


@pytest.fixture
def page(browser: Browser) -> Iterator[Any]:
    """A fresh tab; ``page.errors`` collects its JavaScript errors and console errors (CSP violations included) for
    the test to check."""
    p = browser.new_page()
    p.set_default_timeout(10_000)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    p.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    p.errors = errors  # type: ignore[attr-defined]
    yield p
    p.close()
