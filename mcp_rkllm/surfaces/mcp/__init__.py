"""The MCP surface: `build_server(settings)` is the low-level MCP Server on the engine."""

from mcp_rkllm.surfaces.mcp.server import RkllmServer, build_server

__all__ = ["RkllmServer", "build_server"]
