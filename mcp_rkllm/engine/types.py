"""The vocabulary of the engine's operations: a params model and a result model per operation.

Every surface speaks these: the registry exports them as MCP tool schemas and JSON-RPC methods,
and the engine's methods take and return them. Params are strict and reject unknown fields;
field names follow the C API where an operation mirrors a C function.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from mcp_rkllm.structs import (
    Int32,
    RKLLMCrossAttnParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RKLLMPerfStat,
    RKLLMSamplingParam,
    RunResult,
)


class Params(BaseModel):
    """Base of every operation's params: strict types, unknown arguments rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")


HandleId = Annotated[str, Field(description="The opaque id rkllm_init / load_model returned.", min_length=1,
                                max_length=64)]


class Result(BaseModel):
    """Base of the result models."""

    model_config = ConfigDict(extra="forbid")


class Ok(Result):
    """A call that succeeded and returns nothing else."""

    ok: Literal[True] = True
    handle: str


class HandleParams(Params):
    handle: HandleId


class NoParams(Params):
    pass


class DefaultParamResult(Result):
    param: RKLLMParam


class InitParams(Params):
    param: RKLLMParam = Field(description="RKLLMParam fields to set; the rest keep the runtime's defaults. "
                                          "model_path is required.")


class InitResult(Result):
    handle: str = Field(description="Pass this as `handle` to every other call.")
    runtime: str
    abi: str
    max_new_tokens: int


class DestroyResult(Result):
    destroyed: Literal[True] = True
    handle: str


class RunParams(Params):
    handle: HandleId
    rkllm_input: RKLLMInput = Field(description='What to run, e.g. {"prompt_input": "Hello"}.')
    rkllm_infer_params: RKLLMInferParam = Field(default_factory=lambda: RKLLMInferParam(),
                                                description="Mode, LoRA, prompt cache, sampling, keep_history.")
    output_rows: int = Field(0, ge=0, le=2**31 - 1, description=(
        "Hidden-state and logits modes: return only the last N rows (1 = the last token's, what the next token is "
        "sampled from); 0 = one row per input token. The rows returned (x width) are bounded by the server's "
        "--max-output-floats: over it is LIMIT_EXCEEDED saying how many rows fit."))


class RunToolResult(RunResult):
    handle: str


class RunAsyncResult(Result):
    handle: str
    run_id: str
    started: Literal[True] = True
    next: str = "call rkllm_run_async_result with this handle to read the tokens and the result"


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


class AbortResult(Result):
    handle: str
    was_running: bool


class RunningResult(Result):
    handle: str
    running: bool


class ClearKvParams(Params):
    handle: HandleId
    keep_system_prompt: int = Field(1, ge=0, le=1, description="1 = keep the system prompt's KV entries.")
    start_pos: list[Int32] | None = Field(None, description="Per batch: clear from here (1.2.1+; with end_pos).")
    end_pos: list[Int32] | None = Field(None, description="Per batch: clear up to here, exclusive.")


class KvSizeResult(Result):
    handle: str
    cache_sizes: list[int] = Field(description="Positions held in the KV cache, one per batch.")


class ChatTemplateParams(Params):
    handle: HandleId
    system_prompt: str = Field(description="e.g. '<|im_start|>system\\nYou are helpful.<|im_end|>\\n'")
    prompt_prefix: str = Field(description="Text before each user prompt, e.g. '<|im_start|>user\\n'.")
    prompt_postfix: str = Field(description="Text after it, e.g. '<|im_end|>\\n<|im_start|>assistant\\n'.")


class FunctionToolsParams(Params):
    handle: HandleId
    system_prompt: str = Field(description="The system prompt the tool descriptions are added to.")
    tools: str | list[dict[str, Any]] = Field(
        description='OpenAI-style tools: a JSON array of {"type": "function", "function": {...}}, '
                    "as a string or as the array itself.")
    tool_response_str: str = Field("tool_response", description="The tag the template wraps tool results in.")


class CrossAttnParams(Params):
    handle: HandleId
    cross_attn_params: RKLLMCrossAttnParam


class LoraParams(Params):
    handle: HandleId
    lora_adapter: RKLLMLoraAdapter


