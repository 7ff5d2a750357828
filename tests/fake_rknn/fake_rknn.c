/*
 * A fake librknnrt.so (Rockchip RKNN runtime) for tests: the C ABI of rknn_api.h V2.3.2 as restated in
 * shared/reference/rknn-api.md (§1, §2, Appendix A), declared here from those tables (the vendor header is not
 * copied), and a tiny deterministic "model" described by a text file.
 *
 * Build variants (-DFAKE_RKNN_SYMBOLS=232|152): 232 exports the inference API, rknn_set_batch_core_num, rknn_wait,
 * rknn_create_mem, rknn_create_mem2, rknn_destroy_mem, rknn_set_io_mem and rknn_mem_sync; 152 leaves out
 * rknn_create_mem2 and rknn_mem_sync, like the 1.5.2 runtime (reference §1.6 "Exported symbols"), to test lazy
 * binding. -DFAKE_RKNN_API_VERSION="..." / -DFAKE_RKNN_DRV_VERSION="..." set what RKNN_QUERY_SDK_VERSION returns
 * ($FAKE_RKNN_DRV_VERSION overrides the driver's at run time).
 *
 * The model (rknn_init with size == 0: a path; size > 0: a buffer of that many bytes) is text:
 *
 *     FAKE-RKNN 1                  <- magic; anything else is "parseRKNN: invalid RKNN_MAGIC!" and -6
 *     profile = qwen2.5vl-3b       <- a profile below (default "tiny")
 *     key = value                  <- optional overrides, '#' starts a comment
 *
 * Profiles (numbers from the reference §6 table and §3.3; "test values" are the fake's own):
 *     qwen2vl-2b     input "pixel" [1,392,392,3] NHWC FP16  -> 1 output  [196,1536] FP16
 *     qwen2.5vl-3b   input "pixel" [1,392,392,3] NHWC FP16  -> 1 output  [196,2048] FP16
 *     qwen3vl-2b     input "pixel" [1,448,448,3] NHWC FP16  -> 4 outputs [196,2048] FP16 (deepstack)
 *     internvl3-1b   input "pixel_values" [1,448,448,3]     -> 1 output  [1,256,896] FP16
 *     minicpmv       input "pixel" [1,448,448,3]            -> 1 output  [1,64,3584] FP16
 *     tiny           (test values) input "pixel" [1,28,28,3] NHWC FP16 -> 1 output [4,8] FP16
 *     tiny-deepstack (test values) input "pixel" [1,32,32,3] NHWC FP16 -> 4 outputs [4,8] FP16
 *     tiny-nchw      (test values) input "pixel" [1,3,28,28] NCHW FP16 -> 1 output [1,4,8] FP16
 *     tiny-int8      (test values) input "input" [1,8,8,3] NHWC INT8 AFFINE zp -128 scale 1/128
 *                                  -> 1 output [4,8] INT8 AFFINE zp -10 scale 0.05
 * FP16 tensors report qnt_type AFFINE, zp 0, scale 1.0 (as in the logs the reference cites). Input names other than
 * "pixel"/"pixel_values" and all output names ("output0", "output1", ...) are test values.
 * Override keys: input_name, input_dims (e.g. 1,448,448,3), input_fmt, input_type, input_qnt, input_zp, input_scale,
 * n_inputs (1-8, copies of input 0), layout=NCHW (turn a 4-D NHWC input into [1,C,H,W] NCHW), output_dims,
 * output_type (FLOAT32|FLOAT16|INT8|UINT8), output_fmt, output_qnt, output_zp, output_scale, n_outputs (1-8),
 * custom_string, npu_cores (1 = single-core NPU like RK3562: rknn_set_core_mask fails; 2 = RK3576; 3 = RK3588,
 * the default), platform (for the log), weight_size, load_ms, run_ms, fail / crash (comma-separated function
 * names that return RKNN_ERR_FAIL / raise SIGSEGV). An unknown key or value is a load failure (-6).
 *
 * The outputs are computed from input 0 (other inputs are checked but unused). Let P[y][x][k] be input 0's values
 * as numbers (decoded from the caller's type and layout; pass_through=1 uses the model's), with H, W, C from the
 * model's input attr (4-D NHWC [N,H,W,C], NCHW [N,C,H,W]; any other shape: H=1, W=n_elems, C=1; batch 0 only).
 * For output j with dims d[]: width D = d[n_dims-1], tokens T = n_elems / D. The tokens tile the image in a grid
 * of gh rows x gw columns, gh = the largest divisor of T with gh*gh <= T, gw = T/gh (196 -> 14x14, 256 -> 16x16,
 * 64 -> 8x8, 4 -> 2x2). Token t = (r, q) = (t / gw, t % gw) covers rows [r*H/gh, (r+1)*H/gh) and columns
 * [q*W/gw, (q+1)*W/gw) (integer division). M(t, k) = sum of P over the block for channel k / number of pixels
 * (0 if the block is empty), in double. Then, in double, left to right, rounded to float32 once:
 *
 *     out[j][t][c] = M(t, c % C) / 255.0 + j + t * 0.01 + c * 0.001
 *
 * want_float=1 returns those float32s; want_float=0 returns the native type: FP16 by round-to-nearest-even of the
 * float32, INT8/UINT8 as clamp(rint(v / scale) + zp) (v the float32, in double, ties to even), FLOAT32 as is.
 *
 * Behaviour follows reference §1.8 and §6: -5 (RKNN_ERR_PARAM_INVALID) for every argument or state check (too
 * small info_len, bad index, wrong counts, too small buffers, unsupported queries on a static model), -6 for a
 * model that cannot be loaded, -7 for an unknown or destroyed context, -1 for injected failures, for a context used
 * by two threads at once ("failed to submit"), for rknn_wait (unsupported on every platform, Table 4-1) and for a
 * core mask the NPU does not have. Log lines ("I RKNN: [hh:mm:ss.mmm] ...") go to stdout, or stderr with
 * $FAKE_RKNN_LOG=stderr; $RKNN_LOG_LEVEL: 0 errors, 1 +warnings, 2 +info (default), 3 +debug (per call).
 *
 * Test hooks: fake_rknn_last(kind) -> JSON of the last record ("rknn_init", "rknn_query", ...), fake_rknn_count(kind),
 * fake_rknn_reset(), fake_rknn_sizeof(struct), fake_rknn_alignof(struct), fake_rknn_offsetof(struct, field),
 * fake_rknn_unreleased() (output buffers handed out by rknn_outputs_get and not freed by rknn_outputs_release, since
 * the last reset; rknn_destroy frees leftovers but does not forgive them), fake_rknn_live_contexts(),
 * fake_rknn_last_input(index, out, cap) (the bytes of the last rknn_inputs_set for that index). With
 * $FAKE_RKNN_RECORD_DIR set, records also go to files there (<kind>.json, one line per event in "events"; every output
 * buffer handed out is an event "rknn_output_buffer", every one released "rknn_output_buffer_released"), and with
 * $FAKE_RKNN_DUMP_DIR the last input of each index goes to input<i>.bin with input<i>.json (type, fmt, size, ...).
 */
#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#ifndef FAKE_RKNN_SYMBOLS
#define FAKE_RKNN_SYMBOLS 232
#endif
#ifndef FAKE_RKNN_API_VERSION
#define FAKE_RKNN_API_VERSION "2.3.2 (429f97ae6b@2025-04-09T09:09:27)"
#endif
#ifndef FAKE_RKNN_DRV_VERSION
#define FAKE_RKNN_DRV_VERSION "0.9.8"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ the ABI (reference §1.1-§1.5, §2) */

#if defined(__arm__)
typedef uint32_t rknn_context;
#else
typedef uint64_t rknn_context;
#endif

#define RKNN_MAX_DIMS 16
#define RKNN_MAX_NUM_CHANNEL 15
#define RKNN_MAX_NAME_LEN 256
#define RKNN_MAX_DYNAMIC_SHAPE_NUM 512

#define RKNN_SUCC 0
#define RKNN_ERR_FAIL -1
#define RKNN_ERR_TIMEOUT -2
#define RKNN_ERR_DEVICE_UNAVAILABLE -3
#define RKNN_ERR_MALLOC_FAIL -4
#define RKNN_ERR_PARAM_INVALID -5
#define RKNN_ERR_MODEL_INVALID -6
#define RKNN_ERR_CTX_INVALID -7
#define RKNN_ERR_INPUT_INVALID -8
#define RKNN_ERR_OUTPUT_INVALID -9

#define RKNN_FLAG_PRIOR_HIGH 0x00000000u
#define RKNN_FLAG_PRIOR_MEDIUM 0x00000001u
#define RKNN_FLAG_PRIOR_LOW 0x00000002u
#define RKNN_FLAG_ASYNC_MASK 0x00000004u
#define RKNN_FLAG_COLLECT_PERF_MASK 0x00000008u
#define RKNN_FLAG_MEM_ALLOC_OUTSIDE 0x00000010u
#define RKNN_FLAG_SHARE_WEIGHT_MEM 0x00000020u
#define RKNN_FLAG_COLLECT_MODEL_INFO_ONLY 0x00000100u
#define RKNN_FLAG_MODEL_BUFFER_ZERO_COPY 0x00010000u

typedef enum {
    RKNN_QUERY_IN_OUT_NUM = 0,
    RKNN_QUERY_INPUT_ATTR = 1,
    RKNN_QUERY_OUTPUT_ATTR = 2,
    RKNN_QUERY_PERF_DETAIL = 3,
    RKNN_QUERY_PERF_RUN = 4,
    RKNN_QUERY_SDK_VERSION = 5,
    RKNN_QUERY_MEM_SIZE = 6,
    RKNN_QUERY_CUSTOM_STRING = 7,
    RKNN_QUERY_NATIVE_INPUT_ATTR = 8,
    RKNN_QUERY_NATIVE_OUTPUT_ATTR = 9,
    RKNN_QUERY_NATIVE_NC1HWC2_INPUT_ATTR = 8,
    RKNN_QUERY_NATIVE_NC1HWC2_OUTPUT_ATTR = 9,
    RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR = 10,
    RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR = 11,
    RKNN_QUERY_DEVICE_MEM_INFO = 12,
    RKNN_QUERY_INPUT_DYNAMIC_RANGE = 13,
    RKNN_QUERY_CURRENT_INPUT_ATTR = 14,
    RKNN_QUERY_CURRENT_OUTPUT_ATTR = 15,
    RKNN_QUERY_CURRENT_NATIVE_INPUT_ATTR = 16,
    RKNN_QUERY_CURRENT_NATIVE_OUTPUT_ATTR = 17,
    RKNN_QUERY_CMD_MAX = 18
} rknn_query_cmd;

typedef enum {
    RKNN_TENSOR_FLOAT32 = 0, RKNN_TENSOR_FLOAT16, RKNN_TENSOR_INT8, RKNN_TENSOR_UINT8, RKNN_TENSOR_INT16,
    RKNN_TENSOR_UINT16, RKNN_TENSOR_INT32, RKNN_TENSOR_UINT32, RKNN_TENSOR_INT64, RKNN_TENSOR_BOOL, RKNN_TENSOR_INT4,
    RKNN_TENSOR_BFLOAT16, RKNN_TENSOR_TYPE_MAX
} rknn_tensor_type;

typedef enum {
    RKNN_TENSOR_QNT_NONE = 0, RKNN_TENSOR_QNT_DFP, RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC, RKNN_TENSOR_QNT_MAX
} rknn_tensor_qnt_type;

typedef enum {
    RKNN_TENSOR_NCHW = 0, RKNN_TENSOR_NHWC, RKNN_TENSOR_NC1HWC2, RKNN_TENSOR_UNDEFINED, RKNN_TENSOR_FORMAT_MAX
} rknn_tensor_format;

typedef enum {
    RKNN_NPU_CORE_AUTO = 0, RKNN_NPU_CORE_0 = 1, RKNN_NPU_CORE_1 = 2, RKNN_NPU_CORE_2 = 4, RKNN_NPU_CORE_0_1 = 3,
    RKNN_NPU_CORE_0_1_2 = 7, RKNN_NPU_CORE_ALL = 0xffff, RKNN_NPU_CORE_UNDEFINED = 0x10000
} rknn_core_mask;

