"""ABI generation 1.3.0: rkllm_init takes RKLLMCallback*, new RKLLMParam and multimodal layouts."""

from mcp_rkllm.native.abi.common import ENUMS, FUNCTIONS_COMMON, SMALL_STRUCTS
from mcp_rkllm.native.abi.v1_2_1 import EXTEND_PARAM, FUNCTIONS_SINCE_1_2_1, INPUT_AND_RESULTS

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
    bool    ignore_eos_token;
    bool    is_async;
    RKLLMExtendParam extend_param;
} RKLLMParam;
"""
    + SMALL_STRUCTS
    + """
typedef struct {
    char* prompt;
    struct {
        float*      image_embed;
        size_t      n_image_tokens;
        size_t      n_image;
        const char* image_start;
        const char* image_end;
        const char* image_content;
        size_t      image_width;
        size_t      image_height;
    } image;
    struct {
        float*      video_embed;
        size_t      n_frame_tokens;
        size_t      n_frame_per_video;
        size_t      n_video;
        const char* video_start;
        const char* video_end;
        const char* video_content;
        size_t      frame_width;
        size_t      frame_height;
    } video;
} RKLLMMultiModalInput;
typedef RKLLMMultiModalInput RKLLMMultiModelInput;
"""
    + INPUT_AND_RESULTS
    + """
typedef struct {
    int32_t top_k;
    float   top_p;
    float   temperature;
    float   repeat_penalty;
    float   frequency_penalty;
    float   presence_penalty;
    int32_t mirostat;
    float   mirostat_tau;
    float   mirostat_eta;
} RKLLMSamplingParam;

typedef struct {
    RKLLMInferMode         mode;
    RKLLMLoraParam*        lora_params;
    RKLLMPromptCacheParam* prompt_cache_params;
    RKLLMSamplingParam*    sampling_params;
    int                    keep_history;
    int32_t                max_new_tokens;
} RKLLMInferParam;

typedef int (*LLMTokenizerCallback)(void* userdata, const char* text, int32_t text_len, int32_t* tokens,
                                    int32_t n_tokens_max);
typedef int (*LLMGetEmbedCallback)(void* userdata, int32_t* tokens, uint64_t num_tokens, void* embed,
                                   uint64_t len);

typedef struct {
    LLMResultCallback    result_callback;
    void*                result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void*                tokenizer_userdata;
    LLMGetEmbedCallback  embed_callback;
    void*                embed_userdata;
} RKLLMCallback;

int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
"""
    + FUNCTIONS_SINCE_1_2_1
    + FUNCTIONS_COMMON
)
