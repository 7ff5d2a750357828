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
    """What the fake runtime recorded: every struct it received (as JSON) and counts of calls.

    With `record_dir`, the records are read from the files the fake writes there (they come from
    any process: the server, its workers); without, from the library loaded in this process.
    The layout hooks (sizeof/offsetof) always come from the library.
    """

    def __init__(self, path: Path, record_dir: Path | None = None):
        self.path = path
        self.record_dir = record_dir
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
        if self.record_dir is not None:
            path = self.record_dir / f"{kind}.json"
            assert path.exists(), f"the fake recorded no {kind!r}"
            return json.loads(path.read_text())
        raw = self.lib.fake_last(kind.encode())
        assert raw != self.ffi.NULL, f"the fake recorded no {kind!r}"
        return json.loads(self.ffi.string(raw).decode("utf-8"))

    def count(self, kind: str) -> int:
        if self.record_dir is not None:
            events = self.record_dir / "events"
            return events.read_text().split().count(kind) if events.exists() else 0
        return int(self.lib.fake_count(kind.encode()))

    def reset(self) -> None:
        self.lib.fake_reset()
        if self.record_dir is not None:
            for f in self.record_dir.iterdir():
                f.unlink()

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
def fake(fake_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeView]:
    """What the fake records during the test, from any process (FAKE_RKLLM_RECORD_DIR)."""
    record_dir = tmp_path / "fake-records"
    record_dir.mkdir()
    monkeypatch.setenv("FAKE_RKLLM_RECORD_DIR", str(record_dir))
    view = FakeView(fake_path, record_dir)
    view.reset()
    yield view


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A model file the fake accepts (it only checks that the file can be read)."""
    path = tmp_path / "demo.rkllm"
    path.write_bytes(b"fake model")
    return path
