"""Benchmarks of mcp-rkllm, every row measured side by side in one run: `python benchmarks/run.py`.

Rows (targets from the benchmarks issue):
  1. relay capacity: R1 = tokens/s reaching a Python sink on NativeRuntime (fake runtime at full
     speed); R2 = tokens/s reaching an MCP client's progress callback over stdio. R2/R1 >= 0.8,
     R2 >= 150,000.
  2. added latency at NPU pace (40 tokens/s): C callback -> client progress callback over stdio,
     p50 <= 2 ms, p99 <= 10 ms (the fake stamps each token with CLOCK_MONOTONIC).
  3. tool-call overhead: rkllm_is_running vs a no-op tool on a bare low-level mcp Server, both
     over stdio, median ratio <= 1.5.
  4. CPU runtime end to end: generate over stdio vs raw llama-cpp-python, same model and prompt,
     greedy, 128 tokens: tokens/s ratio >= 0.95 (skipped without the `cpu` extra).
  5. isolation cost: rows 1 and 2 with each model in a worker process vs in the server process:
     capacity ratio >= 0.5, p50 latency added <= 1 ms.
  6. abort latency (client cancel -> rkllm_abort in the runtime) p50 <= 20 ms; idle server RSS
     <= 80 MB; RSS growth after 10,000 calls <= 5 MB.
  7. worker start-up (spawn to ready): what a worker process adds to loading a model, measured
     through the public surface: the median time of `rkllm_init` over stdio with `--isolation
     process` minus the same with `--isolation none` (fake runtime, several loads each, each
     followed by `rkllm_destroy`). No target; compare runs before and after a change.
  8. JSON-RPC 2.0 on its Unix socket (`--transport jsonrpc --socket PATH`), side by side with MCP over
     stdio in the same run, through an asyncio client reading lines: relay capacity (tokens/s reaching
     the client's `rkllm.callback` handling, as R2) with socket / stdio >= 1.0; latency at 40 tokens/s
     (as row 2) with p50 no higher than stdio's; per-call time of `rkllm.is_running` vs row 3's
     `rkllm_is_running` (no target).
  9. the HTTP APIs' streams (`--transport http --port P`), side by side with MCP over stdio in the same
     run, through httpx.AsyncClient reading lines: the OpenAI-compatible SSE stream (`POST
     /v1/chat/completions`, `"stream": true`) and the Ollama NDJSON stream (`POST /api/chat`). Relay
     capacity (request sent to the last content piece received) >= 160,000 tokens/s for SSE and >= 280,000
     for NDJSON (10x rkllama's best on this kind of machine: 10k-16k and 20k-28k; a vendor Flask demo
     3.5k-4.8k), with the ratio to row 1's R2; latency at 40 tokens/s (as row 2) p99 < 3.9 ms
     (rkllama's added p50 / p99: 1.7 / 3.9 ms), with the difference to row 2.
 10. HAProxy in front (issue 17, README "Several boards"): one `--transport http --isolation none` server and
     HAProxy with deploy/haproxy.cfg before it (BOARD1 = the server, LISTEN on loopback), the OpenAI SSE stream
     of row 9 measured direct and through HAProxy in the same run, alternating: relay capacity (median of 3
     each) with HAProxy / direct >= 0.9; latency at 40 tokens/s (as row 2) p50 / p99 each, and what HAProxy
     adds: p99 < 2 ms. Skipped, saying why, when `haproxy` is not installed (.ci/run installs it).

The fake runtime (tests/fake_rkllm) stands in for the NPU; it is built with gcc on first use.
The servers started here get limits that allow what the rows ask for (MAX_NEW_TOKENS below).
`--quick` is also CI's smoke test (.ci/run): it must finish with exit status 0; targets are not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from tests.fake_rkllm.build import build_fake  # noqa: E402

ROWS: list[tuple[str, str, str, bool | None]] = []

#: The servers' max_new_tokens limit (MCP_RKLLM_MAX_NEW_TOKENS): above the 300,000 tokens of row 1
#: (the default limit, 65,536, would answer LIMIT_EXCEEDED).
MAX_NEW_TOKENS = 1_000_000


def row(name: str, value: str, target: str, ok: bool | None) -> None:
    ROWS.append((name, value, target, ok))
    mark = "" if ok is None else ("ok" if ok else "MISSED")
    print(f"  {name:<46} {value:<34} {target:<22} {mark}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def server_params(library: Path, record_dir: Path, *extra: str) -> StdioServerParameters:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(REPO),
           "RKLLM_LIB_PATH": str(library), "FAKE_RKLLM_RECORD_DIR": str(record_dir),
           "MCP_RKLLM_MODELS": str(record_dir.parent), "MCP_RKLLM_CACHE_DIR": str(record_dir.parent),
           "MCP_RKLLM_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}
    return StdioServerParameters(command=sys.executable, args=["-m", "mcp_rkllm", "--log-level", "ERROR", *extra],
                                 env=env, cwd=str(REPO))


DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - the servers' stderr (the fake's log lines) for the whole run


def connect(params: StdioServerParameters) -> Client:
    """An MCP client on a stdio subprocess whose stderr is discarded."""
    return Client(stdio_client(params, errlog=DEVNULL), mode="legacy")


@asynccontextmanager
async def session(library: Path, record_dir: Path, *extra: str) -> AsyncIterator[Client]:
    async with connect(server_params(library, record_dir, *extra)) as client:
        yield client


async def load(client: Client, model: Path, **param: Any) -> str:
    result = await client.call_tool("rkllm_init", {"param": {"model_path": str(model), **param}})
    assert not result.is_error, result.content
    return str(result.structured_content["handle"])


# --------------------------------------------------------------------------- rows 1, 2, 5


def relay_sink_rate(library: Path, model: Path, tokens: int) -> float:
    """R1: tokens/s from the fake through NativeRuntime to a Python sink, no MCP."""
    from mcp_rkllm.runtime.native import NativeRuntime
    from mcp_rkllm.structs import RKLLMInferParam, RKLLMInput, RKLLMParam

    m = NativeRuntime.open(str(library)).init(RKLLMParam(model_path=str(model), max_new_tokens=tokens))
    count = [0]

    def sink(event: object) -> None:
        count[0] += 1

    try:
        started = time.perf_counter()
        result = m.run(RKLLMInput(prompt_input="tok en"), RKLLMInferParam(), sink)
        elapsed = time.perf_counter() - started
    finally:
        m.destroy()
    assert result.token_count == tokens
    return tokens / elapsed


async def stdio_rate(library: Path, model: Path, records: Path, tokens: int,
                     isolation: str) -> tuple[float, float, int]:
    """R2 over stdio: tokens/s reaching the client's progress callback (call start to the last
    notification), tokens/s of the whole call (until its result, with the full text and token ids,
    has been parsed and schema-checked by the client), and the number of notifications."""
    async with session(library, records, "--isolation", isolation) as client:
        handle = await load(client, model, max_new_tokens=tokens)
        last = [0.0, 0.0]
        notes = [0]

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            last[:] = [progress, time.perf_counter()]
            notes[0] += 1

        await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "warm up"},
                                             "rkllm_infer_params": {"max_new_tokens": 1000}})
        notes[0] = 0
        started = time.perf_counter()
        result = await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "tok en"}},
                                        progress_callback=on_progress)
        elapsed = time.perf_counter() - started
    assert not result.is_error and last[0] == tokens, (result.content, last[0])
    return tokens / (last[1] - started), tokens / elapsed, notes[0]


async def stamp_latency(library: Path, model: Path, records: Path, isolation: str, tokens: int) -> list[float]:
    """Milliseconds from the fake's callback to the client's progress callback, per token, at 40 tokens/s."""
    async with session(library, records, "--isolation", isolation) as client:
        handle = await load(client, model, max_new_tokens=tokens)
        latencies: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            now = time.monotonic_ns()
            latencies.extend((now - int(s)) / 1e6 for s in (message or "").split())

        await client.call_tool("rkllm_run", {"handle": handle,
                                             "rkllm_input": {"prompt_input": "fake:stamp fake:delay_ms=25"}},
                               progress_callback=on_progress)
    return latencies[5:]  # the first tokens pay for warm-up


# --------------------------------------------------------------------------- row 3


BARE_SERVER = '''
import anyio
from mcp.server import Server
from mcp.server.stdio import stdio_server
from mcp.types import CallToolResult, ListToolsResult, TextContent, Tool

TOOL = Tool(name="noop", description="nothing", input_schema={"type": "object", "properties": {}})

async def list_tools(ctx, params):
    return ListToolsResult(tools=[TOOL])

async def call_tool(ctx, params):
    return CallToolResult(content=[TextContent(type="text", text="{}")], structured_content={})

server = Server("bare", on_list_tools=list_tools, on_call_tool=call_tool)

async def main():
    async with stdio_server() as (r, w):
        await server.run(r, w, server.create_initialization_options())

anyio.run(main)
'''


async def call_times(client: Client, name: str, args: dict[str, Any], n: int) -> list[float]:
    for _ in range(20):
        await client.call_tool(name, args)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await client.call_tool(name, args)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def tool_overhead(library: Path, model: Path, records: Path, n: int) -> tuple[float, float]:
    """Median ms of rkllm_is_running on mcp-rkllm and of a no-op tool on a bare Server, both over stdio."""
    script = Path(tempfile.mkdtemp()) / "bare_server.py"
    script.write_text(BARE_SERVER)
    bare = StdioServerParameters(command=sys.executable, args=[str(script)], cwd=str(REPO),
                                 env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)})
    async with session(library, records, "--isolation", "none") as ours, connect(bare) as theirs:
        handle = await load(ours, model)
        a: list[float] = []
        b: list[float] = []
        for _ in range(5):  # interleaved rounds, so drift hits both alike
            a += await call_times(ours, "rkllm_is_running", {"handle": handle}, n // 5)
            b += await call_times(theirs, "noop", {}, n // 5)
    return statistics.median(a), statistics.median(b)


# --------------------------------------------------------------------------- row 4


PROMPT = "Write a short story about a robot who learns to paint."


def raw_llama_rate(gguf: Path, tokens: int) -> float:
    """tokens/s of raw llama-cpp-python: the reference's low-level loop (llama_decode + a sampler chain),
    the same chat-templated prompt, greedy with the same penalties, EOS banned, `tokens` tokens."""
    import ctypes

    import llama_cpp as L
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    threads = os.cpu_count() or 1
    llm = L.Llama(model_path=str(gguf), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                  verbose=False)
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="",
                              add_generation_prompt=True)
    text = fmt(messages=[{"role": "user", "content": PROMPT}]).prompt
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
    vocab, ctx, n_vocab = llm._model.vocab, llm.ctx, llm.n_vocab()
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def decode(toks: list[int], n_past: int) -> None:
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, n_past + i, 1, False
            batch.seq_id[i][0] = 0
        batch.logits[len(toks) - 1] = True
        assert L.llama_decode(ctx, batch) == 0

    def once() -> float:
        L.llama_memory_clear(mem, True)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        bias = (L.llama_logit_bias * 2)()
        for i, t in enumerate((0, 2)):
            bias[i].token, bias[i].bias = t, float("-inf")  # type: ignore[assignment]  # ctypes takes the int
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, 2, bias))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(n_vocab, 64, 1.1, 0.0, 0.0))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        buf = ctypes.create_string_buffer(256)
        started = time.perf_counter()
        decode(prompt, 0)
        n_past = len(prompt)
        for n in range(tokens):
            tok = L.llama_sampler_sample(chain, ctx, -1)
            L.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
            if n + 1 < tokens:
                decode([tok], n_past)
                n_past += 1
        elapsed = time.perf_counter() - started
        L.llama_sampler_free(chain)
        return tokens / elapsed

    once()
    rates = [once() for _ in range(3)]
    L.llama_batch_free(batch)
    llm.close()
    return statistics.median(rates)


async def served_llama_rate(gguf: Path, tokens: int) -> float:
    """tokens/s of `generate` over stdio on the CPU runtime: same model, prompt, greedy, EOS ignored."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MCP_RKLLM_MAX_NEW_TOKENS=str(MAX_NEW_TOKENS))
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO), env=env,
                                   args=["-m", "mcp_rkllm", "--runtime", "cpu", "--log-level", "ERROR"])
    async with connect(params) as client:
        loaded = await client.call_tool("load_model", {"model": gguf.name, "param": {
            "ignore_eos_token": True, "max_context_len": 2048, "temperature": 0.0}})
        handle = loaded.structured_content["handle"]
        args = {"prompt": PROMPT, "handle": handle, "max_new_tokens": tokens, "temperature": 0.0}

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            pass

        async def once() -> float:
            started = time.perf_counter()
            result = await client.call_tool("generate", args, progress_callback=on_progress)
            elapsed = time.perf_counter() - started
            assert result.structured_content["token_count"] == tokens, result.content
            return tokens / elapsed

        await once()
        rates = [await once() for _ in range(3)]
    return statistics.median(rates)


