"""Registry entries for the 15 rkllm_* functions, 1:1 with the C API, plus rkllm_run_async_result.

Arguments use the C parameter names and structs as nested objects with the C field names; the
LLMHandle is the opaque string id `rkllm_init` returns; callbacks and userdata are the server's.
Blocking C calls run on worker threads so the event loop keeps serving other clients.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.runtime.base import effective_max_new_tokens, produces_text
from mcp_rkllm.streaming.relay import Relay
from mcp_rkllm.structs import (
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RunResult,
)
from mcp_rkllm.tools.handles import AsyncRunState, HandleEntry
from mcp_rkllm.tools.registry import H, HandleId, Params, ToolContext, ToolTable

TOOLS = ToolTable()


def register(name: str, params: type[Params], result: type[BaseModel], *, read_only: bool = False,
             destructive: bool = False, idempotent: bool = False, streams: bool = False,
             c_function: str | None = None) -> Callable[[H], H]:
    """TOOLS.tool for an rkllm_* function: `c_function` defaults to the tool's name ("" = none)."""
    return TOOLS.tool(name, params, result, read_only=read_only, destructive=destructive, idempotent=idempotent,
                      streams=streams, c_function=name if c_function is None else (c_function or None))


class Result(BaseModel):
    """Base of the result models."""

    model_config = ConfigDict(extra="forbid")


class Ok(Result):
    """A call that succeeded and returns nothing else."""

    ok: Literal[True] = True
    handle: str


class HandleParams(Params):
    handle: HandleId


async def _call(entry: HandleEntry, ctx: ToolContext, function: str, fn: Any, *args: Any) -> None:
    """Run one state-changing C call on a worker thread while holding the handle's run slot."""
    settings = ctx.state.settings
    async with entry.using(settings.busy_timeout, function, settings.max_queued_runs):
        try:
            await anyio.to_thread.run_sync(fn, *args)
        except RkllmError as exc:
            if exc.code == "RUNTIME_CRASHED":
                raise ctx.state.crashed_error(entry, exc, function) from None
            raise


# --------------------------------------------------------------------------- createDefaultParam / init / destroy


class NoParams(Params):
    pass


class DefaultParamResult(Result):
    param: RKLLMParam


@register("rkllm_createDefaultParam", NoParams, DefaultParamResult, read_only=True, idempotent=True)
async def create_default_param(ctx: ToolContext, p: NoParams) -> DefaultParamResult:
    """The runtime's default RKLLMParam (rkllm_createDefaultParam). rkllm_init overlays your fields on it."""
    runtime = ctx.state.require_runtime("rkllm_createDefaultParam")
    return DefaultParamResult(param=runtime.create_default_param())


class InitParams(Params):
    param: RKLLMParam = Field(description="RKLLMParam fields to set; the rest keep the runtime's defaults. "
                                          "model_path is required.")


class InitResult(Result):
    handle: str = Field(description="Pass this as `handle` to every other call.")
    runtime: str
    abi: str
    max_new_tokens: int


@register("rkllm_init", InitParams, InitResult)
async def init(ctx: ToolContext, p: InitParams) -> InitResult:
    """Load a model (rkllm_init) and return its handle. `param` is overlaid on rkllm_createDefaultParam()."""
    runtime = ctx.state.require_runtime("rkllm_init")
    if not p.param.model_path:
        raise RkllmError("INVALID_PARAMS", function="rkllm_init", detail="param.model_path is required")
    entry = await ctx.state.load(p.param, "rkllm_init")
    return InitResult(handle=entry.id, runtime=runtime.name, abi=runtime.abi, max_new_tokens=entry.model.max_new_tokens)


class DestroyResult(Result):
    destroyed: Literal[True] = True
    handle: str


@register("rkllm_destroy", HandleParams, DestroyResult, destructive=True)
async def destroy(ctx: ToolContext, p: HandleParams) -> DestroyResult:
    """Abort any run on the handle and free the model (rkllm_destroy). The handle is gone afterwards."""
    await ctx.state.destroy(ctx.state.get(p.handle, "rkllm_destroy"), "rkllm_destroy")
    return DestroyResult(handle=p.handle)


# --------------------------------------------------------------------------- run / run_async


class RunParams(Params):
    handle: HandleId
    rkllm_input: RKLLMInput = Field(description='What to run, e.g. {"prompt_input": "Hello"}.')
    rkllm_infer_params: RKLLMInferParam = Field(default_factory=lambda: RKLLMInferParam(),
                                                description="Mode, LoRA, prompt cache, sampling, keep_history.")


class RunToolResult(RunResult):
    handle: str


