// The admin console (docs/admin.md): users, plans, rate tiers, catalogue, usage, audit log.
// It needs an administrator's web session; every write carries the CSRF token. Text goes into
// the page with textContent only. Nothing here can show a user's zero-knowledge content: the
// server holds only ciphertext and no key.
const $ = (id) => document.getElementById(id);
let csrf = null;
let me = null;
let selected = null;
let planNames = [];

function say(text) { $("status").textContent = text; $("error").textContent = ""; }
function fail(error) { $("status").textContent = ""; $("error").textContent = String(error?.message ?? error); }

class ApiFailure extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "x-csrf-token": csrf ?? "", ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 204) return null;
  const json = await response.json().catch(() => null);
  if (!response.ok) throw new ApiFailure(response.status, json?.error?.code, json?.error?.message ?? `${method} ${path}: ${response.status}`);
  return json;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
const when = (at) => (at ? new Date(at).toISOString().replace("T", " ").slice(0, 19) : "—");
const handler = (fn) => async (event) => { event?.preventDefault(); try { await fn(event); } catch (e) { fail(e); } };
const row = (...cells) => { const tr = el("tr"); tr.append(...cells.map((c) => (c instanceof Node ? wrap(c) : el("td", String(c ?? "—"))))); return tr; };
const wrap = (node) => { const td = el("td"); td.append(node); return td; };

async function start() {
  const session = await api("GET", "/v1/account/session");
  csrf = session.csrf_token;
  me = session;
  $("signed-out").hidden = session.signed_in;
  if (!session.signed_in) return;
  try {
    await loadPlans();
  } catch (e) {
    if (e.status === 403) { $("not-admin").hidden = false; return; }
    throw e;
  }
  $("whoami").textContent = `Signed in as ${session.email} (administrator)`;
  await Promise.all([loadUsers(), loadRates(), loadCatalogue(), loadUsage(), loadAudit()]);
  $("console").hidden = false;
}

async function loadUsers() {
  const q = $("search").value.trim();
  const data = await api("GET", `/v1/admin/users?limit=100${q ? `&q=${encodeURIComponent(q)}` : ""}`);
  const body = $("user-table").tBodies[0];
  body.replaceChildren();
  for (const u of data.users) {
    const open = el("button", "Open", { type: "button", class: "secondary", "aria-label": `Open ${u.email ?? u.user_id}` });
    open.addEventListener("click", handler(() => openUser(u.user_id)));
    const tr = row(u.email ?? u.user_id, u.plan ?? "—", u.status ?? "active", u.is_admin ? "yes" : "no", u.zero_knowledge ? "on" : "off", open);
    if (u.user_id === selected) tr.classList.add("selected");
    body.append(tr);
  }
  if (!data.users.length) body.append(row("no users match", "", "", "", "", ""));
}

async function openUser(id) {
  selected = id;
  const u = await api("GET", `/v1/admin/users/${id}`);
  $("user-detail").hidden = false;
  $("detail-title").textContent = u.email ?? u.user_id;
  $("detail-meta").textContent =
    `Id ${u.user_id} · plan ${u.plan ?? "—"} · status ${u.status ?? "active"} · ${u.is_admin ? "administrator" : "not an administrator"} · ` +
    `${u.live_tokens} live tokens, ${u.live_sessions} web sessions, ${u.live_oauth_grants} connected apps · created ${when(u.created_at)}`;
  $("detail-zk").textContent = u.zero_knowledge
    ? "Zero-knowledge is on: this user's chats and credentials are encrypted in their own browser or CLI before they reach the server. The server has no key, so there is nothing an administrator can read — not here, not in the database."
    : "Zero-knowledge is off for this user. The admin console never shows chat or credential content either way.";
  const quota = $("detail-quota").tBodies[0];
  quota.replaceChildren();
  for (const tier of ["messages", "premium", "normal", "eco"]) {
    const q = u.quota?.[tier];
    if (q) quota.append(row(tier, q.used, q.limit ?? "unlimited", q.remaining ?? "unlimited"));
  }
  const select = $("plan-select");
  select.replaceChildren(...planNames.map((p) => el("option", p, p === u.plan ? { selected: "" } : {})));
  const suspended = (u.status ?? "active").toLowerCase() !== "active";
  $("toggle-status").textContent = suspended ? "Reactivate" : "Suspend";
  $("toggle-status").dataset.next = suspended ? "active" : "suspended";
  $("toggle-admin").textContent = u.is_admin ? "Remove administrator" : "Make administrator";
  $("toggle-admin").dataset.next = String(!u.is_admin);
  const audit = await api("GET", `/v1/admin/audit?limit=20&target=${id}`);
  $("detail-audit").replaceChildren(...audit.entries.map((e) => el("li", `${when(e.at)} · ${e.actor} · ${e.action}`)));
  if (!audit.entries.length) $("detail-audit").append(el("li", "no admin action yet"));
}

