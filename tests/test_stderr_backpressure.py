"""A stdio client that never reads the server's stderr does not block the server.

The server logs one line per call on stderr. A client that starts it with stderr=PIPE and never reads that
pipe lets it fill (64 KiB on Linux); the server must go on answering every request, drop the log lines stderr
cannot take (counted), and say how many it dropped once stderr is read again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mcp_rkllm.surfaces.serve import StderrHandler
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, server_env

INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "mute", "version": "0"}}}

#: Calls sent; each logs one line ("server_status: ok in 0 ms", ~90 bytes): about 300 KB of log in all,
#: several times what a pipe holds.
CALLS = 3000


@pytest.mark.slow  # a server process
def test_a_client_that_never_reads_stderr_gets_every_answer(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO,
                            env=server_env(build_fake("1.3.0", "1.3.0"), tmp_path / "records", None))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    answered: set[int] = set()
    all_answered = threading.Event()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            if isinstance(message.get("id"), int) and "method" not in message:
                assert "result" in message, message
                answered.add(message["id"])
                if len(answered) == CALLS + 1:
                    all_answered.set()

    def write_stdin() -> None:
        assert proc.stdin is not None
        lines = [json.dumps(INIT), json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})]
        lines += [json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                              "params": {"name": "server_status", "arguments": {}}}) for i in range(1, CALLS + 1)]
        with contextlib.suppress(OSError):  # the server was killed (the test failed)
            for line in lines:
                proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=write_stdin, daemon=True).start()
    try:
        started = time.monotonic()
        finished = all_answered.wait(60)
        elapsed = time.monotonic() - started
        assert finished, (f"{len(answered)} of {CALLS + 1} requests answered in 60 s: the server is blocked "
                          "writing its log to a stderr nobody reads")
        # Now read stderr: the server writes what it kept, then how many lines it dropped.
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace")
        assert proc.wait(15) == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    dropped = [int(n) for n in re.findall(r"(\d+) log line\(s\) dropped: stderr was full", err)]
    written = err.count("server_status: ok in ")
    print(f"{CALLS} calls answered in {elapsed:.1f} s; stderr: {written} call lines written, "
          f"{sum(dropped)} dropped ({len(dropped)} notice(s))")
    assert len(dropped) >= 1 and sum(dropped) > 0, err[-2000:]
    assert written + sum(dropped) >= CALLS  # every call's line is either written or counted as dropped
    assert "serving stdio" in err.splitlines()[0]  # what came first is kept


def test_the_handler_drops_counts_and_reports_in_place(tmp_path: Path) -> None:
    """In-process: a pipe nobody reads, a handler with room for 5 lines; emit never blocks, the notice goes
    where the lines were dropped, and flush() waits at most its bound."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    pipe_size = 0
    while True:  # fill the pipe first, as an unread stderr would be
        try:
            pipe_size += os.write(write_end, b"x" * 4096)
        except BlockingIOError:
            break
    os.set_blocking(write_end, True)
    handler = StderrHandler(write_end, max_lines=5, flush_seconds=0.3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("backpressure-test")
    logger.addHandler(handler)
    started = time.monotonic()
    for i in range(100):
        logger.warning("line %d", i)
    assert time.monotonic() - started < 1.0
    assert 90 <= handler.dropped_total <= 95  # 5 queued and maybe one in the writer's hands
    started = time.monotonic()
    handler.flush()  # bounded: nobody reads
    assert 0.25 <= time.monotonic() - started < 2
    received = b""
    while True:  # read until the notice has come
        received += os.read(read_end, 65536)
        if b"dropped" in received:
            break
    lines = received[pipe_size:].decode().splitlines()
    assert lines[-1] == f"{handler.dropped_total} log line(s) dropped: stderr was full (not being read)"
    logger.warning("after")  # written after the notice, in order
    handler.flush()
    assert os.read(read_end, 65536) == b"after\n"
    os.close(read_end)
    os.close(write_end)


def test_http_transport_lines_go_through_the_same_handler(tmp_path: Path) -> None:
    """uvicorn's own lines (start-up, one per request) use the server's stderr handler and format, not handlers of
    uvicorn's that would write to a full pipe directly."""
    import httpx

    from tests.servers import free_port, server_log, start_http_server, stop

    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", version="1.3.0"), tmp_path / "records", port)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while "GET /healthz" not in server_log(proc):
            assert time.monotonic() < deadline, server_log(proc)
            time.sleep(0.05)
    finally:
        stop(proc)
    lines = [line for line in server_log(proc).splitlines() if "uvicorn" in line]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \w+ uvicorn\.(error|access): ", line)
                         for line in lines), lines
