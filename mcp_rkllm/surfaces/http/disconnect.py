"""Seeing that an HTTP client went away, without taking the disconnect message from the transport.

Starlette's `Request.is_disconnected()` reads the ASGI `receive` channel itself, so polling it
swallows the `http.disconnect` the MCP SDK's SSE response is waiting for; the SDK then never
learns the stream is gone, its writer blocks, and the whole session ends. `DisconnectWatch`
instead notes the disconnect as the message passes by, on its way to whoever reads it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: The scope key under which a request's disconnect flag lives.
SCOPE_KEY = "mcp_rkllm.disconnected"


class _Flag:
    __slots__ = ("set",)

    def __init__(self) -> None:
        self.set = False


class DisconnectWatch:
    """ASGI middleware: every HTTP request gets a flag in its scope, raised when its client disconnects."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        flag = _Flag()
        scope[SCOPE_KEY] = flag

        async def watched() -> Any:
            message = await receive()
            if message.get("type") == "http.disconnect":
                flag.set = True
            return message

        await self.app(scope, watched, send)


def gone_check(scope: MutableMapping[str, Any]) -> Callable[[], Awaitable[bool]] | None:
    """An async check of whether the client of the request with this scope has disconnected, or
    None when the request did not pass through DisconnectWatch."""
    flag = scope.get(SCOPE_KEY)
    if not isinstance(flag, _Flag):
        return None

    async def gone() -> bool:
        return flag.set

    return gone
