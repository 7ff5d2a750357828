/*
 * A fake librkllmrt.so for tests: the exact exported symbols and struct layouts of one RKLLM ABI
 * generation, chosen with -DRKLLM_ABI=120|121|130, and a tiny deterministic "model".
 *
 * What it does, so tests can check the binding byte for byte without the board:
 *  - records every field of every struct it receives as JSON (fake_last("init"), ...);
 *  - generates tokens from a thread it creates (rkllm_run joins it, rkllm_run_async does not);
 *  - emits each " \xF0\x9F\x98\x80" (an emoji, 4 UTF-8 bytes) as RKLLM_RUN_WAITING with no text, WAITING with
 *    the first two bytes, then NORMAL with the whole piece, like a byte-level tokenizer would;
 *  - fills perf stats at FINISH (1.2.1+), delivers hidden states / logits in those modes and
 *    scribbles over the buffer after the callback (a binding that does not copy reads garbage);
 *  - tracks the KV cache size per keep_history, writes and reads prompt-cache files, remembers
 *    LoRA adapters, the chat template and function tools, honours rkllm_abort;
 *  - misbehaves on request through "fake:KEY[=N]" triggers found in the model path (whole
 *    handle), the prompt (one run) or $FAKE_RKLLM_TRIGGERS:
 *      fail_init   rkllm_init returns -1        crash_init   SIGSEGV inside rkllm_init
 *      fail        rkllm_run returns -1          error=N      RKLLM_RUN_ERROR after N tokens
 *      crash=N     SIGSEGV after N tokens        delay_ms=N   sleep N ms before each token
 *      eos=N       stop (EOS) after N tokens     finish_after_abort  send FINISH after an abort
 *      stamp       each token's text is " <CLOCK_MONOTONIC ns>" (for latency benchmarks)
 *      load_ms=N   rkllm_init sleeps N ms (a slow load; in the model path or $FAKE_RKLLM_TRIGGERS)
 *    and $FAKE_RKLLM_FAIL=<function name> makes that function return -1.
 *  - prints log lines to stdout like the real runtime does (the server must keep them off the wire).
 * With -DFAKE_VERSION="X.Y.Z" it embeds "rkllm-runtime version: X.Y.Z" like the real library.
 *
 * Test hooks: fake_last(kind) -> JSON of the last record, fake_count(kind), fake_reset(),
 * fake_sizeof(struct), fake_offsetof(struct, field); with $FAKE_RKLLM_RECORD_DIR set, the records
 * also go to files in that directory (for servers and workers in other processes). A requested
 * crash records "segv" just before it raises SIGSEGV.
 */
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef RKLLM_ABI
#error "build with -DRKLLM_ABI=120, 121 or 130"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ the ABI of the generation */

typedef void *LLMHandle;
typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 } LLMCallState;
typedef enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1, RKLLM_INPUT_EMBED = 2, RKLLM_INPUT_MULTIMODAL = 3 } RKLLMInputType;
typedef enum { RKLLM_INFER_GENERATE = 0, RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1, RKLLM_INFER_GET_LOGITS = 2 } RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
#if RKLLM_ABI >= 121
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
#else
    uint8_t reserved[106];
#endif
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if RKLLM_ABI >= 130
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_ABI < 130
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct { const char *lora_adapter_path; const char *lora_adapter_name; float scale; } RKLLMLoraAdapter;
typedef struct { float *embed; size_t n_tokens; } RKLLMEmbedInput;
typedef struct { int32_t *input_ids; size_t n_tokens; } RKLLMTokenInput;

