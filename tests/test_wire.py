"""One raw JSON-RPC session over stdio, pinning the wire format independent of SDK client internals.

initialize -> tools/list -> tools/call with a progressToken (progress lines, then the result) ->
a cancelled call that never gets a response -> ping. Every line on stdout must be JSON-RPC: the
fake runtime prints log lines to stdout like the real one, and they must not reach the wire.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, events, server_env

pytestmark = pytest.mark.slow  # each test starts a server process


class Wire:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        self.raw: list[str] = []
        self.log: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        # The server's log must be read too: a full stderr pipe would block the server's next log line.
        self._log_reader = threading.Thread(target=self._read_log, daemon=True)
        self._log_reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            del self.log[:-2000]  # the last lines, for diagnostics

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8")
            self.raw.append(text)
            self.lines.put(text)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def next(self, timeout: float = 20) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.lines.get(timeout=timeout))
        assert message["jsonrpc"] == "2.0"
        return message

    def until_response(self, request_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages before the response to `request_id`, and that response."""
        before: list[dict[str, Any]] = []
        while True:
            m = self.next()
            if m.get("id") == request_id and "method" not in m:
                return before, m
            before.append(m)

    def close(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_reader.join(5)  # the log reader takes the last lines
        return b"".join(self.log).decode(errors="replace")


def test_raw_stdio_session(tmp_path: Path) -> None:
    model = tmp_path / "m.rkllm"
    model.write_bytes(b"x")
    ev = tmp_path / "events"
    wire = Wire(server_env(build_fake("1.3.0", "1.3.0"), ev))
    try:
        wire.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        _, init = wire.until_response(1)
        assert init["result"]["protocolVersion"] == "2025-11-25"
        assert init["result"]["serverInfo"]["name"] == "mcp-rkllm"
        assert "tools" in init["result"]["capabilities"]
        wire.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

        wire.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        _, listing = wire.until_response(2)
        names = [t["name"] for t in listing["result"]["tools"]]
        assert "rkllm_run" in names and all("inputSchema" in t for t in listing["result"]["tools"])

        wire.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "rkllm_init", "arguments": {"param": {"model_path": str(model), "max_new_tokens": 6}}}})
        _, created = wire.until_response(3)
        handle = created["result"]["structuredContent"]["handle"]
        assert created["result"]["isError"] is False

        wire.send({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
            "name": "rkllm_run", "_meta": {"progressToken": "tok-A"},
            "arguments": {"handle": handle, "rkllm_input": {"prompt_input": "ab cd fake:delay_ms=5"}}}})
        progress, result = wire.until_response(4)
        assert progress and all(p["method"] == "notifications/progress" for p in progress)
        assert all(p["params"]["progressToken"] == "tok-A" and p["params"]["total"] == 6 for p in progress)
        values = [p["params"]["progress"] for p in progress]
        assert values == sorted(set(values))
        text = result["result"]["structuredContent"]["text"]
        assert "".join(p["params"]["message"] for p in progress) == text == "ab cd ab \U0001F600"
        assert result["result"]["isError"] is False
        assert json.loads(result["result"]["content"][0]["text"])["text"] == text

        wire.send({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
            "name": "rkllm_run", "arguments": {"handle": "nope", "rkllm_input": {"prompt_input": "x"}}}})
        _, failed = wire.until_response(5)
        assert failed["result"]["isError"] is True
        assert failed["result"]["structuredContent"]["error"]["code"] == "UNKNOWN_HANDLE"

        wire.send({"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "no_such_tool",
                                                                                 "arguments": {}}})
        _, unknown = wire.until_response(6)
        assert unknown["error"]["code"] == -32602

        wire.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "rkllm_run", "_meta": {"progressToken": 99},
            "arguments": {"handle": handle, "rkllm_input": {"prompt_input": "slow fake:delay_ms=50"},
                          "rkllm_infer_params": {"max_new_tokens": 400}}}})
        first = wire.next()
        assert first["method"] == "notifications/progress" and first["params"]["progressToken"] == 99
        wire.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7,
                                                                                     "reason": "user"}})
        deadline = time.monotonic() + 10
        while "abort_while_running" not in events(ev):
            assert time.monotonic() < deadline, "the cancel did not reach rkllm_abort"
            time.sleep(0.02)
        time.sleep(0.3)
        wire.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        before, pong = wire.until_response(8)
        assert pong["result"] == {}
        assert all(m.get("id") != 7 for m in before), "a cancelled request must get no response"

        wire.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
            "name": "rkllm_is_running", "arguments": {"handle": handle}}})
        _, running = wire.until_response(9)
        assert running["result"]["structuredContent"]["running"] is False
    finally:
        stderr = wire.close()
    # the fake's stdout prints went to stderr; stdout held JSON-RPC only
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in wire.raw)
    assert "I rkllm: rkllm-runtime version: 1.3.0" in stderr
    assert all(m.get("id") != 7 for m in map(json.loads, wire.raw))


def test_client_gone_mid_run_aborts_and_the_server_exits(tmp_path: Path) -> None:
    """stdin closing (the client died) while a run streams: the run is aborted and the process ends."""
    model = tmp_path / "m.rkllm"
    model.write_bytes(b"x")
    ev = tmp_path / "events"
    wire = Wire(server_env(build_fake("1.3.0", "1.3.0"), ev))
    wire.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
    wire.until_response(1)
    wire.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    wire.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "rkllm_init", "arguments": {"param": {"model_path": str(model), "max_new_tokens": 1000}}}})
    _, created = wire.until_response(2)
    handle = created["result"]["structuredContent"]["handle"]
    wire.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "rkllm_run", "_meta": {"progressToken": 1},
        "arguments": {"handle": handle, "rkllm_input": {"prompt_input": "x fake:delay_ms=20"}}}})
    assert wire.next()["method"] == "notifications/progress"
    started = time.monotonic()
    wire.close()
    assert wire.proc.returncode is not None and time.monotonic() - started < 10
    kinds = events(ev)
    assert "abort_while_running" in kinds and "destroy" in kinds
    assert kinds.count("aborted_runs") == 1
