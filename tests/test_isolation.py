"""Crash isolation: each model in a supervised worker process; a crash is RUNTIME_CRASHED for that handle only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.servers import child_processes
from tests.test_server import call, fail, init

pytestmark = pytest.mark.anyio


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture
async def client(fake_path: Path, fake: FakeView, tmp_path: Path) -> AsyncIterator[Client]:
    async with Client(build_server(Settings(library=str(fake_path), isolation="process",
                                            models=(str(tmp_path),), cache_dir=str(tmp_path)))) as c:
        yield c


def children() -> list[tuple[int, str]]:
    """(pid, state) of this process's child processes."""
    return child_processes()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_crash_during_init_is_contained(client: Client, model_file: Path, tmp_path: Path) -> None:
    good = await init(client, model_file, max_new_tokens=40)
    crasher = tmp_path / "m-fake:crash_init.rkllm"
    crasher.write_bytes(b"x")
    result: dict[str, Any] = {}

    async def generate() -> None:
        result["run"] = await call(client, "rkllm_run", {"handle": good,
                                                         "rkllm_input": {"prompt_input": "steady fake:delay_ms=10"}})

    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        await anyio.sleep(0.05)
        started = time.monotonic()
        error = await fail(client, "rkllm_init", {"param": {"model_path": str(crasher)}})
        assert time.monotonic() - started < 5  # a worker start (~0.5 s) plus the crash
        assert error["code"] == "RUNTIME_CRASHED" and "SIGSEGV" in error["message"]
        assert error["details"]["exit_code"] == -signal.SIGSEGV
        assert any("rkllm-runtime version" in line for line in error["details"]["stderr_tail"])
    assert result["run"]["token_count"] == 40 and result["run"]["finish_reason"] == "length"


async def test_crash_during_a_streaming_run(client: Client, model_file: Path) -> None:
    victim = await init(client, model_file, max_new_tokens=100)
    survivor = await init(client, model_file, max_new_tokens=30)
    seen: list[str] = []
    crashed_at: list[float] = []
    outcome: dict[str, Any] = {}

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")
        crashed_at[:] = [time.monotonic()]

    async def steady() -> None:
        outcome["survivor"] = await call(client, "rkllm_run", {"handle": survivor, "rkllm_input": {
            "prompt_input": "calm fake:delay_ms=20"}})

    async with anyio.create_task_group() as tg:
        tg.start_soon(steady)
        error = await client.call_tool("rkllm_run", {"handle": victim, "rkllm_input": {
            "prompt_input": "boom fake:crash=5 fake:delay_ms=10"}}, progress_callback=on_progress)
        answered = time.monotonic()
    assert error.is_error and error.structured_content["error"]["code"] == "RUNTIME_CRASHED"  # type: ignore[index]
    assert error.structured_content["error"]["details"]["handle"] == victim  # type: ignore[index]
    assert seen and answered - crashed_at[0] < 1.0  # the crash is reported within a second
    assert outcome["survivor"]["token_count"] == 30
    again = await fail(client, "rkllm_run", {"handle": victim, "rkllm_input": {"prompt_input": "x"}})
    assert again["code"] == "RUNTIME_CRASHED"  # later calls on that handle say why, too
    loaded = await call(client, "loaded_models", {})
    assert [e["handle"] for e in loaded["loaded"]] == [survivor] and loaded["loaded"][0]["pid"]


@pytest.mark.slow
async def test_50_crash_and_reload_cycles_leak_nothing(client: Client, model_file: Path) -> None:
    async def cycle() -> None:
        h = await init(client, model_file, max_new_tokens=4)
        error = await fail(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "x fake:crash=1"}})
        assert error["code"] == "RUNTIME_CRASHED"

    await cycle()  # warm up thread pools
    fds = open_fds()
    for _ in range(50):
        await cycle()
    await anyio.sleep(0.2)
    assert open_fds() <= fds + 2, "file descriptors leaked"
    assert [c for c in children() if c[1] == "Z"] == [], "zombie workers"
    assert children() == [], "a worker outlived its crash"


async def test_distinct_base_domain_ids_and_memory_check(client: Client, fake: FakeView, model_file: Path,
                                                         tmp_path: Path) -> None:
    await init(client, model_file)
    assert fake.last("init")["extend_param"]["base_domain_id"] == 0
    await init(client, model_file)
    assert fake.last("init")["extend_param"]["base_domain_id"] == 1
    await init(client, model_file, extend_param={"base_domain_id": 7})
    assert fake.last("init")["extend_param"]["base_domain_id"] == 7  # the client's choice stands
    huge = tmp_path / "huge.rkllm"
    with open(huge, "wb") as fh:
        fh.truncate(1 << 40)  # a sparse 1 TiB "model": larger than the free memory
    error = await fail(client, "rkllm_init", {"param": {"model_path": str(huge)}})
    assert error["code"] == "LIMIT_EXCEEDED" and "huge.rkllm" in error["message"]


