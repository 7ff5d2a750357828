"""Replies read by their model family, for the friendly calls (generate, chat): what streams, what returns,
and how earlier turns go back to the model.

`ReplyStream` sits between a run's relay and the caller's stream: each update's text goes through a
`ReplyParser`, and what comes out is forwarded as updates of kind content, reasoning or tool_call
(markers are dropped; the decoded call follows its raw text). `render_history` turns OpenAI-style
messages (assistant tool calls, tool results) into the plain text turns the runtimes take.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from mcp_rkllm.engine.parsing import Delta, ParseResult, ReplyParser
from mcp_rkllm.engine.relay import NO_STREAM, Progress, Stream
from mcp_rkllm.models.families import Family, family_named


def with_tool_format(family: Family, tools_offered: bool) -> Family:
    """`family`, or, when tools are offered to a family that has no call format of its own, the family with the
    Hermes format (`<tool_call>{...}</tool_call>`) both runtimes prompt for by default."""
    if family.tool_calls is not None or not tools_offered:
        return family
    return replace(family, tool_calls=family_named("qwen2.5").tool_calls)


class ReplyStream:
    """Forwards a run's updates to `stream`, split by `parser`. After the run, `finish()` sends what the parser
    held back and returns the whole split."""

    def __init__(self, stream: Stream, parser: ReplyParser):
        self._sink = stream.sink
        self._parser = parser
        self._held_ids: list[int] = []
        self._progress = 0
        self._total: int | None = None
        self.stream = Stream(self._forward if stream.sink is not None else None, stream.gone)

    async def _send(self, deltas: list[Delta]) -> None:
        assert self._sink is not None
        for d in deltas:
            if d.kind == "markup" or (d.kind != "tool_call" and not d.text):
                continue
            ids, self._held_ids = tuple(self._held_ids), []
            kind = "tool_call" if d.kind in ("tool_text", "tool_call") else d.kind
            await self._sink(Progress(self._progress, self._total, d.text, ids, kind,  # type: ignore[arg-type]
                                      d.tool_call))

    async def _forward(self, update: Progress) -> None:
        if update.kind == "status":  # a heartbeat, not model output
            assert self._sink is not None
            await self._sink(update)
            return
        self._progress, self._total = update.progress, update.total
        self._held_ids.extend(update.token_ids)
        await self._send(self._parser.feed(update.text))

    async def finish(self, text: str) -> ParseResult:
        """The split of the run's whole `text`. With a sink, the parser was fed as the run streamed: flush it
        (sending its last deltas); without one, nothing was fed, and `text` is read at once."""
        if self._sink is None:
            self._parser.feed(text)
            return self._parser.finish()
        result = self._parser.finish()
        await self._send(result.final_deltas)
        return result


def reply_stream(stream: Stream, family: Family) -> ReplyStream:
    """A ReplyStream for `stream` (one with no sink forwards nothing)."""
    return ReplyStream(stream if stream is not None else NO_STREAM, ReplyParser(family))


def render_calls(family: Family, calls: list[dict[str, Any]]) -> str:
    """An assistant turn's tool calls as the model writes them (JSON-payload families; others get the Hermes
    form, which is what the tools prompt asks for)."""
    fmt = with_tool_format(family, True).tool_calls
    assert fmt is not None
    objects = []
    for call in calls:
        fn = call.get("function", {})
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = fn.get("arguments")
        objects.append({"name": fn.get("name"), "arguments": arguments})
    if fmt.payload != "json" or not fmt.start:
        fmt = family_named("qwen2.5").tool_calls
        assert fmt is not None
    return "".join(f"{fmt.start}\n{json.dumps(o, ensure_ascii=False)}\n{fmt.end}" for o in objects)


def render_history(family: Family, messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI-style messages as the plain {role, content} turns the runtimes take: an assistant's tool calls
    written out in the family's format after its text; tool results keep role "tool" (the runtimes wrap them
    in the tool-response tag)."""
    turns = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            content += ("\n" if content else "") + render_calls(family, m["tool_calls"])
        turns.append({"role": m["role"], "content": content})
    return turns


class StopWatch:
    """Stop sequences over a run's raw text: forwards the text to `downstream`, holding back what could still be
    the start of a stop string; when one appears, `on_stop()` is awaited (it aborts the run) and nothing from
    the stop string on is forwarded. `cut_text(text)` is the run's text up to the first stop string."""

    def __init__(self, stops: list[str], downstream: Stream, on_stop: Callable[[], Awaitable[None]]):
        self._stops = stops
        self._hold = max(len(s) for s in stops) - 1
        self._sink = downstream.sink
        self._on_stop = on_stop
        self._text = ""
        self._sent = 0
        self._ids: list[int] = []
        self.cut: int | None = None
        self.stream = Stream(self._forward, downstream.gone, downstream.owner)

    async def _emit(self, update: Progress, end: int) -> None:
        if self._sink is not None and end > self._sent:
            ids, self._ids = tuple(self._ids), []
            await self._sink(Progress(update.progress, update.total, self._text[self._sent:end], ids))
        self._sent = max(self._sent, end)

    def _find(self, start: int) -> int:
        hits = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        return min(hits) if hits else -1

    async def _forward(self, update: Progress) -> None:
        if update.kind == "status":
            if self._sink is not None:
                await self._sink(update)
            return
        if self.cut is not None:
            return
        start = max(0, len(self._text) - self._hold)
        self._text += update.text
        self._ids.extend(update.token_ids)
        found = self._find(start)
        if found >= 0:
            self.cut = found
            await self._emit(update, found)
            await self._on_stop()
            return
        await self._emit(update, len(self._text) - self._hold)

    async def finish(self, text: str) -> str:
        """The run's `text` up to its first stop string (all of it when none came); what was held back goes out."""
        if self.cut is None:  # a safety net: the updates already were searched as they came
            self._text = text
            found = self._find(0)
            self.cut = found if found >= 0 else None
        final = text[:self.cut] if self.cut is not None else text
        self._text = final
        await self._emit(Progress(0, None, ""), len(final))
        return final
