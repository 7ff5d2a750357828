"""The librknnrt binding (`mcp_rkllm.native.rknn`): argument forms, error mapping, finding the library, and every
C function against the fake librknnrt.so of `tests/fake_rknn/`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_rkllm.errors import ERRORS, RkllmError
from mcp_rkllm.native import rknn
from mcp_rkllm.native.abi.rknn import TENSOR_FORMATS, TENSOR_TYPES
from mcp_rkllm.native.rknn import RknnLibrary
from tests.fake_rkllm.build import build_fake as build_fake_rkllm

# --------------------------------------------------------------------------- no library needed


def test_return_codes_map_to_the_table_with_their_c_names() -> None:
    err = rknn.rc_error("rknn_inputs_set", -5, " for input 0")
    assert err.code == "RKNN_CALL_FAILED" and err.rc == -5
    assert err.fields["rc_name"] == "RKNN_ERR_PARAM_INVALID"
    assert err.message == "rknn_inputs_set returned -5 (RKNN_ERR_PARAM_INVALID: parameter invalid) for input 0"
    assert err.to_dict()["details"]["rc_name"] == "RKNN_ERR_PARAM_INVALID"
    assert rknn.rc_error("rknn_init", -6).fields["rc_name"] == "RKNN_ERR_MODEL_INVALID"
    for rc, name in ((-2, "RKNN_ERR_TIMEOUT"), (-3, "RKNN_ERR_DEVICE_UNAVAILABLE"), (-4, "RKNN_ERR_MALLOC_FAIL")):
        err = rknn.rc_error("rknn_run", rc)
        assert err.code == "RKNN_NPU_UNAVAILABLE" and err.spec.retryable and err.fields["rc_name"] == name
    unknown = rknn.rc_error("rknn_run", -42)
    assert unknown.code == "RKNN_CALL_FAILED" and "RKNN_ERR_UNKNOWN(-42)" in unknown.message
    assert rknn.rc_name(-13) == "RKNN_ERR_TARGET_PLATFORM_UNMATCH"
    numbers = [spec.number for spec in ERRORS.values()]
    assert len(numbers) == len(set(numbers)) and all(-32099 <= n <= -32000 for n in numbers)


def test_flags_by_name_number_or_list() -> None:
    assert rknn.init_flags(0) == 0
    assert rknn.init_flags("RKNN_FLAG_PRIOR_LOW|RKNN_FLAG_COLLECT_PERF_MASK") == 0x0A
    assert rknn.init_flags(["rknn_flag_async_mask", 8, "0x100"]) == 0x10C
    with pytest.raises(RkllmError) as bad:
        rknn.init_flags("RKNN_FLAG_NOPE")
    assert bad.value.code == "INVALID_PARAMS" and "RKNN_FLAG_NOPE" in bad.value.message
    with pytest.raises(RkllmError) as refused:
        rknn.init_flags(["RKNN_FLAG_MEM_ALLOC_OUTSIDE"])
    assert refused.value.code == "NOT_SUPPORTED" and "RKNN_FLAG_MEM_ALLOC_OUTSIDE" in refused.value.message
    with pytest.raises(RkllmError):
        rknn.init_flags(1 << 32)


def test_query_commands_and_enums_by_name_or_number() -> None:
    assert rknn.query_cmd("RKNN_QUERY_SDK_VERSION") == 5 and rknn.query_cmd(1) == 1
    assert rknn.query_cmd("rknn_query_native_nc1hwc2_input_attr") == 8
    for bad in ("RKNN_QUERY_CMD_MAX", 18, -1, "SDK_VERSION", True):
        with pytest.raises(RkllmError) as exc:
            rknn.query_cmd(bad)
        assert exc.value.code == "INVALID_PARAMS"
    assert rknn.enum_value("RKNN_TENSOR_UINT8", TENSOR_TYPES, "type", "f") == 3
    assert rknn.enum_name(1, TENSOR_FORMATS) == "RKNN_TENSOR_NHWC" and rknn.enum_name(99, TENSOR_FORMATS) == 99
    assert rknn.element_size("RKNN_TENSOR_FLOAT16") == 2 and rknn.element_size(10) is None


def test_output_floats() -> None:
    import struct

    out = rknn.RknnOutput(index=0, want_float=True, size=8, data=struct.pack("2f", 1.5, -2.0))
    assert out.floats() == [1.5, -2.0]
    with pytest.raises(RkllmError):
        rknn.RknnOutput(index=0, want_float=False, size=2, data=b"\x00\x3c").floats()


def test_explicit_library_path_is_the_only_place_looked_at(tmp_path: Path) -> None:
    with pytest.raises(RkllmError) as exc:
        RknnLibrary.open(str(tmp_path / "librknnrt.so"))
    assert exc.value.code == "RKNN_LIBRARY_UNAVAILABLE" and "RKNN_LIB_PATH" in exc.value.message
    with pytest.raises(RkllmError) as in_dir:
        RknnLibrary.open(str(tmp_path))  # a directory without the library
    assert in_dir.value.code == "RKNN_LIBRARY_UNAVAILABLE"
    (tmp_path / "librknnrt.so").write_bytes(b"not an ELF file")
    with pytest.raises(RkllmError) as garbage:
        RknnLibrary.open(str(tmp_path))
    assert garbage.value.code == "RKNN_LIBRARY_UNAVAILABLE" and "could not load" in garbage.value.message


def test_a_library_without_rknn_init_is_refused() -> None:
    with pytest.raises(RkllmError) as exc:
        RknnLibrary.open(str(build_fake_rkllm("1.3.0", "1.3.0")))
    assert exc.value.code == "RKNN_LIBRARY_UNAVAILABLE" and "rknn_init" in exc.value.message
