"""A model's reply, understood while it streams: reasoning, content and tool calls, per model family.

`ReplyParser(family)` is fed the text pieces a run produces, as they come (`feed`), and returns typed
deltas for each: `content`, `reasoning`, `tool_text` (the raw text of a recognised tool call, its
markers included), `markup` (reasoning markers and the whitespace right after a marker or a call)
and `tool_call` (a completed call, OpenAI-shaped). `finish()` releases what was held and returns the
whole split as a `ParseResult`. `parse(text, family)` does both at once.

What the caller can rely on:

- No text is lost: the deltas' texts, in order, are exactly the text fed (`ParseResult.segments`
  joined is `raw_text`, and reasoning + content + tool_text + markup account for every character).
- A marker may be split across pieces anywhere (pieces may be ""); text that could still be the
  start of a marker is held, and released as soon as it can no longer be one (at most the length of
  the longest marker, except for a family whose calls stand bare: see below).
- Reasoning that is never closed (a run cut by its length limit or an abort) stays reasoning.
- A tool call's text is held until the call is complete, then comes out as `tool_text` followed by
  one `tool_call` delta per call. A call that does not decode (broken JSON, a missing name) comes out
  as `content` with a warning; a block left open at the end is decoded all the same (with a warning).
- For families whose calls stand bare at the start of the reply (Llama 3's JSON, Gemma 3's Python
  list), a reply that starts like a call (`{"name":` / `[name(`) is held until its brackets balance;
  anything else is released at once.
- Cost per piece is linear in the piece (plus a bounded hold), never a re-scan of the whole reply.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mcp_rkllm.models.families import IDENT, WS, Family, Payload

Kind = Literal["content", "reasoning", "tool_text", "markup", "tool_call"]

_CONTENT, _REASONING, _HEAD, _BLOCK, _BALANCED, _SKIP_WS = range(6)
#: What a head match is for: a bare call candidate, the head after a start marker, the optional
#: reasoning start marker of a family whose output starts inside reasoning.
_BARE, _MARKED, _OPEN = range(3)
_HEAD_MATCH, _HEAD_MORE, _HEAD_FAIL = range(3)
_SPECIAL = re.compile(r"[\"'\\\[\]{}()]")


@dataclass(frozen=True)
class Delta:
    """One piece of classified output: `kind` and its `text`; a `tool_call` delta carries the call
    (OpenAI-shaped: {"id", "type": "function", "function": {"name", "arguments": JSON string}})
    and no text."""

    kind: Kind
    text: str = ""
    tool_call: dict[str, Any] | None = None


@dataclass
class ParseResult:
    """The whole reply, split.

    `reasoning` is None when the reply had no reasoning text. `content` is the text for the user,
    `tool_calls` the decoded calls in order, `warnings` what went wrong (undecodable calls kept as
    content, unclosed blocks), `raw_text` everything fed. `tool_text` and `markup` are the raw call
    text and the markers; `segments` is every character in order as (kind, text) runs.
    `final_deltas` are the deltas `finish()` released (those not returned by `feed` before).
    """

    reasoning: str | None
    content: str
    tool_calls: list[dict[str, Any]]
    warnings: list[str]
    raw_text: str
    tool_text: str
    markup: str
    segments: list[tuple[Kind, str]]
    final_deltas: list[Delta] = field(default_factory=list)


class _Undecodable(Exception):
    """A tool-call block whose text is not a call of the family's format."""


def _call(name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI-shaped tool call, arguments as a JSON object string."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as exc:
            raise _Undecodable(f"arguments of {name!r} are a string that is not JSON") from exc
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise _Undecodable(f"arguments of {name!r} are not an object")
    try:
        encoded = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise _Undecodable(f"arguments of {name!r} cannot be JSON: {exc}") from exc
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": encoded}}


def _decode_json(text: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Undecodable(f"not JSON: {exc}") from exc
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise _Undecodable("a call is not an object with a \"name\"")
        out.append(_call(call["name"], call.get("arguments", call.get("parameters"))))
    return out


_DS_CALL = re.compile(
    r"\s*<｜tool▁call▁begin｜>\s*[^<\n]*?\s*<｜tool▁sep｜>\s*(?P<name>[^\n`<{]+)\s*"  # noqa: RUF001
    r"(?:```(?:json)?\s*(?P<fenced>.*?)\s*```|(?P<bare>.*?))\s*<｜tool▁call▁end｜>\s*",  # noqa: RUF001
    re.DOTALL)


def _decode_deepseek(text: str) -> list[dict[str, Any]]:
    out, pos = [], 0
    while pos < len(text):
        m = _DS_CALL.match(text, pos)
        if m is None:
            raise _Undecodable(f"unexpected text at {pos}: {text[pos:pos + 40]!r}")
        args = m["fenced"] if m["fenced"] is not None else m["bare"]
        try:
            value = json.loads(args)
        except (ValueError, RecursionError) as exc:
            raise _Undecodable(f"arguments of {m['name']!r} are not JSON: {exc}") from exc
        out.append(_call(m["name"].strip(), value))
        pos = m.end()
    if not out:
        raise _Undecodable("no call in the block")
    return out


_PY_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.expr) -> Any:
    """A Python (or JSON-ish: true/false/null) literal's value; _Undecodable for anything else."""
    if isinstance(node, ast.Constant) and not isinstance(node.value, (bytes, complex, type(Ellipsis))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _PY_NAMES:
        return _PY_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Undecodable("a ** inside a dict argument")
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values, strict=True)
                if k is not None}
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))):
        value = node.operand.value
        return -value if isinstance(node.op, ast.USub) else value
    raise _Undecodable(f"an argument is not a literal: {ast.dump(node)[:60]}")


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise _Undecodable("a call's function is not a name")


