"""NativeRuntime: the RKLLM runtime library (librkllmrt.so) through the cffi binding.

One result callback per loaded library serves every handle: each run passes its own context
as `userdata` (`ffi.new_handle`), so all state of a run lives in that run. The callback never
raises into C: it returns 0, and an exception in Python code is stashed and re-raised after
`rkllm_run` returns. Hidden states and logits are copied inside the callback, because the
runtime frees them right after it.
"""

from __future__ import annotations

import threading
import time
import traceback
from array import array
from collections.abc import Callable
from typing import Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.native.binding import Library, Marshaller, load_library, read_param
from mcp_rkllm.runtime.base import (
    EventSink,
    Finish,
    Hidden,
    Logits,
    RunCollector,
    RunError,
    Token,
    Waiting,
    effective_max_new_tokens,
    produces_text,
)
from mcp_rkllm.structs import (
    LLMCallState,
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RKLLMPerfStat,
    RunResult,
)

_NORMAL = int(LLMCallState.RKLLM_RUN_NORMAL)
_WAITING = int(LLMCallState.RKLLM_RUN_WAITING)
_FINISH = int(LLMCallState.RKLLM_RUN_FINISH)
_ERROR = int(LLMCallState.RKLLM_RUN_ERROR)


def _copy_floats(ffi: Any, pointer: Any, count: int) -> array[float]:
    """A copy of `count` floats at `pointer` (the runtime frees them after the callback)."""
    out = array("f")
    out.frombytes(ffi.buffer(pointer, 4 * count))
    return out


class _RunContext:
    """State of one run, reached from the C callback through userdata."""

    __slots__ = ("aborted", "collector", "exc", "generate", "has_perf", "keep", "sink")

    def __init__(self, sink: EventSink, collector: RunCollector, has_perf: bool, keep: list[Any], generate: bool):
        self.sink = sink
        self.generate = generate
        self.collector = collector
        self.has_perf = has_perf
        self.keep = keep
        self.exc: BaseException | None = None
        self.aborted = False

    def emit(self, event: Any) -> None:
        self.collector.add(event)
        try:
            self.sink(event)
        except BaseException as exc:  # never into C; re-raised after the run
            if self.exc is None:
                self.exc = exc


