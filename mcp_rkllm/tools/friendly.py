"""Friendly tools for people and agents: models by name, flat generate/chat/embed, status.

They are built on the same Runtime calls as the rkllm_* tools. `generate`, `chat` and `embed`
without `handle` or `model` use the default handle (the first model loaded), or load the
default model on first use: `--model`, else the bundled SmolLM2 on the CPU runtime, else the
only model the store finds.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mcp_rkllm import __version__
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models.store import ModelInfo
from mcp_rkllm.runtime.base import process_memory_mb
from mcp_rkllm.structs import (
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMParam,
    RKLLMPerfStat,
    RKLLMSamplingParam,
    RKLLMTokenInput,
    overlay_param,
)
from mcp_rkllm.tools.api import relay_run
from mcp_rkllm.tools.handles import AppState, HandleEntry
from mcp_rkllm.tools.registry import HandleId, Params, ToolContext, ToolTable

TOOLS = ToolTable()


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- models


class ListModelsParams(Params):
    pass


class ModelEntry(BaseModel):
    name: str
    file: str
    path: str
    kind: str
    runtime: str
    size_mb: float
    size_bytes: int
    bundled: bool
    loadable: bool = Field(description="Whether the server's runtime can load this kind of file.")
    defaults: dict[str, Any] | None = None


class ListModelsResult(Result):
    models: list[ModelEntry]
    roots: list[str]
    runtime: str | None
    problems: list[str] = Field(default_factory=list)


def _runtime_name(state: AppState) -> str | None:
    return state.runtime.name if state.runtime is not None else None


@TOOLS.tool("list_models", ListModelsParams, ListModelsResult, read_only=True, idempotent=True)
async def list_models(ctx: ToolContext, p: ListModelsParams) -> ListModelsResult:
    """The model files the server can see (.rkllm for the NPU, .gguf for the CPU runtime), with sizes."""
    return await models_snapshot(ctx.state)


async def models_snapshot(state: AppState) -> ListModelsResult:
    """What list_models returns (also the rkllm://models resource)."""
    models = await anyio.to_thread.run_sync(state.store.models)
    runtime = _runtime_name(state)
    return ListModelsResult(
        models=[ModelEntry(**m.to_dict(), loadable=m.runtime == runtime) for m in models],
        roots=[str(r) for r in state.store.roots], runtime=runtime, problems=state.store.problems)


class LoadModelParams(Params):
    model: str = Field(min_length=1, description="Name (full, without extension, or a unique prefix); see list_models.")
    param: RKLLMParam | None = Field(None, description="RKLLMParam fields to set (over the model's sidecar defaults); "
                                                      "model_path comes from the model name.")


class LoadModelResult(Result):
    handle: str
    model: str
    path: str
    runtime: str
    abi: str
    max_new_tokens: int
    default: bool = Field(description="Whether generate/chat without handle or model use this handle.")


async def _load(state: AppState, info: ModelInfo, param: RKLLMParam | None, function: str) -> HandleEntry:
    runtime = state.require_runtime(function)
    if info.runtime != runtime.name:
        raise RkllmError("NOT_SUPPORTED", function=function, what=f"loading {info.path.name}",
                         detail=f" by the {runtime.name} runtime (.rkllm files need the NPU runtime, "
                                f".gguf files the CPU runtime)")
    if param is not None and param.model_path is not None:
        raise RkllmError("INVALID_PARAMS", function=function, detail="param.model_path: give the model by name")
    base = info.sidecar.param if info.sidecar else RKLLMParam()
    merged = overlay_param(base, param or RKLLMParam()).model_copy(update={"model_path": str(info.path)})
    entry = await state.load(merged, function, model_name=info.name)
    if info.sidecar is not None and info.sidecar.chat_template is not None:
        t = info.sidecar.chat_template
        await anyio.to_thread.run_sync(entry.model.set_chat_template, t.system_prompt, t.prompt_prefix,
                                       t.prompt_postfix)
    if state.default_handle not in state.handles:
        state.default_handle = entry.id
    return entry


@TOOLS.tool("load_model", LoadModelParams, LoadModelResult)
async def load_model(ctx: ToolContext, p: LoadModelParams) -> LoadModelResult:
    """Load a model by name and return its handle (a new handle each call; the first becomes the default)."""
    state = ctx.state
    info = await anyio.to_thread.run_sync(state.store.resolve, p.model)
    entry = await _load(state, info, p.param, "load_model")
    runtime = state.require_runtime("load_model")
    return LoadModelResult(handle=entry.id, model=info.name, path=str(info.path), runtime=runtime.name,
                           abi=runtime.abi, max_new_tokens=entry.model.max_new_tokens,
                           default=state.default_handle == entry.id)


class UnloadParams(Params):
    handle: HandleId | None = None
    model: str | None = Field(None, description="Unload every handle of this model.")

    @model_validator(mode="after")
    def _one(self) -> UnloadParams:
        if (self.handle is None) == (self.model is None):
            raise ValueError("give exactly one of handle and model")
        return self


class UnloadResult(Result):
    unloaded: list[str]


@TOOLS.tool("unload_model", UnloadParams, UnloadResult, destructive=True)
async def unload_model(ctx: ToolContext, p: UnloadParams) -> UnloadResult:
    """Free a loaded model (one handle, or every handle of a model name), aborting its runs."""
    state = ctx.state
    if p.handle is not None:
        entries = [state.get(p.handle, "unload_model")]
    else:
        entries = [e for e in state.handles.values() if e.model_name is not None and p.model is not None
                   and e.model_name.lower().startswith(p.model.lower())]
        if not entries:
            raise RkllmError("MODEL_NOT_FOUND", function="unload_model", name=p.model, detail=" among loaded models")
    for entry in entries:
        await state.destroy(entry, "unload_model")
    return UnloadResult(unloaded=[e.id for e in entries])


class LoadedParams(Params):
    pass


class LoadedEntry(BaseModel):
    handle: str
    model: str | None
    path: str | None
    runtime: str | None
    running: bool
    runs: int
    loaded_at: float
    default: bool
    pid: int | None = Field(None, description="The worker process hosting the model (process isolation).")


class LoadedResult(Result):
    loaded: list[LoadedEntry]


@TOOLS.tool("loaded_models", LoadedParams, LoadedResult, read_only=True, idempotent=True)
async def loaded_models(ctx: ToolContext, p: LoadedParams) -> LoadedResult:
    """The loaded models: handle, model, whether a run is going, how many runs, which is the default."""
    state = ctx.state
    return LoadedResult(loaded=[
        LoadedEntry(handle=e.id, model=e.model_name, path=e.param.model_path, runtime=_runtime_name(state),
                    running=e.model.is_running(), runs=e.runs, loaded_at=e.loaded_at,
                    default=e.id == state.default_handle, pid=getattr(e.model, "pid", None))
        for e in state.handles.values()])


# --------------------------------------------------------------------------- generation


class Sampling(Params):
    """Flat generation options; unset ones keep the model's values."""

    model: str | None = Field(None, description="Model name; default: the loaded default model.")
    handle: HandleId | None = Field(None, description="A handle from load_model / rkllm_init.")
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy (deterministic).")
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    top_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0, le=100)
    frequency_penalty: float | None = Field(None, ge=-100, le=100)
    presence_penalty: float | None = Field(None, ge=-100, le=100)
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(None, ge=0, le=100)
    mirostat_eta: float | None = Field(None, ge=0, le=100)

    def infer(self, entry: HandleEntry, keep_history: bool, mode: RKLLMInferMode = RKLLMInferMode.RKLLM_INFER_GENERATE,
              ) -> RKLLMInferParam:
        """RKLLMInferParam for these options (per-run sampling and limit need RKLLM 1.3.0 on the NPU)."""
        names = [f for f in RKLLMSamplingParam.model_fields if getattr(self, f) is not None]
        sampling = None
        if names:
            p = entry.param
            base = {f: getattr(p, f) for f in RKLLMSamplingParam.model_fields if getattr(p, f, None) is not None}
            sampling = RKLLMSamplingParam.model_validate({**base, **{f: getattr(self, f) for f in names}})
        return RKLLMInferParam(mode=mode, keep_history=int(keep_history), sampling_params=sampling,
                               max_new_tokens=self.max_new_tokens or 0)


