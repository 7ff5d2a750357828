"""`mcp-rkllm pull` and the Ollama API's `/api/pull` against a fake Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT).

The fake serves what huggingface_hub's calls ask for, as the Hub does:

- `GET /api/models/{repo}[/revision/{rev}]?blobs=true` (HfApi.model_info): the commit (`sha`) and the files
  (`siblings`: `rfilename`, `size`, `blobId`, and `lfs` with `sha256` for large files); an unknown repository is a
  404 with `X-Error-Code: RepoNotFound`, an unknown revision `RevisionNotFound`.
- `HEAD` / `GET /{repo}/resolve/{rev}/{path}` (get_hf_file_metadata, http_get): a small file is served there with
  `ETag` (its git blob sha1) and `X-Repo-Commit`; a large (LFS) file is a 302 to the fake's second origin, the
  "CDN", with `X-Linked-Etag` (its sha256), `X-Linked-Size` and `X-Repo-Commit`; a missing file is a 404 with
  `X-Error-Code: EntryNotFound`.
- `GET /blobs/{sha256}` on the CDN origin, with `Range: bytes=N-` answered 206 + `Content-Range`.

A file can be cut midway once (headers promise the whole length, the connection closes after half: the client
sees an incomplete body and resumes with a Range request), or served corrupted (same length, other bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ollama
import pytest
from huggingface_hub import constants as hf_constants
from mcp import Client

from mcp_rkllm.cli import main
from mcp_rkllm.config import Settings
from mcp_rkllm.models import pull
from mcp_rkllm.models.store import ModelStore
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake
from tests.servers import free_port, start_http_server, stop
from tests.test_server import call

LFS_SUFFIXES = (".rkllm", ".gguf", ".rknn")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Request:
    origin: str
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)
    """File names whose next transfer stops halfway."""
    corrupt: set[str] = field(default_factory=set)
    """File names served with other bytes than the listing's checksum."""
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    cdn: str = ""

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = files
        self.commits[repo] = hashlib.sha1(repo.encode(), usedforsecurity=False).hexdigest()

    def blob(self, sha256: str) -> tuple[str, bytes] | None:
        for files in self.repos.values():
            for path, data in files.items():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return path, data
        return None

    def gets(self, name: str) -> list[Request]:
        """The GETs that transferred the file called `name` (from the Hub or the CDN)."""
        files = {p: d for f in self.repos.values() for p, d in f.items()}
        sha = hashlib.sha256(files[name]).hexdigest()
        return [r for r in self.requests if r.method == "GET" and (r.path.endswith("/" + name)
                                                                   or r.path == f"/blobs/{sha}")]


def handler(hub: FakeHub, origin: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(head=True)

        def do_GET(self) -> None:
            self.answer(head=False)

        def fail(self, status: int, code: str, commit: str | None = None) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def answer(self, head: bool) -> None:
            path = self.path.split("?")[0]
            hub.requests.append(Request(origin, self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            if origin == "cdn":
                m = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
                found = hub.blob(m.group(1)) if m else None
                if found is None:
                    return self.fail(404, "EntryNotFound")
                return self.content(found[0], found[1], head)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                return self.listing(m.group(1), m.group(2))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m is None or m.group(1) not in hub.repos:
                return self.fail(404, "RepoNotFound")
            repo, rev, name = m.groups()
            commit = hub.commits[repo]
            if rev not in ("main", commit):
                return self.fail(404, "RevisionNotFound")
            data = hub.repos[repo].get(name)
            if data is None:
                return self.fail(404, "EntryNotFound", commit)
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn}/blobs/{sha}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{git_sha1(data)}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self.content(name, data, head, {"ETag": f'"{git_sha1(data)}"', "X-Repo-Commit": commit})

        def listing(self, repo: str, rev: str | None) -> None:
            if repo not in hub.repos:
                return self.fail(404, "RepoNotFound")
            if rev not in (None, "main", hub.commits[repo]):
                return self.fail(404, "RevisionNotFound")
            siblings = []
            for name, data in hub.repos[repo].items():
                sibling: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_sha1(data)}
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                      "pointerSize": 134}
                siblings.append(sibling)
            body = json.dumps({"id": repo, "modelId": repo, "sha": hub.commits[repo], "private": False,
                               "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None

        def content(self, name: str, data: bytes, head: bool, extra: dict[str, str] | None = None) -> None:
            if name in hub.corrupt:
                data = bytes(b ^ 0x5A for b in data)
            start = 0
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                assert m, rng
                start = int(m.group(1))
            body = data[start:]
            self.send_response(206 if rng else 200)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if head:
                return
            if name in hub.cut_once:
                hub.cut_once.discard(name)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    state = FakeHub()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler(state, origin)) for origin in ("hub", "cdn")]
    state.url, state.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield state
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(5)


