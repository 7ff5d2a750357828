"""The fake librknnrt.so is ABI-exact and behaves as shared/reference/rknn-api.md describes the runtime.

The layout figures below are transcribed from the reference's Appendix A (gcc LP64, header V2.3.2), never from the
fake's declarations; the cdef here is written from the reference's §2 tables, independently of the project's binding.
"""

from __future__ import annotations

import json
import platform
import struct
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cffi
import pytest

from tests.fake_rknn import (
    PROFILES,
    FakeRknnView,
    block_means,
    build_fake_rknn,
    expected_outputs,
    grid,
    model_text,
    to_fp16_bytes,
    write_model,
)

pytestmark = pytest.mark.skipif(platform.architecture()[0] != "64bit",
                                reason="the reference figures checked here are the LP64 ones")

# Appendix A: struct -> (sizeof, alignof, {field: offset}).
LAYOUT: dict[str, tuple[int, int, dict[str, int]]] = {
    "rknn_input_output_num": (8, 4, {"n_input": 0, "n_output": 4}),
    "rknn_tensor_attr": (376, 4, {
        "index": 0, "n_dims": 4, "dims": 8, "name": 72, "n_elems": 328, "size": 332, "fmt": 336, "type": 340,
        "qnt_type": 344, "fl": 348, "zp": 352, "scale": 356, "w_stride": 360, "size_with_stride": 364,
        "pass_through": 368, "h_stride": 372}),
    "rknn_input_range": (33040, 4, {
        "index": 0, "shape_number": 4, "fmt": 8, "name": 12, "dyn_range": 268, "n_dims": 33036}),
    "rknn_perf_detail": (16, 8, {"perf_data": 0, "data_len": 8}),
    "rknn_perf_run": (8, 8, {"run_duration": 0}),
    "rknn_sdk_version": (512, 1, {"api_version": 0, "drv_version": 256}),
    "rknn_mem_size": (64, 8, {
        "total_weight_size": 0, "total_internal_size": 4, "total_dma_allocated_size": 8, "total_sram_size": 16,
        "free_sram_size": 20, "reserved": 24}),
    "rknn_custom_string": (1024, 1, {"string": 0}),
    "rknn_tensor_mem": (40, 8, {
        "virt_addr": 0, "phys_addr": 8, "fd": 16, "offset": 20, "size": 24, "flags": 28, "priv_data": 32}),
    "rknn_input": (32, 8, {"index": 0, "buf": 8, "size": 16, "pass_through": 20, "type": 24, "fmt": 28}),
    "rknn_output": (24, 8, {"want_float": 0, "is_prealloc": 1, "index": 4, "buf": 8, "size": 16}),
    "rknn_init_extend": (136, 8, {
        "ctx": 0, "real_model_offset": 8, "real_model_size": 12, "model_buffer_fd": 16, "model_buffer_flags": 20,
        "reserved": 24}),
    "rknn_run_extend": (24, 8, {"frame_id": 0, "non_block": 8, "timeout_ms": 12, "fence_fd": 16}),
    "rknn_output_extend": (8, 8, {"frame_id": 0}),
}

CDEF = """
typedef uint64_t rknn_context;
typedef struct { uint32_t n_input; uint32_t n_output; } rknn_input_output_num;
typedef struct {
    uint32_t index; uint32_t n_dims; uint32_t dims[16]; char name[256]; uint32_t n_elems; uint32_t size;
    int fmt; int type; int qnt_type; int8_t fl; int32_t zp; float scale; uint32_t w_stride; uint32_t size_with_stride;
    uint8_t pass_through; uint32_t h_stride;
} rknn_tensor_attr;
typedef struct {
    uint32_t index; uint32_t shape_number; int fmt; char name[256]; uint32_t dyn_range[512][16]; uint32_t n_dims;
} rknn_input_range;
typedef struct { char* perf_data; uint64_t data_len; } rknn_perf_detail;
typedef struct { int64_t run_duration; } rknn_perf_run;
typedef struct { char api_version[256]; char drv_version[256]; } rknn_sdk_version;
typedef struct {
    uint32_t total_weight_size; uint32_t total_internal_size; uint64_t total_dma_allocated_size;
    uint32_t total_sram_size; uint32_t free_sram_size; uint32_t reserved[10];
} rknn_mem_size;
typedef struct { char string[1024]; } rknn_custom_string;
typedef struct {
    void* virt_addr; uint64_t phys_addr; int32_t fd; int32_t offset; uint32_t size; uint32_t flags; void* priv_data;
} rknn_tensor_mem;
typedef struct { uint32_t index; void* buf; uint32_t size; uint8_t pass_through; int type; int fmt; } rknn_input;
typedef struct { uint8_t want_float; uint8_t is_prealloc; uint32_t index; void* buf; uint32_t size; } rknn_output;
typedef struct {
    rknn_context ctx; int32_t real_model_offset; uint32_t real_model_size; int32_t model_buffer_fd;
    uint32_t model_buffer_flags; uint8_t reserved[112];
} rknn_init_extend;
typedef struct { uint64_t frame_id; int32_t non_block; int32_t timeout_ms; int32_t fence_fd; } rknn_run_extend;
typedef struct { uint64_t frame_id; } rknn_output_extend;

int rknn_init(rknn_context* context, void* model, uint32_t size, uint32_t flag, rknn_init_extend* extend);
int rknn_dup_context(rknn_context* context_in, rknn_context* context_out);
int rknn_destroy(rknn_context context);
int rknn_query(rknn_context context, int cmd, void* info, uint32_t size);
int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]);
int rknn_set_batch_core_num(rknn_context context, int core_num);
int rknn_set_core_mask(rknn_context context, int core_mask);
int rknn_run(rknn_context context, rknn_run_extend* extend);
int rknn_wait(rknn_context context, rknn_run_extend* extend);
int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend* extend);
int rknn_outputs_release(rknn_context context, uint32_t n_ouputs, rknn_output outputs[]);
rknn_tensor_mem* rknn_create_mem(rknn_context ctx, uint32_t size);
rknn_tensor_mem* rknn_create_mem2(rknn_context ctx, uint64_t size, uint64_t alloc_flags);
int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem* mem);
int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem* mem, rknn_tensor_attr* attr);
int rknn_mem_sync(rknn_context context, rknn_tensor_mem* mem, int mode);
"""