async def _entry_for(state: AppState, p: Sampling, function: str) -> HandleEntry:
    """The handle a friendly call runs on, loading the default model if nothing is loaded."""
    if p.handle is not None:
        return state.get(p.handle, function)
    async with state.load_lock:
        if p.model is not None:
            info = await anyio.to_thread.run_sync(state.store.resolve, p.model)
            for entry in state.handles.values():
                if entry.param.model_path == str(info.path):
                    return entry
            return await _load(state, info, None, function)
        if state.default_handle in state.handles:
            return state.handles[state.default_handle]
        if state.handles:
            return next(iter(state.handles.values()))
        return await _load(state, await anyio.to_thread.run_sync(_default_model, state), None, function)


def _default_model(state: AppState) -> ModelInfo:
    if state.settings.model:
        return state.store.resolve(state.settings.model)
    runtime = state.require_runtime("generate")
    candidates = [m for m in state.store.models() if m.runtime == runtime.name]
    bundled = [m for m in candidates if m.bundled]
    if bundled:
        return bundled[0]
    if len(candidates) == 1:
        return candidates[0]
    raise RkllmError("MODEL_NOT_FOUND", function="generate", name="(default)",
                     detail=f": no default model; pass `model` (one of: "
                            f"{', '.join(m.path.name for m in candidates) or 'none found'}) or start the server "
                            "with --model")