def _decode_python(text: str) -> list[dict[str, Any]]:
    text = text.strip()
    if text.startswith("```"):
        text = text[3:].removeprefix("python")
        text = text.removesuffix("```")
    try:
        module = ast.parse(text.strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _Undecodable(f"not Python calls: {exc}") from exc
    out = []
    for stmt in module.body:
        if not isinstance(stmt, ast.Expr):
            raise _Undecodable("a statement is not a call")
        calls = stmt.value.elts if isinstance(stmt.value, (ast.List, ast.Tuple)) else [stmt.value]
        for call in calls:
            if not isinstance(call, ast.Call) or call.args:
                raise _Undecodable("not a call with keyword arguments only")
            args = {}
            for kw in call.keywords:
                if kw.arg is None:
                    raise _Undecodable("a ** argument")
                args[kw.arg] = _literal(kw.value)
            out.append(_call(_dotted(call.func), args))
    if not out:
        raise _Undecodable("no call in the block")
    return out


_DECODERS = {"json": _decode_json, "deepseek": _decode_deepseek, "python": _decode_python}


def decode_calls(payload: Payload, text: str) -> list[dict[str, Any]]:
    """The calls in a tool-call block's text (without its markers), OpenAI-shaped.

    ValueError (with the reason) when the text is not calls of that payload format.
    """
    try:
        return _DECODERS[payload](text)
    except _Undecodable as exc:
        raise ValueError(str(exc)) from exc


class _Head:
    """An incremental matcher of a head (literal steps, WS, IDENT) against the start of a text."""

    __slots__ = ("ident_started", "lit", "pos", "step", "steps")

    def __init__(self, steps: tuple[str, ...]) -> None:
        self.steps, self.step, self.lit, self.ident_started, self.pos = steps, 0, 0, False, 0

    def advance(self, text: str) -> int:
        """Consume text[self.pos:]; MATCH (self.pos = chars of the head), MORE, or FAIL."""
        steps = self.steps
        while self.step < len(steps):
            if self.pos >= len(text):
                return _HEAD_MORE
            c, step = text[self.pos], steps[self.step]
            if step == WS:
                if c.isspace():
                    self.pos += 1
                else:
                    self.step += 1
            elif step == IDENT:
                if c.isalnum() or c == "_" or (self.ident_started and c == "."):
                    if not self.ident_started and c.isdigit():
                        return _HEAD_FAIL
                    self.ident_started = True
                    self.pos += 1
                elif self.ident_started:
                    self.step, self.ident_started = self.step + 1, False
                else:
                    return _HEAD_FAIL
            elif c == step[self.lit]:
                self.pos, self.lit = self.pos + 1, self.lit + 1
                if self.lit == len(step):
                    self.step, self.lit = self.step + 1, 0
            else:
                return _HEAD_FAIL
        return _HEAD_MATCH


class ReplyParser:
    """The streaming splitter of one reply of a model of `family` (see the module docstring)."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self._raw: list[str] = []
        self._buf = ""
        self._out: list[Delta] = []
        self._segments: list[tuple[Kind, list[str]]] = []  # runs of one kind, as parts (joined at the end)
        self._parts: dict[Kind, list[str]] = {"content": [], "reasoning": [], "tool_text": [], "markup": []}
        self._calls: list[dict[str, Any]] = []
        self._warnings: list[str] = []
        self._finished: ParseResult | None = None
        reasoning, tools = family.reasoning, family.tool_calls
        self._bare = tools is not None and tools.bare
        self._bare_ok = True  # a bare call may start here (start of content, after a call or reasoning)
        self._after_ws = _CONTENT
        self._skip_semicolon = False
        self._block_start = ""  # the start marker of the block being read
        self._block: list[str] = []
        self._tail = ""  # the block's last chars, where an end marker may have begun
        self._depth = 0
        self._quote = ""
        self._escape = False
        self._head: _Head | None = None
        self._head_for = _BARE
        content_markers = []
        if reasoning is not None:
            content_markers.append(reasoning.start)
        if tools is not None and tools.start:
            content_markers.append(tools.start)
        self._content_markers = content_markers
        self._content_prefixes = self._prefixes(content_markers)
        self._reasoning_prefixes = self._prefixes([reasoning.end] if reasoning is not None else [])
        self._state = _CONTENT
        if reasoning is not None and reasoning.starts_open:
            self._start_head((WS, reasoning.start), _OPEN)

    @staticmethod
    def _prefixes(markers: Iterable[str]) -> tuple[set[str], int]:
        prefixes = {m[:i] for m in markers for i in range(1, len(m))}
        return prefixes, max((len(p) for p in prefixes), default=0)

    # -- output ---------------------------------------------------------------------------------------

    def _emit(self, kind: Kind, text: str) -> None:
        if not text:
            return
        if kind == "content" and self._bare_ok and not text.isspace():
            self._bare_ok = False
        self._parts[kind].append(text)
        if self._segments and self._segments[-1][0] == kind:
            self._segments[-1][1].append(text)
        else:
            self._segments.append((kind, [text]))
        if self._out and self._out[-1].kind == kind:
            self._out[-1] = Delta(kind, self._out[-1].text + text)
        else:
            self._out.append(Delta(kind, text))

    def feed(self, piece: str) -> list[Delta]:
        """Classify the next piece of the reply; returns the deltas it released (maybe none)."""
        if self._finished is not None:
            raise RuntimeError("feed() after finish()")
        if not piece:
            return []
        self._raw.append(piece)
        self._buf += piece
        self._out = []
        self._run(final=False)
        return self._out

    def finish(self) -> ParseResult:
        """Release everything held (the reply is complete) and return the split; idempotent."""
        if self._finished is not None:
            return self._finished
        self._out = []
        self._run(final=True)
        reasoning = "".join(self._parts["reasoning"])
        self._finished = ParseResult(
            reasoning=reasoning or None, content="".join(self._parts["content"]),
            tool_calls=list(self._calls), warnings=list(self._warnings), raw_text="".join(self._raw),
            tool_text="".join(self._parts["tool_text"]), markup="".join(self._parts["markup"]),
            segments=[(kind, "".join(parts)) for kind, parts in self._segments], final_deltas=self._out)
        return self._finished

    # -- the state machine ------------------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        handlers = (self._in_content, self._in_reasoning, self._in_head, self._in_block,
                    self._in_balanced, self._in_skip_ws)
        while handlers[self._state](final):
            pass

    def _start_head(self, steps: tuple[str, ...], purpose: int) -> None:
        self._head, self._head_for, self._state = _Head(steps), purpose, _HEAD

    def _hold_split(self, prefixes: tuple[set[str], int], final: bool) -> int:
        """How many chars at the end of the buffer may still begin a marker (0 when final)."""
        if final:
            return 0
        known, longest = prefixes
        buf = self._buf
        for k in range(min(len(buf), longest), 0, -1):
            if buf[-k:] in known:
                return k
        return 0

    def _in_content(self, final: bool) -> bool:
        if self._bare and self._bare_ok and self._buf:
            tools = self.family.tool_calls
            assert tools is not None
            self._block_start = ""
            self._start_head(tools.head, _BARE)
            return True
        buf = self._buf
        found, at = "", -1
        for marker in self._content_markers:
            i = buf.find(marker)
            if i >= 0 and (at < 0 or i < at or (i == at and len(marker) > len(found))):
                found, at = marker, i
        if at >= 0:
            self._emit("content", buf[:at])
            self._buf = buf[at + len(found):]
            reasoning, tools = self.family.reasoning, self.family.tool_calls
            if reasoning is not None and found == reasoning.start:
                self._emit("markup", found)
                self._skip_ws(_REASONING)
            else:
                assert tools is not None
                self._block_start = found
                if tools.head:
                    self._start_head(tools.head, _MARKED)
                else:
                    self._open_block()
            return True
        keep = self._hold_split(self._content_prefixes, final)
        self._emit("content", buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _in_reasoning(self, final: bool) -> bool:
        reasoning = self.family.reasoning
        assert reasoning is not None
        buf = self._buf
        at = buf.find(reasoning.end)
        if at >= 0:
            self._emit("reasoning", buf[:at])
            self._emit("markup", reasoning.end)
            self._buf = buf[at + len(reasoning.end):]
            self._bare_ok = True
            self._skip_ws(_CONTENT)
            return True
        keep = self._hold_split(self._reasoning_prefixes, final)
        self._emit("reasoning", buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        if final and self._raw:
            self._warnings.append(f"reasoning was not closed with {reasoning.end!r}: the reply ends inside it")
        return False

    def _skip_ws(self, then: int, semicolon: bool = False) -> None:
        self._after_ws, self._skip_semicolon, self._state = then, semicolon, _SKIP_WS

    def _in_skip_ws(self, final: bool) -> bool:
        buf = self._buf
        i = 0
        while i < len(buf) and (buf[i].isspace() or (self._skip_semicolon and buf[i] == ";")):
            i += 1
        self._emit("markup", buf[:i])
        self._buf = buf[i:]
        if self._buf:
            self._state = self._after_ws
            return True
        if final:
            self._state = self._after_ws
            return bool(self._state == _REASONING)  # an empty open reasoning still ends cleanly
        return False

    def _in_head(self, final: bool) -> bool:
        head = self._head
        assert head is not None
        result = head.advance(self._buf)
        if result == _HEAD_MORE and not final:
            return False
        purpose = self._head_for
        if result == _HEAD_MATCH:
            if purpose == _OPEN:
                self._emit("markup", self._buf[:head.pos])
                self._buf = self._buf[head.pos:]
                self._skip_ws(_REASONING)
            else:
                self._open_block()
            return True
        # No match (or the reply ended first): not a call / not a marker; re-read the text as such.
        if purpose == _OPEN:
            self._state = _REASONING
        elif purpose == _BARE:
            self._bare_ok = False
            self._state = _CONTENT
        else:
            self._emit("content", self._block_start)
            self._state = _CONTENT
        return True

    def _open_block(self) -> None:
        tools = self.family.tool_calls
        assert tools is not None
        self._block, self._tail = [], ""
        self._depth, self._quote, self._escape = 0, "", False
        self._state = _BLOCK if tools.end else _BALANCED

    def _in_block(self, final: bool) -> bool:
        tools = self.family.tool_calls
        assert tools is not None
        end, buf = tools.end, self._buf
        combined = self._tail + buf
        at = combined.find(end)
        if at >= 0:
            cut = at + len(end) - len(self._tail)
            self._block.append(buf[:cut])
            self._buf = buf[cut:]
            text = "".join(self._block)
            self._close_block(text, text[:-len(end)], closed=True)
            return True
        self._block.append(buf)
        self._tail = combined[-(len(end) - 1):] if len(end) > 1 else ""
        self._buf = ""
        if final:
            text = "".join(self._block)
            self._close_block(text, text, closed=False)
        return False

    def _in_balanced(self, final: bool) -> bool:
        buf = self._buf
        depth, quote = self._depth, self._quote
        escaped_at = 0 if self._escape else -1  # the index of the char a backslash escapes
        end = -1
        for m in _SPECIAL.finditer(buf):
            i, c = m.start(), m.group()
            if i == escaped_at:
                continue
            if quote:
                if c == "\\":
                    escaped_at = i + 1
                elif c == quote:
                    quote = ""
            elif c in "\"'":
                quote = c
            elif c in "[{(":
                depth += 1
            elif c in "]})":
                depth -= 1
                if depth <= 0:
                    end = m.end()
                    break
        if end >= 0:
            self._block.append(buf[:end])
            self._buf = buf[end:]
            text = "".join(self._block)
            self._close_block(text, text, closed=True)
            return True
        self._depth, self._quote, self._escape = depth, quote, escaped_at == len(buf)
        self._block.append(buf)
        self._buf = ""
        if final:
            text = "".join(self._block)
            self._close_block(text, text, closed=False)
        return False

    def _close_block(self, text: str, payload_text: str, closed: bool) -> None:
        """A block is complete (or the reply ended inside it): decode it, emit it, move on."""
        tools = self.family.tool_calls
        assert tools is not None
        full = self._block_start + text
        self._block, self._tail = [], ""
        try:
            calls = _DECODERS[tools.payload](payload_text)
        except _Undecodable as exc:
            self._warnings.append(f"tool call not understood ({exc}); kept as content: {full[:80]!r}")
            self._bare_ok = False
            self._emit("content", full)
            self._state = _CONTENT
            return
        if not closed:
            self._warnings.append(f"tool call block not closed with {tools.end!r}; decoded as it was"
                                  if tools.end else "tool call cut short; decoded as it was")
        self._emit("tool_text", full)
        for call in calls:
            self._calls.append(call)
            self._out.append(Delta("tool_call", tool_call=call))
        self._bare_ok = True
        self._skip_ws(_CONTENT, semicolon=self._bare)


def parse(text: str, family: Family) -> ParseResult:
    """Split a complete reply at once (the same result as feeding it in any pieces)."""
    parser = ReplyParser(family)
    parser.feed(text)
    return parser.finish()
