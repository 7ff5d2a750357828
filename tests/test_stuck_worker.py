"""A stopped worker freezes nothing else: a model's worker process that stops answering (SIGSTOP here;
on a board, a wedged NPU driver) makes calls on its handle fail with RUNTIME_TIMEOUT after
`Settings.worker_timeout`, while every other tool and handle keeps answering, and unloading the
handle kills the worker.

The server runs in this test's event loop (`mcp.Client` in memory), so a server that blocked the
loop on the stopped worker would also stop every `fail_after` here: a watchdog thread notices a
blocked loop and SIGKILLs the stopped worker, which unblocks the server, and the test fails
saying so instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from mcp import Client
from mcp.types import CallToolResult

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import ERRORS
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.test_server import call, init

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

T = TypeVar("T")

#: Seconds a worker may go without answering (a call or its heartbeat).
WORKER_TIMEOUT = 1.0
#: Bound for calls that must not wait for the stopped worker at all (generous: machines are noisy).
PROMPT = 5.0
#: Bound for calls on the stopped handle: well above WORKER_TIMEOUT.
TIMED_OUT = 15.0
#: A loop that answers nothing for this long is blocked (the watchdog then frees it).
STALL = 4.0


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture
def settings(fake_path: Path, fake: FakeView, tmp_path: Path) -> Settings:
    return Settings(library=str(fake_path), isolation="process", models=(str(tmp_path),), cache_dir=str(tmp_path),
                    worker_timeout=WORKER_TIMEOUT)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None once it is gone (reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


class Stopped:
    """A worker process stopped with SIGSTOP; `kill()` makes sure it is not left behind."""

    def __init__(self, pid: int):
        stat = proc_stat(pid)
        assert stat is not None, f"worker {pid} is not running"
        self.pid = pid
        self._started = stat[1]
        os.kill(pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL the worker (and SIGCONT it, should the kill not be delivered) if it is still that process."""
        stat = proc_stat(self.pid)
        if stat is None or stat[1] != self._started or stat[0] == "Z":
            return
        for sig in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class LoopWatchdog:
    """Turns a blocked event loop into a test failure instead of a hang.

    A thread pings the loop every 0.1 s; when a ping goes unanswered for `STALL` seconds it notes
    what the test was doing and kills the stopped workers, so that the blocked call returns.
    """

    def __init__(self) -> None:
        self.stopped: list[Stopped] = []
        self.doing = "the test"
        self.stalled: str | None = None
        self._loop = asyncio.get_running_loop()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            answered = threading.Event()
            try:
                self._loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop is closed
                return
            if not answered.wait(STALL) and not self._done.is_set():
                self.stalled = self.doing
                for worker in self.stopped:
                    worker.kill()
                answered.wait(30)

    def stop(self, pid: int) -> Stopped:
        """SIGSTOP a worker; it is killed when the loop stalls and when the watchdog closes."""
        worker = Stopped(pid)
        self.stopped.append(worker)
        return worker

    def check(self) -> None:
        assert self.stalled is None, (
            f"the server blocked its event loop for more than {STALL:g} s during {self.stalled} "
            "(waiting for the stopped worker froze everything; the watchdog killed the worker to end it)")

    def close(self) -> None:
        self._done.set()
        self._thread.join(STALL + 31)
        for worker in self.stopped:
            worker.kill()


@contextlib.contextmanager
def watchdog() -> Iterator[LoopWatchdog]:
    dog = LoopWatchdog()
    try:
        yield dog
    finally:
        dog.close()


