"""Pydantic models of the RKLLM C structs: the shared vocabulary of native/, runtime/ and tools/.

Field names are the C field names of `rkllm.h`, so a client writes
`{"input_type": "RKLLM_INPUT_PROMPT", "prompt_input": "hi"}` exactly as a C programmer would.
Each model is the union of the fields of every supported ABI generation (1.2.0, 1.2.1-1.2.3,
1.3.0); a field's description says which generation has it. Setting a field that the loaded
runtime's generation lacks to a non-default value is an `ABI_FIELD_UNSUPPORTED` error when the
struct is converted to C (see `mcp_rkllm.native.binding`), never a silent drop.

Enums accept their C names (`"RKLLM_INFER_GET_LOGITS"`) or integers (`2`) and serialise as names.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)


class LLMCallState(IntEnum):
    """State passed to the result callback."""

    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3


class RKLLMInputType(IntEnum):
    """Which member of RKLLMInput's union is set."""

    RKLLM_INPUT_PROMPT = 0
    RKLLM_INPUT_TOKEN = 1
    RKLLM_INPUT_EMBED = 2
    RKLLM_INPUT_MULTIMODAL = 3


class RKLLMInferMode(IntEnum):
    """What a run produces: text, the last hidden layer, or logits."""

    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
    RKLLM_INFER_GET_LOGITS = 2


def _parse_enum(enum_cls: type[IntEnum]) -> PlainValidator:
    """A validator accepting an enum's C names or integer values."""
    names = [m.name for m in enum_cls]
    values = [int(m) for m in enum_cls]

    def parse(value: Any) -> IntEnum:
        if isinstance(value, enum_cls):
            return value
        if isinstance(value, str) and value in enum_cls.__members__:
            return enum_cls[value]
        if isinstance(value, int) and not isinstance(value, bool) and value in values:
            return enum_cls(value)
        raise ValueError(f"expected one of {names} or an integer in {values}, got {value!r}")

    return PlainValidator(parse)


def _enum_schema(enum_cls: type[IntEnum]) -> WithJsonSchema:
    """The JSON schema of a C enum: its names or its integer values."""
    return WithJsonSchema({
        "anyOf": [{"type": "string", "enum": [m.name for m in enum_cls]},
                  {"type": "integer", "enum": [int(m) for m in enum_cls]}],
        "description": f"{enum_cls.__name__}: a C name or its integer value",
    })


_AS_NAME = PlainSerializer(lambda member: member.name, return_type=str)

InputTypeField = Annotated[RKLLMInputType, _parse_enum(RKLLMInputType), _AS_NAME, _enum_schema(RKLLMInputType)]
InferModeField = Annotated[RKLLMInferMode, _parse_enum(RKLLMInferMode), _AS_NAME, _enum_schema(RKLLMInferMode)]

