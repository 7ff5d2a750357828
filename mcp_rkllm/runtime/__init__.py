"""Runtimes: one protocol (`base`), implementations (`native`, `llama`, `worker`), and choosing one."""

from __future__ import annotations

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.runtime.base import Runtime


def choose_runtime(settings: Settings) -> tuple[str, str]:
    """Which runtime `settings` asks for ("native" or "cpu"), and why.

    auto: the NPU runtime when a librkllmrt.so is found (a found but unusable library is an
    error, never a silent fallback), else the CPU runtime if its extra is installed.
    """
    from mcp_rkllm.native.binding import find_library

    if settings.runtime != "auto":
        return settings.runtime, f"--runtime {settings.runtime}"
    try:
        path = find_library(settings.library)
    except RkllmError as exc:
        if settings.library:  # an explicit library that is missing is the user's mistake to hear about
            raise
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise RkllmError("RUNTIME_UNAVAILABLE", detail=f"{exc.message}; and the CPU runtime is not "
                             "installed (pip install 'mcp-rkllm[cpu]')") from exc
        return "cpu", f"auto: no librkllmrt.so ({exc.fields.get('detail')}), so the CPU runtime"
    return "native", f"auto: found {path}"


def open_runtime(settings: Settings) -> tuple[Runtime, str]:
    """Open the runtime `settings` asks for, in worker processes when isolation applies."""
    kind, reason = choose_runtime(settings)
    if settings.isolates(kind):
        from mcp_rkllm.runtime.worker import WorkerRuntime

        return WorkerRuntime(kind, settings), reason + "; each model in its own process"
    if kind == "native":
        from mcp_rkllm.runtime.native import NativeRuntime

        return NativeRuntime.open(settings.library, settings.abi), reason
    from mcp_rkllm.runtime.llama import LlamaCppRuntime

    return LlamaCppRuntime(), reason