#if RKLLM_ABI >= 130
typedef struct {
    char *prompt;
    struct {
        float *image_embed; size_t n_image_tokens; size_t n_image;
        const char *image_start; const char *image_end; const char *image_content;
        size_t image_width; size_t image_height;
    } image;
    struct {
        float *video_embed; size_t n_frame_tokens; size_t n_frame_per_video; size_t n_video;
        const char *video_start; const char *video_end; const char *video_content;
        size_t frame_width; size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#elif RKLLM_ABI >= 121
typedef struct {
    char *prompt; float *image_embed; size_t n_image_tokens; size_t n_image; size_t image_width; size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct { char *prompt; float *image_embed; size_t n_image_tokens; } RKLLMMultiModalInput;
#endif
typedef RKLLMMultiModalInput RKLLMMultiModelInput;

typedef struct {
#if RKLLM_ABI >= 121
    const char *role;
    bool enable_thinking;
#endif
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct { const char *lora_adapter_name; } RKLLMLoraParam;
typedef struct { int save_prompt_cache; const char *prompt_cache_path; } RKLLMPromptCacheParam;

#if RKLLM_ABI >= 121
typedef struct {
    float *encoder_k_cache; float *encoder_v_cache; float *encoder_mask; int32_t *encoder_pos; int num_tokens;
} RKLLMCrossAttnParam;
typedef struct {
    float prefill_time_ms; int prefill_tokens; float generate_time_ms; int generate_tokens; float memory_usage_mb;
} RKLLMPerfStat;
#endif

#if RKLLM_ABI >= 130
typedef struct {
    int32_t top_k; float top_p; float temperature; float repeat_penalty; float frequency_penalty;
    float presence_penalty; int32_t mirostat; float mirostat_tau; float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_ABI >= 130
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#if RKLLM_ABI >= 130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct { const float *hidden_states; int embd_size; int num_tokens; } RKLLMResultLastHiddenLayer;
typedef struct { const float *logits; int vocab_size; int num_tokens; } RKLLMResultLogits;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
#if RKLLM_ABI >= 121
    RKLLMPerfStat perf;
#endif
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#if RKLLM_ABI >= 130
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens, int32_t n_tokens_max);
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef struct {
    LLMResultCallback result_callback; void *result_userdata;
    LLMTokenizerCallback tokenizer_callback; void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback; void *embed_userdata;
} RKLLMCallback;
#endif

/* ------------------------------------------------------------------ version string */

#ifdef FAKE_VERSION
__attribute__((used)) static const char version_banner[] = "rkllm-runtime version: " FAKE_VERSION;
#define BANNER version_banner
#else
#define BANNER "fake runtime without a version string"
#endif

/* ------------------------------------------------------------------ JSON records for the tests */

typedef struct { char *s; size_t n, cap; } jbuf;

static void jb_raw(jbuf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int need = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (b->s && b->n + (size_t)need < b->cap) { b->n += need; return; }
        b->cap = (b->cap + need + 1) * 2;
        b->s = realloc(b->s, b->cap);
    }
}
/* Comma handling: a value or key needs a comma unless it follows '{', '[' or ':'. */
static void jb_sep(jbuf *b) {
    if (b->n && b->s[b->n - 1] != '{' && b->s[b->n - 1] != '[' && b->s[b->n - 1] != ':') jb_raw(b, ",");
}
static void jb_key(jbuf *b, const char *k) { jb_sep(b); jb_raw(b, "\"%s\":", k); }
static void jb_open(jbuf *b, const char *k) { if (k) jb_key(b, k); else jb_sep(b); jb_raw(b, "{"); }
static void jb_close(jbuf *b) { jb_raw(b, "}"); }
static void jb_str(jbuf *b, const char *k, const char *v) {
    if (k) jb_key(b, k); else jb_sep(b);
    if (!v) { jb_raw(b, "null"); return; }
    jb_raw(b, "\"");
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\') jb_raw(b, "\\%c", *p);
        else if (*p < 0x20) jb_raw(b, "\\u%04x", *p);
        else jb_raw(b, "%c", *p);
    }
    jb_raw(b, "\"");
}
static void jb_int(jbuf *b, const char *k, long long v) { jb_key(b, k); jb_raw(b, "%lld", v); }
static void jb_uint(jbuf *b, const char *k, unsigned long long v) { jb_key(b, k); jb_raw(b, "%llu", v); }
static void jb_bool(jbuf *b, const char *k, bool v) { jb_key(b, k); jb_raw(b, v ? "true" : "false"); }
/* %.17g of the float promoted to double prints its exact value: tests compare as float32. */
static void jb_float(jbuf *b, const char *k, float v) { jb_key(b, k); jb_raw(b, "%.17g", (double)v); }
static void jb_floats(jbuf *b, const char *k, const float *v, size_t n) {
    jb_key(b, k);
    if (!v) { jb_raw(b, "null"); return; }
    jb_raw(b, "[");
    for (size_t i = 0; i < n; i++) jb_raw(b, i ? ",%.17g" : "%.17g", (double)v[i]);
    jb_raw(b, "]");
}
static void jb_ints(jbuf *b, const char *k, const int32_t *v, size_t n) {
    jb_key(b, k);
    if (!v) { jb_raw(b, "null"); return; }
    jb_raw(b, "[");
    for (size_t i = 0; i < n; i++) jb_raw(b, i ? ",%d" : "%d", v[i]);
    jb_raw(b, "]");
}

#define MAX_KINDS 64
static struct { char kind[48]; char *json; int count; } records[MAX_KINDS];
static pthread_mutex_t records_lock = PTHREAD_MUTEX_INITIALIZER;

static int kind_slot(const char *kind) {
    for (int i = 0; i < MAX_KINDS; i++) {
        if (!records[i].kind[0]) { snprintf(records[i].kind, sizeof records[i].kind, "%s", kind); return i; }
        if (!strcmp(records[i].kind, kind)) return i;
    }
    return MAX_KINDS - 1;
}
/* Store `json` (taken over) as the last record of `kind` and count it. */
static void record(const char *kind, char *json) {
    pthread_mutex_lock(&records_lock);
    int i = kind_slot(kind);
    if (json) { free(records[i].json); records[i].json = json; }
    records[i].count++;
    /* Tests of servers (or workers) in another process read the records from files:
       <dir>/events gets one line per recorded kind, <dir>/process_events the same as "<pid> <kind>" (which
       worker process did it), <dir>/<kind>.json the last record. Each line is written (fclose) before this
       returns, so a process killed right after still leaves it. */
    const char *dir = getenv("FAKE_RKLLM_RECORD_DIR");
    if (dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/events", dir);
        FILE *f = fopen(path, "a");
        if (f) { fprintf(f, "%s\n", kind); fclose(f); }
        snprintf(path, sizeof path, "%s/process_events", dir);
        f = fopen(path, "a");
        if (f) { fprintf(f, "%d %s\n", (int)getpid(), kind); fclose(f); }
        if (json) {
            char tmp[4096];
            snprintf(tmp, sizeof tmp, "%s/%s.json.%d", dir, kind, (int)getpid());
            snprintf(path, sizeof path, "%s/%s.json", dir, kind);
            f = fopen(tmp, "w");
            if (f) { fputs(json, f); fclose(f); rename(tmp, path); }
        }
    }
    pthread_mutex_unlock(&records_lock);
}
static void count(const char *kind) { record(kind, NULL); }

EXPORT const char *fake_last(const char *kind) {
    pthread_mutex_lock(&records_lock);
    const char *out = NULL;
    for (int i = 0; i < MAX_KINDS && records[i].kind[0]; i++)
        if (!strcmp(records[i].kind, kind)) out = records[i].json;
    pthread_mutex_unlock(&records_lock);
    return out;
}
EXPORT int fake_count(const char *kind) {
    pthread_mutex_lock(&records_lock);
    int out = 0;
    for (int i = 0; i < MAX_KINDS && records[i].kind[0]; i++)
        if (!strcmp(records[i].kind, kind)) out = records[i].count;
    pthread_mutex_unlock(&records_lock);
    return out;
}
EXPORT void fake_reset(void) {
    pthread_mutex_lock(&records_lock);
    for (int i = 0; i < MAX_KINDS; i++) { free(records[i].json); records[i].json = NULL; records[i].kind[0] = 0; records[i].count = 0; }
    pthread_mutex_unlock(&records_lock);
}

/* ------------------------------------------------------------------ layout hooks */

#define LAYOUT(S, F) if (!strcmp(s, #S) && !strcmp(f, #F)) return (long)offsetof(S, F);
EXPORT long fake_sizeof(const char *s) {
#define SZ(S) if (!strcmp(s, #S)) return (long)sizeof(S);
    SZ(RKLLMExtendParam) SZ(RKLLMParam) SZ(RKLLMLoraAdapter) SZ(RKLLMEmbedInput) SZ(RKLLMTokenInput)
    SZ(RKLLMMultiModalInput) SZ(RKLLMMultiModelInput) SZ(RKLLMInput) SZ(RKLLMLoraParam) SZ(RKLLMPromptCacheParam)
    SZ(RKLLMInferParam) SZ(RKLLMResultLastHiddenLayer) SZ(RKLLMResultLogits) SZ(RKLLMResult)
#if RKLLM_ABI >= 121
    SZ(RKLLMCrossAttnParam) SZ(RKLLMPerfStat)
#endif
#if RKLLM_ABI >= 130
    SZ(RKLLMSamplingParam) SZ(RKLLMCallback)
#endif
    return -1;
}
EXPORT long fake_offsetof(const char *s, const char *f) {
    LAYOUT(RKLLMExtendParam, base_domain_id) LAYOUT(RKLLMExtendParam, embed_flash)
    LAYOUT(RKLLMExtendParam, enabled_cpus_num) LAYOUT(RKLLMExtendParam, enabled_cpus_mask)
    LAYOUT(RKLLMExtendParam, reserved)
    LAYOUT(RKLLMParam, model_path) LAYOUT(RKLLMParam, max_context_len) LAYOUT(RKLLMParam, max_new_tokens)
    LAYOUT(RKLLMParam, top_k) LAYOUT(RKLLMParam, n_keep) LAYOUT(RKLLMParam, top_p) LAYOUT(RKLLMParam, temperature)
    LAYOUT(RKLLMParam, repeat_penalty) LAYOUT(RKLLMParam, frequency_penalty) LAYOUT(RKLLMParam, presence_penalty)
    LAYOUT(RKLLMParam, mirostat) LAYOUT(RKLLMParam, mirostat_tau) LAYOUT(RKLLMParam, mirostat_eta)
    LAYOUT(RKLLMParam, skip_special_token) LAYOUT(RKLLMParam, is_async) LAYOUT(RKLLMParam, extend_param)
    LAYOUT(RKLLMLoraAdapter, lora_adapter_path) LAYOUT(RKLLMLoraAdapter, lora_adapter_name) LAYOUT(RKLLMLoraAdapter, scale)
    LAYOUT(RKLLMEmbedInput, embed) LAYOUT(RKLLMEmbedInput, n_tokens)
    LAYOUT(RKLLMTokenInput, input_ids) LAYOUT(RKLLMTokenInput, n_tokens)
    LAYOUT(RKLLMMultiModalInput, prompt) LAYOUT(RKLLMMultiModelInput, prompt)
    LAYOUT(RKLLMInput, input_type) LAYOUT(RKLLMInput, prompt_input) LAYOUT(RKLLMInput, embed_input)
    LAYOUT(RKLLMInput, token_input) LAYOUT(RKLLMInput, multimodal_input)
    LAYOUT(RKLLMLoraParam, lora_adapter_name)
    LAYOUT(RKLLMPromptCacheParam, save_prompt_cache) LAYOUT(RKLLMPromptCacheParam, prompt_cache_path)
    LAYOUT(RKLLMInferParam, mode) LAYOUT(RKLLMInferParam, lora_params) LAYOUT(RKLLMInferParam, prompt_cache_params)
    LAYOUT(RKLLMInferParam, keep_history)
    LAYOUT(RKLLMResultLastHiddenLayer, hidden_states) LAYOUT(RKLLMResultLastHiddenLayer, embd_size)
    LAYOUT(RKLLMResultLastHiddenLayer, num_tokens)
    LAYOUT(RKLLMResultLogits, logits) LAYOUT(RKLLMResultLogits, vocab_size) LAYOUT(RKLLMResultLogits, num_tokens)
    LAYOUT(RKLLMResult, text) LAYOUT(RKLLMResult, token_id) LAYOUT(RKLLMResult, last_hidden_layer)
    LAYOUT(RKLLMResult, logits)
#if RKLLM_ABI < 130
    LAYOUT(RKLLMParam, img_start) LAYOUT(RKLLMParam, img_end) LAYOUT(RKLLMParam, img_content)
#endif
#if RKLLM_ABI >= 121
    LAYOUT(RKLLMExtendParam, n_batch) LAYOUT(RKLLMExtendParam, use_cross_attn)
    LAYOUT(RKLLMInput, role) LAYOUT(RKLLMInput, enable_thinking)
    LAYOUT(RKLLMCrossAttnParam, encoder_k_cache) LAYOUT(RKLLMCrossAttnParam, encoder_v_cache)
    LAYOUT(RKLLMCrossAttnParam, encoder_mask) LAYOUT(RKLLMCrossAttnParam, encoder_pos)
    LAYOUT(RKLLMCrossAttnParam, num_tokens)
    LAYOUT(RKLLMPerfStat, prefill_time_ms) LAYOUT(RKLLMPerfStat, prefill_tokens) LAYOUT(RKLLMPerfStat, generate_time_ms)
    LAYOUT(RKLLMPerfStat, generate_tokens) LAYOUT(RKLLMPerfStat, memory_usage_mb)
    LAYOUT(RKLLMResult, perf)
#endif
#if RKLLM_ABI >= 121 && RKLLM_ABI < 130
    LAYOUT(RKLLMMultiModalInput, image_embed) LAYOUT(RKLLMMultiModalInput, n_image_tokens)
    LAYOUT(RKLLMMultiModalInput, n_image) LAYOUT(RKLLMMultiModalInput, image_width) LAYOUT(RKLLMMultiModalInput, image_height)
    LAYOUT(RKLLMMultiModelInput, image_embed) LAYOUT(RKLLMMultiModelInput, n_image_tokens)
    LAYOUT(RKLLMMultiModelInput, n_image) LAYOUT(RKLLMMultiModelInput, image_width) LAYOUT(RKLLMMultiModelInput, image_height)
#elif RKLLM_ABI < 121
    LAYOUT(RKLLMMultiModelInput, image_embed) LAYOUT(RKLLMMultiModelInput, n_image_tokens)
#endif
#if RKLLM_ABI >= 130
    LAYOUT(RKLLMParam, ignore_eos_token)
    LAYOUT(RKLLMMultiModalInput, image) LAYOUT(RKLLMMultiModalInput, image.image_embed)
    LAYOUT(RKLLMMultiModalInput, image.n_image_tokens) LAYOUT(RKLLMMultiModalInput, image.n_image)
    LAYOUT(RKLLMMultiModalInput, image.image_start) LAYOUT(RKLLMMultiModalInput, image.image_end)
    LAYOUT(RKLLMMultiModalInput, image.image_content) LAYOUT(RKLLMMultiModalInput, image.image_width)
    LAYOUT(RKLLMMultiModalInput, image.image_height) LAYOUT(RKLLMMultiModalInput, video)
    LAYOUT(RKLLMMultiModalInput, video.video_embed) LAYOUT(RKLLMMultiModalInput, video.n_frame_tokens)
    LAYOUT(RKLLMMultiModalInput, video.n_frame_per_video) LAYOUT(RKLLMMultiModalInput, video.n_video)
    LAYOUT(RKLLMMultiModalInput, video.video_start) LAYOUT(RKLLMMultiModalInput, video.video_end)
    LAYOUT(RKLLMMultiModalInput, video.video_content) LAYOUT(RKLLMMultiModalInput, video.frame_width)
    LAYOUT(RKLLMMultiModalInput, video.frame_height)
    LAYOUT(RKLLMSamplingParam, top_k) LAYOUT(RKLLMSamplingParam, top_p) LAYOUT(RKLLMSamplingParam, temperature)
    LAYOUT(RKLLMSamplingParam, repeat_penalty) LAYOUT(RKLLMSamplingParam, frequency_penalty)
    LAYOUT(RKLLMSamplingParam, presence_penalty) LAYOUT(RKLLMSamplingParam, mirostat)
    LAYOUT(RKLLMSamplingParam, mirostat_tau) LAYOUT(RKLLMSamplingParam, mirostat_eta)
    LAYOUT(RKLLMInferParam, sampling_params) LAYOUT(RKLLMInferParam, max_new_tokens)
    LAYOUT(RKLLMCallback, result_callback) LAYOUT(RKLLMCallback, result_userdata)
    LAYOUT(RKLLMCallback, tokenizer_callback) LAYOUT(RKLLMCallback, tokenizer_userdata)
    LAYOUT(RKLLMCallback, embed_callback) LAYOUT(RKLLMCallback, embed_userdata)
#endif
    return -1;
}

/* ------------------------------------------------------------------ triggers */

/* The value of "fake:KEY" or "fake:KEY=N" in `s` (1 when no number follows), or -1 if absent. */
static long trigger_in(const char *s, const char *key) {
    if (!s) return -1;
    size_t klen = strlen(key);
    for (const char *p = strstr(s, "fake:"); p; p = strstr(p + 1, "fake:")) {
        const char *k = p + 5;
        if (strncmp(k, key, klen) != 0) continue;
        char after = k[klen];
        if (after == '=') return strtol(k + klen + 1, NULL, 10);
        if (after == '\0' || after == ' ' || after == ',' || after == '.' || after == '/' || after == ';') return 1;
    }
    return -1;
}
static long trigger(const char *prompt, const char *model_path, const char *key) {
    long v = trigger_in(prompt, key);
    if (v < 0) v = trigger_in(model_path, key);
    if (v < 0) v = trigger_in(getenv("FAKE_RKLLM_TRIGGERS"), key);
    return v;
}
static bool env_fails(const char *fn) {
    const char *f = getenv("FAKE_RKLLM_FAIL");
    return f && strstr(f, fn) != NULL;
}

static void sleep_ms(long ms);

/* ------------------------------------------------------------------ handles */

#define MAX_LORA 8
typedef struct Handle {
    uint32_t magic;
    int id;
    RKLLMParam param;          /* copied, model_path duplicated */
    char *model_path;
    LLMResultCallback callback;
    void *result_userdata;
    int kv_size;
    int system_tokens;
    char *chat_template[3];
    char *tools[3];
    char lora_names[MAX_LORA][64];
    int n_lora;
    char *prompt_cache;        /* contents of the loaded prompt-cache file */
    volatile int running;
    volatile int abort_requested;
    pthread_t thread;
    int thread_live;
    pthread_mutex_t lock;
} Handle;
#define HANDLE_MAGIC 0x524b4c4du
static int next_handle_id = 1;

static Handle *as_handle(LLMHandle h) {
    Handle *hd = (Handle *)h;
    return (hd && hd->magic == HANDLE_MAGIC) ? hd : NULL;
}
static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }
static int count_words(const char *s) {
    int n = 0; bool in = false;
    for (; s && *s; s++) { if (*s == ' ') in = false; else if (!in) { in = true; n++; } }
    return n;
}

/* ------------------------------------------------------------------ the API */

EXPORT RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = 32;
    p.top_k = 40;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.extend_param.enabled_cpus_num = 4;
#if RKLLM_ABI >= 121
    p.extend_param.n_batch = 1;
#endif
    count("createDefaultParam");
    return p;
}

