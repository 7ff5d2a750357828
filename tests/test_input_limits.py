"""Limits checked on what crosses into C, and careless clients' numbers and handles (issue 18 items 8, 9, 10b, 10c).

The per-argument limits cannot see what the engine builds from several arguments: chat's turns
joined into one prompt (or handed to a runtime to prime) are bounded as a whole. Every float that
becomes a C float must be finite and in range, every int fit its C type: INVALID_PARAMS, never inf
in the runtime nor an OverflowError answered as INTERNAL. A tools JSON nested too deeply is
INVALID_PARAMS. A load whose caller left is freed, for rkllm_init as for load_model. Freeing a
handle aborts a run that had not yet started in the runtime when the first abort came, and calls
caught by the handle's end answer UNKNOWN_HANDLE, not RUNTIME_CRASHED "exited with code 0".
Through the engine and the registry on the fake runtime and a scripted one, and over stdio.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from mcp_rkllm.config import Settings
from mcp_rkllm.engine import NO_STREAM, Engine
from mcp_rkllm.engine import types as T
from mcp_rkllm.errors import ERRORS, RkllmError
from mcp_rkllm.events import EventSink, Token, collector_for
from mcp_rkllm.structs import FLT_MAX, RKLLMInferParam, RKLLMInput, RKLLMParam, RunResult
from mcp_rkllm.surfaces.registry import build_registry
from tests.conftest import FakeView
from tests.servers import REPO, events, server_env
from tests.test_engine_races import Model, ScriptedRuntime

pytestmark = pytest.mark.anyio

REGISTRY = build_registry()
LIMIT = 1000


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture
async def engine(fake_path: Path, fake: FakeView, tmp_path: Path) -> AsyncIterator[Engine]:
    (tmp_path / "m.rkllm").write_bytes(b"model")
    e = Engine(Settings(library=str(fake_path), isolation="none", models=(str(tmp_path),), cache_dir=str(tmp_path),
                        max_prompt_bytes=LIMIT))
    await e.open()
    try:
        yield e
    finally:
        await e.close()


async def invoke(engine: Engine, name: str, args: dict[str, Any]) -> Any:
    return await REGISTRY.invoke(name, args, engine, NO_STREAM)


async def refused(engine: Engine, name: str, args: dict[str, Any]) -> RkllmError:
    with pytest.raises(RkllmError) as exc:
        await invoke(engine, name, args)
    assert exc.value.code in ERRORS and exc.value.code != "INTERNAL", exc.value.message
    return exc.value


def turns(n: int, size: int) -> list[dict[str, str]]:
    """n chat messages of `size` bytes each, alternating user / assistant, ending with a user one."""
    return [{"role": "user" if (n - 1 - i) % 2 == 0 else "assistant", "content": chr(ord("a") + i) * size}
            for i in range(n)]


# ------------------------------------------------------------------ item 8: joined prompts, C floats


async def test_chat_turns_are_bounded_once_joined(engine: Engine, fake: FakeView) -> None:
    handle = (await invoke(engine, "rkllm_init", {"param": {"model_path": "m.rkllm"}})).handle
    messages = turns(7, 200)  # each message well under the limit, 1400 bytes together
    assert messages[-1]["role"] == "user"
    error = await refused(engine, "chat", {"handle": handle, "messages": messages})
    assert error.code == "LIMIT_EXCEEDED" and "prompt sent to the runtime" in error.message
    assert error.fields["limit"] == LIMIT and error.fields["value"] > LIMIT
    assert fake.count("run") == 0
    reply = await invoke(engine, "chat", {"handle": handle, "messages": turns(3, 200), "max_new_tokens": 2})
    assert reply.token_count == 2 and fake.count("run") == 1
    # the same bound holds for a prompt given whole, on the C-style calls too
    for name in ("rkllm_run", "rkllm_run_async"):
        error = await refused(engine, name, {"handle": handle, "rkllm_input": {"multimodal_input": {
            "prompt": "p" * (LIMIT + 1), "image": {"image_embed": [0.5], "n_image_tokens": 1}}}})
        assert error.code == "LIMIT_EXCEEDED"
    assert fake.count("run") == 1


class PrimingModel(Model):
    """A scripted model that is handed the conversation (like the CPU runtime)."""

    def prime_history(self, messages: list[dict[str, str]]) -> None:
        self._do("prime_history")


class PrimingRuntime(ScriptedRuntime):
    def init(self, param: RKLLMParam) -> Model:
        return PrimingModel(self.log, self.delays)


async def test_a_history_handed_to_the_runtime_is_bounded_as_a_whole(tmp_path: Path) -> None:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    runtime = PrimingRuntime({})
    engine = Engine(Settings(models=(str(tmp_path),), cache_dir=str(tmp_path), max_prompt_bytes=LIMIT),
                    runtime=runtime)
    await engine.open()
    handle = (await engine.load_model(T.LoadModelParams(model="demo"))).handle
    with pytest.raises(RkllmError) as exc:
        await engine.chat(T.ChatParams.model_validate({"handle": handle, "messages": turns(7, 200)}))
    assert exc.value.code == "LIMIT_EXCEEDED"
    assert runtime.log.names() == []  # neither primed nor run
    await engine.chat(T.ChatParams.model_validate({"handle": handle, "messages": turns(3, 200)}))
    assert runtime.log.names() == ["prime_history", "run"]


async def test_floats_beyond_a_c_float_are_refused(engine: Engine, fake: FakeView) -> None:
    handle = (await invoke(engine, "rkllm_init", {"param": {"model_path": "m.rkllm"}})).handle
    big = 1e300
    cases: list[tuple[str, dict[str, Any]]] = [
        ("rkllm_init", {"param": {"model_path": "m.rkllm", "temperature": big}}),
        ("rkllm_init", {"param": {"model_path": "m.rkllm", "top_p": -big}}),
        ("load_model", {"model": "m", "param": {"repeat_penalty": 3.5e38}}),
        ("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "x"},
                       "rkllm_infer_params": {"sampling_params": {"temperature": big}}}),
        ("rkllm_run", {"handle": handle, "rkllm_input": {"embed_input": {"embed": [0.5, big], "n_tokens": 1}}}),
        ("rkllm_load_lora", {"handle": handle, "lora_adapter": {"lora_adapter_path": "m.rkllm",
                                                                "lora_adapter_name": "x", "scale": big}}),
        ("rkllm_set_cross_attn_params", {"handle": handle, "cross_attn_params": {
            "encoder_k_cache": [1.0], "encoder_v_cache": [1.0], "encoder_mask": [big], "encoder_pos": [0],
            "num_tokens": 1}}),
    ]
    for name, args in cases:
        error = await refused(engine, name, args)
        assert error.code == "INVALID_PARAMS", (name, error.message)
    assert fake.count("init") == 1 and fake.count("run") == 0 and fake.count("load_lora") == 0
    await invoke(engine, "rkllm_init", {"param": {"model_path": "m.rkllm", "temperature": FLT_MAX}})
    sent = fake.last("init")["temperature"]
    assert math.isfinite(sent) and sent == FLT_MAX  # the largest float still arrives as itself


# ------------------------------------------------------------------ item 9: C ints, nested JSON


async def test_numbers_and_json_the_runtime_cannot_take_are_invalid_params(engine: Engine, fake: FakeView) -> None:
    handle = (await invoke(engine, "rkllm_init", {"param": {"model_path": "m.rkllm"}})).handle
    for start, end in (([2**31], [2**31 + 1]), ([-(2**31) - 1], [0]), ([0], [2**63])):
        error = await refused(engine, "rkllm_clear_kv_cache", {"handle": handle, "start_pos": start, "end_pos": end})
        assert error.code == "INVALID_PARAMS" and ("less than" in error.message or "greater than" in error.message)
    assert fake.count("clear_kv_cache") == 0
    await invoke(engine, "rkllm_clear_kv_cache", {"handle": handle, "start_pos": [0], "end_pos": [2**31 - 1]})
    assert fake.last("clear_kv_cache")["end_pos"] == [2**31 - 1]
    engine.settings = engine.settings.model_copy(update={"max_prompt_bytes": 1 << 20})  # room for deep JSON
    for tools in ("[" * 100_000, "[" * 65 + "]" * 65, "[" + '{"a":' * 64 + "1" + "}" * 64 + "]"):
        error = await refused(engine, "rkllm_set_function_tools", {"handle": handle, "system_prompt": "s",
                                                                   "tools": tools})
        assert error.code == "INVALID_PARAMS" and "nested more than 64 levels" in error.message, tools[:80]
    assert fake.count("set_function_tools") == 0
    fine = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    await invoke(engine, "rkllm_set_function_tools", {"handle": handle, "system_prompt": "s", "tools": fine})
    assert fake.count("set_function_tools") == 1


# ------------------------------------------------------------------ item 10b: a cancelled rkllm_init


async def test_an_rkllm_init_whose_caller_left_is_freed_not_kept(tmp_path: Path) -> None:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    runtime = ScriptedRuntime({"init": 0.5})
    engine = Engine(Settings(models=(str(tmp_path),), cache_dir=str(tmp_path), max_loaded_models=1),
                    runtime=runtime)
    await engine.open()
    with anyio.move_on_after(0.1):
        await engine.init(T.InitParams(param=RKLLMParam(model_path="demo.rkllm")))
    assert not engine.handles and runtime.log.names() == ["destroy"]
    handle = (await engine.init(T.InitParams(param=RKLLMParam(model_path="demo.rkllm")))).handle  # within the limit
    assert list(engine.handles) == [handle]


# ------------------------------------------------------------------ item 10c: calls caught by rkllm_destroy


class ExitingModel(Model):
    """A model in a worker that ignores aborts: freeing it ends its worker (exit code 0) under the run."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gone = threading.Event()

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        collector = collector_for(sink, self.max_new_tokens)
        collector.add(Token("t ", 1))
        self.gone.wait(10)
        raise RkllmError("RUNTIME_CRASHED", handle="(worker)", detail="exited with code 0", exit_code=0)

    def is_running(self) -> bool:
        if self.gone.is_set():
            raise RkllmError("RUNTIME_CRASHED", handle="(worker)", detail="exited with code 0", exit_code=0)
        return True

    def destroy(self) -> None:
        self.gone.set()


