"""librkllmrt.so as typed Python calls: every `lib.rkllm_*` call, the result callback, event decoding.

`RkllmLibrary` wraps one loaded library (see `binding.load_library`). Its methods take and return
the pydantic struct models and plain Python values; a C handle is an opaque `CHandle` the caller
holds but never looks into. One result callback per library serves every handle: each run passes
its own `RunTarget` as `userdata` (`ffi.new_handle`), so all state of a run lives in that run. The
callback never raises into C: it returns 0, and an exception in Python code is stashed on the
target and re-raised by the caller after `rkllm_run` returns. Hidden states and logits are copied
inside the callback, because the runtime frees them right after it.
"""

from __future__ import annotations

import traceback
from array import array
from typing import Any, NewType

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import EventSink, Finish, Hidden, Logits, RunError, RunEvent, Token, Waiting
from mcp_rkllm.native.binding import Library, Marshaller, load_library, read_param
from mcp_rkllm.structs import (
    LLMCallState,
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RKLLMPerfStat,
)

#: An LLMHandle: opaque to everything outside this module.
CHandle = NewType("CHandle", object)

_NORMAL = int(LLMCallState.RKLLM_RUN_NORMAL)
_WAITING = int(LLMCallState.RKLLM_RUN_WAITING)
_FINISH = int(LLMCallState.RKLLM_RUN_FINISH)
_ERROR = int(LLMCallState.RKLLM_RUN_ERROR)


def _copy_floats(ffi: Any, pointer: Any, count: int) -> array[float]:
    """A copy of `count` floats at `pointer` (the runtime frees them after the callback)."""
    out = array("f")
    out.frombytes(ffi.buffer(pointer, 4 * count))
    return out


class RunTarget:
    """Where the callbacks of one run go: its sink, and the first exception raised on the way."""

    __slots__ = ("aborted", "exc", "generate", "keep", "sink")

    def __init__(self, sink: EventSink, generate: bool):
        self.sink = sink
        self.generate = generate
        self.keep: list[Any] = []  # every C buffer of the run, alive until the run is over
        self.exc: BaseException | None = None
        self.aborted = False

    def emit(self, event: RunEvent) -> None:
        try:
            self.sink(event)
        except BaseException as exc:  # never into C; re-raised after the run
            if self.exc is None:
                self.exc = exc


