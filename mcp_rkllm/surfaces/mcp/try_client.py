"""`mcp-rkllm try`: one streamed generation through a real MCP stdio session, as a client sees it.

The server is started as a stdio subprocess with the arguments the cli built; the tokens print as
they stream in, then one line with the run's figures. When the server dies, `try` says how it ended (its
exit code or signal, its last lines on stderr), with the README's advice when the signal is SIGILL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import Client
from mcp.os.posix.utilities import terminate_posix_process_tree
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp.types import jsonrpc_message_adapter

#: What a SIGILL means here, and the fix (the README's, under Install): llama-cpp-python built with
#: -march=native elsewhere (pip's wheel cache keeps such a build) dies on the first instruction this CPU lacks.
SIGILL_HINT = ("llama-cpp-python was built for a CPU with instructions this one lacks; reinstall it without "
               'pip\'s cache: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir --force-reinstall --no-deps '
               "llama-cpp-python==0.3.36")

#: Lines of the server's stderr shown when it dies.
STDERR_TAIL = 10

#: After its stdin closes, how long the server has to exit before it is terminated (then killed): the SDK's.
EXIT_GRACE = 2.0


@dataclass
class ServerEnd:
    """How the server process ended, filled in as it does: exit status, last stderr lines, the runtime."""

    returncode: int | None = None
    stopped: bool = False  # it did not exit when its stdin closed: `try` terminated it
    stderr: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))
    runtime: str | None = None  # from server_status, once known

    def how(self) -> str:
        """"exited with code 1", "was killed by SIGILL", ..."""
        code = self.returncode
        if code is None:
            return "did not exit"
        if code >= 0:
            return f"exited with code {code}"
        return f"was killed by {signal_name(-code)}" + (" (after its stdin closed)" if self.stopped else "")

    def sigill_hint(self) -> str | None:
        return SIGILL_HINT if self.returncode == -signal.SIGILL and self.runtime != "native" else None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def try_generate(prompt: str, max_new_tokens: int, temperature: float, server_args: list[str], verbose: bool) -> int:
    """Run `generate` on a server started with `python <server_args>`; the process exit status."""
    end = ServerEnd()
    failure: BaseException | None = None
    try:
        return anyio.run(_try, prompt, max_new_tokens, temperature, end, server_args)
    except* MCPError as group:  # the server exited or stopped answering
        failure = group
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    lines = [f"\nmcp-rkllm try: the server failed: {failure}; the server {end.how()}"
             + ("" if verbose else " (--verbose shows its log)")]
    if end.stderr:
        lines += ["its last lines on stderr:", *(f"  {line}" for line in end.stderr)]
    else:
        lines.append("it wrote nothing on stderr")
    if hint := end.sigill_hint():
        lines.append(f"Hint: {hint}")
    print("\n".join(lines), file=sys.stderr)
    return 1


@contextlib.asynccontextmanager
async def server_process(command: list[str], end: ServerEnd) -> AsyncIterator[
        tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]]:
    """An MCP stdio transport to `command`, which `try` owns (the SDK's stdio_client does not tell how its
    server ended): newline-delimited JSON-RPC on the server's stdin/stdout, its stderr relayed to ours (and
    the last lines kept), and at the end stdin closed, EXIT_GRACE to exit, then its process group terminated;
    `end` gets the exit status."""
    process = await anyio.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=dict(os.environ), start_new_session=True)
    incoming_writer, incoming = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    outgoing, outgoing_reader = anyio.create_memory_object_stream[SessionMessage](0)
    stderr_done = anyio.Event()

    async def read_stdout() -> None:
        assert process.stdout is not None
        delivering = True
        buffer = b""
        async with incoming_writer:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                async for chunk in process.stdout:  # read to the end, so the server never blocks writing
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        if delivering and line.strip():
                            try:
                                await incoming_writer.send(_parse(line))
                            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                                delivering = False  # the session is gone

    async def write_stdin() -> None:
        assert process.stdin is not None
        async with outgoing_reader:
            try:
                async for message in outgoing_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await process.stdin.send(data.encode())
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                await incoming_writer.aclose()  # the server is gone: the session sees the connection end

    async def relay_stderr() -> None:
        assert process.stderr is not None
        buffer = b""
        try:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                async for chunk in process.stderr:
                    sys.stderr.write(chunk.decode(errors="replace"))
                    sys.stderr.flush()
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    end.stderr.extend(line.decode(errors="replace").rstrip() for line in lines)
            if buffer:
                end.stderr.append(buffer.decode(errors="replace").rstrip())
        finally:
            stderr_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_stdout)
        tg.start_soon(write_stdin)
        tg.start_soon(relay_stderr)
        try:
            yield incoming, outgoing
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(process, end)
                with anyio.move_on_after(1.0):  # what it wrote last (a child holding the pipe: not for ever)
                    await stderr_done.wait()
            tg.cancel_scope.cancel()


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        return exc


async def _stop(process: Process, end: ServerEnd) -> None:
    """Close the server's stdin; if it does not exit within EXIT_GRACE, terminate (then kill) its group."""
    assert process.stdin is not None
    with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        await process.stdin.aclose()
    if not await _exited(process, EXIT_GRACE):
        end.stopped = True
        await terminate_posix_process_tree(process, EXIT_GRACE)
        await _exited(process, EXIT_GRACE)
    end.returncode = process.returncode


async def _exited(process: Process, timeout: float) -> bool:
    """Whether the process exited within `timeout` (polled: process.wait() also waits for its pipes to close,
    which a child holding them would delay)."""
    with anyio.move_on_after(timeout):
        while process.returncode is None:
            await anyio.sleep(0.01)
    return process.returncode is not None


async def _try(prompt: str, max_new_tokens: int, temperature: float, end: ServerEnd, server_args: list[str]) -> int:
    out = sys.stdout
    started = time.perf_counter()
    first: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if message:
            if not first:
                first.append(time.perf_counter() - started)
            out.write(message)
            out.flush()

    async with Client(server_process([sys.executable, *server_args], end)) as client:
        status = await client.call_tool("server_status", {})
        runtime: dict[str, Any] = (status.structured_content or {}).get("runtime") or {}
        end.runtime = runtime.get("runtime")
        result = await client.call_tool("generate", {"prompt": prompt, "max_new_tokens": max_new_tokens,
                                                     "temperature": temperature},
                                        progress_callback=on_progress)
    data = result.structured_content or {}
    if result.is_error:
        error = data.get("error", {})
        hint = error.get("hint")
        if error.get("code") == "RUNTIME_CRASHED" and (error.get("details") or {}).get("exit_code") == -signal.SIGILL:
            hint = ServerEnd(returncode=-signal.SIGILL, runtime=end.runtime).sigill_hint() or hint  # its worker's
        print(f"\nmcp-rkllm try: {error.get('code')}: {error.get('message')}\nHint: {hint}", file=sys.stderr)
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
