"""Size limits on tool arguments, checked before anything reaches the runtime.

Every string (prompts, templates, tool lists, messages) is bounded in UTF-8 bytes, every token id
array and float array in items, every other list (messages, tools) in entries, and `max_new_tokens` /
`max_context_len` wherever they appear.
A violation is LIMIT_EXCEEDED naming the argument, the value and the limit (Settings).

Outputs are bounded too, but where they are produced: `events.OutputLimit` (the engine builds it from
`output_rows` and `max_output_floats`) rides on the run's collector, so runtimes, which cannot import
the engine, check it before they compute an output, and the collector enforces it on what arrives.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError

#: Integer fields bounded wherever they appear, by the Settings attribute of the same name.
BOUNDED_FIELDS = ("max_new_tokens", "max_context_len")


def enforce(params: BaseModel, settings: Settings, function: str) -> None:
    """Raise LIMIT_EXCEEDED if any argument in `params` is over its limit."""
    _walk(params, "", settings, function)


def _over(function: str, what: str, value: int, limit: int) -> RkllmError:
    return RkllmError("LIMIT_EXCEEDED", function=function, what=what, value=value, limit=limit)


def _walk(value: Any, where: str, s: Settings, function: str) -> None:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            item = getattr(value, name)
            path = f"{where}.{name}" if where else name
            if name in BOUNDED_FIELDS and isinstance(item, int) and item > getattr(s, name):
                raise _over(function, path, item, getattr(s, name))
            _walk(item, path, s, function)
    elif isinstance(value, str):
        # Cheap first: a string of n characters has at most 4n UTF-8 bytes.
        if len(value) * 4 > s.max_prompt_bytes and len(value.encode("utf-8")) > s.max_prompt_bytes:
            raise _over(function, f"{where} (UTF-8 bytes)", len(value.encode("utf-8")), s.max_prompt_bytes)
    elif isinstance(value, list) and value:
        first = value[0]
        if not isinstance(first, float | int) and len(value) > s.max_items:
            raise _over(function, f"{where} (entries)", len(value), s.max_items)
        if isinstance(first, float | int) and not isinstance(first, bool):
            floats = any(isinstance(v, float) for v in value[:64])
            limit = s.max_floats if floats else s.max_token_ids
            if len(value) > limit:
                raise _over(function, f"{where} (items)", len(value), limit)
        elif isinstance(first, dict):
            size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
            if size > s.max_prompt_bytes:
                raise _over(function, f"{where} (JSON bytes)", size, s.max_prompt_bytes)
        else:
            for i, item in enumerate(value):
                _walk(item, f"{where}[{i}]", s, function)
