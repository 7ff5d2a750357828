"""The stdio wire against hostile and careless clients (issue 18 items 6, 10a, 10b).

Every malformed line that could be a request is answered with a JSON-RPC error and the session goes on;
a lone UTF-16 surrogate inside a string is replaced with U+FFFD; SIGTERM and SIGINT abort the running
generation, free the handle and exit 0; a client that writes without reading holds the server to
bounded memory, and is answered in full once it reads. The parser is also tested in-process.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mcp.types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, JSONRPCError, JSONRPCRequest

from mcp_rkllm.surfaces.mcp.stdio import MAX_DEPTH, parse_line
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, events, server_env

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def request(request_id: int, method: str, params: str) -> str:
    """A request line with `params` given as JSON text."""
    return '{"jsonrpc": "2.0", "id": ' + str(request_id) + ', "method": "' + method + '", "params": ' + params + "}"


class StdioServer:
    """`python -m mcp_rkllm` on stdio; its stdout is read only while `read()` is in force (`pause()`)."""

    def __init__(self, tmp_path: Path, **env: str):
        self.records = tmp_path / "records"
        self.stderr = (tmp_path / "stderr").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, cwd=REPO,
                                     env=server_env(build_fake("1.3.0", "1.3.0"), self.records, None, **env))
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.go = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while self.go.wait() and (line := self.proc.stdout.readline()):
            self.lines.put(line)

    def read(self) -> None:
        self.go.set()

    def pause(self) -> None:
        """Stop reading the server's stdout (after at most the line being read)."""
        self.go.clear()

    def send(self, message: dict[str, Any] | bytes | str) -> None:
        data = message if isinstance(message, bytes) else (
            message if isinstance(message, str) else json.dumps(message)).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 15) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from the server in {timeout} s") from None
        message: dict[str, Any] = json.loads(line)
        assert message["jsonrpc"] == "2.0"
        return message

    def answer(self, message: dict[str, Any] | bytes | str) -> dict[str, Any]:
        """Send one line and return the response or error that follows (notifications skipped)."""
        self.send(message)
        while True:
            reply = self.next()
            if "method" not in reply:
                return reply

    def start_session(self) -> None:
        self.read()
        assert self.answer(INIT)["result"]["serverInfo"]["name"] == "mcp-rkllm"
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def close(self) -> None:
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.stderr.close()


def error_of(reply: dict[str, Any], request_id: int | None, code: int) -> str:
    assert "result" not in reply, reply
    assert reply["id"] == request_id and reply["error"]["code"] == code, reply
    message: str = reply["error"]["message"]
    return message


# -- the parser, in-process


