// The account page: sign-in (password or passkey), sign-up, reset; then usage, tokens,
// passkeys, connected apps and model preferences. The session is an HttpOnly cookie; every
// write carries the CSRF token. Text goes into the page with textContent only.
const $ = (id) => document.getElementById(id);
let csrf = null;

function say(text) { $("status").textContent = text; $("error").textContent = ""; }
function fail(error) { $("status").textContent = ""; $("error").textContent = String(error?.message ?? error); }

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "x-csrf-token": csrf ?? "", ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 204) return null;
  const json = await response.json().catch(() => null);
  if (!response.ok) throw new Error(json?.error?.message ?? `${method} ${path}: ${response.status}`);
  return json;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
const day = (at) => (at ? new Date(at).toLocaleDateString() : "—");
const handler = (fn) => async (event) => { event?.preventDefault(); try { await fn(event); } catch (e) { fail(e); } };

async function refresh() {
  const session = await api("GET", "/v1/account/session");
  csrf = session.csrf_token;
  if (session.signed_in) {
    $("whoami").textContent = `Signed in as ${session.email}`;
    await Promise.all([loadUsage(), loadTokens(), loadPasskeys(), loadGrants(), loadSettings()]);
  }
  // Shown once filled in, so that what appears is complete.
  $("signed-out").hidden = session.signed_in;
  $("signed-in").hidden = !session.signed_in;
}