# Return codes (§1.2), query commands (§1.4), enums (§1.5), flags (§1.3).
SUCC, ERR_FAIL, ERR_PARAM_INVALID, ERR_MODEL_INVALID, ERR_CTX_INVALID = 0, -1, -5, -6, -7
(IN_OUT_NUM, INPUT_ATTR, OUTPUT_ATTR, PERF_DETAIL, PERF_RUN, SDK_VERSION, MEM_SIZE, CUSTOM_STRING, NATIVE_INPUT_ATTR,
 NATIVE_OUTPUT_ATTR, NATIVE_NHWC_INPUT_ATTR, NATIVE_NHWC_OUTPUT_ATTR, DEVICE_MEM_INFO, INPUT_DYNAMIC_RANGE,
 CURRENT_INPUT_ATTR, CURRENT_OUTPUT_ATTR, CURRENT_NATIVE_INPUT_ATTR, CURRENT_NATIVE_OUTPUT_ATTR, CMD_MAX) = range(19)
NCHW, NHWC, UNDEFINED = 0, 1, 3
FLOAT32, FLOAT16, INT8, UINT8 = 0, 1, 2, 3
QNT_AFFINE = 2
FLAG_COLLECT_PERF_MASK, FLAG_SHARE_WEIGHT_MEM, FLAG_COLLECT_MODEL_INFO_ONLY = 0x8, 0x20, 0x100

QUERY_STRUCT = {
    IN_OUT_NUM: "rknn_input_output_num", INPUT_ATTR: "rknn_tensor_attr", OUTPUT_ATTR: "rknn_tensor_attr",
    PERF_DETAIL: "rknn_perf_detail", PERF_RUN: "rknn_perf_run", SDK_VERSION: "rknn_sdk_version",
    CUSTOM_STRING: "rknn_custom_string", NATIVE_INPUT_ATTR: "rknn_tensor_attr", NATIVE_OUTPUT_ATTR: "rknn_tensor_attr",
    NATIVE_NHWC_INPUT_ATTR: "rknn_tensor_attr", NATIVE_NHWC_OUTPUT_ATTR: "rknn_tensor_attr",
}


class Rknn:
    """The fake loaded through a minimal cffi declaration, plus its test hooks."""

    def __init__(self, path: Path):
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        self.lib: Any = self.ffi.dlopen(str(path))
        self.view = FakeRknnView(path)
        self.contexts: list[int] = []

    def init(self, model: Path | bytes, flag: int = 0, extend: Any = None, *, expect: int = SUCC) -> int:
        ctx = self.ffi.new("rknn_context *")
        if isinstance(model, Path):
            path = self.ffi.new("char[]", str(model).encode())
            ret = self.lib.rknn_init(ctx, path, 0, flag, extend or self.ffi.NULL)
        else:
            buf = self.ffi.from_buffer(model)
            ret = self.lib.rknn_init(ctx, buf, len(model), flag, extend or self.ffi.NULL)
        assert ret == expect, self.view.last("rknn_init")
        if ret == SUCC:
            self.contexts.append(int(ctx[0]))
        return int(ctx[0])

    def query(self, ctx: int, cmd: int, struct_name: str, *, index: int | None = None, expect: int = SUCC) -> Any:
        info = self.ffi.new(f"{struct_name} *")
        if index is not None:
            info.index = index
        ret = self.lib.rknn_query(ctx, cmd, info, self.ffi.sizeof(struct_name))
        assert ret == expect, (cmd, ret)
        return info

    def attr(self, ctx: int, cmd: int, index: int) -> dict[str, Any]:
        a = self.query(ctx, cmd, "rknn_tensor_attr", index=index)
        return {"index": a.index, "n_dims": a.n_dims, "dims": list(a.dims)[:a.n_dims], "name": self.ffi.string(a.name),
                "n_elems": a.n_elems, "size": a.size, "fmt": a.fmt, "type": a.type, "qnt_type": a.qnt_type,
                "fl": a.fl, "zp": a.zp, "scale": a.scale, "w_stride": a.w_stride,
                "size_with_stride": a.size_with_stride, "pass_through": a.pass_through, "h_stride": a.h_stride,
                "rest_of_dims": list(a.dims)[a.n_dims:]}

    def set_input(self, ctx: int, data: bytes, *, type_: int = UINT8, fmt: int = NHWC, pass_through: int = 0,
                  size: int | None = None, expect: int = SUCC) -> None:
        inputs = self.ffi.new("rknn_input[1]")
        keep = self.ffi.from_buffer(data)
        inputs[0].index = 0
        inputs[0].buf = keep
        inputs[0].size = len(data) if size is None else size
        inputs[0].pass_through = pass_through
        inputs[0].type = type_
        inputs[0].fmt = fmt
        ret = self.lib.rknn_inputs_set(ctx, 1, inputs)
        assert ret == expect, self.view.last("rknn_inputs_set")

    def run(self, ctx: int, *, expect: int = SUCC) -> None:
        ret = self.lib.rknn_run(ctx, self.ffi.NULL)
        assert ret == expect, ret

    def get(self, ctx: int, n: int, *, want_float: int = 1, expect: int = SUCC) -> Any:
        outs = self.ffi.new(f"rknn_output[{n}]")
        for i in range(n):
            outs[i].want_float = want_float
        ret = self.lib.rknn_outputs_get(ctx, n, outs, self.ffi.NULL)
        assert ret == expect, self.view.last("rknn_outputs_get")
        return outs

    def floats(self, out: Any) -> array:
        values = array("f")
        values.frombytes(self.ffi.buffer(out.buf, out.size)[:])
        return values

    def release(self, ctx: int, outs: Any, n: int | None = None) -> None:
        assert self.lib.rknn_outputs_release(ctx, len(outs) if n is None else n, outs) == SUCC

    def destroy_all(self) -> None:
        for ctx in self.contexts:
            self.lib.rknn_destroy(ctx)
        self.contexts.clear()


