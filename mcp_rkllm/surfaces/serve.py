"""Serving: `serve(settings)` runs the MCP server on stdio, Streamable HTTP or SSE, or the JSON-RPC socket, until
the client or a signal ends it; `configure_logging` sends logs to stderr (stdout is the stdio transport's wire)."""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import threading
from typing import Any

import anyio
from mcp.server import Server

from mcp_rkllm import __version__
from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.http.app import http_app, protect, serve_http, sse_app
from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher
from mcp_rkllm.surfaces.mcp.server import RkllmServer, build_server

log = logging.getLogger("mcp_rkllm")


def configure_logging(level: str) -> None:
    """Log to stderr only (stdout is the stdio transport's wire), through a `StderrHandler`: logging never
    blocks the server, even when the client never reads the server's stderr."""
    logging.basicConfig(handlers=[StderrHandler()], level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


#: Log lines waiting for stderr beyond which new ones are dropped (and counted), and their size in bytes.
LOG_BACKLOG_LINES = 1000
LOG_BACKLOG_BYTES = 1 << 20

#: How long the exit waits for the log lines still queued to reach stderr.
LOG_FLUSH_SECONDS = 1.0


class StderrHandler(logging.Handler):
    """Writes log records to file descriptor 2 from its own (daemon) thread; `emit` never blocks.

    A stdio client that never reads the server's stderr lets the pipe fill (64 KiB on Linux), and the next
    write blocks: with a plain StreamHandler, the event loop thread (one line per call) and the threads that
    relay the workers' stderr would block for ever. Here the lines queue (at most LOG_BACKLOG_LINES or
    LOG_BACKLOG_BYTES); beyond that they are dropped and counted, and once stderr takes lines again one line
    says how many were dropped, where they were. Formatting happens in the caller's thread, writing in the
    writer thread with os.write on the descriptor (not through sys.stderr, whose lock a writer blocked at
    exit would hold: the interpreter aborts when it cannot take that lock to flush). `flush()` (called by
    logging.shutdown at exit) waits at most LOG_FLUSH_SECONDS for the queued lines to be written."""

    def __init__(self, fd: int = 2, max_lines: int = LOG_BACKLOG_LINES, max_bytes: int = LOG_BACKLOG_BYTES,
                 flush_seconds: float = LOG_FLUSH_SECONDS) -> None:
        super().__init__()
        self.fd, self.max_lines, self.max_bytes, self.flush_seconds = fd, max_lines, max_bytes, flush_seconds
        self._ready = threading.Condition(threading.Lock())
        self._lines: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._dropped = 0  # since the last line queued or written
        self._writing = False
        self._broken = False  # stderr is closed: lines are discarded
        self.dropped_total = 0
        self._writer = threading.Thread(target=self._write_lines, name="mcp-rkllm stderr", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        with self._ready:
            if len(self._lines) >= self.max_lines or (self._lines and self._bytes + len(data) > self.max_bytes):
                self._dropped += 1
                self.dropped_total += 1
                return
            if self._dropped:  # the gap goes where the dropped lines were
                self._queue(self._notice(self._dropped))
                self._dropped = 0
            self._queue(data)
            self._ready.notify_all()  # the writer, not only a flush() waiting

    def _queue(self, data: bytes) -> None:
        self._lines.append(data)
        self._bytes += len(data)

    def _notice(self, count: int) -> bytes:
        record = logging.LogRecord("mcp_rkllm", logging.WARNING, __file__, 0,
                                   "%d log line(s) dropped: stderr was full (not being read)", (count,), None)
        try:
            return (self.format(record) + "\n").encode()
        except Exception:
            return f"mcp_rkllm: {count} log line(s) dropped: stderr was full (not being read)\n".encode()

    def _write_lines(self) -> None:
        while True:
            with self._ready:
                self._writing = False
                self._ready.notify_all()
                while not self._lines and not self._dropped:
                    self._ready.wait()
                self._writing = True
                if self._lines:
                    data = self._lines.popleft()
                    self._bytes -= len(data)
                else:  # dropped lines and nothing after them yet: say so now that stderr takes lines
                    data, self._dropped = self._notice(self._dropped), 0
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._broken:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # someone made the descriptor non-blocking: wait until it is writable
                select.select([], [self.fd], [])
            except OSError:  # closed (EPIPE, EBADF): nowhere to log any more
                self._broken = True

    def flush(self) -> None:
        """Wait (at most flush_seconds) until the lines queued so far are written."""
        if self._writer.is_alive():
            with self._ready:
                self._ready.wait_for(lambda: not (self._lines or self._dropped or self._writing),
                                     self.flush_seconds)


#: Requests in flight on stdio beyond what the engine itself lets wait (each loaded model's running call and
#: its queue): a request blocked in a full queue never holds back the line that would cancel it.
STDIO_SPARE_REQUESTS = 64


async def serve_stdio(server: Server[Any], settings: Settings) -> None:
    """Serve one client on stdin/stdout until it leaves (EOF) or SIGTERM/SIGINT: then running generations
    are aborted and every handle freed (the server's lifespan closes the engine) and this returns."""
    from mcp_rkllm.surfaces.mcp.stdio import stdio_streams

    in_flight = settings.max_loaded_models * (settings.max_queued_runs + 1) + STDIO_SPARE_REQUESTS
    async with stdio_streams(max_line_bytes=settings.max_request_bytes, max_in_flight=in_flight,
                             max_in_flight_bytes=2 * settings.max_request_bytes) as (read, write), \
            anyio.create_task_group() as tg:
        serving = anyio.CancelScope()
        tg.start_soon(_stop_on_signals, serving)
        with serving:
            await server.run(read, write, server.create_initialization_options())
        tg.cancel_scope.cancel()


async def _stop_on_signals(serving: anyio.CancelScope) -> None:
    """The first SIGTERM or SIGINT cancels `serving` (an orderly exit, code 0); a second one exits at once,
    for a shutdown that hangs (the handler stays installed until the end, so it is never the default one)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if serving.cancel_called:
                log.warning("%s again: exiting without waiting for the shutdown", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("%s: aborting the running generations, freeing the handles, exiting",
                     signal.Signals(signum).name)
            serving.cancel()


async def serve(settings: Settings) -> None:
    """Build the server and serve it on the configured transport until the client or a signal ends it."""
    server = build_server(settings)
    if settings.transport == "jsonrpc":
        from mcp_rkllm.surfaces.jsonrpc.unix import serve_jsonrpc

        log.info("mcp-rkllm %s serving JSON-RPC", __version__)
        await serve_jsonrpc(Dispatcher(server.registry, server.engine), settings.socket, settings.socket_mode,
                            settings.max_request_bytes)
        return
    where = "stdin/stdout" if settings.transport == "stdio" else (
        f"http://{settings.host}:{settings.port}" + ("/mcp" if settings.transport == "http" else "/sse"))
    log.info("mcp-rkllm %s serving %s on %s", __version__, settings.transport, where)
    if settings.transport == "stdio":
        await serve_stdio(server, settings)
    elif settings.transport == "http" and settings.socket:
        await serve_http_and_socket(server, settings)
    elif settings.transport == "http":
        await serve_http(protect(http_app(server, settings), settings), settings, server.engine)
    else:
        await serve_http(protect(sse_app(server, settings), settings), settings, server.engine)


async def serve_http_and_socket(server: RkllmServer, settings: Settings) -> None:
    """Streamable HTTP and the JSON-RPC socket together, on one engine, until the HTTP server stops."""
    import anyio

    from mcp_rkllm.surfaces.jsonrpc.unix import serve_jsonrpc

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_jsonrpc, Dispatcher(server.registry, server.engine), settings.socket,
                      settings.socket_mode, settings.max_request_bytes, False)  # uvicorn owns the signals
        await serve_http(protect(http_app(server, settings), settings), settings, server.engine)
        tg.cancel_scope.cancel()