static void record_param(jbuf *b, const RKLLMParam *p) {
    jb_str(b, "model_path", p->model_path);
    jb_int(b, "max_context_len", p->max_context_len);
    jb_int(b, "max_new_tokens", p->max_new_tokens);
    jb_int(b, "top_k", p->top_k);
    jb_int(b, "n_keep", p->n_keep);
    jb_float(b, "top_p", p->top_p);
    jb_float(b, "temperature", p->temperature);
    jb_float(b, "repeat_penalty", p->repeat_penalty);
    jb_float(b, "frequency_penalty", p->frequency_penalty);
    jb_float(b, "presence_penalty", p->presence_penalty);
    jb_int(b, "mirostat", p->mirostat);
    jb_float(b, "mirostat_tau", p->mirostat_tau);
    jb_float(b, "mirostat_eta", p->mirostat_eta);
    jb_bool(b, "skip_special_token", p->skip_special_token);
#if RKLLM_ABI >= 130
    jb_bool(b, "ignore_eos_token", p->ignore_eos_token);
#endif
    jb_bool(b, "is_async", p->is_async);
#if RKLLM_ABI < 130
    jb_str(b, "img_start", p->img_start);
    jb_str(b, "img_end", p->img_end);
    jb_str(b, "img_content", p->img_content);
#endif
    const RKLLMExtendParam *e = &p->extend_param;
    jb_open(b, "extend_param");
    jb_int(b, "base_domain_id", e->base_domain_id);
    jb_int(b, "embed_flash", e->embed_flash);
    jb_int(b, "enabled_cpus_num", e->enabled_cpus_num);
    jb_uint(b, "enabled_cpus_mask", e->enabled_cpus_mask);
#if RKLLM_ABI >= 121
    jb_uint(b, "n_batch", e->n_batch);
    jb_int(b, "use_cross_attn", e->use_cross_attn);
#endif
    int nonzero = 0;
    for (size_t i = 0; i < sizeof e->reserved; i++) nonzero += e->reserved[i] != 0;
    jb_int(b, "reserved_nonzero", nonzero);
    jb_close(b);
}