# --------------------------------------------------------------------------- row 6


async def abort_latency(library: Path, model: Path, records: Path, n: int) -> list[float]:
    """ms from the client cancelling a streaming call to the fake runtime entering rkllm_abort."""
    out = []
    async with session(library, records, "--isolation", "none") as client:
        handle = await load(client, model, max_new_tokens=100000)
        for _ in range(n):
            first = anyio.Event()

            async def on_progress(progress: float, total: float | None, message: str | None,
                                  first: anyio.Event = first) -> None:
                first.set()

            async def slow() -> None:
                await client.call_tool("rkllm_run", {"handle": handle,
                                                     "rkllm_input": {"prompt_input": "s fake:delay_ms=5"}},
                                       progress_callback=on_progress)

            (records / "abort.json").unlink(missing_ok=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await first.wait()
                cancelled_at = time.monotonic_ns()
                tg.cancel_scope.cancel()
            while not (records / "abort.json").exists():
                await anyio.sleep(0.001)
            out.append((json.loads((records / "abort.json").read_text())["t_ns"] - cancelled_at) / 1e6)
            while True:  # the run has stopped before the next one starts
                r = await client.call_tool("rkllm_is_running", {"handle": handle})
                if not r.structured_content["running"]:
                    break
    return out


async def memory(library: Path, model: Path, records: Path, calls: int) -> tuple[float, float, float]:
    """Idle RSS of a server with no model, and its RSS before and after `calls` tool calls."""
    async with session(library, records, "--isolation", "none") as client:
        idle = (await client.call_tool("server_status", {})).structured_content["rss_mb"]
        handle = await load(client, model, max_new_tokens=4)
        for _ in range(200):
            await client.call_tool("rkllm_is_running", {"handle": handle})
        before = (await client.call_tool("server_status", {})).structured_content["rss_mb"]
        for i in range(calls):
            if i % 10 == 0:
                await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "m"}})
            else:
                await client.call_tool("rkllm_is_running", {"handle": handle})
        after = (await client.call_tool("server_status", {})).structured_content["rss_mb"]
    return float(idle), float(before), float(after)


