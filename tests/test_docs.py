"""The README's generated tables match the registry and the error table; its test command is CI's.

Run with UPDATE_DOCS=1 to rewrite the generated sections.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mcp_rkllm.errors.table import markdown_table
from mcp_rkllm.surfaces.jsonrpc.openrpc import markdown_table as jsonrpc_table
from mcp_rkllm.surfaces.registry import build_registry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(name: str, body: str, text: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    assert pattern.search(text), f"README lacks the {name} markers"
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def test_readme_tables_are_generated_from_the_code() -> None:
    text = README.read_text()
    expected = _section("tools", build_registry().markdown_table(), text)
    expected = _section("errors", markdown_table(), expected)
    expected = _section("jsonrpc", jsonrpc_table(build_registry()), expected)
    if os.environ.get("UPDATE_DOCS") == "1":
        README.write_text(expected)
        text = expected
    assert text == expected, "README tables are stale: run UPDATE_DOCS=1 python -m pytest tests/test_docs.py"


def test_every_error_code_and_tool_is_documented() -> None:
    text = README.read_text()
    from mcp_rkllm.errors import ERRORS

    assert all(f"`{code}`" in text for code in ERRORS)
    assert all(f"`{name}`" in text for name in build_registry().specs)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README.read_text()


def test_example_client_config_is_valid() -> None:
    import json

    config = json.loads((ROOT / "claude_desktop_config.example.json").read_text())
    entry = config["mcpServers"]["rkllm"]
    assert entry["command"].endswith("mcp-rkllm") and "--library" in entry["args"]
