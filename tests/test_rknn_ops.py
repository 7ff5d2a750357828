"""The rknn_* operations (librknnrt 1:1) through MCP and JSON-RPC, on the fake librknnrt: every call, the outputs
recomputed from the input pixels, buffers released, errors with their C names, contexts owned like handles."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.fake_rknn import PROFILES, FakeRknnView, build_fake_rknn, expected_outputs, write_model
from tests.jsonrpc_client import RpcConn, start_socket_server
from tests.servers import stop

pytestmark = pytest.mark.anyio


@pytest.fixture
def rknn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRknnView:
    library = build_fake_rknn()
    records = tmp_path / "rknn-records"
    records.mkdir()
    monkeypatch.setenv("FAKE_RKNN_RECORD_DIR", str(records))
    write_model(tmp_path / "enc.rknn", "tiny")
    write_model(tmp_path / "deep.rknn", "tiny-deepstack")
    view = FakeRknnView(library, records)
    view.reset()
    return view


def pixels(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


async def call(client: Client, tool: str, args: dict[str, Any]) -> Any:
    r = await client.call_tool(tool, args)
    assert not r.is_error, r.content
    return r.structured_content


@pytest.mark.parametrize("isolation", ["auto", "none"])
async def test_every_rknn_operation_over_mcp(rknn: FakeRknnView, tmp_path: Path, isolation: str) -> None:
    settings = Settings(rknn_library=str(rknn.path), runtime="cpu", models=(str(tmp_path),),
                        cache_dir=str(tmp_path), isolation=isolation)
    profile = PROFILES["tiny"]
    h, w, c = profile.hwc
    image = pixels(h * w * c)
    async with Client(build_server(settings)) as client:
        made = await call(client, "rknn_init", {"model_path": "enc.rknn", "flag": "RKNN_FLAG_COLLECT_PERF_MASK"})
        ctx = made["context"]
        assert made["n_input"] == 1 and made["n_output"] == 1 and made["sdk"]["api_version"]
        attr = (await call(client, "rknn_query", {"context": ctx, "cmd": "RKNN_QUERY_INPUT_ATTR"}))["result"]
        assert attr["dims"] == list(profile.input_dims) and attr["fmt"] == "RKNN_TENSOR_NHWC"
        out_attr = (await call(client, "rknn_query", {"context": ctx, "cmd": 2, "index": 0}))["result"]
        assert out_attr["dims"] == list(profile.output_dims)
        data = base64.b64encode(image).decode()
        await call(client, "rknn_inputs_set", {"context": ctx, "inputs": [{"data": data}]})
        assert (await call(client, "rknn_run", {"context": ctx}))["outputs"] == []
        got = await call(client, "rknn_outputs_get", {"context": ctx, "encoding": "array"})
        expected = expected_outputs(image, profile.hwc, 1, profile.tokens, profile.width)
        assert got["outputs"][0]["values"] == pytest.approx(list(expected[0]), abs=1e-6)
        # The convenience form: set, run and get in one call; base64 float32 by default.
        once = await call(client, "rknn_run", {"context": ctx, "input_data": [{"data": data}]})
        floats = struct.unpack(f"<{profile.tokens * profile.width}f", base64.b64decode(once["outputs"][0]["data"]))
        assert list(floats) == pytest.approx(list(expected[0]), abs=1e-6)
        await call(client, "rknn_outputs_release", {"context": ctx})
        await call(client, "rknn_set_core_mask", {"context": ctx, "core_mask": "RKNN_NPU_CORE_AUTO"})
        dup = (await call(client, "rknn_dup_context", {"context": ctx}))["context"]
        assert dup != ctx
        assert (await call(client, "rknn_destroy", {"context": dup}))["destroyed"]
        # Errors: the runtime's own code by its C name; bad input caught before C; paths confined.
        small = await client.call_tool("rknn_inputs_set", {"context": ctx, "inputs": [{"data": "AAAA"}]})
        error = small.structured_content["error"]  # type: ignore[index]
        assert small.is_error and error["code"] == "RKNN_CALL_FAILED" and "RKNN_ERR_PARAM_INVALID" in error["message"]
        bad = await client.call_tool("rknn_inputs_set", {"context": ctx, "inputs": [{"data": "not base64!"}]})
        assert bad.structured_content["error"]["code"] == "INVALID_PARAMS"  # type: ignore[index]
        outside = await client.call_tool("rknn_init", {"model_path": "/etc/passwd"})
        assert outside.structured_content["error"]["code"] == "PATH_NOT_ALLOWED"  # type: ignore[index]
        gone = await client.call_tool("rknn_query", {"context": "r-nope", "cmd": "RKNN_QUERY_IN_OUT_NUM"})
        assert gone.structured_content["error"]["code"] == "UNKNOWN_HANDLE"  # type: ignore[index]
        await call(client, "rknn_destroy", {"context": ctx})
    assert rknn.unreleased() == 0
    # every context made (in its worker process, not this one, unless --isolation none) was destroyed
    assert (rknn.last("rknn_init")["pid"] == os.getpid()) == (isolation == "none")
    assert rknn.count("rknn_init") + rknn.count("rknn_dup_context") == rknn.count("rknn_destroy") == 2


async def test_a_crashing_rknn_context_ends_its_worker_only(rknn: FakeRknnView, tmp_path: Path) -> None:
    """librknnrt raising SIGSEGV in rknn_run: RUNTIME_CRASHED for that context and the dups sharing its worker,
    which are forgotten; another context, in its own worker, and the server carry on."""
    write_model(tmp_path / "crashy.rknn", "tiny", crash="rknn_run")
    settings = Settings(rknn_library=str(rknn.path), runtime="cpu", models=(str(tmp_path),),
                        cache_dir=str(tmp_path))
    h, w, c = PROFILES["tiny"].hwc
    data = [{"data": base64.b64encode(pixels(h * w * c)).decode()}]
    async with Client(build_server(settings)) as client:
        good = (await call(client, "rknn_init", {"model_path": "enc.rknn"}))["context"]
        bad = (await call(client, "rknn_init", {"model_path": "crashy.rknn"}))["context"]
        dup = (await call(client, "rknn_dup_context", {"context": bad}))["context"]
        crashed = await client.call_tool("rknn_run", {"context": bad, "input_data": data})
        error = crashed.structured_content["error"]  # type: ignore[index]
        assert crashed.is_error and error["code"] == "RUNTIME_CRASHED" and "SIGSEGV" in error["message"], error
        for gone in (bad, dup):
            later = await client.call_tool("rknn_query", {"context": gone, "cmd": "RKNN_QUERY_IN_OUT_NUM"})
            assert later.structured_content["error"]["code"] == "UNKNOWN_HANDLE"  # type: ignore[index]
        out = await call(client, "rknn_run", {"context": good, "input_data": data, "encoding": "array"})
        assert len(out["outputs"][0]["values"]) == PROFILES["tiny"].tokens * PROFILES["tiny"].width
        assert (await call(client, "server_status", {}))["pid"] == os.getpid()
        await call(client, "rknn_destroy", {"context": good})
    assert rknn.unreleased() == 0


@pytest.mark.slow
def test_rknn_methods_over_the_jsonrpc_socket(rknn: FakeRknnView, tmp_path: Path) -> None:
    """The seed's JSON-RPC clients called rknn.init / rknn.query / rknn.run; a connection owns its contexts."""
    from tests.fake_rkllm.build import build_fake

    sock = tmp_path / "s.sock"
    proc = start_socket_server(build_fake("1.3.0", version="1.3.0"), tmp_path / "records", sock,
                               RKNN_LIB_PATH=str(rknn.path))
    profile = PROFILES["tiny-deepstack"]
    h, w, c = profile.hwc
    image = pixels(h * w * c)
    try:
        with RpcConn(sock) as a, RpcConn(sock) as b:
            ctx = a.result("rknn.init", [None, "deep.rknn", None, 0, None])["context"]
            counts = a.result("rknn.query", [ctx, "RKNN_QUERY_IN_OUT_NUM"])["result"]
            assert counts == {"n_input": 1, "n_output": 4}
            out = a.result("rknn.run", {"context": ctx, "encoding": "array", "input_data": [
                {"data": base64.b64encode(image).decode()}]})["outputs"]
            expected = expected_outputs(image, profile.hwc, 4, profile.tokens, profile.width)
            assert [o["values"] for o in out] == [pytest.approx(list(e), abs=1e-6) for e in expected]
            _, refused = b.call("rknn.query", [ctx, "RKNN_QUERY_IN_OUT_NUM"])
            assert refused["error"]["data"]["code"] == "UNKNOWN_HANDLE"  # another connection's context
        # a closed: its context was destroyed; nothing left behind in the runtime.
        with RpcConn(sock) as c2:
            assert c2.result("server_status")["pid"] == proc.pid
        assert rknn.unreleased() == 0
    finally:
        stop(proc)


