"""The Engine: the application behind every surface, with no transport in it.

It owns the runtime (in this process or in supervised workers), the handle table and run slots,
crash memory, the memory check and NPU domain ids, the model store and path policy, chat history
and metrics. Each public coroutine is one operation: it takes the operation's params model
(`engine.types`) and a `Stream` for what it streams, and returns the result model or raises an
`RkllmError` from the table. Surfaces (MCP, JSON-RPC, HTTP APIs) are thin adapters onto these.

Every call into a model runs on a worker thread; calls into a worker process are bounded by
`worker_timeout` (see `isolation.supervisor`), so the event loop never waits on a runtime and a
stuck handle stalls nobody else. Status, model lists and loaded-model lists read the engine's own
records and never call into a runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from mcp_rkllm import __version__
from mcp_rkllm.config import Settings
from mcp_rkllm.engine.handles import AsyncRunReader, Handle
from mcp_rkllm.engine.limits import enforce
from mcp_rkllm.engine.metrics import Metrics
from mcp_rkllm.engine.parsing import ParseResult
from mcp_rkllm.engine.relay import NO_STREAM, Progress, Relay, Stream, heartbeat
from mcp_rkllm.engine.replies import StopWatch, render_history, reply_stream, with_tool_format
from mcp_rkllm.engine.rknn import RknnContexts
from mcp_rkllm.engine.types import (
    AbortResult,
    AsyncResultParams,
    AsyncRunReport,
    ChatMessage,
    ChatParams,
    ChatResult,
    ChatTemplateParams,
    ClearKvParams,
    CrossAttnParams,
    DefaultParamResult,
    DestroyResult,
    DoctorCheck,
    DoctorParams,
    DoctorResult,
    EmbedParams,
    EmbedResult,
    FunctionToolsParams,
    GenerateParams,
    GenerateResult,
    HandleParams,
    InitParams,
    InitResult,
    KvSizeResult,
    ListModelsParams,
    ListModelsResult,
    LoadedEntry,
    LoadedParams,
    LoadedResult,
    LoadModelParams,
    LoadModelResult,
    LoraParams,
    ModelEntry,
    NoParams,
    Ok,
    Params,
    PromptCacheParams,
    RunAsyncResult,
    RunningResult,
    RunParams,
    RunToolResult,
    Sampling,
    StatusParams,
    StatusResult,
    UnloadParams,
    UnloadResult,
)
from mcp_rkllm.engine.vision import (
    IMAGE_TAG,
    image_bytes,
    init_tags,
    multimodal_input,
    split_content,
    vision_of,
)
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import OutputLimit, RunCollector
from mcp_rkllm.isolation.supervisor import WorkerLimits, WorkerModel, WorkerRuntime
from mcp_rkllm.models import images
from mcp_rkllm.models.families import Family, Vision, family_for
from mcp_rkllm.models.paths import PathPolicy, default_cache_dir
from mcp_rkllm.models.store import ChatTemplate, ModelInfo, ModelStore
from mcp_rkllm.runtime import choose_runtime, open_in_process
from mcp_rkllm.runtime.base import (
    HistoryPriming,
    LoadedModel,
    Runtime,
    Seeding,
    Seeing,
    Tokenizing,
    effective_max_new_tokens,
    process_memory_mb,
    produces_text,
)
from mcp_rkllm.runtime.vision import EncoderShape
from mcp_rkllm.structs import (
    RKLLMExtendParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMParam,
    RKLLMTokenInput,
    RunResult,
    overlay_param,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How many crashed handles keep answering RUNTIME_CRASHED (instead of UNKNOWN_HANDLE).
CRASH_MEMORY = 256
#: Seconds between the aborts rkllm_destroy sends a run that has not ended yet.
ABORT_REPEAT = 0.1
#: Deepest JSON nesting a tools list may have (the runtime parses it again, in C).
MAX_JSON_DEPTH = 64


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _json_depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (None, for JSON too deep to parse, counts as infinite)."""
    if value is None:
        return 1 << 30
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        level = [c for v in level if isinstance(v, list | dict) for c in (v.values() if isinstance(v, dict) else v)
                 if isinstance(c, list | dict)]
    return depth


def visible(h: Handle, owner: str | None) -> bool:
    """Whether a caller with `owner` may see the handle: shared handles are everyone's, others their owner's."""
    return h.owner is None or h.owner == owner


#: The system prompt given with tools when the conversation has none.
DEFAULT_TOOLS_SYSTEM = "You are a helpful assistant."


def _system_prompt(turns: list[dict[str, str]]) -> str:
    """The conversation's system prompt (the first system turn's text), "" when it has none."""
    return next((t["content"] for t in turns if t["role"] == "system"), "")


async def _stopped(result: RunResult, watch: StopWatch | None) -> RunResult:
    """The run's result cut at its first stop string: a run that met one ends with "stop", not "abort"."""
    if watch is None:
        return result
    text = await watch.finish(result.text)
    if watch.cut is None:
        return result
    return result.model_copy(update={"text": text, "finish_reason": "stop"})


def _understood(parsed: ParseResult, family: Family) -> dict[str, Any]:
    """The result fields of a reply split by its family."""
    return {"text": parsed.content, "content": parsed.content, "reasoning": parsed.reasoning,
            "tool_calls": parsed.tool_calls, "raw_text": parsed.raw_text, "warnings": parsed.warnings,
            "family": family.name}


