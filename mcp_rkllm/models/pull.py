"""Models from the Hugging Face Hub: `mcp-rkllm pull REPO [FILE...]` and the Ollama API's `POST /api/pull`.

A pull reads the repository's file list at one commit (`GET /api/models/{repo}/revision/{rev}?blobs=true`, with
each file's size and checksum: the LFS sha256, or the git blob sha1 of a small file), picks the files, and
downloads each one with huggingface_hub (`HEAD .../resolve/{commit}/{file}` for its location, then a `GET` that
follows the Hub's redirect to its storage). Without FILE arguments it takes the repository's one `.rkllm` or
`.gguf` model (several: an error listing them, to choose from); with them, the files named (a repository path, a
file name, or a unique part of a model file's name such as a quantization, `Q4_K_M`). Each model brings its
companions when the repository has them: the sidecar `<model>.json` beside it and the `.rknn` vision encoders
beside it (those for the same SoC when the file names say which).

Files go to `<first model root>/<OWNER>--<REPO>/<file name>`. A transfer is written to
`<root>/.pull/<checksum>.part` and resumes where it stopped: within one pull when the connection drops
(huggingface_hub retries with a `Range` request), and across pulls (an interrupted pull run again continues the
part). Every file is checked against the checksum the Hub lists before anything is moved into place, so a
mismatch leaves no model file behind; the companions are moved in before the models, so a model is never seen
without its sidecar. A file already in place with the right checksum is not downloaded again.

`HF_ENDPOINT` (read at each pull) points at another Hub (a mirror, or a test's local server); `HF_TOKEN` (or
`hf auth login`) reaches private and gated repositories.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, cast
from urllib.parse import urlparse

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils._headers import build_hf_headers

from mcp_rkllm.models.store import MODEL_SUFFIXES

#: Where a Hub name may start (Ollama's `hf.co/OWNER/REPO[:TAG]`, or a pasted address).
HUB_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
VISION_SUFFIX = ".rknn"
#: The hidden folder under the model root where transfers are written (the store does not look into it).
PARTS = ".pull"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The HTTP client's base error (a refused connection, a timeout), which huggingface_hub.errors re-exports.
_TRANSPORT_ERROR: type[Exception] = hf_errors.HTTPError  # type: ignore[attr-defined]
_SOC = re.compile(r"rk\d{4}|rv\d{4}", re.IGNORECASE)


class PullError(Exception):
    """A pull that cannot be done; `status` is the HTTP status the Ollama API answers it with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message = message
        self.status = status


class PullCancelled(Exception):
    """The pull was stopped (the client went away); what was transferred stays for the next pull to resume."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repository at the pulled commit."""

    path: str
    size: int | None
    sha256: str | None
    """The LFS sha256 (large files), else None."""
    blob_id: str | None
    """The git blob sha1 (what a small file is checked against)."""

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def digest(self) -> str:
        """`sha256:<hex>` or `sha1:<hex>`, what the file is checked against."""
        if self.sha256:
            return f"sha256:{self.sha256}"
        if self.blob_id:
            return f"sha1:{self.blob_id}"
        raise PullError(f"the Hub lists no checksum for {self.path}", 502)

    @property
    def is_model(self) -> bool:
        return self.path.lower().endswith(MODEL_SUFFIXES)


@dataclass(frozen=True)
class Plan:
    """What one pull fetches: the files of `repo` at `commit`, into `dest`."""

    repo: str
    commit: str
    files: list[RemoteFile]
    root: Path
    endpoint: str | None

    @property
    def dest(self) -> Path:
        return self.root / self.repo.replace("/", "--")

    def target(self, file: RemoteFile) -> Path:
        return self.dest / file.name


@dataclass(frozen=True)
class Progress:
    """How far one file is: `completed` of `total` bytes (total None when unknown)."""

    file: str
    digest: str
    total: int | None
    completed: int


ProgressSink = Callable[[Progress], None]


def hub_name(name: str) -> tuple[str, str | None] | None:
    """`hf.co/OWNER/REPO[:FILE]`, `huggingface.co/...` or `OWNER/REPO[:FILE]` as (repo, file or None); None for a
    name that names no repository (a plain model name). `:latest` selects nothing, as Ollama's default tag."""
    text = name.strip()
    for prefix in HUB_PREFIXES:
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
            break
    text = text.rstrip("/")
    repo, _, selector = text.partition(":")
    if not _REPO.match(repo):
        return None
    return repo, (selector or None) if selector.lower() != "latest" else None


