"""Settings: one model makes the flags and the environment; flags > environment > defaults; bad values refused."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_rkllm.cli import main, parser, settings_argv, settings_flags
from mcp_rkllm.config import (
    ENV_VARS,
    LIST_SETTINGS,
    Settings,
    SettingSpec,
    is_loopback,
    list_separator,
    setting_specs,
)

ROOT = Path(__file__).resolve().parents[1]
SPECS = {spec.name: spec for spec in setting_specs()}
LIMITS = ("max_prompt_bytes", "max_token_ids", "max_floats", "max_new_tokens", "max_context_len",
          "max_loaded_models", "max_queued_runs", "max_request_bytes")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MCP_RKLLM_* / RKLLM_* variable of the machine running the tests reaches main()."""
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


def flags_of(argv: list[str]) -> dict[str, Any]:
    return settings_flags(parser().parse_args(argv))


def test_defaults() -> None:
    s = Settings.load({}, {})
    assert (s.transport, s.host, s.port, s.runtime) == ("stdio", "127.0.0.1", 8000, "auto")
    assert s.library is None and s.abi is None and s.models == () and s.allowed_hosts == ()
    assert (s.worker_timeout, s.load_timeout) == (30.0, 600.0)
    assert s == Settings()


def test_environment_then_flags() -> None:
    env = {"RKLLM_LIB_PATH": "/opt/lib/librkllmrt.so", "RKLLM_ABI": "1.2.1", "MCP_RKLLM_TRANSPORT": "http",
           "MCP_RKLLM_PORT": "9001", "MCP_RKLLM_BUSY_TIMEOUT": "2.5"}
    s = Settings.load({}, env)
    assert (s.library, s.abi, s.transport, s.port, s.busy_timeout) == ("/opt/lib/librkllmrt.so", "1.2.1", "http",
                                                                       9001, 2.5)
    s = Settings.load(flags_of(["--port", "9100", "--abi", "1.3.0"]), env)
    assert (s.port, s.abi, s.transport, s.library) == (9100, "1.3.0", "http", "/opt/lib/librkllmrt.so")
    assert Settings.load({"port": None}, env).port == 9001  # a flag that is None was not given
    assert Settings.load({"port": 9200}, {"MCP_RKLLM_PORT": "eighty"}).port == 9200  # a flag hides a bad variable


def test_direct_construction_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RKLLM_PORT", "9999")
    monkeypatch.setenv("MCP_RKLLM_MODELS", "/from/env")
    assert Settings().port == 8000 and Settings(models=("/given",)).models == ("/given",)
    assert Settings.load({}, {}).port == 8000  # an explicit environment mapping replaces os.environ
    s = Settings.load()  # the default environment is os.environ
    assert (s.port, s.models) == (9999, ("/from/env",))


def test_settings_are_immutable() -> None:
    s = Settings()
    with pytest.raises(ValueError, match="frozen"):
        s.port = 1  # type: ignore[misc]
    assert s.port == 8000 and hash(s) == hash(Settings())


def _sample(spec: SettingSpec, other: bool = False) -> tuple[Any, list[str]]:
    """A valid value for the setting, different from its default (and from the first sample if `other`)."""
    if spec.choices:
        choices = [c for c in spec.choices if c != spec.default]
        value: Any = choices[1 if other and len(choices) > 1 else 0]
    elif spec.name == "api":
        value = ("ollama",) if other else ("openai", "jsonrpc")
    elif spec.name == "tools":
        value = ("rkllm",) if other else ("friendly", "rknn")
    elif spec.repeatable:
        value = ("c",) if other else ("a", "b")
    elif spec.name == "socket_mode":
        value = "0640" if other else "0660"
    elif spec.name == "auth_token":
        value = ("t" if other else "s") * 20
    elif spec.name == "host":
        value = "127.0.0.3" if other else "127.0.0.2"
    elif spec.value_type is str:
        value = "/other" if other else "/given"
    elif spec.value_type is int:
        value = spec.default + (2 if other else 1)
    else:
        value = spec.default + (2.5 if other else 1.5)
    texts = [str(v) for v in value] if spec.repeatable else [str(value)]
    return value, texts


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_flag_and_an_environment_variable(name: str) -> None:
    spec = SPECS[name]
    value, texts = _sample(spec)
    other, other_texts = _sample(spec, other=True)
    assert value != other and value != Settings().model_dump()[name]
    argv = [arg for text in texts for arg in (spec.flag, text)]
    environ = {spec.env: list_separator(name).join(other_texts)}

    assert getattr(Settings.load({}, environ), name) == other                  # environment > default
    assert getattr(Settings.load(flags_of(argv), {}), name) == value           # flag > default
    assert getattr(Settings.load(flags_of(argv), environ), name) == value      # flag > environment
    for command in (["serve"], ["doctor"]):                                    # also after the command
        assert getattr(Settings.load(flags_of([*command, *argv]), environ), name) == value
    assert spec.flag in parser().format_help() and spec.env in parser().format_help()


