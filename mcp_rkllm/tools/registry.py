"""THE table of exported tools: one entry per tool drives its MCP Tool, validation, dispatch and docs.

An entry names the tool, its pydantic params model (input schema = `model_json_schema()`), its
result model (output schema), annotations, whether it streams progress, and the async handler
that calls the Runtime. `Registry.call` validates arguments, dispatches, and turns every failure
into an `is_error` result through the error table; only an unknown tool is a protocol error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
from mcp import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, TextContent, Tool, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcp_rkllm.errors import RkllmError, error_result
from mcp_rkllm.errors.table import ERROR_SCHEMA
from mcp_rkllm.streaming.relay import GoneCheck, Reporter
from mcp_rkllm.tools.handles import AppState
from mcp_rkllm.tools.limits import enforce

log = logging.getLogger(__name__)


class Params(BaseModel):
    """Base of every tool's params: strict types, unknown arguments rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")


HandleId = Annotated[str, Field(description="The opaque id rkllm_init / load_model returned.", min_length=1,
                                max_length=64)]


@dataclass
class ToolContext:
    """What a handler gets besides its params."""

    state: AppState
    report: Reporter
    """Sends a progress notification for this call (a no-op when the client asked for none)."""
    gone: GoneCheck | None = None
    """For HTTP calls: whether the client's connection has dropped."""


Handler = Callable[[ToolContext, Any], Awaitable[BaseModel]]


def tool_annotations(*, read_only: bool = False, destructive: bool = False,
                     idempotent: bool = False) -> ToolAnnotations:
    """Explicit hints for every tool; RKLLM tools never reach outside this machine."""
    return ToolAnnotations(read_only_hint=read_only, destructive_hint=destructive and not read_only,
                           idempotent_hint=idempotent, open_world_hint=False)


@dataclass(frozen=True)
class ToolSpec:
    """One row of the registry."""

    name: str
    description: str
    params: type[Params]
    result: type[BaseModel]
    handler: Handler
    annotations: ToolAnnotations
    streams: bool = False
    c_function: str | None = None

    def tool(self) -> Tool:
        """The MCP Tool advertised in tools/list."""
        return Tool(name=self.name, description=self.description, input_schema=self.params.model_json_schema(),
                    output_schema=output_schema(self.result), annotations=self.annotations)


H = TypeVar("H", bound=Handler)


class ToolTable(list[ToolSpec]):
    """A module's tools, filled by the `tool` decorator."""

    def tool(self, name: str, params: type[Params], result: type[BaseModel], *, read_only: bool = False,
             destructive: bool = False, idempotent: bool = False, streams: bool = False,
             c_function: str | None = None) -> Callable[[H], H]:
        """Decorator adding a handler; its docstring is the tool's description.

        `c_function` names the C function the tool mirrors (the `rkllm_*` tools pass their own name).
        """
        def wrap(fn: H) -> H:
            self.append(ToolSpec(name=name, description=(fn.__doc__ or "").strip(), params=params, result=result,
                                 handler=fn, streams=streams, c_function=c_function,
                                 annotations=tool_annotations(read_only=read_only, destructive=destructive,
                                                              idempotent=idempotent)))
            return fn
        return wrap


def output_schema(result: type[BaseModel]) -> dict[str, Any]:
    """The result's schema, or the error envelope: clients such as the MCP Inspector check even an
    is_error result's structured content against the output schema, so both shapes must fit."""
    schema = result.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})
    defs["ToolError"] = ERROR_SCHEMA
    return {"type": "object", "anyOf": [schema, {"$ref": "#/$defs/ToolError"}], "$defs": defs}


def _validation_detail(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(arguments)"
        errors.append({"field": loc, "problem": err["msg"]})
    text = "; ".join(f"{e['field']}: {e['problem']}" for e in errors)
    return text, errors


class Registry:
    """The tools a server exports, by name."""

    def __init__(self, specs: Iterable[ToolSpec]):
        self.specs: dict[str, ToolSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"tool {spec.name} registered twice")
            self.specs[spec.name] = spec
        self._tools = [spec.tool() for spec in self.specs.values()]
        self._by_name = {tool.name: tool for tool in self._tools}

    def tools(self) -> list[Tool]:
        """Every Tool, in registration order."""
        return list(self._tools)

    def input_schema(self, name: str) -> dict[str, Any] | None:
        """The input schema of `name`, or None."""
        tool = self._by_name.get(name)  # the schema built once for tools/list, not rebuilt per request
        return dict(tool.input_schema) if tool else None

    async def call(self, name: str, arguments: dict[str, Any] | None, ctx: ToolContext) -> CallToolResult:
        """Validate, dispatch, shape the result, and count it. Raises MCPError only for an unknown tool."""
        started = time.perf_counter()
        result = await self._call(name, arguments, ctx)
        ctx.state.metrics.call(name, not result.is_error, (time.perf_counter() - started) * 1000)
        return result

    async def _call(self, name: str, arguments: dict[str, Any] | None, ctx: ToolContext) -> CallToolResult:
        spec = self.specs.get(name)
        if spec is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name}",
                           data={"known_tools": list(self.specs)})
        try:
            params = spec.params.model_validate(arguments or {})
        except ValidationError as exc:
            text, errors = _validation_detail(exc)
            return error_result(RkllmError("INVALID_PARAMS", function=name, detail=text, errors=errors), name)
        except Exception as exc:  # a validator that raised something else: still the caller's arguments
            log.exception("validating the arguments of %s failed", name)
            return error_result(RkllmError("INVALID_PARAMS", function=name, detail=f"{type(exc).__name__}: {exc}"),
                                name)
        try:
            enforce(params, ctx.state.settings, name)
            result = await spec.handler(ctx, params)
        except anyio.get_cancelled_exc_class():
            raise
        except RkllmError as exc:
            return error_result(exc, name)
        except Exception as exc:
            log.exception("tool %s failed", name)
            return error_result(exc, name)
        payload = result.model_dump(mode="json")
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(payload, ensure_ascii=False))],
                              structured_content=payload)

    def markdown_table(self) -> str:
        """The README's tool table, generated from the registry."""
        lines = ["| tool | C function | streams | read-only | destructive | what it does |",
                 "|---|---|---|---|---|---|"]
        for spec in self.specs.values():
            a = spec.annotations
            lines.append(
                f"| `{spec.name}` | {f'`{spec.c_function}`' if spec.c_function else '-'} | "
                f"{'yes' if spec.streams else 'no'} | {'yes' if a.read_only_hint else 'no'} | "
                f"{'yes' if a.destructive_hint else 'no'} | {spec.description.splitlines()[0]} |"
            )
        return "\n".join(lines)