#if RKLLM_ABI >= 130
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#else
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    jbuf b = {0};
    jb_open(&b, NULL);
    record_param(&b, param);
#if RKLLM_ABI >= 130
    jb_bool(&b, "callback_struct", callback != NULL);
    jb_bool(&b, "result_callback", callback && callback->result_callback != NULL);
    jb_bool(&b, "result_userdata", callback && callback->result_userdata != NULL);
    jb_bool(&b, "tokenizer_callback", callback && callback->tokenizer_callback != NULL);
    jb_bool(&b, "embed_callback", callback && callback->embed_callback != NULL);
#else
    jb_bool(&b, "result_callback", callback != NULL);
#endif
    jb_close(&b);
    record("init", b.s);

    printf("I rkllm: %s, rknpu driver version: fake, platform: FAKE\n", BANNER);
    fflush(stdout);
    if (!handle || !param || !param->model_path) return -1;
    if (trigger_in(param->model_path, "crash_init") > 0 || (getenv("FAKE_RKLLM_CRASH") && strstr(getenv("FAKE_RKLLM_CRASH"), "rkllm_init"))) {
        count("segv");  /* recorded before the crash, so tests can tell a crashed process from a leaked handle */
        raise(SIGSEGV);
    }
    if (trigger_in(param->model_path, "fail_init") > 0 || env_fails("rkllm_init")) {
        printf("E rkllm: fake init failure requested\n");
        fflush(stdout);
        return -1;
    }
    long load_ms = trigger_in(param->model_path, "load_ms");
    if (load_ms < 0) load_ms = trigger_in(getenv("FAKE_RKLLM_TRIGGERS"), "load_ms");
    if (load_ms > 0) sleep_ms(load_ms);  /* a slow load, like a big model on the NPU */
    if (access(param->model_path, R_OK) != 0) {
        printf("E rkllm: failed to open model file %s\n", param->model_path);
        fflush(stdout);
        return -1;
    }
    Handle *h = calloc(1, sizeof *h);
    h->magic = HANDLE_MAGIC;
    pthread_mutex_lock(&records_lock);
    h->id = next_handle_id++;
    pthread_mutex_unlock(&records_lock);
    h->param = *param;
    h->model_path = strdup(param->model_path);
    h->param.model_path = h->model_path;
