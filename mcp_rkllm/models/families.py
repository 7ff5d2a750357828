"""Model families: how a model marks its reasoning, writes tool calls and reads tool results back.

One table, `FAMILIES`, holds every family as data; `family_for(name, sidecar)` picks one for a model
file (a sidecar's `"family"` wins over the file name). `mcp_rkllm.engine.parsing` reads the markers
to split a reply into reasoning, content and tool calls; `render_tool_results` renders `tool` role
messages the way the family's chat template does.

Where each format comes from (the `source` of each row says the same):

- Qwen2.5 / Qwen3: the models' chat templates (Hermes style): `<tool_call>\\n{"name": ..., "arguments":
  ...}\\n</tool_call>`, results as `<tool_response>\\n...\\n</tool_response>` inside one user turn, and for
  Qwen3 `<think>...</think>` reasoning at the start of the reply.
- DeepSeek-R1 distills: the distills' chat template: the generation prompt ends in `<think>\\n`, so the
  output starts inside reasoning and closes it with `</think>`; tool calls and results use DeepSeek's
  own markers (tool calls begin / call begin / sep / call end / calls end, and tool outputs begin /
  output begin / output end / outputs end, written between fullwidth bars; see the table), the
  arguments as fenced JSON; llama.cpp's DeepSeek-R1 chat format reads the same.
- Llama 3.1 / 3.2 / 3.3: Meta's JSON tool calling: the reply is `{"name": ..., "parameters": ...}`,
  possibly after `<|python_tag|>`; results go back in an `ipython` turn.
- Gemma 3: Google's function-calling guide: Gemma has no tool tokens; the prompted format is a Python
  list of calls, `[func(a=1), other(b="x")]`, as the whole reply. No tool role: results are a user turn.
- Phi-4-mini: the model card / chat template: `functools[{"name": ..., "arguments": ...}, ...]` with no
  closing marker (vLLM's phi4_mini_json parser reads the same); a `tool` message renders as
  `<|tool|>...<|end|>`. Phi-4-reasoning: `<think>...</think>`. Phi-3 and Phi-4 have no tool format.
- MiniCPM3 / MiniCPM4: OpenBMB's function-calling template and parser: `<|thought_start|>...<|thought_end|>`,
  then `<|tool_call_start|>\\n```python\\nfunc(a=1)\\n```\\n<|tool_call_end|>`; results as a `tool` turn.
- InternLM2 / 2.5: InternLM's chat format (lagent meta template): `<|action_start|><|plugin|>\\n{"name":
  ..., "parameters": ...}<|action_end|>`; results in an `environment name=<|plugin|>` turn.
- SmolLM2: the model's function-calling instructions: `<tool_call>[{"name": ..., "arguments": ...},
  ...]</tool_call>` (a JSON list; `[]` means no call); results as `<tool_response>` in a user turn
  (Ollama's template).
- default: no markers at all; tool results go back as `<tool_response>` in a user turn, as the CPU
  runtime and `rkllm_set_function_tools` do by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

#: A head step: optional whitespace.
WS = "\\s*"
#: A head step: a (dotted) identifier, as a Python function name.
IDENT = "\\ident"

Payload = Literal["json", "deepseek", "python"]


@dataclass(frozen=True)
class Reasoning:
    """How a family marks reasoning: `start` opens it, `end` closes it.

    `starts_open`: the chat template's generation prompt already opened reasoning, so the output
    begins inside it (a `start` marker at the very beginning is accepted all the same).
    """

    start: str
    end: str
    starts_open: bool = False


@dataclass(frozen=True)
class ToolCalls:
    """How a family writes tool calls.

    `start` opens a block of calls (anywhere in the content); "" means there is no such marker.
    `bare`: a call may also stand without `start`, recognised only at the start of the reply's
    content (or right after another call). `end` closes the block; "" means the block
    ends where its brackets balance. `head` is what must follow `start` for the block to be a call
    (steps: literal text, `WS` or `IDENT`); text that departs from it is content. `payload` names
    the decoder of the block's text: "json" (an object or a list of objects with "name" and
    "arguments" or "parameters"), "deepseek" (DeepSeek's call / separator markers with fenced JSON
    arguments) or "python" (calls with keyword arguments, one per line or in a list).
    """

    start: str
    end: str
    payload: Payload
    head: tuple[str, ...] = ()
    bare: bool = False


@dataclass(frozen=True)
class ToolResult:
    """How a family's chat template renders `tool` role messages.

    Each result is `item_open + content + item_close`; consecutive results share one turn (joined by
    `joiner`, wrapped in `group_open` / `group_close`) when `one_turn`, else each gets its own turn.
    `role` is the turn's role for the chat template ("" = no turn header: the text follows the
    previous turn as is).
    """

    role: str
    item_open: str = ""
    item_close: str = ""
    group_open: str = ""
    group_close: str = ""
    joiner: str = "\n"
    one_turn: bool = True


@dataclass(frozen=True)
class Vision:
    """How a vision-language family takes images (RKLLM multimodal input, reference rknn-api.md §3).

    Each `<image>` in the prompt becomes `image_start + image_content x n_image_tokens + image_end`
    in the runtime, the encoder's rows substituted at the `image_content` positions. `fill` is the grey
    an image is padded with to a centred square (the demo's 127.5, which OpenCV rounds to 128);
    `combine` is how several encoder outputs make one row per token ("interleave": token t's row is
    output 0's row t, then output 1's, ..., as the demo does for Qwen3-VL's deepstack outputs). Token
    count, row width and the encoder's input size are never here: they come from the `.rknn` itself.
    """

    image_start: str
    image_end: str
    image_content: str
    fill: int = 128
    combine: Literal["interleave"] = "interleave"


@dataclass(frozen=True)
class Family:
    """A model family: its name, the file-name patterns that select it, and its output formats."""

    name: str
    patterns: tuple[str, ...]
    reasoning: Reasoning | None
    tool_calls: ToolCalls | None
    tool_result: ToolResult
    source: str
    vision: Vision | None = None
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.patterns))

    def matches(self, file_name: str) -> bool:
        """Whether this family's patterns match a model file name (case-insensitive)."""
        lowered = file_name.lower()
        return any(p.search(lowered) for p in self._compiled)


_HERMES_RESULT = ToolResult("user", "<tool_response>\n", "\n</tool_response>")
_HERMES_CALLS = ToolCalls("<tool_call>", "</tool_call>", "json")
_THINK = ("<think>", "</think>")
_QWEN_VISION = Vision("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

#: Every family, in matching order: the first whose pattern matches the file name wins, so the more
#: specific names come first (a DeepSeek-R1 distill of Qwen is DeepSeek-R1). `default` matches nothing.
FAMILIES: tuple[Family, ...] = (
    Family("deepseek-r1", (r"deepseek[-_ .]?r1",),
           Reasoning(*_THINK, starts_open=True),
           ToolCalls("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "deepseek"),  # noqa: RUF001
           ToolResult("", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",  # noqa: RUF001
                      "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", joiner=""),  # noqa: RUF001
           "chat template of deepseek-ai/DeepSeek-R1-Distill-* (generation prompt '<｜Assistant｜><think>\\n'); "  # noqa: RUF001
           "llama.cpp common/chat DeepSeek-R1 format"),
    # Vision-language families first: a Qwen2.5-VL file is Qwen2.5-VL before it is Qwen2.5.
    Family("qwen3-vl", (r"qwen[-_ ]?3[-_ .]?vl",),
           Reasoning(*_THINK), _HERMES_CALLS, _HERMES_RESULT,
           "chat template of Qwen/Qwen3-VL-*; image tags: rknn-llm multimodal demo (rknn-api.md §3.3)",
           vision=_QWEN_VISION),
    Family("qwen2.5-vl", (r"qwen[-_ ]?2\.5[-_ .]?vl",),
           None, _HERMES_CALLS, _HERMES_RESULT,
           "chat template of Qwen/Qwen2.5-VL-*; image tags: rknn-llm multimodal demo (rknn-api.md §3.3)",
           vision=_QWEN_VISION),
    Family("qwen2-vl", (r"qwen[-_ ]?2[-_ .]?vl",),
           None, _HERMES_CALLS, _HERMES_RESULT,
           "chat template of Qwen/Qwen2-VL-*; image tags: rknn-llm Qwen2-VL demo (rknn-api.md §3.3)",
           vision=_QWEN_VISION),
    Family("internvl3", (r"internvl[-_ ]?3",),
           None, None, _HERMES_RESULT,
           "OpenGVLab/InternVL3-* (image tags <img></img><IMG_CONTEXT>: rknn-llm multimodal demo README)",
           vision=Vision("<img>", "</img>", "<IMG_CONTEXT>")),
    Family("minicpm-v", (r"minicpm[-_ ]?v",),
           None, None, _HERMES_RESULT,
           "openbmb/MiniCPM-V-* (image tags <image></image><unk>: rkllama README for MiniCPM-V)",
           vision=Vision("<image>", "</image>", "<unk>")),
    Family("qwen3", (r"qwen[-_ ]?3",),
           Reasoning(*_THINK), _HERMES_CALLS, _HERMES_RESULT,
           "chat template of Qwen/Qwen3-* (tokenizer_config.json)"),
    Family("qwen2.5", (r"qwen[-_ ]?2",),
           None, _HERMES_CALLS, _HERMES_RESULT,
           "chat template of Qwen/Qwen2.5-*-Instruct (tokenizer_config.json)"),
    Family("llama3", (r"llama[-_ ]?3",),
           None,
           ToolCalls("<|python_tag|>", "", "json", (WS, "{", WS, '"name"', WS, ":"), bare=True),
           ToolResult("ipython", one_turn=False),
           "Meta Llama 3.1/3.2 prompt format, JSON-based tool calling; chat template of "
           "meta-llama/Llama-3.2-*-Instruct"),
    Family("gemma3", (r"gemma[-_ ]?3",),
           None,
           ToolCalls("", "", "python", (WS, "[", WS, IDENT, WS, "("), bare=True),
           ToolResult("user"),
           "ai.google.dev/gemma/docs/capabilities/function-calling (prompted format, no tool tokens)"),
    Family("phi4-reasoning", (r"phi[-_ ]?4.*reasoning",),
           Reasoning(*_THINK), None, ToolResult("user"),
           "model card of microsoft/Phi-4-reasoning (system prompt: <think> {Thought} </think> {Solution})"),
    Family("phi4-mini", (r"phi[-_ ]?4[-_ ]?mini",),
           None,
           ToolCalls("functools", "", "json", (WS, "[")),
           ToolResult("tool"),
           "chat template and model card of microsoft/Phi-4-mini-instruct; vLLM phi4_mini_json tool parser"),
    Family("phi", (r"phi[-_ ]?[34]",),
           None, None, ToolResult("user"),
           "chat templates of microsoft/Phi-3-*, Phi-3.5-*, phi-4 (system/user/assistant only)"),
    Family("minicpm", (r"minicpm",),
           Reasoning("<|thought_start|>", "<|thought_end|>"),
           ToolCalls("<|tool_call_start|>", "<|tool_call_end|>", "python"),
           ToolResult("tool"),
           "OpenBMB/MiniCPM demo/minicpm3/function_call (chat template and vLLM parser); "
           "demo/minicpm4/MCP"),
    Family("internlm", (r"internlm",),
           None,
           ToolCalls("<|action_start|><|plugin|>", "<|action_end|>", "json"),
           ToolResult("environment name=<|plugin|>"),
           "InternLM chat format (lagent INTERNLM2_META; vLLM internlm2 tool parser)"),
    Family("smollm2", (r"smollm[-_ ]?2",),
           None, _HERMES_CALLS, _HERMES_RESULT,
           "HuggingFaceTB/SmolLM2-1.7B-Instruct instructions_function_calling.md; Ollama smollm2 template"),
    Family("default", (),
           None, None, _HERMES_RESULT,
           "no markers; tool results as rkllm_set_function_tools' default tag 'tool_response'"),
)

_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
DEFAULT = _BY_NAME["default"]


def family_named(name: str) -> Family:
    """The family called `name` (case-insensitive); ValueError listing the known names otherwise."""
    family = _BY_NAME.get(name.strip().lower())
    if family is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_BY_NAME)}")
    return family


def family_for(name: str, sidecar: Mapping[str, Any] | None = None) -> Family:
    """The family of the model file `name` (a path or a file name).

    A sidecar's `"family"` (a family name, see `FAMILIES`) wins; an unknown name or a non-string is
    a ValueError. Otherwise the first family whose pattern matches the file name, else `default`.
    """
    if sidecar is not None and sidecar.get("family") is not None:
        chosen = sidecar["family"]
        if not isinstance(chosen, str):
            raise ValueError(f"sidecar 'family' must be a string, not {type(chosen).__name__}")
        return family_named(chosen)
    file_name = PurePath(name).name
    for family in FAMILIES:
        if family.matches(file_name):
            return family
    return DEFAULT


def render_tool_results(family: Family, contents: Sequence[str]) -> list[tuple[str, str]]:
    """Consecutive `tool` messages' contents as the family's chat template renders them.

    Returns the turns, each `(role, text)`: one turn holding every result when the family groups
    them, else one turn per result. An empty `contents` gives no turn.
    """
    fmt = family.tool_result
    items = [fmt.item_open + c + fmt.item_close for c in contents]
    if not items:
        return []
    if fmt.one_turn:
        return [(fmt.role, fmt.group_open + fmt.joiner.join(items) + fmt.group_close)]
    return [(fmt.role, fmt.group_open + item + fmt.group_close) for item in items]