def test_the_limit_flags_exist_and_reach_settings() -> None:
    help_text = parser().format_help()
    for name in LIMITS:
        assert SPECS[name].flag in help_text
    s = Settings.load(flags_of(["--max-new-tokens", "5", "--max-loaded-models", "2", "--max-request-bytes", "1024"]),
                      {})
    assert (s.max_new_tokens, s.max_loaded_models, s.max_request_bytes) == (5, 2, 1024)
    assert Settings.load(flags_of(["serve", "--max-queued-runs", "3"]), {}).max_queued_runs == 3


def test_commands_after_options() -> None:
    args = parser().parse_args(["--models", "X", "try", "hi"])
    assert (args.command, args.prompt, settings_flags(args)["models"]) == ("try", "hi", ["X"])
    args = parser().parse_args(["--log-level", "DEBUG", "doctor", "--json"])
    assert (args.command, args.json, settings_flags(args)["log_level"]) == ("doctor", True, "DEBUG")
    args = parser().parse_args(["serve", "--transport", "http"])
    assert (args.command, settings_flags(args)["transport"]) == ("serve", "http")
    args = parser().parse_args([])
    assert args.command is None and all(v is None for v in settings_flags(args).values())
    # repeatable flags collect from both sides; single ones: the later (after the command) wins
    flags = flags_of(["--models", "A", "--port", "1234", "doctor", "--models", "B", "--port", "4321"])
    assert (flags["models"], flags["port"]) == (["A", "B"], 4321)


def test_try_has_its_own_max_new_tokens() -> None:
    args = parser().parse_args(["--max-new-tokens", "7", "try", "hi", "--max-new-tokens", "5", "--verbose"])
    assert (args.try_max_new_tokens, settings_flags(args)["max_new_tokens"], args.verbose) == (5, 7, True)
    assert parser().parse_args(["try", "hi"]).try_max_new_tokens == 128


