"""A real, throwaway PostgreSQL server for the sync service's tests (SQLite hides too many dialect differences).

Use it with ``from tests.sync_pg import pg_server, pg_url  # noqa: F401``: ``pg_url`` is a fresh, empty database
per test on one server per test session. The server lives in a temporary folder, listens on 127.0.0.1 only, trusts
every local connection and runs with fsync off: it is for tests, never for data.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.debian import apt_install, can_install

PG_USER = "edgekit"
PG_DATABASE = "edgekit_test"
START_TIMEOUT = 60.0


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: from PATH, else Debian's ``/usr/lib/postgresql/*/bin`` (newest).

    Debian puts only wrappers on PATH (pg_ctlcluster), which manage system clusters; the tests need the raw tools.
    """
    found = shutil.which("initdb")
    if found and (Path(found).parent / "pg_ctl").is_file():
        return Path(found).parent
    candidates = [
        d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").is_file() and (d / "pg_ctl").is_file()
    ]
    candidates.sort(key=lambda d: tuple(int(n) for n in re.findall(r"\d+", d.parent.name)))  # "9.6" < "15"
    return candidates[-1] if candidates else None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_postgres_installed() -> Path:
    """Return :func:`postgres_bin`, installing PostgreSQL first where we may (root on Debian/Ubuntu, e.g. CI images)."""
    if (found := postgres_bin()) is not None:
        return found
    if not can_install():
        raise RuntimeError(
            "PostgreSQL's initdb and pg_ctl were not found (PATH, /usr/lib/postgresql/*/bin) and cannot be installed "
            "here (that needs root on Debian/Ubuntu); install PostgreSQL (apt-get install postgresql, "
            "brew install postgresql, ...) or put its bin folder on PATH"
        )
    apt_install("postgresql")
    if (found := postgres_bin()) is None:
        raise RuntimeError("apt-get installed postgresql, but initdb/pg_ctl are still not found")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traversable(path: Path) -> bool:
    """Whether every folder up to ``path`` lets other users through (the postgres user must reach its data)."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


class PgServer:
    """One PostgreSQL server in a temporary folder: ``with PgServer() as pg: create_engine(pg.url)``.

    PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` system user (``runuser``),
    which then owns the temporary folder. ``stop()`` (also called when starting fails) leaves nothing behind.
    """

    def __init__(self, bin_dir: Path | None = None, *, user: str = PG_USER, dbname: str = PG_DATABASE) -> None:
        self.bin_dir, self.user, self.dbname = bin_dir, user, dbname
        self.dir: Path | None = None
        self.port: int | None = None
        self._as_postgres = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database."""
        if self.port is None:
            raise RuntimeError("the PostgreSQL server is not running")
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def log(self) -> str:
        """The server's log so far (for error messages)."""
        try:
            return (self.dir / "server.log").read_text(errors="replace") if self.dir else ""
        except OSError:
            return ""

    def start(self) -> PgServer:
        bin_dir = self.bin_dir or ensure_postgres_installed()
        self._as_postgres = _is_root()
        base = Path(tempfile.gettempdir())
        if self._as_postgres and not _traversable(base):  # e.g. TMPDIR under /root (0700)
            base = Path("/tmp")
        self.dir = Path(tempfile.mkdtemp(prefix="edgekit-pg-", dir=base))
        atexit.register(self.stop)  # even if the caller forgets: no postgres outliving the tests
        try:
            data, sockets = self.dir / "data", self.dir / "sockets"
            sockets.mkdir()
            if self._as_postgres:
                _ensure_postgres_user()
                for p in (self.dir, sockets):
                    shutil.chown(p, "postgres", "postgres")
            self._run(bin_dir / "initdb", "-D", data, "-U", self.user, "-A", "trust", "-E", "UTF8", "--locale=C", "-N")
            with open(data / "postgresql.conf", "a") as f:  # appending keeps the postgres user as its owner
                f.write(
                    f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sockets}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                )
            for _ in range(5):  # the free port can be taken before the server binds it: try another
                port = _free_port()
                # -l matters beyond logging: without it the daemon inherits our pipes and pg_ctl's caller never returns
                cmd = ("-D", data, "-l", self.dir / "server.log", "-o", f"-p {port}", "-w", "-t", "60", "start")
                r = self._run(bin_dir / "pg_ctl", *cmd, check=False)
                if r.returncode == 0:
                    break
                if "already in use" not in self.log:
                    raise RuntimeError(f"pg_ctl start failed:\n{r.stdout}{r.stderr}\n--- server log\n{self.log}")
            else:
                raise RuntimeError(f"no free port for PostgreSQL after 5 tries:\n{self.log}")
            self.port = port
            self._wait_until_ready()
            _execute(self.port, "postgres", f'CREATE DATABASE "{self.dbname}"', user=self.user)
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, *args: Any, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # No PG* variables (PGDATA, PGPORT, PGOPTIONS...) from the caller's environment; C messages for the log checks.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        # cwd: the postgres user may not enter the caller's working directory (/root), and pg_ctl needs to
        r = subprocess.run(cmd, cwd=self.dir, env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def _wait_until_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres").close()
                return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections in {START_TIMEOUT:.0f} s: {e}") from e
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (fast shutdown, immediate if that hangs) and remove its folder; safe to call twice."""
        atexit.unregister(self.stop)
        if self.dir is None:
            return
        data, bin_dir = self.dir / "data", self.bin_dir or postgres_bin()
        if bin_dir is not None and (data / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                try:
                    if self._run(bin_dir / "pg_ctl", "-D", data, "-m", mode, "-w", "stop", check=False).returncode == 0:
                        break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = self.port = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ensure_postgres_user() -> None:
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "postgres"], check=True, capture_output=True)


def _execute(port: int, dbname: str, statement: str, *, user: str = PG_USER, host: str = "127.0.0.1") -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE cannot run inside one)."""
    import psycopg

    with psycopg.connect(host=host, port=port, user=user, dbname=dbname, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]  # our own fixed statements, no user input


def fresh_database(url: str) -> str:
    """Create a new, uniquely named, empty database on the server of ``url``; return its URL (isolated tests)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    name = f"edgekit_{uuid.uuid4().hex[:16]}"
    _execute(u.port or 5432, "postgres", f'CREATE DATABASE "{name}"', user=u.username or PG_USER, host=u.host or "")
    return u.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop the database of ``url``, closing whatever connections a test left open (PostgreSQL 13+)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if not re.fullmatch(r"\w+", u.database or ""):
        raise ValueError(f"refusing to drop database {u.database!r}")
    _execute(
        u.port or 5432,
        "postgres",
        f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)',
        user=u.username or PG_USER,
        host=u.host or "",
    )


# One server per process. A session-scoped fixture imported into several test modules is a separate fixture in each
# module (pytest would start one server per module), so the server is kept here and stopped when pytest ends.
_SESSION: dict[str, Any] = {}


def _session_server(config: pytest.Config) -> PgServer:
    if "error" in _SESSION:
        raise RuntimeError(_SESSION["error"])
    if "server" not in _SESSION:
        try:
            server = PgServer().start()
        except Exception as e:
            _SESSION["error"] = str(e)  # do not try (and maybe apt-get install) again for every module
            raise

        def stop() -> None:
            _SESSION.clear()
            server.stop()

        _SESSION["server"] = server
        config.add_cleanup(stop)
    return _SESSION["server"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """The session's PostgreSQL server; skips the test without one (fails it in CI, where it must work)."""
    try:
        return _session_server(request.config)
    except Exception as e:
        reason = f"no PostgreSQL server for the tests: {e}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for one test (SQLAlchemy URL); dropped afterwards."""
    url = fresh_database(pg_server.url)
    yield url
    drop_database(url)
