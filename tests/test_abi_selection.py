"""Finding the library and choosing its ABI generation: symbols, version string, RKLLM_ABI, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.native import binding
from mcp_rkllm.native.binding import find_library, load_library, probe_symbols, scan_version, select_abi
from tests.fake_rkllm.build import build_fake


def _code(exc: pytest.ExceptionInfo[RkllmError]) -> str:
    return exc.value.code


@pytest.mark.parametrize("gen", ["1.2.0", "1.2.1", "1.3.0"])
def test_detects_generation_from_symbols_and_version_string(gen: str) -> None:
    lib = load_library(str(build_fake(gen, version=gen)))
    assert lib.abi == gen
    assert lib.version == gen
    assert "symbols" in lib.abi_source


@pytest.mark.parametrize(("release", "gen"), [("1.2.2", "1.2.1"), ("1.2.3", "1.2.1")])
def test_point_releases_map_to_their_generation(release: str, gen: str) -> None:
    lib = load_library(str(build_fake(gen, version=release)))
    assert (lib.abi, lib.version) == (gen, release)


def test_symbols_alone_tell_1_2_0_from_later() -> None:
    path = str(build_fake("1.2.0", version=None))
    assert scan_version(path) is None
    symbols = probe_symbols(path)
    assert "rkllm_get_kv_cache_size" not in symbols and "rkllm_clear_kv_cache" in symbols
    assert load_library(path).abi == "1.2.0"


@pytest.mark.parametrize("gen", ["1.2.1", "1.3.0"])
def test_no_version_string_is_undetermined_unless_declared(gen: str) -> None:
    path = str(build_fake(gen, version=None))
    with pytest.raises(RkllmError) as exc:
        load_library(path)
    assert _code(exc) == "ABI_UNDETERMINED"
    assert "RKLLM_ABI" in exc.value.spec.hint  # says how to set it
    lib = load_library(path, declared_abi=gen)
    assert (lib.abi, lib.abi_source) == (gen, "RKLLM_ABI")


def test_declared_1_2_0_contradicted_by_1_2_1_symbols() -> None:
    with pytest.raises(RkllmError) as exc:
        load_library(str(build_fake("1.2.1", version=None)), declared_abi="1.2.0")
    assert _code(exc) == "ABI_MISMATCH"


@pytest.mark.parametrize("declared", ["1.2.1", "1.3.0"])
def test_declared_newer_contradicted_by_1_2_0_symbols(declared: str) -> None:
    with pytest.raises(RkllmError) as exc:
        load_library(str(build_fake("1.2.0", version=None)), declared_abi=declared)
    assert _code(exc) == "ABI_MISMATCH"


def test_declared_contradicted_by_version_string() -> None:
    with pytest.raises(RkllmError) as exc:
        load_library(str(build_fake("1.3.0", version="1.3.0")), declared_abi="1.2.1")
    assert _code(exc) == "ABI_MISMATCH"
    assert "1.3.0" in exc.value.message


def test_declared_value_must_be_a_generation() -> None:
    with pytest.raises(RkllmError) as exc:
        load_library(str(build_fake("1.3.0", version="1.3.0")), declared_abi="2.0")
    assert _code(exc) == "ABI_UNDETERMINED"


def test_unknown_future_release_refused() -> None:
    symbols = probe_symbols(str(build_fake("1.3.0", version=None)))
    with pytest.raises(RkllmError) as exc:
        select_abi("lib", symbols, (1, 4, 0), None)
    assert _code(exc) == "ABI_UNDETERMINED"


def test_not_an_rkllm_library(tmp_path: Path) -> None:
    import ctypes.util

    libc = ctypes.util.find_library("c")
    assert libc
    libm = Path("/lib/x86_64-linux-gnu/libm.so.6")
    path = str(libm) if libm.exists() else libc
    with pytest.raises(RkllmError) as exc:
        load_library(path)
    assert _code(exc) == "ABI_UNSUPPORTED"


def test_garbage_file_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "librkllmrt.so"
    bad.write_bytes(b"not an ELF file")
    with pytest.raises(RkllmError) as exc:
        load_library(str(bad))
    assert _code(exc) == "LIBRARY_LOAD_FAILED"


def test_explicit_path_may_be_a_directory(tmp_path: Path) -> None:
    path = build_fake("1.3.0", version="1.3.0")
    assert find_library(str(path.parent)) == str(path)


def test_explicit_missing_path_is_reported_not_searched_around(tmp_path: Path) -> None:
    with pytest.raises(RkllmError) as exc:
        find_library(str(tmp_path / "nope.so"))
    assert _code(exc) == "LIBRARY_NOT_FOUND"
    assert "nope.so" in exc.value.message


def test_search_order_finds_lib_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lib").mkdir()
    target = tmp_path / "lib" / "librkllmrt.so"
    target.write_bytes(build_fake("1.3.0", version="1.3.0").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(binding, "DEFAULT_LOCATIONS", ("/nonexistent/usr/lib", "./lib"))
    assert find_library(None) == str(target.resolve())


def test_nothing_found_lists_the_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(binding, "DEFAULT_LOCATIONS", ("/nonexistent/usr/lib",))
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)  # what binding calls
    with pytest.raises(RkllmError) as exc:
        find_library(None)
    assert _code(exc) == "LIBRARY_NOT_FOUND"
    assert "/nonexistent/usr/lib/librkllmrt.so" in exc.value.message


def test_importing_the_package_loads_nothing() -> None:
    """Loading must not happen at import time: importing every module dlopens no librkllmrt."""
    import subprocess
    import sys

    code = (
        "import mcp_rkllm.native.binding, mcp_rkllm.runtime.native, mcp_rkllm.structs\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'rkllmrt' not in maps, maps\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"RKLLM_LIB_PATH": str(build_fake("1.3.0", "1.3.0")),
                                                                 "PYTHONPATH": str(Path(__file__).parents[1])})
