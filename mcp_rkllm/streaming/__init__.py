"""Streaming: runtime events from native threads to MCP progress notifications (`relay`)."""