async def bounded(dog: LoopWatchdog, seconds: float, what: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Await `fn()`, failing the test if it takes longer than `seconds` or blocks the event loop."""
    dog.doing = what
    try:
        with anyio.fail_after(seconds):
            result = await fn()
    except TimeoutError:
        dog.check()
        raise AssertionError(f"{what} did not end within {seconds:g} s") from None
    except Exception:
        dog.check()  # a stall explains what went wrong after it better than the error it caused
        raise
    dog.check()
    return result


def assert_timed_out(result: CallToolResult, function: str) -> None:
    """The call ended with RUNTIME_TIMEOUT, as a tool error."""
    assert result.is_error, f"{function} on the stopped worker succeeded: {result.structured_content}"
    assert result.structured_content is not None
    error: dict[str, Any] = result.structured_content["error"]
    assert error["code"] == "RUNTIME_TIMEOUT", error
    assert error["function"] == function and error["hint"]
    assert "RUNTIME_TIMEOUT" in ERRORS and error["number"] == ERRORS["RUNTIME_TIMEOUT"].number


async def worker_pid(client: Client, handle: str) -> int:
    loaded = await call(client, "loaded_models", {})
    pids = [e["pid"] for e in loaded["loaded"] if e["handle"] == handle]
    assert pids and pids[0], f"no worker pid for {handle}: {loaded}"
    return int(pids[0])


async def wait_reaped(pid: int, seconds: float = 5.0) -> None:
    """Wait until the process is gone from /proc: dead and reaped, not a zombie."""
    deadline = time.monotonic() + seconds
    while (stat := proc_stat(pid)) is not None:
        assert time.monotonic() < deadline, f"worker {pid} is still there (state {stat[0]}) after its handle was freed"
        await anyio.sleep(0.05)


@pytest.mark.parametrize("free", ["unload_model", "rkllm_destroy"])
async def test_a_stopped_worker_freezes_nothing_else(settings: Settings, model_file: Path, free: str) -> None:
    async with Client(build_server(settings)) as client:
        stuck = await init(client, model_file, max_new_tokens=8)
        other = await init(client, model_file, max_new_tokens=8)
        pid = await worker_pid(client, stuck)
        with watchdog() as dog:
            dog.stop(pid)

            # Everything that does not need the stopped worker answers at once.
            status = await bounded(dog, PROMPT, "server_status", lambda: call(client, "server_status", {}))
            assert status["version"]
            models = await bounded(dog, PROMPT, "list_models", lambda: call(client, "list_models", {}))
            assert model_file.name in [m["file"] for m in models["models"]]
            loaded = await bounded(dog, PROMPT, "loaded_models", lambda: call(client, "loaded_models", {}))
            assert other in [e["handle"] for e in loaded["loaded"]]
            run = await bounded(dog, PROMPT, "rkllm_run on the other handle", lambda: call(
                client, "rkllm_run", {"handle": other, "rkllm_input": {"prompt_input": "fine fake:delay_ms=5"}}))
            assert run["text"].startswith("fine fine") and run["token_count"] == 8

            # Calls on the stopped handle end with RUNTIME_TIMEOUT, not never.
            for name, args in [
                ("rkllm_is_running", {"handle": stuck}),
                ("rkllm_get_kv_cache_size", {"handle": stuck}),
                ("rkllm_run", {"handle": stuck, "rkllm_input": {"prompt_input": "hello"}}),
            ]:
                result = await bounded(dog, TIMED_OUT, f"{name} on the stopped handle",
                                       functools.partial(client.call_tool, name, args))  # type: ignore[arg-type]
                assert_timed_out(result, name)

            # Freeing the handle kills the worker, and the server reaps it.
            freed = await bounded(dog, TIMED_OUT, f"{free} of the stopped handle",
                                  lambda: call(client, free, {"handle": stuck}))
            if free == "unload_model":
                assert freed["unloaded"] == [stuck]
            else:
                assert freed["destroyed"] is True and freed["handle"] == stuck
            await wait_reaped(pid)

            loaded = await bounded(dog, PROMPT, "loaded_models", lambda: call(client, "loaded_models", {}))
            assert [e["handle"] for e in loaded["loaded"]] == [other]
            again = await bounded(dog, PROMPT, "rkllm_run on the other handle", lambda: call(
                client, "rkllm_run", {"handle": other, "rkllm_input": {"prompt_input": "still fine"}}))
            assert again["token_count"] == 8


async def test_a_worker_stopped_mid_run_times_that_run_out(settings: Settings, model_file: Path) -> None:
    async with Client(build_server(settings)) as client:
        stuck = await init(client, model_file, max_new_tokens=50)
        other = await init(client, model_file, max_new_tokens=40)
        pid = await worker_pid(client, stuck)
        with watchdog() as dog:
            first_token = anyio.Event()
            outcome: dict[str, CallToolResult] = {}

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                if not first_token.is_set():
                    dog.stop(pid)
                    first_token.set()

            async def stuck_run() -> None:
                with anyio.move_on_after(TIMED_OUT):
                    outcome["stuck"] = await client.call_tool("rkllm_run", {
                        "handle": stuck, "rkllm_input": {"prompt_input": "slow fake:delay_ms=200"}},
                        progress_callback=on_progress)

            async with anyio.create_task_group() as tg:
                tg.start_soon(stuck_run)
                await bounded(dog, PROMPT, "the first token of the run to stop", first_token.wait)
                # 40 tokens 40 ms apart: this run spans the stopped worker's timeout.
                survivor = await bounded(dog, 10, "rkllm_run on the other handle", lambda: call(
                    client, "rkllm_run", {"handle": other, "rkllm_input": {"prompt_input": "calm fake:delay_ms=40"}}))
                dog.doing = "the run on the stopped worker"
            dog.check()
            assert survivor["token_count"] == 40 and survivor["finish_reason"] == "length"
            assert survivor["text"].startswith("calm calm")
            assert "stuck" in outcome, f"the run on the stopped worker did not end within {TIMED_OUT:g} s"
            assert_timed_out(outcome["stuck"], "rkllm_run")
