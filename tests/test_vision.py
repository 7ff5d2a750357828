"""Vision-language models end to end: images prepared as the vendor demo does (pad, fill, resize, layout), run
through the fake librknnrt's encoder, and given to the fake librkllmrt as RKLLM_INPUT_MULTIMODAL (tags, counts,
sizes and the embedding values recomputed from the pixels), over MCP, the OpenAI client and the Ollama API."""

from __future__ import annotations

import base64
import io
import json
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from PIL import Image

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models import images
from mcp_rkllm.models.store import ModelStore
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake
from tests.fake_rknn import PROFILES, FakeRknnView, build_fake_rknn, expected_outputs, write_model
from tests.test_server import call, fail

pytestmark = pytest.mark.anyio

MODEL = "Qwen2.5-VL-3B-Instruct_W8A8_RK3588"
# The fake librkllmrt records n_image x n_image_tokens x 4 floats of image_embed: rows 4 wide show every value.
ROW = 4


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def picture(w: int, h: int, seed: int = 1) -> Image.Image:
    return Image.frombytes("RGB", (w, h), bytes(v for y in range(h) for x in range(w) for v in (
        (x * 37 + seed * 11) % 256, (y * 53 + seed) % 256, (x * y + seed * 5) % 256)))


# ---------------------------------------------------------------------------------------------- preprocessing


def test_pad_to_a_centred_square_of_the_fill() -> None:
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    square = images.to_square(img, 128)
    assert square.size == (4, 4)
    # offsets (4-4)//2 = 0 across, (4-2)//2 = 1 down: rows 0 and 3 are grey, rows 1-2 the image
    rows = [[square.getpixel((x, y)) for x in range(4)] for y in range(4)]
    assert rows[0] == rows[3] == [(128, 128, 128)] * 4 and rows[1] == rows[2] == [(10, 20, 30)] * 4
    odd = images.to_square(Image.new("RGB", (1, 4), (1, 2, 3)), 128)  # (4-1)//2 = 1: column 1 only
    assert [odd.getpixel((x, 0)) for x in range(4)] == [(128,) * 3, (1, 2, 3), (128,) * 3, (128,) * 3]
    assert images.to_square(img.resize((3, 3)), 128).size == (3, 3)


def test_resize_and_layouts() -> None:
    # left half red, right half blue, 8x8 -> 4x4 bilinear: the columns far from the edge keep their colour
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    img.paste((0, 0, 255), (4, 0, 8, 8))
    small = images.resize(img, 4, 4)
    assert small.size == (4, 4) and small.getpixel((0, 2)) == (255, 0, 0) and small.getpixel((3, 1)) == (0, 0, 255)
    tiny = Image.frombytes("RGB", (2, 1), bytes([1, 2, 3, 4, 5, 6]))
    assert images.pixels(tiny, "NHWC") == bytes([1, 2, 3, 4, 5, 6])
    assert images.pixels(tiny, "NCHW") == bytes([1, 4, 2, 5, 3, 6])
    # prepare = pad (fill), resize, layout: a 2x1 image padded to 2x2 (row 0 grey... offset (2-1)//2 = 0: row 1 grey)
    got = images.prepare(tiny, 2, 2, "NHWC", 128)
    assert got == bytes([1, 2, 3, 4, 5, 6, 128, 128, 128, 128, 128, 128])
    assert images.prepare(tiny, 2, 2, "NCHW", 7) == bytes([1, 4, 7, 7, 2, 5, 7, 7, 3, 6, 7, 7])


