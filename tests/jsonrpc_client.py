"""A blocking JSON-RPC test client for the Unix socket: raw lines out, messages in, with timeouts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.servers import REPO, drain_log, server_env


class RpcConn:
    """One connection to the server's socket."""

    def __init__(self, path: Path | str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RpcConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: Any) -> None:
        self.send_raw(json.dumps(message).encode() + b"\n")

    def recv(self) -> Any:
        """The next message (raises socket.timeout, or EOFError when the server closed)."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, method: str, params: Any = None, request_id: Any = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Send one request; return the callbacks that came for it and its response."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self.until(request_id)

    def until(self, request_id: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Read until the response to `request_id`: (its callbacks' params, the response)."""
        callbacks: list[dict[str, Any]] = []
        while True:
            message = self.recv()
            if message.get("method") == "rkllm.callback":
                assert message["params"]["request_id"] == request_id, message
                callbacks.append(message["params"])
            elif "id" in message:
                assert message["id"] == request_id, message
                return callbacks, message

    def result(self, method: str, params: Any = None, request_id: Any = 1) -> Any:
        """The result of a call that must succeed."""
        _, response = self.call(method, params, request_id)
        assert "result" in response, response
        return response["result"]


def start_socket_server(library: Path, record_dir: Path, socket_path: Path, *flags: str,
                        **extra_env: str) -> subprocess.Popen[bytes]:
    """`python -m mcp_rkllm --transport jsonrpc --socket PATH` with the fake runtime; waits for the socket."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_rkllm", "--transport", "jsonrpc", "--socket", str(socket_path), *flags],
        env=server_env(library, record_dir, None, **extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=REPO)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if os.path.exists(socket_path):
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(socket_path))
                drain_log(proc)
                return proc
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the server did not create its socket")
