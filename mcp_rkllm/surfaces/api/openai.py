"""The OpenAI-compatible API under `/v1`: models, chat completions, completions, embeddings.

`model` is a model name (loaded on first use, like `generate`) or a handle id. Streams are SSE
`chat.completion.chunk`s: the role once in the first delta, content deltas, a finish chunk with an empty
delta, the usage chunk when `stream_options.include_usage`, then `data: [DONE]`. A field the runtime cannot
honour (`n` > 1, `logprobs`, `seed` on the NPU runtime, ...) is a 400 naming it, never silently ignored; `stop` ends the
reply at the first stop string (the run is aborted there);
fields that change nothing (`user`, `metadata`, `store`, `parallel_tool_calls`, ...) are accepted. Errors
have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status from the one table
in `errors.py`. `/v1/completions` applies the model's chat template (as Ollama does), like `generate`.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mcp_rkllm import __version__
from mcp_rkllm.engine import Progress, Stream
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.surfaces.api.common import Api, BadRequest, Handler, dumped, guarded, mtime, sampling, unsupported
from mcp_rkllm.surfaces.api.errors import http_error, param_of
from mcp_rkllm.surfaces.api.streaming import Emit, LiveStream, while_connected

FINGERPRINT = f"mcp-rkllm-{__version__}"

#: Fields that would change the answer but no runtime here can honour, and why.
_UNSUPPORTED = {
    "n": "only one choice per request (n = 1)",
    "logprobs": "log probabilities are not available from the runtime",
    "top_logprobs": "log probabilities are not available from the runtime",
    "logit_bias": "logit bias is not supported",
    "functions": "the deprecated `functions` field is not supported: use `tools`",
    "response_format": "structured output (json_object / json_schema) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "echo": "echo is not supported",
    "best_of": "best_of is not supported",
}


def _harmless(field: str, value: Any) -> bool:
    """Whether a listed field's value asks for nothing beyond the default."""
    if value is None or value is False or value == [] or value == {}:
        return True
    return (field in ("n", "best_of") and value == 1) or (field == "response_format" and value == {"type": "text"}) \
        or (field == "modalities" and value == ["text"]) or (field == "tool_choice" and value == "none")


def error_response(error: RkllmError) -> JSONResponse:
    """A table error in OpenAI's envelope, with its status (and Retry-After when retrying helps)."""
    h = http_error(error)
    headers = {"retry-after": str(h.retry_after)} if h.retry_after else {}
    return JSONResponse({"error": {"message": f"{error.code}: {error.message}", "type": h.type,
                                   "param": param_of(error), "code": error.code, "hint": error.spec.hint}},
                        status_code=h.status, headers=headers)


def bad_request(exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param,
                                   "code": None}}, status_code=exc.status)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _finish(reason: str, tool_calls: bool = False) -> str:
    return "length" if reason == "length" else "tool_calls" if tool_calls else "stop"


