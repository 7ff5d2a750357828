"""Every struct of every ABI generation has the size, alignment and field offsets of the reference tables.

The expected figures come from `abi_reference.py`, transcribed from the appendix of
shared/reference/rkllm-abi.md (gcc LP64), never from the project's own declarations. Both the
binding's cdef and the fake runtime's C structs are checked against them.
"""

from __future__ import annotations

import platform

import cffi
import pytest

from mcp_rkllm.native.abi import CDEFS, FUNCTIONS, RELEASES
from tests.abi_reference import LAYOUTS
from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake

# Every release of a generation must match that generation's declarations.
CASES = [(gen, release) for gen, releases in RELEASES.items() for release in releases]

pytestmark = pytest.mark.skipif(platform.architecture()[0] != "64bit",
                                reason="the reference figures checked here are the LP64 ones")


def _ffi(gen: str) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEFS[gen])
    return ffi


def _offset(ffi: cffi.FFI, struct: str, field: str) -> int:
    return int(ffi.offsetof(struct, *field.split(".")))


@pytest.mark.parametrize(("gen", "release"), CASES)
def test_cdef_matches_reference(gen: str, release: str) -> None:
    ffi = _ffi(gen)
    reference = LAYOUTS[release]
    for struct, (size, align, fields) in reference.items():
        assert ffi.sizeof(struct) == size, f"{release} sizeof({struct})"
        assert ffi.alignof(struct) == align, f"{release} alignof({struct})"
        for field, offset in fields.items():
            assert _offset(ffi, struct, field) == offset, f"{release} offsetof({struct}, {field})"


@pytest.mark.parametrize(("gen", "release"), CASES)
def test_cdef_has_exactly_the_reference_fields(gen: str, release: str) -> None:
    """No field missing and none invented: the top-level fields equal the reference's."""
    ffi = _ffi(gen)
    for struct, (_, _, fields) in LAYOUTS[release].items():
        declared = {name for name, _ in ffi.typeof(struct).fields}
        expected = {f for f in fields if "." not in f}
        assert declared == expected, f"{release} {struct}"


@pytest.mark.parametrize("gen", list(RELEASES))
def test_cdef_declares_every_function_of_the_generation(gen: str) -> None:
    ffi = _ffi(gen)
    lib = ffi.dlopen(str(build_fake(gen, version=gen)))
    for name in FUNCTIONS[gen]:
        assert callable(getattr(lib, name)), name
    assert len(FUNCTIONS[gen]) == (12 if gen == "1.2.0" else 15)


@pytest.mark.parametrize("gen", list(RELEASES))
def test_fake_runtime_matches_reference(gen: str) -> None:
    """The fake is ABI-exact too, so a marshalling round trip through it proves the binding."""
    view = FakeView(build_fake(gen, version=gen))
    release = RELEASES[gen][-1]
    for struct, (size, _, fields) in LAYOUTS[release].items():
        assert view.sizeof(struct) == size, f"fake {gen} sizeof({struct})"
        for field, offset in fields.items():
            assert view.offsetof(struct, field) == offset, f"fake {gen} offsetof({struct}, {field})"


def test_reference_sizes_of_the_binding_section() -> None:
    """Section 8 of the reference lists the 1.3.0 sizes a binding must see on 64-bit."""
    ffi = _ffi("1.3.0")
    expected = {"RKLLMParam": 184, "RKLLMInput": 160, "RKLLMInferParam": 40, "RKLLMResult": 72,
                "RKLLMCallback": 48, "RKLLMExtendParam": 120, "RKLLMSamplingParam": 36}
    assert {k: ffi.sizeof(k) for k in expected} == expected