#if RKLLM_ABI >= 130
    h->callback = callback ? callback->result_callback : NULL;
    h->result_userdata = callback ? callback->result_userdata : NULL;
#else
    h->callback = callback;
#endif
    pthread_mutex_init(&h->lock, NULL);
    *handle = h;
    count("live_handles");
    return 0;
}

EXPORT int rkllm_destroy(LLMHandle handle) {
    Handle *h = as_handle(handle);
    count("destroy");
    if (!h || env_fails("rkllm_destroy")) return -1;
    if (h->running) { h->abort_requested = 1; }
    if (h->thread_live) { pthread_join(h->thread, NULL); h->thread_live = 0; }
    free(h->model_path);
    for (int i = 0; i < 3; i++) { free(h->chat_template[i]); free(h->tools[i]); }
    free(h->prompt_cache);
    h->magic = 0;
    free(h);
    return 0;
}

/* One run: everything the generator thread needs, copied so rkllm_run_async callers may free. */
typedef struct {
    Handle *h;
    RKLLMInferMode mode;
    int keep_history;
    int max_new_tokens;
    void *userdata;
    char *prompt;              /* prompt text (or multimodal prompt) */
    char **words; int n_words; /* the "tokens" the model echoes */
    int n_input;               /* prompt tokens */
    long delay_ms, error_after, crash_after, eos_after, finish_after_abort, stamp;
} Run;

