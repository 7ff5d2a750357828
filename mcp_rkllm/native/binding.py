"""Find and dlopen librkllmrt.so, pick its ABI generation, and marshal pydantic models to C and back.

Nothing is loaded at import time: `load_library()` does it, and it is called by the server only
after the stdio streams are claimed. The ABI is never guessed: `RKLLM_ABI` (passed in as
`declared_abi`) wins when the library agrees with it; otherwise the exported symbols tell 1.2.0
from 1.2.1+, and a `rkllm-runtime version: X.Y.Z` string inside the library file tells 1.2.x
from 1.3.0. When those cannot decide, `ABI_UNDETERMINED` says how to set it.
"""

from __future__ import annotations

import ctypes.util
import mmap
import re
import struct
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import cffi
from pydantic import BaseModel

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.native.abi import ADDED_IN_1_2_1, ALL_FUNCTIONS, CDEFS, FUNCTIONS, GENERATIONS
from mcp_rkllm.structs import (
    RKLLMExtendParam,
    RKLLMInput,
    RKLLMParam,
)

LIBRARY_NAME = "librkllmrt.so"

#: Where the library is looked for after --library / RKLLM_LIB_PATH, before the linker path.
DEFAULT_LOCATIONS: tuple[str, ...] = ("/usr/lib", "/usr/local/lib", "./lib")

_VERSION_RE = re.compile(rb"rkllm-runtime version:? *v?(\d+)\.(\d+)\.(\d+)")


@dataclass
class Library:
    """A loaded runtime library and what is known about it."""

    path: str
    abi: str
    abi_source: str
    version: str | None
    ffi: Any
    lib: Any
    functions: frozenset[str] = field(default_factory=frozenset)

    def has(self, function: str) -> bool:
        """Whether the library exports `function`."""
        return function in self.functions


def find_library(explicit: str | None = None, *, name: str = LIBRARY_NAME, linker_name: str = "rkllmrt",
                 setting: str = "--library/RKLLM_LIB_PATH", error: str = "LIBRARY_NOT_FOUND") -> str:
    """Return the path of librkllmrt.so, or raise LIBRARY_NOT_FOUND listing every place searched.

    `explicit` (from --library / RKLLM_LIB_PATH) may be the file or a directory holding it; when
    given, it is the only place looked at, so a typo is reported instead of silently loading
    another copy. Another library is found the same way with its file `name`, the `linker_name`
    ctypes knows it by, the `setting` that names it and the `error` code to raise.
    """
    if explicit:
        p = Path(explicit).expanduser()
        candidate = p / name if p.is_dir() else p
        if candidate.is_file():
            return str(candidate.resolve())
        raise RkllmError(error, detail=f"{candidate} does not exist (from {setting})")
    searched = []
    for d in DEFAULT_LOCATIONS:
        candidate = Path(d) / name
        searched.append(str(candidate))
        if candidate.is_file():
            return str(candidate.resolve())
    found = ctypes.util.find_library(linker_name)
    if found:
        return found
    searched.append("the dynamic linker path (ldconfig, LD_LIBRARY_PATH)")
    raise RkllmError(error, detail="searched " + ", ".join(searched))


def _generation_of_version(version: tuple[int, int, int]) -> str | None:
    if version == (1, 2, 0):
        return "1.2.0"
    if version[:2] == (1, 2) and 1 <= version[2] <= 3:
        return "1.2.1"
    if version[:2] == (1, 3):
        return "1.3.0"
    return None


