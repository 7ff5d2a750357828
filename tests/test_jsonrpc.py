"""The JSON-RPC surface over a real Unix socket, with the fake runtime in a real server process.

One server serves the module (its socket in a temporary directory); tests that need their own (socket
file rules, shutdown) start one. What the C side received is read from the fake's records.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FakeView
from tests.fake_rkllm.build import build_fake
from tests.jsonrpc_client import RpcConn, start_socket_server
from tests.servers import events, stop

pytestmark = pytest.mark.slow  # starts server processes

C_METHODS = ["rkllm.createDefaultParam", "rkllm.init", "rkllm.destroy", "rkllm.run", "rkllm.run_async",
             "rkllm.abort", "rkllm.is_running", "rkllm.load_lora", "rkllm.load_prompt_cache",
             "rkllm.release_prompt_cache", "rkllm.clear_kv_cache", "rkllm.get_kv_cache_size",
             "rkllm.set_chat_template", "rkllm.set_function_tools", "rkllm.set_cross_attn_params"]


class Server:
    def __init__(self, root: Path, socket_path: Path, fake: FakeView, proc: subprocess.Popen[bytes]):
        self.root = root
        self.socket = socket_path
        self.fake = fake
        self.proc = proc

    def connect(self) -> RpcConn:
        return RpcConn(self.socket)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    library = build_fake("1.3.0", version="1.3.0")
    root = tmp_path_factory.mktemp("jsonrpc")
    (root / "m.rkllm").write_bytes(b"fake model")
    (root / "other.rkllm").write_bytes(b"fake model")
    (root / "adapter.bin").write_bytes(b"lora")
    records = root / "records"
    socket_path = root / "s.sock"
    proc = start_socket_server(library, records, socket_path)
    try:
        yield Server(root, socket_path, FakeView(library, records), proc)
    finally:
        stop(proc)


@pytest.fixture
def handle(server: Server) -> Iterator[str]:
    """A fresh shared handle on m.rkllm (loaded by name: every connection may use it), freed after the test.
    (rkllm.init handles belong to their connection and go when it closes: see test_ownership.py.)"""
    with server.connect() as c:
        h = c.result("load_model", {"model": "m", "param": {"max_new_tokens": 12}})["handle"]
    yield h
    with server.connect() as c:
        c.call("rkllm.destroy", {"handle": h})


def test_the_issue_examples_work_verbatim(server: Server) -> None:
    with server.connect() as c:
        c.send_raw(b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": [null, {"model_path": "m.rkllm"}, null], '
                   b'"id": 1}\n')
        _, init = c.until(1)
        handle = init["result"]["handle"]
        assert init["result"]["runtime"] == "native"
        assert server.fake.last("init")["model_path"] == str(server.root / "m.rkllm")
        try:
            c.send_raw(b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": [null, {"input_type": 0, "prompt_input": '
                       b'"Hello, how are you?", "role": "user", "enable_thinking": false}, {"mode": 0, "lora_params": '
                       b'null, "prompt_cache_params": null, "keep_history": 0}, null], "id": 2}\n')
            callbacks, run = c.until(2)
            text = run["result"]["text"]
            assert text.startswith("Hello, how are")
            assert "".join(cb["text"] for cb in callbacks) == text
            assert callbacks[-1]["state"] == "RKLLM_RUN_FINISH"
            assert all(cb["state"] == "RKLLM_RUN_NORMAL" for cb in callbacks[:-1])
            assert [i for cb in callbacks for i in cb["token_ids"]] == run["result"]["token_ids"]
            # What reached C, byte for byte (the positional form's nulls are C NULLs; userdata is the server's).
            record = server.fake.last("run")
            assert record["input"] == {"role": "user", "enable_thinking": False, "input_type": 0,
                                       "prompt_input": "Hello, how are you?"}
            assert record["infer_params"] == {"mode": 0, "lora_params": None, "prompt_cache_params": None,
                                              "sampling_params": None, "max_new_tokens": 0, "keep_history": 0}
            c.send_raw(b'{"method": "rkllm.run", "params": {"prompt": "Hello, how are you?", "temperature": 0.7, '
                       b'"max_tokens": 256}, "jsonrpc": "2.0", "id": 3}\n')
            callbacks, flat = c.until(3)
            assert flat["result"]["text"].startswith("Hello, how are")
            assert "".join(cb["text"] for cb in callbacks) == flat["result"]["text"]
            infer = server.fake.last("run")["infer_params"]
            assert infer["max_new_tokens"] == 256 and abs(infer["sampling_params"]["temperature"] - 0.7) < 1e-6
        finally:
            c.call("rkllm.destroy", [handle], 9)


def test_the_three_forms_give_the_same_result(server: Server, handle: str) -> None:
    with server.connect() as c:
        prompt = "same input"
        positional = c.result("rkllm.run", [handle, {"prompt_input": prompt}, {"max_new_tokens": 7}, None], 1)
        by_name = c.result("rkllm.run", {"handle": handle, "rkllm_input": {"prompt_input": prompt},
                                         "rkllm_infer_params": {"max_new_tokens": 7}}, 2)
        flat = c.result("rkllm.run", {"handle": handle, "prompt": prompt, "max_tokens": 7}, 3)
    for result in (by_name, flat):
        for key in ("text", "token_ids", "finish_reason", "token_count"):
            assert result[key] == positional[key], key
    assert positional["token_count"] == 7


def test_every_c_function_is_a_method_and_works(server: Server, handle: str) -> None:
    with server.connect() as c:
        discover = c.result("rpc.discover")
        names = [m["name"] for m in discover["methods"]]
        assert all(m in names for m in C_METHODS)
        for friendly in ("generate", "chat", "embed", "list_models", "load_model", "unload_model", "loaded_models",
                         "server_status", "doctor", "rkllm.run_async_result"):
            assert friendly in names
        defaults = c.result("rkllm.createDefaultParam", [])
        assert defaults["param"]["max_context_len"] == 512
        assert c.result("rkllm.is_running", [handle]) == {"handle": handle, "running": False}
        assert c.result("rkllm.load_lora", [handle, {"lora_adapter_path": "adapter.bin", "lora_adapter_name": "a",
                                                     "scale": 0.5}])["ok"]
        lora = server.fake.last("load_lora")
        assert lora["lora_adapter_path"] == str(server.root / "adapter.bin") and lora["lora_adapter_name"] == "a"
        assert c.result("rkllm.set_chat_template", [handle, "SYS", "<u>", "</u>"])["ok"]
        assert server.fake.last("set_chat_template").items() >= {"system_prompt": "SYS", "prompt_prefix": "<u>",
                                                                   "prompt_postfix": "</u>"}.items()
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        assert c.result("rkllm.set_function_tools", [handle, "Use tools.", json.dumps(tools), "tool_response"])["ok"]
        recorded = server.fake.last("set_function_tools")
        assert json.loads(recorded["tools"]) == tools and recorded["tool_response_str"] == "tool_response"
        c.result("rkllm.run", [handle, {"prompt_input": "keep this"}, {"keep_history": 1, "max_new_tokens": 3}])
        sizes = c.result("rkllm.get_kv_cache_size", [handle, None])["cache_sizes"]
        assert sizes and sizes[0] > 0
        assert c.result("rkllm.clear_kv_cache", [handle, 0, None, None])["ok"]
        assert server.fake.last("clear_kv_cache")["keep_system_prompt"] == 0
        assert c.result("rkllm.get_kv_cache_size", {"handle": handle})["cache_sizes"] == [0]
        c.result("rkllm.run", [handle, {"prompt_input": "cache me"}, {
            "prompt_cache_params": {"save_prompt_cache": 1, "prompt_cache_path": "pc.bin"}, "max_new_tokens": 2}])
        assert c.result("rkllm.load_prompt_cache", [handle, "pc.bin"])["ok"]
        assert c.result("rkllm.release_prompt_cache", [handle])["ok"]
        assert c.result("rkllm.set_cross_attn_params", [handle, {
            "encoder_k_cache": [0.5], "encoder_v_cache": [0.25], "encoder_mask": [1.0], "encoder_pos": [0],
            "num_tokens": 1}])["ok"]
        assert server.fake.last("set_cross_attn_params")["num_tokens"] == 1
        started = c.result("rkllm.run_async", [handle, {"prompt_input": "async fake:delay_ms=20"},
                                               {"max_new_tokens": 6}, None])
        assert started["started"]
        assert c.result("rkllm.abort", [handle])["handle"] == handle
        report = c.result("rkllm.run_async_result", {"handle": handle, "wait_seconds": 10})
        assert report["done"] and report["result"]["finish_reason"] in ("abort", "length")
        other = c.result("rkllm.init", {"param": {"model_path": "other.rkllm"}})["handle"]
        assert c.result("rkllm.destroy", [other]) == {"destroyed": True, "handle": other}
        _, gone = c.call("rkllm.is_running", [other])
        assert gone["error"]["data"]["code"] == "UNKNOWN_HANDLE"
        assert gone["error"]["code"] == gone["error"]["data"]["number"] == -32002


def test_streaming_text_equals_the_result_fast_and_paced(server: Server, handle: str) -> None:
    with server.connect() as c:
        for prompt, n in (("fast", 12), ("paced fake:delay_ms=15", 10)):
            callbacks, response = c.call("rkllm.run", {"handle": handle, "rkllm_input": {"prompt_input": prompt},
                                                       "rkllm_infer_params": {"max_new_tokens": n}}, prompt)
            result = response["result"]
            assert "".join(cb["text"] for cb in callbacks) == result["text"] and result["token_count"] == n
            assert [i for cb in callbacks for i in cb["token_ids"]] == result["token_ids"]
        assert len(callbacks) >= 5  # paced tokens go out one by one, not as one lump
        callbacks, response = c.call("generate", {"prompt": "no stream", "handle": handle, "stream": False}, 5)
        assert callbacks == [] and response["result"]["text"]
        callbacks, response = c.call("chat", {"messages": [{"role": "user", "content": "hi"}], "handle": handle}, 6)
        assert "".join(cb["text"] for cb in callbacks) == response["result"]["text"]


def test_pipelined_requests_are_answered_by_id(server: Server, handle: str) -> None:
    with server.connect() as c:
        lines: list[dict[str, Any]] = [{"jsonrpc": "2.0", "method": "rkllm.is_running", "params": [handle],
                                        "id": f"p{i}"} for i in range(20)]
        lines.append({"jsonrpc": "2.0", "method": "server_status", "id": 99})
        c.send_raw(b"".join(json.dumps(m).encode() + b"\n" for m in lines))
        seen: dict[Any, Any] = {}
        while len(seen) < len(lines):
            message = c.recv()
            seen[message["id"]] = message
        assert all(seen[f"p{i}"]["result"]["running"] is False for i in range(20))
        assert seen[99]["result"]["loaded"] >= 1


def test_two_connections_run_on_two_handles_without_interleaving(server: Server) -> None:
    with server.connect() as a, server.connect() as b:
        ha = a.result("rkllm.init", {"param": {"model_path": "m.rkllm"}})["handle"]
        hb = b.result("rkllm.init", {"param": {"model_path": "other.rkllm"}})["handle"]
        try:
            a.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": 7, "params": [
                ha, {"prompt_input": "alpha fake:delay_ms=10"}, {"max_new_tokens": 15}]})
            b.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": 7, "params": [
                hb, {"prompt_input": "beta fake:delay_ms=10"}, {"max_new_tokens": 15}]})
            outcome: dict[str, Any] = {}

            def read(name: str, conn: RpcConn) -> None:
                outcome[name] = conn.until(7)

            threads = [threading.Thread(target=read, args=(n, conn)) for n, conn in (("a", a), ("b", b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            for name, word, other in (("a", "alpha", "beta"), ("b", "beta", "alpha")):
                callbacks, response = outcome[name]  # until() asserts every callback names this request
                text = response["result"]["text"]
                assert text.startswith(word) and other not in text and response["result"]["token_count"] == 15
                assert "".join(cb["text"] for cb in callbacks) == text
        finally:
            a.call("rkllm.destroy", [ha], 8)
            b.call("rkllm.destroy", [hb], 8)


def test_closing_the_connection_aborts_its_run_and_the_handle_stays_usable(server: Server, handle: str) -> None:
    before = events(server.fake.record_dir).count("abort_while_running")  # type: ignore[arg-type]
    c = server.connect()
    c.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": 1, "params": [
        handle, {"prompt_input": "long fake:delay_ms=50"}, {"max_new_tokens": 200}]})
    assert c.recv()["method"] == "rkllm.callback"  # it is running
    c.close()
    deadline = time.monotonic() + 15
    while events(server.fake.record_dir).count("abort_while_running") == before:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "the run was not aborted"
        time.sleep(0.05)
    with server.connect() as again:
        result = again.result("rkllm.run", [handle, {"prompt_input": "ok"}, {"max_new_tokens": 2}])
        assert result["text"] == "ok ok"


def test_half_closed_client_still_gets_its_answer(server: Server, handle: str) -> None:
    """`echo request | socat - UNIX-CONNECT:...` shuts its writing side and waits for the answer."""
    with server.connect() as c:
        c.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": 1, "params": [
            handle, {"prompt_input": "half fake:delay_ms=20"}, {"max_new_tokens": 15}]})
        c.sock.shutdown(socket.SHUT_WR)
        callbacks, response = c.until(1)
        assert response["result"]["token_count"] == 15
        assert "".join(cb["text"] for cb in callbacks) == response["result"]["text"]


def test_abort_from_another_connection_and_cancel_request(server: Server, handle: str) -> None:
    with server.connect() as runner, server.connect() as other:
        runner.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": "r", "params": [
            handle, {"prompt_input": "stop me fake:delay_ms=40"}, {"max_new_tokens": 200}]})
        assert runner.recv()["method"] == "rkllm.callback"
        assert other.result("rkllm.abort", [None])["was_running"] is True  # null handle: the default one
        _, response = runner.until("r")
        assert response["result"]["finish_reason"] == "abort"
        runner.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": 5, "params": [
            handle, {"prompt_input": "cancel me fake:delay_ms=40"}, {"max_new_tokens": 200}]})
        assert runner.recv()["method"] == "rkllm.callback"
        runner.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 5}})
        _, response = runner.until(5)
        assert response["error"]["data"]["code"] == "CANCELLED"
        assert runner.result("rkllm.is_running", [handle], 6)["running"] is False


MALFORMED: list[tuple[bytes, int]] = [
    (b"{", -32700), (b"not json", -32700), (b'{"jsonrpc": "2.0", "method": "x", "id": 1', -32700),
    (b"\xff\xfe\x00garbage", -32700), (b"[" * 100_000, -32700), (b'{"a": ' * 5000 + b"1" + b"}" * 5000, -32700),
    (b"[]", -32600), (b"42", -32600), (b'"string"', -32600), (b"null", -32600), (b"true", -32600),
    (b'{"jsonrpc": "1.0", "method": "server_status", "id": 1}', -32600),
    (b'{"method": "server_status", "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": 5, "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": "server_status", "id": {"x": 1}}', -32600),
    (b'{"jsonrpc": "2.0", "method": "server_status", "id": [1]}', -32600),
    (b'{"jsonrpc": "2.0", "method": "server_status", "id": true}', -32600),
    (b'{"jsonrpc": "2.0", "method": "server_status", "params": "x", "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": "server_status", "params": 3, "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": "server_status", "extra": 1, "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": "nope", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "rkllm_run", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "rkllm.", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": [null, {"model_path": "m.rkllm"}, null, 4], "id": 1}',
     -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": [1, {"model_path": "m.rkllm"}, null], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": [null, {"model_path": "m.rkllm"}, "cb"], "id": 1}',
     -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": [null, "m.rkllm", null], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": {"param": {"model_path": 5}}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": {"param": {"bogus": 1}}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": [null, {"prompt_input": 5}], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": [null, {}, null, null], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": ""}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": "x", "temperature": "hot"}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": "x", "max_tokens": -1}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": "x", "bogus": 1}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": "x", "stream": "yes"}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": "x", "model": "m"}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "generate", "params": ["positional"], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "generate", "params": {"prompt": 7}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "chat", "params": {"messages": []}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.clear_kv_cache", "params": [null, 7], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.get_kv_cache_size", "params": [null, [1, 2]], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"nope": 1}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.createDefaultParam", "params": [1], "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.is_running", "params": ["h-nope"], "id": 1}', -32002),
    (b'{"jsonrpc": "2.0", "method": "rkllm.init", "params": [null, {"model_path": "/etc/passwd"}], "id": 1}', -32013),
    (b'{"jsonrpc": "2.0", "method": "load_model", "params": {"model": "no-such-model"}, "id": 1}', -32012),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"handle": "h-x", "prompt": "x"}, "id": 1}', -32002),
    (b'{"jsonrpc": "2.0", "method": "generate", "params": {"prompt": "x", "max_new_tokens": 99999999}, "id": 1}',
     -32602),
    (b'{"jsonrpc": "2.0", "method": "rkllm.run", "params": {"prompt": "\\ud83d lone surrogate", "handle": "h-x"}, '
     b'"id": 1}', -32002),
]


def test_fifty_malformed_inputs_get_the_right_codes_and_the_server_lives(server: Server, handle: str) -> None:
    from mcp_rkllm.errors import ERRORS

    assert len(MALFORMED) >= 50
    numbers = {e.number for e in ERRORS.values()}
    with server.connect() as c:
        for raw, code in MALFORMED:
            c.send_raw(raw + b"\n")
            answer = c.recv()
            assert isinstance(answer, dict) and "error" in answer, (raw[:80], answer)
            assert answer["error"]["code"] == code, (raw[:80], answer)
            if code not in (-32700, -32600, -32601):
                assert answer["error"]["data"]["number"] in numbers  # the table's payload, as in MCP results
                assert {"code", "hint", "retryable", "function", "rc"} <= set(answer["error"]["data"])
            if code in (-32700, -32600):
                assert answer["id"] is None or answer["id"] == 1
        # Still alive, on this connection and on a new one.
        assert c.result("rkllm.is_running", [handle], 2)["running"] is False
    with server.connect() as fresh:
        assert fresh.result("server_status")["pid"] == server.proc.pid


def test_a_lone_surrogate_reaches_c_as_a_replacement_character(server: Server, handle: str) -> None:
    """JavaScript's JSON.stringify writes half an emoji as a lone surrogate escape: valid JSON, but no C
    string can hold it. It arrives as U+FFFD instead of failing the call."""
    with server.connect() as c:
        c.send_raw(b'{"jsonrpc": "2.0", "method": "rkllm.run", "id": 1, "params": {"handle": "' + handle.encode()
                   + b'", "prompt": "half \\ud83d emoji \\ud83d\\ude00 whole", "max_tokens": 2}}\n')
        _, response = c.until(1)
        assert "result" in response, response
    assert server.fake.last("run")["input"]["prompt_input"] == "half \ufffd emoji \U0001f600 whole"


def test_batches_and_notifications(server: Server, handle: str) -> None:
    with server.connect() as c:
        c.send([{"jsonrpc": "2.0", "method": "rkllm.is_running", "params": [handle], "id": 1},
                {"jsonrpc": "2.0", "method": "server_status"},  # a notification: no answer
                {"jsonrpc": "2.0", "method": "nope", "id": 2},
                5])
        answers = c.recv()
        assert isinstance(answers, list) and len(answers) == 3
        by_id = {a["id"]: a for a in answers}
        assert by_id[1]["result"]["running"] is False and by_id[2]["error"]["code"] == -32601
        assert by_id[None]["error"]["code"] == -32600
        c.send([{"jsonrpc": "2.0", "method": "server_status"}])  # only notifications: nothing comes back
        c.send({"jsonrpc": "2.0", "method": "rkllm.run", "params": [handle, {"prompt_input": "quiet"}]})
        assert c.result("loaded_models", None, 3)["loaded"]  # the next answer is this one


def test_an_over_long_line_is_answered_and_dropped(tmp_path: Path) -> None:
    library = build_fake("1.3.0", version="1.3.0")
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    sock = tmp_path / "s.sock"
    proc = start_socket_server(library, tmp_path / "records", sock, "--max-request-bytes", "4096")
    try:
        with RpcConn(sock) as c:
            c.send_raw(b'{"jsonrpc": "2.0", "method": "generate", "params": {"prompt": "' + b"x" * 100_000 + b'"}, '
                       b'"id": 1}\n')
            answer = c.recv()
            assert answer["error"]["code"] == -32600 and "4096" in answer["error"]["message"]
            assert c.result("server_status", None, 2)["loaded"] == 0
    finally:
        stop(proc)


def test_socket_file_rules(tmp_path: Path) -> None:
    library = build_fake("1.3.0", version="1.3.0")
    sock = tmp_path / "s.sock"
    # A stale socket (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    proc = start_socket_server(library, tmp_path / "records", sock)
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # A live one is refused, and the live server keeps its socket.
        second = subprocess.run([*proc.args[:-2], "--socket", str(sock)], env=proc_env(library, tmp_path),  # type: ignore[index]
                                capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "another server is listening" in second.stderr
        with RpcConn(sock) as c:
            assert c.result("server_status")["pid"] == proc.pid
        # SIGTERM: exits 0 and removes its socket file.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not sock.exists()
    finally:
        stop(proc)
    # Not a socket: refused, and the file is left alone.
    sock.write_text("precious")
    refused = subprocess.run([*proc.args[:-2], "--socket", str(sock)], env=proc_env(library, tmp_path),  # type: ignore[index]
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "not a socket" in refused.stderr and sock.read_text() == "precious"
    # --socket-mode widens it.
    wide = tmp_path / "w.sock"
    proc = start_socket_server(library, tmp_path / "records", wide, "--socket-mode", "0660")
    try:
        assert stat.S_IMODE(os.stat(wide).st_mode) == 0o660
    finally:
        stop(proc)


def proc_env(library: Path, root: Path) -> dict[str, str]:
    from tests.servers import server_env

    return server_env(library, None, root)


def test_sigterm_aborts_runs_in_progress(tmp_path: Path) -> None:
    library = build_fake("1.3.0", version="1.3.0")
    (tmp_path / "m.rkllm").write_bytes(b"fake")
    records = tmp_path / "records"
    sock = tmp_path / "s.sock"
    proc = start_socket_server(library, records, sock)
    try:
        with RpcConn(sock) as c:
            handle = c.result("rkllm.init", [None, {"model_path": "m.rkllm", "max_new_tokens": 1000}])["handle"]
            c.send({"jsonrpc": "2.0", "method": "rkllm.run", "id": 2, "params": [
                handle, {"prompt_input": "forever fake:delay_ms=50"}]})
            assert c.recv()["method"] == "rkllm.callback"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        assert "abort_while_running" in events(records)
        assert not sock.exists()
    finally:
        stop(proc)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.mark.parametrize("client", ["python", "node"])
def test_the_example_clients_stream_a_reply(server: Server, client: str) -> None:
    import shutil
    import sys

    from tests.servers import REPO

    if client == "node":
        node = shutil.which("node")
        if node is None:
            if _ci():
                pytest.fail("node is missing; CI installs it (.ci/run), so this test must run")
            pytest.skip("node is not installed (the Node example needs it; .ci/run installs it)")
        command = [node, str(REPO / "examples" / "jsonrpc_client.mjs")]
    else:
        command = [sys.executable, str(REPO / "examples" / "jsonrpc_client.py")]
    for extra in (["--model-path", "m.rkllm"], ["--model", "other"]):
        out = subprocess.run([*command, "--socket", str(server.socket), *extra, "--max-tokens", "6",
                              "Hello there fake:delay_ms=5"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text, _, summary = out.stdout.rpartition("\n[")
        assert text.startswith("Hello there") and summary.startswith("6 tokens, finish_reason length]")
    bad = subprocess.run([*command, "--socket", str(server.socket), "--model-path", "/etc/passwd", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "PATH_NOT_ALLOWED" in bad.stderr and "Hint:" in bad.stderr