class ExitingRuntime(ScriptedRuntime):
    def init(self, param: RKLLMParam) -> Model:
        return ExitingModel(self.log, self.delays)


async def test_calls_caught_by_destroy_answer_unknown_handle_not_crashed(tmp_path: Path) -> None:
    (tmp_path / "demo.rkllm").write_bytes(b"model")
    engine = Engine(Settings(models=(str(tmp_path),), cache_dir=str(tmp_path), abort_timeout=0.3),
                    runtime=ExitingRuntime({}))
    await engine.open()
    handle = (await engine.load_model(T.LoadModelParams(model="demo"))).handle
    model = engine.handles[handle].model
    assert isinstance(model, ExitingModel)
    outcome: dict[str, Any] = {}

    async def run() -> None:
        try:
            outcome["run"] = await engine.generate(T.GenerateParams(handle=handle, prompt="x"))
        except RkllmError as exc:
            outcome["run"] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not engine.handles[handle].running:
                await anyio.sleep(0.01)
            h = engine.handles[handle]
            await engine.destroy(T.HandleParams(handle=handle))
    assert isinstance(outcome["run"], RkllmError) and outcome["run"].code == "UNKNOWN_HANDLE", outcome
    with pytest.raises(RkllmError) as exc:  # a call that got the handle before it was freed
        await engine._call(h, "rkllm_is_running", model.is_running)
    assert exc.value.code == "UNKNOWN_HANDLE"
    for later in (engine.is_running(T.HandleParams(handle=handle)),
                  engine.generate(T.GenerateParams(handle=handle, prompt="x"))):
        with pytest.raises(RkllmError) as exc:
            await later
        assert exc.value.code == "UNKNOWN_HANDLE" and "died" not in exc.value.message
    assert handle not in engine.crashed