# --------------------------------------------------------------------------- row 7


async def init_times(library: Path, model: Path, records: Path, isolation: str, n: int) -> list[float]:
    """ms of `rkllm_init` over stdio (each load destroyed before the next), after one warm-up load."""
    times = []
    async with session(library, records, "--isolation", isolation) as client:
        for i in range(n + 1):
            started = time.perf_counter()
            handle = await load(client, model, max_new_tokens=4)
            elapsed = (time.perf_counter() - started) * 1000
            result = await client.call_tool("rkllm_destroy", {"handle": handle})
            assert not result.is_error, result.content
            if i:
                times.append(elapsed)
    return times


# --------------------------------------------------------------------------- row 8


class RpcClient:
    """An asyncio JSON-RPC client on the server's Unix socket: one JSON message per line each way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.next_id = 0

    @classmethod
    async def open(cls, path: Path) -> RpcClient:
        # a whole run's result (every token's text and id) is one line: allow lines of many MB
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 28)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def call(self, method: str, params: Any,
                   on_callback: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """Send one request; hand each `rkllm.callback` to `on_callback`; the result (an error fails)."""
        self.next_id += 1
        request_id = self.next_id
        self.writer.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                      "params": params}).encode() + b"\n")
        await self.writer.drain()
        while True:
            line = await self.reader.readline()
            if not line:
                raise EOFError("the server closed the connection")
            message = json.loads(line)
            if message.get("method") == "rkllm.callback":
                if on_callback is not None:
                    on_callback(message["params"])
            elif message.get("id") == request_id:
                assert "result" in message, message
                return message["result"]


async def start_socket_server(library: Path, records: Path, socket_path: Path) -> subprocess.Popen[bytes]:
    """`python -m mcp_rkllm --transport jsonrpc --socket PATH`, same settings as the stdio servers of rows 1-3."""
    params = server_params(library, records, "--transport", "jsonrpc", "--socket", str(socket_path),
                           "--isolation", "none")
    proc = subprocess.Popen([params.command, *params.args], env=params.env, cwd=str(REPO),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the JSON-RPC server exited with status {proc.returncode}")
        if socket_path.exists():
            try:
                client = await RpcClient.open(socket_path)
            except OSError:
                pass
            else:
                await client.close()
                return proc
        await anyio.sleep(0.05)
    stop_server(proc)
    raise RuntimeError("the JSON-RPC server did not create its socket")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server aborts its runs, frees its handles, removes its socket), then reap it."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def rpc_load(client: RpcClient, model: Path, **param: Any) -> str:
    return str((await client.call("rkllm.init", [None, {"model_path": str(model), **param}, None]))["handle"])


async def socket_rate(client: RpcClient, model: Path, tokens: int) -> tuple[float, float, int]:
    """As `stdio_rate`, over the socket: tokens/s reaching the client's callback handling (call start to the
    last RKLLM_RUN_NORMAL callback), tokens/s of the whole call (its result parsed), and the callbacks."""
    handle = await rpc_load(client, model, max_new_tokens=tokens)
    received = [0]
    last = [0.0]
    notes = [0]

    def on_callback(params: dict[str, Any]) -> None:
        if params["state"] == "RKLLM_RUN_NORMAL":
            received[0] += len(params["token_ids"])
            last[0] = time.perf_counter()
            notes[0] += 1

    await client.call("rkllm.run", [handle, {"prompt_input": "warm up"}, {"max_new_tokens": 1000}, None])
    started = time.perf_counter()
    result = await client.call("rkllm.run", [handle, {"prompt_input": "tok en"}, None, None], on_callback)
    elapsed = time.perf_counter() - started
    await client.call("rkllm.destroy", [handle])
    assert received[0] == tokens == len(result["token_ids"]), (received[0], len(result["token_ids"]))
    return tokens / (last[0] - started), tokens / elapsed, notes[0]


async def socket_stamp_latency(client: RpcClient, model: Path, tokens: int) -> list[float]:
    """As `stamp_latency`, over the socket: ms from the fake's callback to the client's, per token, at 40 tokens/s."""
    handle = await rpc_load(client, model, max_new_tokens=tokens)
    latencies: list[float] = []

    def on_callback(params: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        latencies.extend((now - int(s)) / 1e6 for s in params["text"].split())

    await client.call("rkllm.run", [handle, {"prompt_input": "fake:stamp fake:delay_ms=25"}, None, None],
                      on_callback)
    await client.call("rkllm.destroy", [handle])
    return latencies[5:]  # the first tokens pay for warm-up


async def socket_call_times(client: RpcClient, model: Path, n: int) -> list[float]:
    """ms of `rkllm.is_running` over the socket, after 20 warm-up calls (as `call_times`)."""
    handle = await rpc_load(client, model)
    for _ in range(20):
        await client.call("rkllm.is_running", [handle])
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await client.call("rkllm.is_running", [handle])
        times.append((time.perf_counter() - started) * 1000)
    await client.call("rkllm.destroy", [handle])
    return times


async def jsonrpc_rows(library: Path, model: Path, records: Path, quick: bool) -> tuple[
        tuple[float, float, int], list[float], list[float]]:
    """Row 8's measurements on one socket server (stopped at the end): capacity, latencies, call times."""
    socket_path = Path(tempfile.mkdtemp(prefix="mcp-rkllm-sock-")) / "rpc.sock"
    proc = await start_socket_server(library, records, socket_path)
    try:
        client = await RpcClient.open(socket_path)
        try:
            rate = await socket_rate(client, model, 100_000 if quick else 300_000)
            lat = await socket_stamp_latency(client, model, 120 if quick else 240)
            calls = await socket_call_times(client, model, 500 if quick else 1000)
        finally:
            await client.close()
    finally:
        stop_server(proc)
        with contextlib.suppress(OSError):
            socket_path.parent.rmdir()  # the server removed its socket file on SIGTERM
    return rate, lat, calls


