"""What a new user or agent meets first (issue 16): progress while a model loads or a prompt is read, a lean
and self-explaining tool list, logs (one line per call; MCP logging), resource templates, model names where
paths were asked for."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from mcp_rkllm.surfaces.mcp.server import PROGRESS_PREFIXES, exported, tool_of
from mcp_rkllm.surfaces.registry import build_registry
from tests.conftest import FakeView
from tests.cpu import require_cpu_runtime

pytestmark = pytest.mark.anyio

STATUS = PROGRESS_PREFIXES["status"]


@pytest.fixture
def abi() -> str:
    return "1.3.0"


def settings(fake_path: Path, root: Path, **kw: Any) -> Settings:
    return Settings(library=str(fake_path), isolation="none", models=(str(root),), cache_dir=str(root), **kw)


async def test_heartbeats_while_a_model_loads_and_a_prompt_is_read(fake_path: Path, fake: FakeView,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "big fake:load_ms=2600.rkllm").write_bytes(b"fake")
    seen: list[tuple[float, str]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((anyio.current_time(), message or ""))

    async with Client(build_server(settings(fake_path, tmp_path))) as client:
        loaded = await client.call_tool("load_model", {"model": "big"}, progress_callback=on_progress)
        assert not loaded.is_error, loaded.content
        beats = [(t, m) for t, m in seen if m.startswith(STATUS + "loading big")]
        assert len(beats) >= 2, seen  # 2.6 s of loading: a beat every second
        assert all(b[0] - a[0] < 1.6 for a, b in itertools.pairwise(beats))
        seen.clear()
        # The fake waits 1.5 s before its first token: the prompt is "being read" meanwhile.
        run = await client.call_tool("generate", {"prompt": "slow start fake:delay_ms=1500", "max_new_tokens": 2},
                                     progress_callback=on_progress)
        data: Any = run.structured_content
        assert [m for _, m in seen if m.startswith(STATUS)][:1] == [STATUS + "reading the prompt… 1 s"]
        content = "".join(m for _, m in seen if not m.startswith(STATUS))
        assert content == data["content"]  # heartbeats are not content


async def test_tool_groups_and_sizes(fake_path: Path, fake: FakeView, tmp_path: Path) -> None:
    registry = build_registry()
    everything = [tool_of(s).model_dump(mode="json", by_alias=True, exclude_none=True)
                  for s in exported(registry, ["all"])]
    friendly = [tool_of(s).model_dump(mode="json", by_alias=True, exclude_none=True)
                for s in exported(registry, ["friendly"])]
    def wire(value: Any) -> int:  # the bytes a JSON-RPC response spends on it (compact JSON, as sent)
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())

    size_all, size_friendly = wire({"tools": everything}), wire({"tools": friendly})
    print(f"\ntools/list: all {size_all:,} bytes ({len(everything)} tools), friendly {size_friendly:,} bytes")
    assert size_all < 40_000 and size_friendly < 12_000
    # Every parameter an agent sees says what it does.
    for tool in everything:
        for name, prop in tool["inputSchema"].get("properties", {}).items():
            assert "description" in prop or "$ref" in prop or name in ("handle",) or "anyOf" in prop, \
                (tool["name"], name)
    async with Client(build_server(settings(fake_path, tmp_path, tools=("friendly",)))) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "chat" in names and not any(n.startswith("rkllm_") for n in names)
        with pytest.raises(Exception, match="Unknown tool"):
            await client.call_tool("rkllm_createDefaultParam", {})


async def test_instructions_lead_with_the_friendly_tools(fake_path: Path, tmp_path: Path) -> None:
    cpu = build_server(Settings(runtime="cpu", models=(str(tmp_path),)))
    npu = build_server(settings(fake_path, tmp_path))
    for server, where in ((cpu, "the CPU"), (npu, "NPU")):
        text = server.instructions or ""
        assert where in text and text.index("generate") < text.index("rkllm_init")


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # logging/setLevel: handshake era
async def test_logs_one_line_per_call_and_mcp_log_notifications(fake_path: Path, fake: FakeView, tmp_path: Path,
                                                                model_file: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    received: list[Any] = []

    async def on_log(params: Any) -> None:
        received.append(params)

    caplog.set_level(logging.INFO, logger="mcp_rkllm")
    async with Client(build_server(settings(fake_path, tmp_path)), mode="legacy", logging_callback=on_log) as client:
        await client.set_logging_level("info")
        made = await client.call_tool("rkllm_init", {"param": {"model_path": "demo"}})  # a model name
        assert not made.is_error, made.content
        handle = made.structured_content["handle"]  # type: ignore[index]
        bad = await client.call_tool("rkllm_init", {"param": {"model_path": "/etc/passwd.rkllm"}})
        assert bad.is_error
        with anyio.fail_after(5):
            while not any("PATH_NOT_ALLOWED" in str(r.data) for r in received):
                await anyio.sleep(0.02)
        templates = await client.list_resource_templates()
        assert {t.uri_template for t in templates.resource_templates} == {"rkllm://models/{name}",
                                                                         "rkllm://schemas/{tool}"}
        model = json.loads((await client.read_resource("rkllm://models/demo")).contents[0].text)  # type: ignore[union-attr]
        assert model["name"] == "demo" and handle in model["handles"]
        schema = json.loads((await client.read_resource("rkllm://schemas/chat")).contents[0].text)  # type: ignore[union-attr]
        assert "messages" in schema["arguments"]["properties"] and schema["result"]["type"] == "object"
    lines = [r.getMessage() for r in caplog.records if r.name == "mcp_rkllm.surfaces.registry"]
    assert any(line.startswith(f"rkllm_init handle={handle}: ok in ") for line in lines), lines
    assert any(line.startswith("rkllm_init: PATH_NOT_ALLOWED after ") for line in lines), lines
    assert any("rkllm_init" in str(r.data) and r.level == "info" for r in received)


@pytest.mark.cpu
@pytest.mark.slow
async def test_heartbeat_during_a_long_cpu_prefill(tmp_path: Path) -> None:
    require_cpu_runtime()
    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    prompt = "Summarise this. " + " ".join(f"Item {i} is a small red box." for i in range(150))
    async with Client(build_server(Settings(runtime="cpu", models=(str(tmp_path),)))) as client:
        await client.call_tool("load_model", {"model": "SmolLM2"})
        r = await client.call_tool("generate", {"prompt": prompt, "max_new_tokens": 2, "temperature": 0},
                                   progress_callback=on_progress)
        assert not r.is_error, r.content
    assert any(m.startswith(STATUS + "reading the prompt") for m in seen), seen
