"""A minimal agent: start mcp-rkllm over stdio, load a model, and stream a two-turn chat.

    python examples/agent.py [MODEL_NAME]

Without a name it loads the server's default model (the bundled SmolLM2 on the CPU runtime).
"""

from __future__ import annotations

import sys

import anyio
from mcp import Client, StdioServerParameters


async def main(model: str | None) -> None:
    server = StdioServerParameters(command=sys.executable, args=["-m", "mcp_rkllm", "--log-level", "WARNING"])
    async with Client(server) as client:
        loaded = await client.call_tool("load_model", {"model": model or "SmolLM2"})
        if loaded.is_error:
            raise SystemExit(loaded.content[0].text)  # type: ignore[union-attr]
        handle = loaded.structured_content["handle"]  # type: ignore[index]

        async def show(progress: float, total: float | None, message: str | None) -> None:
            print(message or "", end="", flush=True)

        messages = [{"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": "Hello! My name is Ada and I live in Paris."}]
        for follow_up in ["What is my name, and where do I live?", None]:
            print(f"> {messages[-1]['content']}\n", flush=True)
            reply = await client.call_tool("chat", {"handle": handle, "messages": messages, "temperature": 0,
                                                    "max_new_tokens": 48}, progress_callback=show)
            result = reply.structured_content or {}
            print(f"\n[{result.get('token_count')} tokens, history reused: {result.get('reused_history')}]\n")
            if follow_up is None:
                break
            messages += [result["message"], {"role": "user", "content": follow_up}]
        await client.call_tool("unload_model", {"handle": handle})


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else None)