static void free_run(Run *r) {
    for (int i = 0; i < r->n_words; i++) free(r->words[i]);
    free(r->words);
    free(r->prompt);
    free(r);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int deliver(Run *r, RKLLMResult *res, LLMCallState state) {
    if (!r->h->callback) return 0;
    int rc = r->h->callback(res, r->userdata, state);
    if (rc != 0) {
        char kind[32];
        snprintf(kind, sizeof kind, "callback_returned_%d", rc);
        count(kind);
    }
    return rc;
}

static void *generate(void *arg) {
    Run *r = arg;
    Handle *h = r->h;
    double t0 = now_ms();
    RKLLMResult res;
    int generated = 0;
    bool aborted = false, errored = false;
    double t_prefill = now_ms() - t0 + 0.5;
    (void)t_prefill;  /* only 1.2.1+ has perf stats */

    if (r->mode != RKLLM_INFER_GENERATE) {
        int width = r->mode == RKLLM_INFER_GET_LOGITS ? 16 : 8;
        size_t n = (size_t)r->n_input * width;
        float *buf = malloc(n * sizeof(float));
        for (int t = 0; t < r->n_input; t++)
            for (int j = 0; j < width; j++) buf[t * width + j] = (float)t + (float)j / 100.0f + (r->mode == RKLLM_INFER_GET_LOGITS ? 0.5f : 0.0f);
        memset(&res, 0, sizeof res);
        res.token_id = -1;
        if (r->mode == RKLLM_INFER_GET_LOGITS) {
            res.logits.logits = buf; res.logits.vocab_size = width; res.logits.num_tokens = r->n_input;
        } else {
            res.last_hidden_layer.hidden_states = buf; res.last_hidden_layer.embd_size = width;
            res.last_hidden_layer.num_tokens = r->n_input;
        }
        deliver(r, &res, RKLLM_RUN_NORMAL);
        for (size_t i = 0; i < n; i++) buf[i] = -12345.0f;  /* valid only during the callback */
        free(buf);
    } else {
        const char *emoji = " \xF0\x9F\x98\x80";
        int k = 0;  /* piece index */
        while (generated < r->max_new_tokens) {
            if (h->abort_requested) { aborted = true; break; }
            if (r->delay_ms > 0) sleep_ms(r->delay_ms);
            if (h->abort_requested) { aborted = true; break; }
            if (r->crash_after >= 0 && generated >= r->crash_after) { count("segv"); raise(SIGSEGV); }
            if (r->error_after >= 0 && generated >= r->error_after) { errored = true; break; }
            if (r->eos_after >= 0 && generated >= r->eos_after) break;
            memset(&res, 0, sizeof res);
            char piece[256];
            if (r->stamp > 0) {
                snprintf(piece, sizeof piece, " %lld", now_ns());
                res.text = piece; res.token_id = 100 + k;
                deliver(r, &res, RKLLM_RUN_NORMAL);
                generated += 1;
            } else if (k % 4 == 3 && generated + 3 <= r->max_new_tokens) {
                /* 3 tokens: WAITING without text, WAITING with a partial character, NORMAL whole. */
                res.text = NULL; res.token_id = 1000 + k;
                deliver(r, &res, RKLLM_RUN_WAITING);
                char partial[4] = {' ', '\xF0', '\x9F', 0};
                res.text = partial; res.token_id = 1001 + k;
                deliver(r, &res, RKLLM_RUN_WAITING);
                res.text = emoji; res.token_id = 1002 + k;
                deliver(r, &res, RKLLM_RUN_NORMAL);
                generated += 3;
            } else {
                const char *w = r->n_words ? r->words[k % r->n_words] : "...";
                snprintf(piece, sizeof piece, "%s%s", k == 0 ? "" : " ", w);
                res.text = piece; res.token_id = 100 + k;
                deliver(r, &res, RKLLM_RUN_NORMAL);
                generated += 1;
            }
            k++;
        }
    }
    if (errored) {
        memset(&res, 0, sizeof res);
        res.token_id = -1;
        printf("E rkllm: fake generation error requested\n");
        fflush(stdout);
        deliver(r, &res, RKLLM_RUN_ERROR);
    } else if (!aborted || r->finish_after_abort > 0) {
        memset(&res, 0, sizeof res);
        res.token_id = -1;
#if RKLLM_ABI >= 121
        res.perf.prefill_time_ms = (float)t_prefill;
        res.perf.prefill_tokens = r->n_input;
        res.perf.generate_time_ms = (float)(now_ms() - t0);
        res.perf.generate_tokens = generated;
        res.perf.memory_usage_mb = 42.5f;
#endif
        deliver(r, &res, RKLLM_RUN_FINISH);
    }
    if (aborted) count("aborted_runs");
    h->kv_size = r->keep_history ? h->kv_size + r->n_input + generated : 0;
    h->running = 0;
    free_run(r);
    return NULL;
}

static void record_input(jbuf *b, const RKLLMInput *in) {
    jb_open(b, "input");
#if RKLLM_ABI >= 121
    jb_str(b, "role", in->role);
    jb_bool(b, "enable_thinking", in->enable_thinking);
#endif
    jb_int(b, "input_type", in->input_type);
    switch (in->input_type) {
    case RKLLM_INPUT_PROMPT: jb_str(b, "prompt_input", in->prompt_input); break;
    case RKLLM_INPUT_TOKEN:
        jb_open(b, "token_input");
        jb_ints(b, "input_ids", in->token_input.input_ids, in->token_input.n_tokens);
        jb_uint(b, "n_tokens", in->token_input.n_tokens);
        jb_close(b);
        break;
    case RKLLM_INPUT_EMBED:
        jb_open(b, "embed_input");
        jb_uint(b, "n_tokens", in->embed_input.n_tokens);
        jb_close(b);
        break;
    case RKLLM_INPUT_MULTIMODAL: {
        const RKLLMMultiModalInput *m = &in->multimodal_input;
        jb_open(b, "multimodal_input");
        jb_str(b, "prompt", m->prompt);
#if RKLLM_ABI >= 130
        jb_open(b, "image");
        jb_uint(b, "n_image_tokens", m->image.n_image_tokens);
        jb_uint(b, "n_image", m->image.n_image);
        jb_floats(b, "image_embed", m->image.image_embed, m->image.image_embed ? m->image.n_image * m->image.n_image_tokens * 4 : 0);
        jb_str(b, "image_start", m->image.image_start);
        jb_str(b, "image_end", m->image.image_end);
        jb_str(b, "image_content", m->image.image_content);
        jb_uint(b, "image_width", m->image.image_width);
        jb_uint(b, "image_height", m->image.image_height);
        jb_close(b);
        jb_open(b, "video");
        jb_uint(b, "n_frame_tokens", m->video.n_frame_tokens);
        jb_uint(b, "n_frame_per_video", m->video.n_frame_per_video);
        jb_uint(b, "n_video", m->video.n_video);
        jb_floats(b, "video_embed", m->video.video_embed, m->video.video_embed ? m->video.n_video * m->video.n_frame_per_video * m->video.n_frame_tokens * 4 : 0);
        jb_str(b, "video_start", m->video.video_start);
        jb_str(b, "video_end", m->video.video_end);
        jb_str(b, "video_content", m->video.video_content);
        jb_uint(b, "frame_width", m->video.frame_width);
        jb_uint(b, "frame_height", m->video.frame_height);
        jb_close(b);
#else
        jb_uint(b, "n_image_tokens", m->n_image_tokens);
#if RKLLM_ABI >= 121
        jb_uint(b, "n_image", m->n_image);
        jb_uint(b, "image_width", m->image_width);
        jb_uint(b, "image_height", m->image_height);
        jb_floats(b, "image_embed", m->image_embed, m->image_embed ? m->n_image * m->n_image_tokens * 4 : 0);
#else
        jb_floats(b, "image_embed", m->image_embed, m->image_embed ? m->n_image_tokens * 4 : 0);
#endif
#endif
        jb_close(b);
        break;
    }
    }
    jb_close(b);
}

/* The embedding width the fake pretends to have: embed and image rows are 4 floats wide. */
#define FAKE_EMBED_DIM 4

static void record_embed_values(jbuf *b, const RKLLMInput *in) {
    if (in->input_type == RKLLM_INPUT_EMBED)
        jb_floats(b, "embed", in->embed_input.embed, in->embed_input.n_tokens * FAKE_EMBED_DIM);
}

static int start_run(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata, bool async) {
    Handle *h = as_handle(handle);
    const char *fn = async ? "rkllm_run_async" : "rkllm_run";
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_str(&b, "function", fn);
    jb_int(&b, "handle", h ? h->id : -1);
    jb_bool(&b, "userdata", userdata != NULL);
    if (in) { record_input(&b, in); record_embed_values(&b, in); }
    if (ip) {
        jb_open(&b, "infer_params");
        jb_int(&b, "mode", ip->mode);
        if (ip->lora_params) { jb_open(&b, "lora_params"); jb_str(&b, "lora_adapter_name", ip->lora_params->lora_adapter_name); jb_close(&b); }
        else { jb_key(&b, "lora_params"); jb_raw(&b, "null"); }
        if (ip->prompt_cache_params) {
            jb_open(&b, "prompt_cache_params");
            jb_int(&b, "save_prompt_cache", ip->prompt_cache_params->save_prompt_cache);
            jb_str(&b, "prompt_cache_path", ip->prompt_cache_params->prompt_cache_path);
            jb_close(&b);
        } else { jb_key(&b, "prompt_cache_params"); jb_raw(&b, "null"); }
#if RKLLM_ABI >= 130
        if (ip->sampling_params) {
            const RKLLMSamplingParam *s = ip->sampling_params;
            jb_open(&b, "sampling_params");
            jb_int(&b, "top_k", s->top_k); jb_float(&b, "top_p", s->top_p); jb_float(&b, "temperature", s->temperature);
            jb_float(&b, "repeat_penalty", s->repeat_penalty); jb_float(&b, "frequency_penalty", s->frequency_penalty);
            jb_float(&b, "presence_penalty", s->presence_penalty); jb_int(&b, "mirostat", s->mirostat);
            jb_float(&b, "mirostat_tau", s->mirostat_tau); jb_float(&b, "mirostat_eta", s->mirostat_eta);
            jb_close(&b);
        } else { jb_key(&b, "sampling_params"); jb_raw(&b, "null"); }
        jb_int(&b, "max_new_tokens", ip->max_new_tokens);
#endif
        jb_int(&b, "keep_history", ip->keep_history);
        jb_close(&b);
    }
    jb_close(&b);
    record("run", b.s);

    if (!h || !in || !ip || env_fails(fn)) return -1;
    const char *prompt = NULL;
    if (in->input_type == RKLLM_INPUT_PROMPT) prompt = in->prompt_input;
    else if (in->input_type == RKLLM_INPUT_MULTIMODAL) prompt = in->multimodal_input.prompt;
    if (trigger(prompt, h->model_path, "fail") > 0) {
        printf("E rkllm: fake run failure requested\n");
        fflush(stdout);
        return -1;
    }
    if (ip->lora_params) {
        bool known = false;
        for (int i = 0; i < h->n_lora; i++) known |= ip->lora_params->lora_adapter_name && !strcmp(h->lora_names[i], ip->lora_params->lora_adapter_name);
        if (!known) { printf("E rkllm: unknown lora adapter\n"); fflush(stdout); return -1; }
    }
    pthread_mutex_lock(&h->lock);
    if (h->running) { pthread_mutex_unlock(&h->lock); count("run_while_busy"); return -1; }
    if (h->thread_live) { pthread_join(h->thread, NULL); h->thread_live = 0; }
    h->running = 1;
    h->abort_requested = 0;
    pthread_mutex_unlock(&h->lock);

    Run *r = calloc(1, sizeof *r);
    r->h = h;
    r->mode = ip->mode;
    r->keep_history = ip->keep_history;
    r->max_new_tokens = h->param.max_new_tokens;
#if RKLLM_ABI >= 130
    if (ip->max_new_tokens > 0) r->max_new_tokens = ip->max_new_tokens;
    r->userdata = userdata ? userdata : h->result_userdata;
#else
    r->userdata = userdata;
#endif
    r->prompt = dup_or_null(prompt);
    r->delay_ms = trigger(prompt, h->model_path, "delay_ms");
    r->error_after = trigger(prompt, h->model_path, "error");
    r->crash_after = trigger(prompt, h->model_path, "crash");
    r->eos_after = trigger(prompt, h->model_path, "eos");
    r->finish_after_abort = trigger(prompt, h->model_path, "finish_after_abort");
    r->stamp = trigger(prompt, h->model_path, "stamp");

    /* The words the model echoes: the prompt's words, or token ids, or embedding rows. */
    r->words = calloc(64, sizeof(char *));
    if (prompt) {
        char *copy = strdup(prompt), *save = NULL;
        for (char *w = strtok_r(copy, " ", &save); w && r->n_words < 64; w = strtok_r(NULL, " ", &save))
            if (strncmp(w, "fake:", 5) != 0) r->words[r->n_words++] = strdup(w);
        free(copy);
        r->n_input = count_words(prompt);
    } else if (in->input_type == RKLLM_INPUT_TOKEN) {
        for (size_t i = 0; i < in->token_input.n_tokens && r->n_words < 64; i++) {
            char w[32];
            snprintf(w, sizeof w, "<%d>", in->token_input.input_ids[i]);
            r->words[r->n_words++] = strdup(w);
        }
        r->n_input = (int)in->token_input.n_tokens;
    } else if (in->input_type == RKLLM_INPUT_EMBED) {
        for (size_t i = 0; i < in->embed_input.n_tokens && r->n_words < 64; i++) {
            char w[32];
            snprintf(w, sizeof w, "e%zu", i);
            r->words[r->n_words++] = strdup(w);
        }
        r->n_input = (int)in->embed_input.n_tokens;
    }
    if (r->n_input == 0) r->n_input = 1;
    if (ip->prompt_cache_params && ip->prompt_cache_params->save_prompt_cache) {
        const char *path = ip->prompt_cache_params->prompt_cache_path ? ip->prompt_cache_params->prompt_cache_path : "./prompt_cache.bin";
        FILE *f = fopen(path, "wb");
        if (!f) { h->running = 0; free_run(r); return -1; }
        fprintf(f, "FAKE-RKLLM-PROMPT-CACHE v1\n%s", prompt ? prompt : "");
        fclose(f);
        count("prompt_cache_saved");
    }
    printf("I rkllm: fake run of %d input tokens\n", r->n_input);
    fflush(stdout);

    pthread_create(&h->thread, NULL, generate, r);
    h->thread_live = 1;
    if (!async) {
        pthread_join(h->thread, NULL);
        h->thread_live = 0;
    }
    return 0;
}

EXPORT int rkllm_run(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    return start_run(handle, in, ip, userdata, false);
}
EXPORT int rkllm_run_async(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    return start_run(handle, in, ip, userdata, true);
}

EXPORT int rkllm_abort(LLMHandle handle) {
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_int(&b, "t_ns", now_ns());
    jb_bool(&b, "running", h && h->running);
    jb_close(&b);
    record("abort", b.s);
    if (!h || env_fails("rkllm_abort")) return -1;
    if (h->running) count("abort_while_running");
    h->abort_requested = 1;
    return 0;
}

EXPORT int rkllm_is_running(LLMHandle handle) {
    Handle *h = as_handle(handle);
    return h && h->running ? 1 : 0;
}

EXPORT int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *a) {
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_str(&b, "lora_adapter_path", a ? a->lora_adapter_path : NULL);
    jb_str(&b, "lora_adapter_name", a ? a->lora_adapter_name : NULL);
    jb_float(&b, "scale", a ? a->scale : 0.0f);
    jb_close(&b);
    record("load_lora", b.s);
    if (!h || !a || !a->lora_adapter_name || !a->lora_adapter_path || env_fails("rkllm_load_lora")) return -1;
    if (access(a->lora_adapter_path, R_OK) != 0 || h->n_lora >= MAX_LORA) return -1;
    snprintf(h->lora_names[h->n_lora++], 64, "%s", a->lora_adapter_name);
    return 0;
}

EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char *path) {
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_str(&b, "prompt_cache_path", path);
    if (!h || !path || env_fails("rkllm_load_prompt_cache")) { jb_close(&b); record("load_prompt_cache", b.s); return -1; }
    FILE *f = fopen(path, "rb");
    if (!f) { jb_close(&b); record("load_prompt_cache", b.s); return -1; }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *magic = "FAKE-RKLLM-PROMPT-CACHE v1\n";
    if (strncmp(buf, magic, strlen(magic)) != 0) { jb_close(&b); record("load_prompt_cache", b.s); return -1; }
    free(h->prompt_cache);
    h->prompt_cache = strdup(buf + strlen(magic));
    jb_str(&b, "cached_prompt", h->prompt_cache);
    jb_close(&b);
    record("load_prompt_cache", b.s);
    h->kv_size = count_words(h->prompt_cache);
    return 0;
}

EXPORT int rkllm_release_prompt_cache(LLMHandle handle) {
    Handle *h = as_handle(handle);
    count("release_prompt_cache");
    if (!h || env_fails("rkllm_release_prompt_cache")) return -1;
    free(h->prompt_cache);
    h->prompt_cache = NULL;
    return 0;
}

EXPORT int rkllm_set_chat_template(LLMHandle handle, const char *sys, const char *prefix, const char *postfix) {
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_str(&b, "system_prompt", sys);
    jb_str(&b, "prompt_prefix", prefix);
    jb_str(&b, "prompt_postfix", postfix);
    jb_close(&b);
    record("set_chat_template", b.s);
    if (!h || env_fails("rkllm_set_chat_template")) return -1;
    const char *v[3] = {sys, prefix, postfix};
    for (int i = 0; i < 3; i++) { free(h->chat_template[i]); h->chat_template[i] = dup_or_null(v[i]); }
    h->system_tokens = count_words(sys);
    return 0;
}

