"""Vision preprocessing against reference pixels: `images.prepare` must give the bytes the vendor demo gives
(expand2square on the fill, then `cv::resize(..., INTER_LINEAR)`, reference rknn-api.md §3.1 step 3).

The reference below is an independent pure-Python copy of OpenCV's uint8 INTER_LINEAR path, written from
modules/imgproc/src/resize.cpp (`cv::hal::resize`, `HResizeLinear`, the uchar `VResizeLinear`,
`resizeGeneric_Invoker`, `ResizeAreaFastVec`), so these tests pin the pixels, not just "some bilinear":

* offsets: `fx = (float)((dx + 0.5) * scale - 0.5)`, `sx = cvFloor(fx)`, `fx -= sx`, with `scale = 1 / (dst / src)`;
* weights: `saturate_cast<short>(w * INTER_RESIZE_COEF_SCALE)`, 11 bits (2048), `w` = `1.f - fx` and `fx` in float,
  rounded half to even (cvRound);
* x borders: `sx < 0` gives `sx = 0, fx = 0`; from the first `sx + 1 >= width` on, one tap `S[sx] * 2048`, with
  `sx = width - 1` once `sx >= width - 1`;
* y borders: rows `clip(sy)` and `clip(sy + 1)`, the weights left as computed (OpenCV does not zero `fy`);
* horizontal pass in int, no rounding; vertical pass as the uchar specialisation does it,
  `((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2`;
* an exact 2x shrink in both axes is done as INTER_AREA: `(a + b + c + d + 2) >> 2`;
* the same size is a copy.
"""

from __future__ import annotations

import math
import random
import struct
import subprocess
import sys
from dataclasses import fields

import pytest
from PIL import Image

from mcp_rkllm.models import images
from mcp_rkllm.models.families import Vision

COEF_SCALE = 1 << 11  # INTER_RESIZE_COEF_SCALE (INTER_RESIZE_COEF_BITS = 11)
CN = 3

Rows = list[list[int]]  # one list per row, CN values per pixel (HWC)


# ---------------------------------------------------------------------------------------------- the reference


def f32(x: float) -> float:
    """`x` as a C float (OpenCV computes the offsets in double and keeps them, and 1 - fx, in float)."""
    value: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return value


def coef(w: float) -> int:
    """saturate_cast<short>(w * INTER_RESIZE_COEF_SCALE): cvRound (half to even, as Python's round) into int16."""
    return max(-32768, min(32767, round(w * COEF_SCALE)))


def offsets(src: int, dst: int) -> list[tuple[int, float]]:
    """(sx, fx) for each destination index along one axis."""
    scale = 1.0 / (dst / src)  # scale_x = 1./inv_scale_x; inv_scale_x = (double)dsize.width/ssize.width
    out = []
    for d in range(dst):
        fx = f32((d + 0.5) * scale - 0.5)
        sx = math.floor(fx)
        out.append((sx, f32(fx - sx)))
    return out


def linear(rows: Rows, width: int, height: int, out_w: int, out_h: int) -> Rows:
    """OpenCV's uint8 INTER_LINEAR (resizeGeneric_ with HResizeLinear / VResizeLinear<uchar, int, short>)."""
    xtab, xmax = [], out_w
    for dx, (sx, fx) in enumerate(offsets(width, out_w)):
        if sx < 0:
            sx, fx = 0, 0.0
        if sx + 1 >= width:
            xmax = min(xmax, dx)
            if sx >= width - 1:
                sx, fx = width - 1, 0.0
        xtab.append((sx, coef(f32(1.0 - fx)), coef(fx)))

    def horizontal(row: list[int]) -> list[int]:
        out = []
        for dx, (sx, a0, a1) in enumerate(xtab):
            for c in range(CN):
                if dx < xmax:
                    out.append(row[sx * CN + c] * a0 + row[(sx + 1) * CN + c] * a1)
                else:
                    out.append(row[sx * CN + c] * COEF_SCALE)
        return out

    result = []
    for sy, fy in offsets(height, out_h):
        b0, b1 = coef(f32(1.0 - fy)), coef(fy)
        s0 = horizontal(rows[min(max(sy, 0), height - 1)])
        s1 = horizontal(rows[min(max(sy + 1, 0), height - 1)])
        result.append([(((b0 * (p >> 4)) >> 16) + ((b1 * (q >> 4)) >> 16) + 2) >> 2
                       for p, q in zip(s0, s1, strict=True)])
    return result


