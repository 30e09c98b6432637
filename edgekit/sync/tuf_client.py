"""Device side of release metadata: python-tuf's ngclient ``Updater`` behind a small, edgekit-shaped API.

Why a wrapper: ngclient does the hard part (the TUF client workflow: root chain, rollback, freeze, mix-and-match and
endless-data protection, persisting only what verified), but its errors are library exceptions with terse messages
and an ``Updater`` can only ``refresh()`` once. ``ReleaseVerifier`` makes a fresh ``Updater`` per refresh (the trust
state lives in ``cache_dir``, written by ngclient only after verification), and turns every failure into a
``TufRefused`` that says which role failed and why.

Device-only dependencies: stdlib, urllib3, tuf.ngclient and securesystemslib (no torch, no service code).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib import parse

import tuf
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface, TargetFile, Updater, UpdaterConfig

from edgekit import __version__
from edgekit.errors import EdgekitError

__all__ = ["HeaderFetcher", "ReleaseVerifier", "TufRefused"]

_META_NAME = re.compile(r"(?:\d+\.)?(root|timestamp|snapshot|targets)\.json")
_TOP_LEVEL = ("root", "timestamp", "snapshot", "targets")
_HEAD_CAP = 64 * 1024  # bytes of each response kept to describe a refusal (timestamp metadata is far smaller)


class TufRefused(EdgekitError):
    """Release metadata or a release file failed TUF verification; nothing unverified was trusted or installed."""

    exit_code = 10  # the agent/update family: the device keeps what it runs
    transient = False  # True when the metadata could not be fetched (network), not when it failed verification


class TufUnreachable(TufRefused):
    """The release metadata could not be fetched (connection cut, timeout, 5xx): nothing was refused, retry later."""

    transient = True


class HeaderFetcher(FetcherInterface):
    """urllib3 fetcher that sends ``headers`` on every request (devices authenticate each one) and streams bodies.

    Bodies are yielded in ``chunk_size`` pieces and never read whole: ngclient counts bytes and stops at its max
    lengths, and the connection is then closed rather than drained (endless-data defence). ``timeout`` applies to
    connecting and to each gap between received bytes.
    """

    def __init__(
        self,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float = 30.0,
        chunk_size: int = 64 * 1024,
        retries: int = 3,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        self.headers = {"User-Agent": f"edgekit/{__version__} python-tuf/{tuf.__version__}", **(headers or {})}
        self.timeout = timeout
        self.chunk_size = chunk_size
        # Credentials must not follow a redirect to another host: strip our extra headers too, not only urllib3's
        # default list (Authorization, Cookie, Proxy-Authorization).
        strip = urllib3.Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT | {h.lower() for h in (headers or {})}
        self._pool = pool or urllib3.PoolManager(retries=urllib3.Retry(total=retries, remove_headers_on_redirect=strip))

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._pool.request(
                "GET", url, headers=self.headers, preload_content=False, timeout=urllib3.Timeout(self.timeout)
            )
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.TimeoutError):
                raise tuf_exc.SlowRetrievalError(f"timed out fetching {url}") from e
            raise tuf_exc.DownloadError(f"cannot fetch {url}: {e.reason}") from e
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exc.SlowRetrievalError(f"timed out fetching {url}") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"cannot fetch {url}: {e}") from e
        if response.status >= 400:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        return self._chunks(response, url)

    def _chunks(self, response: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
        """A generator, so that connection errors surface in ``_fetch`` and body errors while iterating."""
        finished = False
        try:
            yield from response.stream(self.chunk_size)
            finished = True
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exc.SlowRetrievalError(f"timed out reading {url}") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"error reading {url}: {e}") from e
        finally:
            if finished:
                response.release_conn()
            else:  # abandoned (too long) or failed: drop the connection instead of reading the rest
                response.close()


class _Recorder(FetcherInterface):
    """Wraps the real fetcher to remember the last URL and the first bytes it returned, so that a refusal can name
    the role and the version that was offered (ngclient's exceptions do not carry them)."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.url = ""
        self.head = b""

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.url, self.head = url, b""
        return self._tee(self.inner.fetch(url))

    def _tee(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if len(self.head) < _HEAD_CAP:
                self.head += chunk[: _HEAD_CAP - len(self.head)]
            yield chunk

    def offered_version(self) -> int | None:
        try:
            return int(json.loads(self.head)["signed"]["version"])
        except (ValueError, KeyError, TypeError):
            return None


def _metadata_version(path: Path) -> int | None:
    """Version of a cached (already verified) metadata file, for messages and ``trusted_versions()``."""
    try:
        return int(json.loads(path.read_bytes())["signed"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ReleaseVerifier:
    """Verifies release metadata from ``metadata_url`` against a root pinned at enrollment (``trusted_root``).

    ``cache_dir`` holds the trusted state between runs (ngclient's layout: ``root_history/N.root.json``, a
    ``root.json`` link to the newest, and the last verified timestamp/snapshot/targets); it must persist across
    reboots or rollback protection is lost. The pinned root stays the trust anchor; newer roots chain from it.
    """

    def __init__(
        self,
        metadata_url: str,
        trusted_root: bytes,
        cache_dir: Path,
        *,
        headers: dict[str, str] | None = None,
        fetcher: FetcherInterface | None = None,
    ) -> None:
        if fetcher is not None and headers:
            raise ValueError("headers are for the default HeaderFetcher; configure your own fetcher instead")
        self.metadata_url = metadata_url if metadata_url.endswith("/") else metadata_url + "/"
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._trusted_root = bytes(trusted_root)
        self._fetcher = _Recorder(fetcher if fetcher is not None else HeaderFetcher(headers))
        self._config = UpdaterConfig(prefix_targets_with_hash=True)  # default max lengths: the endless-data bounds
        self._updater: Updater | None = None
        # Validates the pinned root now and caches it (root_history/N.root.json + root.json), as ngclient requires.
        self._new_updater()

    def _new_updater(self) -> Updater:
        try:
            return Updater(
                metadata_dir=str(self.cache_dir),
                metadata_base_url=self.metadata_url,
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=self._trusted_root,
            )
        except tuf_exc.RepositoryError as e:
            raise TufRefused(
                f"the pinned trusted root is not valid TUF root metadata signed by its own keys: {e}",
                hint="re-enroll the device to get the service's root metadata",
            ) from e

    # -- metadata --------------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Fetch and verify root -> timestamp -> snapshot -> targets. On refusal nothing new is trusted (the cache
        keeps the last verified state) and the next ``target()`` call refreshes again."""
        trusted_timestamp = _metadata_version(self.cache_dir / "timestamp.json")
        self._updater = None
        updater = self._new_updater()
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise self._refused(e, trusted_timestamp) from e
        self._updater = updater

    def trusted_versions(self) -> dict[str, int]:
        """Role -> version of the verified metadata in the cache (what the device trusts now; for logs/telemetry)."""
        found = {r: _metadata_version(self.cache_dir / f"{r}.json") for r in _TOP_LEVEL}
        return {r: v for r, v in found.items() if v is not None}

    def _targetinfo(self, path: str) -> tuple[Updater, TargetFile]:
        if self._updater is None:
            self.refresh()  # sets it, or raises TufRefused
        try:
            info = self._updater.get_targetinfo(path)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise self._refused(e, None) from e
        if info is None:
            raise TufRefused(
                f"{path!r} is not a release in the signed targets metadata",
                hint="it may have been withdrawn, or was never published by the service",
            )
        if "sha256" not in info.hashes:
            raise TufRefused(f"the signed targets entry for {path!r} has no sha256 hash")
        return self._updater, info

    def target(self, path: str) -> dict[str, Any]:
        """Verified ``{"path", "length", "sha256", "custom"}`` for ``path`` (refreshing first if needed)."""
        _, info = self._targetinfo(path)
        return {"path": info.path, "length": info.length, "sha256": info.hashes["sha256"], "custom": info.custom}

    # -- files ------------------------------------------------------------------------------------------------------

    def verify_file(self, path: str, file: Path) -> None:
        """Check a file downloaded by other means (our resumable HTTP Range client) against the signed length and
        sha256 of ``path``. The size is checked first, so a truncated download fails without hashing it."""
        _, info = self._targetinfo(path)
        file = Path(file)
        size = file.stat().st_size
        if size != info.length:
            raise TufRefused(
                f"{file} is {size} bytes but the signed release {path!r} is {info.length} bytes",
                hint="the download is incomplete or not this release; fetch it again",
            )
        with file.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if not hmac.compare_digest(digest, info.hashes["sha256"].lower()):
            raise TufRefused(
                f"{file} has sha256 {digest} but the signed release {path!r} has {info.hashes['sha256']}",
                hint="the file was corrupted or tampered with; fetch it again",
            )

    def download(self, path: str, targets_url: str, dest_dir: Path) -> Path:
        """Download ``path`` with ngclient (hash-prefixed URL under ``targets_url``) into ``dest_dir``; the file is
        only written after its length and hash verified."""
        updater, info = self._targetinfo(path)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / parse.quote(path, "")
        try:
            return Path(updater.download_target(info, str(dest), targets_url))
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise self._refused(e, None, role=f"release file {path!r}") from e

    # -- messages ---------------------------------------------------------------------------------------------------

    def _refused(self, e: Exception, trusted_ts: int | None, role: str | None = None) -> TufRefused:
        """Turn an ngclient exception into a ``TufRefused`` naming the role and the kind of attack/fault."""
        if role is None:
            name = parse.unquote(self._fetcher.url.rsplit("/", 1)[-1])
            m = _META_NAME.fullmatch(name)
            role = m.group(1) if m else (name or "release")
            if "root.json" in str(e):
                role = "root"
        offered = self._fetcher.offered_version()
        detail = str(e) or type(e).__name__
        hint = None
        if isinstance(e, tuf_exc.BadVersionNumberError):
            if role == "timestamp" and offered is not None and trusted_ts is not None and offered < trusted_ts:
                msg = f"the release metadata was rolled back (timestamp version {offered} < trusted {trusted_ts})"
            else:
                msg = f"the {role} metadata has an unexpected version, a rollback or a mix of releases ({detail})"
        elif isinstance(e, tuf_exc.ExpiredMetadataError):
            msg = f"the {role} metadata has expired ({detail}): the server is stale or replaying old metadata"
            hint = "check the device clock, and that the service refreshes its timestamp"
        elif isinstance(e, tuf_exc.UnsignedMetadataError):
            msg = f"the {role} metadata is not signed by the trusted {role} key(s) ({detail})"
        elif isinstance(e, tuf_exc.LengthOrHashMismatchError):
            if role in ("snapshot", "targets"):
                msg = f"the {role} metadata does not match the hash/length its parent recorded: releases were mixed"
            else:
                msg = f"the {role} does not match its signed length/hash"
            msg += f" ({detail})"
        elif isinstance(e, tuf_exc.DownloadLengthMismatchError):
            msg = f"the {role} download exceeded its maximum length and was cut off ({detail})"
        elif isinstance(e, tuf_exc.SlowRetrievalError):
            msg = f"fetching the {role} timed out ({detail})"
        elif isinstance(e, tuf_exc.DownloadHTTPError):
            msg = f"fetching the {role} failed with HTTP {e.status_code}"
            hint = "check the device's credentials and the service URL" if e.status_code in (401, 403) else None
        elif isinstance(e, tuf_exc.DownloadError):
            msg = f"fetching the {role} failed ({detail})"
        else:
            msg = f"the {role} metadata was refused ({detail})"
        if hint is None and not isinstance(e, tuf_exc.DownloadError):
            hint = "the device keeps its last verified release metadata; report this if it persists"
        network = (isinstance(e, tuf_exc.DownloadError) and not isinstance(e, tuf_exc.DownloadLengthMismatchError)
                   and not (isinstance(e, tuf_exc.DownloadHTTPError) and e.status_code < 500 and e.status_code != 429))
        return (TufUnreachable if network else TufRefused)(msg, hint=hint)
