"""deploy/mcp-rkllm.service and deploy/env.example: systemd accepts the unit, and every flag and variable they
use is a real setting of the server.

`systemd-analyze verify` needs no running systemd (it works in a container, as root or not), but it refuses an
ExecStart binary that does not exist; the check runs a copy of the unit whose ExecStart is this venv's
`mcp-rkllm`. Without systemd-analyze (Debian's `systemd` package) the check skips, saying so; with the `CI`
environment variable set (.ci/run sets it, and installs the package) it fails instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_rkllm.cli import parser, settings_flags
from mcp_rkllm.config import Settings, is_loopback, setting_specs

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "mcp-rkllm.service"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
INSTALLED_AT = "/usr/local/bin/mcp-rkllm"


def on_ci() -> bool:
    """True on CI (the `CI` environment variable set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting of a unit file, in order (keys may repeat)."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not parsed here: {raw!r}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service(key: str) -> list[str]:
    return [value for section, k, value in unit_entries(UNIT.read_text()) if section == "Service" and k == key]


def exec_start() -> list[str]:
    (line,) = service("ExecStart")
    return shlex.split(line)


def unit_environment() -> dict[str, str]:
    """The unit's Environment= assignments."""
    pairs = [item.split("=", 1) for line in service("Environment") for item in shlex.split(line)]
    return {name: value for name, value in pairs}


def example_environment() -> dict[str, str]:
    """Every VAR=value of env.example, the commented-out examples included (as if all were enabled)."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(\S*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def settings(environ: dict[str, str]) -> Settings:
    """What the server would run with: the unit's ExecStart flags over `environ`."""
    flags = settings_flags(parser().parse_args(exec_start()[1:]))
    return Settings.load(flags, environ)


def test_every_flag_and_variable_is_a_setting() -> None:
    flags = {spec.flag for spec in setting_specs()}
    variables = {spec.env for spec in setting_specs()}
    used_flags = [arg.split("=", 1)[0] for arg in exec_start()[1:] if arg.startswith("--")]
    assert used_flags and set(used_flags) <= flags, f"unknown flags in ExecStart: {set(used_flags) - flags}"
    assert unit_environment() and set(unit_environment()) <= variables, set(unit_environment()) - variables
    example = example_environment()
    assert len(example) >= 10 and set(example) <= variables, f"unknown in env.example: {set(example) - variables}"


def test_the_unit_and_the_example_load_as_the_server_would() -> None:
    # As installed: Streamable HTTP on loopback, models and caches in the unit's state and cache directories.
    loopback = settings(unit_environment())
    assert loopback.transport == "http" and is_loopback(loopback.host)
    assert loopback.models == ("/var/lib/mcp-rkllm/models",) and loopback.cache_dir == "/var/cache/mcp-rkllm"
    assert service("StateDirectory") == ["mcp-rkllm mcp-rkllm/models"]
    assert service("CacheDirectory") == ["mcp-rkllm"]
    # With every example of env.example enabled (EnvironmentFile= wins over Environment=): on the network,
    # with the token; without the token the server refuses to start, as the comments say.
    networked = {**unit_environment(), **example_environment()}
    served = settings(networked)
    assert not is_loopback(served.host) and served.auth_token
    without_token = {k: v for k, v in networked.items() if k != "MCP_RKLLM_AUTH_TOKEN"}
    with pytest.raises(ValueError, match="without a token"):
        settings(without_token)
    assert service("EnvironmentFile") == ["-/etc/mcp-rkllm/env"]
    assert "/etc/mcp-rkllm/env" in ENV_EXAMPLE.read_text()


def test_stop_timeout_outlasts_the_drain() -> None:
    """systemctl stop sends SIGTERM; the server drains for --shutdown-grace, then aborts (each abort waits up
    to --abort-timeout). systemd must not SIGKILL it before that."""
    loaded = settings(unit_environment())
    (timeout,) = service("TimeoutStopSec")
    assert int(timeout) > loaded.shutdown_grace + loaded.abort_timeout
    # SIGTERM reaches the server alone: model workers die by default on SIGTERM, mid-generation.
    assert service("KillMode") == ["mixed"]


def test_service_user_restart_and_hardening() -> None:
    assert exec_start()[0] == INSTALLED_AT
    assert not any(arg.startswith("--auth-token") for arg in exec_start()), "the token shows in ps"
    assert service("User") == ["mcp-rkllm"] and service("SupplementaryGroups") == ["render"]
    assert service("Restart") == ["on-failure"] and service("Type") == ["exec"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("ProtectHome", "yes")):
        assert service(key) == [value], key
    # Settings that hide the NPU or break the runtime's cffi callback must stay out.
    for key in ("PrivateDevices", "MemoryDenyWriteExecute", "DevicePolicy", "ProcSubset"):
        assert service(key) == [], f"{key} breaks NPU access (see the comment in the unit)"


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        why = ("systemd-analyze is not installed (Debian: apt-get install --no-install-recommends systemd; "
               "it needs no running systemd)")
        if on_ci():
            pytest.fail(f"{why}. CI is set, so the unit must be verified, not skipped", pytrace=False)
        pytest.skip(why)
    return found


def verify(systemd_analyze: str, text: str, directory: Path) -> tuple[int, str]:
    """`systemd-analyze verify` on `text` as mcp-rkllm.service in `directory`: exit code and output."""
    directory.mkdir()
    unit = directory / "mcp-rkllm.service"
    unit.write_text(text)
    proc = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def test_systemd_analyze_verify_accepts_the_unit(systemd_analyze: str, tmp_path: Path) -> None:
    # systemd-analyze refuses an ExecStart that does not exist: run the check against this venv's entry point.
    entry = shutil.which("mcp-rkllm", path=str(Path(sys.executable).parent)) or shutil.which("mcp-rkllm")
    assert entry, "the mcp-rkllm entry point is not installed (pip install -e .)"
    link = tmp_path / "bin" / "mcp-rkllm"
    link.parent.mkdir()
    link.symlink_to(entry)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_AT} ") == 1
    local = text.replace(f"ExecStart={INSTALLED_AT} ", f"ExecStart={link} ")
    code, output = verify(systemd_analyze, local, tmp_path / "unit")
    # Warnings (an unknown key, a bad value) leave the exit code 0, so the output must be empty as well;
    # lines about other units of this machine, if any, are not ours to judge.
    ours = [line for line in output.splitlines() if "mcp-rkllm" in line]
    assert code == 0 and not ours, output
    # The check is not vacuous: an unknown key and a missing binary are reported.
    code, output = verify(systemd_analyze, local.replace("[Service]\n", "[Service]\nNoSuchKey=1\n"),
                          tmp_path / "typo")
    assert "NoSuchKey" in output, output
    code, output = verify(systemd_analyze, text, tmp_path / "as-shipped")
    if not Path(INSTALLED_AT).exists():
        assert code != 0 and INSTALLED_AT in output, output
