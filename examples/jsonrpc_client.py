#!/usr/bin/env python3
"""Stream a reply from mcp-rkllm's JSON-RPC socket, with the standard library only.

Start the server:  mcp-rkllm --transport jsonrpc --socket /tmp/rkllm.sock
Then:              python examples/jsonrpc_client.py --socket /tmp/rkllm.sock "Why is the sky blue?"

Without --model-path it calls `generate` (the server's default model or --model, loaded on first use); with it,
the C-style calls: `rkllm.init` in RKLLM's positional form, then `rkllm.run` in the flat form.
Tokens arrive as `rkllm.callback` notifications before the response; they are printed as they come.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import sys
from typing import Any

ids = itertools.count(1)


class Rpc:
    """One connection: requests out as lines of JSON, messages in as lines of JSON."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.lines = self.sock.makefile("rb")

    def call(self, method: str, params: Any, on_text: Any = None) -> Any:
        """Send a request; pass each streamed text to `on_text`; return the result (or exit on an error)."""
        request_id = next(ids)
        message = {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        for line in self.lines:
            reply = json.loads(line)
            if reply.get("method") == "rkllm.callback" and reply["params"]["request_id"] == request_id:
                if on_text is not None and reply["params"]["text"] and "kind" not in reply["params"]:
                    on_text(reply["params"]["text"])  # the reply's content (not reasoning, tool calls, heartbeats)
            elif reply.get("id") == request_id:
                if "error" in reply:
                    error = reply["error"]
                    hint = (error.get("data") or {}).get("hint", "")
                    sys.exit(f"{method} failed: {error['code']} {error['message']}"
                             + (f"\nHint: {hint}" if hint else ""))
                return reply["result"]
        sys.exit("the server closed the connection")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--socket", default="/tmp/rkllm.sock", help="the server's --socket path")
    parser.add_argument("--model", help="a model name for generate (see the list_models method); default: the "
                                        "server's default model")
    parser.add_argument("--model-path", help="a .rkllm/.gguf file inside the server's model roots (rkllm.init)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    rpc = Rpc(args.socket)

    def show(text: str) -> None:
        print(text, end="", flush=True)

    if args.model_path:
        handle = rpc.call("rkllm.init", [None, {"model_path": args.model_path}, None])["handle"]
        result = rpc.call("rkllm.run", {"handle": handle, "prompt": args.prompt, "max_tokens": args.max_tokens},
                          show)
        rpc.call("rkllm.destroy", [handle])
    else:
        params = {"prompt": args.prompt, "max_new_tokens": args.max_tokens}
        if args.model:
            params["model"] = args.model
        result = rpc.call("generate", params, show)
    print(f"\n[{result['token_count']} tokens, finish_reason {result['finish_reason']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
