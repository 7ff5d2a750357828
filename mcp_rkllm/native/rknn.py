"""librknnrt.so (the RKNN runtime) as typed Python calls: every `lib.rknn_*` call, 1:1 with rknn_api.h.

`RknnLibrary.open()` finds the library like librkllmrt (`--rknn-library` / `RKNN_LIB_PATH`, then `/usr/lib`,
`/usr/local/lib`, `./lib`, the linker path) and dlopens it with the 2.3.2 declarations (`abi.rknn`). Each
function is looked up when first called, so an older runtime without, say, `rknn_set_batch_core_num` still
loads, and calling that one is NOT_SUPPORTED naming it. `RknnLibrary.init()` gives an `RknnContext`, whose
methods are the context's C functions; they take and return plain Python data (dicts, bytes, floats), never
cdata. A non-zero return code is RKNN_CALL_FAILED (or the retryable RKNN_NPU_UNAVAILABLE for a timeout, an
unavailable device or a failed allocation) carrying the code's C name. Every output buffer the runtime hands
out is copied and released inside `outputs_get`, errors included. One context is used by one thread at a
time (a lock per context); `dup_context()` gives another for parallel use.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cffi

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.native.abi.rknn import (
    CDEF,
    CORE_MASKS,
    ELEMENT_SIZES,
    FUNCTIONS,
    INIT_FLAGS,
    QNT_TYPES,
    QUERY_CMDS,
    QUERY_STRUCTS,
    RETURN_CODES,
    TENSOR_FORMATS,
    TENSOR_TYPES,
)
from mcp_rkllm.native.binding import find_library

LIBRARY_NAME = "librknnrt.so"

#: Return codes that say "the NPU could not serve now" (timeout, device unavailable, allocation failed).
RETRYABLE_CODES = frozenset({-2, -3, -4})

#: Init flags that hand memory management to the caller (the zero-copy memory API, which this binding does
#: not expose): with them the runtime would wait for memory or fences nobody gives it.
UNSUPPORTED_FLAGS: dict[str, int] = {
    name: INIT_FLAGS[name] for name in (
        "RKNN_FLAG_MEM_ALLOC_OUTSIDE", "RKNN_FLAG_FENCE_IN_OUTSIDE", "RKNN_FLAG_FENCE_OUT_OUTSIDE",
        "RKNN_FLAG_INTERNAL_ALLOC_OUTSIDE", "RKNN_FLAG_MODEL_BUFFER_ZERO_COPY", "RKNN_MEM_FLAG_ALLOC_NO_CONTEXT")
}

#: The api_version format of RKNN_QUERY_SDK_VERSION, e.g. "2.3.2 (429f97ae6b@2025-04-09T09:09:27)".
_SDK_VERSION_RE = re.compile(rb"(\d+\.\d+\.\d+(?:b\d+)?) \([0-9a-f]{6,40}@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\)")

_ATTR_QUERIES = frozenset(cmd for cmd, struct in QUERY_STRUCTS.items() if struct == "rknn_tensor_attr")


# --------------------------------------------------------------------------- names, codes, errors


def rc_name(rc: int) -> str:
    """The C name of an RKNN return code (`-5` -> `RKNN_ERR_PARAM_INVALID`)."""
    return RETURN_CODES.get(rc, (f"RKNN_ERR_UNKNOWN({rc})", ""))[0]


def rc_error(function: str, rc: int, detail: str = "") -> RkllmError:
    """The table error for a non-zero return code of `function`: its C name and meaning travel with it."""
    name, meaning = RETURN_CODES.get(rc, (f"RKNN_ERR_UNKNOWN({rc})", "a code rknn_api.h does not define"))
    code = "RKNN_NPU_UNAVAILABLE" if rc in RETRYABLE_CODES else "RKNN_CALL_FAILED"
    return RkllmError(code, function=function, rc=rc, rc_name=name, meaning=meaning, detail=detail)


def _invalid(function: str, detail: str) -> RkllmError:
    return RkllmError("INVALID_PARAMS", function=function, detail=detail)


def enum_value(value: int | str, table: dict[str, int], what: str, function: str) -> int:
    """An enum argument given by its C name (any case) or its number, as the number."""
    if isinstance(value, bool):
        raise _invalid(function, f"{what} must be a C name or a number, not {value!r}")
    if isinstance(value, int):
        if not 0 <= value < 1 << 31:
            raise _invalid(function, f"{what} {value} is out of range")
        return value
    if isinstance(value, str):
        number = table.get(value.strip().upper())
        if number is not None:
            return number
        raise _invalid(function, f"{what} {value!r} is not one of {', '.join(table)}")
    raise _invalid(function, f"{what} must be a C name or a number, not {type(value).__name__}")


def enum_name(value: int, table: dict[str, int]) -> str | int:
    """The first C name of `value` in `table`, or the number itself when the header has no name for it."""
    return next((name for name, number in table.items() if number == value), value)


def query_cmd(cmd: int | str) -> int:
    """An rknn_query cmd by C name (`RKNN_QUERY_SDK_VERSION`) or number, checked against the known commands."""
    value = enum_value(cmd, QUERY_CMDS, "cmd", "rknn_query")
    if value not in QUERY_STRUCTS:
        raise _invalid("rknn_query", f"cmd {cmd!r} is not a query command (0-{max(QUERY_STRUCTS)})")
    return value


def init_flags(flag: int | str | Iterable[int | str]) -> int:
    """rknn_init's flag from a number, a C name, names joined with `|`, or a list of either."""
    if isinstance(flag, bool):
        raise _invalid("rknn_init", f"flag must be names or a number, not {flag!r}")
    if isinstance(flag, int):
        parts: list[int | str] = [flag]
    elif isinstance(flag, str):
        parts = [p for p in (s.strip() for s in flag.split("|")) if p]
    else:
        parts = list(flag)
    value = 0
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            if not 0 <= part < 1 << 32:
                raise _invalid("rknn_init", f"flag {part} is out of range (uint32_t)")
            value |= part
        elif isinstance(part, str):
            if part.isdigit() or part.lower().startswith("0x"):
                value |= int(part, 0)
                continue
            number = INIT_FLAGS.get(part.upper())
            if number is None:
                raise _invalid("rknn_init", f"flag {part!r} is not one of {', '.join(INIT_FLAGS)}")
            value |= number
        else:
            raise _invalid("rknn_init", f"flag {part!r} is not a name or a number")
    refused = [name for name, bit in UNSUPPORTED_FLAGS.items() if value & bit]
    if refused:
        raise RkllmError("NOT_SUPPORTED", function="rknn_init", what=", ".join(refused),
                         detail=": it needs the zero-copy memory API, which this server does not expose")
    return value