def test_decode_formats_and_refusals() -> None:
    src = picture(5, 3)
    for fmt in ("PNG", "WEBP"):
        assert images.decode(png(src, fmt), "x", "chat", 1000).tobytes() == src.tobytes()  # lossless
    assert images.decode(png(src, "JPEG"), "x", "chat", 1000).size == (5, 3)
    grey = images.decode(png(Image.new("LA", (2, 2), (9, 255))), "x", "chat", 100)
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(RkllmError) as e:
        images.decode(png(src)[:60], "img", "chat", 1000)
    assert e.value.code == "INVALID_PARAMS" and "img" in e.value.message
    with pytest.raises(RkllmError) as e:
        images.decode(b"GIF89a" + b"\0" * 20, "img", "chat", 1000)
    assert e.value.code == "INVALID_PARAMS" and "not a PNG, JPEG or WebP" in e.value.message
    with pytest.raises(RkllmError) as e:
        images.decode(png(Image.new("RGB", (100, 100))), "img", "chat", 9999)  # checked before decoding
    assert e.value.code == "LIMIT_EXCEEDED" and "100x100" in e.value.message
    with pytest.raises(RkllmError) as e:
        images.b64decode("A" * 400, "img", "chat", 100)
    assert e.value.code == "LIMIT_EXCEEDED"
    assert images.data_uri("data:image/png;base64,AAEC", "u", "chat", 10) == b"\0\1\2"
    assert images.data_uri("/some/path.png", "u", "chat", 10) is None


def test_store_pairs_encoders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"{MODEL}.rkllm").write_bytes(b"m")
    (tmp_path / "a" / "vision.rknn").write_text("x")
    (tmp_path / "b").mkdir()  # two models in one folder: no automatic pairing
    (tmp_path / "b" / "one.rkllm").write_bytes(b"m")
    (tmp_path / "b" / "two.rkllm").write_bytes(b"m")
    (tmp_path / "b" / "enc.rknn").write_text("x")
    (tmp_path / "b" / "two.json").write_text(json.dumps({"vision_encoder": "enc.rknn", "family": "internvl3",
                                                         "image_content": "<X>"}))
    (tmp_path / "b" / "one.json").write_text(json.dumps({"vision_encoder": "missing.rknn"}))
    scan = ModelStore([tmp_path], include_bundled=False).scan()
    by_name = {m.name: m for m in scan.models}
    assert by_name[MODEL].vision_encoder == tmp_path / "a" / "vision.rknn"
    assert by_name[MODEL].family.name == "qwen2.5-vl"
    assert by_name["two"].vision_encoder == tmp_path / "b" / "enc.rknn"
    assert by_name["one"].vision_encoder is None and any("missing.rknn" in p.message for p in scan.problems)
    listed = by_name["two"].to_dict()
    assert listed["vision"] is True and listed["vision_encoder"].endswith("enc.rknn")
    from mcp_rkllm.engine.vision import vision_of

    assert vision_of(by_name["two"]) is not None
    tags = vision_of(by_name["two"])
    assert tags is not None and (tags.image_start, tags.image_end, tags.image_content) == ("<img>", "</img>", "<X>")


# ---------------------------------------------------------------------------------------------- end to end


class Rig:
    def __init__(self, root: Path, rkllm: FakeView, rknn: FakeRknnView, settings: Settings, profile: str,
                 overrides: dict[str, Any]):
        self.root, self.rkllm, self.rknn, self.settings = root, rkllm, rknn, settings
        p = PROFILES[profile]
        given = overrides.get("output_dims")
        dims = [int(d) for d in str(given).split(",")] if given else list(p.output_dims)
        self.n_outputs = int(overrides.get("n_outputs", p.n_outputs))
        self.hwc = p.hwc
        self.width = dims[-1]
        n = 1
        for d in dims:
            n *= d
        self.tokens = n // self.width
        self.nchw = overrides.get("layout") == "NCHW" or p.input_dims[1] == 3

    def expected_rows(self, img: Image.Image, fill: int = 128) -> list[float]:
        """What the encoder gives for `img` (prepared in NHWC for the formula), interleaved per token."""
        h, w, _ = self.hwc
        hwc_pixels = images.prepare(img, w, h, "NHWC", fill)
        outs = expected_outputs(hwc_pixels, self.hwc, self.n_outputs, self.tokens, self.width)
        rows: list[float] = []
        for t in range(self.tokens):
            for o in outs:
                rows.extend(o[t * self.width:(t + 1) * self.width])
        return rows


