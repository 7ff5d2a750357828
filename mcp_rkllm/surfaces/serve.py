"""Serving: `serve(settings)` runs the MCP server on stdio, Streamable HTTP or SSE, or the JSON-RPC socket, until
the client or a signal ends it; `configure_logging` sends logs to stderr (stdout is the stdio transport's wire)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import anyio
from mcp.server import Server

from mcp_rkllm import __version__
from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.http.app import http_app, protect, serve_http, sse_app
from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher
from mcp_rkllm.surfaces.mcp.server import RkllmServer, build_server

log = logging.getLogger("mcp_rkllm")


def configure_logging(level: str) -> None:
    """Log to stderr only: stdout is the stdio transport's wire."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


#: Requests in flight on stdio beyond what the engine itself lets wait (each loaded model's running call and
#: its queue): a request blocked in a full queue never holds back the line that would cancel it.
STDIO_SPARE_REQUESTS = 64


async def serve_stdio(server: Server[Any], settings: Settings) -> None:
    """Serve one client on stdin/stdout until it leaves (EOF) or SIGTERM/SIGINT: then running generations
    are aborted and every handle freed (the server's lifespan closes the engine) and this returns."""
    from mcp_rkllm.surfaces.mcp.stdio import stdio_streams

    in_flight = settings.max_loaded_models * (settings.max_queued_runs + 1) + STDIO_SPARE_REQUESTS
    async with stdio_streams(max_line_bytes=settings.max_request_bytes, max_in_flight=in_flight,
                             max_in_flight_bytes=2 * settings.max_request_bytes) as (read, write), \
            anyio.create_task_group() as tg:
        serving = anyio.CancelScope()
        tg.start_soon(_stop_on_signals, serving)
        with serving:
            await server.run(read, write, server.create_initialization_options())
        tg.cancel_scope.cancel()


async def _stop_on_signals(serving: anyio.CancelScope) -> None:
    """The first SIGTERM or SIGINT cancels `serving` (an orderly exit, code 0); a second one exits at once,
    for a shutdown that hangs (the handler stays installed until the end, so it is never the default one)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if serving.cancel_called:
                log.warning("%s again: exiting without waiting for the shutdown", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("%s: aborting the running generations, freeing the handles, exiting",
                     signal.Signals(signum).name)
            serving.cancel()


async def serve(settings: Settings) -> None:
    """Build the server and serve it on the configured transport until the client or a signal ends it."""
    server = build_server(settings)
    if settings.transport == "jsonrpc":
        from mcp_rkllm.surfaces.jsonrpc.unix import serve_jsonrpc

        log.info("mcp-rkllm %s serving JSON-RPC", __version__)
        await serve_jsonrpc(Dispatcher(server.registry, server.engine), settings.socket, settings.socket_mode,
                            settings.max_request_bytes)
        return
    where = "stdin/stdout" if settings.transport == "stdio" else (
        f"http://{settings.host}:{settings.port}" + ("/mcp" if settings.transport == "http" else "/sse"))
    log.info("mcp-rkllm %s serving %s on %s", __version__, settings.transport, where)
    if settings.transport == "stdio":
        await serve_stdio(server, settings)
    elif settings.transport == "http" and settings.socket:
        await serve_http_and_socket(server, settings)
    elif settings.transport == "http":
        await serve_http(protect(http_app(server, settings), settings), settings, server.engine)
    else:
        await serve_http(protect(sse_app(server, settings), settings), settings, server.engine)


async def serve_http_and_socket(server: RkllmServer, settings: Settings) -> None:
    """Streamable HTTP and the JSON-RPC socket together, on one engine, until the HTTP server stops."""
    import anyio

    from mcp_rkllm.surfaces.jsonrpc.unix import serve_jsonrpc

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_jsonrpc, Dispatcher(server.registry, server.engine), settings.socket,
                      settings.socket_mode, settings.max_request_bytes, False)  # uvicorn owns the signals
        await serve_http(protect(http_app(server, settings), settings), settings, server.engine)
        tg.cancel_scope.cancel()
