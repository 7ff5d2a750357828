"""Path confinement: every path a client gives must resolve, symlinks included, inside an allowed root.

Model files and LoRA adapters live under the model roots (plus the bundled model's directory);
prompt caches are written only inside the cache directory and read from it or the model roots.
A path outside is PATH_NOT_ALLOWED, naming the allowed roots; the resolved path is what reaches
the runtime, so a symlink swapped in later cannot redirect it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcp_rkllm.errors import RkllmError


def default_cache_dir() -> Path:
    """The per-user cache directory for prompt caches."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mcp-rkllm"


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


class PathPolicy:
    """Where client-given paths may point."""

    def __init__(self, model_roots: list[Path], cache_dir: Path):
        self.model_roots = [r.expanduser().resolve() for r in model_roots]
        self.cache_dir = cache_dir.expanduser().resolve()

    def _resolve(self, path: str, base: Path) -> Path:
        if "\x00" in path:
            raise RkllmError("INVALID_PARAMS", detail="paths must not contain NUL characters")
        p = Path(path).expanduser()
        return (p if p.is_absolute() else base / p).resolve()

    def model_file(self, path: str, function: str) -> str:
        """A model or LoRA file: inside a model root."""
        base = self.model_roots[0] if self.model_roots else self.cache_dir
        real = self._resolve(path, base)
        if not _inside(real, self.model_roots):
            raise RkllmError("PATH_NOT_ALLOWED", function=function, path=path,
                             roots=[str(r) for r in self.model_roots])
        return str(real)

    def cache_file(self, path: str | None, function: str, write: bool) -> str:
        """A prompt cache: written only inside the cache directory (relative paths land there);
        read from there or from a model root."""
        real = self._resolve(path or "prompt_cache.bin", self.cache_dir)
        roots = [self.cache_dir] if write else [self.cache_dir, *self.model_roots]
        if not _inside(real, roots):
            raise RkllmError("PATH_NOT_ALLOWED", function=function, path=path, roots=[str(r) for r in roots])
        if write:
            real.parent.mkdir(parents=True, exist_ok=True)
        return str(real)
