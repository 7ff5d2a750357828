"""Every error a client can get back: see `mcp_rkllm.errors.table`."""

from mcp_rkllm.errors.table import ERRORS, ErrorSpec, RkllmError, as_error

__all__ = ["ERRORS", "ErrorSpec", "RkllmError", "as_error"]
