"""Friendly tools through mcp.Client: on the CPU runtime with the bundled model, and on the fake NPU runtime."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.cpu import require_cpu_runtime
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, progress_content
from tests.test_server import call, fail

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cpu(tmp_path: Path) -> AsyncIterator[Client]:
    require_cpu_runtime()
    async with Client(build_server(Settings(runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path)))) as c:
        yield c


@pytest.mark.cpu
async def test_generate_loads_the_bundled_model_and_streams(cpu: Client) -> None:
    status = await call(cpu, "server_status", {})
    assert status["runtime"]["runtime"] == "cpu" and status["loaded"] == 0
    listed = await call(cpu, "list_models", {})
    bundled = [m for m in listed["models"] if m["bundled"]]
    assert bundled and bundled[0]["loadable"] and bundled[0]["kind"] == "gguf"
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    r = await call(cpu, "generate", {"prompt": "What is the capital of France?", "temperature": 0,
                                     "max_new_tokens": 16}, progress_callback=on_progress)
    assert r["text"] and progress_content([m for _, _, m in seen]) == r["text"]
    assert r["model"] == "SmolLM2-135M-Instruct.Q4_1" and r["perf"]["generate_tokens"] == r["token_count"]
    assert all(total == 16 for _, total, m in seen if not (m or "").startswith("status: "))
    again = await call(cpu, "generate", {"prompt": "What is the capital of France?", "temperature": 0,
                                         "max_new_tokens": 16})
    assert again["text"] == r["text"] and again["handle"] == r["handle"]  # same default handle, deterministic
    loaded = await call(cpu, "loaded_models", {})
    assert [e["handle"] for e in loaded["loaded"]] == [r["handle"]] and loaded["loaded"][0]["default"]


@pytest.mark.cpu
async def test_chat_multi_turn_reuses_the_kv_cache(cpu: Client) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse."},
                                      {"role": "user", "content": "My name is Ada."}]
    first = await call(cpu, "chat", {"messages": messages, "temperature": 0, "max_new_tokens": 12})
    assert first["message"]["role"] == "assistant" and first["reused_history"] is False
    messages += [first["message"], {"role": "user", "content": "What is my name?"}]
    second = await call(cpu, "chat", {"messages": messages, "temperature": 0, "max_new_tokens": 12})
    assert second["reused_history"] is True
    assert second["perf"]["prefill_tokens"] < first["perf"]["prefill_tokens"] + 20
    # the same conversation sent fresh (e.g. another client) is rendered whole and answers the same
    other = await call(cpu, "load_model", {"model": "SmolLM2"})
    fresh = await call(cpu, "chat", {"messages": messages, "temperature": 0, "max_new_tokens": 12,
                                     "handle": other["handle"]})
    assert fresh["reused_history"] is False and fresh["text"] == second["text"]


@pytest.mark.cpu
async def test_embed(cpu: Client) -> None:
    a = await call(cpu, "embed", {"text": "The cat sat on the mat."})
    b = await call(cpu, "embed", {"text": "The cat sat on the mat."})
    c = await call(cpu, "embed", {"text": "Quarterly revenue grew by four percent.", "pooling": "last"})
    assert a["dim"] == 576 and len(a["embedding"]) == 576 and a["tokens"] >= 6
    assert math.isclose(math.sqrt(sum(v * v for v in a["embedding"])), 1.0, rel_tol=1e-4)
    assert a["embedding"] == b["embedding"] and a["embedding"] != c["embedding"]


@pytest.mark.cpu
async def test_load_unload_and_errors(cpu: Client, tmp_path: Path) -> None:
    loaded = await call(cpu, "load_model", {"model": "smollm2", "param": {"max_context_len": 512}})
    assert loaded["default"] is True and loaded["runtime"] == "cpu"
    assert (await fail(cpu, "load_model", {"model": "nope"}))["code"] == "MODEL_NOT_FOUND"
    assert (await fail(cpu, "load_model", {"model": "smol", "param": {"model_path": "/etc/passwd"}}))["code"] == \
        "INVALID_PARAMS"
    (tmp_path / "npu.rkllm").write_bytes(b"x")
    assert (await fail(cpu, "load_model", {"model": "npu"}))["code"] == "NOT_SUPPORTED"
    assert (await fail(cpu, "chat", {"messages": [{"role": "assistant", "content": "hi"}]}))["code"] == \
        "INVALID_PARAMS"
    assert (await fail(cpu, "unload_model", {}))["code"] == "INVALID_PARAMS"
    gone = await call(cpu, "unload_model", {"handle": loaded["handle"]})
    assert gone["unloaded"] == [loaded["handle"]]
    assert (await call(cpu, "loaded_models", {}))["loaded"] == []
    assert (await fail(cpu, "generate", {"prompt": "x", "handle": loaded["handle"]}))["code"] == "UNKNOWN_HANDLE"


@pytest.fixture
async def npu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Client, FakeView]]:
    (tmp_path / "qwen-fake.rkllm").write_bytes(b"model")
    (tmp_path / "qwen-fake.json").write_text('{"max_new_tokens": 7, "chat_template": {"system_prompt": "S", '
                                             '"prompt_prefix": "P", "prompt_postfix": "Q"}}')
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("FAKE_RKLLM_RECORD_DIR", str(records))
    settings = Settings(library=str(build_fake("1.3.0", "1.3.0")), models=(str(tmp_path),), model="qwen-fake")
    async with Client(build_server(settings)) as c:
        yield c, FakeView(build_fake("1.3.0", "1.3.0"), records)


async def test_friendly_tools_on_the_npu_runtime(npu: tuple[Client, FakeView]) -> None:
    client, fake = npu
    r = await call(client, "generate", {"prompt": "hello npu"})
    assert r["text"].startswith("hello npu hello") and r["token_count"] == 7  # the sidecar's max_new_tokens
    assert fake.last("set_chat_template") == {"system_prompt": "S", "prompt_prefix": "P", "prompt_postfix": "Q"}
    r = await call(client, "generate", {"prompt": "again", "max_new_tokens": 2, "temperature": 0.5})
    assert r["token_count"] == 2 and fake.last("run")["infer_params"]["sampling_params"]["temperature"] == 0.5
    first = await call(client, "chat", {"messages": [{"role": "user", "content": "one"}]})
    assert first["reused_history"] is False
    second = await call(client, "chat", {"messages": [{"role": "user", "content": "one"}, first["message"],
                                                      {"role": "user", "content": "two"}]})
    assert second["reused_history"] is True and fake.last("run")["input"]["prompt_input"] == "two"
    assert fake.last("run")["infer_params"]["keep_history"] == 1
    status = await call(client, "server_status", {})
    assert status["runtime"]["abi"] == "1.3.0" and status["default_model"] == "qwen-fake"
    vector = await call(client, "embed", {"text": "a b c"})  # the fake's hidden rows are 8 wide
    assert (vector["dim"], vector["tokens"]) == (8, 3)
    listed = await call(client, "list_models", {})
    assert [m["file"] for m in listed["models"] if m["loadable"]] == ["qwen-fake.rkllm"]


async def test_per_run_sampling_needs_1_3_0_on_the_npu(tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"model")
    settings = Settings(library=str(build_fake("1.2.1", "1.2.1")), models=(str(tmp_path),))
    async with Client(build_server(settings)) as c:
        ok = await call(c, "generate", {"prompt": "old runtime"})
        assert ok["text"].startswith("old runtime")
        error = await fail(c, "generate", {"prompt": "x", "temperature": 0.1})
        assert error["code"] == "ABI_FIELD_UNSUPPORTED" and "sampling_params" in error["message"]


@pytest.mark.cpu
@pytest.mark.slow
def test_try_prints_a_streamed_answer(tmp_path: Path) -> None:
    require_cpu_runtime()
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_DATA_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "mcp_rkllm", "try", "What is the capital of France?",
                           "--max-new-tokens", "12", "--runtime", "cpu"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    answer, _, perf = proc.stdout.rpartition("\n\n[")
    assert answer.strip() and "tokens/s" in perf and "SmolLM2-135M-Instruct.Q4_1 on cpu" in perf
    assert "Traceback" not in proc.stderr




@pytest.mark.cpu
@pytest.mark.slow
def test_example_agent_streams_a_chat(tmp_path: Path) -> None:
    """The README's Python agent example runs as written."""
    require_cpu_runtime()
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_DATA_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "agent.py")], capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tokens, history reused") == 2
    assert "history reused: True" in proc.stdout  # the second turn continued in the KV cache
