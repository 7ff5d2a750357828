"""The layout is the architecture: imports point one way, one package owns cffi, one owns the MCP SDK.

Layers, top to bottom: cli -> surfaces -> engine (and doctor) -> runtime / isolation -> native.
errors, structs, events, config and models are the shared vocabulary, usable by all and importing
only each other. Only `native/` touches cffi; only `surfaces/` imports the `mcp` SDK (the cli's
`try` client included), so worker processes never load it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mcp_rkllm"

#: First path component under mcp_rkllm/ (or module name) -> layer; a module may import its layer or lower.
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "structs": 0, "events": 0, "config": 0, "models": 0,
    "native": 1,
    "runtime": 2, "isolation": 2,
    "engine": 3, "doctor": 3,
    "surfaces": 4,
    "cli": 5, "__main__": 5,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import in the package, nested ones too."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(module, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((module, node.module, node.lineno))
    return out


IMPORTS = _imports()


def test_every_package_module_has_a_layer() -> None:
    parts = {_part(m) for m, _, _ in IMPORTS}
    assert parts <= set(LAYERS), f"modules without a layer: {parts - set(LAYERS)}"


def test_imports_point_down() -> None:
    wrong = []
    for module, imported, line in IMPORTS:
        if not imported.startswith("mcp_rkllm"):
            continue
        here, there = LAYERS[_part(module)], LAYERS[_part(imported)]
        if there > here:
            wrong.append(f"{module}:{line} imports {imported} (layer {there} above {here})")
        if _part(module) == "runtime" and _part(imported) == "isolation":
            wrong.append(f"{module}:{line} imports {imported}: isolation hosts runtimes, not the reverse")
    assert not wrong, "\n".join(wrong)


def test_only_native_touches_cffi() -> None:
    users = {f"{m}:{line}" for m, imported, line in IMPORTS
             if imported.split(".")[0] == "cffi" and _part(m) != "native"}
    assert not users, users


def test_only_surfaces_import_the_mcp_sdk() -> None:
    users = {f"{m}:{line}" for m, imported, line in IMPORTS
             if imported.split(".")[0] == "mcp" and _part(m) != "surfaces"}
    assert not users, users


@pytest.mark.parametrize("module", ["mcp_rkllm.isolation.child", "mcp_rkllm.engine", "mcp_rkllm.errors"])
def test_below_the_surfaces_nothing_loads_the_mcp_sdk(module: str) -> None:
    # A worker process imports the child module: it must not pay for (or depend on) the MCP SDK.
    code = f"import sys, {module}; bad = sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')); " \
           "print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
