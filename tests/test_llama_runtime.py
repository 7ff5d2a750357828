"""The CPU runtime with the bundled SmolLM2-135M model: real text, RKLLM semantics, greedy and short."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import Hidden, Logits, RunEvent, Token, Waiting, discard
from mcp_rkllm.runtime.llama import LlamaCppRuntime, LlamaModel
from mcp_rkllm.structs import RKLLMInferParam, RKLLMInput, RKLLMLoraAdapter, RKLLMParam
from tests.cpu import require_cpu_runtime

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def gguf() -> Path:
    return require_cpu_runtime()


@pytest.fixture(scope="module")
def runtime(gguf: Path) -> LlamaCppRuntime:
    return LlamaCppRuntime(n_threads=2)


def load(runtime: LlamaCppRuntime, gguf: Path, **param: object) -> LlamaModel:
    return runtime.init(RKLLMParam.model_validate({"model_path": str(gguf), "temperature": 0.0,
                                                   "max_new_tokens": 24, "max_context_len": 1024, **param}))


@pytest.fixture
def model(runtime: LlamaCppRuntime, gguf: Path) -> Iterator[LlamaModel]:
    m = load(runtime, gguf)
    yield m
    m.destroy()


def ask(text: str, role: str = "user") -> RKLLMInput:
    return RKLLMInput(prompt_input=text, role=role)


def test_greedy_is_deterministic_and_streams(model: LlamaModel) -> None:
    events: list[RunEvent] = []
    first = model.run(ask("What is the capital of France?"), RKLLMInferParam(), events.append)
    second = model.run(ask("What is the capital of France?"), RKLLMInferParam(), discard)
    assert first.text and first.text == second.text
    assert first.text == "".join(e.text for e in events if isinstance(e, Token))
    assert first.token_count == len([e for e in events if isinstance(e, Token | Waiting)])
    assert first.perf is not None and first.perf.prefill_tokens > 10 and first.perf.generate_tokens == first.token_count
    assert first.perf.generate_time_ms > 0 and first.perf.memory_usage_mb > 50
    assert first.finish_reason in ("stop", "length")


def test_max_new_tokens_per_run_and_length(model: LlamaModel) -> None:
    r = model.run(ask("Count from one to one hundred."), RKLLMInferParam(max_new_tokens=5), discard)
    assert r.token_count == 5 and r.finish_reason == "length"


@pytest.mark.slow
def test_keep_history_makes_the_second_turn_see_the_first(runtime: LlamaCppRuntime, gguf: Path) -> None:
    with_history = load(runtime, gguf)
    without = load(runtime, gguf)
    try:
        with_history.run(ask("My name is Ada."), RKLLMInferParam(keep_history=1), discard)
        kept = with_history.get_kv_cache_size()[0]
        assert kept > 20
        second = with_history.run(ask("Say my name."), RKLLMInferParam(keep_history=1), discard)
        assert with_history.get_kv_cache_size()[0] > kept
        # the second turn reused the first one's KV instead of re-reading it
        assert second.perf is not None and second.perf.prefill_tokens < kept
        alone = without.run(ask("Say my name."), RKLLMInferParam(keep_history=1), discard)
        assert second.text != alone.text  # the first turn changed what the model says
        with_history.clear_kv_cache(0)
        assert with_history.get_kv_cache_size() == [0]
        again = with_history.run(ask("Say my name."), RKLLMInferParam(keep_history=1), discard)
        assert again.text == alone.text  # history gone: the same as a fresh handle
    finally:
        with_history.destroy()
        without.destroy()


def test_keep_history_0_runs_are_independent(model: LlamaModel) -> None:
    model.run(ask("My name is Ada."), RKLLMInferParam(keep_history=0), discard)
    assert model.get_kv_cache_size() == [0]


def test_abort_ends_a_long_generation_early(model: LlamaModel) -> None:
    started = threading.Event()

    def sink(e: RunEvent) -> None:
        started.set()

    def abort_soon() -> None:
        assert started.wait(10)
        time.sleep(0.05)
        model.abort()

    threading.Thread(target=abort_soon).start()
    r = model.run(ask("Write a very long story about a dragon."),
                  RKLLMInferParam(max_new_tokens=2000, sampling_params={"temperature": 0.0, "repeat_penalty": 1.0}),  # type: ignore[arg-type]
                  sink)
    assert r.finish_reason == "abort" and 0 < r.token_count < 2000
    assert not model.is_running()
    after = model.run(ask("What is the capital of France?"), RKLLMInferParam(max_new_tokens=5), discard)
    assert after.finish_reason == "length"


def test_logits_mode_returns_vocab_sized_rows(model: LlamaModel) -> None:
    events: list[RunEvent] = []
    r = model.run(RKLLMInput(token_input={"input_ids": [1, 4093, 198, 19556]}), RKLLMInferParam(mode=2), events.append)  # type: ignore[arg-type]
    assert r.logits is not None and r.logits.vocab_size == 49152 and r.logits.num_tokens == 4
    assert len(r.logits.logits) == 4 * 49152
    assert any(isinstance(e, Logits) for e in events) and r.text == ""


def test_hidden_states_mode(model: LlamaModel) -> None:
    events: list[RunEvent] = []
    r = model.run(RKLLMInput(token_input={"input_ids": [1, 4093, 198]}),  # type: ignore[arg-type]
                  RKLLMInferParam(mode="RKLLM_INFER_GET_LAST_HIDDEN_LAYER"), events.append)  # type: ignore[arg-type]
    assert r.last_hidden_layer is not None
    assert (r.last_hidden_layer.num_tokens, r.last_hidden_layer.embd_size) == (3, 576)
    assert any(isinstance(e, Hidden) for e in events)
    assert any(abs(v) > 1e-3 for v in r.last_hidden_layer.hidden_states)


@pytest.mark.slow
def test_prompt_cache_loads_into_a_fresh_handle(runtime: LlamaCppRuntime, gguf: Path, model: LlamaModel,
                                                tmp_path: Path) -> None:
    cache = tmp_path / "prefix.bin"
    question = ask("Tell me about Paris.")
    saved = model.run(question, RKLLMInferParam(prompt_cache_params={"prompt_cache_path": str(cache)}), discard)  # type: ignore[arg-type]
    assert cache.stat().st_size > 100_000
    fresh = load(runtime, gguf)
    cold = load(runtime, gguf)
    try:
        fresh.load_prompt_cache(str(cache))
        warm = fresh.run(question, RKLLMInferParam(), discard)
        baseline = cold.run(question, RKLLMInferParam(), discard)
        assert baseline.text == saved.text  # the same computation twice: the same greedy text
        # The warm run re-decodes only the prefix's last position, alone, where the cold run decodes the
        # prompt in one batch; llama.cpp's kernels for the two shapes round differently (seen with a
        # portable build: the texts part after ~25 tokens), so greedy texts agree on their start only.
        assert warm.token_ids[:8] == baseline.token_ids[:8], (warm.text, baseline.text)
        assert warm.perf is not None and baseline.perf is not None
        assert warm.perf.prefill_tokens < baseline.perf.prefill_tokens  # the cached prefix was not re-read
        fresh.release_prompt_cache()
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"nope")
        with pytest.raises(RkllmError) as exc:
            fresh.load_prompt_cache(str(junk))
        assert exc.value.code == "RKLLM_CALL_FAILED"
    finally:
        fresh.destroy()
        cold.destroy()


def test_token_input_is_used_as_is(model: LlamaModel) -> None:
    r = model.run(RKLLMInput(token_input={"input_ids": [1, 4093, 198, 19556, 2]}),  # type: ignore[arg-type]
                  RKLLMInferParam(max_new_tokens=4), discard)
    assert r.token_count == 4
    with pytest.raises(RkllmError) as exc:
        model.run(RKLLMInput(token_input={"input_ids": [10**7]}), RKLLMInferParam(), discard)  # type: ignore[arg-type]
    assert exc.value.code == "INVALID_PARAMS"


def test_embed_input(model: LlamaModel) -> None:
    with pytest.raises(RkllmError) as exc:
        model.run(RKLLMInput(embed_input={"embed": [0.0] * 8, "n_tokens": 2}), RKLLMInferParam(), discard)  # type: ignore[arg-type]
    assert exc.value.code == "INVALID_PARAMS" and "576" in exc.value.message
    r = model.run(RKLLMInput(embed_input={"embed": [0.01] * 576 * 2, "n_tokens": 2}),  # type: ignore[arg-type]
                  RKLLMInferParam(max_new_tokens=3), discard)
    assert r.token_count == 3


@pytest.mark.slow
def test_chat_template_and_function_tools(model: LlamaModel) -> None:
    plain = model.run(ask("Hi"), RKLLMInferParam(max_new_tokens=8), discard)
    model.set_chat_template("<|im_start|>system\nYou are a pirate.<|im_end|>\n", "<|im_start|>user\n",
                            "<|im_end|>\n<|im_start|>assistant\n")
    pirate = model.run(ask("Hi"), RKLLMInferParam(max_new_tokens=8), discard)
    assert pirate.text != plain.text
    assert pirate.perf is not None and plain.perf is not None
    assert pirate.perf.prefill_tokens < plain.perf.prefill_tokens  # no default system prompt injected any more
    model.set_function_tools("You are helpful.", '[{"type":"function","function":{"name":"get_time",'
                             '"description":"the time","parameters":{}}}]', "tool_response")
    with_tools = model.run(ask("What time is it?"), RKLLMInferParam(max_new_tokens=4), discard)
    assert with_tools.perf is not None and with_tools.perf.prefill_tokens > 60  # the tool list is in the prompt
    reply = model.run(ask('{"time": "12:00"}', role="tool"), RKLLMInferParam(max_new_tokens=4), discard)
    assert reply.token_count == 4


def test_not_supported(runtime: LlamaCppRuntime, model: LlamaModel, tmp_path: Path) -> None:
    with pytest.raises(RkllmError) as exc:
        model.run(RKLLMInput(multimodal_input={"prompt": "<image>", "image_embed": [0.0] * 4, "n_image_tokens": 1}),  # type: ignore[arg-type]
                  RKLLMInferParam(), discard)
    assert exc.value.code == "NOT_SUPPORTED"
    with pytest.raises(RkllmError) as exc:
        model.set_cross_attn_params(None)  # type: ignore[arg-type]
    assert exc.value.code == "NOT_SUPPORTED"
    npu_model = tmp_path / "m.rkllm"
    npu_model.write_bytes(b"x")
    with pytest.raises(RkllmError) as exc:
        runtime.init(RKLLMParam(model_path=str(npu_model)))
    assert exc.value.code == "NOT_SUPPORTED" and ".rkllm" in exc.value.message
    with pytest.raises(RkllmError) as exc:
        runtime.init(RKLLMParam(model_path=str(npu_model), extend_param={"n_batch": 2}))  # type: ignore[arg-type]
    assert exc.value.code == "NOT_SUPPORTED"


def test_lora_that_is_not_an_adapter_fails_cleanly(model: LlamaModel, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(RkllmError) as exc:
        model.load_lora(RKLLMLoraAdapter(lora_adapter_path=str(bad), lora_adapter_name="x"))
    assert exc.value.code == "RKLLM_CALL_FAILED"
    with pytest.raises(RkllmError):
        model.run(ask("Hi"), RKLLMInferParam(lora_params={"lora_adapter_name": "x"}), discard)  # type: ignore[arg-type]
    assert model.run(ask("Hi"), RKLLMInferParam(max_new_tokens=2), discard).token_count == 2


def test_ignore_eos_runs_to_the_limit(runtime: LlamaCppRuntime, gguf: Path) -> None:
    m = load(runtime, gguf, ignore_eos_token=True)
    try:
        r = m.run(ask("Say OK."), RKLLMInferParam(max_new_tokens=40), discard)
        assert r.token_count == 40 and r.finish_reason == "length"
    finally:
        m.destroy()


def test_run_async_and_destroy(model: LlamaModel) -> None:
    run = model.run_async(ask("Hello"), RKLLMInferParam(max_new_tokens=6), discard)
    result = run.wait(30)
    assert result is not None and result.token_count <= 6 and run.done
    model.destroy()
    model.destroy()
    with pytest.raises(RkllmError):
        model.run(ask("x"), RKLLMInferParam(), discard)


@pytest.mark.anyio
async def test_a_seed_repeats_a_sampled_reply_in_a_worker_too(gguf: Path, tmp_path: Path) -> None:
    """`seed` on generate / chat (the Seeding capability) through MCP, with the CPU model in a worker process: the
    seed applies to the next run only; the NPU runtime's NOT_SUPPORTED is tested with the HTTP APIs."""
    from mcp import Client

    from mcp_rkllm.config import Settings
    from mcp_rkllm.surfaces.mcp import build_server
    from tests.test_server import call

    settings = Settings(runtime="cpu", isolation="process", models=(str(gguf.parent),), cache_dir=str(tmp_path))
    args = {"prompt": "Tell me a story about a cat.", "temperature": 1.5, "max_new_tokens": 12}
    async with Client(build_server(settings)) as client:
        seeded = [(await call(client, "generate", {**args, "seed": 5}))["text"] for _ in range(2)]
        chat = {"messages": [{"role": "user", "content": args["prompt"]}], "temperature": 1.5, "max_new_tokens": 12,
                "seed": 5}
        chatted = [(await call(client, "chat", chat))["content"] for _ in range(2)]
        free = {(await call(client, "generate", args))["text"] for _ in range(3)}
    assert seeded[0] and seeded[0] == seeded[1] and chatted[0] and chatted[0] == chatted[1]
    assert len(free | {seeded[0]}) > 1  # the seed was taken by its run only: unseeded runs vary
