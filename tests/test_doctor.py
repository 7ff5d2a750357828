"""`mcp-rkllm doctor` against fake /proc and /sys trees, this machine, and through the `doctor` tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from mcp_rkllm import doctor
from mcp_rkllm.config import Settings
from mcp_rkllm.surfaces.mcp import build_server
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO
from tests.test_server import call


def board(root: Path, driver: str = "RKNPU driver: v0.9.6", governor: str = "ondemand") -> Path:
    """A fake RK3588 board's /proc and /sys."""
    files = {
        "proc/device-tree/compatible": "radxa,rock-5b\x00rockchip,rk3588\x00",
        "proc/device-tree/model": "Radxa ROCK 5B\x00",
        "proc/meminfo": "MemTotal:       16318480 kB\nMemFree:  1000 kB\nMemAvailable:    2097152 kB\n",
        "sys/kernel/debug/rknpu/version": driver,
        "sys/kernel/debug/rknpu/load": "NPU load:  Core0:  12%, Core1:  0%, Core2:  0%,",
        "sys/class/devfreq/fdab0000.npu/cur_freq": "1000000000",
        "sys/class/devfreq/fdab0000.npu/governor": "rknpu_ondemand",
        "sys/class/devfreq/dmc/governor": "dmc_ondemand",
        "sys/class/devfreq/dmc/cur_freq": "2112000000",
    }
    for cpu in range(8):
        files[f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"] = governor
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_rockchip_board(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    big = models / "Qwen-7B.rkllm"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GiB, sparse: more than the fake board's 2 GiB available
    (models / "Qwen-0.5B.rkllm").write_bytes(b"x" * 1000)
    settings = Settings(library=str(build_fake("1.3.0", "1.3.0")), models=(str(models),))
    checks = by_name(doctor.run(settings, str(board(tmp_path / "root"))))
    assert checks["runtime library"].status == "ok"
    assert checks["RKLLM ABI"].value.startswith("1.3.0") and checks["runtime version"].value == "1.3.0"
    assert checks["SoC"].status == "ok" and checks["SoC"].value == "RK3588 (Radxa ROCK 5B)"
    assert checks["NPU driver"].status == "warn" and "0.9.8" in checks["NPU driver"].fix
    assert checks["NPU load"].value.startswith("NPU load: Core0: 12%")
    assert checks["NPU frequency"].value == "1000 MHz, governor rknpu_ondemand"
    assert checks["CPU governor"].value == "ondemand" and "scaling_governor" in checks["CPU governor"].fix
    assert checks["DDR governor"].value == "dmc_ondemand, 2112 MHz"
    assert checks["memory"].value == "2.0 GiB available of 15.6 GiB"
    assert checks["model Qwen-7B.rkllm"].status == "warn" and "larger" in checks["model Qwen-7B.rkllm"].value
    assert checks["model Qwen-0.5B.rkllm"].status == "ok"
    report = doctor.render(list(by_name(doctor.run(settings, str(tmp_path / "root"))).values()))
    assert "What to do:" in report and "WARN" in report


def test_good_board_has_nothing_to_fix(tmp_path: Path) -> None:
    root = board(tmp_path / "root", driver="RKNPU driver: v0.9.8", governor="performance")
    for rel in ("sys/class/devfreq/fdab0000.npu/governor", "sys/class/devfreq/dmc/governor"):
        (root / rel).write_text("performance")
    (tmp_path / "m.rkllm").write_bytes(b"m")
    settings = Settings(library=str(build_fake("1.2.1", "1.2.2")), models=(str(tmp_path),))
    checks = doctor.run(settings, str(root))
    board_checks = [c for c in checks if c.name in ("SoC", "NPU driver", "NPU frequency", "CPU governor",
                                                     "DDR governor", "RKLLM ABI")]
    assert all(c.status == "ok" and not c.fix for c in board_checks), board_checks


def test_not_a_rockchip_machine(tmp_path: Path) -> None:
    empty = tmp_path / "root"
    empty.mkdir()
    checks = by_name(doctor.run(Settings(library=str(tmp_path / "none.so"), models=(str(tmp_path),)), str(empty)))
    assert checks["runtime library"].status == "warn" and "CPU runtime" in checks["runtime library"].fix
    assert checks["SoC"].status == "info" and "not an ARM board" in checks["SoC"].value
    assert checks["memory"].status == "info"
    bundled = [c for name, c in checks.items() if name.startswith("model ") and "bundled" in c.value]
    assert bundled or checks["models"].status == "warn"  # only the bundled model (with the cpu extra), or none
    assert "NPU driver" not in checks


def test_undetermined_abi_says_how_to_fix(tmp_path: Path) -> None:
    checks = by_name(doctor.run(Settings(library=str(build_fake("1.3.0", None))), str(tmp_path)))
    assert checks["RKLLM ABI"].status == "fail" and "RKLLM_ABI" in checks["RKLLM ABI"].fix


def test_cli_on_this_machine() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/tmp"}
    human = subprocess.run([sys.executable, "-m", "mcp_rkllm", "doctor"], capture_output=True, text=True, timeout=60,
                           env=env)
    assert human.returncode == 0, human.stderr
    assert "runtime library" in human.stdout and "memory" in human.stdout
    machine = subprocess.run([sys.executable, "-m", "mcp_rkllm", "doctor", "--json", "--library",
                              str(build_fake("1.3.0", "1.3.0"))], capture_output=True, text=True, timeout=60, env=env)
    data = json.loads(machine.stdout)
    assert {c["name"] for c in data} >= {"runtime library", "RKLLM ABI", "SoC", "memory"}
    assert all(set(c) == {"name", "status", "value", "fix"} for c in data)


@pytest.mark.anyio
async def test_doctor_tool(tmp_path: Path) -> None:
    (tmp_path / "m.rkllm").write_bytes(b"m")
    settings = Settings(library=str(build_fake("1.3.0", "1.3.0")), models=(str(tmp_path),), isolation="none")
    async with Client(build_server(settings)) as client:
        result = await call(client, "doctor", {})
    names = {c["name"]: c for c in result["checks"]}
    assert names["RKLLM ABI"]["value"].startswith("1.3.0") and "runtime library" in result["report"]
