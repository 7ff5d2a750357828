"""The stdio transport: JSON-RPC lines on stdin/stdout as the memory streams `Server.run` takes.

Why not the SDK's `mcp.server.stdio`: a line it cannot validate becomes an exception the server only
logs, so a request with a lone UTF-16 surrogate (JavaScript's JSON.stringify of half an emoji), nesting
deeper than pydantic-core parses, a batch or a wrong "jsonrpc" vanished and its client waited forever.
And it reads stdin as fast as lines come, one task per request, so a client that writes but never reads
grew the server without bound. Here:

- Each line is parsed here (`parse_line`). What could be a request and cannot be served is answered with
  a JSON-RPC error carrying its id when it has one: -32700 not JSON, -32600 not a request (a batch, a
  wrong "jsonrpc", nesting beyond `MAX_DEPTH`, a line longer than the request limit), -32602 params that
  are not an object. A lone surrogate inside a string is replaced with U+FFFD and the request served,
  the same as invalid UTF-8 bytes. The next line is read as usual.
- Backpressure: a bounded number (and size) of requests is in flight (read but not answered), and
  the outgoing messages wait in a small buffer for a writer that blocks when the client's pipe is full.
  So a client that stops reading stops the server reading: memory stays bounded, and everything is
  answered once the client reads again.
- Like the SDK, fds 0 and 1 are diverted while serving (to /dev/null and to stderr) so nothing the native
  library or a child prints reaches the wire; the wire is served from private duplicates, by two daemon
  threads (a thread blocked on a pipe must never keep the process from exiting on a signal).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, NoReturn

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.message import SessionMessage
from mcp.types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

log = logging.getLogger("mcp_rkllm.stdio")

#: Deepest nesting accepted: what pydantic-core's JSON parser takes (the SDK's HTTP transport parses with
#: it), so a request has the same fate on every transport.
MAX_DEPTH = 201

#: Outgoing messages waiting for the writer thread.
WRITE_BUFFER = 32

#: Seconds the responses already written to the buffer get to reach a client that is not reading, at exit.
FLUSH_TIMEOUT = 3.0

_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}]')  # strings (skipped: brackets in them do not nest)
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _error(request_id: RequestId | None, code: int, message: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))


def _request_id(value: Any) -> RequestId | None:
    """The id to answer `value` with: a request's string or integer id, else None (a notification, a
    response, or an id JSON-RPC does not allow)."""
    if not isinstance(value, dict) or "method" not in value:
        return None
    request_id = value.get("id")
    return request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _top_level_containers(text: str) -> list[tuple[int, int]] | None:
    """None when `text` nests at most MAX_DEPTH deep; else the spans of the containers one level down
    (the values of a message's members, the items of a batch), found without recursion."""
    depth = deepest = start = 0
    spans: list[tuple[int, int]] = []
    for token in _TOKENS.finditer(text):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
            if depth == 2:
                start = token.start()
        elif bracket in ("]", "}"):
            if depth == 2:
                spans.append((start, token.end()))
            depth -= 1
    return spans if deepest > MAX_DEPTH else None


def _too_deep(text: str, spans: list[tuple[int, int]]) -> list[JSONRPCError]:
    """The answer to a message nested too deep: its id is found by parsing it with every value one level
    down replaced by 0 (so the answer has the id however deep the params go)."""
    pieces, end = [], 0
    for a, b in spans:
        pieces += [text[end:a], "0"]
        end = b
    try:
        shallow = json.loads("".join(pieces) + text[end:], parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return [_error(None, PARSE_ERROR, "Parse error: not JSON")]
    return [_error(_request_id(shallow), INVALID_REQUEST, f"Invalid request: nesting deeper than {MAX_DEPTH} levels")]


def _without_lone_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings and keys replaced by U+FFFD (json.loads has paired
    the valid ones into single characters already)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def parse_line(line: bytes) -> JSONRPCMessage | list[JSONRPCError] | None:
    """One line of the wire: the message to serve, the errors to answer instead, or None (a blank line)."""
    text = line.decode("utf-8", "replace").strip()  # invalid UTF-8 becomes U+FFFD, as in the SDK
    if not text:
        return None
    # Count brackets only when there are enough of them to matter (str.count is cheap; the scan is not).
    if text.count("[") + text.count("{") > MAX_DEPTH and (spans := _top_level_containers(text)) is not None:
        return _too_deep(text, spans)
    try:
        value = json.loads(text, parse_constant=_reject_constant)  # NaN and Infinity are not JSON
    except (ValueError, RecursionError) as exc:
        return [_error(None, PARSE_ERROR, f"Parse error: {str(exc)[:200]}")]
    if _ESCAPED_SURROGATE.search(text):
        value = _without_lone_surrogates(value)
    if isinstance(value, list):
        # MCP dropped JSON-RPC batches (2025-06-18): each request in one is answered on its own line.
        errors = [_error(_request_id(item), INVALID_REQUEST, "Invalid request: batches are not supported; "
                         "send one message per line") for item in value if _request_id(item) is not None]
        return errors or [_error(None, INVALID_REQUEST, "Invalid request: batches are not supported")]
    if not isinstance(value, dict):
        return [_error(None, INVALID_REQUEST, "Invalid request: a message is a JSON object")]
    request_id = _request_id(value)
    if value.get("jsonrpc") != "2.0":
        return [_error(request_id, INVALID_REQUEST, 'Invalid request: "jsonrpc" must be "2.0"')]
    if "method" in value and "id" in value and request_id is None:  # else it would pass as a notification
        return [_error(None, INVALID_REQUEST, "Invalid request: an id is a string or an integer (not null)")]
    if isinstance(value.get("method"), str) and value.get("params") is not None and not isinstance(
            value["params"], dict):
        return [_error(request_id, INVALID_PARAMS, "Invalid params: params must be an object")]
    try:
        return jsonrpc_message_adapter.validate_python(value, by_name=False)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        return [_error(request_id, INVALID_REQUEST, f"Invalid request: {where}")]


class _InFlight:
    """Requests read but not answered yet, by id: `admit` waits while there are too many (or too many
    bytes of them), so the reader stops reading; the writer settles a request as it takes its answer."""

    def __init__(self, most: int, most_bytes: int):
        self._most, self._most_bytes = most, most_bytes
        self._sizes: dict[RequestId, list[int]] = {}
        self._count = self._bytes = 0
        self._changed = anyio.Event()

    async def admit(self, request_id: RequestId, size: int) -> None:
        # One request is always admitted, however large (the line limit has bounded it already).
        while self._count and (self._count >= self._most or self._bytes + size > self._most_bytes):
            await self._changed.wait()
        self._sizes.setdefault(coerce_request_id(request_id), []).append(size)
        self._count += 1
        self._bytes += size

    def settle(self, request_id: RequestId) -> None:
        """The request is answered, or cancelled by the client (the server sends nothing for it then)."""
        sizes = self._sizes.get(key := coerce_request_id(request_id))
        if not sizes:
            return  # answered already (a late cancel), or a duplicate id answered twice
        self._bytes -= sizes.pop()
        self._count -= 1
        if not sizes:
            del self._sizes[key]
        self._changed.set()
        self._changed = anyio.Event()


def _claim_stdio() -> tuple[int, int, Callable[[], None]]:
    """Private duplicates of fds 0 and 1 for the wire; fd 0 then reads /dev/null and fd 1 writes to
    stderr. Returns the two and a function that points fds 0 and 1 back at the wire."""
    sys.stdout.flush()
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)  # close-on-exec: children never hold the wire
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)

    def restore() -> None:
        sys.stdout.flush()
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        # The duplicates stay open: a daemon thread may still be blocked on one.

    return wire_in, wire_out, restore


