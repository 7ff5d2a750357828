"""mcp-rkllm: an MCP server for Rockchip RKLLM NPU language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mcp-rkllm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