def test_parse_line_answers_what_it_cannot_accept() -> None:
    ping = '{"jsonrpc": "2.0", "id": 7, "method": "ping"}'
    assert isinstance(parse_line(ping.encode()), JSONRPCRequest)
    assert parse_line(b"   \r") is None  # a blank line is nothing, not an error

    def errors(line: str | bytes) -> list[tuple[Any, int]]:
        parsed = parse_line(line.encode() if isinstance(line, str) else line)
        assert isinstance(parsed, list), parsed
        assert all(isinstance(e, JSONRPCError) for e in parsed)
        return [(e.id, e.error.code) for e in parsed]

    assert errors(ping[:-1]) == [(None, PARSE_ERROR)]
    assert errors(b"\xff\xfe" + ping.encode()) == [(None, PARSE_ERROR)]
    assert errors('{"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"x": NaN}}') == [(None, PARSE_ERROR)]
    assert errors("42") == [(None, INVALID_REQUEST)]
    assert errors('{"jsonrpc": "1.0", "id": 7, "method": "ping"}') == [(7, INVALID_REQUEST)]
    assert errors('{"id": "seven", "method": "ping"}') == [("seven", INVALID_REQUEST)]
    assert errors('{"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}') == [(None, INVALID_REQUEST)]
    assert errors('{"jsonrpc": "2.0", "id": true, "method": "ping"}') == [(None, INVALID_REQUEST)]
    assert errors('{"jsonrpc": "2.0", "id": 7, "method": 3}') == [(7, INVALID_REQUEST)]
    assert errors('{"jsonrpc": "2.0", "id": 7, "method": "ping", "params": [1]}') == [(7, INVALID_PARAMS)]
    assert errors('{"jsonrpc": "1.0", "method": "notifications/initialized"}') == [(None, INVALID_REQUEST)]
    assert errors(f"[{ping}, 3, {ping.replace('7', '8')}]") == [(7, INVALID_REQUEST), (8, INVALID_REQUEST)]
    assert errors("[]") == [(None, INVALID_REQUEST)]
    # nesting: what pydantic-core accepts (the SDK's HTTP transport) is accepted; deeper is answered, with
    # the id, however deep (no recursion, no RecursionError)
    def deep(depth: int) -> str:
        return request(9, "ping", '{"x": ' + nested(depth) + "}")

    assert isinstance(parse_line(deep(MAX_DEPTH - 2).encode()), JSONRPCRequest)
    for depth in (MAX_DEPTH - 1, 5000, 200_000):
        assert errors(deep(depth)) == [(9, INVALID_REQUEST)], depth
    assert errors(deep(5000)[:-1]) == [(None, PARSE_ERROR)]  # too deep and not even JSON
    brackets_in_a_string = '{"jsonrpc": "2.0", "id": 9, "method": "ping", "params": {"x": "' + "[{" * 300 + '"}}'
    assert isinstance(parse_line(brackets_in_a_string.encode()), JSONRPCRequest)  # strings do not nest
    # lone surrogates (JavaScript's JSON.stringify of half an emoji) become U+FFFD; pairs stay emoji
    half = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
        "name": "generate", "arguments": {"prompt": "half \ud83d, \ude00 and whole \U0001F600", "\udc00": 1}}})
    assert "\\ud83d" in half
    parsed = parse_line(half.encode())
    assert isinstance(parsed, JSONRPCRequest) and parsed.params is not None
    assert parsed.params["arguments"] == {"prompt": "half \ufffd, \ufffd and whole \U0001F600", "\ufffd": 1}


# -- a real server on stdio


@pytest.mark.slow  # a server process
def test_malformed_lines_are_answered_and_the_session_goes_on(tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"x")
    server = StdioServer(tmp_path, MCP_RKLLM_MAX_REQUEST_BYTES="65536")
    try:
        server.start_session()
        loaded = server.answer({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "rkllm_init", "arguments": {"param": {"model_path": "m.rkllm", "max_new_tokens": 3}}}})
        handle = loaded["result"]["structuredContent"]["handle"]
        # half an emoji, as JSON.stringify writes it: accepted, the half replaced with U+FFFD
        half = server.answer({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "rkllm_run", "arguments": {"handle": handle, "rkllm_input": {"prompt_input": "half \ud83d"}}}})
        assert half["result"]["isError"] is False, half
        assert "\ufffd" in half["result"]["structuredContent"]["text"]
        assert "\\ud83d" not in json.dumps(half)

        def call(request_id: int, handle: str) -> str:
            return request(request_id, "tools/call", '{"name": "rkllm_is_running", "arguments": {"handle": '
                           + handle + "}}")

        assert "deeper" in error_of(server.answer(call(4, nested(200))), 4, INVALID_REQUEST)
        assert "deeper" in error_of(server.answer(call(5, nested(30_000))), 5, INVALID_REQUEST)
        assert "Parse error" in error_of(server.answer('{"jsonrpc": "2.0", "id": 6, "method": "ping"'), None,
                                         PARSE_ERROR)
        batch = server.answer('[{"jsonrpc": "2.0", "id": 7, "method": "ping"}, '
                              '{"jsonrpc": "2.0", "id": 8, "method": "ping"}]')
        assert "batch" in error_of(batch, 7, INVALID_REQUEST)
        assert "batch" in error_of(server.next(), 8, INVALID_REQUEST)
        assert "2.0" in error_of(server.answer({"jsonrpc": "1.0", "id": 9, "method": "ping"}), 9, INVALID_REQUEST)
        error_of(server.answer({"id": 10, "method": "ping"}), 10, INVALID_REQUEST)
        error_of(server.answer({"jsonrpc": "2.0", "id": 11, "method": "ping", "params": [1]}), 11, INVALID_PARAMS)
        error_of(server.answer({"jsonrpc": "2.0", "id": {"no": 1}, "method": "ping"}), None, INVALID_REQUEST)
        error_of(server.answer("42"), None, INVALID_REQUEST)
        error_of(server.answer(b"\xff\xfe{}"), None, PARSE_ERROR)
        error_of(server.answer('{"jsonrpc": "2.0", "id": 12, "method": "ping", "params": {"x": NaN}}'), None,
                 PARSE_ERROR)
        long = server.answer({"jsonrpc": "2.0", "id": 13, "method": "ping", "params": {"pad": "x" * 70_000}})
        assert "65536" in error_of(long, None, INVALID_REQUEST)
        server.send("")  # a blank line: nothing to answer
        # nesting pydantic-core accepts (as the HTTP transport does) is served
        assert server.answer(request(14, "ping", '{"x": ' + nested(150) + "}")) == {
            "jsonrpc": "2.0", "id": 14, "result": {}}
        assert server.answer({"jsonrpc": "2.0", "id": 15, "method": "ping"}) == {"jsonrpc": "2.0", "id": 15,
                                                                                 "result": {}}
        assert server.proc.poll() is None
    finally:
        server.close()
    assert server.proc.returncode == 0


