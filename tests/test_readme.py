"""The README runs (issue 16 item 7): every code block and every command in it is checked the way that fits it.

- ```json / ```jsonc / ```yaml blocks parse; every `mcp-rkllm` argument list in them goes through the real CLI
  parser and `Settings.load`, every MCP_RKLLM_* / RKLLM_* name is a setting's variable, and every URL of the
  server uses a path it serves (probed on a live server).
- Shell commands (```bash blocks, `$ ` lines of ```text blocks, `mcp-rkllm ...` lines and inline `mcp-rkllm ...`
  spans) are split the way the shell splits them; every `mcp-rkllm` command line is parsed and loaded. Those that
  can run here quickly and safely are RUN: the curl examples against a live server on the fake NPU runtime (host
  and port rewritten, the output checked against what the README shows), servers started on loopback and
  probed, `mcp-rkllm doctor`, `--help`, the JSON-RPC clients, `mcp-rkllm try` on the CPU runtime. The others
  (sudo, systemctl, apt, pip from an index, a board's paths, other programs) are listed in PARSED_ONLY with the
  reason, keyed by the command's start: a new README command fails this test until someone classifies it.
- ```python blocks run as files against a live server (SUBSTITUTIONS rewrites the base URL) and must exit 0
  without a traceback.

A block says how to run it with an HTML comment right before it: `<!-- readme-test: run-with=fake-http -->`
(against the live fake-runtime HTTP server), `run-with=fragment` (a Python excerpt: run inside FRAGMENT_PRELUDE),
`run-with=compile-only` (a Python block that needs what this machine lacks: compiled, and listed in COMPILE_ONLY).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]  # (PyYAML, a dependency of huggingface_hub)

from mcp_rkllm.cli import parser, settings_flags
from mcp_rkllm.config import Settings, setting_specs
from mcp_rkllm.models.store import read_sidecar
from mcp_rkllm.surfaces.registry import build_registry
from tests.cpu import require_cpu_runtime
from tests.fake_rkllm.build import build_fake
from tests.servers import REPO, drain_log, free_port, server_env, server_log, start_http_server, stop

README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent

#: Placeholders the README writes for values the reader supplies, and what the test puts there.
PLACEHOLDERS = {"<token>": "readme-test-token-0123456789abcdef", "<board>": "board.lan",
                "MCP_RKLLM_AUTH_TOKEN=...": "MCP_RKLLM_AUTH_TOKEN=readme-test-token-0123456789abcdef"}

#: What the README calls WEATHER and `[...]` in the reasoning/tool-call curl examples (written out in its prose).
WEATHER = ('[{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
           '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]')
TOOL_CALL_MESSAGE = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call> fake:eos=1'

#: How a snippet reaches the test's server: the README's address -> the live one ({port} filled in).
SUBSTITUTIONS = {"http://127.0.0.1:8000": "http://127.0.0.1:{port}",
                 "/tmp/rkllm.sock": "{tmp}/rkllm.sock",
                 "SmolLM2-135M-Instruct.Q4_1": "SmolLM2-fake",
                 '"SmolLM2:latest"': '"SmolLM2-fake:latest"',
                 "WEATHER": WEATHER,
                 '"messages": [...]': '"messages": [{"role": "user", "content": ' + json.dumps(TOOL_CALL_MESSAGE)
                                      .replace("'", "") + "}]"}

#: The fake runtime's model root: the reasoning examples' model under its own name; the bundled model's name
#: (SmolLM2-135M-Instruct.Q4_1, a .gguf the fake cannot load) is rewritten to SmolLM2-fake by SUBSTITUTIONS.
FAKE_MODELS = ("Qwen3-0.6B-w8a8.rkllm", "SmolLM2-fake.rkllm")

#: A `run-with=fragment` Python block runs inside this (what the excerpt leaves out). Its stdio server inherits
#: no settings (the SDK passes a child only PATH, HOME and such): the CPU runtime and the bundled model.
FRAGMENT_PRELUDE = '''\
import sys
import anyio
from mcp import Client, StdioServerParameters

messages = [{"role": "user", "content": "Say hello."}]


async def main() -> None:
'''
FRAGMENT_EPILOGUE = "    assert not reply.is_error, reply\n\n\nanyio.run(main)\n"

#: Python blocks that are only compiled (`run-with=compile-only`), keyed by their first line, with why.
COMPILE_ONLY = {"import base64, openai": "needs a vision model (a .rkllm with its .rknn encoder, librknnrt) and "
                                         "cat.jpg; tests/test_vision.py sends the same image_url parts"}

#: Commands that are only parsed (their `mcp-rkllm` part by the CLI parser), keyed by how the command starts,
#: with why they do not run here.
PARSED_ONLY: dict[str, str] = {
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install \'.[cpu]\'': "installs into the environment and compiles llama.cpp "
                                                              "(minutes); .ci/run installs the same",
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e': "CI's own install and test command (.ci/run's last line, "
                                                     "tests/test_docs.py checks it); pytest inside pytest",
    "python -m pytest": "the test suite itself (what CI runs)",
    "npm install --prefix .ci/node": "the npm registry; .ci/run installs the same",
    "claude mcp add": "Claude Code is not on this machine (its mcp-rkllm arguments and URL are checked)",
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel': "compiles llama.cpp (about 7 minutes); the two installs from its "
                                                "wheel were tried by hand with pipx and uv",
    "pipx install --pip-args": "installs into ~/.local from a wheel directory the user built",
    "uv tool install --find-links": "installs into ~/.local from a wheel directory the user built",
    "uvx --from": "builds llama.cpp in a fresh environment (minutes) from a placeholder path",
    "npx @modelcontextprotocol/inspector": "fetches the Inspector from the npm registry; tests/test_inspector.py "
                                           "makes the same calls through the Inspector CLI",
    "mcp-rkllm pull": "downloads from the Hugging Face Hub; tests/test_pull.py runs pull against a fake Hub",
    "docker run": "Docker and the Open WebUI image are not here",
    "mcp-rkllm --models /srv/models pull": "downloads from the Hugging Face Hub; tests/test_pull.py runs pull "
                                           "against a fake Hub",
    "LISTEN=0.0.0.0:8000 BOARD1=": "needs the boards; tests/test_fleet.py runs HAProxy with three servers",
    "MCP_RKLLM_AUTH_TOKEN=": "binds 0.0.0.0 (loopback only here)",
    "sudo ": "a board's system setup (root, system paths, systemd, the NPU device)",
    "ls -l /dev/dri/": "a board's NPU device nodes",
    "printf 'MCP_RKLLM_HOST=0.0.0.0": "writes the board's /etc/mcp-rkllm/env",
    "python benchmarks/run.py --quick --skip-cpu": "about a minute; .ci/run runs benchmarks/run.py --quick (its "
                                                   "flags are checked against --help)",
}

#: Inline spans that name a command in prose rather than give a command line.
COMMAND_NAMES = {"mcp-rkllm try", "mcp-rkllm pull"}

OPERATORS = {"&&", "||", ";", "|", "&"}
SERVED_BASES = {"/v1": "/v1/models", "/api": "/api/tags", "": "/"}  # base URLs the README gives to clients


@dataclass
class Block:
    line: int
    lang: str
    text: str
    marker: dict[str, str] = field(default_factory=dict)

    @property
    def first(self) -> str:
        return self.text.splitlines()[0] if self.text else ""


@dataclass
class Command:
    """One logical shell command of the README (continuation lines joined), and the output shown after it."""

    block: Block
    text: str
    shown: str = ""

    def key(self) -> str:
        return self.text.splitlines()[0].strip()


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README (indented ones too), with its `readme-test:` marker."""
    lines = (README.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m[1], m[2], i
        i += 1
        body: list[str] = []
        while not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i][len(indent):])
            i += 1
        marker: dict[str, str] = {}
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mm = re.match(r"^\s*<!-- readme-test: (.*) -->$", lines[j]) if j >= 0 else None
        if mm:
            marker = dict(item.split("=", 1) for item in mm[1].split())
        found.append(Block(start + 1, lang, "\n".join(body), marker))
        i += 1
    return found


