"""Hostile input to the CPU runtime (issue 18 item 1): every path into llama.cpp is a structured error, never an abort.

llama.cpp answers some bad input with GGML_ASSERT, which kills the whole process; the CPU runtime
runs in the server process by default, so one call used to take the server down. These tests run
each attack in-process against the real runtime and the bundled model, then check the model still
answers; one runs it through a real server over Streamable HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import discard
from mcp_rkllm.models.store import bundled_model
from mcp_rkllm.runtime.llama import N_BATCH, LlamaCppRuntime, LlamaModel
from mcp_rkllm.structs import RKLLMInferParam, RKLLMInput, RKLLMLoraAdapter, RKLLMParam, RunResult
from tests.cpu import require_cpu_runtime
from tests.fake_rkllm.build import build_fake
from tests.servers import free_port, start_http_server, stop
from tests.test_server import call, fail

pytestmark = pytest.mark.cpu

CTX = 1024


@pytest.fixture(scope="module")
def runtime() -> LlamaCppRuntime:
    require_cpu_runtime()
    return LlamaCppRuntime(n_threads=2)


def load(runtime: LlamaCppRuntime, **param: object) -> LlamaModel:
    return runtime.init(RKLLMParam.model_validate({"model_path": str(bundled_model()), "temperature": 0.0,
                                                   "max_new_tokens": 4, "max_context_len": CTX, **param}))


@pytest.fixture
def model(runtime: LlamaCppRuntime) -> Iterator[LlamaModel]:
    m = load(runtime)
    yield m
    m.destroy()


def run(model: LlamaModel, inp: dict[str, object], **infer: object) -> RunResult:
    return model.run(RKLLMInput.model_validate(inp), RKLLMInferParam.model_validate(infer), discard)


def refused(model: LlamaModel, code: str, inp: dict[str, object], **infer: object) -> RkllmError:
    with pytest.raises(RkllmError) as caught:
        run(model, inp, **infer)
    assert caught.value.code == code, caught.value.message
    return caught.value


def answers(model: LlamaModel) -> None:
    """The model still works after the attack."""
    result = run(model, {"prompt_input": "What is the capital of France?"}, max_new_tokens=4)
    assert result.text and result.finish_reason == "length" and result.token_count == 4


def embeddings(model: LlamaModel, n: int) -> dict[str, object]:
    return {"embed_input": {"embed": [0.01] * (n * model.n_embd), "n_tokens": n}}


@pytest.mark.slow  # 513 rows of prefill
def test_embeddings_longer_than_one_batch_are_chunked(model: LlamaModel) -> None:
    # GGML_ASSERT(n_tokens_all <= cparams.n_batch) aborted the process at 513 embedding rows.
    n = N_BATCH + 88
    result = run(model, embeddings(model, n), keep_history=1)
    assert result.finish_reason == "length" and result.perf is not None and result.perf.prefill_tokens == n
    assert model.get_kv_cache_size() == [n + 3]  # the rows, then the 3 generated tokens decoded after them
    answers(model)


def test_embeddings_over_the_context_are_limit_exceeded(runtime: LlamaCppRuntime) -> None:
    m = load(runtime, max_context_len=256)
    try:
        error = refused(m, "LIMIT_EXCEEDED", embeddings(m, 256 + 6))  # refused before any decode
        assert error.fields["value"] == 256 + 6 and error.fields["limit"] == 256
        run(m, {"token_input": {"input_ids": [5] * 200}}, keep_history=1)
        kept = m.get_kv_cache_size()[0]
        error = refused(m, "LIMIT_EXCEEDED", embeddings(m, 60), keep_history=1)  # with the kept history
        assert error.fields["value"] == kept + 60 and "kept from earlier turns" in error.message
        assert m.get_kv_cache_size() == [kept]  # the refused run left the conversation alone
        answers(m)
    finally:
        m.destroy()


def test_an_input_that_gives_no_token_is_invalid(model: LlamaModel) -> None:
    # An empty prompt under an empty template decoded nothing, then sampling hit GGML_ASSERT(logits != nullptr).
    model.set_chat_template("", "", "")
    for mode in ("RKLLM_INFER_GENERATE", "RKLLM_INFER_GET_LOGITS"):
        error = refused(model, "INVALID_PARAMS", {"prompt_input": ""}, mode=mode)
        assert "no token" in error.message
    model.set_chat_template("", "Q: ", "\nA:")
    assert run(model, {"prompt_input": "What is the capital of France?"}).text


def test_outputs_over_the_context_are_limit_exceeded(model: LlamaModel) -> None:
    for mode in ("RKLLM_INFER_GET_LOGITS", "RKLLM_INFER_GET_LAST_HIDDEN_LAYER"):
        error = refused(model, "LIMIT_EXCEEDED", {"token_input": {"input_ids": [5] * (CTX + 1)}}, mode=mode)
        assert error.fields["value"] == CTX + 1
    answers(model)


def test_token_ids_outside_the_vocabulary_are_invalid(model: LlamaModel) -> None:
    for bad in ([model.n_vocab], [-1], [5, 2**31 - 1]):
        refused(model, "INVALID_PARAMS", {"token_input": {"input_ids": bad}})
        refused(model, "INVALID_PARAMS", {"token_input": {"input_ids": bad}}, mode="RKLLM_INFER_GET_LOGITS")
    answers(model)


@pytest.mark.slow  # 300 generated tokens
def test_invalid_utf8_from_the_model_is_replaced_not_raised(runtime: LlamaCppRuntime) -> None:
    # Context shifts with n_keep=0 made this model emit a lone continuation byte: UnicodeDecodeError.
    m = load(runtime, max_context_len=256, max_new_tokens=300, n_keep=0, ignore_eos_token=True)
    try:
        result = run(m, {"prompt_input": "Tell me a long story."}, keep_history=1)
        assert result.finish_reason == "length" and result.token_count == 300
        # Whether this model emits a broken byte here depends on the llama.cpp build's arithmetic (it did on a
        # -march=native build, not on a portable one): what must hold is that the text is whole, valid text.
        result.text.encode("utf-8")
    finally:
        m.destroy()


@pytest.mark.slow  # three loads, each 280 positions
@pytest.mark.parametrize("n_keep", [-5, 255, 2**31 - 1])
def test_context_shifts_with_any_n_keep(runtime: LlamaCppRuntime, n_keep: int) -> None:
    m = load(runtime, max_context_len=256, max_new_tokens=40, n_keep=n_keep, ignore_eos_token=True)
    try:
        result = run(m, {"token_input": {"input_ids": [5] * 240}}, keep_history=1)  # shifts on the way
        assert result.token_count == 40 and len(m.tokens) <= 256
        try:  # with n_keep near the context, the kept conversation leaves no room: refused, not aborted
            run(m, {"token_input": {"input_ids": [6] * 2}}, keep_history=1)
        except RkllmError as e:
            assert e.code == "LIMIT_EXCEEDED" and n_keep >= 255, e.message
        error = refused(m, "LIMIT_EXCEEDED", {"token_input": {"input_ids": [5] * 257}})
        assert error.fields["limit"] == 256
        answers(m)
    finally:
        m.destroy()


def test_extreme_sampling_values(model: LlamaModel) -> None:
    for sampling in ({"temperature": 0.8, "repeat_penalty": 0.0, "frequency_penalty": 1e30, "presence_penalty": -1e30},
                     {"temperature": 1e30, "top_p": -5.0, "top_k": -7},
                     {"temperature": 1e-30, "top_p": 50.0, "top_k": 2**31 - 1},
                     {"temperature": 0.5, "mirostat": 1, "mirostat_tau": -1e30, "mirostat_eta": 1e30},
                     {"temperature": 0.5, "mirostat": 2, "mirostat_tau": 0.0, "mirostat_eta": -3.0},
                     {"temperature": 0.5, "mirostat": 7}):
        assert run(model, {"prompt_input": "hi"}, sampling_params=sampling).token_count <= 4
    answers(model)


@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "the model", "a directory", "nul"])
def test_bad_lora_files(model: LlamaModel, tmp_path: Path, kind: str) -> None:
    gguf = bundled_model()
    assert gguf is not None
    path = tmp_path / "adapter.gguf"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(b"GGUF" + os.urandom(4096))
    elif kind == "truncated":
        path.write_bytes(gguf.read_bytes()[:300_000])
    elif kind == "the model":
        path = gguf
    elif kind == "a directory":
        path = tmp_path
    adapter = str(path) + ("\x00/../x" if kind == "nul" else "")
    with pytest.raises(RkllmError) as caught:
        model.load_lora(RKLLMLoraAdapter(lora_adapter_path=adapter, lora_adapter_name="a"))
    assert caught.value.code == ("INVALID_PARAMS" if kind == "nul" else "RKLLM_CALL_FAILED")
    refused(model, "RKLLM_CALL_FAILED", {"prompt_input": "hi"}, lora_params={"lora_adapter_name": "a"})
    answers(model)


@pytest.mark.slow  # eight loads and runs
def test_bad_prompt_caches(model: LlamaModel, tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    run(model, {"prompt_input": "hello there friend"},
        prompt_cache_params={"save_prompt_cache": 1, "prompt_cache_path": str(good)})
    data = good.read_bytes()
    n_tokens = int.from_bytes(data[8:12], "little")
    assert data[:4] == b"nsgg" and 0 < n_tokens < 100
    out_of_vocab = bytearray(data)
    out_of_vocab[12:16] = (model.n_vocab + 7).to_bytes(4, "little")  # the first token id
    flipped = bytearray(data)
    for i in range(16 + 4 * n_tokens, len(data), 9973):
        flipped[i] ^= 0xFF
    cases = {"empty": b"", "magic only": data[:4], "header only": data[:12], "half": data[:len(data) // 2],
             "all but one byte": data[:-1], "token out of vocabulary": bytes(out_of_vocab),
             "garbage": os.urandom(len(data))}
    for name, content in cases.items():
        bad = tmp_path / f"bad-{len(content)}.bin"
        bad.write_bytes(content)
        with pytest.raises(RkllmError) as caught:
            model.load_prompt_cache(str(bad))
        assert caught.value.code == "RKLLM_CALL_FAILED", name
        assert model.get_kv_cache_size() == [0] and model.tokens == [], name
        answers(model)
    (tmp_path / "flipped.bin").write_bytes(bytes(flipped))  # damaged inside: refused, or garbage in the KV
    try:
        model.load_prompt_cache(str(tmp_path / "flipped.bin"))
    except RkllmError as e:
        assert e.code == "RKLLM_CALL_FAILED"
    answers(model)
    with pytest.raises(RkllmError) as caught:
        model.load_prompt_cache(str(good) + "\x00.txt")
    assert caught.value.code == "INVALID_PARAMS"


@pytest.mark.slow  # a server process over HTTP, and ~600 embedding rows as JSON
@pytest.mark.anyio
async def test_the_server_survives_a_long_embedding_input_over_http(tmp_path: Path) -> None:
    require_cpu_runtime()
    port = free_port()
    proc = start_http_server("http", build_fake("1.3.0", "1.3.0"), tmp_path / "records", port,
                             MCP_RKLLM_RUNTIME="cpu")
    try:
        async with httpx2.AsyncClient(timeout=120) as http, \
                Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client:
            param = {"model_path": str(bundled_model()), "max_new_tokens": 3, "temperature": 0.0,
                     "max_context_len": CTX}
            h = (await call(client, "rkllm_init", {"param": param}))["handle"]
            n_embd = 576
            long = {"embed_input": {"embed": [0.01] * ((N_BATCH + 1) * n_embd), "n_tokens": N_BATCH + 1}}
            ran = await call(client, "rkllm_run", {"handle": h, "rkllm_input": long})  # aborted the server before
            assert ran["finish_reason"] == "length" and ran["perf"]["prefill_tokens"] == N_BATCH + 1
            over = {"embed_input": {"embed": [0.01] * ((CTX + 1) * n_embd), "n_tokens": CTX + 1}}
            error = await fail(client, "rkllm_run", {"handle": h, "rkllm_input": over})
            assert error["code"] == "LIMIT_EXCEEDED" and error["details"]["limit"] == CTX
            error = await fail(client, "rkllm_run", {"handle": h, "rkllm_input": {"token_input": {
                "input_ids": [49152]}}})
            assert error["code"] == "INVALID_PARAMS"
            after = await call(client, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "Hi"}})
            assert after["text"] and after["token_count"] == 3
        assert proc.poll() is None
    finally:
        stop(proc)
