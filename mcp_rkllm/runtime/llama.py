"""LlamaCppRuntime: the CPU runtime. RKLLM semantics on llama-cpp-python, for GGUF models.

It speaks the RKLLM 1.3.0 struct vocabulary (every field is accepted) and maps it onto
llama.cpp: the sampling fields build a llama.cpp sampler chain, keep_history keeps the
conversation in the KV cache (re-rendered through the model's chat template each turn, with the
common token prefix reused), prompt caches are llama.cpp state files, LoRA adapters are GGUF
adapters, hidden states and logits come from the context's outputs, perf stats are measured.
What llama.cpp cannot do here (multimodal input, cross-attention, multi-batch) is NOT_SUPPORTED.

Every call that touches the llama.cpp context runs on one persistent thread per model: llama.cpp
with OpenMP slows down 3-5x when decodes come from different threads. rkllm_abort sets a byte
that llama.cpp polls inside decode (GIL-free), so it interrupts even a long prefill.

llama.cpp answers some bad input with GGML_ASSERT, which aborts the whole process (the server too,
in-process). So nothing a client sends reaches it unchecked: every batch is at most N_BATCH rows,
every position fits the context, every token id is in the vocabulary, sampling only happens with
logits present, and paths are plain strings; each violation is a structured error instead.
Hidden states and logits honour the run collector's `OutputLimit`: only the rows asked for are
computed and copied, and the size is checked before anything is decoded.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import ctypes
import json
import os
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.events import (
    AsyncRun,
    EventSink,
    Finish,
    Hidden,
    Logits,
    OutputLimit,
    RunCollector,
    RunEvent,
    Token,
    Waiting,
    collector_for,
)
from mcp_rkllm.runtime.base import effective_max_new_tokens, process_memory_mb
from mcp_rkllm.structs import (
    RKLLMCrossAttnParam,
    RKLLMExtendParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMParam,
    RKLLMPerfStat,
    RKLLMSamplingParam,
    RunResult,
    overlay_param,
)

#: llama.cpp rounds n_ctx up to a multiple of this; request multiples so positions are not dropped.
CTX_GRANULE = 256
#: Tokens decoded per llama_decode call during prefill.
N_BATCH = 512
#: How many recent tokens the repeat/frequency/presence penalties look at.
PENALTY_LAST_N = 64

TOOLS_SYSTEM_TEMPLATE = (
    "{system}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


def _llama() -> Any:
    """The llama_cpp module, imported on first use (it is the optional `cpu` extra)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RkllmError("RUNTIME_UNAVAILABLE", detail="the CPU runtime needs llama-cpp-python: "
                         "pip install 'mcp-rkllm[cpu]'") from exc
    return llama_cpp


#: The one log callback given to llama.cpp, alive as long as the process: llama.cpp keeps the pointer,
#: so a callback freed with its runtime object would be called after it is gone (a segfault).
_LOG_CALLBACK: list[Any] = []


def _silence(L: Any) -> None:
    """Send llama.cpp's own logging nowhere (it would go to stderr anyway, never to stdout)."""
    if not _LOG_CALLBACK:
        _LOG_CALLBACK.append(L.llama_log_callback(lambda level, text, data: None))
        L.llama_log_set(_LOG_CALLBACK[0], ctypes.c_void_p(0))


