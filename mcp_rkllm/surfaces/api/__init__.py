"""The HTTP APIs beside `/mcp`: OpenAI (`/v1`), Ollama (`/api`), RockchipLlama's model management, on one engine."""

from __future__ import annotations

from typing import Any

from mcp_rkllm.config import Settings
from mcp_rkllm.engine import Engine
from mcp_rkllm.surfaces.registry import Registry


def api_routes(registry: Registry, engine: Engine, settings: Settings) -> list[Any]:
    """The routes of the APIs `settings.api` names, RockchipLlama's fixed `/v1/models/...` paths before
    OpenAI's `GET /v1/models/{id}`."""
    from mcp_rkllm.surfaces.api.common import Api
    from mcp_rkllm.surfaces.api.ollama import OllamaRoutes
    from mcp_rkllm.surfaces.api.openai import OpenAiRoutes
    from mcp_rkllm.surfaces.api.rockchip import RockchipRoutes

    api = Api(registry, engine, settings)
    routes: list[Any] = []
    openai = OpenAiRoutes(api)
    if "openai" in settings.api:
        routes += openai.routes()
    if "rockchip" in settings.api:
        routes += RockchipRoutes(api).routes()
    if "openai" in settings.api:
        routes.append(openai.model_route())
    if "ollama" in settings.api:
        routes += OllamaRoutes(api).routes()
    return routes
