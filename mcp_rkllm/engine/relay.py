"""Streaming: the one bridge from runtime threads into the event loop, and the relay of one run.

`LoopSignal` wakes a coroutine from any thread with at most one wake-up pending, so the cost on
the runtime's thread is an attribute check per token. The `Relay` runs a blocking `rkllm_run` on
its own thread and sends what the run's collector gathers to any async `StreamSink` (MCP
progress today, SSE chunks or JSON-RPC notifications tomorrow): everything that arrived since the
last update goes out as one `Progress`, so a slow client never stalls the runtime, and updates go
out at most every MIN_INTERVAL_SECONDS under load (tokens spaced wider, as from an NPU, go out
one by one at once). Cancelling the awaiting task (a cancelled request, a timeout, a client that
went away) aborts the run, waits for its thread to end, and re-raises. All state of a run lives
in its Relay and its collector; nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import RunCollector

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a run checks that its client is still connected.
DISCONNECT_POLL_SECONDS = 0.25

#: Under load, updates go out at most this often (what arrives meanwhile is batched).
MIN_INTERVAL_SECONDS = 0.005

#: While a model loads or a prompt is read, a status update goes out this often (clients that reset their
#: timeout on progress then wait as long as it takes).
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Progress:
    """One streamed update: tokens so far, the token limit when known, the new text and its token ids.

    `kind` says what the text is when the reply is read by its model family (generate, chat): "content"
    (for the user), "reasoning", or "tool_call" (the raw text of a call; the decoded call, OpenAI-shaped,
    comes in `tool_call` of an update with no text). Runs of the C-level calls are all "content".
    "status" is a heartbeat while nothing else can be said (`loading Qwen3… 4 s`, `reading the prompt… 2 s`).
    """

    progress: int
    total: int | None
    text: str
    token_ids: tuple[int, ...] = ()
    kind: Literal["content", "reasoning", "tool_call", "status"] = "content"
    tool_call: dict[str, Any] | None = None


#: Receives a run's updates, in order, on the event loop.
StreamSink = Callable[[Progress], Awaitable[None]]

#: Tells whether the client of a call has gone away (a dropped HTTP connection).
GoneCheck = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Stream:
    """The context of one call: where its streamed output goes (None: nowhere), how to tell its client has left,
    and who calls (`owner`: the MCP session or JSON-RPC connection; None for a caller with no session, such as
    a stateless HTTP request). Handles a session makes with rkllm_init are visible to that session only."""

    sink: StreamSink | None = None
    gone: GoneCheck | None = None
    owner: str | None = None


#: A call with nobody listening to its progress.
NO_STREAM = Stream()


@contextlib.asynccontextmanager
async def heartbeat(stream: Stream, what: str, still: Callable[[], bool] = lambda: True) -> AsyncIterator[None]:
    """While the body runs (and `still()` holds), send `"{what}… N s"` as a status update every
    HEARTBEAT_SECONDS (nothing when the stream has no sink). A sink that fails (the client left) just ends it."""
    sink = stream.sink
    if sink is None:
        yield
        return
    started = time.monotonic()

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if not still():
                return
            try:
                await sink(Progress(0, None, f"{what}… {time.monotonic() - started:.0f} s", kind="status"))
            except Exception:
                return

    task = asyncio.ensure_future(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class LoopSignal:
    """Wakes a coroutine on this event loop from any thread; coalesced (one wake-up pending at most).

    Create it on the loop. `set()` may be called from any thread; `wait()` and `rearm()` on the loop.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._scheduled = False

    def set(self) -> None:
        """Wake the waiter (any thread; never blocks, never raises)."""
        if self._scheduled:
            return
        self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._event.set)

    def wake_now(self) -> None:
        """Wake the waiter from the loop's own thread, whether or not a wake-up is pending."""
        self._event.set()

    async def wait(self) -> None:
        """Until `set()` has been called since the last `rearm()`."""
        await self._event.wait()

    def clear(self) -> None:
        """Forget the wake-up that ended `wait()` (call before reading the state)."""
        self._event.clear()

    def rearm(self) -> None:
        """Let the next `set()` schedule a wake-up again (call just before draining the state)."""
        self._scheduled = False


