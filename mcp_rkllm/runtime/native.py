"""NativeRuntime: the Runtime protocol on the RKLLM library (`native.rkllm`), with RKLLM's run semantics.

The C boundary (cffi, marshalling, the callback) is `mcp_rkllm.native.rkllm`; this module adds
what a handle needs above it: the run's collector and finish reason, abort bookkeeping, the end
of an rkllm_run_async run (the runtime may send no FINISH after an abort), argument checks, and
freeing. Nothing loads at import: `NativeRuntime.open()` loads the library.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import AsyncRun, EventSink, RunCollector, collector_for
from mcp_rkllm.native.rkllm import CHandle, RkllmLibrary, RunTarget
from mcp_rkllm.runtime.base import effective_max_new_tokens, produces_text
from mcp_rkllm.runtime.vision import EncoderShape, VisionEncoder, with_rows
from mcp_rkllm.structs import (
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RunResult,
)


class NativeRuntime:
    """The Runtime protocol on librkllmrt.so."""

    name = "native"
    assigns_npu_domains = True

    def __init__(self, library: RkllmLibrary):
        self.library = library
        self.abi = library.abi

    @classmethod
    def open(cls, library: str | None = None, abi: str | None = None) -> NativeRuntime:
        """Find and load the library (see `native.binding.load_library`)."""
        return cls(RkllmLibrary.open(library, abi))

    def describe(self) -> dict[str, object]:
        """Runtime, library path, ABI and how it was chosen."""
        lib = self.library.library
        return {"runtime": self.name, "library": lib.path, "abi": self.abi, "abi_source": lib.abi_source,
                "runtime_version": lib.version, "functions": sorted(lib.functions)}

    def create_default_param(self) -> RKLLMParam:
        """rkllm_createDefaultParam()."""
        return self.library.create_default_param()

    def init(self, param: RKLLMParam) -> NativeModel:
        """rkllm_init with `param` overlaid on the runtime's defaults."""
        if not param.model_path:
            raise RkllmError("INVALID_PARAMS", function="rkllm_init", detail="param.model_path is required")
        keep: list[Any] = []
        handle, max_new_tokens, n_batch = self.library.init(param, keep)
        return NativeModel(self, handle, keep, max_new_tokens, n_batch)


