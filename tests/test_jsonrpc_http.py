"""JSON-RPC at HTTP `/jsonrpc` (beside `/mcp`, same token, checks and engine), and `rpc.discover` as OpenRPC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jsonschema
import pytest
import referencing
import referencing.jsonschema
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_rkllm.config import Settings
from mcp_rkllm.engine import Engine
from mcp_rkllm.surfaces.jsonrpc.openrpc import document
from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher
from mcp_rkllm.surfaces.registry import build_registry
from tests.fake_rkllm.build import build_fake
from tests.jsonrpc_client import RpcConn
from tests.servers import REPO, events, free_port, start_http_server, stop

TOKEN = "jsonrpc-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
NODE_MODULES = REPO / ".ci" / "node" / "node_modules"
META_SCHEMA = NODE_MODULES / "@open-rpc" / "meta-schema" / "index.js"
#: What the OpenRPC meta-schema calls https://meta.json-schema.tools (the schema of its JSON Schemas).
JSON_SCHEMA_META = NODE_MODULES / "@json-schema-tools" / "meta-schema" / "schema.json"


class Http:
    def __init__(self, base: str, root: Path, records: Path):
        self.base = base
        self.url = base + "/jsonrpc"
        self.root = root
        self.records = records


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Http]:
    library = build_fake("1.3.0", version="1.3.0")
    root = tmp_path_factory.mktemp("jsonrpc-http")
    (root / "m.rkllm").write_bytes(b"fake model")
    records = root / "records"
    port = free_port()
    proc = start_http_server("http", library, records, port, MCP_RKLLM_AUTH_TOKEN=TOKEN,
                             MCP_RKLLM_MAX_REQUEST_BYTES="65536")
    try:
        yield Http(f"http://127.0.0.1:{port}", root, records)
    finally:
        stop(proc)


def rpc(method: str, params: Any = None, request_id: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params is not None:
        message["params"] = params
    return message


def sse_messages(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.slow
def test_plain_json_sse_batches_and_notifications(http: Http) -> None:
    with httpx.Client(timeout=30, headers=AUTH) as c:
        init = c.post(http.url, json=rpc("rkllm.init", [None, {"model_path": "m.rkllm", "max_new_tokens": 9}, None]))
        assert init.status_code == 200 and init.headers["content-type"] == "application/json"
        handle = init.json()["result"]["handle"]
        try:
            plain = c.post(http.url, json=rpc("rkllm.run", [None, {"prompt_input": "over http"}, None, None], 2)).json()
            assert plain["id"] == 2 and plain["result"]["token_count"] == 9
            streamed = c.post(http.url, json=rpc("rkllm.run", {"prompt": "over http", "max_tokens": 9}, 3),
                              headers={"Accept": "text/event-stream"})
            assert streamed.headers["content-type"].startswith("text/event-stream")
            messages = sse_messages(streamed.text)
            callbacks = [m["params"] for m in messages if m.get("method") == "rkllm.callback"]
            response = messages[-1]
            assert response["id"] == 3 and response["result"]["text"] == plain["result"]["text"]
            assert "".join(cb["text"] for cb in callbacks) == response["result"]["text"]
            assert callbacks[-1]["state"] == "RKLLM_RUN_FINISH"
            batch = c.post(http.url, json=[rpc("rkllm.is_running", [handle], "a"), rpc("nope", None, "b"),
                                           {"jsonrpc": "2.0", "method": "server_status"}]).json()
            assert {m["id"]: ("result" in m) for m in batch} == {"a": True, "b": False}
            note = c.post(http.url, json={"jsonrpc": "2.0", "method": "server_status"})
            assert note.status_code == 204 and note.content == b""
            bad = c.post(http.url, content=b"{nope")
            assert bad.status_code == 200 and bad.json()["error"]["code"] == -32700
            unknown = c.post(http.url, json=rpc("rkllm.is_running", ["h-gone"])).json()
            assert unknown["error"]["code"] == -32002 and unknown["error"]["data"]["code"] == "UNKNOWN_HANDLE"
        finally:
            c.post(http.url, json=rpc("rkllm.destroy", [handle]))


@pytest.mark.slow
def test_same_guards_as_mcp(http: Http) -> None:
    with httpx.Client(timeout=30) as c:
        body = rpc("server_status")
        assert c.post(http.url, json=body).status_code == 401
        assert c.post(http.url, json=body, headers={**AUTH, "Host": "evil.example"}).status_code == 421
        assert c.post(http.url, json=body, headers={**AUTH, "Origin": "http://evil.example"}).status_code == 403
        assert c.post(http.url, content=json.dumps(body), headers={**AUTH, "Content-Type": "text/plain"}
                      ).status_code == 400
        big = c.post(http.url, json=rpc("generate", {"prompt": "x" * 100_000}), headers=AUTH)
        assert big.status_code == 413
        assert c.get(http.url, headers=AUTH).status_code == 405
        assert c.post(http.url, json=body, headers=AUTH).json()["result"]["pid"] > 0


@pytest.mark.slow
@pytest.mark.anyio
async def test_models_are_shared_with_mcp(http: Http) -> None:
    with httpx.Client(timeout=30, headers=AUTH) as c:
        init = c.post(http.url, json=rpc("rkllm.init", {"param": {"model_path": "m.rkllm"}})).json()
    handle = init["result"]["handle"]
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as hc, \
            Client(streamable_http_client(http.base + "/mcp", http_client=hc), mode="legacy") as client:
        loaded = await client.call_tool("loaded_models", {})
        assert handle in [e["handle"] for e in loaded.structured_content["loaded"]]  # type: ignore[index]
        run = await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "shared"},
                                                   "rkllm_infer_params": {"max_new_tokens": 3}})
        assert run.structured_content["text"] == "shared shared shared"  # type: ignore[index]
    with httpx.Client(timeout=30, headers=AUTH) as c:
        assert c.post(http.url, json=rpc("rkllm.destroy", [handle])).json()["result"]["destroyed"]


@pytest.mark.slow
def test_dropped_sse_request_aborts_its_run(http: Http) -> None:
    with httpx.Client(timeout=30, headers=AUTH) as c:
        handle = c.post(http.url, json=rpc("rkllm.init", {"param": {"model_path": "m.rkllm", "max_new_tokens": 500}})
                        ).json()["result"]["handle"]
        before = events(http.records).count("abort_while_running")
        try:
            with c.stream("POST", http.url, json=rpc("rkllm.run", [handle, {"prompt_input": "drop fake:delay_ms=40"}]),
                          headers={"Accept": "text/event-stream"}) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        break  # the run is streaming: leave
            deadline = time.monotonic() + 15
            while events(http.records).count("abort_while_running") == before:
                assert time.monotonic() < deadline, "the dropped request's run was not aborted"
                time.sleep(0.05)
            again = c.post(http.url, json=rpc("rkllm.run", [handle, {"prompt_input": "ok"}, {"max_new_tokens": 2}]))
            assert again.json()["result"]["text"] == "ok ok"
        finally:
            c.post(http.url, json=rpc("rkllm.destroy", [handle]))


@pytest.mark.slow
def test_http_and_socket_together_share_one_engine(tmp_path: Path) -> None:
    library = build_fake("1.3.0", version="1.3.0")
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    sock = tmp_path / "s.sock"
    port = free_port()
    proc = start_http_server("http", library, tmp_path / "records", port, MCP_RKLLM_SOCKET=str(sock))
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with RpcConn(sock) as conn:  # loaded by name: shared (a connection's rkllm.init handle would go with it)
            handle = conn.result("load_model", {"model": "m"})["handle"]
        with httpx.Client(timeout=30) as c:
            status = c.post(f"http://127.0.0.1:{port}/jsonrpc", json=rpc("server_status"),
                            headers={"Content-Type": "application/json"}).json()["result"]
            assert status["handles"] == [handle]
    finally:
        stop(proc)
    assert not sock.exists()


def _meta_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenRPC meta-schema and the JSON-Schema meta-schema it refers to (from npm, installed by .ci/run)."""
    node = shutil.which("node")
    if not META_SCHEMA.exists() or not JSON_SCHEMA_META.exists() or node is None:
        reason = (f"the OpenRPC meta-schema is not installed under {NODE_MODULES} (`npm install --prefix .ci/node "
                  "@open-rpc/meta-schema@1.14.9 @json-schema-tools/meta-schema@1.8.0`) or node is missing")
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(reason + "; CI is set, so this must run")
        pytest.skip(reason)
    out = subprocess.run([node, "-e", f"process.stdout.write(JSON.stringify(require({json.dumps(str(META_SCHEMA))})"
                                      ".openrpcDocument))"], capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout), json.loads(JSON_SCHEMA_META.read_text())


