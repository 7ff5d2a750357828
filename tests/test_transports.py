"""The server as a real process: stdio subprocess, Streamable HTTP and SSE on 127.0.0.1."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client

from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, events, free_port, progress_content, server_env, start_http_server, stop

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # each test starts a server process


@pytest.fixture
def library() -> Path:
    return build_fake("1.3.0", version="1.3.0")


async def exercise(client: Client, model_file: Path) -> None:
    """Init, stream a run, check progress adds up to the text, hit an error, destroy."""
    tools = (await client.list_tools()).tools
    assert len(tools) >= 15
    init = await client.call_tool("rkllm_init", {"param": {"model_path": str(model_file), "max_new_tokens": 10}})
    assert not init.is_error, init.content
    handle = init.structured_content["handle"]  # type: ignore[index]
    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    args = {"handle": handle, "rkllm_input": {"prompt_input": "hey you fake:delay_ms=3"}}
    run = await client.call_tool("rkllm_run", args, progress_callback=on_progress)
    assert not run.is_error
    text = run.structured_content["text"]  # type: ignore[index]
    assert text.startswith("hey you hey") and progress_content(seen) == text and len(seen) >= 2
    bad = await client.call_tool("rkllm_run", {"handle": "nope", "rkllm_input": {"prompt_input": "x"}})
    assert bad.is_error and bad.structured_content["error"]["code"] == "UNKNOWN_HANDLE"  # type: ignore[index]
    done = await client.call_tool("rkllm_destroy", {"handle": handle})
    assert not done.is_error


def stdio_params(library: Path, record_dir: Path) -> StdioServerParameters:
    """`python -m mcp_rkllm` on stdio with the fake runtime, recording into `record_dir`."""
    return StdioServerParameters(command=sys.executable, args=["-m", "mcp_rkllm"],
                                 env=server_env(library, record_dir), cwd=str(REPO))


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_subprocess(library: Path, model_file: Path, tmp_path: Path, mode: str) -> None:
    ev = tmp_path / "events"
    params = stdio_params(library, ev)
    with anyio.fail_after(60):
        async with Client(params, mode=mode) as client:
            await exercise(client, model_file)
    assert "init" in events(ev) and "destroy" in events(ev)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_cancel_aborts_the_run(library: Path, model_file: Path, tmp_path: Path, mode: str) -> None:
    ev = tmp_path / "events"
    params = stdio_params(library, ev)
    with anyio.fail_after(60):
        async with Client(params, mode=mode) as client:
            init = await client.call_tool("rkllm_init", {"param": {"model_path": str(model_file),
                                                                   "max_new_tokens": 500}})
            handle = init.structured_content["handle"]  # type: ignore[index]
            first = anyio.Event()

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                first.set()

            async with anyio.create_task_group() as tg:
                async def slow() -> None:
                    await client.call_tool("rkllm_run", {"handle": handle,
                                                         "rkllm_input": {"prompt_input": "s fake:delay_ms=20"}},
                                           progress_callback=on_progress)

                tg.start_soon(slow)
                await first.wait()
                tg.cancel_scope.cancel()
            while "abort_while_running" not in events(ev):
                await anyio.sleep(0.02)
            again = await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "ok"},
                                                         "rkllm_infer_params": {"max_new_tokens": 2}})
            assert again.structured_content["text"] == "ok ok"  # type: ignore[index]


@pytest.fixture(params=["http", "sse"])
def http_server(request: pytest.FixtureRequest, library: Path, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    port = free_port()
    ev = tmp_path / "events"
    proc = start_http_server(request.param, library, ev, port)
    try:
        path = "/mcp" if request.param == "http" else "/sse"
        yield request.param, f"http://127.0.0.1:{port}{path}", ev
    finally:
        stop(proc)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_http_transports(http_server: tuple[str, str, Path], model_file: Path, mode: str) -> None:
    transport, url, ev = http_server
    with anyio.fail_after(60):
        if transport == "http":
            async with Client(url, mode=mode) as client:
                await exercise(client, model_file)
        else:
            async with Client(sse_client(url), mode=mode) as client:
                await exercise(client, model_file)
    assert "init" in events(ev)


async def test_http_rejects_foreign_host_header(http_server: tuple[str, str, Path]) -> None:
    """DNS-rebinding protection: a request naming another Host is refused."""
    transport, url, _ = http_server
    async with httpx.AsyncClient() as http:
        headers: dict[str, Any] = {"Host": "evil.example:80", "Accept": "application/json, text/event-stream",
                                   "Content-Type": "application/json"}
        if transport == "http":
            r = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        else:
            r = await http.get(url, headers=headers)
        assert r.status_code in (403, 421)


def test_non_loopback_bind_is_refused() -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "mcp_rkllm", "--transport", "http", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=30, env=server_env(Path("/nonexistent")), cwd=REPO)
    assert proc.returncode == 2 and "without a token" in proc.stderr


@pytest.mark.parametrize("mode", ["legacy"])
async def test_http_runs_longer_than_the_disconnect_poll_finish(http_server: tuple[str, str, Path],
                                                                model_file: Path, mode: str) -> None:
    """The dropped-client watcher must not mistake a live client for a gone one (HTTP and SSE)."""
    transport, url, ev = http_server
    connect = url if transport == "http" else sse_client(url)
    with anyio.fail_after(60):
        async with Client(connect, mode=mode) as client:  # type: ignore[arg-type]
            init = await client.call_tool("rkllm_init", {"param": {"model_path": str(model_file),
                                                                   "max_new_tokens": 15}})
            handle = init.structured_content["handle"]  # type: ignore[index]
            run = await client.call_tool("rkllm_run", {"handle": handle,
                                                       "rkllm_input": {"prompt_input": "w fake:delay_ms=50"}})
            assert run.structured_content["finish_reason"] == "length"  # type: ignore[index]
    assert "abort" not in events(ev)


def test_dropped_http_client_aborts_the_run(library: Path, model_file: Path, tmp_path: Path) -> None:
    """Streamable HTTP keeps requests alive across a dropped connection; the server must still abort."""
    import json
    import time

    ev = tmp_path / "events"
    port = free_port()
    proc = start_http_server("http", library, ev, port)
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    def data(response_text: str) -> dict[str, Any]:
        return json.loads(response_text.split("data: ", 1)[1].split("\n", 1)[0])  # type: ignore[no-any-return]

    try:
        with httpx.Client(timeout=10) as http:
            r = http.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
            session = dict(headers, **{"mcp-session-id": r.headers["mcp-session-id"],
                                       "mcp-protocol-version": "2025-11-25"})
            http.post(url, headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            r = http.post(url, headers=session, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                "name": "rkllm_init", "arguments": {"param": {"model_path": str(model_file), "max_new_tokens": 500}}}})
            handle = data(r.text)["result"]["structuredContent"]["handle"]
            r = http.post(url, headers=session, json={"jsonrpc": "2.0", "id": 20, "method": "tools/call", "params": {
                "name": "rkllm_init", "arguments": {"param": {"model_path": str(model_file), "max_new_tokens": 30}}}})
            other = data(r.text)["result"]["structuredContent"]["handle"]
            # A healthy run in the same session, going on while the other request's stream is dropped.
            concurrent: dict[str, Any] = {}

            def run_other() -> None:
                with httpx.Client(timeout=20) as http2:
                    resp = http2.post(url, headers=session, json={"jsonrpc": "2.0", "id": 21, "method": "tools/call",
                                      "params": {"name": "rkllm_run", "_meta": {"progressToken": "o"}, "arguments": {
                                          "handle": other, "rkllm_input": {"prompt_input": "y fake:delay_ms=40"}}}})
                concurrent["status"] = resp.status_code
                concurrent["result"] = [json.loads(line[5:]) for line in resp.text.splitlines()
                                        if line.startswith("data:") and '"id":21' in line.replace(" ", "")]

            worker = threading.Thread(target=run_other)
            worker.start()
            call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
                "name": "rkllm_run", "_meta": {"progressToken": "t"},
                "arguments": {"handle": handle, "rkllm_input": {"prompt_input": "x fake:delay_ms=20"}}}}
            with http.stream("POST", url, headers=session, json=call) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:") and "notifications/progress" in line:
                        break  # walk away mid-run
            worker.join(30)
            # Only that request ended: the session, and the other run in it, carry on.
            assert concurrent["status"] == 200 and concurrent["result"], concurrent
            outcome = concurrent["result"][-1]["result"]
            assert not outcome["isError"] and outcome["structuredContent"]["finish_reason"] == "length", outcome
            r = http.post(url, headers=session, json={"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
                "name": "rkllm_is_running", "arguments": {"handle": handle}}})
            assert r.status_code == 200, r.text  # not 404 "Session not found"
            assert data(r.text)["result"]["structuredContent"]["running"] is False
        deadline = time.monotonic() + 5
        while "abort_while_running" not in events(ev):
            assert time.monotonic() < deadline, f"no abort after the client left: {events(ev)}"
            time.sleep(0.05)
    finally:
        stop(proc)
