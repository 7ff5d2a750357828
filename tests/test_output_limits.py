"""Outputs are bounded (issue 18 item 4): hidden states and logits honour `output_rows` and --max-output-floats.

A 300-token prompt's logits used to come back whole: 622 MB of JSON. Now a run returns the last
`output_rows` rows (0 = all), and more than `max_output_floats` floats is LIMIT_EXCEEDED, naming how
many rows fit. On the CPU runtime the bound is checked before anything is decoded and only the rows
asked for are computed; on the NPU runtime (the fake here) the collector cuts or refuses what the
library delivers before it becomes JSON, in the server process and behind a worker alike.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mcp import Client

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import Hidden, Logits, OutputLimit, RunCollector
from mcp_rkllm.models.store import bundled_model
from mcp_rkllm.runtime.llama import LlamaCppRuntime, LlamaModel
from mcp_rkllm.structs import RKLLMInferParam, RKLLMInput, RKLLMParam, RKLLMTokenInput
from mcp_rkllm.surfaces.mcp import build_server
from tests.conftest import FakeView
from tests.cpu import require_cpu_runtime
from tests.test_server import call, fail

LOGITS = RKLLMInferParam(mode="RKLLM_INFER_GET_LOGITS")  # type: ignore[arg-type]
HIDDEN = RKLLMInferParam(mode="RKLLM_INFER_GET_LAST_HIDDEN_LAYER")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the bound itself


def test_output_limit_keeps_the_last_rows_and_says_how_many_fit() -> None:
    limit = OutputLimit(rows=0, max_floats=100)
    assert limit.kept(7) == 7 and OutputLimit(rows=2).kept(7) == 2 and OutputLimit(rows=9).kept(7) == 7
    assert limit.error("logits", 6, 16) is None  # 96 floats
    error = limit.error("logits", 300, 16)
    assert error is not None and error.code == "LIMIT_EXCEEDED"
    assert error.message == ("the logits output in floats (300 rows x 16; pass output_rows=6 or fewer, e.g. "
                             "output_rows=1 for the last token's row only) is 4800, over the limit of 100")
    assert error.to_dict()["details"]["max_output_rows"] == 6
    wide = limit.error("logits", 1, 49152)
    assert wide is not None and "raise --max-output-floats" in wide.message
    assert OutputLimit().error("logits", 10**6, 10**6) is None  # no bound: internal callers


def test_collector_cuts_rows_or_refuses_before_the_result_is_built() -> None:
    data = array("f", [float(i) for i in range(5 * 4)])
    c = RunCollector(output=OutputLimit(rows=2, max_floats=8))
    c.add(Logits(data, 4, 5))
    assert c.logits is not None and c.logits.num_tokens == 2 and list(c.logits.data) == [12, 13, 14, 15, 16, 17, 18,
                                                                                          19]
    over = RunCollector(output=OutputLimit(rows=3, max_floats=8))
    seen: list[object] = []
    over.forward = seen.append
    over.add(Hidden(data, 4, 5))
    assert over.hidden is None and seen == []  # neither kept nor passed on
    assert over.output_error is not None and over.output_error.fields["max_output_rows"] == 2
    result = over.result()
    assert result.finish_reason == "error" and result.last_hidden_layer is None
    assert result.error is not None and "output_rows=2" in result.error


# ----------------------------------------------------------------------------- the CPU runtime


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    path = require_cpu_runtime()
    m = LlamaCppRuntime(n_threads=2).init(RKLLMParam(model_path=str(path), temperature=0.0, max_context_len=1024))
    yield m
    m.destroy()


def tokens(n: int) -> RKLLMInput:
    return RKLLMInput(token_input=RKLLMTokenInput(input_ids=[(17 * i) % 4000 + 100 for i in range(n)]))


@pytest.mark.cpu
def test_cpu_refuses_oversized_logits_before_decoding_anything(model: LlamaModel) -> None:
    collector = RunCollector(output=OutputLimit(rows=0, max_floats=1 << 20))
    started = time.perf_counter()
    with pytest.raises(RkllmError) as caught:
        model.run(tokens(300), LOGITS, collector)
    assert time.perf_counter() - started < 0.5  # a 300-token prefill with all logits takes seconds here
    e = caught.value
    assert e.code == "LIMIT_EXCEEDED" and e.fields["value"] == 300 * model.n_vocab and e.fields["limit"] == 1 << 20
    assert e.fields["max_output_rows"] == (1 << 20) // model.n_vocab == 21
    assert "output_rows=21" in e.message and "300 rows x 49152" in e.message
    assert model.tokens == [] and collector.logits is None  # nothing decoded, nothing copied


@pytest.mark.cpu
def test_cpu_last_rows_are_the_tail_of_all_rows(model: LlamaModel) -> None:
    full = RunCollector(output=OutputLimit())
    model.run(tokens(12), LOGITS, full)
    tail = RunCollector(output=OutputLimit(rows=3, max_floats=3 * model.n_vocab))
    result = model.run(tokens(12), LOGITS, tail)
    assert full.logits is not None and full.logits.num_tokens == 12
    assert result.logits is not None and result.logits.num_tokens == 3 and result.logits.vocab_size == model.n_vocab
    assert result.perf is not None and result.perf.prefill_tokens == 12
    expected = full.logits.data[9 * model.n_vocab:]
    assert max(abs(a - b) for a, b in zip(result.logits.logits, expected, strict=True)) < 1e-3
    hidden = RunCollector(output=OutputLimit(rows=1, max_floats=model.n_embd))
    out = model.run(tokens(12), HIDDEN, hidden)
    assert out.last_hidden_layer is not None and out.last_hidden_layer.num_tokens == 1
    assert len(out.last_hidden_layer.hidden_states) == model.n_embd


@pytest.fixture
async def cpu_client(tmp_path: Path) -> AsyncIterator[Client]:
    require_cpu_runtime()
    settings = Settings(runtime="cpu", models=(str(tmp_path),), cache_dir=str(tmp_path))
    async with Client(build_server(settings)) as c:
        yield c


@pytest.mark.cpu
@pytest.mark.slow  # four runs over 300 tokens
@pytest.mark.anyio
async def test_rkllm_run_logits_of_a_300_token_prompt_is_refused_then_asked_for_less(cpu_client: Client) -> None:
    path = bundled_model()
    assert path is not None
    h = (await call(cpu_client, "rkllm_init", {"param": {"model_path": str(path), "max_context_len": 1024}}))["handle"]
    prompt = " ".join(["word"] * 300)
    args = {"handle": h, "rkllm_input": {"prompt_input": prompt},
            "rkllm_infer_params": {"mode": "RKLLM_INFER_GET_LOGITS"}}
    error = await fail(cpu_client, "rkllm_run", args)
    assert error["code"] == "LIMIT_EXCEEDED" and error["details"]["max_output_rows"] == 21
    assert "output_rows=21 or fewer" in error["message"] and "over the limit of 1048576" in error["message"]
    last = await call(cpu_client, "rkllm_run", {**args, "output_rows": 1})
    assert last["logits"]["num_tokens"] == 1 and len(last["logits"]["logits"]) == 49152
    assert last["perf"]["prefill_tokens"] > 300
    hidden = await call(cpu_client, "rkllm_run", {**args, "rkllm_infer_params": {
        "mode": "RKLLM_INFER_GET_LAST_HIDDEN_LAYER"}})  # 576 floats a row: every row fits
    assert hidden["last_hidden_layer"]["num_tokens"] == last["perf"]["prefill_tokens"]
    embedded = await call(cpu_client, "embed", {"text": prompt, "handle": h})  # internal rows are not capped
    assert embedded["dim"] == 576 and embedded["tokens"] == 300


# ----------------------------------------------------------------------------- the NPU runtime (fake)


@pytest.fixture(params=[pytest.param("process", marks=pytest.mark.slow), "none"])
async def fake_client(request: pytest.FixtureRequest, fake_path: Path, fake: FakeView,
                      tmp_path: Path) -> AsyncIterator[Client]:
    settings = Settings(library=str(fake_path), isolation=str(request.param), models=(str(tmp_path),),
                        cache_dir=str(tmp_path), max_output_floats=64)
    async with Client(build_server(settings)) as c:
        yield c


@pytest.mark.parametrize("abi", ["1.3.0"])
@pytest.mark.anyio
async def test_native_outputs_are_bounded_and_cut(fake_client: Client, model_file: Path) -> None:
    c = fake_client
    h = (await call(c, "rkllm_init", {"param": {"model_path": str(model_file)}}))["handle"]
    ids = {"token_input": {"input_ids": list(range(10))}}
    logits = {"handle": h, "rkllm_input": ids, "rkllm_infer_params": {"mode": "RKLLM_INFER_GET_LOGITS"}}
    error = await fail(c, "rkllm_run", logits)  # 10 rows x 16 = 160 floats
    assert error["code"] == "LIMIT_EXCEEDED" and error["details"] == {
        "value": 160, "limit": 64, "rows": 10, "width": 16, "max_output_rows": 4, "what": error["details"]["what"]}
    assert "output_rows=4 or fewer" in error["message"]
    cut = await call(c, "rkllm_run", {**logits, "output_rows": 2})
    assert cut["logits"]["num_tokens"] == 2 and cut["logits"]["vocab_size"] == 16
    # The fake's row t is t + j/100 + 0.5: the last two rows are rows 8 and 9.
    assert cut["logits"]["logits"][0] == pytest.approx(8.5) and cut["logits"]["logits"][16] == pytest.approx(9.5)
    hidden = await call(c, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "a b c d e"},
                                         "rkllm_infer_params": {"mode": "RKLLM_INFER_GET_LAST_HIDDEN_LAYER"}})
    assert hidden["last_hidden_layer"]["num_tokens"] == 5  # 40 floats: under the bound, whole
    await call(c, "rkllm_run_async", logits)
    report = await call(c, "rkllm_run_async_result", {"handle": h, "wait_seconds": 10})
    assert report["done"] and report["result"]["finish_reason"] == "error"
    assert report["result"]["logits"] is None and "output_rows=4" in report["result"]["error"]
    again = await call(c, "rkllm_run", {"handle": h, "rkllm_input": {"prompt_input": "still here"}})
    assert again["text"]  # the handle is fine afterwards