class NativeRuntime:
    """The Runtime protocol on librkllmrt.so. `open()` loads the library; nothing loads at import."""

    name = "native"

    def __init__(self, library: Library):
        self.library = library
        self.abi = library.abi
        self.ffi = library.ffi
        self.lib = library.lib
        self.marshal = Marshaller(self.ffi, self.abi)
        self._has_perf = "perf" in dict(self.ffi.typeof("RKLLMResult").fields)
        self._callback = self.ffi.callback("LLMResultCallback", self._on_result, onerror=self._on_error)

    @classmethod
    def open(cls, library: str | None = None, abi: str | None = None) -> NativeRuntime:
        """Find and load the library (see `binding.load_library`)."""
        return cls(load_library(library, abi))

    def describe(self) -> dict[str, object]:
        """Runtime, library path, ABI and how it was chosen."""
        return {
            "runtime": self.name,
            "library": self.library.path,
            "abi": self.abi,
            "abi_source": self.library.abi_source,
            "runtime_version": self.library.version,
            "functions": sorted(self.library.functions),
        }

    # ----------------------------------------------------------------- callback (any thread)

    def _on_result(self, result: Any, userdata: Any, state: int) -> int:
        ctx: _RunContext = self.ffi.from_handle(userdata)
        try:
            self._decode(ctx, result, state)
        except BaseException as exc:  # never into C; re-raised after the run
            if ctx.exc is None:
                ctx.exc = exc
        return 0

    def _decode(self, ctx: _RunContext, result: Any, state: int) -> None:
        ffi = self.ffi
        if state == _NORMAL and ctx.generate:  # the per-token hot path: text only
            text = result.text
            if text != ffi.NULL:
                ctx.emit(Token(ffi.string(text).decode("utf-8", "replace"), result.token_id))
        elif state == _NORMAL:
            text = result.text
            hidden = result.last_hidden_layer
            logits = result.logits
            if hidden.hidden_states != ffi.NULL and hidden.num_tokens > 0:
                ctx.emit(Hidden(_copy_floats(ffi, hidden.hidden_states, hidden.num_tokens * hidden.embd_size),
                                hidden.embd_size, hidden.num_tokens))
            elif logits.logits != ffi.NULL and logits.num_tokens > 0:
                ctx.emit(Logits(_copy_floats(ffi, logits.logits, logits.num_tokens * logits.vocab_size),
                                logits.vocab_size, logits.num_tokens))
            elif text != ffi.NULL:
                ctx.emit(Token(ffi.string(text).decode("utf-8", "replace"), result.token_id))
        elif state == _WAITING:
            # Partial UTF-8 (or nothing): never shown; the NORMAL callback carries the whole character.
            ctx.emit(Waiting(result.token_id))
        elif state == _FINISH:
            perf = None
            if ctx.has_perf:
                p = result.perf
                perf = RKLLMPerfStat(prefill_time_ms=p.prefill_time_ms, prefill_tokens=p.prefill_tokens,
                                     generate_time_ms=p.generate_time_ms, generate_tokens=p.generate_tokens,
                                     memory_usage_mb=p.memory_usage_mb)
            ctx.emit(Finish(perf))
        elif state == _ERROR:
            ctx.emit(RunError("the runtime reported RKLLM_RUN_ERROR"))

    def _on_error(self, exc_type: Any, exc: BaseException | None, tb: Any) -> int:
        # Only reached if userdata is not ours (from_handle failed): keep C going, say so on stderr.
        traceback.print_exception(exc_type, exc, tb)
        return 0

    # ----------------------------------------------------------------- Runtime

    def create_default_param(self) -> RKLLMParam:
        """rkllm_createDefaultParam()."""
        return read_param(self.ffi, self.lib.rkllm_createDefaultParam())

    def init(self, param: RKLLMParam) -> NativeModel:
        """rkllm_init with `param` overlaid on the runtime's defaults."""
        if not param.model_path:
            raise RkllmError("INVALID_PARAMS", function="rkllm_init", detail="param.model_path is required")
        keep: list[Any] = []
        cparam = self.marshal.param(self.lib.rkllm_createDefaultParam(), param, keep)
        handle = self.ffi.new("LLMHandle*")
        if self.abi == "1.3.0":  # 1.3.0 takes RKLLMCallback*; older releases the bare function pointer
            cb = self.ffi.new("RKLLMCallback*")
            cb.result_callback = self._callback
            keep.append(cb)
            rc = self.lib.rkllm_init(handle, cparam, cb)
        else:
            rc = self.lib.rkllm_init(handle, cparam, self._callback)
        if rc != 0 or handle[0] == self.ffi.NULL:
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_init", rc=rc,
                             detail=f" for {param.model_path}")
        return NativeModel(self, handle[0], keep, int(cparam.max_new_tokens),
                           int(getattr(cparam.extend_param, "n_batch", 1) or 1))


