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

from mcp_rkllm.errors import RkllmError
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


@dataclass(frozen=True, slots=True)
class OutputLimit:
    """What a run may return as an output array (hidden states, logits): the last `rows` rows
    (0 = all of them, one per input token) and at most `max_floats` floats (None = no bound).

    A runtime that knows the shape before it computes the output checks it first (`check`) and
    produces only the rows kept; the collector enforces it again on whatever arrives.
    """

    rows: int = 0
    max_floats: int | None = None

    def kept(self, total: int) -> int:
        """How many of `total` rows are returned."""
        return total if self.rows <= 0 else min(self.rows, total)

    def error(self, kind: str, total: int, width: int) -> RkllmError | None:
        """LIMIT_EXCEEDED, saying how to ask for less, if the kept rows of `total` x `width` are too many floats."""
        rows = self.kept(total)
        if self.max_floats is None or rows * width <= self.max_floats:
            return None
        fit = self.max_floats // max(width, 1)
        how = (f"pass output_rows={fit} or fewer, e.g. output_rows=1 for the last token's row only" if fit
               else "even one row is over the limit: raise --max-output-floats")
        return RkllmError("LIMIT_EXCEEDED", what=f"the {kind} output in floats ({rows} rows x {width}; {how})",
                          value=rows * width, limit=self.max_floats, rows=rows, width=width, max_output_rows=fit)

    def check(self, kind: str, total: int, width: int) -> None:
        """Raise `error(...)` if there is one."""
        error = self.error(kind, total, width)
        if error is not None:
            raise error


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

    __slots__ = ("error", "finished", "forward", "hidden", "listeners", "logits", "max_new_tokens", "output",
                 "output_error", "perf", "pieces", "token_ids")

    def __init__(self, max_new_tokens: int | None = None, forward: EventSink | None = None,
                 output: OutputLimit | None = None):
        self.max_new_tokens = max_new_tokens
        self.forward = forward
        self.output = output
        """The bound on hidden states / logits; an output over it is dropped and `output_error` set."""
        self.output_error: RkllmError | None = None
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
        elif kind is Hidden or kind is Logits:
            kept = self._bounded(event)  # type: ignore[arg-type]
            if kept is None:
                return
            event = kept
            if kind is Hidden:
                self.hidden = event  # type: ignore[assignment]
            else:
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

    def _bounded(self, event: Hidden | Logits) -> Hidden | Logits | None:
        """`event` cut to the rows `output` keeps, or None (and `output_error` set) if it is over the limit."""
        limit = self.output
        if limit is None:
            return event
        width = event.embd_size if isinstance(event, Hidden) else event.vocab_size
        error = limit.error("hidden-state" if isinstance(event, Hidden) else "logits", event.num_tokens, width)
        if error is not None:
            self.output_error = error
            for listener in self.listeners:
                listener()
            return None
        rows = limit.kept(event.num_tokens)
        if rows == event.num_tokens:
            return event
        tail = event.data[len(event.data) - rows * width:]
        return Hidden(tail, width, rows) if isinstance(event, Hidden) else Logits(tail, width, rows)

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
        error = self.error if self.output_error is None else self.output_error.message
        if error is not None:
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
            error=error,
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
