"""The librknnrt (rknn_api.h V2.3.2, LP64) C declarations and constants, written from the reference tables.

Data only: the constants below are the single source of every enum and flag value (the cdef's enums are
generated from them), and `CDEF` is the struct and function text cffi parses. The layout is the 2.3.2 one,
which every runtime from 1.4.0 to 2.3.2 shares (`shared/reference/rknn-api.md` §1.9, §2, Appendix A);
`rknn_context` is `uint64_t` (aarch64, x86_64). The header's inline helper functions are left out.
"""

from __future__ import annotations

#: Return codes (§1.2): value -> (C name, the header's meaning).
RETURN_CODES: dict[int, tuple[str, str]] = {
    0: ("RKNN_SUCC", "success"),
    -1: ("RKNN_ERR_FAIL", "execute failed"),
    -2: ("RKNN_ERR_TIMEOUT", "timeout"),
    -3: ("RKNN_ERR_DEVICE_UNAVAILABLE", "device unavailable"),
    -4: ("RKNN_ERR_MALLOC_FAIL", "memory allocation failed"),
    -5: ("RKNN_ERR_PARAM_INVALID", "parameter invalid"),
    -6: ("RKNN_ERR_MODEL_INVALID", "model invalid"),
    -7: ("RKNN_ERR_CTX_INVALID", "context invalid"),
    -8: ("RKNN_ERR_INPUT_INVALID", "input invalid"),
    -9: ("RKNN_ERR_OUTPUT_INVALID", "output invalid"),
    -10: ("RKNN_ERR_DEVICE_UNMATCH", "device mismatch: update the SDK and the NPU driver"),
    -11: ("RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL", "pre-compiled model incompatible"),
    -12: ("RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION", "optimisation level incompatible"),
    -13: ("RKNN_ERR_TARGET_PLATFORM_UNMATCH", "model built for another platform"),
}

#: rknn_init flags (§1.3).
INIT_FLAGS: dict[str, int] = {
    "RKNN_FLAG_PRIOR_HIGH": 0x00000000,
    "RKNN_FLAG_PRIOR_MEDIUM": 0x00000001,
    "RKNN_FLAG_PRIOR_LOW": 0x00000002,
    "RKNN_FLAG_ASYNC_MASK": 0x00000004,
    "RKNN_FLAG_COLLECT_PERF_MASK": 0x00000008,
    "RKNN_FLAG_MEM_ALLOC_OUTSIDE": 0x00000010,
    "RKNN_FLAG_SHARE_WEIGHT_MEM": 0x00000020,
    "RKNN_FLAG_FENCE_IN_OUTSIDE": 0x00000040,
    "RKNN_FLAG_FENCE_OUT_OUTSIDE": 0x00000080,
    "RKNN_FLAG_COLLECT_MODEL_INFO_ONLY": 0x00000100,
    "RKNN_FLAG_INTERNAL_ALLOC_OUTSIDE": 0x00000200,
    "RKNN_FLAG_EXECUTE_FALLBACK_PRIOR_DEVICE_GPU": 0x00000400,
    "RKNN_FLAG_ENABLE_SRAM": 0x00000800,
    "RKNN_FLAG_SHARE_SRAM": 0x00001000,
    "RKNN_FLAG_DISABLE_PROC_HIGH_PRIORITY": 0x00002000,
    "RKNN_FLAG_DISABLE_FLUSH_INPUT_MEM_CACHE": 0x00004000,
    "RKNN_FLAG_DISABLE_FLUSH_OUTPUT_MEM_CACHE": 0x00008000,
    "RKNN_FLAG_MODEL_BUFFER_ZERO_COPY": 0x00010000,
    "RKNN_MEM_FLAG_ALLOC_NO_CONTEXT": 0x00020000,
}

#: rknn_query_cmd (§1.4, Appendix B). Two pairs of names share a value (8 and 9).
QUERY_CMDS: dict[str, int] = {
    "RKNN_QUERY_IN_OUT_NUM": 0,
    "RKNN_QUERY_INPUT_ATTR": 1,
    "RKNN_QUERY_OUTPUT_ATTR": 2,
    "RKNN_QUERY_PERF_DETAIL": 3,
    "RKNN_QUERY_PERF_RUN": 4,
    "RKNN_QUERY_SDK_VERSION": 5,
    "RKNN_QUERY_MEM_SIZE": 6,
    "RKNN_QUERY_CUSTOM_STRING": 7,
    "RKNN_QUERY_NATIVE_INPUT_ATTR": 8,
    "RKNN_QUERY_NATIVE_OUTPUT_ATTR": 9,
    "RKNN_QUERY_NATIVE_NC1HWC2_INPUT_ATTR": 8,
    "RKNN_QUERY_NATIVE_NC1HWC2_OUTPUT_ATTR": 9,
    "RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR": 10,
    "RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR": 11,
    "RKNN_QUERY_DEVICE_MEM_INFO": 12,
    "RKNN_QUERY_INPUT_DYNAMIC_RANGE": 13,
    "RKNN_QUERY_CURRENT_INPUT_ATTR": 14,
    "RKNN_QUERY_CURRENT_OUTPUT_ATTR": 15,
    "RKNN_QUERY_CURRENT_NATIVE_INPUT_ATTR": 16,
    "RKNN_QUERY_CURRENT_NATIVE_OUTPUT_ATTR": 17,
    "RKNN_QUERY_CMD_MAX": 18,
}

