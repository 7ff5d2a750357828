"""Server state shared by every tool: the runtime, and the table of loaded handles.

A handle is an opaque string id for one `LoadedModel`. One run per handle at a time: a run (or
a call that changes the handle's state) takes the handle's slot, waiting up to
`Settings.busy_timeout` before answering BUSY. The slot is a `threading.Lock` so that an
asynchronous run can give it back from the runtime's thread when it ends.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.metrics import Metrics
from mcp_rkllm.models.paths import PathPolicy, default_cache_dir
from mcp_rkllm.models.store import ModelStore, bundled_model
from mcp_rkllm.runtime.base import AsyncRun, LoadedModel, RunEvent, Runtime, Token, TokenBatch, Waiting
from mcp_rkllm.structs import RKLLMExtendParam, RKLLMParam, RunResult

log = logging.getLogger(__name__)

#: How many crashed handles keep answering RUNTIME_CRASHED (instead of UNKNOWN_HANDLE).
CRASH_MEMORY = 256


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_memory(model_path: str, function: str) -> None:
    """LIMIT_EXCEEDED when the model file is larger than the memory available to load it into."""
    try:
        size = os.stat(model_path).st_size
    except OSError:
        return  # the runtime reports a missing file itself
    available = available_memory_bytes()
    if available is not None and size > available:
        raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"the model file {os.path.basename(model_path)}",
                         value=f"{size / 2**20:.0f} MB", limit=f"{available / 2**20:.0f} MB of available memory")


class AsyncRunState:
    """What an rkllm_run_async run has produced so far, readable by rkllm_run_async_result."""

    def __init__(self, run_id: str, total: int | None):
        self.run_id = run_id
        self.total = total
        self.pieces: list[str] = []
        self._ends: list[int] = []  # character offset where each piece ends, for text_since
        self.text_length = 0
        self.tokens = 0
        self.run: AsyncRun | None = None
        self.result: RunResult | None = None
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def sink(self, event: RunEvent) -> None:
        """EventSink for the runtime (any thread)."""
        if type(event) is Token:
            with self._lock:
                self.pieces.append(event.text)
                self.text_length += len(event.text)
                self._ends.append(self.text_length)
                self.tokens += 1
        elif type(event) is Waiting:
            with self._lock:
                self.tokens += 1
        elif type(event) is TokenBatch:
            with self._lock:
                self.pieces.extend(event.texts)
                for text in event.texts:
                    self.text_length += len(text)
                    self._ends.append(self.text_length)
                self.tokens += len(event.token_ids)
        else:
            return
        self._notify()

    def finish(self, result: RunResult) -> None:
        """Called once the run has ended (any thread)."""
        self.result = result
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that waiter's loop is closed
                loop.call_soon_threadsafe(event.set)

    def text_since(self, offset: int) -> str:
        """The generated text from character `offset` on."""
        with self._lock:
            first = bisect.bisect_right(self._ends, offset)  # the piece holding character `offset`
            start = self._ends[first - 1] if first else 0
            return "".join(self.pieces[first:])[offset - start:]

    async def changed(self, timeout: float) -> None:
        """Wait until new text arrives or the run ends, at most `timeout` seconds."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.append(entry)
        try:
            with anyio.move_on_after(timeout):
                await event.wait()
        finally:
            with self._lock:
                self._waiters.remove(entry)


@dataclass
class HandleEntry:
    """One loaded model and its run slot."""

    id: str
    model: LoadedModel
    param: RKLLMParam
    slot: threading.Lock = field(default_factory=threading.Lock)
    async_run: AsyncRunState | None = None
    model_name: str | None = None
    conversation: list[dict[str, str]] = field(default_factory=list)
    """The chat messages the KV cache holds (for chat's incremental turns)."""
    runs: int = 0
    waiting: int = 0
    loaded_at: float = field(default_factory=time.time)

    async def acquire(self, timeout: float, function: str, max_waiting: int | None = None) -> None:
        """Take the run slot, polling for up to `timeout` seconds, else raise BUSY (cancellable).

        With `max_waiting`, a call that would be one too many in the queue is refused at once.
        """
        if self.slot.acquire(blocking=False):
            return
        if max_waiting is not None and self.waiting >= max_waiting:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"calls queued on handle {self.id}",
                             value=self.waiting + 1, limit=max_waiting)
        deadline = time.monotonic() + timeout
        delay = 0.002
        self.waiting += 1
        try:
            while not self.slot.acquire(blocking=False):
                if time.monotonic() >= deadline:
                    raise RkllmError("BUSY", function=function, handle=self.id, waited_s=round(timeout, 3))
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            self.waiting -= 1

    def release(self) -> None:
        """Give the run slot back (from any thread)."""
        self.slot.release()

    @asynccontextmanager
    async def using(self, timeout: float, function: str, max_waiting: int | None = None) -> AsyncIterator[HandleEntry]:
        """Hold the run slot for the body."""
        await self.acquire(timeout, function, max_waiting)
        try:
            yield self
        finally:
            self.release()


