"""WorkerRuntime: any runtime in a supervised child process, one per loaded model.

The server talks to each child over a private socket (`multiprocessing.connection` framing,
pickled messages): calls go down, results and run events come up, events batched when they
arrive faster than the socket takes them. The child's stdout is its stderr, and the server keeps
the last lines of it. When a child dies (signal, OOM kill, exit), the call in flight and every
later call on that handle raise RUNTIME_CRASHED with the signal or exit code and those lines;
other handles are untouched. A child exits when its socket closes, so children die with the
server even when the server is killed with SIGKILL; the server reaps every child it started.

Run as `python -m mcp_rkllm.runtime.worker --fd N --runtime native|cpu [...]` (by the server only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.runtime.base import EventSink, LoadedModel, RunEvent, Runtime, Token, TokenBatch, Waiting
from mcp_rkllm.streaming.relay import MIN_INTERVAL_SECONDS
from mcp_rkllm.structs import (
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
    RunResult,
)

log = logging.getLogger(__name__)

#: Lines of a worker's stderr kept for the RUNTIME_CRASHED message.
STDERR_LINES = 20
#: Seconds a worker gets to exit after destroy before it is killed.
EXIT_GRACE = 5.0


def _error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, RkllmError):
        return {"code": exc.code, "function": exc.function, "rc": exc.rc, "fields": exc.fields}
    return {"code": "INTERNAL", "function": None, "rc": None,
            "fields": {"detail": f"{type(exc).__name__} in the worker: {exc}"}}


def _error_from_wire(data: dict[str, Any]) -> RkllmError:
    return RkllmError(data["code"], function=data["function"], rc=data["rc"], **data["fields"])


# =========================================================================== the child


class _Batcher:
    """Sends a run's events up the socket: tokens as TokenBatch (texts and ids, cheap to pickle),
    coalescing what arrives while a send is in progress or within MIN_INTERVAL_SECONDS of the last."""

    def __init__(self, send: Callable[[Any], None], call_id: int):
        self._send = send
        self._call_id = call_id
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._others: list[RunEvent] = []  # hidden states, logits, finish, error: sent after the tokens
        self._lock = threading.Lock()
        self._pending = False
        self._idle = threading.Event()
        self._idle.set()

    def sink(self, event: RunEvent) -> None:
        with self._lock:
            kind = type(event)
            if kind is Token:
                self._texts.append(event.text)  # type: ignore[union-attr]
                self._ids.append(event.token_id)  # type: ignore[union-attr]
            elif kind is Waiting:
                self._texts.append("")
                self._ids.append(event.token_id)  # type: ignore[union-attr]
            else:
                self._others.append(event)
            if self._pending:
                return
            self._pending = True
            self._idle.clear()
        threading.Thread(target=self._drain, daemon=True).start()

    def _take(self) -> list[Any]:
        with self._lock:
            batch: list[Any] = [TokenBatch(self._texts, self._ids)] if self._ids else []
            batch += self._others
            self._texts, self._ids, self._others = [], [], []
            if not batch:
                self._pending = False
                self._idle.set()
            return batch

    def _drain(self) -> None:
        while batch := self._take():
            self._send(("events", self._call_id, batch))
            time.sleep(MIN_INTERVAL_SECONDS)  # a burst: let the next batch grow (spaced tokens go at once)

    def flush(self) -> None:
        """Wait until every event handed to sink() has been sent."""
        self._idle.wait()


def _open_inner(kind: str, library: str | None, abi: str | None) -> Runtime:
    from mcp_rkllm.runtime import open_runtime

    settings = Settings(runtime="native" if kind == "native" else "cpu", library=library, abi=abi, isolation="none")
    return open_runtime(settings)[0]


def child_main(argv: list[str]) -> None:
    """The worker process: serve one runtime (and at most one model) over the inherited socket."""
    p = argparse.ArgumentParser()
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--runtime", choices=["native", "cpu"], required=True)
    p.add_argument("--library")
    p.add_argument("--abi")
    args = p.parse_args(argv)
    os.dup2(2, 1)  # the native library's printf goes to stderr, never into the socket
    sys.stdout = sys.stderr
    conn = Connection(args.fd)
    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            conn.send(message)

    runtime: Runtime | None = None
    model: LoadedModel | None = None
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-call")

    def reply(call_id: int, fn: Callable[[], Any]) -> None:
        try:
            send(("result", call_id, fn()))
        except BaseException as exc:
            send(("error", call_id, _error_to_wire(exc)))

    def run(call_id: int, method: str, args: tuple[Any, ...]) -> None:
        assert model is not None
        batcher = _Batcher(send, call_id)
        if method == "run":
            def go() -> RunResult:
                try:
                    return model.run(args[0], args[1], batcher.sink)  # type: ignore[union-attr]
                finally:
                    batcher.flush()
            reply(call_id, go)
        else:  # run_async: answer at once, then report the end
            def started() -> None:
                async_run = model.run_async(args[0], args[1], batcher.sink)  # type: ignore[union-attr]

                def done(result: RunResult) -> None:
                    batcher.flush()
                    send(("async_done", call_id, result))

                async_run.add_done_callback(done)
            reply(call_id, started)

    def dispatch(call_id: int, method: str, args: tuple[Any, ...]) -> None:
        nonlocal runtime, model
        if method == "open":
            def opened() -> dict[str, Any]:
                nonlocal runtime
                runtime = _open_inner(args[0], args[1], args[2])
                return {"describe": runtime.describe(), "default": runtime.create_default_param(),
                        "name": runtime.name, "abi": runtime.abi}
            reply(call_id, opened)
        elif method == "init":
            def inited() -> dict[str, Any]:
                nonlocal model
                assert runtime is not None
                model = runtime.init(args[0])
                return {"max_new_tokens": model.max_new_tokens, "n_batch": model.n_batch,
                        "extras": [n for n in ("prime_history", "tokenize") if hasattr(model, n)]}
            reply(call_id, inited)
        elif method in ("run", "run_async"):
            run(call_id, method, args)
        else:
            reply(call_id, lambda: getattr(model, method)(*args))

    # Calls that must not wait behind a run are answered on the reading thread itself.
    inline = {"abort", "is_running", "get_kv_cache_size"}
    while True:
        try:
            call_id, method, call_args = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone (or closed us): nothing to serve
        if method in inline:
            dispatch(call_id, method, call_args)
        elif method == "exit":
            send(("result", call_id, None))
            os._exit(0)
        else:
            executor.submit(dispatch, call_id, method, call_args)


# =========================================================================== the server side


class _Worker:
    """One child process and its socket: calls, events, supervision."""

    def __init__(self, kind: str, settings: Settings, label: str):
        self.kind = kind
        self.label = label
        parent, child = socket.socketpair()
        cmd = [sys.executable, "-m", "mcp_rkllm.runtime.worker", "--fd", str(child.fileno()), "--runtime", kind]
        if settings.library:
            cmd += ["--library", settings.library]
        if settings.abi:
            cmd += ["--abi", settings.abi]
        self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        child.close()
        self.conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self.sinks: dict[int, EventSink] = {}
        self.async_done: dict[int, Callable[[RunResult], None]] = {}
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.crash: RkllmError | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"worker-{self.proc.pid}", daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_stderr, name=f"worker-{self.proc.pid}-err",
                                            daemon=True)
        self._err_reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr.append(line)
            log.info("[%s pid %d] %s", self.label, self.proc.pid, line)

    def _read(self) -> None:
        try:
            while True:
                kind, call_id, payload = self.conn.recv()
                if kind == "events":
                    sink = self.sinks.get(call_id)
                    if sink is not None:
                        for event in payload:
                            sink(event)
                elif kind == "async_done":
                    callback = self.async_done.pop(call_id, None)
                    self.sinks.pop(call_id, None)
                    if callback is not None:
                        callback(payload)
                else:
                    future = self._calls.pop(call_id, None)
                    if future is None:
                        continue
                    if kind == "result":
                        future.set_result(payload)
                    else:
                        future.set_exception(_error_from_wire(payload))
        except (EOFError, OSError):
            pass
        self._died()

    def _died(self) -> None:
        try:
            code = self.proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._err_reader.join(1.0)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        tail = "; ".join(list(self.stderr)[-5:])
        self.crash = RkllmError("RUNTIME_CRASHED", handle=self.label, pid=self.proc.pid,
                                detail=how + (f"; its last lines: {tail}" if tail else ""),
                                exit_code=code, stderr_tail=list(self.stderr))
        if not self._closing:
            log.error("worker for %s %s", self.label, self.crash.fields["detail"])
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(self.crash)
        self._calls.clear()
        for call_id, callback in list(self.async_done.items()):
            callback(RunResult(finish_reason="error", error=self.crash.message))
            self.async_done.pop(call_id, None)
        with contextlib.suppress(OSError):
            self.conn.close()

    @property
    def alive(self) -> bool:
        return self.crash is None

    def start(self, method: str, *args: Any,
              sink: EventSink | None = None) -> tuple[int, concurrent.futures.Future[Any]]:
        """Send a call; returns its id and the future of its result."""
        if self.crash is not None:
            raise RkllmError(self.crash.code, **self.crash.fields)
        call_id = next(self._ids)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls[call_id] = future
        if sink is not None:
            self.sinks[call_id] = sink
        try:
            with self._send_lock:
                self.conn.send((call_id, method, args))
        except OSError:
            self._reader.join(EXIT_GRACE)  # the reader turns the death into self.crash
            self._calls.pop(call_id, None)
            raise RkllmError(self.crash.code, **self.crash.fields) if self.crash else RkllmError(
                "RUNTIME_CRASHED", handle=self.label, detail="the worker's socket closed") from None
        return call_id, future

    def call(self, method: str, *args: Any) -> Any:
        """Send a call and wait for its result (re-raising the worker's error as it was raised there)."""
        return self.start(method, *args)[1].result()

    def close(self) -> None:
        """Ask the worker to exit, then make sure it has, and reap it."""
        self._closing = True
        if self.crash is None:
            with contextlib.suppress(RkllmError):
                self.start("exit")[1].result(EXIT_GRACE)
        with contextlib.suppress(OSError):
            self.conn.close()
        self._reader.join(EXIT_GRACE + 1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class _WorkerAsyncRun:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._callbacks: list[Callable[[RunResult], None]] = []
        self._lock = threading.Lock()

    def finish(self, result: RunResult) -> None:
        with self._lock:
            self._result = result
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(result)

    def wait(self, timeout: float | None = None) -> RunResult | None:
        return self._result if self._done.wait(timeout) else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        assert self._result is not None
        fn(self._result)


class WorkerModel:
    """A LoadedModel living in its own process."""

    def __init__(self, worker: _Worker, info: dict[str, Any]):
        self.worker = worker
        self.max_new_tokens = int(info["max_new_tokens"])
        self.n_batch = int(info["n_batch"])
        if "prime_history" in info["extras"]:
            self.prime_history = lambda messages: worker.call("prime_history", messages)
        if "tokenize" in info["extras"]:
            self.tokenize = lambda text: worker.call("tokenize", text)

    def set_label(self, label: str) -> None:
        """Name the worker (its handle) in logs and crash reports."""
        self.worker.label = label

    @property
    def crash(self) -> RkllmError | None:
        """Why the worker died, or None while it lives."""
        return self.worker.crash

    @property
    def pid(self) -> int:
        return self.worker.proc.pid

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        call_id, future = self.worker.start("run", rkllm_input, rkllm_infer_params, sink=sink)
        try:
            return future.result()  # type: ignore[no-any-return]
        finally:
            self.worker.sinks.pop(call_id, None)

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam,
                  sink: EventSink) -> _WorkerAsyncRun:
        async_run = _WorkerAsyncRun()
        call_id, future = self.worker.start("run_async", rkllm_input, rkllm_infer_params, sink=sink)
        self.worker.async_done[call_id] = async_run.finish
        try:
            future.result()
        except BaseException:
            self.worker.async_done.pop(call_id, None)
            self.worker.sinks.pop(call_id, None)
            raise
        return async_run

    def abort(self) -> None:
        if self.worker.alive:
            self.worker.call("abort")

    def is_running(self) -> bool:
        return bool(self.worker.alive and self.worker.call("is_running"))

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None = None,
                       end_pos: list[int] | None = None) -> None:
        self.worker.call("clear_kv_cache", keep_system_prompt, start_pos, end_pos)

    def get_kv_cache_size(self) -> list[int]:
        return list(self.worker.call("get_kv_cache_size"))

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        self.worker.call("set_chat_template", system_prompt, prompt_prefix, prompt_postfix)

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        self.worker.call("set_function_tools", system_prompt, tools, tool_response_str)

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        self.worker.call("set_cross_attn_params", cross_attn_params)

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        self.worker.call("load_lora", lora_adapter)

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        self.worker.call("load_prompt_cache", prompt_cache_path)

    def release_prompt_cache(self) -> None:
        self.worker.call("release_prompt_cache")

    def destroy(self) -> None:
        """rkllm_destroy in the worker, then the worker exits. Idempotent; a dead worker just gets reaped."""
        try:
            if self.worker.alive:
                self.worker.call("destroy")
        finally:
            self.worker.close()


