"""The librknnrt binding (`mcp_rkllm.native.rknn`): argument forms, error mapping, finding the library, and every
C function against the fake librknnrt.so of `tests/fake_rknn/`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import ERRORS, RkllmError
from mcp_rkllm.native import rknn
from mcp_rkllm.native.abi.rknn import TENSOR_FORMATS, TENSOR_TYPES
from mcp_rkllm.native.rknn import RknnInput, RknnLibrary, RknnOutputRequest
from tests.fake_rkllm.build import build_fake as build_fake_rkllm
from tests.fake_rknn import (
    FakeRknnView,
    build_fake_rknn,
    expected_outputs,
    model_text,
    to_fp16_bytes,
    write_model,
)

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


# --------------------------------------------------------------------------- against the fake librknnrt.so

TINY_PIXELS = bytes((i * 7) % 256 for i in range(28 * 28 * 3))


@pytest.fixture(scope="module")
def fake_path() -> Path:
    return build_fake_rknn()


@pytest.fixture
def fake(fake_path: Path) -> Iterator[FakeRknnView]:
    view = FakeRknnView(fake_path)
    view.reset()
    yield view
    assert view.unreleased() == 0, "an output buffer the runtime handed out was never released"


@pytest.fixture
def library(fake_path: Path) -> RknnLibrary:
    return RknnLibrary.open(str(fake_path))


def _code(exc: pytest.ExceptionInfo[RkllmError]) -> tuple[str, int | None, object]:
    return exc.value.code, exc.value.rc, exc.value.fields.get("rc_name")


def test_struct_layout_agrees_with_the_fake(fake: FakeRknnView) -> None:
    from tests.test_rknn_layout import LAYOUT

    lib = RknnLibrary.open(str(fake.path))
    for struct, (_, _, fields) in LAYOUT.items():
        assert (lib.ffi.sizeof(struct), lib.ffi.alignof(struct)) == (fake.sizeof(struct), fake.alignof(struct)), struct
        for name in fields:
            assert lib.ffi.offsetof(struct, name) == fake.offsetof(struct, name), f"{struct}.{name}"


def test_init_query_inputs_run_outputs_release(fake: FakeRknnView, library: RknnLibrary, tmp_path: Path) -> None:
    model = write_model(tmp_path / "enc.rknn", "tiny", custom_string="hello")
    ctx = library.init(str(model))
    assert fake.last("rknn_init")["model"] == "path" and fake.last("rknn_init")["path"] == str(model)
    assert fake.last("rknn_init")["extend"] is None and fake.live_contexts() == 1

    assert ctx.query("RKNN_QUERY_IN_OUT_NUM") == {"n_input": 1, "n_output": 1}
    attr = ctx.query("RKNN_QUERY_INPUT_ATTR", 0)
    assert {k: fake.last("rknn_query")[k] for k in ("cmd_name", "size", "ctx")} == {
        "cmd_name": "RKNN_QUERY_INPUT_ATTR", "size": 376, "ctx": ctx.handle()}
    assert (attr["name"], attr["n_dims"], attr["dims"], attr["n_elems"], attr["size"]) == ("pixel", 4, [1, 28, 28, 3],
                                                                                           2352, 4704)
    assert (attr["fmt"], attr["type"], attr["qnt_type"]) == ("RKNN_TENSOR_NHWC", "RKNN_TENSOR_FLOAT16",
                                                             "RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC")
    assert (attr["zp"], attr["scale"], attr["index"]) == (0, 1.0, 0)
    out_attr = ctx.query(2, index=0)  # by number
    assert (out_attr["dims"], out_attr["fmt"], out_attr["n_elems"]) == ([4, 8], "RKNN_TENSOR_UNDEFINED", 32)
    assert ctx.query("RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR")["dims"][0] == 1
    assert ctx.sdk_version() == {"api_version": "2.3.2 (429f97ae6b@2025-04-09T09:09:27)", "drv_version": "0.9.8"}
    assert ctx.query("RKNN_QUERY_CUSTOM_STRING") == {"string": "hello"}
    assert set(ctx.query("RKNN_QUERY_MEM_SIZE")) == {"total_weight_size", "total_internal_size",
                                                    "total_dma_allocated_size", "total_sram_size", "free_sram_size"}

    ctx.inputs_set([RknnInput(index=0, buf=TINY_PIXELS, type="RKNN_TENSOR_UINT8", fmt="RKNN_TENSOR_NHWC")])
    assert fake.last_input(0) == TINY_PIXELS and fake.last("rknn_inputs_set")["n_inputs"] == 1
    ctx.run()
    assert ctx.query("RKNN_QUERY_PERF_RUN")["run_duration"] >= 0

    expected = expected_outputs(TINY_PIXELS, (28, 28, 3), 1, 4, 8)
    (out,) = ctx.outputs_get()
    assert (out.index, out.want_float, out.size) == (0, True, 4 * 32)
    assert out.floats() == expected[0].tolist()
    assert fake.unreleased() == 0
    (native,) = ctx.outputs_get([RknnOutputRequest(index=0, want_float=False)])
    assert native.data == to_fp16_bytes(expected[0]) and native.size == 64
    assert ctx.outputs_release() == 0 and fake.unreleased() == 0

    ctx.destroy()
    assert ctx.closed and fake.live_contexts() == 0
    ctx.destroy()  # a second destroy never reaches the runtime
    assert fake.count("rknn_destroy") == 1
    with pytest.raises(RkllmError) as gone:
        ctx.query("RKNN_QUERY_IN_OUT_NUM")
    assert gone.value.code == "INVALID_PARAMS" and "destroyed" in gone.value.message


def test_model_from_a_buffer_with_flags_and_extend(fake: FakeRknnView, library: RknnLibrary) -> None:
    data = model_text("tiny").encode()
    with library.init(data, "RKNN_FLAG_PRIOR_LOW|RKNN_FLAG_COLLECT_PERF_MASK") as first:
        record = fake.last("rknn_init")
        assert (record["model"], record["size"], record["flag"], record["extend"]) == ("buffer", len(data), 0x0A, None)
        with library.init(bytearray(data), ["RKNN_FLAG_SHARE_WEIGHT_MEM"], share_weight_with=first) as second:
            extend = fake.last("rknn_init")["extend"]
            assert extend["ctx"] == first.handle() and extend["reserved_nonzero"] == 0
            assert fake.last("rknn_init")["flag"] == 0x20 and second.handle() != first.handle()
    assert fake.live_contexts() == 0
    with pytest.raises(RkllmError) as no_share:
        library.init(data, "RKNN_FLAG_SHARE_WEIGHT_MEM")
    assert no_share.value.code == "INVALID_PARAMS"
    with pytest.raises(RkllmError) as empty:
        library.init(b"")
    assert empty.value.code == "INVALID_PARAMS"


def test_several_outputs_in_order(fake: FakeRknnView, library: RknnLibrary, tmp_path: Path) -> None:
    pixels = bytes((i * 13) % 256 for i in range(32 * 32 * 3))
    with library.init(str(write_model(tmp_path / "ds.rknn", "tiny-deepstack"))) as ctx:
        assert ctx.query("RKNN_QUERY_IN_OUT_NUM") == {"n_input": 1, "n_output": 4}
        ctx.inputs_set([RknnInput(0, pixels, 3, 1)])
        ctx.run()
        outs = ctx.outputs_get()
        expected = expected_outputs(pixels, (32, 32, 3), 4, 4, 8)
        assert [o.index for o in outs] == [0, 1, 2, 3]
        assert [o.floats() for o in outs] == [e.tolist() for e in expected]
        with pytest.raises(RkllmError) as too_big:
            ctx.outputs_get(max_bytes=100)
        assert too_big.value.code == "LIMIT_EXCEEDED"
        assert fake.unreleased() == 0  # released although the bound failed after the get


def test_runtime_errors_carry_their_c_names(fake: FakeRknnView, library: RknnLibrary, tmp_path: Path) -> None:
    bad = tmp_path / "bad.rknn"
    bad.write_text("not a model")
    with pytest.raises(RkllmError) as model:
        library.init(str(bad))
    assert _code(model) == ("RKNN_CALL_FAILED", -6, "RKNN_ERR_MODEL_INVALID") and str(bad) in model.value.message
    with library.init(str(write_model(tmp_path / "t.rknn"))) as ctx:
        with pytest.raises(RkllmError) as index:
            ctx.query("RKNN_QUERY_INPUT_ATTR", 5)
        assert _code(index) == ("RKNN_CALL_FAILED", -5, "RKNN_ERR_PARAM_INVALID")
        assert "RKNN_QUERY_INPUT_ATTR index 5" in index.value.message
        with pytest.raises(RkllmError) as small:  # uint8-sized data declared FLOAT32: 4x too small
            ctx.inputs_set([RknnInput(0, TINY_PIXELS, "RKNN_TENSOR_FLOAT32", "RKNN_TENSOR_NHWC")])
        assert _code(small) == ("RKNN_CALL_FAILED", -5, "RKNN_ERR_PARAM_INVALID")
        with pytest.raises(RkllmError) as count:  # two outputs asked of a one-output model
            ctx.outputs_get([RknnOutputRequest(0), RknnOutputRequest(1)])
        assert count.value.code == "RKNN_CALL_FAILED" and count.value.function == "rknn_outputs_get"
        with pytest.raises(RkllmError) as wait:
            ctx.wait()
        assert _code(wait) == ("RKNN_CALL_FAILED", -1, "RKNN_ERR_FAIL")
        with pytest.raises(RkllmError) as mask:
            ctx.set_core_mask("RKNN_NPU_CORE_7")
        assert mask.value.code == "INVALID_PARAMS"
        ctx.set_core_mask("RKNN_NPU_CORE_0_1_2")
        ctx.set_batch_core_num(1)
    with library.init(str(write_model(tmp_path / "one.rknn", npu_cores=1))) as single:
        with pytest.raises(RkllmError) as core:
            single.set_core_mask("RKNN_NPU_CORE_0_1")
        assert _code(core) == ("RKNN_CALL_FAILED", -1, "RKNN_ERR_FAIL")
    with library.init(str(write_model(tmp_path / "f.rknn", fail="rknn_outputs_get,rknn_run"))) as failing:
        failing.inputs_set([RknnInput(0, TINY_PIXELS, "RKNN_TENSOR_UINT8", "RKNN_TENSOR_NHWC")])
        with pytest.raises(RkllmError) as run:
            failing.run()
        assert _code(run) == ("RKNN_CALL_FAILED", -1, "RKNN_ERR_FAIL") and run.value.function == "rknn_run"
        with pytest.raises(RkllmError):
            failing.outputs_get()
    assert fake.unreleased() == 0 and fake.live_contexts() == 0


def test_dup_context(fake: FakeRknnView, library: RknnLibrary, tmp_path: Path) -> None:
    with library.init(str(write_model(tmp_path / "t.rknn"))) as ctx, ctx.dup_context() as twin:
        assert fake.live_contexts() == 2 and twin.handle() != ctx.handle()
        for c in (ctx, twin):
            c.inputs_set([RknnInput(0, TINY_PIXELS, "RKNN_TENSOR_UINT8", "RKNN_TENSOR_NHWC")])
            c.run()
        assert ctx.outputs_get()[0].data == twin.outputs_get()[0].data
    assert fake.live_contexts() == 0


def test_missing_symbols_are_not_supported_by_name(tmp_path: Path) -> None:
    old = RknnLibrary.open(str(build_fake_rknn("1.5.2")))
    assert old.has("rknn_init") and old.has("rknn_set_core_mask")
    assert not old.has("rknn_mem_sync") and not old.has("rknn_create_mem2")
    assert {"rknn_mem_sync", "rknn_create_mem2"}.isdisjoint(old.functions())
    with pytest.raises(RkllmError) as missing:
        old.fn("rknn_mem_sync")
    assert missing.value.code == "NOT_SUPPORTED" and missing.value.message.startswith("rknn_mem_sync is not supported")
    with old.init(str(write_model(tmp_path / "t.rknn"))) as ctx:  # everything else still works
        assert ctx.sdk_version()["api_version"].startswith("1.5.2")
    new = RknnLibrary.open(str(build_fake_rknn()))
    assert {"rknn_mem_sync", "rknn_create_mem2", "rknn_query"} <= new.functions()


def test_versions_and_the_library_file(library: RknnLibrary, tmp_path: Path) -> None:
    assert library.file_version == "2.3.2 (429f97ae6b@2025-04-09T09:09:27)"
    assert library.versions(str(write_model(tmp_path / "t.rknn"))) == {
        "api_version": "2.3.2 (429f97ae6b@2025-04-09T09:09:27)", "drv_version": "0.9.8"}


def test_found_in_a_directory_by_setting(fake_path: Path) -> None:
    assert RknnLibrary.open(str(fake_path.parent)).path == str(fake_path.resolve())
    assert Settings.load({}, {"RKNN_LIB_PATH": str(fake_path)}).rknn_library == str(fake_path)


def test_doctor_reports_the_rknn_runtime(fake_path: Path, tmp_path: Path) -> None:
    from mcp_rkllm import doctor

    def by_name(settings: Settings) -> dict[str, doctor.Check]:
        return {c.name: c for c in doctor.check_rknn_library(settings, None)}

    models = tmp_path / "models"
    (models / "vl").mkdir(parents=True)
    checks = by_name(Settings(rknn_library=str(fake_path), models=(str(models),)))
    assert checks["RKNN runtime"].status == "ok" and checks["RKNN runtime"].value == str(fake_path.resolve())
    assert checks["RKNN SDK"].status == "info" and "2.3.2" in checks["RKNN SDK"].value  # no .rknn to query
    write_model(models / "vl" / "enc.rknn")
    checks = by_name(Settings(rknn_library=str(fake_path), models=(str(models),)))
    assert checks["RKNN SDK"].value.startswith("2.3.2 (429f97ae6b") and checks["RKNN SDK"].status == "ok"
    assert (checks["RKNN driver"].status, checks["RKNN driver"].value) == ("ok", "0.9.8")
    old_driver = build_fake_rknn(drv_version="0.8.2")
    assert by_name(Settings(rknn_library=str(old_driver), models=(str(models),)))["RKNN driver"].status == "warn"
    absent = by_name(Settings(rknn_library=str(tmp_path / "none.so"), models=(str(models),)))
    assert absent["RKNN runtime"].status == "warn" and "RKNN_LIB_PATH" in absent["RKNN runtime"].fix