@pytest.fixture(scope="module")
def lib_path() -> Path:
    return build_fake_rknn()


@pytest.fixture
def rknn(lib_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rknn]:
    for var in ("FAKE_RKNN_RECORD_DIR", "FAKE_RKNN_DUMP_DIR", "FAKE_RKNN_FAIL", "FAKE_RKNN_CRASH", "FAKE_RKNN_LOG",
                "RKNN_LOG_LEVEL", "FAKE_RKNN_RUN_MS", "FAKE_RKNN_LOAD_MS", "FAKE_RKNN_DRV_VERSION"):
        monkeypatch.delenv(var, raising=False)
    r = Rknn(lib_path)
    r.view.reset()
    yield r
    r.destroy_all()


def gradient_image(h: int, w: int) -> bytes:
    """An RGB uint8 HWC image whose channels differ, so a channel or layout mix-up changes every token."""
    return bytes(v for y in range(h) for x in range(w) for v in ((x * 7 + y) % 256, (y * 5 + 3) % 256, (x * y) % 256))


def hwc_to_chw(data: bytes, h: int, w: int, c: int) -> bytes:
    return bytes(data[(y * w + x) * c + k] for k in range(c) for y in range(h) for x in range(w))


# ------------------------------------------------------------------ layout


def test_layout_of_every_struct_is_appendix_a(rknn: Rknn) -> None:
    view = rknn.view
    assert view.sizeof("rknn_context") == 8
    for enum in ("rknn_query_cmd", "rknn_tensor_type", "rknn_tensor_qnt_type", "rknn_tensor_format",
                 "rknn_core_mask", "rknn_mem_sync_mode"):
        assert view.sizeof(enum) == 4, enum
    fields = 0
    for name, (size, align, offsets) in LAYOUT.items():
        assert view.sizeof(name) == size, name
        assert view.alignof(name) == align, name
        assert rknn.ffi.sizeof(name) == size and rknn.ffi.alignof(name) == align, f"the test's cdef: {name}"
        for field, offset in offsets.items():
            assert view.offsetof(name, field) == offset, f"{name}.{field}"
            assert rknn.ffi.offsetof(name, field) == offset, f"the test's cdef: {name}.{field}"
            fields += 1
    assert (len(LAYOUT), fields) == (14, 65)  # "checked 14 structs, 65 fields" (Appendix A)
    assert view.sizeof("no_such_struct") == -1 and view.offsetof("rknn_input", "nope") == -1


def test_the_older_symbol_set_lacks_the_newer_functions(tmp_path: Path) -> None:
    """The 1.5.2 build exports no rknn_mem_sync or rknn_create_mem2 (reference §1.6): a binding must bind lazily."""
    old = Rknn(build_fake_rknn("1.5.2"))
    new = Rknn(build_fake_rknn("2.3.2"))
    for name in ("rknn_init", "rknn_destroy", "rknn_query", "rknn_inputs_set", "rknn_run", "rknn_outputs_get",
                 "rknn_outputs_release", "rknn_set_core_mask", "rknn_dup_context", "rknn_set_batch_core_num",
                 "rknn_wait", "rknn_create_mem", "rknn_destroy_mem", "rknn_set_io_mem"):
        assert callable(getattr(old.lib, name)) and callable(getattr(new.lib, name)), name
    for name in ("rknn_mem_sync", "rknn_create_mem2"):
        assert callable(getattr(new.lib, name))
        with pytest.raises(AttributeError):
            getattr(old.lib, name)
    ctx = old.init(write_model(tmp_path / "m.rknn"))
    version = old.query(ctx, SDK_VERSION, "rknn_sdk_version")
    assert old.ffi.string(version.api_version).startswith(b"1.5.2 ")
    old.destroy_all()


# ------------------------------------------------------------------ init


def test_init_from_a_path_and_from_memory(rknn: Rknn, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path / "enc.rknn", "qwen2.5vl-3b")
    a = rknn.init(model)
    b = rknn.init(model.read_bytes())
    assert a != b and a > 2**32 and b > 2**32  # a binding that truncates the handle to 32 bits fails
    rec = rknn.view.last("rknn_init")
    assert rec["model"] == "buffer" and rec["size"] == len(model.read_bytes()) and rec["profile"] == "qwen2.5vl-3b"
    assert rec["extend"] is None and rec["ret"] == 0 and rec["ctx"] == b
    out = capfd.readouterr().out  # log lines go to stdout, as a hostile runtime's would
    assert "I RKNN: [" in out and "librknnrt version: 2.3.2 (429f97ae6b@2025-04-09T09:09:27)" in out
    assert "RKNN Driver Information, version: 0.9.8" in out
    assert rknn.view.live_contexts() >= 2