def inline_commands() -> list[str]:
    """`mcp-rkllm ...` spans of the README's prose."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", README.read_text(), flags=re.S | re.M)
    return [span for span in re.findall(r"`([^`\n]+)`", prose)
            if re.match(r"(sudo )?mcp-rkllm( |$)", span)]


def with_placeholders(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


def _complete(text: str) -> bool:
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def shell_commands(block: Block) -> list[Command]:
    """The logical commands of a block: a bash block's lines; a text block's `$ ` lines (with the output shown
    after each) and its `mcp-rkllm pull` / `mcp-rkllm --...` lines."""
    commands: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if block.lang == "text":
            if line.startswith("$ "):
                line = line[2:]
            elif not re.match(r"mcp-rkllm (pull|--)", line):
                if commands:
                    commands[-1].shown += line + "\n"
                i += 1
                continue
        buffer = line
        while not _complete(buffer) and i + 1 < len(lines):
            i += 1
            buffer += "\n" + lines[i]
        i += 1
        if shlex.split(buffer, comments=True):
            commands.append(Command(block, buffer))
    return commands


def all_commands() -> list[Command]:
    return [c for b in blocks() if b.lang in ("bash", "text") for c in shell_commands(b)]


def tokens(text: str) -> list[str]:
    lexer = shlex.shlex(with_placeholders(text).replace("\\\n", " "), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a command line, split at && || ; | &."""
    out: list[list[str]] = [[]]
    for token in tokens(text):
        if token in OPERATORS:
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