# --------------------------------------------------------------------------- row 9


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_http_server(library: Path, records: Path, port: int) -> subprocess.Popen[bytes]:
    """`python -m mcp_rkllm --transport http --port P`, same settings as the stdio servers of rows 1-3."""
    params = server_params(library, records, "--transport", "http", "--host", "127.0.0.1", "--port", str(port),
                           "--isolation", "none")
    proc = subprocess.Popen([params.command, *params.args], env=params.env, cwd=str(REPO),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=DEVNULL)
    return await answering(proc, port, "/api/version", lambda: "")


async def answering(proc: subprocess.Popen[bytes], port: int, path: str, log: Callable[[], str],
                    what: str = "the HTTP server") -> subprocess.Popen[bytes]:
    """`proc` once GET `path` on 127.0.0.1:`port` answers 200 (within 30 s); stopped, and RuntimeError with the
    end of `log()`, if it exits or never answers."""
    import httpx

    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}: {log()}")
            try:
                if (await client.get(path)).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"nothing answered GET {path} on port {port}: {log()}")


#: (path, request body, content of one parsed line or None, token count in a parsed line or None) per API.
HttpApi = tuple[str, Callable[[str, int], dict[str, Any]], Callable[[dict[str, Any]], str | None],
                Callable[[dict[str, Any]], int | None]]


