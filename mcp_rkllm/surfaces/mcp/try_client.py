"""`mcp-rkllm try`: one streamed generation through a real MCP stdio session, as a client sees it.

The server is started as a stdio subprocess with the arguments the cli built; the tokens print as
they stream in, then one line with the run's figures.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError


def try_generate(prompt: str, max_new_tokens: int, temperature: float, server_args: list[str], verbose: bool) -> int:
    """Run `generate` on a server started with `python <server_args>`; the process exit status."""
    failure: BaseException | None = None
    try:
        return anyio.run(_try, prompt, max_new_tokens, temperature, server_args)
    except* MCPError as group:  # the server exited or stopped answering (its stderr is above)
        failure = group
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    print(f"\nmcp-rkllm try: the server failed: {failure}" + ("" if verbose else " (--verbose shows its log)"),
          file=sys.stderr)
    return 1


async def _try(prompt: str, max_new_tokens: int, temperature: float, server_args: list[str]) -> int:
    params = StdioServerParameters(command=sys.executable, args=server_args, env=dict(os.environ))
    out = sys.stdout
    started = time.perf_counter()
    first: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if message:
            if not first:
                first.append(time.perf_counter() - started)
            out.write(message)
            out.flush()

    async with Client(params) as client:
        status = await client.call_tool("server_status", {})
        runtime: dict[str, Any] = (status.structured_content or {}).get("runtime") or {}
        result = await client.call_tool("generate", {"prompt": prompt, "max_new_tokens": max_new_tokens,
                                                     "temperature": temperature},
                                        progress_callback=on_progress)
    data = result.structured_content or {}
    if result.is_error:
        error = data.get("error", {})
        print(f"\nmcp-rkllm try: {error.get('code')}: {error.get('message')}\nHint: {error.get('hint')}",
              file=sys.stderr)
        return 1
    if not first:  # no progress arrived (cannot happen with this client, but never lose the answer)
        out.write(data.get("text", ""))
    perf = data.get("perf") or {}
    gen_ms = perf.get("generate_time_ms") or 0.0
    tps = perf.get("generate_tokens", 0) / (gen_ms / 1000) if gen_ms else 0.0
    print(f"\n\n[{data.get('model')} on {runtime.get('runtime', '?')}: {data.get('token_count')} tokens, "
          f"finish {data.get('finish_reason')}, prefill {perf.get('prefill_tokens', 0)} tokens in "
          f"{perf.get('prefill_time_ms', 0):.0f} ms, generate {tps:.1f} tokens/s, first token after "
          f"{(first[0] if first else 0) * 1000:.0f} ms (incl. server start and model load), "
          f"peak RSS {perf.get('memory_usage_mb', 0):.0f} MB]")
    return 0
