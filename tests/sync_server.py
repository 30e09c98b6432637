"""A live sync service for tests: uvicorn in a thread on a free port, over a temporary data folder."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

ADMIN = "eka_test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(tmp, db=...) as srv:`` → ``srv.url``, ``srv.service`` (call ``tick()`` to run the gates)."""

    def __init__(self, data: Path, db: str | None = None, *, store: str | None = None, keys: Path | None = None,
                 **cfg) -> None:
        from edgekit.sync.app import create_app
        from edgekit.sync.service import Service, ServiceConfig

        data.mkdir(parents=True, exist_ok=True)
        self.config = ServiceConfig(db=db or f"sqlite:///{data / 'sync.db'}", store=store or str(data / "blobs"),
                                    keys=keys or data / "keys", admin_token=ADMIN, tick_s=3600, **cfg)
        self.service = Service(self.config)
        self.app = create_app(service=self.service)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test sync server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.service.close()
