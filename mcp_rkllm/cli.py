"""Command line: `mcp-rkllm [serve]` runs the server; `try PROMPT` shows it working; `doctor` checks the board;
`pull REPO` downloads a model from the Hugging Face Hub.

The server flags are generated from `mcp_rkllm.config.Settings`: every setting is a flag and an environment
variable (MCP_RKLLM_*, RKLLM_LIB_PATH, RKLLM_ABI), and flags win. They may come before or after the command:
`mcp-rkllm --models DIR try "Hi"` and `mcp-rkllm try "Hi" --models DIR` are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from mcp_rkllm import __version__
from mcp_rkllm.config import GROUPS, Settings, SettingSpec, setting_specs

#: Destination prefix of the settings flags given after the command (merged with those given before it).
_AFTER = "after_command_"

#: Settings `try` has no flag for: its own --max-new-tokens (the run's, not the limit), and what only HTTP uses
#: (`try` always serves on stdio).
_NOT_IN_TRY = ("max_new_tokens", "transport", "host", "port", "auth_token", "allowed_hosts", "max_request_bytes")


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    """Literal values are matched regardless of case (`--log-level debug`)."""

    def convert(text: str) -> str:
        return next((choice for choice in choices if choice.lower() == text.lower()), text)

    return convert


def _help(spec: SettingSpec) -> str:
    env = spec.env + (f", {spec.separator}-separated" if spec.separator else "")
    text = f"{spec.description} (default: {spec.default_text()}; env {env})"
    if spec.repeatable:
        text = "Repeatable. " + text
    return text.replace("`", "").replace("%", "%%")


def add_settings_flags(p: argparse.ArgumentParser, *, skip: Collection[str] = (), dest_prefix: str = "") -> None:
    """Add a flag for every Settings field (but `skip`), in argument groups, each defaulting to None (= not given).

    Flags are `--field-name`; a Literal gives the choices, a tuple makes the flag repeatable, the annotation
    converts the value and the field's description is the help, with the default and the environment variable.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in setting_specs():
        if spec.name in skip:
            continue
        if spec.group not in groups:
            title, about = GROUPS[spec.group]
            groups[spec.group] = p.add_argument_group(f"{title.lower()} ({about})")
        kwargs: dict[str, Any] = {"dest": dest_prefix + spec.name, "default": None, "help": _help(spec)}
        if spec.choices:
            kwargs.update(choices=spec.choices, type=_choice(spec.choices))
        else:
            kwargs.update(type=spec.value_type, metavar=spec.metavar or spec.name.upper())
        if spec.repeatable:
            kwargs["action"] = "append"
        groups[spec.group].add_argument(spec.flag, **kwargs)