def confine_cache(ctx: ToolContext, infer: RKLLMInferParam, function: str) -> RKLLMInferParam:
    """A run that saves a prompt cache writes it inside the cache directory, never elsewhere."""
    p = infer.prompt_cache_params
    if p is None or not p.save_prompt_cache:
        return infer
    path = ctx.state.paths.cache_file(p.prompt_cache_path, function, write=True)
    return infer.model_copy(update={"prompt_cache_params": p.model_copy(update={"prompt_cache_path": path})})


async def relay_run(ctx: ToolContext, entry: HandleEntry, inp: RKLLMInput, infer: RKLLMInferParam,
                    function: str) -> RunResult:
    """One run on the handle's slot, its tokens relayed as progress; RKLLM_RUN_ERROR is GENERATION_ERROR."""
    model = entry.model
    infer = confine_cache(ctx, infer, function)
    total = effective_max_new_tokens(model, infer) if produces_text(infer) else None
    settings = ctx.state.settings
    async with entry.using(settings.busy_timeout, function, settings.max_queued_runs):
        relay: Relay[RunResult] = Relay(ctx.report, total, ctx.gone)
        try:
            result = await relay.run(lambda: model.run(inp, infer, relay.sink), model.abort,
                                     ctx.state.settings.abort_timeout)
        except RkllmError as exc:
            if exc.code == "RUNTIME_CRASHED":
                raise ctx.state.crashed_error(entry, exc, function) from None
            raise
        entry.runs += 1
    first = relay.first_token_at
    ctx.state.metrics.run(result.token_count, time.monotonic() - relay.started,
                          (first - relay.started) * 1000 if first is not None else None)
    if result.finish_reason == "error":
        raise RkllmError("GENERATION_ERROR", function=function, detail=f": {result.error}",
                         handle=entry.id, partial_text=result.text, token_count=result.token_count)
    return result


@register("rkllm_run", RunParams, RunToolResult, streams=True)
async def run(ctx: ToolContext, p: RunParams) -> RunToolResult:
    """Run inference (rkllm_run) and return the whole text, token ids, finish reason and perf stats.

    Tokens stream as progress notifications (message = new text) when the call has a progressToken.
    GET_LAST_HIDDEN_LAYER / GET_LOGITS modes return the arrays instead of text. Cancelling the call
    aborts the run; the handle stays usable.
    """
    entry = ctx.state.get(p.handle, "rkllm_run")
    entry.conversation = []  # chat's record of the KV cache no longer holds
    result = await relay_run(ctx, entry, p.rkllm_input, p.rkllm_infer_params, "rkllm_run")
    return RunToolResult(handle=p.handle, **result.model_dump())


class RunAsyncResult(Result):
    handle: str
    run_id: str
    started: Literal[True] = True
    next: str = "call rkllm_run_async_result with this handle to read the tokens and the result"


@register("rkllm_run_async", RunParams, RunAsyncResult)
async def run_async(ctx: ToolContext, p: RunParams) -> RunAsyncResult:
    """Start inference (rkllm_run_async) and return at once; read it with rkllm_run_async_result.

    The handle stays busy until the run ends; rkllm_abort stops it.
    """
    entry = ctx.state.get(p.handle, "rkllm_run_async")
    entry.conversation = []
    infer = confine_cache(ctx, p.rkllm_infer_params, "rkllm_run_async")
    await entry.acquire(ctx.state.settings.busy_timeout, "rkllm_run_async", ctx.state.settings.max_queued_runs)
    try:
        total = effective_max_new_tokens(entry.model, infer)
        state = AsyncRunState("r-" + secrets.token_hex(4), total)
        state.run = await anyio.to_thread.run_sync(entry.model.run_async, p.rkllm_input, infer, state.sink)
    except BaseException:
        entry.release()
        raise
    entry.async_run = state

    def done(result: RunResult) -> None:
        state.finish(result)
        entry.runs += 1
        entry.release()

    state.run.add_done_callback(done)
    return RunAsyncResult(handle=p.handle, run_id=state.run_id)


class AsyncResultParams(Params):
    handle: HandleId
    offset: int = Field(0, ge=0, description="Return text from this character on (the `offset` of the last reply).")
    wait_seconds: float = Field(0.0, ge=0, le=600, description="Wait up to this long for the run to end, "
                                "streaming new text as progress meanwhile. 0 = answer at once.")


class AsyncRunReport(Result):
    handle: str
    run_id: str
    done: bool
    text: str = Field(description="Text generated after `offset` (so far).")
    offset: int = Field(description="Pass this as `offset` next time to get only newer text.")
    token_count: int
    result: RunResult | None = Field(None, description="The whole result, once done.")