async def test_destroy_aborts_a_run_its_first_abort_came_too_early_for(fake_path: Path, fake: FakeView,
                                                                       tmp_path: Path) -> None:
    # In a worker, the run's request may reach the runtime after destroy's first abort, which the run
    # then clears as it starts: the run must be aborted all the same, not left to run for abort_timeout.
    (tmp_path / "m.rkllm").write_bytes(b"model")
    engine = Engine(Settings(library=str(fake_path), isolation="process", models=(str(tmp_path),),
                             cache_dir=str(tmp_path), abort_timeout=5.0))
    await engine.open()
    try:
        for _ in range(3):
            handle = (await invoke(engine, "rkllm_init", {"param": {"model_path": "m.rkllm",
                                                                    "max_new_tokens": 60}})).handle
            outcome: dict[str, Any] = {}

            async def run(handle: str = handle, outcome: dict[str, Any] = outcome) -> None:
                outcome["run"] = await invoke(engine, "rkllm_run", {
                    "handle": handle, "rkllm_input": {"prompt_input": "slow fake:delay_ms=100"}})

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    await anyio.sleep(0)  # the run holds the slot and is on its way to the worker
                    await invoke(engine, "rkllm_destroy", {"handle": handle})
            # Aborted, not run out (60 tokens at 100 ms) nor left to abort_timeout (5 s, about 50 tokens): judged by
            # tokens, not by the clock, which a loaded machine stretches.
            assert outcome["run"].finish_reason == "abort" and outcome["run"].token_count < 30, outcome
    finally:
        await engine.close()