# C integer types, bounded so a value always fits the C field.
Int8 = Annotated[int, Field(ge=-(2**7), le=2**7 - 1)]
UInt8 = Annotated[int, Field(ge=0, le=2**8 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
SizeT = Annotated[int, Field(ge=0, le=2**62)]
Count = Annotated[int, Field(ge=1, le=2**62)]  # a size_t that must be at least 1
#: The largest finite C float: a larger double becomes inf when it is converted to one.
FLT_MAX = 3.4028234663852886e38
Float = Annotated[float, Field(allow_inf_nan=False, ge=-FLT_MAX, le=FLT_MAX)]


class CStruct(BaseModel):
    """Base of every struct model: strict types, unknown fields rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")


# --------------------------------------------------------------------------- init parameters


class RKLLMExtendParam(CStruct):
    """Hardware and loading options (RKLLMParam.extend_param). Unset fields keep the runtime default."""

    base_domain_id: Int32 | None = Field(None, description="Memory domain the model is initialised in.")
    embed_flash: Int8 | None = Field(None, description="1 = keep the embedding table on disk to save RAM.")
    enabled_cpus_num: Int8 | None = Field(None, description="Number of CPU threads.")
    enabled_cpus_mask: UInt32 | None = Field(None, description="CPU cores to use: bits CPU0 (1) .. CPU7 (128).")
    n_batch: UInt8 | None = Field(None, description="Batch count (1.2.1+). The server runs one batch.")
    use_cross_attn: Int8 | None = Field(None, description="1 = enable cross-attention (1.2.1+).")


class RKLLMParam(CStruct):
    """rkllm_init parameters. Unset (null) fields keep the values of rkllm_createDefaultParam()."""

    model_path: str | None = Field(None, description="Path of the .rkllm model file.")
    max_context_len: Int32 | None = Field(None, description="Context window in tokens.")
    max_new_tokens: Int32 | None = Field(None, description="Generation limit per run.")
    top_k: Int32 | None = None
    n_keep: Int32 | None = Field(None, description="KV entries kept when the context window shifts.")
    top_p: Float | None = None
    temperature: Float | None = None
    repeat_penalty: Float | None = None
    frequency_penalty: Float | None = None
    presence_penalty: Float | None = None
    mirostat: Int32 | None = Field(None, description="0 = off, 1 = mirostat, 2 = mirostat 2.0.")
    mirostat_tau: Float | None = None
    mirostat_eta: Float | None = None
    skip_special_token: bool | None = Field(None, description="Do not emit special tokens such as EOS.")
    ignore_eos_token: bool | None = Field(None, description="Keep generating past EOS (1.3.0+).")
    is_async: bool | None = Field(None, description="Asynchronous mode flag.")
    img_start: str | None = Field(None, description="Image start tag (1.2.0-1.2.3; 1.3.0 moved it to the input).")
    img_end: str | None = Field(None, description="Image end tag (1.2.0-1.2.3).")
    img_content: str | None = Field(None, description="Image content tag (1.2.0-1.2.3).")
    extend_param: RKLLMExtendParam | None = None


def overlay_param(base: RKLLMParam, top: RKLLMParam) -> RKLLMParam:
    """`base` with every field `top` sets (extend_param merged field by field)."""
    data = base.model_dump(exclude_none=True)
    given = top.model_dump(exclude_none=True)
    ext = {**data.pop("extend_param", {}), **given.pop("extend_param", {})}
    return RKLLMParam.model_validate({**data, **given, **({"extend_param": ext} if ext else {})})


# --------------------------------------------------------------------------- inputs


class RKLLMEmbedInput(CStruct):
    """Input embeddings: n_tokens rows of the model's embedding size, row-major."""

    embed: list[Float] = Field(min_length=1, description="n_tokens x n_embed floats.")
    n_tokens: Count

    @model_validator(mode="after")
    def _shape(self) -> RKLLMEmbedInput:
        if len(self.embed) % self.n_tokens:
            raise ValueError(f"len(embed)={len(self.embed)} is not a multiple of n_tokens={self.n_tokens}")
        return self


class RKLLMTokenInput(CStruct):
    """Input token ids, used as-is (no chat template)."""

    input_ids: list[Int32] = Field(min_length=1)
    n_tokens: SizeT | None = Field(None, description="Defaults to len(input_ids); must equal it if given.")

    @model_validator(mode="after")
    def _count(self) -> RKLLMTokenInput:
        if self.n_tokens is None:
            self.n_tokens = len(self.input_ids)
        elif self.n_tokens != len(self.input_ids):
            raise ValueError(f"n_tokens={self.n_tokens} but input_ids has {len(self.input_ids)} ids")
        return self


class RKLLMImageInput(CStruct):
    """Images of a multimodal input (1.3.0 layout; on 1.2.x the shared fields map to the flat ones)."""

    image_embed: list[Float] = Field(min_length=1, description="n_image x n_image_tokens x dim floats.")
    n_image_tokens: Count
    n_image: Count = Field(1, description="Must equal the number of <image> tags in the prompt.")
    image_start: str | None = Field(None, description='e.g. "<|vision_start|>" (1.3.0).')
    image_end: str | None = Field(None, description='e.g. "<|vision_end|>" (1.3.0).')
    image_content: str | None = Field(None, description='e.g. "<|image_pad|>" (1.3.0).')
    image_width: SizeT = 0
    image_height: SizeT = 0

    @model_validator(mode="after")
    def _shape(self) -> RKLLMImageInput:
        if len(self.image_embed) % (self.n_image * self.n_image_tokens):
            raise ValueError("len(image_embed) is not a multiple of n_image * n_image_tokens")
        return self


class RKLLMVideoInput(CStruct):
    """Videos of a multimodal input (1.3.0 only)."""

    video_embed: list[Float] = Field(min_length=1)
    n_frame_tokens: Count
    n_frame_per_video: Count
    n_video: Count = 1
    video_start: str | None = None
    video_end: str | None = None
    video_content: str | None = None
    frame_width: SizeT = 0
    frame_height: SizeT = 0

    @model_validator(mode="after")
    def _shape(self) -> RKLLMVideoInput:
        if len(self.video_embed) % (self.n_video * self.n_frame_per_video * self.n_frame_tokens):
            raise ValueError("len(video_embed) is not a multiple of n_video * n_frame_per_video * n_frame_tokens")
        return self


class RKLLMMultiModalInput(CStruct):
    """A prompt with <image>/<video> placeholders plus their embeddings.

    1.3.0 nests the image fields under `image` (and adds `video`); 1.2.x has them flat
    (`image_embed`, `n_image_tokens`, ...). Either spelling is accepted and converted to the
    loaded generation's layout; tags and video on 1.2.x are ABI_FIELD_UNSUPPORTED.
    """

    prompt: str
    image: RKLLMImageInput | None = None
    video: RKLLMVideoInput | None = None
    image_embed: list[Float] | None = Field(None, description="1.2.x flat layout.")
    n_image_tokens: SizeT | None = Field(None, description="1.2.x flat layout.")
    n_image: SizeT | None = Field(None, description="1.2.1+ flat layout.")
    image_width: SizeT | None = Field(None, description="1.2.1+ flat layout.")
    image_height: SizeT | None = Field(None, description="1.2.1+ flat layout.")

    @model_validator(mode="after")
    def _one_layout(self) -> RKLLMMultiModalInput:
        flat = [self.image_embed, self.n_image_tokens, self.n_image, self.image_width, self.image_height]
        if self.image is not None and any(v is not None for v in flat):
            raise ValueError("give the image either as `image` (1.3.0) or as flat fields (1.2.x), not both")
        if (self.image_embed is None) != (self.n_image_tokens is None):
            raise ValueError("image_embed and n_image_tokens go together")
        if (self.image_embed is not None and self.n_image_tokens is not None and (
                self.n_image_tokens < 1 or len(self.image_embed) % (self.n_image_tokens * (self.n_image or 1)))):
            raise ValueError("len(image_embed) is not a multiple of n_image * n_image_tokens")
        return self

    def as_nested(self) -> RKLLMMultiModalInput:
        """The same input in the 1.3.0 layout (flat image fields moved under `image`)."""
        if self.image_embed is None or self.n_image_tokens is None:
            return self
        # Built without validating again (this input was validated): the embeddings may be a float32 array.
        image = RKLLMImageInput.model_construct(
            image_embed=self.image_embed, n_image_tokens=self.n_image_tokens, n_image=self.n_image or 1,
            image_width=self.image_width or 0, image_height=self.image_height or 0,
        )
        return RKLLMMultiModalInput.model_construct(prompt=self.prompt, image=image, video=self.video)

    def as_flat(self) -> RKLLMMultiModalInput:
        """The same input in the 1.2.x layout. The 1.3.0-only tags are dropped: check them first."""
        if self.image is None:
            return self
        i = self.image
        return RKLLMMultiModalInput.model_construct(
            prompt=self.prompt, video=self.video, image_embed=i.image_embed, n_image_tokens=i.n_image_tokens,
            n_image=i.n_image, image_width=i.image_width, image_height=i.image_height,
        )


_MEMBER_FOR_TYPE = {
    RKLLMInputType.RKLLM_INPUT_PROMPT: "prompt_input",
    RKLLMInputType.RKLLM_INPUT_TOKEN: "token_input",
    RKLLMInputType.RKLLM_INPUT_EMBED: "embed_input",
    RKLLMInputType.RKLLM_INPUT_MULTIMODAL: "multimodal_input",
}


class RKLLMInput(CStruct):
    """What to run: exactly one of prompt_input, token_input, embed_input, multimodal_input.

    `input_type` selects the member; when omitted it is inferred from the one member given.
    """

    role: str = Field("user", description='"user", or "tool" for function-call results (1.2.1+).')
    enable_thinking: bool = Field(False, description="Thinking mode for Qwen3-style templates (1.2.1+).")
    input_type: InputTypeField | None = None
    prompt_input: str | None = None
    token_input: RKLLMTokenInput | None = None
    embed_input: RKLLMEmbedInput | None = None
    multimodal_input: RKLLMMultiModalInput | None = None

    @model_validator(mode="after")
    def _one_member(self) -> RKLLMInput:
        given = [m for m in _MEMBER_FOR_TYPE.values() if getattr(self, m) is not None]
        input_type = self.input_type
        if input_type is None:
            if len(given) != 1:
                raise ValueError("set exactly one of prompt_input, token_input, embed_input, multimodal_input")
            input_type = next(t for t, m in _MEMBER_FOR_TYPE.items() if m == given[0])
            self.input_type = input_type
        wanted = _MEMBER_FOR_TYPE[input_type]
        if given != [wanted]:
            raise ValueError(f"input_type {input_type.name} needs exactly `{wanted}` set (got {given})")
        return self

    @property
    def member(self) -> str:
        """The C name of the union member in use."""
        assert self.input_type is not None
        return _MEMBER_FOR_TYPE[self.input_type]


# --------------------------------------------------------------------------- run parameters


class RKLLMLoraParam(CStruct):
    """Selects a LoRA adapter loaded earlier with rkllm_load_lora."""

    lora_adapter_name: str


class RKLLMPromptCacheParam(CStruct):
    """Save this run's prefill KV to a file."""

    save_prompt_cache: Int32 = Field(1, description="1 = save, 0 = don't.")
    prompt_cache_path: str | None = Field(
        None, description="File to write (the runtime's default: ./prompt_cache.bin).")


class RKLLMSamplingParam(CStruct):
    """Sampling for one run, overriding the init values (1.3.0+)."""

    top_k: Int32 = 40
    top_p: Float = 0.9
    temperature: Float = 0.8
    repeat_penalty: Float = 1.1
    frequency_penalty: Float = 0.0
    presence_penalty: Float = 0.0
    mirostat: Int32 = 0
    mirostat_tau: Float = 5.0
    mirostat_eta: Float = 0.1


class RKLLMInferParam(CStruct):
    """How to run: mode, LoRA, prompt cache, sampling override, history, token limit."""

    mode: InferModeField = RKLLMInferMode.RKLLM_INFER_GENERATE
    lora_params: RKLLMLoraParam | None = None
    prompt_cache_params: RKLLMPromptCacheParam | None = None
    sampling_params: RKLLMSamplingParam | None = Field(None, description="1.3.0+.")
    keep_history: Int32 = Field(0, description="1 = keep the conversation in the KV cache (multi-turn).")
    max_new_tokens: Int32 = Field(0, description="<= 0 = the init value (1.3.0+).")


class RKLLMLoraAdapter(CStruct):
    """A LoRA adapter file and the name runs select it by."""

    lora_adapter_path: str
    lora_adapter_name: str
    scale: Float = 1.0


class RKLLMCrossAttnParam(CStruct):
    """Encoder K/V caches, mask and positions for cross-attention models (1.2.1+).

    K is [layers][num_tokens][kv_heads][head_dim], V is [layers][kv_heads][head_dim][num_tokens].
    """

    encoder_k_cache: list[Float] = Field(min_length=1)
    encoder_v_cache: list[Float] = Field(min_length=1)
    encoder_mask: list[Float] = Field(min_length=1, description="num_tokens floats.")
    encoder_pos: list[Int32] = Field(min_length=1, description="num_tokens positions.")
    num_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)]

    @model_validator(mode="after")
    def _shape(self) -> RKLLMCrossAttnParam:
        n = self.num_tokens
        if len(self.encoder_mask) != n or len(self.encoder_pos) != n:
            raise ValueError(f"encoder_mask and encoder_pos must have num_tokens={n} entries")
        if len(self.encoder_k_cache) % n or len(self.encoder_v_cache) % n:
            raise ValueError(f"encoder_k_cache and encoder_v_cache lengths must be multiples of num_tokens={n}")
        if len(self.encoder_k_cache) != len(self.encoder_v_cache):
            raise ValueError("encoder_k_cache and encoder_v_cache must have the same length")
        return self