def scan_version(path: str) -> tuple[int, int, int] | None:
    """The runtime version named by a `rkllm-runtime version: X.Y.Z` string in the file, if any."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            m = _VERSION_RE.search(data)
            if m is None:
                return None
            return int(m.group(1)), int(m.group(2)), int(m.group(3))
    except (OSError, ValueError):
        return None


def probe_symbols(path: str) -> frozenset[str]:
    """The rkllm_* functions the library exports (looked up without calling any)."""
    probe = cffi.FFI()
    probe.cdef("".join(f"void {name}(void);\n" for name in ALL_FUNCTIONS))
    try:
        lib = probe.dlopen(path)
    except OSError as exc:
        raise RkllmError("LIBRARY_LOAD_FAILED", path=path, detail=str(exc)) from exc
    present = set()
    for name in ALL_FUNCTIONS:
        try:
            getattr(lib, name)
        except AttributeError:
            continue
        present.add(name)
    return frozenset(present)


def select_abi(path: str, symbols: frozenset[str], version: tuple[int, int, int] | None,
               declared: str | None) -> tuple[str, str]:
    """Decide the ABI generation: returns (generation, how it was decided). Never guesses."""
    core = {"rkllm_createDefaultParam", "rkllm_init", "rkllm_run", "rkllm_destroy"}
    if not core <= symbols:
        raise RkllmError("ABI_UNSUPPORTED", path=path,
                         detail=f"it does not export {sorted(core - symbols)}; is it librkllmrt.so?")
    if "rkllm_clear_kv_cache" not in symbols or "rkllm_set_chat_template" not in symbols:
        raise RkllmError("ABI_UNSUPPORTED", path=path,
                         detail="no rkllm_clear_kv_cache/rkllm_set_chat_template: a runtime older than 1.2.0")
    added = [f for f in ADDED_IN_1_2_1 if f in symbols]
    if added and len(added) != len(ADDED_IN_1_2_1):
        raise RkllmError("ABI_UNSUPPORTED", path=path,
                         detail=f"it exports only some of the 1.2.1 functions ({added}): an unknown build")
    family = "1.2.1+" if added else "1.2.0"
    version_text = ".".join(map(str, version)) if version else None
    by_version = _generation_of_version(version) if version else None

    if declared is not None:
        if declared not in GENERATIONS:
            raise RkllmError("ABI_UNDETERMINED", path=path,
                             detail=f"RKLLM_ABI={declared!r} is not one of {list(GENERATIONS)}")
        if family == "1.2.0" and declared != "1.2.0":
            raise RkllmError("ABI_MISMATCH", declared=declared, path=path,
                             detail=f"it lacks {list(ADDED_IN_1_2_1)}, which every {declared}+ runtime exports")
        if family == "1.2.1+" and declared == "1.2.0":
            raise RkllmError("ABI_MISMATCH", declared=declared, path=path,
                             detail=f"it exports {list(ADDED_IN_1_2_1)}, which 1.2.0 does not have")
        if by_version is not None and by_version != declared:
            raise RkllmError("ABI_MISMATCH", declared=declared, path=path,
                             detail=f"the library says it is rkllm-runtime {version_text}")
        return declared, "RKLLM_ABI"

    if family == "1.2.0":
        if by_version is not None and by_version != "1.2.0":
            raise RkllmError("ABI_UNDETERMINED", path=path,
                             detail=f"its symbols are 1.2.0's but it says it is {version_text}")
        return "1.2.0", "exported symbols"
    if by_version in ("1.2.1", "1.3.0"):
        return by_version, f"exported symbols and the version string {version_text}"
    if version is not None:
        raise RkllmError("ABI_UNDETERMINED", path=path,
                         detail=f"it says it is rkllm-runtime {version_text}, a release this server does not know")
    raise RkllmError("ABI_UNDETERMINED", path=path,
                     detail="its symbols fit 1.2.1-1.2.3 and 1.3.0 alike and the file has no version string")


def load_library(library: str | None = None, declared_abi: str | None = None) -> Library:
    """Find, probe and dlopen the runtime with the declarations of its ABI generation."""
    path = find_library(library)
    symbols = probe_symbols(path)
    version = scan_version(path)
    abi, source = select_abi(path, symbols, version, declared_abi)
    ffi = cffi.FFI()
    ffi.cdef(CDEFS[abi])
    try:
        lib = ffi.dlopen(path)
    except OSError as exc:  # pragma: no cover - probe_symbols already opened it
        raise RkllmError("LIBRARY_LOAD_FAILED", path=path, detail=str(exc)) from exc
    return Library(path=path, abi=abi, abi_source=source,
                   version=".".join(map(str, version)) if version else None,
                   ffi=ffi, lib=lib, functions=symbols & frozenset(FUNCTIONS[abi]))


# --------------------------------------------------------------------------- pydantic -> C


def _is_unset(model: BaseModel, name: str, value: Any) -> bool:
    """True when `value` means "nothing to pass": None, the field's default, or a C zero."""
    if value is None:
        return True
    if value == type(model).model_fields[name].default:
        return True
    return value is False or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0) \
        or value == ""


