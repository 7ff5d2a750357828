"""Vision-language models: image -> RKNN vision encoder -> RKLLM multimodal input, as the vendor demo does it
(reference rknn-api.md §3).

A vision model is a `.rkllm` plus the `.rknn` encoder the store pairs with it (`ModelInfo.vision_encoder`). Its
encoder context is opened when the model loads (after the language model, as the demo does) and destroyed with
it; it runs in the server process, one image at a time, while the language model runs in its worker. Steps:

1. The image's bytes: base64 (MCP's image content), a `data:` URI or a file inside the model roots (OpenAI's
   image_url), bounded by `--max-image-bytes` (`image_bytes`).
2. Decode, RGB, pad to a centred square of the family's grey, resize bilinear to the encoder's input H x W,
   uint8 in its input layout (`mcp_rkllm.models.images`, the input size and layout from RKNN_QUERY_INPUT_ATTR).
3. `rknn_inputs_set` (UINT8), `rknn_run`, `rknn_outputs_get` (float32, every output, released at once); token
   count and row width from RKNN_QUERY_OUTPUT_ATTR of output 0 (the first dim > 1 is the token count, the next the
   width); several outputs interleaved per token (`VisionEncoder.encode`).
4. `rkllm_run` with RKLLM_INPUT_MULTIMODAL: `<image>` once per image in the prompt, n_image, n_image_tokens per
   image, image_width / image_height = the encoder's input size, every image's rows back to back, and the tags:
   per call on ABI 1.3.0, in RKLLMParam (img_start / img_end / img_content) at init on 1.2.x (`multimodal_input`,
   `init_tags`).
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models import images
from mcp_rkllm.models.families import Vision
from mcp_rkllm.models.store import ModelInfo
from mcp_rkllm.structs import RKLLMImageInput, RKLLMInput, RKLLMInputType, RKLLMMultiModalInput, RKLLMParam

if TYPE_CHECKING:
    from mcp_rkllm.config import Settings
    from mcp_rkllm.models.paths import PathPolicy
    from mcp_rkllm.native.rknn import RknnContext, RknnLibrary

log = logging.getLogger(__name__)

#: The placeholder the runtime replaces with image_start + image_content x n_image_tokens + image_end.
IMAGE_TAG = "<image>"


def vision_of(info: ModelInfo) -> Vision | None:
    """The model's image tags and fill: its family's `vision` row, overlaid with the sidecar's image_start /
    image_end / image_content; None when neither gives all three tags."""
    base = info.family.vision
    sidecar = info.sidecar
    given = {k: getattr(sidecar, k) for k in ("image_start", "image_end", "image_content")
             if sidecar is not None and getattr(sidecar, k) is not None}
    if base is None:
        if len(given) < 3:
            return None
        return Vision(**given)
    return replace(base, **given)


def init_tags(param: RKLLMParam, vision: Vision | None, abi: str) -> RKLLMParam:
    """On ABI 1.2.x the image tags go in RKLLMParam at init (unless the client set them); 1.3.0 takes them per run."""
    if vision is None or abi == "1.3.0" or param.img_start or param.img_end or param.img_content:
        return param
    return param.model_copy(update={"img_start": vision.image_start, "img_end": vision.image_end,
                                    "img_content": vision.image_content})


def _tokens_and_width(dims: Sequence[int]) -> tuple[int, int]:
    """The demo's rule: the first dim > 1 (of the first four) is the token count, the next one the row width."""
    for i, d in enumerate(dims[:4]):
        if d > 1 and i + 1 < len(dims):
            return d, dims[i + 1]
    raise ValueError(f"cannot read tokens and width from the output dims {list(dims)}")