def test_rpc_discover_is_valid_openrpc_with_2020_12_schemas() -> None:
    doc = document(Dispatcher(build_registry(), Engine(Settings())))
    meta, json_schema_meta = _meta_schemas()
    resource = referencing.Resource.from_contents(json_schema_meta, default_specification=referencing.jsonschema.DRAFT7)
    schemas = referencing.Registry().with_resources([("https://meta.json-schema.tools", resource),
                                                     ("https://meta.json-schema.tools/", resource)])
    jsonschema.Draft7Validator(meta, registry=schemas).validate(doc)  # the meta-schemas are draft-07
    validator = jsonschema.Draft202012Validator
    names = set()
    for method in doc["methods"]:
        names.add(method["name"])
        for param in method["params"]:
            validator.check_schema(param["schema"])
        validator.check_schema(method["result"]["schema"])
    for schema in doc["components"]["schemas"].values():
        validator.check_schema(schema)
    # Every reference resolves inside the document.
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        section, _, name = ref.removeprefix("#/components/").partition("/")
        assert name in doc["components"][section], ref
    assert {"rkllm.init", "rkllm.run", "generate", "chat", "server_status"} <= names
    init = next(m for m in doc["methods"] if m["name"] == "rkllm.init")
    assert [p["name"] for p in init["params"]] == ["handle", "param", "callback"]
    assert init["paramStructure"] == "either"
    run = next(m for m in doc["methods"] if m["name"] == "rkllm.run")
    assert [p["name"] for p in run["params"]] == ["handle", "rkllm_input", "rkllm_infer_params", "userdata"]
