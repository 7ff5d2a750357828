"""Run events (the vocabulary runtimes and the native callback speak), the one accumulator of a run
(`RunCollector`) and the one async-run class.

A runtime reports a run through an `EventSink`, a plain callable that may be invoked from any
thread and must not block. Every run has exactly one `RunCollector`: the runtime adds events to
it, it keeps the pieces and token ids in order, and readers (the engine's relay, an async run's
reader, a worker's forwarder) keep their own cursor into it and are woken through its listeners.
The final `RunResult` is built from the same collector, so a caller never depends on having seen
every event and nothing is accumulated twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from mcp_rkllm.structs import (
    FinishReason,
    RKLLMPerfStat,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RunResult,
)


@dataclass(slots=True)
class Token:
    """A complete piece of text (RKLLM_RUN_NORMAL) and its token id."""

    text: str
    token_id: int


@dataclass(slots=True)
class Waiting:
    """A token whose bytes are not yet a complete UTF-8 character (RKLLM_RUN_WAITING): no text."""

    token_id: int


@dataclass(slots=True)
class TokenBatch:
    """Several tokens at once, in order (how a worker process forwards a burst): their texts
    (RKLLM_RUN_WAITING tokens contribute "") and token ids."""

    texts: list[str]
    token_ids: list[int]


@dataclass(slots=True)
class Hidden:
    """The last hidden layer, copied out of the runtime's buffer (float32, row-major)."""

    data: array[float]
    embd_size: int
    num_tokens: int


@dataclass(slots=True)
class Logits:
    """Logits, copied out of the runtime's buffer (float32, row-major)."""

    data: array[float]
    vocab_size: int
    num_tokens: int


@dataclass(slots=True)
class Finish:
    """RKLLM_RUN_FINISH, with perf stats where the runtime has them."""

    perf: RKLLMPerfStat | None


@dataclass(slots=True)
class RunError:
    """RKLLM_RUN_ERROR."""

    message: str


RunEvent = Token | Waiting | TokenBatch | Hidden | Logits | Finish | RunError
EventSink = Callable[[RunEvent], None]


def discard(event: RunEvent) -> None:
    """An EventSink that ignores everything."""


class RunCollector:
    """Everything one run has produced so far; the run's only accumulator.

    `pieces[i]` is the text of token `i` ("" for an RKLLM_RUN_WAITING token), so `pieces` and
    `token_ids` stay aligned: a reader takes `end = len(token_ids)` and then `pieces[cursor:end]`
    (pieces are appended first, so they are never shorter). `forward`, if given, sees every event
    after it is recorded (tests and simple callers pass a plain sink this way). Listeners are
    called after every change, on the producing thread; they must be quick and must not raise.
    """

    __slots__ = ("error", "finished", "forward", "hidden", "listeners", "logits", "max_new_tokens", "perf",
                 "pieces", "token_ids")

    def __init__(self, max_new_tokens: int | None = None, forward: EventSink | None = None):
        self.max_new_tokens = max_new_tokens
        self.forward = forward
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.perf: RKLLMPerfStat | None = None
        self.hidden: Hidden | None = None
        self.logits: Logits | None = None
        self.error: str | None = None
        self.finished = threading.Event()
        self.listeners: list[Callable[[], None]] = []

    def add(self, event: RunEvent) -> None:
        """Record one event, pass it on to `forward`, wake the listeners."""
        kind = type(event)
        if kind is Token:  # the per-token case first, without isinstance's MRO walk
            self.pieces.append(event.text)  # type: ignore[union-attr]
            self.token_ids.append(event.token_id)  # type: ignore[union-attr]
        elif kind is Waiting:
            self.pieces.append("")
            self.token_ids.append(event.token_id)  # type: ignore[union-attr]
        elif kind is TokenBatch:
            self.pieces.extend(event.texts)  # type: ignore[union-attr]
            self.token_ids.extend(event.token_ids)  # type: ignore[union-attr]
        elif kind is Hidden:
            self.hidden = event  # type: ignore[assignment]
        elif kind is Logits:
            self.logits = event  # type: ignore[assignment]
        elif kind is Finish:
            self.perf = event.perf  # type: ignore[union-attr]
            self.finished.set()
        elif kind is RunError:
            self.error = event.message  # type: ignore[union-attr]
            self.finished.set()
        if self.forward is not None:
            self.forward(event)
        for listener in self.listeners:
            listener()

    __call__ = add

    @property
    def token_count(self) -> int:
        """Tokens so far (RKLLM_RUN_WAITING tokens included)."""
        return len(self.token_ids)

    def text(self) -> str:
        """The text so far."""
        return "".join(self.pieces[:len(self.token_ids)])

    def result(self, aborted: bool = False) -> RunResult:
        """The RunResult so far; finish_reason says why the run ended."""
        ids = list(self.token_ids)
        count = len(ids)
        reason: FinishReason
        if self.error is not None:
            reason = "error"
        elif aborted:
            reason = "abort"
        elif self.max_new_tokens is not None and self.max_new_tokens > 0 and count >= self.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        hidden, logits = self.hidden, self.logits
        # model_construct: the arrays were produced here, validating them again would copy them again.
        return RunResult.model_construct(
            text="".join(self.pieces[:count]),
            token_ids=ids,
            token_count=count,
            finish_reason=reason,
            perf=self.perf,
            last_hidden_layer=None if hidden is None else RKLLMResultLastHiddenLayer.model_construct(
                hidden_states=hidden.data.tolist(), embd_size=hidden.embd_size, num_tokens=hidden.num_tokens),
            logits=None if logits is None else RKLLMResultLogits.model_construct(
                logits=logits.data.tolist(), vocab_size=logits.vocab_size, num_tokens=logits.num_tokens),
            error=self.error,
        )


def collector_for(sink: EventSink, max_new_tokens: int | None) -> RunCollector:
    """The run's collector: `sink` itself when the caller passed one (the engine does), else a new
    collector that forwards to `sink`."""
    if isinstance(sink, RunCollector):
        if sink.max_new_tokens is None:
            sink.max_new_tokens = max_new_tokens
        return sink
    return RunCollector(max_new_tokens, forward=sink)


class AsyncRun:
    """A run started by rkllm_run_async: its collector (readable while it runs) and its end.

    Every runtime (and the worker proxy) returns this one class; whoever sees the run end calls
    `finish` once.
    """

    def __init__(self, collector: RunCollector):
        self.collector = collector
        self._future: concurrent.futures.Future[RunResult] = concurrent.futures.Future()

    def finish(self, result: RunResult) -> None:
        """Record the end (from any thread); later calls are ignored."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._future.set_result(result)

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """The result once the run has ended, or None if it is still going after `timeout` seconds."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            return None

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        return self._future.done()

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        """Call `fn(result)` once the run has ended (at once if it has; from the finishing thread)."""
        self._future.add_done_callback(lambda f: fn(f.result()))