def make_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abi: str, profile: str = "tiny",
             **overrides: Any) -> Rig:
    root = tmp_path / "models"
    folder = root / "qwen-vl"
    folder.mkdir(parents=True)
    (folder / f"{MODEL}.rkllm").write_bytes(b"fake model")
    write_model(folder / "qwen2.5-vl-3b-vision.rknn", profile, **overrides)
    (folder / f"{MODEL}.json").write_text(json.dumps({"vision_encoder": "qwen2.5-vl-3b-vision.rknn",
                                                      "max_new_tokens": 3}))
    (root / "text-only.rkllm").write_bytes(b"fake model")
    rk_records, nn_records = tmp_path / "rkllm-records", tmp_path / "rknn-records"
    rk_records.mkdir()
    nn_records.mkdir()
    monkeypatch.setenv("FAKE_RKLLM_RECORD_DIR", str(rk_records))
    monkeypatch.setenv("FAKE_RKNN_RECORD_DIR", str(nn_records))
    library = build_fake(abi, version=abi)
    rknn = FakeRknnView(build_fake_rknn(), nn_records)
    rknn.reset()
    settings = Settings(library=str(library), rknn_library=str(rknn.path), models=(str(root),),
                        cache_dir=str(tmp_path / "cache"), max_image_bytes=200_000)
    return Rig(root, FakeView(library, rk_records), rknn, settings, profile, overrides)


def floats32(values: list[float]) -> list[float]:
    return list(array("f", values))


@pytest.mark.parametrize("abi", ["1.2.1", "1.3.0"])
async def test_chat_with_an_image_reaches_rkllm_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abi: str) -> None:
    rig = make_rig(tmp_path, monkeypatch, abi, output_dims="4,4")
    img = picture(40, 20)
    async with Client(build_server(rig.settings)) as client:
        listed = {m["name"]: m for m in (await call(client, "list_models", {}))["models"]}
        assert listed[MODEL]["vision"] is True and listed[MODEL]["vision_encoder"].endswith("vision.rknn")
        assert listed["text-only"]["vision"] is False
        r = await call(client, "chat", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image", "data": b64(png(img)), "mimeType": "image/png"},
            {"type": "text", "text": "What is in the image?"}]}]})
        assert r["token_count"] == 3
        run = rig.rkllm.last("run")["input"]
        init = rig.rkllm.last("init")
    assert run["input_type"] == 3
    mm = run["multimodal_input"]
    assert mm["prompt"].endswith("<image>What is in the image?") and mm["prompt"].count("<image>") == 1
    image = mm["image"] if abi == "1.3.0" else mm
    assert (image["n_image"], image["n_image_tokens"]) == (1, rig.tokens)
    assert (image["image_width"], image["image_height"]) == (rig.hwc[1], rig.hwc[0])
    assert image["image_embed"] == pytest.approx(floats32(rig.expected_rows(img)), abs=0)
    tags = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    if abi == "1.3.0":
        assert (image["image_start"], image["image_end"], image["image_content"]) == tags
    else:  # 1.2.x: the tags are given at init, in RKLLMParam
        assert (init["img_start"], init["img_end"], init["img_content"]) == tags
    assert init["extend_param"]["base_domain_id"] == 1  # the encoder keeps domain 0 (vendor demo)
    # the encoder got uint8 NHWC of the padded, resized image, and nothing was left unreleased or open
    assert rig.rknn.last("rknn_inputs_set")["inputs"][0]["type"] in ("RKNN_TENSOR_UINT8", 3)
    assert rig.rknn.unreleased() == 0 and rig.rknn.count("rknn_destroy") >= 1


