"""A hostile client against the vision and RKNN paths: cancels and unloads while an image is being encoded,
concurrent image chats against the run slot and its queue, rknn_init / rknn_dup_context racing the context limit,
rknn_* calls racing rknn_destroy, a SIGKILLed RKNN worker, malformed tensor inputs, and images built to hurt
(a square that would not fit in memory, 16-bit grey, EXIF rotation, CMYK, animated WebP, palettes, symlinks out of
the model roots). Every refusal is a coded error, the server serves on, no worker or output buffer is left behind."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from mcp import Client
from PIL import Image

from mcp_rkllm.errors import ERRORS, RkllmError
from mcp_rkllm.models import images
from mcp_rkllm.surfaces.mcp import build_server
from tests.fake_rknn import PROFILES, FakeRknnView, build_fake_rknn, expected_outputs, write_model
from tests.servers import child_processes, free_port, server_log, start_http_server, stop
from tests.test_server import call, fail
from tests.test_vision import MODEL, b64, make_rig, picture, png

pytestmark = pytest.mark.anyio


def children(pid: int | None = None) -> list[int]:
    """The live (not zombie) child processes of `pid` (default: this process)."""
    return [c for c, state in child_processes(pid) if state != "Z"]


def zombies(pid: int | None = None) -> list[int]:
    return [c for c, state in child_processes(pid) if state == "Z"]


def image_chat(text: str = "What?", img: Image.Image | None = None, **extra: Any) -> dict[str, Any]:
    part = {"type": "image", "data": b64(png(img or picture(12, 9)))}
    return {"model": MODEL, "messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}],
            **extra}


# ---------------------------------------------------------------------------------------------- encoding vs. abort


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_a_cancel_while_encoding_never_starts_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            isolation: str) -> None:
    """rkllm_abort used to reach an idle handle while the encoder ran (no rkllm_run yet) and was lost: the run then
    generated every token for nobody (here 30 x 200 ms) while the slot stayed held."""
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4", run_ms=800)
    settings = rig.settings.model_copy(update={"isolation": isolation})
    async with Client(build_server(settings)) as client:
        await call(client, "load_model", {"model": MODEL})
        started = time.monotonic()
        with anyio.move_on_after(0.3):
            await client.call_tool("chat", image_chat("fake:delay_ms=200 slow", max_new_tokens=30))
        assert time.monotonic() - started < 3.0  # the encoding (0.8 s) ends, the run never starts
        assert rig.rkllm.count("run") == 0
        r = await call(client, "chat", image_chat("again"))  # the handle serves on, images included
        assert r["token_count"] == 3 and rig.rkllm.count("run") == 1
    assert rig.rknn.unreleased() == 0


async def test_unload_while_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4", run_ms=800)
    server = build_server(rig.settings)
    async with Client(server) as client:
        loaded = await call(client, "load_model", {"model": MODEL})
        pid = server.engine.handles[loaded["handle"]].model.pid  # type: ignore[attr-defined]
        results: list[Any] = []

        async def chat() -> None:
            results.append(await client.call_tool("chat", image_chat("fake:delay_ms=200 x", max_new_tokens=30)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)
            await anyio.sleep(0.3)
            started = time.monotonic()
            await call(client, "unload_model", {"model": MODEL})
            assert time.monotonic() - started < 3.0
        r = results[0]
        if r.is_error:
            assert r.structured_content["error"]["code"] in ("CANCELLED", "UNKNOWN_HANDLE")
        else:
            assert r.structured_content["finish_reason"] == "abort"
        assert rig.rkllm.count("run") == 0 and rig.rknn.count("rknn_destroy") == 1
        assert pid not in children()
    assert rig.rknn.unreleased() == 0 and not zombies()


async def test_concurrent_image_chats_against_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4", run_ms=150)
    settings = rig.settings.model_copy(update={"max_queued_runs": 1})
    async with Client(build_server(settings)) as client:
        await call(client, "load_model", {"model": MODEL})
        results: list[Any] = []

        async def chat(n: int) -> None:
            results.append(await client.call_tool("chat", image_chat(f"n{n}", picture(10 + n, 9, n))))

        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(chat, n)
        codes = [r.structured_content["error"]["code"] if r.is_error else "ok" for r in results]
        assert codes.count("ok") >= 2 and set(codes) <= {"ok", "LIMIT_EXCEEDED"}, codes
        assert all(r.structured_content["token_count"] == 3 for r in results if not r.is_error)
        assert rig.rkllm.count("run") == codes.count("ok")
        assert (await call(client, "chat", image_chat("after")))["token_count"] == 3
    assert rig.rknn.unreleased() == 0


# ---------------------------------------------------------------------------------------------- rknn_* contexts


@pytest.fixture
def rknn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRknnView:
    records = tmp_path / "rknn-records"
    records.mkdir()
    monkeypatch.setenv("FAKE_RKNN_RECORD_DIR", str(records))
    write_model(tmp_path / "enc.rknn", "tiny")
    write_model(tmp_path / "slow.rknn", "tiny", load_ms=300, run_ms=200)
    view = FakeRknnView(build_fake_rknn(), records)
    view.reset()
    return view


def rknn_settings(rknn: FakeRknnView, tmp_path: Path, **extra: Any) -> Any:
    from mcp_rkllm.config import Settings

    return Settings(rknn_library=str(rknn.path), runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path),
                    **extra)


def image_data() -> str:
    h, w, c = PROFILES["tiny"].hwc
    return base64.b64encode(bytes((i * 7 + 3) % 256 for i in range(h * w * c))).decode()


async def test_rknn_init_and_dup_race_the_context_limit(rknn: FakeRknnView, tmp_path: Path) -> None:
    async with Client(build_server(rknn_settings(rknn, tmp_path, max_loaded_models=2))) as client:
        before = set(children())
        results: list[Any] = []

        async def init() -> None:
            results.append(await client.call_tool("rknn_init", {"model_path": "slow.rknn"}))

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(init)
        made = [r.structured_content["context"] for r in results if not r.is_error]
        codes = {r.structured_content["error"]["code"] for r in results if r.is_error}
        assert len(made) == 2 and codes == {"LIMIT_EXCEEDED"}
        assert len(set(children()) - before) == 2  # one worker per context, no more ever started
        # A dup holds runtime memory too: it counts (it used to be unbounded).
        error = await fail(client, "rknn_dup_context", {"context": made[0]})
        assert error["code"] == "LIMIT_EXCEEDED"
        for ctx in made:
            await call(client, "rknn_destroy", {"context": ctx})
        dup_source = (await call(client, "rknn_init", {"model_path": "enc.rknn"}))["context"]
        dup = (await call(client, "rknn_dup_context", {"context": dup_source}))["context"]
        assert (await fail(client, "rknn_dup_context", {"context": dup}))["code"] == "LIMIT_EXCEEDED"
        await call(client, "rknn_destroy", {"context": dup_source})
        await call(client, "rknn_destroy", {"context": dup})
        assert set(children()) - before == set()
    assert not zombies()


@pytest.mark.parametrize("isolation", ["auto", "none"])
async def test_rknn_calls_racing_destroy(rknn: FakeRknnView, tmp_path: Path, isolation: str) -> None:
    data = image_data()
    async with Client(build_server(rknn_settings(rknn, tmp_path, isolation=isolation))) as client:
        before = set(children())
        for _ in range(2):
            ctx = (await call(client, "rknn_init", {"model_path": "slow.rknn"}))["context"]
            dup = (await call(client, "rknn_dup_context", {"context": ctx}))["context"]
            results: list[tuple[str, Any]] = []

            async def do(tool: str, args: dict[str, Any], delay: float = 0.0,
                         into: list[tuple[str, Any]] = results) -> None:
                await anyio.sleep(delay)
                into.append((tool, await client.call_tool(tool, args)))

            async with anyio.create_task_group() as tg:
                for c in (ctx, dup):
                    tg.start_soon(do, "rknn_run", {"context": c, "input_data": [{"data": data}]})
                    tg.start_soon(do, "rknn_query", {"context": c, "cmd": "RKNN_QUERY_IN_OUT_NUM"}, 0.05)
                    tg.start_soon(do, "rknn_destroy", {"context": c}, 0.1)
                    tg.start_soon(do, "rknn_run", {"context": c, "input_data": [{"data": data}]}, 0.15)
                    tg.start_soon(do, "rknn_outputs_get", {"context": c}, 0.2)
            for tool, r in results:
                if r.is_error:  # a context destroyed meanwhile is one that is not there (not a crash)
                    assert r.structured_content["error"]["code"] == "UNKNOWN_HANDLE", (tool, r.structured_content)
            assert sum(1 for t, r in results if t == "rknn_destroy" and not r.is_error) == 2
        assert set(children()) - before == set()
    assert rknn.unreleased() == 0 and not zombies()


async def test_a_killed_rknn_worker(rknn: FakeRknnView, tmp_path: Path) -> None:
    server = build_server(rknn_settings(rknn, tmp_path))
    async with Client(server) as client:
        ctx = (await call(client, "rknn_init", {"model_path": "enc.rknn"}))["context"]
        dup = (await call(client, "rknn_dup_context", {"context": ctx}))["context"]
        pid = server.engine.rknn.contexts[ctx].context.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        await anyio.sleep(0.2)
        error = await fail(client, "rknn_query", {"context": ctx, "cmd": "RKNN_QUERY_IN_OUT_NUM"})
        assert error["code"] == "RUNTIME_CRASHED" and "SIGKILL" in error["message"]
        assert (await fail(client, "rknn_run", {"context": dup}))["code"] == "UNKNOWN_HANDLE"
        assert (await fail(client, "rknn_destroy", {"context": ctx}))["code"] == "UNKNOWN_HANDLE"
        again = (await call(client, "rknn_init", {"model_path": "enc.rknn"}))["context"]
        out = await call(client, "rknn_run", {"context": again, "input_data": [{"data": image_data()}]})
        assert out["outputs"][0]["size"] > 0
        await call(client, "rknn_destroy", {"context": again})
    assert pid not in children() and not zombies()


@pytest.mark.parametrize("isolation", ["auto", "none"])
async def test_hostile_rknn_inputs(rknn: FakeRknnView, tmp_path: Path, isolation: str) -> None:
    profile = PROFILES["tiny"]
    h, w, c = profile.hwc
    raw = bytes((i * 7 + 3) % 256 for i in range(h * w * c))
    expected = expected_outputs(raw, profile.hwc, 1, profile.tokens, profile.width)
    async with Client(build_server(rknn_settings(rknn, tmp_path, isolation=isolation))) as client:
        ctx = (await call(client, "rknn_init", {"model_path": "enc.rknn"}))["context"]
        # JSON numbers for an integer tensor (they arrive as floats): packed as uint8, as base64 would be.
        # (They used to fail: "'float' object cannot be interpreted as an integer".)
        out = await call(client, "rknn_run", {"context": ctx, "encoding": "array",
                                              "input_data": [{"values": list(raw), "type": "RKNN_TENSOR_UINT8"}]})
        assert out["outputs"][0]["values"] == pytest.approx(list(expected[0]), abs=1e-6)
        await call(client, "rknn_inputs_set", {"context": ctx, "inputs": [{"values": [v - 128 for v in raw],
                                                                           "type": 2}]})
        refused: list[tuple[str, dict[str, Any], str]] = [
            ("rknn_run", {"input_data": [{"values": [1.5] * len(raw), "type": "RKNN_TENSOR_UINT8"}]}, "1.5"),
            ("rknn_run", {"input_data": [{"values": [300.0] * len(raw)}]}, "RKNN_TENSOR_UINT8"),
            ("rknn_inputs_set", {"inputs": [{"values": [-1] * 4, "type": "RKNN_TENSOR_UINT8"}]}, "inputs[0]"),
            ("rknn_inputs_set", {"inputs": [{"values": [1e39], "type": "RKNN_TENSOR_FLOAT32"}]}, "1e+39"),
            ("rknn_inputs_set", {"inputs": [{"values": [1.0], "type": "RKNN_TENSOR_FLOAT16"}]}, "`data`"),
            ("rknn_inputs_set", {"inputs": [{"values": [1.0], "type": "RKNN_TENSOR_NOPE"}]}, "NOPE"),
            ("rknn_run", {"input_data": [{"data": "!!not base64!!"}]}, "input_data[0].data"),
            ("rknn_run", {"input_data": [{"data": ""}]}, "size 0"),
            ("rknn_inputs_set", {"inputs": [{"data": "AA==", "values": [1]}]}, ""),
            ("rknn_inputs_set", {"inputs": []}, ""),
            ("rknn_inputs_set", {"inputs": [{"data": image_data(), "index": 7}]}, ""),
            ("rknn_inputs_set", {"inputs": [{"data": image_data(), "type": "RKNN_TENSOR_FLOAT32"}]}, ""),
            ("rknn_inputs_set", {"inputs": "AAAA"}, ""),
            ("rknn_run", {"input_data": [{"data": base64.b64encode(bytes(3 << 20)).decode()}]}, ""),
        ]
        for tool, args, said in refused:
            r = await client.call_tool(tool, {"context": ctx, **args})
            assert r.is_error, (tool, args)
            error = r.structured_content["error"]
            assert error["code"] in ERRORS and error["code"] in ("INVALID_PARAMS", "RKNN_CALL_FAILED",
                                                                 "LIMIT_EXCEEDED"), error
            # (rknn_run's input_data fails in the C function that refuses it: rknn_inputs_set)
            assert said in error["message"] and error["function"] in (tool, "rknn_inputs_set"), error
        # still serving, on the same context
        again = await call(client, "rknn_run", {"context": ctx, "input_data": [{"data": image_data()}]})
        assert len(base64.b64decode(again["outputs"][0]["data"])) == profile.tokens * profile.width * 4
        await call(client, "rknn_destroy", {"context": ctx})
    assert rknn.unreleased() == 0


# ---------------------------------------------------------------------------------------------- images


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def test_images_built_to_hurt() -> None:
    import cv2

    def demo(data: bytes) -> bytes:  # what the vendor demo's cv2.imread (here imdecode) gives, as RGB
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert bgr is not None
        return bytes(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).tobytes())

    # A 1x100000 image is 100000 pixels, but a 100000x100000 square once padded (30 GB): refused before decoding.
    for size in ((1, 100_000), (40_000, 1)):
        with pytest.raises(RkllmError) as e:
            images.decode(encoded(Image.new("RGB", size), "PNG"), "img", "chat", 40_000_000)
        assert e.value.code == "LIMIT_EXCEEDED" and "square" in e.value.message
    # A decompression bomb (a 7000x7000 PNG of 50 kB) is refused by its header.
    bomb = encoded(Image.new("L", (7000, 7000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(RkllmError) as e:
        images.decode(bomb, "img", "chat", 40_000_000)
    assert e.value.code == "LIMIT_EXCEEDED" and "7000x7000" in e.value.message
    # 16-bit grey: OpenCV keeps the high byte; Pillow's own conversion clipped every value over 255 to white.
    grey16 = (np.arange(64, dtype=np.uint16) * 1031).reshape(8, 8)
    data = cv2.imencode(".png", grey16)[1].tobytes()
    assert images.decode(data, "img", "chat", 100).tobytes() == demo(data)
    rgb16 = cv2.imencode(".png", np.dstack([grey16, grey16[::-1], grey16.T]))[1].tobytes()
    assert images.decode(rgb16, "img", "chat", 100).tobytes() == demo(rgb16)
    # A phone photo's EXIF orientation: OpenCV turns it upright; so does the server now (it used to go sideways).
    src = picture(6, 4)
    exif = src.getexif()
    exif[0x0112] = 6
    rotated = encoded(src, "PNG", exif=exif.tobytes())
    upright = images.decode(rotated, "img", "chat", 100)
    assert upright.size == (4, 6) and upright.tobytes() == demo(rotated)
    # CMYK JPEG, animated WebP (its first frame), a palette PNG with a transparent entry, 1-bit: all RGB.
    cmyk = images.decode(encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), "img", "chat", 100)
    assert cmyk.mode == "RGB" and cmyk.tobytes()[0] > 200
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    anim = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert images.decode(anim, "img", "chat", 100).getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0])
    got = images.decode(encoded(pal, "PNG", transparency=0), "img", "chat", 100)
    assert got.mode == "RGB" and got.tobytes() == demo(encoded(pal, "PNG", transparency=0))
    assert images.decode(encoded(Image.new("1", (3, 3), 1), "PNG"), "img", "chat", 100).getpixel((1, 1)) == (255,) * 3
    # Garbage with an image's magic is INVALID_PARAMS, never an exception of another kind.
    for junk in (b"\x89PNG\r\n\x1a\n" + os.urandom(200), b"\xff\xd8\xff" + os.urandom(200), b"RIFF\0\0\0\0WEBP",
                 b"", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\x7f\xff\xff\xff\x7f\xff\xff\xff\x08\x02\0\0\0"):
        with pytest.raises(RkllmError) as e:
            images.decode(junk, "img", "chat", 40_000_000)
        assert e.value.code in ("INVALID_PARAMS", "LIMIT_EXCEEDED")


async def test_image_paths_and_sizes_at_the_wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(tmp_path, monkeypatch, "1.3.0", output_dims="4,4")
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(picture(4, 4)))
    (rig.root / "escape.png").symlink_to(outside)
    (rig.root / "dir-escape").symlink_to(tmp_path)
    (rig.root / "loop.png").symlink_to(rig.root / "loop.png")
    (rig.root / "photos").mkdir()
    (rig.root / "photos" / "ok.png").write_bytes(png(picture(9, 9)))

    def gen(url: str) -> dict[str, Any]:
        return {"model": MODEL, "prompt": "x", "images": [{"type": "image_url", "image_url": {"url": url}}]}

    async with Client(build_server(rig.settings)) as client:
        for url in ("escape.png", str(rig.root / "escape.png"), "dir-escape/secret.png", "../secret.png",
                    str(outside)):
            assert (await fail(client, "generate", gen(url)))["code"] == "PATH_NOT_ALLOWED", url
        for url in ("loop.png", "photos", "photos/none.png", "photos/ok.png\0.txt"):
            assert (await fail(client, "generate", gen(url)))["code"] in ("INVALID_PARAMS", "PATH_NOT_ALLOWED"), url
        tall = {"type": "image", "data": b64(png(Image.new("RGB", (1, 100_000))))}
        error = await fail(client, "chat", {"model": MODEL, "messages": [{"role": "user", "content": [tall]}]})
        assert error["code"] == "LIMIT_EXCEEDED" and "square" in error["message"]
        # exactly at --max-image-bytes passes the byte bound; one byte over does not
        limit = rig.settings.max_image_bytes
        at = b"\x89PNG" + bytes(limit - 4)
        assert (await fail(client, "generate", {"model": MODEL, "prompt": "x", "images": [
            {"type": "image", "data": b64(at)}]}))["code"] == "INVALID_PARAMS"
        assert (await fail(client, "generate", {"model": MODEL, "prompt": "x", "images": [
            {"type": "image", "data": b64(at + b"\0")}]}))["code"] == "LIMIT_EXCEEDED"
        r = await call(client, "generate", gen("photos/ok.png"))
        assert r["token_count"] == 3
    assert rig.rknn.unreleased() == 0


# ---------------------------------------------------------------------------------------------- over the wire


@pytest.mark.slow
def test_ollama_stream_dropped_while_encoding(tmp_path: Path) -> None:
    """A real server: an Ollama NDJSON stream with an image whose client leaves while the encoder runs. The run
    never starts, the model's worker serves the next request, and nothing is left when the server stops."""
    from tests.fake_rkllm.build import build_fake

    root = tmp_path / "models"
    folder = root / "qwen-vl"
    folder.mkdir(parents=True)
    (folder / f"{MODEL}.rkllm").write_bytes(b"fake model")
    write_model(folder / "vision.rknn", "tiny", output_dims="4,4", run_ms=1000)
    (folder / f"{MODEL}.json").write_text(json.dumps({"vision_encoder": "vision.rknn", "max_new_tokens": 40}))
    records, nn_records = tmp_path / "rk", tmp_path / "nn"
    nn_records.mkdir()
    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", version="1.3.0"), records, port,
                             RKNN_LIB_PATH=str(build_fake_rknn()), FAKE_RKNN_RECORD_DIR=str(nn_records),
                             MCP_RKLLM_MODELS=str(root))
    try:
        base = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "stream": True, "messages": [
            {"role": "user", "content": "fake:delay_ms=200 look", "images": [b64(png(picture(16, 12)))]}]}
        raw = json.dumps(body).encode()
        warm = httpx.post(f"{base}/api/chat", json={"model": MODEL, "stream": False, "messages": [
            {"role": "user", "content": "load it"}]}, timeout=30)
        assert warm.status_code == 200, warm.text
        workers = children(proc.pid)
        assert len(workers) == 1
        with socket.create_connection(("127.0.0.1", port)) as s:
            head = f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            s.sendall(f"{head}Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            time.sleep(0.4)  # the encoder runs for 1 s: leave now
        deadline = time.monotonic() + 10
        while "cancelled after" not in server_log(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cancelled after" in server_log(proc)
        started = time.monotonic()
        r = httpx.post(f"{base}/api/chat", json={"model": MODEL, "stream": False, "messages": [
            {"role": "user", "content": "next", "images": [b64(png(picture(8, 8)))]}]}, timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 5  # not behind 40 tokens x 200 ms generated for nobody
        runs = [json.loads(line) for line in (records / "run.json").read_text().splitlines()[-1:]]
        assert "fake:delay_ms" not in runs[0]["input"]["multimodal_input"]["prompt"]
        assert (records / "events").read_text().split().count("run") == 2  # the warm-up and the last one
        assert children(proc.pid) == workers
    finally:
        stop(proc)
    assert not children(proc.pid)
    events = (nn_records / "events").read_text().split()
    assert events.count("rknn_output_buffer") == events.count("rknn_output_buffer_released")
