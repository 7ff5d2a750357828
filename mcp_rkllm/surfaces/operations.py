"""The operations the server exports, in the order clients see them: the 15 RKLLM C functions 1:1
(C names, C parameter names), the RKNN ones (librknnrt), then the friendly operations for people and agents."""

from __future__ import annotations

from mcp_rkllm.engine import Engine
from mcp_rkllm.engine.types import (
    AbortResult,
    AsyncResultParams,
    AsyncRunReport,
    ChatParams,
    ChatResult,
    ChatTemplateParams,
    ClearKvParams,
    CrossAttnParams,
    DefaultParamResult,
    DestroyResult,
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
    LoadedParams,
    LoadedResult,
    LoadModelParams,
    LoadModelResult,
    LoraParams,
    NoParams,
    Ok,
    PromptCacheParams,
    RknnContextParams,
    RknnContextResult,
    RknnCoreMaskParams,
    RknnInitParams,
    RknnInitResult,
    RknnInputsParams,
    RknnOutputsParams,
    RknnOutputsResult,
    RknnQueryParams,
    RknnQueryResult,
    RknnRunParams,
    RunAsyncResult,
    RunningResult,
    RunParams,
    RunToolResult,
    StatusParams,
    StatusResult,
    UnloadParams,
    UnloadResult,
)
from mcp_rkllm.surfaces.registry import OperationSpec


def _same(*names: str) -> tuple[tuple[str, str | None], ...]:
    """C parameters whose names are the params' field names, in C order."""
    return tuple((name, name) for name in names)


#: rkllm_run / rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
#: void* userdata): userdata is the server's.
_RUN = (*_same("handle", "rkllm_input", "rkllm_infer_params"), ("userdata", None))