async def test_two_images_deepstack_and_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two outputs of [4,2]: each token's row is output 0's two floats, then output 1's (interleaved), 4 wide.
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", "tiny-deepstack", n_outputs=2, output_dims="4,2")
    a, b = picture(32, 16, 1), picture(10, 30, 2)
    async with Client(build_server(rig.settings)) as client:
        await call(client, "chat", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "image", "data": b64(png(a))},
            {"type": "image_url", "image_url": {"url": "data:image/webp;base64," + b64(png(b, "WEBP"))}},
            {"type": "text", "text": "please."}]}]})
        mm = rig.rkllm.last("run")["input"]["multimodal_input"]
        assert mm["prompt"].endswith("Compare<image><image>please.")
        assert (mm["image"]["n_image"], mm["image"]["n_image_tokens"]) == (2, 4)
        assert mm["image"]["image_embed"] == floats32(rig.expected_rows(a) + rig.expected_rows(b))
        # generate takes images too, before the prompt; a file inside the model roots is a path
        (rig.root / "cat.png").write_bytes(png(b))
        await call(client, "generate", {"model": MODEL, "prompt": "Describe.",
                                        "images": [{"type": "image_url", "image_url": {"url": "cat.png"}}]})
        mm = rig.rkllm.last("run")["input"]["multimodal_input"]
        assert mm["prompt"].endswith("<image>Describe.") and mm["image"]["image_embed"] == floats32(
            rig.expected_rows(b))
        unloaded = await call(client, "unload_model", {"model": MODEL})
        assert unloaded["unloaded"]
        assert rig.rknn.unreleased() == 0 and rig.rknn.count("rknn_destroy") == 1  # freed with its model


async def test_nchw_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", "tiny-nchw", output_dims="1,4,4")
    img = picture(20, 28)
    async with Client(build_server(rig.settings)) as client:
        await call(client, "generate", {"model": MODEL, "prompt": "x", "images": [{"type": "image",
                                                                                   "data": b64(png(img))}]})
    h, w, c = rig.hwc
    chw = rig.rknn.last("rknn_inputs_set")
    assert chw["inputs"][0]["fmt"] in ("RKNN_TENSOR_NCHW", 0)
    assert rig.rkllm.last("run")["input"]["multimodal_input"]["image"]["image_embed"] == floats32(
        rig.expected_rows(img))
    assert c == 3 and h == w == 28


async def test_errors_leave_the_server_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4")
    good = {"type": "image", "data": b64(png(picture(8, 8)))}

    def chat(content: list[dict[str, Any]], model: str = MODEL) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": content}]}

    async with Client(build_server(rig.settings)) as client:
        error = await fail(client, "chat", chat([good], "text-only"))
        assert error["code"] == "NOT_SUPPORTED" and "no vision encoder" in error["message"]
        truncated = {"type": "image", "data": b64(png(picture(30, 30))[:80])}
        error = await fail(client, "chat", chat([truncated, {"type": "text", "text": "hi"}]))
        assert error["code"] == "INVALID_PARAMS" and "messages[0].content[0]" in error["message"]
        big = {"type": "image", "data": b64(b"\x89PNG" + bytes(300_000))}
        assert (await fail(client, "chat", chat([big])))["code"] == "LIMIT_EXCEEDED"
        outside = {"type": "image_url", "image_url": {"url": "/etc/hostname"}}
        assert (await fail(client, "generate", {"model": MODEL, "prompt": "x", "images": [outside]}))["code"] == \
            "PATH_NOT_ALLOWED"
        web = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
        assert (await fail(client, "chat", chat([web])))["code"] == "NOT_SUPPORTED"
        assert (await fail(client, "chat", chat([good, {"type": "text", "text": "<image>"}])))["code"] == \
            "INVALID_PARAMS"
        assert (await fail(client, "chat", {"model": MODEL, "messages": [
            {"role": "system", "content": [good]}, {"role": "user", "content": "x"}]}))["code"] == "INVALID_PARAMS"
        ok = await call(client, "chat", chat([good, {"type": "text", "text": "still here"}]))
        assert ok["token_count"] == 3
    assert rig.rknn.unreleased() == 0


