// The official MCP TypeScript SDK client's OAuth support against a running `polydev serve`:
// 401 → discovery (RFC 9728, RFC 8414) → dynamic registration (RFC 7591) → authorization (the
// user's sign-in and consent, done here over HTTP like a browser would: cookies, forms,
// redirects not followed) → token (PKCE S256) → tools/call get_perspectives → refresh (through
// the SDK's auth()) → revoke (RFC 7009) → 401. Prints what happened as JSON.
//   node oauth-client.mjs <server-url> <email> <password> <args-json>
import { randomBytes } from "node:crypto";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { UnauthorizedError, auth } from "@modelcontextprotocol/sdk/client/auth.js";

const [base, email, password, json] = process.argv.slice(2);
const args = JSON.parse(json);
const mcpUrl = new URL(`${base}/mcp`);
// A native app's loopback listener (RFC 8252). Nothing listens: the Location header is read.
const redirectUrl = "http://127.0.0.1:33418/callback";
const out = { steps: [] };
const step = (s) => out.steps.push(s);

class MemoryProvider {
  constructor() {
    this.state_ = randomBytes(16).toString("hex");
  }
  get redirectUrl() { return redirectUrl; }
  get clientMetadata() {
    return {
      client_name: "Polydev SDK test client",
      redirect_uris: [redirectUrl],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    };
  }
  state() { return this.state_; }
  clientInformation() { return this.client_; }
  saveClientInformation(info) { this.client_ = info; step("registered"); }
  tokens() { return this.tokens_; }
  saveTokens(tokens) { this.tokens_ = tokens; step("tokens saved"); }
  redirectToAuthorization(url) { this.authorizationUrl = url; step("redirect to authorization"); }
  saveCodeVerifier(v) { this.verifier_ = v; }
  codeVerifier() { return this.verifier_; }
}

// A browser over HTTP: a cookie jar, forms, no automatic redirects.
const jar = new Map();
async function browse(url, init = {}) {
  const headers = { ...(init.headers ?? {}) };
  if (jar.size) headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join("; ");
  const response = await fetch(new URL(url, base), { ...init, headers, redirect: "manual" });
  for (const c of response.headers.getSetCookie()) {
    const [pair, ...attrs] = c.split(";");
    const [k, v] = [pair.slice(0, pair.indexOf("=")), pair.slice(pair.indexOf("=") + 1)];
    if (attrs.some((a) => a.trim() === "Max-Age=0")) jar.delete(k); else jar.set(k, v);
  }
  return response;
}
function hiddenFields(html) {
  const fields = new URLSearchParams();
  for (const m of html.matchAll(/<input type="hidden" name="([^"]*)" value="([^"]*)">/g)) {
    fields.append(m[1], m[2].replaceAll("&quot;", '"').replaceAll("&#39;", "'").replaceAll("&lt;", "<").replaceAll("&gt;", ">").replaceAll("&amp;", "&"));
  }
  return fields;
}
const form = (fields) => ({ method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: fields.toString() });

async function rawMcp(token) {
  const response = await fetch(mcpUrl, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, accept: "application/json, text/event-stream", "content-type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "initialize", params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "raw", version: "1" } } }),
  });
  return { status: response.status, challenge: response.headers.get("www-authenticate") };
}

const provider = new MemoryProvider();

// 1. No token: the SDK gets a 401, discovers, registers, and asks to open the authorization URL.
const unauthenticated = await fetch(mcpUrl, { method: "POST", headers: { "content-type": "application/json", accept: "application/json, text/event-stream" }, body: "{}" });
out.firstChallenge = unauthenticated.headers.get("www-authenticate");
let client = new Client({ name: "polydev-oauth-test", version: "1.0.0" });
try {
  await client.connect(new StreamableHTTPClientTransport(mcpUrl, { authProvider: provider }));
  out.unexpected = "connected without authorization";
} catch (error) {
  out.firstError = error instanceof UnauthorizedError ? "UnauthorizedError" : String(error);
}
out.clientId = provider.client_?.client_id ?? null;
out.authorizationUrl = String(provider.authorizationUrl ?? "");

// 2. The user: not signed in → the sign-in form → consent → redirect with the code.
let response = await browse(provider.authorizationUrl);
out.beforeSignIn = { status: response.status, location: response.headers.get("location") };
response = await browse(response.headers.get("location"));
const signInPage = await response.text();
const signIn = hiddenFields(signInPage);
signIn.append("email", email);
signIn.append("password", password);
response = await browse("/account/signin", form(signIn));
out.afterSignIn = { status: response.status, location: response.headers.get("location") };
response = await browse(response.headers.get("location"));
const consentPage = await response.text();
out.consent = {
  status: response.status,
  client: consentPage.match(/id="client-name">([^<]*)</)?.[1] ?? null,
  redirectHost: consentPage.match(/id="redirect-host">([^<]*)</)?.[1] ?? null,
};
const consent = hiddenFields(consentPage);
consent.append("decision", "approve");
response = await browse("/oauth/authorize", form(consent));
const callback = new URL(response.headers.get("location"));
out.callback = {
  status: response.status,
  origin: callback.origin + callback.pathname,
  stateEchoed: callback.searchParams.get("state") === provider.state_,
  iss: callback.searchParams.get("iss"),
  hasCode: callback.searchParams.has("code"),
};

// 3. The code for tokens (PKCE verifier from the provider), then MCP with the access token.
const transport = new StreamableHTTPClientTransport(mcpUrl, { authProvider: provider });
await transport.finishAuth(callback.searchParams.get("code"));
out.tokenScope = provider.tokens_.scope;
out.hasRefreshToken = Boolean(provider.tokens_.refresh_token);
const firstAccess = provider.tokens_.access_token;
client = new Client({ name: "polydev-oauth-test", version: "1.0.0" });
await client.connect(transport);
out.tools = (await client.listTools()).tools.map((t) => t.name);
const result = await client.callTool({ name: "get_perspectives", arguments: args }, undefined, { timeout: 60000 });
out.isError = result.isError ?? false;
out.structured = result.structuredContent ?? null;
await client.close();

// 4. Refresh through the SDK: a new access token; the rotated pair replaces the old one.
const firstRefresh = provider.tokens_.refresh_token;
out.refreshResult = await auth(provider, { serverUrl: mcpUrl });
out.refreshed = provider.tokens_.access_token !== firstAccess && provider.tokens_.refresh_token !== firstRefresh;
out.oldAccessAfterRefresh = await rawMcp(firstAccess);
out.newAccessAfterRefresh = await rawMcp(provider.tokens_.access_token);
client = new Client({ name: "polydev-oauth-test", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(mcpUrl, { authProvider: provider }));
out.toolsAfterRefresh = (await client.listTools()).tools.length;
await client.close();

// 5. Revoke (RFC 7009) the refresh token: its family, access token included, stops at once.
const revoked = await fetch(`${base}/oauth/revoke`, form(new URLSearchParams({ token: provider.tokens_.refresh_token, client_id: out.clientId })));
out.revokeStatus = revoked.status;
out.afterRevoke = await rawMcp(provider.tokens_.access_token);
console.log(JSON.stringify(out));