def endpoint() -> str | None:
    """The Hub to pull from: `HF_ENDPOINT` now (huggingface_hub reads it once, at import), else its default."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _human(size: int | None) -> str:
    if size is None:
        return "size unknown"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1024
        if value < 1024 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


@contextlib.contextmanager
def _hub_errors(repo: str, hub: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as PullErrors that say what to do."""
    where = hub or "https://huggingface.co"
    try:
        yield
    except GatedRepoError as exc:
        raise PullError(f"{repo} is gated on the Hub: accept its terms on the Hub and set HF_TOKEN "
                        f"({_first_line(exc)})", 403) from exc
    except RepositoryNotFoundError as exc:
        raise PullError(f"repository {repo} not found on the Hub ({where}); a private one needs HF_TOKEN", 404) from exc
    except RevisionNotFoundError as exc:
        raise PullError(f"revision not found in {repo}: {_first_line(exc)}", 404) from exc
    except RemoteEntryNotFoundError as exc:
        raise PullError(f"file not found in {repo}: {_first_line(exc)}", 404) from exc
    except HfHubHTTPError as exc:
        raise PullError(f"the Hub ({where}) refused: {_first_line(exc)}", 502) from exc
    except _TRANSPORT_ERROR as exc:
        raise PullError(f"cannot reach the Hub at {where}: {exc}", 502) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def plan(repo: str, wanted: Sequence[str] = (), *, root: Path, revision: str | None = None) -> Plan:
    """The files to pull from `repo` (all models picked as the module says, with their companions)."""
    if not _REPO.match(repo):
        raise PullError(f"'{repo}' is not a Hub repository name (OWNER/REPO)", 400)
    hub = endpoint()
    with _hub_errors(repo, hub):
        info = HfApi(endpoint=hub).model_info(repo, revision=revision, files_metadata=True)
    if not info.sha:
        raise PullError(f"the Hub did not say which commit of {repo} it lists", 502)
    files = {s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
             for s in info.siblings or []}
    models = sorted(f for f in files if files[f].is_model)
    chosen = [files[path] for path in _choose(repo, list(files), models, wanted)]
    picked = {f.path for f in chosen}
    named_encoders = any(f.path.lower().endswith(VISION_SUFFIX) for f in chosen)
    for model in [f for f in chosen if f.is_model]:
        folder = PurePosixPath(model.path).parent
        sidecar = str(folder / (PurePosixPath(model.path).stem + ".json")).removeprefix("./")
        companions = [sidecar] if sidecar in files else []
        if not named_encoders:
            companions += _encoders(model, [f for f in files if PurePosixPath(f).parent == folder
                                            and f.lower().endswith(VISION_SUFFIX)])
        for path in companions:
            if path not in picked:
                picked.add(path)
                chosen.append(files[path])
    names: dict[str, str] = {}
    for f in chosen:
        if f.name.startswith(".") or "\\" in f.name or "\0" in f.name:
            raise PullError(f"{repo} lists a file this server will not write: {f.path!r}", 502)
        if f.name in names:
            raise PullError(f"{names[f.name]} and {f.path} would both be {f.name} in the model folder: pull them "
                            "one at a time", 400)
        names[f.name] = f.path
    return Plan(repo, info.sha, chosen, root, hub)


def _choose(repo: str, files: list[str], models: list[str], wanted: Sequence[str]) -> list[str]:
    """The repository paths the user asked for (or the one model), as PullErrors that list the choices."""
    listing = ", ".join(models) or "none"
    if not wanted:
        candidates = [m for m in models if not PurePosixPath(m).name.lower().startswith("mmproj")]
        if len(candidates) == 1:
            return candidates
        if not candidates:
            raise PullError(f"{repo} has no .rkllm or .gguf file (it has: {', '.join(sorted(files)) or 'no files'})",
                            404)
        raise PullError(f"{repo} has {len(candidates)} models; name the one to pull: {', '.join(candidates)}", 400)
    out: list[str] = []
    for item in wanted:
        hit = _match(item, files, models)
        if hit is None:
            raise PullError(f"{repo} has no file '{item}' (models: {listing})", 404)
        if isinstance(hit, list):
            raise PullError(f"'{item}' matches several models of {repo}; name one: {', '.join(hit)}", 400)
        if hit not in out:
            out.append(hit)
    return out


def _match(item: str, files: list[str], models: list[str]) -> str | list[str] | None:
    """The file `item` names: a path, a file name, or a unique part of a model's file name (case-insensitive)."""
    if item in files:
        return item
    low = item.lower()
    for hits in ([f for f in files if f.lower() == low],
                 [f for f in files if PurePosixPath(f).name.lower() == low],
                 [m for m in models if low in PurePosixPath(m).name.lower()]):
        if len(hits) == 1:
            return hits[0]
        if hits:
            return sorted(hits)
    return None


def _encoders(model: RemoteFile, encoders: list[str]) -> list[str]:
    """The vision encoders beside `model`: those for its SoC when both names say one, else all of them."""
    soc = {s.lower() for s in _SOC.findall(model.name)}
    same = [e for e in encoders if soc & {s.lower() for s in _SOC.findall(PurePosixPath(e).name)}]
    return sorted(same or encoders)


