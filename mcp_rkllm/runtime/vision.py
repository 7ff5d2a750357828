"""A vision model's RKNN encoder, living beside its language model (reference rknn-api.md §3.1 steps 2 and 4).

The encoder is opened in the process that holds the `.rkllm` model, after it (as the vendor demo does), and
destroyed before it: with process isolation that is the model's supervised worker, so a crash in librknnrt ends
that worker (RUNTIME_CRASHED), never the server. It never sees image files: it gets the pixels the engine
prepared (uint8 in its input layout) and gives float32 rows `[tokens, n_outputs * width]`, which go straight into
the run's RKLLM_INPUT_MULTIMODAL there (`with_rows`) instead of travelling back to the server.

Token count and width are read from output 0's attributes by the demo's rule (the first dim > 1 of the first four
is the token count, the next one the width); input height, width and layout from input 0's (NCHW or NHWC).
Several outputs (Qwen3-VL's deepstack) are interleaved per token, as the demo does.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models.images import Layout
from mcp_rkllm.structs import RKLLMInput

if TYPE_CHECKING:
    from mcp_rkllm.native.rknn import RknnContext


@dataclass(frozen=True)
class EncoderShape:
    """What an opened encoder takes and gives: the engine prepares images and checks limits from this alone."""

    path: str
    height: int
    width: int
    layout: Layout
    n_outputs: int
    tokens: int
    """Embedding rows per image (n_image_tokens)."""
    embed: int
    """Floats per row of one output."""

    @property
    def row(self) -> int:
        """Floats per token after interleaving the outputs (the language model's embedding width)."""
        return self.embed * self.n_outputs

    @property
    def floats(self) -> int:
        """Floats per image."""
        return self.tokens * self.row

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.path, "input": [self.height, self.width, 3], "layout": self.layout,
                "n_outputs": self.n_outputs, "tokens": self.tokens, "width": self.row}


def tokens_and_width(dims: Sequence[int]) -> tuple[int, int]:
    """The demo's rule: the first dim > 1 (of the first four) is the token count, the next one the row width."""
    for i, d in enumerate(dims[:4]):
        if d > 1 and i + 1 < len(dims):
            return d, dims[i + 1]
    raise ValueError(f"cannot read tokens and width from the output dims {list(dims)}")


def shape_of(context: RknnContext, path: str) -> EncoderShape:
    """The encoder's shape from its attribute queries; ValueError when it is not an image encoder we can feed."""
    counts = context.query("RKNN_QUERY_IN_OUT_NUM")
    n_outputs = int(counts["n_output"])
    attr = context.query("RKNN_QUERY_INPUT_ATTR", 0)
    dims = list(attr["dims"])
    if len(dims) != 4:
        raise ValueError(f"the encoder's input 0 has dims {dims}, not an image tensor [1,H,W,C] / [1,C,H,W]")
    layout: Layout
    if attr["fmt"] == "RKNN_TENSOR_NCHW":
        layout, (channels, height, width) = "NCHW", dims[1:4]
    else:
        layout, (height, width, channels) = "NHWC", dims[1:4]
    if channels != 3:
        raise ValueError(f"the encoder's input has {channels} channels, not 3 (RGB)")
    outs = [context.query("RKNN_QUERY_OUTPUT_ATTR", i) for i in range(n_outputs)]
    tokens, embed = tokens_and_width(list(outs[0]["dims"]))
    for o in outs:
        if int(o["n_elems"]) != tokens * embed:
            raise ValueError(f"output {o['index']} has {o['n_elems']} elements, output 0 {tokens}x{embed}: "
                             "outputs of different shapes cannot be interleaved")
    return EncoderShape(path, height, width, layout, n_outputs, tokens, embed)


class VisionEncoder:
    """An opened `.rknn` vision encoder and its shape. One image at a time."""

    def __init__(self, context: RknnContext, shape: EncoderShape):
        self.context = context
        self.shape = shape
        self._lock = threading.Lock()

    @classmethod
    def open(cls, library: str | None, path: str, core_mask: int | str | None = None) -> VisionEncoder:
        """librknnrt (found like librkllmrt), rknn_init of the encoder, its core mask and attribute queries; the
        context is destroyed again if any of them fails. A model the pipeline cannot feed is NOT_SUPPORTED."""
        from mcp_rkllm.native.rknn import RknnLibrary

        context = RknnLibrary.open(library).init(path)
        try:
            if core_mask is not None:
                context.set_core_mask(core_mask)
            return cls(context, shape_of(context, path))
        except ValueError as exc:
            context.destroy()
            raise RkllmError("NOT_SUPPORTED", function="load_model",
                             what=f"the vision encoder {os.path.basename(path)}", detail=f": {exc}") from None
        except BaseException:
            context.destroy()
            raise

    def encode(self, pixels: bytes) -> array[float]:
        """One image's rows: `tokens` x `row` float32, several outputs interleaved per token."""
        from mcp_rkllm.native.rknn import RknnInput

        s = self.shape
        with self._lock:
            self.context.inputs_set([RknnInput(index=0, buf=pixels, type="RKNN_TENSOR_UINT8",
                                               fmt=f"RKNN_TENSOR_{s.layout}")])
            self.context.run()
            outputs = self.context.outputs_get(None, max_bytes=s.floats * 4)  # every output together
        parts = []
        for out in outputs:
            values = array("f")
            values.frombytes(out.data[: len(out.data) // 4 * 4])
            if len(values) != s.tokens * s.embed:
                raise RkllmError("RKNN_CALL_FAILED", function="rknn_outputs_get", rc=0, rc_name="RKNN_SUCC",
                                 meaning="", detail=f": output {out.index} has {len(values)} floats, expected "
                                                    f"{s.tokens * s.embed}")
            parts.append(values)
        if len(parts) == 1:
            return parts[0]
        rows = array("f")
        w = s.embed
        for t in range(s.tokens):
            for values in parts:
                rows.extend(values[t * w:(t + 1) * w])
        return rows

    def encode_all(self, images: Sequence[bytes], stop: Callable[[], bool] = lambda: False) -> array[float]:
        """The rows of every image, back to back (image_embed of one multimodal run). Once `stop()` holds (the run
        was aborted), the images not yet encoded are skipped: rknn_run cannot be interrupted, but need not go on."""
        rows = array("f")
        for pixels in images:
            if stop():
                break
            rows.extend(self.encode(pixels))
        return rows

    def close(self) -> None:
        """rknn_destroy (after an encoding in progress)."""
        with self._lock:
            self.context.destroy()


def with_rows(rkllm_input: RKLLMInput, rows: array[float]) -> RKLLMInput:
    """`rkllm_input` (RKLLM_INPUT_MULTIMODAL whose image_embed the engine left empty) with the encoder's rows.

    The rows stay a float32 array (copied into C in one memmove), never a list of Python floats: a Qwen3-VL image
    is 1.6 million of them. The engine already checked the counts, so nothing is validated again here."""
    mm = rkllm_input.multimodal_input
    if mm is None:
        raise RkllmError("INTERNAL", function="rkllm_run", detail="images given with a non-multimodal input")
    if mm.image is not None:
        mm = mm.model_copy(update={"image": mm.image.model_copy(update={"image_embed": rows})})
    else:
        mm = mm.model_copy(update={"image_embed": rows})
    return rkllm_input.model_copy(update={"multimodal_input": mm})
