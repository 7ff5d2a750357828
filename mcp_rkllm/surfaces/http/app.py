"""The HTTP app: Streamable HTTP (/mcp) with JSON-RPC (/jsonrpc), or legacy SSE (/sse), /metrics, behind the
bearer token, Host/Origin checks and the body-size limit. Later routes (OpenAI, Ollama) mount beside /mcp.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import AsyncIterator
from typing import Any

import anyio

from mcp_rkllm.config import Settings, is_loopback
from mcp_rkllm.engine.engine import Engine
from mcp_rkllm.surfaces.http.disconnect import DisconnectWatch
from mcp_rkllm.surfaces.mcp.server import CONNECTION_OWNER, RkllmServer


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
    """The app behind the bearer-token check when a token is set, and CORS in front when origins are allowed
    (in front: a browser's pre-flight OPTIONS carries no token)."""
    if settings.auth_token:
        app = BearerAuth(app, settings.auth_token)
    if settings.cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=list(settings.cors_origin), allow_methods=["*"], allow_headers=["*"],
                             expose_headers=["mcp-session-id", "retry-after"])
    return app


def http_app(server: RkllmServer, settings: Settings) -> Any:
    """The Streamable HTTP app (endpoint /mcp) with Host/Origin checks and the body-size limit, and beside it the
    HTTP APIs `settings.api` names (JSON-RPC, OpenAI, Ollama, RockchipLlama), all on the server's engine."""
    from mcp_rkllm.surfaces.api import api_routes

    routes = [metrics_route(server, settings), *api_routes(server.registry, server.engine, settings)]
    if "jsonrpc" in settings.api:
        routes.append(jsonrpc_route(server, settings))
    app: Any = SessionEnd(DisconnectWatch(server.streamable_http_app(streamable_http_path="/mcp", host=settings.host,
                                                      transport_security=transport_security(settings),
                                                      max_request_body_size=settings.max_request_bytes,
                                                      custom_starlette_routes=routes)), server)
    return app


class SessionEnd:
    """ASGI middleware: when a client ends its Streamable HTTP session (DELETE /mcp with its Mcp-Session-Id),
    the handles the session made with rkllm_init are freed."""

    def __init__(self, app: Any, server: RkllmServer):
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        session = None
        if scope["type"] == "http" and scope["method"] == "DELETE":
            session = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"mcp-session-id"), None)
        if session is None:
            await self.app(scope, receive, send)
            return
        status = 0

        async def watched(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watched)
        if 200 <= status < 300:
            await self.server.engine.release_owner(f"mcp-{session}")


def jsonrpc_route(server: RkllmServer, settings: Settings) -> Any:
    """POST /jsonrpc: the server's operations as JSON-RPC methods, on its engine (models shared with /mcp)."""
    from mcp_rkllm.surfaces.jsonrpc.http import jsonrpc_route as route
    from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher

    return route(Dispatcher(server.registry, server.engine), settings)


def metrics_route(server: RkllmServer, settings: Settings) -> Any:
    """GET /metrics: the metrics in Prometheus text format, behind the same Host/Origin checks as /mcp (the
    SDK checks only its own endpoints; a DNS-rebinding page could otherwise read the usage)."""
    from mcp.server.transport_security import TransportSecurityMiddleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    security = TransportSecurityMiddleware(transport_security(settings))

    async def metrics(request: Request) -> Response:
        refused = await security.validate_request(request, is_post=False)
        if refused is not None:
            return refused
        return PlainTextResponse(server.engine.metrics.prometheus(), media_type="text/plain; version=0.0.4")

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
        owner = f"mcp-sse-{secrets.token_hex(6)}"  # this connection is one session: it owns its handles
        token = CONNECTION_OWNER.set(owner)
        try:
            async with transport.connect_sse(request.scope, request.receive, request._send) as (read, write):
                await server.run(read, write, server.create_initialization_options())
        finally:
            CONNECTION_OWNER.reset(token)
            with anyio.CancelScope(shield=True):
                await server.engine.release_owner(owner)
        return Response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # One engine user for the app's life: models loaded by name outlive any one SSE connection.
        await server.engine.open()
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await server.engine.close()

    return Starlette(lifespan=lifespan, routes=[Route("/sse", endpoint=handle_sse, methods=["GET"]),
                             Mount("/messages/", app=transport.handle_post_message), metrics_route(server, settings)])


async def serve_http(app: Any, settings: Settings, engine: Engine | None = None) -> None:
    """Serve an ASGI app with uvicorn on settings.host:settings.port. With the server's `engine`, as a board of a
    fleet: /healthz, /readyz, the X-RKLLM-Server header, and a drain on SIGTERM (surfaces/http/health.py)."""
    import math

    import uvicorn

    from mcp_rkllm.surfaces.http.health import DrainingServer, Fleet

    fleet = Fleet(engine, settings) if engine is not None else None
    # log_config=None: uvicorn's lines go through the server's own stderr handler (serve.configure_logging), which
    # never blocks on a full pipe, instead of handlers of uvicorn's that write to stderr directly.
    config = uvicorn.Config(fleet.wrap(app) if fleet is not None else app, host=settings.host.strip("[]"),
                            port=settings.port, log_level=settings.log_level.lower(), lifespan="on",
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace), log_config=None)
    # uvicorn stops on SIGTERM/SIGINT, then raises the signal again for the handler it found installed: with
    # the default one, the process would die there, before the caller's own cleanup (the JSON-RPC socket
    # file). A handler that does nothing lets serve() return, and the process exit 0 after cleaning up.
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    await DrainingServer(config, fleet).serve()