class Relay:
    """Carries one run from its collector to a stream. Create it on the event loop that pumps it."""

    def __init__(self, collector: RunCollector, stream: Stream, total: int | None = None):
        self.collector = collector
        self._stream = stream
        self._total = total or None
        self._signal = LoopSignal()
        self._sent = 0  # tokens already sent
        self._held_ids: list[int] = []  # ids of tokens sent without text yet (an unfinished character)
        self._ended = False
        self._thread_done = threading.Event()
        self.updates = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.client_gone = False
        collector.listeners.append(self._signal.set)

    def _on_end(self) -> None:
        self._ended = True
        self._signal.wake_now()

    async def _flush(self) -> None:
        c = self.collector
        end = len(c.token_ids)
        if end == self._sent:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        sink = self._stream.sink
        if sink is None:
            self._sent = end
            return
        text = "".join(c.pieces[self._sent:end])
        self._held_ids.extend(c.token_ids[self._sent:end])
        self._sent = end
        if not text:  # only tokens of an unfinished character: wait for the rest
            return
        token_ids = tuple(self._held_ids)
        self._held_ids.clear()
        self.updates += 1
        await sink(Progress(end, self._total, text, token_ids))

    async def _watch_client(self, scope: anyio.CancelScope) -> None:
        # Streamable HTTP keeps a request alive when its connection drops (clients may resume),
        # so a vanished client would otherwise leave the NPU generating for nobody.
        gone = self._stream.gone
        assert gone is not None
        while True:
            await anyio.sleep(DISCONNECT_POLL_SECONDS)
            if await gone():
                log.info("client disconnected: aborting the run")
                self.client_gone = True
                scope.cancel()
                return

    async def _pump(self) -> None:
        last_sent = 0.0
        while True:
            await self._signal.wait()
            self._signal.clear()
            wait = last_sent + MIN_INTERVAL_SECONDS - time.monotonic()
            if wait > 0 and not self._ended:
                await anyio.sleep(wait)  # tokens are streaming fast: let them batch up
            self._signal.rearm()  # events from now on wake the pump again
            ended = self._ended  # read before draining: events precede the end marker
            sent = self.updates
            await self._flush()
            if self.updates != sent:
                last_sent = time.monotonic()
            if ended and self._sent == len(self.collector.token_ids):
                return

    async def run(self, blocking: Callable[[], T], abort: Callable[[], Awaitable[None]],
                  abort_timeout: float = 30.0) -> T:
        """Run `blocking` (which feeds the collector) on its own thread, relaying until it returns.

        Returns what `blocking` returned (or raises what it raised) once every update has been
        sent. On cancellation: `await abort()`, wait up to `abort_timeout` seconds for the thread
        to finish, then re-raise the cancellation.
        """
        box: dict[str, object] = {}
        loop = asyncio.get_running_loop()

        def target() -> None:
            try:
                box["value"] = blocking()
            except BaseException as exc:
                box["error"] = exc
            finally:
                self._thread_done.set()
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._on_end)

        threading.Thread(target=target, name="rkllm-run", daemon=True).start()
        try:
            await self._relay_until_end()
        except BaseException:
            # Cancelled (a cancelled request, a timeout, a client gone) or the sink failed (its
            # stream is closed): nobody will read this run, so stop the runtime and wait for it.
            with anyio.CancelScope(shield=True):
                try:
                    await abort()
                except Exception:
                    log.exception("rkllm_abort failed while cancelling a run")
                stopped = await anyio.to_thread.run_sync(self._thread_done.wait, abort_timeout)
                if not stopped:
                    log.error("the runtime did not stop within %.0f s of rkllm_abort", abort_timeout)
            raise
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    async def _relay_until_end(self) -> None:
        """Pump until the run's thread has ended and every update is out; with a `gone` check, also
        watch the client and end with a cancellation when it has left. Until the first token, a status
        heartbeat says the prompt is being read."""
        async with heartbeat(self._stream if self.first_token_at is None else NO_STREAM, "reading the prompt",
                             lambda: self.first_token_at is None and not self._ended):
            await self._relay_watching()

    async def _relay_watching(self) -> None:
        if self._stream.gone is None:
            await self._pump()
            return
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_client, tg.cancel_scope)
                await self._pump()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the pump's own failure, not wrapped
            raise group.exceptions[0] from None
        if self.client_gone:
            # A coded error, not a cancellation: raising a bare cancellation outside its scope would
            # tear down whatever task group serves the call (on Streamable HTTP: the whole session).
            raise RkllmError("CANCELLED", detail=": the client disconnected")