typedef enum {
    RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE = 1, RKNN_TENSOR_MEMORY_FLAGS_FROM_FD = 2,
    RKNN_TENSOR_MEMORY_FLAGS_FROM_PHYS = 3, RKNN_TENSOR_MEMORY_FLAGS_UNKNOWN = 4
} rknn_tensor_mem_flags;

typedef enum {
    RKNN_MEMORY_SYNC_TO_DEVICE = 1, RKNN_MEMORY_SYNC_FROM_DEVICE = 2, RKNN_MEMORY_SYNC_BIDIRECTIONAL = 3
} rknn_mem_sync_mode;

typedef struct {
    uint32_t n_input;
    uint32_t n_output;
} rknn_input_output_num;

typedef struct {
    uint32_t index;
    uint32_t n_dims;
    uint32_t dims[RKNN_MAX_DIMS];
    char name[RKNN_MAX_NAME_LEN];
    uint32_t n_elems;
    uint32_t size;
    rknn_tensor_format fmt;
    rknn_tensor_type type;
    rknn_tensor_qnt_type qnt_type;
    int8_t fl;
    int32_t zp;
    float scale;
    uint32_t w_stride;
    uint32_t size_with_stride;
    uint8_t pass_through;
    uint32_t h_stride;
} rknn_tensor_attr;

typedef struct {
    uint32_t index;
    uint32_t shape_number;
    rknn_tensor_format fmt;
    char name[RKNN_MAX_NAME_LEN];
    uint32_t dyn_range[RKNN_MAX_DYNAMIC_SHAPE_NUM][RKNN_MAX_DIMS];
    uint32_t n_dims;
} rknn_input_range;

typedef struct {
    char *perf_data;
    uint64_t data_len;
} rknn_perf_detail;

typedef struct {
    int64_t run_duration;
} rknn_perf_run;

typedef struct {
    char api_version[256];
    char drv_version[256];
} rknn_sdk_version;

typedef struct {
    uint32_t total_weight_size;
    uint32_t total_internal_size;
    uint64_t total_dma_allocated_size;
    uint32_t total_sram_size;
    uint32_t free_sram_size;
    uint32_t reserved[10];
} rknn_mem_size;

typedef struct {
    char string[1024];
} rknn_custom_string;

typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd;
    int32_t offset;
    uint32_t size;
    uint32_t flags;
    void *priv_data;
} rknn_tensor_mem;

typedef struct {
    uint32_t index;
    void *buf;
    uint32_t size;
    uint8_t pass_through;
    rknn_tensor_type type;
    rknn_tensor_format fmt;
} rknn_input;

typedef struct {
    uint8_t want_float;
    uint8_t is_prealloc;
    uint32_t index;
    void *buf;
    uint32_t size;
} rknn_output;

typedef struct {
    rknn_context ctx;
    int32_t real_model_offset;
    uint32_t real_model_size;
    int32_t model_buffer_fd;
    uint32_t model_buffer_flags;
    uint8_t reserved[112];
} rknn_init_extend;

typedef struct {
    uint64_t frame_id;
    int32_t non_block;
    int32_t timeout_ms;
    int32_t fence_fd;
} rknn_run_extend;

typedef struct {
    uint64_t frame_id;
} rknn_output_extend;

