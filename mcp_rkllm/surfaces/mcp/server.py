"""The MCP surface: the registry as tools, the engine's state as resources, runs as progress.

`build_server(settings)` returns the low-level MCP `Server` (tests call it in-process; `serve`
runs it on stdio, Streamable HTTP or SSE). The engine is opened in the server's lifespan, i.e.
after the transport is up (on stdio, after the SDK has claimed the streams and diverted fd 1 to
stderr, so nothing the native library prints reaches the wire). Every handle is aborted and
freed when the last connection closes. A failed operation is an `is_error` result carrying the
error table's payload; only an unknown tool or a malformed request is a protocol error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import anyio
from mcp import MCPError
from mcp.server import Server, ServerRequestContext
from mcp.types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    ListResourcesResult,
    ListToolsResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    TextContent,
    TextResourceContents,
    Tool,
    ToolAnnotations,
)
from pydantic import BaseModel
from starlette.requests import Request

from mcp_rkllm import __version__
from mcp_rkllm.config import Settings
from mcp_rkllm.engine import Engine, Progress, Stream
from mcp_rkllm.errors import ERRORS, RkllmError
from mcp_rkllm.errors.table import ERROR_SCHEMA
from mcp_rkllm.runtime.base import Runtime
from mcp_rkllm.surfaces.http.disconnect import gone_check
from mcp_rkllm.surfaces.registry import OperationSpec, Registry, UnknownOperation, build_registry

INSTRUCTIONS = (
    "Runs Rockchip RKLLM language models on the NPU. Low-level tools mirror the C API: rkllm_init "
    "(param.model_path) returns a handle; rkllm_run with {handle, rkllm_input: {prompt_input}} generates "
    "(tokens stream as progress); rkllm_destroy frees it. Errors carry a code, a hint and whether to retry."
)

#: uri -> (name, description) of the resources the server offers.
RESOURCES: dict[str, tuple[str, str]] = {
    "rkllm://status": ("status", "Runtime (library, ABI, or the CPU runtime), loaded handles, model roots, memory."),
    "rkllm://models": ("models", "The model files the server can load, with sizes and sidecar defaults."),
    "rkllm://metrics": ("metrics", "Per-tool calls, failures and latency; tokens, tokens/s, time to first token; "
                                   "peak RSS."),
    "rkllm://errors": ("errors", "Every error code the server can return, with its number, meaning and hint."),
}


#: Progress messages that are not the reply's content start with one of these (see `progress_message`).
PROGRESS_PREFIXES = {"reasoning": "reasoning: ", "tool_call": "tool_call: ", "content": "content: "}


def progress_message(update: Progress) -> str:
    """A progress message: content as it is, reasoning and tool-call text after `reasoning: ` / `tool_call: `.
    Content that itself starts with one of the three prefixes gets `content: ` in front, so that stripping
    one leading `content: ` and leaving out the prefixed kinds gives back exactly the content."""
    if update.kind != "content":
        return PROGRESS_PREFIXES[update.kind] + update.text
    if update.text.startswith(tuple(PROGRESS_PREFIXES.values())):
        return PROGRESS_PREFIXES["content"] + update.text
    return update.text


#: The connection a request belongs to on transports where one connection is one session (SSE, stdio): set
#: around `server.run`, so every request handler of that connection sees it.
CONNECTION_OWNER: ContextVar[str | None] = ContextVar("mcp_rkllm_connection_owner", default=None)


def owner_of(request: Any) -> str | None:
    """Who owns the handles a request makes: its connection (SSE), its Streamable HTTP session (the
    Mcp-Session-Id header), or nobody (None: stateless requests, stdio's single client) - then they are shared."""
    owner = CONNECTION_OWNER.get()
    if owner is None and isinstance(request, Request):
        session = request.headers.get("mcp-session-id")
        owner = f"mcp-{session}" if session else None
    return owner


def error_result(error: RkllmError) -> CallToolResult:
    """The `is_error` tool result of a table error: the message and hint as text, the payload structured."""
    return CallToolResult(
        content=[TextContent(type="text", text=f"{error.code}: {error.message}\nHint: {error.spec.hint}")],
        structured_content={"error": error.to_dict()},
        is_error=True,
    )


def success_result(result: BaseModel) -> CallToolResult:
    """A result model as a tool result: structured content, and the same JSON as text."""
    payload = result.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(payload, ensure_ascii=False))],
                          structured_content=payload)


