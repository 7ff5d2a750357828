"""Relay of one run: runtime events from any native thread to coalesced MCP progress notifications.

The runtime's callback thread only appends the event to a deque and, if no wake-up is pending,
schedules one on the event loop (`call_soon_threadsafe`): it never waits for the loop. The pump
on the loop drains everything that arrived and sends it as one `notifications/progress`
(progress = tokens so far, total = the token limit, message = the new text). While a
notification is being written, new tokens pile up and go out together in the next one, so a
slow client never stalls the NPU and relay cost stays flat at any token rate; at NPU pace each
token goes out on its own, at once.

Cancelling the awaiting task (`notifications/cancelled`, a client timeout, a dropped
connection) calls the abort function, waits for the run's thread to end, and re-raises.
All state of a run lives in its Relay; nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

from mcp_rkllm.runtime.base import RunEvent, Token, TokenBatch, Waiting

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Sends one progress notification: (progress, total, message).
Reporter = Callable[[float, float | None, str | None], Awaitable[None]]

#: Tells whether the client of this call has gone away (a dropped HTTP connection).
GoneCheck = Callable[[], Awaitable[bool]]

#: How often a run checks that its HTTP client is still connected.
DISCONNECT_POLL_SECONDS = 0.25

#: Under load, notifications go out at most this often (what arrives meanwhile is batched). Tokens
#: further apart than this (an NPU's 10-50 tokens/s) each go out the moment they arrive.
MIN_INTERVAL_SECONDS = 0.005


class Relay(Generic[T]):
    """Carries the events of one run to `report`. Create it on the event loop that will pump it."""

    def __init__(self, report: Reporter, total: int | None = None, gone: GoneCheck | None = None):
        self._report = report
        self._gone = gone
        self._total = float(total) if total else None
        self._loop = asyncio.get_running_loop()
        self._pieces: list[str] = []  # appended by the runtime's thread, read by the pump
        self._count = 0  # tokens so far (text pieces and RKLLM_RUN_WAITING tokens)
        self._sent = 0  # pieces already sent
        self._wake = asyncio.Event()
        self._scheduled = False
        self._ended = False
        self._thread_done = threading.Event()
        self.tokens = 0
        self.notifications = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.client_gone = False

    # ----------------------------------------------------------------- any thread

    def sink(self, event: RunEvent) -> None:
        """The runtime's EventSink: never blocks, never raises."""
        kind = type(event)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if kind is Token:
            self._pieces.append(event.text)  # type: ignore[union-attr]
            self._count += 1
        elif kind is Waiting:
            self._count += 1
            return  # no text yet: the piece that completes the character wakes the pump
        elif kind is TokenBatch:
            self._pieces.extend(event.texts)  # type: ignore[union-attr]
            self._count += len(event.token_ids)  # type: ignore[union-attr]
        else:
            return  # hidden states, logits, finish, error: only the final result carries them
        if not self._scheduled:  # one wake-up per batch: the pump re-arms this just before it drains
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # loop closed: the client is gone, nobody to tell
                self._loop.call_soon_threadsafe(self._wake.set)

    def _on_end(self) -> None:
        self._ended = True
        self._wake.set()

    # ----------------------------------------------------------------- event loop

    async def _flush(self) -> None:
        end = len(self._pieces)
        if end == self._sent:
            return
        text = "".join(self._pieces[self._sent:end])
        self._sent = end
        if not text:  # only tokens of an unfinished character (a worker forwards them as ""): wait for it
            return
        self.tokens = self._count  # read after `end`: counts at least the pieces being sent
        self.notifications += 1
        await self._report(self.tokens, self._total, text)

    async def _watch_client(self, scope: anyio.CancelScope) -> None:
        # Streamable HTTP keeps a request alive when its connection drops (clients may resume),
        # so a vanished client would otherwise leave the NPU generating for nobody.
        assert self._gone is not None
        while True:
            await anyio.sleep(DISCONNECT_POLL_SECONDS)
            if await self._gone():
                log.info("client disconnected: aborting the run")
                self.client_gone = True
                scope.cancel()
                return

    async def _pump(self) -> None:
        last_sent = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = last_sent + MIN_INTERVAL_SECONDS - time.monotonic()
            if wait > 0 and not self._ended:
                await anyio.sleep(wait)  # tokens are streaming fast: let them batch up
            self._scheduled = False  # events from now on wake the pump again
            ended = self._ended  # read before draining: events precede the end marker
            sent = self.notifications
            await self._flush()
            if self.notifications != sent:
                last_sent = time.monotonic()
            if ended and self._sent == len(self._pieces):
                return

    async def run(self, blocking: Callable[[], T], abort: Callable[[], None], abort_timeout: float = 30.0) -> T:
        """Run `blocking` (which feeds `self.sink`) on its own thread, relaying until it returns.

        Returns what `blocking` returned (or raises what it raised) once every event has been
        relayed. On cancellation: `abort()`, wait up to `abort_timeout` seconds for the thread
        to finish, then re-raise the cancellation.
        """
        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["value"] = blocking()
            except BaseException as exc:
                box["error"] = exc
            finally:
                self._thread_done.set()
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._on_end)

        threading.Thread(target=target, name="rkllm-run", daemon=True).start()
        try:
            async with anyio.create_task_group() as tg:
                if self._gone is not None:
                    tg.start_soon(self._watch_client, tg.cancel_scope)
                await self._pump()
                tg.cancel_scope.cancel()
            if self.client_gone:
                raise anyio.get_cancelled_exc_class()()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                try:
                    abort()
                except Exception:
                    log.exception("rkllm_abort failed while cancelling a run")
                stopped = await anyio.to_thread.run_sync(self._thread_done.wait, abort_timeout)
                if not stopped:
                    log.error("the runtime did not stop within %.0f s of rkllm_abort", abort_timeout)
            raise
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]
