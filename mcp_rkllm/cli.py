"""Command line: `mcp-rkllm [serve]` with flags that override MCP_RKLLM_* / RKLLM_* environment variables."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

import anyio

from mcp_rkllm import __version__
from mcp_rkllm.config import ENV_VARS, Settings


def parser() -> argparse.ArgumentParser:
    """The argument parser (every flag also has an environment variable)."""
    p = argparse.ArgumentParser(
        prog="mcp-rkllm",
        description="MCP server for Rockchip RKLLM NPU language models.",
        epilog="Environment: " + ", ".join(f"{v} (--{k.replace('_', '-')})" for k, v in ENV_VARS.items()),
    )
    p.add_argument("--version", action="version", version=f"mcp-rkllm {__version__}")
    p.add_argument("command", nargs="?", default="serve", choices=["serve"], help="what to do (default: serve)")
    p.add_argument("--transport", choices=["stdio", "http", "sse"],
                   help="default stdio; http = Streamable HTTP at /mcp; sse = legacy HTTP+SSE at /sse")
    p.add_argument("--host", help="HTTP/SSE bind address (default 127.0.0.1; loopback only)")
    p.add_argument("--port", type=int, help="HTTP/SSE port (default 8000)")
    p.add_argument("--library", help="path of librkllmrt.so or its directory (default: search /usr/lib, "
                                     "/usr/local/lib, ./lib, the linker path)")
    p.add_argument("--abi", choices=["1.2.0", "1.2.1", "1.3.0"],
                   help="RKLLM ABI generation (default: detect; 1.2.1 covers 1.2.1-1.2.3)")
    p.add_argument("--runtime", choices=["auto", "native"], help="default auto")
    p.add_argument("--busy-timeout", type=float, help="seconds a run waits for a busy handle (default 10)")
    p.add_argument("--abort-timeout", type=float, help="seconds to wait for a run to stop after abort (default 30)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mcp-rkllm` console script and `python -m mcp_rkllm`."""
    args = parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.load(flags)
    except ValueError as exc:
        print(f"mcp-rkllm: {exc}", file=sys.stderr)
        return 2
    from mcp_rkllm.server import configure_logging, serve

    configure_logging(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve, settings)
    return 0