async def test_the_cpu_runtime_answers_not_supported(tmp_path: Path) -> None:
    settings = Settings(runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path))
    from tests.cpu import require_cpu_runtime

    require_cpu_runtime()
    async with Client(build_server(settings)) as client:
        error = await fail(client, "generate", {"prompt": "x", "max_new_tokens": 1,
                                                "images": [{"type": "image", "data": b64(png(picture(4, 4)))}]})
    assert error["code"] == "NOT_SUPPORTED" and "cpu runtime" in error["message"]


# ---------------------------------------------------------------------------------------------- HTTP APIs


@pytest.fixture
async def http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[httpx.AsyncClient, Rig]]:
    from starlette.applications import Starlette

    from mcp_rkllm.surfaces.api import api_routes

    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4")
    server = build_server(rig.settings)
    await server.engine.open()
    try:
        app = Starlette(routes=api_routes(server.registry, server.engine, rig.settings))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            yield client, rig
    finally:
        await server.engine.close()


async def test_openai_and_ollama_images(http: tuple[httpx.AsyncClient, Rig]) -> None:
    import openai

    client, rig = http
    img = picture(24, 12, 3)
    import httpx2

    transport = httpx2.ASGITransport(app=client._transport.app)  # type: ignore[attr-defined]
    oa = openai.AsyncOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x",
                            http_client=httpx2.AsyncClient(transport=transport))
    r = await oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png(img))}}]}])
    assert r.choices[0].message.content
    mm = rig.rkllm.last("run")["input"]["multimodal_input"]
    assert mm["prompt"].endswith("What is this?<image>") and mm["image"]["image_embed"] == floats32(
        rig.expected_rows(img))
    # Ollama: images (base64) in /api/generate and in a chat message
    g = await client.post("/api/generate", json={"model": MODEL, "prompt": "Describe", "images": [b64(png(img))],
                                                 "stream": False})
    assert g.status_code == 200, g.text
    assert rig.rkllm.last("run")["input"]["multimodal_input"]["prompt"].endswith("<image>Describe")
    c = await client.post("/api/chat", json={"model": MODEL, "stream": False, "messages": [
        {"role": "user", "content": "And this?", "images": [b64(png(img)), b64(png(img))]}]})
    assert c.status_code == 200, c.text
    mm = rig.rkllm.last("run")["input"]["multimodal_input"]
    assert mm["prompt"].endswith("<image><image>And this?") and mm["image"]["n_image"] == 2
    bad = await client.post("/api/chat", json={"model": "text-only", "stream": False, "messages": [
        {"role": "user", "content": "x", "images": [b64(png(img))]}]})
    assert bad.status_code == 400 and "NOT_SUPPORTED" in bad.json()["error"]
    assert rig.rknn.unreleased() == 0


# ---------------------------------------------------------------------------------------------- isolation, ABIs


def vision_model(root: Path, name: str, **overrides: Any) -> None:
    """A second vision model in its own folder (a .rkllm and a single .rknn beside it pair automatically)."""
    folder = root / name
    folder.mkdir()
    (folder / f"{name}.rkllm").write_bytes(b"fake model")
    (folder / f"{name}.json").write_text(json.dumps({"family": "qwen2.5-vl", "max_new_tokens": 3}))
    write_model(folder / "vision.rknn", "tiny", output_dims="4,4", **overrides)