class PromptCacheParams(Params):
    handle: HandleId
    prompt_cache_path: str = Field(min_length=1, description="A file saved by a run with prompt_cache_params.")


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
    family: str = Field("default", description="The model family: how its replies mark reasoning and tool calls "
                                               "(from the file name, or the sidecar's `family`).")
    defaults: dict[str, Any] | None = None
    link: str | None = Field(None, description="The symlink in a model root the model is listed as (`path` is "
                                               "the file it points to).")
    vision: bool = Field(False, description="A vision-language model: chat and generate take images.")
    vision_encoder: str | None = Field(None, description="Its vision encoder (.rknn).")


class ListModelsResult(Result):
    models: list[ModelEntry]
    roots: list[str]
    runtime: str | None
    problems: list[str] = Field(default_factory=list, description="Files under the roots that were skipped "
                                "(dangling or looping symlinks, unreadable, linking outside the roots) or whose "
                                "sidecar is broken.")


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


class Sampling(Params):
    """Flat generation options; unset ones keep the model's values."""

    model: str | None = Field(None, description="Model name; default: the loaded default model.")
    handle: HandleId | None = Field(None, description="A handle from load_model / rkllm_init.")
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Most tokens to generate "
                                       "(default: the model's init value; per run needs RKLLM 1.3.0 on the NPU).")
    temperature: float | None = Field(None, ge=0, le=100, description="Randomness, typically 0-1.5 (default 0.8): "
                                      "0 = greedy, the same reply every time; higher = more varied.")
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="Sample from the k likeliest tokens (default "
                                                                   "40); 1 = greedy.")
    top_p: float | None = Field(None, ge=0, le=1, description="Sample from the likeliest tokens whose "
                                                            "probabilities add up to p, 0-1 (default 0.9).")
    repeat_penalty: float | None = Field(None, ge=0, le=100, description="Above 1 discourages repeating recent "
                                                                       "tokens (default 1.1; 1 = off).")
    frequency_penalty: float | None = Field(None, ge=-100, le=100, description="Lowers a token's odds the more "
                                            "often it appeared, typically 0-2 (default 0).")
    presence_penalty: float | None = Field(None, ge=-100, le=100, description="Lowers the odds of any token that "
                                           "appeared already, typically 0-2 (default 0).")
    mirostat: Literal[0, 1, 2] | None = Field(None, description="Mirostat sampling: 0 off (default), 1 or 2 "
                                                                "(targets a constant surprise, mirostat_tau).")
    mirostat_tau: float | None = Field(None, ge=0, le=100, description="Mirostat's target surprise (default 5).")
    mirostat_eta: float | None = Field(None, ge=0, le=100, description="Mirostat's learning rate (default 0.1).")
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=16, description="Stop when the reply writes one of these strings (not included in it).")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Sampling seed: the same seed, input and options "
                             "give the same reply (CPU runtime; the NPU runtime takes none).")

    def infer(self, param: RKLLMParam, keep_history: bool,
              mode: RKLLMInferMode = RKLLMInferMode.RKLLM_INFER_GENERATE) -> RKLLMInferParam:
        """RKLLMInferParam for these options over the model's `param` (per-run sampling and limit need
        RKLLM 1.3.0 on the NPU)."""
        names = [f for f in RKLLMSamplingParam.model_fields if getattr(self, f) is not None]
        sampling = None
        if names:
            p = param
            base = {f: getattr(p, f) for f in RKLLMSamplingParam.model_fields if getattr(p, f, None) is not None}
            sampling = RKLLMSamplingParam.model_validate({**base, **{f: getattr(self, f) for f in names}})
        return RKLLMInferParam(mode=mode, keep_history=int(keep_history), sampling_params=sampling,
                               max_new_tokens=self.max_new_tokens or 0)


class Blob:
    """An image's text form (base64, a data: URI or a path), kept out of the string limits: it is bounded by
    `--max-image-bytes` when the image is read, not by `--max-prompt-bytes`."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Blob({len(self.text)} characters)"


def _blob(value: Any) -> Blob:
    if isinstance(value, Blob):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return Blob(value)


_BLOB_TEXT = PlainSerializer(lambda b: b.text, return_type=str)

ImageData = Annotated[Blob, PlainValidator(_blob), _BLOB_TEXT, WithJsonSchema({
    "type": "string", "description": "The image file's bytes (PNG, JPEG or WebP), base64."})]
ImageUrl = Annotated[Blob, PlainValidator(_blob), _BLOB_TEXT, WithJsonSchema({
    "type": "string", "description": "A data: URI (data:image/png;base64,...) or the path of an image file inside "
                                      "the model folders."})]


class TextPart(Params):
    type: Literal["text"]
    text: str


class ImagePart(Params):
    """An image as MCP's image content carries it."""

    type: Literal["image"]
    data: ImageData
    mimeType: str | None = Field(None, max_length=128, description="e.g. image/png (the bytes decide).")