def _read_lines(fd: int, limit: int, send: Callable[[bytes | None], Coroutine[Any, Any, None]],
                close: Callable[[], None], token: anyio.lowlevel.EventLoopToken) -> None:
    """Reader thread: each line to the event loop (None for a line longer than `limit`), one at a time."""
    wire = os.fdopen(fd, "rb", closefd=False)
    try:
        while line := wire.readline(limit + 1):
            if len(line) > limit and not line.endswith(b"\n"):  # too long: skip to its end
                while line and not line.endswith(b"\n"):
                    line = wire.readline(1 << 16)
                anyio.from_thread.run(send, None, token=token)
            else:
                anyio.from_thread.run(send, line, token=token)
    except BaseException as exc:  # the loop is gone (exit, cancelled) or stopped reading (the writer failed)
        log.debug("stdin reader stopped: %r", exc)
    finally:
        with suppress(Exception):
            anyio.from_thread.run_sync(close, token=token)


def _write_lines(fd: int, take: Callable[[], Coroutine[Any, Any, bytes | None]], gone: Callable[[], None],
                 token: anyio.lowlevel.EventLoopToken) -> None:
    """Writer thread: the next message's line to the wire until the stream ends. It blocks while the
    client's pipe is full: that is the backpressure."""
    try:
        while (data := anyio.from_thread.run(take, token=token)) is not None:
            while data:
                data = data[os.write(fd, data):]
    except BaseException as exc:  # the client closed its end, or the loop is gone (exit, cancelled)
        log.debug("stdout writer stopped: %r", exc)
    finally:
        with suppress(Exception):
            anyio.from_thread.run_sync(gone, token=token)


