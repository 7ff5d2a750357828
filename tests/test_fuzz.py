"""Fuzzing the tool surface over a real stdio session: valid, boundary and invalid arguments for every tool.

Strategies are built from each tool's own input schema (tools/list), then mixed with type-confused
and random JSON, extreme numbers (past int32, int64 and float), lone surrogates, deep nesting, paths that
escape or cannot resolve, and long strings. After every call: no protocol error except for unknown tools,
the server is alive, every is_error result carries a code from the table and never INTERNAL (all the input
is the client's); at the end the server still answers a ping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_rkllm.errors import ERRORS
from tests.fake_rkllm.build import build_fake
from tests.servers import server_env
from tests.test_wire import Wire

pytestmark = pytest.mark.slow

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


class Session:
    """A long-lived stdio server and a counter of calls made."""

    def __init__(self, wire: Wire, tools: dict[str, dict[str, Any]], handle: str):
        self.wire = wire
        self.tools = tools
        self.handle = handle
        self.next_id = 100
        self.calls = 0
        self.errors: dict[str, int] = {}

    def call(self, name: str, arguments: Any) -> dict[str, Any]:
        self.next_id += 1
        self.wire.send({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
                        "params": {"name": name, "arguments": arguments}})
        _, reply = self.wire.until_response(self.next_id)
        self.calls += 1
        return reply


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "m.rkllm").write_bytes(b"model")
    wire = Wire(server_env(build_fake("1.3.0", "1.3.0"), root / "records"))
    wire.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "fuzz", "version": "0"}}})
    wire.until_response(1)
    wire.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    wire.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    _, listing = wire.until_response(2)
    tools = {t["name"]: t["inputSchema"] for t in listing["result"]["tools"]}
    wire.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "rkllm_init", "arguments": {"param": {"model_path": str(root / "m.rkllm"), "max_new_tokens": 8}}}})
    _, created = wire.until_response(3)
    s = Session(wire, tools, created["result"]["structuredContent"]["handle"])
    yield s
    wire.send({"jsonrpc": "2.0", "id": 99999, "method": "ping"})
    _, pong = wire.until_response(99999)
    assert pong["result"] == {}
    assert wire.proc.poll() is None, "the server died"
    wire.close()
    print(f"\nfuzz: {s.calls} calls, error codes seen: {dict(sorted(s.errors.items()))}")


def from_schema(schema: dict[str, Any], defs: dict[str, Any], handle: str, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that (mostly) fit `schema`, with boundary values for numbers and sizes."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].split("/")[-1]], defs, handle, depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, handle, depth) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "object" and depth < 4:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {}
        for name, sub in props.items():
            value = st.sampled_from([handle, "h-bogus", "", "x" * 70]) if name == "handle" else \
                from_schema(sub, defs, handle, depth + 1)
            fields[name] = value if name in required else st.one_of(st.just(_OMIT), value)
        return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not _OMIT})
    if kind == "array":
        items = from_schema(schema.get("items", {"type": "number"}), defs, handle, depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=6)
    if kind == "string":
        return st.text(max_size=30) | st.sampled_from(NASTY_STRINGS)
    if kind == "integer":
        lo, hi = schema.get("minimum", -(2**40)), schema.get("maximum", 2**40)
        return st.integers(lo, hi) | st.sampled_from([lo, hi, lo - 1, hi + 1, 0, -1, *EXTREME_INTS])
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6) | st.sampled_from(
            [0.0, -0.0, 1e300, -1.5, *EXTREME_FLOATS])
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON


_OMIT = object()

#: Strings a careless or hostile client sends: paths that escape or cannot resolve, half an emoji (a lone
#: surrogate: JavaScript's JSON.stringify writes one), NUL, over-long names, JSON nested deeper than parsers go.
NASTY_STRINGS = ["", "RKLLM_INPUT_PROMPT", "../../etc/shadow", "a\x00b", "m.rkllm", "é" * 10, "\ud83d",
                 "half \ud83d emoji", "~nosuchuser/m.rkllm", "/proc/self/mem", "x" * 300 + ".rkllm",
                 "/" + "a/" * 2100 + "m.rkllm", "[" * 5000 + "]" * 5000, "{" * 3000, "x" * 20_000]
#: Numbers just past what C's int32, int64 and float hold.
EXTREME_INTS = [2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64]
EXTREME_FLOATS = [3.5e38, -3.5e38, 1e308, -1e308, 5e-324]
#: Arguments nested 150 levels deep (the JSON-RPC layer accepts them; the operation must refuse them cleanly).
DEEP: Any = 1
for _ in range(150):
    DEEP = [DEEP]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_tool_survives_fuzzing(session: Session, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from([*sorted(session.tools), "no_such_tool"]), label="tool")
    schema = session.tools.get(name, {"type": "object"})
    arguments = data.draw(st.one_of(
        from_schema(schema, schema.get("$defs", {}), session.handle),  # shaped like the schema
        st.dictionaries(st.sampled_from(sorted(schema.get("properties", {})) or ["x"]), JSON, max_size=4),
        JSON,  # anything at all, even not an object
        st.sampled_from(sorted(schema.get("properties", {})) or ["x"]).map(lambda k: {k: DEEP}),
    ), label="arguments")
    json.dumps(arguments)  # what we send must be JSON
    reply = session.call(name, arguments)
    assert session.wire.proc.poll() is None, "the server died"
    if (name == "no_such_tool" or not isinstance(arguments, dict | type(None))) and "error" in reply:
        assert reply["error"]["code"] == -32602
        return
    assert "error" not in reply, f"protocol error for {name}: {reply}"
    result = reply["result"]
    if result["isError"]:
        code = result["structuredContent"]["error"]["code"]
        assert code in ERRORS, code
        # Every argument here is the client's doing: a wrong one is INVALID_PARAMS (or another coded answer),
        # never "a bug in mcp-rkllm".
        assert code != "INTERNAL", (name, arguments, result["structuredContent"])
        session.errors[code] = session.errors.get(code, 0) + 1


def test_fuzz_left_the_handle_usable(session: Session) -> None:
    reply = session.call("rkllm_is_running", {"handle": session.handle})
    result = reply["result"]
    if result["isError"]:  # the fuzzer may have destroyed it, which is fine: then a new one works
        assert result["structuredContent"]["error"]["code"] in ("UNKNOWN_HANDLE", "RUNTIME_CRASHED")
    path = Path(json.loads(json.dumps(session.tools["rkllm_init"]))["properties"]["param"]["$ref"]).name
    assert path == "RKLLMParam"


class SocketSession:
    """A JSON-RPC socket server and one connection, with a handle made on it."""

    def __init__(self, conn: Any, proc: Any, handle: str):
        self.conn = conn
        self.proc = proc
        self.handle = handle
        self.next_id = 100


@pytest.fixture(scope="module")
def socket_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketSession]:
    from tests.jsonrpc_client import RpcConn, start_socket_server
    from tests.servers import stop

    root = tmp_path_factory.mktemp("fuzz-socket")
    (root / "m.rkllm").write_bytes(b"model")
    proc = start_socket_server(build_fake("1.3.0", "1.3.0"), root / "records", root / "s.sock")
    conn = RpcConn(root / "s.sock")
    handle = conn.result("rkllm.init", [None, {"model_path": "m.rkllm", "max_new_tokens": 8}, None])["handle"]
    yield SocketSession(conn, proc, handle)
    assert conn.result("server_status", None, 99999)["pid"] == proc.pid  # alive, and this connection too
    conn.close()
    stop(proc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_jsonrpc_method_survives_fuzzing(socket_session: SocketSession, data: st.DataObject) -> None:
    """The same over the JSON-RPC socket, in the by-name and positional forms: every request is answered by its
    id with a standard code or one from the table (never INTERNAL), and the connection stays usable."""
    from mcp_rkllm.surfaces.jsonrpc import method_name
    from mcp_rkllm.surfaces.registry import build_registry

    specs = build_registry().specs
    name = data.draw(st.sampled_from([*sorted(specs), "no_such_op"]), label="operation")
    schema: dict[str, Any] = specs[name].params.model_json_schema() if name in specs else {"type": "object"}
    by_name = from_schema(schema, schema.get("$defs", {}), socket_session.handle)
    params = data.draw(st.one_of(by_name, st.lists(JSON, max_size=5), st.none(),
                                 st.sampled_from(sorted(schema.get("properties", {})) or ["x"]).map(
                                     lambda k: {k: DEEP})), label="params")
    socket_session.next_id += 1
    request_id = socket_session.next_id
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id,
                               "method": method_name(name) if name in specs else name}
    if params is not None:
        message["params"] = params
    socket_session.conn.send(message)
    _, reply = socket_session.conn.until(request_id)
    assert socket_session.proc.poll() is None, "the server died"
    if "error" in reply:
        error = reply["error"]
        numbers = {e.number for e in ERRORS.values()}
        assert error["code"] in (-32600, -32601, -32602) or error["code"] in numbers, error
        assert error["code"] != ERRORS["INTERNAL"].number and (error.get("data") or {}).get("code") != "INTERNAL", \
            (name, params, error)