async function loadUsage() {
  const [report, daily] = await Promise.all([api("GET", "/v1/usage"), api("GET", "/v1/usage/daily")]);
  drawChart(daily.month_start, daily.days);
  drawModels(daily.days);
  const u = report.usage ?? {};
  $("usage-summary").textContent =
    `Since ${report.month_start}: ${u.calls ?? 0} calls, ${u.input_tokens ?? 0} input and ${u.output_tokens ?? 0} output tokens, $${u.cost_usd ?? 0}.`;
  const body = $("quota-table").tBodies[0];
  body.replaceChildren();
  for (const tier of ["messages", "premium", "normal", "eco"]) {
    const q = report.quota?.[tier];
    if (!q) continue;
    const row = el("tr");
    row.append(el("td", tier), el("td", String(q.used)), el("td", q.limit ?? "unlimited"), el("td", q.remaining ?? "unlimited"));
    body.append(row);
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// One bar per day of the month so far (calls of every model), drawn as SVG.
function drawChart(monthStart, days) {
  const chart = $("usage-chart");
  chart.replaceChildren(chart.querySelector("title") ?? svg("title", {}, "Model calls per day"));
  const start = new Date(`${monthStart}T00:00:00Z`);
  const today = new Date();
  const count = Math.max(1, Math.floor((today - start) / 86400000) + 1);
  const perDay = new Array(count).fill(0);
  for (const d of days) {
    const i = Math.floor((new Date(`${d.day}T00:00:00Z`) - start) / 86400000);
    if (i >= 0 && i < count) perDay[i] += d.calls;
  }
  const max = Math.max(1, ...perDay);
  const [width, height, bottom] = [620, 180, 16];
  const slot = width / count;
  chart.append(svg("line", { class: "axis", x1: 0, y1: height - bottom, x2: width, y2: height - bottom }));
  perDay.forEach((calls, i) => {
    const h = ((height - bottom - 14) * calls) / max;
    const bar = svg("rect", { class: "bar", x: i * slot + slot * 0.15, y: height - bottom - h, width: slot * 0.7, height: h });
    bar.append(svg("title", {}, `${new Date(start.getTime() + i * 86400000).toISOString().slice(0, 10)}: ${calls} calls`));
    chart.append(bar);
    if (count <= 16 || i % 5 === 0) chart.append(svg("text", { x: i * slot + slot / 2, y: height - 3, "text-anchor": "middle" }, String(i + 1)));
  });
  chart.append(svg("text", { x: 4, y: 11 }, `max ${max}`));
}

function drawModels(days) {
  const models = new Map();
  for (const d of days) {
    const m = models.get(d.model) ?? { tier: d.tier, calls: 0, tokens: 0, cost: 0 };
    m.calls += d.calls;
    m.tokens += d.input_tokens + d.output_tokens;
    m.cost += Number(d.cost_usd);
    models.set(d.model, m);
  }
  const body = $("model-table").tBodies[0];
  body.replaceChildren();
  for (const [model, m] of [...models].sort((a, b) => b[1].calls - a[1].calls)) {
    const row = el("tr");
    row.append(el("td", model), el("td", m.tier ?? ""), el("td", String(m.calls)), el("td", String(m.tokens)), el("td", m.cost.toFixed(4)));
    body.append(row);
  }
  if (!models.size) {
    // `append` returns nothing: build the row, then add it.
    const row = el("tr");
    row.append(el("td", "No model calls yet this month.", { colspan: "5" }));
    body.append(row);
  }
}

async function loadTokens() {
  const tokens = await api("GET", "/v1/tokens");
  const body = $("token-table").tBodies[0];
  body.replaceChildren();
  for (const t of tokens.filter((t) => t.active)) {
    const row = el("tr");
    const revoke = el("button", "Revoke", { type: "button", class: "secondary", "aria-label": `Revoke ${t.token_name}` });
    revoke.addEventListener("click", handler(async () => { await api("DELETE", `/v1/tokens/${t.id}`); say("Token revoked."); await loadTokens(); }));
    const cell = el("td");
    cell.append(revoke);
    row.append(el("td", `${t.token_name ?? ""} …${t.token_preview ?? ""}`), el("td", t.scope), el("td", day(t.last_used_at)), el("td", day(t.expires_at)), cell);
    body.append(row);
  }
}

async function loadPasskeys() {
  const { passkeys } = await api("GET", "/v1/account/passkeys");
  const list = $("passkey-list");
  list.replaceChildren();
  for (const p of passkeys) {
    const item = el("li", `${p.name} (added ${day(p.created_at)}, last used ${day(p.last_used_at)})`);
    const remove = el("button", "Remove", { type: "button", class: "secondary", "aria-label": `Remove passkey ${p.name}` });
    remove.addEventListener("click", handler(async () => { await api("DELETE", `/v1/account/passkeys/${p.id}`); say("Passkey removed."); await loadPasskeys(); }));
    item.append(remove);
    list.append(item);
  }
  if (!passkeys.length) list.append(el("li", "No passkey yet."));
}

async function loadGrants() {
  const { grants } = await api("GET", "/v1/oauth/grants");
  const list = $("grant-list");
  list.replaceChildren();
  for (const g of grants) {
    const item = el("li", `${g.client_name ?? g.client_id}: ${g.scope} (since ${day(g.created_at)})`);
    const revoke = el("button", "Disconnect", { type: "button", class: "secondary", "aria-label": `Disconnect ${g.client_name ?? g.client_id}` });
    revoke.addEventListener("click", handler(async () => { await api("DELETE", `/v1/oauth/grants/${g.id}`); say("App disconnected."); await loadGrants(); }));
    item.append(revoke);
    list.append(item);
  }
  if (!grants.length) list.append(el("li", "No connected app."));
}

async function loadSettings() {
  const settings = await api("GET", "/v1/settings");
  $("settings-models").value = (settings.preferred_models ?? []).join(", ");
  $("settings-max").value = settings.max_perspectives ?? 3;
}

$("signin-form").addEventListener("submit", handler(async () => {
  await api("POST", "/v1/account/signin", { email: $("signin-email").value.trim(), password: $("signin-password").value });
  $("signin-password").value = "";
  say("Signed in.");
  await refresh();
}));

$("passkey-signin").addEventListener("click", handler(async () => {
  const { challenge_id, options } = await api("POST", "/v1/account/passkeys/signin/start");
  // A modal request (the server suggests conditional mediation, for autofill).
  const credential = await navigator.credentials.get({ publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options.publicKey) });
  await api("POST", "/v1/account/passkeys/signin/finish", { challenge_id, credential: credential.toJSON() });
  say("Signed in with a passkey.");
  await refresh();
}));

$("passkey-form").addEventListener("submit", handler(async () => {
  const { challenge_id, options } = await api("POST", "/v1/account/passkeys/register/start");
  const publicKey = options.publicKey;
  // A discoverable credential, so that sign-in needs no address.
  publicKey.authenticatorSelection = { ...(publicKey.authenticatorSelection ?? {}), residentKey: "required", requireResidentKey: true };
  const credential = await navigator.credentials.create({ publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(publicKey) });
  await api("POST", "/v1/account/passkeys/register/finish", { challenge_id, name: $("passkey-name").value, credential: credential.toJSON() });
  $("passkey-name").value = "";
  say("Passkey added.");
  await loadPasskeys();
}));

$("signup-form").addEventListener("submit", handler(async () => {
  const answer = await api("POST", "/v1/account/signup", { email: $("signup-email").value.trim(), password: $("signup-password").value });
  $("signup-password").value = "";
  say(answer.message);
}));

$("reset-form").addEventListener("submit", handler(async () => {
  const answer = await api("POST", "/v1/account/password-reset", { email: $("reset-email").value.trim() });
  say(answer.message);
}));

$("token-form").addEventListener("submit", handler(async () => {
  const days = $("token-days").value;
  const created = await api("POST", "/v1/tokens", { name: $("token-name").value, scope: $("token-scope").value, expires_in_days: days ? Number(days) : null });
  await loadTokens();
  $("new-token-value").textContent = created.token;
  $("new-token").hidden = false;
  $("token-name").value = "";
  say("Token created: copy it now.");
}));

$("settings-form").addEventListener("submit", handler(async () => {
  const models = $("settings-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  await api("PUT", "/v1/settings", { preferred_models: models, max_perspectives: Number($("settings-max").value) });
  say("Preferences saved.");
}));

$("signout").addEventListener("click", handler(async () => { await api("POST", "/v1/account/signout"); say("Signed out."); await refresh(); }));
$("signout-everywhere").addEventListener("click", handler(async () => {
  const { sessions_ended } = await api("POST", "/v1/account/signout-everywhere");
  say(`Signed out everywhere (${sessions_ended} sessions).`);
  await refresh();
}));

refresh().catch(fail);
