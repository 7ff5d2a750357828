"""The HTTP surfaces: one Starlette app (auth, Host/Origin checks, body limit, /metrics) with /mcp and /sse."""
