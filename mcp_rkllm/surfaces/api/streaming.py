"""Responses that live as long as a run: a body streamed as it is produced, or one answer computed while
watching the client. Either way a client that disconnects cancels the work (the relay then aborts the run,
so `rkllm_abort` reaches the runtime and the handle is free for the next request at once)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.responses import Response

from mcp_rkllm.errors import RkllmError

T = TypeVar("T")

#: Sends one piece of a streamed body; raises (after cancelling the producer) when the client has gone.
Emit = Callable[[bytes], Awaitable[None]]


async def cancel_on_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    """Cancel `scope` when the client disconnects (call after the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


@contextlib.asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """Re-raise a task group's single failure as itself (callers handle RkllmError, not groups)."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its work was cancelled)."""


async def while_connected(receive: Any, work: Callable[[], Awaitable[T]]) -> T:
    """`work()`'s result, or ClientGone after cancelling it when the client disconnects first."""
    outcome: list[T] = []
    async with _unwrapped(), anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
        outcome.append(await work())
        tg.cancel_scope.cancel()
    if not outcome:
        raise ClientGone
    return outcome[0]


class LiveStream(Response):
    """A 200 response whose body `produce(emit)` writes piece by piece; the client leaving cancels it.

    The status line goes out with the first piece: a table error `produce` raises before that is answered
    by `error_response(error)` with its own status instead (so an unknown model is still a 404).
    """

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], media_type: str,
                 error_response: Callable[[RkllmError], Response], headers: dict[str, str] | None = None):
        super().__init__(media_type=media_type, headers={"cache-control": "no-cache", "x-accel-buffering": "no",
                                                         **(headers or {})})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # chunked, not empty
        self.produce = produce
        self.error_response = error_response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False
        failed: RkllmError | None = None
        async with _unwrapped(), anyio.create_task_group() as tg:
            async def emit(data: bytes) -> None:
                nonlocal started
                try:
                    if not started:
                        started = True
                        await send({"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                except OSError:  # the client went away: stop producing for nobody
                    tg.cancel_scope.cancel()
                    await anyio.lowlevel.checkpoint()
                    raise

            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                await self.produce(emit)
            except RkllmError as exc:
                if started:
                    raise
                failed = exc
            tg.cancel_scope.cancel()
        if failed is not None:
            await self.error_response(failed)(scope, receive, send)
        elif started:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
