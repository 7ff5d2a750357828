"""Engine races found in review, each pinned with a scripted runtime whose calls take as long as the test says.

The runtime records every model call with its start and end, so a test can assert that no two
calls on one handle overlapped, that nothing ran after rkllm_destroy, and what a cancelled client
left behind. The engine is driven directly (its coroutines are what every surface calls).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_rkllm.config import Settings
from mcp_rkllm.engine import Engine, Progress, Stream
from mcp_rkllm.engine import types as T
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import AsyncRun, EventSink, Finish, Token, collector_for
from mcp_rkllm.structs import RKLLMCrossAttnParam, RKLLMInferParam, RKLLMInput, RKLLMLoraAdapter, RKLLMParam, RunResult

pytestmark = pytest.mark.anyio


class Log:
    """Model calls with their start and end times; overlapping calls on one model are recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []
        self.overlaps: list[str] = []
        self._active = 0
        self._lock = threading.Lock()

    def call(self, name: str, seconds: float) -> None:
        with self._lock:
            self._active += 1
            if self._active > 1:
                self.overlaps.append(name)
        start = time.monotonic()
        time.sleep(seconds)
        with self._lock:
            self._active -= 1
            self.calls.append((name, start, time.monotonic()))

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


class Model:
    """A LoadedModel whose calls take the times in `delays` (seconds) and go to the log."""

    max_new_tokens = 8
    n_batch = 1

    def __init__(self, log: Log, delays: dict[str, float]):
        self.log = log
        self.delays = delays
        self.template: tuple[str, str, str] | None = None
        self.aborted = threading.Event()

    def _do(self, name: str) -> None:
        self.log.call(name, self.delays.get(name, 0.0))

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        collector = collector_for(sink, self.max_new_tokens)
        self.aborted.clear()
        with self.log._lock:
            self.log._active += 1
            if self.log._active > 1:
                self.log.overlaps.append("run")
        start = time.monotonic()
        for i in range(self.max_new_tokens):
            if self.aborted.wait(self.delays.get("token", 0.0)):
                break
            collector.add(Token(f"t{i} ", i))
        collector.add(Finish(None))
        with self.log._lock:
            self.log._active -= 1
            self.log.calls.append(("run", start, time.monotonic()))
        return collector.result(aborted=self.aborted.is_set())

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> AsyncRun:
        raise NotImplementedError

    def abort(self) -> None:
        self.aborted.set()

    def is_running(self) -> bool:
        return False

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None, end_pos: list[int] | None) -> None:
        self._do("clear_kv_cache")

    def get_kv_cache_size(self) -> list[int]:
        return [0]

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        self._do("set_chat_template")
        self.template = (system_prompt, prompt_prefix, prompt_postfix)

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        self._do("set_function_tools")

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        self._do("set_cross_attn_params")

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        self._do("load_lora")

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        self._do("load_prompt_cache")

    def release_prompt_cache(self) -> None:
        self._do("release_prompt_cache")

    def destroy(self) -> None:
        self._do("destroy")


class ScriptedRuntime:
    name = "native"
    abi = "1.3.0"
    assigns_npu_domains = False

    def __init__(self, delays: dict[str, float]):
        self.log = Log()
        self.delays = delays

    def describe(self) -> dict[str, object]:
        return {"runtime": self.name}

    def create_default_param(self) -> RKLLMParam:
        return RKLLMParam()

    def init(self, param: RKLLMParam) -> Model:
        time.sleep(self.delays.get("init", 0.0))
        return Model(self.log, self.delays)


async def engine_with(tmp_path: Path, delays: dict[str, float], **settings: Any) -> tuple[Engine, ScriptedRuntime]:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    (tmp_path / "demo.json").write_text('{"chat_template": {"system_prompt": "SYS", "prompt_prefix": "<u>", '
                                        '"prompt_postfix": "</u>"}}')
    runtime = ScriptedRuntime(delays)
    engine = Engine(Settings(models=(str(tmp_path),), cache_dir=str(tmp_path), **settings), runtime=runtime)
    await engine.open()
    return engine, runtime


def chat(handle: str) -> T.ChatParams:
    return T.ChatParams.model_validate({"handle": handle, "messages": [{"role": "user", "content": "hi"}]})


async def test_freeing_a_handle_while_chat_prepares_its_run_cancels_the_chat(tmp_path: Path) -> None:
    engine, runtime = await engine_with(tmp_path, {"clear_kv_cache": 0.5, "token": 0.05}, abort_timeout=5.0)
    handle = (await engine.load_model(T.LoadModelParams(model="demo"))).handle
    outcome: dict[str, Any] = {}

    async def do_chat() -> None:
        try:
            outcome["chat"] = await engine.chat(chat(handle))
        except RkllmError as exc:
            outcome["chat"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(do_chat)
        await anyio.sleep(0.1)  # chat holds the slot and is clearing the KV cache
        await engine.unload_model(T.UnloadParams(handle=handle))
    error = outcome["chat"]
    assert isinstance(error, RkllmError) and error.code == "CANCELLED", error
    assert runtime.log.names() == ["set_chat_template", "clear_kv_cache", "destroy"]  # no run, destroy last
    assert not runtime.log.overlaps


async def test_a_cancelled_caller_does_not_hand_on_the_slot_while_its_call_runs(tmp_path: Path) -> None:
    engine, runtime = await engine_with(tmp_path, {"clear_kv_cache": 0.6})
    handle = (await engine.load_model(T.LoadModelParams(model="demo"))).handle

    async def cancelled_chat() -> None:
        with anyio.move_on_after(0.2):  # the client gives up while the KV cache is being cleared
            await engine.chat(chat(handle))

    async def generate() -> None:
        await anyio.sleep(0.05)  # queued behind the chat
        await engine.generate(T.GenerateParams(handle=handle, prompt="p"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_chat)
        tg.start_soon(generate)
    assert "run" in runtime.log.names()
    assert not runtime.log.overlaps, runtime.log.calls  # generate's run began after the clear ended


async def test_a_failing_stream_aborts_its_run(tmp_path: Path) -> None:
    engine, runtime = await engine_with(tmp_path, {"token": 0.1})
    handle = (await engine.load_model(T.LoadModelParams(model="demo"))).handle

    async def broken(update: Progress) -> None:
        raise anyio.BrokenResourceError("the client's stream is closed")

    started = time.monotonic()
    with pytest.raises(anyio.BrokenResourceError):  # the sink's own error, not wrapped in a group
        await engine.generate(T.GenerateParams(handle=handle, prompt="p"), Stream(broken))
    name, _, ended = runtime.log.calls[-1]
    assert name == "run" and ended - started < 0.5  # aborted after its first token, not run to the end (0.8 s)
    assert not engine.handles[handle].running
    again = await engine.generate(T.GenerateParams(handle=handle, prompt="p"))  # the handle is free and usable
    assert again.token_count == Model.max_new_tokens


async def test_a_load_whose_caller_left_is_freed_not_kept(tmp_path: Path) -> None:
    engine, runtime = await engine_with(tmp_path, {"init": 0.5})
    with anyio.move_on_after(0.1):  # the client gives up during the load
        await engine.load_model(T.LoadModelParams(model="demo"))
    assert not engine.handles  # nobody got the handle: it does not count against the limits ...
    assert runtime.log.names() == ["set_chat_template", "destroy"]  # ... the load ran to its end and was freed
    result = await engine.generate(T.GenerateParams(model="demo", prompt="hi"))  # a retry loads it again
    (handle,) = engine.handles.values()
    assert result.handle == handle.id
    assert isinstance(handle.model, Model) and handle.model.template == ("SYS", "<u>", "</u>")
