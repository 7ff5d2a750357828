"""NativeRuntime against the fake: token order and threads, WAITING, modes, abort, errors, KV and caches."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import Finish, Hidden, Logits, RunError, RunEvent, Token, Waiting, discard
from mcp_rkllm.runtime.native import NativeModel, NativeRuntime
from mcp_rkllm.structs import RKLLMInferParam, RKLLMInput, RKLLMParam
from tests.conftest import FakeView

EMOJI = " \U0001F600"


@pytest.fixture
def runtime(fake_path: Path) -> NativeRuntime:
    return NativeRuntime.open(str(fake_path))


@pytest.fixture
def model(runtime: NativeRuntime, model_file: Path) -> Iterator[NativeModel]:
    m = runtime.init(RKLLMParam(model_path=str(model_file), max_new_tokens=12))
    yield m
    m.destroy()


def prompt(text: str) -> RKLLMInput:
    return RKLLMInput(prompt_input=text)


GENERATE = RKLLMInferParam()


def test_tokens_arrive_in_order_from_the_fakes_thread(model: NativeModel, abi: str) -> None:
    events: list[tuple[RunEvent, int]] = []
    result = model.run(prompt("alpha beta gamma"), GENERATE, lambda e: events.append((e, threading.get_ident())))
    caller = threading.get_ident()
    assert {tid for _, tid in events} and caller not in {tid for _, tid in events}  # the fake's own thread
    kinds = [type(e).__name__ for e, _ in events]
    # piece 3 is the emoji: WAITING (no text), WAITING (partial bytes), then NORMAL with the whole character
    assert kinds[:6] == ["Token", "Token", "Token", "Waiting", "Waiting", "Token"]
    assert kinds[-1] == "Finish"
    texts = [e.text for e, _ in events if isinstance(e, Token)]
    assert texts[:4] == ["alpha", " beta", " gamma", EMOJI]
    assert result.text == "".join(texts) == "alpha beta gamma" + EMOJI + " beta gamma alpha" + EMOJI
    assert all("\ufffd" not in t for t in texts)  # partial UTF-8 never decoded into text
    assert result.token_count == 12 and result.finish_reason == "length"
    ids = [e.token_id for e, _ in events if isinstance(e, Token | Waiting)]
    assert ids == result.token_ids
    finish = events[-1][0]
    assert isinstance(finish, Finish)
    if abi == "1.2.0":
        assert finish.perf is None and result.perf is None  # 1.2.0 has no RKLLMPerfStat
    else:
        assert result.perf is not None
        assert result.perf.generate_tokens == 12 and result.perf.prefill_tokens == 3
        assert result.perf.memory_usage_mb == 42.5


def test_eos_is_finish_reason_stop(model: NativeModel) -> None:
    result = model.run(prompt("one two fake:eos=2"), GENERATE, discard)
    assert result.text == "one two" and result.finish_reason == "stop"


def test_per_run_max_new_tokens(model: NativeModel, abi: str) -> None:
    if abi != "1.3.0":  # the field exists from 1.3.0 on; older ABIs refuse it instead of dropping it
        with pytest.raises(RkllmError) as exc:
            model.run(prompt("a b"), RKLLMInferParam(max_new_tokens=2), discard)
        assert exc.value.code == "ABI_FIELD_UNSUPPORTED"
        return
    result = model.run(prompt("a b"), RKLLMInferParam(max_new_tokens=2), discard)
    assert result.token_count == 2 and result.finish_reason == "length"


def test_hidden_states_copied_inside_callback(model: NativeModel) -> None:
    events: list[RunEvent] = []
    result = model.run(prompt("a b c"), RKLLMInferParam(mode="RKLLM_INFER_GET_LAST_HIDDEN_LAYER"), events.append)  # type: ignore[arg-type]
    hidden = [e for e in events if isinstance(e, Hidden)]
    assert len(hidden) == 1 and hidden[0].num_tokens == 3 and hidden[0].embd_size == 8
    # the fake overwrites its buffer with -12345 right after the callback: we must have copied before
    assert hidden[0].data[0] == 0.0 and hidden[0].data[8 + 2] == pytest.approx(1.02)
    assert result.last_hidden_layer is not None and len(result.last_hidden_layer.hidden_states) == 24
    assert -12345.0 not in result.last_hidden_layer.hidden_states
    assert result.text == "" and result.logits is None


def test_logits_copied_inside_callback(model: NativeModel) -> None:
    events: list[RunEvent] = []
    result = model.run(prompt("a b"), RKLLMInferParam(mode=2), events.append)  # type: ignore[arg-type]
    logits = [e for e in events if isinstance(e, Logits)]
    assert len(logits) == 1 and logits[0].vocab_size == 16 and logits[0].num_tokens == 2
    assert result.logits is not None and result.logits.logits[16] == pytest.approx(1.5)
    assert -12345.0 not in result.logits.logits


def test_token_and_embed_inputs_generate(model: NativeModel) -> None:
    r = model.run(RKLLMInput(token_input={"input_ids": [5, 6]}), GENERATE, discard)  # type: ignore[arg-type]
    assert r.text.startswith("<5> <6>")
    r = model.run(RKLLMInput(embed_input={"embed": [0.0] * 8, "n_tokens": 2}), GENERATE, discard)  # type: ignore[arg-type]
    assert r.text.startswith("e0 e1")


def test_abort_from_another_thread_ends_a_slow_run(model: NativeModel, fake: FakeView) -> None:
    events: list[RunEvent] = []
    first_token = threading.Event()

    def sink(e: RunEvent) -> None:
        events.append(e)
        first_token.set()

    def abort_soon() -> None:
        assert first_token.wait(5)
        model.abort()

    threading.Thread(target=abort_soon).start()
    started = time.monotonic()
    result = model.run(prompt("slow fake:delay_ms=100"), RKLLMInferParam(), sink)
    assert time.monotonic() - started < 1.0  # 12 tokens at 100 ms would take 1.2 s
    assert result.finish_reason == "abort" and 1 <= result.token_count < 12
    assert fake.count("abort_while_running") == 1
    assert not model.is_running()
    again = model.run(prompt("after abort"), GENERATE, discard)  # the handle stays usable
    assert again.finish_reason == "length"


def test_is_running_reads_1_as_running(model: NativeModel) -> None:
    seen: list[bool] = []
    model.run(prompt("x fake:delay_ms=1"), GENERATE, lambda e: seen.append(model.is_running()))
    assert seen and all(seen[:-1])
    assert model.is_running() is False


def test_run_failure_is_rkllm_call_failed(model: NativeModel) -> None:
    with pytest.raises(RkllmError) as exc:
        model.run(prompt("please fake:fail"), GENERATE, discard)
    assert exc.value.code == "RKLLM_CALL_FAILED" and exc.value.rc == -1 and exc.value.function == "rkllm_run"


def test_run_error_state_surfaces(model: NativeModel) -> None:
    events: list[RunEvent] = []
    result = model.run(prompt("a b fake:error=2"), GENERATE, events.append)
    assert isinstance(events[-1], RunError)
    assert result.finish_reason == "error" and result.text == "a b" and result.error


def test_init_failures(runtime: NativeRuntime, model_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "m-fake:fail_init.rkllm"
    bad.write_bytes(b"x")
    with pytest.raises(RkllmError) as exc:
        runtime.init(RKLLMParam(model_path=str(bad)))
    assert (exc.value.code, exc.value.rc) == ("RKLLM_CALL_FAILED", -1)
    with pytest.raises(RkllmError) as exc:
        runtime.init(RKLLMParam(model_path=str(tmp_path / "missing.rkllm")))
    assert exc.value.code == "RKLLM_CALL_FAILED"
    with pytest.raises(RkllmError) as exc:
        runtime.init(RKLLMParam())
    assert exc.value.code == "INVALID_PARAMS"


def test_environment_failure_trigger(model: NativeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RKLLM_FAIL", "rkllm_set_chat_template")
    with pytest.raises(RkllmError) as exc:
        model.set_chat_template("s", "p", "q")
    assert exc.value.function == "rkllm_set_chat_template"


def test_sink_exception_does_not_reach_c(model: NativeModel) -> None:
    def sink(e: RunEvent) -> None:
        raise ValueError("sink broke")

    with pytest.raises(ValueError, match="sink broke"):
        model.run(prompt("a b"), GENERATE, sink)
    assert model.run(prompt("ok"), GENERATE, discard).text.startswith("ok")


def test_kv_cache_follows_keep_history(model: NativeModel, abi: str) -> None:
    if abi == "1.2.0":
        with pytest.raises(RkllmError) as exc:
            model.get_kv_cache_size()
        assert exc.value.code == "NOT_SUPPORTED"
        return
    model.run(prompt("a b"), RKLLMInferParam(keep_history=1), discard)
    first = model.get_kv_cache_size()
    assert first == [2 + 12]
    model.run(prompt("c"), RKLLMInferParam(keep_history=1), discard)
    assert model.get_kv_cache_size() == [first[0] + 1 + 12]
    model.clear_kv_cache(0, None, None)
    assert model.get_kv_cache_size() == [0]
    model.run(prompt("c"), RKLLMInferParam(keep_history=0), discard)
    assert model.get_kv_cache_size() == [0]


def test_prompt_cache_save_load_release(model: NativeModel, fake: FakeView, tmp_path: Path) -> None:
    path = tmp_path / "prefix.bin"
    model.run(prompt("system prefix words"), RKLLMInferParam(
        prompt_cache_params={"save_prompt_cache": 1, "prompt_cache_path": str(path)}), discard)  # type: ignore[arg-type]
    assert path.exists()
    model.load_prompt_cache(str(path))
    assert fake.last("load_prompt_cache")["cached_prompt"] == "system prefix words"
    model.release_prompt_cache()
    assert fake.count("release_prompt_cache") == 1
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a cache")
    with pytest.raises(RkllmError):
        model.load_prompt_cache(str(junk))


def test_lora_must_be_loaded_before_use(model: NativeModel, tmp_path: Path) -> None:
    with pytest.raises(RkllmError):
        model.run(prompt("x"), RKLLMInferParam(lora_params={"lora_adapter_name": "nope"}), discard)  # type: ignore[arg-type]


def test_run_async_returns_at_once_and_completes(model: NativeModel) -> None:
    events: list[RunEvent] = []
    started = time.monotonic()
    run = model.run_async(prompt("async words fake:delay_ms=20"), GENERATE, events.append)
    assert time.monotonic() - started < 0.2 and not run.done
    result = run.wait(10)
    assert result is not None and result.finish_reason == "length" and result.token_count == 12
    assert result.text == "".join(e.text for e in events if isinstance(e, Token))


def test_run_async_abort(model: NativeModel) -> None:
    run = model.run_async(prompt("x fake:delay_ms=50"), GENERATE, discard)
    time.sleep(0.12)
    model.abort()
    result = run.wait(5)
    assert result is not None and result.finish_reason == "abort"


def test_destroy_is_idempotent_and_aborts(runtime: NativeRuntime, model_file: Path, fake: FakeView) -> None:
    m = runtime.init(RKLLMParam(model_path=str(model_file)))
    m.run_async(prompt("x fake:delay_ms=50"), GENERATE, discard)
    time.sleep(0.06)
    m.destroy()
    m.destroy()
    assert fake.count("destroy") == 1 and fake.count("abort_while_running") == 1
    with pytest.raises(RkllmError) as exc:
        m.run(prompt("x"), GENERATE, discard)
    assert exc.value.code == "UNKNOWN_HANDLE"


def test_crash_trigger_kills_the_process(fake_path: Path, model_file: Path) -> None:
    """The fake's crash trigger really crashes (the isolation layer is tested against it)."""
    code = (
        "import sys; from mcp_rkllm.runtime.native import NativeRuntime\n"
        "from mcp_rkllm.structs import *\n"
        "from mcp_rkllm.events import discard\n"
        f"m = NativeRuntime.open({str(fake_path)!r}).init(RKLLMParam(model_path={str(model_file)!r}))\n"
        "m.run(RKLLMInput(prompt_input='x fake:crash=2'), RKLLMInferParam(), discard)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                          env={"PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == -11