/* Appendix A (x86_64, gcc 12.2, header V2.3.2): LP64 only; ILP32 differs (reference §2, last paragraph). */
#if UINTPTR_MAX == 0xffffffffffffffffu
#define CHECK_LAYOUT(T, size, align) \
    _Static_assert(sizeof(T) == (size), "sizeof(" #T ")"); _Static_assert(_Alignof(T) == (align), "_Alignof(" #T ")");
#define CHECK_FIELD(T, f, off, sz) \
    _Static_assert(offsetof(T, f) == (off), "offsetof(" #T ", " #f ")"); \
    _Static_assert(sizeof(((T *)0)->f) == (sz), "sizeof(" #T "." #f ")");
_Static_assert(sizeof(rknn_context) == 8, "sizeof(rknn_context)");
_Static_assert(sizeof(rknn_query_cmd) == 4 && sizeof(rknn_core_mask) == 4 && sizeof(rknn_tensor_type) == 4 &&
               sizeof(rknn_mem_sync_mode) == 4 && sizeof(rknn_tensor_format) == 4 &&
               sizeof(rknn_tensor_qnt_type) == 4, "enums are 4 bytes (Appendix B)");
CHECK_LAYOUT(rknn_input_output_num, 8, 4)
CHECK_FIELD(rknn_input_output_num, n_input, 0, 4)
CHECK_FIELD(rknn_input_output_num, n_output, 4, 4)
CHECK_LAYOUT(rknn_tensor_attr, 376, 4)
CHECK_FIELD(rknn_tensor_attr, index, 0, 4)
CHECK_FIELD(rknn_tensor_attr, n_dims, 4, 4)
CHECK_FIELD(rknn_tensor_attr, dims, 8, 64)
CHECK_FIELD(rknn_tensor_attr, name, 72, 256)
CHECK_FIELD(rknn_tensor_attr, n_elems, 328, 4)
CHECK_FIELD(rknn_tensor_attr, size, 332, 4)
CHECK_FIELD(rknn_tensor_attr, fmt, 336, 4)
CHECK_FIELD(rknn_tensor_attr, type, 340, 4)
CHECK_FIELD(rknn_tensor_attr, qnt_type, 344, 4)
CHECK_FIELD(rknn_tensor_attr, fl, 348, 1)
CHECK_FIELD(rknn_tensor_attr, zp, 352, 4)
CHECK_FIELD(rknn_tensor_attr, scale, 356, 4)
CHECK_FIELD(rknn_tensor_attr, w_stride, 360, 4)
CHECK_FIELD(rknn_tensor_attr, size_with_stride, 364, 4)
CHECK_FIELD(rknn_tensor_attr, pass_through, 368, 1)
CHECK_FIELD(rknn_tensor_attr, h_stride, 372, 4)
CHECK_LAYOUT(rknn_input_range, 33040, 4)
CHECK_FIELD(rknn_input_range, index, 0, 4)
CHECK_FIELD(rknn_input_range, shape_number, 4, 4)
CHECK_FIELD(rknn_input_range, fmt, 8, 4)
CHECK_FIELD(rknn_input_range, name, 12, 256)
CHECK_FIELD(rknn_input_range, dyn_range, 268, 32768)
CHECK_FIELD(rknn_input_range, n_dims, 33036, 4)
CHECK_LAYOUT(rknn_perf_detail, 16, 8)
CHECK_FIELD(rknn_perf_detail, perf_data, 0, 8)
CHECK_FIELD(rknn_perf_detail, data_len, 8, 8)
CHECK_LAYOUT(rknn_perf_run, 8, 8)
CHECK_FIELD(rknn_perf_run, run_duration, 0, 8)
CHECK_LAYOUT(rknn_sdk_version, 512, 1)
CHECK_FIELD(rknn_sdk_version, api_version, 0, 256)
CHECK_FIELD(rknn_sdk_version, drv_version, 256, 256)
CHECK_LAYOUT(rknn_mem_size, 64, 8)
CHECK_FIELD(rknn_mem_size, total_weight_size, 0, 4)
CHECK_FIELD(rknn_mem_size, total_internal_size, 4, 4)
CHECK_FIELD(rknn_mem_size, total_dma_allocated_size, 8, 8)
CHECK_FIELD(rknn_mem_size, total_sram_size, 16, 4)
CHECK_FIELD(rknn_mem_size, free_sram_size, 20, 4)
CHECK_FIELD(rknn_mem_size, reserved, 24, 40)
CHECK_LAYOUT(rknn_custom_string, 1024, 1)
CHECK_FIELD(rknn_custom_string, string, 0, 1024)
CHECK_LAYOUT(rknn_tensor_mem, 40, 8)
CHECK_FIELD(rknn_tensor_mem, virt_addr, 0, 8)
CHECK_FIELD(rknn_tensor_mem, phys_addr, 8, 8)
CHECK_FIELD(rknn_tensor_mem, fd, 16, 4)
CHECK_FIELD(rknn_tensor_mem, offset, 20, 4)
CHECK_FIELD(rknn_tensor_mem, size, 24, 4)
CHECK_FIELD(rknn_tensor_mem, flags, 28, 4)
CHECK_FIELD(rknn_tensor_mem, priv_data, 32, 8)
CHECK_LAYOUT(rknn_input, 32, 8)
CHECK_FIELD(rknn_input, index, 0, 4)
CHECK_FIELD(rknn_input, buf, 8, 8)
CHECK_FIELD(rknn_input, size, 16, 4)
CHECK_FIELD(rknn_input, pass_through, 20, 1)
CHECK_FIELD(rknn_input, type, 24, 4)
CHECK_FIELD(rknn_input, fmt, 28, 4)
CHECK_LAYOUT(rknn_output, 24, 8)
CHECK_FIELD(rknn_output, want_float, 0, 1)
CHECK_FIELD(rknn_output, is_prealloc, 1, 1)
CHECK_FIELD(rknn_output, index, 4, 4)
CHECK_FIELD(rknn_output, buf, 8, 8)
CHECK_FIELD(rknn_output, size, 16, 4)
CHECK_LAYOUT(rknn_init_extend, 136, 8)
CHECK_FIELD(rknn_init_extend, ctx, 0, 8)
CHECK_FIELD(rknn_init_extend, real_model_offset, 8, 4)
CHECK_FIELD(rknn_init_extend, real_model_size, 12, 4)
CHECK_FIELD(rknn_init_extend, model_buffer_fd, 16, 4)
CHECK_FIELD(rknn_init_extend, model_buffer_flags, 20, 4)
CHECK_FIELD(rknn_init_extend, reserved, 24, 112)
CHECK_LAYOUT(rknn_run_extend, 24, 8)
CHECK_FIELD(rknn_run_extend, frame_id, 0, 8)
CHECK_FIELD(rknn_run_extend, non_block, 8, 4)
CHECK_FIELD(rknn_run_extend, timeout_ms, 12, 4)
CHECK_FIELD(rknn_run_extend, fence_fd, 16, 4)
CHECK_LAYOUT(rknn_output_extend, 8, 8)
CHECK_FIELD(rknn_output_extend, frame_id, 0, 8)
#endif

/* ------------------------------------------------------------------ logging like the runtime */

static int log_level(void) {
    const char *v = getenv("RKNN_LOG_LEVEL");
    return v && *v ? atoi(v) : 2;
}

__attribute__((format(printf, 2, 3))) static void rknn_log(char level, const char *fmt, ...) {
    int need = level == 'E' ? 0 : level == 'W' ? 1 : level == 'I' ? 2 : 3;
    if (log_level() < need) return;
    const char *stream = getenv("FAKE_RKNN_LOG");
    FILE *out = stream && !strcmp(stream, "stderr") ? stderr : stdout;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    localtime_r(&ts.tv_sec, &tm);
    char line[2048];
    int n = snprintf(line, sizeof line, "%c RKNN: [%02d:%02d:%02d.%03ld] ", level, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000L);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(out, "%s\n", line);
    fflush(out);
}

/* ------------------------------------------------------------------ JSON records for the tests */

typedef struct { char *s; size_t n, cap; } jbuf;

__attribute__((format(printf, 2, 3))) static void jb_raw(jbuf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int need = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (b->s && b->n + (size_t)need < b->cap) { b->n += (size_t)need; return; }
        b->cap = (b->cap + (size_t)need + 1) * 2;
        b->s = realloc(b->s, b->cap);
    }
}
static void jb_sep(jbuf *b) {
    if (b->n && b->s[b->n - 1] != '{' && b->s[b->n - 1] != '[' && b->s[b->n - 1] != ':') jb_raw(b, ",");
}
static void jb_key(jbuf *b, const char *k) { if (k) { jb_sep(b); jb_raw(b, "\"%s\":", k); } else jb_sep(b); }
static void jb_open(jbuf *b, const char *k) { jb_key(b, k); jb_raw(b, "{"); }
static void jb_close(jbuf *b) { jb_raw(b, "}"); }
static void jb_open_list(jbuf *b, const char *k) { jb_key(b, k); jb_raw(b, "["); }
static void jb_close_list(jbuf *b) { jb_raw(b, "]"); }
static void jb_null(jbuf *b, const char *k) { jb_key(b, k); jb_raw(b, "null"); }
static void jb_str(jbuf *b, const char *k, const char *v) {
    jb_key(b, k);
    if (!v) { jb_raw(b, "null"); return; }
    jb_raw(b, "\"");
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\') jb_raw(b, "\\%c", *p);
        else if (*p < 0x20 || *p == 0x7f) jb_raw(b, "\\u%04x", *p);
        else jb_raw(b, "%c", *p);
    }
    jb_raw(b, "\"");
}
static void jb_int(jbuf *b, const char *k, long long v) { jb_key(b, k); jb_raw(b, "%lld", v); }
static void jb_uint(jbuf *b, const char *k, unsigned long long v) { jb_key(b, k); jb_raw(b, "%llu", v); }
static void jb_bool(jbuf *b, const char *k, bool v) { jb_key(b, k); jb_raw(b, v ? "true" : "false"); }
static void jb_float(jbuf *b, const char *k, float v) { jb_key(b, k); jb_raw(b, "%.9g", (double)v); }

#define MAX_KINDS 128
static struct { char kind[64]; char *json; int count; } records[MAX_KINDS];
static pthread_mutex_t records_lock = PTHREAD_MUTEX_INITIALIZER;
static long long unreleased_outputs;
static int live_contexts;

static int kind_slot(const char *kind) {
    for (int i = 0; i < MAX_KINDS; i++) {
        if (!records[i].kind[0]) { snprintf(records[i].kind, sizeof records[i].kind, "%s", kind); return i; }
        if (!strcmp(records[i].kind, kind)) return i;
    }
    return MAX_KINDS - 1;
}

/* Store `json` (taken over; NULL only counts) as the last record of `kind`. */
static void record(const char *kind, char *json) {
    pthread_mutex_lock(&records_lock);
    int i = kind_slot(kind);
    if (json) { free(records[i].json); records[i].json = json; }
    records[i].count++;
    const char *dir = getenv("FAKE_RKNN_RECORD_DIR");
    if (dir && *dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/events", dir);
        FILE *f = fopen(path, "a");
        if (f) { fprintf(f, "%s\n", kind); fclose(f); }
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

/* Close the record's object with the return code, store it, and hand the code back. */
static int finish(const char *kind, jbuf *b, int ret) {
    jb_int(b, "ret", ret);
    jb_close(b);
    record(kind, b->s);
    return ret;
}

EXPORT const char *fake_rknn_last(const char *kind) {
    pthread_mutex_lock(&records_lock);
    const char *out = NULL;
    for (int i = 0; i < MAX_KINDS && records[i].kind[0]; i++)
        if (!strcmp(records[i].kind, kind)) out = records[i].json;
    pthread_mutex_unlock(&records_lock);
    return out;
}
EXPORT int fake_rknn_count(const char *kind) {
    pthread_mutex_lock(&records_lock);
    int out = 0;
    for (int i = 0; i < MAX_KINDS && records[i].kind[0]; i++)
        if (!strcmp(records[i].kind, kind)) out = records[i].count;
    pthread_mutex_unlock(&records_lock);
    return out;
}
EXPORT long long fake_rknn_unreleased(void) {
    pthread_mutex_lock(&records_lock);
    long long n = unreleased_outputs;
    pthread_mutex_unlock(&records_lock);
    return n;
}
EXPORT int fake_rknn_live_contexts(void) {
    pthread_mutex_lock(&records_lock);
    int n = live_contexts;
    pthread_mutex_unlock(&records_lock);
    return n;
}

#define MAX_IO 8
static struct { uint8_t *bytes; size_t size; } last_inputs[MAX_IO];

EXPORT size_t fake_rknn_last_input(uint32_t index, void *out, size_t cap) {
    if (index >= MAX_IO) return 0;
    pthread_mutex_lock(&records_lock);
    size_t n = last_inputs[index].size;
    if (out && last_inputs[index].bytes) memcpy(out, last_inputs[index].bytes, n < cap ? n : cap);
    pthread_mutex_unlock(&records_lock);
    return n;
}

EXPORT void fake_rknn_reset(void) {
    pthread_mutex_lock(&records_lock);
    for (int i = 0; i < MAX_KINDS; i++) {
        free(records[i].json);
        records[i].json = NULL;
        records[i].kind[0] = 0;
        records[i].count = 0;
    }
    for (int i = 0; i < MAX_IO; i++) { free(last_inputs[i].bytes); last_inputs[i].bytes = NULL; last_inputs[i].size = 0; }
    unreleased_outputs = 0;
    pthread_mutex_unlock(&records_lock);
}

/* ------------------------------------------------------------------ layout hooks */

EXPORT long fake_rknn_sizeof(const char *s) {
#define SZ(S) if (!strcmp(s, #S)) return (long)sizeof(S);
    SZ(rknn_context) SZ(rknn_input_output_num) SZ(rknn_tensor_attr) SZ(rknn_input_range) SZ(rknn_perf_detail)
    SZ(rknn_perf_run) SZ(rknn_sdk_version) SZ(rknn_mem_size) SZ(rknn_custom_string) SZ(rknn_tensor_mem)
    SZ(rknn_input) SZ(rknn_output) SZ(rknn_init_extend) SZ(rknn_run_extend) SZ(rknn_output_extend)
    SZ(rknn_query_cmd) SZ(rknn_tensor_type) SZ(rknn_tensor_qnt_type) SZ(rknn_tensor_format) SZ(rknn_core_mask)
    SZ(rknn_mem_sync_mode)
#undef SZ
    return -1;
}
EXPORT long fake_rknn_alignof(const char *s) {
#define AL(S) if (!strcmp(s, #S)) return (long)_Alignof(S);
    AL(rknn_context) AL(rknn_input_output_num) AL(rknn_tensor_attr) AL(rknn_input_range) AL(rknn_perf_detail)
    AL(rknn_perf_run) AL(rknn_sdk_version) AL(rknn_mem_size) AL(rknn_custom_string) AL(rknn_tensor_mem)
    AL(rknn_input) AL(rknn_output) AL(rknn_init_extend) AL(rknn_run_extend) AL(rknn_output_extend)
#undef AL
    return -1;
}
EXPORT long fake_rknn_offsetof(const char *s, const char *f) {
#define OF(S, F) if (!strcmp(s, #S) && !strcmp(f, #F)) return (long)offsetof(S, F);
    OF(rknn_input_output_num, n_input) OF(rknn_input_output_num, n_output)
    OF(rknn_tensor_attr, index) OF(rknn_tensor_attr, n_dims) OF(rknn_tensor_attr, dims) OF(rknn_tensor_attr, name)
    OF(rknn_tensor_attr, n_elems) OF(rknn_tensor_attr, size) OF(rknn_tensor_attr, fmt) OF(rknn_tensor_attr, type)
    OF(rknn_tensor_attr, qnt_type) OF(rknn_tensor_attr, fl) OF(rknn_tensor_attr, zp) OF(rknn_tensor_attr, scale)
    OF(rknn_tensor_attr, w_stride) OF(rknn_tensor_attr, size_with_stride) OF(rknn_tensor_attr, pass_through)
    OF(rknn_tensor_attr, h_stride)
    OF(rknn_input_range, index) OF(rknn_input_range, shape_number) OF(rknn_input_range, fmt)
    OF(rknn_input_range, name) OF(rknn_input_range, dyn_range) OF(rknn_input_range, n_dims)
    OF(rknn_perf_detail, perf_data) OF(rknn_perf_detail, data_len)
    OF(rknn_perf_run, run_duration)
    OF(rknn_sdk_version, api_version) OF(rknn_sdk_version, drv_version)
    OF(rknn_mem_size, total_weight_size) OF(rknn_mem_size, total_internal_size)
    OF(rknn_mem_size, total_dma_allocated_size) OF(rknn_mem_size, total_sram_size) OF(rknn_mem_size, free_sram_size)
    OF(rknn_mem_size, reserved)
    OF(rknn_custom_string, string)
    OF(rknn_tensor_mem, virt_addr) OF(rknn_tensor_mem, phys_addr) OF(rknn_tensor_mem, fd) OF(rknn_tensor_mem, offset)
    OF(rknn_tensor_mem, size) OF(rknn_tensor_mem, flags) OF(rknn_tensor_mem, priv_data)
    OF(rknn_input, index) OF(rknn_input, buf) OF(rknn_input, size) OF(rknn_input, pass_through) OF(rknn_input, type)
    OF(rknn_input, fmt)
    OF(rknn_output, want_float) OF(rknn_output, is_prealloc) OF(rknn_output, index) OF(rknn_output, buf)
    OF(rknn_output, size)
    OF(rknn_init_extend, ctx) OF(rknn_init_extend, real_model_offset) OF(rknn_init_extend, real_model_size)
    OF(rknn_init_extend, model_buffer_fd) OF(rknn_init_extend, model_buffer_flags) OF(rknn_init_extend, reserved)
    OF(rknn_run_extend, frame_id) OF(rknn_run_extend, non_block) OF(rknn_run_extend, timeout_ms)
    OF(rknn_run_extend, fence_fd)
    OF(rknn_output_extend, frame_id)
#undef OF
    return -1;
}

/* ------------------------------------------------------------------ names and numbers */

static const char *const type_names[] = {"FLOAT32", "FLOAT16", "INT8", "UINT8", "INT16", "UINT16",
                                         "INT32", "UINT32", "INT64", "BOOL", "INT4", "BFLOAT16"};
static const char *const fmt_names[] = {"NCHW", "NHWC", "NC1HWC2", "UNDEFINED"};
static const char *const qnt_names[] = {"NONE", "DFP", "AFFINE_ASYMMETRIC"};
static const char *const cmd_names[] = {
    "RKNN_QUERY_IN_OUT_NUM", "RKNN_QUERY_INPUT_ATTR", "RKNN_QUERY_OUTPUT_ATTR", "RKNN_QUERY_PERF_DETAIL",
    "RKNN_QUERY_PERF_RUN", "RKNN_QUERY_SDK_VERSION", "RKNN_QUERY_MEM_SIZE", "RKNN_QUERY_CUSTOM_STRING",
    "RKNN_QUERY_NATIVE_INPUT_ATTR", "RKNN_QUERY_NATIVE_OUTPUT_ATTR", "RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR",
    "RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR", "RKNN_QUERY_DEVICE_MEM_INFO", "RKNN_QUERY_INPUT_DYNAMIC_RANGE",
    "RKNN_QUERY_CURRENT_INPUT_ATTR", "RKNN_QUERY_CURRENT_OUTPUT_ATTR", "RKNN_QUERY_CURRENT_NATIVE_INPUT_ATTR",
    "RKNN_QUERY_CURRENT_NATIVE_OUTPUT_ATTR"};

/* Bytes per element times 2 (INT4 packs two per byte); -1 for an unknown type. */
static long elem_size_x2(int type) {
    static const int sz[] = {8, 4, 2, 2, 4, 4, 8, 8, 16, 2, 1, 4};
    return type >= 0 && type < RKNN_TENSOR_TYPE_MAX ? sz[type] : -1;
}
static uint64_t bytes_for(uint64_t n_elems, int type) {
    long x2 = elem_size_x2(type);
    return x2 < 0 ? 0 : (n_elems * (uint64_t)x2 + 1) / 2;
}

/* Parse a name (with or without its RKNN_ prefix, case-insensitive) or a number; -1 if neither. */
static int parse_enum(const char *v, const char *const *names, int n, const char *prefix) {
    char *end;
    long num = strtol(v, &end, 0);
    if (*v && !*end) return num >= 0 && num < 0x7fffffff ? (int)num : -1;
    if (!strncasecmp(v, prefix, strlen(prefix))) v += strlen(prefix);
    for (int i = 0; i < n; i++)
        if (!strcasecmp(v, names[i])) return i;
    return -1;
}
static int parse_type(const char *v) {
    if (!strcasecmp(v, "FP32")) return RKNN_TENSOR_FLOAT32;
    if (!strcasecmp(v, "FP16")) return RKNN_TENSOR_FLOAT16;
    return parse_enum(v, type_names, RKNN_TENSOR_TYPE_MAX, "RKNN_TENSOR_");
}
static int parse_qnt(const char *v) {
    if (!strcasecmp(v, "AFFINE")) return RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC;
    return parse_enum(v, qnt_names, RKNN_TENSOR_QNT_MAX, "RKNN_TENSOR_QNT_");
}

/* FP16 <-> float32, round to nearest even (like numpy's float32 -> float16). */
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        int shift = 14 - e;
        uint32_t h = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* may carry into the exponent: still right */
    return (uint16_t)(sign | h);
}
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
    if (exp == 0) {
        if (!mant) x = sign;
        else {
            int e = -1;
            do { e++; mant <<= 1; } while (!(mant & 0x400u));
            x = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) x = sign | 0x7f800000u | (mant << 13);
    else x = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* Element i of a buffer of `type`, as a number. */
static double read_elem(const uint8_t *p, int type, size_t i) {
    switch (type) {
    case RKNN_TENSOR_FLOAT32: { float v; memcpy(&v, p + 4 * i, 4); return v; }
    case RKNN_TENSOR_FLOAT16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return half_to_float(v); }
    case RKNN_TENSOR_INT8: return (int8_t)p[i];
    case RKNN_TENSOR_UINT8: return p[i];
    case RKNN_TENSOR_BOOL: return p[i] != 0;
    case RKNN_TENSOR_INT16: { int16_t v; memcpy(&v, p + 2 * i, 2); return v; }
    case RKNN_TENSOR_UINT16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return v; }
    case RKNN_TENSOR_INT32: { int32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    case RKNN_TENSOR_UINT32: { uint32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    case RKNN_TENSOR_INT64: { int64_t v; memcpy(&v, p + 8 * i, 8); return (double)v; }
    case RKNN_TENSOR_BFLOAT16: {
        uint16_t v; memcpy(&v, p + 2 * i, 2);
        uint32_t x = (uint32_t)v << 16; float f; memcpy(&f, &x, 4); return f;
    }
    case RKNN_TENSOR_INT4: { int nib = (p[i / 2] >> (i % 2 ? 4 : 0)) & 0xf; return nib >= 8 ? nib - 16 : nib; }
    default: return 0;
    }
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

static void sleep_ms(long ms) {
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}
static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ------------------------------------------------------------------ the fake model */

typedef struct {
    char profile[64];
    char platform[32];
    uint32_t n_in, n_out;
    rknn_tensor_attr in[MAX_IO], out[MAX_IO];
    char custom[1024];
    int npu_cores;
    uint32_t weight_size;
    long load_ms, run_ms;
    char fail[256], crash[256];
} Spec;

typedef struct {
    const char *name, *in_name;
    uint32_t in_dims[4];
    int in_fmt, in_type, in_qnt, in_zp;
    float in_scale;
    uint32_t n_out, out_n_dims, out_dims[3];
    int out_type, out_qnt, out_zp;
    float out_scale;
} Profile;

#define AFF RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC
static const Profile profiles[] = {
    {"qwen2vl-2b", "pixel", {1, 392, 392, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     1, 2, {196, 1536, 0}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"qwen2.5vl-3b", "pixel", {1, 392, 392, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     1, 2, {196, 2048, 0}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"qwen3vl-2b", "pixel", {1, 448, 448, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     4, 2, {196, 2048, 0}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"internvl3-1b", "pixel_values", {1, 448, 448, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     1, 3, {1, 256, 896}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"minicpmv", "pixel", {1, 448, 448, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     1, 3, {1, 64, 3584}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"tiny", "pixel", {1, 28, 28, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     1, 2, {4, 8, 0}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"tiny-deepstack", "pixel", {1, 32, 32, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     4, 2, {4, 8, 0}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"tiny-nchw", "pixel", {1, 3, 28, 28}, RKNN_TENSOR_NCHW, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f,
     1, 3, {1, 4, 8}, RKNN_TENSOR_FLOAT16, AFF, 0, 1.0f},
    {"tiny-int8", "input", {1, 8, 8, 3}, RKNN_TENSOR_NHWC, RKNN_TENSOR_INT8, AFF, -128, 0.0078125f,
     1, 2, {4, 8, 0}, RKNN_TENSOR_INT8, AFF, -10, 0.05f},
};
#undef AFF

/* H, W, C of a tensor as the output formula sees it. */
static void image_shape(const rknn_tensor_attr *a, uint32_t *H, uint32_t *W, uint32_t *C) {
    if (a->n_dims == 4 && a->fmt == RKNN_TENSOR_NCHW) { *C = a->dims[1]; *H = a->dims[2]; *W = a->dims[3]; }
    else if (a->n_dims == 4) { *H = a->dims[1]; *W = a->dims[2]; *C = a->dims[3]; }
    else { *H = 1; *W = a->n_elems; *C = 1; }
}

/* n_elems, size, strides from dims, type and role. Returns false if the shape is unusable. */
static bool derive(rknn_tensor_attr *a, bool input) {
    if (a->n_dims == 0 || a->n_dims > RKNN_MAX_DIMS) return false;
    uint64_t n = 1;
    for (uint32_t i = 0; i < RKNN_MAX_DIMS; i++) {
        if (i >= a->n_dims) { a->dims[i] = 0; continue; }
        if (a->dims[i] == 0) return false;
        n *= a->dims[i];
    }
    uint64_t size = bytes_for(n, a->type);
    if (n > 0x7fffffffu || size > 0x7fffffffu || elem_size_x2(a->type) < 0) return false;
    a->n_elems = (uint32_t)n;
    a->size = (uint32_t)size;
    uint32_t H, W, C;
    image_shape(a, &H, &W, &C);
    a->w_stride = input && a->n_dims == 4 ? W : 0;
    a->size_with_stride = a->size;
    a->h_stride = 0;
    a->fl = 0;
    a->pass_through = 0;
    return true;
}

static bool parse_dims(const char *v, rknn_tensor_attr *a) {
    uint32_t n = 0;
    const char *p = v;
    while (*p) {
        while (*p == '[' || *p == ']' || *p == ',' || isspace((unsigned char)*p)) p++;
        if (!*p) break;
        char *end;
        unsigned long d = strtoul(p, &end, 10);
        if (end == p || n >= RKNN_MAX_DIMS || d == 0 || d > 0x7fffffffUL) return false;
        a->dims[n++] = (uint32_t)d;
        p = end;
    }
    a->n_dims = n;
    return n > 0;
}

static void set_attr(rknn_tensor_attr *a, uint32_t index, const char *name, uint32_t n_dims, const uint32_t *dims,
                     int fmt, int type, int qnt, int zp, float scale) {
    memset(a, 0, sizeof *a);
    a->index = index;
    snprintf(a->name, sizeof a->name, "%s", name);
    a->n_dims = n_dims;
    for (uint32_t i = 0; i < n_dims; i++) a->dims[i] = dims[i];
    a->fmt = (rknn_tensor_format)fmt;
    a->type = (rknn_tensor_type)type;
    a->qnt_type = (rknn_tensor_qnt_type)qnt;
    a->zp = zp;
    a->scale = scale;
}

static void strip(char *s) {
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = 0;
    char *b = s;
    while (isspace((unsigned char)*b)) b++;
    if (b != s) memmove(s, b, strlen(b) + 1);
}

/* Parse the fake model text; on failure, log why and return false. */
static bool parse_model(const char *text, Spec *sp) {
    const char *magic = "FAKE-RKNN";
    if (strncmp(text, magic, strlen(magic)) != 0) {
        rknn_log('E', "parseRKNN: invalid RKNN_MAGIC!");
        return false;
    }
    char *copy = strdup(text), *save = NULL;
    char *first = strtok_r(copy, "\n", &save); /* the magic line */
    (void)first;
    /* First pass: the profile. */
    char profile[64] = "tiny";
    char *lines[256];
    int n_lines = 0;
    for (char *line = strtok_r(NULL, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        strip(line);
        if (!*line) continue;
        if (n_lines >= 256) { rknn_log('E', "fake model: too many lines"); free(copy); return false; }
        lines[n_lines++] = line;
        char *eq = strchr(line, '=');
        if (!eq) { rknn_log('E', "fake model: line without '=': %s", line); free(copy); return false; }
        char key[64];
        snprintf(key, sizeof key, "%.*s", (int)(eq - line), line);
        strip(key);
        if (!strcmp(key, "profile")) { snprintf(profile, sizeof profile, "%s", eq + 1); strip(profile); }
    }
    const Profile *pr = NULL;
    for (size_t i = 0; i < sizeof profiles / sizeof profiles[0]; i++)
        if (!strcmp(profiles[i].name, profile)) pr = &profiles[i];
    if (!pr) { rknn_log('E', "fake model: unknown profile '%s'", profile); free(copy); return false; }
    memset(sp, 0, sizeof *sp);
    snprintf(sp->profile, sizeof sp->profile, "%s", pr->name);
    snprintf(sp->platform, sizeof sp->platform, "rk3588");
    sp->npu_cores = 3;
    sp->weight_size = 4u << 20;
    sp->n_in = 1;
    sp->n_out = pr->n_out;
    set_attr(&sp->in[0], 0, pr->in_name, 4, pr->in_dims, pr->in_fmt, pr->in_type, pr->in_qnt, pr->in_zp, pr->in_scale);
    set_attr(&sp->out[0], 0, "output0", pr->out_n_dims, pr->out_dims, pr->out_n_dims == 4 ? RKNN_TENSOR_NCHW : RKNN_TENSOR_UNDEFINED,
             pr->out_type, pr->out_qnt, pr->out_zp, pr->out_scale);
    bool nchw = false, ok = true;
    for (int i = 0; i < n_lines && ok; i++) {
        char *eq = strchr(lines[i], '=');
        *eq = 0;
        char *key = lines[i], *v = eq + 1;
        strip(key);
        strip(v);
        rknn_tensor_attr *in = &sp->in[0], *out = &sp->out[0];
        int e;
        if (!strcmp(key, "profile")) continue;
        else if (!strcmp(key, "input_name")) snprintf(in->name, sizeof in->name, "%s", v);
        else if (!strcmp(key, "input_dims")) ok = parse_dims(v, in);
        else if (!strcmp(key, "input_fmt")) { ok = (e = parse_enum(v, fmt_names, 4, "RKNN_TENSOR_")) >= 0; in->fmt = (rknn_tensor_format)e; }
        else if (!strcmp(key, "input_type")) { ok = (e = parse_type(v)) >= 0 && e < RKNN_TENSOR_TYPE_MAX; in->type = (rknn_tensor_type)e; }
        else if (!strcmp(key, "input_qnt")) { ok = (e = parse_qnt(v)) >= 0 && e < RKNN_TENSOR_QNT_MAX; in->qnt_type = (rknn_tensor_qnt_type)e; }
        else if (!strcmp(key, "input_zp")) in->zp = atoi(v);
        else if (!strcmp(key, "input_scale")) in->scale = strtof(v, NULL);
        else if (!strcmp(key, "n_inputs")) { sp->n_in = (uint32_t)atoi(v); ok = sp->n_in >= 1 && sp->n_in <= MAX_IO; }
        else if (!strcmp(key, "layout")) { nchw = !strcasecmp(v, "NCHW"); ok = nchw || !strcasecmp(v, "NHWC"); }
        else if (!strcmp(key, "output_dims")) ok = parse_dims(v, out);
        else if (!strcmp(key, "output_fmt")) { ok = (e = parse_enum(v, fmt_names, 4, "RKNN_TENSOR_")) >= 0; out->fmt = (rknn_tensor_format)e; }
        else if (!strcmp(key, "output_type")) {
            e = parse_type(v);
            ok = e == RKNN_TENSOR_FLOAT32 || e == RKNN_TENSOR_FLOAT16 || e == RKNN_TENSOR_INT8 || e == RKNN_TENSOR_UINT8;
            out->type = (rknn_tensor_type)e;
        }
        else if (!strcmp(key, "output_qnt")) { ok = (e = parse_qnt(v)) >= 0 && e < RKNN_TENSOR_QNT_MAX; out->qnt_type = (rknn_tensor_qnt_type)e; }
        else if (!strcmp(key, "output_zp")) out->zp = atoi(v);
        else if (!strcmp(key, "output_scale")) out->scale = strtof(v, NULL);
        else if (!strcmp(key, "n_outputs")) { sp->n_out = (uint32_t)atoi(v); ok = sp->n_out >= 1 && sp->n_out <= MAX_IO; }
        else if (!strcmp(key, "custom_string")) snprintf(sp->custom, sizeof sp->custom, "%s", v);
        else if (!strcmp(key, "npu_cores")) { sp->npu_cores = atoi(v); ok = sp->npu_cores >= 1 && sp->npu_cores <= 3; }
        else if (!strcmp(key, "platform")) snprintf(sp->platform, sizeof sp->platform, "%s", v);
        else if (!strcmp(key, "weight_size")) sp->weight_size = (uint32_t)strtoul(v, NULL, 0);
        else if (!strcmp(key, "load_ms")) sp->load_ms = atol(v);
        else if (!strcmp(key, "run_ms")) sp->run_ms = atol(v);
        else if (!strcmp(key, "fail")) snprintf(sp->fail, sizeof sp->fail, "%s", v);
        else if (!strcmp(key, "crash")) snprintf(sp->crash, sizeof sp->crash, "%s", v);
        else { rknn_log('E', "fake model: unknown key '%s'", key); ok = false; break; }
        if (!ok) rknn_log('E', "fake model: bad value for %s: '%s'", key, v);
    }
    free(copy);
    if (!ok) return false;
    rknn_tensor_attr *in = &sp->in[0];
    if (nchw && in->n_dims == 4 && in->fmt == RKNN_TENSOR_NHWC) {
        uint32_t H = in->dims[1], W = in->dims[2], C = in->dims[3];
        in->dims[1] = C; in->dims[2] = H; in->dims[3] = W;
        in->fmt = RKNN_TENSOR_NCHW;
    }
    if (!derive(in, true) || !derive(&sp->out[0], false)) { rknn_log('E', "fake model: bad tensor shape or type"); return false; }
    for (uint32_t i = 1; i < sp->n_in; i++) {
        sp->in[i] = sp->in[0];
        sp->in[i].index = i;
        snprintf(sp->in[i].name, sizeof sp->in[i].name, "%.200s_%u", sp->in[0].name, i);
    }
    for (uint32_t j = 1; j < sp->n_out; j++) {
        sp->out[j] = sp->out[0];
        sp->out[j].index = j;
        snprintf(sp->out[j].name, sizeof sp->out[j].name, "output%u", j);
    }
    return true;
}

/* Is `fn` one of the comma-separated names in `list`? */
static bool listed(const char *list, const char *fn) {
    if (!list) return false;
    size_t n = strlen(fn);
    for (const char *p = list; (p = strstr(p, fn)) != NULL; p += n) {
        bool start = p == list || p[-1] == ',' || p[-1] == ' ';
        bool end = p[n] == 0 || p[n] == ',' || p[n] == ' ';
        if (start && end) return true;
    }
    return false;
}

/* ------------------------------------------------------------------ contexts */

#define MAX_CTX 1024
#if defined(__arm__)
#define CTX_BASE 0x52000000u
#else
#define CTX_BASE 0x524b4e4e00000000ull /* "RKNN": above 2^32, so a binding that truncates the handle fails */
#endif

typedef struct {
    rknn_context value;
    Spec spec;
    uint32_t flag;
    pthread_mutex_t lock;
    int core_mask;
    int batch_core_num;
    bool input_set[MAX_IO];
    double *pixels; /* input 0 as [H][W][C] */
    uint32_t H, W, C;
    bool have_run;
    float *results[MAX_IO]; /* float32 values of each output of the last run */
    uint64_t frame_id;
    int64_t last_run_us;
    char perf_detail[256];
    struct { void *p; size_t n; } *bufs; /* output buffers handed out and not released */
    size_t n_bufs, cap_bufs;
} Ctx;

static Ctx *contexts[MAX_CTX];
static uint64_t next_ctx_serial = 1;
static pthread_mutex_t contexts_lock = PTHREAD_MUTEX_INITIALIZER;

static bool injected(const Ctx *c, const char *fn) {
    if (listed(getenv("FAKE_RKNN_CRASH"), fn) || (c && listed(c->spec.crash, fn))) raise(SIGSEGV);
    if (listed(getenv("FAKE_RKNN_FAIL"), fn) || (c && listed(c->spec.fail, fn))) {
        rknn_log('E', "%s: failure requested (fake)", fn);
        return true;
    }
    return false;
}

typedef enum { LOCK_OK, LOCK_NO_CTX, LOCK_BUSY } LockResult;

/* Find and lock a context; a context already in use by another thread is a binding bug ("failed to submit"). */
static LockResult acquire(rknn_context value, Ctx **out) {
    *out = NULL;
    pthread_mutex_lock(&contexts_lock);
    Ctx *c = NULL;
    for (int i = 0; i < MAX_CTX; i++)
        if (contexts[i] && contexts[i]->value == value) { c = contexts[i]; break; }
    LockResult r = LOCK_NO_CTX;
    if (c) r = pthread_mutex_trylock(&c->lock) == 0 ? LOCK_OK : LOCK_BUSY;
    pthread_mutex_unlock(&contexts_lock);
    if (r == LOCK_OK) *out = c;
    return r;
}
static void release_ctx(Ctx *c) { pthread_mutex_unlock(&c->lock); }

/* The code for a failed acquire, logged like the runtime would. */
static int acquire_error(LockResult r, const char *fn) {
    if (r == LOCK_BUSY) {
        count("rknn_concurrent_use");
        rknn_log('E', "%s: failed to submit!, the context is in use by another thread", fn);
        return RKNN_ERR_FAIL;
    }
    rknn_log('E', "%s: invalid context!", fn);
    return RKNN_ERR_CTX_INVALID;
}

static Ctx *new_ctx(const Spec *spec, uint32_t flag) {
    Ctx *c = calloc(1, sizeof *c);
    c->spec = *spec;
    c->flag = flag;
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_lock(&contexts_lock);
    int slot = -1;
    for (int i = 0; i < MAX_CTX; i++)
        if (!contexts[i]) { slot = i; break; }
    if (slot < 0) { pthread_mutex_unlock(&contexts_lock); free(c); return NULL; }
    c->value = (rknn_context)(CTX_BASE + next_ctx_serial++);
    contexts[slot] = c;
    pthread_mutex_unlock(&contexts_lock);
    pthread_mutex_lock(&records_lock);
    live_contexts++;
    pthread_mutex_unlock(&records_lock);
    return c;
}

static void poison_free(void *p, size_t n) {
    if (!p) return;
    memset(p, 0xff, n); /* a binding that reads after rknn_outputs_release sees NaNs */
    free(p);
}

/* ------------------------------------------------------------------ rknn_init, rknn_dup_context, rknn_destroy */

static char *read_model_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 20; /* a fake model is text; the magic is all that matters in anything bigger */
    char *buf = malloc(cap + 1);
    *len = fread(buf, 1, cap, f);
    fclose(f);
    buf[*len] = 0;
    return buf;
}

static void log_init_banner(const Ctx *c) {
    rknn_log('I', "RKNN Runtime Information, librknnrt version: %s", FAKE_RKNN_API_VERSION);
    const char *drv = getenv("FAKE_RKNN_DRV_VERSION");
    rknn_log('I', "RKNN Driver Information, version: %s", drv && *drv ? drv : FAKE_RKNN_DRV_VERSION);
    rknn_log('I', "RKNN Model Information, version: 6, toolkit version: 2.3.2(fake profile %s), target: %s, "
             "target platform: %s, framework name: ONNX, framework layout: NCHW, model inference type: static_shape",
             c->spec.profile, c->spec.platform, c->spec.platform);
}

static int do_init(jbuf *b, rknn_context *context, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend) {
    if (injected(NULL, "rknn_init")) return RKNN_ERR_MODEL_INVALID;
    if (!context) { rknn_log('E', "rknn_init, context == nullptr!"); return RKNN_ERR_PARAM_INVALID; }
    if (!model) { rknn_log('E', "rknn_init, model == nullptr!"); rknn_log('E', "rknn_init, load model failed!"); return RKNN_ERR_MODEL_INVALID; }
    char *text;
    size_t len;
    if (size == 0) {
        text = read_model_file((const char *)model, &len);
        if (!text) {
            rknn_log('E', "rknn_init, open model file failed: %s", (const char *)model);
            rknn_log('E', "rknn_init, load model failed!");
            return RKNN_ERR_MODEL_INVALID;
        }
    } else {
        len = size;
        text = malloc(len + 1);
        memcpy(text, model, len); /* without MODEL_BUFFER_ZERO_COPY the runtime copies: the caller may free */
        text[len] = 0;
    }
    jb_uint(b, "model_bytes", len);
    jb_key(b, "model_fnv1a");
    jb_raw(b, "\"%016llx\"", (unsigned long long)fnv1a((const uint8_t *)text, len));
    if (extend && extend->real_model_size > 0) {
        size_t off = extend->real_model_offset > 0 ? (size_t)extend->real_model_offset : 0;
        if (off > len || extend->real_model_size > len - off) {
            free(text);
            rknn_log('E', "rknn_init, real_model_offset/real_model_size out of range!");
            return RKNN_ERR_MODEL_INVALID;
        }
        memmove(text, text + off, extend->real_model_size);
        text[extend->real_model_size] = 0;
    }
    Spec spec;
    bool ok = parse_model(text, &spec);
    free(text);
    if (!ok) { rknn_log('E', "rknn_init, load model failed!"); return RKNN_ERR_MODEL_INVALID; }
    jb_str(b, "profile", spec.profile);
    if (listed(getenv("FAKE_RKNN_CRASH"), "rknn_init") || listed(spec.crash, "rknn_init")) raise(SIGSEGV);
    if (listed(spec.fail, "rknn_init")) { rknn_log('E', "rknn_init, load model failed! (fake failure requested)"); return RKNN_ERR_MODEL_INVALID; }
    if (flag & RKNN_FLAG_SHARE_WEIGHT_MEM) {
        Ctx *other = NULL;
        LockResult r = extend ? acquire(extend->ctx, &other) : LOCK_NO_CTX;
        if (r != LOCK_OK) {
            rknn_log('E', "rknn_init, RKNN_FLAG_SHARE_WEIGHT_MEM needs a valid rknn_init_extend.ctx!");
            return RKNN_ERR_PARAM_INVALID;
        }
        release_ctx(other);
    }
    long load_ms = spec.load_ms;
    if (getenv("FAKE_RKNN_LOAD_MS")) load_ms = atol(getenv("FAKE_RKNN_LOAD_MS"));
    sleep_ms(load_ms);
    Ctx *c = new_ctx(&spec, flag);
    if (!c) { rknn_log('E', "rknn_init, too many contexts"); return RKNN_ERR_MALLOC_FAIL; }
    log_init_banner(c);
    *context = c->value;
    jb_uint(b, "ctx", c->value);
    count("rknn_context_created");
    return RKNN_SUCC;
}

EXPORT int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_bool(&b, "context_ptr", context != NULL);
    jb_int(&b, "pid", (int)getpid());  /* which process opened it (the vision model's worker) */
    jb_str(&b, "model", !model ? NULL : size == 0 ? "path" : "buffer");
    if (model && size == 0) jb_str(&b, "path", (const char *)model);
    jb_uint(&b, "size", size);
    jb_uint(&b, "flag", flag);
    if (extend) {
        jb_open(&b, "extend");
        jb_uint(&b, "ctx", extend->ctx);
        jb_int(&b, "real_model_offset", extend->real_model_offset);
        jb_uint(&b, "real_model_size", extend->real_model_size);
        jb_int(&b, "model_buffer_fd", extend->model_buffer_fd);
        jb_uint(&b, "model_buffer_flags", extend->model_buffer_flags);
        int nonzero = 0;
        for (size_t i = 0; i < sizeof extend->reserved; i++) nonzero += extend->reserved[i] != 0;
        jb_int(&b, "reserved_nonzero", nonzero);
        jb_close(&b);
    } else jb_null(&b, "extend");
    return finish("rknn_init", &b, do_init(&b, context, model, size, flag, extend));
}

EXPORT int rknn_dup_context(rknn_context *context_in, rknn_context *context_out) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_bool(&b, "context_in_ptr", context_in != NULL);
    jb_bool(&b, "context_out_ptr", context_out != NULL);
    if (context_in) jb_uint(&b, "context_in", *context_in);
    if (injected(NULL, "rknn_dup_context")) return finish("rknn_dup_context", &b, RKNN_ERR_FAIL);
    if (!context_in || !context_out) {
        rknn_log('E', "rknn_dup_context, context_in or context_out == nullptr!");
        return finish("rknn_dup_context", &b, RKNN_ERR_PARAM_INVALID);
    }
    Ctx *c;
    LockResult r = acquire(*context_in, &c);
    if (r != LOCK_OK) return finish("rknn_dup_context", &b, acquire_error(r, "rknn_dup_context"));
    Spec spec = c->spec;
    uint32_t flag = c->flag;
    release_ctx(c);
    Ctx *d = new_ctx(&spec, flag);
    if (!d) return finish("rknn_dup_context", &b, RKNN_ERR_MALLOC_FAIL);
    *context_out = d->value;
    jb_uint(&b, "context_out", d->value);
    count("rknn_context_created");
    return finish("rknn_dup_context", &b, RKNN_SUCC);
}

EXPORT int rknn_destroy(rknn_context context) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    Ctx *c = NULL;
    pthread_mutex_lock(&contexts_lock);
    int slot = -1;
    for (int i = 0; i < MAX_CTX; i++)
        if (contexts[i] && contexts[i]->value == context) { slot = i; break; }
    LockResult r = slot < 0 ? LOCK_NO_CTX : pthread_mutex_trylock(&contexts[slot]->lock) == 0 ? LOCK_OK : LOCK_BUSY;
    if (r == LOCK_OK) { c = contexts[slot]; contexts[slot] = NULL; }
    pthread_mutex_unlock(&contexts_lock);
    if (r != LOCK_OK) return finish("rknn_destroy", &b, acquire_error(r, "rknn_destroy"));
    jb_uint(&b, "unreleased_outputs", c->n_bufs);
    if (c->n_bufs) {
        rknn_log('W', "rknn_destroy: %zu output buffer(s) from rknn_outputs_get were never released", c->n_bufs);
        for (size_t i = 0; i < c->n_bufs; i++) { free(c->bufs[i].p); count("rknn_output_leaked_at_destroy"); }
    }
    free(c->bufs);
    free(c->pixels);
    for (int j = 0; j < MAX_IO; j++) free(c->results[j]);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_destroy(&c->lock);
    free(c);
    pthread_mutex_lock(&records_lock);
    live_contexts--;
    pthread_mutex_unlock(&records_lock);
    count("rknn_destroyed_context");
    return finish("rknn_destroy", &b, RKNN_SUCC);
}

/* ------------------------------------------------------------------ rknn_query */

/* The struct size each command needs (MEM_SIZE: the 8-byte struct of SDK <= 1.3 is accepted). */
static uint32_t query_size(int cmd, const char **sname) {
    switch (cmd) {
    case RKNN_QUERY_IN_OUT_NUM: *sname = "rknn_input_output_num"; return sizeof(rknn_input_output_num);
    case RKNN_QUERY_PERF_DETAIL: *sname = "rknn_perf_detail"; return sizeof(rknn_perf_detail);
    case RKNN_QUERY_PERF_RUN: *sname = "rknn_perf_run"; return sizeof(rknn_perf_run);
    case RKNN_QUERY_SDK_VERSION: *sname = "rknn_sdk_version"; return sizeof(rknn_sdk_version);
    case RKNN_QUERY_MEM_SIZE: *sname = NULL; return 8;
    case RKNN_QUERY_CUSTOM_STRING: *sname = "rknn_custom_string"; return sizeof(rknn_custom_string);
    case RKNN_QUERY_DEVICE_MEM_INFO: *sname = "rknn_tensor_mem"; return sizeof(rknn_tensor_mem);
    case RKNN_QUERY_INPUT_DYNAMIC_RANGE: *sname = "rknn_input_range"; return sizeof(rknn_input_range);
    default: *sname = "rknn_tensor_attr"; return sizeof(rknn_tensor_attr);
    }
}

static int do_query(jbuf *b, Ctx *c, int cmd, void *info, uint32_t size) {
    if (injected(c, "rknn_query")) return RKNN_ERR_FAIL;
    if (cmd < 0 || cmd >= RKNN_QUERY_CMD_MAX) {
        rknn_log('E', "rknn_query, cmd = %d is not in [0, %d]!", cmd, RKNN_QUERY_CMD_MAX - 1);
        return RKNN_ERR_PARAM_INVALID;
    }
    if (!info) { rknn_log('E', "rknn_query, info == nullptr!"); return RKNN_ERR_PARAM_INVALID; }
    const char *sname;
    uint32_t need = query_size(cmd, &sname);
    if (size < need) {
        if (sname) rknn_log('E', "rknn_query, info_len(%u) < sizeof(%s)(%u)!", size, sname, need);
        else rknn_log('E', "rknn_query, info_len(%u) < 8!", size);
        return RKNN_ERR_PARAM_INVALID;
    }
    if ((c->flag & RKNN_FLAG_COLLECT_MODEL_INFO_ONLY) && cmd != RKNN_QUERY_MEM_SIZE) {
        rknn_log('E', "rknn_query, cmd = %d is denied if set RKNN_FLAG_COLLECT_MODEL_INFO_ONLY flag!", cmd);
        return RKNN_ERR_PARAM_INVALID;
    }
    const Spec *sp = &c->spec;
    switch (cmd) {
    case RKNN_QUERY_IN_OUT_NUM: {
        rknn_input_output_num *io = info;
        io->n_input = sp->n_in;
        io->n_output = sp->n_out;
        return RKNN_SUCC;
    }
    case RKNN_QUERY_INPUT_ATTR: case RKNN_QUERY_OUTPUT_ATTR: case RKNN_QUERY_NATIVE_INPUT_ATTR:
    case RKNN_QUERY_NATIVE_OUTPUT_ATTR: case RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR: case RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR: {
        rknn_tensor_attr *a = info;
        bool input = cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_NATIVE_INPUT_ATTR || cmd == RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR;
        uint32_t index = a->index, n = input ? sp->n_in : sp->n_out;
        jb_uint(b, "index", index);
        if (index >= n) {
            rknn_log('E', "%s, p_attr->index(%u) >= %s_num(%u)!", cmd_names[cmd], index, input ? "input" : "output", n);
            return RKNN_ERR_PARAM_INVALID;
        }
        *a = input ? sp->in[index] : sp->out[index];
        if (cmd == RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR && a->n_dims == 4 && a->fmt == RKNN_TENSOR_NCHW) {
            uint32_t C = a->dims[1], H = a->dims[2], W = a->dims[3];
            a->dims[1] = H; a->dims[2] = W; a->dims[3] = C;
            a->fmt = RKNN_TENSOR_NHWC;
        }
        return RKNN_SUCC;
    }
    case RKNN_QUERY_PERF_DETAIL: {
        if (!(c->flag & RKNN_FLAG_COLLECT_PERF_MASK)) {
            rknn_log('E', "rknn_query, RKNN_QUERY_PERF_DETAIL needs RKNN_FLAG_COLLECT_PERF_MASK at rknn_init!");
            return RKNN_ERR_PARAM_INVALID;
        }
        rknn_perf_detail *d = info;
        d->perf_data = c->perf_detail; /* owned by the context */
        d->data_len = strlen(c->perf_detail);
        return RKNN_SUCC;
    }
    case RKNN_QUERY_PERF_RUN:
        ((rknn_perf_run *)info)->run_duration = c->last_run_us;
        return RKNN_SUCC;
    case RKNN_QUERY_SDK_VERSION: {
        rknn_sdk_version *v = info;
        memset(v, 0, sizeof *v);
        const char *drv = getenv("FAKE_RKNN_DRV_VERSION");
        snprintf(v->api_version, sizeof v->api_version, "%s", FAKE_RKNN_API_VERSION);
        snprintf(v->drv_version, sizeof v->drv_version, "%s", drv && *drv ? drv : FAKE_RKNN_DRV_VERSION);
        return RKNN_SUCC;
    }
    case RKNN_QUERY_MEM_SIZE: {
        /* Test values: internal = every tensor's bytes, dma = weight + internal rounded up to 4 KiB. */
        rknn_mem_size m;
        memset(&m, 0, sizeof m);
        uint64_t internal = 0;
        for (uint32_t i = 0; i < sp->n_in; i++) internal += sp->in[i].size;
        for (uint32_t j = 0; j < sp->n_out; j++) internal += sp->out[j].size;
        m.total_weight_size = sp->weight_size;
        m.total_internal_size = (uint32_t)internal;
        m.total_dma_allocated_size = ((uint64_t)sp->weight_size + internal + 4095) / 4096 * 4096;
        memcpy(info, &m, size >= sizeof m ? sizeof m : 8);
        return RKNN_SUCC;
    }
    case RKNN_QUERY_CUSTOM_STRING: {
        rknn_custom_string *s = info;
        memset(s, 0, sizeof *s);
        snprintf(s->string, sizeof s->string, "%s", sp->custom);
        return RKNN_SUCC;
    }
    case RKNN_QUERY_DEVICE_MEM_INFO:
        rknn_log('E', "rknn_query, unsupported cmd(%d)!", cmd); /* not on RK3588/RK3576 (PDF Table 4-2) */
        return RKNN_ERR_PARAM_INVALID;
    default: /* 13-17: dynamic-shape models only */
        rknn_log('E', "rknn_query, %s is only for dynamic shape models!", cmd_names[cmd]);
        return RKNN_ERR_PARAM_INVALID;
    }
}

EXPORT int rknn_query(rknn_context context, rknn_query_cmd cmd, void *info, uint32_t size) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_int(&b, "cmd", (int)cmd);
    jb_str(&b, "cmd_name", (int)cmd >= 0 && (int)cmd < RKNN_QUERY_CMD_MAX ? cmd_names[cmd] : NULL);
    jb_bool(&b, "info", info != NULL);
    jb_uint(&b, "size", size);
    if ((int)cmd >= 0 && (int)cmd < RKNN_QUERY_CMD_MAX) count(cmd_names[cmd]);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_query", &b, acquire_error(r, "rknn_query"));
    int ret = do_query(&b, c, (int)cmd, info, size);
    release_ctx(c);
    return finish("rknn_query", &b, ret);
}

/* ------------------------------------------------------------------ rknn_inputs_set */

static void dump_input(const Ctx *c, const rknn_input *in) {
    const char *dir = getenv("FAKE_RKNN_DUMP_DIR");
    if (!dir || !*dir) return;
    char path[4096], tmp[4096];
    snprintf(tmp, sizeof tmp, "%s/input%u.bin.%d", dir, in->index, (int)getpid());
    snprintf(path, sizeof path, "%s/input%u.bin", dir, in->index);
    FILE *f = fopen(tmp, "wb");
    if (f) { fwrite(in->buf, 1, in->size, f); fclose(f); rename(tmp, path); }
    snprintf(tmp, sizeof tmp, "%s/input%u.json.%d", dir, in->index, (int)getpid());
    snprintf(path, sizeof path, "%s/input%u.json", dir, in->index);
    f = fopen(tmp, "w");
    if (f) {
        fprintf(f, "{\"ctx\":%llu,\"index\":%u,\"size\":%u,\"pass_through\":%u,\"type\":%d,\"fmt\":%d}",
                (unsigned long long)c->value, in->index, in->size, in->pass_through, (int)in->type, (int)in->fmt);
        fclose(f);
        rename(tmp, path);
    }
}

/* Decode input 0 into c->pixels ([H][W][C] doubles) from `type`/`fmt` buffers. */
static void decode_pixels(Ctx *c, const uint8_t *buf, int type, int fmt) {
    const rknn_tensor_attr *a = &c->spec.in[0];
    uint32_t H, W, C;
    image_shape(a, &H, &W, &C);
    free(c->pixels);
    c->pixels = malloc((size_t)H * W * C * sizeof(double));
    c->H = H; c->W = W; c->C = C;
    bool nchw = a->n_dims == 4 && fmt == RKNN_TENSOR_NCHW;
    for (uint32_t y = 0; y < H; y++)
        for (uint32_t x = 0; x < W; x++)
            for (uint32_t k = 0; k < C; k++) {
                size_t src = nchw ? ((size_t)k * H + y) * W + x : ((size_t)y * W + x) * C + k;
                c->pixels[((size_t)y * W + x) * C + k] = read_elem(buf, type, src);
            }
}

static int do_inputs_set(jbuf *b, Ctx *c, uint32_t n_inputs, rknn_input *inputs) {
    const Spec *sp = &c->spec;
    jb_open_list(b, "inputs");
    for (uint32_t i = 0; inputs && i < n_inputs && i < 64; i++) {
        const rknn_input *in = &inputs[i];
        jb_open(b, NULL);
        jb_uint(b, "index", in->index);
        jb_bool(b, "buf", in->buf != NULL);
        jb_uint(b, "size", in->size);
        jb_uint(b, "pass_through", in->pass_through);
        jb_int(b, "type", (int)in->type);
        jb_int(b, "fmt", (int)in->fmt);
        if (in->buf) {
            jb_key(b, "fnv1a");
            jb_raw(b, "\"%016llx\"", (unsigned long long)fnv1a(in->buf, in->size));
            jb_open_list(b, "head");
            for (uint32_t k = 0; k < in->size && k < 16; k++) jb_raw(b, k ? ",%u" : "%u", ((const uint8_t *)in->buf)[k]);
            jb_close_list(b);
        }
        jb_close(b);
    }
    jb_close_list(b);
    if (injected(c, "rknn_inputs_set")) return RKNN_ERR_FAIL;
    if (c->flag & RKNN_FLAG_COLLECT_MODEL_INFO_ONLY) {
        rknn_log('E', "rknn_inputs_set is denied if set RKNN_FLAG_COLLECT_MODEL_INFO_ONLY flag!");
        return RKNN_ERR_PARAM_INVALID;
    }
    if (!inputs) { rknn_log('E', "rknn_inputs_set, inputs == nullptr!"); return RKNN_ERR_PARAM_INVALID; }
    if (n_inputs > sp->n_in) {
        rknn_log('E', "rknn_inputs_set, param input num(%u) > model input num(%u)", n_inputs, sp->n_in);
        return RKNN_ERR_PARAM_INVALID;
    }
    if (n_inputs != sp->n_in) {
        rknn_log('E', "rknn_inputs_set, param input num(%u) != model input num(%u)", n_inputs, sp->n_in);
        return RKNN_ERR_PARAM_INVALID;
    }
    /* Check everything before changing anything. */
    for (uint32_t i = 0; i < n_inputs; i++) {
        const rknn_input *in = &inputs[i];
        if (in->index >= sp->n_in) {
            rknn_log('E', "rknn_inputs_set, input index(%u) >= model input num(%u)", in->index, sp->n_in);
            return RKNN_ERR_PARAM_INVALID;
        }
        if (!in->buf) { rknn_log('E', "rknn_inputs_set, input[%u].buf == nullptr!", i); return RKNN_ERR_PARAM_INVALID; }
        const rknn_tensor_attr *a = &sp->in[in->index];
        uint64_t need;
        if (in->pass_through) need = a->size;
        else {
            if ((int)in->type < 0 || (int)in->type >= RKNN_TENSOR_TYPE_MAX) {
                rknn_log('E', "rknn_inputs_set, invalid input type(%d)!", (int)in->type);
                return RKNN_ERR_PARAM_INVALID;
            }
            if (a->n_dims == 4 && in->fmt != RKNN_TENSOR_NCHW && in->fmt != RKNN_TENSOR_NHWC) {
                rknn_log('E', "rknn_inputs_set, unsupported input fmt(%d) for a 4-D input (fake: NCHW or NHWC)", (int)in->fmt);
                return RKNN_ERR_PARAM_INVALID;
            }
            need = bytes_for(a->n_elems, in->type);
        }
        if (in->size < need) {
            rknn_log('E', "rknn_inputs_set, param input size(%u) < model input size(%llu)", in->size,
                     (unsigned long long)need);
            return RKNN_ERR_PARAM_INVALID;
        }
    }
    for (uint32_t i = 0; i < n_inputs; i++) {
        const rknn_input *in = &inputs[i];
        const rknn_tensor_attr *a = &sp->in[in->index];
        if (in->index == 0) {
            if (in->pass_through) decode_pixels(c, in->buf, a->type, a->fmt);
            else decode_pixels(c, in->buf, in->type, in->fmt);
        }
        c->input_set[in->index] = true;
        dump_input(c, in);
        if (in->index < MAX_IO) {
            pthread_mutex_lock(&records_lock);
            free(last_inputs[in->index].bytes);
            last_inputs[in->index].bytes = malloc(in->size ? in->size : 1);
            memcpy(last_inputs[in->index].bytes, in->buf, in->size);
            last_inputs[in->index].size = in->size;
            pthread_mutex_unlock(&records_lock);
        }
    }
    return RKNN_SUCC;
}

EXPORT int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_uint(&b, "n_inputs", n_inputs);
    jb_bool(&b, "inputs_ptr", inputs != NULL);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_inputs_set", &b, acquire_error(r, "rknn_inputs_set"));
    int ret = do_inputs_set(&b, c, n_inputs, inputs);
    release_ctx(c);
    return finish("rknn_inputs_set", &b, ret);
}

/* ------------------------------------------------------------------ rknn_run */

static uint32_t grid_rows(uint32_t T) {
    uint32_t gh = 1;
    for (uint32_t d = 1; (uint64_t)d * d <= T; d++)
        if (T % d == 0) gh = d;
    return gh;
}

static void compute_outputs(Ctx *c) {
    const Spec *sp = &c->spec;
    uint32_t H = c->H, W = c->W, C = c->C;
    for (uint32_t j = 0; j < sp->n_out; j++) {
        const rknn_tensor_attr *a = &sp->out[j];
        uint32_t D = a->dims[a->n_dims - 1], T = a->n_elems / D;
        uint32_t gh = grid_rows(T), gw = T / gh;
        free(c->results[j]);
        float *out = c->results[j] = malloc((size_t)a->n_elems * sizeof(float));
        double *mean = calloc(C, sizeof(double));
        for (uint32_t t = 0; t < T; t++) {
            uint32_t r = t / gw, q = t % gw;
            uint32_t y0 = (uint32_t)((uint64_t)r * H / gh), y1 = (uint32_t)((uint64_t)(r + 1) * H / gh);
            uint32_t x0 = (uint32_t)((uint64_t)q * W / gw), x1 = (uint32_t)((uint64_t)(q + 1) * W / gw);
            uint64_t npix = (uint64_t)(y1 - y0) * (x1 - x0);
            for (uint32_t k = 0; k < C; k++) {
                double s = 0;
                for (uint32_t y = y0; y < y1; y++)
                    for (uint32_t x = x0; x < x1; x++) s += c->pixels[((size_t)y * W + x) * C + k];
                mean[k] = npix ? s / (double)npix : 0.0;
            }
            for (uint32_t d = 0; d < D; d++) {
                double v = mean[d % C] / 255.0;
                v += (double)j;
                v += (double)t * 0.01;
                v += (double)d * 0.001;
                out[(size_t)t * D + d] = (float)v;
            }
        }
        free(mean);
    }
}

static int do_run(Ctx *c) {
    const Spec *sp = &c->spec;
    if (injected(c, "rknn_run")) return RKNN_ERR_FAIL;
    if (c->flag & RKNN_FLAG_COLLECT_MODEL_INFO_ONLY) {
        rknn_log('E', "rknn_run is denied if set RKNN_FLAG_COLLECT_MODEL_INFO_ONLY flag!");
        return RKNN_ERR_PARAM_INVALID;
    }
    for (uint32_t i = 0; i < sp->n_in; i++)
        if (!c->input_set[i]) { rknn_log('E', "rknn_run, input %u is not set (call rknn_inputs_set first)!", i); return RKNN_ERR_PARAM_INVALID; }
    int64_t t0 = now_us();
    long run_ms = sp->run_ms;
    if (getenv("FAKE_RKNN_RUN_MS")) run_ms = atol(getenv("FAKE_RKNN_RUN_MS"));
    sleep_ms(run_ms);
    compute_outputs(c);
    c->have_run = true;
    c->frame_id++;
    c->last_run_us = now_us() - t0;
    if (c->last_run_us < 1) c->last_run_us = 1;
    snprintf(c->perf_detail, sizeof c->perf_detail,
             "fake perf detail: frame %llu, profile %s, total operator elapsed time: %lld us\n",
             (unsigned long long)c->frame_id, sp->profile, (long long)c->last_run_us);
    rknn_log('D', "rknn_run: frame %llu took %lld us", (unsigned long long)c->frame_id, (long long)c->last_run_us);
    return RKNN_SUCC;
}

EXPORT int rknn_run(rknn_context context, rknn_run_extend *extend) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    if (extend) {
        jb_open(&b, "extend");
        jb_uint(&b, "frame_id", extend->frame_id);
        jb_int(&b, "non_block", extend->non_block);
        jb_int(&b, "timeout_ms", extend->timeout_ms);
        jb_int(&b, "fence_fd", extend->fence_fd);
        jb_close(&b);
    } else jb_null(&b, "extend");
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_run", &b, acquire_error(r, "rknn_run"));
    int ret = do_run(c);
    if (ret == RKNN_SUCC) {
        jb_uint(&b, "frame_id", c->frame_id);
        if (extend) extend->frame_id = c->frame_id;
    }
    release_ctx(c);
    return finish("rknn_run", &b, ret);
}

EXPORT int rknn_wait(rknn_context context, rknn_run_extend *extend) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_bool(&b, "extend", extend != NULL);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_wait", &b, acquire_error(r, "rknn_wait"));
    release_ctx(c);
    rknn_log('E', "rknn_wait is unsupported on this platform!"); /* Table 4-1: x on every platform */
    return finish("rknn_wait", &b, RKNN_ERR_FAIL);
}

/* ------------------------------------------------------------------ rknn_outputs_get / release */

/* Bytes of output j as handed back. */
static uint32_t output_bytes(const rknn_tensor_attr *a, bool want_float) {
    return want_float ? a->n_elems * 4u : a->size;
}

static void fill_output(const rknn_tensor_attr *a, const float *vals, bool want_float, void *dst) {
    size_t n = a->n_elems;
    if (want_float || a->type == RKNN_TENSOR_FLOAT32) { memcpy(dst, vals, n * 4); return; }
    if (a->type == RKNN_TENSOR_FLOAT16) {
        uint16_t *h = dst;
        for (size_t i = 0; i < n; i++) h[i] = float_to_half(vals[i]);
        return;
    }
    double scale = a->scale != 0.0f ? (double)a->scale : 1.0;
    bool sgn = a->type == RKNN_TENSOR_INT8;
    for (size_t i = 0; i < n; i++) {
        double q = nearbyint((double)vals[i] / scale) + a->zp;
        double lo = sgn ? -128 : 0, hi = sgn ? 127 : 255;
        q = q < lo ? lo : q > hi ? hi : q;
        if (sgn) ((int8_t *)dst)[i] = (int8_t)q;
        else ((uint8_t *)dst)[i] = (uint8_t)q;
    }
}

static void track(Ctx *c, void *p, size_t n) {
    if (c->n_bufs == c->cap_bufs) {
        c->cap_bufs = c->cap_bufs ? c->cap_bufs * 2 : 8;
        c->bufs = realloc(c->bufs, c->cap_bufs * sizeof c->bufs[0]);
    }
    c->bufs[c->n_bufs].p = p;
    c->bufs[c->n_bufs++].n = n;
    pthread_mutex_lock(&records_lock);
    unreleased_outputs++;
    pthread_mutex_unlock(&records_lock);
    count("rknn_output_buffer");
}

/* Forget a tracked buffer; its allocated size in *n. */
static bool untrack(Ctx *c, void *p, size_t *n) {
    for (size_t i = 0; i < c->n_bufs; i++)
        if (c->bufs[i].p == p) {
            *n = c->bufs[i].n;
            c->bufs[i] = c->bufs[--c->n_bufs];
            pthread_mutex_lock(&records_lock);
            unreleased_outputs--;
            pthread_mutex_unlock(&records_lock);
            count("rknn_output_buffer_released");
            return true;
        }
    return false;
}

static int do_outputs_get(jbuf *b, Ctx *c, uint32_t n_outputs, rknn_output *outputs, rknn_output_extend *extend) {
    const Spec *sp = &c->spec;
    jb_open_list(b, "outputs");
    for (uint32_t i = 0; outputs && i < n_outputs && i < 64; i++) {
        jb_open(b, NULL);
        jb_uint(b, "want_float", outputs[i].want_float);
        jb_uint(b, "is_prealloc", outputs[i].is_prealloc);
        jb_uint(b, "index", outputs[i].index);
        jb_bool(b, "buf", outputs[i].buf != NULL);
        jb_uint(b, "size", outputs[i].size);
        jb_close(b);
    }
    jb_close_list(b);
    if (injected(c, "rknn_outputs_get")) return RKNN_ERR_FAIL;
    if (!outputs) { rknn_log('E', "rknn_outputs_get, outputs == nullptr!"); return RKNN_ERR_PARAM_INVALID; }
    if (n_outputs > sp->n_out) {
        rknn_log('E', "rknn_outputs_get, param output num(%u) > model output num(%u)", n_outputs, sp->n_out);
        return RKNN_ERR_PARAM_INVALID;
    }
    if (n_outputs != sp->n_out) {
        rknn_log('E', "rknn_outputs_get, param output num(%u) != model output num(%u)", n_outputs, sp->n_out);
        return RKNN_ERR_PARAM_INVALID;
    }
    if (!c->have_run) { rknn_log('E', "rknn_outputs_get, no inference result: call rknn_run first!"); return RKNN_ERR_PARAM_INVALID; }
    for (uint32_t i = 0; i < n_outputs; i++) {
        if (!outputs[i].is_prealloc) continue;
        size_t expected = output_bytes(&sp->out[i], outputs[i].want_float);
        if (!outputs[i].buf || outputs[i].size < expected) {
            rknn_log('E', "rknn_outputs_get, output[%u] buf size error, size = %u, expected size = %zu if want_float = %d",
                     i, outputs[i].size, expected, outputs[i].want_float);
            return RKNN_ERR_PARAM_INVALID;
        }
    }
    /* Filled by array position: the vendor demo leaves every index at 0 (reference §1.7). */
    jb_open_list(b, "returned");
    for (uint32_t i = 0; i < n_outputs; i++) {
        rknn_output *o = &outputs[i];
        const rknn_tensor_attr *a = &sp->out[i];
        uint32_t bytes = output_bytes(a, o->want_float);
        if (!o->is_prealloc) {
            o->buf = malloc(bytes ? bytes : 1);
            o->size = bytes;
            track(c, o->buf, bytes ? bytes : 1);
        }
        o->index = i;
        fill_output(a, c->results[i], o->want_float, o->buf);
        jb_open(b, NULL);
        jb_uint(b, "index", i);
        jb_uint(b, "size", bytes);
        jb_float(b, "first", c->results[i][0]);
        jb_close(b);
    }
    jb_close_list(b);
    if (extend) extend->frame_id = c->frame_id;
    return RKNN_SUCC;
}

EXPORT int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *extend) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_uint(&b, "n_outputs", n_outputs);
    jb_bool(&b, "extend", extend != NULL);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_outputs_get", &b, acquire_error(r, "rknn_outputs_get"));
    int ret = do_outputs_get(&b, c, n_outputs, outputs, extend);
    release_ctx(c);
    return finish("rknn_outputs_get", &b, ret);
}

EXPORT int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_uint(&b, "n_outputs", n_outputs);
    jb_bool(&b, "outputs_ptr", outputs != NULL);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_outputs_release", &b, acquire_error(r, "rknn_outputs_release"));
    if (injected(c, "rknn_outputs_release")) { release_ctx(c); return finish("rknn_outputs_release", &b, RKNN_ERR_FAIL); }
    if (!outputs) {
        release_ctx(c);
        rknn_log('E', "rknn_outputs_release, outputs == nullptr!");
        return finish("rknn_outputs_release", &b, RKNN_ERR_PARAM_INVALID);
    }
    int released = 0;
    jb_open_list(&b, "outputs");
    for (uint32_t i = 0; i < n_outputs; i++) {
        rknn_output *o = &outputs[i];
        size_t allocated = 0;
        bool known = !o->is_prealloc && o->buf && untrack(c, o->buf, &allocated);
        jb_open(&b, NULL);
        jb_uint(&b, "is_prealloc", o->is_prealloc);
        jb_bool(&b, "buf", o->buf != NULL);
        jb_bool(&b, "released", known);
        jb_close(&b);
        if (known) {
            poison_free(o->buf, allocated);
            released++;
        } else if (!o->is_prealloc && o->buf) {
            count("rknn_bad_release");
            rknn_log('W', "rknn_outputs_release, output[%u].buf was not allocated by rknn_outputs_get (or was already "
                     "released)", i);
        }
    }
    jb_close_list(&b);
    jb_int(&b, "released", released);
    release_ctx(c);
    return finish("rknn_outputs_release", &b, RKNN_SUCC);
}

/* ------------------------------------------------------------------ core masks, batch */

EXPORT int rknn_set_core_mask(rknn_context context, rknn_core_mask core_mask) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_int(&b, "core_mask", (int)core_mask);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_set_core_mask", &b, acquire_error(r, "rknn_set_core_mask"));
    int ret = RKNN_SUCC;
    int m = (int)core_mask, cores = c->spec.npu_cores;
    bool known = m == 0 || m == 1 || m == 2 || m == 4 || m == 3 || m == 7 || m == 0xffff;
    if (injected(c, "rknn_set_core_mask")) ret = RKNN_ERR_FAIL;
    else if (cores == 1) {
        rknn_log('E', "rknn_set_core_mask: not supported on a platform with a single-core NPU (%s)!", c->spec.platform);
        ret = RKNN_ERR_FAIL;
    } else if (!known || (m != 0 && m != 0xffff && (m & ~((1 << cores) - 1)))) {
        rknn_log('E', "rknn_set_core_mask: invalid core mask 0x%x for a %d-core NPU!", (unsigned)m, cores);
        ret = RKNN_ERR_FAIL;
    } else c->core_mask = m;
    release_ctx(c);
    return finish("rknn_set_core_mask", &b, ret);
}

