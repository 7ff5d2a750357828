"""Path confinement: every path a client gives must resolve, symlinks included, inside an allowed root.

Model files and LoRA adapters live under the model roots (plus the bundled model's directory);
prompt caches are written only inside the cache directory and read from it or the model roots.
A path outside is PATH_NOT_ALLOWED, naming the allowed roots; the resolved path is what reaches
the runtime, so a symlink swapped in later cannot redirect it. A path that cannot be resolved at
all (a symlink loop, `~user` of no such user, a name longer than the file system allows, text that
is not valid UTF-8) is the caller's mistake too: INVALID_PARAMS saying why.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from mcp_rkllm.errors import RkllmError

#: Longest file name component and whole path, in bytes (Linux NAME_MAX and PATH_MAX - 1).
NAME_MAX = 255
PATH_MAX = 4095
#: Why making a cache file's directory can fail because of the path the caller chose.
CALLER_ERRNOS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST, errno.ELOOP)


def default_cache_dir() -> Path:
    """The per-user cache directory for prompt caches."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mcp-rkllm"


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether `path` (resolved) is one of `roots` (resolved) or below one."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def real_path(path: Path) -> Path:
    """`path` resolved, symlinks included; raises OSError or RuntimeError (a symlink loop) when it cannot be."""
    return path.resolve()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class PathPolicy:
    """Where client-given paths may point."""

    def __init__(self, model_roots: list[Path], cache_dir: Path):
        self.model_roots = [r.expanduser().resolve() for r in model_roots]
        self.cache_dir = cache_dir.expanduser().resolve()

    def _resolve(self, path: str, base: Path, function: str) -> Path:
        def bad(why: str) -> RkllmError:
            return RkllmError("INVALID_PARAMS", function=function, detail=f"path {path[:200]!r}: {why}")

        if "\x00" in path:
            raise bad("paths must not contain NUL characters")
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise bad("not valid Unicode text (a lone surrogate)") from None
        try:
            p = Path(path).expanduser()
        except RuntimeError:  # `~name` of a user that does not exist (or no home directory)
            raise bad(f"cannot expand {path.split('/', 1)[0]!r}: no such user") from None
        full = p if p.is_absolute() else base / p
        self._check_length(full, bad)
        try:
            real = real_path(full)
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
            raise bad("it is a symlink loop" if loop else f"it cannot be resolved ({_reason(exc)})") from None
        self._check_length(real, bad)
        return real

    @staticmethod
    def _check_length(path: Path, bad: Callable[[str], RkllmError]) -> None:
        encoded = os.fsencode(path)
        longest = max((len(part) for part in encoded.split(b"/")), default=0)
        if longest > NAME_MAX:
            raise bad(f"a file name in it is {longest} bytes long, over the file system's limit of {NAME_MAX}")
        if len(encoded) > PATH_MAX:
            raise bad(f"it is {len(encoded)} bytes long (resolved), over the file system's limit of {PATH_MAX}")

    def model_file(self, path: str, function: str) -> str:
        """A model or LoRA file: inside a model root."""
        base = self.model_roots[0] if self.model_roots else self.cache_dir
        real = self._resolve(path, base, function)
        if not inside(real, self.model_roots):
            raise RkllmError("PATH_NOT_ALLOWED", function=function, path=path,
                             roots=[str(r) for r in self.model_roots])
        return str(real)

    def cache_file(self, path: str | None, function: str, write: bool, create: bool | None = None) -> str:
        """A prompt cache: written only inside the cache directory (relative paths land there);
        read from there or from a model root. `create` (default: `write`) makes its directory."""
        real = self._resolve(path or "prompt_cache.bin", self.cache_dir, function)
        roots = [self.cache_dir] if write else [self.cache_dir, *self.model_roots]
        if not inside(real, roots):
            raise RkllmError("PATH_NOT_ALLOWED", function=function, path=path, roots=[str(r) for r in roots])
        if write if create is None else create:
            try:
                real.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno not in CALLER_ERRNOS:
                    raise  # the server's own cache directory is unusable: not the caller's doing
                raise RkllmError("INVALID_PARAMS", function=function,
                                 detail=f"path {path!r}: cannot create its directory ({_reason(exc)})") from None
        return str(real)
