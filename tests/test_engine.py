"""Engine rules seen from a client: the run slot's queue, freeing a busy handle, concurrent loads.

Through the MCP surface on the fake runtime, in the server process and with a worker per model.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import RkllmServer, build_server
from tests.conftest import FakeView
from tests.test_server import call, fail, init

pytestmark = pytest.mark.anyio

SLOW = {"prompt_input": "slow words here fake:delay_ms=100"}


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture(params=["none", pytest.param("process", marks=pytest.mark.slow)])  # a worker per model: slow
def isolation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def settings(fake_path: Path, tmp_path: Path, isolation: str, **kw: Any) -> Settings:
    return Settings(library=str(fake_path), isolation=isolation, models=(str(tmp_path),), cache_dir=str(tmp_path),
                    **kw)


@pytest.fixture
async def server(fake_path: Path, fake: FakeView, tmp_path: Path, isolation: str) -> AsyncIterator[RkllmServer]:
    yield build_server(settings(fake_path, tmp_path, isolation, busy_timeout=20.0, worker_timeout=3.0))


async def test_calls_waiting_for_a_freed_handle_are_cancelled(server: RkllmServer, model_file: Path) -> None:
    async with Client(server) as c:
        handle = await init(c, model_file, max_new_tokens=30)
        outcomes: dict[str, Any] = {}

        async def first() -> None:
            outcomes["first"] = await c.call_tool("rkllm_run", {"handle": handle, "rkllm_input": SLOW})

        async def waiter(name: str) -> None:
            outcomes[name] = await c.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "x"}})

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                while not (await call(c, "loaded_models", {}))["loaded"][0]["running"]:
                    await anyio.sleep(0.02)
                tg.start_soon(waiter, "second")
                tg.start_soon(waiter, "third")
                await anyio.sleep(0.3)  # both queued behind the first run
                await call(c, "rkllm_destroy", {"handle": handle})
        assert outcomes["first"].structured_content["finish_reason"] == "abort"
        for name in ("second", "third"):  # they waited for the slot: freed under them, not run, not hung
            result = outcomes[name]
            assert result.is_error, result.structured_content
            error = result.structured_content["error"]
            assert error["code"] == "CANCELLED" and handle in error["message"], error
        assert (await fail(c, "rkllm_is_running", {"handle": handle}))["code"] == "UNKNOWN_HANDLE"


async def test_the_run_slot_serves_callers_in_order(server: RkllmServer, model_file: Path) -> None:
    async with Client(server) as c:
        handle = await init(c, model_file, max_new_tokens=4)
        finished: list[int] = []

        async def run(i: int) -> None:
            prompt = f"w{i} fake:delay_ms=20"
            await call(c, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": prompt}})
            finished.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(run, i)
                await anyio.sleep(0.05)  # each one queued after the previous
        assert finished == [0, 1, 2, 3, 4]


async def test_concurrent_loads_respect_the_limit_and_get_distinct_domains(
        fake_path: Path, fake: FakeView, tmp_path: Path, isolation: str, model_file: Path) -> None:
    server = build_server(settings(fake_path, tmp_path, isolation, max_loaded_models=3))
    async with Client(server) as c:
        results: list[Any] = []

        async def load() -> None:
            results.append(await c.call_tool("rkllm_init", {"param": {"model_path": str(model_file)}}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(7):
                    tg.start_soon(load)
        ok = [r.structured_content["handle"] for r in results if not r.is_error]
        refused = [r.structured_content["error"] for r in results if r.is_error]
        assert len(ok) == 3, results
        assert len(refused) == 4 and {e["code"] for e in refused} == {"LIMIT_EXCEEDED"}, refused
        domains = [server.engine.handles[h].param.extend_param.base_domain_id for h in ok]  # type: ignore[union-attr]
        assert sorted(domains) == [0, 1, 2]  # type: ignore[type-var]  # None would be a failure too
        assert len((await call(c, "loaded_models", {}))["loaded"]) == 3


async def test_an_async_run_that_ends_at_once_is_not_a_timeout(server: RkllmServer, model_file: Path) -> None:
    # A worker may report the end of a run before the reply to its start: both must count.
    async with Client(server) as c:
        handle = await init(c, model_file)
        for _ in range(3):
            with anyio.fail_after(2.5):  # under worker_timeout: a lost reply would show as RUNTIME_TIMEOUT at 3 s
                await call(c, "rkllm_run_async", {"handle": handle, "rkllm_input": {"prompt_input": "hi fake:error=0"}})
                report = await call(c, "rkllm_run_async_result", {"handle": handle, "wait_seconds": 2})
            assert report["done"] and report["result"]["finish_reason"] == "error"


@pytest.mark.parametrize("isolation", ["process"])
async def test_a_request_too_big_for_a_stopped_workers_socket_still_times_out(
        fake_path: Path, fake: FakeView, tmp_path: Path, model_file: Path, isolation: str) -> None:
    server = build_server(settings(fake_path, tmp_path, isolation, worker_timeout=1.0))
    async with Client(server) as c:
        handle = await init(c, model_file)
        pid = (await call(c, "loaded_models", {}))["loaded"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            big = "word " * 120_000  # 600 KB: more than a socket buffer holds while nobody reads
            with anyio.fail_after(15):
                error = await fail(c, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": big}})
                assert error["code"] == "RUNTIME_TIMEOUT"
                assert (await fail(c, "generate", {"handle": handle, "prompt": "x"}))["code"] == "RUNTIME_TIMEOUT"
                await call(c, "unload_model", {"handle": handle})
        finally:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
