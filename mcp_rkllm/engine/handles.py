"""Handles: the loaded things clients name by opaque id, each with its run slot.

One run (or state change) per handle at a time: a call takes the handle's `Slot`, first come
first served, waiting up to `busy_timeout` before BUSY; a call that would queue beyond
`max_queued_runs` is refused at once (LIMIT_EXCEEDED); calls still waiting when the handle is
freed get CANCELLED. The slot lives on the event loop; a run that ends on a runtime thread (an
rkllm_run_async run) gives it back with `release_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from mcp_rkllm.engine.relay import LoopSignal
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import AsyncRun
from mcp_rkllm.models.families import DEFAULT, Family, Vision
from mcp_rkllm.runtime.base import LoadedModel
from mcp_rkllm.runtime.vision import EncoderShape
from mcp_rkllm.structs import RKLLMParam, RunResult


class Slot:
    """A handle's run slot: a FIFO lock for the event loop with a bounded queue and a BUSY timeout."""

    def __init__(self, handle: str):
        self.handle = handle
        self.held = False
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free = asyncio.Event()
        self._free.set()
        self.closed = False

    @property
    def waiting(self) -> int:
        """Calls waiting for the slot now."""
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self, timeout: float, function: str, max_waiting: int | None = None) -> None:
        """Take the slot, waiting at most `timeout` seconds (BUSY); cancellable."""
        self._loop = asyncio.get_running_loop()
        if self.closed:
            raise RkllmError("CANCELLED", function=function, detail=f": handle {self.handle} was freed")
        if not self.held and not self.waiting:
            self.held = True
            self._free.clear()
            return
        if max_waiting is not None and self.waiting >= max_waiting:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"calls queued on handle {self.handle}",
                             value=self.waiting + 1, limit=max_waiting)
        turn: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append(turn)
        try:
            with anyio.move_on_after(timeout):
                await asyncio.shield(turn)
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.result():
                self.release()  # it was handed to us as we were cancelled: pass it on
            turn.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(turn)
        if not turn.done():
            turn.cancel()
            raise RkllmError("BUSY", function=function, handle=self.handle, waited_s=round(timeout, 3))
        if not turn.result() or self.closed:
            if turn.result():
                self.release()
            raise RkllmError("CANCELLED", function=function,
                             detail=f": handle {self.handle} was freed while the call waited for it")

    def release(self) -> None:
        """Give the slot to the next waiter, or free it (on the event loop)."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self.held = False
        self._free.set()

    async def wait_free(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the holder to release the slot; whether it did."""
        with anyio.move_on_after(timeout):
            await self._free.wait()
        return not self.held

    def release_threadsafe(self) -> None:
        """`release()` from any thread."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody can be waiting
            self._loop.call_soon_threadsafe(self.release)

    def close(self) -> None:
        """Refuse every waiting and future call with CANCELLED (the handle is being freed); the
        current holder keeps the slot until it releases it."""
        self.closed = True
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(False)

    @asynccontextmanager
    async def hold(self, timeout: float, function: str, max_waiting: int | None = None) -> AsyncIterator[None]:
        """Hold the slot for the body."""
        await self.acquire(timeout, function, max_waiting)
        try:
            yield
        finally:
            self.release()


class AsyncRunReader:
    """An rkllm_run_async run as its readers see it: text since an offset, a wait for news."""

    def __init__(self, run_id: str, total: int | None, run: AsyncRun):
        self.run_id = run_id
        self.total = total
        self.run = run
        self._text = ""
        self._cursor = 0  # tokens already joined into _text
        self._signal = LoopSignal()
        run.collector.listeners.append(self._signal.set)
        run.add_done_callback(lambda _: self._signal.set())

    @property
    def result(self) -> RunResult | None:
        """The whole result once the run has ended."""
        return self.run.wait(0) if self.run.done else None

    @property
    def tokens(self) -> int:
        return self.run.collector.token_count

    @property
    def text_length(self) -> int:
        """Characters generated so far."""
        self._catch_up()
        return len(self._text)

    def _catch_up(self) -> None:
        c = self.run.collector
        end = len(c.token_ids)
        if end > self._cursor:
            self._text += "".join(c.pieces[self._cursor:end])
            self._cursor = end

    def text_since(self, offset: int) -> str:
        """The generated text from character `offset` on."""
        self._catch_up()
        return self._text[offset:]

    async def changed(self, timeout: float) -> None:
        """Wait until new text arrives or the run ends, at most `timeout` seconds."""
        with anyio.move_on_after(timeout):
            await self._signal.wait()
        self._signal.clear()
        self._signal.rearm()


@dataclass
class Handle:
    """One loaded model and its run slot."""

    id: str
    model: LoadedModel
    param: RKLLMParam
    model_name: str | None = None
    slot: Slot = field(init=False)
    limiter: anyio.CapacityLimiter = field(init=False)
    """Threads for this handle's model calls: a stuck worker uses up its own, nobody else's."""
    async_run: AsyncRunReader | None = None
    conversation: list[dict[str, str]] = field(default_factory=list)
    """The chat messages the KV cache holds (for chat's incremental turns)."""
    running: bool = False
    """A run is in progress (the engine's own record: reading it never calls into the runtime)."""
    runs: int = 0
    loaded_at: float = field(default_factory=time.time)
    freed: bool = False
    """A client freed it (rkllm_destroy / unload_model): its worker's exit is no crash."""
    owner: str | None = None
    """The session or connection that made it with rkllm_init (only it sees the handle, and the handle goes when
    it ends); None for a handle shared server-wide (loaded by name, or made without a session)."""
    last_used: float = field(default_factory=time.monotonic)
    """When a call last named it (handles idle longer than keep_alive are unloaded)."""
    family: Family = DEFAULT
    """How this model's replies mark reasoning and tool calls (from its file name or sidecar)."""
    chat_tools: tuple[str, str] | None = None
    """The (system prompt, tools JSON) chat last gave the runtime, None when it gave none."""
    encoder: EncoderShape | RkllmError | None = None
    """A vision model's encoder (open in the model's process), or why it could not be opened; None: text only."""
    vision: Vision | None = None
    """A vision model's image tags and pad fill (its family's, overlaid with its sidecar's)."""

    def __post_init__(self) -> None:
        self.slot = Slot(self.id)
        self.limiter = anyio.CapacityLimiter(4)