async def test_the_encoder_lives_in_the_models_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder is opened in the vision model's own worker process (not the server), and a librknnrt crash
    while encoding ends that worker only: RUNTIME_CRASHED for its caller, the server and other models serve on."""
    import os

    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4")
    vision_model(rig.root, "crashy", crash="rknn_run")
    img = {"type": "image", "data": b64(png(picture(12, 9)))}

    def chat(model: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": [img, {"type": "text", "text": "What?"}]}]}

    server = build_server(rig.settings)
    async with Client(server) as client:
        r = await call(client, "chat", chat(MODEL))
        worker = server.engine.handles[r["handle"]].model
        pid = worker.pid  # type: ignore[attr-defined]
        assert rig.rknn.last("rknn_init")["pid"] == pid != os.getpid()
        loaded = await call(client, "load_model", {"model": "crashy"})
        assert rig.rknn.last("rknn_init")["pid"] == server.engine.handles[loaded["handle"]].model.pid  # type: ignore[attr-defined]
        error = await fail(client, "chat", chat("crashy"))
        assert error["code"] == "RUNTIME_CRASHED" and "SIGSEGV" in error["message"], error
        assert loaded["handle"] not in server.engine.handles
        again = await call(client, "chat", chat(MODEL))  # the other vision model, its worker untouched
        assert again["handle"] == r["handle"] and again["token_count"] == 3
        assert server.engine.handles[r["handle"]].model.pid == pid  # type: ignore[attr-defined]
        status = await call(client, "server_status", {})
        assert status
    assert rig.rknn.unreleased() == 0


async def test_an_encoder_that_cannot_open_leaves_the_model_answering_text(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4")
    vision_model(rig.root, "brokenenc", fail="rknn_init")
    async with Client(build_server(rig.settings)) as client:
        text = await call(client, "chat", {"model": "brokenenc", "messages": [{"role": "user", "content": "hi"}]})
        assert text["token_count"] == 3
        error = await fail(client, "chat", {"model": "brokenenc", "messages": [{"role": "user", "content": [
            {"type": "image", "data": b64(png(picture(8, 8)))}]}]})
    assert error["code"] == "NOT_SUPPORTED" and "could not be opened" in error["message"]
    assert "RKNN_" in error["message"]


async def test_abi_1_2_0_takes_one_image_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RKLLM 1.2.0's RKLLMMultiModelInput is {prompt, image_embed, n_image_tokens}: one image goes through (tags in
    RKLLMParam at init), two are NOT_SUPPORTED before any work, and the server serves on."""
    rig = make_rig(tmp_path, monkeypatch, "1.2.0", output_dims="4,4")
    img = picture(16, 10)
    async with Client(build_server(rig.settings)) as client:
        r = await call(client, "generate", {"model": MODEL, "prompt": "Describe.",
                                            "images": [{"type": "image", "data": b64(png(img))}]})
        assert r["token_count"] == 3
        mm = rig.rkllm.last("run")["input"]["multimodal_input"]
        init = rig.rkllm.last("init")
        assert mm["prompt"].endswith("<image>Describe.") and mm["n_image_tokens"] == rig.tokens
        assert mm["image_embed"] == floats32(rig.expected_rows(img))
        assert "n_image" not in mm and "image_width" not in mm
        assert (init["img_start"], init["img_end"], init["img_content"]) == (
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
        runs = rig.rkllm.count("run")
        error = await fail(client, "generate", {"model": MODEL, "prompt": "Both?", "images": [
            {"type": "image", "data": b64(png(img))}, {"type": "image", "data": b64(png(picture(5, 5)))}]})
        assert error["code"] == "NOT_SUPPORTED" and "1.2.0" in error["message"] and "n_image" in error["message"]
        assert rig.rkllm.count("run") == runs
        assert (await call(client, "generate", {"model": MODEL, "prompt": "ok"}))["token_count"] == 3
    assert rig.rknn.unreleased() == 0


async def test_vision_without_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--isolation none: the encoder runs in the server process beside the model, with the same results."""
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4")
    settings = rig.settings.model_copy(update={"isolation": "none"})
    img = picture(20, 14)
    async with Client(build_server(settings)) as client:
        await call(client, "generate", {"model": MODEL, "prompt": "x", "images": [{"type": "image",
                                                                                   "data": b64(png(img))}]})
        assert rig.rkllm.last("run")["input"]["multimodal_input"]["image"]["image_embed"] == floats32(
            rig.expected_rows(img))
        await call(client, "unload_model", {"model": MODEL})
    assert rig.rknn.unreleased() == 0 and rig.rknn.count("rknn_destroy") == 1
