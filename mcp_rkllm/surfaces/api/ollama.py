"""The Ollama-compatible API under `/api` (what Open WebUI, the `ollama` client, Home Assistant use).

Models are published as `name:latest`; `name`, `name:latest` and `namespace/name[:tag]` resolve alike.
`/api/chat` and `/api/generate` stream NDJSON by default (`"stream": false` for one object); every line
has `message` (chat), the last has `done: true`, `done_reason` and the durations in integer nanoseconds
from the runtime's perf stats. An empty prompt (or no messages) loads the model (`done_reason: "load"`);
with `keep_alive: 0` it unloads it (`"unload"`), and `keep_alive: 0` on a generation unloads after it.
Other keep_alive values keep the model loaded (this server does not expire models yet: `/api/ps` says so
with a far-future `expires_at`). `options.stop` ends the reply at a stop string; `options.seed` gives the CPU
runtime a sampling seed (a 400 on the NPU runtime, whose library takes none); unknown options are ignored, as
Ollama does.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mcp_rkllm.engine import Progress, Stream
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models.store import ModelInfo
from mcp_rkllm.surfaces.api.common import (
    Api,
    BadRequest,
    Handler,
    dumped,
    guarded,
    mtime,
    sampling,
    tagged,
    unsupported,
)
from mcp_rkllm.surfaces.api.errors import http_error
from mcp_rkllm.surfaces.api.streaming import Emit, LiveStream, while_connected

#: The Ollama API level emulated (Open WebUI parses it as integers and gates features on it).
OLLAMA_VERSION = "0.9.0"

#: Reported as the expiry of a model that stays loaded until it is unloaded.
FOREVER = "2999-12-31T23:59:59Z"

#: Options that would change the answer but no runtime here can honour, and why (none left: `seed` goes to the
#: engine, which answers NOT_SUPPORTED for it on the NPU runtime).
_OPTION_UNSUPPORTED: dict[str, str] = {}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def error_response(error: RkllmError) -> JSONResponse:
    """A table error as Ollama sends errors: `{"error": "..."}` with the status from the one table."""
    h = http_error(error)
    headers = {"retry-after": str(h.retry_after)} if h.retry_after else {}
    return JSONResponse({"error": f"{error.code}: {error.message}"}, status_code=h.status, headers=headers)


def _ns(ms: float) -> int:
    return int(ms * 1_000_000)


def _details(model: ModelInfo) -> dict[str, Any]:
    family = model.family.name
    return {"parent_model": "", "format": model.kind.lstrip("."), "family": family, "families": [family],
            "parameter_size": "", "quantization_level": ""}


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def unload_after(body: dict[str, Any]) -> bool:
    """Whether the request's `keep_alive` is zero (unload after this call). Ollama's forms: a number of seconds,
    or a duration string ("0", "0s", "5m", "1h", "-1"); anything else is INVALID_PARAMS."""
    value = body.get("keep_alive")
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise unsupported("keep_alive", "must be a number of seconds or a duration such as \"5m\" or \"0\"")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise unsupported("keep_alive", "must be a number of seconds or a duration such as \"5m\" or \"0\"")
        value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value == 0


def _capabilities(model: ModelInfo) -> list[str]:
    """What /api/show advertises: tools when the family has a call format (chat offers tools to any model, but
    only these were trained for it), thinking when it marks reasoning."""
    family = model.family
    return ["completion"] + (["tools"] if family.tool_calls else []) + (["thinking"] if family.reasoning else []) + (
        ["vision"] if model.vision_encoder is not None else [])


def _images(images: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's `images` (base64 strings) as image parts for a vision model."""
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise unsupported(where, "must be a list of base64-encoded images")
    return [{"type": "image", "data": i} for i in images]


