// The zero-knowledge page. All cryptography runs in WebAssembly built from crates/polydev-zk (the
// same Rust code as the server and CLI); this file only moves data between the page, the WASM
// module and the polydev API. As the CLI does (crates/polydev/src/client/zk): it proves the
// master password to the server for changes that need the owner, records at turn-on the manifest
// of the plaintext rows there are, seals only rows it lists, seals whole records (text, role,
// session, creation time) and checks them against their row when reading. Not done here (the
// CLI does): pinning the key material across visits.
import init, { setup, unlock, contentHash, recordHash } from "/pkg/polydev_zk.js";

const $ = (id) => document.getElementById(id);
const NAMESPACE = "chat.message";
const SESSION_NAMESPACE = "chat.session";
const MANIFEST_NAMESPACE = "zk.manifest";
const BATCH = 100;
const PER_CHUNK = 4000;
let token = sessionStorage.getItem("polydev-token");
let me = null;
let keyring = null;

function show(...ids) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = !ids.includes(s.id);
}

function fail(error) {
  $("error").textContent = String(error?.message ?? error);
}

async function api(method, path, body, extraHeaders = {}) {
  const response = await fetch(path, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { "content-type": "application/json" } : {}), ...extraHeaders },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 204) return null;
  const json = await response.json();
  if (!response.ok) throw new Error(json?.error?.message ?? `${method} ${path}: ${response.status}`);
  return json;
}

// The unlocked keyring's proof of the password (or recovery key), for changes that need the owner.
function proved() {
  return { [keyring.proofKind === "recovery" ? "polydev-zk-recovery-proof" : "polydev-zk-proof"]: keyring.proof };
}

