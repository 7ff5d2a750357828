"""`POST /jsonrpc`: the JSON-RPC methods over HTTP, beside `/mcp` and on the same engine.

The body is one request, a notification or a batch. The answer is plain JSON (200; 204 when nothing is
due), or, when the client accepts `text/event-stream`, SSE events: each `rkllm.callback` notification,
then the response. The same bearer token (the app's middleware), Host/Origin checks and body limit as
`/mcp` apply. A client that disconnects gets its runs aborted.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request

from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.api.streaming import ClientGone, cancel_on_disconnect, while_connected
from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher, Peer, RpcError, parse
from mcp_rkllm.surfaces.jsonrpc.unix import encode


class JsonRpcEndpoint:
    """The ASGI app of `/jsonrpc`."""

    def __init__(self, dispatcher: Dispatcher, settings: Settings):
        from mcp.server.transport_security import TransportSecurityMiddleware

        from mcp_rkllm.surfaces.http.app import transport_security

        self.dispatcher = dispatcher
        self.security = TransportSecurityMiddleware(transport_security(settings))
        self.max_body = settings.max_request_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        refused = await self.security.validate_request(request, is_post=True)
        if refused is not None:
            await refused(scope, receive, send)
            return
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    await _reply(send, 413, RpcError(-32600, f"Invalid Request: the body is larger than "
                                                             f"{self.max_body} bytes").response(None))
                    return
        except ClientDisconnect:  # the client left before sending its whole body: nobody to answer
            return
        try:
            message = parse(bytes(body))
        except RpcError as exc:
            await _reply(send, 200, exc.response(None))
            return
        if "text/event-stream" in request.headers.get("accept", ""):
            await self._events(message, receive, send)
            return
        try:
            answer = await while_connected(receive, lambda: self.dispatcher.handle(message, Peer(notify=None)))
        except ClientGone:  # the client disconnected: its runs were aborted, nobody reads an answer
            return
        if answer is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await _reply(send, 200, answer)

    async def _events(self, message: Any, receive: Any, send: Any) -> None:
        """Notifications and the answer as SSE events, each as it happens."""
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async with anyio.create_task_group() as tg:
            async def event(payload: Any) -> None:
                try:
                    await send({"type": "http.response.body", "body": b"data: " + encode(payload) + b"\n",
                                "more_body": True})
                except OSError:  # the client went away: abort what it started
                    tg.cancel_scope.cancel()
                    await anyio.lowlevel.checkpoint()
                    raise

            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            answer = await self.dispatcher.handle(message, Peer(notify=event))
            if answer is not None:
                await event(answer)
            tg.cancel_scope.cancel()
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _reply(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def jsonrpc_route(dispatcher: Dispatcher, settings: Settings) -> Any:
    """The starlette Route of `POST /jsonrpc`."""
    from starlette.routing import Route

    return Route("/jsonrpc", endpoint=JsonRpcEndpoint(dispatcher, settings), methods=["POST"])
