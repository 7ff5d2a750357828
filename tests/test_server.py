"""The MCP server in memory through mcp.Client, in both protocol eras, against the fake runtime."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from mcp import Client, MCPError

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import ERRORS
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.servers import progress_content

pytestmark = pytest.mark.anyio

C_FUNCTIONS = [
    "rkllm_createDefaultParam", "rkllm_init", "rkllm_destroy", "rkllm_run", "rkllm_run_async", "rkllm_abort",
    "rkllm_is_running", "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size", "rkllm_set_chat_template",
    "rkllm_set_function_tools", "rkllm_set_cross_attn_params", "rkllm_load_lora", "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache",
]


@pytest.fixture(params=["auto", "legacy"])
def era(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[pytest.param("process", marks=pytest.mark.slow), "none"])  # a worker per model: slow
def isolation(request: pytest.FixtureRequest) -> str:
    """Every server test runs with each model in a worker process, and in the server process."""
    return str(request.param)


@pytest.fixture
async def client(fake_path: Path, fake: FakeView, era: str, isolation: str, tmp_path: Path) -> AsyncIterator[Client]:
    settings = Settings(library=str(fake_path), isolation=isolation, models=(str(tmp_path),), cache_dir=str(tmp_path))
    async with Client(build_server(settings), mode=era) as c:
        yield c


async def call(client: Client, name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured content."""
    result = await client.call_tool(name, args, **kw)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