async def test_idle_rknn_contexts_go_after_keep_alive(rknn: FakeRknnView, tmp_path: Path) -> None:
    """A context no call names for keep_alive seconds is destroyed (its worker ends); one in use stays."""
    import anyio

    from mcp_rkllm.engine import Engine
    from mcp_rkllm.engine.relay import Stream
    from mcp_rkllm.engine.types import RknnContextParams, RknnInitParams, RknnQueryParams

    e = Engine(Settings(rknn_library=str(rknn.path), runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path),
                        keep_alive=0.4))
    await e.open()
    try:
        idle = (await e.rknn.init(RknnInitParams(model_path="enc.rknn"), Stream())).context
        used = (await e.rknn.init(RknnInitParams(model_path="enc.rknn"), Stream())).context
        with anyio.fail_after(10):
            while idle in e.rknn.contexts:
                await e.rknn.query(RknnQueryParams(context=used, cmd="RKNN_QUERY_IN_OUT_NUM"), Stream())
                await anyio.sleep(0.1)
        assert used in e.rknn.contexts and rknn.count("rknn_destroy") == 1
        await e.rknn.destroy(RknnContextParams(context=used), Stream())
    finally:
        await e.close()
    assert rknn.count("rknn_destroy") == 2 and rknn.unreleased() == 0


