"""WorkerRuntime: any runtime in supervised child processes, one per loaded model.

The server talks to each child over a private socket (typed messages, `isolation.messages`):
requests go down, replies, run events and heartbeats come up. A child that dies (signal, OOM
kill, exit) fails the call in flight and every later call on that handle with RUNTIME_CRASHED,
naming the signal or exit code and its last stderr lines. A child that stops answering (SIGSTOP,
a wedged driver) fails them with RUNTIME_TIMEOUT: no heartbeat for `worker_timeout` seconds fails
every pending call (runs included), and a call not answered within its timeout fails alone.
Nothing here ever waits without a bound. A child exits when its socket closes, so children die
with the server even when the server is killed with SIGKILL; the server reaps every child.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import AsyncRun, EventSink, RunCollector, collector_for
from mcp_rkllm.isolation import messages as m
from mcp_rkllm.runtime.base import effective_max_new_tokens
from mcp_rkllm.runtime.vision import EncoderShape
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


@dataclass(frozen=True)
class WorkerLimits:
    """How long a worker may take: to answer a call or show a heartbeat, and to load a model."""

    call_timeout: float = 30.0
    load_timeout: float = 600.0

    @property
    def heartbeat(self) -> float:
        """Seconds between the worker's heartbeats: a few per timeout."""
        return max(0.02, min(1.0, self.call_timeout / 5))


@dataclass
class _Pending:
    future: concurrent.futures.Future[Any]
    collector: RunCollector | None = None
    async_run: AsyncRun | None = None


def _with_outcome(collector: RunCollector, outcome: m.RunOutcome) -> RunResult:
    if outcome.output_error is not None and collector.output_error is None:
        code, fields = outcome.output_error
        collector.output_error = RkllmError(code, **fields)  # dropped in the worker: the caller sees it here
    result = collector.result()
    result.finish_reason = outcome.finish_reason
    result.error = outcome.error
    if outcome.perf is not None:
        result.perf = outcome.perf
    return result


