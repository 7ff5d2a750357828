"""build_server(settings) -> the low-level MCP Server; serve(settings) runs it on stdio, HTTP or SSE.

The runtime is loaded in the server's lifespan, i.e. after the transport is up (on stdio, after
the SDK has claimed the streams and diverted fd 1 to stderr, so nothing the native library prints
reaches the wire). Every handle is aborted and destroyed when the last connection closes.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
    TextResourceContents,
)

from mcp_rkllm import __version__
from mcp_rkllm.config import Settings, is_loopback
from mcp_rkllm.errors import ERRORS
from mcp_rkllm.runtime.base import Runtime
from mcp_rkllm.tools import api, friendly
from mcp_rkllm.tools.handles import AppState
from mcp_rkllm.tools.registry import Registry, ToolContext

log = logging.getLogger("mcp_rkllm")

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


async def resource_data(state: AppState, uri: str) -> Any:
    """The JSON content of one resource."""
    if uri == "rkllm://status":
        return friendly.status_snapshot(state).model_dump(mode="json")
    if uri == "rkllm://models":
        return (await friendly.models_snapshot(state)).model_dump(mode="json")
    if uri == "rkllm://metrics":
        return state.metrics.snapshot()
    return [{"code": e.code, "number": e.number, "message": e.template, "retryable": e.retryable, "hint": e.hint}
            for e in ERRORS.values()]


def build_registry() -> Registry:
    """The registry of every exported tool."""
    return Registry([*api.TOOLS, *friendly.TOOLS])


class RkllmServer(Server[AppState]):
    """The low-level MCP Server, with the state its tools share."""

    state: AppState


def build_server(settings: Settings, runtime: Runtime | None = None) -> RkllmServer:
    """The MCP server for `settings` (separate from serving it; tests call it in-process).

    `runtime` injects an already open runtime; by default the lifespan opens one from settings.
    """
    registry = build_registry()
    state = AppState(settings, runtime)

    @asynccontextmanager
    async def lifespan(_: Server[AppState]) -> AsyncIterator[AppState]:
        state.open()
        try:
            yield state
        finally:
            with anyio.CancelScope(shield=True):
                await state.close()

    async def list_tools(ctx: ServerRequestContext[AppState], params: PaginatedRequestParams | None) -> ListToolsResult:
        return ListToolsResult(tools=registry.tools())

    async def call_tool(ctx: ServerRequestContext[AppState], params: CallToolRequestParams) -> CallToolResult:
        # On Streamable HTTP the request that carries tools/call also carries its response stream,
        # so its disconnection means the client left. (On SSE it is a POST answered at once.)
        gone = getattr(ctx.request, "is_disconnected", None) if state.request_is_response_stream else None
        return await registry.call(params.name, params.arguments,
                                   ToolContext(state, ctx.session.report_progress, gone))

    async def list_resources(ctx: ServerRequestContext[AppState],
                             params: PaginatedRequestParams | None) -> ListResourcesResult:
        return ListResourcesResult(resources=[
            Resource(uri=uri, name=name, description=description, mime_type="application/json")
            for uri, (name, description) in RESOURCES.items()])

    async def read_resource(ctx: ServerRequestContext[AppState], params: ReadResourceRequestParams,
                            ) -> ReadResourceResult:
        uri = str(params.uri)
        if uri not in RESOURCES:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown resource: {uri}", data={"uri": uri})
        data = await resource_data(state, uri)
        return ReadResourceResult(contents=[TextResourceContents(
            uri=uri, mime_type="application/json", text=json.dumps(data, indent=1, ensure_ascii=False))])

    server = RkllmServer(
        "mcp-rkllm", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan,
        on_list_tools=list_tools, on_call_tool=call_tool, get_tool_input_schema=registry.input_schema,
        on_list_resources=list_resources, on_read_resource=read_resource,
    )
    server.state = state
    return server


def configure_logging(level: str) -> None:
    """Log to stderr only: stdout is the stdio transport's wire."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve_stdio(server: Server[Any]) -> None:
    """Serve one client on stdin/stdout."""
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def transport_security(settings: Settings) -> Any:
    """Host/Origin checks (DNS-rebinding protection): loopback names on loopback; on another
    address, the --allowed-hosts list (without one, any Host: the bearer token is the guard)."""
    from mcp.server.transport_security import TransportSecuritySettings

    if is_loopback(settings.host):
        hosts = ["127.0.0.1", "localhost", "[::1]"]
    elif settings.allowed_hosts:
        hosts = list(settings.allowed_hosts)
    else:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    allowed = [_with_port(h) for h in hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=allowed,
                                     allowed_origins=[f"http://{h}" for h in allowed] +
                                     [f"https://{h}" for h in allowed])


