"""The README's Configuration table is what the Settings model generates, and the README names only real flags.

Run with UPDATE_DOCS=1 to rewrite the generated section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mcp_rkllm.cli import parser
from mcp_rkllm.config import Settings, setting_specs, settings_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = re.compile(r"(<!-- settings:start -->\n)(.*?)(<!-- settings:end -->)", re.S)

#: Flags of other programs the README shows inline (uvx, pip, benchmarks/run.py).
OTHER_PROGRAMS_FLAGS = {"--from", "--no-deps", "--quick"}


def _with_generated_section(text: str) -> str:
    assert len(MARKERS.findall(text)) == 1, "README needs exactly one settings:start / settings:end pair"
    return MARKERS.sub(lambda m: m.group(1) + settings_markdown_table() + "\n" + m.group(3), text)


def test_readme_configuration_table_is_generated_from_settings() -> None:
    text = README.read_text()
    expected = _with_generated_section(text)
    if os.environ.get("UPDATE_DOCS") == "1":
        README.write_text(expected)
        text = expected
    assert text == expected, "README settings table is stale: UPDATE_DOCS=1 pytest tests/test_settings_docs.py"
    configuration = text[text.index("## Configuration"):text.index("<!-- settings:end -->")]
    for name in Settings.model_fields:  # every setting, by flag and variable, in the Configuration section
        spec = next(s for s in setting_specs() if s.name == name)
        assert f"`{spec.flag}`" in configuration and f"`{spec.env}`" in configuration


def test_generated_table_rows() -> None:
    table = settings_markdown_table()
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(Settings.model_fields)
    assert all(line.count(" | ") == 3 for line in rows)  # four cells, no stray pipe from a description
    assert "| `--max-new-tokens` | `MCP_RKLLM_MAX_NEW_TOKENS` | `65536` |" in table
    assert "| `--library` | `RKLLM_LIB_PATH` |" in table
    assert "| `--models` (repeatable) | `MCP_RKLLM_MODELS` (`:`-separated; `;` on Windows) |" in table
    assert "| `--allowed-hosts` (repeatable) | `MCP_RKLLM_ALLOWED_HOSTS` (`,`-separated) |" in table
    assert "| `--max-request-bytes` | `MCP_RKLLM_MAX_REQUEST_BYTES` | `16777216` (16 MiB) |" in table
    assert "| `--worker-timeout` | `MCP_RKLLM_WORKER_TIMEOUT` | `30` |" in table
    assert "| `--load-timeout` | `MCP_RKLLM_LOAD_TIMEOUT` | `600` |" in table


def test_every_setting_is_described() -> None:
    for spec in setting_specs():
        assert spec.description.endswith("."), spec.name
        if spec.default in (None, ()):
            assert spec.shown_default, f"{spec.name}: say what an unset value means"
        for choice in spec.choices:  # the meaning column explains every value a Literal allows
            assert f"`{choice}`" in spec.description, (spec.name, choice)


def _all_option_strings() -> set[str]:
    import argparse

    found: set[str] = set()
    parsers = [parser()]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return found


def test_readme_names_only_flags_that_exist() -> None:
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)  # inline code only: blocks show other tools
    named = {flag for span in re.findall(r"`([^`\n]+)`", text) for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)}
    assert "--max-request-bytes" in named  # the scan sees flags in prose
    assert named - OTHER_PROGRAMS_FLAGS <= _all_option_strings()