def _sse_content(chunk: dict[str, Any]) -> str | None:
    choices = chunk.get("choices") or []
    return choices[0]["delta"].get("content") or None if choices else None


def _sse_count(chunk: dict[str, Any]) -> int | None:
    usage = chunk.get("usage")
    return int(usage["completion_tokens"]) if usage else None


def _ndjson_content(line: dict[str, Any]) -> str | None:
    return None if line.get("done") else line["message"]["content"] or None


def _ndjson_count(line: dict[str, Any]) -> int | None:
    return int(line["eval_count"]) if line.get("done") else None


OPENAI_SSE: HttpApi = (
    "/v1/chat/completions",
    lambda prompt, n: {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                       "stream": True, "stream_options": {"include_usage": True}},
    _sse_content, _sse_count)
OLLAMA_NDJSON: HttpApi = (
    "/api/chat",
    lambda prompt, n: {"model": "bench:latest", "messages": [{"role": "user", "content": prompt}],
                       "options": {"num_predict": n}},
    _ndjson_content, _ndjson_count)


async def http_stream(client: Any, api: HttpApi, prompt: str, tokens: int,
                      on_content: Callable[[str], None]) -> int:
    """One streamed chat: each line parsed as it arrives (SSE `data:` lines or NDJSON), its content handed to
    `on_content`; the completion token count the stream reports at its end."""
    path, body, content_of, count_of = api
    count = None
    async with client.stream("POST", path, json=body(prompt, tokens)) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        async for line in response.aiter_lines():
            if path.startswith("/v1"):
                if not line.startswith("data: "):
                    continue
                line = line[6:]
                if line == "[DONE]":
                    break
            elif not line:
                continue
            data = json.loads(line)
            assert "error" not in data, data
            if (text := content_of(data)) is not None:
                on_content(text)
            if (n := count_of(data)) is not None:
                count = n
    assert count == tokens, (count, tokens)
    return count


