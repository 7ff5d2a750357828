"""The MCP surface: the registry as tools, the engine's state as resources, runs as progress.

`build_server(settings)` returns the low-level MCP `Server` (tests call it in-process; `serve`
runs it on stdio, Streamable HTTP or SSE). The engine is opened in the server's lifespan, i.e.
after the transport is up (on stdio, after the SDK has claimed the streams and diverted fd 1 to
stderr, so nothing the native library prints reaches the wire). Every handle is aborted and
freed when the last connection closes. A failed operation is an `is_error` result carrying the
error table's payload; only an unknown tool or a malformed request is a protocol error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import anyio
from mcp import MCPError
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    EmptyResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    ListToolsResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    SetLevelRequestParams,
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


def instructions(settings: Settings) -> str:
    """What the server tells an agent at initialize: the friendly tools first, then the C-level ones; the runtime
    it will most likely use (decided without loading anything)."""
    from mcp_rkllm.runtime import choose_runtime

    try:
        kind, _ = choose_runtime(settings.runtime, settings.library)
    except RkllmError:
        kind = "none"
    where = {"native": "Rockchip's NPU (RKLLM, .rkllm models)",
             "cpu": "the CPU (llama.cpp, .gguf models; no NPU runtime found)"}.get(kind, "no runtime yet")
    return (f"Runs local language models on {where}. Start with the friendly tools: list_models shows the models; "
            "generate {prompt} and chat {messages} answer (loading the default model, or `model`, on first use; "
            "tokens stream as progress; chat also takes OpenAI-style tools and returns tool_calls). load_model / "
            "unload_model manage models. The rkllm_* tools mirror the RKLLM C API for fine control (rkllm_init "
            "takes param.model_path: a model name from list_models or a path inside the model folders). Errors "
            "carry a code, a hint and whether retrying helps.")


#: uri -> (name, description) of the resources the server offers.
RESOURCES: dict[str, tuple[str, str]] = {
    "rkllm://status": ("status", "Runtime (library, ABI, or the CPU runtime), loaded handles, model roots, memory."),
    "rkllm://models": ("models", "The model files the server can load, with sizes and sidecar defaults."),
    "rkllm://metrics": ("metrics", "Per-tool calls, failures and latency; tokens, tokens/s, time to first token; "
                                   "peak RSS."),
    "rkllm://errors": ("errors", "Every error code the server can return, with its number, meaning and hint."),
}


#: Progress messages that are not the reply's content start with one of these (see `progress_message`).
PROGRESS_PREFIXES = {"reasoning": "reasoning: ", "tool_call": "tool_call: ", "status": "status: ",
                     "content": "content: "}


def progress_message(update: Progress) -> str:
    """A progress message: content as it is, reasoning and tool-call text after `reasoning: ` / `tool_call: `,
    heartbeats (loading, reading the prompt) after `status: `. Content that itself starts with one of these
    prefixes gets `content: ` in front, so that stripping
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


#: Integer and float bounds at least this large are C type limits, not advice: left out of the advertised schema
#: (the server still checks them).
_C_LIMIT = 2**31


def compact_schema(schema: Any) -> Any:
    """A JSON Schema as tools/list advertises it: without generated titles, null defaults, C-type bounds,
    `additionalProperties: false` and OpenAPI's `discriminator`, `anyOf [T, null]` as T. The server checks
    the full schema (unknown fields are still refused, by name); an agent reads about half as many tokens."""
    if isinstance(schema, list):
        return [compact_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: compact_schema(v) for k, v in schema.items()
           if not (k == "title" and isinstance(v, str)) and not (k == "default" and v is None)
           and not (k in ("minimum", "maximum") and isinstance(v, int | float) and abs(v) >= _C_LIMIT)
           and not (k == "additionalProperties" and v is False) and k != "discriminator"}
    variants = out.get("anyOf")
    if isinstance(variants, list) and len(variants) == 2 and {"type": "null"} in variants:
        other = next(v for v in variants if v != {"type": "null"})
        del out["anyOf"]
        out = {**other, **out}
    return out


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
    # No output schema: results are described by rpc.discover and the rkllm://schemas/{tool} resource. Output
    # schemas doubled tools/list (about 110 KB, 27k tokens, for 25 tools) for what agents read as text anyway.
    schema = spec.params.model_json_schema()
    description = spec.description
    if not spec.name.startswith(("rkllm_", "rknn_")) or spec.schema_like:
        schema = _c_structs_summarised(schema)
    if spec.schema_like:
        description += f"\n\nArguments: as {spec.schema_like} (its schema spells out the structs)."
    return Tool(name=spec.name, description=description, input_schema=compact_schema(schema),
                annotations=annotations)