class WorkerRuntime:
    """A Runtime whose models each live in their own supervised process."""

    def __init__(self, kind: str, settings: Settings):
        self.kind = kind
        self.settings = settings
        probe = _Worker(kind, settings, "probe")
        try:
            info = probe.call("open", kind, settings.library, settings.abi)
        finally:
            probe.close()
        self.name: str = info["name"]
        self.abi: str = info["abi"]
        self._describe: dict[str, object] = {**info["describe"], "isolation": "process"}
        self._default: RKLLMParam = info["default"]

    def describe(self) -> dict[str, object]:
        return dict(self._describe)

    def create_default_param(self) -> RKLLMParam:
        return self._default.model_copy(deep=True)

    def init(self, param: RKLLMParam) -> WorkerModel:
        """Start a worker, open the runtime in it, and rkllm_init the model there."""
        worker = _Worker(self.kind, self.settings, f"(loading {os.path.basename(param.model_path or '?')})")
        try:
            worker.call("open", self.kind, self.settings.library, self.settings.abi)
            info = worker.call("init", param)
        except RkllmError as exc:
            worker.close()
            if exc.code == "RUNTIME_CRASHED":
                exc.function = "rkllm_init"
            raise
        return WorkerModel(worker, info)


if __name__ == "__main__":
    child_main(sys.argv[1:])
