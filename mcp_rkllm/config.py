"""One Settings model: it makes the command-line flags, the environment variables and the README table.

Precedence: command-line flags > environment (MCP_RKLLM_*, RKLLM_LIB_PATH, RKLLM_ABI, RKNN_LIB_PATH) > defaults.
Each field's description is its `--help` text and its README "meaning"; `settings_markdown_table()` writes the
README's Configuration table and `mcp_rkllm.cli` builds its argument parser from `setting_specs()`.
"""

from __future__ import annotations

import ipaddress
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

Transport = Literal["stdio", "http", "sse", "jsonrpc"]
HttpApi = Literal["openai", "ollama", "rockchip", "jsonrpc"]
ToolGroup = Literal["friendly", "rkllm", "rknn", "all"]
RuntimeChoice = Literal["auto", "native", "cpu"]
Isolation = Literal["auto", "process", "none"]
Abi = Literal["1.2.0", "1.2.1", "1.3.0"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

#: Environment variable of a setting without its own: this prefix and the field name in capitals.
ENV_PREFIX = "MCP_RKLLM_"

#: Setting groups, in the order of --help and the README: key -> (title, what the group is about).
GROUPS: dict[str, tuple[str, str]] = {
    "runtime": ("Runtime and models", "the runtime library and the models it loads"),
    "serving": ("Serving", "how clients reach the server, and its log"),
    "timeouts": ("Timeouts", "in seconds"),
    "limits": ("Limits", "each checked before anything reaches the runtime; a request over one gets "
                         "LIMIT_EXCEEDED naming the argument, the value and the limit"),
}


def _setting(default: Any, description: str, group: str, *, env: str | None = None, shown: str | None = None,
             metavar: str | None = None, separator: str | None = None, **constraints: Any) -> Any:
    """A Settings field in `group` (a key of GROUPS).

    `env` overrides the MCP_RKLLM_ name; `shown` is the README/--help text of a default that is no value (None,
    empty); `separator` splits a list setting's environment variable (default os.pathsep, as in PATH).
    """
    extra: dict[str, Any] = {"group": group}
    for key, value in (("env", env), ("shown", shown), ("metavar", metavar), ("separator", separator)):
        if value is not None:
            extra[key] = value
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class Settings(BaseSettings):
    """Everything the server can be told; immutable.

    `Settings.load(flags, environ)` reads the environment; `Settings(**values)` takes only what it is given (the
    environment is never read then, so tests are deterministic). Invalid values raise ValueError.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_default=True)

    # -- runtime and models
    library: str | None = _setting(
        None, "Path of librkllmrt.so, or the directory holding it.", "runtime", env="RKLLM_LIB_PATH",
        shown="search `/usr/lib`, `/usr/local/lib`, `./lib`, then the linker path", metavar="PATH")
    abi: Abi | None = _setting(
        None, "RKLLM ABI generation the library speaks: `1.2.0`, `1.2.1` (for 1.2.1-1.2.3) or `1.3.0`; it must "
              "agree with the library.", "runtime", env="RKLLM_ABI",
        shown="detect from the library's symbols and version string")
    rknn_library: str | None = _setting(
        None, "Path of librknnrt.so (the RKNN runtime: vision encoders, `.rknn` models), or the directory holding "
              "it.", "runtime", env="RKNN_LIB_PATH",
        shown="search `/usr/lib`, `/usr/local/lib`, `./lib`, then the linker path", metavar="PATH")
    runtime: RuntimeChoice = _setting(
        "auto", "`native`: the NPU runtime (librkllmrt.so, .rkllm models); `cpu`: llama.cpp (.gguf models); `auto`: "
                "native when a librkllmrt.so is found, else cpu.", "runtime")
    isolation: Isolation = _setting(
        "auto", "`process`: each loaded model in its own supervised worker process; `none`: in the server "
                "process; `auto`: process for the NPU runtime, none for the CPU runtime.", "runtime")
    models: tuple[str, ...] = _setting(
        (), "Directories of .rkllm / .gguf models (the model roots; client paths must stay inside them).",
        "runtime", shown="`~/.local/share/mcp-rkllm/models`", metavar="DIR")
    model: str | None = _setting(
        None, "Default model name, loaded by generate / chat / embed when no model or handle is given.", "runtime",
        shown="the bundled model on the CPU runtime, else the only model found", metavar="NAME")
    cache_dir: str | None = _setting(
        None, "Where prompt caches are written (and may be read).", "runtime",
        shown="`$XDG_CACHE_HOME/mcp-rkllm` (`~/.cache/mcp-rkllm`)", metavar="DIR")

    # -- transport and HTTP
    transport: Transport = _setting(
        "stdio", "`stdio`; `http`: Streamable HTTP at `/mcp` (and JSON-RPC at `/jsonrpc`); `sse`: legacy HTTP+SSE at "
                 "`/sse`; `jsonrpc`: JSON-RPC 2.0 on the Unix socket `--socket`.", "serving")
    socket: str | None = _setting(
        None, "Unix socket of the JSON-RPC surface (`--transport jsonrpc`; with `http`, served as well).", "serving",
        shown="`$XDG_RUNTIME_DIR/mcp-rkllm.sock`, else `/tmp/mcp-rkllm-<uid>.sock` (jsonrpc only)", metavar="PATH")
    socket_mode: str = _setting(
        "0600", "Permissions of the socket file, in octal (`0660` lets the socket's group connect).", "serving",
        metavar="MODE", pattern=r"^0?[0-7]{3}$")
    host: str = _setting(
        "127.0.0.1", "HTTP/SSE bind address; a non-loopback address needs an auth token.", "serving",
        metavar="ADDRESS")
    port: int = _setting(8000, "HTTP/SSE port.", "serving", metavar="PORT")
    auth_token: str | None = _setting(
        None, "Bearer token every HTTP request must carry (at least 16 characters); required off loopback. Give "
              "it in the environment: flags show in `ps`.", "serving", shown="none", metavar="TOKEN", repr=False)
    allowed_hosts: tuple[str, ...] = _setting(
        (), "Host headers accepted on a non-loopback address (host or host:port).", "serving",
        shown="any (the token guards)", metavar="HOST", separator=",")
    tools: tuple[ToolGroup, ...] = _setting(
        ("all",), "MCP tool groups exported: `friendly` (generate, chat, models, status), `rkllm` (the C functions "
                  "1:1), `rknn`, or `all`. JSON-RPC always serves every method.", "serving", metavar="GROUP",
        separator=",")
    api: tuple[HttpApi, ...] = _setting(
        ("openai", "ollama", "rockchip", "jsonrpc"), "HTTP surfaces mounted beside `/mcp` (`--transport http`): "
        "`openai` (`/v1`), `ollama` (`/api`), `rockchip` (RockchipLlama's `/v1/models/...` and `/v1/health`), "
        "`jsonrpc` (`/jsonrpc`).", "serving", shown="all four", metavar="API", separator=",")
    cors_origin: tuple[str, ...] = _setting(
        (), "Browser origins allowed to call the HTTP APIs (CORS), e.g. `http://localhost:3000`; `*` for any.",
        "serving", shown="none (CORS off)", metavar="ORIGIN", separator=",")
    log_level: LogLevel = _setting(
        "INFO", "Level of the server's log on stderr: `DEBUG`, `INFO`, `WARNING` or `ERROR`.", "serving")
    server_id: str | None = _setting(
        None, "This server's name in a fleet: sent in the `X-RKLLM-Server` header of every HTTP response, "
              "returned by server_status, and hashed into its handle ids so a proxy can route a handle to its "
              "board (see Several boards).", "serving", shown="`<hostname>:<port>`", metavar="NAME",
        pattern=r"^[\x21-\x7e]{1,128}$")

    # -- timeouts
    busy_timeout: float = _setting(
        10.0, "Seconds a run waits for a busy handle before answering BUSY.", "timeouts", metavar="SECONDS", ge=0)
    abort_timeout: float = _setting(
        30.0, "Seconds a cancelled run waits for the runtime to stop after rkllm_abort.", "timeouts",
        metavar="SECONDS", gt=0)
    worker_timeout: float = _setting(
        30.0, "Seconds a model's worker process may go without answering (a call, or its heartbeat) before calls "
              "on that handle fail with RUNTIME_TIMEOUT.", "timeouts", metavar="SECONDS", gt=0)
    keep_alive: float = _setting(
        1800.0, "Seconds a loaded model may go unused before it is unloaded (a handle of any kind: loaded by name, "
                "or by rkllm_init); 0 = never.", "timeouts", metavar="SECONDS", ge=0)
    load_timeout: float = _setting(
        600.0, "Seconds a model load (rkllm_init in a worker) may take.", "timeouts", metavar="SECONDS", gt=0)
    shutdown_grace: float = _setting(
        30.0, "Seconds SIGTERM lets running generations finish over HTTP (`--transport http`/`sse`) while new "
              "requests are refused; what still runs then is aborted, and the server exits 0.", "timeouts",
        metavar="SECONDS", ge=0)

    # -- limits, checked before anything reaches the runtime (LIMIT_EXCEEDED names the limit and the value)
    max_prompt_bytes: int = _setting(
        1 << 20, "Longest string argument (prompt, template, tools JSON, message), in UTF-8 bytes.", "limits",
        metavar="BYTES", ge=1)
    max_token_ids: int = _setting(
        1 << 17, "Most token ids (or positions) in one array.", "limits", metavar="N", ge=1)
    max_floats: int = _setting(
        1 << 22, "Most floats in one array (embeddings, image/video embeddings, encoder caches).", "limits",
        metavar="N", ge=1)
    max_output_floats: int = _setting(
        1 << 20, "Most floats a run may return in one output array (hidden states, logits): rows x width after "
                 "`output_rows`. Checked before the output is computed where the runtime knows its size; over it "
                 "is LIMIT_EXCEEDED saying how many rows fit.", "limits", metavar="N", ge=1)
    max_image_bytes: int = _setting(
        20 << 20, "Largest image a vision model is given (chat / generate image parts, Ollama `images`), in bytes "
                  "of the file (base64 decoded).", "limits", metavar="BYTES", ge=1)
    max_image_pixels: int = _setting(
        40_000_000, "Most pixels (width x height) in one image, and in the square it is padded to, checked before "
                    "it is decoded (no decompression bombs).", "limits", metavar="N", ge=1)
    max_items: int = _setting(
        1024, "Most entries in one list of objects or strings: chat messages, tools, JSON-RPC batch entries, "
              "embedding inputs.", "limits", metavar="N", ge=1)
    max_new_tokens: int = _setting(
        1 << 16, "Largest `max_new_tokens` a client may ask for, at load and per run.", "limits", metavar="N", ge=1)
    max_context_len: int = _setting(
        1 << 17, "Largest `max_context_len` a client may ask for.", "limits", metavar="N", ge=1)
    max_loaded_models: int = _setting(8, "Most models loaded at once.", "limits", metavar="N", ge=1)
    max_queued_runs: int = _setting(
        16, "Calls waiting for one busy handle at once; more are refused at once.", "limits", metavar="N", ge=1)
    max_request_bytes: int = _setting(
        16 << 20, "Largest request, in bytes: an HTTP body (HTTP 413 beyond), or a line on stdio or the JSON-RPC "
                  "socket (answered -32600).", "limits", metavar="BYTES", ge=1)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: `load` adds the environment (from the mapping it is given)."""
        return (init_settings,)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("port")
    @classmethod
    def _port_in_range(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError(f"port {value} is out of range (1-65535)")
        return value

    @field_validator("auth_token")
    @classmethod
    def _token_long_enough(cls, value: str | None) -> str | None:
        if value is not None and value != value.strip():
            # A bearer value arrives stripped (HTTP drops the whitespace around a header value), so a token that is
            # blank, or starts or ends with whitespace, could never match: every request would get 401.
            what = "is only whitespace" if not value.strip() else "starts or ends with whitespace"
            raise ValueError(f"the auth token {what}, which no Authorization header can carry, so no request "
                             "could ever match it; use a long random secret without spaces around it")
        if value is not None and len(value) < 16:
            raise ValueError("the auth token must be at least 16 characters (use a long random secret)")
        return value

    @model_validator(mode="after")
    def _safe_to_serve(self) -> Self:
        if self.transport != "stdio" and not is_loopback(self.host) and not self.auth_token:
            raise ValueError(
                f"refusing to serve on {self.host} without a token: anyone who can reach it could run the model "
                "and read your files' names. Set --auth-token (or MCP_RKLLM_AUTH_TOKEN) to a long random "
                "secret, or bind 127.0.0.1.")
        return self

    def isolates(self, runtime: str) -> bool:
        """Whether models of `runtime` ("native" or "cpu") run in worker processes."""
        return self.isolation == "process" or (self.isolation == "auto" and runtime == "native")

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Flags that are not None win over environment variables (default os.environ), which win over defaults.

        Flag names are field names (`max_new_tokens`); names that are not settings are ignored. Raises ValueError
        naming the flag or environment variable of each bad value.
        """
        environ = os.environ if environ is None else environ
        from_env = _Environment(cls, environ)()
        given = {name: value for name, value in (flags or {}).items() if value is not None and name in cls.model_fields}
        try:
            return cls(**{**from_env, **given})
        except ValidationError as exc:
            raise ValueError("; ".join(_explain(error, given, environ) for error in exc.errors())) from exc


class _Environment(EnvSettingsSource):
    """The environment source: each field's own variable (`env_var`), read from `environ`; an empty value is unset.

    A list setting is split on its separator (os.pathsep, as in PATH, or a comma), not parsed as JSON.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls, case_sensitive=True)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.environ.get(env_var(field_name)) or None, field_name, False

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        if field_name in LIST_SETTINGS:
            if value is None:
                return None
            separator = list_separator(field_name)
            parts = str(value).split(separator)
            return tuple(part.strip() if separator == "," else part for part in parts if part.strip())
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def _explain(error: Mapping[str, Any], flags: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """One validation error as a sentence that names where the bad value came from (never a token's value)."""
    loc = error.get("loc") or ()
    name = str(loc[0]) if loc else ""
    kind, ctx = error["type"], error.get("ctx") or {}
    secret = name == "auth_token"
    if name in flags:
        value = flags[name]
        shown = f"{flag_name(name)} {' '.join(map(str, value)) if isinstance(value, list | tuple) else value}"
        where = flag_name(name) if secret else shown
    elif name:
        where = env_var(name) if secret else f"{env_var(name)}={environ.get(env_var(name))!r}"
    else:
        where = ""
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{where} is not a whole number"
    if kind in ("float_parsing", "float_type"):
        return f"{where} is not a number"
    if kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
    elif kind == "greater_than_equal":
        text = f"{name} must be at least {_plain(ctx['ge'])}"
    elif kind == "greater_than":
        text = f"{name} must be more than {_plain(ctx['gt'])}"
    elif kind == "literal_error":
        text = f"{name} must be {ctx['expected']}"
    else:
        text = f"{name}: {error['msg']}" if name else str(error["msg"])
    return f"{where}: {text}" if where else text


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- what the flags, the environment and the README are generated from

def flag_name(name: str) -> str:
    """The command-line flag of a setting: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def _extra(name: str) -> dict[str, Any]:
    extra = Settings.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def env_var(name: str) -> str:
    """The environment variable of a setting: `max_new_tokens` -> `MCP_RKLLM_MAX_NEW_TOKENS`."""
    own = _extra(name).get("env")
    return str(own) if own else ENV_PREFIX + name.upper()


def list_separator(name: str) -> str:
    """What separates the values of list setting `name` in its environment variable."""
    return str(_extra(name).get("separator") or os.pathsep)


@dataclass(frozen=True)
class SettingSpec:
    """One setting as the command line and the README show it."""

    name: str
    flag: str
    env: str
    group: str
    """A key of GROUPS."""
    description: str
    default: Any
    value_type: type
    """int, float or str; of each item for a list setting."""
    choices: tuple[str, ...]
    """The allowed values of a Literal setting; () for any value of `value_type`."""
    repeatable: bool
    """A list setting: a repeatable flag, and `separator`-separated values in the environment."""
    separator: str | None
    """os.pathsep or ","; None for a single-value setting."""
    metavar: str | None
    shown_default: str | None
    """How the README shows a default that is no literal value (None, empty); None for a literal value."""

    def default_markdown(self) -> str:
        """The README's default cell."""
        if self.shown_default is not None:
            return self.shown_default
        text = f"`{_plain(self.default)}`"
        if self.name.endswith("_bytes") and isinstance(self.default, int) and self.default % (1 << 20) == 0:
            text += f" ({self.default >> 20} MiB)"
        return text

    def env_markdown(self) -> str:
        """The README's environment cell: the variable, and how a list setting separates its values there."""
        if self.separator == os.pathsep:
            return f"`{self.env}` (`:`-separated; `;` on Windows)"
        return f"`{self.env}`" + (f" (`{self.separator}`-separated)" if self.separator else "")

    def default_text(self) -> str:
        """The default as --help shows it."""
        return self.default_markdown().replace("`", "")


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _value_type(annotation: Any) -> tuple[type, tuple[str, ...], bool]:
    """(item type, Literal choices, is a tuple) of a field annotation: str | None, tuple[str, ...], Literal[...]."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _value_type(inner)
    if origin is tuple:
        item, _, _ = _value_type(get_args(annotation)[0])
        return item, (), True
    if origin is Literal:
        return str, tuple(str(v) for v in get_args(annotation)), False
    if annotation in (int, float, str):
        return annotation, (), False
    raise TypeError(f"no command-line form for a setting of type {annotation!r}")


@cache
def setting_specs() -> tuple[SettingSpec, ...]:
    """Every setting, grouped in GROUPS order and in field order within a group."""
    specs = []
    for name, field in Settings.model_fields.items():
        extra = _extra(name)
        value_type, choices, repeatable = _value_type(field.annotation)
        shown, metavar = extra.get("shown"), extra.get("metavar")
        specs.append(SettingSpec(
            name=name, flag=flag_name(name), env=env_var(name), group=str(extra["group"]),
            description=field.description or "", default=field.default, value_type=value_type, choices=choices,
            repeatable=repeatable, separator=list_separator(name) if repeatable else None,
            metavar=None if metavar is None else str(metavar),
            shown_default=None if shown is None else str(shown)))
    order = list(GROUPS)
    return tuple(sorted(specs, key=lambda spec: order.index(spec.group)))


def settings_markdown_table() -> str:
    """The README's Configuration tables (flag | environment | default | meaning), one per group."""
    lines: list[str] = []
    for key, (title, about) in GROUPS.items():
        lines += [f"**{title}** ({about}):", "", "| flag | environment | default | meaning |", "|---|---|---|---|"]
        for spec in setting_specs():
            if spec.group == key:
                flag = f"`{spec.flag}`" + (" (repeatable)" if spec.repeatable else "")
                meaning = spec.description.replace("|", "\\|")
                lines.append(f"| {flag} | {spec.env_markdown()} | {spec.default_markdown()} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


#: Settings field -> environment variable.
ENV_VARS: dict[str, str] = {name: env_var(name) for name in Settings.model_fields}

#: Settings that hold several values (repeatable flags; separated by `list_separator` in the environment).
LIST_SETTINGS: tuple[str, ...] = tuple(
    name for name, field in Settings.model_fields.items() if get_origin(field.annotation) is tuple)
