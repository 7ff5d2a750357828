"""What the HTTP APIs (OpenAI, Ollama, RockchipLlama) share: the engine behind the registry, request guards,
JSON bodies, model names, and the translation of their sampling fields.

Every API call goes through `Registry.invoke`, so validation, limits, queueing on a busy handle, metrics and
errors are the ones MCP and JSON-RPC clients get. Model names: a loaded handle id, a model name (full,
without extension, or a unique prefix), Ollama's `name:latest` and `namespace/name[:latest]` all resolve
to the same model; a name that matches nothing is MODEL_NOT_FOUND (404) listing the candidates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from mcp_rkllm.config import Settings
from mcp_rkllm.engine import Engine, Stream
from mcp_rkllm.engine.relay import NO_STREAM
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.models.store import ModelInfo
from mcp_rkllm.surfaces.api.streaming import ClientGone
from mcp_rkllm.surfaces.jsonrpc.protocol import reject_constant
from mcp_rkllm.surfaces.registry import Registry

#: The tag every model is published under in Ollama's listings (and accepted, with or without it, everywhere).
TAG = "latest"


class BadRequest(Exception):
    """The request itself is unusable (not JSON, not an object, too large): answered before any work."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def unsupported(field: str, why: str, function: str = "the request") -> RkllmError:
    """INVALID_PARAMS naming a request field that is wrong or that the runtime cannot honour (never silently
    ignored)."""
    return RkllmError("INVALID_PARAMS", function=function, detail=f"{field}: {why}", param=field,
                      errors=[{"field": field, "problem": why}])


@dataclass
class Api:
    """The engine, registry and settings the HTTP API routes work with."""

    registry: Registry
    engine: Engine
    settings: Settings

    def __post_init__(self) -> None:
        from mcp.server.transport_security import TransportSecurityMiddleware

        from mcp_rkllm.surfaces.http.app import transport_security

        security = transport_security(self.settings)
        if self.settings.cors_origin and security.enable_dns_rebinding_protection:
            # Browsers send their page's Origin; the origins allowed by CORS are allowed here too.
            security = security.model_copy(update={"allowed_origins": [*security.allowed_origins,
                                                                        *self.settings.cors_origin]})
        self._security = TransportSecurityMiddleware(security)

    async def refused(self, request: Request) -> Response | None:
        """The Host/Origin check of /mcp (DNS-rebinding protection), without its Content-Type rule: curl
        and scripts post JSON without the header."""
        return await self._security.validate_request(request, is_post=False)

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read up to the body limit; BadRequest otherwise."""
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > self.settings.max_request_bytes:
                    raise BadRequest(413, f"the request body is larger than {self.settings.max_request_bytes} bytes")
        except ClientDisconnect:  # the client left before sending its whole body: nobody to answer
            raise ClientGone from None
        if not data.strip():
            return {}
        try:
            value = json.loads(data, parse_constant=reject_constant)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return value

    async def invoke(self, name: str, arguments: dict[str, Any], stream: Stream = NO_STREAM) -> Any:
        """One registry operation, as every surface calls it."""
        return await self.registry.invoke(name, arguments, self.engine, stream)

    def model_ref(self, name: Any, field: str = "model") -> dict[str, str]:
        """`{"handle": id}` for a shared loaded handle, else `{"model": name}` with Ollama's tag and namespace
        removed. (A session's own rkllm_init handles are not these APIs' to use: their ids read as model names.)"""
        if name is None or (isinstance(name, str) and not name.strip()):
            raise unsupported(field, "a model name is required")
        if not isinstance(name, str):
            raise unsupported(field, f"must be a model name (a string), not {type(name).__name__}")
        h = self.engine.handles.get(name)
        if h is not None and h.owner is None:
            return {"handle": name}
        return {"model": plain_name(name)}

    async def resolve(self, name: str) -> ModelInfo:
        """The model file `name` means (MODEL_NOT_FOUND / MODEL_AMBIGUOUS otherwise)."""
        return await anyio.to_thread.run_sync(self.engine.store.resolve, plain_name(name))

    async def models(self) -> list[ModelInfo]:
        """The models this server's runtime can load."""
        runtime = self.engine.runtime.name if self.engine.runtime is not None else None
        found = await anyio.to_thread.run_sync(self.engine.store.models)
        return [m for m in found if runtime is None or m.runtime == runtime]

    def loaded_names(self) -> dict[str, str]:
        """Loaded model paths -> the handle serving them (the first, when several do)."""
        loaded: dict[str, str] = {}
        for h in self.engine.visible_handles(None):  # shared ones only: sessions' own handles stay private
            if h.param.model_path:
                loaded.setdefault(h.param.model_path, h.id)
        return loaded


def plain_name(name: str) -> str:
    """`ns/name:latest` -> `name` (a path is left as it is)."""
    name = name.strip()
    if name.endswith(":" + TAG):
        name = name[: -len(TAG) - 1]
    if "/" in name and not name.startswith(("/", ".", "~")):
        name = name.rsplit("/", 1)[1]
    return name


def tagged(model: ModelInfo) -> str:
    """A model's Ollama name: `name:latest`."""
    return f"{model.name}:{TAG}"


def mtime(model: ModelInfo) -> float:
    """When the model file was last changed (0 when it cannot be read)."""
    try:
        return os.stat(model.path).st_mtime
    except OSError:
        return 0.0


#: Sampling fields the engine takes, under the same names in OpenAI requests and Ollama options.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repeat_penalty", "frequency_penalty", "presence_penalty",
                   "mirostat", "mirostat_tau", "mirostat_eta")


def sampling(source: dict[str, Any]) -> dict[str, Any]:
    """The engine's sampling arguments found in `source` (None values dropped), and `seed`: -1 (Ollama's "random")
    is none, any other integer is taken modulo 2**32 (OpenAI allows 64-bit seeds; the CPU runtime takes 32 bits)."""
    args = {f: source[f] for f in SAMPLING_FIELDS if source.get(f) is not None}
    seed = source.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        if seed != -1:
            args["seed"] = seed % 2**32
    elif seed is not None:
        args["seed"] = seed  # not an integer: the engine's validation says so
    return args


def dumped(model: BaseModel) -> dict[str, Any]:
    """A result model as JSON data."""
    return model.model_dump(mode="json")


#: A route handler of the HTTP APIs.
Handler = Callable[[Request], Awaitable[Response]]


def guarded(api: Api, handler: Handler, error_response: Callable[[RkllmError], Response],
            bad_request: Callable[[BadRequest], Response]) -> Handler:
    """`handler` behind the Host/Origin check, its failures answered in its API's shape: a table error by
    `error_response`, an unusable request by `bad_request`, a client that left by nothing (499)."""
    async def endpoint(request: Request) -> Response:
        refused = await api.refused(request)
        if refused is not None:
            return refused
        try:
            return await handler(request)
        except BadRequest as exc:
            return bad_request(exc)
        except RkllmError as exc:
            return error_response(exc)
        except ClientGone:  # nobody is left to read an answer
            return Response(status_code=499)

    return endpoint