async def http_rate(client: Any, api: HttpApi, tokens: int) -> tuple[float, float, int]:
    """As `stdio_rate`: tokens/s reaching the client's line handling (request sent to the last content piece),
    tokens/s of the whole request (to the end of the stream), and the number of content pieces."""
    last = [0.0]
    pieces = [0]

    def on_content(text: str) -> None:
        last[0] = time.perf_counter()
        pieces[0] += 1

    started = time.perf_counter()
    await http_stream(client, api, "tok en", tokens, on_content)
    elapsed = time.perf_counter() - started
    return tokens / (last[0] - started), tokens / elapsed, pieces[0]


async def http_stamp_latency(client: Any, api: HttpApi, tokens: int) -> list[float]:
    """As `stamp_latency`: ms from the fake's callback to the client's line handling, per token, at 40 tokens/s."""
    latencies: list[float] = []

    def on_content(text: str) -> None:
        now = time.monotonic_ns()
        latencies.extend((now - int(s)) / 1e6 for s in text.split())

    await http_stream(client, api, "fake:stamp fake:delay_ms=25", tokens, on_content)
    return latencies[5:]  # the first tokens pay for warm-up


async def http_rows(library: Path, model: Path, records: Path, quick: bool) -> dict[str, tuple[
        tuple[float, float, int], list[float]]]:
    """Row 9's measurements on one HTTP server (stopped at the end): capacity and latencies per stream."""
    import httpx

    port = free_port()
    proc = await start_http_server(library, records, port)
    apis = {"SSE": OPENAI_SSE, "NDJSON": OLLAMA_NDJSON}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for api in apis.values():  # the first loads the model; neither stream is measured on a cold server
                await http_stream(client, api, "warm up", 1000, lambda text: None)
            rates = {name: await http_rate(client, api, 100_000 if quick else 300_000) for name, api in apis.items()}
            lats = {name: await http_stamp_latency(client, api, 120 if quick else 240) for name, api in apis.items()}
    finally:
        stop_server(proc)
    return {name: (rates[name], lats[name]) for name in apis}


# --------------------------------------------------------------------------- row 10


HAPROXY_CONFIG = REPO / "deploy" / "haproxy.cfg"


def find_haproxy() -> str | None:
    """The haproxy binary: on PATH, or in an sbin directory a user's PATH may leave out (as tests/test_fleet.py)."""
    import shutil

    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)


async def start_haproxy(haproxy: str, board_port: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    """HAProxy with deploy/haproxy.cfg on 127.0.0.1:`port`, BOARD1 the server on `board_port` (the environment
    as tests/test_fleet.py gives it); returned once a request through it reaches the server's /healthz."""
    env = {"PATH": os.environ.get("PATH", ""), "LISTEN": f"127.0.0.1:{port}", "BOARD1": f"127.0.0.1:{board_port}"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CONFIG)], env=env, cwd=str(REPO),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    return await answering(proc, port, "/healthz", lambda: log.read_text()[-2000:], "haproxy")


#: Row 10's measurements per path ("direct", "haproxy"): capacities (tokens/s), content pieces of the last
#: capacity run, latencies (ms).
ProxyRows = dict[str, tuple[list[float], int, list[float]]]


async def haproxy_rows(library: Path, model: Path, records: Path, quick: bool) -> ProxyRows | str:
    """Row 10 on one HTTP server with HAProxy in front (both stopped at the end): the OpenAI SSE stream's
    capacity and latency at 40 tokens/s, direct and through HAProxy, alternating which goes first; or why not."""
    import httpx

    haproxy = find_haproxy()
    if haproxy is None:
        return "haproxy is not installed: `apt-get install haproxy`, as .ci/run does"
    port, proxy_port = free_port(), free_port()
    log = Path(tempfile.mkdtemp(prefix="mcp-rkllm-haproxy-")) / "haproxy.log"
    proc = await start_http_server(library, records, port)
    proxy: subprocess.Popen[bytes] | None = None
    rates: dict[str, list[float]] = {"direct": [], "haproxy": []}
    pieces: dict[str, int] = {}
    lats: dict[str, list[float]] = {"direct": [], "haproxy": []}
    try:
        proxy = await start_haproxy(haproxy, port, proxy_port, log)
        async with (httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as direct,
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}", timeout=120) as proxied):
            clients = {"direct": direct, "haproxy": proxied}
            for client in clients.values():  # the first loads the model; both connections open before measuring
                await http_stream(client, OPENAI_SSE, "warm up", 1000, lambda text: None)
            order = list(clients)
            for _ in range(3):
                for name in order:
                    rate, _, pieces[name] = await http_rate(clients[name], OPENAI_SSE,
                                                            100_000 if quick else 300_000)
                    rates[name].append(rate)
                order.reverse()
            for _ in range(2 if quick else 4):  # rounds of 65 tokens (60 measured) each, alternating
                for name in order:
                    lats[name] += await http_stamp_latency(clients[name], OPENAI_SSE, 65)
                order.reverse()
    finally:
        if proxy is not None:
            stop_server(proxy)
        stop_server(proc)
    return {name: (rates[name], pieces[name], lats[name]) for name in rates}


