"""Several boards behind HAProxy (issue 17, README "Several boards"): three servers on loopback ports with the
fake runtime, HAProxy with deploy/haproxy.cfg in front, and real MCP clients through it in both protocol eras.

- handshake-era sessions spread over the boards, and every response of a session comes from one board (the
  X-RKLLM-Server header of each response, and server_status);
- stateless 2026-07-28 requests naming a handle reach the board that made it (MCP, JSON-RPC by name and by the
  Mcp-Param-Handle header, OpenAI with the handle as model), 10 calls per handle with no UNKNOWN_HANDLE;
- a board killed mid-stream: its clients get a clean error within seconds, the others finish their streams,
  new sessions and OpenAI requests go to the survivors; restarted, it takes new sessions again;
- SIGTERM (no HAProxy needed): a running generation finishes within --shutdown-grace while new connections are
  refused, exit 0; past the grace what runs is aborted, exit 0.

Without `haproxy` the HAProxy tests skip (saying how to install it); with `CI` set they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, free_port, server_env

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

CONFIG = REPO / "deploy" / "haproxy.cfg"
INSTALL_HINT = "install it (`apt-get install haproxy`, as .ci/run does) to run the fleet tests"


def ci() -> bool:
    """True on CI (the `CI` environment variable set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_haproxy() -> str | None:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
    return found


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout} s: {log.read_text()[-3000:]}")


def end(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Board:
    """One `mcp-rkllm --transport http` on a loopback port, with the fake runtime; its log in a file (a pipe
    nobody reads would fill up and stall it)."""

    def __init__(self, library: Path, root: Path, name: str, grace: float = 30):
        self.library, self.root, self.name, self.grace = library, root, name, grace
        self.port = free_port()
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Board:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mcp_rkllm", "--transport", "http", "--host", "127.0.0.1",
                 "--port", str(self.port), "--server-id", self.name, "--log-level", "WARNING"],
                env=server_env(self.library, None, self.root, MCP_RKLLM_SHUTDOWN_GRACE=str(self.grace),
                               MCP_RKLLM_MAX_LOADED_MODELS="32"),
                stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
        wait_listening(self.port, self.proc, self.log)
        return self

    def kill(self) -> None:
        end(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        end(self.proc)


class Fleet:
    """Three boards and HAProxy with deploy/haproxy.cfg in front of them."""

    def __init__(self, haproxy: str, library: Path, root: Path, boards: int = 3):
        self.haproxy = haproxy
        self.root = root
        self.boards = [Board(library, root, f"board{i + 1}") for i in range(boards)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "haproxy.log"

    @property
    def names(self) -> set[str]:
        return {b.name for b in self.boards}

    def start(self) -> None:
        for board in self.boards:
            board.start()
        env = {"PATH": os.environ.get("PATH", ""), "LISTEN": f"127.0.0.1:{self.port}"}
        env.update({f"BOARD{i + 1}": b.address for i, b in enumerate(self.boards)})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.haproxy, "-db", "-f", str(CONFIG)], env=env,
                                         stdout=log, stderr=log, cwd=REPO)
        wait_listening(self.port, self.proc, self.log)

    def stop(self) -> None:
        end(self.proc)
        for board in self.boards:
            board.stop()


@pytest.fixture(scope="module")
def library() -> Path:
    return build_fake("1.3.0", version="1.3.0")


