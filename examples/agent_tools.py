"""An agent loop with a tool: `chat` gets a `get_weather` function; when the model calls it, the call runs here and
its result goes back with role "tool"; the model's final answer is printed.

    python examples/agent_tools.py [MODEL_NAME] [QUESTION]

Without a name it uses the server's default model (the bundled SmolLM2-135M on the CPU runtime). A model that
small calls tools poorly: whatever it does (call the tool, answer directly, write a broken call), the loop
runs to the end and says what happened. Needs the MCP Python SDK 2.x (`from mcp import Client`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}]


def get_weather(city: str = "Paris", **_: Any) -> dict[str, Any]:
    """A stand-in for a real weather service."""
    return {"city": city, "temperature_c": 21, "sky": "sunny"}


async def main(model: str | None, question: str) -> int:
    # The server gets this environment (the SDK passes only a minimal one otherwise): MCP_RKLLM_* settings apply.
    server = StdioServerParameters(command=sys.executable, args=["-m", "mcp_rkllm", "--log-level", "WARNING"],
                                   env=dict(os.environ))
    async with Client(server) as client:
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
        print(f"> {question}")
        for turn in range(3):  # at most two tool rounds, then an answer
            args: dict[str, Any] = {"messages": messages, "tools": TOOLS, "temperature": 0, "max_new_tokens": 64}
            if model:
                args["model"] = model
            reply = await client.call_tool("chat", args)
            if reply.is_error:
                print(f"chat failed: {reply.content[0].text}", file=sys.stderr)  # type: ignore[union-attr]
                return 1
            result: dict[str, Any] = reply.structured_content or {}
            if result["reasoning"]:
                print(f"[the model reasoned: {result['reasoning'][:200]!r}]")
            for warning in result["warnings"]:
                print(f"[could not read part of the reply: {warning}]")
            calls = result["tool_calls"]
            if not calls:
                how = "after using the tool" if turn else "without calling the tool"
                print(f"[{result['family']} model answered {how}]\n{result['content'] or '(empty answer)'}")
                return 0
            messages.append(result["message"])  # the assistant turn with its calls, sent back as it came
            for call in calls:
                name, raw = call["function"]["name"], call["function"]["arguments"]
                try:
                    arguments = json.loads(raw)
                except json.JSONDecodeError:
                    arguments = {}
                if name == "get_weather" and isinstance(arguments, dict):
                    output = get_weather(**arguments)
                else:
                    output = {"error": f"unknown tool {name!r}"}
                print(f"[the model called {name}({raw}) -> {json.dumps(output)}]")
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(output)})
        print("[the model kept calling tools; stopping after three rounds]")
        return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None,
                       sys.argv[2] if len(sys.argv) > 2 else "What is the weather in Paris? Use the get_weather tool."))
