"""Every error a client can get back: see `mcp_rkllm.errors.table`."""

from mcp_rkllm.errors.table import ERRORS, ErrorSpec, RkllmError, error_result

__all__ = ["ERRORS", "ErrorSpec", "RkllmError", "error_result"]