# ------------------------------------------------------------------ over a real transport


@pytest.mark.slow  # a server process
async def test_over_stdio(fake_path: Path, tmp_path: Path) -> None:
    records = tmp_path / "records"
    (tmp_path / "m.rkllm").write_bytes(b"model")
    env = server_env(fake_path, records, None, MCP_RKLLM_MAX_PROMPT_BYTES=str(LIMIT), MCP_RKLLM_ABORT_TIMEOUT="10")
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_rkllm"], env=env, cwd=str(REPO))

    async def call(client: Client, name: str, args: dict[str, Any], error: str | None = None) -> dict[str, Any]:
        result = await client.call_tool(name, args)
        content = result.structured_content
        assert content is not None and result.is_error == (error is not None), content
        if error is not None:
            assert content["error"]["code"] == error, content
            return dict(content["error"])
        return dict(content)

    with anyio.fail_after(90):
        async with Client(params) as client:
            init = {"param": {"model_path": "m.rkllm", "max_new_tokens": 60}}
            handle = (await call(client, "rkllm_init", init))["handle"]
            # item 8
            await call(client, "chat", {"handle": handle, "messages": turns(7, 200)}, "LIMIT_EXCEEDED")
            await call(client, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "x"},
                                             "rkllm_infer_params": {"sampling_params": {"temperature": 1e300}}},
                       "INVALID_PARAMS")
            # item 9
            await call(client, "rkllm_clear_kv_cache", {"handle": handle, "start_pos": [2**31], "end_pos": [2**31]},
                       "INVALID_PARAMS")
            await call(client, "rkllm_set_function_tools", {"handle": handle, "system_prompt": "s",
                                                            "tools": "[" * 450 + "]" * 450}, "INVALID_PARAMS")
            assert "run" not in events(records)
            # item 10b: the client gives up on a load (a worker starting): it is freed, not kept
            with anyio.move_on_after(0.05):
                await client.call_tool("rkllm_init", init)
            with anyio.fail_after(20):
                while events(records).count("init") < 2 or events(records).count("destroy") < 1:
                    await anyio.sleep(0.05)
            assert [e["handle"] for e in (await call(client, "loaded_models", {}))["loaded"]] == [handle]
            # item 10c: a run, then rkllm_destroy and runs queued behind it
            answers: dict[str, dict[str, Any]] = {}

            async def send(key: str, name: str, args: dict[str, Any]) -> None:
                result = await client.call_tool(name, args)
                assert result.structured_content is not None
                answers[key] = result.structured_content

            run = {"handle": handle, "rkllm_input": {"prompt_input": "slow fake:delay_ms=100"}}
            started = anyio.current_time()
            async with anyio.create_task_group() as tg:
                tg.start_soon(send, "run", "rkllm_run", run)
                await anyio.sleep(0.3)
                tg.start_soon(send, "destroy", "rkllm_destroy", {"handle": handle})
                for i in range(3):
                    tg.start_soon(send, f"queued{i}", "rkllm_run", {**run, "rkllm_input": {"prompt_input": "q"}})
            assert anyio.current_time() - started < 5  # the run was aborted: nobody waited for abort_timeout
            assert answers["run"]["finish_reason"] == "abort" and answers["destroy"]["destroyed"]
            for i in range(3):
                assert answers[f"queued{i}"]["error"]["code"] in ("UNKNOWN_HANDLE", "CANCELLED"), answers
            await call(client, "rkllm_is_running", {"handle": handle}, "UNKNOWN_HANDLE")
