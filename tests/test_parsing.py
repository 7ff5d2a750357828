"""Model output understood: reasoning, content and tool calls per family, while streaming (issue 15).

Every sample is fed split at every position (and every 3-way split when short, with empty pieces
in between); each time the split must be the same and no character may be lost.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_rkllm.engine.parsing import Delta, ParseResult, ReplyParser, decode_calls, parse
from mcp_rkllm.models.families import FAMILIES, family_for, family_named, render_tool_results

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"  # noqa: RUF001
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"  # noqa: RUF001


def ds_call(name, args):
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{json.dumps(args, ensure_ascii=False)}\n```{DS_CALL_END}"


# (id, family, reply, reasoning, content, [(name, arguments)], warns)
SAMPLES = [
    ("qwen3-think-call", "qwen3",
     '<think>\n猫 thinks 🤔</think>\n\n答え🙂<tool_call>\n{"name": "get", "arguments": {"city": "東京"}}\n</tool_call>',
     "猫 thinks 🤔", "答え🙂", [("get", {"city": "東京"})], False),
    ("qwen3-empty-think", "qwen3", "<think>\n\n</think>\n\nHi 🙂", None, "Hi 🙂", [], False),
    ("qwen3-two-calls", "qwen3",
     '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     None, "", [("a", {"x": 1}), ("b", {})], False),
    ("qwen3-unterminated-think", "qwen3", "<think>still 🤔 thinking", "still 🤔 thinking", "", [], True),
    ("qwen3-not-markers", "qwen3", "a <b> <thin </thinkx> <tool_cal 1<2", None,
     "a <b> <thin </thinkx> <tool_cal 1<2", [], False),
    ("qwen2.5-broken-json", "qwen2.5", 'x<tool_call>{"name": 猫</tool_call>y', None,
     'x<tool_call>{"name": 猫</tool_call>y', [], True),
    ("qwen2.5-unclosed-valid", "qwen2.5", '<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n', None, "",
     [("f", {"a": "é"})], True),
    ("qwen2.5-unclosed-cut", "qwen2.5", 'ok <tool_call>\n{"name": "f", "argu', None,
     'ok <tool_call>\n{"name": "f", "argu', [], True),
    ("qwen2.5-string-arguments", "qwen2.5", '<tool_call>{"name": "f", "arguments": "{\\"k\\": 2}"}</tool_call>',
     None, "", [("f", {"k": 2})], False),
    ("r1-open", "deepseek-r1", "推理 🤔</think>\n\nAnswer 42", "推理 🤔", "Answer 42", [], False),
    ("r1-explicit-open", "deepseek-r1", "<think>\nhmm</think>ok", "hmm", "ok", [], False),
    ("r1-cut", "deepseek-r1", "only thinking <th", "only thinking <th", "", [], True),
    ("r1-call", "deepseek-r1",
     f"plan</think>\n\nCalling.{DS_BEGIN}{ds_call('get_weather', {'city': 'Zürich'})}"
     f"{ds_call('get_time', {})}{DS_END}",
     "plan", "Calling.", [("get_weather", {"city": "Zürich"}), ("get_time", {})], False),
    ("llama3-bare", "llama3", '{"name": "f", "parameters": {"q": "🙂 {x}"}}', None, "",
     [("f", {"q": "🙂 {x}"})], False),
    ("llama3-two", "llama3", ' {"name": "f", "parameters": {}}; {"name": "g", "parameters": {"n": -1}}', None, "",
     [("f", {}), ("g", {"n": -1})], False),
    ("llama3-python-tag", "llama3", 'Sure. <|python_tag|>{"name": "f", "parameters": {"s": "\\"}"}}', None,
     "Sure. ", [("f", {"s": '"}'})], False),
    ("llama3-prose", "llama3", "{curly} prose 🙂 stays", None, "{curly} prose 🙂 stays", [], False),
    ("llama3-json-not-call", "llama3", '{"name": 3}', None, '{"name": 3}', [], True),
    ("gemma3-calls", "gemma3", '[get(a=1, b="x]"), ns.other(c=true, d=[1, -2.5])]', None, "",
     [("get", {"a": 1, "b": "x]"}), ("ns.other", {"c": True, "d": [1, -2.5]})], False),
    ("gemma3-prose", "gemma3", "[1] 引用 text", None, "[1] 引用 text", [], False),
    ("phi4-mini-calls", "phi4-mini", 'functools[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
     None, "", [("f", {"a": 1}), ("g", {})], False),
    ("phi4-mini-word", "phi4-mini", "import functools\nfunctools.partial", None,
     "import functools\nfunctools.partial", [], False),
    ("phi4-reasoning", "phi4-reasoning", "<think>x</think>y", "x", "y", [], False),
    ("minicpm-call", "minicpm",
     '<|thought_start|>\n计划\n<|thought_end|>\n<|tool_call_start|>\n```python\nread(path="/a", n=2)\n```\n'
     "<|tool_call_end|>\nDone", "计划\n", "Done", [("read", {"path": "/a", "n": 2})], False),
    ("minicpm-bad-call", "minicpm", "<|tool_call_start|>\nimport os\n<|tool_call_end|>", None,
     "<|tool_call_start|>\nimport os\n<|tool_call_end|>", [], True),
    ("internlm-call", "internlm",
     'Let me.<|action_start|><|plugin|>\n{"name": "s", "parameters": {"q": "x"}}<|action_end|>', None, "Let me.",
     [("s", {"q": "x"})], False),
    ("smollm2-list", "smollm2",
     '<tool_call>[\n{"name": "a", "arguments": {"v": null}},\n{"name": "b", "arguments": {}}\n]</tool_call>',
     None, "", [("a", {"v": None}), ("b", {})], False),
    ("smollm2-empty-list", "smollm2", "<tool_call>[]</tool_call>", None, "", [], False),
    ("default-plain", "default", "<think>not a marker here</think> <tool_call>{}</tool_call>", None,
     "<think>not a marker here</think> <tool_call>{}</tool_call>", [], False),
]


def run(family, pieces) -> tuple[list[Delta], ParseResult]:
    parser = ReplyParser(family)
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += parser.feed(piece)
    result = parser.finish()
    return deltas + result.final_deltas, result


def calls_of(result: ParseResult):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.tool_calls]


def check(family, text, pieces, reasoning, content, calls, warns) -> None:
    deltas, result = run(family, pieces)
    where = f"{family.name} {pieces!r}"
    # No text lost: the deltas (and the segments) are the text, in order.
    assert "".join(d.text for d in deltas) == text, where
    assert "".join(t for _, t in result.segments) == text == result.raw_text, where
    assert (len(result.reasoning or "") + len(result.content) + len(result.tool_text) + len(result.markup)
            == len(text)), where
    for kind in ("content", "tool_text", "markup"):
        assert "".join(d.text for d in deltas if d.kind == kind) == getattr(result, kind), where
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == (result.reasoning or ""), where
    assert [d.tool_call for d in deltas if d.kind == "tool_call"] == result.tool_calls, where
    # The split itself.
    assert result.reasoning == reasoning, where
    assert result.content == content, where
    assert calls_of(result) == calls, where
    assert bool(result.warnings) == warns, (where, result.warnings)
    for call in result.tool_calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert isinstance(call["function"]["arguments"], str)


@pytest.mark.parametrize("sample", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_every_two_way_split(sample) -> None:
    _, name, text, reasoning, content, calls, warns = sample
    family = family_named(name)
    check(family, text, [text], reasoning, content, calls, warns)
    check(family, text, list(text), reasoning, content, calls, warns)
    for i in range(len(text) + 1):
        check(family, text, [text[:i], "", text[i:]], reasoning, content, calls, warns)


SHORT = [s for s in SAMPLES if len(s[2]) <= 70]


@pytest.mark.parametrize("sample", SHORT, ids=[s[0] for s in SHORT])
def test_every_three_way_split(sample) -> None:
    _, name, text, reasoning, content, calls, warns = sample
    family = family_named(name)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            check(family, text, [text[:i], text[i:j], text[j:]], reasoning, content, calls, warns)


def test_a_split_marker_is_held_and_released_at_once() -> None:
    parser = ReplyParser(family_named("qwen3"))
    assert parser.feed("Hi <th") == [Delta("content", "Hi ")]
    assert parser.feed("ink") == []
    assert parser.feed(">ab") == [Delta("markup", "<think>"), Delta("reasoning", "ab")]
    assert parser.feed("c</") == [Delta("reasoning", "c")]
    assert parser.feed("tool") == [Delta("reasoning", "</tool")]  # can no longer be </think>
    assert parser.feed("</think>\n\nX") == [Delta("markup", "</think>\n\n"), Delta("content", "X")]
    assert parser.feed("<tool_") == []
    assert parser.feed("cal!") == [Delta("content", "<tool_cal!")]
    assert parser.finish().final_deltas == []


def test_tool_text_comes_whole_then_the_call() -> None:
    parser = ReplyParser(family_named("qwen2.5"))
    assert parser.feed('<tool_call>{"name": "f", ') == []
    assert parser.feed('"arguments": {}}</tool_') == []
    deltas = parser.feed("call>\nafter")
    assert [d.kind for d in deltas] == ["tool_text", "tool_call", "markup", "content"]
    assert deltas[0].text == '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert deltas[1].tool_call is not None and deltas[1].tool_call["function"] == {"name": "f", "arguments": "{}"}


def test_bare_families_release_prose_at_once() -> None:
    parser = ReplyParser(family_named("llama3"))
    assert parser.feed(" ") == []  # could still be a call's leading space
    assert parser.feed("The") == [Delta("content", " The")]
    parser = ReplyParser(family_named("llama3"))
    assert parser.feed('{"na') == []
    assert parser.feed("x") == [Delta("content", '{"nax')]
    gemma = ReplyParser(family_named("gemma3"))
    assert gemma.feed("[1") == [Delta("content", "[1")]


def test_finish_is_idempotent_and_feed_after_it_refuses() -> None:
    parser = ReplyParser(family_named("qwen3"))
    parser.feed("<think>x")
    first = parser.finish()
    assert parser.finish() is first
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_empty_reply() -> None:
    for family in FAMILIES:
        result = ReplyParser(family).finish()
        assert (result.reasoning, result.content, result.tool_calls, result.warnings) == (None, "", [], [])


def test_decode_calls_reports_why() -> None:
    assert decode_calls("json", '{"name": "f"}')[0]["function"]["arguments"] == "{}"
    for payload, text in [("json", "[1]"), ("json", '{"name": "f", "arguments": [1]}'), ("python", "f(1)"),
                          ("python", "f(x=y)"), ("deepseek", "junk"), ("json", '{"name": "f", "arguments": '
                                                                               '{"x": NaN}}')]:
        with pytest.raises(ValueError):
            decode_calls(payload, text)  # type: ignore[arg-type]


def test_long_reply_is_linear() -> None:
    family = family_named("qwen3")
    body = "word <b> 🙂 " * 10000
    call = '<tool_call>{"name": "f", "arguments": {"s": "' + "x" * 50000 + '"}}</tool_call>'
    text = "<think>" + body + "</think>" + body + call
    start = time.perf_counter()
    _, result = run(family, list(text))
    elapsed = time.perf_counter() - start
    assert result.content == body and result.reasoning == body and len(result.tool_calls) == 1
    # ~0.3M one-char pieces take ~2 s; work that grows with the reply so far would take minutes.
    assert elapsed < 20, elapsed


# -- random texts built from marker fragments, split at random ------------------------------------------

FRAGMENTS = ["<think>", "</think>", "<th", "ink>", "</", "<", ">", "<tool_call>", "</tool_call>", "<tool_",
             '{"name": "f", "arguments": {}}', '{"name": ', "{", "}", "[", "]", '"', "\\", " ", "\n", ";",
             "🙂", "猫", "é", "a", "functools", "[f(a=1)]", "<|python_tag|>", "<|thought_start|>",
             "<|thought_end|>", "<|tool_call_start|>", "<|tool_call_end|>", DS_BEGIN, DS_END, DS_CALL, DS_SEP,
             DS_CALL_END, "<|action_start|><|plugin|>", "<|action_end|>"]


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from(FAMILIES),
       parts=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=25),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_random_text_random_splits(family, parts, cuts) -> None:
    text = "".join(parts)
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    whole = parse(text, family)
    deltas, result = run(family, pieces)
    assert "".join(d.text for d in deltas) == text
    assert "".join(t for _, t in result.segments) == text
    assert result.segments == whole.segments
    assert (result.reasoning, result.content, result.tool_text, result.markup, result.warnings) == (
        whole.reasoning, whole.content, whole.tool_text, whole.markup, whole.warnings)
    assert calls_of(result) == calls_of(whole)


# -- families ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("file_name", "family"), [
    ("Qwen3-1.7B-w8a8-rk3588.rkllm", "qwen3"),
    ("DeepSeek-R1-Distill-Qwen-1.5B_W8A8_RK3588.rkllm", "deepseek-r1"),
    ("Llama-3.2-1B-Instruct-rk3588-w8a8.rkllm", "llama3"),
    ("gemma-3-1b-it_w8a8.rkllm", "gemma3"),
    ("SmolLM2-135M-Instruct-Q4_1.gguf", "smollm2"),
    ("SmolLM2-135M-Instruct.Q4_1", "smollm2"),
    ("Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm", "qwen2.5"),
    ("MiniCPM4-0.5B.rkllm", "minicpm"),
    ("internlm2-chat-1_8b.rkllm", "internlm"),
    ("Phi-3-mini-4k-instruct.rkllm", "phi"),
    ("Phi-4-mini-instruct-w8a8.rkllm", "phi4-mini"),
    ("Phi-4-mini-reasoning.rkllm", "phi4-reasoning"),
    ("/models/sub/qwen3-4b.gguf", "qwen3"),
    ("TinyLlama-1.1B-Chat.rkllm", "default"),
    ("my-model.rkllm", "default"),
])
def test_family_for_file_names(file_name, family) -> None:
    assert family_for(file_name, None).name == family
    assert family_for(file_name, {}).name == family
    assert family_for(file_name, {"family": None}).name == family


def test_sidecar_family_wins() -> None:
    assert family_for("my-model.rkllm", {"family": "qwen3"}).name == "qwen3"
    assert family_for("Llama-3.2-1B.rkllm", {"family": "DeepSeek-R1"}).name == "deepseek-r1"
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family_for("Qwen3-1.7B.rkllm", {"family": "nope"})
    with pytest.raises(ValueError, match="must be a string"):
        family_for("Qwen3-1.7B.rkllm", {"family": 3})


def test_family_table_is_consistent() -> None:
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) and names[-1] == "default"
    for family in FAMILIES:
        assert family.source
        markers = [m for m in (family.reasoning.start if family.reasoning else "",
                               family.tool_calls.start if family.tool_calls else "") if m]
        for a in markers:  # no content marker inside another (the scanner takes the earliest)
            assert not any(a != b and a in b for b in markers)


def test_render_tool_results() -> None:
    assert render_tool_results(family_named("qwen3"), ["r1", "r2"]) == [
        ("user", "<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>")]
    assert render_tool_results(family_named("llama3"), ["a", "b"]) == [("ipython", "a"), ("ipython", "b")]
    (role, text), = render_tool_results(family_named("deepseek-r1"), ["x"])
    assert role == "" and text.startswith("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>x")  # noqa: RUF001
    assert render_tool_results(family_named("internlm"), ["x"]) == [("environment name=<|plugin|>", "x")]
    assert render_tool_results(family_named("default"), []) == []