def scan_sdk_version(path: str) -> str | None:
    """The runtime version string inside the library file ("2.3.2 (429f97ae6b@2025-04-09T09:09:27)"), if any.

    A hint only, read without loading anything: rknn_query(RKNN_QUERY_SDK_VERSION) on a context is the answer.
    """
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            m = _SDK_VERSION_RE.search(data)
            return m.group(0).decode("ascii") if m else None
    except (OSError, ValueError):
        return None


def find_rknn_library(explicit: str | None = None) -> str:
    """The path of librknnrt.so (`explicit` from --rknn-library / RKNN_LIB_PATH is the only place looked at
    when given), or RKNN_LIBRARY_UNAVAILABLE listing every place searched."""
    return find_library(explicit, name=LIBRARY_NAME, linker_name="rknnrt", setting="--rknn-library/RKNN_LIB_PATH",
                        error="RKNN_LIBRARY_UNAVAILABLE")


# --------------------------------------------------------------------------- plain data in and out


@dataclass(frozen=True)
class RknnInput:
    """One `rknn_input`: `buf` describes the caller's data (`type`, `fmt`), not the model's tensor.

    `size` defaults to len(buf); `type` and `fmt` take C names or numbers and have no default, because a
    zeroed type means FLOAT32 and makes the runtime expect four bytes per element.
    """

    index: int
    buf: bytes | bytearray | memoryview
    type: int | str
    fmt: int | str
    pass_through: bool = False
    size: int | None = None


