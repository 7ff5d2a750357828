"""Surfaces: thin adapters from protocols (MCP, JSON-RPC, HTTP APIs) onto the engine, through the registry."""