_PART_MODELS = {"TextPart", "ImagePart", "ImageUrlPart", "ImageUrlRef"}


def _c_structs_summarised(schema: dict[str, Any]) -> dict[str, Any]:
    """A friendly tool's schema with the RKLLM C structs it takes (an optional `param` override) shown as an
    object and a one-line description; the full structs are in the rkllm_* tools and rkllm://schemas/{tool}."""
    defs = schema.get("$defs", {})
    # The content-part shapes are spelled out in the `content` description; the C structs in the rkllm_* tools.
    structs = {name for name in defs if name.startswith("RKLLM") or name in _PART_MODELS}
    if not structs:
        return schema

    def summarised(node: Any) -> Any:
        if isinstance(node, list):
            return [summarised(n) for n in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref", "")
        name = ref.removeprefix("#/$defs/")
        if name in structs:
            doc = (defs[name].get("description") or name).split("\n")[0]
            where = "the content description" if name in _PART_MODELS else "the rkllm_* tools"
            return {"type": "object", "description": f"{name}: {doc} (spelled out in {where})"}
        return {k: summarised(v) for k, v in node.items() if k != "$defs"}

    kept = {k: summarised(v) for k, v in defs.items() if k not in structs}
    out = summarised(schema)
    if kept:
        out["$defs"] = kept
    return out  # type: ignore[no-any-return]


#: The tool groups `--tools` chooses from: which operations each one exports.
TOOL_GROUPS: dict[str, Callable[[OperationSpec], bool]] = {
    "friendly": lambda spec: not spec.name.startswith(("rkllm_", "rknn_")),
    "rkllm": lambda spec: spec.name.startswith("rkllm_"),
    "rknn": lambda spec: spec.name.startswith("rknn_"),
    "all": lambda spec: True,
}


def exported(registry: Registry, groups: Iterable[str]) -> list[OperationSpec]:
    """The operations in any of `groups`, in registry order."""
    chosen = [TOOL_GROUPS[g] for g in groups]
    return [spec for spec in registry.specs.values() if any(pick(spec) for pick in chosen)]


#: uri template -> (name, description) of the per-item resources.
TEMPLATES: dict[str, tuple[str, str]] = {
    "rkllm://models/{name}": ("model", "One model: its file, size, family, runtime, whether it loads here, and the "
                                       "handles serving it."),
    "rkllm://schemas/{tool}": ("schema", "A tool's argument and result JSON Schemas (tools/list carries only the "
                                         "arguments)."),
}


async def template_data(engine: Engine, registry: Registry, uri: str) -> Any:
    """The JSON content of a templated resource, or None when `uri` names nothing."""
    from urllib.parse import unquote

    if uri.startswith("rkllm://models/"):
        name = unquote(uri.removeprefix("rkllm://models/"))
        listing = await engine.list_models()
        entry = next((m for m in listing.models if name in (m.name, m.file)), None)
        if entry is None:
            return None
        handles = [h.id for h in engine.visible_handles(None) if h.param.model_path == entry.path]
        return {**entry.model_dump(mode="json"), "handles": handles}
    if uri.startswith("rkllm://schemas/"):
        spec = registry.specs.get(unquote(uri.removeprefix("rkllm://schemas/")))
        if spec is None:
            return None
        return {"tool": spec.name, "arguments": spec.params.model_json_schema(),
                "result": output_schema(spec.result)}
    return None


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


# Sending log messages uses the logging capability, deprecated from protocol 2026-07-28 on (see set_level).
warnings.filterwarnings("ignore", category=MCPDeprecationWarning, module=__name__)

#: Python log levels of MCP's logging levels.
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL, "alert": logging.CRITICAL,
           "emergency": logging.CRITICAL}