@pytest.fixture(scope="module")
def fleet(library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    haproxy = find_haproxy()
    if haproxy is None:
        if ci():
            pytest.fail(f"haproxy is not installed. CI is set, so the fleet tests must run, not skip: {INSTALL_HINT}",
                        pytrace=False)
        pytest.skip(f"haproxy is not installed: {INSTALL_HINT}")
    root = tmp_path_factory.mktemp("fleet")
    (root / "m.rkllm").write_bytes(b"fake")
    fleet = Fleet(haproxy, library, root)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@asynccontextmanager
async def mcp_client(url: str, mode: str, seen: list[tuple[str, str]] | None = None) -> AsyncIterator[Client]:
    """An MCP client of `url` in `mode` ("legacy": the handshake era; "2026-07-28": stateless) that records the
    (X-RKLLM-Server, X-RKLLM-Route) headers of every response it gets in `seen`."""
    async def record(response: httpx2.Response) -> None:
        if seen is not None:
            seen.append((response.headers.get("x-rkllm-server", "?"), response.headers.get("x-rkllm-route", "?")))

    async with (httpx2.AsyncClient(event_hooks={"response": [record]}, timeout=httpx2.Timeout(30, read=300)) as http,
                Client(streamable_http_client(url + "/mcp", http_client=http), mode=mode) as client):
        yield client


def route_tag(server_id: str) -> str:
    """The tag a board with this id puts in its handle ids."""
    return hashlib.sha256(server_id.encode()).hexdigest()[:8]


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    content = result.structured_content
    assert isinstance(content, dict)
    return content


async def test_sessions_spread_over_the_boards_and_stick(fleet: Fleet) -> None:
    seen: list[list[tuple[str, str]]] = [[] for _ in range(6)]
    with anyio.fail_after(90):
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(mcp_client(fleet.url, "legacy", seen[i])) for i in range(6)]
            on: list[str] = []
            for client in clients:
                statuses = {structured(await client.call_tool("server_status", {}))["server_id"] for _ in range(3)}
                assert len(statuses) == 1, statuses
                on.append(statuses.pop())
                # A handle made in the session belongs to it, on its board: every call finds it.
                handle = structured(await client.call_tool("rkllm_init", {"param": {"model_path": "m.rkllm",
                                                                                    "max_new_tokens": 8}}))["handle"]
                for _ in range(3):
                    run = structured(await client.call_tool("rkllm_run", {
                        "handle": handle, "rkllm_input": {"prompt_input": "hi"}}))
                    assert run["token_count"] > 0
                assert structured(await client.call_tool("rkllm_destroy", {"handle": handle}))
            for i, board in enumerate(on):
                servers = {server for server, _ in seen[i]}
                assert servers == {board}, f"session {i} was answered by {servers}"
            assert set(on) == fleet.names, f"6 sessions landed on {on}"