class ImageUrlRef(Params):
    url: ImageUrl
    detail: str | None = Field(None, max_length=16, description="Accepted and ignored (the encoder's size rules).")


class ImageUrlPart(Params):
    """An image as OpenAI's image_url part carries it."""

    type: Literal["image_url"]
    image_url: ImageUrlRef


ImageInput = Annotated[ImagePart | ImageUrlPart, Field(discriminator="type")]
ContentPart = Annotated[TextPart | ImagePart | ImageUrlPart, Field(discriminator="type")]


class GenerateParams(Sampling):
    prompt: str = Field(min_length=1, description="The user prompt; the model's chat template is applied.")
    keep_history: bool = Field(False, description="Continue the conversation held in the handle's KV cache.")
    enable_thinking: bool = Field(False, description="Let a thinking model (Qwen3-style templates) reason first "
                                                     "(RKLLMInput.enable_thinking, RKLLM 1.2.1+).")
    images: list[ImageInput] | None = Field(None, description="Images for a vision model, before the prompt: "
                                            '{"type": "image", "data": <base64>, "mimeType": "image/png"} or '
                                            '{"type": "image_url", "image_url": {"url": <data: URI or path>}}.')


class ToolCall(BaseModel):
    """A tool call as OpenAI writes it: `arguments` is a JSON string."""

    id: str
    type: Literal["function"] = "function"
    function: dict[str, str] = Field(description='{"name": ..., "arguments": "<JSON object as a string>"}')


class GenerateResult(Result):
    text: str = Field(description="The reply for the user: the model's output without its reasoning and tool calls "
                                  "(the same as `content`).")
    content: str = Field("", description="The same as `text`.")
    reasoning: str | None = Field(None, description="The model's reasoning (e.g. <think>...</think>), if it wrote "
                                                    "any.")
    tool_calls: list[ToolCall] = Field(default_factory=list, description="The tool calls the model made.")
    raw_text: str = Field("", description="Everything the model wrote, markers included.")
    warnings: list[str] = Field(default_factory=list, description="Output that could not be understood (e.g. a "
                                                                   "tool call with broken JSON, kept as content).")
    family: str = Field("default", description="The model family whose markers were read.")
    finish_reason: Literal["stop", "length", "abort", "error"]
    token_count: int
    perf: RKLLMPerfStat | None = None
    handle: str
    model: str | None


class ChatMessage(Params):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(
        None, description="The text (null for an assistant message that only calls tools); a user message may be a "
                          'list of parts: {"type": "text", "text"}, {"type": "image", "data": <base64>, "mimeType"} '
                          '(MCP) or {"type": "image_url", "image_url": {"url": <data: URI or path>}} (OpenAI), '
                          "for a vision model.")
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's tool calls, as returned.")
    tool_call_id: str | None = Field(None, description="A tool message: the id of the call it answers.")
    name: str | None = Field(None, description="A tool message: the tool's name (optional).")
    reasoning_content: str | None = Field(None, description="An assistant message's reasoning, as returned (not "
                                                            "given back to the model).")

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class FunctionTool(Params):
    """An OpenAI function tool: {"type": "function", "function": {"name", "description", "parameters"}}."""

    type: Literal["function"] = "function"
    function: dict[str, Any]

    @model_validator(mode="after")
    def _named(self) -> FunctionTool:
        if not isinstance(self.function.get("name"), str) or not self.function["name"]:
            raise ValueError("function.name is required")
        return self


class ChatParams(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="OpenAI-style conversation; the last message "
                                                                  "is a user (or tool) message.")
    tools: list[FunctionTool] | None = Field(None, description="Functions the model may call (OpenAI schema); its "
                                                              "calls come back in `tool_calls`.")
    tool_choice: Literal["auto", "none"] = Field("auto", description="`none`: do not offer the tools this time.")
    enable_thinking: bool = Field(False, description="Let a thinking model (Qwen3-style templates) reason first "
                                                     "(RKLLMInput.enable_thinking, RKLLM 1.2.1+).")

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatParams:
        if self.messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message must have role user or tool")
        return self