class Worker:
    """One child process and its socket: requests, events, heartbeats, supervision."""

    def __init__(self, limits: WorkerLimits, label: str):
        self.limits = limits
        self.label = label
        parent, child = socket.socketpair()
        cmd = [sys.executable, "-m", "mcp_rkllm.isolation.child", "--fd", str(child.fileno()),
               "--heartbeat", str(limits.heartbeat)]
        self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        child.close()
        self.conn = Connection(parent.detach())
        # Requests go out through a writer thread: a stopped worker that does not read can block a
        # send of a big request for ever, and no caller may wait on that.
        self._outbox: queue.SimpleQueue[tuple[int, m.Request] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.crash: RkllmError | None = None
        self.unresponsive_since: float | None = None
        self._last_seen = time.monotonic()
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"worker-{self.proc.pid}", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name=f"worker-{self.proc.pid}-out", daemon=True)
        self._writer.start()
        self._err_reader = threading.Thread(target=self._read_stderr, name=f"worker-{self.proc.pid}-err",
                                            daemon=True)
        self._err_reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ----------------------------------------------------------------- reading (its own thread)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr.append(line)
            log.info("[%s pid %d] %s", self.label, self.proc.pid, line)

    def _write(self) -> None:
        while (item := self._outbox.get()) is not None:
            try:
                self.conn.send(item)
            except (OSError, ValueError):
                return  # the worker is gone: the reader turns that into RUNTIME_CRASHED

    def _read(self) -> None:
        try:
            while True:
                if not self.conn.poll(self.limits.heartbeat):
                    if time.monotonic() - self._last_seen > self.limits.call_timeout:
                        self._stalled()
                    continue
                message = self.conn.recv()
                self._last_seen = time.monotonic()
                if self.unresponsive_since is not None:
                    # Its calls were failed meanwhile: a run it was doing has nobody waiting for it.
                    log.warning("worker for %s answers again; aborting what it was running", self.label)
                    self.unresponsive_since = None
                    self._outbox.put((0, m.Abort()))
                self._dispatch(message)
        except (EOFError, OSError):
            pass
        self._died()

    def _dispatch(self, message: m.Up) -> None:
        kind = type(message)
        if kind is m.Heartbeat:
            return
        if kind is m.Events:
            pending = self._pending.get(message.call_id)  # type: ignore[union-attr]
            collector = pending.collector if pending is not None else None
            if collector is not None:
                for event in message.events:  # type: ignore[union-attr]
                    collector.add(event)
            return
        if kind is m.AsyncDone:
            with self._lock:
                pending = self._pending.pop(message.call_id, None)  # type: ignore[union-attr]
            if pending is not None and not pending.future.done():
                pending.future.set_result(None)  # a run that ended at once may end before its start's reply
            if pending is not None and pending.async_run is not None and pending.collector is not None:
                pending.async_run.finish(_with_outcome(pending.collector, message.outcome))  # type: ignore[union-attr]
            return
        with self._lock:
            pending = self._pending.get(message.call_id)  # type: ignore[union-attr]
            if pending is not None and pending.async_run is None:
                del self._pending[message.call_id]  # type: ignore[union-attr]
        if pending is None or pending.future.done():
            return
        if isinstance(message, m.Reply):
            pending.future.set_result(message.value)
        elif isinstance(message, m.Failure):
            if pending.async_run is not None:
                with self._lock:
                    self._pending.pop(message.call_id, None)
            pending.future.set_exception(message.error())

    def _timeout_error(self, function: str | None = None) -> RkllmError:
        return RkllmError("RUNTIME_TIMEOUT", function=function, handle=self.label, pid=self.proc.pid,
                          timeout_s=self.limits.call_timeout)

    def _stalled(self) -> None:
        """No message, not even a heartbeat, for call_timeout seconds: fail everything pending."""
        if self.unresponsive_since is None:
            self.unresponsive_since = time.monotonic()
            log.error("worker for %s (pid %d) has not answered for %.1f s", self.label, self.proc.pid,
                      self.limits.call_timeout)
        self._fail_all(self._timeout_error())

    def _fail_all(self, error: RkllmError) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            if not p.future.done():
                p.future.set_exception(error)
            if p.async_run is not None and p.collector is not None:
                p.async_run.finish(RunResult(text=p.collector.text(), token_ids=list(p.collector.token_ids),
                                             token_count=p.collector.token_count, finish_reason="error",
                                             error=error.message))

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
        self._fail_all(self.crash)
        self._outbox.put(None)
        with contextlib.suppress(OSError):
            self.conn.close()

    # ----------------------------------------------------------------- calling (any thread)

    def _check_usable(self, function: str | None) -> None:
        if self.crash is not None:
            raise RkllmError(self.crash.code, function=function, **self.crash.fields)
        if self.unresponsive_since is not None:
            raise self._timeout_error(function)

    def start(self, request: m.Request, function: str | None = None, collector: RunCollector | None = None,
              async_run: AsyncRun | None = None) -> tuple[int, concurrent.futures.Future[Any]]:
        """Send a request (never blocks); its call id and the future of its reply."""
        self._check_usable(function)
        call_id = next(self._ids)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._pending[call_id] = _Pending(future, collector, async_run)
        self._outbox.put((call_id, request))
        return call_id, future

    def forget(self, call_id: int) -> None:
        """Stop waiting for a call's reply (it timed out)."""
        with self._lock:
            self._pending.pop(call_id, None)

    def call(self, request: m.Request, function: str | None = None, timeout: float | None = None) -> Any:
        """Send a request and wait for its reply, at most `timeout` seconds (default: the call timeout)."""
        call_id, future = self.start(request, function)
        try:
            return future.result(self.limits.call_timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            self.forget(call_id)
            raise self._timeout_error(function) from None
        except RkllmError as exc:
            if exc.function is None:
                exc.function = function
            raise

    def close(self) -> None:
        """Ask the worker to exit (a stopped or stuck one is killed), and reap it."""
        self._closing = True
        if self.crash is None and self.unresponsive_since is None:
            with contextlib.suppress(RkllmError):
                self.call(m.Exit(), timeout=EXIT_GRACE)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_GRACE)
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
        self._outbox.put(None)
        # The reader sees the end of the socket, fails what is pending, closes the socket and reaps.
        self._reader.join(EXIT_GRACE + 1)
        self.proc.wait()


