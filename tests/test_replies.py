"""Replies read by their model family, end to end: the fake NPU runtime echoes scripted reasoning and tool
calls (it repeats the prompt's words), and every surface must carry them apart: MCP results and progress,
JSON-RPC callbacks, OpenAI `reasoning_content` / `tool_calls` (whole and as deltas), Ollama `thinking` /
`tool_calls`. On the CPU runtime, chat with tools runs and whatever the model wrote is accounted for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.engine.replies import render_history
from mcp_rkllm.models.families import family_named
from mcp_rkllm.surfaces.mcp.server import PROGRESS_PREFIXES, build_server
from tests.cpu import require_cpu_runtime
from tests.fake_rkllm.build import build_fake
from tests.servers import free_port, start_http_server, stop

CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
THINK = "<think>plan-first</think>"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


class Board:
    def __init__(self, base: str):
        self.base = base
        self.oai = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        self.oll = ollama.Client(host=base, timeout=60)


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    library = build_fake("1.3.0", version="1.3.0")
    root = tmp_path_factory.mktemp("replies")
    (root / "Qwen3-0.6B-w8a8.rkllm").write_bytes(b"fake model")
    port = free_port()
    proc = start_http_server("http", library, root / "records", port, MCP_RKLLM_MODELS=str(root))
    try:
        yield Board(f"http://127.0.0.1:{port}")
    finally:
        stop(proc)




@pytest.mark.slow
def test_openai_reasoning_and_tool_calls(board: Board) -> None:
    ask: Any = [{"role": "user", "content": f"{THINK} It-is-sunny fake:eos=2"}]
    whole = board.oai.chat.completions.create(model="Qwen3-0.6B-w8a8", messages=ask)
    message = whole.choices[0].message
    assert message.content == "It-is-sunny" and getattr(message, "reasoning_content", None) == "plan-first"
    chunks = list(board.oai.chat.completions.create(model="Qwen3-0.6B-w8a8", messages=ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("plan-first", "It-is-sunny")
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])

    called = board.oai.chat.completions.create(
        model="Qwen3-0.6B-w8a8", tools=WEATHER,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": f"{CALL} fake:eos=1"}])
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    with board.oai.chat.completions.stream(model="Qwen3-0.6B-w8a8", tools=WEATHER,  # type: ignore[arg-type]
                                           messages=[{"role": "user", "content": f"{CALL} fake:eos=1"}]) as s:
        final = s.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert streamed and streamed[0].function.name == "get_weather" and streamed[0].id == streamed[0].id.strip()  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"
    # The round trip: the call and its result go back, the model answers.
    history: Any = [{"role": "user", "content": "weather?"}, choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "21-degrees fake:eos=1"}]
    answer = board.oai.chat.completions.create(model="Qwen3-0.6B-w8a8", tools=WEATHER,  # type: ignore[arg-type]
                                               messages=history)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls


@pytest.mark.slow
def test_ollama_thinking_and_tool_calls(board: Board) -> None:
    r = board.oll.chat(model="Qwen3-0.6B-w8a8", messages=[{"role": "user", "content": f"{THINK} Done fake:eos=2"}],
                       think=True)
    assert r.message.thinking == "plan-first" and r.message.content == "Done"
    chunks = list(board.oll.chat(model="Qwen3-0.6B-w8a8", stream=True, think=True,
                                 messages=[{"role": "user", "content": f"{THINK} Done fake:eos=2"}]))
    assert "".join(c.message.thinking or "" for c in chunks) == "plan-first"
    assert "".join(c.message.content or "" for c in chunks) == "Done" and chunks[-1].done
    t = board.oll.chat(model="Qwen3-0.6B-w8a8", tools=WEATHER,
                       messages=[{"role": "user", "content": f"{CALL} fake:eos=1"}])
    assert t.message.tool_calls and t.message.tool_calls[0].function.name == "get_weather"
    assert t.message.tool_calls[0].function.arguments == {"city": "Paris"}
    streamed = list(board.oll.chat(model="Qwen3-0.6B-w8a8", tools=WEATHER, stream=True,
                                   messages=[{"role": "user", "content": f"{CALL} fake:eos=1"}]))
    assert any(c.message.tool_calls for c in streamed[:-1]) and streamed[-1].done
    back = board.oll.chat(model="Qwen3-0.6B-w8a8", tools=WEATHER, messages=[
        {"role": "user", "content": "weather?"}, t.message,
        {"role": "tool", "tool_name": "get_weather", "content": "11-degrees fake:eos=1"}])
    assert back.message.content and not back.message.tool_calls
    shown = board.oll.show("Qwen3-0.6B-w8a8")
    assert {"tools", "thinking"} <= set(shown.capabilities or [])
    assert shown.details and shown.details.family == "qwen3"


@pytest.mark.slow
def test_jsonrpc_callbacks_carry_the_kind(board: Board) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "chat", "params": {
        "model": "Qwen3-0.6B-w8a8", "tools": WEATHER,
        "messages": [{"role": "user", "content": f"{THINK} {CALL} fake:eos=2"}]}}
    r = httpx.post(board.base + "/jsonrpc", json=request, headers={"Accept": "text/event-stream"}, timeout=60)
    messages = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    callbacks = [m["params"] for m in messages if m.get("method") == "rkllm.callback"]
    result = messages[-1]["result"]
    assert result["reasoning"] == "plan-first" and result["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "".join(c["text"] for c in callbacks if c.get("kind") == "reasoning") == "plan-first"
    assert [c["tool_call"]["function"]["name"] for c in callbacks if "tool_call" in c] == ["get_weather"]
    assert "".join(c["text"] for c in callbacks if "kind" not in c) == result["content"]
    assert result["raw_text"].startswith(THINK)


@pytest.mark.slow
@pytest.mark.anyio
async def test_mcp_chat_result_and_progress(board: Board) -> None:
    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    async with Client(board.base + "/mcp") as client:
        r = await client.call_tool("chat", {"model": "Qwen3-0.6B-w8a8", "tools": WEATHER, "messages": [
            {"role": "user", "content": f"{THINK} {CALL} fake:eos=2"}]}, progress_callback=on_progress)
    data: Any = r.structured_content
    assert not r.is_error, r.content
    assert data["reasoning"] == "plan-first" and data["family"] == "qwen3"
    assert data["tool_calls"][0]["function"]["name"] == "get_weather"
    assert data["message"]["tool_calls"] == data["tool_calls"] and data["message"]["reasoning_content"]
    assert [m for m in seen if m.startswith("reasoning: ")] == ["reasoning: plan-first"]
    assert any(m.startswith("tool_call: <tool_call>") for m in seen)
    content = "".join(m.removeprefix(PROGRESS_PREFIXES["content"]) for m in seen
                      if not m.startswith((PROGRESS_PREFIXES["reasoning"], PROGRESS_PREFIXES["tool_call"])))
    assert content == data["content"]


def test_history_renders_tool_calls_in_the_family_format() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    turns = render_history(family_named("qwen3"), [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}])
    assert turns[1] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
                                                        '</tool_call>'}
    assert turns[2] == {"role": "tool", "content": "ok"}


@pytest.mark.cpu
@pytest.mark.anyio
async def test_cpu_chat_with_tools_accounts_for_every_character(tmp_path: Path) -> None:
    require_cpu_runtime()
    settings = Settings(runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path))
    server = build_server(settings)
    async with Client(server) as client:
        r = await client.call_tool("chat", {"tools": WEATHER, "temperature": 0, "max_new_tokens": 40, "messages": [
            {"role": "user", "content": "What is the weather in Paris? Use the tool."}]})
        data: Any = r.structured_content
        assert not r.is_error, r.content
        assert data["family"] == "smollm2"
        # Whatever the model did, nothing is lost: the raw text holds the content and each call's text.
        assert data["content"] in data["raw_text"] or data["tool_calls"]
        for call in data["tool_calls"]:
            assert call["function"]["name"] in data["raw_text"]
            json.loads(call["function"]["arguments"])
        again = await client.call_tool("chat", {"temperature": 0, "max_new_tokens": 8, "messages": [
            {"role": "user", "content": "Say hello."}]})  # no tools now: they are taken back
        assert not again.is_error and again.structured_content["tool_calls"] == []  # type: ignore[index]


def _run_example(env: dict[str, str], cwd: Path, *args: str) -> str:
    import os
    import subprocess
    import sys

    from tests.servers import REPO

    proc = subprocess.run([sys.executable, str(REPO / "examples" / "agent_tools.py"), *args], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_agent_example_runs_the_tool_and_answers(tmp_path: Path) -> None:
    """With a model that calls the tool (the fake, echoing a scripted call), the loop runs the call, sends the
    result back and prints the answer."""
    library = build_fake("1.3.0", version="1.3.0")
    (tmp_path / "Qwen3-0.6B-w8a8.rkllm").write_bytes(b"fake model")
    out = _run_example({"RKLLM_LIB_PATH": str(library), "MCP_RKLLM_MODELS": str(tmp_path),
                        "MCP_RKLLM_CACHE_DIR": str(tmp_path)}, tmp_path, "Qwen3-0.6B-w8a8", f"{CALL} fake:eos=1")
    assert '[the model called get_weather({"city": "Paris"}) -> {"city": "Paris", "temperature_c": 21' in out
    assert "[qwen3 model answered after using the tool]" in out


@pytest.mark.cpu
@pytest.mark.slow
def test_agent_example_runs_on_the_bundled_model(tmp_path: Path) -> None:
    """A 135M model calls tools poorly; the example must still finish and say what the model did."""
    require_cpu_runtime()
    out = _run_example({"XDG_DATA_HOME": str(tmp_path)}, tmp_path)
    assert "[smollm2 model answered" in out or "[the model called" in out, out
