"""Settings: flags > environment > defaults; unsafe or impossible settings refused."""

from __future__ import annotations

import pytest

from mcp_rkllm.cli import parser
from mcp_rkllm.config import Settings, is_loopback


def test_defaults() -> None:
    s = Settings.load({}, {})
    assert (s.transport, s.host, s.port, s.runtime) == ("stdio", "127.0.0.1", 8000, "auto")
    assert s.library is None and s.abi is None


def test_environment_then_flags() -> None:
    env = {"RKLLM_LIB_PATH": "/opt/lib/librkllmrt.so", "RKLLM_ABI": "1.2.1", "MCP_RKLLM_TRANSPORT": "http",
           "MCP_RKLLM_PORT": "9001", "MCP_RKLLM_BUSY_TIMEOUT": "2.5"}
    s = Settings.load({}, env)
    assert (s.library, s.abi, s.transport, s.port, s.busy_timeout) == ("/opt/lib/librkllmrt.so", "1.2.1", "http",
                                                                       9001, 2.5)
    flags = vars(parser().parse_args(["--port", "9100", "--abi", "1.3.0"]))
    s = Settings.load({k: v for k, v in flags.items() if k != "command"}, env)
    assert (s.port, s.abi, s.transport) == (9100, "1.3.0", "http")


@pytest.mark.parametrize(("env", "message"), [
    ({"MCP_RKLLM_PORT": "eighty"}, "not a number"),
    ({"MCP_RKLLM_PORT": "70000"}, "out of range"),
    ({"MCP_RKLLM_TRANSPORT": "http", "MCP_RKLLM_HOST": "0.0.0.0"}, "without a token"),
    ({"MCP_RKLLM_TRANSPORT": "http", "MCP_RKLLM_HOST": "0.0.0.0", "MCP_RKLLM_AUTH_TOKEN": "short"}, "16 characters"),
    ({"MCP_RKLLM_MAX_PROMPT_BYTES": "0"}, "at least 1"),
    ({"MCP_RKLLM_TRANSPORT": "carrier-pigeon"}, "transport"),
])
def test_bad_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load({}, env)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                                ("localhost", True), ("127.8.9.1", True), ("0.0.0.0", False),
                                                ("192.168.1.5", False), ("example.com", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