class GenerateParams(Sampling):
    prompt: str = Field(min_length=1, description="The user prompt; the model's chat template is applied.")
    keep_history: bool = Field(False, description="Continue the conversation held in the handle's KV cache.")


class GenerateResult(Result):
    text: str
    finish_reason: Literal["stop", "length", "abort", "error"]
    token_count: int
    perf: RKLLMPerfStat | None = None
    handle: str
    model: str | None


@TOOLS.tool("generate", GenerateParams, GenerateResult, streams=True)
async def generate(ctx: ToolContext, p: GenerateParams) -> GenerateResult:
    """Generate a reply to `prompt`, streaming tokens as progress; returns the text, finish reason and perf.

    Uses the default model unless `model` or `handle` is given (loading it if needed).
    """
    entry = await _entry_for(ctx.state, p, "generate")
    entry.conversation = []
    result = await relay_run(ctx, entry, RKLLMInput(prompt_input=p.prompt), p.infer(entry, p.keep_history), "generate")
    return GenerateResult(text=result.text, finish_reason=result.finish_reason, token_count=result.token_count,
                          perf=result.perf, handle=entry.id, model=entry.model_name)


class ChatMessage(Params):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatParams(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="OpenAI-style conversation; the last message "
                                                                  "is a user (or tool) message.")

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatParams:
        if self.messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message must have role user or tool")
        return self


class ChatResult(GenerateResult):
    message: dict[str, str] = Field(description='{"role": "assistant", "content": ...}')
    reused_history: bool = Field(description="True when earlier turns were already in the KV cache.")