def _line_of(message: JSONRPCMessage) -> bytes:
    try:
        return (message.model_dump_json(by_alias=True, exclude_unset=True) + "\n").encode()
    except Exception:  # never let one unserializable message end the session: answer what can be answered
        log.exception("could not serialize an outgoing %s", type(message).__name__)
        if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
            return _line_of(_error(message.id, INTERNAL_ERROR, "Internal error: unserializable response"))
        return b""


@asynccontextmanager
async def stdio_streams(*, max_line_bytes: int, max_in_flight: int, max_in_flight_bytes: int) -> AsyncIterator[
        tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]]:
    """Serve the wire on stdin/stdout: yields the (read, write) streams for `Server.run`.

    A line longer than `max_line_bytes` is answered -32600 without being kept; at most `max_in_flight`
    requests (and `max_in_flight_bytes` of them, unless just one) are in flight before reading waits.
    """
    wire_in, wire_out, restore = _claim_stdio()
    token = anyio.lowlevel.current_token()
    lines_send, lines_receive = anyio.create_memory_object_stream[bytes | None](0)
    read_send, read_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_send, write_receive = anyio.create_memory_object_stream[SessionMessage](WRITE_BUFFER)
    replies = write_send.clone()  # the reader's own answers to lines it cannot forward
    in_flight = _InFlight(max_in_flight, max_in_flight_bytes)
    reading = anyio.CancelScope()
    written = anyio.Event()

    async def forward() -> None:
        async with lines_receive, read_send, replies:
            with reading:
                async for line in lines_receive:
                    try:
                        parsed = parse_line(line) if line is not None else [_error(
                            None, INVALID_REQUEST, f"Invalid request: longer than {max_line_bytes} bytes")]
                    except Exception:  # a bug here must cost one line, not the session
                        log.exception("could not parse a line")
                        parsed = [_error(None, INTERNAL_ERROR, "Internal error: the line could not be parsed")]
                    if isinstance(parsed, list):
                        for error in parsed:
                            await replies.send(SessionMessage(error))
                    elif parsed is not None:
                        assert line is not None
                        if isinstance(parsed, JSONRPCRequest):
                            await in_flight.admit(parsed.id, len(line))
                        elif isinstance(parsed, JSONRPCNotification) and parsed.method == "notifications/cancelled":
                            request_id = (parsed.params or {}).get("requestId")
                            if isinstance(request_id, str | int):
                                in_flight.settle(request_id)
                        await read_send.send(SessionMessage(parsed))

    async def take() -> bytes | None:
        while True:
            try:
                message = (await write_receive.receive()).message
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
                in_flight.settle(message.id)
            if line := _line_of(message):
                return line

    def writer_gone() -> None:
        """The writer ended: the stream is done, or the client stopped taking our output. Stop reading
        (the session ends as on EOF) and fail further sends instead of letting them wait forever."""
        written.set()
        write_receive.close()
        reading.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(forward)
            threading.Thread(target=_read_lines, name="stdio-reader", daemon=True,
                             args=(wire_in, max_line_bytes, lines_send.send, lines_send.close, token)).start()
            threading.Thread(target=_write_lines, name="stdio-writer", daemon=True,
                             args=(wire_out, take, writer_gone, token)).start()
            try:
                yield read_receive, write_send
            finally:
                reading.cancel()
                write_send.close()
                with anyio.move_on_after(FLUSH_TIMEOUT, shield=True):
                    await written.wait()
    finally:
        restore()