def output_schema(result: type[BaseModel]) -> dict[str, Any]:
    """The result's schema, or the error envelope: clients such as the MCP Inspector check even an
    is_error result's structured content against the output schema, so both shapes must fit."""
    schema = result.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})
    defs["ToolError"] = ERROR_SCHEMA
    return {"type": "object", "anyOf": [schema, {"$ref": "#/$defs/ToolError"}], "$defs": defs}


def tool_of(spec: OperationSpec) -> Tool:
    """The MCP Tool of an operation, with explicit annotations (RKLLM tools never leave this machine)."""
    annotations = ToolAnnotations(read_only_hint=spec.read_only,
                                  destructive_hint=spec.destructive and not spec.read_only,
                                  idempotent_hint=spec.idempotent, open_world_hint=False)
    return Tool(name=spec.name, description=spec.description, input_schema=spec.params.model_json_schema(),
                output_schema=output_schema(spec.result), annotations=annotations)


async def resource_data(engine: Engine, uri: str) -> Any:
    """The JSON content of one resource."""
    if uri == "rkllm://status":
        return engine.status().model_dump(mode="json")
    if uri == "rkllm://models":
        return (await engine.list_models()).model_dump(mode="json")
    if uri == "rkllm://metrics":
        return engine.metrics.snapshot()
    return [{"code": e.code, "number": e.number, "message": e.template, "retryable": e.retryable, "hint": e.hint}
            for e in ERRORS.values()]


class RkllmServer(Server[Engine]):
    """The low-level MCP Server, with the engine its tools share."""

    engine: Engine
    registry: Registry


def build_server(settings: Settings, runtime: Runtime | None = None, registry: Registry | None = None,
                 engine: Engine | None = None) -> RkllmServer:
    """The MCP server for `settings` (separate from serving it; tests call it in-process).

    `runtime` injects an already open runtime; `engine` shares one engine with other surfaces.
    """
    registry = registry or build_registry()
    engine = engine or Engine(settings, runtime)
    tools = [tool_of(spec) for spec in registry.specs.values()]
    schemas = {tool.name: tool.input_schema for tool in tools}

    @asynccontextmanager
    async def lifespan(_: Server[Engine]) -> AsyncIterator[Engine]:
        await engine.open()
        try:
            yield engine
        finally:
            with anyio.CancelScope(shield=True):
                await engine.close()

    async def list_tools(ctx: ServerRequestContext[Engine], params: PaginatedRequestParams | None) -> ListToolsResult:
        return ListToolsResult(tools=tools)

    def input_schema(name: str) -> dict[str, Any] | None:
        schema = schemas.get(name)  # the schema built once for tools/list, not rebuilt per request
        return dict(schema) if schema is not None else None

    async def call_tool(ctx: ServerRequestContext[Engine], params: CallToolRequestParams) -> CallToolResult:
        async def progress(update: Progress) -> None:
            if update.text:  # a decoded tool call has no text: it is in the result
                await ctx.session.report_progress(update.progress, update.total, progress_message(update))

        # On Streamable HTTP the request that carries tools/call also carries its response stream, so
        # its disconnection means the client left; that app watches for it (DisconnectWatch). On SSE a
        # tools/call is a POST answered at once, and that app does not watch: no check there.
        gone = gone_check(ctx.request.scope) if isinstance(ctx.request, Request) else None
        try:
            result = await registry.invoke(params.name, params.arguments, engine,
                                           Stream(progress, gone, owner_of(ctx.request)))
        except UnknownOperation as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {exc.name}",
                           data={"known_tools": exc.known}) from None
        except RkllmError as exc:
            return error_result(exc)
        return success_result(result)

    async def list_resources(ctx: ServerRequestContext[Engine],
                             params: PaginatedRequestParams | None) -> ListResourcesResult:
        return ListResourcesResult(resources=[
            Resource(uri=uri, name=name, description=description, mime_type="application/json")
            for uri, (name, description) in RESOURCES.items()])

    async def read_resource(ctx: ServerRequestContext[Engine], params: ReadResourceRequestParams,
                            ) -> ReadResourceResult:
        uri = str(params.uri)
        if uri not in RESOURCES:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown resource: {uri}", data={"uri": uri})
        data = await resource_data(engine, uri)
        return ReadResourceResult(contents=[TextResourceContents(
            uri=uri, mime_type="application/json", text=json.dumps(data, indent=1, ensure_ascii=False))])

    server = RkllmServer(
        "mcp-rkllm", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan,
        on_list_tools=list_tools, on_call_tool=call_tool, get_tool_input_schema=input_schema,
        on_list_resources=list_resources, on_read_resource=read_resource,
    )
    server.engine = engine
    server.registry = registry
    return server