class Marshaller:
    """Writes pydantic struct models into cffi structs of one ABI generation.

    Every buffer a struct points to is appended to `keep`, which the caller must hold until the
    C call (or, for init and async runs, the handle or the run) is over.
    """

    def __init__(self, ffi: Any, abi: str):
        self.ffi = ffi
        self.abi = abi

    def new(self, ctype: str, model: BaseModel | None, keep: list[Any]) -> Any:
        """Allocate a zeroed `ctype*`, fill it from `model`, and return the pointer."""
        ptr = self.ffi.new(ctype + "*")
        keep.append(ptr)
        if model is not None:
            self.fill(ptr, model, ctype, keep)
        return ptr

    def fill(self, target: Any, model: BaseModel, struct: str, keep: list[Any]) -> None:
        """Copy every set field of `model` into the struct `target` (a pointer or a reference)."""
        ctype = self.ffi.typeof(target)
        fields = dict((ctype.item if ctype.kind == "pointer" else ctype).fields)
        for name in type(model).model_fields:
            value = getattr(model, name)
            if name not in fields:
                if not _is_unset(model, name, value):
                    raise RkllmError("ABI_FIELD_UNSUPPORTED", struct=struct, field=name, abi=self.abi)
                continue
            if value is None:
                continue
            self._set(target, name, fields[name].type, value, f"{struct}.{name}", keep)

    def _set(self, target: Any, name: str, ftype: Any, value: Any, where: str, keep: list[Any]) -> None:
        kind = ftype.kind
        if kind in ("primitive", "enum"):
            setattr(target, name, int(value) if isinstance(value, IntEnum) else value)
        elif kind == "struct":  # by value: fill the embedded struct in place
            self.fill(getattr(target, name), value, where, keep)
        elif kind == "pointer":
            setattr(target, name, self._pointer(ftype, value, where, keep))
        else:  # arrays (reserved) and anything else are never set from a model
            raise RkllmError("INTERNAL", function="marshal", detail=f"cannot set {where} of kind {kind}")

    def _pointer(self, ftype: Any, value: Any, where: str, keep: list[Any]) -> Any:
        item = ftype.item
        if item.cname == "char":
            if "\x00" in value:
                raise RkllmError("INVALID_PARAMS", function="marshal", detail=f"{where} contains a NUL character")
            buf = self.ffi.new("char[]", value.encode("utf-8"))
        elif item.cname == "float" and isinstance(value, array) and value.typecode == "f":
            # Image embeddings from a vision encoder: float32 already, one copy (a list would be millions of floats).
            buf = self.ffi.new("float[]", len(value))
            self.ffi.memmove(buf, value, len(value) * 4)
        elif item.kind == "primitive":  # float* / int32_t* arrays
            buf = self.ffi.new(f"{item.cname}[]", list(value))
        elif item.kind == "struct":
            buf = self.ffi.new(ftype)
            self.fill(buf, value, where, keep)
        else:
            raise RkllmError("INTERNAL", function="marshal", detail=f"cannot point {where} at {item.cname}")
        keep.append(buf)
        return buf

    def param(self, default: Any, model: RKLLMParam, keep: list[Any]) -> Any:
        """An RKLLMParam* holding the runtime's defaults overlaid with the fields set in `model`."""
        ptr = self.new("RKLLMParam", None, keep)
        ptr[0] = default
        self.fill(ptr, model, "RKLLMParam", keep)
        return ptr

    def input(self, model: RKLLMInput, keep: list[Any]) -> Any:
        """An RKLLMInput* with the union member of `model.input_type` set."""
        mm = model.multimodal_input
        if mm is not None:
            mm_fields = dict(self.ffi.typeof("RKLLMMultiModalInput").fields)
            if "image" in mm_fields:
                mm = mm.as_nested()
            else:
                if mm.image is not None:
                    for tag in ("image_start", "image_end", "image_content"):
                        if getattr(mm.image, tag) is not None:
                            raise RkllmError("ABI_FIELD_UNSUPPORTED", struct="RKLLMMultiModalInput",
                                             field=f"image.{tag}", abi=self.abi)
                mm = mm.as_flat()
                if "n_image" not in mm_fields and mm.n_image == 1:  # 1.2.0: one image is all it can take
                    mm = mm.model_copy(update={"n_image": None})
            model = model.model_copy(update={"multimodal_input": mm})
        return self.new("RKLLMInput", model, keep)


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 (0.8999999761581421 -> 0.9), for display."""
    target = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", candidate))[0] == target:
            return candidate
    return value


def read_param(ffi: Any, cparam: Any) -> RKLLMParam:
    """The RKLLMParam model of a C RKLLMParam (fields the generation lacks stay None)."""
    def read(cdata: Any, model_cls: type[BaseModel]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, f in ffi.typeof(cdata).fields:
            if name not in model_cls.model_fields:
                continue  # reserved bytes
            value = getattr(cdata, name)
            if f.type.kind == "pointer":
                out[name] = ffi.string(value).decode("utf-8", "replace") if value != ffi.NULL else None
            elif f.type.kind == "struct":
                out[name] = RKLLMExtendParam.model_validate(read(value, RKLLMExtendParam))
            elif f.type.cname == "float":
                out[name] = shortest_float32(value)
            else:
                out[name] = value
        return out

    return RKLLMParam.model_validate(read(cparam, RKLLMParam))


__all__ = [
    "DEFAULT_LOCATIONS",
    "Library",
    "Marshaller",
    "find_library",
    "load_library",
    "probe_symbols",
    "read_param",
    "scan_version",
    "select_abi",
    "shortest_float32",
]