@register("rkllm_run_async_result", AsyncResultParams, AsyncRunReport, read_only=True, c_function="")
async def run_async_result(ctx: ToolContext, p: AsyncResultParams) -> AsyncRunReport:
    """Read the latest rkllm_run_async run of a handle: new text since `offset`, and the result once done.

    With wait_seconds > 0 it waits for the run to end, sending new text as progress notifications.
    """
    entry = ctx.state.get(p.handle, "rkllm_run_async_result")
    state = entry.async_run
    if state is None:
        raise RkllmError("RUN_NOT_FOUND", function="rkllm_run_async_result", handle=p.handle)
    sent = state.text_length if p.wait_seconds > 0 else p.offset
    with anyio.move_on_after(p.wait_seconds):
        while state.result is None and p.wait_seconds > 0:
            await state.changed(p.wait_seconds)
            if state.text_length > sent:
                new = state.text_since(sent)
                sent += len(new)
                await ctx.report(state.tokens, state.total, new)
    result = state.result
    text = state.text_since(p.offset)
    return AsyncRunReport(handle=p.handle, run_id=state.run_id, done=result is not None, text=text,
                          offset=p.offset + len(text), token_count=state.tokens, result=result)


# --------------------------------------------------------------------------- abort / is_running


class AbortResult(Result):
    handle: str
    was_running: bool


@register("rkllm_abort", HandleParams, AbortResult, idempotent=True)
async def abort(ctx: ToolContext, p: HandleParams) -> AbortResult:
    """Stop the running inference on the handle (rkllm_abort). The run ends with finish_reason "abort"."""
    entry = ctx.state.get(p.handle, "rkllm_abort")
    was_running = entry.model.is_running()
    entry.model.abort()
    return AbortResult(handle=p.handle, was_running=was_running)


class RunningResult(Result):
    handle: str
    running: bool


@register("rkllm_is_running", HandleParams, RunningResult, read_only=True, idempotent=True)
async def is_running(ctx: ToolContext, p: HandleParams) -> RunningResult:
    """Whether an inference is running on the handle (rkllm_is_running; 1 = running)."""
    entry = ctx.state.get(p.handle, "rkllm_is_running")
    return RunningResult(handle=p.handle, running=entry.model.is_running())


# --------------------------------------------------------------------------- KV cache


class ClearKvParams(Params):
    handle: HandleId
    keep_system_prompt: int = Field(1, ge=0, le=1, description="1 = keep the system prompt's KV entries.")
    start_pos: list[int] | None = Field(None, description="Per batch: clear from here (1.2.1+; with end_pos).")
    end_pos: list[int] | None = Field(None, description="Per batch: clear up to here, exclusive.")


@register("rkllm_clear_kv_cache", ClearKvParams, Ok, destructive=True, idempotent=True)
async def clear_kv_cache(ctx: ToolContext, p: ClearKvParams) -> Ok:
    """Clear the KV cache (rkllm_clear_kv_cache): the conversation history kept by keep_history=1."""
    entry = ctx.state.get(p.handle, "rkllm_clear_kv_cache")
    await _call(entry, ctx, "rkllm_clear_kv_cache", entry.model.clear_kv_cache, p.keep_system_prompt,
                p.start_pos, p.end_pos)
    return Ok(handle=p.handle)


class KvSizeResult(Result):
    handle: str
    cache_sizes: list[int] = Field(description="Positions held in the KV cache, one per batch.")


@register("rkllm_get_kv_cache_size", HandleParams, KvSizeResult, read_only=True, idempotent=True)
async def get_kv_cache_size(ctx: ToolContext, p: HandleParams) -> KvSizeResult:
    """How many positions the KV cache holds (rkllm_get_kv_cache_size, 1.2.1+)."""
    entry = ctx.state.get(p.handle, "rkllm_get_kv_cache_size")
    return KvSizeResult(handle=p.handle, cache_sizes=entry.model.get_kv_cache_size())


# --------------------------------------------------------------------------- templates, tools, cross-attn


class ChatTemplateParams(Params):
    handle: HandleId
    system_prompt: str = Field(description="e.g. '<|im_start|>system\\nYou are helpful.<|im_end|>\\n'")
    prompt_prefix: str = Field(description="Text before each user prompt, e.g. '<|im_start|>user\\n'.")
    prompt_postfix: str = Field(description="Text after it, e.g. '<|im_end|>\\n<|im_start|>assistant\\n'.")


