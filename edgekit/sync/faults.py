"""A fault-injecting TCP proxy between simulated devices and the sync service (used by the fleet simulator).

``FaultProxy`` runs an asyncio server in its own event loop in a daemon thread and forwards each accepted
connection to the upstream server, byte for byte, in 64 KiB chunks with ``drain()`` backpressure. Each connection
gets its fate when it is accepted, drawn from ``random.Random(seed)`` (three draws per connection, whatever
happens to it), so a run with the same connection order makes the same decisions:

- **dropped** (probability ``drop_rate``): the connection is reset (RST, both sides) after a random number of bytes
  of the response direction, uniform in ``0..drop_max_bytes``: a dropped link or a device losing power mid-download.
  The client sees a reset or a short read, before any answer, mid-headers or mid-body. The chunk before the
  server's end of stream (or a 0.25 s pause, for keep-alive) is held back and cut at a random point, so a dropped
  connection never delivers a complete answer, even one shorter than the cut point (a small JSON reply too).
- **slow** (probability ``slow_share``): the response direction is throttled to ``slow_bytes_per_s`` (no burst;
  smaller reads): a congested cellular or satellite link, for client timeouts and resumable downloads.
- **refused**: the upstream refuses the connection (the server is restarting: ``set_upstream`` points new
  connections at its new address) or the proxy is ``pause()``-d (an outage without killing the server): the client
  connection is reset at once after accept.
- ``cut_all()``: every open connection is reset now, a network partition or mass disconnect.

``stats()`` gives thread-safe counters: ``connections`` (accepted), ``dropped``, ``slow``, ``refused``, ``cut``
(by ``cut_all``), ``bytes_up`` (client to server), ``bytes_down`` (server to client) and ``open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading

CHUNK = 64 * 1024
_LINGER_0 = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN
_HOLD_S = 0.25  # a dropped connection's held-back chunk waits this long for more before it is cut


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection abortively (RST), dropping whatever is still buffered."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None and sock.fileno() != -1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    writer.transport.abort()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task | None) -> None:
        self.client, self.task, self.upstream = client, task, None


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` that drops, slows and refuses connections (module docstring)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, drop_rate: float = 0.0, slow_share: float = 0.0,
                 slow_bytes_per_s: int = 64_000, seed: int = 0, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 drop_max_bytes: int = CHUNK, connect_timeout: float = 5.0) -> None:
        self.drop_rate, self.slow_share, self.slow_bytes_per_s = drop_rate, slow_share, max(1, int(slow_bytes_per_s))
        self.drop_max_bytes, self.connect_timeout = drop_max_bytes, connect_timeout
        self.listen_host, self.port = listen_host, listen_port
        self._upstream = (upstream_host, upstream_port)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("connections", "dropped", "slow", "refused", "cut", "bytes_up", "bytes_down",
                                     "open"), 0)
        self._paused = False
        self._conns: set[_Conn] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def start(self) -> int:
        """Start the proxy thread; return the bound port."""
        if self._thread is not None:
            return self.port
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"FaultProxy->{self._upstream[1]}",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener, reset every open connection, cancel every task, and join the thread."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_upstream(self, host: str, port: int) -> None:
        """Send new connections to ``host:port`` (open ones stay where they are)."""
        with self._lock:
            self._upstream = (host, port)

    def pause(self) -> None:
        """Refuse new connections (reset at once after accept) until ``resume()``."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def cut_all(self) -> int:
        """Reset every open connection now; return how many."""
        if self._loop is None or self._thread is None:
            return 0
        return asyncio.run_coroutine_threadsafe(self._cut_all(), self._loop).result(10)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._stats[key] += value

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))  # cancels whatever is left and closes the loop
        except BaseException as e:  # handed to start()
            self._error = e
        finally:
            ready.set()
            self._loop = self._stop_event = None

    async def _main(self, ready: threading.Event) -> None:
        self._loop, self._stop_event = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, self.listen_host, self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stop_event.wait()
        server.close()
        await asyncio.sleep(0)  # handlers of connections accepted just now register themselves
        await self._cut_all(count=False)
        tasks = [c.task for c in self._conns if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)

    async def _cut_all(self, count: bool = True) -> int:
        conns = list(self._conns)
        for conn in conns:
            for writer in (conn.client, conn.upstream):
                if writer is not None:
                    _abort(writer)
        if count:
            self._count(cut=len(conns))
        return len(conns)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            await self._serve(creader, cwriter)
        except asyncio.CancelledError:  # cut_all() or stop(): the connection was aborted in _serve's cleanup
            pass

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = _Conn(cwriter, asyncio.current_task())
        self._conns.add(conn)
        rng = self._rng  # three draws per connection whatever happens to it: decisions follow connection order
        drop, slow = rng.random() < self.drop_rate, rng.random() < self.slow_share
        conn_rng = random.Random(rng.getrandbits(64))
        self._count(connections=1, open=1)
        clean = False
        with self._lock:
            host, port = self._upstream
        try:
            if self._paused:
                self._count(refused=1)
                return
            try:
                ureader, conn.upstream = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                                self.connect_timeout)
            except OSError:  # TimeoutError included
                self._count(refused=1)
                return
            self._count(dropped=int(drop), slow=int(slow))
            cut_at = conn_rng.randint(0, self.drop_max_bytes) if drop else None
            up = asyncio.create_task(self._pipe_up(creader, conn.upstream))
            down = asyncio.create_task(self._pipe_down(ureader, cwriter, slow, cut_at, conn_rng))
            try:
                done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
                if down not in done and up.result():  # the client half-closed: wait for the whole answer
                    await down
                clean = down.done() and not down.cancelled() and down.exception() is None and down.result()
            finally:
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            self._count(open=-1)
            for writer in (cwriter, conn.upstream):
                if writer is not None and clean:
                    writer.close()
                elif writer is not None:
                    _abort(writer)

    async def _pipe_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Client to server; True on the client's end of stream (passed on as a half-close)."""
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
                self._count(bytes_up=len(data))
            if writer.can_write_eof():
                writer.write_eof()
            return True
        except OSError:
            return False

    async def _pipe_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool,
                         cut_at: int | None, conn_rng: random.Random) -> bool:
        """Server to client, throttled if slow, cut at ``cut_at`` if dropped; True on a clean end of stream."""
        loop = asyncio.get_running_loop()
        rate = self.slow_bytes_per_s
        size = min(CHUNK, max(1024, rate // 20)) if slow else CHUNK
        sent, held, start = 0, b"", None
        try:
            while True:
                if cut_at is not None and held:  # a server that goes quiet (keep-alive) counts as done
                    try:
                        data = await asyncio.wait_for(reader.read(size), _HOLD_S)
                    except TimeoutError:
                        data = b""
                else:
                    data = await reader.read(size)
                if cut_at is not None:
                    if not data:  # the server is done: cut inside the held-back last chunk
                        cut_at = min(cut_at, sent + conn_rng.randrange(len(held))) if held else sent
                        data = held
                    else:
                        data, held = held, data
                elif not data:
                    return True
                cut = cut_at is not None and sent + len(data) >= cut_at
                if cut:
                    data = data[:cut_at - sent]
                if data:
                    if slow:
                        start = loop.time() if start is None else start
                        delay = start + (sent + len(data)) / rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
                    sent += len(data)
                    self._count(bytes_down=len(data))
                if cut:
                    return False
        except OSError:
            return False