@pytest.mark.parametrize(("text", "message"), [
    (b"RKNN\x00\x01binary", "parseRKNN: invalid RKNN_MAGIC!"),
    (model_text("no-such-profile").encode(), "unknown profile"),
    (model_text("tiny", colour="blue").encode(), "unknown key 'colour'"),
    (model_text("tiny", output_type="INT64").encode(), "bad value for output_type"),
    (model_text("tiny", input_dims="1,0,3").encode(), "bad value for input_dims"),
])
def test_init_rejects_bad_models_with_model_invalid(rknn: Rknn, text: bytes, message: str,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    rknn.init(text, expect=ERR_MODEL_INVALID)
    out = capfd.readouterr().out
    assert message in out and "E RKNN: [" in out and "rknn_init, load model failed!" in out


def test_init_argument_checks(rknn: Rknn, tmp_path: Path) -> None:
    ffi, lib = rknn.ffi, rknn.lib
    model = write_model(tmp_path / "m.rknn")
    path = ffi.new("char[]", str(model).encode())
    assert lib.rknn_init(ffi.NULL, path, 0, 0, ffi.NULL) == ERR_PARAM_INVALID
    missing = ffi.new("char[]", str(tmp_path / "missing.rknn").encode())
    assert lib.rknn_init(ffi.new("rknn_context *"), missing, 0, 0, ffi.NULL) == ERR_MODEL_INVALID
    # RKNN_FLAG_SHARE_WEIGHT_MEM needs extend->ctx naming a live context.
    rknn.init(model, FLAG_SHARE_WEIGHT_MEM, expect=ERR_PARAM_INVALID)
    ext = ffi.new("rknn_init_extend *")
    ext.ctx = rknn.init(model)
    rknn.init(model, FLAG_SHARE_WEIGHT_MEM, ext)
    assert rknn.view.last("rknn_init")["extend"]["ctx"] == ext.ctx


def test_init_extend_real_model_window(rknn: Rknn) -> None:
    """real_model_offset/real_model_size select the model inside a bigger buffer (header 1.4.0+ fields)."""
    inner = model_text("tiny-deepstack").encode()
    blob = b"JUNK" * 5 + inner + b"TAIL"
    ext = rknn.ffi.new("rknn_init_extend *")
    ext.real_model_offset, ext.real_model_size = 20, len(inner)
    ctx = rknn.init(blob, 0, ext)
    assert rknn.query(ctx, IN_OUT_NUM, "rknn_input_output_num").n_output == 4
    ext.real_model_size = len(blob)
    rknn.init(blob, 0, ext, expect=ERR_MODEL_INVALID)


# ------------------------------------------------------------------ query


@pytest.mark.parametrize("name", list(PROFILES))
def test_query_replies_of_each_profile(rknn: Rknn, tmp_path: Path, name: str) -> None:
    prof = PROFILES[name]
    ctx = rknn.init(write_model(tmp_path / "m.rknn", name))
    io = rknn.query(ctx, IN_OUT_NUM, "rknn_input_output_num")
    assert (io.n_input, io.n_output) == (1, prof.n_outputs)
    a = rknn.attr(ctx, INPUT_ATTR, 0)
    n_elems = 1
    for d in prof.input_dims:
        n_elems *= d
    elem = {FLOAT16: 2, INT8: 1}[prof.input_type]
    h, w, _ = prof.hwc
    assert a == {
        "index": 0, "n_dims": 4, "dims": list(prof.input_dims), "name": prof.input_name.encode(), "n_elems": n_elems,
        "size": n_elems * elem, "fmt": prof.input_fmt, "type": prof.input_type, "qnt_type": QNT_AFFINE, "fl": 0,
        "zp": -128 if name == "tiny-int8" else 0, "scale": 0.0078125 if name == "tiny-int8" else 1.0,
        "w_stride": w, "size_with_stride": n_elems * elem, "pass_through": 0, "h_stride": 0, "rest_of_dims": [0] * 12}
    assert h == w
    for j in range(prof.n_outputs):
        o = rknn.attr(ctx, OUTPUT_ATTR, j)
        out_elems = prof.tokens * prof.width
        assert o["index"] == j and o["dims"] == list(prof.output_dims) and o["n_dims"] == len(prof.output_dims)
        assert o["n_elems"] == out_elems and o["size"] == out_elems * (2 if prof.output_type == FLOAT16 else 1)
        assert o["fmt"] == UNDEFINED and o["type"] == prof.output_type and o["w_stride"] == 0
        assert o["name"] == f"output{j}".encode() and o["size_with_stride"] == o["size"]
        assert rknn.attr(ctx, NATIVE_OUTPUT_ATTR, j) == o == rknn.attr(ctx, NATIVE_NHWC_OUTPUT_ATTR, j)
    assert rknn.attr(ctx, NATIVE_INPUT_ATTR, 0) == a
    nhwc = rknn.attr(ctx, NATIVE_NHWC_INPUT_ATTR, 0)
    assert nhwc["fmt"] == NHWC and nhwc["dims"] == [1, *prof.hwc]


def test_reference_numbers_of_the_real_profiles(rknn: Rknn, tmp_path: Path) -> None:
    """The figures the reference quotes from logs: 392x392x3 FP16 = 460992 elements, 921984 bytes; [196,2048] FP16
    = 401408 elements, 802816 bytes (rknn-llm#336)."""
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "qwen2.5vl-3b"))
    a, o = rknn.attr(ctx, INPUT_ATTR, 0), rknn.attr(ctx, OUTPUT_ATTR, 0)
    assert (a["n_elems"], a["size"], a["w_stride"], a["size_with_stride"]) == (460992, 921984, 392, 921984)
    assert (o["n_elems"], o["size"]) == (401408, 802816)
    ctx = rknn.init(write_model(tmp_path / "i.rknn", "internvl3-1b"))
    assert rknn.attr(ctx, OUTPUT_ATTR, 0)["dims"] == [1, 256, 896]
    ctx = rknn.init(write_model(tmp_path / "q.rknn", "qwen3vl-2b"))
    assert [rknn.attr(ctx, OUTPUT_ATTR, j)["dims"] for j in range(4)] == [[196, 2048]] * 4


