"""JSON-RPC 2.0 over the registry: method names, the three parameter forms, errors, streamed callbacks.

Transport-neutral: a transport parses bytes into JSON and calls `Dispatcher.handle(message, peer)`,
which answers one request, a notification (nothing) or a batch (a list, or nothing when it held only
notifications). While a streaming method runs, `peer.notify` receives `rkllm.callback` notifications
shaped like the C callback; the concatenated `text` of one request's callbacks equals its result's
text. The methods are the registry's operations: `rkllm_run` is `rkllm.run`, `rknn_query` would be
`rknn.query`, the friendly operations keep their names; `rpc.discover` returns the OpenRPC document.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from pydantic import AliasChoices, Field, ValidationError

from mcp_rkllm.engine import Engine, Progress, Stream
from mcp_rkllm.engine.relay import GoneCheck
from mcp_rkllm.engine.types import Sampling
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.surfaces.registry import OperationSpec, Registry, validation_detail

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Registry name prefixes that become JSON-RPC namespaces ("rkllm_run" -> "rkllm.run").
NAMESPACES = ("rkllm_", "rknn_")

#: The notification a streaming method sends before its response.
CALLBACK_METHOD = "rkllm.callback"

#: What a transport sends: one JSON-RPC message (a dict, or a list for a batch response).
Notify = Callable[[dict[str, Any]], Awaitable[None]]


def method_name(operation: str) -> str:
    """The JSON-RPC method of a registry operation: `rkllm_x` -> `rkllm.x`, `rknn_x` -> `rknn.x`, else the same."""
    for prefix in NAMESPACES:
        if operation.startswith(prefix):
            return prefix[:-1] + "." + operation[len(prefix):]
    return operation


class RpcError(Exception):
    """A JSON-RPC error response: a standard code (-32700..-32603) or a number from the error table."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def of(cls, error: RkllmError) -> RpcError:
        """A table error as JSON-RPC: INVALID_PARAMS is the standard -32602; every other code its own number.
        `data` is the same payload an MCP `is_error` result carries."""
        number = INVALID_PARAMS if error.code == "INVALID_PARAMS" else error.spec.number
        return cls(number, f"{error.code}: {error.message}", error.to_dict())

    def response(self, request_id: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            body["data"] = self.data
        return {"jsonrpc": "2.0", "id": request_id, "error": body}


@dataclass
class Peer:
    """What a transport tells the dispatcher about one connection (or one HTTP request)."""

    notify: Notify | None
    """Sends a notification to the client; None when it cannot receive any (plain HTTP)."""
    gone: GoneCheck | None = None
    """Whether the client has left (runs are then aborted)."""
    requests: dict[str, anyio.CancelScope] = field(default_factory=dict)
    """This connection's requests in flight, by JSON id, for `$/cancelRequest`."""
    owner: str | None = None
    """Who owns the handles this peer makes with rkllm.init: its connection (freed when it closes), or None
    (shared: a stateless HTTP request)."""


class FlatRun(Sampling):
    """The friendly flat form of `rkllm.run` / `rkllm.run_async`: a prompt and sampling options."""

    prompt: str = Field(min_length=1)
    role: str = "user"
    enable_thinking: bool = False
    keep_history: bool | Literal[0, 1] = False
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000,
                                       validation_alias=AliasChoices("max_new_tokens", "max_tokens"))


