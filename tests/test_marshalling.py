"""Every field of every struct the binding sends arrives in the fake runtime exactly as sent.

The fake (C, compiled per ABI generation) records what it receives field by field; floats are
compared as float32, the width of the C fields.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import discard
from mcp_rkllm.runtime.native import NativeModel, NativeRuntime
from mcp_rkllm.structs import (
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMLoraAdapter,
    RKLLMParam,
)
from tests.conftest import FakeView


def f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def assert_same(sent: dict[str, Any], got: dict[str, Any], where: str = "") -> None:
    """Every key of `sent` is in `got` with the same value (floats as float32)."""
    for key, value in sent.items():
        assert key in got, f"{where}{key} not recorded"
        if isinstance(value, dict):
            assert_same(value, got[key], f"{where}{key}.")
        elif isinstance(value, float):
            assert f32(got[key]) == f32(value), f"{where}{key}: sent {value}, got {got[key]}"
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert [f32(v) for v in got[key]] == [f32(v) for v in value], f"{where}{key}"
        else:
            assert got[key] == value, f"{where}{key}: sent {value!r}, got {got[key]!r}"


@pytest.fixture
def runtime(fake_path: Path, abi: str) -> NativeRuntime:
    rt = NativeRuntime.open(str(fake_path))
    assert rt.abi == abi
    return rt


@pytest.fixture
def model(runtime: NativeRuntime, model_file: Path) -> Iterator[NativeModel]:
    m = runtime.init(RKLLMParam(model_path=str(model_file)))
    yield m
    m.destroy()


def full_param(abi: str, model_file: Path) -> dict[str, Any]:
    """A value for every RKLLMParam field the generation has, none equal to the defaults."""
    p: dict[str, Any] = {
        "model_path": str(model_file), "max_context_len": 4096, "max_new_tokens": 777, "top_k": 17,
        "n_keep": 33, "top_p": 0.73, "temperature": 0.31, "repeat_penalty": 1.37, "frequency_penalty": 0.21,
        "presence_penalty": 0.19, "mirostat": 2, "mirostat_tau": 4.4, "mirostat_eta": 0.07,
        "skip_special_token": False, "is_async": True,
        "extend_param": {"base_domain_id": 3, "embed_flash": 1, "enabled_cpus_num": 6,
                         "enabled_cpus_mask": 0xF0},
    }
    if abi == "1.3.0":
        p["ignore_eos_token"] = True
    else:
        p.update(img_start="<img>", img_end="</img>", img_content="<pad>")
    if abi != "1.2.0":
        p["extend_param"].update(n_batch=1, use_cross_attn=1)
    return p


def test_rkllm_param_every_field(runtime: NativeRuntime, fake: FakeView, abi: str, model_file: Path) -> None:
    sent = full_param(abi, model_file)
    runtime.init(RKLLMParam.model_validate(sent)).destroy()
    got = fake.last("init")
    assert_same(sent, got)
    assert got["extend_param"]["reserved_nonzero"] == 0
    assert got["result_callback"] is True
    if abi == "1.3.0":  # an RKLLMCallback struct with only the result callback set
        assert got["callback_struct"] and not got["tokenizer_callback"] and not got["embed_callback"]


def test_unset_param_fields_keep_runtime_defaults(runtime: NativeRuntime, fake: FakeView, model_file: Path) -> None:
    runtime.init(RKLLMParam(model_path=str(model_file), top_k=5)).destroy()
    got = fake.last("init")
    assert got["top_k"] == 5
    default = runtime.create_default_param()
    assert got["max_new_tokens"] == default.max_new_tokens == 32
    assert f32(got["temperature"]) == f32(0.8) and default.temperature == 0.8
    assert got["n_keep"] == -1


def test_create_default_param_reads_generation_fields(runtime: NativeRuntime, abi: str) -> None:
    d = runtime.create_default_param()
    assert d.top_p == 0.9 and d.model_path is None
    assert (d.ignore_eos_token is not None) == (abi == "1.3.0")
    assert d.extend_param is not None
    assert (d.extend_param.n_batch is not None) == (abi != "1.2.0")


@pytest.mark.parametrize("field", ["ignore_eos_token", "img_start", "n_batch"])
def test_field_missing_in_generation_is_refused(runtime: NativeRuntime, fake: FakeView, abi: str,
                                                model_file: Path, field: str) -> None:
    param: dict[str, Any] = {"model_path": str(model_file)}
    missing = {"ignore_eos_token": abi != "1.3.0", "img_start": abi == "1.3.0", "n_batch": abi == "1.2.0"}[field]
    if field == "n_batch":
        param["extend_param"] = {"n_batch": 2}
    else:
        param[field] = True if field == "ignore_eos_token" else "<img>"
    if missing:
        with pytest.raises(RkllmError) as exc:
            runtime.init(RKLLMParam.model_validate(param))
        assert exc.value.code == "ABI_FIELD_UNSUPPORTED"
        assert field in exc.value.message and abi in exc.value.message
        assert fake.count("init") == 0  # refused before anything reached C
    else:
        runtime.init(RKLLMParam.model_validate(param)).destroy()


def test_default_valued_missing_field_is_not_an_error(runtime: NativeRuntime, model_file: Path, abi: str) -> None:
    """ignore_eos_token=false on 1.2.x (or img_start=null on 1.3.0) is no loss: accepted."""
    runtime.init(RKLLMParam(model_path=str(model_file), ignore_eos_token=False, img_start=None)).destroy()


def run_and_record(model: NativeModel, fake: FakeView, inp: dict[str, Any],
                   infer: dict[str, Any] | None = None) -> dict[str, Any]:
    model.run(RKLLMInput.model_validate(inp), RKLLMInferParam.model_validate(infer or {}), discard)
    rec: dict[str, Any] = fake.last("run")
    return rec


def test_prompt_input(model: NativeModel, fake: FakeView, abi: str) -> None:
    rec = run_and_record(model, fake, {"prompt_input": "héllo wörld ✓", "role": "user"})
    assert rec["input"]["input_type"] == 0
    assert rec["input"]["prompt_input"] == "héllo wörld ✓"
    assert rec["userdata"] is True
    if abi != "1.2.0":
        assert rec["input"]["role"] == "user" and rec["input"]["enable_thinking"] is False


def test_role_and_thinking(model: NativeModel, fake: FakeView, abi: str) -> None:
    inp = {"prompt_input": "result", "role": "tool", "enable_thinking": True}
    if abi == "1.2.0":
        with pytest.raises(RkllmError) as exc:
            run_and_record(model, fake, inp)
        assert exc.value.code == "ABI_FIELD_UNSUPPORTED"
        return
    rec = run_and_record(model, fake, inp)
    assert rec["input"]["role"] == "tool" and rec["input"]["enable_thinking"] is True


def test_token_input(model: NativeModel, fake: FakeView) -> None:
    ids = [1, 2, 2**31 - 1, -5, 49151]
    rec = run_and_record(model, fake, {"input_type": "RKLLM_INPUT_TOKEN", "token_input": {"input_ids": ids}})
    assert rec["input"]["input_type"] == 1
    assert rec["input"]["token_input"] == {"input_ids": ids, "n_tokens": len(ids)}


def test_embed_input(model: NativeModel, fake: FakeView) -> None:
    embed = [i * 0.25 - 1.0 for i in range(12)]  # 3 tokens x 4 floats (the fake's width)
    rec = run_and_record(model, fake, {"input_type": 2, "embed_input": {"embed": embed, "n_tokens": 3}})
    assert rec["input"]["input_type"] == 2
    assert rec["input"]["embed_input"] == {"n_tokens": 3}
    assert [f32(v) for v in rec["embed"]] == [f32(v) for v in embed]


def test_multimodal_input_nested_layout(model: NativeModel, fake: FakeView, abi: str) -> None:
    image: dict[str, Any] = {"image_embed": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5], "n_image_tokens": 2,
                             "n_image": 1,
             "image_width": 448, "image_height": 336}
    mm = {"prompt": "<image> what is this?", "image": image}
    if abi == "1.2.0":  # 1.2.0 has no width/height: refused, and accepted without them
        with pytest.raises(RkllmError) as exc:
            run_and_record(model, fake, {"multimodal_input": mm})
        assert exc.value.code == "ABI_FIELD_UNSUPPORTED" and "image_width" in exc.value.message
        del image["image_width"], image["image_height"]
    rec = run_and_record(model, fake, {"multimodal_input": mm})["input"]
    assert rec["input_type"] == 3
    got = rec["multimodal_input"]
    assert got["prompt"] == "<image> what is this?"
    if abi == "1.3.0":
        assert_same(image, got["image"])
        assert got["image"]["image_start"] is None and got["video"]["video_embed"] is None
    else:
        assert got["n_image_tokens"] == 2
        assert [f32(v) for v in got["image_embed"]] == [f32(v) for v in image["image_embed"]]
        if abi == "1.2.1":
            assert (got["n_image"], got["image_width"], got["image_height"]) == (1, 448, 336)


def test_multimodal_flat_layout_and_1_3_0_tags(model: NativeModel, fake: FakeView, abi: str) -> None:
    flat = {"prompt": "<image>", "image_embed": [1.0, 2.0, 3.0, 4.0], "n_image_tokens": 1}
    rec = run_and_record(model, fake, {"multimodal_input": flat})["input"]["multimodal_input"]
    n_tokens = rec["image"]["n_image_tokens"] if abi == "1.3.0" else rec["n_image_tokens"]
    assert n_tokens == 1
    tags: dict[str, Any] = {"prompt": "<image>", "image": {"image_embed": [1.0, 2.0, 3.0, 4.0], "n_image_tokens": 1,
                                            "image_start": "<|vision_start|>", "image_end": "<|vision_end|>",
                                            "image_content": "<|image_pad|>"},
            "video": {"video_embed": [0.25] * 16, "n_frame_tokens": 2, "n_frame_per_video": 2,
                      "video_start": "<v>", "video_end": "</v>", "video_content": "<vp>",
                      "frame_width": 64, "frame_height": 48}}
    if abi != "1.3.0":
        with pytest.raises(RkllmError) as exc:
            run_and_record(model, fake, {"multimodal_input": tags})
        assert exc.value.code == "ABI_FIELD_UNSUPPORTED" and "image.image_start" in exc.value.message
        return
    got = run_and_record(model, fake, {"multimodal_input": tags})["input"]["multimodal_input"]
    assert_same(tags["image"], got["image"])
    assert_same(tags["video"], got["video"])
    assert got["video"]["n_video"] == 1


def test_infer_params_every_field(model: NativeModel, fake: FakeView, abi: str, tmp_path: Path) -> None:
    adapter = tmp_path / "a.rkllm"
    adapter.write_bytes(b"lora")
    model.load_lora(RKLLMLoraAdapter(lora_adapter_path=str(adapter), lora_adapter_name="style", scale=0.6))
    infer: dict[str, Any] = {
        "mode": "RKLLM_INFER_GENERATE", "keep_history": 1,
        "lora_params": {"lora_adapter_name": "style"},
        "prompt_cache_params": {"save_prompt_cache": 1, "prompt_cache_path": str(tmp_path / "cache.bin")},
    }
    if abi == "1.3.0":
        infer["max_new_tokens"] = 5
        infer["sampling_params"] = {"top_k": 3, "top_p": 0.5, "temperature": 0.25, "repeat_penalty": 1.5,
                                    "frequency_penalty": 0.125, "presence_penalty": 0.375, "mirostat": 1,
                                    "mirostat_tau": 3.5, "mirostat_eta": 0.2}
    rec = run_and_record(model, fake, {"prompt_input": "cache me"}, infer)["infer_params"]
    expected = dict(infer, mode=0)
    assert_same(expected, rec)
    assert (tmp_path / "cache.bin").read_bytes().endswith(b"cache me")


@pytest.mark.parametrize("field", ["sampling_params", "max_new_tokens"])
def test_infer_fields_of_1_3_0_refused_on_older(model: NativeModel, fake: FakeView, abi: str, field: str) -> None:
    infer: dict[str, Any] = {"sampling_params": {"top_k": 1}} if field == "sampling_params" else {"max_new_tokens": 3}
    if abi == "1.3.0":
        run_and_record(model, fake, {"prompt_input": "x"}, infer)
        return
    with pytest.raises(RkllmError) as exc:
        run_and_record(model, fake, {"prompt_input": "x"}, infer)
    assert exc.value.code == "ABI_FIELD_UNSUPPORTED" and field in exc.value.message


def test_lora_adapter_every_field(model: NativeModel, fake: FakeView, tmp_path: Path) -> None:
    adapter = tmp_path / "lora ✓.rkllm"
    adapter.write_bytes(b"lora")
    model.load_lora(RKLLMLoraAdapter(lora_adapter_path=str(adapter), lora_adapter_name="n1", scale=0.375))
    assert_same({"lora_adapter_path": str(adapter), "lora_adapter_name": "n1", "scale": 0.375},
                fake.last("load_lora"))


def test_cross_attn_every_field(model: NativeModel, fake: FakeView, abi: str) -> None:
    params = {"encoder_k_cache": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5], "encoder_v_cache": [6.5, 7.5, 8.5, 9.5, 10.5, 11.5],
              "encoder_mask": [1.0, 0.0, 1.0], "encoder_pos": [0, 1, 7], "num_tokens": 3}
    if abi == "1.2.0":
        with pytest.raises(RkllmError) as exc:
            model.set_cross_attn_params(RKLLMCrossAttnParam.model_validate(params))
        assert exc.value.code == "NOT_SUPPORTED"
        return
    model.set_cross_attn_params(RKLLMCrossAttnParam.model_validate(params))
    assert_same(params, fake.last("set_cross_attn_params"))


def test_chat_template_and_function_tools(model: NativeModel, fake: FakeView, abi: str) -> None:
    model.set_chat_template("You are ✓ helpful.", "<|user|>", "<|assistant|>")
    assert fake.last("set_chat_template") == {"system_prompt": "You are ✓ helpful.", "prompt_prefix": "<|user|>",
                                              "prompt_postfix": "<|assistant|>"}
    tools = '[{"type":"function","function":{"name":"get_time","parameters":{}}}]'
    if abi == "1.2.0":
        with pytest.raises(RkllmError):
            model.set_function_tools("sys", tools, "tool_response")
        return
    model.set_function_tools("sys", tools, "tool_response")
    assert fake.last("set_function_tools") == {"system_prompt": "sys", "tools": tools,
                                               "tool_response_str": "tool_response"}


def test_clear_kv_cache_passes_explicit_nulls(model: NativeModel, fake: FakeView, abi: str) -> None:
    model.clear_kv_cache(1, None, None)
    rec = fake.last("clear_kv_cache")
    assert rec["keep_system_prompt"] == 1
    if abi != "1.2.0":
        assert rec["start_pos"] is None and rec["end_pos"] is None
        model.clear_kv_cache(0, [2], [5])
        assert fake.last("clear_kv_cache") == {"keep_system_prompt": 0, "start_pos": [2], "end_pos": [5]}
    else:
        with pytest.raises(RkllmError) as exc:
            model.clear_kv_cache(0, [2], [5])
        assert exc.value.code == "ABI_FIELD_UNSUPPORTED"


def test_nul_in_string_is_invalid(model: NativeModel, fake: FakeView) -> None:
    with pytest.raises(RkllmError) as exc:
        run_and_record(model, fake, {"prompt_input": "a\x00b"})
    assert exc.value.code == "INVALID_PARAMS"
