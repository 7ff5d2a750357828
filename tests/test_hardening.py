"""Hardening: hostile paths, size limits, the HTTP bearer token, Host checks and body limits."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake
from tests.servers import free_port, server_log, start_http_server, stop
from tests.test_server import call, fail

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    d = {name: tmp_path / name for name in ("models", "cache", "outside")}
    for p in d.values():
        p.mkdir()
    (d["models"] / "m.rkllm").write_bytes(b"model")
    (d["models"] / "lora.rkllm").write_bytes(b"lora")
    (d["outside"] / "secret.rkllm").write_bytes(b"not yours")
    return d


def settings(fake_path: Path, dirs: dict[str, Path], **kw: Any) -> Settings:
    return Settings(library=str(fake_path), isolation="none", models=(str(dirs["models"]),),
                    cache_dir=str(dirs["cache"]), **kw)


@pytest.fixture
async def client(fake_path: Path, fake: FakeView, dirs: dict[str, Path]) -> AsyncIterator[Client]:
    async with Client(build_server(settings(fake_path, dirs))) as c:
        yield c


async def test_paths_are_confined_to_the_roots(client: Client, fake: FakeView, dirs: dict[str, Path]) -> None:
    models, cache, outside = dirs["models"], dirs["cache"], dirs["outside"]
    (models / "escape.rkllm").symlink_to(outside / "secret.rkllm")
    for hostile in ["../outside/secret.rkllm", str(outside / "secret.rkllm"), "/etc/passwd",
                    str(models / "escape.rkllm"), str(models / ".." / "outside" / "secret.rkllm")]:
        error = await fail(client, "rkllm_init", {"param": {"model_path": hostile}})
        assert error["code"] == "PATH_NOT_ALLOWED", hostile
        assert str(models) in error["message"]  # names the allowed roots
    assert fake.count("init") == 0  # nothing reached the runtime
    handle = (await call(client, "rkllm_init", {"param": {"model_path": "m.rkllm"}}))["handle"]  # relative: in root
    assert fake.last("init")["model_path"] == str(models / "m.rkllm")
    lora = await fail(client, "rkllm_load_lora", {"handle": handle, "lora_adapter": {
        "lora_adapter_path": str(outside / "secret.rkllm"), "lora_adapter_name": "x"}})
    assert lora["code"] == "PATH_NOT_ALLOWED"
    await call(client, "rkllm_load_lora", {"handle": handle, "lora_adapter": {
        "lora_adapter_path": "lora.rkllm", "lora_adapter_name": "x"}})
    # a prompt cache is never written outside the cache directory
    for where in [str(outside / "cache.bin"), "../outside/cache.bin", str(models / "cache.bin")]:
        error = await fail(client, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "x"},
                                                 "rkllm_infer_params": {"prompt_cache_params": {
                                                     "prompt_cache_path": where}}})
        assert error["code"] == "PATH_NOT_ALLOWED"
    assert not (outside / "cache.bin").exists() and not (models / "cache.bin").exists()
    await call(client, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "x"},
                                     "rkllm_infer_params": {"prompt_cache_params": {"prompt_cache_path": "p.bin"}}})
    assert (cache / "p.bin").exists()
    await call(client, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "y"},
                                     "rkllm_infer_params": {"prompt_cache_params": {"save_prompt_cache": 1}}})
    assert (cache / "prompt_cache.bin").exists()  # the runtime's ./prompt_cache.bin default lands in the cache dir
    await call(client, "rkllm_load_prompt_cache", {"handle": handle, "prompt_cache_path": "p.bin"})
    error = await fail(client, "rkllm_load_prompt_cache", {"handle": handle,
                                                           "prompt_cache_path": str(outside / "c.bin")})
    assert error["code"] == "PATH_NOT_ALLOWED"
    assert (await fail(client, "load_model", {"model": "../outside/secret"}))["code"] == "MODEL_NOT_FOUND"


async def test_limits_are_enforced_before_the_runtime(fake_path: Path, fake: FakeView, dirs: dict[str, Path]) -> None:
    s = settings(fake_path, dirs, max_prompt_bytes=64, max_token_ids=8, max_floats=16, max_new_tokens=100,
                 max_context_len=1024, max_loaded_models=2, max_queued_runs=1, busy_timeout=5)
    async with Client(build_server(s)) as c:
        h = (await call(c, "rkllm_init", {"param": {"model_path": "m.rkllm"}}))["handle"]
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "é" * 40}}, "rkllm_input.prompt_input"),
            ("rkllm_run", {"handle": h, "rkllm_input": {"token_input": {"input_ids": list(range(9))}}}, "input_ids"),
            ("rkllm_run", {"handle": h, "rkllm_input": {"embed_input": {"embed": [0.5] * 20, "n_tokens": 5}}},
             "embed"),
            ("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "x"},
                           "rkllm_infer_params": {"max_new_tokens": 101}}, "max_new_tokens"),
            ("rkllm_init", {"param": {"model_path": "m.rkllm", "max_context_len": 2048}}, "max_context_len"),
            ("rkllm_set_function_tools", {"handle": h, "system_prompt": "s", "tools": [
                {"type": "function", "function": {"name": "n" * 80}}]}, "tools"),
            ("generate", {"prompt": "x", "handle": h, "max_new_tokens": 500}, "max_new_tokens"),
            ("chat", {"handle": h, "messages": [{"role": "user", "content": "y" * 65}]}, "messages[0].content"),
        ]
        before = fake.count("run")
        for name, args, what in cases:
            error = await fail(c, name, args)
            assert error["code"] == "LIMIT_EXCEEDED", (name, error)
            assert what in error["message"] and "limit" in error["message"]
            assert {"what", "value", "limit"} <= set(error["details"])
        assert fake.count("run") == before  # none of them reached the runtime
        await call(c, "rkllm_init", {"param": {"model_path": "m.rkllm"}})
        third = await fail(c, "rkllm_init", {"param": {"model_path": "m.rkllm"}})
        assert third["code"] == "LIMIT_EXCEEDED" and "loaded models" in third["message"]
        # one call may wait for a busy handle; a second waiter is refused at once
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, c, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "a fake:delay_ms=20"},
                                                 "rkllm_infer_params": {"max_new_tokens": 20}})
            await anyio.sleep(0.1)
            tg.start_soon(call, c, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "b"},
                                                 "rkllm_infer_params": {"max_new_tokens": 1}})
            await anyio.sleep(0.05)
            refused = await fail(c, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "c"}})
            assert refused["code"] == "LIMIT_EXCEEDED" and "queued" in refused["message"]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[str, Path, Any]]:
    port = free_port()
    records = tmp_path / "records"
    proc = start_http_server("http", build_fake("1.3.0", "1.3.0"), records, port, MCP_RKLLM_AUTH_TOKEN=TOKEN,
                             MCP_RKLLM_MAX_REQUEST_BYTES="65536")
    try:
        yield f"http://127.0.0.1:{port}", tmp_path, proc
    finally:
        stop(proc)


@pytest.mark.slow  # a server process over HTTP
async def test_bearer_token_is_required_and_checked(secured: tuple[str, Path, Any]) -> None:
    base, root, proc = secured
    (root / "m.rkllm").write_bytes(b"model")
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx.AsyncClient() as http:
        for auth in [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"]:
            h = dict(headers, **({"Authorization": auth} if auth else {}))
            r = await http.post(f"{base}/mcp", headers=h, json=body)
            assert r.status_code == 401, auth
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = await http.get(f"{base}/mcp", headers={"Accept": "text/event-stream"})
        assert r.status_code == 401
        big = await http.post(f"{base}/mcp", headers=dict(headers, Authorization=f"Bearer {TOKEN}"),
                              content=b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "' + b"x" * 70000 + b'"}')
        assert big.status_code == 413  # the request body limit
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as authed, \
            Client(streamable_http_client(f"{base}/mcp", http_client=authed), mode="legacy") as client:
        loaded = await call(client, "rkllm_init", {"param": {"model_path": "m.rkllm", "max_new_tokens": 3}})
        run = await call(client, "rkllm_run", {"handle": loaded["handle"], "rkllm_input": {"prompt_input": "ok"}})
        assert run["text"] == "ok ok ok"
    stop(proc)
    time.sleep(0.2)  # the log reader takes the last lines
    assert "mcp_rkllm" in server_log(proc) and TOKEN not in server_log(proc)  # the log was read; the token never logged


@pytest.mark.slow  # a server process over SSE
async def test_sse_with_token(tmp_path: Path) -> None:
    port = free_port()
    proc = start_http_server("sse", build_fake("1.3.0", "1.3.0"), tmp_path / "records", port,
                             MCP_RKLLM_AUTH_TOKEN=TOKEN)
    try:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/sse")
            assert r.status_code == 401
        async with Client(sse_client(f"http://127.0.0.1:{port}/sse", headers={"Authorization": f"Bearer {TOKEN}"}),
                          mode="legacy") as client:
            assert len((await client.list_tools()).tools) > 15
    finally:
        stop(proc)


def test_non_loopback_needs_a_token_and_names_the_fix() -> None:
    with pytest.raises(ValueError, match="MCP_RKLLM_AUTH_TOKEN"):
        Settings.load({"transport": "http", "host": "0.0.0.0"}, {})
    s = Settings.load({"transport": "http", "host": "0.0.0.0", "auth_token": TOKEN}, {})
    assert s.auth_token == TOKEN
    assert os.environ.get("MCP_RKLLM_AUTH_TOKEN") is None


@pytest.mark.parametrize("token", [" " * 16, "\t" * 20, " " * 8 + "\n" * 8, f" {TOKEN}", f"{TOKEN}\n"])
def test_a_token_that_can_never_match_is_refused(token: str) -> None:
    """Bearer values are compared stripped (HTTP drops the spaces around a header value): a token that is
    all whitespace, or starts or ends with it, could never match, so the settings refuse it and say why."""
    with pytest.raises(ValueError, match="whitespace") as refused:
        Settings.load({"transport": "http", "auth_token": token}, {})
    assert token.strip() not in str(refused.value) or not token.strip()  # a near-secret is not echoed
    with pytest.raises(ValueError, match="whitespace"):
        Settings.load({}, {"MCP_RKLLM_AUTH_TOKEN": token})


@pytest.mark.slow  # server processes over HTTP and SSE
@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_metrics_checks_host_and_origin_like_mcp(tmp_path: Path, transport: str) -> None:
    """/metrics answers only the Host and Origin names /mcp accepts (a DNS-rebinding page must not read it)."""
    port = free_port()
    proc = start_http_server(transport, build_fake("1.3.0", "1.3.0"), tmp_path / "records", port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            ok = await http.get(f"{base}/metrics")
            assert ok.status_code == 200 and "mcp_rkllm" in ok.text
            assert (await http.get(f"{base}/metrics", headers={"Host": "localhost:1"})).status_code == 200
            bad_host = await http.get(f"{base}/metrics", headers={"Host": "evil.example"})
            assert bad_host.status_code == 421 and "mcp_rkllm" not in bad_host.text
            bad_origin = await http.get(f"{base}/metrics", headers={"Origin": "http://evil.example"})
            assert bad_origin.status_code == 403 and "mcp_rkllm" not in bad_origin.text
            good_origin = await http.get(f"{base}/metrics", headers={"Origin": f"http://127.0.0.1:{port}"})
            assert good_origin.status_code == 200
    finally:
        stop(proc)


@pytest.mark.slow  # a server process over HTTP
async def test_malformed_http_requests_get_json_rpc_errors_and_the_session_goes_on(tmp_path: Path) -> None:
    """The inputs stdio used to drop (tests/test_stdio_wire.py) each get a JSON-RPC error over Streamable HTTP
    (the SDK parses with pydantic-core and answers id null: the HTTP response is the correlation), and the
    session answers the next request. A lone surrogate is a parse error here (stdio replaces it); NaN, which
    pydantic-core accepts, is served here (stdio answers -32700: it is not JSON)."""
    import json

    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", "1.3.0"), tmp_path / "records", port,
                             MCP_RKLLM_MAX_REQUEST_BYTES="65536")
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    def message_of(response: httpx.Response) -> dict[str, Any]:
        text = response.text
        if response.headers["content-type"].startswith("text/event-stream"):
            text = next(line[5:] for line in text.splitlines() if line.startswith("data:") and line[5:].strip())
        parsed: dict[str, Any] = json.loads(text)
        return parsed

    try:
        async with httpx.AsyncClient(timeout=15) as http:
            init = await http.post(url, headers=headers, json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"}}})
            assert init.status_code == 200
            headers.update({"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"})
            assert (await http.post(url, headers=headers, json={
                "jsonrpc": "2.0", "method": "notifications/initialized"})).status_code == 202
            deep = "[" * 200 + "]" * 200
            cases = [
                ('{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "rkllm_is_running", '
                 '"arguments": {"handle": "half \\ud83d"}}}', -32700),
                ('{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "rkllm_is_running", '
                 '"arguments": {"handle": ' + deep + "}}}", -32700),
                ('{"jsonrpc": "2.0", "id": 4, "method": "ping"', -32700),
                ('[{"jsonrpc": "2.0", "id": 5, "method": "ping"}, {"jsonrpc": "2.0", "id": 6, "method": "ping"}]',
                 -32602),
                ('{"jsonrpc": "1.0", "id": 7, "method": "ping"}', -32602),
                ('{"id": 8, "method": "ping"}', -32602),
                ("42", -32602),
            ]
            for body, code in cases:
                r = await http.post(url, headers=headers, content=body.encode())
                assert r.status_code == 400, (body[:60], r.status_code, r.text)
                error = message_of(r)
                assert error["jsonrpc"] == "2.0" and error["id"] is None and error["error"]["code"] == code, error
            big = await http.post(url, headers=headers, content=b'{"jsonrpc": "2.0", "id": 10, "method": "ping", '
                                                                 b'"params": {"pad": "' + b"x" * 70_000 + b'"}}')
            assert big.status_code == 413
            pong = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 11, "method": "ping"})
            assert pong.status_code == 200 and message_of(pong) == {"jsonrpc": "2.0", "id": 11, "result": {}}
    finally:
        stop(proc)
