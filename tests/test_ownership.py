"""Who owns a handle (issue 18 item 5): rkllm_init handles belong to the session or connection that made them
(invisible to others, freed when it ends); without a session they are shared; models loaded by name are shared;
idle handles go after keep_alive; an empty or ambiguous name never matches everything."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.engine import Engine, Stream
from mcp_rkllm.engine.types import HandleParams, InitParams, LoadedParams, LoadModelParams, UnloadParams
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.structs import RKLLMParam
from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake
from tests.jsonrpc_client import RpcConn, start_socket_server
from tests.servers import events, free_port, start_http_server, stop

A, B = Stream(owner="session-a"), Stream(owner="session-b")


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture
async def engine(fake_path: Path, fake: FakeView, tmp_path: Path) -> Any:
    (tmp_path / "alpha.rkllm").write_bytes(b"fake")
    (tmp_path / "alpine.rkllm").write_bytes(b"fake")
    e = Engine(Settings(library=str(fake_path), isolation="none", models=(str(tmp_path),), cache_dir=str(tmp_path)))
    await e.open()
    try:
        yield e
    finally:
        await e.close()


async def init(e: Engine, stream: Stream, path: str = "alpha.rkllm") -> str:
    return (await e.init(InitParams(param=RKLLMParam(model_path=path)), stream)).handle


@pytest.mark.anyio
async def test_a_sessions_handles_are_its_own(engine: Engine, fake: FakeView) -> None:
    mine = await init(engine, A)
    for call in (engine.is_running, engine.abort, engine.destroy, engine.get_kv_cache_size):
        with pytest.raises(RkllmError) as err:
            await call(HandleParams(handle=mine), B)
        assert err.value.code == "UNKNOWN_HANDLE"  # the same answer as for a handle that never was
    assert [e.handle for e in (await engine.loaded_models(LoadedParams(), B)).loaded] == []
    assert [e.handle for e in (await engine.loaded_models(LoadedParams(), A)).loaded] == [mine]
    assert engine.status("session-b").handles == [] and engine.status("session-a").handles == [mine]
    with pytest.raises(RkllmError):
        await engine.unload_model(UnloadParams(model="alpha"), B)
    assert (await engine.is_running(HandleParams(handle=mine), A)).running is False
    # A model loaded by name is everyone's; a handle made with no session too.
    shared = (await engine.load_model(LoadModelParams(model="alpine"), A)).handle
    anonymous = await init(engine, Stream())
    for stream in (A, B, Stream()):
        seen = {e.handle for e in (await engine.loaded_models(LoadedParams(), stream)).loaded}
        assert {shared, anonymous} <= seen
    # The session ends: its handle goes (destroyed in the runtime), the shared ones stay.
    destroyed = fake.count("destroy")
    assert await engine.release_owner("session-a") == [mine]
    assert fake.count("destroy") == destroyed + 1 and mine not in engine.handles
    assert {shared, anonymous} <= set(engine.handles)


@pytest.mark.anyio
async def test_unload_by_name_never_matches_everything(engine: Engine) -> None:
    alpha = (await engine.load_model(LoadModelParams(model="alpha"), Stream())).handle
    alpine = (await engine.load_model(LoadModelParams(model="alpine"), Stream())).handle
    for name, code in (("", "INVALID_PARAMS"), ("  ", "INVALID_PARAMS"), ("alp", "MODEL_AMBIGUOUS"),
                       ("beta", "MODEL_NOT_FOUND")):
        with pytest.raises(RkllmError) as err:
            await engine.unload_model(UnloadParams(model=name), Stream())
        assert err.value.code == code, name
    assert set(engine.handles) == {alpha, alpine}
    assert (await engine.unload_model(UnloadParams(model="alpine.rkllm"), Stream())).unloaded == [alpine]
    assert (await engine.unload_model(UnloadParams(model="alph"), Stream())).unloaded == [alpha]


@pytest.mark.anyio
async def test_idle_handles_are_unloaded_after_keep_alive(fake_path: Path, fake: FakeView, tmp_path: Path) -> None:
    (tmp_path / "alpha.rkllm").write_bytes(b"fake")
    e = Engine(Settings(library=str(fake_path), isolation="none", models=(str(tmp_path),), cache_dir=str(tmp_path),
                        keep_alive=0.4))
    await e.open()
    try:
        idle = await init(e, A)
        busy = await init(e, A)
        with anyio.fail_after(10):
            while idle in e.handles:
                await e.is_running(HandleParams(handle=busy), A)  # named again and again: it stays
                await anyio.sleep(0.1)
        assert busy in e.handles
    finally:
        await e.close()


@pytest.fixture
def library() -> Path:
    return build_fake("1.3.0", version="1.3.0")


@pytest.mark.slow
def test_jsonrpc_connections_own_their_handles(library: Path, tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    sock = tmp_path / "s.sock"
    records = tmp_path / "records"
    proc = start_socket_server(library, records, sock)
    try:
        with RpcConn(sock) as a, RpcConn(sock) as b:
            mine = a.result("rkllm.init", [None, {"model_path": "m.rkllm"}, None])["handle"]
            _, refused = b.call("rkllm.run", [mine, {"prompt_input": "x"}])
            assert refused["error"]["data"]["code"] == "UNKNOWN_HANDLE"
            _, refused = b.call("rkllm.run", {"prompt": "x"})  # no default handle for b either
            assert refused["error"]["data"]["code"] == "UNKNOWN_HANDLE"
            assert b.result("loaded_models")["loaded"] == []
            assert a.result("rkllm.run", {"prompt": "x", "max_tokens": 1})["token_count"] == 1
        deadline = time.monotonic() + 10
        while events(records).count("destroy") < 1:  # a closed: its handle is destroyed
            assert time.monotonic() < deadline, "the connection's handle was not freed"
            time.sleep(0.05)
        with RpcConn(sock) as c:
            assert c.result("server_status")["handles"] == []
    finally:
        stop(proc)


@pytest.fixture
def http(library: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    port = free_port()
    records = tmp_path / "records"
    proc = start_http_server("http", library, records, port)
    try:
        yield f"http://127.0.0.1:{port}", records
    finally:
        stop(proc)


@pytest.mark.slow
@pytest.mark.anyio
async def test_streamable_http_sessions_own_their_handles(http: tuple[str, Path], tmp_path: Path) -> None:
    base, records = http
    with anyio.fail_after(60):
        async with Client(base + "/mcp", mode="legacy") as a:
            made = await a.call_tool("rkllm_init", {"param": {"model_path": "m.rkllm"}})
            mine = made.structured_content["handle"]  # type: ignore[index]
            async with Client(base + "/mcp", mode="legacy") as b:
                for tool in ("rkllm_is_running", "rkllm_destroy"):
                    r = await b.call_tool(tool, {"handle": mine})
                    assert r.is_error and r.structured_content["error"]["code"] == "UNKNOWN_HANDLE"  # type: ignore[index]
                listed = await b.call_tool("loaded_models", {})
                assert listed.structured_content["loaded"] == []  # type: ignore[index]
                r = await b.call_tool("unload_model", {"model": ""})
                assert r.is_error and r.structured_content["error"]["code"] == "INVALID_PARAMS"  # type: ignore[index]
            ok = await a.call_tool("rkllm_is_running", {"handle": mine})
            assert not ok.is_error  # b's attempts changed nothing
        # a's client ended its session (DELETE): the handle is freed in the runtime.
        deadline = time.monotonic() + 10
        while events(records).count("destroy") < 1:
            assert time.monotonic() < deadline, "the session's handle was not freed"
            await anyio.sleep(0.05)
        # A stateless JSON-RPC request has no session: its handle is shared, usable by whoever knows the id.
        async with httpx.AsyncClient(timeout=30) as h:
            made2 = (await h.post(base + "/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": "rkllm.init",
                                                          "params": [None, {"model_path": "m.rkllm"}]})).json()
            shared = made2["result"]["handle"]
            again = (await h.post(base + "/jsonrpc", json={"jsonrpc": "2.0", "id": 2, "method": "rkllm.is_running",
                                                          "params": [shared]})).json()
            assert again["result"]["running"] is False