def _with_port(host: str) -> str:
    """`host` as a Host-header pattern: any port unless one is given ("[::1]" -> "[::1]:*")."""
    if host.startswith("["):
        return host if "]:" in host else host + ":*"
    return host if ":" in host else host + ":*"


class BearerAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>` (else 401).

    The comparison is constant-time and the token is never logged.
    """

    def __init__(self, app: Any, token: str):
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if not hmac.compare_digest(given, self._token):
            body = b'{"error": "unauthorized: send Authorization: Bearer <token>"}'
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="mcp-rkllm"'),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def protect(app: Any, settings: Settings) -> Any:
    """The app behind the bearer-token check when a token is set."""
    return BearerAuth(app, settings.auth_token) if settings.auth_token else app


def http_app(server: RkllmServer, settings: Settings) -> Any:
    """The Streamable HTTP app (endpoint /mcp) with Host/Origin checks and the body-size limit."""
    server.state.request_is_response_stream = True
    return server.streamable_http_app(streamable_http_path="/mcp", host=settings.host,
                                      transport_security=transport_security(settings),
                                      max_request_body_size=settings.max_request_bytes,
                                      custom_starlette_routes=[metrics_route(server)])


def metrics_route(server: RkllmServer) -> Any:
    """GET /metrics: the metrics in Prometheus text format."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(server.state.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    return Route("/metrics", endpoint=metrics, methods=["GET"])


def sse_app(server: RkllmServer, settings: Settings) -> Any:
    """The legacy HTTP+SSE app: GET /sse opens the stream, POST /messages/ carries requests."""
    from mcp.server.sse import SseServerTransport
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    transport = SseServerTransport("/messages/", security_settings=transport_security(settings),
                                   max_request_body_size=settings.max_request_bytes)

    async def handle_sse(request: Request) -> Response:
        async with transport.connect_sse(request.scope, request.receive, request._send) as (read, write):
            await server.run(read, write, server.create_initialization_options())
        return Response()

    return Starlette(routes=[Route("/sse", endpoint=handle_sse, methods=["GET"]),
                             Mount("/messages/", app=transport.handle_post_message), metrics_route(server)])


async def serve_http(app: Any, settings: Settings) -> None:
    """Serve an ASGI app with uvicorn on settings.host:settings.port."""
    import uvicorn

    config = uvicorn.Config(app, host=settings.host.strip("[]"), port=settings.port,
                            log_level=settings.log_level.lower(), lifespan="on")
    await uvicorn.Server(config).serve()


async def serve(settings: Settings) -> None:
    """Build the server and serve it on the configured transport until the client or a signal ends it."""
    server = build_server(settings)
    where = "stdin/stdout" if settings.transport == "stdio" else (
        f"http://{settings.host}:{settings.port}" + ("/mcp" if settings.transport == "http" else "/sse"))
    log.info("mcp-rkllm %s serving %s on %s", __version__, settings.transport, where)
    if settings.transport == "stdio":
        await serve_stdio(server)
    elif settings.transport == "http":
        await serve_http(protect(http_app(server, settings), settings), settings)
    else:
        await serve_http(protect(sse_app(server, settings), settings), settings)