def test_query_sizes_below_the_struct_are_param_invalid(rknn: Rknn, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    ctx = rknn.init(write_model(tmp_path / "m.rknn"), FLAG_COLLECT_PERF_MASK)
    info = rknn.ffi.new("char[40000]")
    for cmd, name in QUERY_STRUCT.items():
        size = rknn.ffi.sizeof(name)
        assert rknn.lib.rknn_query(ctx, cmd, info, size - 1) == ERR_PARAM_INVALID, name
        assert f"info_len({size - 1}) < sizeof({name})({size})!" in capfd.readouterr().out
    # The 1.2.0 header's 372-byte rknn_tensor_attr against a newer runtime (rockchip-linux/rknn-toolkit2#170).
    assert rknn.lib.rknn_query(ctx, INPUT_ATTR, info, 372) == ERR_PARAM_INVALID
    assert "info_len(372) < sizeof(rknn_tensor_attr)(376)!" in capfd.readouterr().out
    # MEM_SIZE needs only 8 bytes (the struct of SDK <= 1.3) and then writes only those.
    mem = rknn.ffi.new("uint8_t[64]", [0xAB] * 64)
    assert rknn.lib.rknn_query(ctx, MEM_SIZE, mem, 7) == ERR_PARAM_INVALID
    assert rknn.lib.rknn_query(ctx, MEM_SIZE, mem, 8) == SUCC
    assert list(mem)[8:] == [0xAB] * 56 and list(mem)[:8] != [0xAB] * 8
    assert rknn.lib.rknn_query(ctx, IN_OUT_NUM, rknn.ffi.NULL, 8) == ERR_PARAM_INVALID
    assert rknn.lib.rknn_query(ctx, CMD_MAX, info, 40000) == ERR_PARAM_INVALID
    assert "cmd = 18 is not in [0, 17]!" in capfd.readouterr().out
    assert rknn.lib.rknn_query(ctx, -1, info, 40000) == ERR_PARAM_INVALID
    rec = rknn.view.last("rknn_query")
    assert (rec["cmd"], rec["size"], rec["ret"]) == (-1, 40000, ERR_PARAM_INVALID)


def test_query_other_commands(rknn: Rknn, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.rknn", "tiny", custom_string="made by the fake", weight_size=1048576)
    ctx = rknn.init(model)
    ffi = rknn.ffi
    v = rknn.query(ctx, SDK_VERSION, "rknn_sdk_version")
    assert ffi.string(v.api_version) == b"2.3.2 (429f97ae6b@2025-04-09T09:09:27)"
    assert ffi.string(v.drv_version) == b"0.9.8"
    assert ffi.string(rknn.query(ctx, CUSTOM_STRING, "rknn_custom_string").string) == b"made by the fake"
    m = rknn.query(ctx, MEM_SIZE, "rknn_mem_size")
    internal = 28 * 28 * 3 * 2 + 4 * 8 * 2
    assert (m.total_weight_size, m.total_internal_size) == (1048576, internal)
    assert m.total_dma_allocated_size == (1048576 + internal + 4095) // 4096 * 4096
    assert rknn.query(ctx, PERF_RUN, "rknn_perf_run").run_duration == 0  # no run yet
    rknn.query(ctx, PERF_DETAIL, "rknn_perf_detail", expect=ERR_PARAM_INVALID)  # needs COLLECT_PERF_MASK
    for cmd in (INPUT_DYNAMIC_RANGE,):
        rknn.query(ctx, cmd, "rknn_input_range", expect=ERR_PARAM_INVALID)  # static model
    for cmd in (CURRENT_INPUT_ATTR, CURRENT_OUTPUT_ATTR, CURRENT_NATIVE_INPUT_ATTR, CURRENT_NATIVE_OUTPUT_ATTR):
        rknn.query(ctx, cmd, "rknn_tensor_attr", index=0, expect=ERR_PARAM_INVALID)
    rknn.query(ctx, DEVICE_MEM_INFO, "rknn_tensor_mem", expect=ERR_PARAM_INVALID)
    rknn.query(ctx, INPUT_ATTR, "rknn_tensor_attr", index=1, expect=ERR_PARAM_INVALID)
    rknn.query(ctx, OUTPUT_ATTR, "rknn_tensor_attr", index=1, expect=ERR_PARAM_INVALID)
    assert rknn.view.last("rknn_query")["index"] == 1
    assert rknn.view.count("RKNN_QUERY_OUTPUT_ATTR") == 1

    perf = rknn.init(model, FLAG_COLLECT_PERF_MASK)
    rknn.set_input(perf, gradient_image(28, 28))
    rknn.run(perf)
    assert rknn.query(perf, PERF_RUN, "rknn_perf_run").run_duration > 0
    detail = rknn.query(perf, PERF_DETAIL, "rknn_perf_detail")
    text = ffi.string(detail.perf_data)
    assert len(text) == detail.data_len and b"frame 1" in text


def test_model_info_only_context(rknn: Rknn, tmp_path: Path) -> None:
    """RKNN_FLAG_COLLECT_MODEL_INFO_ONLY: only RKNN_QUERY_MEM_SIZE works, rknn_run is denied (§1.3)."""
    ctx = rknn.init(write_model(tmp_path / "m.rknn"), FLAG_COLLECT_MODEL_INFO_ONLY)
    rknn.query(ctx, MEM_SIZE, "rknn_mem_size")
    rknn.query(ctx, IN_OUT_NUM, "rknn_input_output_num", expect=ERR_PARAM_INVALID)
    rknn.run(ctx, expect=ERR_PARAM_INVALID)


# ------------------------------------------------------------------ inputs, run, outputs


def test_round_trip_outputs_follow_the_formula(rknn: Rknn, tmp_path: Path) -> None:
    prof = PROFILES["tiny"]
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny"))
    image = gradient_image(28, 28)
    rknn.set_input(ctx, image)
    rknn.run(ctx)
    outs = rknn.get(ctx, 1)
    assert outs[0].size == 4 * 8 * 4 and outs[0].index == 0
    expected = expected_outputs(image, prof.hwc, 1, prof.tokens, prof.width)
    assert rknn.floats(outs[0]) == expected[0]
    # Spot-check the formula by hand: token 3 is the bottom-right 14x14 block; channel 1 is green.
    assert grid(4) == (2, 2)
    green = [image[(y * 28 + x) * 3 + 1] for y in range(14, 28) for x in range(14, 28)]
    by_hand = sum(green) / len(green) / 255.0 + 3 * 0.01 + 4 * 0.001  # t = 3, d = 4 (channel 4 % 3 = 1, green)
    assert rknn.floats(outs[0])[3 * 8 + 4] == struct.unpack("f", struct.pack("f", by_hand))[0]
    rknn.release(ctx, outs)
    assert rknn.view.unreleased() == 0
    # Native FP16 (want_float=0): the model's own type, attr.size bytes, round-to-nearest-even of the float32s.
    native = rknn.get(ctx, 1, want_float=0)
    assert native[0].size == 4 * 8 * 2
    assert rknn.ffi.buffer(native[0].buf, native[0].size)[:] == to_fp16_bytes(expected[0])
    rknn.release(ctx, native)
    rec = rknn.view.last("rknn_inputs_set")
    assert rec["inputs"][0] == {"index": 0, "buf": True, "size": len(image), "pass_through": 0, "type": UINT8,
                                "fmt": NHWC, "fnv1a": fnv1a(image), "head": list(image[:16])}
    assert rknn.view.last_input(0) == image
    assert rknn.view.last("rknn_run") == {"ctx": ctx, "extend": None, "frame_id": 1, "ret": 0}


def fnv1a(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return f"{h:016x}"


def test_layouts_and_types_of_the_callers_buffer(rknn: Rknn, tmp_path: Path) -> None:
    """The runtime converts the caller's type and layout: the same picture as uint8 NHWC, uint8 NCHW, float32 NHWC
    or FP16 pass-through gives the same embeddings; a mislabelled layout does not."""
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny"))
    image = gradient_image(28, 28)

    def embeddings() -> array:
        rknn.run(ctx)
        outs = rknn.get(ctx, 1)
        values = rknn.floats(outs[0])
        rknn.release(ctx, outs)
        return values

    rknn.set_input(ctx, image)
    reference = embeddings()
    rknn.set_input(ctx, hwc_to_chw(image, 28, 28, 3), fmt=NCHW)
    assert embeddings() == reference
    rknn.set_input(ctx, array("f", list(image)).tobytes(), type_=FLOAT32)
    assert embeddings() == reference
    rknn.set_input(ctx, b"".join(struct.pack("<e", v) for v in image), pass_through=1)
    assert embeddings() == reference
    rknn.set_input(ctx, hwc_to_chw(image, 28, 28, 3), fmt=NHWC)  # NCHW bytes labelled NHWC
    assert embeddings() != reference
    # An NCHW model reads its H, W, C from dims [1,C,H,W].
    nchw = rknn.init(write_model(tmp_path / "n.rknn", "tiny", layout="NCHW"))
    assert rknn.attr(nchw, INPUT_ATTR, 0)["dims"] == [1, 3, 28, 28]
    rknn.set_input(nchw, image)
    rknn.run(nchw)
    outs = rknn.get(nchw, 1)
    assert rknn.floats(outs[0]) == reference
    rknn.release(nchw, outs)


def test_deepstack_outputs_are_filled_by_position(rknn: Rknn, tmp_path: Path) -> None:
    """Four outputs, each offset by its number j; `index` is overwritten by the position (the demo leaves it 0)."""
    prof = PROFILES["tiny-deepstack"]
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny-deepstack"))
    image = gradient_image(32, 32)
    rknn.set_input(ctx, image)
    rknn.run(ctx)
    outs = rknn.get(ctx, 4)
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert [rknn.floats(o) for o in outs] == expected_outputs(image, prof.hwc, 4, prof.tokens, prof.width)
    assert [e["index"] for e in rknn.view.last("rknn_outputs_get")["outputs"]] == [0, 0, 0, 0]
    rknn.release(ctx, outs)
    assert rknn.view.unreleased() == 0


def test_qwen3vl_profile_at_full_size(rknn: Rknn, tmp_path: Path) -> None:
    prof = PROFILES["qwen3vl-2b"]
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "qwen3vl-2b"))
    image = gradient_image(448, 448)
    rknn.set_input(ctx, image)
    rknn.run(ctx)
    outs = rknn.get(ctx, 4)
    assert [o.size for o in outs] == [196 * 2048 * 4] * 4
    means = block_means(image, 448, 448, 3, prof.tokens)
    for j, out in enumerate(outs):
        values = rknn.floats(out)
        for t, d in ((0, 0), (0, 2047), (13, 1), (100, 5), (195, 2046)):
            v = means[t][d % 3] / 255.0
            v += j
            v += t * 0.01
            v += d * 0.001
            assert values[t * 2048 + d] == struct.unpack("f", struct.pack("f", v))[0], (j, t, d)
    rknn.release(ctx, outs)


def test_int8_native_outputs_are_quantised(rknn: Rknn, tmp_path: Path) -> None:
    prof = PROFILES["tiny-int8"]
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny-int8"))
    pixels = bytes(range(0, 192))
    rknn.set_input(ctx, pixels, type_=INT8)
    rknn.run(ctx)
    outs = rknn.get(ctx, 1, want_float=0)
    signed = [b - 256 if b > 127 else b for b in pixels]
    expected = expected_outputs(signed, prof.hwc, 1, prof.tokens, prof.width)[0]
    want = [max(-128, min(127, round(v / 0.05000000074505806) - 10)) for v in expected]
    got = list(struct.unpack(f"{outs[0].size}b", rknn.ffi.buffer(outs[0].buf, outs[0].size)[:]))
    assert outs[0].size == 32 and got == want
    rknn.release(ctx, outs)


def test_inputs_set_checks(rknn: Rknn, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "qwen3vl-2b"))
    image = bytes(448 * 448 * 3)
    rknn.run(ctx, expect=ERR_PARAM_INVALID)  # nothing set yet
    rknn.set_input(ctx, image, size=len(image) - 1, expect=ERR_PARAM_INVALID)
    assert "param input size(602111) < model input size(602112)" in capfd.readouterr().out
    # A zeroed type means FLOAT32: four bytes per element (rockchip-linux/rknpu2#9).
    rknn.set_input(ctx, image, type_=FLOAT32, expect=ERR_PARAM_INVALID)
    assert "param input size(602112) < model input size(2408448)" in capfd.readouterr().out
    # pass_through: the model's own size (FP16).
    rknn.set_input(ctx, image, pass_through=1, expect=ERR_PARAM_INVALID)
    rknn.set_input(ctx, image + image, pass_through=1)
    rknn.set_input(ctx, image, fmt=UNDEFINED, expect=ERR_PARAM_INVALID)
    rknn.set_input(ctx, image, type_=99, expect=ERR_PARAM_INVALID)
    inputs = rknn.ffi.new("rknn_input[2]")
    assert rknn.lib.rknn_inputs_set(ctx, 2, inputs) == ERR_PARAM_INVALID
    assert "param input num(2) > model input num(1)" in capfd.readouterr().out
    assert rknn.lib.rknn_inputs_set(ctx, 0, inputs) == ERR_PARAM_INVALID
    assert rknn.lib.rknn_inputs_set(ctx, 1, inputs) == ERR_PARAM_INVALID  # buf NULL
    assert rknn.lib.rknn_inputs_set(ctx, 1, rknn.ffi.NULL) == ERR_PARAM_INVALID
    keep = rknn.ffi.from_buffer(image)
    inputs[0].index, inputs[0].buf, inputs[0].size, inputs[0].type, inputs[0].fmt = 1, keep, len(image), UINT8, NHWC
    assert rknn.lib.rknn_inputs_set(ctx, 1, inputs) == ERR_PARAM_INVALID  # index 1 of a 1-input model
    # Two inputs when the model has two; the outputs come from input 0.
    two = rknn.init(write_model(tmp_path / "two.rknn", "tiny", n_inputs=2))
    assert rknn.attr(two, INPUT_ATTR, 1)["name"] == b"pixel_1"
    small = gradient_image(28, 28)
    data = rknn.ffi.from_buffer(small)
    pair = rknn.ffi.new("rknn_input[2]")
    for i in range(2):
        pair[i].index, pair[i].buf, pair[i].size, pair[i].type, pair[i].fmt = 1 - i, data, len(small), UINT8, NHWC
    assert rknn.lib.rknn_inputs_set(two, 2, pair) == SUCC
    rknn.run(two)
    rknn.release(two, rknn.get(two, 1))


