"""The worker process: one runtime and at most one model, served over an inherited socket.

Run as `python -m mcp_rkllm.isolation.child --fd N --heartbeat SECONDS` by the supervisor only.
Requests are dispatched by type through one table; calls that must not wait behind a run
(abort, is_running, get_kv_cache_size) are answered on the reading thread, the rest on one call
thread. A run's tokens go up as `Events` batches read from the run's collector, and its reply is
only the `RunOutcome`. A heartbeat goes up on a timer. The process exits when its socket closes,
so it dies with the server. It never imports the MCP SDK.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from mcp_rkllm.events import Finish, Hidden, Logits, RunCollector, RunError, RunEvent, TokenBatch
from mcp_rkllm.isolation import messages as m
from mcp_rkllm.runtime import open_in_process
from mcp_rkllm.runtime.base import HistoryPriming, LoadedModel, Runtime, Seeding, Seeing, Tokenizing
from mcp_rkllm.runtime.vision import EncoderShape
from mcp_rkllm.structs import RunResult

#: Under load, event batches go up at most this often (what arrives meanwhile joins the next batch).
BATCH_INTERVAL_SECONDS = 0.005


class _Forwarder:
    """Sends one run's events up the socket: tokens read from the collector by cursor (as one
    TokenBatch), other events after them; coalesces what arrives while a send is in progress."""

    def __init__(self, send: Callable[[m.Up], None], call_id: int, collector: RunCollector):
        self._send = send
        self._call_id = call_id
        self._collector = collector
        self._cursor = 0
        self._others: list[RunEvent] = []
        self._lock = threading.Lock()
        self._pending = False
        self._idle = threading.Event()
        self._idle.set()
        collector.forward = self._event

    def _event(self, event: RunEvent) -> None:
        kind = type(event)
        with self._lock:
            if kind is Hidden or kind is Logits or kind is Finish or kind is RunError:
                self._others.append(event)
            if self._pending:
                return
            self._pending = True
            self._idle.clear()
        threading.Thread(target=self._drain, daemon=True).start()

    def _take(self) -> list[RunEvent]:
        with self._lock:
            c = self._collector
            end = len(c.token_ids)
            batch: list[RunEvent] = []
            if end > self._cursor:
                batch.append(TokenBatch(c.pieces[self._cursor:end], c.token_ids[self._cursor:end]))
                self._cursor = end
            batch += self._others
            self._others = []
            if not batch:
                self._pending = False
                self._idle.set()
            return batch

    def _drain(self) -> None:
        while batch := self._take():
            self._send(m.Events(self._call_id, batch))
            time.sleep(BATCH_INTERVAL_SECONDS)  # a burst: let the next batch grow (spaced tokens go at once)

    def flush(self) -> None:
        """Wait until every event recorded so far has been sent."""
        self._idle.wait()


def _outcome(result: RunResult, collector: RunCollector) -> m.RunOutcome:
    dropped = collector.output_error
    return m.RunOutcome(result.finish_reason, result.error, result.perf,
                        None if dropped is None else (dropped.code, dropped.fields))


class _Child:
    """The worker's state and its dispatch table."""

    def __init__(self, send: Callable[[m.Up], None]):
        self.send = send
        self.runtime: Runtime | None = None
        self.model: LoadedModel | None = None
        self.contexts: dict[int, Any] = {}
        """RKNN contexts of an RKNN worker, by id (an rknn_init and its dups share a worker)."""
        self.handlers: dict[type, Callable[[int, Any], Any]] = {
            m.Open: self.open, m.Init: self.init, m.Run: self.run, m.OpenEncoder: self.open_encoder,
            m.RknnInit: self.rknn_init, m.RknnCall: self.rknn_call,
            m.Abort: lambda _, r: self.loaded.abort(),
            m.IsRunning: lambda _, r: self.loaded.is_running(),
            m.ClearKvCache: lambda _, r: self.loaded.clear_kv_cache(r.keep_system_prompt, r.start_pos, r.end_pos),
            m.GetKvCacheSize: lambda _, r: self.loaded.get_kv_cache_size(),
            m.SetChatTemplate: lambda _, r: self.loaded.set_chat_template(r.system_prompt, r.prompt_prefix,
                                                                         r.prompt_postfix),
            m.SetFunctionTools: lambda _, r: self.loaded.set_function_tools(r.system_prompt, r.tools,
                                                                           r.tool_response_str),
            m.SetCrossAttnParams: lambda _, r: self.loaded.set_cross_attn_params(r.cross_attn_params),
            m.LoadLora: lambda _, r: self.loaded.load_lora(r.lora_adapter),
            m.LoadPromptCache: lambda _, r: self.loaded.load_prompt_cache(r.prompt_cache_path),
            m.ReleasePromptCache: lambda _, r: self.loaded.release_prompt_cache(),
            m.PrimeHistory: self.prime_history,
            m.Tokenize: self.tokenize,
            m.SeedNextRun: self.seed_next_run,
            m.Destroy: lambda _, r: self.loaded.destroy(),
        }

    @property
    def loaded(self) -> LoadedModel:
        if self.model is None:
            from mcp_rkllm.errors import RkllmError

            raise RkllmError("UNKNOWN_HANDLE", handle="(no model loaded in this worker)")
        return self.model

    def open(self, call_id: int, r: m.Open) -> m.Opened:
        self.runtime = runtime = open_in_process(r.kind, r.library, r.abi)
        return m.Opened(runtime.name, runtime.abi, runtime.describe(), runtime.create_default_param(),
                        runtime.assigns_npu_domains)

    def init(self, call_id: int, r: m.Init) -> m.Loaded:
        assert self.runtime is not None, "Open comes first"
        self.model = model = self.runtime.init(r.param)
        return m.Loaded(model.max_new_tokens, model.n_batch, isinstance(model, HistoryPriming),
                        isinstance(model, Tokenizing), isinstance(model, Seeing))

    def open_encoder(self, call_id: int, r: m.OpenEncoder) -> EncoderShape:
        model = self.loaded
        assert isinstance(model, Seeing)
        return model.open_encoder(r.library, r.path, r.core_mask)

    def rknn_init(self, call_id: int, r: m.RknnInit) -> int:
        from mcp_rkllm.native.rknn import RknnLibrary

        context = RknnLibrary.open(r.library).init(r.path, r.flag)
        self.contexts[call_id] = context
        return call_id

    def rknn_call(self, call_id: int, r: m.RknnCall) -> Any:
        context = self.contexts.get(r.context)
        if context is None or r.method not in m.RKNN_METHODS:
            from mcp_rkllm.errors import RkllmError

            raise RkllmError("UNKNOWN_HANDLE", function=f"rknn_{r.method}", handle=f"(context {r.context})")
        value = getattr(context, r.method)(*r.args, **(r.kwargs or {}))
        if r.method == "dup_context":
            self.contexts[call_id] = value
            return call_id
        if r.method == "destroy":
            del self.contexts[r.context]
        return value

    def prime_history(self, call_id: int, r: m.PrimeHistory) -> None:
        model = self.loaded
        assert isinstance(model, HistoryPriming)
        model.prime_history(r.messages)

    def seed_next_run(self, call_id: int, r: m.SeedNextRun) -> None:
        model = self.loaded
        assert isinstance(model, Seeding)
        model.seed_next_run(r.seed)

    def tokenize(self, call_id: int, r: m.Tokenize) -> list[int]:
        model = self.loaded
        assert isinstance(model, Tokenizing)
        return model.tokenize(r.text)

    def run(self, call_id: int, r: m.Run) -> m.RunOutcome | None:
        model = self.loaded
        collector = RunCollector(output=r.output)  # an output over the limit is dropped here, never sent up
        forwarder = _Forwarder(self.send, call_id, collector)
        if r.images:
            assert isinstance(model, Seeing) and not r.asynchronous
            try:
                return _outcome(model.run_with_images(r.rkllm_input, list(r.images), r.rkllm_infer_params,
                                                      collector), collector)
            finally:
                forwarder.flush()
        if not r.asynchronous:
            try:
                return _outcome(model.run(r.rkllm_input, r.rkllm_infer_params, collector), collector)
            finally:
                forwarder.flush()
        run = model.run_async(r.rkllm_input, r.rkllm_infer_params, collector)

        def done(result: RunResult) -> None:
            forwarder.flush()
            self.send(m.AsyncDone(call_id, _outcome(result, collector)))

        run.add_done_callback(done)
        return None

    def answer(self, call_id: int, request: Any) -> None:
        try:
            value = self.handlers[type(request)](call_id, request)
        except BaseException as exc:
            self.send(m.Failure.of(call_id, exc))
        else:
            self.send(m.Reply(call_id, value))


