"""The typed messages between the server and a worker process (pickled over a private socket).

Down (server -> worker): `(call_id, request)` where the request is one of the dataclasses in
`Request`; each has exactly one handler in the worker's dispatch table. Up (worker -> server):
`Reply`, `Failure`, `Events` (a run's events, batched), `AsyncDone` (an rkllm_run_async run
ended) and `Heartbeat` (the worker is alive; sent on a timer, so a stopped process shows).
A run's reply is a `RunOutcome`: the tokens and arrays already went up as events and are never
sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import OutputLimit, RunEvent
from mcp_rkllm.structs import (
    FinishReason,
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RKLLMPerfStat,
)

# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Open:
    """Open the runtime `kind` (native|cpu) in the worker."""

    kind: str
    library: str | None
    abi: str | None


@dataclass(frozen=True, slots=True)
class Init:
    """rkllm_init; the worker hosts at most one model."""

    param: RKLLMParam


@dataclass(frozen=True, slots=True)
class Run:
    """rkllm_run (reply when it ends) or rkllm_run_async (reply at once, AsyncDone at the end). With `images`
    (prepared pixels), the worker's vision encoder fills the multimodal input's image_embed first."""

    rkllm_input: RKLLMInput
    rkllm_infer_params: RKLLMInferParam
    asynchronous: bool = False
    images: tuple[bytes, ...] = ()
    output: OutputLimit | None = None
    """The bound on hidden states / logits, enforced in the worker too (the server's collector checks again)."""


@dataclass(frozen=True, slots=True)
class OpenEncoder:
    """rknn_init of the loaded model's vision encoder, in the same worker; the reply is its EncoderShape."""

    library: str | None
    path: str
    core_mask: int | str | None = None


@dataclass(frozen=True, slots=True)
class RknnInit:
    """rknn_init of a `.rknn` model in this worker (librknnrt opened on first use); the reply is its context id
    in the worker."""

    library: str | None
    path: str
    flag: int | str | list[int | str]


@dataclass(frozen=True, slots=True)
class RknnCall:
    """One method of a worker's RKNN context (`RKNN_METHODS`); dup_context replies with the new context's id."""

    context: int
    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


#: The RknnContext methods a server may call in a worker.
RKNN_METHODS = frozenset({"query", "sdk_version", "inputs_set", "run", "outputs_get", "outputs_release",
                          "set_core_mask", "dup_context", "destroy"})


@dataclass(frozen=True, slots=True)
class Abort:
    pass


@dataclass(frozen=True, slots=True)
class IsRunning:
    pass


@dataclass(frozen=True, slots=True)
class ClearKvCache:
    keep_system_prompt: int
    start_pos: list[int] | None
    end_pos: list[int] | None


@dataclass(frozen=True, slots=True)
class GetKvCacheSize:
    pass


@dataclass(frozen=True, slots=True)
class SetChatTemplate:
    system_prompt: str
    prompt_prefix: str
    prompt_postfix: str


@dataclass(frozen=True, slots=True)
class SetFunctionTools:
    system_prompt: str
    tools: str
    tool_response_str: str


@dataclass(frozen=True, slots=True)
class SetCrossAttnParams:
    cross_attn_params: RKLLMCrossAttnParam


@dataclass(frozen=True, slots=True)
class LoadLora:
    lora_adapter: RKLLMLoraAdapter


@dataclass(frozen=True, slots=True)
class LoadPromptCache:
    prompt_cache_path: str


@dataclass(frozen=True, slots=True)
class ReleasePromptCache:
    pass


@dataclass(frozen=True, slots=True)
class PrimeHistory:
    messages: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class SeedNextRun:
    seed: int


@dataclass(frozen=True, slots=True)
class Tokenize:
    text: str


@dataclass(frozen=True, slots=True)
class Destroy:
    pass


@dataclass(frozen=True, slots=True)
class Exit:
    pass


Request = (Open | Init | OpenEncoder | Run | RknnInit | RknnCall | Abort | IsRunning | ClearKvCache | GetKvCacheSize
           | SetChatTemplate | SetFunctionTools | SetCrossAttnParams | LoadLora | LoadPromptCache | ReleasePromptCache
           | PrimeHistory | Tokenize | SeedNextRun | Destroy | Exit)

#: Requests the worker answers on its reading thread, never queued behind a run.
INLINE: tuple[type, ...] = (Abort, IsRunning, GetKvCacheSize)

# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Opened:
    """What the worker's runtime is."""

    name: str
    abi: str
    describe: dict[str, object]
    default: RKLLMParam
    assigns_npu_domains: bool


@dataclass(frozen=True, slots=True)
class Loaded:
    """The model the worker loaded, and its optional capabilities (see runtime.base)."""

    max_new_tokens: int
    n_batch: int
    history_priming: bool
    tokenizing: bool
    seeing: bool


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended; its tokens, arrays, perf and error already arrived as events."""

    finish_reason: FinishReason
    error: str | None
    perf: RKLLMPerfStat | None
    output_error: tuple[str, dict[str, Any]] | None = None
    """(code, fields) of the LIMIT_EXCEEDED for an output the worker dropped as over the run's OutputLimit."""


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Failure:
    call_id: int
    code: str
    function: str | None
    rc: int | None
    fields: dict[str, Any]

    @classmethod
    def of(cls, call_id: int, exc: BaseException) -> Failure:
        """The failure of `call_id` for `exc` (anything not from the error table is INTERNAL)."""
        if isinstance(exc, RkllmError):
            return cls(call_id, exc.code, exc.function, exc.rc, exc.fields)
        return cls(call_id, "INTERNAL", None, None, {"detail": f"{type(exc).__name__} in the worker: {exc}"})

    def error(self) -> RkllmError:
        """The error as it was raised in the worker."""
        return RkllmError(self.code, function=self.function, rc=self.rc, **self.fields)


@dataclass(frozen=True, slots=True)
class Events:
    call_id: int
    events: list[RunEvent]


@dataclass(frozen=True, slots=True)
class AsyncDone:
    call_id: int
    outcome: RunOutcome


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


Up = Reply | Failure | Events | AsyncDone | Heartbeat
