"""Helpers for tests that talk to a real server: environments for subprocesses, free ports, waiting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def server_env(library: Path, record_dir: Path | None = None, root: Path | None = None,
               **extra: str) -> dict[str, str]:
    """Environment for an `mcp-rkllm` subprocess using the fake runtime at `library`.

    `root` (default: the record directory's parent, the test's tmp_path) is both the model root
    and the cache directory, so the test's model files and prompt caches are allowed paths.
    """
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(REPO),
        "RKLLM_LIB_PATH": str(library),
        "PYTHONUNBUFFERED": "1",
    }
    if record_dir is not None:
        record_dir.mkdir(exist_ok=True)
        env["FAKE_RKLLM_RECORD_DIR"] = str(record_dir)
        root = root or record_dir.parent
    if root is not None:
        env["MCP_RKLLM_MODELS"] = env["MCP_RKLLM_CACHE_DIR"] = str(root)
    env.update(extra)
    return env


def events(record_dir: Path) -> list[str]:
    """The kinds the fake recorded in another process, in order."""
    path = record_dir / "events"
    return path.read_text().split() if path.exists() else []


#: What each server started by these helpers wrote on stderr (read as it comes, by pid).
_LOGS: dict[int, list[bytes]] = {}


def drain_log(proc: subprocess.Popen[bytes]) -> None:
    """Read the server's stderr as it comes (kept for `server_log`): nobody reading it would let the pipe
    fill, and the server's next log line would then block it."""
    import threading

    lines = _LOGS.setdefault(proc.pid, [])

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()


def server_log(proc: subprocess.Popen[bytes]) -> str:
    """What the server has written on stderr so far (for servers started with drain_log)."""
    return b"".join(_LOGS.get(proc.pid, [])).decode(errors="replace")


def child_processes(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, state) of the child processes of `pid` (default: this process), from /proc; "Z" is a zombie."""
    pid = os.getpid() if pid is None else pid
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ...
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_http_server(transport: str, library: Path, record_dir: Path, port: int,
                      **extra_env: str) -> subprocess.Popen[bytes]:
    """Start `python -m mcp_rkllm --transport ...` on 127.0.0.1:port and wait until it accepts connections."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_rkllm", "--transport", transport, "--host", "127.0.0.1", "--port", str(port)],
        env=server_env(library, record_dir, None, **extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=REPO,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                drain_log(proc)
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start listening")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a server and reap it."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def progress_content(messages: Sequence[str | None]) -> str:
    """The reply's content from MCP progress messages: heartbeats (`status: `), reasoning and tool-call text
    left out, a `content: ` escape removed (see mcp_rkllm.surfaces.mcp.server.progress_message)."""
    from mcp_rkllm.surfaces.mcp.server import PROGRESS_PREFIXES

    other = tuple(p for kind, p in PROGRESS_PREFIXES.items() if kind != "content")
    return "".join((m or "").removeprefix(PROGRESS_PREFIXES["content"]) for m in messages
                   if not (m or "").startswith(other))