@dataclass
class Invocation:
    """One `mcp-rkllm` (or `python -m mcp_rkllm`) invocation: its arguments and the variables set for it."""

    args: list[str]
    env: dict[str, str]
    where: str


INSPECTOR_FLAGS = {"--method", "--tool-name", "--tool-arg", "--uri", "--transport", "--header"}


def invocations(text: str, where: str) -> list[Invocation]:
    found = []
    for words in simple_commands(text):
        env: dict[str, str] = {}
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        for k, word in enumerate(words):
            command_position = k == 0 or words[k - 1] in ("sudo", "--", "--cli") or (k > 1 and words[k - 2] == "--from")
            if Path(word).name == "mcp-rkllm" and command_position:
                args = words[k + 1:]
            elif word == "-m" and k + 1 < len(words) and words[k + 1] == "mcp_rkllm":
                args = words[k + 2:]
            else:
                continue
            if words[0] == "npx":  # the Inspector's own flags follow the server's command line
                args = args[:next((n for n, a in enumerate(args) if a in INSPECTOR_FLAGS), len(args))]
            found.append(Invocation(args, env, where))
            break
    return found


def load(invocation: Invocation) -> tuple[argparse.Namespace, Settings]:
    """Parse with the real CLI parser and load the settings, as `mcp-rkllm` would; fails naming the snippet."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = parser().parse_args(invocation.args)
        except SystemExit as exc:
            assert exc.code == 0, f"{invocation.where}: mcp-rkllm {invocation.args}: {err.getvalue()}"
            return argparse.Namespace(command="help"), Settings.load({}, {})
    ours = {k: v for k, v in invocation.env.items() if k.startswith(("MCP_RKLLM_", "RKLLM_", "RKNN_"))}
    assert set(ours) <= {s.env for s in setting_specs()}, f"{invocation.where}: unknown variables {ours}"
    try:
        return ns, Settings.load(settings_flags(ns), ours)
    except ValueError as exc:
        raise AssertionError(f"{invocation.where}: mcp-rkllm {invocation.args}: {exc}") from exc


def json_values(block: Block) -> list[Any]:
    """The JSON values of a json / jsonc block: // comments dropped, `…` elisions of the wire examples closed."""
    text = "\n".join(line for line in block.text.splitlines() if not line.lstrip().startswith("//"))
    text = text.replace("[…]", "[]").replace(", …}", "}")
    decoder, values, pos = json.JSONDecoder(), list[Any](), 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"README line {block.line}: not JSON: {exc}") from exc
        values.append(value)


def walk(value: Any) -> Iterator[Any]:
    yield value
    for child in value.values() if isinstance(value, dict) else value if isinstance(value, list) else []:
        yield from walk(child)


# ---------------------------------------------------------------------------------------------- classification


