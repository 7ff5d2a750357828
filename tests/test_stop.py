"""Stop sequences: the reply ends at the first stop string (not included), the run is aborted there, and what
streamed is exactly what was returned, even when the stop string arrives split across tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.servers import progress_content

pytestmark = pytest.mark.anyio


@pytest.fixture
def abi() -> str:
    return "1.3.0"


async def test_generate_and_chat_stop_at_a_stop_string(fake_path: Path, fake: FakeView, tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    settings = Settings(library=str(fake_path), isolation="none", models=(str(tmp_path),), cache_dir=str(tmp_path))
    words = "alpha beta gamma delta fake:delay_ms=10"
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    async with Client(build_server(settings)) as client:
        for tool, args in (("generate", {"prompt": words}),
                           ("chat", {"messages": [{"role": "user", "content": words}]})):
            seen.clear()
            aborts = fake.count("abort_while_running")
            r = await client.call_tool(tool, {**args, "model": "m", "max_new_tokens": 40, "stop": ["ta gam", "zzz"]},
                                       progress_callback=on_progress)
            data: Any = r.structured_content
            assert not r.is_error, r.content
            # " beta" and " gamma" are separate tokens: the stop string "ta gam" spans them.
            assert data["content"] == "alpha be" and data["finish_reason"] == "stop", data
            assert progress_content(seen) == "alpha be"
            assert fake.count("abort_while_running") == aborts + 1  # the run was stopped, not left to finish
        plain = await client.call_tool("generate", {"prompt": "alpha beta", "model": "m", "max_new_tokens": 3,
                                                    "stop": ["nowhere"]})
        assert plain.structured_content["content"] == "alpha beta alpha"  # type: ignore[index]
        assert plain.structured_content["finish_reason"] == "length"  # type: ignore[index]
        bad = await client.call_tool("generate", {"prompt": "x", "model": "m", "stop": [""]})
        assert bad.is_error and bad.structured_content["error"]["code"] == "INVALID_PARAMS"  # type: ignore[index]
