"""RockchipLlama's model-management endpoints, with the JSON keys of its guide:
`GET /v1/models/available`, `POST /v1/models/load`, `POST /v1/models/unload`, `GET /v1/models/loaded`,
`GET /v1/health`. A loaded model becomes the default (what `generate`, `chat` and `/v1` requests without a
loaded handle use). `num_npu_core` is fixed when a `.rkllm` file is converted, so a request for it is answered
with what was not applied (`not_applied`), never silently dropped. Errors use the OpenAI envelope.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mcp_rkllm import __version__
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.surfaces.api.common import Api, Handler, dumped, guarded, unsupported
from mcp_rkllm.surfaces.api.openai import bad_request, error_response


class RockchipRoutes:
    """The RockchipLlama routes over one Api (mounted before `GET /v1/models/{id}`)."""

    def __init__(self, api: Api):
        self.api = api

    def routes(self) -> list[Route]:
        g = self._guarded
        return [Route("/v1/models/available", g(self.available), methods=["GET"]),
                Route("/v1/models/loaded", g(self.loaded), methods=["GET"]),
                Route("/v1/models/load", g(self.load), methods=["POST"]),
                Route("/v1/models/unload", g(self.unload), methods=["POST"]),
                Route("/v1/health", g(self.health), methods=["GET"])]

    def _guarded(self, handler: Handler) -> Handler:
        return guarded(self.api, handler, error_response, bad_request)

    def _default(self) -> tuple[str | None, Any]:
        """The default handle and its model entry, if a model is loaded."""
        engine = self.api.engine
        try:
            handle = engine.default_handle_id("models")
        except RkllmError:
            return None, None
        return handle, engine.handles[handle]

    async def available(self, request: Request) -> Response:
        loaded = self.api.loaded_names()
        _, default = self._default()
        models = [{"name": m.name, "file": m.file, "path": str(m.path), "size_mb": round(m.size_bytes / 2**20, 1),
                   "loaded": str(m.path) in loaded} for m in await self.api.models()]
        return JSONResponse({"models": models, "total": len(models),
                             "loaded_model": default.model_name if default is not None else None})

    async def loaded(self, request: Request) -> Response:
        handle, default = self._default()
        every = dumped(await self.api.invoke("loaded_models", {}))["loaded"]
        return JSONResponse({"loaded": default is not None,
                             "model_name": default.model_name if default is not None else None,
                             "model_path": default.param.model_path if default is not None else None,
                             "handle": handle, "models": every})

    async def load(self, request: Request) -> Response:
        body = await self.api.body(request)
        ref = self.api.model_ref(body.get("model"))
        if "handle" in ref:
            raise unsupported("model", "give a model name, not a handle")
        param: dict[str, Any] = {}
        for field in ("max_context_len", "max_new_tokens"):
            if body.get(field) is not None:
                param[field] = body[field]
        not_applied = {}
        if body.get("num_npu_core") is not None:
            not_applied["num_npu_core"] = ("fixed when the .rkllm file was converted (rkllm-toolkit's num_npu_core); "
                                           "reconvert the model to change it")
        info = await self.api.resolve(ref["model"])
        handle = None if param else self.api.loaded_names().get(str(info.path))
        if handle is None:  # not loaded yet, or asked for other settings: a new handle
            arguments: dict[str, Any] = {"model": info.name, **({"param": param} if param else {})}
            handle = dumped(await self.api.invoke("load_model", arguments))["handle"]
        self.api.engine.default_handle = handle  # RockchipLlama: the model just loaded is the one used
        h = self.api.engine.handles[handle]
        message = f"Model {info.name} loaded"
        if not_applied:
            message += " (" + "; ".join(f"{k} not applied: {v}" for k, v in not_applied.items()) + ")"
        reply: dict[str, Any] = {"success": True, "message": message, "model_name": info.name, "loaded": True,
                                 "handle": handle, "max_context_len": h.param.max_context_len,
                                 "max_new_tokens": h.model.max_new_tokens}
        if not_applied:
            reply["not_applied"] = not_applied
        return JSONResponse(reply)

    async def unload(self, request: Request) -> Response:
        body = await self.api.body(request)
        if body.get("model"):
            ref = self.api.model_ref(body["model"])
            target = ref if "handle" in ref else {"model": (await self.api.resolve(ref["model"])).name}
        else:
            handle, _ = self._default()
            if handle is None:
                return JSONResponse({"success": False, "message": "No model is loaded", "loaded": False},
                                    status_code=400)
            target = {"handle": handle}
        unloaded = dumped(await self.api.invoke("unload_model", target))["unloaded"]
        return JSONResponse({"success": True, "message": f"Unloaded {len(unloaded)} handle(s)", "unloaded": unloaded,
                             "loaded": bool(self.api.engine.handles)})

    async def health(self, request: Request) -> Response:
        engine = self.api.engine
        _, default = self._default()
        ok = engine.runtime is not None
        return JSONResponse({"status": "ok" if ok else "unavailable", "version": __version__,
                             "runtime": engine.runtime.name if engine.runtime is not None else None,
                             "model_loaded": default is not None,
                             "model_name": default.model_name if default is not None else None},
                            status_code=200 if ok else 503)
