"""The fake librknnrt.so (fake_rknn.c): model files it accepts, its profiles, its output formula, a view of its records.

`write_model(path, "qwen3vl-2b")` writes a model the fake loads; `expected_outputs(...)` recomputes what
`rknn_outputs_get` returns for given pixels, exactly (float32), so tests can check embeddings end to end;
`FakeRknnView` reads what the fake recorded (in this process, or from $FAKE_RKNN_RECORD_DIR for other processes).
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from tests.fake_rknn.build import build_fake_rknn

__all__ = ["PROFILES", "FakeRknnView", "Profile", "block_means", "build_fake_rknn", "expected_outputs", "grid",
           "model_text", "to_fp16_bytes", "write_model"]

# Tensor constants of the reference (§1.5, Appendix B).
NCHW, NHWC, UNDEFINED = 0, 1, 3
FLOAT32, FLOAT16, INT8, UINT8 = 0, 1, 2, 3
AFFINE = 2


@dataclass(frozen=True)
class Profile:
    """A built-in profile of the fake, as the C table declares it (see the comment at the top of fake_rknn.c)."""

    input_name: str
    input_dims: tuple[int, ...]
    input_fmt: int
    input_type: int
    n_outputs: int
    output_dims: tuple[int, ...]
    output_type: int = FLOAT16
    source: str = "reference §6 table / §3.3"

    @property
    def hwc(self) -> tuple[int, int, int]:
        d = self.input_dims
        return (d[2], d[3], d[1]) if self.input_fmt == NCHW else (d[1], d[2], d[3])

    @property
    def tokens(self) -> int:
        n = 1
        for d in self.output_dims:
            n *= d
        return n // self.output_dims[-1]

    @property
    def width(self) -> int:
        return self.output_dims[-1]


PROFILES: dict[str, Profile] = {
    "qwen2vl-2b": Profile("pixel", (1, 392, 392, 3), NHWC, FLOAT16, 1, (196, 1536)),
    "qwen2.5vl-3b": Profile("pixel", (1, 392, 392, 3), NHWC, FLOAT16, 1, (196, 2048)),
    "qwen3vl-2b": Profile("pixel", (1, 448, 448, 3), NHWC, FLOAT16, 4, (196, 2048)),
    "internvl3-1b": Profile("pixel_values", (1, 448, 448, 3), NHWC, FLOAT16, 1, (1, 256, 896)),
    "minicpmv": Profile("pixel", (1, 448, 448, 3), NHWC, FLOAT16, 1, (1, 64, 3584)),
    "tiny": Profile("pixel", (1, 28, 28, 3), NHWC, FLOAT16, 1, (4, 8), source="test values"),
    "tiny-deepstack": Profile("pixel", (1, 32, 32, 3), NHWC, FLOAT16, 4, (4, 8), source="test values"),
    "tiny-nchw": Profile("pixel", (1, 3, 28, 28), NCHW, FLOAT16, 1, (1, 4, 8), source="test values"),
    "tiny-int8": Profile("input", (1, 8, 8, 3), NHWC, INT8, 1, (4, 8), INT8, source="test values"),
}


def model_text(profile: str = "tiny", **overrides: object) -> str:
    """The text of a fake model: the magic line, the profile, then `key = value` overrides (see fake_rknn.c)."""
    lines = ["FAKE-RKNN 1", f"profile = {profile}"]
    for key, value in overrides.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def write_model(path: Path, profile: str = "tiny", **overrides: object) -> Path:
    path.write_text(model_text(profile, **overrides))
    return path


def grid(tokens: int) -> tuple[int, int]:
    """(rows, columns) of the token grid: rows = the largest divisor of `tokens` whose square is <= tokens."""
    rows = max(d for d in range(1, int(tokens**0.5) + 2) if d * d <= tokens and tokens % d == 0)
    return rows, tokens // rows


def block_means(pixels: Sequence[float], h: int, w: int, c: int, tokens: int) -> list[list[float]]:
    """M(t, k): the mean of channel k over token t's block of the [h][w][c] (row-major HWC) pixels."""
    gh, gw = grid(tokens)
    means = []
    for t in range(tokens):
        r, q = divmod(t, gw)
        y0, y1 = r * h // gh, (r + 1) * h // gh
        x0, x1 = q * w // gw, (q + 1) * w // gw
        n = (y1 - y0) * (x1 - x0)
        row = []
        for k in range(c):
            s = sum(sum(pixels[(y * w + x0) * c + k:(y * w + x1) * c:c]) for y in range(y0, y1))
            row.append(s / n if n else 0.0)
        means.append(row)
    return means