# --------------------------------------------------------------------------- results


class RKLLMPerfStat(CStruct):
    """Timings of a run, filled at RKLLM_RUN_FINISH (1.2.1+; the CPU runtime measures its own)."""

    prefill_time_ms: float = 0.0
    prefill_tokens: int = 0
    generate_time_ms: float = 0.0
    generate_tokens: int = 0
    memory_usage_mb: float = Field(0.0, description="Peak RSS (VmHWM) in MB.")


# Big arrays are advertised as plain arrays in output schemas: clients validate every item of a
# typed array (the MCP SDK's client runs jsonschema on structured results), which for logits
# (vocab_size floats per token) costs seconds.
FloatArray = Annotated[list[float], WithJsonSchema({"type": "array", "description": "float32 values"})]
IntArray = Annotated[list[int], WithJsonSchema({"type": "array", "description": "integers"})]


class RKLLMResultLastHiddenLayer(CStruct):
    """Final hidden states, num_tokens x embd_size floats, row-major."""

    hidden_states: FloatArray
    embd_size: int
    num_tokens: int


class RKLLMResultLogits(CStruct):
    """Logits, num_tokens x vocab_size floats, row-major."""

    logits: FloatArray
    vocab_size: int
    num_tokens: int


FinishReason = Literal["stop", "length", "abort", "error"]


class RunResult(CStruct):
    """Everything a finished run produced."""

    text: str = Field("", description="The whole generated text (RKLLM_RUN_WAITING pieces excluded).")
    token_ids: IntArray = Field(default_factory=list)
    token_count: int = 0
    finish_reason: FinishReason = "stop"
    perf: RKLLMPerfStat | None = None
    last_hidden_layer: RKLLMResultLastHiddenLayer | None = None
    logits: RKLLMResultLogits | None = None
    error: str | None = Field(None, description="Why the run failed, when finish_reason is 'error'.")