async function afterChange(message) {
  await Promise.all([openUser(selected), loadUsers(), loadAudit()]);
  say(message);
}

async function loadPlans() {
  const data = await api("GET", "/v1/admin/plans");
  planNames = data.plans.map((p) => p.tier);
  const body = $("plan-table").tBodies[0];
  body.replaceChildren();
  for (const p of data.plans) {
    const input = (name, value, label) => el("input", null, { type: "number", min: "0", value: value ?? "", "aria-label": `${p.tier} ${label}`, "data-field": name });
    const fields = [
      input("messages_per_month", p.messages_per_month, "messages per month"),
      input("premium_perspectives_limit", p.premium_perspectives_limit, "premium"),
      input("normal_perspectives_limit", p.normal_perspectives_limit, "normal"),
      input("eco_perspectives_limit", p.eco_perspectives_limit, "eco"),
    ];
    const save = el("button", "Save", { type: "button", "aria-label": `Save ${p.tier}` });
    save.addEventListener("click", handler(async () => {
      const value = (i) => (fields[i].value === "" ? null : Number(fields[i].value));
      await api("PUT", `/v1/admin/plans/${encodeURIComponent(p.tier)}`, {
        messages_per_month: value(0),
        premium_perspectives_limit: value(1),
        normal_perspectives_limit: value(2),
        eco_perspectives_limit: value(3),
        expected_updated_at: p.updated_at,
      });
      say(`Plan ${p.tier} saved.`);
      await Promise.all([loadPlans(), loadAudit()]);
    }));
    body.append(row(p.tier, p.users, ...fields, save));
  }
}

async function loadRates() {
  const data = await api("GET", "/v1/admin/rate-tiers");
  const body = $("rate-table").tBodies[0];
  body.replaceChildren();
  for (const t of data.rate_tiers) {
    const input = el("input", null, { type: "number", min: "1", value: t.requests_per_minute, "aria-label": `${t.tier} requests per minute` });
    const save = el("button", "Save", { type: "button", "aria-label": `Save rate tier ${t.tier}` });
    save.addEventListener("click", handler(async () => {
      await api("PUT", `/v1/admin/rate-tiers/${encodeURIComponent(t.tier)}`, { requests_per_minute: Number(input.value), expected: t.requests_per_minute });
      say(`Rate tier ${t.tier} saved.`);
      await Promise.all([loadRates(), loadAudit()]);
    }));
    body.append(row(t.tier, input, save));
  }
}

async function loadCatalogue() {
  const data = await api("GET", "/v1/admin/catalogue");
  const providers = $("provider-table").tBodies[0];
  providers.replaceChildren();
  for (const p of data.providers) {
    const health = el("span", p.healthy ? "healthy" : (p.configured ? "failing" : "not configured"), { class: p.healthy ? "healthy" : "unhealthy" });
    providers.append(row(p.provider, p.configured ? "configured" : "missing", p.calls, p.errors, health));
  }
  const models = $("model-table").tBodies[0];
  models.replaceChildren(...data.models.map((m) => row(m.id, m.provider, m.tier, m.input_price, m.output_price)));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function sumBy(rows, key) {
  const out = new Map();
  for (const r of rows) {
    const k = r[key];
    const s = out.get(k) ?? { requests: 0, errors: 0, input: 0, output: 0, cost: 0 };
    s.requests += r.requests; s.errors += r.errors; s.input += r.input_tokens; s.output += r.output_tokens; s.cost += Number(r.cost_usd);
    out.set(k, s);
  }
  return out;
}

function fillTable(id, label, groups) {
  const table = $(id);
  const head = el("tr");
  for (const h of [label, "Requests", "Error rate", "Input tokens", "Output tokens", "Cost (USD)"]) head.append(el("th", h, { scope: "col" }));
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...[...groups].map(([k, s]) =>
    row(k, s.requests, `${((100 * s.errors) / Math.max(1, s.requests)).toFixed(1)} %`, s.input, s.output, s.cost.toFixed(6))));
}

async function loadUsage() {
  const days = Number($("usage-days").value);
  $("usage-csv").href = `/v1/admin/usage.csv?days=${days}`;
  const data = await api("GET", `/v1/admin/usage?days=${days}`);
  const rows = data.rows;
  const total = sumBy(rows.map((r) => ({ ...r, all: "all" })), "all").get("all") ?? { requests: 0, errors: 0, input: 0, output: 0, cost: 0 };
  $("usage-summary").textContent =
    `Last ${days} days: ${total.requests} model calls, ${total.errors} failed, ${total.input} input and ${total.output} output tokens, $${total.cost.toFixed(6)}.`;
  drawChart(days, rows);
  fillTable("by-model", "Model", sumBy(rows, "model"));
  fillTable("by-provider", "Provider", sumBy(rows, "provider"));
  fillTable("by-plan", "Plan", sumBy(rows, "plan"));
}