// Microseconds since the epoch of an RFC 3339 time as the server sends it (records bind them).
function micros(iso) {
  if (!iso) return null;
  const m = /^(.*?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(iso);
  if (!m) throw new Error(`unexpected time ${iso}`);
  return Date.parse(m[1] + m[3]) * 1000 + Number((m[2] ?? "").padEnd(6, "0").slice(0, 6));
}

function messageRecord(m) {
  const r = { kind: "message", session: m.session_id, text: m.content };
  if (m.role != null) r.role = m.role;
  const at = micros(m.created_at);
  if (at != null) r.created_at_us = at;
  return r;
}

function sessionRecord(s) {
  const r = { kind: "session", session: s.id };
  if (s.title != null) r.text = s.title;
  if (s.description != null) r.description = s.description;
  if (s.system_prompt != null) r.system_prompt = s.system_prompt;
  return r;
}

// Every page of a migration read, one chat system after the other.
async function readAll(path) {
  const rows = [];
  for (const system of ["chat", "sessions"]) {
    let after = null;
    for (;;) {
      const page = (await api("GET", `${path}?system=${system}&limit=500${after ? `&after=${after}` : ""}`)).messages;
      if (!page.length) break;
      rows.push(...page);
      after = page[page.length - 1].id;
    }
  }
  return rows;
}

// The manifest of what is in plaintext now, sealed in chunks (the CLI's format).
async function recordManifest() {
  const uid = me.user.user_id;
  const entries = [];
  for (const m of await readAll("/v1/zk/migration/plaintext"))
    entries.push({ system: m.system, kind: "message", id: m.id, hash: recordHash(JSON.stringify(messageRecord(m))) });
  for (const s of await readAll("/v1/zk/migration/sessions"))
    entries.push({ system: s.system, kind: "session", id: s.id, hash: recordHash(JSON.stringify(sessionRecord(s))) });
  const pieces = [];
  for (let i = 0; i < entries.length; i += PER_CHUNK) pieces.push(entries.slice(i, i + PER_CHUNK));
  if (!pieces.length) pieces.push([]);
  const chunks = pieces.map((piece, i) => ({
    chunk: i,
    envelope: keyring.seal(MANIFEST_NAMESPACE, uid, String(i), JSON.stringify({ v: 1, chunk: i, total: pieces.length, entries: piece })),
  }));
  for (let i = 0; i < chunks.length; i += 8) await api("POST", "/v1/zk/manifest", chunks.slice(i, i + 8), proved());
}

// The stored manifest as a map "system/kind/id" → hash, or null if there is none.
async function loadManifest() {
  const uid = me.user.user_id;
  const chunks = await api("GET", "/v1/zk/manifest");
  if (!chunks.length) return null;
  const listed = new Map();
  chunks.forEach((c, i) => {
    const body = JSON.parse(keyring.open(MANIFEST_NAMESPACE, uid, String(c.chunk), c.envelope));
    if (body.chunk !== i || c.chunk !== i || body.total !== chunks.length) throw new Error("the server serves an incomplete migration manifest");
    for (const e of body.entries) listed.set(`${e.system}/${e.kind}/${e.id}`, e.hash);
  });
  return listed;
}

const listedIn = (manifest, system, kind, id, record) =>
  manifest?.get(`${system}/${kind}/${id}`) === recordHash(JSON.stringify(record));

function strength(password) {
  const classes = [/[a-z]/, /[A-Z]/, /[0-9]/, /[^A-Za-z0-9]/].filter((r) => r.test(password)).length;
  const words = password.trim().split(/\s+/).length;
  if (password.length >= 20 || (password.length >= 14 && (classes >= 3 || words >= 3))) return "strong";
  if (password.length >= 12 && classes >= 2) return "fair: longer is better";
  return "weak: use at least 12 characters, or several words";
}

async function signIn() {
  $("error").textContent = "";
  me = await api("GET", "/v1/me");
  $("whoami").textContent = `Signed in as ${me.user.email}`;
  const zk = await api("GET", "/v1/zk");
  show(zk.enabled ? "unlock" : "setup");
}

async function turnOn() {
  const password = $("new-password").value;
  if (password !== $("new-password-again").value) throw new Error("the passwords differ");
  if (password.length < 10) throw new Error("use at least 10 characters");
  if (!$("understood").checked) throw new Error("please confirm you understand the warning");
  const made = setup(password, me.user.user_id);
  keyring = made.keyring();
  await api("POST", "/v1/zk/enable", {
    material: JSON.parse(made.material),
    password_proof: keyring.proof,
    recovery_proof: made.recoveryProof,
  });
  await recordManifest();
  $("recovery-key").textContent = made.recoveryKey;
  show("recovery");
}

async function doUnlock() {
  const zk = await api("GET", "/v1/zk");
  keyring = unlock(JSON.stringify(zk.material), $("password").value, me.user.user_id);
  $("password").value = "";
  // An account turned on before proofs existed: register this password's proof.
  if (!zk.proofs?.password) await api("POST", "/v1/zk/proof", { password_proof: keyring.proof });
  await afterUnlock();
}

async function afterUnlock() {
  await refreshStatus();
  await renderHistory();
}

// `skipped`: plaintext rows the last run left alone (not in the manifest): they stay "to go".
async function refreshStatus(skipped = 0) {
  const s = await api("GET", "/v1/zk/migration");
  const total = s.plaintext + s.unverified + s.done;
  const left = s.plaintext + s.unverified + (s.sessions?.plaintext ?? 0) + (s.sessions?.unverified ?? 0);
  $("migration-progress").max = Math.max(total, 1);
  $("migration-progress").value = s.done;
  $("migration-status").textContent =
    `${s.done} of ${total} messages encrypted` +
    (left > skipped ? `, ${left} to go` : skipped ? ` — done; ${skipped} not encrypted (not there when encryption was turned on)` : " — done");
  show("migrate", "history");
  $("migrate-button").disabled = left === 0;
  return s;
}

// The same steps as `polydev zk migrate`: verify and clear what is encrypted, then encrypt the
// next batch (only rows the manifest lists) with compare-and-swap; safe to interrupt and restart.
async function verifyBatch(uid) {
  const unverified = (await api("GET", `/v1/zk/migration/unverified?limit=${BATCH}`)).messages;
  const good = [], bad = [];
  for (const m of unverified) {
    let ok = false;
    try {
      const opened = JSON.parse(keyring.openRecord(NAMESPACE, uid, m.id, m.encrypted_content));
      ok = opened.record ? recordHash(JSON.stringify(opened.record)) === recordHash(JSON.stringify(messageRecord(m))) : opened.bare === m.content;
    } catch { ok = false; }
    (ok ? good : bad).push({ system: m.system, id: m.id });
  }
  if (good.length) await api("POST", "/v1/zk/migration/clear", good, proved());
  if (bad.length) await api("POST", "/v1/zk/migration/reset", bad);
  const sessions = (await api("GET", `/v1/zk/migration/sessions/unverified?limit=${BATCH}`)).messages;
  const goodS = [], badS = [];
  for (const s of sessions) {
    let ok = false;
    try {
      const opened = JSON.parse(keyring.openRecord(SESSION_NAMESPACE, uid, s.id, s.encrypted_meta));
      ok = !!opened.record && recordHash(JSON.stringify(opened.record)) === recordHash(JSON.stringify(sessionRecord(s)));
    } catch { ok = false; }
    (ok ? goodS : badS).push({ system: s.system, id: s.id });
  }
  if (goodS.length) await api("POST", "/v1/zk/migration/sessions/clear", goodS, proved());
  if (badS.length) await api("POST", "/v1/zk/migration/sessions/reset", badS);
  return unverified.length + sessions.length;
}

async function migrate() {
  const uid = me.user.user_id;
  let manifest = await loadManifest();
  if (!manifest) { await recordManifest(); manifest = await loadManifest(); }
  let notListed = 0;
  const phases = [["plaintext", "chat"], ["plaintext", "sessions"], ["sessions", "chat"], ["sessions", "sessions"]];
  let after = null;
  for (;;) {
    const pending = await verifyBatch(uid);
    if (!phases.length) { if (pending) continue; break; }
    const [what, system] = phases[0];
    const rows = (await api("GET", `/v1/zk/migration/${what}?system=${system}&limit=${BATCH}${after ? `&after=${after}` : ""}`)).messages;
    if (!rows.length) { phases.shift(); after = null; continue; }
    after = rows[rows.length - 1].id;
    const writes = [];
    for (const row of rows) {
      const isMessage = what === "plaintext";
      const record = isMessage ? messageRecord(row) : sessionRecord(row);
      if (!listedIn(manifest, row.system, isMessage ? "message" : "session", row.id, record)) { notListed += 1; continue; }
      const sealed = keyring.sealRecord(isMessage ? NAMESPACE : SESSION_NAMESPACE, uid, row.id, JSON.stringify(record));
      writes.push(isMessage
        ? { system: row.system, id: row.id, content_sha256: contentHash(row.content), encrypted_content: sealed }
        : { system: row.system, id: row.id, texts_sha256: row.texts_sha256, encrypted_meta: sealed });
    }
    if (writes.length) await api("POST", what === "plaintext" ? "/v1/zk/migration/encrypted" : "/v1/zk/migration/sessions", writes);
    await refreshStatus();
  }
  await refreshStatus(notListed);
  await renderHistory();
  if (notListed) $("error").textContent = `${notListed} plaintext items were not there when encryption was turned on: they were not encrypted and are not shown as yours.`;
}

// Shows what opens and matches its row; anything else is listed apart, flagged, never as the user's.
async function renderHistory() {
  const uid = me.user.user_id;
  const manifest = await loadManifest();
  const box = $("sessions");
  box.replaceChildren();
  const quarantined = [];
  const line = (roleText, textValue, badge, badgeClass) => {
    const div = document.createElement("div");
    div.className = "message";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = roleText;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = textValue;
    div.append(role, text);
    if (badge) {
      const b = document.createElement("span");
      b.className = badgeClass;
      b.textContent = badge;
      div.append(b);
    }
    return div;
  };
  for (const session of await api("GET", "/v1/chat/sessions")) {
    const h = document.createElement("h3");
    let title = session.title ?? "(untitled)";
    if (session.encrypted_meta) {
      try {
        const opened = JSON.parse(keyring.openRecord(SESSION_NAMESPACE, uid, session.id, session.encrypted_meta));
        if (opened.record?.kind === "session" && opened.record.session === session.id) title = opened.record.text ?? "(untitled)";
        else { title = "(untitled)"; quarantined.push(`title of session ${session.id}: sealed for another place`); }
      } catch (e) { title = "(untitled)"; quarantined.push(`title of session ${session.id}: ${e.message}`); }
    } else if (session.title != null && !listedIn(manifest, session.system, "session", session.id, sessionRecord(session))) {
      quarantined.push(`title of session ${session.id} (plaintext not in the manifest): ${session.title}`);
      title = "(untitled)";
    }
    h.textContent = title;
    box.append(h);
    for (const m of await api("GET", `/v1/chat/sessions/${session.id}/messages`)) {
      if (m.encrypted_content) {
        let opened;
        try { opened = JSON.parse(keyring.openRecord(NAMESPACE, uid, m.id, m.encrypted_content)); }
        catch (e) { quarantined.push(`message ${m.id}: ${e.message}`); continue; }
        if (opened.bare !== undefined) { box.append(line(m.role, opened.bare, "older format, not bound", "flag")); continue; }
        const r = opened.record;
        const why = r.kind !== "message" ? "not a message" : r.session !== session.id ? `moved from session ${r.session}`
          : (r.role ?? null) !== (m.role ?? null) ? `role changed from ${r.role}` : (r.created_at_us ?? null) !== micros(m.created_at) ? "reordered" : null;
        if (why) { quarantined.push(`message ${m.id}: ${why}`); continue; }
        box.append(line(m.role, r.text, "encrypted", "lock"));
      } else if (listedIn(manifest, session.system, "message", m.id, messageRecord({ ...m, session_id: session.id }))) {
        box.append(line(m.role, m.content ?? "", "not yet encrypted", "flag"));
      } else {
        quarantined.push(`message ${m.id} (plaintext not in the manifest): ${m.content}`);
      }
    }
  }
  if (quarantined.length) {
    const h = document.createElement("h3");
    h.textContent = "Not verified as yours (served by the server, not shown above)";
    box.append(h);
    for (const q of quarantined) box.append(line("quarantined", q, null, null));
  }
}

function on(id, handler) {
  $(id).addEventListener("click", async () => {
    $(id).disabled = true;
    try { $("error").textContent = ""; await handler(); } catch (e) { fail(e); } finally { $(id).disabled = false; }
  });
}

await init();
on("signin-button", async () => { token = $("token").value.trim(); sessionStorage.setItem("polydev-token", token); await signIn(); });
on("setup-button", turnOn);
on("recovery-saved", afterUnlock);
on("unlock-button", doUnlock);
on("migrate-button", migrate);
$("new-password").addEventListener("input", (e) => { $("strength").textContent = `Strength: ${strength(e.target.value)}`; });
if (token) signIn().catch((e) => { sessionStorage.removeItem("polydev-token"); show("signin"); fail(e); });
else show("signin");