async def test_a_dup_context_answers_while_its_original_runs(rknn: FakeRknnView, tmp_path: Path) -> None:
    """Contexts in one worker have a call thread each: a call on a dup does not queue behind a long rknn_run on
    its original (it used to, and timed out after --worker-timeout although the worker was fine)."""
    import anyio

    from mcp_rkllm.engine import Engine
    from mcp_rkllm.engine.relay import Stream
    from mcp_rkllm.engine.types import RknnContextParams, RknnInitParams, RknnQueryParams, RknnRunParams

    write_model(tmp_path / "slow.rknn", "tiny", run_ms=2500)
    e = Engine(Settings(rknn_library=str(rknn.path), runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path),
                        worker_timeout=1.0))
    await e.open()
    h, w, c = PROFILES["tiny"].hwc
    data = base64.b64encode(pixels(h * w * c)).decode()
    order: list[str] = []
    try:
        ctx = (await e.rknn.init(RknnInitParams(model_path="slow.rknn"), Stream())).context
        dup = (await e.rknn.dup_context(RknnContextParams(context=ctx), Stream())).context

        async def run() -> None:
            await e.rknn.run(RknnRunParams.model_validate({"context": ctx, "input_data": [{"data": data}]}), Stream())
            order.append("run")

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(0.3)  # the run is in rknn_run now
            got = await e.rknn.query(RknnQueryParams(context=dup, cmd="RKNN_QUERY_IN_OUT_NUM"), Stream())
            order.append("query")
        assert got.result == {"n_input": 1, "n_output": 1} and order == ["query", "run"]
    finally:
        await e.close()
    assert rknn.count("rknn_destroy") == 2 and rknn.unreleased() == 0
