"""Runtimes: one protocol (`base`), implementations (`native`, `llama`), and choosing one (`open_runtime`)."""

from __future__ import annotations

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError
from mcp_rkllm.runtime.base import Runtime


def open_runtime(settings: Settings) -> tuple[Runtime, str]:
    """Open the runtime `settings.runtime` asks for; returns it and why it was chosen.

    auto: the NPU runtime when a librkllmrt.so is found (a found but unusable library is an
    error, never a silent fallback), else the CPU runtime.
    """
    from mcp_rkllm.native.binding import find_library

    choice = settings.runtime
    if choice == "auto":
        try:
            find_library(settings.library)
        except RkllmError as exc:
            if settings.library:  # an explicit library that is missing is the user's mistake to hear about
                raise
            try:
                from mcp_rkllm.runtime.llama import LlamaCppRuntime

                return LlamaCppRuntime(), f"auto: no librkllmrt.so ({exc.fields.get('detail')}), using the CPU runtime"
            except RkllmError as cpu_exc:
                raise RkllmError("RUNTIME_UNAVAILABLE",
                                 detail=f"{exc.message}; and {cpu_exc.fields.get('detail')}") from cpu_exc
        choice = "native"
    if choice == "native":
        from mcp_rkllm.runtime.native import NativeRuntime

        return NativeRuntime.open(settings.library, settings.abi), (
            "--runtime native" if settings.runtime == "native" else "auto: found librkllmrt.so")
    from mcp_rkllm.runtime.llama import LlamaCppRuntime

    return LlamaCppRuntime(), "--runtime cpu"
