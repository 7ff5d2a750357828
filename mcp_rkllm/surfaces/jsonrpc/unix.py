"""JSON-RPC 2.0 on a Unix domain socket: one JSON message per line, many connections, pipelined requests.

Each connection reads lines and answers each request by id as soon as it is done (several run at once;
at most MAX_IN_FLIGHT per connection, after which reading pauses: a client that never reads its answers
cannot grow the server without bound). Writes are serialised per connection. A client that closes its
connection gets its runs aborted; one that only shuts down its writing side (`echo ... | socat`) still
gets its answers. The socket file is created with `socket_mode` (0600 by default), replaces a stale
socket, refuses a live one or a file that is not a socket, and is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream

from mcp_rkllm.surfaces.jsonrpc.protocol import INVALID_REQUEST, Dispatcher, Peer, RpcError, parse

log = logging.getLogger(__name__)

#: Requests of one connection running at once; reading pauses beyond.
MAX_IN_FLIGHT = 64

#: How often a connection whose client stopped writing checks that the client is still there.
HANGUP_POLL_SECONDS = 0.25

#: The longest path a Unix socket can have (sun_path, with its NUL).
MAX_SOCKET_PATH = 107


class SocketInUse(RuntimeError):
    """The socket path cannot be used (a live server listens there, or it is not a socket)."""


def encode(message: Any) -> bytes:
    """One message as a line of UTF-8 JSON (text with lone surrogates escaped, so always valid UTF-8)."""
    try:
        return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def bind(path: str, mode: int) -> socket.socket:
    """A listening Unix socket at `path` with permissions `mode`. Raises SocketInUse with a clear message."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketInUse(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter one")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a stale socket from a server that died
        else:
            raise SocketInUse(f"another server is listening on {path}; stop it or choose another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: nobody else can connect between bind and chmod
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def socket_file(path: str, mode: int) -> Iterator[socket.socket]:
    """`bind(path, mode)`, and the file removed on exit (if it is still ours)."""
    sock = bind(path, mode)
    ours = os.stat(path).st_ino
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ours:
                os.unlink(path)


class Connection:
    """One client: reads its lines, runs its requests, writes their answers and callbacks."""

    def __init__(self, stream: SocketStream, dispatcher: Dispatcher, max_line_bytes: int):
        self.stream = stream
        self.dispatcher = dispatcher
        self.max_line_bytes = max_line_bytes
        self.peer = Peer(notify=self.send, owner=f"jsonrpc-{secrets.token_hex(6)}")
        self._write_lock = anyio.Lock()
        self._in_flight = anyio.Semaphore(MAX_IN_FLIGHT)
        self._running = 0
        self._scope: anyio.CancelScope | None = None
        self.gone = False

    async def send(self, message: Any) -> None:
        """Write one message; if the client has gone, cancel everything this connection runs."""
        data = encode(message)
        async with self._write_lock:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._hang_up()
                await anyio.lowlevel.checkpoint()  # delivers the cancellation to the sender too
                raise

    def _hang_up(self) -> None:
        if not self.gone:
            self.gone = True
            log.info("JSON-RPC client disconnected: aborting its runs")
        if self._scope is not None:
            self._scope.cancel()

    async def serve(self) -> None:
        """Until the client has closed its connection and every answer is out (or the client is gone)."""
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                await self._read(tg)
                if self._running:
                    tg.start_soon(self._watch_hangup)
        finally:
            with anyio.CancelScope(shield=True):
                await self.dispatcher.engine.release_owner(self.peer.owner or "")  # its rkllm.init handles
            with contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _read(self, tg: anyio.abc.TaskGroup) -> None:
        buffer = bytearray()
        skipping = False  # inside an over-long line: drop bytes until its end
        while True:
            try:
                chunk = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                if buffer.strip() and not skipping:  # a last message without its newline: still a message
                    await self._dispatch(tg, bytes(buffer))
                return
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                if skipping:
                    skipping = False
                elif len(line) > self.max_line_bytes:
                    self._too_long(tg)
                else:
                    await self._dispatch(tg, line)
            if len(buffer) > self.max_line_bytes or skipping:
                if not skipping:
                    self._too_long(tg)
                buffer.clear()
                skipping = True

    def _too_long(self, tg: anyio.abc.TaskGroup) -> None:
        tg.start_soon(self._answer, RpcError(
            INVALID_REQUEST, f"Invalid Request: a message is longer than {self.max_line_bytes} bytes; it was "
                             "dropped").response(None))

    async def _dispatch(self, tg: anyio.abc.TaskGroup, line: bytes) -> None:
        if not line.strip():
            return
        await self._in_flight.acquire()  # backpressure: past MAX_IN_FLIGHT, stop reading
        self._running += 1
        tg.start_soon(self._run, line)

    async def _run(self, line: bytes) -> None:
        try:
            try:
                message = parse(line)
            except RpcError as exc:
                await self._answer(exc.response(None))
                return
            answer = await self.dispatcher.handle(message, self.peer)
            if answer is not None:
                await self._answer(answer)
        finally:
            self._running -= 1
            self._in_flight.release()

    async def _answer(self, message: Any) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await self.send(message)

    async def _watch_hangup(self) -> None:
        """After the client stopped writing: abort its runs if it closed the connection altogether (a Unix
        socket reports POLLHUP only when both directions are shut), else wait for the answers to go out."""
        raw = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        poller = select.poll()
        poller.register(raw.fileno(), select.POLLHUP)
        while self._running:
            if any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(0)):
                self._hang_up()
                return
            await anyio.sleep(HANGUP_POLL_SECONDS)


async def serve_socket(dispatcher: Dispatcher, path: str, mode: int, max_line_bytes: int,
                       *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve JSON-RPC on the Unix socket at `path` until cancelled; the socket file is removed on exit."""
    with socket_file(path, mode) as sock:
        listener = await SocketListener.from_socket(sock)
        log.info("JSON-RPC on unix socket %s (mode %o)", path, mode)

        async def handle(stream: SocketStream) -> None:
            await Connection(stream, dispatcher, max_line_bytes).serve()

        async with listener:
            task_status.started()
            await listener.serve(handle)


def parse_mode(text: str | int) -> int:
    """A permission mode given as octal text ("0660", "660") or a number."""
    if isinstance(text, int):
        return text
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"socket mode {text!r} is not an octal number such as 0600") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"socket mode {text!r} is out of range (0000-0777)")
    return mode


def default_socket_path() -> str:
    """$XDG_RUNTIME_DIR/mcp-rkllm.sock, else /tmp/mcp-rkllm-<uid>.sock."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and Path(runtime_dir).is_dir():
        return str(Path(runtime_dir) / "mcp-rkllm.sock")
    return f"/tmp/mcp-rkllm-{os.getuid()}.sock"


async def serve_jsonrpc(dispatcher: Dispatcher, path: str | None, mode: str, max_line_bytes: int,
                        signals: bool = True) -> None:
    """Serve the socket until SIGTERM or SIGINT (with `signals`) or cancellation: the engine is opened first; on
    the way out every connection's runs are aborted, the engine frees its handles and the socket file goes."""
    import signal

    engine = dispatcher.engine
    await engine.open()
    try:
        async with anyio.create_task_group() as tg:
            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        return

            if signals:
                tg.start_soon(stop_on_signal)
            await serve_socket(dispatcher, path or default_socket_path(), parse_mode(mode), max_line_bytes)
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()
