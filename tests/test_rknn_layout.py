"""Every librknnrt struct cffi lays out from `native/abi/rknn.py` matches the reference (LP64, header V2.3.2).

The tables are copied from `shared/reference/rknn-api.md` Appendix A (gcc 12.2 on x86_64, confirmed by cffi) and
§2; the enum values from Appendix B and §1.2-1.5.
"""

from __future__ import annotations

from typing import Any

import cffi
import pytest

from mcp_rkllm.native.abi import rknn as abi

#: struct -> (sizeof, alignof, {field: (offset, size)}), from Appendix A.
LAYOUT: dict[str, tuple[int, int, dict[str, tuple[int, int]]]] = {
    "rknn_input_output_num": (8, 4, {"n_input": (0, 4), "n_output": (4, 4)}),
    "rknn_tensor_attr": (376, 4, {
        "index": (0, 4), "n_dims": (4, 4), "dims": (8, 64), "name": (72, 256), "n_elems": (328, 4),
        "size": (332, 4), "fmt": (336, 4), "type": (340, 4), "qnt_type": (344, 4), "fl": (348, 1), "zp": (352, 4),
        "scale": (356, 4), "w_stride": (360, 4), "size_with_stride": (364, 4), "pass_through": (368, 1),
        "h_stride": (372, 4)}),
    "rknn_input_range": (33040, 4, {
        "index": (0, 4), "shape_number": (4, 4), "fmt": (8, 4), "name": (12, 256), "dyn_range": (268, 32768),
        "n_dims": (33036, 4)}),
    "rknn_perf_detail": (16, 8, {"perf_data": (0, 8), "data_len": (8, 8)}),
    "rknn_perf_run": (8, 8, {"run_duration": (0, 8)}),
    "rknn_sdk_version": (512, 1, {"api_version": (0, 256), "drv_version": (256, 256)}),
    "rknn_mem_size": (64, 8, {
        "total_weight_size": (0, 4), "total_internal_size": (4, 4), "total_dma_allocated_size": (8, 8),
        "total_sram_size": (16, 4), "free_sram_size": (20, 4), "reserved": (24, 40)}),
    "rknn_custom_string": (1024, 1, {"string": (0, 1024)}),
    "rknn_tensor_mem": (40, 8, {
        "virt_addr": (0, 8), "phys_addr": (8, 8), "fd": (16, 4), "offset": (20, 4), "size": (24, 4),
        "flags": (28, 4), "priv_data": (32, 8)}),
    "rknn_input": (32, 8, {
        "index": (0, 4), "buf": (8, 8), "size": (16, 4), "pass_through": (20, 1), "type": (24, 4), "fmt": (28, 4)}),
    "rknn_output": (24, 8, {
        "want_float": (0, 1), "is_prealloc": (1, 1), "index": (4, 4), "buf": (8, 8), "size": (16, 4)}),
    "rknn_init_extend": (136, 8, {
        "ctx": (0, 8), "real_model_offset": (8, 4), "real_model_size": (12, 4), "model_buffer_fd": (16, 4),
        "model_buffer_flags": (20, 4), "reserved": (24, 112)}),
    "rknn_run_extend": (24, 8, {"frame_id": (0, 8), "non_block": (8, 4), "timeout_ms": (12, 4), "fence_fd": (16, 4)}),
    "rknn_output_extend": (8, 8, {"frame_id": (0, 8)}),
}