EXPORT int rknn_set_batch_core_num(rknn_context context, int core_num) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_int(&b, "core_num", core_num);
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_set_batch_core_num", &b, acquire_error(r, "rknn_set_batch_core_num"));
    int ret = RKNN_SUCC;
    if (injected(c, "rknn_set_batch_core_num")) ret = RKNN_ERR_FAIL;
    else if (core_num < 1 || core_num > c->spec.npu_cores) {
        rknn_log('E', "rknn_set_batch_core_num: invalid core_num(%d)!", core_num);
        ret = RKNN_ERR_PARAM_INVALID;
    } else c->batch_core_num = core_num;
    release_ctx(c);
    return finish("rknn_set_batch_core_num", &b, ret);
}

/* ------------------------------------------------------------------ memory API (recorded, not used by the run) */

static rknn_tensor_mem *make_mem(uint64_t size) {
    if (size == 0 || size > 0xffffffffu) return NULL;
    rknn_tensor_mem *m = calloc(1, sizeof *m);
    m->virt_addr = calloc(1, (size_t)size);
    m->phys_addr = 0;
    m->fd = -1;
    m->size = (uint32_t)size;
    m->flags = RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE;
    count("rknn_mem_created");
    return m;
}

EXPORT rknn_tensor_mem *rknn_create_mem(rknn_context context, uint32_t size) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_uint(&b, "size", size);
    Ctx *c;
    LockResult r = acquire(context, &c);
    rknn_tensor_mem *m = NULL;
    if (r == LOCK_OK) { m = make_mem(size); release_ctx(c); }
    else acquire_error(r, "rknn_create_mem");
    jb_bool(&b, "mem", m != NULL);
    finish("rknn_create_mem", &b, m ? RKNN_SUCC : RKNN_ERR_PARAM_INVALID);
    return m;
}