@pytest.mark.slow  # a server process
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_aborts_the_run_frees_the_handle_and_exits_0(tmp_path: Path, signum: int) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"x")
    server = StdioServer(tmp_path)
    try:
        server.start_session()
        loaded = server.answer({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "rkllm_init", "arguments": {"param": {"model_path": "m.rkllm", "max_new_tokens": 1000}}}})
        handle = loaded["result"]["structuredContent"]["handle"]
        server.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "rkllm_run", "_meta": {"progressToken": 1},
            "arguments": {"handle": handle, "rkllm_input": {"prompt_input": "x fake:delay_ms=20"}}}})
        assert server.next()["method"] == "notifications/progress"
        started = time.monotonic()
        server.proc.send_signal(signum)
        code = server.proc.wait(15)
        took = time.monotonic() - started
    finally:
        server.close()
    assert code == 0
    assert took < 5, took
    kinds = events(server.records)
    assert "abort_while_running" in kinds and "destroy" in kinds
    assert kinds.count("aborted_runs") == 1


@pytest.mark.slow  # a server process and 30,000 requests
def test_a_client_that_does_not_read_holds_the_server_to_bounded_memory(tmp_path: Path) -> None:
    """30,000 requests from a client that does not read: the server stops reading stdin (the client's writes
    block) instead of growing; once the client reads, every request is answered."""
    n, first = 30_000, 100
    server = StdioServer(tmp_path, MCP_RKLLM_LOG_LEVEL="WARNING")
    try:
        server.start_session()
        server.pause()
        time.sleep(0.5)
        baseline = server.rss_kib()
        sent = [0]

        def flood() -> None:
            assert server.proc.stdin is not None
            for start in range(first, first + n, 500):
                server.proc.stdin.write(b"".join(b'{"jsonrpc": "2.0", "id": %d, "method": "ping"}\n' % i
                                                 for i in range(start, start + 500)))
                server.proc.stdin.flush()
                sent[0] += 500

        writer = threading.Thread(target=flood, daemon=True)
        writer.start()
        peak, last, still = baseline, -1, time.monotonic()
        deadline = time.monotonic() + 60
        while writer.is_alive() and time.monotonic() - still < 3:  # until the writes stall for 3 s
            assert time.monotonic() < deadline, "the flood neither finished nor stalled"
            peak = max(peak, server.rss_kib())
            if sent[0] != last:
                last, still = sent[0], time.monotonic()
            time.sleep(0.05)
        peak = max(peak, server.rss_kib())
        print(f"RSS baseline {baseline} KiB, peak {peak} KiB while not reading; {sent[0]} of {n} requests written")
        assert writer.is_alive() and sent[0] < n, "the server kept reading a client that does not read"
        assert peak - baseline < 30 * 1024, (baseline, peak)

        server.read()
        answered: set[int] = set()
        while len(answered) < n:
            reply = server.next(timeout=30)
            assert reply.get("result") == {}, reply
            answered.add(reply["id"])
        assert answered == set(range(first, first + n))
        writer.join(10)
        assert not writer.is_alive() and sent[0] == n
        assert server.answer({"jsonrpc": "2.0", "id": 1, "method": "ping"})["result"] == {}
    finally:
        server.close()
    assert server.proc.returncode == 0