#if RKLLM_ABI >= 121
EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
#else
EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
#endif
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_int(&b, "keep_system_prompt", keep_system_prompt);
#if RKLLM_ABI >= 121
    int nb = h && h->param.extend_param.n_batch ? h->param.extend_param.n_batch : 1;
    jb_ints(&b, "start_pos", start_pos, nb);
    jb_ints(&b, "end_pos", end_pos, nb);
#endif
    jb_close(&b);
    record("clear_kv_cache", b.s);
    if (!h || env_fails("rkllm_clear_kv_cache")) return -1;
    h->kv_size = keep_system_prompt ? (h->kv_size < h->system_tokens ? h->kv_size : h->system_tokens) : 0;
    return 0;
}

#if RKLLM_ABI >= 121
EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    Handle *h = as_handle(handle);
    count("get_kv_cache_size");
    if (!h || !cache_sizes || env_fails("rkllm_get_kv_cache_size")) return -1;
    int nb = h->param.extend_param.n_batch ? h->param.extend_param.n_batch : 1;
    for (int i = 0; i < nb; i++) cache_sizes[i] = h->kv_size;
    return 0;
}

EXPORT int rkllm_set_function_tools(LLMHandle handle, const char *sys, const char *tools, const char *resp) {
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_str(&b, "system_prompt", sys);
    jb_str(&b, "tools", tools);
    jb_str(&b, "tool_response_str", resp);
    jb_close(&b);
    record("set_function_tools", b.s);
    if (!h || env_fails("rkllm_set_function_tools")) return -1;
    const char *v[3] = {sys, tools, resp};
    for (int i = 0; i < 3; i++) { free(h->tools[i]); h->tools[i] = dup_or_null(v[i]); }
    return 0;
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *p) {
    Handle *h = as_handle(handle);
    jbuf b = {0};
    jb_open(&b, NULL);
    if (p) {
        int n = p->num_tokens;
        jb_int(&b, "num_tokens", n);
        jb_floats(&b, "encoder_mask", p->encoder_mask, n > 0 ? n : 0);
        jb_ints(&b, "encoder_pos", p->encoder_pos, n > 0 ? n : 0);
        /* The caches' lengths are not in the struct: the tests send 2 floats per token. */
        jb_floats(&b, "encoder_k_cache", p->encoder_k_cache, n > 0 ? 2 * n : 0);
        jb_floats(&b, "encoder_v_cache", p->encoder_v_cache, n > 0 ? 2 * n : 0);
    }
    jb_close(&b);
    record("set_cross_attn_params", b.s);
    if (!h || !p || env_fails("rkllm_set_cross_attn_params")) return -1;
    return 0;
}
#endif