class LogRelay(logging.Handler):
    """Sends the server's log records (loads, unloads, crashes, refused paths, one line per call) to the MCP
    sessions that asked with logging/setLevel, as notifications/message at or above the level each asked for.
    Records come from any thread; they are sent from the session's event loop."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._sessions: dict[int, tuple[Any, int, asyncio.AbstractEventLoop]] = {}

    def subscribe(self, session: Any, level: str) -> None:
        if not self._sessions:
            logging.getLogger("mcp_rkllm").addHandler(self)
        self._sessions[id(session)] = (session, _LEVELS.get(level, logging.INFO), asyncio.get_running_loop())

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("mcp_rkllm.surfaces.mcp"):
            return  # never about sending these notifications themselves
        text = self.format(record)
        mcp_level = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                     logging.ERROR: "error"}.get(record.levelno, "critical")
        for key, (session, level, loop) in list(self._sessions.items()):
            if record.levelno >= level:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the session is gone
                    loop.call_soon_threadsafe(self._send, key, session, mcp_level, text, record.name)

    def _send(self, key: int, session: Any, level: str, text: str, logger: str) -> None:
        async def send() -> None:
            try:
                await session.send_log_message(level, text, logger=logger)
            except Exception:  # the session ended: stop sending to it
                self._sessions.pop(key, None)
                if not self._sessions:
                    logging.getLogger("mcp_rkllm").removeHandler(self)

        task = asyncio.ensure_future(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    _tasks: set[asyncio.Future[None]] = set()


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
    tools = [tool_of(spec) for spec in exported(registry, settings.tools)]
    names = {tool.name for tool in tools}
    schemas = {spec.name: spec.params.model_json_schema() for spec in registry.specs.values() if spec.name in names}

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
            if params.name not in names:  # not exported (--tools)
                raise UnknownOperation(params.name, sorted(names))
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
        data = await resource_data(engine, uri) if uri in RESOURCES else await template_data(engine, registry, uri)
        if data is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown resource: {uri}",
                           data={"uri": uri, "resources": list(RESOURCES), "templates": list(TEMPLATES)})
        return ReadResourceResult(contents=[TextResourceContents(
            uri=uri, mime_type="application/json", text=json.dumps(data, indent=1, ensure_ascii=False))])

    async def list_templates(ctx: ServerRequestContext[Engine],
                             params: PaginatedRequestParams | None) -> ListResourceTemplatesResult:
        return ListResourceTemplatesResult(resource_templates=[
            ResourceTemplate(uri_template=uri, name=name, description=description, mime_type="application/json")
            for uri, (name, description) in TEMPLATES.items()])

    async def set_level(ctx: ServerRequestContext[Engine], params: SetLevelRequestParams) -> EmptyResult:
        log_relay.subscribe(ctx.session, params.level)
        return EmptyResult()

    log_relay = LogRelay()
    with warnings.catch_warnings():
        # The logging capability is deprecated from protocol 2026-07-28 on; clients of the earlier versions
        # (most of them today) still show these messages in their log panels.
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        server = RkllmServer(
            "mcp-rkllm", version=__version__, instructions=instructions(settings), lifespan=lifespan,
            on_list_tools=list_tools, on_call_tool=call_tool, get_tool_input_schema=input_schema,
            on_list_resources=list_resources, on_read_resource=read_resource,
            on_list_resource_templates=list_templates, on_set_logging_level=set_level,
        )
    server.engine = engine
    server.registry = registry
    return server