class WorkerModel:
    """A LoadedModel living in its own process. Every call is bounded by the worker's limits."""

    def __init__(self, worker: Worker, loaded: m.Loaded):
        self.worker = worker
        self.max_new_tokens = loaded.max_new_tokens
        self.n_batch = loaded.n_batch

    @property
    def crash(self) -> RkllmError | None:
        """Why the worker died, or None while it lives."""
        return self.worker.crash

    @property
    def pid(self) -> int:
        return self.worker.pid

    def set_label(self, label: str) -> None:
        """Name the worker (its handle) in logs and errors."""
        self.worker.label = label

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        return self._run(rkllm_input, rkllm_infer_params, sink, ())

    def _run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink,
             images: tuple[bytes, ...]) -> RunResult:
        collector = collector_for(sink, effective_max_new_tokens(self, rkllm_infer_params))
        _, future = self.worker.start(m.Run(rkllm_input, rkllm_infer_params, images=images,
                                            output=collector.output), None, collector)  # the caller names it
        # No time bound of its own: a generation takes as long as it takes; a stopped worker fails it
        # through the missing heartbeat, a dead one through the closed socket.
        return _with_outcome(collector, future.result())

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> AsyncRun:
        run = AsyncRun(collector_for(sink, effective_max_new_tokens(self, rkllm_infer_params)))
        call_id, future = self.worker.start(m.Run(rkllm_input, rkllm_infer_params, asynchronous=True,
                                                  output=run.collector.output),
                                            "rkllm_run_async", run.collector, run)
        try:
            future.result(self.worker.limits.call_timeout)
        except concurrent.futures.TimeoutError:
            self.worker.forget(call_id)
            raise self.worker._timeout_error("rkllm_run_async") from None
        return run

    def abort(self) -> None:
        if self.worker.crash is None:
            self.worker.call(m.Abort(), "rkllm_abort")

    def is_running(self) -> bool:
        return bool(self.worker.crash is None and self.worker.call(m.IsRunning(), "rkllm_is_running"))

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None = None,
                       end_pos: list[int] | None = None) -> None:
        self.worker.call(m.ClearKvCache(keep_system_prompt, start_pos, end_pos), "rkllm_clear_kv_cache")

    def get_kv_cache_size(self) -> list[int]:
        return list(self.worker.call(m.GetKvCacheSize(), "rkllm_get_kv_cache_size"))

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        self.worker.call(m.SetChatTemplate(system_prompt, prompt_prefix, prompt_postfix), "rkllm_set_chat_template")

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        self.worker.call(m.SetFunctionTools(system_prompt, tools, tool_response_str), "rkllm_set_function_tools")

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        self.worker.call(m.SetCrossAttnParams(cross_attn_params), "rkllm_set_cross_attn_params")

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        self.worker.call(m.LoadLora(lora_adapter), "rkllm_load_lora", self.worker.limits.load_timeout)

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        self.worker.call(m.LoadPromptCache(prompt_cache_path), "rkllm_load_prompt_cache",
                         self.worker.limits.load_timeout)

    def release_prompt_cache(self) -> None:
        self.worker.call(m.ReleasePromptCache(), "rkllm_release_prompt_cache")

    def destroy(self) -> None:
        """rkllm_destroy in the worker, then the worker exits (a stuck one is killed). Idempotent.

        A worker that died has nothing left to free. One that does not answer, or whose rkllm_destroy fails or
        does not return within the call timeout, is ended without it: that is logged, as the model was not freed
        through the runtime."""
        worker = self.worker
        try:
            if worker.crash is None and worker.unresponsive_since is not None:
                log.warning("worker for %s (pid %d) does not answer: ending it without rkllm_destroy", worker.label,
                            worker.pid)
            elif worker.crash is None:
                try:
                    worker.call(m.Destroy(), "rkllm_destroy")
                except RkllmError as exc:
                    if exc.code != "RUNTIME_CRASHED":  # a worker that died meanwhile is logged as such
                        log.warning("rkllm_destroy in the worker for %s (pid %d) failed (%s): ending it without it",
                                    worker.label, worker.pid, exc.message)
        finally:
            worker.close()


class HistoryWorkerModel(WorkerModel):
    """A worker model whose runtime primes chat history, tokenizes and takes a seed (the CPU runtime)."""

    def prime_history(self, messages: list[dict[str, str]]) -> None:
        self.worker.call(m.PrimeHistory(messages), "chat")

    def tokenize(self, text: str) -> list[int]:
        return list(self.worker.call(m.Tokenize(text), "embed"))

    def seed_next_run(self, seed: int) -> None:
        self.worker.call(m.SeedNextRun(seed), "generate")


class SeeingWorkerModel(WorkerModel):
    """A worker model that hosts its vision encoder in the same worker (the NPU runtime): images are sent as
    prepared pixels and encoded there, so their embeddings never cross the socket."""

    def open_encoder(self, library: str | None, path: str, core_mask: int | str | None = None) -> EncoderShape:
        shape: EncoderShape = self.worker.call(m.OpenEncoder(library, path, core_mask), "load_model",
                                               self.worker.limits.load_timeout)
        return shape

    def run_with_images(self, rkllm_input: RKLLMInput, images: list[bytes], rkllm_infer_params: RKLLMInferParam,
                        sink: EventSink) -> RunResult:
        return self._run(rkllm_input, rkllm_infer_params, sink, tuple(images))