def test_try_passes_the_settings_flags_to_its_server(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(func: Any, *args: Any) -> int:
        seen.append(args[-1])  # the server's argv comes last
        return 0

    monkeypatch.setattr(anyio, "run", fake_run)
    monkeypatch.setenv("MCP_RKLLM_AUTH_TOKEN", "x" * 20)
    monkeypatch.setenv("MCP_RKLLM_TRANSPORT", "http")  # try always serves on stdio
    assert main(["--models", "/m1", "--max-new-tokens", "64", "try", "hi", "--runtime", "cpu", "--models", "/m2",
                 "--max-new-tokens", "5"]) == 0
    argv = seen[0]
    assert argv[:3] == ["-m", "mcp_rkllm", "serve"]
    pairs = list(zip(argv[3::2], argv[4::2], strict=True))
    assert ("--models", "/m1") in pairs and ("--models", "/m2") in pairs and ("--runtime", "cpu") in pairs
    assert ("--transport", "stdio") in pairs and ("--log-level", "WARNING") in pairs
    assert ("--max-new-tokens", "64") in pairs  # the server's limit, not the run's 5
    assert "--auth-token" not in argv and "x" * 20 not in argv
    assert main(["try", "hi", "--verbose"]) == 0 and ("--log-level", "DEBUG") in zip(seen[1][3::2], seen[1][4::2],
                                                                                       strict=True)


def test_try_reports_a_dead_server_without_a_traceback(clean_env: None, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the "server" exits at once
    assert main(["try", "hi"]) == 1
    err = capsys.readouterr().err
    assert "mcp-rkllm try: the server failed: Connection closed" in err and "Traceback" not in err


def test_settings_argv_round_trips() -> None:
    flags = {"models": ["/a", "/b"], "port": 9000, "busy_timeout": 2.5, "abi": "1.3.0", "model": None}
    argv = settings_argv(flags)
    assert argv == ["--models", "/a", "--models", "/b", "--port", "9000", "--busy-timeout", "2.5", "--abi", "1.3.0"]
    s = Settings.load(flags_of(argv), {})
    assert (s.models, s.port, s.busy_timeout, s.abi) == (("/a", "/b"), 9000, 2.5, "1.3.0")


def test_choices_ignore_case() -> None:
    assert Settings.load(flags_of(["--log-level", "debug", "--runtime", "CPU"]), {}).log_level == "DEBUG"
    assert Settings.load({}, {"MCP_RKLLM_LOG_LEVEL": "warning"}).log_level == "WARNING"


def test_list_settings_are_split_in_the_environment() -> None:
    assert set(LIST_SETTINGS) == {"models", "allowed_hosts", "api", "cors_origin", "tools"}
    sep = os.pathsep  # paths as in PATH; hosts by commas, since host:port and IPv6 addresses hold colons
    s = Settings.load({}, {"MCP_RKLLM_MODELS": f"/a{sep}{sep}/b{sep}",
                           "MCP_RKLLM_ALLOWED_HOSTS": "x.lan, y.lan:8000,,[::1]:80"})
    assert (s.models, s.allowed_hosts) == (("/a", "/b"), ("x.lan", "y.lan:8000", "[::1]:80"))
    assert Settings.load({}, {"MCP_RKLLM_MODELS": '["/j"]'}).models == ('["/j"]',)  # not JSON
    assert Settings.load({}, {"MCP_RKLLM_MODELS": "", "MCP_RKLLM_PORT": ""}) == Settings()  # empty = unset


@pytest.mark.parametrize(("env", "message"), [
    ({"MCP_RKLLM_PORT": "eighty"}, "MCP_RKLLM_PORT='eighty' is not a whole number"),
    ({"MCP_RKLLM_BUSY_TIMEOUT": "soon"}, "MCP_RKLLM_BUSY_TIMEOUT='soon' is not a number"),
    ({"MCP_RKLLM_PORT": "70000"}, "port 70000 is out of range"),
    ({"MCP_RKLLM_TRANSPORT": "http", "MCP_RKLLM_HOST": "0.0.0.0"}, "without a token"),
    ({"MCP_RKLLM_TRANSPORT": "http", "MCP_RKLLM_HOST": "0.0.0.0", "MCP_RKLLM_AUTH_TOKEN": "short"}, "16 characters"),
    ({"MCP_RKLLM_MAX_PROMPT_BYTES": "0"}, "max_prompt_bytes must be at least 1"),
    ({"MCP_RKLLM_MAX_REQUEST_BYTES": "-5"}, "max_request_bytes must be at least 1"),
    ({"MCP_RKLLM_TRANSPORT": "carrier-pigeon"}, "transport must be 'stdio', 'http', 'sse' or 'jsonrpc'"),
    ({"RKLLM_ABI": "2.0"}, "RKLLM_ABI='2.0': abi must be"),
    ({"MCP_RKLLM_BUSY_TIMEOUT": "-1"}, "busy_timeout must be at least 0"),
    ({"MCP_RKLLM_ABORT_TIMEOUT": "0"}, "abort_timeout must be more than 0"),
    ({"MCP_RKLLM_WORKER_TIMEOUT": "0"}, "worker_timeout must be more than 0"),
    ({"MCP_RKLLM_LOAD_TIMEOUT": "-1"}, "load_timeout must be more than 0"),
])
def test_bad_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Settings.load({}, env)


def test_bad_flags_are_named_and_tokens_never_shown() -> None:
    with pytest.raises(ValueError, match="--max-floats 0: max_floats must be at least 1"):
        Settings.load({"max_floats": 0}, {})
    with pytest.raises(ValueError) as caught:
        Settings.load({"auth_token": "short-secret"}, {"MCP_RKLLM_PORT": "0"})
    assert "short-secret" not in str(caught.value) and "--auth-token: the auth token must be" in str(caught.value)
    assert "MCP_RKLLM_PORT='0'" in str(caught.value)  # every problem at once
    with pytest.raises(ValueError) as caught:
        Settings.load({}, {"MCP_RKLLM_AUTH_TOKEN": "tiny-secret"})
    assert "tiny-secret" not in str(caught.value)
    assert "0123456789abcdef-token" not in repr(Settings(auth_token="0123456789abcdef-token"))


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        Settings(max_new_tokens=0)
    with pytest.raises(ValueError, match="extra"):
        Settings(no_such_setting=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
    (["--runtime", "gpu"], "argument --runtime: invalid choice: 'gpu'"),
    (["doctor", "--busy-timeout", "soon"], "argument --busy-timeout: invalid float value: 'soon'"),
    (["--max-new-tokens", "0", "doctor"], "mcp-rkllm: --max-new-tokens 0: max_new_tokens must be at least 1"),
    (["--port", "70000"], "mcp-rkllm: --port 70000: port 70000 is out of range"),
    (["--transport", "http", "--host", "0.0.0.0"], "without a token"),
    (["try", "hi", "--max-queued-runs", "0"], "max_queued_runs must be at least 1"),
    (["--max-prompt", "doctor"], "unrecognized arguments: --max-prompt"),  # no abbreviations
])
def test_bad_values_exit_2_with_a_message(clean_env: None, capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def _clean_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_bad_value_on_the_real_command_line_is_no_traceback() -> None:
    run = subprocess.run([sys.executable, "-m", "mcp_rkllm", "--max-loaded-models", "0"], capture_output=True,
                         text=True, env=_clean_environ(), timeout=60)
    assert run.returncode == 2 and "max_loaded_models must be at least 1" in run.stderr
    assert "Traceback" not in run.stderr


def test_doctor_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mcp_rkllm", "doctor", "--json", "--root", str(tmp_path),
                             "--library", str(tmp_path / "none.so"), "--models", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_environ())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1


def test_help_shows_defaults_environment_and_commands() -> None:
    text = parser().format_help()
    assert "default: 30; env MCP_RKLLM_WORKER_TIMEOUT" in " ".join(text.split())
    assert "{serve,try,doctor,pull}" in text and "--version" in text
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    try_help = " ".join(commands.choices["try"].format_help().split())
    assert "--models DIR" in try_help and "--max-new-tokens N most tokens to generate" in try_help
    assert "--port" not in try_help and "--auth-token" not in try_help


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                                ("localhost", True), ("127.8.9.1", True), ("0.0.0.0", False),
                                                ("192.168.1.5", False), ("example.com", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
