// The chat page: one prompt to several models at once, every answer streaming in side by side
// (the SSE of POST /v1/perspectives), each with its latency, tokens and cost. Follow-up turns
// give each model its own earlier turns (`history`). Conversations are stored through the chat
// API (/v1/chat/sessions…). For a zero-knowledge account every message and title is sealed in
// this browser (the WASM of crates/polydev-zk, in the same Web Worker as the zk page) before it
// is stored, history is opened and searched here, and this browser's pin of the account's keys
// (shared with the zk page) is checked before the master password is used. The session is an
// HttpOnly cookie; every write carries the CSRF token. Text goes into the page as textContent.
const $ = (id) => document.getElementById(id);
const MESSAGE_NS = "chat.message";
const SESSION_NS = "chat.session";

let csrf = null;
let me = null;
let zkOn = false;
let catalogue = [];
// Sessions as listed: {id, title, sealed, plaintextUnderZk}.
let sessions = [];
// The open conversation: {id, title, turns: [{prompt, answers: Map(model → answer)}]}, or a
// new one (id null).
let current = { id: null, title: "New conversation", turns: [] };
// Opened conversations by session id (search reads them).
const opened = new Map();
let sending = false;

// ---- Helpers ---------------------------------------------------------------------------------

function say(text) { $("status").textContent = text; $("error").textContent = ""; }
function fail(error) { $("status").textContent = ""; $("error").textContent = String(error?.message ?? error); }

class ApiFailure extends Error {
  constructor(status, body, retryAfter) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "x-csrf-token": csrf ?? "", ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 204) return null;
  const json = await response.json().catch(() => null);
  if (!response.ok) throw new ApiFailure(response.status, json, response.headers.get("retry-after"));
  return json;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
const handler = (fn) => async (event) => { event?.preventDefault(); try { await fn(event); } catch (e) { fail(refusal(e)); } };

// The first day of next month (UTC): when monthly quotas start again.
function nextReset() {
  const now = new Date();
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1)).toISOString().slice(0, 10);
}

// A refusal says which limit and when it resets (the server's message names the limit).
function refusal(error) {
  if (!(error instanceof ApiFailure)) return String(error?.message ?? error);
  if (error.status === 429) {
    const wait = Number(error.retryAfter);
    const at = Number.isFinite(wait) ? new Date(Date.now() + wait * 1000).toLocaleTimeString() : null;
    return `${error.message}${at ? ` — you can send again at ${at} (in ${wait} s)` : ""}`;
  }
  if (error.status === 402 || error.code === "quota_exceeded")
    return /resets on/.test(error.message) ? error.message : `${error.message} Monthly quotas reset on ${nextReset()} (UTC).`;
  return error.message;
}

// ---- Zero-knowledge: the worker that holds the keys -----------------------------------------

let worker = null;
let calls = 0;
const waiting = new Map();

function zk(op, args = {}) {
  if (!worker) {
    worker = new Worker("/worker.js", { type: "module" });
    worker.onmessage = ({ data: { id, ok, value, error } }) => {
      const call = waiting.get(id);
      waiting.delete(id);
      if (call) ok ? call.resolve(value) : call.reject(new Error(error));
    };
  }
  return new Promise((resolve, reject) => {
    const id = ++calls;
    waiting.set(id, { resolve, reject });
    worker.postMessage({ id, op, args });
  });
}

const uid = () => me.user.user_id;
const pinKey = () => `polydev-zk-pin:${uid()}`;

class KeysChanged extends Error {}

// The pin this browser keeps of the account's keys (the zk page's format): a server that turns
// zero-knowledge off, serves older or other key material, or weaker KDF parameters, is refused
// before any plaintext is sent to be stored or the password is used.
async function checkPin(status) {
  let pin = null;
  try { pin = JSON.parse(localStorage.getItem(pinKey())); } catch { pin = null; }
  if (!status.enabled) {
    if (pin) throw new KeysChanged(`it says zero-knowledge is off for this account, but this browser saw it on (key material version ${pin.version})`);
    return;
  }
  if (!status.material) throw new KeysChanged("it says zero-knowledge is on but serves no key material");
  const material = JSON.stringify(status.material);
  const fingerprint = await zk("materialFingerprint", { material });
  const kdf = await zk("materialKdfParams", { material });
  if (pin) {
    if (status.version < pin.version) throw new KeysChanged(`it serves key material version ${status.version}, older than the version ${pin.version} this browser saw`);
    if (status.version === pin.version && fingerprint !== pin.fingerprint) throw new KeysChanged(`at version ${status.version} it serves other key material than this browser saw`);
    if (kdf.memory_kib < pin.kdf.memory_kib || kdf.iterations < pin.kdf.iterations || kdf.parallelism !== pin.kdf.parallelism)
      throw new KeysChanged("it serves weaker key derivation parameters than this browser saw");
  }
  localStorage.setItem(pinKey(), JSON.stringify({ ...(pin ?? {}), version: status.version, fingerprint, kdf }));
}