def expected_outputs(pixels: Sequence[float], hwc: tuple[int, int, int], n_outputs: int, tokens: int,
                     width: int) -> list[array]:
    """What rknn_outputs_get returns with want_float=1: one float32 array [tokens * width] per output.

    out[j][t][d] = M(t, d % C) / 255.0 + j + t * 0.01 + d * 0.001, in double, left to right, then float32.
    """
    h, w, c = hwc
    means = block_means(pixels, h, w, c, tokens)
    outs = []
    for j in range(n_outputs):
        values = []
        for t in range(tokens):
            for d in range(width):
                v = means[t][d % c] / 255.0
                v += j
                v += t * 0.01
                v += d * 0.001
                values.append(v)
        outs.append(array("f", values))  # C's (float) conversion: round to nearest
    return outs


def to_fp16_bytes(values: array) -> bytes:
    """The native FP16 bytes of float32 values (round to nearest even, like the fake)."""
    return b"".join(struct.pack("<e", v) for v in values)


class FakeRknnView:
    """What the fake RKNN runtime recorded, and its layout hooks.

    With `record_dir`, records come from the files the fake writes there ($FAKE_RKNN_RECORD_DIR, any process);
    without, from the library loaded in this process.
    """

    def __init__(self, path: Path, record_dir: Path | None = None):
        self.path = path
        self.record_dir = record_dir
        self.ffi = cffi.FFI()
        self.ffi.cdef("""
            const char* fake_rknn_last(const char* kind);
            int fake_rknn_count(const char* kind);
            void fake_rknn_reset(void);
            long fake_rknn_sizeof(const char* s);
            long fake_rknn_alignof(const char* s);
            long fake_rknn_offsetof(const char* s, const char* f);
            long long fake_rknn_unreleased(void);
            int fake_rknn_live_contexts(void);
            size_t fake_rknn_last_input(uint32_t index, void* out, size_t cap);
        """)
        self.lib = self.ffi.dlopen(str(path))

    def last(self, kind: str) -> Any:
        if self.record_dir is not None:
            path = self.record_dir / f"{kind}.json"
            assert path.exists(), f"the fake recorded no {kind!r}"
            return json.loads(path.read_text())
        raw = self.lib.fake_rknn_last(kind.encode())
        assert raw != self.ffi.NULL, f"the fake recorded no {kind!r}"
        return json.loads(self.ffi.string(raw).decode("utf-8"))

    def count(self, kind: str) -> int:
        if self.record_dir is not None:
            events = self.record_dir / "events"
            return events.read_text().split().count(kind) if events.exists() else 0
        return int(self.lib.fake_rknn_count(kind.encode()))

    def unreleased(self) -> int:
        """Output buffers handed out and never released (from the events file when reading a record dir)."""
        if self.record_dir is not None:
            return self.count("rknn_output_buffer") - self.count("rknn_output_buffer_released")
        return int(self.lib.fake_rknn_unreleased())

    def live_contexts(self) -> int:
        return int(self.lib.fake_rknn_live_contexts())

    def last_input(self, index: int = 0) -> bytes:
        n = int(self.lib.fake_rknn_last_input(index, self.ffi.NULL, 0))
        buf = self.ffi.new("char[]", max(n, 1))
        self.lib.fake_rknn_last_input(index, buf, n)
        return bytes(self.ffi.buffer(buf, n))

    def reset(self) -> None:
        self.lib.fake_rknn_reset()
        if self.record_dir is not None:
            for f in self.record_dir.iterdir():
                f.unlink()

    def sizeof(self, struct_name: str) -> int:
        return int(self.lib.fake_rknn_sizeof(struct_name.encode()))

    def alignof(self, struct_name: str) -> int:
        return int(self.lib.fake_rknn_alignof(struct_name.encode()))

    def offsetof(self, struct_name: str, field: str) -> int:
        return int(self.lib.fake_rknn_offsetof(struct_name.encode(), field.encode()))