def area_2x(rows: Rows, out_w: int, out_h: int) -> Rows:
    """ResizeAreaFastVec for scale 2 x 2: the rounded mean of each 2x2 block."""
    return [[(rows[2 * y][2 * x * CN + c] + rows[2 * y][(2 * x + 1) * CN + c] + rows[2 * y + 1][2 * x * CN + c]
              + rows[2 * y + 1][(2 * x + 1) * CN + c] + 2) >> 2 for x in range(out_w) for c in range(CN)]
            for y in range(out_h)]


def cv_resize(rows: Rows, width: int, height: int, out_w: int, out_h: int) -> Rows:
    """cv::resize(src, dst, Size(out_w, out_h), 0, 0, INTER_LINEAR) on CV_8UC3."""
    if (width, height) == (out_w, out_h):
        return [list(row) for row in rows]
    if width == 2 * out_w and height == 2 * out_h:  # is_area_fast && iscale_x == 2 && iscale_y == 2
        return area_2x(rows, out_w, out_h)
    return linear(rows, width, height, out_w, out_h)


def expand2square(rows: Rows, width: int, height: int, fill: int) -> tuple[Rows, int]:
    """The demo's expand2square: `rows` centred at ((size - w) / 2, (size - h) / 2) on a size x size `fill`."""
    size = max(width, height)
    left, top = (size - width) // 2, (size - height) // 2
    square = [[fill] * (size * CN) for _ in range(size)]
    for y in range(height):
        square[top + y][left * CN:(left + width) * CN] = rows[y]
    return square, size


def reference_prepare(img: Image.Image, width: int, height: int, layout: str, fill: int) -> bytes:
    data = img.tobytes()
    w, h = img.size
    rows = [list(data[y * w * CN:(y + 1) * w * CN]) for y in range(h)]
    square, size = expand2square(rows, w, h, fill)
    out = cv_resize(square, size, size, width, height)
    if layout == "NHWC":
        return bytes(v for row in out for v in row)
    return bytes(row[x * CN + c] for c in range(CN) for row in out for x in range(width))


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * CN))


def rows_of(img: Image.Image) -> Rows:
    data, (w, h) = img.tobytes(), img.size
    return [list(data[y * w * CN:(y + 1) * w * CN]) for y in range(h)]


# ---------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(("size", "out", "layout", "fill"), [
    ((7, 5), (3, 4), "NHWC", 128),    # padded to 7x7 (rows 1-5), then shrunk by 7/3 and 7/4
    ((7, 5), (3, 4), "NCHW", 128),
    ((5, 5), (11, 9), "NHWC", 128),   # enlarged: weights on both sides, clamped borders
    ((5, 5), (11, 9), "NCHW", 127),
    ((8, 8), (4, 4), "NHWC", 128),    # exact 2x: OpenCV's INTER_AREA path
    ((3, 8), (4, 4), "NCHW", 0),      # padded to 8x8 (columns 2-4), then exact 2x
    ((13, 6), (5, 7), "NHWC", 128),   # wider than tall, shrunk unevenly
    ((6, 6), (2, 2), "NHWC", 128),    # exact 3x stays INTER_LINEAR (samples, no averaging)
    ((9, 9), (9, 4), "NCHW", 128),    # one axis the same size, the other shrunk
    ((30, 17), (14, 14), "NHWC", 255),
    ((1, 1), (4, 3), "NHWC", 128),    # one pixel enlarged
    ((2, 7), (3, 5), "NCHW", 128),
])
def test_prepare_is_opencv_inter_linear(size: tuple[int, int], out: tuple[int, int], layout: images.Layout,
                                        fill: int) -> None:
    img = noise(*size, seed=size[0] * 100 + size[1])
    got = images.prepare(img, out[0], out[1], layout, fill)
    assert len(got) == out[0] * out[1] * CN
    assert got == reference_prepare(img, out[0], out[1], layout, fill)