class AppState:
    """The runtime and the handles, shared by every connection of one server process."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None):
        self.settings = settings
        self.runtime: Runtime | None = runtime
        self.runtime_error: RkllmError | None = None
        self.handles: dict[str, HandleEntry] = {}
        self._users = 0
        self._opened = runtime is not None
        self.runtime_reason = "injected" if runtime is not None else ""
        self.store = ModelStore.from_dirs(list(settings.models))
        bundled = bundled_model()
        self.paths = PathPolicy(self.store.roots + ([bundled.parent] if bundled else []),
                                Path(settings.cache_dir) if settings.cache_dir else default_cache_dir())
        self.default_handle: str | None = None
        self.crashed: dict[str, RkllmError] = {}
        """Handles whose worker died, and why (the newest CRASH_MEMORY of them)."""
        self.load_lock = anyio.Lock()
        self.metrics = Metrics()
        self.started = time.time()
        self.request_is_response_stream = False
        """True on Streamable HTTP: a dropped tools/call request means the client is gone."""

    def open(self) -> None:
        """Load the runtime once (after the transport is up; never at import)."""
        self._users += 1
        if self._opened:
            return
        self._opened = True
        from mcp_rkllm.runtime import open_runtime

        try:
            self.runtime, self.runtime_reason = open_runtime(self.settings)
        except RkllmError as exc:
            self.runtime_error = exc
            log.error("no runtime: %s (hint: %s)", exc.message, exc.spec.hint)
            return
        info = self.runtime.describe()
        log.info("runtime %s (%s): %s", info["runtime"], self.runtime_reason,
                 ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("runtime", "functions")))

    async def close(self) -> None:
        """Drop one user; the last one aborts and destroys every handle."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
        for entry in list(self.handles.values()):
            try:
                await anyio.to_thread.run_sync(entry.model.destroy)
            except Exception:
                log.exception("destroying handle %s failed", entry.id)
        self.handles.clear()
        self.default_handle = None

    def require_runtime(self, function: str) -> Runtime:
        """The runtime, or the error that kept it from loading."""
        if self.runtime is not None:
            return self.runtime
        if self.runtime_error is not None:
            err = self.runtime_error
            raise RkllmError(err.code, function=function, **err.fields)
        raise RkllmError("RUNTIME_UNAVAILABLE", function=function, detail="the server has not started a runtime")

    async def destroy(self, entry: HandleEntry, function: str) -> None:
        """Abort the handle's run, wait for its slot, and free it."""
        if entry.model.is_running():
            entry.model.abort()
        async with entry.using(self.settings.abort_timeout, function):
            self.handles.pop(entry.id, None)
            if self.default_handle == entry.id:
                self.default_handle = None
            await anyio.to_thread.run_sync(entry.model.destroy)

    def get(self, handle: str, function: str) -> HandleEntry:
        """The entry of `handle`; UNKNOWN_HANDLE, or RUNTIME_CRASHED (once) if its worker died."""
        entry = self.handles.get(handle)
        if entry is None:
            crash = self.crashed.get(handle)
            if crash is not None:
                raise RkllmError(crash.code, function=function, **crash.fields)
            raise RkllmError("UNKNOWN_HANDLE", function=function, handle=handle)
        crash = getattr(entry.model, "crash", None)
        if crash is not None:
            raise self.crashed_error(entry, crash, function)
        return entry

    def crashed_error(self, entry: HandleEntry, crash: RkllmError, function: str) -> RkllmError:
        """Free a handle whose worker died; the error this and every later call on it gets."""
        error = RkllmError("RUNTIME_CRASHED", function=function, **{**crash.fields, "handle": entry.id})
        self.crashed[entry.id] = error
        while len(self.crashed) > CRASH_MEMORY:
            self.crashed.pop(next(iter(self.crashed)))
        self.handles.pop(entry.id, None)
        if self.default_handle == entry.id:
            self.default_handle = None
        return error

    async def load(self, param: RKLLMParam, function: str, model_name: str | None = None) -> HandleEntry:
        """rkllm_init through the runtime, after the checks the hardware needs; registers the handle."""
        runtime = self.require_runtime(function)
        if len(self.handles) >= self.settings.max_loaded_models:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what="the number of loaded models",
                             value=len(self.handles) + 1, limit=self.settings.max_loaded_models)
        if param.model_path:
            param = param.model_copy(update={"model_path": self.paths.model_file(param.model_path, function)})
        param = self._prepare(runtime, param, function)
        model = await anyio.to_thread.run_sync(runtime.init, param)
        return self.add(model, param, model_name)

    def _prepare(self, runtime: Runtime, param: RKLLMParam, function: str) -> RKLLMParam:
        if param.model_path:
            check_memory(param.model_path, function)
        ext = param.extend_param or RKLLMExtendParam()
        if runtime.name == "native" and ext.base_domain_id is None:
            # Concurrent NPU models each get their own memory domain unless the client chose one.
            used = {e.param.extend_param.base_domain_id for e in self.handles.values() if e.param.extend_param}
            domain = next(d for d in range(len(used) + 1) if d not in used)
            param = param.model_copy(update={"extend_param": ext.model_copy(update={"base_domain_id": domain})})
        return param

    def add(self, model: LoadedModel, param: RKLLMParam, model_name: str | None = None) -> HandleEntry:
        """Register a new model under a fresh opaque id."""
        handle = "h-" + secrets.token_hex(6)
        entry = HandleEntry(handle, model, param, model_name=model_name)
        set_label = getattr(model, "set_label", None)  # worker processes log under their handle
        if set_label is not None:
            set_label(handle)
        self.handles[handle] = entry
        return entry