def _usage(result: dict[str, Any]) -> dict[str, int]:
    perf = result.get("perf") or {}
    prompt = int(perf.get("prefill_tokens") or 0)
    completion = int(result.get("token_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings(result: dict[str, Any]) -> dict[str, float] | None:
    """llama.cpp's `timings` object (Open WebUI reads it next to `usage`), from the runtime's perf stats."""
    perf = result.get("perf")
    if not perf:
        return None
    prompt_ms, predicted_ms = perf["prefill_time_ms"], perf["generate_time_ms"]
    return {"prompt_n": perf["prefill_tokens"], "prompt_ms": prompt_ms,
            "prompt_per_second": perf["prefill_tokens"] / prompt_ms * 1000 if prompt_ms else 0.0,
            "predicted_n": result["token_count"], "predicted_ms": predicted_ms,
            "predicted_per_second": result["token_count"] / predicted_ms * 1000 if predicted_ms else 0.0}


def _text(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: text (a string, null, or a list of text parts), or, with images (`image_url`
    parts: a data: URI or a path inside the model folders), the list of text and image parts for a vision model."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts, parts = [], []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
                ref = part["image_url"]
                parts.append({"type": "image_url", "image_url": {"url": ref} if isinstance(ref, str) else ref})
            elif kind in ("input_image", "image"):
                raise unsupported(f"{where}[{i}]", "give images as image_url parts (a data: URI)")
            else:
                raise unsupported(f"{where}[{i}]", f"unsupported content part type {kind!r}")
        return parts if len(parts) > len(texts) else "\n".join(texts)
    raise RkllmError("INVALID_PARAMS", function="chat", detail=f"{where}: must be a string or a list of parts",
                     param=where, errors=[{"field": where, "problem": "must be a string or a list of parts"}])


class OpenAiRoutes:
    """The `/v1` routes over one Api."""

    def __init__(self, api: Api):
        self.api = api

    def routes(self) -> list[Route]:
        """`GET /v1/models/{id}` last: RockchipLlama's fixed `/v1/models/...` paths must be matched first."""
        return [Route("/v1/models", self._guarded(self.list_models), methods=["GET"]),
                Route("/v1/chat/completions", self._guarded(self.chat), methods=["POST"]),
                Route("/v1/completions", self._guarded(self.completions), methods=["POST"]),
                Route("/v1/embeddings", self._guarded(self.embeddings), methods=["POST"])]

    def model_route(self) -> Route:
        return Route("/v1/models/{model_id:path}", self._guarded(self.get_model), methods=["GET"])

    def _guarded(self, handler: Handler) -> Handler:
        return guarded(self.api, handler, error_response, bad_request)

    # ------------------------------------------------------------------ models

    async def _model_objects(self) -> list[dict[str, Any]]:
        loaded = self.api.loaded_names()
        return [{"id": m.name, "object": "model", "created": int(mtime(m)), "owned_by": "mcp-rkllm",
                 "loaded": str(m.path) in loaded, "runtime": m.runtime, "size_bytes": m.size_bytes}
                for m in await self.api.models()]

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self._model_objects()})

    async def get_model(self, request: Request) -> Response:
        info = await self.api.resolve(request.path_params["model_id"])
        listed = [m for m in await self._model_objects() if m["id"] == info.name]
        if not listed:  # found, but not a kind this runtime loads
            raise RkllmError("MODEL_NOT_FOUND", name=info.name,
                             detail=f": {info.file} needs the {info.runtime} runtime")
        return JSONResponse(listed[0])

    # ------------------------------------------------------------------ chat

    def _options(self, body: dict[str, Any]) -> dict[str, Any]:
        """The engine arguments for the request's model and sampling fields (400 for what cannot be honoured)."""
        for field, why in _UNSUPPORTED.items():
            if field in body and not _harmless(field, body[field]):
                raise unsupported(field, why)
        args: dict[str, Any] = {**self.api.model_ref(body.get("model")), **sampling(body)}
        stop = body.get("stop")
        if stop:
            args["stop"] = [stop] if isinstance(stop, str) else stop
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            args["max_new_tokens"] = limit
        return args

    def _chat_options(self, body: dict[str, Any]) -> dict[str, Any]:
        """Tools, tool_choice and thinking for `chat`."""
        args: dict[str, Any] = {}
        choice = body.get("tool_choice")
        if choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "only auto and none: the runtimes cannot force a call", "chat")
        if body.get("tools"):
            args["tools"] = body["tools"]
            if choice is not None:
                args["tool_choice"] = choice
        thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking", body.get("enable_thinking"))
        if thinking is None and body.get("reasoning_effort") is not None:
            thinking = body["reasoning_effort"] != "none"
        if thinking is not None:
            args["enable_thinking"] = thinking
        return args

    def _messages(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise unsupported("messages", "a non-empty list is required")
        out: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise unsupported(f"messages[{i}]", "must be an object")
            role = "system" if m.get("role") == "developer" else m.get("role")
            turn: dict[str, Any] = {"role": role, "content": _text(m.get("content"), f"messages[{i}].content")}
            if m.get("tool_calls"):
                turn["tool_calls"] = m["tool_calls"]
                turn["content"] = turn["content"] or None
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None and role == "tool":
                    turn[key] = m[key]
            out.append(turn)
        return out

    async def chat(self, request: Request) -> Response:
        body = await self.api.body(request)
        args = {**self._options(body), **self._chat_options(body), "messages": self._messages(body)}
        model = str(body.get("model"))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream("chat", args, model, include_usage, chat=True)
        data = dumped(await while_connected(request.receive, lambda: self.api.invoke("chat", args)))
        payload = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                   "model": model, "system_fingerprint": FINGERPRINT,
                   "choices": [{"index": 0, "message": data["message"], "logprobs": None,
                                "finish_reason": _finish(data["finish_reason"], bool(data["tool_calls"]))}],
                   "usage": _usage(data)}
        if (timings := _timings(data)) is not None:
            payload["timings"] = timings
        return JSONResponse(payload)

    async def completions(self, request: Request) -> Response:
        body = await self.api.body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise unsupported("prompt", "must be one string")
        args = {**self._options(body), "prompt": prompt}
        model = str(body.get("model"))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream("generate", args, model, include_usage, chat=False)
        data = dumped(await while_connected(request.receive, lambda: self.api.invoke("generate", args)))
        return JSONResponse({"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                             "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT,
                             "choices": [{"text": data["text"], "index": 0, "logprobs": None,
                                          "finish_reason": _finish(data["finish_reason"])}],
                             "usage": _usage(data)})

    def _stream(self, operation: str, args: dict[str, Any], model: str, include_usage: bool, chat: bool) -> Response:
        """SSE chunks of one run. Nothing is sent before the first token, so an error that comes first (unknown
        model, full queue) still gets its own status; one that comes later is an error event, then [DONE]."""
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": model, "system_fingerprint": FINGERPRINT}

        def chunk(delta: dict[str, Any] | str, finish: str | None = None) -> bytes:
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        async def produce(emit: Emit) -> None:
            started = False

            async def start() -> None:
                nonlocal started
                if not started:
                    started = True
                    if chat:
                        await emit(chunk({"role": "assistant", "content": ""}))

            calls = 0

            async def sink(update: Progress) -> None:
                nonlocal calls
                if update.kind == "status":  # a heartbeat: an SSE comment keeps the connection and client alive
                    await emit(b": " + update.text.encode() + b"\n\n")
                    return
                if not chat:
                    if update.kind == "content":
                        await start()
                        await emit(chunk(update.text))
                    return
                if update.kind == "tool_call":
                    if update.tool_call is None:
                        return  # the call's raw text: its decoded form follows
                    await start()
                    await emit(chunk({"tool_calls": [{"index": calls, **update.tool_call}]}))
                    calls += 1
                    return
                await start()
                field = "reasoning_content" if update.kind == "reasoning" else "content"
                await emit(chunk({field: update.text}))

            try:
                result = await self.api.invoke(operation, args, Stream(sink))
            except RkllmError as exc:
                if not started:
                    raise  # nothing sent yet: LiveStream answers with the error's own status
                h = http_error(exc)
                await emit(_sse({"error": {"message": f"{exc.code}: {exc.message}", "type": h.type,
                                           "param": param_of(exc), "code": exc.code}}))
                await emit(DONE)
                return
            await start()
            data = dumped(result)
            await emit(chunk({} if chat else "", _finish(data["finish_reason"], bool(data.get("tool_calls")))))
            if include_usage:
                await emit(_sse({**base, "choices": [], "usage": _usage(data)}))
            await emit(DONE)

        return LiveStream(produce, "text/event-stream", error_response=error_response)

    # ------------------------------------------------------------------ embeddings

    async def embeddings(self, request: Request) -> Response:
        body = await self.api.body(request)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
            raise unsupported("input", "must be a non-empty string or a list of non-empty strings")
        if len(inputs) > self.api.settings.max_items:
            raise RkllmError("LIMIT_EXCEEDED", function="embeddings", what="input (entries)", value=len(inputs),
                             limit=self.api.settings.max_items)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise unsupported("encoding_format", "must be float or base64")
        ref = self.api.model_ref(body.get("model"))
        data, tokens = [], 0

        async def run() -> None:
            nonlocal tokens
            for index, text in enumerate(inputs):
                result = dumped(await self.api.invoke("embed", {**ref, "text": text}))
                vector = result["embedding"]
                if body.get("dimensions") not in (None, len(vector)):
                    raise unsupported("dimensions", f"this model's embeddings have {len(vector)} dimensions")
                tokens += result["tokens"]
                value: Any = vector if encoding == "float" else \
                    base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": value})

        await while_connected(request.receive, run)
        return JSONResponse({"object": "list", "model": str(body.get("model")), "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
