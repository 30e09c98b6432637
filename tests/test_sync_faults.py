"""FaultProxy (edgekit/sync/faults.py) over real sockets, in front of a threaded HTTP server in this process."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgekit.sync.faults import FaultProxy

BIG = bytes(range(256)) * 4096  # 1 MiB


class _Handler(BaseHTTPRequestHandler):
    """GET /big: 1 MiB; GET /n/K: K bytes; the server's name in the X-Server header."""

    def do_GET(self) -> None:  # noqa: N802
        body = BIG if self.path == "/big" else b"x" * int(self.path.rsplit("/", 1)[-1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Server", self.server.name)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the proxy cut us off
            pass

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # resets from dropped connections are expected
        pass


def _serve(name: str) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.name = name
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def upstream() -> Iterator[_Server]:
    yield from _serve("a")


@pytest.fixture
def upstream_b() -> Iterator[_Server]:
    yield from _serve("b")


def _get(url: str, timeout: float = 5) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.headers["X-Server"], resp.read()


def _fails(url: str, timeout: float = 5) -> bool:
    """True when the request ends in a reset, an early close or a short read."""
    try:
        _get(url, timeout)
    except (OSError, http.client.HTTPException):
        return True
    return False


def _raw_get(port: int, path: str) -> int:
    """Bytes received for GET path (headers included) until EOF or reset."""
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        try:
            while data := sock.recv(65536):
                got += len(data)
        except ConnectionResetError:
            pass
    return got


def _settled(proxy: FaultProxy) -> dict[str, int]:
    """stats() once every connection has been closed on the proxy's side."""
    deadline = time.monotonic() + 5
    while (stats := proxy.stats())["open"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return stats


def _proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("FaultProxy")]


def test_forwards_transparently(upstream):
    with FaultProxy(*upstream.server_address) as proxy:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}"
        assert _get(proxy.url + "/big") == ("a", BIG)
        assert _get(proxy.url + "/n/10") == ("a", b"x" * 10)
        stats = _settled(proxy)
    assert stats["connections"] == 2 and stats["open"] == 0
    assert stats["dropped"] == stats["slow"] == stats["refused"] == 0
    assert stats["bytes_down"] >= len(BIG) + 10 and stats["bytes_up"] > 0


def test_drop_cuts_every_response(upstream):
    with FaultProxy(*upstream.server_address, drop_rate=1.0, seed=1) as proxy:
        for _ in range(4):
            assert _fails(proxy.url + "/big")
        assert _fails(proxy.url + "/n/100")  # shorter than any cut point: the held-back tail is cut anyway
        received = [_raw_get(proxy.port, "/big") for _ in range(20)]
        stats = _settled(proxy)
    assert stats["dropped"] == stats["connections"] == 25
    assert all(n <= 64 * 1024 for n in received), received  # cut within the first 64 KiB of the response
    assert any(n > 1000 for n in received), received  # ... mid-body


def test_slow_connection_is_throttled(upstream):
    with FaultProxy(*upstream.server_address, slow_share=1.0, slow_bytes_per_s=400_000) as proxy:
        t0 = time.monotonic()
        assert _get(proxy.url + "/n/200000")[1] == b"x" * 200_000
        elapsed = time.monotonic() - t0
        stats = _settled(proxy)
    assert 0.4 <= elapsed < 3, elapsed
    assert stats["slow"] == 1 and stats["dropped"] == 0


def test_pause_refuses_then_resume(upstream):
    with FaultProxy(*upstream.server_address) as proxy:
        proxy.pause()
        t0 = time.monotonic()
        assert _fails(proxy.url + "/n/1")
        assert time.monotonic() - t0 < 1
        proxy.resume()
        assert _get(proxy.url + "/n/1")[1] == b"x"
        stats = _settled(proxy)
    assert stats["refused"] == 1 and stats["connections"] == 2


def test_set_upstream(upstream, upstream_b):
    with FaultProxy(*upstream.server_address) as proxy:
        assert _get(proxy.url + "/n/3")[0] == "a"
        proxy.set_upstream(*upstream_b.server_address)
        assert _get(proxy.url + "/n/3")[0] == "b"


def test_upstream_down_is_refused_quickly():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with FaultProxy("127.0.0.1", port) as proxy:
        t0 = time.monotonic()
        assert _fails(proxy.url + "/n/1")
        assert time.monotonic() - t0 < 2
        stats = _settled(proxy)
    assert stats["refused"] == 1 and stats["dropped"] == 0


def test_same_seed_same_decisions(upstream):
    def outcomes(seed: int) -> list[bool]:
        with FaultProxy(*upstream.server_address, drop_rate=0.5, seed=seed) as proxy:
            return [_fails(proxy.url + "/n/100") for _ in range(16)]

    first = outcomes(7)
    assert first == outcomes(7)
    assert any(first) and not all(first)
    assert first != outcomes(8)


def test_cut_all_and_stop_mid_download(upstream):
    proxy = FaultProxy(*upstream.server_address, slow_share=1.0, slow_bytes_per_s=100_000)
    proxy.start()
    failed: list[bool] = []
    client = threading.Thread(target=lambda: failed.append(_fails(proxy.url + "/big")))
    client.start()
    deadline = time.monotonic() + 5
    while proxy.stats()["bytes_down"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.cut_all() == 1
    client.join(2)
    assert failed == [True]
    assert _settled(proxy)["cut"] == 1

    # stop() with a download in flight: it returns promptly and leaves no thread behind
    client = threading.Thread(target=lambda: failed.append(_fails(proxy.url + "/big")))
    client.start()
    while proxy.stats()["open"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    proxy.stop()
    assert time.monotonic() - t0 < 2
    client.join(2)
    assert failed == [True, True]
    assert not _proxy_threads()
    proxy.stop()  # idempotent


def test_stop_leaves_no_thread(upstream):
    before = set(threading.enumerate())
    with FaultProxy(*upstream.server_address) as proxy:
        assert _proxy_threads()
        _get(proxy.url + "/n/1")
    assert not _proxy_threads()
    extra = set(threading.enumerate()) - before  # the upstream's handler may still be closing its socket
    for t in extra:
        t.join(timeout=5)
    assert {t for t in extra if t.is_alive()} == set()


def test_drop_cuts_a_keep_alive_answer():
    """An upstream that answers and keeps the connection open: the dropped answer is still cut, without a hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"y" * 100)
            done.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with FaultProxy(*listener.getsockname(), drop_rate=1.0) as proxy:
            t0 = time.monotonic()
            assert _raw_get(proxy.port, "/") < 100
            assert time.monotonic() - t0 < 2
    finally:
        done.set()
        thread.join()
        listener.close()