def _round_ctx(n: int) -> int:
    return max(CTX_GRANULE, -(-n // CTX_GRANULE) * CTX_GRANULE)


def _c_path(path: str, function: str) -> bytes:
    """`path` as the C string llama.cpp gets; a NUL would silently cut it short (another file)."""
    if "\x00" in path:
        raise RkllmError("INVALID_PARAMS", function=function, detail="paths must not contain NUL characters")
    return path.encode()


class LlamaCppRuntime:
    """The Runtime protocol on llama-cpp-python."""

    name = "cpu"
    abi = "1.3.0"
    assigns_npu_domains = False

    def __init__(self, n_threads: int | None = None):
        self.L = _llama()
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        _silence(self.L)

    def describe(self) -> dict[str, object]:
        """Runtime name, backend and version."""
        from importlib.metadata import version

        return {"runtime": self.name, "backend": "llama.cpp (llama-cpp-python)",
                "llama_cpp_python": version("llama-cpp-python"), "abi": self.abi,
                "abi_source": "the CPU runtime accepts the RKLLM 1.3.0 struct vocabulary",
                "threads": self.n_threads}

    def create_default_param(self) -> RKLLMParam:
        """RKLLM's documented defaults, with a context and token limit sized for small CPU models."""
        return RKLLMParam(
            model_path=None, max_context_len=2048, max_new_tokens=256, top_k=40, n_keep=-1, top_p=0.9,
            temperature=0.8, repeat_penalty=1.1, frequency_penalty=0.0, presence_penalty=0.0, mirostat=0,
            mirostat_tau=5.0, mirostat_eta=0.1, skip_special_token=True, ignore_eos_token=False, is_async=False,
            extend_param=RKLLMExtendParam(base_domain_id=0, embed_flash=0, enabled_cpus_num=self.n_threads,
                                          enabled_cpus_mask=0, n_batch=1, use_cross_attn=0),
        )

    def init(self, param: RKLLMParam) -> LlamaModel:
        """Load a GGUF model with `param` overlaid on create_default_param()."""
        merged = overlay_param(self.create_default_param(), param)
        path = merged.model_path
        if not path:
            raise RkllmError("INVALID_PARAMS", function="rkllm_init", detail="param.model_path is required")
        ext = merged.extend_param or RKLLMExtendParam()
        if (ext.n_batch or 1) > 1:
            raise RkllmError("NOT_SUPPORTED", function="rkllm_init", what="n_batch > 1", detail=" by the CPU runtime")
        if ext.use_cross_attn:
            raise RkllmError("NOT_SUPPORTED", function="rkllm_init", what="cross-attention",
                             detail=" by the CPU runtime")
        if not Path(path).is_file():
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_init", rc=-1, detail=f": {path} is not a file")
        if not path.endswith(".gguf"):
            raise RkllmError("NOT_SUPPORTED", function="rkllm_init", what=f"the model file {Path(path).name}",
                             detail=" by the CPU runtime, which loads .gguf models (.rkllm needs the NPU runtime)")
        return LlamaModel(self, merged)


@dataclass
class _Lora:
    pointer: Any
    scale: float


class LlamaModel:
    """One loaded GGUF model: the LoadedModel protocol, every context call on one thread."""

    def __init__(self, runtime: LlamaCppRuntime, param: RKLLMParam):
        self.runtime = runtime
        self.L = runtime.L
        self.param = param
        self.max_new_tokens = int(param.max_new_tokens or 256)
        self.n_batch = 1
        self._seed: int | None = None
        """The seed seed_next_run gave, taken by the next run (None: a random one per run)."""
        self._run_seed: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._running = False
        self._abort_flag = ctypes.create_string_buffer(2)  # byte 0 != 0 -> llama.cpp aborts the decode
        self._aborted = False
        self.tokens: list[int] = []  # what the KV cache holds, position by position (-1 = embedding)
        self.kv_logical = 0  # RKLLM's view: what keep_history kept
        self.system_tokens = 0
        self.history: list[dict[str, str]] = []
        self.template: tuple[str, str, str] | None = None
        self.tools: tuple[str, str, str] | None = None
        self.loras: dict[str, _Lora] = {}
        self._active_lora: str | None = None
        self._closed = False
        self._submit(self._load).result()

    # ----------------------------------------------------------------- thread plumbing

    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        if self._closed:
            raise RkllmError("UNKNOWN_HANDLE", handle="(destroyed)")
        return self._executor.submit(fn, *args)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._submit(fn, *args).result()

    def _load(self) -> None:
        from llama_cpp import Llama

        p = self.param
        ext = p.extend_param or RKLLMExtendParam()
        threads = int(ext.enabled_cpus_num or self.runtime.n_threads)
        self.n_ctx_requested = _round_ctx(int(p.max_context_len or 2048))
        try:
            self.llm = Llama(model_path=str(p.model_path), n_ctx=self.n_ctx_requested, n_batch=N_BATCH,
                             n_threads=threads, n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_init", rc=-1, detail=f": {exc}") from exc
        L = self.L
        self.ctx = self.llm.ctx
        self.vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
        self.n_embd = self.llm.n_embd()
        self.n_ctx = self.llm.n_ctx()
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(N_BATCH, 0, 1)
        self._libc = ctypes.CDLL(None)
        # GIL-free abort: llama.cpp calls strlen(flag) inside decode; non-zero means abort.
        self._abort_cb = ctypes.cast(self._libc.strlen, L.ggml_abort_callback)
        L.llama_set_abort_callback(self.ctx, self._abort_cb, ctypes.cast(self._abort_flag, ctypes.c_void_p))
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")
        self.eog = [t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t)][:16]

    # ----------------------------------------------------------------- decoding (model thread)

    def _decode_tokens(self, tokens: Sequence[int], n_past: int, outputs_from: int | None = None) -> None:
        """Decode `tokens` at `n_past`; outputs for the last one, and for every one from index `outputs_from` on.

        Raises on abort. The caller keeps within N_BATCH and the context; the ids are checked here
        because llama.cpp would otherwise read past its tables.
        """
        L = self.L
        b = self.batch
        n = len(tokens)
        if not 0 < n <= N_BATCH or n_past + n > self.n_ctx:
            raise RkllmError("INTERNAL", function="rkllm_run", detail=f"a batch of {n} tokens at position "
                             f"{n_past} (n_batch {N_BATCH}, n_ctx {self.n_ctx})")
        first = n if outputs_from is None else outputs_from
        n_vocab = self.n_vocab
        b.n_tokens = n
        for i, t in enumerate(tokens):
            if not 0 <= t < n_vocab:
                raise RkllmError("INVALID_PARAMS", function="rkllm_run",
                                 detail=f"token id {t} is outside the vocabulary (0..{n_vocab - 1})")
            b.token[i] = t
            b.pos[i] = n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= first
        b.logits[n - 1] = True
        rc = L.llama_decode(self.ctx, b)
        if rc == 2:
            raise _Aborted()
        if rc != 0:
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=rc,
                             detail=f": llama_decode failed (context of {self.n_ctx} tokens full?)")

    def _decode_embeddings(self, embed: Sequence[float], n_tokens: int) -> None:
        """Decode `n_tokens` embedding rows after what the cache holds, N_BATCH rows per llama_decode
        (llama.cpp aborts the process on a bigger batch); logits for the last row."""
        L = self.L
        width = self.n_embd
        data = array("f", embed)
        be = L.llama_batch_init(N_BATCH, width, 1)
        try:
            for start in range(0, n_tokens, N_BATCH):
                n = min(N_BATCH, n_tokens - start)
                n_past = len(self.tokens)
                be.n_tokens = n
                ctypes.memmove(be.embd, data.buffer_info()[0] + start * width * 4, n * width * 4)
                for i in range(n):
                    be.pos[i] = n_past + i
                    be.n_seq_id[i] = 1
                    be.seq_id[i][0] = 0
                    be.logits[i] = start + i == n_tokens - 1
                rc = L.llama_decode(self.ctx, be)
                if rc == 2:
                    raise _Aborted()
                if rc != 0:
                    raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=rc,
                                     detail=": llama_decode of embeddings")
                self.tokens.extend([-1] * n)
        finally:
            L.llama_batch_free(be)

    def _truncate(self, n: int) -> None:
        """Drop KV positions from n on."""
        if n < len(self.tokens):
            self.L.llama_memory_seq_rm(self.mem, 0, n, -1)
            del self.tokens[n:]

    def _feed(self, target: list[int], reuse: bool = True, kept: int = 0) -> int:
        """Make the KV cache hold `target`, decoding only what differs from what it holds.

        Returns how many tokens were decoded. The last token is always decoded so logits exist.
        """
        if not target:
            raise RkllmError("INVALID_PARAMS", function="rkllm_run",
                             detail="the input is empty: it gives no token to run (with this chat template)")
        self._fits(len(target), "the input (in tokens)", kept)
        common = 0
        if reuse:
            limit = min(len(target), len(self.tokens))
            while common < limit and self.tokens[common] == target[common]:
                common += 1
            common = min(common, len(target) - 1)
        self._truncate(common)
        fresh = target[common:]
        for start in range(0, len(fresh), N_BATCH):
            chunk = fresh[start:start + N_BATCH]
            self._decode_tokens(chunk, len(self.tokens))
            self.tokens.extend(chunk)
        return len(fresh)

    def _fits(self, n: int, what: str, kept: int) -> None:
        """LIMIT_EXCEEDED unless `n` positions (`kept` of them history) fit the context."""
        if n > self.n_ctx:
            with_history = f" with the {kept} kept from earlier turns" if kept else ""
            raise RkllmError("LIMIT_EXCEEDED", function="rkllm_run", what=f"{what}{with_history}",
                             value=n, limit=self.n_ctx, context_len=self.n_ctx)

    # ----------------------------------------------------------------- prompts

    def _render(self, messages: list[dict[str, str]]) -> str:
        if not self.chat_template:
            return "".join(m["content"] for m in messages)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template=self.chat_template, eos_token="", bos_token="",
                                  add_generation_prompt=True)
        try:
            return str(fmt(messages=messages).prompt)  # type: ignore[arg-type]
        except Exception as exc:  # the model's template refuses the conversation (raise_exception, ...)
            raise RkllmError("INVALID_PARAMS", function="rkllm_run",
                             detail=f"the model's chat template refused the conversation: {exc}") from exc

    def _tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=self.llm._model.add_bos_token(), special=True))

    def _prompt_tokens(self, inp: RKLLMInput, keep_history: bool) -> tuple[list[int], dict[str, str] | None]:
        """The whole token sequence this run's KV cache must hold, and the user message to remember."""
        assert inp.prompt_input is not None
        text = inp.prompt_input
        tag = self.tools[2] if self.tools else "tool_response"
        content = f"<{tag}>\n{text}\n</{tag}>" if inp.role == "tool" else text
        message = {"role": "user", "content": content}
        kept = self.tokens[:self.kv_logical] if keep_history else []
        if self.template is not None:  # rkllm_set_chat_template: raw system + prefix + prompt + postfix
            system, prefix, postfix = self.template
            if self.tools is not None:  # the tool list goes right after the raw system prompt
                system += TOOLS_SYSTEM_TEMPLATE.format(system=self.tools[0], tools=self.tools[1]) + "\n"
            head = system if not kept else ""
            return kept + self._tokenize(head + prefix + content + postfix), message
        messages = []
        if self.tools is not None:
            system, tools, _ = self.tools
            messages.append({"role": "system", "content": TOOLS_SYSTEM_TEMPLATE.format(system=system, tools=tools)})
        if keep_history:
            messages.extend(self.history)
        messages.append(message)
        return self._tokenize(self._render(messages)), message

    def _system_prefix_tokens(self) -> int:
        """How many leading tokens are the system prompt (what keep_system_prompt keeps)."""
        if self.template is not None:
            system = self.template[0]
            if self.tools is not None:
                system += TOOLS_SYSTEM_TEMPLATE.format(system=self.tools[0], tools=self.tools[1]) + "\n"
            return len(self._tokenize(system)) if system else 0
        if self.tools is not None:
            probe = self._render([{"role": "system", "content": TOOLS_SYSTEM_TEMPLATE.format(
                system=self.tools[0], tools=self.tools[1])}])
            return max(0, len(self._tokenize(probe)) - 3)
        return 0

    # ----------------------------------------------------------------- sampling

    def _sampler(self, s: RKLLMSamplingParam) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:  # the chain takes ownership of each sampler
            L.llama_sampler_chain_add(chain, sampler)

        if self.param.ignore_eos_token and self.eog:
            bias = (L.llama_logit_bias * len(self.eog))()
            for i, t in enumerate(self.eog):
                bias[i].token, bias[i].bias = t, float("-inf")
            add(L.llama_sampler_init_logit_bias(self.n_vocab, len(self.eog), bias))
        add(L.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty,
                                           s.presence_penalty))
        seed = self._run_seed if self._run_seed is not None else int.from_bytes(os.urandom(4), "little")
        if s.temperature <= 0:
            add(L.llama_sampler_init_greedy())
        elif s.mirostat == 1:
            add(L.llama_sampler_init_temp(s.temperature))
            add(L.llama_sampler_init_mirostat(self.n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
        elif s.mirostat == 2:
            add(L.llama_sampler_init_temp(s.temperature))
            add(L.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
        else:
            if s.top_k > 0:
                add(L.llama_sampler_init_top_k(s.top_k))
            add(L.llama_sampler_init_top_p(s.top_p, 1))
            add(L.llama_sampler_init_temp(s.temperature))
            add(L.llama_sampler_init_dist(seed))
        return chain

    def _sampling(self, infer: RKLLMInferParam) -> RKLLMSamplingParam:
        if infer.sampling_params is not None:
            return infer.sampling_params
        p = self.param
        return RKLLMSamplingParam(
            top_k=p.top_k if p.top_k is not None else 40, top_p=p.top_p if p.top_p is not None else 0.9,
            temperature=p.temperature if p.temperature is not None else 0.8,
            repeat_penalty=p.repeat_penalty if p.repeat_penalty is not None else 1.1,
            frequency_penalty=p.frequency_penalty or 0.0, presence_penalty=p.presence_penalty or 0.0,
            mirostat=p.mirostat or 0, mirostat_tau=p.mirostat_tau if p.mirostat_tau is not None else 5.0,
            mirostat_eta=p.mirostat_eta if p.mirostat_eta is not None else 0.1)

    def _shift_context(self) -> bool:
        """RKLLM-style context shift: keep n_keep tokens, drop half of the rest. False if impossible."""
        L = self.L
        if not L.llama_memory_can_shift(self.mem):
            return False
        n_past = len(self.tokens)
        n_keep = self.param.n_keep if self.param.n_keep is not None and self.param.n_keep >= 0 else self.system_tokens
        n_keep = min(n_keep, n_past - 2)
        n_discard = (n_past - n_keep) // 2
        if n_discard <= 0:
            return False
        L.llama_memory_seq_rm(self.mem, 0, n_keep, n_keep + n_discard)
        L.llama_memory_seq_add(self.mem, 0, n_keep + n_discard, n_past, -n_discard)
        del self.tokens[n_keep:n_keep + n_discard]
        return True

    # ----------------------------------------------------------------- the run (model thread)

    def _run(self, inp: RKLLMInput, infer: RKLLMInferParam, sink: EventSink) -> RunResult:
        collector = collector_for(sink, effective_max_new_tokens(self, infer))
        emit = collector.add

        # The abort byte is cleared after each run, not here: an abort that lands while this run is
        # still queued must stop it.
        self._aborted = False
        keep = bool(infer.keep_history)
        mode = infer.mode
        self._select_lora(infer)
        started = time.perf_counter()
        prefill_tokens = 0
        try:
            message = None
            if inp.input_type == RKLLMInputType.RKLLM_INPUT_PROMPT:
                target, message = self._prompt_tokens(inp, keep)
            elif inp.input_type == RKLLMInputType.RKLLM_INPUT_TOKEN:
                assert inp.token_input is not None
                bad = [t for t in inp.token_input.input_ids if not 0 <= t < self.n_vocab]
                if bad:
                    raise RkllmError("INVALID_PARAMS", function="rkllm_run",
                                     detail=f"token ids {bad[:5]} are outside the vocabulary (0..{self.n_vocab - 1})")
                target = (self.tokens[:self.kv_logical] if keep else []) + list(inp.token_input.input_ids)
            elif inp.input_type == RKLLMInputType.RKLLM_INPUT_EMBED:
                target = []
            else:
                raise RkllmError("NOT_SUPPORTED", function="rkllm_run", what="multimodal input",
                                 detail=" by the CPU runtime")

            if mode != RKLLMInferMode.RKLLM_INFER_GENERATE:
                prefill_tokens = self._outputs(inp, target, keep, mode, emit, collector.output)
            else:
                if inp.input_type == RKLLMInputType.RKLLM_INPUT_EMBED:
                    prefill_tokens = self._feed_embeddings(inp, keep)
                else:
                    prefill_tokens = self._feed(target, kept=min(self.kv_logical, len(target)) if keep else 0)
                    self._save_cache(infer, target)
                prefill_ms = (time.perf_counter() - started) * 1000
                gen_started = time.perf_counter()
                generated = self._generate(infer, emit, collector)
                if keep and message is not None:
                    self.history += [message, {"role": "assistant", "content": "".join(collector.pieces)}]
                elif not keep:
                    self.history = []
                self.kv_logical = len(self.tokens) if keep else 0
                perf = RKLLMPerfStat(prefill_time_ms=prefill_ms, prefill_tokens=prefill_tokens,
                                     generate_time_ms=(time.perf_counter() - gen_started) * 1000,
                                     generate_tokens=generated, memory_usage_mb=process_memory_mb())
                if not self._aborted:
                    emit(Finish(perf))
                collector.perf = perf
        except _Aborted:
            self._aborted = True
            self._truncate(self._kv_valid())
        return collector.result(aborted=self._aborted)

    def _kv_valid(self) -> int:
        """Positions the KV cache really holds after an interrupted decode."""
        return min(len(self.tokens), int(self.L.llama_memory_seq_pos_max(self.mem, 0)) + 1)

    def _generate(self, infer: RKLLMInferParam, emit: Callable[[RunEvent], None], collector: RunCollector) -> int:
        L = self.L
        limit = effective_max_new_tokens(self, infer)
        chain = self._sampler(self._sampling(infer))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # models can emit invalid UTF-8
        buf = ctypes.create_string_buffer(256)
        special = not (self.param.skip_special_token if self.param.skip_special_token is not None else True)
        generated = 0
        try:
            while generated < limit:
                if self._abort_flag[0] != b"\x00":
                    raise _Aborted()
                if not L.llama_get_logits_ith(self.ctx, -1):  # sampling would GGML_ASSERT (abort)
                    raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=-1,
                                     detail=": no logits to sample from (nothing was decoded)")
                tok = L.llama_sampler_sample(chain, self.ctx, -1)
                if L.llama_vocab_is_eog(self.vocab, tok) and not self.param.ignore_eos_token:
                    break
                n = L.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
                text = decoder.decode(buf.raw[:max(n, 0)])
                generated += 1
                emit(Token(text, tok) if text else Waiting(tok))
                if generated >= limit:
                    break  # the last token is not decoded, as with EOS: the next turn starts from it
                if len(self.tokens) + 1 >= self.n_ctx and not self._shift_context():
                    break
                self._decode_tokens([tok], len(self.tokens))
                self.tokens.append(tok)
        finally:
            L.llama_sampler_free(chain)
        return generated

    def _outputs(self, inp: RKLLMInput, target: list[int], keep: bool, mode: RKLLMInferMode,
                 emit: Callable[[RunEvent], None], limit: OutputLimit | None) -> int:
        """GET_LAST_HIDDEN_LAYER / GET_LOGITS: one row per input token, or the last `limit.rows`.

        Only the rows asked for are computed and copied, and `limit` is checked before anything is
        decoded (a 300-token prompt's logits are 59 MB of float32 on a 49k vocabulary).
        """
        L = self.L
        hidden = mode == RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER
        if inp.input_type == RKLLMInputType.RKLLM_INPUT_EMBED:
            raise RkllmError("NOT_SUPPORTED", function="rkllm_run",
                             what="embedding input in hidden-state or logits mode", detail=" by the CPU runtime")
        if not target:
            raise RkllmError("INVALID_PARAMS", function="rkllm_run",
                             detail="the input is empty: it gives no token to run (with this chat template)")
        start = self.kv_logical if keep else 0
        fresh = target[start:] if keep else target
        width = self.n_embd if hidden else self.n_vocab
        wanted = len(fresh) if limit is None else limit.kept(len(fresh))
        if limit is not None:
            limit.check("hidden-state" if hidden else "logits", len(fresh), width)
        kept = min(start, len(self.tokens))
        self._fits(kept + len(fresh), "the input (in tokens)", kept)
        self._truncate(start)
        first = len(fresh) - wanted  # index in `fresh` of the first row returned
        rows = array("f")
        if hidden:
            L.llama_set_embeddings(self.ctx, True)
        try:
            for s in range(0, len(fresh), N_BATCH):
                chunk = fresh[s:s + N_BATCH]
                lo = max(first - s, 0)
                self._decode_tokens(chunk, len(self.tokens), outputs_from=lo)
                self.tokens.extend(chunk)
                for i in range(lo, len(chunk)):
                    ptr = L.llama_get_embeddings_ith(self.ctx, i) if hidden else L.llama_get_logits_ith(self.ctx, i)
                    if not ptr:  # e.g. a pooled embedding model: reading it would be a NULL dereference
                        raise RkllmError("NOT_SUPPORTED", function="rkllm_run",
                                         what="hidden states" if hidden else "logits",
                                         detail=" per token by this model in the CPU runtime")
                    rows.frombytes(ctypes.string_at(ptr, width * 4))
        finally:
            if hidden:
                L.llama_set_embeddings(self.ctx, False)
        n = len(rows) // width
        emit(Hidden(rows, width, n) if hidden else Logits(rows, width, n))
        self.kv_logical = len(self.tokens) if keep else 0
        emit(Finish(RKLLMPerfStat(prefill_tokens=len(fresh), memory_usage_mb=process_memory_mb())))
        return len(fresh)

    def _feed_embeddings(self, inp: RKLLMInput, keep: bool) -> int:
        assert inp.embed_input is not None
        e = inp.embed_input
        if len(e.embed) != e.n_tokens * self.n_embd:
            raise RkllmError("INVALID_PARAMS", function="rkllm_run",
                             detail=f"embed_input needs n_tokens x {self.n_embd} floats for this model, "
                                    f"got {len(e.embed)} for {e.n_tokens} tokens")
        start = min(self.kv_logical, len(self.tokens)) if keep else 0
        self._fits(start + e.n_tokens, "embed_input.n_tokens", start)
        self._truncate(start)
        self._decode_embeddings(e.embed, e.n_tokens)
        return e.n_tokens

    def _save_cache(self, infer: RKLLMInferParam, target: list[int]) -> None:
        p = infer.prompt_cache_params
        if p is None or not p.save_prompt_cache:
            return
        path = p.prompt_cache_path or "./prompt_cache.bin"
        arr = (self.L.llama_token * len(target))(*target)
        if not self.L.llama_state_save_file(self.ctx, _c_path(path, "rkllm_run"), arr, len(target)):
            raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=-1,
                             detail=f": could not save the prompt cache to {path}")

    def _select_lora(self, infer: RKLLMInferParam) -> None:
        L = self.L
        name = infer.lora_params.lora_adapter_name if infer.lora_params else None
        if name == self._active_lora:
            return
        if name is None:
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            lora = self.loras.get(name)
            if lora is None:
                raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=-1,
                                 detail=f": no LoRA adapter named {name!r} is loaded")
            arr = (L.llama_adapter_lora_p_ctypes * 1)(lora.pointer)
            scales = (ctypes.c_float * 1)(lora.scale)
            if L.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_run", rc=-1, detail=": applying the LoRA")
        # The KV cache was computed without (or with another) adapter: it no longer matches.
        self._truncate(0)
        self.kv_logical = 0
        self._active_lora = name

    # ----------------------------------------------------------------- LoadedModel

    def run(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> RunResult:
        """rkllm_run on the model's thread; blocks until it ends."""
        future = self._submit(self._guarded_run, rkllm_input, rkllm_infer_params, sink)
        return future.result()  # type: ignore[no-any-return]

    def seed_next_run(self, seed: int) -> None:
        """The next run samples with `seed` (the same seed, input and options give the same tokens)."""
        self._seed = seed

    def _guarded_run(self, inp: RKLLMInput, infer: RKLLMInferParam, sink: EventSink) -> RunResult:
        self._run_seed, self._seed = self._seed, None  # one run's, even if it fails before sampling
        self._running = True
        try:
            return self._run(inp, infer, sink)
        finally:
            self._running = False  # first, so an abort() from now on is a no-op ...
            self._abort_flag[0] = b"\x00"  # ... and a late one cannot hit the next run

    def run_async(self, rkllm_input: RKLLMInput, rkllm_infer_params: RKLLMInferParam, sink: EventSink) -> AsyncRun:
        """rkllm_run_async: queued on the model's thread, returns at once."""
        run = AsyncRun(collector_for(sink, effective_max_new_tokens(self, rkllm_infer_params)))
        self._running = True  # running from the caller's point of view as soon as it is queued
        future = self._submit(self._guarded_run, rkllm_input, rkllm_infer_params, run.collector)

        def done(f: concurrent.futures.Future[RunResult]) -> None:
            exc = f.exception()
            run.finish(f.result() if exc is None else RunResult(finish_reason="error", error=str(exc)))

        future.add_done_callback(done)
        return run

    def abort(self) -> None:
        """Interrupt the current decode (even mid-prefill) and stop generating."""
        if self._running:
            self._abort_flag[0] = b"\x01"

    def is_running(self) -> bool:
        """Whether a run is in progress."""
        return self._running

    def clear_kv_cache(self, keep_system_prompt: int, start_pos: list[int] | None = None,
                       end_pos: list[int] | None = None) -> None:
        """Forget the conversation; keep_system_prompt=1 keeps the system prompt's positions."""
        def clear() -> None:
            if start_pos is not None or end_pos is not None:
                if start_pos is None or end_pos is None or len(start_pos) != 1 or len(end_pos) != 1:
                    raise RkllmError("INVALID_PARAMS", function="rkllm_clear_kv_cache",
                                     detail="start_pos and end_pos need one entry each (n_batch = 1)")
                s, e = start_pos[0], min(end_pos[0], len(self.tokens))
                if not 0 <= s < e:
                    raise RkllmError("INVALID_PARAMS", function="rkllm_clear_kv_cache",
                                     detail=f"need 0 <= start_pos < end_pos <= {len(self.tokens)}")
                self.L.llama_memory_seq_rm(self.mem, 0, s, e)
                self.L.llama_memory_seq_add(self.mem, 0, e, len(self.tokens), s - e)
                del self.tokens[s:e]
                self.kv_logical = min(self.kv_logical, len(self.tokens))
                self.history = []
                return
            keep = self._system_prefix_tokens() if keep_system_prompt else 0
            self._truncate(min(keep, len(self.tokens)))
            self.kv_logical = min(keep, len(self.tokens))
            self.history = []

        self._call(clear)

    def get_kv_cache_size(self) -> list[int]:
        """Positions the conversation holds in the KV cache (0 after a keep_history=0 run)."""
        return [self.kv_logical]

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """Use raw system/prefix/postfix strings instead of the GGUF's chat template."""
        def apply() -> None:
            self.template = (system_prompt, prompt_prefix, prompt_postfix)
            self.system_tokens = self._system_prefix_tokens()

        self._call(apply)

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """Describe `tools` in the system prompt the way Qwen/Hermes-style templates do."""
        try:
            rendered = "\n".join(json.dumps(t, ensure_ascii=False) for t in json.loads(tools))
        except (json.JSONDecodeError, TypeError) as exc:
            raise RkllmError("INVALID_PARAMS", function="rkllm_set_function_tools",
                             detail=f"tools must be a JSON array: {exc}") from exc

        def apply() -> None:  # an empty list takes the tools back
            self.tools = (system_prompt, rendered, tool_response_str or "tool_response") if rendered else None
            self.system_tokens = self._system_prefix_tokens()

        self._call(apply)

    def prime_history(self, messages: list[dict[str, str]]) -> None:
        """Make `messages` the conversation the next keep_history run continues (for the chat tool).

        The next run renders them with the chat template and reuses whatever prefix the KV cache holds.
        """
        tag = self.tools[2] if self.tools else "tool_response"

        def prime() -> None:
            self.history = [{"role": "user", "content": f"<{tag}>\n{m['content']}\n</{tag}>"}
                            if m["role"] == "tool" else dict(m) for m in messages]
            self.kv_logical = 0

        self._call(prime)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of raw `text` (no chat template), for embeddings."""
        return self._call(lambda: list(self.llm.tokenize(text.encode("utf-8"), add_bos=False,  # type: ignore[no-any-return]
                                                         special=False)))

    def set_cross_attn_params(self, cross_attn_params: RKLLMCrossAttnParam) -> None:
        """Not available on llama.cpp."""
        raise RkllmError("NOT_SUPPORTED", function="rkllm_set_cross_attn_params", what="cross-attention",
                         detail=" by the CPU runtime")

    def load_lora(self, lora_adapter: RKLLMLoraAdapter) -> None:
        """Load a GGUF LoRA adapter; runs select it by name."""
        def load() -> None:
            L = self.L
            pointer = L.llama_adapter_lora_init(self.llm.model, _c_path(lora_adapter.lora_adapter_path,
                                                                         "rkllm_load_lora"))
            if not pointer:  # a failure is a NULL pointer, not None
                raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_load_lora", rc=-1,
                                 detail=f": {lora_adapter.lora_adapter_path} is not a GGUF LoRA for this model")
            old = self.loras.pop(lora_adapter.lora_adapter_name, None)
            if old is not None:
                L.llama_adapter_lora_free(old.pointer)
            self.loras[lora_adapter.lora_adapter_name] = _Lora(pointer, lora_adapter.scale)
            if self._active_lora == lora_adapter.lora_adapter_name:
                self._active_lora = "(reload)"

        self._call(load)

    def load_prompt_cache(self, prompt_cache_path: str) -> None:
        """Load a state file saved by a run with prompt_cache_params; the next run reuses its prefix."""
        def load() -> None:
            L = self.L
            cap = self.n_ctx
            out = (L.llama_token * cap)()
            count = ctypes.c_size_t()
            path = _c_path(prompt_cache_path, "rkllm_load_prompt_cache")
            self._truncate(0)
            self.kv_logical = 0
            self.history = []
            loaded = Path(prompt_cache_path).is_file() and L.llama_state_load_file(
                self.ctx, path, out, cap, ctypes.byref(count))
            # A file with token ids outside the vocabulary is corrupt, whatever llama.cpp thought of it.
            if not loaded or not all(0 <= t < self.n_vocab for t in out[:count.value]):
                self.L.llama_memory_clear(self.mem, True)
                raise RkllmError("RKLLM_CALL_FAILED", function="rkllm_load_prompt_cache", rc=-1,
                                 detail=f": {prompt_cache_path} is not a prompt cache of this model")
            n = count.value
            # Logits are not restored: drop the last position so the next run re-decodes it.
            L.llama_memory_seq_rm(self.mem, 0, max(n - 1, 0), -1)
            self.tokens = list(out[:max(n - 1, 0)])
            self.kv_logical = 0

        self._call(load)

    def release_prompt_cache(self) -> None:
        """Forget the loaded prompt cache (the KV positions it filled)."""
        def release() -> None:
            self._truncate(self.kv_logical)

        self._call(release)

    def destroy(self) -> None:
        """Abort, wait for the model's thread, free the model. Idempotent."""
        if self._closed:
            return
        self.abort()

        def close() -> None:
            for lora in self.loras.values():
                self.L.llama_adapter_lora_free(lora.pointer)
            self.loras.clear()
            self.L.llama_batch_free(self.batch)
            self.llm.close()

        try:
            self._call(close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)


class _Aborted(Exception):
    """rkllm_abort interrupted the run."""