def classify(command: Command) -> str:
    """How a command is checked: 'run' or 'parsed: <reason>'; AssertionError when nobody classified it."""
    text = with_placeholders(command.text)
    if command.block.marker.get("run-with") == "fake-http" or re.match(r"curl (\S+ )*?http://127\.0\.0\.1:8000/", text):
        return "run"
    if runnable_mcp_rkllm(text) or re.match(r"(python|node) examples/jsonrpc_client", text):
        return "run"
    if re.match(r"CMAKE_ARGS=\S+ pip install '\.\[cpu\]' && mcp-rkllm try", text):
        return "run"  # the install part is parsed only; the `try` runs on the CPU runtime
    for start, reason in PARSED_ONLY.items():
        if command.text.startswith(start):
            return "parsed: " + reason
    raise AssertionError(f"README line {command.block.line}: nobody classified {command.key()!r}: run it in "
                         "tests/test_readme.py or list it in PARSED_ONLY with the reason")


def runnable_mcp_rkllm(text: str) -> bool:
    """`mcp-rkllm doctor`, `--help`, or a server on loopback (started and probed here)."""
    if not text.startswith("mcp-rkllm"):
        return False
    ns, settings = load(invocations(text, "")[0])
    return ns.command in ("doctor", "help") or (ns.command in (None, "serve") and settings.transport != "stdio"
                                               and settings.host in ("127.0.0.1", "localhost"))


def test_every_block_and_command_is_classified() -> None:
    found = blocks()
    assert len(found) > 40 and {b.lang for b in found} <= {"bash", "text", "json", "jsonc", "python", "yaml"}
    unmarked = [b.line for b in found
                if b.lang == "python" and b.marker.get("run-with") not in ("fake-http", "fragment", "compile-only")]
    compiled = {b.first for b in found if b.marker.get("run-with") == "compile-only"}
    assert compiled == set(COMPILE_ONLY), f"compile-only blocks and COMPILE_ONLY differ: {compiled ^ set(COMPILE_ONLY)}"
    assert not unmarked, f"README python blocks at lines {unmarked} need <!-- readme-test: run-with=... -->"
    commands = all_commands()
    kinds = {c.key(): classify(c) for c in commands}
    used = {start for start in PARSED_ONLY if any(c.text.startswith(start) for c in commands)}
    assert used == set(PARSED_ONLY), f"PARSED_ONLY entries the README no longer has: {set(PARSED_ONLY) - used}"
    assert sum(kind == "run" for kind in kinds.values()) >= 25


# ------------------------------------------------------------------------------------------ parsed and checked


def test_every_mcp_rkllm_command_line_parses_and_loads() -> None:
    checked = 0
    for command in all_commands():
        for invocation in invocations(command.text, f"README line {command.block.line}"):
            load(invocation)
            checked += 1
    for span in inline_commands():
        if "[" not in span and span not in COMMAND_NAMES:  # `mcp-rkllm pull OWNER/REPO [FILE...]`: a synopsis
            for invocation in invocations(span, f"README `{span}`"):
                load(invocation)
                checked += 1
    assert checked >= 25


def _check_client_config(value: Any, where: str) -> int:
    """mcpServers / servers entries: a command line of mcp-rkllm (parsed), a URL (checked later), env names."""
    checked = 0
    for node in walk(value):
        if not isinstance(node, dict):
            continue
        command, args = node.get("command"), node.get("args")
        if isinstance(command, str) and isinstance(args, list):
            for invocation in invocations(shlex.join([command, *args]), where):
                invocation.env.update(node.get("env") or {})
                load(invocation)
                checked += 1
            if Path(command).name not in ("mcp-rkllm", "npx", "uvx"):
                raise AssertionError(f"{where}: unexpected command {command}")
        for name in node.get("env") or {}:
            if name.startswith(("MCP_RKLLM_", "RKLLM_", "RKNN_")):
                assert name in {s.env for s in setting_specs()}, f"{where}: {name} is no setting"
    return checked