OPERATIONS: tuple[OperationSpec, ...] = (
    OperationSpec(
        "rkllm_createDefaultParam", NoParams, DefaultParamResult, Engine.create_default_param,
        """The runtime's default RKLLMParam (rkllm_createDefaultParam). rkllm_init overlays your fields on it.""",
        read_only=True, idempotent=True, c_function="rkllm_createDefaultParam",
        c_params=()),
    OperationSpec(
        "rkllm_init", InitParams, InitResult, Engine.init,
        """Load a model (rkllm_init) and return its handle. `param` is overlaid on rkllm_createDefaultParam().""",
        c_function="rkllm_init",
        c_params=(("handle", None), ("param", "param"), ("callback", None))),
    OperationSpec(
        "rkllm_destroy", HandleParams, DestroyResult, Engine.destroy,
        """Abort any run on the handle and free the model (rkllm_destroy). The handle is gone afterwards.""",
        destructive=True, c_function="rkllm_destroy",
        c_params=_same("handle")),
    OperationSpec(
        "rkllm_run", RunParams, RunToolResult, Engine.run,
        """Run inference (rkllm_run) and return the whole text, token ids, finish reason and perf stats.

    Tokens stream as progress notifications (message = new text) when the call has a progressToken.
    GET_LAST_HIDDEN_LAYER / GET_LOGITS modes return the arrays instead of text. Cancelling the call
    aborts the run; the handle stays usable.""",
        streams=True, c_function="rkllm_run",
        c_params=_RUN),
    OperationSpec(
        "rkllm_run_async", RunParams, RunAsyncResult, Engine.run_async,
        """Start inference (rkllm_run_async) and return at once; read it with rkllm_run_async_result.

    The handle stays busy until the run ends; rkllm_abort stops it.""",
        c_function="rkllm_run_async", schema_like="rkllm_run",
        c_params=_RUN),
    OperationSpec(
        "rkllm_run_async_result", AsyncResultParams, AsyncRunReport, Engine.run_async_result,
        """Read the latest rkllm_run_async run of a handle: new text since `offset`, and the result once done.

    With wait_seconds > 0 it waits for the run to end, sending new text as progress notifications.""",
        read_only=True),
    OperationSpec(
        "rkllm_abort", HandleParams, AbortResult, Engine.abort,
        """Stop the running inference on the handle (rkllm_abort). The run ends with finish_reason "abort".""",
        idempotent=True, c_function="rkllm_abort",
        c_params=_same("handle")),
    OperationSpec(
        "rkllm_is_running", HandleParams, RunningResult, Engine.is_running,
        """Whether an inference is running on the handle (rkllm_is_running; 1 = running).""",
        read_only=True, idempotent=True, c_function="rkllm_is_running",
        c_params=_same("handle")),
    OperationSpec(
        "rkllm_clear_kv_cache", ClearKvParams, Ok, Engine.clear_kv_cache,
        """Clear the KV cache (rkllm_clear_kv_cache): the conversation history kept by keep_history=1.""",
        destructive=True, idempotent=True, c_function="rkllm_clear_kv_cache",
        c_params=_same("handle", "keep_system_prompt", "start_pos", "end_pos")),
    OperationSpec(
        "rkllm_get_kv_cache_size", HandleParams, KvSizeResult, Engine.get_kv_cache_size,
        """How many positions the KV cache holds (rkllm_get_kv_cache_size, 1.2.1+).""",
        read_only=True, idempotent=True, c_function="rkllm_get_kv_cache_size",
        c_params=(*_same("handle"), ("cache_sizes", None))),
    OperationSpec(
        "rkllm_set_chat_template", ChatTemplateParams, Ok, Engine.set_chat_template,
        """Replace the model's chat template (rkllm_set_chat_template). enable_thinking has no effect after it.""",
        idempotent=True, c_function="rkllm_set_chat_template",
        c_params=_same("handle", "system_prompt", "prompt_prefix", "prompt_postfix")),
    OperationSpec(
        "rkllm_set_function_tools", FunctionToolsParams, Ok, Engine.set_function_tools,
        """Give the model function-calling tools (rkllm_set_function_tools, 1.2.1+).

    The model then writes <tool_call>{...}</tool_call> in its text; send results back with role "tool".""",
        idempotent=True, c_function="rkllm_set_function_tools",
        c_params=_same("handle", "system_prompt", "tools", "tool_response_str")),
    OperationSpec(
        "rkllm_set_cross_attn_params", CrossAttnParams, Ok, Engine.set_cross_attn_params,
        """Set the encoder K/V caches, mask and positions of a cross-attention model (1.2.1+).""",
        idempotent=True, c_function="rkllm_set_cross_attn_params",
        c_params=_same("handle", "cross_attn_params")),
    OperationSpec(
        "rkllm_load_lora", LoraParams, Ok, Engine.load_lora,
        """Load a LoRA adapter (rkllm_load_lora); select it per run with rkllm_infer_params.lora_params.""",
        c_function="rkllm_load_lora",
        c_params=_same("handle", "lora_adapter")),
    OperationSpec(
        "rkllm_load_prompt_cache", PromptCacheParams, Ok, Engine.load_prompt_cache,
        """Load a saved prompt cache (rkllm_load_prompt_cache): runs starting with that prefix skip its prefill.""",
        c_function="rkllm_load_prompt_cache",
        c_params=_same("handle", "prompt_cache_path")),
    OperationSpec(
        "rkllm_release_prompt_cache", HandleParams, Ok, Engine.release_prompt_cache,
        """Release the loaded prompt cache (rkllm_release_prompt_cache).""",
        destructive=True, idempotent=True, c_function="rkllm_release_prompt_cache",
        c_params=_same("handle")),
    OperationSpec(
        "rknn_init", RknnInitParams, RknnInitResult, lambda e, p, s: e.rknn.init(p, s),
        """Load a .rknn model (rknn_init) and return its context: a vision encoder or any RKNN model.""",
        c_function="rknn_init",
        c_params=(("context", None), ("model", "model_path"), ("size", None), ("flag", "flag"), ("extend", None))),
    OperationSpec(
        "rknn_query", RknnQueryParams, RknnQueryResult, lambda e, p, s: e.rknn.query(p, s),
        """Ask the runtime about the model (rknn_query): tensor counts and attributes, SDK version, memory, perf.""",
        read_only=True, idempotent=True, c_function="rknn_query",
        c_params=(*_same("context", "cmd"), ("info", None), ("size", None))),
    OperationSpec(
        "rknn_inputs_set", RknnInputsParams, RknnContextResult, lambda e, p, s: e.rknn.inputs_set(p, s),
        """Set the model's inputs (rknn_inputs_set): base64 bytes or values, with their type and layout.""",
        c_function="rknn_inputs_set", c_params=(("context", "context"), ("n_inputs", None), ("inputs", "inputs"))),
    OperationSpec(
        "rknn_run", RknnRunParams, RknnOutputsResult, lambda e, p, s: e.rknn.run(p, s),
        """Run the model (rknn_run). With `input_data`: set the inputs, run and return the outputs in one call.""",
        streams=False,
        c_function="rknn_run", c_params=(("context", "context"), ("extend", None))),
    OperationSpec(
        "rknn_outputs_get", RknnOutputsParams, RknnOutputsResult, lambda e, p, s: e.rknn.outputs_get(p, s),
        """Get the outputs of the last run (rknn_outputs_get, then released): float32 or native, base64 or arrays.""",
        read_only=True, c_function="rknn_outputs_get",
        c_params=(("context", "context"), ("n_outputs", None), ("outputs", "outputs"), ("extend", None))),
    OperationSpec(
        "rknn_outputs_release", RknnContextParams, RknnContextResult, lambda e, p, s: e.rknn.outputs_release(p, s),
        """Release fetched outputs (rknn_outputs_release; outputs are already released as they are fetched).""",
        idempotent=True, c_function="rknn_outputs_release",
        c_params=(("context", "context"), ("n_outputs", None), ("outputs", None))),
    OperationSpec(
        "rknn_set_core_mask", RknnCoreMaskParams, RknnContextResult, lambda e, p, s: e.rknn.set_core_mask(p, s),
        """Choose the NPU cores the context runs on (rknn_set_core_mask).""",
        idempotent=True, c_function="rknn_set_core_mask", c_params=_same("context", "core_mask")),
    OperationSpec(
        "rknn_dup_context", RknnContextParams, RknnContextResult, lambda e, p, s: e.rknn.dup_context(p, s),
        """A second context sharing the model's weights (rknn_dup_context), for runs in parallel.""",
        c_function="rknn_dup_context", c_params=(("context_in", "context"), ("context_out", None))),
    OperationSpec(
        "rknn_destroy", RknnContextParams, RknnContextResult, lambda e, p, s: e.rknn.destroy(p, s),
        """Free the context (rknn_destroy).""",
        destructive=True, c_function="rknn_destroy", c_params=_same("context")),
    OperationSpec(
        "list_models", ListModelsParams, ListModelsResult, Engine.list_models,
        """The model files the server can see (.rkllm for the NPU, .gguf for the CPU runtime), with sizes.""",
        read_only=True, idempotent=True),
    OperationSpec(
        "load_model", LoadModelParams, LoadModelResult, Engine.load_model,
        """Load a model by name and return its handle (a new handle each call; the first becomes the default)."""),
    OperationSpec(
        "unload_model", UnloadParams, UnloadResult, Engine.unload_model,
        """Free a loaded model (one handle, or every handle of a model name), aborting its runs.""",
        destructive=True),
    OperationSpec(
        "loaded_models", LoadedParams, LoadedResult, Engine.loaded_models,
        """The loaded models: handle, model, whether a run is going, how many runs, which is the default.""",
        read_only=True, idempotent=True),
    OperationSpec(
        "generate", GenerateParams, GenerateResult, Engine.generate,
        """Generate a reply to `prompt`, streaming tokens as progress; returns the text, finish reason and perf.

    Uses the default model unless `model` or `handle` is given (loading it if needed).""",
        streams=True),
    OperationSpec(
        "chat", ChatParams, ChatResult, Engine.chat,
        """Chat with OpenAI-style `messages` (multi-turn), streaming tokens as progress.

    Send the whole conversation each time, as with OpenAI's API: when the earlier turns are the ones
    this handle already holds, only the new message is processed (the KV cache keeps the rest).""",
        streams=True),
    OperationSpec(
        "embed", EmbedParams, EmbedResult, Engine.embed,
        """An embedding of `text`: the model's last hidden layer, pooled over the tokens (mean or last).""",
        read_only=True),
    OperationSpec(
        "doctor", DoctorParams, DoctorResult, Engine.doctor,
        """Check the board: runtime library and ABI, SoC, NPU driver/load/frequency, governors, memory, models.""",
        read_only=True, idempotent=True),
    OperationSpec(
        "server_status", StatusParams, StatusResult, Engine.server_status,
        """What the server runs on: runtime (NPU library and ABI, or the CPU runtime), loaded models, roots.""",
        read_only=True, idempotent=True),
)