# --------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    library = build_fake("1.3.0", version="1.3.0")
    work = Path(tempfile.mkdtemp(prefix="mcp-rkllm-bench-"))
    model = work / "bench.rkllm"
    model.write_bytes(b"fake model")
    records = work / "records"
    records.mkdir()
    tokens = 100_000 if args.quick else 300_000
    print(f"mcp-rkllm benchmarks, {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}", flush=True)
    print(f"  {'row':<46} {'measured':<34} {'target':<22}")

    r1 = relay_sink_rate(library, model, tokens)
    row("1 R1 fake -> NativeRuntime sink", f"{r1:,.0f} tokens/s", "", None)
    r2, whole, notes = await stdio_rate(library, model, records, tokens, "none")
    row("1 R2 fake -> MCP client progress, stdio", f"{r2:,.0f} tokens/s ({notes} notifications)", ">= 150,000",
        r2 >= 150_000)
    row("1 R2/R1", f"{r2 / r1:.2f}", ">= 0.8", r2 / r1 >= 0.8)
    row("1 (whole call incl. the final result)", f"{whole:,.0f} tokens/s", "", None)

    lat = await stamp_latency(library, model, records, "none", 120 if args.quick else 240)
    p50, p99 = pct(lat, 50), pct(lat, 99)
    row("2 latency at 40 tokens/s, stdio, p50 / p99", f"{p50:.2f} / {p99:.2f} ms ({len(lat)} tokens)",
        "<= 2 / <= 10 ms", p50 <= 2 and p99 <= 10)

    ours, bare = await tool_overhead(library, model, records, 500 if args.quick else 1000)
    row("3 rkllm_is_running vs bare Server no-op (median)", f"{ours:.3f} vs {bare:.3f} ms = {ours / bare:.2f}x",
        "<= 1.5x", ours / bare <= 1.5)

    try:
        import llama_cpp  # noqa: F401

        from mcp_rkllm.models.store import bundled_model

        gguf = bundled_model()
    except ImportError:
        gguf = None
    if gguf is None or args.skip_cpu:
        row("4 CPU runtime generate vs raw llama-cpp-python", "skipped (no `cpu` extra)", ">= 0.95", None)
    else:
        served = await served_llama_rate(gguf, 128)
        raw = raw_llama_rate(gguf, 128)
        row("4 CPU generate over stdio vs raw llama-cpp", f"{served:.1f} vs {raw:.1f} tokens/s = {served / raw:.2f}",
            ">= 0.95", served / raw >= 0.95)

    r2w, _, notes_w = await stdio_rate(library, model, records, tokens, "process")
    row("5 R2 with a worker process per model", f"{r2w:,.0f} tokens/s ({notes_w} notifications)", "", None)
    row("5 capacity, worker / in-process", f"{r2w / r2:.2f}", ">= 0.5", r2w / r2 >= 0.5)
    latw = await stamp_latency(library, model, records, "process", 120 if args.quick else 240)
    added = pct(latw, 50) - p50
    row("5 latency with worker p50 / p99 (added p50)", f"{pct(latw, 50):.2f} / {pct(latw, 99):.2f} ms (+{added:.2f})",
        "added p50 <= 1 ms", added <= 1)

    aborts = await abort_latency(library, model, records, 10 if args.quick else 25)
    row("6 abort latency p50 / p99", f"{pct(aborts, 50):.1f} / {pct(aborts, 99):.1f} ms ({len(aborts)} cancels)",
        "p50 <= 20 ms", pct(aborts, 50) <= 20)
    idle, before, after = await memory(library, model, records, 2000 if args.quick else 10_000)
    row("6 idle server RSS, no model", f"{idle:.1f} MB", "<= 80 MB", idle <= 80)
    calls = 2000 if args.quick else 10_000
    row(f"6 RSS growth over {calls:,} calls", f"{after - before:+.1f} MB ({before:.1f} -> {after:.1f})", "<= 5 MB",
        after - before <= 5)

    loads = 5 if args.quick else 10
    in_process = statistics.median(await init_times(library, model, records, "none", loads))
    worker = statistics.median(await init_times(library, model, records, "process", loads))
    row("7 worker start-up (spawn to ready)", f"{worker - in_process:,.0f} ms (rkllm_init {worker:,.0f} vs "
        f"{in_process:,.0f} ms, median of {loads})", "", None)
    (r8, whole8, notes8), lat8, calls8 = await jsonrpc_rows(library, model, records, args.quick)
    row("8 R2 over the JSON-RPC socket", f"{r8:,.0f} tokens/s ({notes8} notifications)", "", None)
    row("8 capacity, socket / stdio (row 1 R2)", f"{r8:,.0f} vs {r2:,.0f} tokens/s = {r8 / r2:.2f}", ">= 1.0",
        r8 / r2 >= 1.0)
    row("8 (whole call incl. the final result)", f"{whole8:,.0f} vs {whole:,.0f} tokens/s = {whole8 / whole:.2f}",
        "", None)
    s50, s99 = pct(lat8, 50), pct(lat8, 99)
    row("8 latency at 40 tokens/s, socket, p50 / p99", f"{s50:.2f} / {s99:.2f} ms ({len(lat8)} tokens)",
        "p50 <= stdio p50", s50 <= p50)
    row("8 latency socket - stdio (row 2), p50 / p99", f"{s50 - p50:+.2f} / {s99 - p99:+.2f} ms", "", None)
    rpc_call = statistics.median(calls8)
    row("8 rkllm.is_running socket vs stdio (median)", f"{rpc_call:.3f} vs {ours:.3f} ms = {rpc_call / ours:.2f}x",
        "", None)
    streams = await http_rows(library, model, records, args.quick)
    for name, label, target in (("SSE", "OpenAI SSE", 160_000), ("NDJSON", "Ollama NDJSON", 280_000)):
        (r9, whole9, pieces9), lat9 = streams[name]
        row(f"9 R2 over {label}", f"{r9:,.0f} tokens/s ({pieces9} pieces)", f">= {target:,}", r9 >= target)
        row(f"9 {name} / stdio (row 1 R2)", f"{r9:,.0f} vs {r2:,.0f} tokens/s = {r9 / r2:.2f}", "", None)
        row(f"9 {name} (whole request to the end of the stream)",
            f"{whole9:,.0f} vs {whole:,.0f} tokens/s = {whole9 / whole:.2f}", "", None)
        h50, h99 = pct(lat9, 50), pct(lat9, 99)
        row(f"9 latency at 40 tokens/s, {name}, p50 / p99", f"{h50:.2f} / {h99:.2f} ms ({len(lat9)} tokens)",
            "p99 < 3.9 ms", h99 < 3.9)
        row(f"9 latency {name} - stdio (row 2), p50 / p99", f"{h50 - p50:+.2f} / {h99 - p99:+.2f} ms", "", None)
    proxied = await haproxy_rows(library, model, records, args.quick)
    if isinstance(proxied, str):
        row("10 HAProxy vs direct, OpenAI SSE", f"skipped ({proxied})", ">= 0.9, added p99 < 2 ms", None)
    else:
        (rates_d, pieces_d, lat_d), (rates_h, pieces_h, lat_h) = proxied["direct"], proxied["haproxy"]
        cap_d, cap_h = statistics.median(rates_d), statistics.median(rates_h)
        row("10 R2 over OpenAI SSE, direct", f"{cap_d:,.0f} tokens/s ({pieces_d} pieces, median of {len(rates_d)})",
            "", None)
        row("10 R2 over OpenAI SSE, through HAProxy", f"{cap_h:,.0f} tokens/s ({pieces_h} pieces, median of "
            f"{len(rates_h)})", "", None)
        row("10 capacity, HAProxy / direct", f"{cap_h / cap_d:.2f}", ">= 0.9", cap_h / cap_d >= 0.9)
        d50, d99, x50, x99 = pct(lat_d, 50), pct(lat_d, 99), pct(lat_h, 50), pct(lat_h, 99)
        row("10 latency at 40 tokens/s, direct, p50 / p99", f"{d50:.2f} / {d99:.2f} ms ({len(lat_d)} tokens)",
            "", None)
        row("10 latency at 40 tokens/s, HAProxy, p50 / p99", f"{x50:.2f} / {x99:.2f} ms ({len(lat_h)} tokens)",
            "", None)
        row("10 latency added by HAProxy, p50 / p99", f"{x50 - d50:+.2f} / {x99 - d99:+.2f} ms", "added p99 < 2 ms",
            x99 - d99 < 2)
    missed = [r for r in ROWS if r[3] is False]
    print(f"\n{len(ROWS)} rows, {len(missed)} missed", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and calls (about half the time)")
    parser.add_argument("--skip-cpu", action="store_true", help="skip row 4 (the CPU runtime)")
    sys.exit(anyio.run(main, parser.parse_args()))