#: rknn_query cmd value -> the struct it fills (§1.4).
QUERY_STRUCTS: dict[int, str] = {
    0: "rknn_input_output_num",
    1: "rknn_tensor_attr", 2: "rknn_tensor_attr",
    3: "rknn_perf_detail",
    4: "rknn_perf_run",
    5: "rknn_sdk_version",
    6: "rknn_mem_size",
    7: "rknn_custom_string",
    8: "rknn_tensor_attr", 9: "rknn_tensor_attr", 10: "rknn_tensor_attr", 11: "rknn_tensor_attr",
    12: "rknn_tensor_mem",
    13: "rknn_input_range",
    14: "rknn_tensor_attr", 15: "rknn_tensor_attr", 16: "rknn_tensor_attr", 17: "rknn_tensor_attr",
}

#: rknn_tensor_type (§1.5): name -> value.
TENSOR_TYPES: dict[str, int] = {
    "RKNN_TENSOR_FLOAT32": 0,
    "RKNN_TENSOR_FLOAT16": 1,
    "RKNN_TENSOR_INT8": 2,
    "RKNN_TENSOR_UINT8": 3,
    "RKNN_TENSOR_INT16": 4,
    "RKNN_TENSOR_UINT16": 5,
    "RKNN_TENSOR_INT32": 6,
    "RKNN_TENSOR_UINT32": 7,
    "RKNN_TENSOR_INT64": 8,
    "RKNN_TENSOR_BOOL": 9,
    "RKNN_TENSOR_INT4": 10,
    "RKNN_TENSOR_BFLOAT16": 11,
    "RKNN_TENSOR_TYPE_MAX": 12,
}

#: rknn_tensor_qnt_type (§1.5).
QNT_TYPES: dict[str, int] = {
    "RKNN_TENSOR_QNT_NONE": 0,
    "RKNN_TENSOR_QNT_DFP": 1,
    "RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC": 2,
    "RKNN_TENSOR_QNT_MAX": 3,
}

#: rknn_tensor_format (§1.5).
TENSOR_FORMATS: dict[str, int] = {
    "RKNN_TENSOR_NCHW": 0,
    "RKNN_TENSOR_NHWC": 1,
    "RKNN_TENSOR_NC1HWC2": 2,
    "RKNN_TENSOR_UNDEFINED": 3,
    "RKNN_TENSOR_FORMAT_MAX": 4,
}

#: rknn_core_mask (§1.5).
CORE_MASKS: dict[str, int] = {
    "RKNN_NPU_CORE_AUTO": 0,
    "RKNN_NPU_CORE_0": 1,
    "RKNN_NPU_CORE_1": 2,
    "RKNN_NPU_CORE_2": 4,
    "RKNN_NPU_CORE_0_1": 3,
    "RKNN_NPU_CORE_0_1_2": 7,
    "RKNN_NPU_CORE_ALL": 0xFFFF,
    "RKNN_NPU_CORE_UNDEFINED": 0x10000,
}

#: rknn_tensor_mem_flags, rknn_mem_alloc_flags, rknn_mem_sync_mode (§1.5, zero-copy API only).
TENSOR_MEM_FLAGS: dict[str, int] = {
    "RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE": 1,
    "RKNN_TENSOR_MEMORY_FLAGS_FROM_FD": 2,
    "RKNN_TENSOR_MEMORY_FLAGS_FROM_PHYS": 3,
    "RKNN_TENSOR_MEMORY_FLAGS_UNKNOWN": 4,
}
MEM_ALLOC_FLAGS: dict[str, int] = {
    "RKNN_FLAG_MEMORY_FLAGS_DEFAULT": 0,
    "RKNN_FLAG_MEMORY_CACHEABLE": 1,
    "RKNN_FLAG_MEMORY_NON_CACHEABLE": 2,
    "RKNN_FLAG_MEMORY_TRY_ALLOC_SRAM": 4,
}
MEM_SYNC_MODES: dict[str, int] = {
    "RKNN_MEMORY_SYNC_TO_DEVICE": 1,
    "RKNN_MEMORY_SYNC_FROM_DEVICE": 2,
    "RKNN_MEMORY_SYNC_BIDIRECTIONAL": 3,
}

#: Bytes per element of each tensor type (§1.5); INT4 packs two per byte (None: not a whole number).
ELEMENT_SIZES: dict[int, int | None] = {0: 4, 1: 2, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 4, 8: 8, 9: 1, 10: None, 11: 2}

