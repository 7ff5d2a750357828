"""Regressions from the hostile-client pass over the JSON-RPC, OpenAI, Ollama and RockchipLlama surfaces: each
test sends what broke and checks the coded answer, that nothing leaked between clients, and that the server's
log holds no traceback for client input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_rkllm.build import build_fake
from tests.jsonrpc_client import RpcConn
from tests.servers import REPO, free_port, server_env, stop

pytestmark = pytest.mark.slow


class Board:
    def __init__(self, base: str, sock: Path, proc: subprocess.Popen[bytes], log: Path):
        self.base = base
        self.sock = sock
        self.proc = proc
        self.log = log
        self.http = httpx.Client(base_url=base, timeout=30)

    def tracebacks(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if "Traceback" in line or "Exception in ASGI" in line]


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    root = tmp_path_factory.mktemp("hostile-api")
    for name in ("alpha", "beta"):
        (root / f"{name}.rkllm").write_bytes(b"fake")
    sock, log, port = root / "s.sock", root / "server.log", free_port()
    env = server_env(build_fake("1.3.0", version="1.3.0"), root / "records", root, MCP_RKLLM_SOCKET=str(sock),
                     MCP_RKLLM_MAX_ITEMS="64")
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm", "--transport", "http", "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    b = Board(f"http://127.0.0.1:{port}", sock, proc, log)
    try:
        yield b
    finally:
        b.http.close()
        stop(proc)


def test_jsonrpc_batches_ids_and_framing(board: Board) -> None:
    with RpcConn(board.sock) as c:
        c.send([{"jsonrpc": "2.0", "method": "server_status", "id": i} for i in range(65)])
        answer = c.recv()
        assert answer["error"]["code"] == -32600 and "65 requests" in answer["error"]["message"]
        for raw in (b'{"jsonrpc": "2.0", "method": "server_status", "id": NaN}',
                    b'{"jsonrpc": "2.0", "method": "server_status", "id": 1e400}',
                    b'{"jsonrpc": "2.0", "method": "generate", "params": {"prompt": "x", "temperature": Infinity}, '
                    b'"id": 1}'):
            c.send_raw(raw + b"\n")
            reply = c.recv()
            assert reply["error"]["code"] in (-32700, -32600), reply
        # Two requests with one id in flight: the second is refused, so a cancel by that id is never ambiguous.
        handle = c.result("load_model", {"model": "alpha"}, 1)["handle"]
        c.send({"jsonrpc": "2.0", "id": 7, "method": "rkllm.run", "params": [
            handle, {"prompt_input": "slow fake:delay_ms=30"}, {"max_new_tokens": 40}]})
        c.send({"jsonrpc": "2.0", "id": 7, "method": "server_status"})
        second = c.recv()
        while second.get("method") == "rkllm.callback":
            second = c.recv()
        assert second["id"] == 7 and second["error"]["code"] == -32600
        assert "already in use" in second["error"]["message"]
        c.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 7}})
        _, cancelled = c.until(7)
        assert cancelled["error"]["data"]["code"] == "CANCELLED"
        started = time.monotonic()
        assert c.result("rpc.discover", None, 8)["openrpc"] and c.result("rpc.discover", None, 9)["methods"]
        assert time.monotonic() - started < 5
    # A last message without its newline, then the client stops writing: still answered.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(board.sock))
        s.sendall(b'{"jsonrpc": "2.0", "method": "server_status", "id": 70}')
        s.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "no answer"
            data += chunk
        assert json.loads(data)["id"] == 70


def test_private_handles_stay_private_on_the_http_apis(board: Board) -> None:
    with RpcConn(board.sock) as mine:
        private = mine.result("rkllm.init", [None, {"model_path": "beta.rkllm"}])["handle"]
        assert not any(m.get("handle") == private for m in board.http.get("/api/ps").json()["models"])
        beta = next(m for m in board.http.get("/v1/models/available").json()["models"] if m["name"] == "beta")
        assert beta["loaded"] is False  # only shared models count as loaded to the HTTP APIs
        loaded = board.http.post("/v1/models/load", json={"model": "beta"}).json()
        assert loaded["handle"] != private  # a real load, not someone else's handle
        as_model = board.http.post("/v1/chat/completions", json={
            "model": private, "messages": [{"role": "user", "content": "x"}]})
        assert as_model.status_code == 404 and as_model.json()["error"]["code"] == "MODEL_NOT_FOUND"
        assert mine.result("rkllm.is_running", [private])["running"] is False  # untouched
        board.http.post("/v1/models/unload", json={"model": loaded["handle"]})


def test_http_apis_refuse_careless_input_with_codes(board: Board) -> None:
    h = board.http
    many = [{"role": "user", "content": "hi"}] * 20_001
    started = time.monotonic()
    r = h.post("/v1/chat/completions", json={"model": "alpha", "messages": many})
    assert r.status_code == 400 and r.json()["error"]["code"] == "LIMIT_EXCEEDED"
    assert time.monotonic() - started < 10  # refused before any templating or tokenising
    r = h.post("/v1/embeddings", json={"model": "alpha", "input": ["a"] * 65})
    assert r.status_code == 400 and r.json()["error"]["code"] == "LIMIT_EXCEEDED"
    r = h.post("/api/embed", json={"model": "alpha", "input": ["a"] * 65})
    assert r.status_code == 400 and "LIMIT_EXCEEDED" in r.json()["error"]
    for body, field in (({"keep_alive": False}, "keep_alive"), ({"keep_alive": "soon"}, "keep_alive"),
                        ({"options": {"num_predict": "10"}}, "options.num_predict"), ({"stream": "no"}, "stream"),
                        ({"system": {"a": 1}}, "system"), ({"raw": True}, "raw"), ({"suffix": "x"}, "suffix")):
        r = h.post("/api/generate", json={"model": "alpha", "prompt": "x", **body})
        assert r.status_code == 400 and field in r.json()["error"], (body, r.text)
    unloaded = h.post("/api/generate", json={"model": "beta", "prompt": "", "keep_alive": "0h"})
    assert unloaded.json()["done_reason"] == "unload"  # a model that is not loaded: nothing to do, no 404
    assert h.get("/", headers={"Host": "evil.example"}).status_code == 421
    assert h.post("/v1/chat/completions", content=b'{"model": "alpha", "messages": [], "temperature": NaN}',
                  headers={"content-type": "application/json"}).status_code == 400


def test_truncated_bodies_leave_no_traceback(board: Board) -> None:
    host, port = board.base.removeprefix("http://").split(":")
    for path in ("/v1/chat/completions", "/api/chat", "/v1/models/load", "/jsonrpc"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 1000\r\n\r\n{{\"model\": ".encode())
        time.sleep(0.2)
    assert board.http.get("/api/version").status_code == 200
    time.sleep(0.5)
    assert board.tracebacks() == [], board.log.read_text()[-3000:]
