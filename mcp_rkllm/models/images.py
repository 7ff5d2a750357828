"""Images for vision encoders, as the vendor's multimodal demo prepares them (reference rknn-api.md §3.1 step 3).

Pure functions on bytes, no runtime: `decode` reads PNG, JPEG or WebP with Pillow into RGB, bounded in pixels (the
image's, and the square's it will be padded to) before anything is decoded (a decompression bomb is LIMIT_EXCEEDED,
a broken or truncated file INVALID_PARAMS), turned upright by its EXIF orientation and 16-bit grey taken to 8 bits
by its high byte, as OpenCV's imread does; `to_square` pads it to a centred square of the family's grey (integer
offsets `(size - w) // 2`, `(size - h) // 2`, as the demo's expand2square); `resize` scales the square to the
encoder's input size with `cv2.resize(..., INTER_LINEAR)`, the demo's own call, so the resized square is OpenCV's
byte for byte (no antialiasing when shrinking, OpenCV's 11-bit fixed-point weights and rounding, its clamped
borders, an exact 2x shrink averaged as INTER_AREA); `pixels` lays it out as uint8 HWC (NHWC) or CHW (NCHW).
`prepare` does all four and returns width x height x 3 bytes. Pillow decodes and pads; OpenCV
(opencv-python-headless) only resizes and is imported by the first resize, not with this module.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from mcp_rkllm.errors import RkllmError

#: The formats the pipeline decodes (Pillow's names); anything else is refused before decoding.
FORMATS = ("PNG", "JPEG", "WEBP")

Layout = Literal["NHWC", "NCHW"]

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def _invalid(function: str, detail: str) -> RkllmError:
    return RkllmError("INVALID_PARAMS", function=function, detail=detail)


def b64decode(text: str, where: str, function: str, max_bytes: int) -> bytes:
    """Base64 text (whitespace allowed) as bytes, bounded by `max_bytes` before decoding."""
    compact = "".join(text.split())
    size = len(compact) * 3 // 4
    if size > max_bytes + 2:
        raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"{where} (image bytes)", value=size,
                         limit=max_bytes)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(function, f"{where}: not valid base64") from None
    if len(data) > max_bytes:
        raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"{where} (image bytes)", value=len(data),
                         limit=max_bytes)
    return data


def data_uri(text: str, where: str, function: str, max_bytes: int) -> bytes | None:
    """The bytes of a `data:` URI (base64 only), or None when `text` is not one."""
    match = _DATA_URI.match(text)
    if match is None:
        return None
    if not match.group("b64"):
        raise _invalid(function, f"{where}: a data: URI must be base64 (data:image/png;base64,...)")
    return b64decode(text[match.end():], where, function, max_bytes)


def decode(data: bytes, where: str, function: str, max_pixels: int) -> Image.Image:
    """The image in `data` (PNG, JPEG or WebP) as RGB; its pixel count is checked before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"{where} (pixels, {width}x{height})",
                                 value=width * height, limit=max_pixels)
            side = max(width, height)
            if side * side > max_pixels:  # a 1x100000 image is a 100000x100000 square once padded (30 GB)
                raise RkllmError("LIMIT_EXCEEDED", function=function,
                                 what=f"{where} (pixels once padded to a square, {width}x{height} -> {side}x{side})",
                                 value=side * side, limit=max_pixels)
            img.load()
            # As OpenCV's imread/imdecode (the demo) reads it: turned upright by its EXIF orientation, and 16-bit
            # grey reduced to 8 bits by its high byte (Pillow's own conversion clips everything above 255 to white).
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                import numpy as np

                img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
            # Palette and grey images with transparency go through RGBA, as Pillow advises.
            if img.mode in ("P", "LA", "PA") or (img.mode == "L" and "transparency" in img.info):
                img = img.convert("RGBA")
            return img.convert("RGB")
    except RkllmError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"{where} (pixels)", value=str(exc)[:120],
                         limit=max_pixels) from None
    except UnidentifiedImageError:
        raise _invalid(function, f"{where}: not a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated, corrupt, unsupported mode
        raise _invalid(function, f"{where}: the image cannot be decoded ({str(exc)[:200] or type(exc).__name__})"
                       ) from None


def to_square(img: Image.Image, fill: int) -> Image.Image:
    """`img` centred on a max(w, h) square of grey `fill` (offsets `(size - w) // 2`, `(size - h) // 2`)."""
    width, height = img.size
    if width == height:
        return img
    size = max(width, height)
    square = Image.new("RGB", (size, size), (fill, fill, fill))
    square.paste(img, ((size - width) // 2, (size - height) // 2))
    return square


def resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """`img` (RGB) scaled to `width` x `height` as the demo's `cv::resize(..., INTER_LINEAR)` does: the same pixels.

    Not Pillow's BILINEAR, which widens its filter when it shrinks (antialiasing) and rounds differently."""
    if img.size == (width, height):
        return img
    import cv2  # here, not at the top: the server starts without it and pays its import on the first image
    import numpy as np

    rgb = img if img.mode == "RGB" else img.convert("RGB")
    src = np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(rgb.height, rgb.width, 3)
    out = cv2.resize(src, (width, height), interpolation=cv2.INTER_LINEAR)
    return Image.frombytes("RGB", (width, height), out.tobytes())


def pixels(img: Image.Image, layout: Layout) -> bytes:
    """An RGB image's uint8 values: HWC (NHWC) or CHW (NCHW), row-major."""
    if layout == "NHWC":
        return img.tobytes()
    return b"".join(band.tobytes() for band in img.split())


def prepare(img: Image.Image, width: int, height: int, layout: Layout, fill: int) -> bytes:
    """The encoder's input for `img`: padded to a square of `fill`, resized, uint8 in `layout`."""
    return pixels(resize(to_square(img, fill), width, height), layout)