def test_resize_matches_the_reference_on_random_sizes() -> None:
    rng = random.Random(20240611)
    for case in range(200):
        w, h, out_w, out_h = (rng.randint(1, 24) for _ in range(4))
        img = noise(w, h, seed=case)
        got = images.resize(img, out_w, out_h)
        assert got.size == (out_w, out_h) and got.mode == "RGB"
        want = cv_resize(rows_of(img), w, h, out_w, out_h)
        assert got.tobytes() == bytes(v for row in want for v in row), (w, h, out_w, out_h)


def test_pillow_bilinear_is_not_opencv() -> None:
    # OpenCV's INTER_LINEAR samples two neighbours, whatever the scale; Pillow's BILINEAR widens its triangle to the
    # scale when it shrinks (antialiasing). 6 -> 2 across samples source columns 1 and 4 (fx = 0): the lone bright
    # column 3 vanishes for OpenCV, and is smeared into the second pixel by Pillow.
    line = Image.frombytes("RGB", (6, 1), bytes([0] * 9 + [255] * 3 + [0] * 6))
    assert images.resize(line, 2, 1).tobytes() == bytes(6)
    assert line.resize((2, 1), Image.Resampling.BILINEAR).getpixel((1, 0)) != (0, 0, 0)
    # and on noise, a downscale that is not 2x: the old Pillow path differs, ours is the reference
    img = noise(12, 12, seed=7)
    want = bytes(v for row in cv_resize(rows_of(img), 12, 12, 5, 5) for v in row)
    assert images.resize(img, 5, 5).tobytes() == want
    assert img.resize((5, 5), Image.Resampling.BILINEAR).tobytes() != want


def test_an_exact_2x_shrink_is_the_rounded_mean_of_each_block() -> None:
    img = noise(8, 8, seed=3)
    data = img.tobytes()

    def at(x: int, y: int, c: int) -> int:
        return data[(y * 8 + x) * CN + c]

    want = bytes((at(2 * x, 2 * y, c) + at(2 * x + 1, 2 * y, c) + at(2 * x, 2 * y + 1, c) + at(2 * x + 1, 2 * y + 1, c)
                  + 2) >> 2 for y in range(4) for x in range(4) for c in range(CN))
    assert images.resize(img, 4, 4).tobytes() == want
    # For uint8 the switch to INTER_AREA cannot be seen: at exactly 2x the linear weights are 1024 + 1024 and its
    # fixed-point formula gives the same rounded mean. OpenCV switches anyway; the reference does both.
    assert bytes(v for row in linear(rows_of(img), 8, 8, 4, 4) for v in row) == want


def test_the_pad_uses_the_given_fill() -> None:
    tall = Image.new("RGB", (2, 4), (10, 20, 30))
    for fill in (0, 127, 128, 255):
        got = images.prepare(tall, 4, 4, "NHWC", fill)  # 4x4 already: no resize, columns 0 and 3 are the pad
        rows = [got[y * 12:(y + 1) * 12] for y in range(4)]
        assert all(row == bytes([fill] * 3 + [10, 20, 30] * 2 + [fill] * 3) for row in rows), fill
    # a grey image on its own grey stays that grey through any resize
    grey = Image.new("RGB", (3, 7), (77, 77, 77))
    assert images.prepare(grey, 5, 6, "NCHW", 77) == bytes([77] * 5 * 6 * CN)
    # the families' default is the demo's cv::Scalar(127.5) on CV_8UC3, which OpenCV rounds to 128
    assert next(f.default for f in fields(Vision) if f.name == "fill") == 128


def test_importing_the_server_does_not_import_opencv() -> None:
    code = ("import sys, mcp_rkllm, mcp_rkllm.cli, mcp_rkllm.models.images\n"
            "print('cv2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