class ChatResult(GenerateResult):
    message: dict[str, Any] = Field(description='The reply as an OpenAI assistant message: {"role": "assistant", '
                                                '"content", "reasoning_content"?, "tool_calls"?}; send it back as is.')
    reused_history: bool = Field(description="True when earlier turns were already in the KV cache.")


class EmbedParams(Params):
    text: str = Field(min_length=1, description="The text to embed (no chat template is applied).")
    model: str | None = Field(None, description="Model name; default: the loaded default model.")
    handle: HandleId | None = None
    pooling: Literal["mean", "last"] = Field("mean", description="How token vectors become one.")
    normalize: bool = Field(True, description="Scale the vector to unit length.")


class EmbedResult(Result):
    embedding: list[float]
    dim: int
    tokens: int
    handle: str
    model: str | None


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
    server_id: str | None = Field(None, description="This server's name in a fleet (the X-RKLLM-Server header).")



# ---------------------------------------------------------------------------------------------- RKNN

RknnContextId = Annotated[str, Field(description="The opaque id rknn_init / rknn_dup_context returned.",
                                     min_length=1, max_length=64)]
EnumArg = int | str


class RknnInitParams(Params):
    model_path: str = Field(min_length=1, description="A .rknn file inside the model folders.")
    flag: EnumArg | list[EnumArg] = Field(0, description='RKNN_FLAG_* names (or numbers), e.g. '
                                                         '"RKNN_FLAG_COLLECT_PERF_MASK"; 0 = none.')
    core_mask: EnumArg | None = Field(None, description='NPU cores, e.g. "RKNN_NPU_CORE_0_1_2" (RK3588).')


class RknnInitResult(Result):
    context: str = Field(description="Pass this as `context` to the other rknn_* calls.")
    n_input: int
    n_output: int
    sdk: dict[str, str] = Field(description="api_version and drv_version (RKNN_QUERY_SDK_VERSION).")


class RknnContextParams(Params):
    context: RknnContextId


class RknnContextResult(Result):
    context: str
    destroyed: bool = False


class RknnQueryParams(Params):
    context: RknnContextId
    cmd: EnumArg = Field(description='RKNN_QUERY_* name or number, e.g. "RKNN_QUERY_INPUT_ATTR".')
    index: int = Field(0, ge=0, le=65535, description="The tensor, for the attribute queries.")


class RknnQueryResult(Result):
    context: str
    cmd: EnumArg
    result: dict[str, Any] = Field(description="The struct the command fills, by its C field names.")


class RknnInputData(Params):
    index: int = Field(0, ge=0, le=65535)
    data: str | None = Field(None, description="The tensor's bytes, base64.")
    values: list[float] | None = Field(None, description="Or its values (packed as `type`).")
    type: EnumArg = Field("RKNN_TENSOR_UINT8", description="RKNN_TENSOR_* type of the data given.")
    fmt: EnumArg = Field("RKNN_TENSOR_NHWC", description="RKNN_TENSOR_* layout of the data given.")
    pass_through: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> RknnInputData:
        if (self.data is None) == (self.values is None):
            raise ValueError("give exactly one of data (base64) and values")
        return self


class RknnInputsParams(Params):
    context: RknnContextId
    inputs: list[RknnInputData] = Field(min_length=1, description="One per model input (see rknn_query "
                                                                 "RKNN_QUERY_INPUT_ATTR for what each expects).")


class RknnOutputRequestData(Params):
    index: int = Field(0, ge=0, le=65535)
    want_float: bool = True


class RknnOutputsParams(Params):
    context: RknnContextId
    outputs: list[RknnOutputRequestData] | None = Field(None, description="Default: every output, float32.")
    encoding: Literal["base64", "array"] = Field("base64", description="base64 bytes (little-endian float32 "
                                                                       "when want_float), or JSON numbers.")


class RknnRunParams(RknnOutputsParams):
    input_data: list[RknnInputData] | None = Field(None, description="Set these inputs, run, and return the "
                                                                     "outputs in one call.")


class RknnOutputsResult(Result):
    context: str
    outputs: list[dict[str, Any]] = Field(description="index, want_float, size, and data (base64) or values.")


class RknnCoreMaskParams(Params):
    context: RknnContextId
    core_mask: EnumArg = Field(description='RKNN_NPU_CORE_* name or number, e.g. "RKNN_NPU_CORE_AUTO".')
