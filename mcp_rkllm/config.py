"""One Settings object: command-line flags > environment (MCP_RKLLM_*, RKLLM_LIB_PATH, RKLLM_ABI) > defaults."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

Transport = Literal["stdio", "http", "sse"]
RuntimeChoice = Literal["auto", "native", "cpu"]
Isolation = Literal["auto", "process", "none"]

#: Settings field -> environment variable.
ENV_VARS: dict[str, str] = {
    "library": "RKLLM_LIB_PATH",
    "abi": "RKLLM_ABI",
    "runtime": "MCP_RKLLM_RUNTIME",
    "transport": "MCP_RKLLM_TRANSPORT",
    "host": "MCP_RKLLM_HOST",
    "port": "MCP_RKLLM_PORT",
    "busy_timeout": "MCP_RKLLM_BUSY_TIMEOUT",
    "abort_timeout": "MCP_RKLLM_ABORT_TIMEOUT",
    "log_level": "MCP_RKLLM_LOG_LEVEL",
    "models": "MCP_RKLLM_MODELS",
    "model": "MCP_RKLLM_MODEL",
    "isolation": "MCP_RKLLM_ISOLATION",
    "cache_dir": "MCP_RKLLM_CACHE_DIR",
    "auth_token": "MCP_RKLLM_AUTH_TOKEN",
    "allowed_hosts": "MCP_RKLLM_ALLOWED_HOSTS",
    "max_prompt_bytes": "MCP_RKLLM_MAX_PROMPT_BYTES",
    "max_token_ids": "MCP_RKLLM_MAX_TOKEN_IDS",
    "max_floats": "MCP_RKLLM_MAX_FLOATS",
    "max_new_tokens": "MCP_RKLLM_MAX_NEW_TOKENS",
    "max_context_len": "MCP_RKLLM_MAX_CONTEXT_LEN",
    "max_loaded_models": "MCP_RKLLM_MAX_LOADED_MODELS",
    "max_queued_runs": "MCP_RKLLM_MAX_QUEUED_RUNS",
    "max_request_bytes": "MCP_RKLLM_MAX_REQUEST_BYTES",
}

#: Settings that hold several values (os.pathsep-separated in the environment, repeatable flags).
LIST_SETTINGS = ("models", "allowed_hosts")


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told. Build with `Settings.load(flags, environ)`."""

    library: str | None = None
    """librkllmrt.so path or directory; None = search the usual places."""
    abi: str | None = None
    """RKLLM ABI generation (1.2.0, 1.2.1, 1.3.0); None = detect from the library."""
    runtime: RuntimeChoice = "auto"
    transport: Transport = "stdio"
    host: str = "127.0.0.1"
    port: int = 8000
    busy_timeout: float = 10.0
    """Seconds a run waits for a busy handle before answering BUSY."""
    abort_timeout: float = 30.0
    """Seconds a cancelled run waits for the runtime to stop after rkllm_abort."""
    log_level: str = "INFO"
    models: tuple[str, ...] = ()
    """Model root directories; empty = the per-user default (see mcp_rkllm.models.store)."""
    model: str | None = None
    """The default model's name, loaded by generate/chat when no model or handle is given."""
    isolation: Isolation = "auto"
    """process: each model in its own worker process; none: in the server; auto: process for the NPU runtime."""
    cache_dir: str | None = None
    """Where prompt caches are written (and may be read); None = $XDG_CACHE_HOME/mcp-rkllm."""
    auth_token: str | None = None
    """Bearer token every HTTP request must carry; required to serve on a non-loopback address."""
    allowed_hosts: tuple[str, ...] = ()
    """Host headers accepted on a non-loopback address (host or host:port); empty = any (the token guards)."""
    # Limits, checked before anything reaches the runtime (LIMIT_EXCEEDED names the limit and the value).
    max_prompt_bytes: int = 1 << 20
    """Longest string argument (prompt, template, tools JSON, message), in UTF-8 bytes."""
    max_token_ids: int = 1 << 17
    """Most token ids (or positions) in one array."""
    max_floats: int = 1 << 22
    """Most floats in one array (embeddings, image/video embeddings, encoder caches)."""
    max_new_tokens: int = 1 << 16
    max_context_len: int = 1 << 17
    max_loaded_models: int = 8
    max_queued_runs: int = 16
    """Calls waiting for one busy handle at once; more are refused at once."""
    max_request_bytes: int = 16 << 20
    """Largest HTTP request body."""

    def isolates(self, runtime: str) -> bool:
        """Whether models of `runtime` ("native" or "cpu") run in worker processes."""
        return self.isolation == "process" or (self.isolation == "auto" and runtime == "native")

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Flags that are not None win over environment variables, which win over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in ENV_VARS.items():
            raw = environ.get(var)
            if raw not in (None, ""):
                values[name] = (tuple(d for d in str(raw).split(os.pathsep) if d) if name in LIST_SETTINGS
                                else _convert(name, str(types[name]), str(raw)))
        for name, value in (flags or {}).items():
            if value is not None and name in types:
                values[name] = tuple(value) if name in LIST_SETTINGS else value
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work."""
        if self.transport not in ("stdio", "http", "sse"):
            raise ValueError(f"transport must be stdio, http or sse, not {self.transport!r}")
        if self.runtime not in ("auto", "native", "cpu"):
            raise ValueError(f"runtime must be auto, native or cpu, not {self.runtime!r}")
        if self.isolation not in ("auto", "process", "none"):
            raise ValueError(f"isolation must be auto, process or none, not {self.isolation!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.busy_timeout < 0 or self.abort_timeout <= 0:
            raise ValueError("busy_timeout must be >= 0 and abort_timeout > 0")
        if self.transport != "stdio" and not is_loopback(self.host) and not self.auth_token:
            raise ValueError(
                f"refusing to serve on {self.host} without a token: anyone who can reach it could run the model "
                "and read your files' names. Set --auth-token (or MCP_RKLLM_AUTH_TOKEN) to a long random "
                "secret, or bind 127.0.0.1.")
        if self.auth_token is not None and len(self.auth_token) < 16:
            raise ValueError("the auth token must be at least 16 characters (use a long random secret)")
        for name in ("max_prompt_bytes", "max_token_ids", "max_floats", "max_new_tokens", "max_context_len",
                     "max_loaded_models", "max_queued_runs", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _convert(name: str, type_text: str, raw: str) -> Any:
    try:
        if "int" in type_text and "str" not in type_text:
            return int(raw)
        if "float" in type_text:
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_VARS[name]}={raw!r} is not a number") from exc
    return raw