MODEL = "Tiny-1.5B_W8A8_RK3588.rkllm"
SIDECAR = {"description": "a tiny test model", "max_new_tokens": 5,
           "chat_template": {"system_prompt": "S", "prompt_prefix": "P", "prompt_postfix": "Q"}}


def rkllm_repo(hub: FakeHub, repo: str = "someone/Tiny-rkllm") -> dict[str, bytes]:
    files = {MODEL: bytes(range(256)) * 1200,  # 300 KB
             "Tiny-1.5B_W8A8_RK3588.json": json.dumps(SIDECAR).encode(),
             "vision_rk3588.rknn": b"encoder 3588" * 100, "vision_rk3576.rknn": b"encoder 3576" * 100,
             "README.md": b"# Tiny\n", ".gitattributes": b"*.rkllm filter=lfs\n"}
    hub.add(repo, files)
    return files


def run_pull(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--models", str(root), "pull", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


pytestmark = pytest.mark.anyio


async def test_pull_downloads_a_model_that_then_lists_and_loads(hub: FakeHub, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = rkllm_repo(hub)
    root = tmp_path / "models"
    code, out, err = run_pull(capsys, root, "someone/Tiny-rkllm")
    assert code == 0, err
    folder = root / "someone--Tiny-rkllm"
    # the model, its sidecar and the encoder for its SoC; not the other SoC's encoder, the README or .gitattributes
    assert sorted(p.name for p in folder.iterdir()) == ["Tiny-1.5B_W8A8_RK3588.json", MODEL, "vision_rk3588.rknn"]
    for p in folder.iterdir():
        assert p.read_bytes() == files[p.name]
    assert out.split() == [str(folder / n) for n in (MODEL, "Tiny-1.5B_W8A8_RK3588.json", "vision_rk3588.rknn")]
    assert "pulling someone/Tiny-rkllm at" in err and "load it by name (Tiny-1.5B_W8A8_RK3588)" in err
    assert not (root / pull.PARTS).exists()  # nothing left to resume
    # the LFS file came from the CDN after a HEAD on the Hub that redirected there; the small one from the Hub
    assert [(r.origin, r.method) for r in hub.requests if r.path.endswith(MODEL)] == [("hub", "HEAD")]
    assert [r.origin for r in hub.gets(MODEL)] == ["cdn"]
    assert [r.origin for r in hub.gets("Tiny-1.5B_W8A8_RK3588.json")] == ["hub"]

    listed = ModelStore([root], include_bundled=False).models()
    assert [(m.name, m.kind) for m in listed] == [("Tiny-1.5B_W8A8_RK3588", "rkllm")]
    assert listed[0].sidecar is not None and listed[0].sidecar.param.max_new_tokens == 5

    # pulled again: everything is here with the right checksum, so nothing is transferred
    before = len(hub.requests)
    code, _, err = run_pull(capsys, root, "hf.co/someone/Tiny-rkllm:latest")
    assert code == 0, err
    assert [r for r in hub.requests[before:] if r.method == "GET" and "/api/" not in r.path] == []

    # and it loads on the (fake) NPU runtime, with the sidecar's defaults
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("FAKE_RKLLM_RECORD_DIR", str(records))
    library = build_fake("1.3.0", "1.3.0")
    settings = Settings(library=str(library), models=(str(root),))
    async with Client(build_server(settings)) as client:
        models = await call(client, "list_models", {})
        assert "Tiny-1.5B_W8A8_RK3588" in [m["name"] for m in models["models"] if m["loadable"]]
        loaded = await call(client, "load_model", {"model": "Tiny-1.5B_W8A8_RK3588"})
        r = await call(client, "generate", {"handle": loaded["handle"], "prompt": "hello"})
        assert r["token_count"] == 5  # the sidecar's max_new_tokens
    fake = FakeView(library, records)
    assert fake.last("set_chat_template") == SIDECAR["chat_template"]
    assert Path(fake.last("init")["model_path"]).name == MODEL


def test_several_models_must_be_chosen(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.add("someone/Tiny-GGUF", {"tiny.Q4_K_M.gguf": b"g" * 5000, "tiny.Q8_0.gguf": b"h" * 9000,
                                  "mmproj-tiny.gguf": b"m" * 100, "tiny.Q4_K_M.json": b'{"max_context_len": 512}'})
    root = tmp_path / "models"
    code, _, err = run_pull(capsys, root, "someone/Tiny-GGUF")
    assert code == 2
    assert "someone/Tiny-GGUF has 2 models; name the one to pull: tiny.Q4_K_M.gguf, tiny.Q8_0.gguf" in err
    assert not root.exists() or not any(root.rglob("*.gguf"))
    code, _, err = run_pull(capsys, root, "someone/Tiny-GGUF", "tiny.bin")
    assert code == 1 and "someone/Tiny-GGUF has no file 'tiny.bin'" in err and "tiny.Q8_0.gguf" in err
    code, _, err = run_pull(capsys, root, "someone/Tiny-GGUF", "tiny")
    assert code == 2 and "'tiny' matches several models" in err
    code, _, err = run_pull(capsys, root, "hf.co/someone/Tiny-GGUF:q4_k_m")  # Ollama's tag: a part of the name
    assert code == 0, err
    assert sorted(p.name for p in (root / "someone--Tiny-GGUF").iterdir()) == ["tiny.Q4_K_M.gguf", "tiny.Q4_K_M.json"]
    code, _, err = run_pull(capsys, root, "someone/Nothing-here")
    assert code == 1 and "repository someone/Nothing-here not found on the Hub" in err
    code, _, err = run_pull(capsys, root, "not a repo")
    assert code == 2 and "is not a Hub repository" in err


def test_an_interrupted_transfer_resumes(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # huggingface_hub keeps what arrived in whole chunks (DOWNLOAD_CHUNK_SIZE, 10 MB) when a connection drops, and
    # asks for the rest: a 24 MB model cut after 12 MB resumes at 10 MB
    chunk = hf_constants.DOWNLOAD_CHUNK_SIZE
    big = bytes(range(256)) * (chunk * 12 // 5 // 256)
    hub.add("someone/Big-rkllm", {MODEL: big})
    hub.cut_once = {MODEL}
    root = tmp_path / "models"
    code, _, err = run_pull(capsys, root, "someone/Big-rkllm")
    assert code == 0, err
    first, second = hub.gets(MODEL)
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={chunk}-"  # only the rest was asked for
    assert (root / "someone--Big-rkllm" / MODEL).read_bytes() == big


def test_a_pull_continues_what_an_earlier_one_left(hub: FakeHub, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    files = rkllm_repo(hub)
    root = tmp_path / "models"
    third = len(files[MODEL]) // 3
    parts = root / pull.PARTS
    parts.mkdir(parents=True)
    (parts / f"sha256-{hashlib.sha256(files[MODEL]).hexdigest()}.part").write_bytes(files[MODEL][:third])
    code, _, err = run_pull(capsys, root, "someone/Tiny-rkllm", MODEL)
    assert code == 0, err
    (get,) = hub.gets(MODEL)
    assert get.headers["range"] == f"bytes={third}-"
    assert (root / "someone--Tiny-rkllm" / MODEL).read_bytes() == files[MODEL]
    assert not parts.exists()


def test_a_checksum_mismatch_is_refused_and_leaves_no_model(hub: FakeHub, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rkllm_repo(hub)
    hub.corrupt = {MODEL}
    root = tmp_path / "models"
    code, out, err = run_pull(capsys, root, "someone/Tiny-rkllm")
    assert code == 1 and out == ""
    assert f"checksum mismatch for {MODEL}" in err and "nothing was kept" in err
    assert [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".part")] == []
    assert not list(root.rglob(f"sha256-{'*'}.part"))  # the bad transfer is not kept to be resumed
    assert ModelStore([root], include_bundled=False).models() == []
    # the small files are checked too (their git blob sha1)
    hub.corrupt = {"Tiny-1.5B_W8A8_RK3588.json"}
    code, _, err = run_pull(capsys, root, "someone/Tiny-rkllm")
    assert code == 1 and "checksum mismatch for Tiny-1.5B_W8A8_RK3588.json" in err and "sha1:" in err
    assert ModelStore([root], include_bundled=False).models() == []


def test_hub_names() -> None:
    assert pull.hub_name("hf.co/a/b") == ("a/b", None)
    assert pull.hub_name("huggingface.co/a/b-GGUF:Q4_K_M") == ("a/b-GGUF", "Q4_K_M")
    assert pull.hub_name("https://huggingface.co/a/b/") == ("a/b", None)
    assert pull.hub_name("a/b.c:latest") == ("a/b.c", None)
    assert pull.hub_name("llama3") is None and pull.hub_name("llama3:8b") is None and pull.hub_name("a/b/c") is None


@pytest.mark.slow
def test_ollama_pull_through_the_ollama_client(hub: FakeHub, tmp_path: Path) -> None:
    files = rkllm_repo(hub)
    hub.add("someone/Tiny-GGUF", {"tiny.Q4_K_M.gguf": b"g" * 5000, "tiny.Q8_0.gguf": b"h" * 9000})
    root = tmp_path / "models"
    root.mkdir()
    library = build_fake("1.3.0", "1.3.0")
    port = free_port()
    proc = start_http_server("http", library, tmp_path / "records", port, HF_ENDPOINT=hub.url,
                             HF_HUB_DISABLE_PROGRESS_BARS="1", MCP_RKLLM_MODELS=str(root))
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=60)
        lines = list(client.pull("hf.co/someone/Tiny-rkllm", stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        pulling = [x for x in lines if x.status == f"pulling {MODEL}"]
        assert pulling and pulling[-1].completed == pulling[-1].total == len(files[MODEL])
        assert pulling[-1].digest == "sha256:" + hashlib.sha256(files[MODEL]).hexdigest()
        assert {x.status for x in lines} >= {"pulling Tiny-1.5B_W8A8_RK3588.json", "pulling vision_rk3588.rknn"}
        assert "Tiny-1.5B_W8A8_RK3588:latest" in [m.model for m in client.list().models]
        reply = client.generate(model="Tiny-1.5B_W8A8_RK3588", prompt="hello")
        assert reply.eval_count == 5  # loaded with the pulled sidecar's max_new_tokens

        assert client.pull("hf.co/someone/Tiny-GGUF:Q8_0", stream=False).status == "success"
        assert (root / "someone--Tiny-GGUF" / "tiny.Q8_0.gguf").read_bytes() == files_of(hub, "tiny.Q8_0.gguf")
        assert client.pull("Tiny-1.5B_W8A8_RK3588").status == "success"  # a plain name that is here

        with pytest.raises(ollama.ResponseError) as err:
            client.pull("hf.co/someone/Tiny-GGUF", stream=False)
        assert err.value.status_code == 400 and "name the one to pull" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            list(client.pull("hf.co/someone/Nothing", stream=True))
        assert err.value.status_code == 404 and "not found on the Hub" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            client.pull("no-such:7b")
        assert err.value.status_code == 404 and "hf.co/OWNER/REPO" in err.value.error
        hub.corrupt = {"tiny.Q4_K_M.gguf"}
        with pytest.raises(ollama.ResponseError) as err:  # a failure midway: an error line
            list(client.pull("someone/Tiny-GGUF:Q4_K_M", stream=True))
        assert "checksum mismatch" in err.value.error
        assert not (root / "someone--Tiny-GGUF" / "tiny.Q4_K_M.gguf").exists()
    finally:
        stop(proc)


def files_of(hub: FakeHub, name: str) -> bytes:
    return next(f[name] for f in hub.repos.values() if name in f)