#: Appendix B and §1.2-1.5, as the header numbers them.
ENUMS: dict[str, dict[str, int]] = {
    "rknn_query_cmd": {
        "RKNN_QUERY_IN_OUT_NUM": 0, "RKNN_QUERY_INPUT_ATTR": 1, "RKNN_QUERY_OUTPUT_ATTR": 2,
        "RKNN_QUERY_PERF_DETAIL": 3, "RKNN_QUERY_PERF_RUN": 4, "RKNN_QUERY_SDK_VERSION": 5,
        "RKNN_QUERY_MEM_SIZE": 6, "RKNN_QUERY_CUSTOM_STRING": 7, "RKNN_QUERY_NATIVE_INPUT_ATTR": 8,
        "RKNN_QUERY_NATIVE_OUTPUT_ATTR": 9, "RKNN_QUERY_NATIVE_NC1HWC2_INPUT_ATTR": 8,
        "RKNN_QUERY_NATIVE_NC1HWC2_OUTPUT_ATTR": 9, "RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR": 10,
        "RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR": 11, "RKNN_QUERY_DEVICE_MEM_INFO": 12,
        "RKNN_QUERY_INPUT_DYNAMIC_RANGE": 13, "RKNN_QUERY_CURRENT_INPUT_ATTR": 14,
        "RKNN_QUERY_CURRENT_OUTPUT_ATTR": 15, "RKNN_QUERY_CURRENT_NATIVE_INPUT_ATTR": 16,
        "RKNN_QUERY_CURRENT_NATIVE_OUTPUT_ATTR": 17, "RKNN_QUERY_CMD_MAX": 18},
    "rknn_tensor_type": {
        "RKNN_TENSOR_FLOAT32": 0, "RKNN_TENSOR_FLOAT16": 1, "RKNN_TENSOR_INT8": 2, "RKNN_TENSOR_UINT8": 3,
        "RKNN_TENSOR_INT16": 4, "RKNN_TENSOR_UINT16": 5, "RKNN_TENSOR_INT32": 6, "RKNN_TENSOR_UINT32": 7,
        "RKNN_TENSOR_INT64": 8, "RKNN_TENSOR_BOOL": 9, "RKNN_TENSOR_INT4": 10, "RKNN_TENSOR_BFLOAT16": 11,
        "RKNN_TENSOR_TYPE_MAX": 12},
    "rknn_tensor_qnt_type": {
        "RKNN_TENSOR_QNT_NONE": 0, "RKNN_TENSOR_QNT_DFP": 1, "RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC": 2,
        "RKNN_TENSOR_QNT_MAX": 3},
    "rknn_tensor_format": {
        "RKNN_TENSOR_NCHW": 0, "RKNN_TENSOR_NHWC": 1, "RKNN_TENSOR_NC1HWC2": 2, "RKNN_TENSOR_UNDEFINED": 3,
        "RKNN_TENSOR_FORMAT_MAX": 4},
    "rknn_core_mask": {
        "RKNN_NPU_CORE_AUTO": 0, "RKNN_NPU_CORE_0": 1, "RKNN_NPU_CORE_1": 2, "RKNN_NPU_CORE_2": 4,
        "RKNN_NPU_CORE_0_1": 3, "RKNN_NPU_CORE_0_1_2": 7, "RKNN_NPU_CORE_ALL": 0xFFFF,
        "RKNN_NPU_CORE_UNDEFINED": 0x10000},
    "rknn_tensor_mem_flags": {
        "RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE": 1, "RKNN_TENSOR_MEMORY_FLAGS_FROM_FD": 2,
        "RKNN_TENSOR_MEMORY_FLAGS_FROM_PHYS": 3, "RKNN_TENSOR_MEMORY_FLAGS_UNKNOWN": 4},
    "rknn_mem_alloc_flags": {
        "RKNN_FLAG_MEMORY_FLAGS_DEFAULT": 0, "RKNN_FLAG_MEMORY_CACHEABLE": 1, "RKNN_FLAG_MEMORY_NON_CACHEABLE": 2,
        "RKNN_FLAG_MEMORY_TRY_ALLOC_SRAM": 4},
    "rknn_mem_sync_mode": {
        "RKNN_MEMORY_SYNC_TO_DEVICE": 1, "RKNN_MEMORY_SYNC_FROM_DEVICE": 2, "RKNN_MEMORY_SYNC_BIDIRECTIONAL": 3},
}

#: §1.2: the return codes.
RETURN_CODES = {
    "RKNN_SUCC": 0, "RKNN_ERR_FAIL": -1, "RKNN_ERR_TIMEOUT": -2, "RKNN_ERR_DEVICE_UNAVAILABLE": -3,
    "RKNN_ERR_MALLOC_FAIL": -4, "RKNN_ERR_PARAM_INVALID": -5, "RKNN_ERR_MODEL_INVALID": -6,
    "RKNN_ERR_CTX_INVALID": -7, "RKNN_ERR_INPUT_INVALID": -8, "RKNN_ERR_OUTPUT_INVALID": -9,
    "RKNN_ERR_DEVICE_UNMATCH": -10, "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL": -11,
    "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION": -12, "RKNN_ERR_TARGET_PLATFORM_UNMATCH": -13,
}

#: §1.3: the init flags.
INIT_FLAGS = {
    "RKNN_FLAG_PRIOR_HIGH": 0x0, "RKNN_FLAG_PRIOR_MEDIUM": 0x1, "RKNN_FLAG_PRIOR_LOW": 0x2,
    "RKNN_FLAG_ASYNC_MASK": 0x4, "RKNN_FLAG_COLLECT_PERF_MASK": 0x8, "RKNN_FLAG_MEM_ALLOC_OUTSIDE": 0x10,
    "RKNN_FLAG_SHARE_WEIGHT_MEM": 0x20, "RKNN_FLAG_FENCE_IN_OUTSIDE": 0x40, "RKNN_FLAG_FENCE_OUT_OUTSIDE": 0x80,
    "RKNN_FLAG_COLLECT_MODEL_INFO_ONLY": 0x100, "RKNN_FLAG_INTERNAL_ALLOC_OUTSIDE": 0x200,
    "RKNN_FLAG_EXECUTE_FALLBACK_PRIOR_DEVICE_GPU": 0x400, "RKNN_FLAG_ENABLE_SRAM": 0x800,
    "RKNN_FLAG_SHARE_SRAM": 0x1000, "RKNN_FLAG_DISABLE_PROC_HIGH_PRIORITY": 0x2000,
    "RKNN_FLAG_DISABLE_FLUSH_INPUT_MEM_CACHE": 0x4000, "RKNN_FLAG_DISABLE_FLUSH_OUTPUT_MEM_CACHE": 0x8000,
    "RKNN_FLAG_MODEL_BUFFER_ZERO_COPY": 0x10000, "RKNN_MEM_FLAG_ALLOC_NO_CONTEXT": 0x20000,
}

