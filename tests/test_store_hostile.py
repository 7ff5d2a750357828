"""Hostile and careless model roots and paths (issue 18 items 7, 9 for paths, 10a; issue 16's symlinked models).

A dangling symlink, a symlink loop or a FIFO in a model root is skipped and reported, never fatal to
list_models, load_model, generate or doctor; a symlinked model lists, resolves and loads under the
link's own name; a link leading outside the roots is not listed (loading would refuse it). A client
path that cannot be resolved is INVALID_PARAMS, one outside the roots PATH_NOT_ALLOWED, never
INTERNAL; a prompt-cache path reaches the runtime confined even when the run does not save.
Driven through the engine and the registry on the fake runtime, and over stdio.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from mcp_rkllm import doctor
from mcp_rkllm.config import Settings
from mcp_rkllm.engine import NO_STREAM, Engine
from mcp_rkllm.errors import ERRORS, RkllmError
from mcp_rkllm.models.store import ModelStore
from mcp_rkllm.surfaces.registry import build_registry
from tests.conftest import FakeView
from tests.servers import REPO, events, server_env

pytestmark = pytest.mark.anyio

REGISTRY = build_registry()

#: The files a careless root holds besides good.rkllm: name -> words its problem must contain.
BAD = {
    "dangling.rkllm": "dangling symlink",
    "loop.rkllm": "symlink loop",
    "ping.gguf": "symlink loop",
    "pong.gguf": "symlink loop",
    "fifo.rkllm": "not a regular file",
    "escape.rkllm": "outside the model roots",
    "deep/loop2.rkllm": "symlink loop",
}


@pytest.fixture
def abi() -> str:
    return "1.3.0"


def careless_root(base: Path) -> Path:
    """A model root with one good model, a model reached through a link to a blob, and every kind of bad file."""
    models, outside = base / "models", base / "outside"
    (models / "deep").mkdir(parents=True)
    (models / ".blobs").mkdir()
    outside.mkdir(exist_ok=True)
    (models / "good.rkllm").write_bytes(b"good model")
    (models / ".blobs" / "sha256-0123abcd").write_bytes(b"blob model")
    (models / "qwen-linked.rkllm").symlink_to(models / ".blobs" / "sha256-0123abcd")
    (models / "alias.rkllm").symlink_to(models / "good.rkllm")  # the same file twice: listed once, as itself
    (outside / "secret.rkllm").write_bytes(b"not yours")
    (models / "dangling.rkllm").symlink_to(base / "gone.rkllm")
    (models / "loop.rkllm").symlink_to(models / "loop.rkllm")
    (models / "ping.gguf").symlink_to(models / "pong.gguf")
    (models / "pong.gguf").symlink_to(models / "ping.gguf")
    (models / "deep" / "loop2.rkllm").symlink_to(models / "deep" / "loop2.rkllm")
    os.mkfifo(models / "fifo.rkllm")  # loading it would block rkllm_init for ever
    (models / "escape.rkllm").symlink_to(outside / "secret.rkllm")
    return models


def settings(fake_path: Path, models: Path, cache: Path, **kw: Any) -> Settings:
    return Settings(library=str(fake_path), isolation="none", models=(str(models),), cache_dir=str(cache), **kw)


@pytest.fixture
async def engine(fake_path: Path, fake: FakeView, tmp_path: Path) -> AsyncIterator[Engine]:
    models = careless_root(tmp_path)
    (tmp_path / "cache").mkdir()
    e = Engine(settings(fake_path, models, tmp_path / "cache"))
    await e.open()
    try:
        yield e
    finally:
        await e.close()


async def invoke(engine: Engine, name: str, args: dict[str, Any]) -> Any:
    return await REGISTRY.invoke(name, args, engine, NO_STREAM)


async def refused(engine: Engine, name: str, args: dict[str, Any]) -> RkllmError:
    """The error a call must fail with (a coded one; INTERNAL would be a bug)."""
    with pytest.raises(RkllmError) as exc:
        await invoke(engine, name, args)
    assert exc.value.code in ERRORS and exc.value.code != "INTERNAL", exc.value.message
    return exc.value


async def test_bad_files_are_skipped_and_reported_and_the_rest_loads(engine: Engine, fake: FakeView,
                                                                     tmp_path: Path) -> None:
    listing = await invoke(engine, "list_models", {})
    mine = {m.file: m for m in listing.models if not m.bundled}
    assert set(mine) == {"good.rkllm", "qwen-linked.rkllm"}
    for name, words in BAD.items():
        path = str(tmp_path / "models" / name)
        assert any(path in p and words in p for p in listing.problems), (name, listing.problems)
    # every model listed as loadable loads, under the name it is listed by
    for m in listing.models:
        if m.loadable:
            loaded = await invoke(engine, "load_model", {"model": m.file})
            assert loaded.path == m.path and fake.last("init")["model_path"] == m.path
    reply = await invoke(engine, "generate", {"model": "good", "prompt": "hi", "max_new_tokens": 3})
    assert reply.text and reply.finish_reason == "length"
    # a bad file is not a model: MODEL_NOT_FOUND, the way any unknown name is
    for name in ("escape", "dangling", "loop.rkllm", "fifo"):
        assert (await refused(engine, "load_model", {"model": name})).code == "MODEL_NOT_FOUND"


async def test_a_symlinked_model_lists_resolves_and_loads_under_its_own_name(engine: Engine, fake: FakeView,
                                                                            tmp_path: Path) -> None:
    models = tmp_path / "models"
    blob = str(models / ".blobs" / "sha256-0123abcd")
    entry = next(m for m in (await invoke(engine, "list_models", {})).models if m.name == "qwen-linked")
    assert (entry.file, entry.path, entry.link) == ("qwen-linked.rkllm", blob, str(models / "qwen-linked.rkllm"))
    for name in ("qwen-linked.rkllm", "qwen-linked", "QWEN-L", str(models / "qwen-linked.rkllm"), blob):
        loaded = await invoke(engine, "load_model", {"model": name})
        assert (loaded.model, loaded.path) == ("qwen-linked", blob), name
        assert fake.last("init")["model_path"] == blob
    # a link to a file that is listed itself adds no second entry
    names = [m.file for m in (await invoke(engine, "list_models", {})).models]
    assert names.count("good.rkllm") == 1 and "alias.rkllm" not in names
    # generate by the link's name reuses the handle loaded from it
    handles = len(engine.handles)
    reply = await invoke(engine, "generate", {"model": "qwen-linked.rkllm", "prompt": "x", "max_new_tokens": 2})
    assert len(engine.handles) == handles and engine.handles[reply.handle].param.model_path == blob


def test_the_store_prefers_a_file_over_links_to_it_and_sorts_links_stably(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    (root / "z-real.gguf").write_bytes(b"g")
    (root / "a" / "b-link.gguf").symlink_to(root / "z-real.gguf")  # walked first, yet the file itself wins
    (root / ".hidden").mkdir()
    (root / ".hidden" / "blob").write_bytes(b"b")
    (root / "two.gguf").symlink_to(root / ".hidden" / "blob")
    (root / "one.gguf").symlink_to(root / ".hidden" / "blob")
    scan = ModelStore([root], include_bundled=False).scan()
    assert [m.file for m in scan.models] == ["one.gguf", "z-real.gguf"] and not scan.problems
    assert scan.models[1].link is None and scan.models[0].link == root / "one.gguf"


def test_a_second_root_may_hold_the_target_of_a_link(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "store.bin").write_bytes(b"m")
    (first / "m.gguf").symlink_to(second / "store.bin")
    scan = ModelStore([first, second], include_bundled=False).scan()
    assert [(m.file, m.path) for m in scan.models] == [("m.gguf", second / "store.bin")] and not scan.problems
    only_first = ModelStore([first], include_bundled=False).scan()
    assert not only_first.models and "outside the model roots" in only_first.problems[0].message


def test_doctor_reports_the_bad_files_and_still_checks_the_good_ones(fake_path: Path, tmp_path: Path) -> None:
    models = careless_root(tmp_path)
    checks = {c.name: c for c in doctor.run(settings(fake_path, models, tmp_path), str(tmp_path / "no-board"))}
    assert checks["model good.rkllm"].status == "ok" and checks["model qwen-linked.rkllm"].status == "ok"
    for name, words in BAD.items():
        check = checks[f"model file {Path(name).name}"]
        assert check.status == "warn" and words in check.value and check.fix, check


async def test_client_paths_that_cannot_be_resolved_are_the_callers_mistake(engine: Engine, fake: FakeView,
                                                                           tmp_path: Path) -> None:
    models, cache = tmp_path / "models", tmp_path / "cache"
    (cache / "a-file").write_bytes(b"x")
    long_name = "n" * 300
    bad_paths = {
        str(models / "loop.rkllm"): "symlink loop",
        str(models / "ping.gguf"): "symlink loop",
        "~nosuchuser-for-mcp-rkllm/m.rkllm": "no such user",
        f"{long_name}.rkllm": "over the file system's limit",
        "/".join(["d" * 200] * 25): "over the file system's limit",
        "m\udcff.rkllm": "nicode",  # "not valid Unicode", or the validator's "a valid ... unicode string"
    }
    for path, words in bad_paths.items():
        error = await refused(engine, "rkllm_init", {"param": {"model_path": path}})
        assert error.code == "INVALID_PARAMS" and words in error.message, (path, error.message)
    relative = await refused(engine, "rkllm_init", {"param": {"model_path": "deep/loop2.rkllm"}})  # from the root
    assert relative.code == "INVALID_PARAMS" and "symlink loop" in relative.message
    assert fake.count("init") == 0  # none of them reached the runtime
    handle = (await invoke(engine, "rkllm_init", {"param": {"model_path": "good.rkllm"}})).handle
    for path, words in bad_paths.items():
        error = await refused(engine, "rkllm_load_lora", {"handle": handle, "lora_adapter": {
            "lora_adapter_path": path, "lora_adapter_name": "x"}})
        assert error.code == "INVALID_PARAMS" and words in error.message, (path, error.message)
        error = await refused(engine, "rkllm_load_prompt_cache", {"handle": handle, "prompt_cache_path": path})
        assert error.code == "INVALID_PARAMS" and words in error.message, (path, error.message)
    # where a run would save a prompt cache: a name too long to create, a directory that is a file
    for path, words in {f"{long_name}/p.bin": "over the file system's limit",
                        "a-file/p.bin": "cannot create its directory",
                        "~nosuchuser-for-mcp-rkllm/p.bin": "no such user"}.items():
        error = await refused(engine, "rkllm_run", {"handle": handle, "rkllm_input": {"prompt_input": "x"},
                                                    "rkllm_infer_params": {"prompt_cache_params": {
                                                        "prompt_cache_path": path}}})
        assert error.code == "INVALID_PARAMS" and words in error.message, (path, error.message)
    assert fake.count("run") == 0 and fake.count("load_lora") == 0


async def test_a_prompt_cache_path_is_confined_even_when_nothing_is_saved(engine: Engine, fake: FakeView,
                                                                          tmp_path: Path) -> None:
    handle = (await invoke(engine, "rkllm_init", {"param": {"model_path": "good.rkllm"}})).handle
    run = {"handle": handle, "rkllm_input": {"prompt_input": "x"}, "rkllm_infer_params": {"max_new_tokens": 1}}
    for where in ("/etc/passwd", str(tmp_path / "outside" / "c.bin"), "../outside/c.bin"):
        params = {**run, "rkllm_infer_params": {"prompt_cache_params": {"save_prompt_cache": 0,
                                                                         "prompt_cache_path": where}}}
        assert (await refused(engine, "rkllm_run", params)).code == "PATH_NOT_ALLOWED"
        assert (await refused(engine, "rkllm_run_async", params)).code == "PATH_NOT_ALLOWED"
    assert fake.count("run") == 0
    params = {**run, "rkllm_infer_params": {"prompt_cache_params": {"save_prompt_cache": 0,
                                                                     "prompt_cache_path": "sub/c.bin"}}}
    await invoke(engine, "rkllm_run", params)
    sent = fake.last("run")["infer_params"]["prompt_cache_params"]
    assert sent == {"save_prompt_cache": 0, "prompt_cache_path": str(tmp_path / "cache" / "sub" / "c.bin")}
    assert not (tmp_path / "cache" / "sub").exists()  # nothing saved, no directory made for it


@pytest.mark.slow  # a server process
async def test_over_stdio(fake_path: Path, tmp_path: Path) -> None:
    records = tmp_path / "records"
    careless_root(tmp_path)
    env = server_env(fake_path, records, tmp_path / "models")
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_rkllm"], env=env, cwd=str(REPO))

    async def call(client: Client, name: str, args: dict[str, Any], error: str | None = None) -> dict[str, Any]:
        result = await client.call_tool(name, args)
        content = result.structured_content
        assert content is not None and result.is_error == (error is not None), content
        if error is not None:
            assert content["error"]["code"] == error, content
            return dict(content["error"])
        return dict(content)

    with anyio.fail_after(60):
        async with Client(params) as client:
            listing = await call(client, "list_models", {})
            assert {m["file"] for m in listing["models"] if not m["bundled"]} == {"good.rkllm", "qwen-linked.rkllm"}
            assert len(listing["problems"]) == len(BAD)
            loaded = await call(client, "load_model", {"model": "qwen-linked.rkllm"})
            assert loaded["path"] == str(tmp_path / "models" / ".blobs" / "sha256-0123abcd")
            reply = await call(client, "generate", {"model": "good", "prompt": "hi", "max_new_tokens": 2})
            assert reply["finish_reason"] == "length"
            doctor_checks = {c["name"]: c for c in (await call(client, "doctor", {}))["checks"]}
            assert "symlink loop" in doctor_checks["model file loop.rkllm"]["value"]
            for path in ("loop.rkllm", "~nosuchuser-for-mcp-rkllm/m.rkllm", "n" * 300 + ".rkllm"):
                await call(client, "rkllm_init", {"param": {"model_path": path}}, "INVALID_PARAMS")
            error = await call(client, "rkllm_run", {"handle": loaded["handle"], "rkllm_input": {"prompt_input": "x"},
                                                     "rkllm_infer_params": {"prompt_cache_params": {
                                                         "save_prompt_cache": 0, "prompt_cache_path": "/etc/passwd"}}},
                               "PATH_NOT_ALLOWED")
            assert "/etc/passwd" in error["message"]
    assert events(records).count("run") == 1  # the generate; the refused run never reached the runtime