def test_outputs_get_checks(rknn: Rknn, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny-deepstack"))
    rknn.set_input(ctx, gradient_image(32, 32))
    rknn.get(ctx, 4, expect=ERR_PARAM_INVALID)  # no run yet
    rknn.run(ctx)
    rknn.get(ctx, 1, expect=ERR_PARAM_INVALID)
    assert "param output num(1) != model output num(4)" in capfd.readouterr().out
    rknn.get(ctx, 5, expect=ERR_PARAM_INVALID)
    assert rknn.lib.rknn_outputs_get(ctx, 4, rknn.ffi.NULL, rknn.ffi.NULL) == ERR_PARAM_INVALID
    # Pre-allocated buffers: too small is -5 and nothing is allocated for the others.
    outs = rknn.ffi.new("rknn_output[4]")
    bufs = [rknn.ffi.new("float[32]") for _ in range(4)]
    for i in range(4):
        outs[i].want_float, outs[i].is_prealloc, outs[i].buf, outs[i].size = 1, 1, bufs[i], 128
    outs[2].size = 127
    assert rknn.lib.rknn_outputs_get(ctx, 4, outs, rknn.ffi.NULL) == ERR_PARAM_INVALID
    assert "output[2] buf size error, size = 127, expected size = 128 if want_float = 1" in capfd.readouterr().out
    assert rknn.view.unreleased() == 0
    outs[2].size = 128
    ext = rknn.ffi.new("rknn_output_extend *")
    assert rknn.lib.rknn_outputs_get(ctx, 4, outs, ext) == SUCC
    assert ext.frame_id == 1 and [o.index for o in outs] == [0, 1, 2, 3]
    fresh = rknn.get(ctx, 4)
    assert [list(b) for b in bufs] == [list(rknn.floats(o)) for o in fresh]
    assert rknn.view.unreleased() == 4  # the four of the rknn.get above; the pre-allocated ones are the caller's


def test_unreleased_outputs_are_counted(rknn: Rknn, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny-deepstack"))
    rknn.set_input(ctx, gradient_image(32, 32))
    rknn.run(ctx)
    outs = rknn.get(ctx, 4)
    assert rknn.view.unreleased() == 4
    rknn.release(ctx, outs, 1)  # the vendor demo's bug: rknn_outputs_release(ctx, 1, outputs)
    assert rknn.view.unreleased() == 3
    assert rknn.view.last("rknn_outputs_release")["released"] == 1
    rknn.release(ctx, outs)  # the first again (already freed) and the other three
    assert rknn.view.unreleased() == 0 and rknn.view.count("rknn_bad_release") == 1
    leaked = rknn.get(ctx, 4)
    assert leaked[0].buf != rknn.ffi.NULL
    before = rknn.view.live_contexts()
    assert rknn.lib.rknn_destroy(ctx) == SUCC
    rknn.contexts.remove(ctx)
    assert "4 output buffer(s) from rknn_outputs_get were never released" in capfd.readouterr().out
    assert rknn.view.unreleased() == 4  # destroy frees them but does not forgive them
    assert rknn.view.live_contexts() == before - 1
    assert rknn.view.last("rknn_destroy") == {"ctx": ctx, "unreleased_outputs": 4, "ret": 0}
    rknn.view.reset()
    assert rknn.view.unreleased() == 0


# ------------------------------------------------------------------ contexts, cores, memory


def test_contexts_dup_destroy_and_core_masks(rknn: Rknn, tmp_path: Path) -> None:
    ffi, lib = rknn.ffi, rknn.lib
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny"))
    pin, pout = ffi.new("rknn_context *", ctx), ffi.new("rknn_context *")
    assert lib.rknn_dup_context(pin, pout) == SUCC
    dup = int(pout[0])
    rknn.contexts.append(dup)
    assert dup not in (0, ctx) and rknn.attr(dup, INPUT_ATTR, 0) == rknn.attr(ctx, INPUT_ATTR, 0)
    assert lib.rknn_dup_context(ffi.NULL, pout) == ERR_PARAM_INVALID
    for mask, ret in ((0, SUCC), (1, SUCC), (2, SUCC), (4, SUCC), (3, SUCC), (7, SUCC), (0xFFFF, SUCC),
                      (5, ERR_FAIL), (0x10000, ERR_FAIL)):
        assert lib.rknn_set_core_mask(ctx, mask) == ret, mask
    rk3576 = rknn.init(write_model(tmp_path / "two.rknn", "tiny", npu_cores=2))
    assert [lib.rknn_set_core_mask(rk3576, m) for m in (3, 4, 7)] == [SUCC, ERR_FAIL, ERR_FAIL]
    single = rknn.init(write_model(tmp_path / "one.rknn", "tiny", npu_cores=1, platform="rk3562"))
    assert lib.rknn_set_core_mask(single, 0) == ERR_FAIL
    assert lib.rknn_set_batch_core_num(ctx, 2) == SUCC and lib.rknn_set_batch_core_num(ctx, 0) == ERR_PARAM_INVALID
    assert lib.rknn_wait(ctx, ffi.NULL) == ERR_FAIL  # unsupported on every platform (Table 4-1)
    assert lib.rknn_destroy(dup) == SUCC
    rknn.contexts.remove(dup)
    for call in (lambda c: lib.rknn_destroy(c), lambda c: lib.rknn_run(c, ffi.NULL),
                 lambda c: lib.rknn_query(c, IN_OUT_NUM, ffi.new("rknn_input_output_num *"), 8),
                 lambda c: lib.rknn_set_core_mask(c, 0), lambda c: lib.rknn_outputs_release(c, 0, ffi.NULL)):
        assert call(dup) == ERR_CTX_INVALID
        assert call(12345) == ERR_CTX_INVALID
    assert lib.rknn_dup_context(ffi.new("rknn_context *", dup), pout) == ERR_CTX_INVALID
    # The duplicate is gone, the original still works.
    rknn.set_input(ctx, gradient_image(28, 28))
    rknn.run(ctx)


def test_memory_api(rknn: Rknn, tmp_path: Path) -> None:
    ffi, lib = rknn.ffi, rknn.lib
    ctx = rknn.init(write_model(tmp_path / "m.rknn"))
    mem = lib.rknn_create_mem(ctx, 1024)
    assert mem != ffi.NULL and mem.size == 1024 and mem.virt_addr != ffi.NULL
    attr = rknn.query(ctx, NATIVE_INPUT_ATTR, "rknn_tensor_attr", index=0)
    assert lib.rknn_set_io_mem(ctx, mem, attr) == SUCC
    assert lib.rknn_mem_sync(ctx, mem, 1) == SUCC
    assert lib.rknn_destroy_mem(ctx, mem) == SUCC
    mem2 = lib.rknn_create_mem2(0, 64, 0)  # ctx 0: RKNN_MEM_FLAG_ALLOC_NO_CONTEXT
    assert mem2 != ffi.NULL and lib.rknn_destroy_mem(0, mem2) == SUCC
    assert rknn.view.count("rknn_mem_created") == rknn.view.count("rknn_mem_destroyed") == 2


# ------------------------------------------------------------------ behaviour for the server's tests


def test_records_and_dumps_go_to_directories(rknn: Rknn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records, dumps = tmp_path / "records", tmp_path / "dumps"
    records.mkdir()
    dumps.mkdir()
    monkeypatch.setenv("FAKE_RKNN_RECORD_DIR", str(records))
    monkeypatch.setenv("FAKE_RKNN_DUMP_DIR", str(dumps))
    files = FakeRknnView(rknn.view.path, records)
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny-nchw"))
    image = hwc_to_chw(gradient_image(28, 28), 28, 28, 3)
    rknn.set_input(ctx, image, fmt=NCHW)
    rknn.run(ctx)
    outs = rknn.get(ctx, 1)
    assert files.unreleased() == 1
    rknn.release(ctx, outs)
    assert files.unreleased() == 0
    assert files.last("rknn_init")["profile"] == "tiny-nchw" and files.count("rknn_run") == 1
    assert (dumps / "input0.bin").read_bytes() == image
    meta = json.loads((dumps / "input0.json").read_text())
    assert meta == {"ctx": ctx, "index": 0, "size": len(image), "pass_through": 0, "type": UINT8, "fmt": NCHW}


def test_log_stream_and_level(rknn: Rknn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capfd: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path / "m.rknn")
    monkeypatch.setenv("FAKE_RKNN_LOG", "stderr")
    rknn.init(model)
    out, err = capfd.readouterr()
    assert out == "" and "I RKNN: [" in err
    monkeypatch.setenv("RKNN_LOG_LEVEL", "0")
    rknn.init(model)
    rknn.init(b"garbage", expect=ERR_MODEL_INVALID)
    out, err = capfd.readouterr()
    assert "I RKNN" not in err and "E RKNN: [" in err


def test_failure_injection(rknn: Rknn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny", fail="rknn_run,rknn_outputs_get"))
    rknn.set_input(ctx, gradient_image(28, 28))
    rknn.run(ctx, expect=ERR_FAIL)
    rknn.init(write_model(tmp_path / "f.rknn", "tiny", fail="rknn_init"), expect=ERR_MODEL_INVALID)
    monkeypatch.setenv("FAKE_RKNN_FAIL", "rknn_query")
    ok = rknn.init(write_model(tmp_path / "ok.rknn"))
    rknn.query(ok, IN_OUT_NUM, "rknn_input_output_num", expect=ERR_FAIL)


def test_one_context_used_by_two_threads_fails(rknn: Rknn, tmp_path: Path) -> None:
    """Sharing a context across threads is a binding bug ("failed to submit", rknn-toolkit2#531): the fake says so."""
    ctx = rknn.init(write_model(tmp_path / "m.rknn", "tiny", run_ms=400))
    rknn.set_input(ctx, gradient_image(28, 28))
    results: list[int] = []
    runner = threading.Thread(target=lambda: results.append(rknn.lib.rknn_run(ctx, rknn.ffi.NULL)))
    runner.start()
    time.sleep(0.15)
    io = rknn.ffi.new("rknn_input_output_num *")
    assert rknn.lib.rknn_query(ctx, IN_OUT_NUM, io, 8) == ERR_FAIL
    runner.join()
    assert results == [SUCC] and rknn.view.count("rknn_concurrent_use") == 1
    assert rknn.lib.rknn_query(ctx, IN_OUT_NUM, io, 8) == SUCC
