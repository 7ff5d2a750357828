"""The chat race is gone: `chat` changes a handle's KV cache only while it holds the handle's run slot.

Client A runs on a handle with keep_history (a conversation held in the KV cache) and a slow
prompt; while it generates, client B calls `chat` on the same handle. B must wait for the slot and
then clear and run, or get BUSY and leave the cache alone. It must never clear the cache under A's
running generation (the in-process runtime would lose A's context mid-run) nor once A's run is done
but before B holds the slot (a worker process would wipe A's history although B never ran).

What the fake runtime did is read from its event log (one line per call, in order, from any
process): "run" when rkllm_run or rkllm_run_async starts, "clear_kv_cache" for rkllm_clear_kv_cache. It logs no end
of a run, so A's progress notifications, taken while several of A's tokens are still to come,
snapshot the log during A's generation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import CallToolResult

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.servers import events
from tests.test_server import call, init

pytestmark = pytest.mark.anyio

#: The calls of the fake that read or change the KV cache's content.
KV_KINDS = ("run", "clear_kv_cache", "load_prompt_cache", "release_prompt_cache")
#: A's slow prompt: 12 tokens in 8 pieces 100 ms apart, echoing "alpha beta". The fake counts
#: words as input tokens (the trigger too), so this run leaves 3 + 12 tokens in the KV cache.
A_PROMPT = "alpha beta fake:delay_ms=100"
A_TOKENS = 12
A_KV = 3 + A_TOKENS
#: A progress callback: (progress, total, message).
Progress = Callable[[float, float | None, str | None], Awaitable[None]]
B_MESSAGES = [{"role": "user", "content": "gamma delta"}]


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture(params=["none", pytest.param("process", marks=pytest.mark.slow)])
def isolation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def kv_events(fake: FakeView) -> list[str]:
    assert fake.record_dir is not None
    return [e for e in events(fake.record_dir) if e in KV_KINDS]


async def run_a(a: Client, a_call: str, handle: str, on_progress: Progress) -> dict[str, Any]:
    """A's run with keep_history, through `a_call`: its result (RunResult fields)."""
    params = {"handle": handle, "rkllm_input": {"prompt_input": A_PROMPT}, "rkllm_infer_params": {"keep_history": 1}}
    if a_call == "rkllm_run":
        return await call(a, "rkllm_run", params, progress_callback=on_progress)
    await call(a, "rkllm_run_async", params)  # the handle stays busy until the run ends
    report = await call(a, "rkllm_run_async_result", {"handle": handle, "wait_seconds": 15},
                        progress_callback=on_progress)
    assert report["done"], report
    return dict(report["result"])


async def race(a: Client, b: Client, a_call: str, fake: FakeView, handle: str,
               ) -> tuple[dict[str, Any], CallToolResult, list[list[str]]]:
    """A runs with keep_history; after A's first token, B chats on the same handle.

    Returns A's result, B's result, and the KV events logged so far at each of A's progress
    notifications sent while at least 3 of A's tokens were still to come.
    """
    first_token = anyio.Event()
    during_a: list[list[str]] = []
    out: dict[str, Any] = {}

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if total is not None and progress <= total - 3:
            during_a.append(kv_events(fake))
        first_token.set()

    async def a_side() -> None:
        out["a"] = await run_a(a, a_call, handle, on_progress)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a_side)
            await first_token.wait()
            out["b"] = await b.call_tool("chat", {"handle": handle, "messages": B_MESSAGES})
    return out["a"], out["b"], during_a


def check_a(result: dict[str, Any], during_a: list[list[str]]) -> None:
    assert result["token_count"] == A_TOKENS and result["text"].startswith("alpha beta"), result
    assert during_a, "A's run sent no progress while it was generating"


# A worker process runs its calls one at a time, so a clear sent during A's rkllm_run waits there until
# the run is over; rkllm_run_async frees the worker at once, and a clear sent then lands mid-run.
@pytest.mark.parametrize("a_call", ["rkllm_run", "rkllm_run_async"])
async def test_chat_waits_for_the_run_holding_the_handle(fake_path: Path, fake: FakeView, model_file: Path,
                                                         isolation: str, a_call: str, tmp_path: Path) -> None:
    server = build_server(Settings(library=str(fake_path), isolation=isolation, models=(str(tmp_path),),
                                   cache_dir=str(tmp_path)))
    async with Client(server) as a, Client(server) as b:  # two sessions of one server
        h = await init(a, model_file, max_new_tokens=A_TOKENS)
        result, chat, during_a = await race(a, b, a_call, fake, h)
        logged = kv_events(fake)
        # B's conversation must start from an empty cache: compare with the same chat on its own
        # (a clear under A's run leaves A's tokens in the cache as well).
        raced = (await call(b, "rkllm_get_kv_cache_size", {"handle": h}))["cache_sizes"]
        await call(b, "chat", {"handle": h, "messages": B_MESSAGES})
        alone = (await call(b, "rkllm_get_kv_cache_size", {"handle": h}))["cache_sizes"]

    check_a(result, during_a)
    touched = [seen for seen in during_a if "clear_kv_cache" in seen]
    assert not touched, f"B's chat cleared the KV cache while A was generating (KV events then: {touched[0]})"
    assert not chat.is_error, chat.structured_content
    assert chat.structured_content is not None and chat.structured_content["reused_history"] is False
    assert logged == ["run", "clear_kv_cache", "run"]  # A's run, then B's clear and run
    assert raced == alone, f"after the raced chat the KV cache held {raced}, after the same chat alone {alone}"


@pytest.mark.parametrize("a_call", ["rkllm_run", "rkllm_run_async"])
async def test_a_chat_refused_as_busy_leaves_the_conversation_alone(fake_path: Path, fake: FakeView,
                                                                    model_file: Path, isolation: str, a_call: str,
                                                                    tmp_path: Path) -> None:
    # B waits at most 0.2 s for the slot; A's run takes about 0.8 s.
    server = build_server(Settings(library=str(fake_path), isolation=isolation, models=(str(tmp_path),),
                                   cache_dir=str(tmp_path), busy_timeout=0.2))
    async with Client(server) as a, Client(server) as b:
        h = await init(a, model_file, max_new_tokens=A_TOKENS)
        result, chat, during_a = await race(a, b, a_call, fake, h)
        await anyio.sleep(0.2)  # anything B set going in the runtime has landed by now
        logged = kv_events(fake)
        kv = (await call(a, "rkllm_get_kv_cache_size", {"handle": h}))["cache_sizes"]

    check_a(result, during_a)
    assert "clear_kv_cache" not in logged, (
        f"B's chat cleared the KV cache without holding the handle (KV events: {logged}; during A's run: "
        f"{during_a[-1]}; B got {chat.structured_content})")
    assert chat.is_error and chat.structured_content is not None, chat.structured_content
    assert chat.structured_content["error"]["code"] == "BUSY"
    assert logged == ["run"]
    assert kv == [A_KV], f"A's conversation was changed: the KV cache holds {kv}, A's run left {A_KV}"