class _NativeAsyncRun:
    """A run started with rkllm_run_async; ends at FINISH/ERROR, or once idle after an abort."""

    def __init__(self, model: NativeModel, ctx: _RunContext):
        self.model = model
        self.ctx = ctx
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._callbacks: list[Callable[[RunResult], None]] = []
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="rkllm-async-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        finished = self.ctx.collector.finished
        seen_running = False
        idle_since: float | None = None
        while not finished.wait(0.02):
            running = self.model.is_running()
            seen_running = seen_running or running
            if running:
                idle_since = None
                continue
            # Not running and no FINISH: after an abort (the runtime may send nothing more), or when
            # the runtime never started (no callbacks at all, as some releases did), end the run.
            idle_since = idle_since or time.monotonic()
            if self.ctx.aborted or (seen_running and time.monotonic() - idle_since > 0.2) \
                    or time.monotonic() - idle_since > 2.0:
                break
        self._result = self.ctx.collector.result(aborted=self.ctx.aborted)
        if not finished.is_set() and not self.ctx.aborted and not self.ctx.collector.token_ids:
            self._result.finish_reason = "error"
            self._result.error = "rkllm_run_async ended without delivering any callback"
        self.model._async_done(self)
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn: Callable[[RunResult], None]) -> None:
        assert self._result is not None
        try:
            fn(self._result)
        except Exception:
            traceback.print_exc()

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        """Call `fn(result)` once the run has ended (at once if it already has)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        self._call(fn)

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """The result once the run has ended, or None after `timeout` seconds."""
        return self._result if self._done.wait(timeout) else None

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        return self._done.is_set()


class NativeModel:
    """One LLMHandle. Calls are not serialised here: one run per handle is the caller's rule."""

    def __init__(self, runtime: NativeRuntime, handle: Any, keep: list[Any], max_new_tokens: int, n_batch: int):
        self.runtime = runtime
        self.handle = handle
        self.keep = keep  # param strings and the callback struct live as long as the handle
        self.max_new_tokens = max_new_tokens
        self.n_batch = n_batch
        self._current: _RunContext | None = None
        self._async: _NativeAsyncRun | None = None
        self._destroyed = False
        self._lib = runtime.lib

    def _check(self, function: str, rc: int) -> None:
        if rc != 0:
            raise RkllmError("RKLLM_CALL_FAILED", function=function, rc=rc)

    def _require(self, function: str) -> Any:
        if self._destroyed:
            raise RkllmError("UNKNOWN_HANDLE", function=function, handle="(destroyed)")
        if not self.runtime.library.has(function):
            raise RkllmError("NOT_SUPPORTED", function=function, what=function,
                             detail=f" by RKLLM ABI {self.runtime.abi}")
        return getattr(self._lib, function)

    def _prepare(self, rkllm_input: RKLLMInput, infer: RKLLMInferParam, sink: EventSink,
                 function: str) -> tuple[Any, Any, _RunContext, Any]:
        if self.n_batch > 1:
            raise RkllmError("NOT_SUPPORTED", function=function, what="a run on a handle with n_batch > 1",
                             detail=" by this server yet (it passes one RKLLMInput per run)")
        keep: list[Any] = []
        m = self.runtime.marshal
        cinput = m.input(rkllm_input, keep)
        cinfer = m.new("RKLLMInferParam", infer, keep)
        ctx = _RunContext(sink, RunCollector(effective_max_new_tokens(self, infer)), self.runtime._has_perf, keep,
                          produces_text(infer))
        userdata = self.runtime.ffi.new_handle(ctx)
        keep.append(userdata)
        return cinput, cinfer, ctx, userdata

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        """rkllm_run on the calling thread; returns when the run has ended."""
        fn = self._require("rkllm_run")
        cinput, cinfer, ctx, userdata = self._prepare(rkllm_input, rkllm_infer_params, sink, "rkllm_run")
        self._current = ctx
        try:
            rc = fn(self.handle, cinput, cinfer, userdata)
        finally:
            self._current = None
        if ctx.exc is not None:
            raise ctx.exc
        if rc != 0:
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=rc)
        return ctx.collector.result(aborted=ctx.aborted)

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam,
                  sink: EventSink) -> _NativeAsyncRun:
        """rkllm_run_async; the returned run ends at FINISH/ERROR (or when idle after an abort)."""
        fn = self._require("rkllm_run_async")
        cinput, cinfer, ctx, userdata = self._prepare(rkllm_input, rkllm_infer_params, sink, "rkllm_run_async")
        self._current = ctx
        rc = fn(self.handle, cinput, cinfer, userdata)
        if rc != 0:
            self._current = None
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run_async", rc=rc)
        self._async = _NativeAsyncRun(self, ctx)  # holds ctx.keep (inputs, userdata) until the end
        return self._async

    def _async_done(self, run: _NativeAsyncRun) -> None:
        if self._current is run.ctx:
            self._current = None

    def abort(self) -> None:
        """rkllm_abort; the current run (if any) will report finish_reason "abort"."""
        fn = self._require("rkllm_abort")
        ctx = self._current
        if ctx is not None:
            ctx.aborted = True
        self._check("rkllm_abort", fn(self.handle))

    def is_running(self) -> bool:
        """rkllm_is_running: 1 while a task runs (the 1.3.0 header's reading, true of all releases)."""
        return bool(self._require("rkllm_is_running")(self.handle) == 1)

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None = None,
                       end_pos: list[int] | None = None) -> None:
        """rkllm_clear_kv_cache; start/end ranges need 1.2.1+ and one entry per batch."""
        fn = self._require("rkllm_clear_kv_cache")
        if self.runtime.abi == "1.2.0":
            if start_pos is not None or end_pos is not None:
                raise RkllmError("ABI_FIELD_UNSUPPORTED", function="rkllm_clear_kv_cache",
                                 struct="rkllm_clear_kv_cache", field="start_pos/end_pos", abi="1.2.0")
            self._check("rkllm_clear_kv_cache", fn(self.handle, keep_system_prompt))
            return
        ffi = self.runtime.ffi
        if (start_pos is None) != (end_pos is None):
            raise RkllmError("INVALID_PARAMS", function="rkllm_clear_kv_cache",
                             detail="start_pos and end_pos go together")
        if start_pos is not None and end_pos is not None:
            if len(start_pos) != self.n_batch or len(end_pos) != self.n_batch:
                raise RkllmError("INVALID_PARAMS", function="rkllm_clear_kv_cache",
                                 detail=f"start_pos and end_pos need n_batch={self.n_batch} entries each")
            cstart, cend = ffi.new("int[]", start_pos), ffi.new("int[]", end_pos)
        else:
            cstart = cend = ffi.NULL  # explicit NULLs: never leave them to chance
        self._check("rkllm_clear_kv_cache", fn(self.handle, keep_system_prompt, cstart, cend))

    def get_kv_cache_size(self) -> list[int]:
        """rkllm_get_kv_cache_size: one size per batch."""
        fn = self._require("rkllm_get_kv_cache_size")
        sizes = self.runtime.ffi.new("int[]", max(self.n_batch, 1))
        self._check("rkllm_get_kv_cache_size", fn(self.handle, sizes))
        return list(sizes)

    def _strings(self, *values: str | None) -> list[Any]:
        ffi = self.runtime.ffi
        out = []
        for v in values:
            if v is not None and "\x00" in v:
                raise RkllmError("INVALID_PARAMS", detail="strings must not contain NUL characters")
            out.append(ffi.NULL if v is None else ffi.new("char[]", v.encode("utf-8")))
        return out

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """rkllm_set_chat_template."""
        fn = self._require("rkllm_set_chat_template")
        self._check("rkllm_set_chat_template",
                    fn(self.handle, *self._strings(system_prompt, prompt_prefix, prompt_postfix)))

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """rkllm_set_function_tools."""
        fn = self._require("rkllm_set_function_tools")
        self._check("rkllm_set_function_tools",
                    fn(self.handle, *self._strings(system_prompt, tools, tool_response_str)))

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        """rkllm_set_cross_attn_params. The buffers stay alive as long as the handle (the runtime may keep them)."""
        fn = self._require("rkllm_set_cross_attn_params")
        keep: list[Any] = []
        cparams = self.runtime.marshal.new("RKLLMCrossAttnParam", cross_attn_params, keep)
        self._check("rkllm_set_cross_attn_params", fn(self.handle, cparams))
        self.keep.append(keep)

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        """rkllm_load_lora."""
        fn = self._require("rkllm_load_lora")
        keep: list[Any] = []
        cadapter = self.runtime.marshal.new("RKLLMLoraAdapter", lora_adapter, keep)
        self._check("rkllm_load_lora", fn(self.handle, cadapter))
        self.keep.append(keep)

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        """rkllm_load_prompt_cache."""
        fn = self._require("rkllm_load_prompt_cache")
        self._check("rkllm_load_prompt_cache", fn(self.handle, *self._strings(prompt_cache_path)))

    def release_prompt_cache(self) -> None:
        """rkllm_release_prompt_cache."""
        fn = self._require("rkllm_release_prompt_cache")
        self._check("rkllm_release_prompt_cache", fn(self.handle))

    def destroy(self) -> None:
        """Abort a running inference, then rkllm_destroy. Idempotent."""
        if self._destroyed:
            return
        if self.is_running():
            self.abort()
        if self._async is not None:
            self._async.wait(5.0)
        rc = self._lib.rkllm_destroy(self.handle)
        self._destroyed = True
        self._check("rkllm_destroy", rc)
