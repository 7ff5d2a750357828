"""`mcp-rkllm try` says how its server ended when it dies: the exit code or signal, the server's last lines on
stderr, and for SIGILL (a llama-cpp-python wheel built for another CPU) the README's rebuild command; a model's
worker dying of SIGILL (RUNTIME_CRASHED) gets the same advice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mcp_rkllm.surfaces.mcp.try_client import SIGILL_HINT, ServerEnd
from tests.cpu import require_cpu_runtime
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, server_env


def test_the_sigill_hint_is_the_readmes() -> None:
    command = SIGILL_HINT[SIGILL_HINT.index("CMAKE_ARGS"):]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"`{command}`" in readme
    assert ServerEnd(returncode=-signal.SIGILL).sigill_hint() == SIGILL_HINT
    assert ServerEnd(returncode=-signal.SIGILL, runtime="native").sigill_hint() is None  # not llama.cpp
    assert ServerEnd(returncode=-signal.SIGSEGV).sigill_hint() is None
    assert ServerEnd(returncode=-signal.SIGILL).how() == "was killed by SIGILL"
    assert ServerEnd(returncode=3).how() == "exited with code 3"


def test_try_names_the_signal_and_shows_the_servers_stderr(tmp_path: Path) -> None:
    """The fake runtime in the server process (no isolation) crashes the server with SIGSEGV mid-run."""
    (tmp_path / "m.rkllm").write_bytes(b"x")
    env = server_env(build_fake("1.3.0", "1.3.0"), tmp_path / "records", None)
    proc = subprocess.run([sys.executable, "-m", "mcp_rkllm", "try", "hello fake:crash=1", "--isolation", "none"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "mcp-rkllm try: the server failed: Connection closed; the server was killed by SIGSEGV" in err, err
    tail = err[err.index("its last lines on stderr:"):]
    assert "\n  I rkllm: fake run of" in tail  # the runtime's own last words
    assert "Hint: llama-cpp-python" not in err and "Traceback" not in err


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill_with_sigill_while_generating(args: list[str], tmp_path: Path, worker: bool) -> tuple[str, str]:
    """Run `try` on the CPU runtime; once tokens stream, SIGILL the server (or the model's worker process)."""
    require_cpu_runtime()
    env = {**server_env(Path("/nonexistent"), None, tmp_path), "MCP_RKLLM_RUNTIME": "cpu"}
    del env["RKLLM_LIB_PATH"]
    proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm", "try", "Count from 1 to 200, one number a line.",
                             "--max-new-tokens", "400", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    streaming = threading.Event()
    out: list[bytes] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 4096):
            out.append(chunk)
            streaming.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    err = ""
    try:
        assert streaming.wait(60), "no token in 60 s"
        (server,) = _children(proc.pid)
        victim = server
        if worker:
            (victim,) = _children(server)
            assert b"mcp_rkllm.isolation.child" in Path(f"/proc/{victim}/cmdline").read_bytes()
        os.kill(victim, signal.SIGILL)
        err = proc.stderr.read().decode(errors="replace")
        assert proc.wait(30) == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return b"".join(out).decode(errors="replace"), err


@pytest.mark.cpu
@pytest.mark.slow  # about 5 s: a server, the model, a worker
def test_try_gives_the_rebuild_hint_when_the_server_dies_of_sigill(tmp_path: Path) -> None:
    started = time.monotonic()
    out, err = _kill_with_sigill_while_generating([], tmp_path, worker=False)
    print(f"in {time.monotonic() - started:.1f} s:\n{err}")
    assert "the server failed: Connection closed; the server was killed by SIGILL" in err, err
    assert "its last lines on stderr:" in err or "it wrote nothing on stderr" in err
    assert f"Hint: {SIGILL_HINT}" in err and "Traceback" not in err
    assert out.strip()  # what streamed before the crash stays on stdout


@pytest.mark.cpu
@pytest.mark.slow  # about 5 s: a server, the model, a worker
def test_try_gives_the_rebuild_hint_when_a_worker_dies_of_sigill(tmp_path: Path) -> None:
    started = time.monotonic()
    _, err = _kill_with_sigill_while_generating(["--isolation", "process"], tmp_path, worker=True)
    print(f"in {time.monotonic() - started:.1f} s:\n{err}")
    assert "mcp-rkllm try: RUNTIME_CRASHED: " in err and "killed by SIGILL" in err, err
    assert f"Hint: {SIGILL_HINT}" in err and "Traceback" not in err
