"""A soak under load (issue 18): one `mcp-rkllm --transport http` process (with the JSON-RPC socket beside it) on the
fake NPU runtime, a worker process per model, driven for about a minute by several clients at once:

- MCP Streamable HTTP sessions: rkllm_init / rkllm_run with progress / rkllm_destroy, generate and chat by name, runs
  cancelled mid-way, workers crashed (`fake:crash=N`), sessions ended with their handles still loaded;
- OpenAI SSE streams and Ollama NDJSON streams, some dropped after a few lines, some crashing their shared worker;
- JSON-RPC on the Unix socket: connections closed mid-run, `$/cancelRequest`, `rkllm.abort` from another connection;
- load_model / unload_model cycles by name (stateless POST /jsonrpc), which also cut other clients' runs short.

Every prompt carries a word of its own and the fake echoes the prompt's words, deterministically: whatever text a
run produced (streamed or returned) must be a prefix of the text that prompt makes, the whole of it when the run
ended by length, and the streamed pieces must join into the returned text. Runs cut short must end with a coded
error or a normal end, never hang. The server process's RSS, descriptors, threads and children are read from /proc
after a warm-up and after the load: they must come back (no orphan workers, no zombies), and once every session and
connection ended and the shared models were unloaded no handle may remain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from mcp_rkllm.errors import ERRORS
from tests.fake_rkllm.build import build_fake
from tests.jsonrpc_client import RpcConn
from tests.servers import child_processes, events, free_port, server_log, start_http_server, stop

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

#: Seconds of load before the first measurement (thread pools, caches, imports reach their working size).
WARMUP_SECONDS = 12.0
#: Seconds of the measured load (with the warm-up, about 75 s of load in all).
SOAK_SECONDS = 60.0
#: No single step of a client (a session, a stream, a connection) may take longer: a hang fails the soak.
STEP_TIMEOUT = 60.0
#: How long the figures may take to come back after the load (idle pool threads leave after 10 s).
SETTLE_SECONDS = 30.0
RSS_GROWTH_MB = 30
FD_SLACK = 4
THREAD_SLACK = 4
MODELS = ("alpha", "beta", "gamma")
SEED = int(os.environ.get("MCP_RKLLM_SOAK_SEED", "18"))
EMOJI = " \U0001F600"
WORD = re.compile(r"w\d+q")


def expected_text(word: str, limit: int) -> str:
    """What the fake generates for a prompt whose only word is `word`, in `limit` tokens (every fourth piece is
    an emoji delivered as three tokens when they fit)."""
    pieces: list[str] = []
    generated = k = 0
    while generated < limit:
        if k % 4 == 3 and generated + 3 <= limit:
            pieces.append(EMOJI)
            generated += 3
        else:
            pieces.append(("" if k == 0 else " ") + word)
            generated += 1
        k += 1
    return "".join(pieces)


def content_of(message: str | None) -> str:
    """The reply text an MCP progress message carries: heartbeats (`status: `), reasoning and tool-call text have
    none; content that itself starts with such a prefix comes after `content: `."""
    text = message or ""
    if text.startswith("content: "):
        return text[len("content: "):]
    return "" if text.startswith(("status: ", "reasoning: ", "tool_call: ")) else text


# ------------------------------------------------------------------------------------------ the server, from /proc


@dataclass
class Figures:
    rss_kb: int
    fds: int
    threads: int
    children: list[tuple[int, str]]  # (pid, state): zombies count too

    def line(self) -> str:
        return (f"RSS {self.rss_kb / 1024:.1f} MB, fds {self.fds}, threads {self.threads}, "
                f"children {len(self.children)} {[s for _, s in self.children]}")


def figures(pid: int) -> Figures:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    threads = re.search(r"Threads:\s+(\d+)", status)
    assert rss is not None and threads is not None, status
    children = child_processes(pid)
    return Figures(int(rss.group(1)), len(os.listdir(f"/proc/{pid}/fd")), int(threads.group(1)), children)


class ServerLog:
    """The server's stderr as read so far. `start_http_server` already reads the pipe (tests.servers.drain_log):
    this reads its copy. (A second reader of the same pipe gets only some of the lines: the soak once missed about
    half of the crashes and could have missed tracebacks that way.)"""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc

    @property
    def lines(self) -> list[str]:
        return server_log(self.proc).splitlines()

    def crashed_handles(self) -> list[str]:
        """The handles whose worker the server saw die of SIGSEGV, once per log line (a worker dies once)."""
        found = (re.search(r"worker for (h-[\w-]+) killed by SIGSEGV", line) for line in self.lines)
        return [m.group(1) for m in found if m]

    def tracebacks(self) -> list[str]:
        """Each traceback the server logged, with the line before it (what it was doing)."""
        lines = self.lines
        return ["\n".join(lines[max(i - 1, 0):i + 12]) for i, line in enumerate(lines) if "Traceback" in line]


def process_events(record_dir: Path) -> dict[int, Counter[str]]:
    """What the fake recorded in each process (its `process_events` file): pid -> kinds counted."""
    path = record_dir / "process_events"
    by_pid: dict[int, Counter[str]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        pid, kind = line.split()
        by_pid.setdefault(int(pid), Counter())[kind] += 1
    return by_pid


# ------------------------------------------------------------------------------------------ the soak's bookkeeping


class Soak:
    def __init__(self, base: str, sock: Path):
        self.base = base
        self.sock = sock
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.words = itertools.count(1)
        # What the next MCP or socket step does: in turn, so that every kind happens however slow the machine
        # (the points where runs are cut, the lengths and the pacing are random).
        self.mcp_steps = itertools.cycle(["run", "crash", "generate", "cancel", "run", "chat"])
        self.mcp_leave_loaded = itertools.cycle([True, False])
        self.socket_steps = itertools.cycle(["run", "close", "cancel", "crash", "run", "cancel"])

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def problem(self, message: str) -> None:
        with self.lock:
            self.problems.append(message)

    def word(self) -> str:
        return f"w{next(self.words)}q"

    def check(self, where: str, word: str, limit: int, text: str, finish: str | None = None,
              streamed: str | None = None) -> None:
        """Text of a run on `word`: a prefix of what the prompt makes (nobody else's tokens, none lost in between),
        all of it when the run ended by length; the streamed pieces, when given, join into it."""
        whole = expected_text(word, limit)
        if not whole.startswith(text):
            others = sorted(set(WORD.findall(text)) - {word})
            why = f"misrouted: {others}" if others else "tokens lost or out of order"
            self.problem(f"{where}: text of {word} is not a prefix of its own ({why}): {text[:160]!r}")
        elif finish == "length" and text != whole:
            self.problem(f"{where}: {word} ended by length with {len(text)} of {len(whole)} characters: {text!r}")
        if streamed is not None and streamed != text:
            self.problem(f"{where}: streamed text of {word} differs from its result: {streamed[:120]!r} != "
                         f"{text[:120]!r}")
        self.count(f"{where}: {finish or 'ended'}")

    def coded(self, where: str, code: Any, expected: tuple[str, ...] | None = None) -> None:
        """An error a client got: a code from the table (never INTERNAL), one of `expected` when given."""
        if not isinstance(code, str) or code not in ERRORS or code == "INTERNAL" or (expected and code not in
                                                                                         expected):
            self.problem(f"{where}: unexpected error code {code!r}")
        self.count(f"{where}: {code}")

    def prompt(self, word: str, rng: random.Random, crash: int | None = None) -> str:
        return f"{word} fake:delay_ms={rng.randint(5, 20)}" + (f" fake:crash={crash}" if crash is not None else "")

    # ---------------------------------------------------------------------------------------- running clients

    async def loop(self, name: str, stop_at: float, step: Callable[[random.Random], Awaitable[None]]) -> None:
        rng = random.Random(f"{SEED}-{name}")
        while time.monotonic() < stop_at:
            try:
                with anyio.fail_after(STEP_TIMEOUT):
                    await step(rng)
            except TimeoutError:
                self.problem(f"{name}: a step hung for {STEP_TIMEOUT:.0f} s")
            except Exception as exc:
                self.problem(f"{name}: {exc!r}\n{traceback.format_exc(limit=6)}")

    def thread_loop(self, name: str, stop_at: float, step: Callable[[random.Random], None]) -> None:
        rng = random.Random(f"{SEED}-{name}")
        while time.monotonic() < stop_at:
            try:
                step(rng)  # every socket read is bounded by STEP_TIMEOUT
            except TimeoutError:
                self.problem(f"{name}: a read hung for {STEP_TIMEOUT:.0f} s")
            except Exception as exc:
                self.problem(f"{name}: {exc!r}\n{traceback.format_exc(limit=6)}")

    async def run_all(self, seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(self.loop, f"mcp{i}", stop_at, self.mcp_session)
            for i in range(2):
                tg.start_soon(self.loop, f"openai{i}", stop_at, self.openai_stream)
            tg.start_soon(self.loop, "ollama", stop_at, self.ollama_stream)
            tg.start_soon(self.loop, "cycler", stop_at, self.load_cycle)
            tg.start_soon(self.in_thread, "socket", stop_at, self.socket_connection)
            tg.start_soon(self.in_thread, "abort", stop_at, self.socket_abort)

    async def in_thread(self, name: str, stop_at: float, step: Callable[[random.Random], None]) -> None:
        await anyio.to_thread.run_sync(self.thread_loop, name, stop_at, step)

    # ---------------------------------------------------------------------------------------- MCP sessions

    async def mcp_session(self, rng: random.Random) -> None:
        """One Streamable HTTP session: its own handle, runs with progress (some crashed, some cancelled),
        generate and chat by name; ended with its handle destroyed or still loaded."""
        async with Client(self.base + "/mcp", mode="legacy") as client:
            handle: str | None = None
            for _ in range(rng.randint(1, 4)):
                if handle is None:
                    made = await client.call_tool("rkllm_init", {"param": {
                        "model_path": f"{rng.choice(MODELS)}.rkllm", "max_new_tokens": 64}})
                    if made.is_error:
                        self.coded("mcp init", (made.structured_content or {}).get("error", {}).get("code"))
                        return
                    handle = str((made.structured_content or {})["handle"])
                step = next(self.mcp_steps)
                if step == "crash":
                    handle = await self.mcp_crash(client, handle, rng)
                elif step == "cancel":
                    await self.mcp_cancel(client, handle, rng)
                elif step in ("generate", "chat"):
                    await self.mcp_by_name(client, step, rng)
                else:
                    await self.mcp_run(client, handle, rng)
            if handle is not None and not next(self.mcp_leave_loaded):
                gone = await client.call_tool("rkllm_destroy", {"handle": handle})
                assert not gone.is_error, gone.structured_content
            else:
                self.count("mcp: session ended with its handle loaded" if handle else "mcp: session ended")

    async def mcp_run(self, client: Client, handle: str, rng: random.Random) -> None:
        word, limit = self.word(), rng.randint(4, 32)
        pieces: list[str] = []

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            pieces.append(content_of(message))

        r = await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": self.prompt(
            word, rng)}, "rkllm_infer_params": {"max_new_tokens": limit}}, progress_callback=progress)
        data = r.structured_content or {}
        if r.is_error:
            self.coded("mcp rkllm_run", data.get("error", {}).get("code"))
            self.check("mcp rkllm_run (failed)", word, limit, "".join(pieces))
            return
        self.check("mcp rkllm_run", word, limit, data["text"], data["finish_reason"], "".join(pieces))
        if data["finish_reason"] == "length" and data["token_count"] != limit:
            self.problem(f"mcp rkllm_run: {word} ended by length after {data['token_count']} of {limit} tokens")

    async def mcp_crash(self, client: Client, handle: str, rng: random.Random) -> str | None:
        """A run whose worker dies after a few tokens: RUNTIME_CRASHED, for that call and the next."""
        word, limit = self.word(), 24
        pieces: list[str] = []

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            pieces.append(content_of(message))

        r = await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": self.prompt(
            word, rng, crash=rng.randint(1, 6))}, "rkllm_infer_params": {"max_new_tokens": limit}},
            progress_callback=progress)
        self.check("mcp crash (streamed)", word, limit, "".join(pieces))
        if not r.is_error:
            self.problem(f"mcp crash: the run on {word} did not fail: {r.structured_content}")
            return handle
        self.coded("mcp crash", (r.structured_content or {}).get("error", {}).get("code"), ("RUNTIME_CRASHED",))
        after = await client.call_tool("rkllm_is_running", {"handle": handle})
        self.coded("mcp crash, then", (after.structured_content or {}).get("error", {}).get("code"),
                   ("RUNTIME_CRASHED",))
        return None

    async def mcp_cancel(self, client: Client, handle: str, rng: random.Random) -> None:
        """A run cancelled by the client at a random point: the handle stops running and serves the next."""
        word, limit = self.word(), 64
        pieces: list[str] = []
        started = anyio.Event()

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            pieces.append(content_of(message))
            started.set()

        async def run() -> None:
            try:
                await client.call_tool("rkllm_run", {"handle": handle, "rkllm_input": {
                    "prompt_input": self.prompt(word, rng)}, "rkllm_infer_params": {"max_new_tokens": limit}},
                    progress_callback=progress)
            finally:
                started.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            await anyio.sleep(rng.choice([0, 0.01, 0.05, 0.1]))
            tg.cancel_scope.cancel()
        self.check("mcp cancelled (streamed)", word, limit, "".join(pieces))
        while True:  # bounded by the step's timeout
            r = await client.call_tool("rkllm_is_running", {"handle": handle})
            if r.is_error or not (r.structured_content or {}).get("running"):
                break
            await anyio.sleep(0.02)
        self.count("mcp: cancelled a run")

    async def mcp_by_name(self, client: Client, tool: str, rng: random.Random) -> None:
        word, limit, model = self.word(), rng.randint(4, 24), rng.choice(MODELS)
        pieces: list[str] = []

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            pieces.append(content_of(message))

        prompt = self.prompt(word, rng)
        args = ({"model": model, "prompt": prompt, "max_new_tokens": limit} if tool == "generate" else
                {"model": model, "messages": [{"role": "user", "content": prompt}], "max_new_tokens": limit})
        r = await client.call_tool(tool, args, progress_callback=progress)
        data = r.structured_content or {}
        if r.is_error:  # its shared handle unloaded or crashed by another client, a full queue, ...
            self.coded(f"mcp {tool}", data.get("error", {}).get("code"))
            self.check(f"mcp {tool} (failed)", word, limit, "".join(pieces))
            return
        self.check(f"mcp {tool}", word, limit, data["content"], data["finish_reason"], "".join(pieces))

    # ---------------------------------------------------------------------------------------- OpenAI and Ollama

    async def openai_stream(self, rng: random.Random) -> None:
        """A streamed chat completion, dropped after a few events or read to [DONE]; a few crash their worker."""
        crash = rng.randint(1, 6) if rng.random() < 0.1 else None
        word, limit, model = self.word(), 24 if crash else rng.randint(4, 32), rng.choice(MODELS)
        drop = rng.choice([None, None, 1, 2, 4, 8])
        body = {"model": model, "stream": True, "max_tokens": limit,
                "messages": [{"role": "user", "content": self.prompt(word, rng, crash)}]}
        text, finish, error, done, events_read = "", None, None, False, 0
        async with httpx.AsyncClient(base_url=self.base, timeout=STEP_TIMEOUT) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                self.coded(f"openai HTTP {response.status_code}", response.json()["error"]["code"])
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    error = event["error"]["code"]
                    continue
                for choice in event["choices"]:
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
                events_read += 1
                if drop is not None and events_read >= drop:
                    break  # hang up mid-stream
        if done:
            if error is not None:
                # A worker that died after the cycler unloaded its model answers as a freed handle does.
                self.coded("openai stream", error, ("RUNTIME_CRASHED", "CANCELLED", "UNKNOWN_HANDLE") if crash
                           else None)
            elif finish is None:
                self.problem(f"openai: the stream of {word} ended without a finish_reason")
            elif crash is not None and finish == "length":  # "stop" if an unload cut it first
                self.problem(f"openai: the crashing run of {word} finished {finish}")
            self.check("openai", word, limit, text, finish if error is None else None)
        else:
            self.check("openai (dropped)", word, limit, text)

    async def ollama_stream(self, rng: random.Random) -> None:
        """A streamed /api/chat, dropped after a few lines or read to done; a few crash their worker."""
        crash = rng.randint(1, 6) if rng.random() < 0.1 else None
        word, limit, model = self.word(), 24 if crash else rng.randint(4, 32), rng.choice(MODELS)
        drop = rng.choice([None, None, 1, 3, 6])
        body = {"model": model, "stream": True, "options": {"num_predict": limit},
                "messages": [{"role": "user", "content": self.prompt(word, rng, crash)}]}
        text, final, error, lines = "", None, None, 0
        async with httpx.AsyncClient(base_url=self.base, timeout=STEP_TIMEOUT) as http, \
                http.stream("POST", "/api/chat", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                self.coded(f"ollama HTTP {response.status_code}", str(response.json()["error"]).split(":")[0])
                return
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if "error" in event:
                    error = str(event["error"]).split(":")[0]
                    break
                text += event["message"]["content"]
                if event.get("done"):
                    final = event
                    break
                lines += 1
                if drop is not None and lines >= drop:
                    break
        if error is not None:
            self.coded("ollama stream", error, ("RUNTIME_CRASHED", "CANCELLED") if crash else None)
            self.check("ollama (failed)", word, limit, text)
        elif final is not None:
            reason = final["done_reason"]
            if crash is not None and reason == "length":  # "stop" if an unload cut it first
                self.problem(f"ollama: the crashing run of {word} finished {reason}")
            if reason == "length" and final["eval_count"] != limit:
                self.problem(f"ollama: {word} ended by length after {final['eval_count']} of {limit} tokens")
            self.check("ollama", word, limit, text, "length" if reason == "length" else None)
        else:
            self.check("ollama (dropped)", word, limit, text)

    # ---------------------------------------------------------------------------------------- load / unload

    async def rpc(self, http: httpx.AsyncClient, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A stateless JSON-RPC call over HTTP: its response (result or error)."""
        response = await http.post("/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        answer: dict[str, Any] = response.json()
        return answer

    async def load_cycle(self, rng: random.Random) -> None:
        """load_model, one generate on the new handle, unload_model by name (every shared handle of the model,
        whoever is running on it), then a pause."""
        model = rng.choice(MODELS)
        async with httpx.AsyncClient(base_url=self.base, timeout=STEP_TIMEOUT) as http:
            loaded = await self.rpc(http, "load_model", {"model": model})
            if "error" in loaded:
                self.coded("cycler load_model", loaded["error"]["data"]["code"])
            else:
                word, limit = self.word(), rng.randint(2, 8)
                ran = await self.rpc(http, "generate", {"handle": loaded["result"]["handle"], "max_new_tokens": limit,
                                                        "prompt": self.prompt(word, rng)})
                if "error" in ran:  # a crash or an unload by another client
                    self.coded("cycler generate", ran["error"]["data"]["code"])
                else:
                    self.check("cycler generate", word, limit, ran["result"]["content"], ran["result"]["finish_reason"])
            await anyio.sleep(rng.uniform(0.2, 1.5))
            gone = await self.rpc(http, "unload_model", {"model": model})
            if "error" in gone:
                self.coded("cycler unload_model", gone["error"]["data"]["code"], ("MODEL_NOT_FOUND",))
            else:
                self.count("cycler: unloaded")
        await anyio.sleep(rng.uniform(0.5, 2.0))

    # ---------------------------------------------------------------------------------------- the JSON-RPC socket

    def read_run(self, conn: RpcConn, request_id: int, stop_after: int | None = None
                 ) -> tuple[str, dict[str, Any] | None]:
        """Callbacks of a run until its response (or `stop_after` callbacks with text): (streamed text, response)."""
        streamed, seen = "", 0
        while True:
            message = conn.recv()
            if message.get("method") == "rkllm.callback":
                params = message["params"]
                if params["request_id"] != request_id:
                    self.problem(f"socket: a callback for request {params['request_id']} on {request_id}'s run")
                if params.get("kind", "content") != "content":
                    continue  # a heartbeat (loading, reading the prompt)
                streamed += params.get("text") or ""
                seen += bool(params.get("text"))
                if stop_after is not None and seen >= stop_after:
                    return streamed, None
            elif "id" in message:
                if message["id"] != request_id:
                    self.problem(f"socket: the answer to {message['id']} came for {request_id}")
                return streamed, message

    def socket_connection(self, rng: random.Random) -> None:
        """One connection with a handle of its own: runs read to the end, crashed, cancelled with $/cancelRequest,
        or cut by closing the connection mid-run (its run aborted, its handle freed)."""
        with RpcConn(self.sock, timeout=STEP_TIMEOUT) as conn:
            handle: str | None = None
            ids = itertools.count(1)
            for _ in range(rng.randint(1, 4)):
                if handle is None:
                    _, made = conn.call("rkllm.init", [None, {"model_path": f"{rng.choice(MODELS)}.rkllm",
                                                              "max_new_tokens": 64}, None], next(ids))
                    if "error" in made:
                        self.coded("socket init", made["error"]["data"]["code"])
                        return
                    handle = str(made["result"]["handle"])
                step = next(self.socket_steps)
                crash = rng.randint(1, 6) if step == "crash" else None
                word, limit, request_id = self.word(), (24 if crash else rng.randint(4, 40)), next(ids)
                conn.send({"jsonrpc": "2.0", "id": request_id, "method": "rkllm.run", "params": {
                    "handle": handle, "rkllm_input": {"prompt_input": self.prompt(word, rng, crash)},
                    "rkllm_infer_params": {"max_new_tokens": limit}}})
                if step == "close":  # hang up mid-run: the connection's run is aborted and its handle freed
                    streamed, response = self.read_run(conn, request_id, rng.randint(1, 3))
                    self.check("socket (closed mid-run)", word, limit, streamed)
                    self.count("socket: closed mid-run")
                    return
                cancel_after = rng.randint(1, 3) if step == "cancel" else None
                streamed, response = self.read_run(conn, request_id, cancel_after)
                if response is None:
                    conn.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": request_id}})
                    more, response = self.read_run(conn, request_id)
                    streamed += more
                    assert response is not None
                    if "error" in response:
                        self.coded("socket cancelled", response["error"]["data"]["code"], ("CANCELLED",))
                        self.check("socket cancelled", word, limit, streamed)
                        continue
                if "error" in response:
                    code = response["error"]["data"]["code"]
                    self.coded("socket run", code, ("RUNTIME_CRASHED",) if crash else None)
                    self.check("socket run (failed)", word, limit, streamed)
                    if code == "RUNTIME_CRASHED":
                        handle = None
                    continue
                if crash:
                    self.problem(f"socket: the crashing run of {word} ended {response['result']['finish_reason']}")
                result = response["result"]
                self.check("socket run", word, limit, result["text"], result["finish_reason"], streamed)
            self.count("socket: closed with its handle loaded" if handle else "socket: closed")

    def socket_abort(self, rng: random.Random) -> None:
        """A shared handle (load_model) running on one connection, aborted with rkllm.abort from another, then
        unloaded by handle."""
        with RpcConn(self.sock, timeout=STEP_TIMEOUT) as runner, RpcConn(self.sock, timeout=STEP_TIMEOUT) as other:
            _, loaded = runner.call("load_model", {"model": rng.choice(MODELS)}, 1)
            if "error" in loaded:
                self.coded("abort load_model", loaded["error"]["data"]["code"])
                return
            handle = loaded["result"]["handle"]
            word, limit = self.word(), 64
            runner.send({"jsonrpc": "2.0", "id": 2, "method": "rkllm.run", "params": {
                "handle": handle, "rkllm_input": {"prompt_input": self.prompt(word, rng)},
                "rkllm_infer_params": {"max_new_tokens": limit}}})
            streamed, response = self.read_run(runner, 2, rng.randint(1, 4))
            if response is None:
                _, aborted = other.call("rkllm.abort", [handle], 7)
                if "error" in aborted:  # unloaded by the cycler meanwhile
                    self.coded("abort rkllm.abort", aborted["error"]["data"]["code"], ("UNKNOWN_HANDLE",))
                more, response = self.read_run(runner, 2)
                streamed += more
                assert response is not None
            if "error" in response:
                self.coded("abort run", response["error"]["data"]["code"])
                self.check("abort run (failed)", word, limit, streamed)
            else:
                self.check("abort run", word, limit, response["result"]["text"], response["result"]["finish_reason"],
                           streamed)
            _, gone = other.call("unload_model", {"handle": handle}, 8)
            if "error" in gone:
                self.coded("abort unload_model", gone["error"]["data"]["code"], ("UNKNOWN_HANDLE",
                                                                                  "RUNTIME_CRASHED"))
        time.sleep(rng.uniform(0.1, 0.5))


# ------------------------------------------------------------------------------------------ the test


async def status(base: str) -> tuple[list[str], list[dict[str, Any]]]:
    """server_status' handles and loaded_models, from fresh stateless requests (they see the shared handles)."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        answers = []
        for method in ("server_status", "loaded_models"):
            r = await http.post("/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": {}})
            answers.append(r.json()["result"])
    return answers[0]["handles"], answers[1]["loaded"]


async def unload_everything(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for model in MODELS:
            r = await http.post("/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": "unload_model",
                                                  "params": {"model": model}})
            assert "result" in r.json() or r.json()["error"]["data"]["code"] == "MODEL_NOT_FOUND", r.text


async def settled(pid: int, ok: Callable[[Figures], bool]) -> Figures:
    """The server's figures once `ok` holds (or after SETTLE_SECONDS, whatever they are then)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    await anyio.sleep(2)
    while not ok(now := figures(pid)) and time.monotonic() < deadline:
        await anyio.sleep(0.5)
    return now


async def test_soak_under_load(tmp_path: Path) -> None:
    for model in MODELS:
        (tmp_path / f"{model}.rkllm").write_bytes(b"fake model")
    records = tmp_path / "records"
    sock = tmp_path / "rpc.sock"
    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", version="1.3.0"), records, port,
                             MCP_RKLLM_SOCKET=str(sock), MCP_RKLLM_BUSY_TIMEOUT="30",
                             MCP_RKLLM_MAX_LOADED_MODELS="16")
    stderr = ServerLog(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "the server did not create its socket"
            await anyio.sleep(0.05)
        soak = Soak(base, sock)
        started = time.monotonic()
        await soak.run_all(WARMUP_SECONDS)
        warmup_s = time.monotonic() - started
        await unload_everything(base)
        before = await settled(proc.pid, lambda f: not f.children)
        assert before.children == [], f"workers left after the warm-up: {before.children}"
        assert await status(base) == ([], [])

        started = time.monotonic()
        await soak.run_all(SOAK_SECONDS)
        load_s = time.monotonic() - started
        # Every client has finished: what remains loaded is shared (a fresh request sees it all), one worker each.
        # The sessions' and connections' own handles are freed as they end (a worker each): wait for that.
        handles, loaded = await status(base)
        during = await settled(proc.pid, lambda f: len(f.children) == len(handles))
        handles, loaded = await status(base)
        assert sorted(e["handle"] for e in loaded) == sorted(handles)
        assert sorted(p for p, _ in during.children) == sorted(e["pid"] for e in loaded), (
            f"worker processes {during.children} are not the loaded handles' {loaded}")
        await unload_everything(base)
        after = await settled(proc.pid, lambda f: not f.children and f.fds <= before.fds + FD_SLACK
                              and f.threads <= before.threads + THREAD_SLACK)
        remaining = await status(base)
        kinds = events(records)
        crashed = stderr.crashed_handles()
        print(f"\nsoak: {warmup_s:.0f} s of warm-up and {load_s:.0f} s of load (seed {SEED}), "
              f"{sum(soak.counts.values())} outcomes:")
        for key, n in sorted(soak.counts.items()):
            print(f"  {n:5d}  {key}")
        print(f"  fake: {kinds.count('init')} inits, {kinds.count('destroy')} destroys, {len(crashed)} workers "
              f"crashed, {kinds.count('run')} runs, {kinds.count('abort_while_running')} aborts of a running run")
        # Every worker that loaded a model either ran rkllm_destroy or died of a requested crash, once, in the
        # fake's own per-process record; the server saw each of those crashes.
        workers = {pid: c for pid, c in process_events(records).items() if c["init"]}
        unexplained = {pid: dict(c) for pid, c in workers.items()
                       if c["init"] != 1 or c["destroy"] + c["segv"] != 1}
        print(f"  workers: {len(workers)} loaded a model, {sum(c['destroy'] > 0 for c in workers.values())} ran "
              f"rkllm_destroy, {sum(c['segv'] > 0 for c in workers.values())} crashed; unexplained: {unexplained}")
        tracebacks = stderr.tracebacks()
        print(f"  server log: {len(stderr.lines)} lines, {len(tracebacks)} tracebacks")
        print(f"  after warm-up: {before.line()}")
        print(f"  after load:    {during.line()} ({len(handles)} shared handles loaded)")
        print(f"  all unloaded:  {after.line()}")
        print(f"  RSS {before.rss_kb / 1024:.1f} -> {after.rss_kb / 1024:.1f} MB, fds {before.fds} -> {after.fds}, "
              f"threads {before.threads} -> {after.threads}, children {len(before.children)} -> "
              f"{len(after.children)}")
        assert soak.problems == [], "\n".join(soak.problems[:30])
        assert tracebacks == [], "the server logged tracebacks:\n" + "\n\n".join(tracebacks[:5])
        assert remaining == ([], []), f"handles left after every session ended and every model was unloaded: " \
                                      f"{remaining}"
        assert after.children == [], f"orphan workers (or zombies): {after.children}"
        assert after.rss_kb - before.rss_kb < RSS_GROWTH_MB * 1024, "the server's memory grew"
        assert after.fds <= before.fds + FD_SLACK, "file descriptors leaked"
        assert after.threads <= before.threads + THREAD_SLACK, "threads leaked"
        assert kinds.count("run_while_busy") == 0, "a run reached a handle that was still running another"
        assert unexplained == {}, f"workers (pid: what the fake recorded) that loaded a model and neither freed it " \
                                  f"with rkllm_destroy nor crashed, or did either twice: {unexplained}"
        assert len(crashed) == len(set(crashed)) == kinds.count("segv"), \
            f"the server logged {len(crashed)} crashes of workers, the fake crashed {kinds.count('segv')}"
        assert kinds.count("init") == kinds.count("destroy") + len(crashed), "a loaded model was neither freed " \
                                                                             "nor crashed"
        for what in ("mcp: session ended with its handle loaded", "socket: closed mid-run",
                     "socket: closed with its handle loaded", "mcp: cancelled a run", "cycler: unloaded",
                     "mcp crash: RUNTIME_CRASHED", "socket cancelled: CANCELLED", "mcp chat", "mcp generate",
                     "openai (dropped)", "ollama (dropped)"):
            assert any(key.startswith(what) for key in soak.counts), f"the soak never did: {what}"
        assert any("abort" in key and key.endswith(": abort") for key in soak.counts), "no rkllm.abort hit a run"
    finally:
        stop(proc)
        with contextlib.suppress(OSError):
            sock.unlink()