async def test_stateless_handles_reach_the_board_that_made_them(fleet: Fleet) -> None:
    seen: list[tuple[str, str]] = []
    handles: list[str] = []
    with anyio.fail_after(120):
        for _ in range(3):  # a new connection each: balanced by least connections
            async with mcp_client(fleet.url, "2026-07-28", seen) as client:
                assert client.protocol_version == "2026-07-28"
                made = structured(await client.call_tool("rkllm_init", {"param": {"model_path": "m.rkllm",
                                                                                  "max_new_tokens": 8}}))
                handles.append(made["handle"])
        tags = {h.split("-")[1] for h in handles}
        assert len(tags) >= 2, f"3 handles made on one board: {handles}"
        seen.clear()
        async with mcp_client(fleet.url, "2026-07-28", seen) as client:
            for handle in handles:
                for _ in range(10):
                    ran = await client.call_tool("rkllm_run", {"handle": handle,
                                                               "rkllm_input": {"prompt_input": "hi"}})
                    assert structured(ran)["token_count"] > 0  # never UNKNOWN_HANDLE: the right board every time
                    assert seen[-1][1] == handle.split("-")[1]
        async with httpx.AsyncClient(timeout=30) as http:
            for handle in handles:
                tag = handle.split("-")[1]
                for i in range(10):  # JSON-RPC by name: HAProxy reads params.handle from the body
                    r = await http.post(fleet.url + "/jsonrpc", json={"jsonrpc": "2.0", "id": i,
                                                                      "method": "rkllm.is_running",
                                                                      "params": {"handle": handle}})
                    assert "result" in r.json(), r.text
                    assert r.headers["x-rkllm-route"] == tag
                # Positional params hide the handle from json_query: the Mcp-Param-Handle header routes it.
                r = await http.post(fleet.url + "/jsonrpc", headers={"Mcp-Param-Handle": handle},
                                    json={"jsonrpc": "2.0", "id": 1, "method": "rkllm.is_running", "params": [handle]})
                assert "result" in r.json() and r.headers["x-rkllm-route"] == tag, r.text
                # OpenAI with the handle as the model.
                r = await http.post(fleet.url + "/v1/chat/completions", json={
                    "model": handle, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                assert r.status_code == 200 and r.headers["x-rkllm-route"] == tag, r.text
                destroy = {"jsonrpc": "2.0", "id": 1, "method": "rkllm.destroy", "params": [handle]}
                destroyed = await http.post(fleet.url + "/jsonrpc", json=destroy, headers={"Mcp-Param-Handle": handle})
                assert "result" in destroyed.json(), destroyed.text
            # By model name: any healthy board.
            r = await http.post(fleet.url + "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.status_code == 200 and r.headers["x-rkllm-server"] in fleet.names, r.text


async def _generate(client: Client, handle: str, started: anyio.Event, tokens: int) -> tuple[str, float, Any]:
    """Run a streamed generation; (how it ended, when, the result or the error)."""
    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    try:
        result = await client.call_tool("generate", {"handle": handle, "prompt": "go fake:delay_ms=30",
                                                     "max_new_tokens": tokens},
                                        progress_callback=on_progress)
    except Exception as exc:  # the SDK raises MCPError for a JSON-RPC error (a broken stream, a 503)
        return "error", time.monotonic(), exc
    return ("is_error" if result.is_error else "ok"), time.monotonic(), result


async def test_a_board_dies_mid_stream_and_comes_back(fleet: Fleet) -> None:
    tokens = 120  # about 4 s at 30 ms a token
    with anyio.fail_after(150):
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(mcp_client(fleet.url, "legacy")) for _ in range(6)]
            on = [structured(await c.call_tool("server_status", {}))["server_id"] for c in clients]
            # Each session its own model (owned by the session), so that all six generate at once.
            own = [structured(await c.call_tool("rkllm_init", {"param": {"model_path": "m.rkllm"}}))["handle"]
                   for c in clients]
            victim_name = on[0]
            victim = next(b for b in fleet.boards if b.name == victim_name)
            assert len(set(on)) >= 2, on
            # A stateless handle on the victim's board, and one on another board.
            handles: dict[str, str] = {}
            for _ in range(9):
                async with mcp_client(fleet.url, "2026-07-28") as c:
                    made = structured(await c.call_tool("load_model", {"model": "m"}))["handle"]
                    mine = made.split("-")[1] == route_tag(victim_name)
                    if handles.setdefault("victim" if mine else "other", made) != made:
                        structured(await c.call_tool("unload_model", {"handle": made}))
                if len(handles) == 2:
                    break
            assert len(handles) == 2, handles

            results: list[tuple[str, float, Any]] = [("", 0.0, None)] * len(clients)
            async with anyio.create_task_group() as tg:
                started = [anyio.Event() for _ in clients]

                async def run(i: int) -> None:
                    results[i] = await _generate(clients[i], own[i], started[i], tokens)

                for i in range(len(clients)):
                    tg.start_soon(run, i)
                for event in started:
                    await event.wait()
                killed_at = time.monotonic()
                victim.kill()
            for i, (how, when, what) in enumerate(results):
                if on[i] == victim_name:
                    assert how in ("error", "is_error"), f"session {i} on the dead board: {how} {what}"
                    assert when - killed_at < 10, f"session {i}'s error took {when - killed_at:.1f} s"
                else:
                    assert how == "ok", f"session {i} on {on[i]}: {what}"
                    assert structured(what)["token_count"] == tokens
            # A later request of a session on the dead board: a clear error, quickly; the others carry on.
            for i, client in enumerate(clients):
                t0 = time.monotonic()
                if on[i] == victim_name:
                    with pytest.raises(Exception, match=r"board|closed|terminated|error") as raised:
                        await client.call_tool("server_status", {})
                    assert time.monotonic() - t0 < 10, raised.value
                else:
                    assert structured(await client.call_tool("server_status", {}))["server_id"] == on[i]
            # The dead board's handle: a clear error; the other one still works.
            async with mcp_client(fleet.url, "2026-07-28") as c:
                t0 = time.monotonic()
                with pytest.raises(Exception, match="board") as raised:
                    await c.call_tool("rkllm_is_running", {"handle": handles["victim"]})
                assert time.monotonic() - t0 < 10, raised.value
                assert structured(await c.call_tool("rkllm_is_running", {"handle": handles["other"]}))["running"] == 0
            # New sessions succeed, on the survivors; so does the OpenAI surface.
            for _ in range(3):
                async with mcp_client(fleet.url, "legacy") as c:
                    assert structured(await c.call_tool("server_status", {}))["server_id"] != victim_name
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(fleet.url + "/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                assert r.status_code == 200 and r.headers["x-rkllm-server"] != victim_name, r.text

        # Restarted (same port and id), it takes new sessions again once HAProxy's checks see it up.
        victim.start()
        deadline = time.monotonic() + 30
        async with AsyncExitStack() as stack:
            while True:
                c = await stack.enter_async_context(mcp_client(fleet.url, "legacy"))
                if structured(await c.call_tool("server_status", {}))["server_id"] == victim_name:
                    break
                assert time.monotonic() < deadline, "the restarted board took no new session"
                await anyio.sleep(0.3)


async def test_sigterm_lets_a_running_generation_finish(library: Path, tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    board = Board(library, tmp_path, "drained", grace=20).start()
    assert board.proc is not None
    try:
        body = {"model": "m", "stream": True, "max_tokens": 60,
                "messages": [{"role": "user", "content": "go fake:delay_ms=40"}]}
        pieces = 0
        finish = None
        with anyio.fail_after(60):
            async with httpx.AsyncClient(timeout=30) as http:
                health = await http.get(f"http://{board.address}/healthz")
                assert health.status_code == 200 and health.json()["server"] == "drained"
                assert health.headers["x-rkllm-server"] == "drained"
                async with http.stream("POST", f"http://{board.address}/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        pieces += 1
                        finish = chunk["choices"][0].get("finish_reason") or finish
                        if pieces == 3:
                            board.proc.send_signal(signal.SIGTERM)
                            signalled = time.monotonic()
                            await anyio.sleep(0.3)
                            # Draining: new connections are refused (a proxy tries another board).
                            async with httpx.AsyncClient(timeout=5) as fresh:
                                with pytest.raises(httpx.ConnectError):
                                    await fresh.get(f"http://{board.address}/healthz")
        assert finish == "length", (finish, pieces)  # all 60 tokens: the run was not aborted
        assert board.proc.wait(20) == 0
        assert time.monotonic() - signalled < 20
    finally:
        board.stop()


async def test_sigterm_past_the_grace_aborts_and_exits_0(library: Path, tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    board = Board(library, tmp_path, "short", grace=1).start()
    assert board.proc is not None
    try:
        body = {"model": "m", "stream": True, "max_tokens": 1000,
                "messages": [{"role": "user", "content": "go fake:delay_ms=50"}]}
        with anyio.fail_after(60):
            async with (httpx.AsyncClient(timeout=30) as http,
                        http.stream("POST", f"http://{board.address}/v1/chat/completions", json=body) as r):
                pieces = 0
                try:
                    async for line in r.aiter_lines():
                        pieces += line.startswith("data: {")
                        if pieces == 3:
                            board.proc.send_signal(signal.SIGTERM)
                            signalled = time.monotonic()
                except httpx.HTTPError:
                    pass  # the aborted stream may end abruptly
        assert pieces < 1000
        assert board.proc.wait(20) == 0
        assert time.monotonic() - signalled < 10
    finally:
        board.stop()
