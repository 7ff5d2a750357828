"""The engine: the application (models, handles, runs, history, limits, metrics), with no transport in it."""

from mcp_rkllm.engine.engine import Engine
from mcp_rkllm.engine.relay import NO_STREAM, GoneCheck, Progress, Stream, StreamSink

__all__ = ["NO_STREAM", "Engine", "GoneCheck", "Progress", "Stream", "StreamSink"]