def _flatten(messages: list[dict[str, str]]) -> str:
    """Earlier turns as text before the new message, for runtimes that cannot be given a history."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages[:-1]]
    return ("Conversation so far:\n" + "\n".join(lines) + "\n\n" if lines else "") + messages[-1]["content"]


@TOOLS.tool("chat", ChatParams, ChatResult, streams=True)
async def chat(ctx: ToolContext, p: ChatParams) -> ChatResult:
    """Chat with OpenAI-style `messages` (multi-turn), streaming tokens as progress.

    Send the whole conversation each time, as with OpenAI's API: when the earlier turns are the ones
    this handle already holds, only the new message is processed (the KV cache keeps the rest).
    """
    entry = await _entry_for(ctx.state, p, "chat")
    messages = [m.model_dump() for m in p.messages]
    last = messages[-1]
    role = "tool" if last["role"] == "tool" else "user"
    reused = bool(entry.conversation) and entry.conversation == messages[:-1]
    if reused:
        prompt = last["content"]
    else:
        prime = getattr(entry.model, "prime_history", None)
        if prime is not None:  # the CPU runtime renders the exact conversation with the chat template
            await anyio.to_thread.run_sync(prime, messages[:-1])
            prompt = last["content"]
        else:
            await anyio.to_thread.run_sync(entry.model.clear_kv_cache, 0, None, None)
            prompt = _flatten(messages)
    result = await relay_run(ctx, entry, RKLLMInput(prompt_input=prompt, role=role), p.infer(entry, True), "chat")
    reply = {"role": "assistant", "content": result.text}
    entry.conversation = [*messages, reply] if result.finish_reason != "abort" else []
    return ChatResult(message=reply, text=result.text, finish_reason=result.finish_reason,
                      token_count=result.token_count, perf=result.perf, handle=entry.id, model=entry.model_name,
                      reused_history=reused)


class EmbedParams(Params):
    text: str = Field(min_length=1)
    model: str | None = None
    handle: HandleId | None = None
    pooling: Literal["mean", "last"] = Field("mean", description="How token vectors become one.")
    normalize: bool = Field(True, description="Scale the vector to unit length.")


class EmbedResult(Result):
    embedding: list[float]
    dim: int
    tokens: int
    handle: str
    model: str | None


@TOOLS.tool("embed", EmbedParams, EmbedResult, read_only=True)
async def embed(ctx: ToolContext, p: EmbedParams) -> EmbedResult:
    """An embedding of `text`: the model's last hidden layer, pooled over the tokens (mean or last)."""
    state = ctx.state
    entry = await _entry_for(state, Sampling(model=p.model, handle=p.handle), "embed")
    entry.conversation = []
    tokenize = getattr(entry.model, "tokenize", None)
    if tokenize is not None:  # raw text, without the chat template
        ids = await anyio.to_thread.run_sync(tokenize, p.text)
        inp = RKLLMInput(token_input=RKLLMTokenInput(input_ids=ids))
    else:
        inp = RKLLMInput(prompt_input=p.text)
    result = await relay_run(ctx, entry, inp, RKLLMInferParam(mode=RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER),
                        "embed")
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
    return EmbedResult(embedding=vector, dim=dim, tokens=n, handle=entry.id, model=entry.model_name)


# --------------------------------------------------------------------------- status


class DoctorParams(Params):
    pass


class DoctorCheck(BaseModel):
    name: str
    status: Literal["ok", "warn", "fail", "info"]
    value: str
    fix: str


class DoctorResult(Result):
    checks: list[DoctorCheck]
    report: str = Field(description="The same as a human-readable table.")


@TOOLS.tool("doctor", DoctorParams, DoctorResult, read_only=True, idempotent=True)
async def doctor_tool(ctx: ToolContext, p: DoctorParams) -> DoctorResult:
    """Check the board: runtime library and ABI, SoC, NPU driver/load/frequency, governors, memory, models."""
    from mcp_rkllm import doctor

    state = ctx.state
    info = state.runtime.describe() if state.runtime is not None else None
    checks = await anyio.to_thread.run_sync(lambda: doctor.run(state.settings, "/", info))
    return DoctorResult(checks=[DoctorCheck(**vars(c)) for c in checks], report=doctor.render(checks))


class StatusParams(Params):
    pass


class StatusResult(Result):
    version: str
    runtime: dict[str, Any] | None
    runtime_choice: str
    runtime_reason: str
    runtime_error: dict[str, Any] | None = None
    loaded: int
    default_handle: str | None
    default_model: str | None
    model_roots: list[str]
    uptime_s: float
    pid: int
    rss_mb: float = Field(description="The server process's resident memory (workers not included).")
    peak_rss_mb: float
    handles: list[str] = Field(default_factory=list, description="The loaded handles (see loaded_models).")


@TOOLS.tool("server_status", StatusParams, StatusResult, read_only=True, idempotent=True)
async def server_status(ctx: ToolContext, p: StatusParams) -> StatusResult:
    """What the server runs on: runtime (NPU library and ABI, or the CPU runtime), loaded models, roots."""
    return status_snapshot(ctx.state)


def status_snapshot(state: AppState) -> StatusResult:
    """What server_status returns (also the rkllm://status resource)."""
    default = state.default_handle if state.default_handle in state.handles else None
    return StatusResult(
        version=__version__, runtime=state.runtime.describe() if state.runtime else None,
        runtime_choice=state.settings.runtime, runtime_reason=state.runtime_reason,
        runtime_error=state.runtime_error.to_dict() if state.runtime_error else None,
        loaded=len(state.handles), default_handle=default, default_model=state.settings.model,
        model_roots=[str(r) for r in state.store.roots], uptime_s=round(time.time() - state.started, 1),
        pid=os.getpid(), handles=list(state.handles), rss_mb=process_memory_mb("VmRSS"),
        peak_rss_mb=process_memory_mb())

