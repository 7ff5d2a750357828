"""The OpenAI, Ollama and RockchipLlama APIs, driven by the real `openai` and `ollama` clients against
`mcp-rkllm --transport http`: the fake NPU runtime (one server for the module, behind a token), and the CPU
runtime with the bundled model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.cpu import require_cpu_runtime
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, drain_log, events, free_port, server_env, start_http_server, stop

pytestmark = pytest.mark.slow  # starts server processes

TOKEN = "api-test-token-0123456789abcdef"
ORIGIN = "http://app.example"


class Board:
    def __init__(self, base: str, records: Path):
        self.base = base
        self.records = records
        self.oai = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
        self.oll = ollama.Client(host=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    library = build_fake("1.3.0", version="1.3.0")
    root = tmp_path_factory.mktemp("api")
    (root / "m.rkllm").write_bytes(b"fake model")
    (root / "other.rkllm").write_bytes(b"fake model")
    records = root / "records"
    port = free_port()
    proc = start_http_server("http", library, records, port, MCP_RKLLM_AUTH_TOKEN=TOKEN,
                             MCP_RKLLM_MAX_QUEUED_RUNS="1", MCP_RKLLM_CORS_ORIGIN=ORIGIN,
                             MCP_RKLLM_MODELS=str(root))
    b = Board(f"http://127.0.0.1:{port}", records)
    try:
        yield b
    finally:
        b.http.close()
        stop(proc)


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------- OpenAI


def test_openai_models_and_unknown_model(board: Board) -> None:
    ids = [m.id for m in board.oai.models.list()]
    assert sorted(ids) == ["m", "other"]
    assert board.oai.models.retrieve("m").id == "m"
    assert board.oai.models.retrieve("m:latest").id == "m"  # Ollama-style tag accepted
    with pytest.raises(openai.NotFoundError) as err:
        board.oai.chat.completions.create(model="test", messages=[{"role": "user", "content": "x"}])
    assert "m.rkllm" in err.value.message and "other.rkllm" in err.value.message  # the candidates
    assert err.value.body["type"] == "not_found_error"  # type: ignore[index]
    tags = [m.model or "" for m in board.oll.list().models]
    assert sorted(tags) == ["m:latest", "other:latest"]


def test_openai_chat_streamed_equals_non_streamed_with_usage(board: Board) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    whole = board.oai.chat.completions.create(model="m", messages=messages, max_completion_tokens=9, temperature=0)
    content = whole.choices[0].message.content
    assert content and whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"
    assert whole.usage is not None and whole.usage.completion_tokens == 9 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(board.oai.chat.completions.create(model="m", messages=messages, max_tokens=9, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role] == ["assistant"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    # The SDK's helper accumulates deltas: a repeated role would read "assistantassistant".
    stopping: Any = [{"role": "user", "content": "Say hi fake:eos=5"}]  # the fake ends with EOS: "stop"
    with board.oai.chat.completions.stream(model="m", messages=stopping, max_tokens=9) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.role == "assistant" and final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == board.oai.chat.completions.create(
        model="m", messages=stopping, max_tokens=9).choices[0].message.content
    raw = board.http.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 3,
                                                        "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")
    assert all("usage" not in json.loads(e) for e in sse_events(raw.text)[:-1])  # no usage unless asked


def test_openai_fields_that_cannot_be_honoured_are_400_naming_them(board: Board) -> None:
    base: Any = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra, param in (({"n": 2}, "n"), ({"seed": 7}, "seed"),
                         ({"logprobs": True}, "logprobs"), ({"response_format": {"type": "json_object"}},
                                                            "response_format")):
        with pytest.raises(openai.BadRequestError) as err:
            board.oai.chat.completions.create(**base, **extra)
        assert err.value.param == param, extra
    image: Any = [{"type": "text", "text": "what is it"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as err:  # a text-only model: says what is missing
        board.oai.chat.completions.create(model="m", messages=[{"role": "user", "content": image}])
    assert err.value.code == "NOT_SUPPORTED" and "vision" in err.value.message
    with pytest.raises(openai.BadRequestError):
        board.oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=1e300)
    # Fields that change nothing are accepted; so are text parts.
    ok = board.oai.chat.completions.create(model="m", messages=[{"role": "user", "content": [{"type": "text",
                                                                                            "text": "hi"}]}],
                                           max_tokens=2, user="u", metadata={"a": "b"}, n=1,
                                           extra_body={"parallel_tool_calls": True})
    assert ok.choices[0].message.content
    bad = board.http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(board.base + "/v1/models", json={}).status_code in (401, 405)
    unauth = httpx.get(board.base + "/v1/models")
    assert unauth.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=board.base + "/v1", api_key="wrong", max_retries=0).models.list()


def test_stop_sequences_end_the_reply(board: Board) -> None:
    ask: Any = [{"role": "user", "content": "alpha beta gamma delta fake:delay_ms=20"}]
    whole = board.oai.chat.completions.create(model="m", messages=ask, stop=["gamma"], max_tokens=50)
    assert whole.choices[0].message.content == "alpha beta " and whole.choices[0].finish_reason == "stop"
    chunks = list(board.oai.chat.completions.create(model="m", messages=ask, stop="gamma", max_tokens=50,
                                                    stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha beta "
    r = board.oll.chat(model="m", messages=ask, options={"stop": ["gamma"], "num_predict": 50})
    assert r.message.content == "alpha beta " and r.done_reason == "stop"


def test_openai_embeddings_and_completions(board: Board) -> None:
    floats = board.oai.embeddings.create(model="m", input=["one", "two words"], encoding_format="float")
    packed = board.oai.embeddings.create(model="m", input=["one", "two words"])  # the SDK asks for base64
    assert [d.index for d in floats.data] == [0, 1] and len({len(d.embedding) for d in floats.data}) == 1
    for a, b in zip(floats.data, packed.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens > 0
    completion = board.oai.completions.create(model="m", prompt="1, 2, 3,", max_tokens=4)
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_dropped_openai_stream_aborts_its_run_and_the_next_is_served(board: Board) -> None:
    before = events(board.records).count("abort_while_running")
    with board.http.stream("POST", "/v1/chat/completions", json={
            "model": "other", "stream": True, "max_tokens": 500,
            "messages": [{"role": "user", "content": "slow fake:delay_ms=40"}]}) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # tokens are flowing: hang up
    deadline = time.monotonic() + 15
    while events(board.records).count("abort_while_running") == before:
        assert time.monotonic() < deadline, "the dropped stream's run was not aborted"
        time.sleep(0.05)
    started = time.monotonic()
    again = board.oai.chat.completions.create(model="other", messages=[{"role": "user", "content": "next"}],
                                              max_tokens=2)
    assert again.choices[0].message.content and time.monotonic() - started < 10


def test_concurrent_streams_do_not_mix_and_a_full_queue_is_429(board: Board) -> None:
    outputs: dict[str, str] = {}

    def run(word: str, model: str) -> None:
        chunks = board.oai.chat.completions.create(
            model=model, stream=True, max_tokens=20,
            messages=[{"role": "user", "content": f"{word} fake:delay_ms=50"}])
        outputs[word] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=run, args=args) for args in (("alpha", "m"), ("beta", "other"),
                                                                    ("gamma", "m"))]
    for t in threads:
        t.start()
        time.sleep(0.2)  # in this order: alpha runs on m, gamma waits behind it
    # m has one run going and one queued (max_queued_runs = 1): a third is refused at once, with Retry-After.
    full = board.http.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "x"}]})
    for t in threads:
        t.join(60)
    assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
    for word, other in (("alpha", "beta"), ("beta", "gamma"), ("gamma", "alpha")):
        assert outputs[word].startswith(word) and other not in outputs[word], outputs


def test_cors_preflight_for_an_allowed_origin(board: Board) -> None:
    pre = httpx.options(board.base + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.options(board.base + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in denied.headers
    ok = board.http.get("/v1/models", headers={"Origin": ORIGIN})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN


# ---------------------------------------------------------------------------------------------- Ollama


def test_ollama_chat_generate_and_metrics(board: Board) -> None:
    r = board.oll.chat(model="m:latest", messages=[{"role": "user", "content": "hey"}], options={"num_predict": 6})
    assert r.done and r.done_reason == "length" and r.message.role == "assistant" and r.message.content
    assert r.eval_count == 6 and r.prompt_eval_count and r.prompt_eval_count > 0
    assert r.total_duration and r.eval_duration and r.total_duration >= r.eval_duration > 0
    chunks = list(board.oll.chat(model="m", messages=[{"role": "user", "content": "hey"}], stream=True,
                                 options={"num_predict": 6}))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done and chunks[-1].eval_count == 6
    assert "".join(c.message.content or "" for c in chunks) == r.message.content
    g = board.oll.generate(model="m", prompt="Why is the sky blue?", options={"num_predict": 4})
    assert g.done and g.response and g.eval_count == 4
    streamed = list(board.oll.generate(model="m", prompt="Why is the sky blue?", stream=True,
                                       options={"num_predict": 4}))
    assert "".join(c.response or "" for c in streamed) == g.response and streamed[-1].done
    raw = board.http.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                             "options": {"num_predict": 2}})
    assert raw.headers["content-type"].startswith("application/x-ndjson") and "\n\n" not in raw.text
    assert all("message" in json.loads(line) for line in raw.text.splitlines())
    with pytest.raises(ollama.ResponseError) as err:
        board.oll.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and "m.rkllm" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        board.oll.chat(model="m", messages=[{"role": "user", "content": "x"}], options={"seed": 1})
    assert err.value.status_code == 400 and "NOT_SUPPORTED" in err.value.error and "seed" in err.value.error
    bad = board.http.post("/api/chat", content=b"{")
    assert bad.status_code == 400 and "error" in bad.json()


def test_ollama_models_load_unload_pull_embed(board: Board) -> None:
    assert board.http.get("/api/version").json()["version"].count(".") == 2
    assert board.http.get("/").text == "Ollama is running"
    shown = board.oll.show("other")
    assert "completion" in (shown.capabilities or [])
    loaded = board.oll.generate(model="other", keep_alive=-1)
    assert loaded.done and loaded.done_reason == "load"
    assert "other:latest" in [m.model for m in board.oll.ps().models]
    gone = board.oll.generate(model="other:latest", keep_alive=0)
    assert gone.done_reason == "unload" and "other:latest" not in [m.model for m in board.oll.ps().models]
    assert board.oll.chat(model="other", messages=[]).done_reason == "load"
    board.oll.chat(model="other", messages=[{"role": "user", "content": "bye"}], keep_alive=0,
                   options={"num_predict": 1})
    assert "other:latest" not in [m.model for m in board.oll.ps().models]  # keep_alive 0: unloaded after
    assert board.oll.pull("m").status == "success"
    assert list(board.oll.pull("m:latest", stream=True))[-1].status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        board.oll.pull("no-such:7b")
    assert err.value.status_code == 404 and "does not download" in err.value.error
    vectors = board.oll.embed(model="m", input=["a", "b"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    single = board.oll.embeddings(model="m", prompt="a").embedding
    assert list(single) == pytest.approx(list(vectors[0]), abs=1e-6)


# ---------------------------------------------------------------------------------------------- RockchipLlama


def test_rockchipllama_curl_sequence(board: Board) -> None:
    h = board.http
    available = h.get("/v1/models/available").json()
    assert available["total"] == 2 and {m["name"] for m in available["models"]} == {"m", "other"}
    placeholder = h.post("/v1/models/load", json={"model": "test"})
    assert placeholder.status_code == 404 and "m.rkllm" in placeholder.json()["error"]["message"]
    load = h.post("/v1/models/load", json={"model": "other.rkllm", "max_context_len": 256, "num_npu_core": 3}).json()
    assert load["success"] and load["model_name"] == "other" and load["max_context_len"] == 256
    assert "num_npu_core" in load["not_applied"]
    loaded = h.get("/v1/models/loaded").json()
    assert loaded["loaded"] and loaded["model_name"] == "other" and loaded["handle"] == load["handle"]
    reply = h.post("/v1/chat/completions", json={"model": "other", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "Hello"}]}).json()
    assert reply["choices"][0]["message"]["content"]
    assert h.get("/v1/health").json()["model_name"] == "other"
    unloaded = h.post("/v1/models/unload").json()
    assert unloaded["success"] and load["handle"] in unloaded["unloaded"]
    assert h.get("/v1/models/loaded").json()["model_name"] != "other" or len(unloaded["unloaded"]) == 1


# ---------------------------------------------------------------------------------------------- CPU runtime


@pytest.mark.cpu
def test_cpu_runtime_through_the_real_clients(tmp_path: Path) -> None:
    require_cpu_runtime()
    import subprocess
    import sys

    port = free_port()
    env = server_env(Path("/nonexistent"), None, tmp_path, MCP_RKLLM_RUNTIME="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm", "--transport", "http", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    drain_log(proc)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/api/version", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.1)
        oai = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        model = oai.models.list().data[0].id
        messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
        whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        streamed = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                               stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert whole.choices[0].message.content and text == whole.choices[0].message.content
        assert whole.usage is not None and whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
        oll = ollama.Client(host=base, timeout=120)
        chunks = list(oll.chat(model=model + ":latest", messages=messages, stream=True,
                               options={"num_predict": 8, "temperature": 0}))
        assert chunks[-1].done and chunks[-1].eval_count and chunks[-1].eval_count > 0
        one, two = oai.embeddings.create(model=model, input=["Paris", "France"]).data
        assert len(one.embedding) == len(two.embedding) > 0
        # A seed makes sampling repeatable on the CPU runtime (OpenAI's `seed`, Ollama's options.seed, any
        # integer: 64-bit ones are taken modulo 2**32); without one, a hot temperature varies.
        story: Any = [{"role": "user", "content": "Tell me a story about a cat."}]

        def sampled(seed: int | None) -> str:
            extra: Any = {} if seed is None else {"seed": seed}
            r = oai.chat.completions.create(model=model, messages=story, max_tokens=16, temperature=1.5, **extra)
            return r.choices[0].message.content or ""

        first = sampled(2**40 + 7)
        assert first and sampled(2**40 + 7) == first == sampled(7)
        ollama_seeded = [oll.generate(model=model, prompt="Tell me a story about a cat.",
                                      options={"seed": 11, "temperature": 1.5, "num_predict": 16}).response
                         for _ in range(2)]
        assert ollama_seeded[0] and ollama_seeded[0] == ollama_seeded[1]
        assert len({sampled(None) for _ in range(3)} | {first}) > 1  # unseeded runs are not all the same
    finally:
        stop(proc)  # type: ignore[arg-type]