class VisionEncoder:
    """An opened `.rknn` vision encoder: its input size and layout, its token count and row width (read from the
    model's tensor attributes, never assumed), and the tags of the model it belongs to."""

    def __init__(self, context: RknnContext, path: str, vision: Vision | None):
        self.context = context
        self.path = path
        self.vision = vision
        self._lock = threading.Lock()
        counts = context.query("RKNN_QUERY_IN_OUT_NUM")
        self.n_outputs = int(counts["n_output"])
        attr = context.query("RKNN_QUERY_INPUT_ATTR", 0)
        dims = list(attr["dims"])
        if len(dims) != 4:
            raise ValueError(f"the encoder's input 0 has dims {dims}, not an image tensor [1,H,W,C] / [1,C,H,W]")
        if attr["fmt"] == "RKNN_TENSOR_NCHW":
            self.layout: images.Layout = "NCHW"
            self.channels, self.height, self.width = dims[1], dims[2], dims[3]
        else:
            self.layout = "NHWC"
            self.height, self.width, self.channels = dims[1], dims[2], dims[3]
        if self.channels != 3:
            raise ValueError(f"the encoder's input has {self.channels} channels, not 3 (RGB)")
        outs = [context.query("RKNN_QUERY_OUTPUT_ATTR", i) for i in range(self.n_outputs)]
        self.tokens, self.embed = _tokens_and_width(list(outs[0]["dims"]))
        for o in outs:
            if int(o["n_elems"]) != self.tokens * self.embed:
                raise ValueError(f"output {o['index']} has {o['n_elems']} elements, output 0 {self.tokens}x"
                                 f"{self.embed}: outputs of different shapes cannot be interleaved")
        self.row = self.embed * self.n_outputs
        """Floats per token after interleaving (the runtime's embedding width)."""

    @classmethod
    def open(cls, library: RknnLibrary, path: str, vision: Vision | None) -> VisionEncoder:
        """rknn_init of the encoder and its attribute queries (the context is destroyed again if they fail)."""
        context = library.init(path)
        try:
            return cls(context, path, vision)
        except ValueError as exc:
            context.destroy()
            raise RkllmError("NOT_SUPPORTED", function="load_model",
                             what=f"the vision encoder {os.path.basename(path)}", detail=f": {exc}") from None
        except BaseException:
            context.destroy()
            raise

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.path, "input": [self.height, self.width, self.channels], "layout": self.layout,
                "n_outputs": self.n_outputs, "tokens": self.tokens, "width": self.row}

    def encode(self, pixels: bytes, max_bytes: int) -> array[float]:
        """One image's rows: `tokens` x `row` float32, several outputs interleaved per token."""
        from mcp_rkllm.native.rknn import RknnInput

        with self._lock:
            fmt = f"RKNN_TENSOR_{self.layout}"
            self.context.inputs_set([RknnInput(index=0, buf=pixels, type="RKNN_TENSOR_UINT8", fmt=fmt)])
            self.context.run()
            outputs = self.context.outputs_get(None, max_bytes=max_bytes)
        parts = []
        for out in outputs:
            values = array("f")
            values.frombytes(out.data[: len(out.data) // 4 * 4])
            if len(values) != self.tokens * self.embed:
                raise RkllmError("RKNN_CALL_FAILED", function="rknn_outputs_get", rc=0, rc_name="RKNN_SUCC",
                                 meaning="", detail=f": output {out.index} has {len(values)} floats, expected "
                                                    f"{self.tokens * self.embed}")
            parts.append(values)
        if len(parts) == 1:
            return parts[0]
        rows = array("f")
        w = self.embed
        for t in range(self.tokens):
            for values in parts:
                rows.extend(values[t * w:(t + 1) * w])
        return rows

    def close(self) -> None:
        with self._lock:
            self.context.destroy()


# --------------------------------------------------------------------------- images in requests


def image_bytes(part: dict[str, Any], where: str, function: str, settings: Settings, paths: PathPolicy) -> bytes:
    """The file bytes of an image part: MCP's {"type": "image", "data"} or OpenAI's {"type": "image_url",
    "image_url": {"url"}} (a data: URI or a path inside the model roots)."""
    limit = settings.max_image_bytes
    if part.get("type") == "image":
        return images.b64decode(str(part["data"]), f"{where}.data", function, limit)
    url = str(part["image_url"]["url"])
    where = f"{where}.image_url.url"
    data = images.data_uri(url, where, function, limit)
    if data is not None:
        return data
    if url.split(":", 1)[0].lower() in ("http", "https", "ftp", "file"):
        raise RkllmError("NOT_SUPPORTED", function=function, what=f"{where}: fetching images from URLs",
                         detail="; send the image as a data: URI (data:image/png;base64,...) or a path inside the "
                                "model folders")
    path = paths.model_file(url, function)
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what=f"{where} (image bytes)", value=size,
                             limit=limit)
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise RkllmError("INVALID_PARAMS", function=function,
                         detail=f"{where}: cannot read {url!r} ({exc.strerror or exc})") from None


def split_content(content: Any, where: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A message's content as text with `<image>` where each image was, and its image parts in order."""
    if content is None or isinstance(content, str):
        return content, []
    text, found = "", []
    previous = None
    for i, part in enumerate(content):
        kind = part["type"]
        if kind == "text":
            piece = part["text"]
            text += ("\n" if previous == "text" else "") + piece
        else:
            found.append({**part, "where": f"{where}[{i}]"})
            text += IMAGE_TAG
        previous = kind
    return text, found


def multimodal_input(prompt: str, rows: Sequence[array[float]], encoder: VisionEncoder, abi: str, role: str,
                     enable_thinking: bool) -> RKLLMInput:
    """RKLLM_INPUT_MULTIMODAL for `prompt` (one `<image>` per image) and the images' rows, back to back."""
    embed: list[float] = []
    for r in rows:
        embed.extend(r.tolist())
    vision = encoder.vision
    tags: dict[str, Any] = {}
    if abi == "1.3.0" and vision is not None:
        tags = {"image_start": vision.image_start, "image_end": vision.image_end,
                "image_content": vision.image_content}
    image = RKLLMImageInput(image_embed=embed, n_image_tokens=encoder.tokens, n_image=len(rows),
                            image_width=encoder.width, image_height=encoder.height, **tags)
    return RKLLMInput(role=role, enable_thinking=enable_thinking, input_type=RKLLMInputType.RKLLM_INPUT_MULTIMODAL,
                      multimodal_input=RKLLMMultiModalInput(prompt=prompt, image=image))
