"""Runtimes: one protocol (`base`), implementations (`native` for the NPU, `llama` for the CPU), and choosing one."""

from __future__ import annotations

from mcp_rkllm.errors import RkllmError
from mcp_rkllm.runtime.base import Runtime


def choose_runtime(runtime: str, library: str | None) -> tuple[str, str]:
    """Which runtime ("native" or "cpu") the setting `runtime` (auto|native|cpu) means here, and why.

    auto: the NPU runtime when a librkllmrt.so is found (a found but unusable library is an
    error, never a silent fallback), else the CPU runtime if its extra is installed.
    """
    from mcp_rkllm.native.binding import find_library

    if runtime != "auto":
        return runtime, f"--runtime {runtime}"
    try:
        path = find_library(library)
    except RkllmError as exc:
        if library:  # an explicit library that is missing is the user's mistake to hear about
            raise
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise RkllmError("RUNTIME_UNAVAILABLE", detail=f"{exc.message}; and the CPU runtime is not "
                             "installed (pip install 'mcp-rkllm[cpu]')") from exc
        return "cpu", f"auto: no librkllmrt.so ({exc.fields.get('detail')}), so the CPU runtime"
    return "native", f"auto: found {path}"


def open_in_process(kind: str, library: str | None, abi: str | None) -> Runtime:
    """Open the runtime `kind` ("native" or "cpu") in this process."""
    if kind == "native":
        from mcp_rkllm.runtime.native import NativeRuntime

        return NativeRuntime.open(library, abi)
    from mcp_rkllm.runtime.llama import LlamaCppRuntime

    return LlamaCppRuntime()