function drawChart(days, rows) {
  const chart = $("admin-chart");
  chart.replaceChildren(chart.querySelector("title"));
  const today = new Date(new Date().toISOString().slice(0, 10) + "T00:00:00Z");
  const start = new Date(today.getTime() - (days - 1) * 86400000);
  const calls = new Array(days).fill(0);
  const errors = new Array(days).fill(0);
  for (const r of rows) {
    const i = Math.round((new Date(`${r.day}T00:00:00Z`) - start) / 86400000);
    if (i >= 0 && i < days) { calls[i] += r.requests; errors[i] += r.errors; }
  }
  const width = 620, height = 180, bottom = 16, top = 14;
  const max = Math.max(1, ...calls);
  const slot = width / days;
  chart.append(svg("line", { class: "axis", x1: 0, y1: height - bottom, x2: width, y2: height - bottom }));
  calls.forEach((n, i) => {
    const h = ((height - bottom - top) * n) / max;
    const e = ((height - bottom - top) * errors[i]) / max;
    const label = `${new Date(start.getTime() + i * 86400000).toISOString().slice(0, 10)}: ${n} calls, ${errors[i]} failed`;
    const bar = svg("rect", { class: "bar", x: i * slot + slot * 0.15, y: height - bottom - h, width: slot * 0.7, height: h });
    bar.append(svg("title", {}, label));
    chart.append(bar);
    if (e > 0) chart.append(svg("rect", { class: "err", x: i * slot + slot * 0.15, y: height - bottom - e, width: slot * 0.7, height: e }));
    if (days <= 16 || i % 7 === 0) chart.append(svg("text", { x: i === 0 ? 2 : i * slot + slot / 2, y: height - 3, "text-anchor": i === 0 ? "start" : "middle" }, new Date(start.getTime() + i * 86400000).toISOString().slice(5, 10)));
  });
  chart.append(svg("text", { x: 4, y: 11 }, `max ${max}`));
}

function change(before, after) {
  const text = (v) => (v === null || v === undefined ? "—" : JSON.stringify(v));
  return `${text(before)} → ${text(after)}`;
}

async function loadAudit() {
  const data = await api("GET", "/v1/admin/audit?limit=100");
  const body = $("audit-table").tBodies[0];
  body.replaceChildren(...data.entries.map((e) =>
    row(when(e.at), e.actor, e.action, `${e.target_type} ${e.target_id}`, el("span", change(e.before, e.after), { class: "json" }))));
}

$("signin-form").addEventListener("submit", handler(async () => {
  await api("POST", "/v1/account/signin", { email: $("signin-email").value, password: $("signin-password").value });
  say("Signed in.");
  await start();
}));
$("search-form").addEventListener("submit", handler(loadUsers));
$("plan-form").addEventListener("submit", handler(async () => {
  const plan = $("plan-select").value;
  await api("PUT", `/v1/admin/users/${selected}/plan`, { plan });
  await afterChange(`Plan changed to ${plan}.`);
}));
$("grant-form").addEventListener("submit", handler(async () => {
  const limit = $("grant-limit").value;
  const amount = Number($("grant-amount").value);
  await api("POST", `/v1/admin/users/${selected}/quota/grant`, { limit, amount });
  await afterChange(`Granted ${amount} ${limit}.`);
}));
$("reset-quota").addEventListener("click", handler(async () => {
  await api("POST", `/v1/admin/users/${selected}/quota/reset`);
  await afterChange("This month's counters are back to zero.");
}));
$("toggle-status").addEventListener("click", handler(async (event) => {
  const status = event.target.dataset.next;
  await api("PUT", `/v1/admin/users/${selected}/status`, { status });
  await afterChange(status === "active" ? "Reactivated." : "Suspended: their tokens and sessions are refused.");
}));
$("toggle-admin").addEventListener("click", handler(async (event) => {
  const admin = event.target.dataset.next === "true";
  await api("PUT", `/v1/admin/users/${selected}/admin`, { admin });
  await afterChange(admin ? "Now an administrator." : "No longer an administrator.");
}));
$("revoke-access").addEventListener("click", handler(async () => {
  const r = await api("POST", `/v1/admin/users/${selected}/revoke`);
  await afterChange(`Revoked ${r.tokens} tokens, ${r.sessions} sessions, ${r.oauth_grants} connected apps.`);
}));
$("usage-days").addEventListener("change", handler(loadUsage));

start().catch(fail);