@pytest.mark.slow
def test_workers_die_with_a_sigkilled_server(fake_path: Path, model_file: Path, tmp_path: Path) -> None:
    from tests.servers import REPO, server_env

    proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm", "--isolation", "process"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=server_env(fake_path, root=tmp_path), cwd=REPO)
    assert proc.stdin is not None and proc.stdout is not None

    def rpc(i: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": i, "method": method}
        if params is not None:
            message["params"] = params
        proc.stdin.write((json.dumps(message) + "\n").encode())  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        while True:
            reply = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            if reply.get("id") == i:
                return reply  # type: ignore[no-any-return]

    try:
        rpc(1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                              "clientInfo": {"name": "t", "version": "0"}})
        for i in (2, 3):
            rpc(i, "tools/call", {"name": "rkllm_init", "arguments": {"param": {"model_path": str(model_file)}}})
        loaded = rpc(4, "tools/call", {"name": "loaded_models", "arguments": {}})
        pids = [e["pid"] for e in loaded["result"]["structuredContent"]["loaded"]]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 2.0
    while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
              for p in pids):
        assert time.monotonic() < deadline, "a worker outlived the SIGKILLed server by 2 s"
        time.sleep(0.05)


def test_ctrl_c_shuts_workers_down_in_order(fake_path: Path, model_file: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole process group, workers included: they ignore it and the
    server shuts them down itself, so every model still gets its rkllm_destroy and no worker dies of SIGINT."""
    from tests.jsonrpc_client import RpcConn
    from tests.servers import REPO, drain_log, events, server_env, server_log

    records = tmp_path / "records"
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm", "--transport", "jsonrpc", "--socket", str(sock)],
                            env=server_env(fake_path, records, tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)  # a terminal's process group
    drain_log(proc)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, server_log(proc)
            time.sleep(0.05)
        time.sleep(0.2)
        with RpcConn(sock) as c:
            for name in ("one", "two"):  # shared handles (loaded by name): they outlive the connection
                (tmp_path / f"{name}.rkllm").write_bytes(model_file.read_bytes())
                c.result("load_model", {"model": name})
            pids = [e["pid"] for e in c.result("loaded_models")["loaded"]]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kinds = events(records)
    assert kinds.count("init") == 2 and kinds.count("destroy") == 2, kinds
    assert "SIGINT" not in server_log(proc).replace("SIGINT: stopping", ""), server_log(proc)[-2000:]
    assert not any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                   for p in pids)


def test_an_output_over_the_limit_is_dropped_in_the_worker(fake_path: Path, model_file: Path) -> None:
    """Logits over the run's OutputLimit never cross the socket: the worker drops them and says why, and the
    server's collector reports the same LIMIT_EXCEEDED as for an in-process run."""
    from mcp_rkllm.events import Logits, OutputLimit, RunCollector
    from mcp_rkllm.isolation import messages as m
    from mcp_rkllm.isolation.supervisor import WorkerLimits, WorkerModel, WorkerRuntime
    from mcp_rkllm.structs import RKLLMInferMode, RKLLMInferParam, RKLLMInput, RKLLMParam, RKLLMTokenInput

    runtime = WorkerRuntime("native", str(fake_path), None, WorkerLimits())
    model = runtime.init(RKLLMParam(model_path=str(model_file)))
    assert isinstance(model, WorkerModel)
    arrays: list[int] = []
    dispatch = model.worker._dispatch

    def spy(message: m.Up) -> None:
        if isinstance(message, m.Events):
            arrays.extend(len(e.data) for e in message.events if isinstance(e, Logits))
        dispatch(message)

    model.worker._dispatch = spy  # type: ignore[method-assign]
    try:
        inp = RKLLMInput(token_input=RKLLMTokenInput(input_ids=list(range(10))))
        infer = RKLLMInferParam(mode=RKLLMInferMode.RKLLM_INFER_GET_LOGITS)
        small = RunCollector(output=OutputLimit(max_floats=64))
        model.run(inp, infer, small)
        assert small.output_error is not None and small.output_error.code == "LIMIT_EXCEEDED"
        assert small.output_error.fields["max_output_rows"] == 4 and arrays == []
        fits = RunCollector(output=OutputLimit(rows=2, max_floats=64))
        model.run(inp, infer, fits)
        assert fits.output_error is None and arrays == [32]  # 2 rows x 16, cut in the worker
    finally:
        model.destroy()