def main(argv: list[str]) -> None:
    """Serve requests until the socket closes."""
    p = argparse.ArgumentParser(prog="mcp_rkllm.isolation.child")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--heartbeat", type=float, required=True, help="seconds between heartbeats")
    args = p.parse_args(argv)
    # Ctrl-C in a terminal signals the whole process group: the server shuts its workers down in order
    # (abort, rkllm_destroy, exit); a worker dying of SIGINT first would skip rkllm_destroy.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(2, 1)  # the native library's printf goes to stderr, never into the socket
    sys.stdout = sys.stderr
    conn = Connection(args.fd)
    send_lock = threading.Lock()

    def send(message: m.Up) -> None:
        with send_lock:
            conn.send(message)

    def beat() -> None:
        while True:
            time.sleep(args.heartbeat)
            try:
                send(m.Heartbeat())
            except OSError:
                os._exit(0)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    child = _Child(send)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-call")
    # RKNN contexts each get a call thread of their own: dups exist to run in parallel, and a call on one must not
    # queue (and time out) behind a long rknn_run on another. The engine serialises calls on one context.
    rknn_threads: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
    while True:
        try:
            call_id, request = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone (or closed us): nothing to serve
        if isinstance(request, m.Exit):
            send(m.Reply(call_id, None))
            os._exit(0)
        if isinstance(request, m.INLINE):
            child.answer(call_id, request)
        elif isinstance(request, m.RknnCall):
            thread = rknn_threads.get(request.context)
            if thread is None:
                thread = rknn_threads[request.context] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"rknn-{request.context}")
            thread.submit(child.answer, call_id, request)
            if request.method == "destroy":
                rknn_threads.pop(request.context).shutdown(wait=False)  # its thread ends after the destroy
        else:
            executor.submit(child.answer, call_id, request)


if __name__ == "__main__":
    main(sys.argv[1:])
