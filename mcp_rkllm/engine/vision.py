"""Vision-language models: image -> RKNN vision encoder -> RKLLM multimodal input, as the vendor demo does it
(reference rknn-api.md §3).

A vision model is a `.rkllm` plus the `.rknn` encoder the store pairs with it (`ModelInfo.vision_encoder`). Its
encoder is opened when the model loads, after the language model and in the same process (the model's supervised
worker: `runtime.vision`), and destroyed with it. This module is the engine's half, per request:

1. The image's bytes: base64 (MCP's image content), a `data:` URI or a file inside the model roots (OpenAI's
   image_url), bounded by `--max-image-bytes` (`image_bytes`).
2. Decode, RGB, pad to a centred square of the family's grey, resize bilinear to the encoder's input H x W,
   uint8 in its input layout (`mcp_rkllm.models.images`; size and layout from the encoder's `EncoderShape`).
   This happens in the server, bounded by `--max-image-pixels`, so the worker only ever sees pixels.
3. The worker runs the encoder on each image and fills image_embed (`runtime.vision.with_rows`).
4. `rkllm_run` with RKLLM_INPUT_MULTIMODAL: `<image>` once per image in the prompt, n_image, n_image_tokens per
   image, image_width / image_height = the encoder's input size, every image's rows back to back, and the tags:
   per call on ABI 1.3.0, in RKLLMParam (img_start / img_end / img_content) at init on 1.2.x (`multimodal_input`,
   `init_tags`). ABI 1.2.0 has no n_image, image_width or image_height: one image per run there.
"""

from __future__ import annotations

import os
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
    from mcp_rkllm.runtime.vision import EncoderShape

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


def multimodal_input(prompt: str, n_images: int, shape: EncoderShape, vision: Vision, abi: str, role: str,
                     enable_thinking: bool) -> RKLLMInput:
    """RKLLM_INPUT_MULTIMODAL for `prompt` (one `<image>` per image), its image_embed left for the worker's encoder
    to fill (`runtime.vision.with_rows`): the counts, sizes and (on 1.3.0) tags are all set here."""
    tags: dict[str, Any] = {}
    if abi == "1.3.0":
        tags = {"image_start": vision.image_start, "image_end": vision.image_end,
                "image_content": vision.image_content}
    # 1.2.0 has neither n_image nor the image size (a zero is "not passed"); the engine allows one image there.
    width, height = (0, 0) if abi == "1.2.0" else (shape.width, shape.height)
    image = RKLLMImageInput.model_construct(image_embed=[], n_image_tokens=shape.tokens, n_image=n_images,
                                            image_width=width, image_height=height, **tags)
    return RKLLMInput(role=role, enable_thinking=enable_thinking, input_type=RKLLMInputType.RKLLM_INPUT_MULTIMODAL,
                      multimodal_input=RKLLMMultiModalInput.model_construct(prompt=prompt, image=image))