#if FAKE_RKNN_SYMBOLS >= 200
EXPORT rknn_tensor_mem *rknn_create_mem2(rknn_context context, uint64_t size, uint64_t alloc_flags) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_uint(&b, "size", size);
    jb_uint(&b, "alloc_flags", alloc_flags);
    Ctx *c = NULL;
    LockResult r = context == 0 ? LOCK_OK : acquire(context, &c); /* ctx 0 allowed (RKNN_MEM_FLAG_ALLOC_NO_CONTEXT) */
    rknn_tensor_mem *m = NULL;
    if (r == LOCK_OK) { m = make_mem(size); if (c) release_ctx(c); }
    else acquire_error(r, "rknn_create_mem2");
    jb_bool(&b, "mem", m != NULL);
    finish("rknn_create_mem2", &b, m ? RKNN_SUCC : RKNN_ERR_PARAM_INVALID);
    return m;
}
#endif

EXPORT int rknn_destroy_mem(rknn_context context, rknn_tensor_mem *mem) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_bool(&b, "mem", mem != NULL);
    if (!mem) return finish("rknn_destroy_mem", &b, RKNN_ERR_PARAM_INVALID);
    free(mem->virt_addr);
    free(mem);
    count("rknn_mem_destroyed");
    return finish("rknn_destroy_mem", &b, RKNN_SUCC);
}

EXPORT int rknn_set_io_mem(rknn_context context, rknn_tensor_mem *mem, rknn_tensor_attr *attr) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_bool(&b, "mem", mem != NULL);
    if (attr) { jb_uint(&b, "attr_index", attr->index); jb_str(&b, "attr_name", attr->name); }
    Ctx *c;
    LockResult r = acquire(context, &c);
    if (r != LOCK_OK) return finish("rknn_set_io_mem", &b, acquire_error(r, "rknn_set_io_mem"));
    release_ctx(c);
    return finish("rknn_set_io_mem", &b, mem && attr ? RKNN_SUCC : RKNN_ERR_PARAM_INVALID);
}

#if FAKE_RKNN_SYMBOLS >= 160
EXPORT int rknn_mem_sync(rknn_context context, rknn_tensor_mem *mem, rknn_mem_sync_mode mode) {
    jbuf b = {0};
    jb_open(&b, NULL);
    jb_uint(&b, "ctx", context);
    jb_bool(&b, "mem", mem != NULL);
    jb_int(&b, "mode", (int)mode);
    return finish("rknn_mem_sync", &b, mem && mode >= 1 && mode <= 3 ? RKNN_SUCC : RKNN_ERR_PARAM_INVALID);
}
#endif