def _checksum(path: Path, digest: str) -> str:
    """The `algo:hex` of the file at `path`, in the algorithm of `digest` (sha1 is git's blob hash)."""
    algo = digest.partition(":")[0]
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(usedforsecurity=False)
    size = path.stat().st_size
    if algo != "sha256":
        h.update(f"blob {size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


class _Quiet:
    """No progress bar (the API reports progress its own way)."""

    def __init__(self, **_: Any):
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        pass


class _Counting:
    """The part file as http_get writes it, reporting progress and stopping when the pull is cancelled."""

    def __init__(self, out: IO[bytes], file: RemoteFile, sink: ProgressSink | None, cancel: threading.Event | None):
        self.out, self.file, self.sink, self.cancel = out, file, sink, cancel

    def write(self, data: bytes) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise PullCancelled
        written = self.out.write(data)
        self.report()
        return written

    def report(self) -> None:
        if self.sink is not None:
            self.sink(Progress(self.file.name, self.file.digest, self.file.size, self.out.tell()))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.out.seek(offset, whence)

    def tell(self) -> int:
        return self.out.tell()

    def truncate(self, size: int | None = None) -> int:
        return self.out.truncate(size)


def download(plan: Plan, *, sink: ProgressSink | None = None, bar: bool = True,
             cancel: threading.Event | None = None) -> list[Path]:
    """Fetch and check every file of `plan`, then move them into the model folder; the paths written."""
    parts = plan.root / PARTS
    try:
        parts.mkdir(parents=True, exist_ok=True)
        plan.dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(f"cannot write to the model root {plan.root}: {exc.strerror or exc}", 500) from exc
    ready: list[tuple[RemoteFile, Path]] = []
    for file in plan.files:
        target = plan.target(file)
        if target.is_file() and (file.size is None or target.stat().st_size == file.size) \
                and _checksum(target, file.digest) == file.digest:
            if sink is not None:
                sink(Progress(file.name, file.digest, file.size, file.size or target.stat().st_size))
            continue  # already here, and the same file
        ready.append((file, _fetch(plan, file, parts, sink, bar, cancel)))
    written = []
    for file, part in sorted(ready, key=lambda item: item[0].is_model):  # companions first
        target = plan.target(file)
        os.replace(part, target)
        written.append(target)
    with contextlib.suppress(OSError):
        parts.rmdir()  # when nothing is left to resume
    return written


def _fetch(plan: Plan, file: RemoteFile, parts: Path, sink: ProgressSink | None, bar: bool,
           cancel: threading.Event | None) -> Path:
    """Download `file` into its part (resuming what is there) and check it; the checked part."""
    part = parts / (file.digest.replace(":", "-") + ".part")
    with _hub_errors(plan.repo, plan.endpoint):
        url = hf_hub_url(plan.repo, file.path, revision=plan.commit, endpoint=plan.endpoint)
        headers = build_hf_headers()
        meta = get_hf_file_metadata(url, headers=headers, endpoint=plan.endpoint)
        if file.size is not None and meta.size is not None and meta.size != file.size:
            raise PullError(f"the Hub lists {file.path} as {file.size} bytes but serves {meta.size}", 502)
        location = meta.location
        if urlparse(location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed storage address: the token stays with the Hub
        with part.open("ab") as out:
            try:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise PullError(f"another pull of {file.name} is under way", 409) from exc
            if file.size is not None and out.tell() > file.size:
                out.truncate(0)
            resume = out.tell()
            counting = _Counting(out, file, sink, cancel)
            counting.report()
            if file.size is None or resume < file.size:
                http_get(location, cast(BinaryIO, counting), resume_size=resume, headers=headers,
                         expected_size=file.size, displayed_filename=file.name,
                         tqdm_class=None if bar else cast(Any, _Quiet))
    got = _checksum(part, file.digest)
    if got != file.digest:
        part.unlink(missing_ok=True)
        raise PullError(f"checksum mismatch for {file.path}: the Hub lists {file.digest}, the download is {got}; "
                        "nothing was kept, pull again", 502)
    return part


def pull(repo: str, wanted: Sequence[str] = (), *, root: Path, revision: str | None = None,
         sink: ProgressSink | None = None, bar: bool = True, cancel: threading.Event | None = None) -> list[Path]:
    """`plan` then `download`: the files of `repo` in the model folder under `root`."""
    return download(plan(repo, wanted, root=root, revision=revision), sink=sink, bar=bar, cancel=cancel)


def describe(plan: Plan) -> list[dict[str, Any]]:
    """The plan's files for people and logs."""
    return [{"file": f.path, "size": _human(f.size), "digest": f.digest} for f in plan.files]
