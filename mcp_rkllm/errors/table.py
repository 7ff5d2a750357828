"""The single table of errors the server can produce, and the one place they become tool results.

Each row has a stable string code, a JSON-RPC-style number in the server range (-32000..-32099),
a message template, whether retrying the same call can succeed, and a hint telling the caller
what to do. Every surface sends the same payload, `{"error": {code, number, message, hint,
retryable, function, rc, details}}` (`RkllmError.to_dict()`); the MCP surface wraps it in an
`is_error` tool result. RKLLM itself documents only 0 / -1, so `rc` is always the raw return value
of the C call. No protocol SDK is imported here: worker processes use this table too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorSpec:
    """One row of the error table."""

    code: str
    number: int
    template: str
    retryable: bool
    hint: str


_ROWS: tuple[ErrorSpec, ...] = (
    ErrorSpec("INVALID_PARAMS", -32001, "Invalid arguments for {function}: {detail}", False,
              "Fix the arguments to match the tool's input schema; the message names each bad field."),
    ErrorSpec("UNKNOWN_HANDLE", -32002, "No loaded model has handle {handle!r}", False,
              "Call rkllm_init first and pass the handle it returned; handles die with rkllm_destroy "
              "and with a server restart."),
    ErrorSpec("BUSY", -32003, "Handle {handle} is busy with another run (waited {waited_s:g} s)", True,
              "Wait for the current run to finish, cancel it with rkllm_abort, or retry later."),
    ErrorSpec("RKLLM_CALL_FAILED", -32004, "{function} returned {rc}{detail}", False,
              "The runtime refused the call; its own log lines on the server's stderr say why. "
              "Check paths, model/runtime version match and free NPU memory."),
    ErrorSpec("LIBRARY_NOT_FOUND", -32005, "librkllmrt.so not found: {detail}", False,
              "Install the RKLLM runtime (librkllmrt.so) or point --library / RKLLM_LIB_PATH at it."),
    ErrorSpec("LIBRARY_LOAD_FAILED", -32006, "Could not load {path}: {detail}", False,
              "Check that the file is a librkllmrt.so built for this CPU architecture and that its "
              "dependencies (libgomp.so.1) are installed."),
    ErrorSpec("ABI_UNDETERMINED", -32007, "Cannot tell which RKLLM ABI {path} speaks: {detail}", False,
              "Set RKLLM_ABI (or --abi) to 1.2.0, 1.2.1 (for 1.2.1-1.2.3) or 1.3.0 to match the "
              "runtime release you installed."),
    ErrorSpec("ABI_MISMATCH", -32008, "RKLLM_ABI={declared} contradicts the library {path}: {detail}", False,
              "Remove RKLLM_ABI to let the server detect the ABI, or set it to the release of the "
              "installed librkllmrt.so."),
    ErrorSpec("ABI_UNSUPPORTED", -32009, "Unsupported RKLLM runtime at {path}: {detail}", False,
              "Upgrade the RKLLM runtime to 1.2.0 or later."),
    ErrorSpec("ABI_FIELD_UNSUPPORTED", -32010,
              "{struct}.{field} does not exist in RKLLM ABI {abi}, so the value you set cannot be passed",
              False, "Leave the field out (or at its default), or upgrade the runtime to a release that has it."),
    ErrorSpec("NOT_SUPPORTED", -32011, "{what} is not supported{detail}", False,
              "Use another input type, mode or runtime; rkllm_init's result names the runtime and ABI in use."),
    ErrorSpec("MODEL_NOT_FOUND", -32012, "Model {name!r} not found{detail}", False,
              "Check the model path or name."),
    ErrorSpec("MODEL_AMBIGUOUS", -32020, "Model name {name!r} matches several models: {candidates}", False,
              "Use a longer name or the full file name."),
    ErrorSpec("PATH_NOT_ALLOWED", -32013, "Path {path!r} is outside the allowed roots {roots}", False,
              "Use a path inside one of the allowed roots."),
    ErrorSpec("LIMIT_EXCEEDED", -32014, "{what} is {value}, over the limit of {limit}", False,
              "Send a smaller request, or raise the limit in the server's settings."),
    ErrorSpec("GENERATION_ERROR", -32015, "The runtime reported RKLLM_RUN_ERROR during {function}{detail}",
              True, "Retry; if it persists, clear the KV cache (rkllm_clear_kv_cache) or reload the model."),
    ErrorSpec("RUNTIME_CRASHED", -32016, "The runtime process for handle {handle} died: {detail}", True,
              "Load the model again; the server's stderr has the runtime's last lines."),
    ErrorSpec("CANCELLED", -32017, "{function} was cancelled{detail}", True,
              "The handle was freed (or the server stopped) while the call waited for it; load the model "
              "again and retry if you still want the result."),
    ErrorSpec("RUN_NOT_FOUND", -32018, "Handle {handle} has no asynchronous run{detail}", False,
              "Start one with rkllm_run_async first."),
    ErrorSpec("RUNTIME_UNAVAILABLE", -32019, "No runtime is available: {detail}", False,
              "Install librkllmrt.so for the NPU runtime, or the CPU runtime extra."),
    ErrorSpec("RUNTIME_TIMEOUT", -32021,
              "The runtime process for handle {handle} has not answered for {timeout_s:g} s{detail}", True,
              "The worker is stopped or stuck (a wedged driver, SIGSTOP). Other handles are unaffected; retry "
              "later, or unload the model (unload_model / rkllm_destroy kills its worker) and load it again."),
    ErrorSpec("RKNN_CALL_FAILED", -32022, "{function} returned {rc} ({rc_name}: {meaning}){detail}", False,
              "The RKNN runtime refused the call; rc_name is its rknn_api.h code. RKNN_ERR_PARAM_INVALID / "
              "INPUT_INVALID / OUTPUT_INVALID: check indexes, buffer sizes, type and fmt against rknn_query's tensor "
              "attributes; RKNN_ERR_MODEL_INVALID: the .rknn file is damaged, built for another platform or SDK, or "
              "NPU memory ran out; RKNN_ERR_CTX_INVALID: the context is gone. The runtime's `E RKNN` lines on the "
              "server's stderr (RKNN_LOG_LEVEL) say more."),
    ErrorSpec("RKNN_NPU_UNAVAILABLE", -32023, "{function} returned {rc} ({rc_name}: {meaning}){detail}", True,
              "The NPU timed out, was unavailable or out of memory (RKNN_ERR_TIMEOUT / DEVICE_UNAVAILABLE / "
              "MALLOC_FAIL): retry later, unload other models to free NPU memory, or check the NPU driver (doctor)."),
    ErrorSpec("RKNN_LIBRARY_UNAVAILABLE", -32024, "librknnrt.so is not usable: {detail}", False,
              "Install Rockchip's RKNN runtime (librknnrt.so from airockchip/rknn-toolkit2, rknpu2/runtime/Linux/"
              "librknn_api/aarch64) into /usr/lib, or point --rknn-library / RKNN_LIB_PATH at it."),
    ErrorSpec("INTERNAL", -32099, "Internal error in {function}: {detail}", False,
              "This is a bug in mcp-rkllm; the server's stderr has the traceback. Please report it."),
)

#: code -> row.
ERRORS: dict[str, ErrorSpec] = {row.code: row for row in _ROWS}

#: JSON Schema of an error result's structured content, `{"error": {...}}`.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "ToolError",
    "properties": {"error": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "enum": [row.code for row in _ROWS]},
            "number": {"type": "integer"},
            "message": {"type": "string"},
            "hint": {"type": "string"},
            "retryable": {"type": "boolean"},
            "function": {"type": ["string", "null"]},
            "rc": {"type": ["integer", "null"]},
            "details": {"type": "object"},
        },
        "required": ["code", "number", "message", "hint", "retryable"],
    }},
    "required": ["error"],
}


class _Missing(dict[str, Any]):
    """Leaves unknown template fields visible instead of failing the formatting."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class RkllmError(Exception):
    """An error from the table. `fields` fill the message template and travel to the client.

    `function` is the tool or C function that failed, `rc` the raw C return value when there is one.
    """

    def __init__(self, code: str, *, function: str | None = None, rc: int | None = None, **fields: Any):
        self.spec = ERRORS[code]  # an unknown code is a programming error: fail loudly
        self.code = code
        self.function = function
        self.rc = rc
        fields.setdefault("detail", "")
        self.fields = fields
        super().__init__(code)

    @property
    def message(self) -> str:
        """The message template filled in (the function may be named after the error was raised)."""
        return self.spec.template.format_map(_Missing(self.fields, function=self.function or "?", rc=self.rc))

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The `{"error": ...}` payload's inner object."""
        extra = {k: v for k, v in self.fields.items() if k != "detail" and _jsonable(v)}
        return {
            "code": self.code,
            "number": self.spec.number,
            "message": self.message,
            "hint": self.spec.hint,
            "retryable": self.spec.retryable,
            "function": self.function,
            "rc": self.rc,
            **({"details": extra} if extra else {}),
        }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def as_error(exc: BaseException, function: str) -> RkllmError:
    """`exc` as a table error: an `RkllmError` keeps its code (and gets `function` if it had none);
    anything else is a bug and becomes `INTERNAL`, with its type and text but no traceback."""
    if not isinstance(exc, RkllmError):
        return RkllmError("INTERNAL", function=function, detail=f"{type(exc).__name__}: {exc}")
    if exc.function is None:
        exc.function = function
    return exc


def markdown_table() -> str:
    """The README's error table, generated from the rows above."""
    lines = ["| code | number | retryable | meaning | what to do |", "|---|---|---|---|---|"]
    for row in _ROWS:
        lines.append(
            f"| `{row.code}` | {row.number} | {'yes' if row.retryable else 'no'} | "
            f"{row.template.replace('!r}', '}').replace('|', '/')} | {row.hint} |"
        )
    return "\n".join(lines)