def _bad_request(exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def _ollama_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """An OpenAI-shaped tool call as Ollama writes it: `arguments` an object, `index` its position."""
    fn = call["function"]
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = {}
    return {"id": call.get("id"), "function": {"index": index, "name": fn.get("name"), "arguments": arguments}}


def _openai_call(call: Any, where: str) -> dict[str, Any]:
    """A tool call from an Ollama history (arguments an object, id optional) in the OpenAI shape chat takes."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise unsupported(where, "a tool call needs function.name", "chat")
    arguments = fn.get("arguments", {})
    return {"id": call.get("id") or f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": fn["name"], "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


def _digest(model: ModelInfo) -> str:
    import hashlib

    return hashlib.sha256(f"{model.path}:{model.size_bytes}:{mtime(model)}".encode()).hexdigest()


class OllamaRoutes:
    """The `/api` routes over one Api."""

    def __init__(self, api: Api):
        self.api = api

    def routes(self) -> list[Route]:
        g = self._guarded
        return [Route("/", g(self.root), methods=["GET", "HEAD"]),
                Route("/api/version", g(self.version), methods=["GET", "HEAD"]),
                Route("/api/tags", g(self.tags), methods=["GET", "HEAD"]),
                Route("/api/ps", g(self.ps), methods=["GET"]),
                Route("/api/show", g(self.show), methods=["POST"]),
                Route("/api/generate", g(self.generate), methods=["POST"]),
                Route("/api/chat", g(self.chat), methods=["POST"]),
                Route("/api/embed", g(self.embed), methods=["POST"]),
                Route("/api/embeddings", g(self.embeddings), methods=["POST"]),
                Route("/api/pull", g(self.pull), methods=["POST"])]

    def _guarded(self, handler: Handler) -> Handler:
        return guarded(self.api, handler, error_response, _bad_request)

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    # ------------------------------------------------------------------ models

    def _entry(self, model: ModelInfo) -> dict[str, Any]:
        name = tagged(model)
        modified = datetime.fromtimestamp(mtime(model), UTC).isoformat().replace("+00:00", "Z")
        return {"name": name, "model": name, "modified_at": modified, "size": model.size_bytes,
                "digest": _digest(model), "details": _details(model)}

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self._entry(m) for m in await self.api.models()]})

    async def ps(self, request: Request) -> Response:
        loaded = self.api.loaded_names()
        running = []
        for model in await self.api.models():
            handle = loaded.get(str(model.path))
            h = self.api.engine.handles.get(handle) if handle is not None else None
            if h is None:  # not loaded, or unloaded while the listing was read
                continue
            running.append({**self._entry(model), "expires_at": FOREVER, "size_vram": model.size_bytes,
                            "context_length": h.param.max_context_len or 0, "handle": handle})
        return JSONResponse({"models": running})

    async def show(self, request: Request) -> Response:
        body = await self.api.body(request)
        info = await self.api.resolve(str(body.get("model") or body.get("name") or ""))
        loaded = self.api.loaded_names().get(str(info.path))
        context = self.api.engine.handles[loaded].param.max_context_len if loaded else None
        details = _details(info)
        arch = details["family"]
        model_info: dict[str, Any] = {"general.architecture": arch, "general.file": info.file,
                                      "general.runtime": info.runtime}
        if context:
            model_info[f"{arch}.context_length"] = context
        defaults = info.sidecar.param.model_dump(exclude_none=True) if info.sidecar is not None else {}
        parameters = "\n".join(f"{k} {v}" for k, v in defaults.items() if not isinstance(v, dict))
        return JSONResponse({"modelfile": f"# {info.file} ({info.runtime} runtime)\nFROM {info.path}\n",
                             "parameters": parameters, "template": "", "details": details,
                             "model_info": model_info, "capabilities": _capabilities(info),
                             "modified_at": self._entry(info)["modified_at"]})

    async def pull(self, request: Request) -> Response:
        """A Hugging Face Hub name (`hf.co/OWNER/REPO[:FILE]`, `OWNER/REPO[:FILE]`) downloads into the first model
        root (mcp_rkllm.models.pull), streaming Ollama's progress lines; a plain name answers success when the model
        is here and 404 otherwise."""
        from mcp_rkllm.models import pull as hub

        body = await self.api.body(request)
        name = str(body.get("model") or body.get("name") or "")
        stream = body.get("stream", True) is not False
        parsed = hub.hub_name(name)
        if parsed is not None:
            return await self._pull_from_hub(request, parsed, stream)
        try:
            await self.api.resolve(name)
        except RkllmError as exc:
            if exc.code != "MODEL_NOT_FOUND":
                raise
            roots = ", ".join(str(r) for r in self.api.engine.store.roots) or "(no model directory)"
            return JSONResponse({"error": f"model '{name}' not found; this server does not download models by a "
                                          f"plain name: pull a Hugging Face Hub repository (hf.co/OWNER/REPO[:FILE]), "
                                          f"or put .rkllm / .gguf files in {roots} (or start it with --models DIR)"},
                                status_code=404)
        if stream:
            lines = [{"status": "pulling manifest"}, {"status": "success"}]
            return Response("".join(json.dumps(line) + "\n" for line in lines), media_type="application/x-ndjson")
        return JSONResponse({"status": "success"})

    async def _pull_from_hub(self, request: Request, name: tuple[str, str | None], stream: bool) -> Response:
        """Plan the pull (its errors keep their status), then download: NDJSON lines `pulling <file>` with digest,
        total and completed, or one `{"status": "success"}`; a failure midway is an `{"error": ...}` line. A client
        that leaves stops the transfer (the next pull resumes it)."""
        from mcp_rkllm.models import pull as hub

        repo, selector = name
        root = self.api.engine.store.roots[0]
        cancel = threading.Event()

        async def download(sink: hub.ProgressSink | None) -> None:
            try:
                await anyio.to_thread.run_sync(lambda: hub.download(plan, sink=sink, bar=False, cancel=cancel),
                                               abandon_on_cancel=True)
            finally:
                cancel.set()  # stops an abandoned transfer at its next write

        try:
            plan = await anyio.to_thread.run_sync(lambda: hub.plan(repo, [selector] if selector else [], root=root),
                                                  abandon_on_cancel=True)
            if not stream:
                await while_connected(request.receive, lambda: download(None))
                return JSONResponse({"status": "success"})
        except hub.PullError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

        async def produce(emit: Emit) -> None:
            await emit(b'{"status": "pulling manifest"}\n')
            send, receive = anyio.create_memory_object_stream[dict[str, Any]](max_buffer_size=math.inf)
            shown: dict[str, float] = {}
            failed: list[str] = []

            def sink(p: hub.Progress) -> None:  # in the download thread
                now = time.monotonic()
                if p.completed not in (0, p.total) and now - shown.get(p.file, 0.0) < 0.25:
                    return
                shown[p.file] = now
                line = {"status": f"pulling {p.file}", "digest": p.digest, "total": p.total, "completed": p.completed}
                anyio.from_thread.run_sync(send.send_nowait, {k: v for k, v in line.items() if v is not None})

            async def work() -> None:
                async with send:
                    try:
                        await download(sink)
                    except hub.PullError as exc:
                        failed.append(exc.message)

            async with anyio.create_task_group() as tg:
                tg.start_soon(work)
                async with receive:
                    async for line in receive:
                        await emit(json.dumps(line).encode() + b"\n")
            if failed:
                await emit(json.dumps({"error": failed[0]}).encode() + b"\n")
                return
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                await emit(json.dumps({"status": status}).encode() + b"\n")

        return LiveStream(produce, "application/x-ndjson", error_response=error_response)

    # ------------------------------------------------------------------ generation

    def _arguments(self, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body.get("stream", True), bool):
            raise unsupported("stream", "must be true or false")
        if body.get("system") is not None and not isinstance(body["system"], str):
            raise unsupported("system", "must be a string")
        unload_after(body)  # a keep_alive it cannot read is a 400 before any work
        for field in ("raw", "template", "suffix", "context"):
            if body.get(field) not in (None, False, "", []):
                raise unsupported(field, "not supported by this server (the model's own chat template is applied)")
        if body.get("format"):
            raise unsupported("format", "structured output (format) is not supported")
        if body.get("images") is not None:
            _images(body["images"], "images")  # a 400 for what is not a list of base64 strings
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise unsupported("options", "must be an object")
        for name, why in _OPTION_UNSUPPORTED.items():
            if options.get(name) not in (None, [], ""):
                raise unsupported(f"options.{name}", why)
        args: dict[str, Any] = {**self.api.model_ref(body.get("model")), **sampling(options)}
        stop = options.get("stop")
        if stop:
            args["stop"] = [stop] if isinstance(stop, str) else stop
        predict = options.get("num_predict")
        if predict is not None:
            if not isinstance(predict, int) or isinstance(predict, bool):
                raise unsupported("options.num_predict", "must be an integer (-1 = no limit)")
            if predict > 0:
                args["max_new_tokens"] = predict
        think = body.get("think")
        if think is not None:  # true / false, or a level ("low", "medium", "high"): thinking on
            args["enable_thinking"] = think not in (False, "false", "none")
        return args

    async def _loaded_before(self, ref: dict[str, str]) -> bool:
        if "handle" in ref:
            return True
        info = await self.api.resolve(ref["model"])
        return str(info.path) in self.api.loaded_names()

    async def _load_or_unload(self, body: dict[str, Any], chat: bool) -> Response:
        """An empty prompt / no messages: load the model, or unload it with keep_alive 0."""
        ref = self.api.model_ref(body.get("model"))
        base = {"model": body.get("model"), "created_at": _now(), "done": True}
        extra = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        if unload_after(body):
            if "handle" in ref:
                await self.api.invoke("unload_model", {"handle": ref["handle"]})
            else:
                info = await self.api.resolve(ref["model"])
                if str(info.path) in self.api.loaded_names():  # not loaded: nothing to do, as Ollama answers
                    await self.api.invoke("unload_model", {"model": info.name})
            return JSONResponse({**base, **extra, "done_reason": "unload"})
        if "handle" not in ref:
            info = await self.api.resolve(ref["model"])
            if str(info.path) not in self.api.loaded_names():
                await self.api.invoke("load_model", {"model": info.name})
        return JSONResponse({**base, **extra, "done_reason": "load"})

    def _final(self, data: dict[str, Any], started: float, load_s: float) -> dict[str, Any]:
        perf = data.get("perf") or {}
        total = time.monotonic() - started
        return {"done": True, "done_reason": "length" if data["finish_reason"] == "length" else "stop",
                "total_duration": int(total * 1e9), "load_duration": int(load_s * 1e9),
                "prompt_eval_count": int(perf.get("prefill_tokens") or 0),
                "prompt_eval_duration": _ns(perf.get("prefill_time_ms") or 0.0),
                "eval_count": int(data["token_count"]),
                "eval_duration": _ns(perf.get("generate_time_ms") or 0.0) or int(max(total - load_s, 0) * 1e9)}

    async def _unload_after(self, body: dict[str, Any], data: dict[str, Any]) -> None:
        if unload_after(body):
            await self.api.invoke("unload_model", {"handle": data["handle"]})

    async def _run(self, request: Request, body: dict[str, Any], operation: str, args: dict[str, Any],
                   chat: bool) -> Response:
        started = time.monotonic()
        loaded_before = await self._loaded_before({k: v for k, v in args.items() if k in ("handle", "model")})
        model = body.get("model")

        def line(text: str, kind: str = "content", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            head = {"model": model, "created_at": _now()}
            if not chat:
                return {**head, "response": text if kind == "content" else ""} | (
                    {"thinking": text} if kind == "reasoning" else {})
            message: dict[str, Any] = {"role": "assistant", "content": text if kind == "content" else ""}
            if kind == "reasoning":
                message["thinking"] = text
            if calls:
                message["tool_calls"] = [_ollama_call(c, i) for i, c in enumerate(calls)]
            return {**head, "message": message}

        def load_seconds(data: dict[str, Any]) -> float:
            # The first token cannot come before the model is loaded: the time to it, minus the prefill.
            if loaded_before:
                return 0.0
            perf = data.get("perf") or {}
            wall = time.monotonic() - started
            return max(wall - ((perf.get("prefill_time_ms") or 0) + (perf.get("generate_time_ms") or 0)) / 1000, 0.0)

        if not body.get("stream", True):
            data = dumped(await while_connected(request.receive, lambda: self.api.invoke(operation, args)))
            await self._unload_after(body, data)
            whole = line(data["text"], calls=data["tool_calls"])
            if data.get("reasoning"):
                (whole["message"] if chat else whole)["thinking"] = data["reasoning"]
            return JSONResponse({**whole, **self._final(data, started, load_seconds(data))})

        async def produce(emit: Emit) -> None:
            calls: list[dict[str, Any]] = []

            async def sink(update: Progress) -> None:
                if update.kind == "status":  # a heartbeat: a line with no text (every line must carry a message)
                    await emit(json.dumps(line(""), ensure_ascii=False).encode() + b"\n")
                    return
                if update.kind == "tool_call":
                    if update.tool_call is not None:  # Ollama sends each call whole, in a line of its own
                        calls.append(update.tool_call)
                        await emit(json.dumps(line("", calls=[update.tool_call]), ensure_ascii=False).encode()
                                   + b"\n")
                    return
                await emit(json.dumps(line(update.text, update.kind), ensure_ascii=False).encode() + b"\n")

            sent = False

            async def counting(update: Progress) -> None:
                nonlocal sent
                sent = True
                await sink(update)

            try:
                result = await self.api.invoke(operation, args, Stream(counting))
            except RkllmError as exc:
                if not sent:
                    raise
                await emit(json.dumps({"error": f"{exc.code}: {exc.message}"}).encode() + b"\n")
                return
            data = dumped(result)
            await self._unload_after(body, data)
            final = {**line(""), **self._final(data, started, load_seconds(data))}
            await emit(json.dumps(final, ensure_ascii=False).encode() + b"\n")

        return LiveStream(produce, "application/x-ndjson", error_response=error_response)

    async def generate(self, request: Request) -> Response:
        body = await self.api.body(request)
        prompt = body.get("prompt")
        if prompt in (None, ""):
            return await self._load_or_unload(body, chat=False)
        if not isinstance(prompt, str):
            raise unsupported("prompt", "must be a string")
        args = self._arguments(body)
        pictures = _images(body.get("images") or [], "images")
        if body.get("system"):
            user = [*pictures, {"type": "text", "text": prompt}] if pictures else prompt
            messages = [{"role": "system", "content": str(body["system"])}, {"role": "user", "content": user}]
            return await self._run(request, body, "chat", {**args, "messages": messages}, chat=False)
        if pictures:
            args["images"] = pictures
        return await self._run(request, body, "generate", {**args, "prompt": prompt}, chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self.api.body(request)
        messages = body.get("messages")
        if not messages:
            return await self._load_or_unload(body, chat=True)
        if not isinstance(messages, list):
            raise unsupported("messages", "must be a list")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise unsupported(f"messages[{i}]", "must be an object")
            turn: dict[str, Any] = {"role": m.get("role"),
                                    "content": m.get("content") if m.get("content") is not None else ""}
            if m.get("images"):  # the images first, then the text (as the vendor demo's "<image>...")
                text = turn["content"]
                turn["content"] = [*_images(m["images"], f"messages[{i}].images"),
                                   *([{"type": "text", "text": text}] if isinstance(text, str) and text else [])]
            if m.get("tool_calls"):
                turn["tool_calls"] = [_openai_call(c, f"messages[{i}].tool_calls[{j}]")
                                      for j, c in enumerate(m["tool_calls"])]
                turn["content"] = turn["content"] or None
            if m.get("role") == "tool":
                for key, ours in (("tool_call_id", "tool_call_id"), ("tool_name", "name"), ("name", "name")):
                    if m.get(key) is not None:
                        turn[ours] = m[key]
            turns.append(turn)
        args = {**self._arguments(body), "messages": turns}
        if body.get("tools"):
            args["tools"] = body["tools"]
        return await self._run(request, body, "chat", args, chat=True)

    # ------------------------------------------------------------------ embeddings

    async def _vectors(self, request: Request, body: dict[str, Any], texts: list[str]) -> tuple[list[Any], int]:
        if len(texts) > self.api.settings.max_items:
            raise RkllmError("LIMIT_EXCEEDED", function="embed", what="input (entries)", value=len(texts),
                             limit=self.api.settings.max_items)
        ref = self.api.model_ref(body.get("model"))
        vectors: list[Any] = []
        tokens = 0

        async def run() -> None:
            nonlocal tokens
            for text in texts:
                result = dumped(await self.api.invoke("embed", {**ref, "text": text}))
                vectors.append(result["embedding"])
                tokens += result["tokens"]

        await while_connected(request.receive, run)
        return vectors, tokens

    async def embed(self, request: Request) -> Response:
        body = await self.api.body(request)
        started = time.monotonic()
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise unsupported("input", "must be a non-empty string or a list of non-empty strings")
        vectors, tokens = await self._vectors(request, body, texts)
        return JSONResponse({"model": body.get("model"), "embeddings": vectors,
                             "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
                             "prompt_eval_count": tokens})

    async def embeddings(self, request: Request) -> Response:
        body = await self.api.body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise unsupported("prompt", "a non-empty string is required")
        vectors, _ = await self._vectors(request, body, [prompt])
        return JSONResponse({"embedding": vectors[0]})
