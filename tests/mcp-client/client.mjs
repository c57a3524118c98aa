// Drives polydev with the official MCP TypeScript SDK client and prints what happened as JSON.
//   node client.mjs http  <server-url> <token> <args-json>
//   node client.mjs stdio <polydev-binary> <server-url> <token|-> <args-json>
// With CANCEL_AFTER_MS=N the call is cancelled after N ms; with LOG_LEVEL=L it first sends
// logging/setLevel L and reports the log notifications it receives in `logs`.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { LoggingMessageNotificationSchema } from "@modelcontextprotocol/sdk/types.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const [mode, ...rest] = process.argv.slice(2);
let transport;
let args;
if (mode === "http") {
  const [url, token, json] = rest;
  args = JSON.parse(json);
  transport = new StreamableHTTPClientTransport(new URL(`${url}/mcp`), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
} else if (mode === "stdio") {
  const [binary, url, token, json] = rest;
  args = JSON.parse(json);
  const env = { ...process.env, POLYDEV_SERVER_URL: url };
  delete env.POLYDEV_USER_TOKEN;
  if (token !== "-") env.POLYDEV_USER_TOKEN = token;
  transport = new StdioClientTransport({ command: binary, args: ["mcp"], env, stderr: "pipe" });
} else {
  throw new Error(`unknown mode ${mode}`);
}

const out = { progress: [], logs: [] };
let stderr = "";
if (transport.stderr) transport.stderr.on("data", (d) => (stderr += d));
const client = new Client({ name: "polydev-sdk-test", version: "1.0.0" });
client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => out.logs.push(n.params));
await client.connect(transport);
if (process.env.LOG_LEVEL) await client.setLoggingLevel(process.env.LOG_LEVEL);
out.server = client.getServerVersion();
out.protocol = transport.protocolVersion ?? null;
out.tools = (await client.listTools()).tools.map((t) => t.name);
// CANCEL_AFTER_MS: abort the call (the SDK sends notifications/cancelled), then wait a moment
// so the server sees it before the connection closes.
const abort = new AbortController();
const cancelAfter = Number(process.env.CANCEL_AFTER_MS || 0);
if (cancelAfter) setTimeout(() => abort.abort("test cancels"), cancelAfter);
try {
  // TOOL: another tool than get_perspectives (list_available_models).
  const tool = process.env.TOOL || "get_perspectives";
  const result = await client.callTool({ name: tool, arguments: args }, undefined, {
    onprogress: (p) => out.progress.push(p),
    timeout: 60000,
    signal: abort.signal,
  });
  out.isError = result.isError ?? false;
  out.text = result.content?.map((c) => c.text).join("\n");
  out.structured = result.structuredContent ?? null;
} catch (error) {
  out.error = { code: error.code ?? null, message: String(error.message ?? error) };
}
if (cancelAfter) await new Promise((r) => setTimeout(r, 300));
// Log notifications travel apart from the response: give the last ones a moment.
if (process.env.LOG_LEVEL) await new Promise((r) => setTimeout(r, 200));
await client.close();
out.stderr = stderr;
console.log(JSON.stringify(out));