@register("rkllm_set_chat_template", ChatTemplateParams, Ok, idempotent=True)
async def set_chat_template(ctx: ToolContext, p: ChatTemplateParams) -> Ok:
    """Replace the model's chat template (rkllm_set_chat_template). enable_thinking has no effect after it."""
    entry = ctx.state.get(p.handle, "rkllm_set_chat_template")
    await _call(entry, ctx, "rkllm_set_chat_template", entry.model.set_chat_template, p.system_prompt,
                p.prompt_prefix, p.prompt_postfix)
    return Ok(handle=p.handle)


class FunctionToolsParams(Params):
    handle: HandleId
    system_prompt: str
    tools: str | list[dict[str, Any]] = Field(
        description='OpenAI-style tools: a JSON array of {"type": "function", "function": {...}}, '
                    "as a string or as the array itself.")
    tool_response_str: str = Field("tool_response", description="The tag the template wraps tool results in.")


@register("rkllm_set_function_tools", FunctionToolsParams, Ok, idempotent=True)
async def set_function_tools(ctx: ToolContext, p: FunctionToolsParams) -> Ok:
    """Give the model function-calling tools (rkllm_set_function_tools, 1.2.1+).

    The model then writes <tool_call>{...}</tool_call> in its text; send results back with role "tool".
    """
    entry = ctx.state.get(p.handle, "rkllm_set_function_tools")
    tools = p.tools if isinstance(p.tools, str) else json.dumps(p.tools, ensure_ascii=False)
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as exc:
        raise RkllmError("INVALID_PARAMS", function="rkllm_set_function_tools",
                         detail=f"tools is not valid JSON: {exc}") from exc
    if not isinstance(parsed, list):
        raise RkllmError("INVALID_PARAMS", function="rkllm_set_function_tools", detail="tools must be a JSON array")
    await _call(entry, ctx, "rkllm_set_function_tools", entry.model.set_function_tools, p.system_prompt, tools,
                p.tool_response_str)
    return Ok(handle=p.handle)


class CrossAttnParams(Params):
    handle: HandleId
    cross_attn_params: RKLLMCrossAttnParam


@register("rkllm_set_cross_attn_params", CrossAttnParams, Ok, idempotent=True)
async def set_cross_attn_params(ctx: ToolContext, p: CrossAttnParams) -> Ok:
    """Set the encoder K/V caches, mask and positions of a cross-attention model (1.2.1+)."""
    entry = ctx.state.get(p.handle, "rkllm_set_cross_attn_params")
    await _call(entry, ctx, "rkllm_set_cross_attn_params", entry.model.set_cross_attn_params, p.cross_attn_params)
    return Ok(handle=p.handle)


# --------------------------------------------------------------------------- LoRA and prompt cache


class LoraParams(Params):
    handle: HandleId
    lora_adapter: RKLLMLoraAdapter


@register("rkllm_load_lora", LoraParams, Ok)
async def load_lora(ctx: ToolContext, p: LoraParams) -> Ok:
    """Load a LoRA adapter (rkllm_load_lora); select it per run with rkllm_infer_params.lora_params."""
    entry = ctx.state.get(p.handle, "rkllm_load_lora")
    path = ctx.state.paths.model_file(p.lora_adapter.lora_adapter_path, "rkllm_load_lora")
    adapter = p.lora_adapter.model_copy(update={"lora_adapter_path": path})
    await _call(entry, ctx, "rkllm_load_lora", entry.model.load_lora, adapter)
    return Ok(handle=p.handle)


class PromptCacheParams(Params):
    handle: HandleId
    prompt_cache_path: str = Field(min_length=1, description="A file saved by a run with prompt_cache_params.")


@register("rkllm_load_prompt_cache", PromptCacheParams, Ok)
async def load_prompt_cache(ctx: ToolContext, p: PromptCacheParams) -> Ok:
    """Load a saved prompt cache (rkllm_load_prompt_cache): runs starting with that prefix skip its prefill."""
    entry = ctx.state.get(p.handle, "rkllm_load_prompt_cache")
    path = ctx.state.paths.cache_file(p.prompt_cache_path, "rkllm_load_prompt_cache", write=False)
    await _call(entry, ctx, "rkllm_load_prompt_cache", entry.model.load_prompt_cache, path)
    return Ok(handle=p.handle)


@register("rkllm_release_prompt_cache", HandleParams, Ok, destructive=True, idempotent=True)
async def release_prompt_cache(ctx: ToolContext, p: HandleParams) -> Ok:
    """Release the loaded prompt cache (rkllm_release_prompt_cache)."""
    entry = ctx.state.get(p.handle, "rkllm_release_prompt_cache")
    await _call(entry, ctx, "rkllm_release_prompt_cache", entry.model.release_prompt_cache)
    return Ok(handle=p.handle)