async def fail(client: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Call a tool that must fail; return its error object (with a code from the table)."""
    result = await client.call_tool(name, args)
    assert result.is_error, result.structured_content
    assert result.structured_content is not None
    error: dict[str, Any] = result.structured_content["error"]
    assert error["code"] in ERRORS and error["number"] == ERRORS[error["code"]].number
    assert error["hint"] and error["function"] == name
    return error


async def init(client: Client, model_file: Path, **param: Any) -> str:
    return str((await call(client, "rkllm_init", {"param": {"model_path": str(model_file), **param}}))["handle"])


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_tools_list_has_the_15_functions_with_valid_schemas(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(C_FUNCTIONS) <= set(tools)
    for tool in tools.values():
        schema = tool.input_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object"
        assert tool.output_schema is None  # results are described by rkllm://schemas/{tool} (a lean tools/list)
        assert tool.annotations is not None and tool.annotations.open_world_hint is False
        assert tool.description
    assert tools["rkllm_is_running"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert tools["rkllm_destroy"].annotations.destructive_hint is True  # type: ignore[union-attr]
    assert "handle" in tools["rkllm_run"].input_schema["required"]


@pytest.mark.parametrize("abi", ["1.2.1", "1.3.0"])
async def test_every_tool_succeeds_with_valid_arguments(client: Client, fake: FakeView, model_file: Path,
                                                        tmp_path: Path) -> None:
    called: set[str] = set()

    async def ok(name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
        called.add(name)
        return await call(client, name, args, **kw)

    default = await ok("rkllm_createDefaultParam", {})
    assert default["param"]["top_k"] == 40
    h = (await ok("rkllm_init", {"param": {"model_path": str(model_file), "max_new_tokens": 6, "top_k": 3}}))["handle"]
    assert fake.last("init")["top_k"] == 3
    assert (await ok("rkllm_is_running", {"handle": h}))["running"] is False
    await ok("rkllm_set_chat_template", {"handle": h, "system_prompt": "S", "prompt_prefix": "P",
                                          "prompt_postfix": "Q"})
    await ok("rkllm_set_function_tools", {"handle": h, "system_prompt": "S", "tools": [
        {"type": "function", "function": {"name": "now", "description": "time", "parameters": {}}}]})
    assert json.loads(fake.last("set_function_tools")["tools"])[0]["function"]["name"] == "now"
    await ok("rkllm_set_cross_attn_params", {"handle": h, "cross_attn_params": {
        "encoder_k_cache": [1.0, 2.0], "encoder_v_cache": [3.0, 4.0], "encoder_mask": [1.0],
        "encoder_pos": [0], "num_tokens": 1}})
    adapter = tmp_path / "lora.rkllm"
    adapter.write_bytes(b"x")
    await ok("rkllm_load_lora", {"handle": h, "lora_adapter": {"lora_adapter_path": str(adapter),
                                                                "lora_adapter_name": "a"}})
    cache = tmp_path / "cache.bin"
    r = await ok("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "one two"},
                               "rkllm_infer_params": {"keep_history": 1, "lora_params": {"lora_adapter_name": "a"},
                                                      "prompt_cache_params": {"prompt_cache_path": str(cache)}}})
    assert r["text"] == "one two one 😀" and r["finish_reason"] == "length" and r["token_count"] == 6
    assert (await ok("rkllm_get_kv_cache_size", {"handle": h}))["cache_sizes"] == [8]
    await ok("rkllm_load_prompt_cache", {"handle": h, "prompt_cache_path": str(cache)})
    await ok("rkllm_release_prompt_cache", {"handle": h})
    await ok("rkllm_clear_kv_cache", {"handle": h, "keep_system_prompt": 0})
    assert (await ok("rkllm_get_kv_cache_size", {"handle": h}))["cache_sizes"] == [0]
    started = await ok("rkllm_run_async", {"handle": h, "rkllm_input": {"prompt_input": "async"}})
    report = await ok("rkllm_run_async_result", {"handle": h, "wait_seconds": 10})
    assert report["done"] and report["run_id"] == started["run_id"] and report["result"]["token_count"] == 6
    await ok("rkllm_abort", {"handle": h})
    hidden = await ok("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "a b"},
                                    "rkllm_infer_params": {"mode": "RKLLM_INFER_GET_LAST_HIDDEN_LAYER"}})
    assert hidden["last_hidden_layer"]["num_tokens"] == 2 and len(hidden["last_hidden_layer"]["hidden_states"]) == 16
    logits = await ok("rkllm_run", {"handle": h, "rkllm_input": {"token_input": {"input_ids": [1, 2, 3]}},
                                    "rkllm_infer_params": {"mode": 2}})
    assert logits["logits"]["vocab_size"] == 16 and len(logits["logits"]["logits"]) == 48
    await ok("rkllm_destroy", {"handle": h})
    assert called | {"rkllm_run_async_result"} >= set(C_FUNCTIONS)
    await fail(client, "rkllm_is_running", {"handle": h})  # gone after destroy


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("rkllm_createDefaultParam", {"extra": 1}, "INVALID_PARAMS"),
    ("rkllm_init", {}, "INVALID_PARAMS"),
    ("rkllm_init", {"param": {"model_path": "/nonexistent/model.rkllm"}}, "PATH_NOT_ALLOWED"),
    ("rkllm_init", {"param": {"model_path": "missing.rkllm"}}, "RKLLM_CALL_FAILED"),
    ("rkllm_init", {"param": {"top_k": "many"}}, "INVALID_PARAMS"),
    ("rkllm_init", {"param": {"model_path": "m", "top_k": 2**40}}, "INVALID_PARAMS"),
    ("rkllm_destroy", {"handle": "h-0"}, "UNKNOWN_HANDLE"),
    ("rkllm_run", {"handle": "HANDLE"}, "INVALID_PARAMS"),
    ("rkllm_run", {"handle": "HANDLE", "rkllm_input": {}}, "INVALID_PARAMS"),
    ("rkllm_run", {"handle": "HANDLE", "rkllm_input": {"input_type": "RKLLM_INPUT_BOGUS", "prompt_input": "x"}},
     "INVALID_PARAMS"),
    ("rkllm_run", {"handle": "HANDLE", "rkllm_input": {"embed_input": {"embed": [1.0, 2.0, 3.0], "n_tokens": 2}}},
     "INVALID_PARAMS"),
    ("rkllm_run", {"handle": "HANDLE", "rkllm_input": {"prompt_input": "x fake:fail"}}, "RKLLM_CALL_FAILED"),
    ("rkllm_run", {"handle": "HANDLE", "rkllm_input": {"prompt_input": "x fake:error=1"}}, "GENERATION_ERROR"),
    ("rkllm_run_async", {"handle": "HANDLE", "rkllm_input": {"prompt_input": 3}}, "INVALID_PARAMS"),
    ("rkllm_run_async_result", {"handle": "HANDLE"}, "RUN_NOT_FOUND"),
    ("rkllm_abort", {"handle": ""}, "INVALID_PARAMS"),
    ("rkllm_is_running", {}, "INVALID_PARAMS"),
    ("rkllm_clear_kv_cache", {"handle": "HANDLE", "keep_system_prompt": 7}, "INVALID_PARAMS"),
    ("rkllm_clear_kv_cache", {"handle": "HANDLE", "start_pos": [1, 2], "end_pos": [3, 4]}, "INVALID_PARAMS"),
    ("rkllm_get_kv_cache_size", {"handle": "nope"}, "UNKNOWN_HANDLE"),
    ("rkllm_set_chat_template", {"handle": "HANDLE", "system_prompt": "s"}, "INVALID_PARAMS"),
    ("rkllm_set_function_tools", {"handle": "HANDLE", "system_prompt": "s", "tools": "{not json"}, "INVALID_PARAMS"),
    ("rkllm_set_cross_attn_params", {"handle": "HANDLE", "cross_attn_params": {
        "encoder_k_cache": [1.0], "encoder_v_cache": [1.0], "encoder_mask": [1.0, 1.0], "encoder_pos": [0],
        "num_tokens": 1}}, "INVALID_PARAMS"),
    ("rkllm_load_lora", {"handle": "HANDLE", "lora_adapter": {"lora_adapter_path": "/nonexistent",
                                                              "lora_adapter_name": "x"}}, "PATH_NOT_ALLOWED"),
    ("rkllm_load_lora", {"handle": "HANDLE", "lora_adapter": {"lora_adapter_path": "no-such-adapter.rkllm",
                                                              "lora_adapter_name": "x"}}, "RKLLM_CALL_FAILED"),
    ("rkllm_load_prompt_cache", {"handle": "HANDLE", "prompt_cache_path": "/nonexistent.bin"}, "PATH_NOT_ALLOWED"),
    ("rkllm_load_prompt_cache", {"handle": "HANDLE", "prompt_cache_path": "missing.bin"}, "RKLLM_CALL_FAILED"),
    ("rkllm_release_prompt_cache", {"handle": 5}, "INVALID_PARAMS"),
]


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_invalid_arguments_are_tool_errors_with_table_codes(client: Client, model_file: Path) -> None:
    h = await init(client, model_file)
    for name, args, code in INVALID:
        args = {k: (h if v == "HANDLE" else v) for k, v in args.items()}
        error = await fail(client, name, args)
        assert error["code"] == code, (name, args, error)
    assert set(C_FUNCTIONS) <= {name for name, _, _ in INVALID}
    # the server lives on and the handle still works
    assert (await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "ok"}}))["text"]


@pytest.mark.parametrize("abi", ["1.2.0"])
async def test_functions_missing_from_1_2_0_are_not_supported(client: Client, model_file: Path) -> None:
    h = await init(client, model_file)
    for name, args in [("rkllm_get_kv_cache_size", {}), ("rkllm_set_function_tools",
                                                          {"system_prompt": "", "tools": "[]"}),
                       ("rkllm_set_cross_attn_params", {"cross_attn_params": {
                           "encoder_k_cache": [1.0], "encoder_v_cache": [1.0], "encoder_mask": [1.0],
                           "encoder_pos": [0], "num_tokens": 1}})]:
        assert (await fail(client, name, {"handle": h, **args}))["code"] == "NOT_SUPPORTED"  # type: ignore[dict-item]
    error = await fail(client, "rkllm_init", {"param": {"model_path": str(model_file), "ignore_eos_token": True}})
    assert error["code"] == "ABI_FIELD_UNSUPPORTED"


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_unknown_tool_is_a_protocol_error(client: Client) -> None:
    with pytest.raises(MCPError) as exc:
        await client.call_tool("rkllm_nonexistent", {})
    assert exc.value.error.code == -32602


@pytest.mark.parametrize("abi", ["1.2.0", "1.2.1", "1.3.0"])
async def test_progress_messages_concatenate_to_the_final_text(client: Client, model_file: Path) -> None:
    h = await init(client, model_file, max_new_tokens=20)
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    r = await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "alpha beta fake:delay_ms=2"}},
                   progress_callback=on_progress)
    assert len(seen) > 1
    assert "".join(m or "" for _, _, m in seen) == r["text"]
    progress = [p for p, _, _ in seen]
    assert progress == sorted(set(progress)) and progress[-1] == r["token_count"] == 20
    assert all(total == 20 for _, total, _ in seen)


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_cancel_mid_run_aborts_and_the_handle_stays_usable(client: Client, fake: FakeView,
                                                                 model_file: Path) -> None:
    h = await init(client, model_file, max_new_tokens=200)
    first = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        first.set()

    async with anyio.create_task_group() as tg:
        async def slow_run() -> None:
            await client.call_tool("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "x fake:delay_ms=20"}},
                                   progress_callback=on_progress)

        tg.start_soon(slow_run)
        with anyio.fail_after(5):
            await first.wait()
        tg.cancel_scope.cancel()
    with anyio.fail_after(5):
        while fake.count("abort_while_running") < 1:
            await anyio.sleep(0.01)
    r = await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "after"},
                                         "rkllm_infer_params": {"max_new_tokens": 3}})
    assert r["text"] == "after after after" and r["finish_reason"] == "length"
    assert fake.count("run_while_busy") == 0


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_second_run_on_a_busy_handle_waits_then_busy(fake_path: Path, fake: FakeView, model_file: Path,
                                                           isolation: str) -> None:
    server = build_server(Settings(library=str(fake_path), busy_timeout=0.2, isolation=isolation,
                                   models=(str(model_file.parent),)))
    async with Client(server) as c:
        h = await init(c, model_file, max_new_tokens=30)
        results: dict[str, Any] = {}

        async def slow() -> None:
            results["slow"] = await c.call_tool("rkllm_run", {"handle": h,
                                                              "rkllm_input": {"prompt_input": "s fake:delay_ms=20"}})

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await anyio.sleep(0.1)
            busy = await c.call_tool("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "second"}})
        assert busy.is_error and busy.structured_content["error"]["code"] == "BUSY"  # type: ignore[index]
        assert busy.structured_content["error"]["retryable"] is True  # type: ignore[index]
        assert not results["slow"].is_error and results["slow"].structured_content["token_count"] == 30
        # a run that only has to wait briefly gets through
        second = await call(c, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "third"},
                                             "rkllm_infer_params": {"max_new_tokens": 2}})
        assert second["text"] == "third third"


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_two_handles_run_concurrently_with_their_own_text(client: Client, model_file: Path) -> None:
    a = await init(client, model_file, max_new_tokens=10)
    b = await init(client, model_file, max_new_tokens=10)
    out: dict[str, dict[str, Any]] = {}

    async def go(h: str, word: str) -> None:
        out[word] = await call(client, "rkllm_run", {"handle": h,
                                                     "rkllm_input": {"prompt_input": f"{word} fake:delay_ms=5"}})

    async with anyio.create_task_group() as tg:
        tg.start_soon(go, a, "apple")
        tg.start_soon(go, b, "berry")
    assert "berry" not in out["apple"]["text"] and "apple" not in out["berry"]["text"]
    assert out["apple"]["text"].startswith("apple apple")


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_run_async_streams_through_result_calls(client: Client, model_file: Path) -> None:
    h = await init(client, model_file, max_new_tokens=12)
    await call(client, "rkllm_run_async", {"handle": h, "rkllm_input": {"prompt_input": "w fake:delay_ms=10"}})
    first = await call(client, "rkllm_run_async_result", {"handle": h})
    assert first["done"] is False
    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    final = await call(client, "rkllm_run_async_result", {"handle": h, "offset": first["offset"], "wait_seconds": 10},
                       progress_callback=on_progress)
    assert final["done"] and final["result"]["finish_reason"] == "length"
    assert first["text"] + final["text"] == final["result"]["text"]
    # progress carries the text generated while waiting: a tail of the whole text, in order
    assert seen and final["result"]["text"].endswith(progress_content(seen))
    busy_free = await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "next"},
                                                 "rkllm_infer_params": {"max_new_tokens": 1}})
    assert busy_free["text"] == "next"


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_abort_tool_stops_an_async_run(client: Client, fake: FakeView, model_file: Path) -> None:
    h = await init(client, model_file, max_new_tokens=500)
    await call(client, "rkllm_run_async", {"handle": h, "rkllm_input": {"prompt_input": "z fake:delay_ms=10"}})
    await anyio.sleep(0.05)
    assert (await call(client, "rkllm_is_running", {"handle": h}))["running"] is True
    assert (await call(client, "rkllm_abort", {"handle": h}))["was_running"] is True
    final = await call(client, "rkllm_run_async_result", {"handle": h, "wait_seconds": 5})
    assert final["done"] and final["result"]["finish_reason"] == "abort"
    assert fake.count("abort_while_running") == 1


async def test_no_library_means_clear_errors_not_a_dead_server(tmp_path: Path, isolation: str) -> None:
    async with Client(build_server(Settings(library=str(tmp_path / "missing.so"), isolation=isolation))) as c:
        assert len((await c.list_tools()).tools) >= 15
        error = await fail(c, "rkllm_init", {"param": {"model_path": "x"}})
        assert error["code"] == "LIBRARY_NOT_FOUND" and "missing.so" in error["message"]
        assert (await fail(c, "rkllm_createDefaultParam", {}))["code"] == "LIBRARY_NOT_FOUND"


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_handles_are_destroyed_when_the_server_stops(fake_path: Path, fake: FakeView, model_file: Path,
                                                          isolation: str) -> None:
    async with Client(build_server(Settings(library=str(fake_path), isolation=isolation,
                                            models=(str(model_file.parent),)))) as c:
        await init(c, model_file)
        await init(c, model_file)
    assert fake.count("destroy") == 2


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_fast_runtime_is_coalesced_and_loses_nothing(client: Client, model_file: Path) -> None:
    """Tokens arriving faster than notifications go out are batched; the concatenation is still exact."""
    h = await init(client, model_file, max_new_tokens=20000)
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    r = await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "tok en"}},
                   progress_callback=on_progress)
    assert r["token_count"] == 20000
    assert progress_content(messages) == r["text"]
    assert len(messages) < 20000 / 2  # coalesced (one notification per token would be ~15000)


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_client_timeout_aborts_the_run(client: Client, fake: FakeView, model_file: Path) -> None:
    h = await init(client, model_file, max_new_tokens=300)
    with pytest.raises(MCPError) as exc:
        await client.call_tool("rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "t fake:delay_ms=20"}},
                               read_timeout_seconds=0.3)
    assert exc.value.error.code == -32001  # REQUEST_TIMEOUT; the client sent notifications/cancelled
    with anyio.fail_after(5):
        while fake.count("abort_while_running") < 1:
            await anyio.sleep(0.01)
    r = await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "next"},
                                         "rkllm_infer_params": {"max_new_tokens": 1}})
    assert r["text"] == "next"


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_resources_are_listed_readable_and_metrics_move(client: Client, model_file: Path) -> None:
    import json as _json

    listed = {str(r.uri) for r in (await client.list_resources()).resources}
    assert listed == {"rkllm://status", "rkllm://models", "rkllm://metrics", "rkllm://errors"}

    async def read(uri: str) -> Any:
        contents = (await client.read_resource(uri)).contents
        return _json.loads(contents[0].text)  # type: ignore[union-attr]

    errors = await read("rkllm://errors")
    assert {e["code"] for e in errors} >= {"BUSY", "RUNTIME_CRASHED", "PATH_NOT_ALLOWED"}
    before = await read("rkllm://metrics")
    h = await init(client, model_file, max_new_tokens=6)
    await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "m e"}})
    await fail(client, "rkllm_run", {"handle": "nope", "rkllm_input": {"prompt_input": "x"}})
    after = await read("rkllm://metrics")
    run = after["tools"]["rkllm_run"]
    assert run["calls"] - before["tools"].get("rkllm_run", {"calls": 0})["calls"] == 2
    assert run["failures"] >= 1 and run["successes"] >= 1 and run["p95_ms"] >= run["mean_ms"] * 0 > -1
    assert after["generation"]["tokens"] - before["generation"]["tokens"] == 6
    assert after["memory"]["peak_rss_mb"] > 10
    status = await read("rkllm://status")
    assert h in status["handles"] and status["runtime"]["abi"] == "1.3.0"
    models = await read("rkllm://models")
    assert "demo.rkllm" in [m["file"] for m in models["models"]]
    with pytest.raises(MCPError):
        await client.read_resource("rkllm://nope")


@pytest.mark.parametrize("abi", ["1.3.0"])
async def test_no_empty_progress_messages(client: Client, model_file: Path) -> None:
    """Tokens of an unfinished UTF-8 character never produce a notification of their own."""
    h = await init(client, model_file, max_new_tokens=12)
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "a b fake:delay_ms=15"}},
               progress_callback=on_progress)
    assert seen and all(message for _, message in seen)
    assert [p for p, _ in seen] == sorted({p for p, _ in seen})