def test_json_blocks_parse_and_client_configs_match_the_server() -> None:
    configs = 0
    for block in blocks():
        if block.lang not in ("json", "jsonc"):
            continue
        values = json_values(block)
        where = f"README line {block.line}"
        for value in values:
            if isinstance(value, dict) and ("mcpServers" in value or "servers" in value):
                configs += 1
                assert value.get("mcpServers", value.get("servers")), where
                _check_client_config(value, where)
            elif isinstance(value, dict) and value.get("jsonrpc") == "2.0":
                if "method" in value and not value["method"].startswith("rkllm.callback"):
                    assert _jsonrpc_method_known(value["method"]), f"{where}: no method {value['method']}"
            elif isinstance(value, dict) and "model" in value:  # arguments of the chat / generate tools
                spec = build_registry().specs["chat" if "messages" in value else "generate"]
                spec.params.model_validate(value)
            else:  # the model sidecar example: read as the store reads it
                assert isinstance(value, dict) and "max_new_tokens" in value, where
    # the inline configs of the prose, too
    prose = re.sub(r"^\s*```.*?^\s*```", "", README.read_text(), flags=re.S | re.M)
    for span in re.findall(r"`(\{\"(?:mcpServers|servers)\".*?)`", prose):
        _check_client_config(json.loads(span), f"README `{span}`")
        configs += 1
    uvx = re.search(r'`"command": "uvx", "args": (\[.*?\])`', prose)
    assert uvx and _check_client_config({"command": "uvx", "args": json.loads(uvx[1])}, "README uvx config") == 1
    assert configs >= 7


def _jsonrpc_method_known(method: str) -> bool:
    from mcp_rkllm.surfaces.jsonrpc.openrpc import markdown_table

    return f"`{method}`" in markdown_table(build_registry())


def test_model_sidecar_example_is_read_by_the_store(tmp_path: Path) -> None:
    (sidecar,) = [b for b in blocks() if b.lang == "json" and '"max_context_len"' in b.text]
    (tmp_path / "m.rkllm").write_bytes(b"x")
    (tmp_path / "m.json").write_text(sidecar.text)
    read = read_sidecar(tmp_path / "m.rkllm")
    assert read is not None and read.param.max_new_tokens == 512 and read.chat_template is not None


def test_yaml_blocks_parse_and_point_at_the_openai_api() -> None:
    (block,) = [b for b in blocks() if b.lang == "yaml"]
    config = yaml.safe_load(with_placeholders(block.text))
    (model,) = config["models"]
    assert model["provider"] == "openai" and httpx.URL(model["apiBase"]).path == "/v1"


def test_environment_names_are_settings() -> None:
    text = README.read_text()
    names = set(re.findall(r"\bMCP_RKLLM_[A-Z_]*[A-Z]\b", text))
    names |= set(re.findall(r"(?:^|\s)((?:RKLLM|RKNN)_[A-Z_]+)=", text, re.M))
    variables = {spec.env for spec in setting_specs()}
    assert names and names <= variables, f"not settings: {names - variables}"


def test_benchmark_flags_exist() -> None:
    shown = {flag for c in all_commands() if c.text.startswith("python benchmarks/run.py")
             for flag in re.findall(r"--[a-z-]+", c.text)}
    help_text = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--help"], capture_output=True,
                               text=True, timeout=60, cwd=REPO).stdout
    assert shown and all(flag in help_text for flag in shown), shown


# --------------------------------------------------------------------------------------------- live servers


@dataclass
class Server:
    port: int
    root: Path
    library: Path
    proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def substitute(self, text: str) -> str:
        for old, new in SUBSTITUTIONS.items():
            text = text.replace(old, new.replace("{port}", str(self.port)).replace("{tmp}", str(self.root)))
        return text