class RkllmLibrary:
    """One loaded librkllmrt.so: the 15 C functions as typed calls (absent ones are NOT_SUPPORTED)."""

    def __init__(self, library: Library):
        self.library = library
        self.abi = library.abi
        self._ffi = library.ffi
        self._lib = library.lib
        self._marshal = Marshaller(self._ffi, self.abi)
        self._has_perf = "perf" in dict(self._ffi.typeof("RKLLMResult").fields)
        self._callback = self._ffi.callback("LLMResultCallback", self._on_result, onerror=self._on_error)

    @classmethod
    def open(cls, library: str | None = None, abi: str | None = None) -> RkllmLibrary:
        """Find, probe and dlopen the library (see `binding.load_library`)."""
        return cls(load_library(library, abi))

    def has(self, function: str) -> bool:
        """Whether the library exports `function`."""
        return self.library.has(function)

    def _fn(self, function: str) -> Any:
        if not self.library.has(function):
            raise RkllmError("NOT_SUPPORTED", function=function, what=function, detail=f" by RKLLM ABI {self.abi}")
        return getattr(self._lib, function)

    @staticmethod
    def _check(function: str, rc: int) -> None:
        if rc != 0:
            raise RkllmError("RKLLM_CALL_FAILED", function=function, rc=rc)

    def _strings(self, *values: str | None) -> list[Any]:
        out = []
        for v in values:
            if v is not None and "\x00" in v:
                raise RkllmError("INVALID_PARAMS", detail="strings must not contain NUL characters")
            out.append(self._ffi.NULL if v is None else self._ffi.new("char[]", v.encode("utf-8")))
        return out

    # ----------------------------------------------------------------- callback (any thread)

    def _on_result(self, result: Any, userdata: Any, state: int) -> int:
        target: RunTarget = self._ffi.from_handle(userdata)
        try:
            self._decode(target, result, state)
        except BaseException as exc:  # never into C; re-raised after the run
            if target.exc is None:
                target.exc = exc
        return 0

    def _decode(self, target: RunTarget, result: Any, state: int) -> None:
        ffi = self._ffi
        if state == _NORMAL and target.generate:  # the per-token hot path: text only
            text = result.text
            if text != ffi.NULL:
                target.emit(Token(ffi.string(text).decode("utf-8", "replace"), result.token_id))
        elif state == _NORMAL:
            text = result.text
            hidden = result.last_hidden_layer
            logits = result.logits
            if hidden.hidden_states != ffi.NULL and hidden.num_tokens > 0:
                target.emit(Hidden(_copy_floats(ffi, hidden.hidden_states, hidden.num_tokens * hidden.embd_size),
                                   hidden.embd_size, hidden.num_tokens))
            elif logits.logits != ffi.NULL and logits.num_tokens > 0:
                target.emit(Logits(_copy_floats(ffi, logits.logits, logits.num_tokens * logits.vocab_size),
                                   logits.vocab_size, logits.num_tokens))
            elif text != ffi.NULL:
                target.emit(Token(ffi.string(text).decode("utf-8", "replace"), result.token_id))
        elif state == _WAITING:
            # Partial UTF-8 (or nothing): never shown; the NORMAL callback carries the whole character.
            target.emit(Waiting(result.token_id))
        elif state == _FINISH:
            perf = None
            if self._has_perf:
                p = result.perf
                perf = RKLLMPerfStat(prefill_time_ms=p.prefill_time_ms, prefill_tokens=p.prefill_tokens,
                                     generate_time_ms=p.generate_time_ms, generate_tokens=p.generate_tokens,
                                     memory_usage_mb=p.memory_usage_mb)
            target.emit(Finish(perf))
        elif state == _ERROR:
            target.emit(RunError("the runtime reported RKLLM_RUN_ERROR"))

    def _on_error(self, exc_type: Any, exc: BaseException | None, tb: Any) -> int:
        # Only reached if userdata is not ours (from_handle failed): keep C going, say so on stderr.
        traceback.print_exception(exc_type, exc, tb)
        return 0

    # ----------------------------------------------------------------- the C functions

    def create_default_param(self) -> RKLLMParam:
        """rkllm_createDefaultParam()."""
        return read_param(self._ffi, self._lib.rkllm_createDefaultParam())

    def init(self, param: RKLLMParam, keep: list[Any]) -> tuple[CHandle, int, int]:
        """rkllm_init with `param` overlaid on the defaults: (handle, max_new_tokens, n_batch) as the
        runtime took them. `keep` receives the buffers that must live as long as the handle."""
        cparam = self._marshal.param(self._lib.rkllm_createDefaultParam(), param, keep)
        handle = self._ffi.new("LLMHandle*")
        if self.abi == "1.3.0":  # 1.3.0 takes RKLLMCallback*; older releases the bare function pointer
            cb = self._ffi.new("RKLLMCallback*")
            cb.result_callback = self._callback
            keep.append(cb)
            rc = self._lib.rkllm_init(handle, cparam, cb)
        else:
            rc = self._lib.rkllm_init(handle, cparam, self._callback)
        if rc != 0 or handle[0] == self._ffi.NULL:
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_init", rc=rc, detail=f" for {param.model_path}")
        return (CHandle(handle[0]), int(cparam.max_new_tokens),
                int(getattr(cparam.extend_param, "n_batch", 1) or 1))

    def prepare_run(self, rkllm_input: RKLLMInput, infer: RKLLMInferParam, target: RunTarget) -> tuple[Any, ...]:
        """Marshal a run's input and parameters (kept alive by `target`); pass the result to `run`."""
        cinput = self._marshal.input(rkllm_input, target.keep)
        cinfer = self._marshal.new("RKLLMInferParam", infer, target.keep)
        userdata = self._ffi.new_handle(target)
        target.keep.append(userdata)
        return cinput, cinfer, userdata

    def run(self, handle: CHandle, prepared: tuple[Any, ...], asynchronous: bool = False) -> int:
        """rkllm_run (blocks until the run ends) or rkllm_run_async (returns at once); the raw rc."""
        fn = self._fn("rkllm_run_async" if asynchronous else "rkllm_run")
        return int(fn(handle, *prepared))

    def abort(self, handle: CHandle) -> None:
        """rkllm_abort."""
        self._check("rkllm_abort", self._fn("rkllm_abort")(handle))

    def is_running(self, handle: CHandle) -> bool:
        """rkllm_is_running: 1 while a task runs (the 1.3.0 header's reading, true of all releases)."""
        return bool(self._fn("rkllm_is_running")(handle) == 1)

    def clear_kv_cache(self, handle: CHandle, keep_system_prompt: int, start_pos: list[int] | None,
                       end_pos: list[int] | None) -> None:
        """rkllm_clear_kv_cache; the position arrays exist from 1.2.1 (explicit NULLs when not given)."""
        fn = self._fn("rkllm_clear_kv_cache")
        if self.abi == "1.2.0":
            if start_pos is not None or end_pos is not None:
                raise RkllmError("ABI_FIELD_UNSUPPORTED", function="rkllm_clear_kv_cache",
                                 struct="rkllm_clear_kv_cache", field="start_pos/end_pos", abi="1.2.0")
            self._check("rkllm_clear_kv_cache", fn(handle, keep_system_prompt))
            return
        ffi = self._ffi
        if start_pos is not None and end_pos is not None:
            cstart, cend = ffi.new("int[]", start_pos), ffi.new("int[]", end_pos)
        else:
            cstart = cend = ffi.NULL  # explicit NULLs: never leave them to chance
        self._check("rkllm_clear_kv_cache", fn(handle, keep_system_prompt, cstart, cend))

    def get_kv_cache_size(self, handle: CHandle, n_batch: int) -> list[int]:
        """rkllm_get_kv_cache_size: one size per batch."""
        fn = self._fn("rkllm_get_kv_cache_size")
        sizes = self._ffi.new("int[]", max(n_batch, 1))
        self._check("rkllm_get_kv_cache_size", fn(handle, sizes))
        return list(sizes)

    def set_chat_template(self, handle: CHandle, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """rkllm_set_chat_template."""
        fn = self._fn("rkllm_set_chat_template")
        self._check("rkllm_set_chat_template", fn(handle, *self._strings(system_prompt, prompt_prefix, prompt_postfix)))

    def set_function_tools(self, handle: CHandle, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """rkllm_set_function_tools."""
        fn = self._fn("rkllm_set_function_tools")
        self._check("rkllm_set_function_tools", fn(handle, *self._strings(system_prompt, tools, tool_response_str)))

    def set_cross_attn_params(self, handle: CHandle, params: RKLLMCrossAttnParam, keep: list[Any]) -> None:
        """rkllm_set_cross_attn_params; `keep` holds the buffers (the runtime may keep pointing at them)."""
        fn = self._fn("rkllm_set_cross_attn_params")
        self._check("rkllm_set_cross_attn_params", fn(handle, self._marshal.new("RKLLMCrossAttnParam", params, keep)))

    def load_lora(self, handle: CHandle, adapter: RKLLMLoraAdapter, keep: list[Any]) -> None:
        """rkllm_load_lora."""
        fn = self._fn("rkllm_load_lora")
        self._check("rkllm_load_lora", fn(handle, self._marshal.new("RKLLMLoraAdapter", adapter, keep)))

    def load_prompt_cache(self, handle: CHandle, prompt_cache_path: str) -> None:
        """rkllm_load_prompt_cache."""
        fn = self._fn("rkllm_load_prompt_cache")
        self._check("rkllm_load_prompt_cache", fn(handle, *self._strings(prompt_cache_path)))

    def release_prompt_cache(self, handle: CHandle) -> None:
        """rkllm_release_prompt_cache."""
        self._check("rkllm_release_prompt_cache", self._fn("rkllm_release_prompt_cache")(handle))

    def destroy(self, handle: CHandle) -> None:
        """rkllm_destroy."""
        self._check("rkllm_destroy", self._lib.rkllm_destroy(handle))