#: §1.6: every declared function and its C signature as cffi spells its type.
SIGNATURES = {
    "rknn_init": "int(*)(uint64_t *, void *, uint32_t, uint32_t, rknn_init_extend *)",
    "rknn_dup_context": "int(*)(uint64_t *, uint64_t *)",
    "rknn_destroy": "int(*)(uint64_t)",
    "rknn_query": "int(*)(uint64_t, rknn_query_cmd, void *, uint32_t)",
    "rknn_inputs_set": "int(*)(uint64_t, uint32_t, rknn_input *)",
    "rknn_set_batch_core_num": "int(*)(uint64_t, int)",
    "rknn_set_core_mask": "int(*)(uint64_t, rknn_core_mask)",
    "rknn_run": "int(*)(uint64_t, rknn_run_extend *)",
    "rknn_wait": "int(*)(uint64_t, rknn_run_extend *)",
    "rknn_outputs_get": "int(*)(uint64_t, uint32_t, rknn_output *, rknn_output_extend *)",
    "rknn_outputs_release": "int(*)(uint64_t, uint32_t, rknn_output *)",
}


@pytest.fixture(scope="module")
def ffi() -> Any:
    f = cffi.FFI()
    f.cdef(abi.CDEF)
    return f


def test_every_declared_struct_is_pinned() -> None:
    assert set(abi.STRUCTS) == set(LAYOUT)


@pytest.mark.parametrize("struct", sorted(LAYOUT))
def test_struct_layout(ffi: Any, struct: str) -> None:
    size, align, fields = LAYOUT[struct]
    assert (ffi.sizeof(struct), ffi.alignof(struct)) == (size, align)
    declared = dict(ffi.typeof(struct).fields)
    assert set(declared) == set(fields), f"{struct}: fields differ from the reference"
    for name, (offset, fsize) in fields.items():
        assert ffi.offsetof(struct, name) == offset, f"{struct}.{name} offset"
        assert ffi.sizeof(declared[name].type) == fsize, f"{struct}.{name} size"


def test_scalar_sizes(ffi: Any) -> None:
    # Appendix A: sizeof(rknn_context)=8, enums 4 bytes.
    assert ffi.sizeof("rknn_context") == 8
    for enum in ENUMS:
        assert ffi.sizeof(enum) == 4, enum


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_enum_values(ffi: Any, enum: str) -> None:
    relements = ffi.typeof(enum).relements
    assert {name: relements[name] for name in ENUMS[enum]} == ENUMS[enum]
    assert set(relements) == set(ENUMS[enum])


def test_constants() -> None:
    assert {name: rc for rc, (name, _) in abi.RETURN_CODES.items()} == RETURN_CODES
    assert abi.INIT_FLAGS == INIT_FLAGS
    assert ENUMS["rknn_query_cmd"] == abi.QUERY_CMDS
    assert ENUMS["rknn_tensor_type"] == abi.TENSOR_TYPES and ENUMS["rknn_tensor_format"] == abi.TENSOR_FORMATS
    assert ENUMS["rknn_tensor_qnt_type"] == abi.QNT_TYPES and ENUMS["rknn_core_mask"] == abi.CORE_MASKS
    # §1.5: bytes per element for the rknn_inputs_set size check.
    assert abi.ELEMENT_SIZES == {0: 4, 1: 2, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 4, 8: 8, 9: 1, 10: None, 11: 2}
    # §1.4: what each query fills.
    sizes = {0: 8, 1: 376, 2: 376, 3: 16, 4: 8, 5: 512, 6: 64, 7: 1024, 12: 40, 13: 33040}
    for cmd, size in sizes.items():
        assert LAYOUT[abi.QUERY_STRUCTS[cmd]][0] == size, cmd
    assert {cmd for cmd, s in abi.QUERY_STRUCTS.items() if s == "rknn_tensor_attr"} == {1, 2, *range(8, 12),
                                                                                         *range(14, 18)}


@pytest.mark.parametrize("function", sorted(SIGNATURES))
def test_function_signatures(ffi: Any, function: str) -> None:
    assert function in abi.FUNCTIONS
    assert _declared(ffi, function) is ffi.typeof(SIGNATURES[function])


def _declared(ffi: Any, function: str) -> Any:
    # A function type, without a library: parse a pointer declaration from the cdef's own text.
    line = next(s for s in abi.CDEF.splitlines() if f" {function}(" in s or f"*{function}(" in s)
    ret, params = line.split(f"{function}(", 1)
    return ffi.typeof(f"{ret.strip()}(*)({params.rsplit(')', 1)[0]})")


def test_memory_api_declared() -> None:
    # §1.6: the zero-copy API is declared (looked up lazily; not every runtime exports it).
    assert {"rknn_create_mem", "rknn_create_mem2", "rknn_destroy_mem", "rknn_set_io_mem", "rknn_mem_sync",
            "rknn_set_input_shapes", "rknn_create_mem_from_fd", "rknn_create_mem_from_phys"} <= set(abi.FUNCTIONS)
