#!/usr/bin/env node
// Stream a reply from mcp-rkllm's JSON-RPC socket with Node's standard library (no dependencies).
//
//   mcp-rkllm --transport jsonrpc --socket /tmp/rkllm.sock
//   node examples/jsonrpc_client.mjs --socket /tmp/rkllm.sock "Why is the sky blue?"
//
// Without --model-path it calls `generate` (the server's default model, or --model NAME); with it, `rkllm.init` in RKLLM's
// positional form, then `rkllm.run` in the flat form. Tokens arrive as `rkllm.callback` notifications
// before the response and are printed as they come.
import net from "node:net";
import readline from "node:readline";
import { parseArgs } from "node:util";

const { values: opts, positionals } = parseArgs({
  options: {
    socket: { type: "string", default: "/tmp/rkllm.sock" },
    model: { type: "string" },
    "model-path": { type: "string" },
    "max-tokens": { type: "string", default: "128" },
  },
  allowPositionals: true,
});
if (positionals.length !== 1) {
  console.error("usage: node jsonrpc_client.mjs [--socket PATH] [--model NAME | --model-path FILE] [--max-tokens N] PROMPT");
  process.exit(2);
}

const conn = net.createConnection(opts.socket);
const pending = new Map(); // id -> { resolve, reject, onText }
let nextId = 1;

readline.createInterface({ input: conn }).on("line", (line) => {
  const msg = JSON.parse(line);
  if (msg.method === "rkllm.callback") {
    const call = pending.get(msg.params.request_id);
    // The reply's content; callbacks with a "kind" carry reasoning or tool-call text, and heartbeats no text.
    if (call && call.onText && msg.params.text && !msg.params.kind) call.onText(msg.params.text);
  } else if (pending.has(msg.id)) {
    const call = pending.get(msg.id);
    pending.delete(msg.id);
    if (msg.error) {
      const hint = msg.error.data && msg.error.data.hint ? `\nHint: ${msg.error.data.hint}` : "";
      call.reject(new Error(`${msg.error.code} ${msg.error.message}${hint}`));
    } else call.resolve(msg.result);
  }
});
conn.on("error", (err) => { console.error(`cannot reach ${opts.socket}: ${err.message}`); process.exit(1); });

function call(method, params, onText) {
  const id = nextId++;
  conn.write(JSON.stringify({ jsonrpc: "2.0", method, params, id }) + "\n");
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject, onText }));
}

const show = (text) => process.stdout.write(text);
const maxTokens = Number(opts["max-tokens"]);
try {
  let result;
  if (opts["model-path"]) {
    const { handle } = await call("rkllm.init", [null, { model_path: opts["model-path"] }, null]);
    result = await call("rkllm.run", { handle, prompt: positionals[0], max_tokens: maxTokens }, show);
    await call("rkllm.destroy", [handle]);
  } else {
    const params = { prompt: positionals[0], max_new_tokens: maxTokens };
    if (opts.model) params.model = opts.model;
    result = await call("generate", params, show);
  }
  console.log(`\n[${result.token_count} tokens, finish_reason ${result.finish_reason}]`);
  conn.end();
} catch (err) {
  console.error(err.message);
  process.exit(1);
}
