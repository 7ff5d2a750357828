"""Command line: `mcp-rkllm [serve]` runs the server; `mcp-rkllm try "PROMPT"` shows it working.

Every server flag also comes from an environment variable (MCP_RKLLM_*, RKLLM_LIB_PATH, RKLLM_ABI);
flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio

from mcp_rkllm import __version__
from mcp_rkllm.config import ENV_VARS, Settings

SERVER_FLAGS = ("library", "abi", "runtime", "isolation", "models", "model", "busy_timeout", "abort_timeout",
                "log_level")


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", help="path of librkllmrt.so or its directory (default: search /usr/lib, "
                                     "/usr/local/lib, ./lib, the linker path)")
    p.add_argument("--abi", choices=["1.2.0", "1.2.1", "1.3.0"],
                   help="RKLLM ABI generation (default: detect; 1.2.1 covers 1.2.1-1.2.3)")
    p.add_argument("--runtime", choices=["auto", "native", "cpu"],
                   help="auto (default): the NPU runtime if librkllmrt.so is found, else the CPU runtime")
    p.add_argument("--isolation", choices=["auto", "process", "none"],
                   help="process: each model in its own supervised worker process (auto: for the NPU runtime)")
    p.add_argument("--models", action="append", metavar="DIR",
                   help="a directory of .rkllm/.gguf models (repeatable; default ~/.local/share/mcp-rkllm/models)")
    p.add_argument("--model", help="default model name for generate/chat (default: the bundled one on CPU)")
    p.add_argument("--busy-timeout", type=float, help="seconds a run waits for a busy handle (default 10)")
    p.add_argument("--abort-timeout", type=float, help="seconds to wait for a run to stop after abort (default 30)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")


def parser() -> argparse.ArgumentParser:
    """The `serve` argument parser (every flag also has an environment variable)."""
    p = argparse.ArgumentParser(
        prog="mcp-rkllm",
        description="MCP server for Rockchip RKLLM NPU language models (and GGUF models on the CPU). "
                    "`mcp-rkllm try PROMPT` runs one generation through a real stdio session.",
        epilog="Environment: " + ", ".join(f"{v} (--{k.replace('_', '-')})" for k, v in ENV_VARS.items()),
    )
    p.add_argument("--version", action="version", version=f"mcp-rkllm {__version__}")
    p.add_argument("command", nargs="?", default="serve", choices=["serve"],
                   help="serve (default); also `mcp-rkllm try PROMPT` and `mcp-rkllm doctor`")
    p.add_argument("--transport", choices=["stdio", "http", "sse"],
                   help="default stdio; http = Streamable HTTP at /mcp; sse = legacy HTTP+SSE at /sse")
    p.add_argument("--host", help="HTTP/SSE bind address (default 127.0.0.1; loopback only)")
    p.add_argument("--port", type=int, help="HTTP/SSE port (default 8000)")
    p.add_argument("--auth-token", help="bearer token HTTP clients must send; required off loopback "
                                        "(prefer the MCP_RKLLM_AUTH_TOKEN environment variable: flags show in ps)")
    p.add_argument("--allowed-hosts", action="append", metavar="HOST",
                   help="Host header accepted off loopback (repeatable; default any, the token guards)")
    p.add_argument("--cache-dir", help="where prompt caches are written (default ~/.cache/mcp-rkllm)")
    _server_flags(p)
    return p


def try_parser() -> argparse.ArgumentParser:
    """The `try` argument parser."""
    p = argparse.ArgumentParser(
        prog="mcp-rkllm try",
        description="Start the server as a stdio subprocess, call `generate` through an MCP client, and print "
                    "the tokens as they stream in, then the perf line.")
    p.add_argument("prompt", help="what to ask the model")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, the same answer every time")
    p.add_argument("--verbose", action="store_true", help="show the server's log")
    _server_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mcp-rkllm` console script and `python -m mcp_rkllm`."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["try"]:
        return try_main(args_list[1:])
    if args_list[:1] == ["doctor"]:
        return doctor_main(args_list[1:])
    args = parser().parse_args(args_list)
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


def doctor_main(argv: Sequence[str]) -> int:
    """`mcp-rkllm doctor [--json]`: what this machine offers the server, and what to do about it."""
    from mcp_rkllm import doctor

    p = argparse.ArgumentParser(prog="mcp-rkllm doctor", description=doctor.__doc__.splitlines()[0]
                                if doctor.__doc__ else None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake /proc and /sys, for tests
    _server_flags(p)
    args = p.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("json", "root")}
    try:
        settings = Settings.load(flags)
    except ValueError as exc:
        print(f"mcp-rkllm: {exc}", file=sys.stderr)
        return 2
    checks = doctor.run(settings, args.root)
    print(doctor.to_json(checks) if args.json else doctor.render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def try_main(argv: Sequence[str]) -> int:
    """`mcp-rkllm try PROMPT`: one streamed generation through a real MCP stdio session."""
    args = try_parser().parse_args(argv)
    server_args = ["-m", "mcp_rkllm", "serve", "--log-level", "DEBUG" if args.verbose else "WARNING"]
    for name in SERVER_FLAGS:
        value = getattr(args, name)
        if name == "log_level" or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            server_args += [f"--{name.replace('_', '-')}", str(v)]
    try:
        return anyio.run(_try, args, server_args)
    except KeyboardInterrupt:
        return 130


async def _try(args: argparse.Namespace, server_args: list[str]) -> int:
    from mcp import Client, StdioServerParameters

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
        result = await client.call_tool("generate", {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
                                                     "temperature": args.temperature},
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
