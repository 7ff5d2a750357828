"""A board in a fleet (README "Several boards"): `GET /healthz` and `GET /readyz` for the proxy's checks, the
`X-RKLLM-Server` / `X-RKLLM-Route` headers on every response, and the SIGTERM drain of `serve_http`.

- `/healthz`: 200 while the server can take work; 503 with a reason while it shuts down (SIGTERM) or when its
  runtime failed to open. `/readyz`: the same, and 503 too when every loaded model's queue is full (the next
  call on any of them would be refused). Both answer without the bearer token and before the Host check: they
  say nothing but the state and the server id, and a proxy's health check carries neither.
- `X-RKLLM-Server: <server id>` says which board answered; `X-RKLLM-Route: <tag>` is the tag that starts this
  board's handle ids (`h-<tag>-...`): HAProxy learns tag -> board from it (deploy/haproxy.cfg).
- SIGTERM (`DrainingServer`): the listening socket closes and idle connections with it; requests that still
  arrive get 503; running requests and generations get `--shutdown-grace` seconds to finish; what remains then
  is aborted (uvicorn cancels the requests, the engine's close aborts the runs) and the process exits 0. A
  second SIGTERM, or SIGINT, stops without waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from mcp_rkllm.config import Settings

if TYPE_CHECKING:
    from mcp_rkllm.engine.engine import Engine

log = logging.getLogger("mcp_rkllm")

#: Requests that are not work: never refused while draining, never waited for.
PROBES = ("/healthz", "/readyz", "/metrics")
#: Long-lived streams (a session's standalone stream, a legacy SSE connection): never waited for.
STREAMS = ("/mcp", "/sse")
#: What uvicorn gives the connections left once the drain is over (long-lived streams) before cancelling them.
LAST_SECONDS = 1


class Fleet:
    """What a proxy needs to know of this board: its id, whether it takes work, and what runs now."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.draining = False
        self.in_flight = 0
        """HTTP requests being served now, probes and long-lived streams not counted."""
        self.headers = [(b"x-rkllm-server", engine.server_id.encode("latin-1")),
                        (b"x-rkllm-route", engine.route_tag.encode("latin-1"))]

    def health(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of /healthz."""
        engine = self.engine
        body: dict[str, Any] = {"server": engine.server_id}
        if self.draining:
            return 503, {**body, "status": "shutting down",
                         "reason": "SIGTERM: running generations are finishing; no new work is taken"}
        if engine.runtime_error is not None:
            return 503, {**body, "status": "no runtime",
                         "reason": f"the runtime failed to open ({engine.runtime_error.code})"}
        if engine.runtime is None:
            return 503, {**body, "status": "starting", "reason": "the runtime is not open yet"}
        return 200, {**body, "status": "ok"}

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of /readyz: /healthz, and 503 when every loaded model's queue is full."""
        status, body = self.health()
        if status != 200:
            return status, body
        handles = list(self.engine.handles.values())
        limit = self.settings.max_queued_runs
        full = sum(1 for h in handles if h.slot.waiting >= limit)
        body.update(models=len(handles), running=sum(1 for h in handles if h.running),
                    queued=sum(h.slot.waiting for h in handles), queues_full=full)
        if handles and full == len(handles):
            return 503, {**body, "status": "busy",
                         "reason": f"every loaded model's queue is full ({limit} calls waiting on each)"}
        return 200, {**body, "status": "ready"}

    def busy(self) -> bool:
        """Whether anything still runs: a request, or a generation (an rkllm_run_async one included)."""
        return self.in_flight > 0 or any(h.running or h.slot.held for h in self.engine.handles.values())

    def wrap(self, app: Any) -> Any:
        """The app behind this board's probes, headers and drain (outermost: a 401 says which board, too)."""
        return FleetMiddleware(app, self)


class FleetMiddleware:
    """ASGI middleware: answers /healthz and /readyz, adds the board's headers to every response, counts the
    requests in flight and refuses new ones (503) while the server drains."""

    def __init__(self, app: Any, fleet: Fleet):
        self.app = app
        self.fleet = fleet

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fleet = self.fleet
        path, method = scope.get("path", ""), scope.get("method", "")

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *fleet.headers]}
            await send(message)

        if path in ("/healthz", "/readyz") and method in ("GET", "HEAD"):
            status, body = fleet.health() if path == "/healthz" else fleet.readiness()
            await _json(with_headers, status, body, head=method == "HEAD")
            return
        probe = path in PROBES
        stream = method == "GET" and path in STREAMS
        if fleet.draining and not probe and method != "DELETE":  # DELETE ends a session: let it free its handles
            message = f"server {fleet.engine.server_id} is shutting down and takes no new requests; retry elsewhere"
            await _json(with_headers, 503, {"jsonrpc": "2.0", "id": None, "error": {
                "code": -32000, "message": message, "type": "server_shutting_down"}},
                extra=[(b"retry-after", b"1"), (b"connection", b"close")])
            return
        counted = not probe and not stream
        if counted:
            fleet.in_flight += 1
        try:
            await self.app(scope, receive, with_headers)
        finally:
            if counted:
                fleet.in_flight -= 1


async def _json(send: Any, status: int, body: dict[str, Any], head: bool = False,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"), *(extra or [])]})
    await send({"type": "http.response.body", "body": b"" if head else data})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM drains (see the module's docstring) before it stops."""

    def __init__(self, config: uvicorn.Config, fleet: Fleet | None):
        super().__init__(config)
        self.fleet = fleet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        fleet = self.fleet
        if (fleet is not None and sig == signal.SIGTERM and not fleet.draining and not self.should_exit
                and self._loop is not None):
            self._captured_signals.append(sig)
            fleet.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        if fleet is not None and fleet.draining and not self.should_exit:
            log.warning("%s while draining: aborting what still runs", signal.Signals(sig).name)
            self.config.timeout_graceful_shutdown = LAST_SECONDS
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        assert self.fleet is not None
        grace = self.fleet.settings.shutdown_grace
        log.info("SIGTERM: refusing new requests; running generations have %g s to finish", grace)
        for server in getattr(self, "servers", []):  # new connections are refused: a proxy retries elsewhere
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones after their response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.fleet.busy() and loop.time() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        if self.fleet.busy():
            log.warning("shutdown grace of %g s is over: aborting what still runs", grace)
        else:
            log.info("drained: nothing runs any more; stopping")
        self.config.timeout_graceful_shutdown = LAST_SECONDS
        self.should_exit = True