def model_root(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in FAKE_MODELS:
        (root / name).write_bytes(b"fake model")
    return root


@pytest.fixture(scope="module")
def fake_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mcp-rkllm --transport http` on 127.0.0.1 with the fake NPU runtime and the README's fake model names."""
    root = model_root(tmp_path_factory.mktemp("readme-http"))
    library = build_fake("1.3.0", "1.3.0")
    server = Server(free_port(), root, library)
    server.proc = start_http_server("http", library, root / "records", server.port)
    yield server
    stop(server.proc)


def shell_env(server: Server, **extra: str) -> dict[str, str]:
    env = server_env(server.library, None, server.root)
    env.update(extra)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    return env


def run_shell(server: Server, text: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", server.substitute(text)], capture_output=True, text=True, timeout=timeout,
                          env=shell_env(server, **extra), cwd=REPO)


def messages_of(output: str) -> list[Any]:
    """The JSON messages of a response: one document, NDJSON lines or SSE `data:` events."""
    try:
        return [json.loads(output)]
    except json.JSONDecodeError:
        lines = [line.removeprefix("data: ") for line in output.splitlines() if line.strip()]
        return [json.loads(line) for line in lines if line != "[DONE]"]


#: Facts of an example's shown output that the live answer must repeat (values elided with … are not compared).
FACTS = re.compile(r'"(code|param|finish_reason|done_reason|reasoning_content|thinking)"\s*:\s*"([^"…]+)"')


def check_answer(command: Command, output: str) -> None:
    where = f"README line {command.block.line}: {command.key()}"
    assert output.strip(), f"{where}: no answer"
    answer = messages_of(output)
    errors = [m for m in answer if isinstance(m, dict) and "error" in m]
    shown_error = re.search(r'"error"\s*:', command.shown)
    assert bool(errors) == bool(shown_error), f"{where}: answered {output[:400]}"
    for key, value in FACTS.findall(command.shown):
        assert re.search(rf'"{key}"\s*:\s*"{re.escape(value)}"', output), f"{where}: no {key}={value} in {output}"
    ollama_error = re.search(r'"error"\s*:\s*"([A-Z_]+):', command.shown)
    if ollama_error:
        assert f'"error":"{ollama_error[1]}:' in output.replace(" ", ""), f"{where}: {output}"


def run_commands() -> list[Command]:
    return [c for c in all_commands() if classify(c) == "run"]


def curl_commands() -> list[Command]:
    """The curl commands, in README order (they build on each other: load, then loaded, then unload)."""
    return [c for c in run_commands() if c.text.startswith("curl")]


def run_curl_commands(server: Server, commands: list[Command]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    assert commands
    for command in commands:
        if "/healthz" in command.text:
            command = Command(command.block, command.text.split(";")[0])  # journalctl is the board's
        proc = run_shell(server, command.text)
        assert proc.returncode == 0, f"README line {command.block.line}: {command.key()}: {proc.stderr}"
        check_answer(command, proc.stdout)


@pytest.mark.slow
def test_curl_examples_run_against_a_live_server(fake_http: Server) -> None:
    """The OpenAI, Ollama, RockchipLlama and reasoning / tool-call examples and the board's health check, on the
    fake NPU runtime (the bundled model's name rewritten: see SUBSTITUTIONS)."""
    commands = curl_commands()
    assert len(commands) >= 20
    run_curl_commands(fake_http, commands)


@pytest.fixture
def tmp_root(tmp_path: Path) -> Server:
    return Server(free_port(), model_root(tmp_path / "models"), build_fake("1.3.0", "1.3.0"))


def _wait_for(check: Any, what: str, proc: subprocess.Popen[bytes], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            time.sleep(0.2)  # the log reader takes the last lines
            raise AssertionError(f"{what}: the server exited: {server_log(proc)}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not serving after {seconds} s")


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


@contextlib.contextmanager
def started(server: Server, text: str) -> Iterator[Settings]:
    """A server command of the README, started on loopback (its port and socket rewritten) until the block ends."""
    (invocation,) = invocations(server.substitute(text), text)
    args = [a for a in invocation.args if a != "--port"]
    _, settings = load(Invocation(args, {}, text))
    argv = [sys.executable, "-m", "mcp_rkllm", *args, "--port", str(server.port)]
    only_one = {"MCP_RKLLM_MODELS": str(server.root / "one")}
    (server.root / "one").mkdir(exist_ok=True)
    (server.root / "one" / "only.rkllm").write_bytes(b"fake model")
    env = shell_env(server, **only_one)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    drain_log(proc)  # a full stderr pipe would block the server
    try:
        if settings.transport == "jsonrpc":
            sock = Path(str(settings.socket))
            _wait_for(lambda: sock.is_socket(), text, proc)
        else:
            _wait_for(lambda: _listening(server.port), text, proc)
            if settings.transport == "http":
                assert httpx.get(server.url("/healthz"), timeout=5).status_code == 200
                if settings.socket:
                    sock = Path(str(settings.socket))
                    _wait_for(lambda: sock.is_socket(), text, proc)
            else:  # sse: the stream answers 200 and stays open
                with httpx.stream("GET", server.url("/sse"), timeout=5) as r:
                    assert r.status_code == 200
        yield settings
    finally:
        stop(proc)


@pytest.mark.slow
def test_servers_and_jsonrpc_clients_run(tmp_root: Server) -> None:
    """The JSON-RPC block: each server started as written (port and socket rewritten), the clients run against
    the last one; and the inline `mcp-rkllm --transport http` / `sse`."""
    (block,) = [b for b in blocks() if b.first.startswith("mcp-rkllm --transport jsonrpc")]
    servers = [c for c in shell_commands(block) if c.text.startswith("mcp-rkllm")]
    clients = [c for c in shell_commands(block) if not c.text.startswith("mcp-rkllm")]
    assert len(servers) == 3 and len(clients) == 2
    for command in servers[:-1]:
        with started(tmp_root, command.text):
            pass
    node = shutil.which("node")
    with started(tmp_root, servers[-1].text):
        for command in clients:
            if command.text.startswith("node") and node is None:
                continue
            proc = run_shell(tmp_root, command.text)
            assert proc.returncode == 0 and "tokens, finish_reason" in proc.stdout, (command.text, proc.stderr)
    for span in {"mcp-rkllm --transport http", "mcp-rkllm --transport sse"} & set(inline_commands()):
        with started(tmp_root, span):
            pass


def test_doctor_and_help_run(tmp_root: Server) -> None:
    doctor = [c for c in run_commands() if c.text.startswith("mcp-rkllm doctor")]
    spans = [s for s in inline_commands() if s in ("mcp-rkllm --help", "mcp-rkllm doctor")]
    assert doctor and "mcp-rkllm --help" in spans and "(or `--json`)" in README.read_text()
    for text in [*(c.text for c in doctor), *spans, "mcp-rkllm doctor --json"]:
        proc = run_shell(tmp_root, text, timeout=60)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (text, proc.stderr)
        if text.endswith("--json"):
            checks = json.loads(proc.stdout)
            assert {"runtime library", "memory"} <= {c["name"] for c in checks}
        elif text.endswith("--help"):
            assert all(spec.flag in proc.stdout for spec in setting_specs())
        else:
            assert "runtime library" in proc.stdout


@pytest.mark.cpu
@pytest.mark.slow
def test_quickstart_try_runs_on_the_cpu_runtime(tmp_path: Path) -> None:
    require_cpu_runtime()
    (command,) = [c for c in run_commands() if "mcp-rkllm try" in c.text and c.text.startswith("CMAKE_ARGS")]
    try_part = command.text[command.text.index("mcp-rkllm try"):]
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
               XDG_DATA_HOME=str(tmp_path), MCP_RKLLM_RUNTIME="cpu")
    proc = subprocess.run(["bash", "-c", try_part], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "SmolLM2-135M-Instruct.Q4_1 on cpu" in proc.stdout


# ------------------------------------------------------------------------------------------------ Python


def python_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang == "python" and b.marker.get("run-with") != "compile-only"]


def test_compile_only_python_blocks_compile() -> None:
    for block in blocks():
        if block.marker.get("run-with") == "compile-only":
            assert block.first in COMPILE_ONLY, f"README line {block.line}: say why in COMPILE_ONLY"
            compile(block.text, f"README line {block.line}", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(b, marks=pytest.mark.cpu) if b.marker.get("run-with") == "fragment"
                                   else b for b in python_blocks()], ids=lambda b: f"line{b.line}")
def test_python_snippets_run(block: Block, fake_http: Server, tmp_path: Path) -> None:
    assert block.marker.get("run-with") in ("fake-http", "fragment"), \
        f"README line {block.line}: say how to run it (<!-- readme-test: run-with=fake-http|fragment -->)"
    source = fake_http.substitute(block.text)
    imports = re.findall(r"^(?:from|import) (\w+)", source, re.M)
    for module in imports:
        if module in ("langchain_openai",):
            pytest.importorskip(module, reason=f"the README's {module} example needs `pip install langchain-openai`")
    if block.marker["run-with"] == "fragment":  # its server is a stdio child: the CPU runtime, bundled model
        require_cpu_runtime()
        body = "\n".join("    " + line if line else line for line in source.splitlines())
        source = FRAGMENT_PRELUDE + body + "\n" + FRAGMENT_EPILOGUE
    path = tmp_path / "snippet.py"
    path.write_text(source)
    env = shell_env(fake_http)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=90, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"README line {block.line}:\n{proc.stderr}"
    assert proc.stdout.strip(), f"README line {block.line}: printed nothing"
