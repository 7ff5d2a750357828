"""ABI generation 1.2.0 (release-v1.2.0): 12 functions, 2-argument rkllm_clear_kv_cache."""

from mcp_rkllm.native.abi.common import ENUMS, FUNCTIONS_COMMON, SMALL_STRUCTS

CDEF = (
    ENUMS
    + """
typedef struct {
    int32_t  base_domain_id;
    int8_t   embed_flash;
    int8_t   enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t  reserved[106];
} RKLLMExtendParam;

typedef struct {
    const char* model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float   top_p;
    float   temperature;
    float   repeat_penalty;
    float   frequency_penalty;
    float   presence_penalty;
    int32_t mirostat;
    float   mirostat_tau;
    float   mirostat_eta;
    bool    skip_special_token;
    bool    is_async;
    const char* img_start;
    const char* img_end;
    const char* img_content;
    RKLLMExtendParam extend_param;
} RKLLMParam;
"""
    + SMALL_STRUCTS
    + """
typedef struct {
    char*  prompt;
    float* image_embed;
    size_t n_image_tokens;
} RKLLMMultiModelInput;
typedef RKLLMMultiModelInput RKLLMMultiModalInput;

typedef struct {
    RKLLMInputType input_type;
    union {
        const char*          prompt_input;
        RKLLMEmbedInput      embed_input;
        RKLLMTokenInput      token_input;
        RKLLMMultiModelInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    RKLLMInferMode         mode;
    RKLLMLoraParam*        lora_params;
    RKLLMPromptCacheParam* prompt_cache_params;
    int                    keep_history;
} RKLLMInferParam;

typedef struct {
    const char* text;
    int32_t     token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits          logits;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);

RKLLMParam rkllm_createDefaultParam(void);
int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt);
"""
    + FUNCTIONS_COMMON
)