def settings_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, before or after the command, as `Settings.load` takes them.

    Not given = None. A repeatable flag collects its values from both sides; otherwise the later one wins.
    """
    flags: dict[str, Any] = {}
    for spec in setting_specs():
        before, after = getattr(args, spec.name, None), getattr(args, _AFTER + spec.name, None)
        if spec.repeatable:
            flags[spec.name] = [*(before or []), *(after or [])] or None
        else:
            flags[spec.name] = after if after is not None else before
    return flags


def settings_argv(flags: Mapping[str, Any]) -> list[str]:
    """The command-line form of `flags` (field name -> value; None = not given), e.g. for a server subprocess."""
    specs = {spec.name: spec for spec in setting_specs()}
    argv: list[str] = []
    for name, value in flags.items():
        if value is None:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            argv += [specs[name].flag, str(item)]
    return argv


def parser() -> argparse.ArgumentParser:
    """The `mcp-rkllm` argument parser: settings flags, then an optional command (serve, try, doctor)."""
    p = argparse.ArgumentParser(
        prog="mcp-rkllm", allow_abbrev=False,
        description="MCP server for Rockchip RKLLM NPU language models (and GGUF models on the CPU). Without a "
                    "command it serves (on stdio unless --transport says otherwise).",
        epilog="Every flag is also an environment variable (named with it); flags win. Settings flags go before or "
               "after the command. Put the auth token in the environment (MCP_RKLLM_AUTH_TOKEN): flags show in ps.")
    p.add_argument("--version", action="version", version=f"mcp-rkllm {__version__}")
    add_settings_flags(p)
    commands = p.add_subparsers(dest="command", title="commands", metavar="{serve,try,doctor,pull}")

    serve = commands.add_parser("serve", allow_abbrev=False, help="run the MCP server (the default)",
                                description="Run the MCP server.")
    add_settings_flags(serve, dest_prefix=_AFTER)

    try_ = commands.add_parser(
        "try", allow_abbrev=False, help="ask a model one question through a real MCP stdio session",
        description="Start the server as a stdio subprocess, call `generate` through an MCP client, and print the "
                    "tokens as they stream in, then the perf line. Settings flags are passed on to the server.")
    try_.add_argument("prompt", help="what to ask the model")
    try_.add_argument("--max-new-tokens", dest="try_max_new_tokens", type=int, default=128, metavar="N",
                      help="most tokens to generate (default 128)")
    try_.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="sampling temperature; default 0: greedy, the same answer every time")
    try_.add_argument("--verbose", action="store_true", help="show the server's log (at DEBUG)")
    add_settings_flags(try_, skip=_NOT_IN_TRY, dest_prefix=_AFTER)

    doctor = commands.add_parser(
        "doctor", allow_abbrev=False, help="check the board and say what to do about each problem",
        description="What this machine offers the server (runtime library and ABI, SoC, NPU driver, load and "
                    "clocks, governors, memory, models), and what to do about each problem.")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake /proc and /sys, for tests
    add_settings_flags(doctor, dest_prefix=_AFTER)

    pull = commands.add_parser(
        "pull", allow_abbrev=False, help="download a .rkllm / .gguf model from the Hugging Face Hub",
        description="Download a model from the Hugging Face Hub (HF_ENDPOINT for another Hub, HF_TOKEN for private "
                    "and gated repositories) into the first model root, as OWNER--REPO/FILE: the repository's one "
                    ".rkllm / .gguf file, or the FILEs named, each with its sidecar <model>.json and .rknn vision "
                    "encoder when the repository has them. Transfers resume (run the same command again after an "
                    "interruption) and every file is checked against the Hub's checksum before it is kept.")
    pull.add_argument("repo", metavar="REPO", help="OWNER/REPO, or hf.co/OWNER/REPO[:FILE] as Ollama names it")
    pull.add_argument("files", metavar="FILE", nargs="*",
                      help="a file of the repository: its path, its name, or a unique part of a model's name (Q4_K_M)")
    pull.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit (default: main)")
    add_settings_flags(pull, dest_prefix=_AFTER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mcp-rkllm` console script and `python -m mcp_rkllm`.

    Exit codes: 0 done, 1 failed (doctor: a check failed), 2 bad command line or settings, 130 interrupted.
    A reader that stops reading (`mcp-rkllm doctor --json | head -1`) ends it quietly.
    """
    code = 1
    broken = False
    try:
        try:
            code = _run(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except* BrokenPipeError:
        broken = True
    if broken:
        # Python would try to flush stdout again at exit and complain: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return code


def _run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    flags = settings_flags(args)
    command = args.command or "serve"
    if command == "try":
        return try_main(args, flags)
    try:
        settings = Settings.load(flags)
    except ValueError as exc:
        print(f"mcp-rkllm: {exc}", file=sys.stderr)
        return 2
    if command == "doctor":
        return doctor_main(settings, json=args.json, root=args.root)
    if command == "pull":
        return pull_main(settings, args.repo, args.files, args.revision)
    from mcp_rkllm.surfaces.serve import configure_logging, serve

    configure_logging(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve, settings)
    return 0


def doctor_main(settings: Settings, *, json: bool = False, root: str = "/") -> int:
    """`mcp-rkllm doctor [--json]`: what this machine offers the server, and what to do about it."""
    from mcp_rkllm import doctor

    checks = doctor.run(settings, root)
    print(doctor.to_json(checks) if json else doctor.render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def pull_main(settings: Settings, repo: str, files: Sequence[str], revision: str | None = None) -> int:
    """`mcp-rkllm pull REPO [FILE...]`: a model from the Hugging Face Hub into the first model root.

    Progress bars go to stderr (on a terminal), the paths written to stdout. Exit codes: 0 done, 1 failed, 2 the
    name or the choice of files is wrong (several models and none named), 130 interrupted (run it again to resume).
    """
    from mcp_rkllm.models import pull
    from mcp_rkllm.models.store import ModelStore

    parsed = pull.hub_name(repo)
    if parsed is None:
        print(f"mcp-rkllm pull: '{repo}' is not a Hub repository: give OWNER/REPO (or hf.co/OWNER/REPO[:FILE])",
              file=sys.stderr)
        return 2
    repo_id, selector = parsed
    root = ModelStore.from_dirs(list(settings.models)).roots[0]
    try:
        plan = pull.plan(repo_id, [*([selector] if selector else []), *files], root=root, revision=revision)
        print(f"pulling {repo_id} at {plan.commit[:12]} into {plan.dest}", file=sys.stderr)
        for item in pull.describe(plan):
            print(f"  {item['file']} ({item['size']}, {item['digest'][:19]}…)", file=sys.stderr)
        pull.download(plan)
    except pull.PullError as exc:
        print(f"mcp-rkllm pull: {exc.message}", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    except KeyboardInterrupt:
        print("mcp-rkllm pull: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    for file in plan.files:
        print(plan.target(file))
    names = ", ".join(Path(f.name).stem for f in plan.files if f.is_model)
    print(f"done: load it by name ({names})", file=sys.stderr)
    return 0


def try_main(args: argparse.Namespace, flags: Mapping[str, Any]) -> int:
    """`mcp-rkllm try PROMPT`: one streamed generation through a real MCP stdio session.

    The server is `python -m mcp_rkllm serve` on stdio with the settings flags given here (its log at WARNING,
    or DEBUG with --verbose, unless --log-level says otherwise).
    """
    level = flags.get("log_level") or ("DEBUG" if args.verbose else "WARNING")
    forwarded = {**flags, "transport": "stdio", "log_level": level, "auth_token": None}  # no token on a ps line
    try:
        Settings.load(forwarded)
    except ValueError as exc:
        print(f"mcp-rkllm: {exc}", file=sys.stderr)
        return 2
    server_args = ["-m", "mcp_rkllm", "serve", *settings_argv(forwarded)]
    from mcp_rkllm.surfaces.mcp.try_client import try_generate

    try:
        return try_generate(args.prompt, args.try_max_new_tokens, args.temperature, server_args, args.verbose)
    except KeyboardInterrupt:
        return 130
