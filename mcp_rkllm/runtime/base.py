"""The Runtime protocol every backend implements, the events a run emits, and their collector.

A `Runtime` mirrors `rkllm_createDefaultParam` and `rkllm_init`; `init` returns a `LoadedModel`
whose methods mirror the other thirteen C functions on that handle. Runs report through an
`EventSink`, a plain callable that may be invoked from any thread (the runtime's own threads
included) and must not block; `run` also returns the whole `RunResult`, built from the same
events, so a caller never depends on having seen every event.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mcp_rkllm.structs import (
    FinishReason,
    RKLLMCrossAttnParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RKLLMPerfStat,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RunResult,
)

# --------------------------------------------------------------------------- events


@dataclass(slots=True)
class Token:
    """A complete piece of text (RKLLM_RUN_NORMAL) and its token id."""

    text: str
    token_id: int


@dataclass(slots=True)
class Waiting:
    """A token whose bytes are not yet a complete UTF-8 character (RKLLM_RUN_WAITING): no text."""

    token_id: int


@dataclass(slots=True)
class Hidden:
    """The last hidden layer, copied out of the runtime's buffer."""

    data: array[float]
    embd_size: int
    num_tokens: int


@dataclass(slots=True)
class Logits:
    """Logits, copied out of the runtime's buffer."""

    data: array[float]
    vocab_size: int
    num_tokens: int


@dataclass(slots=True)
class Finish:
    """RKLLM_RUN_FINISH, with perf stats where the runtime has them."""

    perf: RKLLMPerfStat | None


@dataclass(slots=True)
class RunError:
    """RKLLM_RUN_ERROR."""

    message: str


@dataclass(slots=True)
class TokenBatch:
    """Several tokens at once, in order (how a worker process forwards a burst): their texts
    (RKLLM_RUN_WAITING tokens contribute "") and token ids."""

    texts: list[str]
    token_ids: list[int]


RunEvent = Token | Waiting | TokenBatch | Hidden | Logits | Finish | RunError
EventSink = Callable[[RunEvent], None]


def discard(event: RunEvent) -> None:
    """An EventSink that ignores everything."""


class RunCollector:
    """Builds the RunResult of one run from its events (thread-safe enough: one writer at a time)."""

    def __init__(self, max_new_tokens: int | None = None):
        self.max_new_tokens = max_new_tokens
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.perf: RKLLMPerfStat | None = None
        self.hidden: Hidden | None = None
        self.logits: Logits | None = None
        self.error: str | None = None
        self.finished = threading.Event()

    def add(self, event: RunEvent) -> None:
        """Take one event."""
        if type(event) is Token:  # the per-token case first, without isinstance's MRO walk
            self.pieces.append(event.text)
            self.token_ids.append(event.token_id)
        elif isinstance(event, Waiting):
            self.token_ids.append(event.token_id)
        elif isinstance(event, TokenBatch):
            self.pieces.extend(event.texts)
            self.token_ids.extend(event.token_ids)
        elif isinstance(event, Hidden):
            self.hidden = event
        elif isinstance(event, Logits):
            self.logits = event
        elif isinstance(event, Finish):
            self.perf = event.perf
            self.finished.set()
        elif isinstance(event, RunError):
            self.error = event.message
            self.finished.set()

    def result(self, aborted: bool = False) -> RunResult:
        """The RunResult so far; finish_reason says why the run ended."""
        count = len(self.token_ids)
        reason: FinishReason
        if self.error is not None:
            reason = "error"
        elif aborted:
            reason = "abort"
        elif self.max_new_tokens is not None and self.max_new_tokens > 0 and count >= self.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        hidden = self.hidden
        logits = self.logits
        return RunResult(
            text="".join(self.pieces),
            token_ids=list(self.token_ids),
            token_count=count,
            finish_reason=reason,
            perf=self.perf,
            last_hidden_layer=None if hidden is None else RKLLMResultLastHiddenLayer(
                hidden_states=hidden.data.tolist(), embd_size=hidden.embd_size, num_tokens=hidden.num_tokens),
            logits=None if logits is None else RKLLMResultLogits(
                logits=logits.data.tolist(), vocab_size=logits.vocab_size, num_tokens=logits.num_tokens),
            error=self.error,
        )


# --------------------------------------------------------------------------- protocols


class AsyncRun(Protocol):
    """A run started by rkllm_run_async."""

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """The result once the run has ended, or None if it is still going after `timeout` seconds."""
        ...

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        ...

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        """Call `fn(result)` once the run has ended (at once if it has; from any thread)."""
        ...


class LoadedModel(Protocol):
    """One initialised handle: the RKLLM functions that take an LLMHandle."""

    max_new_tokens: int
    n_batch: int

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        """rkllm_run: blocks until the run ends; events go to `sink` as they happen."""
        ...

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam,
                  sink: EventSink) -> AsyncRun:
        """rkllm_run_async: returns at once."""
        ...

    def abort(self) -> None:
        """rkllm_abort: ask the running inference to stop (safe from any thread)."""
        ...

    def is_running(self) -> bool:
        """rkllm_is_running (1 = running)."""
        ...

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None,
                       end_pos: list[int] | None) -> None:
        """rkllm_clear_kv_cache."""
        ...

    def get_kv_cache_size(self) -> list[int]:
        """rkllm_get_kv_cache_size: positions held in the KV cache, one per batch."""
        ...

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """rkllm_set_chat_template."""
        ...

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """rkllm_set_function_tools."""
        ...

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        """rkllm_set_cross_attn_params."""
        ...

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        """rkllm_load_lora."""
        ...

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        """rkllm_load_prompt_cache."""
        ...

    def release_prompt_cache(self) -> None:
        """rkllm_release_prompt_cache."""
        ...

    def destroy(self) -> None:
        """rkllm_destroy (aborts a running inference first)."""
        ...


class Runtime(Protocol):
    """A backend: the NPU library, the CPU runtime, or a worker process hosting either."""

    name: str
    abi: str

    def describe(self) -> dict[str, object]:
        """What the runtime is, for server_status and the start-up log line."""
        ...

    def create_default_param(self) -> RKLLMParam:
        """rkllm_createDefaultParam."""
        ...

    def init(self, param: RKLLMParam) -> LoadedModel:
        """rkllm_init: load a model; `param` is overlaid on create_default_param()."""
        ...


def process_memory_mb(key: str = "VmHWM") -> float:
    """A memory figure of this process from /proc/self/status in MB (VmHWM = peak RSS); 0 where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return 0.0


def effective_max_new_tokens(model: LoadedModel, infer: RKLLMInferParam) -> int:
    """The token limit a run will have: the per-run value when set (1.3.0), else the init value."""
    return infer.max_new_tokens if infer.max_new_tokens > 0 else model.max_new_tokens


def produces_text(infer: RKLLMInferParam) -> bool:
    """Whether a run in this mode generates tokens (as opposed to hidden states or logits)."""
    return infer.mode == RKLLMInferMode.RKLLM_INFER_GENERATE
