"""THE table of operations: one spec per operation drives every surface (MCP tools, JSON-RPC methods, docs).

A spec names the operation, its params model (input schema), result model (output schema),
annotations, whether it streams, the C function it mirrors, and the engine call. `invoke` validates
the arguments, enforces the limits, calls the engine and returns the result model, or raises an
`RkllmError` from the table (an unknown name raises `UnknownOperation`). Surfaces only translate:
arguments in, result or error out, `Progress` updates to their own notifications.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError

from mcp_rkllm.engine import Engine, Stream
from mcp_rkllm.engine.types import Params
from mcp_rkllm.errors import RkllmError, as_error

log = logging.getLogger(__name__)

#: The engine coroutine behind an operation: (engine, params, stream) -> result model.
EngineCall = Callable[[Engine, Any, Stream], Awaitable[BaseModel]]


class UnknownOperation(LookupError):
    """No operation has this name (a protocol error on every surface, not a tool failure)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"Unknown operation: {name}")
        self.name = name
        self.known = known


@dataclass(frozen=True)
class OperationSpec:
    """One row of the registry."""

    name: str
    params: type[Params]
    result: type[BaseModel]
    call: EngineCall
    doc: str
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    streams: bool = False
    c_function: str | None = None
    """The C function the operation mirrors 1:1 (its C parameter names are the params' names)."""
    schema_like: str | None = None
    """The operation whose arguments this one takes too: tools/list shows the C structs in full only there."""
    c_params: tuple[tuple[str, str | None], ...] = ()
    """The C function's parameters in order: (C name, params field), the field None for the slots the
    server owns (out-parameters, callbacks, userdata). Positional calls (JSON-RPC arrays) follow it."""

    @property
    def description(self) -> str:
        """The operation's description, as clients see it."""
        return inspect.cleandoc(self.doc)


def validation_detail(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    """A validation error as one line of text and a list of {field, problem}."""
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(arguments)"
        errors.append({"field": loc, "problem": err["msg"]})
    return "; ".join(f"{e['field']}: {e['problem']}" for e in errors), errors


def _short(text: str, limit: int = 300) -> str:
    """`text` for a log line: one line, at most `limit` characters (messages may quote a client's input)."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _target(params: Params | None, result: BaseModel | None) -> str:
    """The ` handle=… model=…` part of a call's log line (what the call ran on, when it says)."""
    parts = []
    for key in ("handle", "model"):
        value = getattr(result, key, None) or getattr(params, key, None)
        if isinstance(value, str):
            parts.append(f"{key}={_short(value, 80)}")
    return (" " + " ".join(parts)) if parts else ""


class Registry:
    """The operations a server exports, by name."""

    def __init__(self, specs: Iterable[OperationSpec]):
        self.specs: dict[str, OperationSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"operation {spec.name} registered twice")
            self.specs[spec.name] = spec

    def spec(self, name: str) -> OperationSpec:
        """The spec of `name`, or UnknownOperation."""
        spec = self.specs.get(name)
        if spec is None:
            raise UnknownOperation(name, list(self.specs))
        return spec

    def validate(self, spec: OperationSpec, arguments: dict[str, Any] | None) -> Params:
        """The params model for `arguments`, or INVALID_PARAMS naming each bad field."""
        try:
            return spec.params.model_validate(arguments or {})
        except ValidationError as exc:
            text, errors = validation_detail(exc)
            raise RkllmError("INVALID_PARAMS", function=spec.name, detail=text, errors=errors) from None
        except Exception as exc:  # a validator that raised something else: still the caller's arguments
            log.exception("validating the arguments of %s failed", spec.name)
            raise RkllmError("INVALID_PARAMS", function=spec.name, detail=f"{type(exc).__name__}: {exc}") from None

    async def invoke(self, name: str, arguments: dict[str, Any] | None, engine: Engine,
                     stream: Stream) -> BaseModel:
        """Validate, enforce limits, call the engine. Raises RkllmError (every failure, coded) or
        UnknownOperation; cancellation propagates. Counts the call in the engine's metrics."""
        spec = self.spec(name)
        started = anyio.current_time()
        params: Params | None = None
        try:
            params = self.validate(spec, arguments)
            engine.enforce_limits(params, name)
            result = await spec.call(engine, params, stream)
        except anyio.get_cancelled_exc_class():
            log.info("%s%s: cancelled after %.0f ms", name, _target(params, None),
                     (anyio.current_time() - started) * 1000)
            raise  # a cancelled call has no outcome to count
        except Exception as exc:
            if not isinstance(exc, RkllmError):
                log.exception("operation %s failed", name)
            ms = (anyio.current_time() - started) * 1000
            engine.metrics.call(name, False, ms)
            error = as_error(exc, name)
            log.info("%s%s: %s after %.0f ms (%s)", name, _target(params, None), error.code, ms, _short(error.message))
            raise error from None
        ms = (anyio.current_time() - started) * 1000
        engine.metrics.call(name, True, ms)
        tokens = getattr(result, "token_count", None)
        log.info("%s%s: ok in %.0f ms%s", name, _target(params, result), ms,
                 f", {tokens} tokens" if tokens is not None else "")
        return result

    def markdown_table(self) -> str:
        """The README's operation table, generated from the registry."""
        lines = ["| tool | C function | streams | read-only | destructive | what it does |",
                 "|---|---|---|---|---|---|"]
        for spec in self.specs.values():
            lines.append(
                f"| `{spec.name}` | {f'`{spec.c_function}`' if spec.c_function else '-'} | "
                f"{'yes' if spec.streams else 'no'} | {'yes' if spec.read_only else 'no'} | "
                f"{'yes' if spec.destructive and not spec.read_only else 'no'} | {spec.description.splitlines()[0]} |"
            )
        return "\n".join(lines)


def build_registry() -> Registry:
    """The registry of every operation the server exports."""
    from mcp_rkllm.surfaces.operations import OPERATIONS

    return Registry(OPERATIONS)