def _strings_fixed(value: Any) -> Any:
    """`value` with every lone UTF-16 surrogate (what JavaScript's JSON.stringify writes for half an emoji)
    replaced by U+FFFD: valid JSON, but no C string or UTF-8 encoder accepts it."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_strings_fixed(v) for v in value]
    if isinstance(value, dict):
        return {_strings_fixed(k): _strings_fixed(v) for k, v in value.items()}
    return value


def reject_constant(name: str) -> Any:
    """json.loads' parse_constant: Python's parser accepts NaN and Infinity; JSON (and JavaScript) do not."""
    raise ValueError(f"{name} is not JSON")


def parse(line: bytes | str) -> Any:
    """One JSON text, or RpcError -32700 (invalid UTF-8 or JSON, or nested too deeply)."""
    try:
        message = json.loads(line, parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RpcError(PARSE_ERROR, f"Parse error: {exc}") from None
    except RecursionError:
        raise RpcError(PARSE_ERROR, "Parse error: nested too deeply") from None
    raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
    if b"\\ud" in raw.lower():  # cheap test first: only then walk the message
        message = _strings_fixed(message)
    return message


def _valid_id(request_id: Any) -> bool:
    if isinstance(request_id, float):
        return math.isfinite(request_id)
    return request_id is None or (isinstance(request_id, str | int) and not isinstance(request_id, bool))


class Dispatcher:
    """The JSON-RPC methods of a registry, served by one engine."""

    def __init__(self, registry: Registry, engine: Engine):
        self.registry = registry
        self.engine = engine
        self.methods: dict[str, OperationSpec] = {method_name(s.name): s for s in registry.specs.values()}
        self._document: dict[str, Any] | None = None

    def discover(self) -> dict[str, Any]:
        """The OpenRPC document (built once: it is about 100 KB)."""
        if self._document is None:
            from mcp_rkllm.surfaces.jsonrpc.openrpc import document

            self._document = document(self)
        return self._document

    async def handle(self, message: Any, peer: Peer) -> Any:
        """The response to one parsed message: a dict, a list (batch), or None (nothing to send)."""
        if isinstance(message, list):
            if not message:
                return RpcError(INVALID_REQUEST, "Invalid Request: empty batch").response(None)
            limit = self.engine.settings.max_items
            if len(message) > limit:
                return RpcError(INVALID_REQUEST, f"Invalid Request: a batch of {len(message)} requests, over the limit "
                                                 f"of {limit} (--max-items); send fewer at a time").response(None)
            answers: list[Any] = [None] * len(message)

            async def one(i: int, item: Any) -> None:
                answers[i] = await self.request(item, peer)

            async with anyio.create_task_group() as tg:  # the spec allows a batch to run concurrently
                for i, item in enumerate(message):
                    tg.start_soon(one, i, item)
            replies = [a for a in answers if a is not None]
            return replies or None
        return await self.request(message, peer)

    async def request(self, message: Any, peer: Peer) -> dict[str, Any] | None:
        """The response to one request (None for a notification)."""
        if not isinstance(message, dict):
            return RpcError(INVALID_REQUEST, "Invalid Request: expected an object").response(None)
        request_id = message.get("id")
        notification = "id" not in message
        if not _valid_id(request_id):
            return RpcError(INVALID_REQUEST, "Invalid Request: id must be a string, a number or null").response(None)
        try:
            method, params = self._envelope(message)
            if method == "$/cancelRequest":
                self._cancel(params, peer)
                return None if notification else {"jsonrpc": "2.0", "id": request_id, "result": None}
            if method == "rpc.discover":
                result: Any = self.discover()
            else:
                result = await self._call(method, params, request_id, notification, peer)
        except RpcError as exc:
            return None if notification else exc.response(request_id)
        except Exception:  # a bug of ours: answer, log, live on
            log.exception("JSON-RPC request %r failed", message.get("method"))
            return None if notification else RpcError(INTERNAL_ERROR, "Internal error (see the server log)").response(
                request_id)
        return None if notification else {"jsonrpc": "2.0", "id": request_id, "result": result}

    @staticmethod
    def _envelope(message: dict[str, Any]) -> tuple[str, Any]:
        if message.get("jsonrpc") != "2.0":
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
        method = message.get("method")
        if not isinstance(method, str):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "method" must be a string')
        params = message.get("params")
        if params is not None and not isinstance(params, (list, dict)):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "params" must be an array or an object')
        extra = set(message) - {"jsonrpc", "method", "params", "id"}
        if extra:
            raise RpcError(INVALID_REQUEST, f"Invalid Request: unknown members {sorted(extra)}")
        return method, params

    @staticmethod
    def _cancel(params: Any, peer: Peer) -> None:
        target = params.get("id") if isinstance(params, dict) else None
        if not _valid_id(target) or target is None:
            raise RpcError.of(RkllmError("INVALID_PARAMS", function="$/cancelRequest",
                                         detail='it takes {"id": <the id of a request in flight>}'))
        scope = peer.requests.get(json.dumps(target))
        if scope is not None:
            scope.cancel()

    async def _call(self, method: str, params: Any, request_id: Any, notification: bool, peer: Peer) -> Any:
        spec = self.methods.get(method)
        if spec is None:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}",
                           {"methods": [*self.methods, "rpc.discover", "$/cancelRequest"]})
        try:
            arguments, streamed = self.arguments(spec, method, params, peer.owner)
        except RkllmError as exc:
            raise RpcError.of(exc) from None
        sink = None
        sent = False  # whether a callback went out (an error before the run began gets no RKLLM_RUN_ERROR)
        if streamed and not notification and peer.notify is not None:
            notify = peer.notify

            async def sink(update: Progress) -> None:
                nonlocal sent
                sent = True
                if update.kind == "status":  # a heartbeat (loading, reading the prompt): no text of the reply
                    callback = _callback(request_id, "RKLLM_RUN_WAITING", "", [])
                    callback["params"]["status"] = update.text
                    await notify(callback)
                    return
                callback = _callback(request_id, "RKLLM_RUN_NORMAL", update.text, list(update.token_ids))
                if update.kind != "content":  # generate / chat read the reply by its model family
                    callback["params"]["kind"] = update.kind
                if update.tool_call is not None:
                    callback["params"]["tool_call"] = update.tool_call
                await notify(callback)

        key = json.dumps(request_id)
        if not notification and key in peer.requests:
            raise RpcError(INVALID_REQUEST, f"Invalid Request: id {key} is already in use by a request in flight on "
                                            "this connection")
        with anyio.CancelScope() as scope:
            if not notification:
                peer.requests[key] = scope
            try:
                result = await self.registry.invoke(spec.name, arguments, self.engine,
                                                    Stream(sink, peer.gone, peer.owner))
            except RkllmError as exc:
                if sent:
                    await sink_end(peer, request_id, "RKLLM_RUN_ERROR")
                raise RpcError.of(exc) from None
            finally:
                if peer.requests.get(key) is scope:
                    del peer.requests[key]
        if scope.cancelled_caught:  # $/cancelRequest
            raise RpcError.of(RkllmError("CANCELLED", function=spec.name, detail=": by $/cancelRequest"))
        if sink is not None and spec.streams:
            await sink_end(peer, request_id, "RKLLM_RUN_FINISH")
        return result.model_dump(mode="json")

    def arguments(self, spec: OperationSpec, method: str, params: Any,
                  owner: str | None = None) -> tuple[dict[str, Any], bool]:
        """The operation's arguments from any of the three forms, and whether to stream. RkllmError
        INVALID_PARAMS for a wrong arity or shape, UNKNOWN_HANDLE for a null handle with no model loaded."""
        streamed = True
        if params is None:
            arguments: dict[str, Any] = {}
        elif isinstance(params, list):
            arguments = self._positional(spec, method, params)
        else:
            arguments = dict(params)
            stream = arguments.pop("stream", True)
            if not isinstance(stream, bool):
                raise RkllmError("INVALID_PARAMS", function=spec.name, detail="stream: must be true or false")
            streamed = stream
            for c_name, target in spec.c_params:  # a server-owned slot may be named, as null
                if target is None and c_name in arguments and arguments[c_name] is None and \
                        c_name not in spec.params.model_fields:
                    del arguments[c_name]
            if spec.name in ("rkllm_run", "rkllm_run_async") and "rkllm_input" not in arguments \
                    and "prompt" in arguments:
                arguments = self._flat_run(spec, arguments, owner)
        handle = spec.params.model_fields.get("handle")
        if handle is not None and handle.is_required() and arguments.get("handle") is None:
            arguments["handle"] = self.engine.default_handle_id(spec.name, owner)
        return arguments, streamed

    @staticmethod
    def _positional(spec: OperationSpec, method: str, params: list[Any]) -> dict[str, Any]:
        if spec.c_function is None:
            if params:
                raise RkllmError("INVALID_PARAMS", function=spec.name,
                                 detail=f"{method} takes its params by name (an object), not an array")
            return {}
        names = [c_name for c_name, _ in spec.c_params]
        if len(params) > len(names):
            raise RkllmError("INVALID_PARAMS", function=spec.name,
                             detail=f"{method} takes {len(names)} positional params ({', '.join(names) or 'none'}), "
                                    f"got {len(params)}", params=names)
        arguments: dict[str, Any] = {}
        for position, (value, (c_name, target)) in enumerate(zip(params, spec.c_params, strict=False), 1):
            if target is None:
                if value is not None:
                    raise RkllmError("INVALID_PARAMS", function=spec.name,
                                     detail=f"{c_name}: parameter {position} of {method} is the server's: pass null",
                                     field=c_name)
            elif value is not None:  # null is C's NULL: the field keeps its default
                arguments[target] = value
        return arguments

    def _flat_run(self, spec: OperationSpec, arguments: dict[str, Any], owner: str | None) -> dict[str, Any]:
        try:
            flat = FlatRun.model_validate(arguments)
        except ValidationError as exc:
            text, errors = validation_detail(exc)
            raise RkllmError("INVALID_PARAMS", function=spec.name, detail=text, errors=errors) from None
        if flat.model is not None:
            raise RkllmError("INVALID_PARAMS", function=spec.name,
                             detail="model: rkllm.run runs on a handle; call generate to run by model name")
        handle = flat.handle or self.engine.default_handle_id(spec.name, owner)
        infer = flat.infer(self.engine.get(handle, spec.name, owner).param, bool(flat.keep_history))
        rkllm_input = {"prompt_input": flat.prompt, "role": flat.role, "enable_thinking": flat.enable_thinking}
        return {"handle": handle, "rkllm_input": rkllm_input,
                "rkllm_infer_params": infer.model_dump(mode="json", exclude_none=True)}


def _callback(request_id: Any, state: str, text: str, token_ids: list[int]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": CALLBACK_METHOD,
            "params": {"request_id": request_id, "state": state, "text": text, "token_ids": token_ids}}


async def sink_end(peer: Peer, request_id: Any, state: str) -> None:
    """The last callback of a streamed request (as the C callback's FINISH / ERROR), before its response."""
    if peer.notify is not None:
        await peer.notify(_callback(request_id, state, "", []))
