"""Declarations that are the same in every supported ABI generation (1.2.0 and later)."""

ENUMS = """
typedef void* LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL  = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH  = 2,
    RKLLM_RUN_ERROR   = 3
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT     = 0,
    RKLLM_INPUT_TOKEN      = 1,
    RKLLM_INPUT_EMBED      = 2,
    RKLLM_INPUT_MULTIMODAL = 3
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE              = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS            = 2
} RKLLMInferMode;
"""

SMALL_STRUCTS = """
typedef struct {
    const char* lora_adapter_path;
    const char* lora_adapter_name;
    float       scale;
} RKLLMLoraAdapter;

typedef struct {
    float* embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t* input_ids;
    size_t   n_tokens;
} RKLLMTokenInput;

typedef struct {
    const char* lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int         save_prompt_cache;
    const char* prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    const float* hidden_states;
    int          embd_size;
    int          num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float* logits;
    int          vocab_size;
    int          num_tokens;
} RKLLMResultLogits;
"""

# The result callback is declared returning int in every generation: <= 1.2.0 ignores the
# value, >= 1.2.1 reads it (0 = continue), so int is right everywhere and void is wrong on new.
FUNCTIONS_COMMON = """
int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
int rkllm_release_prompt_cache(LLMHandle handle);
int rkllm_destroy(LLMHandle handle);
int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
                    void* userdata);
int rkllm_abort(LLMHandle handle);
int rkllm_is_running(LLMHandle handle);
int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix,
                            const char* prompt_postfix);
"""
