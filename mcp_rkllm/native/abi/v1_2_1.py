"""ABI generation 1.2.1 (releases 1.2.1, 1.2.2, 1.2.3): 15 functions, int-returning callback."""

from mcp_rkllm.native.abi.common import ENUMS, FUNCTIONS_COMMON, SMALL_STRUCTS

# Shared with 1.3.0, which changes RKLLMParam, the multimodal input and RKLLMInferParam only.
EXTEND_PARAM = """
typedef struct {
    int32_t  base_domain_id;
    int8_t   embed_flash;
    int8_t   enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t  n_batch;
    int8_t   use_cross_attn;
    uint8_t  reserved[104];
} RKLLMExtendParam;
"""

INPUT_AND_RESULTS = """
typedef struct {
    const char*    role;
    bool           enable_thinking;
    RKLLMInputType input_type;
    union {
        const char*          prompt_input;
        RKLLMEmbedInput      embed_input;
        RKLLMTokenInput      token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    float*   encoder_k_cache;
    float*   encoder_v_cache;
    float*   encoder_mask;
    int32_t* encoder_pos;
    int      num_tokens;
} RKLLMCrossAttnParam;

typedef struct {
    float prefill_time_ms;
    int   prefill_tokens;
    float generate_time_ms;
    int   generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char* text;
    int32_t     token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits          logits;
    RKLLMPerfStat              perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
"""

FUNCTIONS_SINCE_1_2_1 = """
RKLLMParam rkllm_createDefaultParam(void);
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos);
int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools,
                             const char* tool_response_str);
int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
"""

CDEF = (
    ENUMS
    + EXTEND_PARAM
    + """
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
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
typedef RKLLMMultiModalInput RKLLMMultiModelInput;
"""
    + INPUT_AND_RESULTS
    + """
typedef struct {
    RKLLMInferMode         mode;
    RKLLMLoraParam*        lora_params;
    RKLLMPromptCacheParam* prompt_cache_params;
    int                    keep_history;
} RKLLMInferParam;

int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
"""
    + FUNCTIONS_SINCE_1_2_1
    + FUNCTIONS_COMMON
)
