"""The Runtime protocol every backend implements, and the optional capabilities a model may have.

A `Runtime` mirrors `rkllm_createDefaultParam` and `rkllm_init`; `init` returns a `LoadedModel`
whose methods mirror the other thirteen C functions on that handle. Runs report through an
`EventSink` (see `events`); `run` also returns the whole `RunResult`. Capabilities beyond the C
API are explicit protocols (`HistoryPriming`, `Tokenizing`, `Seeding`, `Seeing`) checked with isinstance, never by
probing attribute names. Nothing here knows about asyncio, cffi or any protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mcp_rkllm.events import AsyncRun, EventSink
from mcp_rkllm.structs import (
    RKLLMCrossAttnParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RunResult,
)

if TYPE_CHECKING:
    from mcp_rkllm.runtime.vision import EncoderShape


class LoadedModel(Protocol):
    """One initialised handle: the RKLLM functions that take an LLMHandle."""

    max_new_tokens: int
    n_batch: int

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        """rkllm_run: blocks until the run ends; events go to `sink` (a RunCollector or any sink)."""
        ...

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> AsyncRun:
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


@runtime_checkable
class HistoryPriming(Protocol):
    """A model that can be told the exact conversation its next keep_history run continues
    (the CPU runtime renders it with the chat template); others get the history flattened."""

    def prime_history(self, messages: list[dict[str, str]]) -> None:
        """Make `messages` the conversation the next keep_history run continues."""
        ...


@runtime_checkable
class Tokenizing(Protocol):
    """A model that can tokenize raw text without the chat template (for embeddings)."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of raw `text`."""
        ...


@runtime_checkable
class Seeding(Protocol):
    """A model whose sampling takes a seed (the CPU runtime; librkllmrt has none)."""

    def seed_next_run(self, seed: int) -> None:
        """The next run samples with `seed`: the same seed, input and options give the same tokens."""
        ...


@runtime_checkable
class Seeing(Protocol):
    """A model that can host its vision encoder (the NPU runtime with librknnrt): the encoder lives where the
    model lives, and a run with images encodes them there, just before rkllm_run."""

    def open_encoder(self, library: str | None, path: str, core_mask: int | str | None) -> EncoderShape:
        """rknn_init of the `.rknn` encoder beside the model; its shape."""
        ...

    def run_with_images(self, rkllm_input: RKLLMInput, images: list[bytes], rkllm_infer_params: RKLLMInferParam,
                        sink: EventSink) -> RunResult:
        """rkllm_run of a multimodal input whose image_embed is filled with the encoder's rows of `images`
        (uint8 pixels in the encoder's input layout, one after another)."""
        ...


class Runtime(Protocol):
    """A backend: the NPU library, the CPU runtime, or worker processes hosting either."""

    name: str
    abi: str
    assigns_npu_domains: bool
    """Whether concurrently loaded models need distinct extend_param.base_domain_id values (the NPU)."""

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