RKNN_MAX_DIMS = 16
RKNN_MAX_NUM_CHANNEL = 15
RKNN_MAX_NAME_LEN = 256
RKNN_MAX_DYNAMIC_SHAPE_NUM = 512


def _enum(name: str, values: dict[str, int]) -> str:
    body = ",\n".join(f"    {key} = {value:#x}" for key, value in values.items())
    return f"typedef enum {{\n{body}\n}} {name};\n"


_ENUMS = "".join([
    _enum("rknn_query_cmd", QUERY_CMDS),
    _enum("rknn_tensor_type", TENSOR_TYPES),
    _enum("rknn_tensor_qnt_type", QNT_TYPES),
    _enum("rknn_tensor_format", TENSOR_FORMATS),
    _enum("rknn_core_mask", CORE_MASKS),
    _enum("rknn_tensor_mem_flags", TENSOR_MEM_FLAGS),
    _enum("rknn_mem_alloc_flags", MEM_ALLOC_FLAGS),
    _enum("rknn_mem_sync_mode", MEM_SYNC_MODES),
])

_STRUCTS = """
typedef uint64_t rknn_context;

typedef struct {
    uint32_t n_input;
    uint32_t n_output;
} rknn_input_output_num;

typedef struct {
    uint32_t index;
    uint32_t n_dims;
    uint32_t dims[16];
    char name[256];
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
    char name[256];
    uint32_t dyn_range[512][16];
    uint32_t n_dims;
} rknn_input_range;

typedef struct {
    char* perf_data;
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
    void* virt_addr;
    uint64_t phys_addr;
    int32_t fd;
    int32_t offset;
    uint32_t size;
    uint32_t flags;
    void* priv_data;
} rknn_tensor_mem;

typedef struct {
    uint32_t index;
    void* buf;
    uint32_t size;
    uint8_t pass_through;
    rknn_tensor_type type;
    rknn_tensor_format fmt;
} rknn_input;

typedef struct {
    uint8_t want_float;
    uint8_t is_prealloc;
    uint32_t index;
    void* buf;
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
"""

_FUNCTIONS = """
int rknn_init(rknn_context* context, void* model, uint32_t size, uint32_t flag, rknn_init_extend* extend);
int rknn_dup_context(rknn_context* context_in, rknn_context* context_out);
int rknn_destroy(rknn_context context);
int rknn_query(rknn_context context, rknn_query_cmd cmd, void* info, uint32_t size);
int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]);
int rknn_set_batch_core_num(rknn_context context, int core_num);
int rknn_set_core_mask(rknn_context context, rknn_core_mask core_mask);
int rknn_run(rknn_context context, rknn_run_extend* extend);
int rknn_wait(rknn_context context, rknn_run_extend* extend);
int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend* extend);
int rknn_outputs_release(rknn_context context, uint32_t n_ouputs, rknn_output outputs[]);
rknn_tensor_mem* rknn_create_mem_from_phys(rknn_context ctx, uint64_t phys_addr, void* virt_addr, uint32_t size);
rknn_tensor_mem* rknn_create_mem_from_fd(rknn_context ctx, int32_t fd, void* virt_addr, uint32_t size,
                                         int32_t offset);
rknn_tensor_mem* rknn_create_mem_from_mb_blk(rknn_context ctx, void* mb_blk, int32_t offset);
rknn_tensor_mem* rknn_create_mem(rknn_context ctx, uint32_t size);
rknn_tensor_mem* rknn_create_mem2(rknn_context ctx, uint64_t size, uint64_t alloc_flags);
int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem* mem);
int rknn_set_weight_mem(rknn_context ctx, rknn_tensor_mem* mem);
int rknn_set_internal_mem(rknn_context ctx, rknn_tensor_mem* mem);
int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem* mem, rknn_tensor_attr* attr);
int rknn_set_input_shape(rknn_context ctx, rknn_tensor_attr* attr);
int rknn_set_input_shapes(rknn_context ctx, uint32_t n_inputs, rknn_tensor_attr attr[]);
int rknn_mem_sync(rknn_context context, rknn_tensor_mem* mem, rknn_mem_sync_mode mode);
"""

#: The whole cdef text.
CDEF: str = _ENUMS + _STRUCTS + _FUNCTIONS

#: Every function declared, in header order; each is looked up only when first called.
FUNCTIONS: tuple[str, ...] = tuple(
    line.split("(", 1)[0].split()[-1].lstrip("*") for line in _FUNCTIONS.strip().splitlines() if "(" in line)

#: Every struct declared.
STRUCTS: tuple[str, ...] = (
    "rknn_input_output_num", "rknn_tensor_attr", "rknn_input_range", "rknn_perf_detail", "rknn_perf_run",
    "rknn_sdk_version", "rknn_mem_size", "rknn_custom_string", "rknn_tensor_mem", "rknn_input", "rknn_output",
    "rknn_init_extend", "rknn_run_extend", "rknn_output_extend",
)
