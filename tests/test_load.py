"""Concurrency, cancellation storms and a soak: many clients, random cancels, thousands of calls."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_rkllm.config import Settings
from mcp_rkllm.runtime.base import process_memory_mb
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake
from tests.servers import free_port, progress_content, start_http_server, stop
from tests.test_server import call, init

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def abi() -> str:
    return "1.3.0"


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    (tmp_path / "m.rkllm").write_bytes(b"model")
    proc = start_http_server("http", build_fake("1.3.0", "1.3.0"), tmp_path / "records", port,
                             MCP_RKLLM_BUSY_TIMEOUT="60")
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(proc)


async def test_many_http_clients_share_one_model(http_server: str, tmp_path: Path) -> None:
    """8 clients over Streamable HTTP generate on one handle at once: each gets its own, whole text."""
    async with Client(http_server, mode="legacy") as first:  # loaded by name: shared by every session
        handle = (await call(first, "load_model", {"model": "m", "param": {"max_new_tokens": 12}}))["handle"]
    words = [f"client{i}" for i in range(8)]
    results: dict[str, dict[str, Any]] = {}
    streamed: dict[str, list[str]] = {w: [] for w in words}

    async def one(word: str) -> None:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            streamed[word].append(message or "")

        async with httpx2.AsyncClient(timeout=60) as http, \
                Client(streamable_http_client(http_server, http_client=http), mode="legacy") as client:
            results[word] = await call(client, "rkllm_run", {"handle": handle, "rkllm_input": {
                "prompt_input": f"{word} fake:delay_ms=3"}}, progress_callback=on_progress)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for w in words:
                tg.start_soon(one, w)
    for w in words:
        text = results[w]["text"]
        assert set(text.replace("\U0001F600", "").split()) == {w}, text  # nobody else's tokens
        assert progress_content(streamed[w]) == text and results[w]["token_count"] == 12


async def test_cancellation_storm(fake_path: Path, fake: FakeView, model_file: Path) -> None:
    """40 runs cancelled at random points: every cancel that hit a running run aborted it, nothing leaks."""
    server = build_server(Settings(library=str(fake_path), isolation="none", models=(str(model_file.parent),)))
    rng = random.Random(1234)
    baseline_threads = {t.ident for t in threading.enumerate()}
    async with Client(server) as client:
        handle = await init(client, model_file, max_new_tokens=200)
        after_progress = 0
        for _ in range(40):
            seen = anyio.Event()

            async def on_progress(progress: float, total: float | None, message: str | None,
                                  seen: anyio.Event = seen) -> None:
                seen.set()

            async def run() -> None:
                await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {
                    "prompt_input": "storm fake:delay_ms=5"}}, progress_callback=on_progress)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await anyio.sleep(rng.choice([0, 0.001, 0.005, 0.02, 0.05, 0.1]))
                after_progress += seen.is_set()
                tg.cancel_scope.cancel()
            with anyio.fail_after(5):  # the run stops before the next one
                while (await call(client, "rkllm_is_running", {"handle": handle}))["running"]:
                    await anyio.sleep(0.005)
        hits = fake.count("aborted_runs")
        assert fake.count("abort_while_running") == hits  # every abort that met a running run stopped it
        assert hits >= after_progress >= 5  # cancels after a token certainly hit a running run
        final = await call(client, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "calm"},
                                                  "rkllm_infer_params": {"max_new_tokens": 3}})
        assert final["text"] == "calm calm calm"  # the handle is still usable
    await anyio.sleep(0.2)
    leaked = [t for t in threading.enumerate() if t.ident not in baseline_threads and t.name.startswith("rkllm-")]
    assert leaked == []
    print(f"\nstorm: 40 cancels, {hits} hit a running run ({after_progress} after the first token)")


async def test_soak(fake_path: Path, model_file: Path) -> None:
    """3,000 tool calls and 200 load/unload cycles: memory, threads and descriptors stay flat."""
    server = build_server(Settings(library=str(fake_path), isolation="none", models=(str(model_file.parent),)))

    def threads() -> int:
        return sum(1 for t in threading.enumerate() if not t.name.startswith("AnyIO worker"))

    async with Client(server) as client:
        handle = await init(client, model_file, max_new_tokens=8)

        async def round_of_calls(n: int) -> None:
            for i in range(n):
                if i % 3 == 0:
                    await call(client, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "soak"}})
                elif i % 3 == 1:
                    await call(client, "rkllm_is_running", {"handle": handle})
                else:
                    await client.call_tool("rkllm_run", {"handle": "h-missing", "rkllm_input": {"prompt_input": 1}})

        async def cycles(n: int) -> None:
            for _ in range(n):
                h = await init(client, model_file)
                await call(client, "rkllm_destroy", {"handle": h})

        await round_of_calls(300)  # warm-up: caches, thread pools
        await cycles(20)
        before = (process_memory_mb("VmRSS"), threads(), len(os.listdir("/proc/self/fd")))
        await round_of_calls(3000)
        await cycles(200)
        after = (process_memory_mb("VmRSS"), threads(), len(os.listdir("/proc/self/fd")))
    print(f"\nsoak: RSS {before[0]} -> {after[0]} MB, threads {before[1]} -> {after[1]}, fds {before[2]} -> {after[2]}")
    assert after[0] - before[0] < 10, "memory grew"
    assert after[1] <= before[1] + 1, "threads leaked"
    assert after[2] <= before[2] + 2, "file descriptors leaked"