// Microseconds since the epoch of an RFC 3339 time (sealed records bind them).
function micros(iso) {
  const m = /^(.*?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(iso);
  if (!m) throw new Error(`unexpected time ${iso}`);
  return Date.parse(m[1] + m[3]) * 1000 + Number((m[2] ?? "").padEnd(6, "0").slice(0, 6));
}

// A session's sealed record with this title; what else it held (a legacy session's
// description and system prompt) is kept.
const sealTitle = (id, title, earlier = {}) =>
  zk("sealRecord", { ns: SESSION_NS, uid: uid(), row: id, record: JSON.stringify({ ...earlier, kind: "session", session: id, text: title }) });

const sealMessage = (sessionId, id, role, text, createdAt) =>
  zk("sealRecord", {
    ns: MESSAGE_NS, uid: uid(), row: id,
    record: JSON.stringify({ kind: "message", session: sessionId, text, role, created_at_us: micros(createdAt) }),
  });

// An opened record must be the one this row should hold (a server cannot move it elsewhere).
// Returns the whole record (older clients sealed bare text: `{text}`).
async function openRecord(ns, row, envelope, expect) {
  const opened = await zk("openRecord", { ns, uid: uid(), row, envelope });
  const record = opened.record;
  if (!record) return { text: opened.bare ?? "" };
  for (const [k, v] of Object.entries(expect))
    if (record[k] !== v) throw new Error(`a sealed ${record.kind} does not belong here (${k})`);
  return record;
}

// ---- Start ------------------------------------------------------------------------------------

async function start() {
  const session = await api("GET", "/v1/account/session");
  csrf = session.csrf_token;
  if (!session.signed_in) { $("signed-out").hidden = false; return; }
  me = await api("GET", "/v1/me");
  $("whoami").textContent = `Signed in as ${me.user.email}`;
  const status = await api("GET", "/v1/zk");
  try { await checkPin(status); } catch (e) {
    if (!(e instanceof KeysChanged)) throw e;
    $("keys-changed-message").textContent = `${e.message}. Refusing to continue; open the encrypted history page for details.`;
    $("keys-changed").hidden = false;
    return;
  }
  zkOn = status.enabled;
  if (zkOn) {
    $("unlock").hidden = false;
    $("master-password").focus();
    $("unlock-form").addEventListener("submit", handler(async () => {
      const password = $("master-password").value;
      say("Deriving the key from your master password…");
      await zk("unlock", { material: JSON.stringify(status.material), password, userId: uid() });
      $("master-password").value = "";
      $("unlock").hidden = true;
      say("Unlocked.");
      await showApp();
    }));
    return;
  }
  await showApp();
}

async function showApp() {
  const [models, settings] = await Promise.all([api("GET", "/v1/models"), api("GET", "/v1/settings")]);
  catalogue = models.models;
  const choices = $("model-choices");
  choices.replaceChildren();
  for (const m of catalogue.filter((m) => m.available)) {
    const box = el("input", undefined, { type: "checkbox", value: m.id, name: "model" });
    box.checked = settings.preferred_models?.includes(m.id) ?? false;
    const label = el("label", undefined, { class: "check" });
    label.append(box, ` ${m.id} `, el("span", `${m.provider} · ${m.tier}`, { class: "muted" }));
    choices.append(label);
  }
  renderQuota(me.quota);
  if (zkOn) $("whoami").textContent = `Signed in as ${me.user.email} · zero-knowledge: messages and titles are sealed in this browser`;
  await loadSessions();
  $("app").hidden = false;
  $("prompt").focus();
}

// ---- Quota ------------------------------------------------------------------------------------

let quota = null;
function renderQuota(q) {
  quota = q ? structuredClone(q) : quota;
  if (!quota) return;
  const part = (name) => {
    const c = quota[name];
    return c ? `${name} ${c.used}${c.limit == null ? "" : ` of ${c.limit}`}` : null;
  };
  $("quota").textContent = `This month: ${["messages", "premium", "normal", "eco"].map(part).filter(Boolean).join(" · ")} (resets ${nextReset()})`;
}

// Spent as answers arrive; the server's figures replace these after the turn.
function spend(counter) {
  if (quota?.[counter]) { quota[counter].used += 1; renderQuota(); }
}

// ---- History ---------------------------------------------------------------------------------

async function loadSessions() {
  const list = await api("GET", "/v1/chat/sessions");
  sessions = [];
  for (const s of list) {
    let title = s.title ?? "";
    let plain = false;
    let record = null;
    if (s.encrypted_meta) {
      try {
        record = await openRecord(SESSION_NS, s.id, s.encrypted_meta, { kind: "session", session: s.id });
        title = record.text ?? "";
      } catch (e) { title = `(unreadable: ${e.message})`; }
    } else if (zkOn && s.title != null) plain = true;
    sessions.push({ id: s.id, title: title || "(untitled)", plain, record });
  }
  renderSessions();
}

function renderSessions() {
  const query = $("search").value.trim().toLowerCase();
  const list = $("sessions");
  list.replaceChildren();
  for (const s of sessions) {
    if (query && !matches(s, query)) continue;
    const item = el("li");
    const open = el("button", s.title, { type: "button", class: "link", "data-session": s.id });
    if (current.id === s.id) open.setAttribute("aria-current", "true");
    open.addEventListener("click", handler(() => openSession(s.id)));
    item.append(open);
    if (s.plain) item.append(el("span", "not encrypted", { class: "flag" }));
    list.append(item);
  }
  if (!list.children.length) list.append(el("li", query ? "Nothing matches." : "No conversations yet.", { class: "muted" }));
}

// Search runs here, over what this browser opened (for a zero-knowledge account the server
// could not search anyway).
function matches(session, query) {
  if (session.title.toLowerCase().includes(query)) return true;
  const conversation = opened.get(session.id);
  return !!conversation?.turns.some((t) => t.prompt.toLowerCase().includes(query) ||
    [...t.answers.values()].some((a) => (a.text ?? "").toLowerCase().includes(query)));
}

async function search() {
  // Open every conversation once, then filter.
  for (const s of sessions) if (!opened.has(s.id)) opened.set(s.id, await readConversation(s.id, s.title));
  renderSessions();
}

async function readConversation(id, title) {
  const messages = await api("GET", `/v1/chat/sessions/${id}/messages`);
  const turns = [];
  for (const m of messages) {
    let text;
    if (m.encrypted_content) {
      try { text = (await openRecord(MESSAGE_NS, m.id, m.encrypted_content, { kind: "message", session: id, role: m.role })).text ?? ""; } catch (e) { text = `(unreadable: ${e.message})`; }
    } else text = m.content ?? "";
    if (m.role === "user" || !turns.length) turns.push({ prompt: m.role === "user" ? text : "", answers: new Map() });
    if (m.role === "assistant") {
      const u = m.usage ?? {};
      turns[turns.length - 1].answers.set(m.model ?? "assistant", {
        model: m.model ?? "assistant", status: "ok", text,
        latency_ms: u.latency_ms, input_tokens: u.input_tokens, output_tokens: u.output_tokens, cost_usd: u.cost_usd,
      });
    }
  }
  return { id, title, turns };
}

async function openSession(id) {
  const s = sessions.find((s) => s.id === id);
  const conversation = await readConversation(id, s?.title ?? "");
  opened.set(id, conversation);
  current = conversation;
  renderConversation();
  renderSessions();
  $("conversation-title").focus();
}

function newConversation() {
  current = { id: null, title: "New conversation", turns: [] };
  renderConversation();
  renderSessions();
  $("prompt").focus();
}

// ---- Rendering -------------------------------------------------------------------------------

function renderConversation() {
  $("conversation-title").textContent = current.title;
  $("conversation-actions").hidden = !current.id;
  $("rename-form").hidden = true;
  $("delete-confirm").hidden = true;
  const turns = $("turns");
  turns.replaceChildren();
  for (const turn of current.turns) turns.append(renderTurn(turn));
}

function renderTurn(turn) {
  const node = el("article", undefined, { class: "turn" });
  const prompt = el("div", undefined, { class: "prompt" });
  prompt.append(el("span", "You", { class: "role" }), el("span", turn.prompt, { class: "text" }));
  const answers = el("div", undefined, { class: "answers" });
  node.append(prompt, answers);
  turn.node = answers;
  for (const answer of turn.answers.values()) answers.append(renderAnswer(answer));
  if (turn.note) node.append(el("p", turn.note, { class: "note" }));
  return node;
}

function renderAnswer(answer) {
  const box = el("section", undefined, { class: `answer ${answer.status}`, "data-model": answer.model, "aria-label": `Answer of ${answer.model}` });
  const head = el("h3", answer.model);
  const text = el("div", answer.text ?? "", { class: "text" });
  const meta = el("p", metaLine(answer), { class: "meta" });
  box.append(head, text, meta);
  answer.box = box;
  return box;
}

function metaLine(a) {
  if (a.status === "streaming") return "answering…";
  if (a.status !== "ok") return `${a.status}: ${a.error?.message ?? "no answer"}`;
  const parts = [];
  if (a.latency_ms != null) parts.push(`${a.latency_ms} ms`);
  if (a.input_tokens != null) parts.push(`${a.input_tokens} in / ${a.output_tokens} out tokens`);
  if (a.cost_usd != null) parts.push(`$${a.cost_usd}`);
  return parts.join(" · ");
}

function updateAnswer(answer) {
  answer.box.className = `answer ${answer.status}`;
  answer.box.querySelector(".text").textContent = answer.text ?? "";
  answer.box.querySelector(".meta").textContent = metaLine(answer);
}

// ---- Sending ---------------------------------------------------------------------------------

// Each model's own earlier turns: the prompts of the turns it answered, and its answers.
function historyFor() {
  const history = {};
  const known = new Set(catalogue.map((m) => m.id));
  for (const turn of current.turns) {
    for (const [model, a] of turn.answers) {
      if (a.status !== "ok" || !known.has(model)) continue;
      (history[model] ??= []).push({ role: "user", content: turn.prompt }, { role: "assistant", content: a.text ?? "" });
    }
  }
  return history;
}

async function storeMessage(sessionId, role, text, extra = {}, createdAt = null) {
  const id = crypto.randomUUID();
  const created_at = createdAt ?? new Date().toISOString();
  const body = zkOn
    ? { id, role, created_at, encrypted_content: await sealMessage(sessionId, id, role, text, created_at), ...extra }
    : { id, role, created_at, content: text, ...extra };
  await api("POST", `/v1/chat/sessions/${sessionId}/messages`, body);
}

async function ensureSession(prompt) {
  if (current.id) return;
  const id = crypto.randomUUID();
  const title = prompt.replace(/\s+/g, " ").trim().slice(0, 60);
  await api("POST", "/v1/chat/sessions", zkOn ? { id, encrypted_meta: await sealTitle(id, title) } : { id, title });
  current = { ...current, id, title };
  opened.set(id, current);
  sessions.unshift({ id, title, plain: false });
  renderConversation();
  renderSessions();
}

// Reads a server-sent event stream: calls `on(event, data)` per event.
async function readEvents(response, on) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) on(event, JSON.parse(data.join("\n")));
    }
  }
}