class WorkerRuntime:
    """A Runtime whose models each live in their own supervised process."""

    def __init__(self, kind: str, library: str | None, abi: str | None, limits: WorkerLimits):
        self.kind = kind
        self.library = library
        self.abi_setting = abi
        self.limits = limits
        probe = Worker(limits, "probe")
        try:
            opened: m.Opened = probe.call(m.Open(kind, library, abi), timeout=limits.load_timeout)
        finally:
            probe.close()
        self.name: str = opened.name
        self.abi: str = opened.abi
        self.assigns_npu_domains = opened.assigns_npu_domains
        self._describe: dict[str, object] = {**opened.describe, "isolation": "process"}
        self._default = opened.default

    def describe(self) -> dict[str, object]:
        return dict(self._describe)

    def create_default_param(self) -> RKLLMParam:
        return self._default.model_copy(deep=True)

    def init(self, param: RKLLMParam) -> WorkerModel:
        """Start a worker, open the runtime in it, and rkllm_init the model there."""
        worker = Worker(self.limits, f"(loading {os.path.basename(param.model_path or '?')})")
        try:
            worker.call(m.Open(self.kind, self.library, self.abi_setting), "rkllm_init", self.limits.load_timeout)
            loaded: m.Loaded = worker.call(m.Init(param), "rkllm_init", self.limits.load_timeout)
        except BaseException:
            worker.close()
            raise
        if loaded.history_priming and loaded.tokenizing:
            return HistoryWorkerModel(worker, loaded)
        if loaded.seeing:
            return SeeingWorkerModel(worker, loaded)
        return WorkerModel(worker, loaded)


class RknnWorker:
    """A worker process hosting RKNN contexts: one rknn_init and the contexts dup_context makes from it (they share
    its weights, so they share its process). A librknnrt crash ends this worker only: its contexts then fail with
    RUNTIME_CRASHED, the server lives on."""

    def __init__(self, limits: WorkerLimits, label: str):
        self.worker = Worker(limits, label)
        self.live: set[int] = set()

    def init(self, library: str | None, path: str, flag: int | str | list[int | str]) -> RemoteRknnContext:
        """rknn_init in the worker (opening librknnrt there); the worker is closed again if it fails."""
        try:
            ctx: int = self.worker.call(m.RknnInit(library, path, flag), "rknn_init", self.worker.limits.load_timeout)
        except BaseException:
            self.worker.close()
            raise
        return RemoteRknnContext(self, ctx)

    def close(self) -> None:
        self.worker.close()


class RemoteRknnContext:
    """An RknnContext living in an `RknnWorker`: the same methods, each one bounded call (rknn_run and
    rknn_init by load_timeout, the rest by the call timeout). Destroying the last context ends the worker."""

    def __init__(self, host: RknnWorker, context: int):
        self.host = host
        self.context = context
        host.live.add(context)

    @property
    def pid(self) -> int:
        return self.host.worker.pid

    def _call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self.host.worker.call(m.RknnCall(self.context, method, args, kwargs or None), f"rknn_{method}",
                                     timeout)

    def query(self, cmd: int | str, index: int = 0) -> dict[str, Any]:
        return dict(self._call("query", cmd, index))

    def sdk_version(self) -> dict[str, str]:
        return dict(self._call("sdk_version"))

    def inputs_set(self, inputs: Any) -> None:
        self._call("inputs_set", list(inputs))

    def run(self) -> None:
        self._call("run", timeout=self.host.worker.limits.load_timeout)

    def outputs_get(self, outputs: Any = None, *, max_bytes: int | None = None) -> Any:
        return self._call("outputs_get", outputs, max_bytes=max_bytes)

    def outputs_release(self) -> int:
        return int(self._call("outputs_release"))

    def set_core_mask(self, core_mask: int | str) -> None:
        self._call("set_core_mask", core_mask)

    def dup_context(self) -> RemoteRknnContext:
        return RemoteRknnContext(self.host, int(self._call("dup_context")))

    def destroy(self) -> None:
        """rknn_destroy in the worker (nothing to do once it crashed); the worker exits with its last context."""
        try:
            if self.host.worker.crash is None and self.context in self.host.live:
                self._call("destroy")
        finally:
            self.host.live.discard(self.context)
            if not self.host.live:
                self.host.close()
