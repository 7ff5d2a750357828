"""Shared fixtures: fake runtimes built per ABI generation, model files, a test-side view of the fake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cffi
import pytest

from tests.fake_rkllm.build import build_fake

GENERATIONS = ("1.2.0", "1.2.1", "1.3.0")


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on anyio's plugin (`pytestmark = pytest.mark.anyio`), on asyncio only:
    the server is asyncio-only (uvicorn, call_soon_threadsafe in the relay)."""
    return "asyncio"


class FakeView:
    """The fake library's test hooks (records of what it received, call counts)."""

    def __init__(self, path: Path):
        self.path = path
        self.ffi = cffi.FFI()
        self.ffi.cdef("""
            const char* fake_last(const char* kind);
            int fake_count(const char* kind);
            void fake_reset(void);
            long fake_sizeof(const char* s);
            long fake_offsetof(const char* s, const char* f);
        """)
        self.lib = self.ffi.dlopen(str(path))

    def last(self, kind: str) -> Any:
        raw = self.lib.fake_last(kind.encode())
        assert raw != self.ffi.NULL, f"the fake recorded no {kind!r}"
        return json.loads(self.ffi.string(raw).decode("utf-8"))

    def count(self, kind: str) -> int:
        return int(self.lib.fake_count(kind.encode()))

    def reset(self) -> None:
        self.lib.fake_reset()

    def sizeof(self, struct: str) -> int:
        return int(self.lib.fake_sizeof(struct.encode()))

    def offsetof(self, struct: str, field: str) -> int:
        return int(self.lib.fake_offsetof(struct.encode(), field.encode()))


@pytest.fixture(params=GENERATIONS)
def abi(request: pytest.FixtureRequest) -> str:
    """Each supported ABI generation in turn."""
    return str(request.param)


@pytest.fixture
def fake_path(abi: str) -> Path:
    """A fake librkllmrt.so of the generation, with its version string."""
    return build_fake(abi, version=abi)


@pytest.fixture
def fake(fake_path: Path) -> Iterator[FakeView]:
    """The test hooks of the fake, reset before the test."""
    view = FakeView(fake_path)
    view.reset()
    yield view


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A model file the fake accepts (it only checks that the file can be read)."""
    path = tmp_path / "demo.rkllm"
    path.write_bytes(b"fake model")
    return path