async function send() {
  if (sending) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) throw new Error("write a prompt first");
  const models = [...document.querySelectorAll("#model-choices input:checked")].map((b) => b.value);
  const history = historyFor();
  sending = true;
  $("send").disabled = true;
  const askedAt = new Date().toISOString();
  const turn = { prompt, answers: new Map() };
  const turnNode = renderTurn(turn);
  $("turns").append(turnNode);
  try {
    say("Asking the models…");
    const body = { prompt, history, ...(models.length ? { models } : {}) };
    const response = await fetch("/v1/perspectives", {
      method: "POST",
      headers: { "content-type": "application/json", accept: "text/event-stream", "x-csrf-token": csrf ?? "" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      // Refused before any model ran (a limit, bad input): nothing is stored.
      const json = await response.json().catch(() => null);
      turnNode.remove();
      throw new ApiFailure(response.status, json, response.headers.get("retry-after"));
    }
    $("prompt").value = "";
    let failure = null;
    let charged = false;
    const answer = (model) => {
      let a = turn.answers.get(model);
      if (!a) {
        a = { model, status: "streaming", text: "" };
        turn.answers.set(model, a);
        turn.node.append(renderAnswer(a));
      }
      return a;
    };
    await readEvents(response, (event, data) => {
      if (event === "started") data.models.forEach(answer);
      else if (event === "delta") { const a = answer(data.model); a.text += data.text; updateAnswer(a); }
      else if (event === "model") {
        const a = answer(data.model);
        Object.assign(a, data, { text: data.text ?? a.text });
        if (a.status === "ok") {
          if (!charged) { spend("messages"); charged = true; }
          spend(data.tier);
        }
        updateAnswer(a);
      } else if (event === "result") {
        const t = data.totals;
        say(`${t.succeeded} of ${t.models} models answered · ${t.input_tokens} in / ${t.output_tokens} out tokens · $${t.cost_usd} · ${t.elapsed_ms} ms`);
      } else if (event === "error") failure = new ApiFailure(data.error.code === "quota_exceeded" ? 402 : 500, data, null);
    });
    // Stored once a model answered: the prompt, then each answer (a refused turn leaves
    // nothing behind).
    const answered = [...turn.answers.values()].filter((a) => a.status === "ok");
    if (answered.length) {
      await ensureSession(prompt);
      current.turns.push(turn);
      if (!turnNode.isConnected) $("turns").append(turnNode);
      await storeMessage(current.id, "user", prompt, {}, askedAt);
    }
    for (const a of answered) {
      await storeMessage(current.id, "assistant", a.text ?? "", {
        model: a.model,
        usage: { latency_ms: a.latency_ms, input_tokens: a.input_tokens, output_tokens: a.output_tokens, cost_usd: a.cost_usd },
      });
    }
    if (failure) throw failure;
  } finally {
    sending = false;
    $("send").disabled = false;
    api("GET", "/v1/usage").then((u) => renderQuota(u.quota)).catch(() => {});
  }
}

// ---- Rename, delete, export ------------------------------------------------------------------

async function rename() {
  const title = $("rename-title").value.trim();
  if (!title) throw new Error("the title is empty");
  const s = sessions.find((s) => s.id === current.id);
  const body = zkOn ? { encrypted_meta: await sealTitle(current.id, title, s?.record ?? {}) } : { title };
  await api("PATCH", `/v1/chat/sessions/${current.id}`, body);
  current.title = title;
  if (s) { s.title = title; s.plain = false; }
  renderConversation();
  renderSessions();
  say("Renamed.");
}

async function remove() {
  const id = current.id;
  await api("DELETE", `/v1/chat/sessions/${id}`);
  sessions = sessions.filter((s) => s.id !== id);
  opened.delete(id);
  newConversation();
  say("The conversation is deleted.");
}

function exportJson() {
  return JSON.stringify({
    title: current.title,
    exported_at: new Date().toISOString(),
    turns: current.turns.map((t) => ({
      prompt: t.prompt,
      answers: [...t.answers.values()].map(({ model, status, text, latency_ms, input_tokens, output_tokens, cost_usd, error }) =>
        ({ model, status, text, latency_ms, input_tokens, output_tokens, cost_usd, ...(error ? { error } : {}) })),
    })),
  }, null, 2);
}

function exportMarkdown() {
  let out = `# ${current.title}\n`;
  for (const t of current.turns) {
    out += `\n## You\n\n${t.prompt}\n`;
    for (const a of t.answers.values()) out += `\n### ${a.model}\n\n_${metaLine(a)}_\n\n${a.text ?? ""}\n`;
  }
  return out;
}

function download(name, type, text) {
  const link = el("a", undefined, { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

const fileName = (ext) => `${(current.title || "conversation").replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-|-$/g, "").slice(0, 60) || "conversation"}.${ext}`;

$("ask-form").addEventListener("submit", handler(send));
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit(); });
$("new-chat").addEventListener("click", handler(newConversation));
$("search").addEventListener("input", handler(search));
$("rename").addEventListener("click", () => { $("rename-form").hidden = false; $("rename-title").value = current.title; $("rename-title").focus(); });
$("rename-form").addEventListener("submit", handler(rename));
$("delete").addEventListener("click", () => { $("delete-confirm").hidden = false; $("delete-confirm").focus(); });
$("delete-confirm").addEventListener("click", handler(remove));
$("export-md").addEventListener("click", () => download(fileName("md"), "text/markdown", exportMarkdown()));
$("export-json").addEventListener("click", () => download(fileName("json"), "application/json", exportJson()));
start().catch((e) => fail(refusal(e)));