@dataclass(frozen=True)
class RknnOutputRequest:
    """One `rknn_output` as asked for: float32 (`want_float`) or the tensor's own type. The runtime fills the
    outputs by array position; `index` is passed as given."""

    index: int
    want_float: bool = True


@dataclass(frozen=True)
class RknnOutput:
    """One output, copied out of the runtime's buffer (which was released before this was returned)."""

    index: int
    want_float: bool
    size: int
    data: bytes

    def floats(self) -> list[float]:
        """The data as float32 values (only for want_float outputs)."""
        if not self.want_float:
            raise _invalid("rknn_outputs_get", f"output {self.index} was fetched with want_float=0: it is not float32")
        values = array("f")
        values.frombytes(self.data[: len(self.data) // 4 * 4])
        return values.tolist()

    def to_dict(self) -> dict[str, Any]:
        """index, want_float, size and the bytes."""
        return {"index": self.index, "want_float": self.want_float, "size": self.size, "data": self.data}


# --------------------------------------------------------------------------- the library


class RknnLibrary:
    """One loaded librknnrt.so. Functions are looked up lazily: a missing one is NOT_SUPPORTED naming it."""

    def __init__(self, path: str, ffi: Any, lib: Any):
        self.path = path
        self.ffi = ffi
        self._lib = lib
        self._functions: dict[str, Any] = {}
        self._lookup = threading.Lock()
        self.file_version = scan_sdk_version(path)

    @classmethod
    def open(cls, library: str | None = None) -> RknnLibrary:
        """Find and dlopen librknnrt.so (RKNN_LIBRARY_UNAVAILABLE when it is absent or cannot be loaded)."""
        path = find_rknn_library(library)
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        try:
            lib = ffi.dlopen(path)
        except OSError as exc:
            raise RkllmError("RKNN_LIBRARY_UNAVAILABLE", detail=f"could not load {path}: {exc}") from exc
        loaded = cls(path, ffi, lib)
        if not loaded.has("rknn_init"):
            raise RkllmError("RKNN_LIBRARY_UNAVAILABLE",
                             detail=f"{path} does not export rknn_init: is it librknnrt.so?")
        return loaded

    def has(self, function: str) -> bool:
        """Whether the library exports `function` (one of the declared rknn_* functions)."""
        try:
            self.fn(function)
        except RkllmError:
            return False
        return True

    def functions(self) -> frozenset[str]:
        """The declared rknn_* functions this library exports."""
        return frozenset(name for name in FUNCTIONS if self.has(name))

    def fn(self, function: str) -> Any:
        """The C function `function`, looked up on first use."""
        found = self._functions.get(function)
        if found is not None:
            return found
        if function not in FUNCTIONS:
            raise RkllmError("INTERNAL", function=function, detail=f"{function} is not declared")
        with self._lookup:
            try:
                found = getattr(self._lib, function)
            except AttributeError:
                raise RkllmError("NOT_SUPPORTED", function=function, what=function,
                                 detail=f" by the librknnrt.so at {self.path} (it does not export it: an older or "
                                        "a reduced runtime)") from None
            self._functions[function] = found
        return found

    def init(self, model: str | os.PathLike[str] | bytes | bytearray | memoryview, flag: int | str |
             Iterable[int | str] = 0, *, share_weight_with: RknnContext | None = None, real_model_offset: int = 0,
             real_model_size: int = 0) -> RknnContext:
        """rknn_init: a path (size 0) or an in-memory .rknn image (size = its length) -> a context.

        `flag` by names or number; the init-extend fields: `share_weight_with` (extend->ctx, for
        RKNN_FLAG_SHARE_WEIGHT_MEM), `real_model_offset` / `real_model_size` (a model inside a larger file).
        The model buffer is only needed during the call (the runtime copies it without ZERO_COPY).
        """
        ffi = self.ffi
        value = init_flags(flag)
        if isinstance(model, bytes | bytearray | memoryview):
            if len(model) == 0:
                raise _invalid("rknn_init", "the model buffer is empty (size 0 would mean a path)")
            if len(model) >= 1 << 32:
                raise _invalid("rknn_init", "the model buffer is larger than 4 GiB (size is a uint32_t)")
            cmodel, size = ffi.from_buffer(model), len(model)
            where = f" for a {size}-byte model buffer"
        else:
            raw = os.fsencode(model)
            if not raw or b"\x00" in raw:
                raise _invalid("rknn_init", "model_path is empty or contains a NUL character")
            cmodel, size = ffi.new("char[]", raw), 0
            where = f" for {os.fsdecode(raw)}"
        share = bool(value & INIT_FLAGS["RKNN_FLAG_SHARE_WEIGHT_MEM"])
        if share and share_weight_with is None:
            raise _invalid("rknn_init", "RKNN_FLAG_SHARE_WEIGHT_MEM needs the context to share weights with")
        for name, number in (("real_model_offset", real_model_offset), ("real_model_size", real_model_size)):
            if not 0 <= number < 1 << 31:
                raise _invalid("rknn_init", f"{name} {number} is out of range")
        extend = ffi.NULL
        if share_weight_with is not None or real_model_offset or real_model_size:
            extend = ffi.new("rknn_init_extend*")
            if share_weight_with is not None:
                extend.ctx = share_weight_with.handle()
            extend.real_model_offset = real_model_offset
            extend.real_model_size = real_model_size
        out = ffi.new("rknn_context*")
        rc = self.fn("rknn_init")(out, cmodel, size, value, extend)
        if rc != 0:
            raise rc_error("rknn_init", rc, where)
        return RknnContext(self, int(out[0]))

    def versions(self, model: str | os.PathLike[str] | bytes) -> dict[str, str]:
        """rknn_query(RKNN_QUERY_SDK_VERSION) on a context of `model`, destroyed afterwards:
        `{"api_version", "drv_version"}`."""
        with self.init(model) as ctx:
            return {k: str(v) for k, v in ctx.query("RKNN_QUERY_SDK_VERSION").items()}


# --------------------------------------------------------------------------- a context


class RknnContext:
    """One rknn_context: its C functions as methods. Not shared across threads at once (a lock serialises)."""

    def __init__(self, library: RknnLibrary, ctx: int):
        self.library = library
        self._ffi = library.ffi
        self._ctx: int | None = ctx
        self._lock = threading.RLock()
        self._inputs_keep: list[Any] = []  # the last inputs_set's buffers, alive until replaced or destroyed

    def __enter__(self) -> RknnContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def closed(self) -> bool:
        """Whether rknn_destroy has been called."""
        return self._ctx is None

    def handle(self) -> int:
        """The rknn_context value (for the init-extend `ctx` of another init)."""
        if self._ctx is None:
            raise _invalid("rknn_context", "the context was destroyed")
        return self._ctx

    def _call(self, function: str, *args: Any) -> int:
        rc = int(self.library.fn(function)(self.handle(), *args))
        return rc

    def _check(self, function: str, *args: Any, detail: str = "") -> None:
        rc = self._call(function, *args)
        if rc != 0:
            raise rc_error(function, rc, detail)

    # ----------------------------------------------------------------- rknn_query

    def query(self, cmd: int | str, index: int = 0) -> dict[str, Any]:
        """rknn_query: the struct `cmd` fills, as a dict with the C field names.

        `index` is set before the call for the tensor-attribute commands and INPUT_DYNAMIC_RANGE. Enum fields
        come back as C names; dims hold n_dims entries; strings are decoded.
        """
        value = query_cmd(cmd)
        struct = QUERY_STRUCTS[value]
        ffi = self._ffi
        info = ffi.new(struct + "*")
        if value in _ATTR_QUERIES or value == QUERY_CMDS["RKNN_QUERY_INPUT_DYNAMIC_RANGE"]:
            if not 0 <= index < 1 << 32:
                raise _invalid("rknn_query", f"index {index} is out of range")
            info.index = index
        with self._lock:
            self._check("rknn_query", value, info, ffi.sizeof(struct),
                        detail=f" for {enum_name(value, QUERY_CMDS)}" + (f" index {index}" if index else ""))
            return self._decode(struct, info)

    def _string(self, chars: Any, limit: int | None = None) -> str:
        raw: bytes = self._ffi.string(chars) if limit is None else self._ffi.string(chars, limit)
        return raw.decode("utf-8", "replace")

    def _decode(self, struct: str, info: Any) -> dict[str, Any]:
        ffi = self._ffi
        if struct == "rknn_input_output_num":
            return {"n_input": info.n_input, "n_output": info.n_output}
        if struct == "rknn_tensor_attr":
            return tensor_attr(ffi, info)
        if struct == "rknn_perf_detail":
            data = "" if info.perf_data == ffi.NULL else self._string(info.perf_data, int(info.data_len))
            return {"perf_data": data, "data_len": int(info.data_len)}
        if struct == "rknn_perf_run":
            return {"run_duration": int(info.run_duration)}
        if struct == "rknn_sdk_version":
            return {"api_version": self._string(info.api_version), "drv_version": self._string(info.drv_version)}
        if struct == "rknn_mem_size":
            return {name: int(getattr(info, name)) for name in (
                "total_weight_size", "total_internal_size", "total_dma_allocated_size", "total_sram_size",
                "free_sram_size")}
        if struct == "rknn_custom_string":
            return {"string": self._string(info.string)}
        if struct == "rknn_tensor_mem":
            return {"virt_addr": int(ffi.cast("uintptr_t", info.virt_addr)), "phys_addr": int(info.phys_addr),
                    "fd": info.fd, "offset": info.offset, "size": info.size, "flags": info.flags,
                    "priv_data": int(ffi.cast("uintptr_t", info.priv_data))}
        # rknn_input_range
        n_dims = min(int(info.n_dims), 16)
        shapes = min(int(info.shape_number), 512)
        return {"index": info.index, "shape_number": info.shape_number,
                "fmt": enum_name(info.fmt, TENSOR_FORMATS), "name": self._string(info.name), "n_dims": info.n_dims,
                "dyn_range": [list(info.dyn_range[s])[:n_dims] for s in range(shapes)]}

    def sdk_version(self) -> dict[str, str]:
        """rknn_query(RKNN_QUERY_SDK_VERSION): `{"api_version", "drv_version"}`."""
        return {k: str(v) for k, v in self.query("RKNN_QUERY_SDK_VERSION").items()}

    # ----------------------------------------------------------------- inputs, run, outputs

    def inputs_set(self, inputs: Sequence[RknnInput]) -> None:
        """rknn_inputs_set with one rknn_input per entry; the buffers stay alive until the next inputs_set or
        rknn_destroy (the runtime may read them as late as rknn_run)."""
        if not inputs:
            raise _invalid("rknn_inputs_set", "at least one input is needed")
        ffi = self._ffi
        arr = ffi.new("rknn_input[]", len(inputs))
        keep: list[Any] = [arr]
        for i, given in enumerate(inputs):
            where = f"inputs[{i}]"
            if not 0 <= given.index < 1 << 32:
                raise _invalid("rknn_inputs_set", f"{where}.index {given.index} is out of range")
            size = len(given.buf) if given.size is None else given.size
            if not 0 < size <= len(given.buf) or size >= 1 << 32:
                raise _invalid("rknn_inputs_set", f"{where}.size {size} must be 1..len(buf) ({len(given.buf)}) "
                                                  "and below 4 GiB")
            buf = ffi.from_buffer(given.buf)
            keep.append(buf)
            arr[i].index = given.index
            arr[i].buf = buf
            arr[i].size = size
            arr[i].pass_through = 1 if given.pass_through else 0
            arr[i].type = enum_value(given.type, TENSOR_TYPES, f"{where}.type", "rknn_inputs_set")
            arr[i].fmt = enum_value(given.fmt, TENSOR_FORMATS, f"{where}.fmt", "rknn_inputs_set")
        with self._lock:
            self._check("rknn_inputs_set", len(inputs), arr)
            self._inputs_keep = keep

    def run(self) -> None:
        """rknn_run(ctx, NULL): blocks until the inference is done."""
        with self._lock:
            self._check("rknn_run", self._ffi.NULL)

    def wait(self) -> None:
        """rknn_wait(ctx, NULL) (exported by some runtimes, supported by none of the RK3588/RK3576 ones)."""
        with self._lock:
            self._check("rknn_wait", self._ffi.NULL)

    def outputs_get(self, outputs: Sequence[RknnOutputRequest] | None = None, *,
                    max_bytes: int | None = None) -> list[RknnOutput]:
        """rknn_outputs_get, the data copied out, then rknn_outputs_release, always (also when the get, a
        copy or the `max_bytes` bound fails). `outputs` None asks for every output as float32."""
        ffi = self._ffi
        with self._lock:
            if outputs is None:
                n_output = int(self.query("RKNN_QUERY_IN_OUT_NUM")["n_output"])
                outputs = [RknnOutputRequest(index=i) for i in range(n_output)]
            if not outputs:
                raise _invalid("rknn_outputs_get", "at least one output is needed")
            arr = ffi.new("rknn_output[]", len(outputs))
            for i, req in enumerate(outputs):
                if not 0 <= req.index < 1 << 32:
                    raise _invalid("rknn_outputs_get", f"outputs[{i}].index {req.index} is out of range")
                arr[i].want_float = 1 if req.want_float else 0
                arr[i].is_prealloc = 0
                arr[i].index = req.index
            rc = 0
            try:
                rc = self._call("rknn_outputs_get", len(outputs), arr, ffi.NULL)
                if rc != 0:
                    raise rc_error("rknn_outputs_get", rc)
                total = sum(int(arr[i].size) for i in range(len(outputs)))
                if max_bytes is not None and total > max_bytes:
                    raise RkllmError("LIMIT_EXCEEDED", function="rknn_outputs_get", what="the outputs' size in bytes",
                                     value=total, limit=max_bytes)
                result = []
                for i, req in enumerate(outputs):
                    size = int(arr[i].size)
                    data = b"" if arr[i].buf == ffi.NULL or size == 0 else bytes(ffi.buffer(arr[i].buf, size))
                    result.append(RknnOutput(index=int(arr[i].index), want_float=req.want_float, size=size, data=data))
                return result
            finally:
                # Release whatever the runtime handed out, even after a failed get or copy.
                if rc == 0 or any(arr[i].buf != ffi.NULL for i in range(len(outputs))):
                    released = self._call("rknn_outputs_release", len(outputs), arr)
                    if released != 0 and sys.exc_info()[0] is None:
                        raise rc_error("rknn_outputs_release", released)

    def outputs_release(self) -> int:
        """rknn_outputs_release for outputs still held: `outputs_get` releases before it returns, so this
        releases nothing and returns 0 (kept for the 1:1 API)."""
        self.handle()
        return 0

    # ----------------------------------------------------------------- the rest

    def set_core_mask(self, core_mask: int | str) -> None:
        """rknn_set_core_mask (RK3588/RK3576; a single-core NPU returns an error)."""
        value = enum_value(core_mask, CORE_MASKS, "core_mask", "rknn_set_core_mask")
        with self._lock:
            self._check("rknn_set_core_mask", value, detail=f" for {enum_name(value, CORE_MASKS)}")

    def set_batch_core_num(self, core_num: int) -> None:
        """rknn_set_batch_core_num (multi-batch models; runtimes from 1.3.0)."""
        if not 0 < core_num < 1 << 31:
            raise _invalid("rknn_set_batch_core_num", f"core_num {core_num} must be positive")
        with self._lock:
            self._check("rknn_set_batch_core_num", core_num)

    def dup_context(self) -> RknnContext:
        """rknn_dup_context: a new context on the same model and weights, for another thread."""
        ffi = self._ffi
        with self._lock:
            cin = ffi.new("rknn_context*", self.handle())
            cout = ffi.new("rknn_context*")
            rc = int(self.library.fn("rknn_dup_context")(cin, cout))
            if rc != 0:
                raise rc_error("rknn_dup_context", rc)
            return RknnContext(self.library, int(cout[0]))

    def destroy(self) -> None:
        """rknn_destroy; a second call does nothing (the runtime is never given a freed context)."""
        with self._lock:
            if self._ctx is None:
                return
            rc = self._call("rknn_destroy")
            self._ctx = None
            self._inputs_keep = []
            if rc != 0:
                raise rc_error("rknn_destroy", rc)


def tensor_attr(ffi: Any, attr: Any) -> dict[str, Any]:
    """An rknn_tensor_attr as a dict: dims cut to n_dims, enums as C names, the quantisation (zp, scale, fl)."""
    n_dims = min(int(attr.n_dims), 16)
    return {
        "index": attr.index, "n_dims": attr.n_dims, "dims": list(attr.dims)[:n_dims],
        "name": ffi.string(attr.name).decode("utf-8", "replace"), "n_elems": attr.n_elems, "size": attr.size,
        "fmt": enum_name(attr.fmt, TENSOR_FORMATS), "type": enum_name(attr.type, TENSOR_TYPES),
        "qnt_type": enum_name(attr.qnt_type, QNT_TYPES), "fl": attr.fl, "zp": attr.zp, "scale": float(attr.scale),
        "w_stride": attr.w_stride, "size_with_stride": attr.size_with_stride, "pass_through": attr.pass_through,
        "h_stride": attr.h_stride,
    }


def element_size(tensor_type: int | str) -> int | None:
    """Bytes per element of a tensor type (None for INT4, two per byte)."""
    value = enum_value(tensor_type, TENSOR_TYPES, "type", "element_size")
    return ELEMENT_SIZES.get(value)


#: The prefix of the answer line `python -m mcp_rkllm.native.rknn LIBRARY MODEL` prints.
VERSIONS_MARKER = "mcp-rkllm rknn versions: "


def _print_versions(argv: Sequence[str]) -> int:
    """`python -m mcp_rkllm.native.rknn LIBRARY MODEL`: the SDK and driver versions as JSON (for doctor, which
    runs this in a child so a runtime crash cannot take its caller down)."""
    library, model = argv
    answer: dict[str, Any]
    try:
        answer, status = RknnLibrary.open(library).versions(model), 0
    except RkllmError as exc:
        answer, status = {"error": exc.to_dict()}, 1
    # The runtime logs to stdout too (in any order with Python's buffer): the answer is the marked line.
    print(VERSIONS_MARKER + json.dumps(answer), flush=True)
    return status


if __name__ == "__main__":  # pragma: no cover - run by doctor in a child process
    raise SystemExit(_print_versions(sys.argv[1:]))


__all__ = [
    "LIBRARY_NAME",
    "RknnContext",
    "RknnInput",
    "RknnLibrary",
    "RknnOutput",
    "RknnOutputRequest",
    "element_size",
    "enum_name",
    "enum_value",
    "find_rknn_library",
    "init_flags",
    "query_cmd",
    "rc_error",
    "rc_name",
    "scan_sdk_version",
    "tensor_attr",
]