def _flatten(messages: list[dict[str, str]]) -> str:
    """Earlier turns as text before the new message, for runtimes that cannot be given a history."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages[:-1]]
    return ("Conversation so far:\n" + "\n".join(lines) + "\n\n" if lines else "") + messages[-1]["content"]


class Engine:
    """The application: models, handles, runs. One per server process, shared by every connection."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None):
        self.settings = settings
        self.runtime: Runtime | None = runtime
        self.runtime_error: RkllmError | None = None
        self.runtime_reason = "injected" if runtime is not None else ""
        self.handles: dict[str, Handle] = {}
        self.default_handle: str | None = None
        self.crashed: dict[str, RkllmError] = {}
        """Handles whose worker died, and why (the newest CRASH_MEMORY of them)."""
        self.store = ModelStore.from_dirs(list(settings.models))
        # The same directories the store lists models from, so that what is listed loads.
        self.paths = PathPolicy(self.store.allowed_roots(),
                                Path(settings.cache_dir) if settings.cache_dir else default_cache_dir())
        self.metrics = Metrics()
        self.started = time.time()
        self.server_id = settings.server_id or f"{socket.gethostname()}:{settings.port}"
        """This server's name in a fleet (the X-RKLLM-Server header, server_status)."""
        self.route_tag = hashlib.sha256(self.server_id.encode()).hexdigest()[:8]
        """Starts every handle id (`h-<route_tag>-<random>`): a proxy routes a request naming a handle by it."""
        self._users = 0
        self._opened = runtime is not None
        self._default_lock = anyio.Lock()
        self._open_lock = anyio.Lock()
        # Reservations taken before a slow load and given back after it, so concurrent loads
        # cannot race past the limits: load count, NPU domain ids, memory.
        self._loading = 0
        self._reserved_domains: set[int] = set()
        self._reserved_bytes = 0
        self._reaper: asyncio.Task[None] | None = None
        self.rknn = RknnContexts(self)

    # ================================================================= life cycle

    async def open(self) -> None:
        """Open the runtime once (after the transport is up; never at import), on a thread: opening
        may start a probe worker or load a library. Counts users; concurrent first users wait for it."""
        self._users += 1
        if self._reaper is None and self.settings.keep_alive > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
        async with self._open_lock:
            if self._opened:
                return
            self._opened = True
            await anyio.to_thread.run_sync(self._open_runtime)

    def _open_runtime(self) -> None:
        s = self.settings
        try:
            kind, self.runtime_reason = choose_runtime(s.runtime, s.library)
            if s.isolates(kind):
                self.runtime = WorkerRuntime(kind, s.library, s.abi, WorkerLimits(s.worker_timeout, s.load_timeout))
                self.runtime_reason += "; each model in its own process"
            else:
                self.runtime = open_in_process(kind, s.library, s.abi)
        except RkllmError as exc:
            self.runtime_error = exc
            log.error("no runtime: %s (hint: %s)", exc.message, exc.spec.hint)
            return
        info = self.runtime.describe()
        log.info("runtime %s (%s): %s", info["runtime"], self.runtime_reason,
                 ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("runtime", "functions")))

    async def close(self) -> None:
        """Drop one user; the last one aborts and frees every handle."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        await self.rknn.close()
        for handle in list(self.handles.values()):
            handle.slot.close()
            try:
                await anyio.to_thread.run_sync(handle.model.destroy)
            except Exception:
                log.exception("destroying handle %s failed", handle.id)
        self.handles.clear()
        self.default_handle = None

    def require_runtime(self, function: str) -> Runtime:
        """The runtime, or the error that kept it from opening."""
        if self.runtime is not None:
            return self.runtime
        if self.runtime_error is not None:
            err = self.runtime_error
            raise RkllmError(err.code, function=function, **err.fields)
        raise RkllmError("RUNTIME_UNAVAILABLE", function=function, detail="the server has not started a runtime")

    def enforce_limits(self, params: Params, function: str) -> None:
        """LIMIT_EXCEEDED if any argument is over the settings' limits (every surface calls this)."""
        enforce(params, self.settings, function)

    # ================================================================= handles

    def get(self, handle: str, function: str, owner: str | None = None) -> Handle:
        """The handle, if `owner` may see it; UNKNOWN_HANDLE (the same answer as for a handle that never was:
        another session's handles are not even confirmed to exist), or RUNTIME_CRASHED if its worker died."""
        h = self.handles.get(handle)
        if h is not None and not visible(h, owner):
            raise RkllmError("UNKNOWN_HANDLE", function=function, handle=handle)
        if h is None:
            crash = self.crashed.get(handle)
            if crash is not None:
                raise RkllmError(crash.code, function=function, **crash.fields)
            raise RkllmError("UNKNOWN_HANDLE", function=function, handle=handle)
        if isinstance(h.model, WorkerModel) and h.model.crash is not None:
            raise self._crashed(h, h.model.crash, function)
        h.last_used = time.monotonic()
        return h

    def visible_handles(self, owner: str | None) -> list[Handle]:
        """The handles `owner` may see: the shared ones and its own."""
        return [h for h in self.handles.values() if visible(h, owner)]

    async def release_owner(self, owner: str) -> list[str]:
        """Free every handle `owner` made (its session or connection ended); their runs are aborted."""
        await self.rknn.release_owner(owner)
        mine = [h for h in self.handles.values() if h.owner == owner]
        for h in mine:
            try:
                await self._destroy(h, "session end")
            except RkllmError as exc:
                log.warning("freeing handle %s of %s: %s", h.id, owner, exc.message)
        if mine:
            log.info("freed %d handle(s) of %s, which ended", len(mine), owner)
        return [h.id for h in mine]

    async def _reap_idle(self) -> None:
        """Unload handles (and destroy RKNN contexts) that no call has named for keep_alive seconds (and that are
        not in use)."""
        keep = self.settings.keep_alive
        while True:
            await anyio.sleep(min(max(keep / 4, 0.05), 30.0))
            now = time.monotonic()
            for h in list(self.handles.values()):
                if not h.running and not h.slot.held and now - h.last_used > keep and h.id in self.handles:
                    log.info("unloading handle %s (%s): idle for %.0f s (keep_alive)", h.id, h.model_name or
                             h.param.model_path, now - h.last_used)
                    try:
                        await self._destroy(h, "keep_alive")
                    except RkllmError as exc:
                        log.warning("unloading idle handle %s: %s", h.id, exc.message)
            await self.rknn.reap_idle(keep)

    def default_handle_id(self, function: str, owner: str | None = None) -> str:
        """The handle a call that names none means: the default one, else the first loaded (of those `owner` may
        see); UNKNOWN_HANDLE when none is loaded (nothing is loaded implicitly: the C-style calls never load)."""
        default = self.default_handle
        if default is not None and default in self.handles and visible(self.handles[default], owner):
            return default
        for h in self.visible_handles(owner):
            return h.id
        raise RkllmError("UNKNOWN_HANDLE", function=function, handle="(default: no model is loaded)")

    def _crashed(self, h: Handle, crash: RkllmError, function: str) -> RkllmError:
        """Forget a handle whose worker died; the error this and every later call on it gets."""
        if h.freed:  # its worker exited because a client freed the handle: no crash, an unknown handle
            return RkllmError("UNKNOWN_HANDLE", function=function, handle=h.id)
        error = RkllmError("RUNTIME_CRASHED", function=function, **{**crash.fields, "handle": h.id})
        self.crashed[h.id] = error
        while len(self.crashed) > CRASH_MEMORY:
            self.crashed.pop(next(iter(self.crashed)))
        self._forget(h)
        return error

    def _forget(self, h: Handle) -> None:
        self.handles.pop(h.id, None)
        h.slot.close()
        if self.default_handle == h.id:
            self.default_handle = None

    async def _call(self, h: Handle, function: str, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        """One blocking model call on one of the handle's threads (bounded inside for worker processes).

        Under the run slot a cancelled caller still waits for the call to return (`abandon=False`), so
        the slot is never handed on while the model is busy; calls made without the slot (abort,
        is_running, get_kv_cache_size) are abandoned on cancellation.
        """
        try:
            return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon, limiter=h.limiter)
        except RkllmError as exc:
            raise self._failed(h, exc, function) from None

    def _failed(self, h: Handle, exc: RkllmError, function: str) -> RkllmError:
        """What a failed model call raises: a dead worker frees its handle; the error names `function`."""
        if exc.code == "RUNTIME_CRASHED":
            return self._crashed(h, exc, function)
        if exc.function is None:
            exc.function = function
        return exc

    async def _slot_call(self, h: Handle, function: str, fn: Callable[..., T], *args: Any) -> T:
        """A call that changes the handle's state: under its run slot."""
        s = self.settings
        async with h.slot.hold(s.busy_timeout, function, s.max_queued_runs):
            return await self._call(h, function, fn, *args)

    async def _load(self, param: RKLLMParam, function: str, model_name: str | None = None,
                    template: ChatTemplate | None = None, stream: Stream = NO_STREAM, min_domain: int = 0) -> Handle:
        """rkllm_init through the runtime (then the sidecar's chat template), after the checks the
        hardware needs; registers the handle once it is ready."""
        runtime = self.require_runtime(function)
        s = self.settings
        if param.model_path:
            param = param.model_copy(update={"model_path": self.paths.model_file(param.model_path, function)})
        if len(self.handles) + self._loading >= s.max_loaded_models:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what="the number of loaded models",
                             value=len(self.handles) + self._loading + 1, limit=s.max_loaded_models)
        size = self._check_memory(param.model_path, function)
        domain = None
        ext = param.extend_param or RKLLMExtendParam()
        if runtime.assigns_npu_domains and ext.base_domain_id is None:
            # Concurrent NPU models each get their own memory domain unless the client chose one.
            used = {h.param.extend_param.base_domain_id for h in self.handles.values() if h.param.extend_param}
            used |= self._reserved_domains
            # (A vision model's LLM starts at 1: its RKNN encoder uses domain 0, as in the vendor demo.)
            domain = next(d for d in range(min_domain, min_domain + len(used) + 1) if d not in used)
            param = param.model_copy(update={"extend_param": ext.model_copy(update={"base_domain_id": domain})})
        self._loading += 1
        self._reserved_bytes += size
        if domain is not None:
            self._reserved_domains.add(domain)
        try:
            # Shielded: a load runs to its end (configured, or failed) even if its caller leaves, so that
            # it is either handed over or freed here, never left behind half-done.
            what = f"loading {model_name or Path(param.model_path or '?').name}"
            async with heartbeat(stream, what):  # an NPU load takes up to a minute: say so every second
                with anyio.CancelScope(shield=True):
                    model = await anyio.to_thread.run_sync(self._init_model, runtime, param, template)
            try:
                await anyio.lowlevel.checkpoint()  # raises if the caller was cancelled meanwhile
            except anyio.get_cancelled_exc_class():
                # Nobody will get this handle: free the model (and its worker) rather than keep it
                # counting against the limits; a client that retries loads it again.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(model.destroy)
                raise
        finally:
            self._loading -= 1
            self._reserved_bytes -= size
            self._reserved_domains.discard(domain if domain is not None else -1)
        return self._add(model, param, model_name)

    @staticmethod
    def _init_model(runtime: Runtime, param: RKLLMParam, template: ChatTemplate | None) -> LoadedModel:
        model = runtime.init(param)
        if template is not None:
            try:
                model.set_chat_template(template.system_prompt, template.prompt_prefix, template.prompt_postfix)
            except BaseException:
                model.destroy()
                raise
        return model

    def _check_memory(self, model_path: str | None, function: str) -> int:
        """LIMIT_EXCEEDED when the model file is larger than the memory left for it; its size."""
        try:
            size = os.stat(model_path).st_size if model_path else 0
        except OSError:
            return 0  # the runtime reports a missing file itself
        available = available_memory_bytes()
        if available is not None and size > available - self._reserved_bytes:
            left = max(available - self._reserved_bytes, 0)
            raise RkllmError("LIMIT_EXCEEDED", function=function,
                             what=f"the model file {os.path.basename(model_path or '')}",
                             value=f"{size / 2**20:.0f} MB", limit=f"{left / 2**20:.0f} MB of available memory")
        return size

    def _add(self, model: LoadedModel, param: RKLLMParam, model_name: str | None = None) -> Handle:
        handle = f"h-{self.route_tag}-{secrets.token_hex(8)}"  # the board's tag, then 64 unguessable bits
        if isinstance(model, WorkerModel):
            model.set_label(handle)  # worker processes log and fail under their handle
        h = Handle(handle, model, param, model_name=model_name, family=family_for(param.model_path or ""))
        self.handles[handle] = h
        return h

    async def _destroy(self, h: Handle, function: str) -> None:
        """Free the handle: new calls get UNKNOWN_HANDLE, waiting ones CANCELLED; abort its run, give
        it abort_timeout seconds to end, then rkllm_destroy (a stuck worker is killed)."""
        h.freed = True
        self._forget(h)
        deadline = anyio.current_time() + self.settings.abort_timeout
        while h.slot.held and (left := deadline - anyio.current_time()) > 0:
            # Again and again: an abort that reaches the runtime before its run has started is lost (a run
            # clears the abort flag as it starts), and the worker may still be handed that run.
            if h.running:
                with anyio.move_on_after(left):
                    await self._abort_model(h, function)
            await h.slot.wait_free(min(ABORT_REPEAT, max(deadline - anyio.current_time(), 0)))
        if h.slot.held:
            log.warning("handle %s: its run did not end within %.0f s of rkllm_abort; destroying it anyway",
                        h.id, self.settings.abort_timeout)
        await self._call(h, function, h.model.destroy)  # a vision model's encoder first, in its worker

    async def _abort_model(self, h: Handle, function: str) -> None:
        try:
            await self._call(h, function, h.model.abort, abandon=True)
        except RkllmError as exc:
            if exc.code not in ("RUNTIME_TIMEOUT", "RUNTIME_CRASHED"):
                raise

    # ================================================================= runs

    def _check_prompt(self, inp: RKLLMInput | str, function: str) -> None:
        """LIMIT_EXCEEDED when the prompt text that reaches the runtime (turns joined, a history to prime) is over
        max_prompt_bytes: the per-argument limits cannot see what the engine builds from several arguments."""
        text = inp if isinstance(inp, str) else (
            inp.multimodal_input.prompt if inp.multimodal_input is not None else inp.prompt_input)
        if text is None:
            return
        limit = self.settings.max_prompt_bytes
        if len(text) * 4 > limit and (size := len(text.encode("utf-8", "surrogatepass"))) > limit:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what="the prompt sent to the runtime (UTF-8 bytes)",
                             value=size, limit=limit)

    def _confine_cache(self, infer: RKLLMInferParam, function: str) -> RKLLMInferParam:
        """A run that saves a prompt cache writes it inside the cache directory, never elsewhere; a path
        given with save_prompt_cache 0 is confined the same way (it reaches the runtime all the same)."""
        p = infer.prompt_cache_params
        if p is None or (not p.save_prompt_cache and p.prompt_cache_path is None):
            return infer
        path = self.paths.cache_file(p.prompt_cache_path, function, write=True, create=bool(p.save_prompt_cache))
        return infer.model_copy(update={"prompt_cache_params": p.model_copy(update={"prompt_cache_path": path})})

    async def _relay(self, h: Handle, inp: RKLLMInput, infer: RKLLMInferParam, stream: Stream,
                     function: str, output: OutputLimit | None = None, images: list[bytes] | None = None) -> RunResult:
        """One run on a handle whose slot the caller holds, streamed; RKLLM_RUN_ERROR is GENERATION_ERROR.

        Hidden states / logits are bounded by `output` (default: all rows, at most --max-output-floats).
        With `images` (prepared pixels), the model's vision encoder fills the input's image_embed first.
        """
        infer = self._confine_cache(infer, function)
        self._check_prompt(inp, function)
        model = h.model
        limit = effective_max_new_tokens(model, infer)
        collector = RunCollector(limit, output=output or OutputLimit(max_floats=self.settings.max_output_floats))
        relay = Relay(collector, stream, limit if produces_text(infer) else None)
        if h.slot.closed:  # freed while this call prepared its run (the check and the flag: no await between)
            raise RkllmError("CANCELLED", function=function, detail=f": handle {h.id} was freed before the run began")
        h.running = True
        try:
            if images:
                assert isinstance(model, Seeing)
                seeing = model
                run = lambda: seeing.run_with_images(inp, images, infer, collector)  # noqa: E731
            else:
                run = lambda: model.run(inp, infer, collector)  # noqa: E731
            result = await relay.run(run, lambda: self._abort_model(h, function), self.settings.abort_timeout)
        except RkllmError as exc:
            raise self._failed(h, exc, function) from None
        finally:
            h.running = False
        h.runs += 1
        first = relay.first_token_at
        self.metrics.run(result.token_count, time.monotonic() - relay.started,
                         (first - relay.started) * 1000 if first is not None else None)
        if collector.output_error is not None:
            raise self._failed(h, collector.output_error, function)
        if result.finish_reason == "error":
            raise RkllmError("GENERATION_ERROR", function=function, detail=f": {result.error}",
                             handle=h.id, partial_text=result.text, token_count=result.token_count)
        return result

    # ================================================================= the C functions

    async def create_default_param(self, p: NoParams, stream: Stream = NO_STREAM) -> DefaultParamResult:
        """rkllm_createDefaultParam."""
        return DefaultParamResult(param=self.require_runtime("rkllm_createDefaultParam").create_default_param())

    async def init(self, p: InitParams, stream: Stream = NO_STREAM) -> InitResult:
        """rkllm_init: load a model from `param` (overlaid on the defaults) and return its handle."""
        runtime = self.require_runtime("rkllm_init")
        path = p.param.model_path
        if not path:
            raise RkllmError("INVALID_PARAMS", function="rkllm_init", detail="param.model_path is required")
        param = p.param
        if "/" not in path and Path(path).suffix.lower() not in (".rkllm", ".gguf"):  # a model name (list_models)
            info = await anyio.to_thread.run_sync(self.store.resolve, path)
            param = param.model_copy(update={"model_path": str(info.path)})
        h = await self._load(param, "rkllm_init", stream=stream)
        h.owner = stream.owner  # the calling session's own handle (shared when the caller has no session)
        return InitResult(handle=h.id, runtime=runtime.name, abi=runtime.abi, max_new_tokens=h.model.max_new_tokens)

    async def destroy(self, p: HandleParams, stream: Stream = NO_STREAM) -> DestroyResult:
        """rkllm_destroy: abort any run and free the handle."""
        await self._destroy(self.get(p.handle, "rkllm_destroy", stream.owner), "rkllm_destroy")
        return DestroyResult(handle=p.handle)

    async def run(self, p: RunParams, stream: Stream = NO_STREAM) -> RunToolResult:
        """rkllm_run: the whole result, tokens streamed meanwhile."""
        h = self.get(p.handle, "rkllm_run", stream.owner)
        s = self.settings
        async with h.slot.hold(s.busy_timeout, "rkllm_run", s.max_queued_runs):
            h.conversation = []  # chat's record of the KV cache no longer holds
            result = await self._relay(h, p.rkllm_input, p.rkllm_infer_params, stream, "rkllm_run",
                                       OutputLimit(p.output_rows, s.max_output_floats))
        return RunToolResult.model_construct(**dict(result), handle=p.handle)

    async def run_async(self, p: RunParams, stream: Stream = NO_STREAM) -> RunAsyncResult:
        """rkllm_run_async: start a run and return at once; the handle stays busy until it ends."""
        h = self.get(p.handle, "rkllm_run_async", stream.owner)
        s = self.settings
        infer = self._confine_cache(p.rkllm_infer_params, "rkllm_run_async")
        self._check_prompt(p.rkllm_input, "rkllm_run_async")
        await h.slot.acquire(s.busy_timeout, "rkllm_run_async", s.max_queued_runs)
        try:
            h.conversation = []
            collector = RunCollector(effective_max_new_tokens(h.model, infer),
                                     output=OutputLimit(p.output_rows, s.max_output_floats))
            h.running = True
            run = await self._call(h, "rkllm_run_async", h.model.run_async, p.rkllm_input, infer, collector)
        except BaseException:
            h.running = False
            h.slot.release()
            raise
        h.async_run = AsyncRunReader("r-" + secrets.token_hex(4), collector.max_new_tokens, run)

        def done(result: RunResult) -> None:  # on the runtime's thread
            h.runs += 1
            h.running = False
            h.slot.release_threadsafe()

        run.add_done_callback(done)
        return RunAsyncResult(handle=p.handle, run_id=h.async_run.run_id)

    async def run_async_result(self, p: AsyncResultParams, stream: Stream = NO_STREAM) -> AsyncRunReport:
        """The latest rkllm_run_async run: text since `offset`, the result once done; with wait_seconds,
        waits for the end and streams new text meanwhile."""
        h = self.get(p.handle, "rkllm_run_async_result", stream.owner)
        reader = h.async_run
        if reader is None:
            raise RkllmError("RUN_NOT_FOUND", function="rkllm_run_async_result", handle=p.handle)
        sent = reader.text_length if p.wait_seconds > 0 else p.offset
        with anyio.move_on_after(p.wait_seconds):
            while reader.result is None and p.wait_seconds > 0:
                await reader.changed(p.wait_seconds)
                if reader.text_length > sent and stream.sink is not None:
                    new = reader.text_since(sent)
                    sent += len(new)
                    await stream.sink(Progress(reader.tokens, reader.total, new))
        result = reader.result
        over = reader.run.collector.output_error  # a worker's outcome does not know the server's bound
        if result is not None and over is not None and result.error is None:
            result = result.model_copy(update={"finish_reason": "error", "error": over.message})
        text = reader.text_since(p.offset)
        return AsyncRunReport(handle=p.handle, run_id=reader.run_id, done=result is not None, text=text,
                              offset=p.offset + len(text), token_count=reader.tokens, result=result)

    async def abort(self, p: HandleParams, stream: Stream = NO_STREAM) -> AbortResult:
        """rkllm_abort: stop the running inference (it ends with finish_reason "abort")."""
        h = self.get(p.handle, "rkllm_abort", stream.owner)
        was_running = await self._call(h, "rkllm_abort", h.model.is_running, abandon=True)
        await self._call(h, "rkllm_abort", h.model.abort, abandon=True)
        return AbortResult(handle=p.handle, was_running=was_running)

    async def is_running(self, p: HandleParams, stream: Stream = NO_STREAM) -> RunningResult:
        """rkllm_is_running."""
        h = self.get(p.handle, "rkllm_is_running", stream.owner)
        running = await self._call(h, "rkllm_is_running", h.model.is_running, abandon=True)
        return RunningResult(handle=p.handle, running=running)

    async def clear_kv_cache(self, p: ClearKvParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_clear_kv_cache."""
        h = self.get(p.handle, "rkllm_clear_kv_cache", stream.owner)
        await self._slot_call(h, "rkllm_clear_kv_cache", h.model.clear_kv_cache, p.keep_system_prompt, p.start_pos,
                              p.end_pos)
        h.conversation = []
        return Ok(handle=p.handle)

    async def get_kv_cache_size(self, p: HandleParams, stream: Stream = NO_STREAM) -> KvSizeResult:
        """rkllm_get_kv_cache_size."""
        h = self.get(p.handle, "rkllm_get_kv_cache_size", stream.owner)
        return KvSizeResult(handle=p.handle,
                            cache_sizes=await self._call(h, "rkllm_get_kv_cache_size", h.model.get_kv_cache_size,
                                                         abandon=True))

    async def set_chat_template(self, p: ChatTemplateParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_set_chat_template."""
        h = self.get(p.handle, "rkllm_set_chat_template", stream.owner)
        await self._slot_call(h, "rkllm_set_chat_template", h.model.set_chat_template, p.system_prompt,
                              p.prompt_prefix, p.prompt_postfix)
        return Ok(handle=p.handle)

    async def set_function_tools(self, p: FunctionToolsParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_set_function_tools; `tools` is a JSON array (given as text or as the array)."""
        h = self.get(p.handle, "rkllm_set_function_tools", stream.owner)
        try:
            tools = p.tools if isinstance(p.tools, str) else json.dumps(p.tools, ensure_ascii=False)
            parsed = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RkllmError("INVALID_PARAMS", function="rkllm_set_function_tools",
                             detail=f"tools is not valid JSON: {exc}") from exc
        except RecursionError:
            parsed = None  # nested deeper than Python's parser goes: refused below like any too-deep value
        if _json_depth(parsed) > MAX_JSON_DEPTH:
            raise RkllmError("INVALID_PARAMS", function="rkllm_set_function_tools",
                             detail=f"tools is nested more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(parsed, list):
            raise RkllmError("INVALID_PARAMS", function="rkllm_set_function_tools", detail="tools must be a JSON array")
        await self._slot_call(h, "rkllm_set_function_tools", h.model.set_function_tools, p.system_prompt, tools,
                              p.tool_response_str)
        return Ok(handle=p.handle)

    async def set_cross_attn_params(self, p: CrossAttnParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_set_cross_attn_params."""
        h = self.get(p.handle, "rkllm_set_cross_attn_params", stream.owner)
        await self._slot_call(h, "rkllm_set_cross_attn_params", h.model.set_cross_attn_params, p.cross_attn_params)
        return Ok(handle=p.handle)

    async def load_lora(self, p: LoraParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_load_lora (the adapter must lie inside the model roots)."""
        h = self.get(p.handle, "rkllm_load_lora", stream.owner)
        path = self.paths.model_file(p.lora_adapter.lora_adapter_path, "rkllm_load_lora")
        adapter = p.lora_adapter.model_copy(update={"lora_adapter_path": path})
        await self._slot_call(h, "rkllm_load_lora", h.model.load_lora, adapter)
        return Ok(handle=p.handle)

    async def load_prompt_cache(self, p: PromptCacheParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_load_prompt_cache (from the cache directory or the model roots)."""
        h = self.get(p.handle, "rkllm_load_prompt_cache", stream.owner)
        path = self.paths.cache_file(p.prompt_cache_path, "rkllm_load_prompt_cache", write=False)
        await self._slot_call(h, "rkllm_load_prompt_cache", h.model.load_prompt_cache, path)
        h.conversation = []
        return Ok(handle=p.handle)

    async def release_prompt_cache(self, p: HandleParams, stream: Stream = NO_STREAM) -> Ok:
        """rkllm_release_prompt_cache."""
        h = self.get(p.handle, "rkllm_release_prompt_cache", stream.owner)
        await self._slot_call(h, "rkllm_release_prompt_cache", h.model.release_prompt_cache)
        return Ok(handle=p.handle)

    # ================================================================= models by name

    def _runtime_name(self) -> str | None:
        return self.runtime.name if self.runtime is not None else None

    async def list_models(self, p: ListModelsParams | None = None, stream: Stream = NO_STREAM) -> ListModelsResult:
        """The model files the server can see, with sizes and whether this runtime loads them."""
        scan = await anyio.to_thread.run_sync(self.store.scan)
        runtime = self._runtime_name()
        return ListModelsResult(
            models=[ModelEntry(**m.to_dict(), loadable=m.runtime == runtime) for m in scan.models],
            roots=[str(r) for r in self.store.roots], runtime=runtime, problems=[p.message for p in scan.problems])

    async def _load_info(self, info: ModelInfo, param: RKLLMParam | None, function: str,
                         stream: Stream = NO_STREAM) -> Handle:
        runtime = self.require_runtime(function)
        if info.runtime != runtime.name:
            raise RkllmError("NOT_SUPPORTED", function=function, what=f"loading {info.file}",
                             detail=f" by the {runtime.name} runtime (.rkllm files need the NPU runtime, "
                                    f".gguf files the CPU runtime)")
        if param is not None and param.model_path is not None:
            raise RkllmError("INVALID_PARAMS", function=function, detail="param.model_path: give the model by name")
        base = info.sidecar.param if info.sidecar else RKLLMParam()
        merged = overlay_param(base, param or RKLLMParam()).model_copy(update={"model_path": str(info.path)})
        encoder = None
        if info.vision_encoder is not None and runtime.name == "native":
            # The encoder is confined like the model; the LLM's image tags go in RKLLMParam on 1.2.x.
            encoder = self.paths.model_file(str(info.vision_encoder), function)
            merged = init_tags(merged, vision_of(info), runtime.abi)
        h = await self._load(merged, function, info.name, info.sidecar.chat_template if info.sidecar else None,
                             stream, min_domain=1 if encoder is not None else 0)
        h.family = info.family  # the sidecar's family, if it names one
        if encoder is not None:
            await self._open_encoder(h, encoder, vision_of(info))
        if self.default_handle not in self.handles:
            self.default_handle = h.id
        return h

    async def load_model(self, p: LoadModelParams, stream: Stream = NO_STREAM) -> LoadModelResult:
        """Load a model by name; a new handle each call, the first becomes the default."""
        info = await anyio.to_thread.run_sync(self.store.resolve, p.model)
        h = await self._load_info(info, p.param, "load_model", stream)
        runtime = self.require_runtime("load_model")
        return LoadModelResult(handle=h.id, model=info.name, path=str(info.path), runtime=runtime.name,
                               abi=runtime.abi, max_new_tokens=h.model.max_new_tokens,
                               default=self.default_handle == h.id)

    async def unload_model(self, p: UnloadParams, stream: Stream = NO_STREAM) -> UnloadResult:
        """Free one handle, or every handle of a model name, aborting their runs."""
        if p.handle is not None:
            one = self.get(p.handle, "unload_model", stream.owner)
            await self._destroy(one, "unload_model")
            return UnloadResult(unloaded=[one.id])
        unloaded = []
        for h in self._loaded_named(p.model or "", stream.owner):
            if h.freed or h.id not in self.handles:
                continue  # another client unloaded it meanwhile: gone all the same
            try:
                await self._destroy(h, "unload_model")
            except RkllmError as exc:
                if exc.code != "UNKNOWN_HANDLE":
                    raise
                continue
            unloaded.append(h.id)
        return UnloadResult(unloaded=unloaded)

    def _loaded_named(self, name: str, owner: str | None) -> list[Handle]:
        """The handles (that `owner` may see) of the loaded model called `name`: its exact name or file name,
        else a prefix of exactly one loaded model's name. Never everything: an empty name is INVALID_PARAMS and
        a prefix of several models MODEL_AMBIGUOUS."""
        wanted = name.strip().lower()
        if not wanted:
            raise RkllmError("INVALID_PARAMS", function="unload_model", detail="model: a model name is required")
        loaded = [(h, h.model_name) for h in self.visible_handles(owner) if h.model_name is not None]
        exact = [h for h, n in loaded if wanted in (n.lower(), Path(h.param.model_path or "").name.lower())]
        if exact:
            return exact
        names = sorted({n for _, n in loaded if n.lower().startswith(wanted)})
        if len(names) > 1:
            raise RkllmError("MODEL_AMBIGUOUS", function="unload_model", name=name, candidates=names)
        if not names:
            raise RkllmError("MODEL_NOT_FOUND", function="unload_model", name=name, detail=" among loaded models")
        return [h for h, n in loaded if n == names[0]]

    async def loaded_models(self, p: LoadedParams | None = None, stream: Stream = NO_STREAM) -> LoadedResult:
        """The loaded handles, from the engine's own records (never a call into a runtime)."""
        runtime = self._runtime_name()
        return LoadedResult(loaded=[
            LoadedEntry(handle=h.id, model=h.model_name, path=h.param.model_path, runtime=runtime, running=h.running,
                        runs=h.runs, loaded_at=h.loaded_at, default=h.id == self.default_handle,
                        pid=h.model.pid if isinstance(h.model, WorkerModel) else None)
            for h in self.visible_handles(stream.owner)])

    # ================================================================= friendly generation

    async def _target(self, p: Sampling, function: str, stream: Stream) -> Handle:
        """The handle a friendly call runs on, loading the default model if nothing is loaded. A model loaded by
        name is shared server-wide; a session's own rkllm_init handles are used only by that session."""
        owner = stream.owner
        if p.handle is not None:
            return self.get(p.handle, function, owner)
        async with self._default_lock:
            if p.model is not None:
                info = await anyio.to_thread.run_sync(self.store.resolve, p.model)
                for h in self.visible_handles(owner):
                    if h.param.model_path == str(info.path):
                        return self.get(h.id, function, owner)
                return await self._load_info(info, None, function, stream)
            for h in sorted(self.visible_handles(owner), key=lambda h: h.id != self.default_handle):
                return self.get(h.id, function, owner)
            default = await anyio.to_thread.run_sync(self._default_model, function)
            return await self._load_info(default, None, function, stream)

    def _default_model(self, function: str) -> ModelInfo:
        if self.settings.model:
            return self.store.resolve(self.settings.model)
        runtime = self.require_runtime(function)
        candidates = [m for m in self.store.models() if m.runtime == runtime.name]
        bundled = [m for m in candidates if m.bundled]
        if bundled:
            return bundled[0]
        if len(candidates) == 1:
            return candidates[0]
        raise RkllmError("MODEL_NOT_FOUND", function=function, name="(default)",
                         detail=f": no default model; pass `model` (one of: "
                                f"{', '.join(m.file for m in candidates) or 'none found'}) or start the server "
                                "with --model")

    async def generate(self, p: GenerateParams, stream: Stream = NO_STREAM) -> GenerateResult:
        """A reply to `prompt` (chat template applied), streamed."""
        h = await self._target(p, "generate", stream)
        s = self.settings
        parts = [{**i.model_dump(), "where": f"images[{n}]"} for n, i in enumerate(p.images or [])]
        if parts:
            self._vision(h, "generate")
        self._seedable(h, p.seed, "generate")
        pixels: list[bytes] = []
        async with h.slot.hold(s.busy_timeout, "generate", s.max_queued_runs):
            h.conversation = []
            if parts:  # one <image> per image, before the prompt (as the vendor demo writes it)
                inp, pixels = await self._vision_input(h, IMAGE_TAG * len(parts) + p.prompt, parts, "user",
                                                       p.enable_thinking, "generate")
            else:
                inp = RKLLMInput(prompt_input=p.prompt, enable_thinking=p.enable_thinking)
            await self._offer_tools(h, None, "generate")
            family = with_tool_format(h.family, False)
            replies = reply_stream(stream, family)
            watch = self._stop_watch(h, p.stop, replies.stream, "generate")
            await self._seed(h, p.seed, "generate")
            result = await self._relay(h, inp, p.infer(h.param, p.keep_history),
                                       watch.stream if watch else replies.stream, "generate", images=pixels)
            result = await _stopped(result, watch)
            parsed = await replies.finish(result.text)
        return GenerateResult(**_understood(parsed, family), finish_reason=result.finish_reason,
                              token_count=result.token_count, perf=result.perf, handle=h.id, model=h.model_name)

    async def chat(self, p: ChatParams, stream: Stream = NO_STREAM) -> ChatResult:
        """An OpenAI-style multi-turn chat, streamed. Turns the handle already holds are not read again.

        Checking the handle's history, priming or clearing the KV cache and the run happen under one
        hold of the handle's slot, so no other call can change the cache in between.
        """
        h = await self._target(p, "chat", stream)
        messages = [m.model_dump(exclude={"reasoning_content"}) for m in p.messages]
        texts, pictures = [], []  # the messages with <image> where their images were; the images of each
        for i, m in enumerate(messages):
            text, found = split_content(m["content"], f"messages[{i}].content")
            if found and m["role"] != "user":
                raise RkllmError("INVALID_PARAMS", function="chat",
                                 detail=f"messages[{i}]: only user messages may carry images")
            texts.append({**m, "content": text})
            pictures.append(found)
        if any(pictures):
            self._vision(h, "chat")
        self._seedable(h, p.seed, "chat")
        pixels: list[bytes] = []
        tools = [t.model_dump() for t in p.tools] if p.tools and p.tool_choice == "auto" else None
        family = with_tool_format(h.family, tools is not None)
        turns = render_history(family, texts)
        last = turns[-1]
        role = "tool" if last["role"] == "tool" else "user"
        s = self.settings
        async with h.slot.hold(s.busy_timeout, "chat", s.max_queued_runs):
            offered = (_system_prompt(turns), json.dumps(tools, ensure_ascii=False)) if tools else None
            tools_changed = await self._offer_tools(h, offered, "chat")
            reused = not tools_changed and bool(h.conversation) and h.conversation == messages[:-1]
            h.conversation = []
            if reused:
                prompt = last["content"]
            elif isinstance(h.model, HistoryPriming):  # the CPU runtime renders the exact conversation
                self._check_prompt("".join(m["content"] for m in turns), "chat")
                await self._call(h, "chat", h.model.prime_history, turns[:-1])
                prompt = last["content"]
            else:
                await self._call(h, "chat", h.model.clear_kv_cache, 0, None, None)
                prompt = _flatten(turns)
            # The images the run sends: the new message's when the cache holds the rest, else every message's.
            parts = pictures[-1] if reused else [q for found in pictures for q in found]
            if parts:
                inp, pixels = await self._vision_input(h, prompt, parts, role, p.enable_thinking, "chat")
            else:
                inp = RKLLMInput(prompt_input=prompt, role=role, enable_thinking=p.enable_thinking)
            replies = reply_stream(stream, family)
            watch = self._stop_watch(h, p.stop, replies.stream, "chat")
            await self._seed(h, p.seed, "chat")
            result = await self._relay(h, inp, p.infer(h.param, True), watch.stream if watch else replies.stream,
                                       "chat", images=pixels)
            result = await _stopped(result, watch)
            parsed = await replies.finish(result.text)
            understood = _understood(parsed, family)
            content = (understood["content"] or None) if parsed.tool_calls else understood["content"]
            reply = ChatMessage.model_validate({"role": "assistant", "content": content,
                                                "tool_calls": parsed.tool_calls or None}
                                               ).model_dump(exclude={"reasoning_content"})
            # A run cut at a stop string left more in the KV cache than the reply: do not build on it.
            kept = result.finish_reason != "abort" and (watch is None or watch.cut is None)
            h.conversation = [*messages, reply] if kept else []
        message = {"role": "assistant", "content": reply["content"]}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        return ChatResult(**understood, message=message, finish_reason=result.finish_reason,
                          token_count=result.token_count, perf=result.perf, handle=h.id, model=h.model_name,
                          reused_history=reused)

    def _seedable(self, h: Handle, seed: int | None, function: str) -> None:
        """NOT_SUPPORTED, before any work, for a seed the model's runtime cannot take."""
        if seed is not None and not isinstance(h.model, Seeding):
            raise RkllmError("NOT_SUPPORTED", function=function, what="`seed`", param="seed",
                             detail=f" on the {self.require_runtime(function).name} runtime (librkllmrt's sampling "
                                    "takes no seed): use temperature 0 (or top_k 1) for repeatable output")

    async def _seed(self, h: Handle, seed: int | None, function: str) -> None:
        """Give the next run on `h` its seed (the caller holds the slot, so that run is the caller's)."""
        if seed is not None:
            model = h.model
            assert isinstance(model, Seeding)
            await self._call(h, function, model.seed_next_run, seed)

    async def _open_encoder(self, h: Handle, path: str, vision: Vision | None) -> None:
        """Open the vision encoder of the model just loaded on `h`, in its process. A failure is kept (and logged),
        not raised: the model still answers text, and a request with images gets the reason."""
        h.vision = vision
        if not isinstance(h.model, Seeing):
            return
        try:
            h.encoder = await self._call(h, "load_model", h.model.open_encoder, self.settings.rknn_library, path,
                                         None)
        except RkllmError as exc:
            if exc.code == "RUNTIME_CRASHED":
                raise
            log.warning("handle %s: its vision encoder %s could not be opened: %s", h.id, path, exc.message)
            h.encoder = exc
            return
        log.info("handle %s: vision encoder %s", h.id, h.encoder.describe())

    def _vision(self, h: Handle, function: str) -> tuple[EncoderShape, Vision]:
        """The vision encoder's shape and the image tags of the model on `h`; NOT_SUPPORTED saying what is missing
        when it has none."""
        runtime = self.require_runtime(function)
        name = h.model_name or h.id
        if not isinstance(h.model, Seeing):
            raise RkllmError("NOT_SUPPORTED", function=function, what=f"images for {name}",
                             detail=f" on the {runtime.name} runtime: a vision model needs the NPU runtime (a .rkllm "
                                    "model with its .rknn vision encoder, run by librknnrt)")
        encoder = h.encoder
        if isinstance(encoder, RkllmError):
            raise RkllmError("NOT_SUPPORTED", function=function, what=f"images for {name}",
                             detail=f": its vision encoder could not be opened ({encoder.code}: {encoder.message})")
        if encoder is None:
            raise RkllmError("NOT_SUPPORTED", function=function, what=f"images for {name}",
                             detail=": it is a text-only model, with no vision encoder (a vision model is loaded by "
                                    "name, with its .rknn named by `vision_encoder` in its sidecar or alone beside it "
                                    "in its own folder)")
        if h.vision is None:
            raise RkllmError("NOT_SUPPORTED", function=function, what=f"images for {name}",
                             detail=f": the image tags of its family ({h.family.name}) are not known; set `family` "
                                    "or image_start / image_end / image_content in its sidecar")
        return encoder, h.vision

    async def _vision_input(self, h: Handle, prompt: str, parts: list[dict[str, Any]], role: str,
                            enable_thinking: bool, function: str) -> tuple[RKLLMInput, list[bytes]]:
        """RKLLM_INPUT_MULTIMODAL for `prompt` (with one <image> per part), and each image read, decoded and
        prepared for the encoder, in order (the model's worker encodes them as the run starts)."""
        s = self.settings
        shape, vision = self._vision(h, function)
        runtime = self.require_runtime(function)
        if prompt.count(IMAGE_TAG) != len(parts):
            raise RkllmError("INVALID_PARAMS", function=function,
                             detail=f"the text holds {IMAGE_TAG} itself ({prompt.count(IMAGE_TAG) - len(parts)} more "
                                    f"than the {len(parts)} image(s)): the runtime would take it for an image")
        if runtime.abi == "1.2.0" and len(parts) > 1:
            raise RkllmError("NOT_SUPPORTED", function=function, what=f"{len(parts)} images in one run",
                             detail=" on RKLLM 1.2.0 (its RKLLMMultiModelInput has no n_image; 1.2.1 added it): send "
                                    "one image per request")
        if shape.floats * len(parts) > s.max_floats:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"the embeddings of {len(parts)} image(s)",
                             value=shape.floats * len(parts), limit=s.max_floats)

        def one(part: dict[str, Any]) -> bytes:
            where = part["where"]
            img = images.decode(image_bytes(part, where, function, s, self.paths), where, function,
                                s.max_image_pixels)
            return images.prepare(img, shape.width, shape.height, shape.layout, vision.fill)

        pixels = [await anyio.to_thread.run_sync(one, part) for part in parts]
        return multimodal_input(prompt, len(parts), shape, vision, runtime.abi, role, enable_thinking), pixels

    def _stop_watch(self, h: Handle, stop: list[str] | None, downstream: Stream, function: str) -> StopWatch | None:
        """A StopWatch that aborts the run on `h` at the first stop string, or None without stop strings."""
        if not stop:
            return None
        return StopWatch(stop, downstream, lambda: self._abort_model(h, function))

    async def _offer_tools(self, h: Handle, tools: tuple[str, str] | None, function: str) -> bool:
        """Give the runtime the chat's (system prompt, tools JSON), or take earlier ones back (an empty list);
        True when that changed what the runtime holds (its KV cache then no longer matches the history)."""
        if tools == h.chat_tools:
            return False
        system, listed = tools or ((h.chat_tools or ("", ""))[0], "[]")
        await self._call(h, function, h.model.set_function_tools, system or DEFAULT_TOOLS_SYSTEM, listed,
                         "tool_response")
        h.chat_tools = tools
        return True

    async def embed(self, p: EmbedParams, stream: Stream = NO_STREAM) -> EmbedResult:
        """An embedding of `text`: the last hidden layer pooled over the tokens (mean or last)."""
        h = await self._target(Sampling(model=p.model, handle=p.handle), "embed", stream)
        s = self.settings
        async with h.slot.hold(s.busy_timeout, "embed", s.max_queued_runs):
            h.conversation = []
            if isinstance(h.model, Tokenizing):  # raw text, without the chat template
                ids = await self._call(h, "embed", h.model.tokenize, p.text)
                inp = RKLLMInput(token_input=RKLLMTokenInput(input_ids=ids))
            else:
                inp = RKLLMInput(prompt_input=p.text)
            # Internal rows, pooled below into one vector: the last only, or all (the context bounds them).
            result = await self._relay(h, inp, RKLLMInferParam(mode=RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER),
                                       stream, "embed", OutputLimit(1 if p.pooling == "last" else 0))
        hidden = result.last_hidden_layer
        if hidden is None or hidden.num_tokens == 0:
            raise RkllmError("GENERATION_ERROR", function="embed", detail=": the runtime returned no hidden states")
        dim, n = hidden.embd_size, hidden.num_tokens
        rows = hidden.hidden_states
        if p.pooling == "last":
            vector = rows[(n - 1) * dim:n * dim]
        else:
            vector = [sum(rows[t * dim + j] for t in range(n)) / n for j in range(dim)]
        if p.normalize:
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vector = [v / norm for v in vector]
        return EmbedResult(embedding=vector, dim=dim, tokens=n, handle=h.id, model=h.model_name)

    # ================================================================= status

    async def doctor(self, p: DoctorParams | None = None, stream: Stream = NO_STREAM) -> DoctorResult:
        """The board checks (runtime library and ABI, SoC, NPU, governors, memory, models)."""
        from mcp_rkllm import doctor

        info = self.runtime.describe() if self.runtime is not None else None
        checks = await anyio.to_thread.run_sync(lambda: doctor.run(self.settings, "/", info))
        return DoctorResult(checks=[DoctorCheck(**vars(c)) for c in checks], report=doctor.render(checks))

    async def server_status(self, p: StatusParams | None = None, stream: Stream = NO_STREAM) -> StatusResult:
        """What the server runs on; never calls into a runtime."""
        return self.status(stream.owner)

    def status(self, owner: str | None = None) -> StatusResult:
        """What server_status returns (also the rkllm://status resource): the handles `owner` may see."""
        default = self.default_handle if self.default_handle in self.handles else None
        mine = [h.id for h in self.visible_handles(owner)]
        return StatusResult(
            version=__version__, runtime=self.runtime.describe() if self.runtime else None,
            runtime_choice=self.settings.runtime, runtime_reason=self.runtime_reason,
            runtime_error=self.runtime_error.to_dict() if self.runtime_error else None,
            loaded=len(mine), default_handle=default, default_model=self.settings.model,
            model_roots=[str(r) for r in self.store.roots], uptime_s=round(time.time() - self.started, 1),
            pid=os.getpid(), handles=mine, server_id=self.server_id, rss_mb=process_memory_mb("VmRSS"),
            peak_rss_mb=process_memory_mb())