class NativeModel:
    """One LLMHandle. Calls are not serialised here: one run per handle is the caller's rule."""

    def __init__(self, runtime: NativeRuntime, handle: CHandle, keep: list[Any], max_new_tokens: int, n_batch: int):
        self.runtime = runtime
        self.lib = runtime.library
        self.handle = handle
        self.keep = keep  # param strings and the callback struct live as long as the handle
        self.max_new_tokens = max_new_tokens
        self.n_batch = n_batch
        self._current: RunTarget | None = None
        self._async: AsyncRun | None = None
        self._destroyed = False
        self.encoder: VisionEncoder | None = None
        """The vision encoder of a vision model (opened after the model, destroyed before it, as the demo does)."""
        self._state = threading.Lock()
        self._encoding = False
        """A run with images is encoding them (no rkllm_run yet, so rkllm_abort alone would be lost)."""
        self._abort_early = False
        """rkllm_abort came while encoding: the run ends there, as aborted, and rkllm_run is never called."""

    def _live(self, function: str) -> None:
        if self._destroyed:
            raise RkllmError("UNKNOWN_HANDLE", function=function, handle="(destroyed)")

    def _start(self, rkllm_input: RKLLMInput, infer: RKLLMInferParam, sink: EventSink,
               function: str) -> tuple[RunCollector, RunTarget, tuple[Any, ...]]:
        self._live(function)
        if self.n_batch > 1:
            raise RkllmError("NOT_SUPPORTED", function=function, what="a run on a handle with n_batch > 1",
                             detail=" by this server yet (it passes one RKLLMInput per run)")
        collector = collector_for(sink, effective_max_new_tokens(self, infer))
        target = RunTarget(collector.add, produces_text(infer))
        return collector, target, self.lib.prepare_run(rkllm_input, infer, target)

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        """rkllm_run on the calling thread; returns when the run has ended."""
        collector, target, prepared = self._start(rkllm_input, rkllm_infer_params, sink, "rkllm_run")
        with self._state:
            early, self._encoding, self._abort_early = self._encoding and self._abort_early, False, False
            if early:  # aborted while its images were encoded: the run ends before it starts
                return collector.result(aborted=True)
            self._current = target
        try:
            rc = self.lib.run(self.handle, prepared)
        finally:
            self._current = None
        if target.exc is not None:
            raise target.exc
        if rc != 0:
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=rc)
        return collector.result(aborted=target.aborted)

    def open_encoder(self, library: str | None, path: str, core_mask: int | str | None = None) -> EncoderShape:
        """rknn_init of this model's vision encoder, in this process (see `runtime.vision`)."""
        self._live("load_model")
        if self.encoder is not None:
            raise RkllmError("INVALID_PARAMS", function="load_model", detail="the model's encoder is already open")
        self.encoder = VisionEncoder.open(library, path, core_mask)
        return self.encoder.shape

    def run_with_images(self, rkllm_input: RKLLMInput, images: list[bytes], rkllm_infer_params: RKLLMInferParam,
                        sink: EventSink) -> RunResult:
        """Encode `images` with this model's encoder, then rkllm_run with their rows as image_embed."""
        self._live("rkllm_run")
        encoder = self.encoder
        if encoder is None:
            raise RkllmError("NOT_SUPPORTED", function="rkllm_run", what="images",
                             detail=": this model has no vision encoder open")
        with self._state:
            self._encoding, self._abort_early = True, False
        try:
            rows = encoder.encode_all(images, stop=lambda: self._abort_early)
            if self._abort_early:  # its rows may be partial: never marshalled; the run ends as aborted
                return collector_for(sink, effective_max_new_tokens(self, rkllm_infer_params)).result(aborted=True)
            return self.run(with_rows(rkllm_input, rows), rkllm_infer_params, sink)  # ends at once if aborted now
        finally:
            with self._state:
                self._encoding = self._abort_early = False

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> AsyncRun:
        """rkllm_run_async; the returned run ends at FINISH/ERROR (or when idle after an abort)."""
        collector, target, prepared = self._start(rkllm_input, rkllm_infer_params, sink, "rkllm_run_async")
        self._current = target
        rc = self.lib.run(self.handle, prepared, asynchronous=True)
        if rc != 0:
            self._current = None
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run_async", rc=rc)
        run = AsyncRun(collector)
        self._async = run
        # The watcher holds `target` (inputs, userdata) until the run is over.
        threading.Thread(target=self._watch, args=(run, target), name="rkllm-async-watch", daemon=True).start()
        return run

    def _watch(self, run: AsyncRun, target: RunTarget) -> None:
        """End an async run at FINISH/ERROR, or once the runtime is idle: after an abort it may send
        nothing more, and some releases never call back at all."""
        finished = run.collector.finished
        seen_running = False
        idle_since: float | None = None
        while not finished.wait(0.02):
            running = self.lib.is_running(self.handle)
            seen_running = seen_running or running
            if running:
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if target.aborted or (seen_running and time.monotonic() - idle_since > 0.2) \
                    or time.monotonic() - idle_since > 2.0:
                break
        result = run.collector.result(aborted=target.aborted)
        if not finished.is_set() and not target.aborted and not run.collector.token_ids:
            result.finish_reason = "error"
            result.error = "rkllm_run_async ended without delivering any callback"
        if self._current is target:
            self._current = None
        run.finish(result)

    def abort(self) -> None:
        """rkllm_abort; the current run (if any) will report finish_reason "abort"."""
        self._live("rkllm_abort")
        with self._state:
            target = self._current
            if target is not None:
                target.aborted = True
            elif self._encoding:  # no rkllm_run yet: remember it, or the run would start after it and go on
                self._abort_early = True
        self.lib.abort(self.handle)

    def is_running(self) -> bool:
        """rkllm_is_running."""
        self._live("rkllm_is_running")
        return self.lib.is_running(self.handle)

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None = None,
                       end_pos: list[int] | None = None) -> None:
        """rkllm_clear_kv_cache; start/end ranges need 1.2.1+ and one entry per batch."""
        self._live("rkllm_clear_kv_cache")
        if self.runtime.abi != "1.2.0":
            if (start_pos is None) != (end_pos is None):
                raise RkllmError("INVALID_PARAMS", function="rkllm_clear_kv_cache",
                                 detail="start_pos and end_pos go together")
            if start_pos is not None and end_pos is not None and (
                    len(start_pos) != self.n_batch or len(end_pos) != self.n_batch):
                raise RkllmError("INVALID_PARAMS", function="rkllm_clear_kv_cache",
                                 detail=f"start_pos and end_pos need n_batch={self.n_batch} entries each")
        self.lib.clear_kv_cache(self.handle, keep_system_prompt, start_pos, end_pos)

    def get_kv_cache_size(self) -> list[int]:
        """rkllm_get_kv_cache_size: one size per batch."""
        self._live("rkllm_get_kv_cache_size")
        return self.lib.get_kv_cache_size(self.handle, self.n_batch)

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """rkllm_set_chat_template."""
        self._live("rkllm_set_chat_template")
        self.lib.set_chat_template(self.handle, system_prompt, prompt_prefix, prompt_postfix)

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """rkllm_set_function_tools."""
        self._live("rkllm_set_function_tools")
        self.lib.set_function_tools(self.handle, system_prompt, tools, tool_response_str)

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        """rkllm_set_cross_attn_params. The buffers stay alive as long as the handle (the runtime may keep them)."""
        self._live("rkllm_set_cross_attn_params")
        keep: list[Any] = []
        self.lib.set_cross_attn_params(self.handle, cross_attn_params, keep)
        self.keep.append(keep)

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        """rkllm_load_lora."""
        self._live("rkllm_load_lora")
        keep: list[Any] = []
        self.lib.load_lora(self.handle, lora_adapter, keep)
        self.keep.append(keep)

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        """rkllm_load_prompt_cache."""
        self._live("rkllm_load_prompt_cache")
        self.lib.load_prompt_cache(self.handle, prompt_cache_path)

    def release_prompt_cache(self) -> None:
        """rkllm_release_prompt_cache."""
        self._live("rkllm_release_prompt_cache")
        self.lib.release_prompt_cache(self.handle)

    def destroy(self) -> None:
        """Abort a running inference, then rknn_destroy of its vision encoder (if any), then rkllm_destroy.
        Idempotent."""
        if self._destroyed:
            return
        if self.is_running():
            self.abort()
        if self._async is not None:
            self._async.wait(5.0)
        self._destroyed = True
        encoder, self.encoder = self.encoder, None
        try:
            if encoder is not None:
                encoder.close()
        finally:
            self.lib.destroy(self.handle)
