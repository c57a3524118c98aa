// The zero-knowledge page. All cryptography runs in WebAssembly built from crates/polydev-zk (the
// same Rust code as the server and CLI), inside a Web Worker (worker.js) that holds the keyring:
// this file moves data between the page, the worker and the polydev API. As the CLI does
// (crates/polydev/src/client/zk), it does not trust the server (docs/crypto.md, threat model):
// - it pins, in localStorage, what it saw of the account's keys (version, fingerprint, KDF
//   parameters, manifest) and refuses a server that turns zero-knowledge off, serves older or
//   other key material, or weaker KDF parameters, saying the server changed the keys;
// - it proves the master password to the server for changes that need the owner;
// - it records at turn-on the manifest of the plaintext rows there are, seals only rows it lists,
//   and never shows other plaintext as the user's (quarantined, apart);
// - it seals whole records (text, role, session, creation time) and checks them against their
//   row when reading;
// - it locks (the worker and its keys are dropped) on request and after a while idle.
const $ = (id) => document.getElementById(id);
const NAMESPACE = "chat.message";
const SESSION_NAMESPACE = "chat.session";
const MANIFEST_NAMESPACE = "zk.manifest";
const HINT_NAMESPACE = "user.password_hint";
const BATCH = 100;
const PER_CHUNK = 4000;
// Idle lock: 15 minutes without input, unless localStorage says otherwise (tests).
const IDLE_MS = Number(localStorage.getItem("polydev-idle-lock-ms")) || 15 * 60 * 1000;
// Key rotation: every kind of envelope, and its namespace (crate::zk::rotation::ItemKind).
const ROTATION_KINDS = [
  ["manifest", MANIFEST_NAMESPACE], ["chat_session", SESSION_NAMESPACE], ["session", SESSION_NAMESPACE],
  ["chat_message", NAMESPACE], ["message", NAMESPACE],
  ["provider_credential", "credential.provider"], ["cli_credential", "credential.cli"],
];
const CREDENTIAL_NAMESPACE = { provider_credentials: "credential.provider", cli_credentials: "credential.cli" };
// The browser session (an HttpOnly cookie) authenticates; writes carry its CSRF token.
let csrf = null;
let me = null;
// The proofs of the worker's keyrings, by name: {proof, proofKind}. Empty when locked.
let proofs = {};
let busy = 0;
let idleTimer = null;
// Grows with every lock: what was rendering when the page locked stops adding to it.
let lockEpoch = 0;

// ---- The worker that holds the keys ----------------------------------------------------------

let worker = null;
let calls = 0;
const waiting = new Map();

function startWorker() {
  worker = new Worker("/worker.js", { type: "module" });
  worker.onmessage = ({ data: { id, ok, value, error } }) => {
    const call = waiting.get(id);
    waiting.delete(id);
    if (call) ok ? call.resolve(value) : call.reject(new Error(error));
  };
  worker.onerror = (e) => {
    e.preventDefault();
    for (const call of waiting.values()) call.reject(new Error(`the crypto worker failed: ${e.message}`));
    waiting.clear();
  };
}

// One operation in the worker (see worker.js). Operations with a keyring are refused while the
// page is locked (a flow that was running when it locked stops there).
const KEYLESS = new Set(["setup", "unlock", "unlockPasswordEnvelope", "recordHash", "contentHash", "materialFingerprint", "materialKdfParams"]);
function zk(op, args = {}) {
  if (!KEYLESS.has(op) && !Object.keys(proofs).length) return Promise.reject(new Error("locked"));
  if (!worker) startWorker();
  return new Promise((resolve, reject) => {
    const id = ++calls;
    waiting.set(id, { resolve, reject });
    worker.postMessage({ id, op, args });
  });
}

// Argon2id in the worker, with the page saying so meanwhile.
async function deriving(what, run) {
  const status = $("deriving");
  status.textContent = `Deriving key from your ${what}… this takes a moment.`;
  status.hidden = false;
  document.body.setAttribute("aria-busy", "true");
  try { return await run(); } finally {
    status.hidden = true;
    status.textContent = "";
    document.body.removeAttribute("aria-busy");
  }
}

// ---- Page helpers ----------------------------------------------------------------------------

// Shows these sections only (the quarantine only when it lists something).
function show(...ids) {
  for (const s of document.querySelectorAll("main > section"))
    s.hidden = !ids.includes(s.id) || (s.id === "quarantine" && !$("quarantined").children.length);
}
const UNLOCKED = ["migrate", "history", "quarantine", "credentials", "rotate"];

function fail(error) {
  $("error").textContent = String(error?.message ?? error);
}

async function api(method, path, body, extraHeaders = {}) {
  const response = await fetch(path, {
    method,
    headers: {
      "x-csrf-token": csrf ?? "",
      ...(body ? { "content-type": "application/json" } : {}),
      ...extraHeaders,
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 204) return null;
  const json = await response.json();
  if (!response.ok) throw new Error(json?.error?.message ?? `${method} ${path}: ${response.status}`);
  return json;
}

// The proof of the password (or recovery key) a keyring was unlocked with, as a header.
function proved(name = "current") {
  const p = proofs[name];
  if (!p) throw new Error("locked: unlock first");
  return { [p.proofKind === "recovery" ? "polydev-zk-recovery-proof" : "polydev-zk-proof"]: p.proof };
}

const uid = () => me.user.user_id;
const recordHash = (record) => zk("recordHash", { record: JSON.stringify(record) });

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

// ---- Pins: what this browser remembers of the account's keys ---------------------------------

class KeysChanged extends Error {
  constructor(reason) {
    super(`The server changed this account's keys: ${reason}. Refusing to continue; your master password is not the problem. ` +
      "If you changed them yourself (on another device) or the server was restored from a backup, check that, then forget this browser's pin.");
  }
}

const pinKey = () => `polydev-zk-pin:${uid()}`;
function loadPin() {
  try { return JSON.parse(localStorage.getItem(pinKey())); } catch { return null; }
}
function savePin(pin) {
  localStorage.setItem(pinKey(), JSON.stringify(pin));
}

async function pinFor(version, material, manifest) {
  const json = JSON.stringify(material);
  return {
    version,
    fingerprint: await zk("materialFingerprint", { material: json }),
    kdf: await zk("materialKdfParams", { material: json }),
    ...(manifest ? { manifest } : {}),
  };
}

// The CLI's check_pin: off, older, other at the same version, or weaker parameters: refused.
async function checkPin(pin, status) {
  if (!status.enabled)
    throw new KeysChanged(`it now says zero-knowledge is off for this account, but this browser saw it on (key material version ${pin.version})`);
  if (!status.material) throw new KeysChanged("it says zero-knowledge is on but serves no key material");
  if (status.version < pin.version)
    throw new KeysChanged(`it serves key material version ${status.version} but this browser already saw version ${pin.version}: an older copy`);
  const json = JSON.stringify(status.material);
  const fingerprint = await zk("materialFingerprint", { material: json }).catch(() => null);
  if (status.version === pin.version && fingerprint !== pin.fingerprint)
    throw new KeysChanged(`at version ${status.version} it serves other key material than this browser saw`);
  let kdf;
  try { kdf = await zk("materialKdfParams", { material: json }); } catch (e) { throw new KeysChanged(`its password envelope is unreadable (${e.message})`); }
  if (kdf.memory_kib < pin.kdf.memory_kib || kdf.iterations < pin.kdf.iterations || kdf.parallelism !== pin.kdf.parallelism)
    throw new KeysChanged(`it serves different key derivation parameters (Argon2id m=${kdf.memory_kib} KiB, t=${kdf.iterations}, p=${kdf.parallelism}) ` +
      `than this browser saw (m=${pin.kdf.memory_kib} KiB, t=${pin.kdf.iterations}, p=${pin.kdf.parallelism})`);
  return fingerprint;
}

// The account's zero-knowledge state, checked against the pin (and pinned when first seen on).
async function readAccount() {
  const status = await api("GET", "/v1/zk");
  const pin = loadPin();
  if (pin) await checkPin(pin, status);
  else if (status.enabled && status.material) savePin(await pinFor(status.version, status.material, null));
  return { status, pin: loadPin() };
}

// After this page changed the material: the server must serve exactly it, at a higher version.
async function repin(material) {
  const status = await api("GET", "/v1/zk");
  const ours = await zk("materialFingerprint", { material: JSON.stringify(material) });
  const served = status.enabled && status.material ? await zk("materialFingerprint", { material: JSON.stringify(status.material) }) : null;
  if (served !== ours) throw new KeysChanged("it did not store the key material this page just sent");
  const old = loadPin();
  if (old && status.version <= old.version) throw new KeysChanged(`after a change its key material version did not grow (${status.version} after ${old.version})`);
  savePin(await pinFor(status.version, material, old?.manifest));
}

// Refused: the keys are dropped and the password is not asked for.
function keysChanged(error) {
  lock("");
  $("keys-changed-message").textContent = error.message;
  show("keys-changed");
  $("keys-changed-title").focus();
}

// ---- The manifest ----------------------------------------------------------------------------

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

// SHA-256 over the entries in order: what the pin remembers of the manifest.
const manifestDigest = (entries) =>
  zk("contentHash", { text: entries.map((e) => JSON.stringify({ system: e.system, kind: e.kind, id: e.id, hash: e.hash }) + "\n").join("") });

// The manifest of what is in plaintext now, sealed in chunks (the CLI's format), and pinned.
async function recordManifest() {
  const entries = [];
  for (const m of await readAll("/v1/zk/migration/plaintext"))
    entries.push({ system: m.system, kind: "message", id: m.id, hash: await recordHash(messageRecord(m)) });
  for (const s of await readAll("/v1/zk/migration/sessions"))
    entries.push({ system: s.system, kind: "session", id: s.id, hash: await recordHash(sessionRecord(s)) });
  const pieces = [];
  for (let i = 0; i < entries.length; i += PER_CHUNK) pieces.push(entries.slice(i, i + PER_CHUNK));
  if (!pieces.length) pieces.push([]);
  const chunks = [];
  for (const [i, piece] of pieces.entries()) {
    const text = JSON.stringify({ v: 1, chunk: i, total: pieces.length, entries: piece });
    chunks.push({ chunk: i, envelope: await zk("seal", { ns: MANIFEST_NAMESPACE, uid: uid(), row: String(i), text }) });
  }
  for (let i = 0; i < chunks.length; i += 8) await api("POST", "/v1/zk/manifest", chunks.slice(i, i + 8), proved());
  const pin = loadPin();
  if (pin) savePin({ ...pin, manifest: { chunks: chunks.length, digest: await manifestDigest(entries) } });
}

// The stored manifest: {listed: Map "system/kind/id" → hash, chunks, digest}, or null.
async function loadManifest() {
  const chunks = await api("GET", "/v1/zk/manifest");
  if (!chunks.length) return null;
  const listed = new Map();
  const entries = [];
  for (const [i, c] of chunks.entries()) {
    const body = JSON.parse(await zk("open", { ns: MANIFEST_NAMESPACE, uid: uid(), row: String(c.chunk), envelope: c.envelope }));
    if (body.chunk !== i || c.chunk !== i || body.total !== chunks.length) throw new Error("the server serves an incomplete migration manifest");
    for (const e of body.entries) { listed.set(`${e.system}/${e.kind}/${e.id}`, e.hash); entries.push(e); }
  }
  return { listed, chunks: chunks.length, digest: await manifestDigest(entries) };
}

// The manifest checked against the pin (the CLI's `manifest`); `record`: make one if there is
// none and this browser never saw one (an account turned on by an older client).
async function checkedManifest(record) {
  const pin = loadPin();
  const manifest = await loadManifest();
  if (manifest && pin?.manifest) {
    if (pin.manifest.digest !== manifest.digest || pin.manifest.chunks !== manifest.chunks)
      throw new KeysChanged("it serves another migration manifest than the one this browser recorded");
    return manifest;
  }
  if (manifest) { if (pin) savePin({ ...pin, manifest: { chunks: manifest.chunks, digest: manifest.digest } }); return manifest; }
  if (pin?.manifest) throw new KeysChanged("the migration manifest this browser recorded is gone");
  if (!record) return null;
  await recordManifest();
  return loadManifest();
}

const listedIn = async (manifest, system, kind, id, record) =>
  manifest?.listed.get(`${system}/${kind}/${id}`) === await recordHash(record);

// ---- Turning on, unlocking, locking ----------------------------------------------------------

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
  await showAccount();
}

// Unlock or set up, unless the server contradicts this browser's pin.
async function showAccount() {
  let account;
  try { account = await readAccount(); } catch (e) {
    if (e instanceof KeysChanged) return keysChanged(e);
    throw e;
  }
  show(account.status.enabled ? "unlock" : "setup");
  $(account.status.enabled ? "password" : "new-password").focus();
}

async function turnOn() {
  const password = $("new-password").value;
  if (password !== $("new-password-again").value) throw new Error("the passwords differ");
  if (password.length < 10) throw new Error("use at least 10 characters");
  if (!$("understood").checked) throw new Error("please confirm you understand the warning");
  const { status } = await readAccount();
  if (status.enabled) throw new Error("zero-knowledge is already on for this account: reload the page");
  const made = await deriving("master password", () => zk("setup", { password, userId: uid() }));
  proofs = { current: { proof: made.proof, proofKind: made.proofKind } };
  $("new-password").value = "";
  $("new-password-again").value = "";
  const material = JSON.parse(made.material);
  await api("POST", "/v1/zk/enable", { material, password_proof: made.proof, recovery_proof: made.recoveryProof });
  const stored = await api("GET", "/v1/zk");
  const ours = await zk("materialFingerprint", { material: made.material });
  if (!stored.material || await zk("materialFingerprint", { material: JSON.stringify(stored.material) }) !== ours)
    throw new KeysChanged("it did not store the key material this page just sent");
  savePin(await pinFor(stored.version, material, null));
  await recordManifest();
  showRecoveryKey(made.recoveryKey, "setup");
  armIdleLock();
}

// The recovery key, shown once; it leaves the DOM when the user says it is stored.
function showRecoveryKey(key, why) {
  $("recovery-key").textContent = key;
  $("recovery-why").textContent = why === "rotation"
    ? "The account key was rotated: this new recovery key replaces the old one, which opens nothing written from now on."
    : "";
  show("recovery");
  $("recovery-key").focus();
}

async function recoverySaved() {
  $("recovery-key").textContent = "";
  $("recovery-why").textContent = "";
  await afterUnlock();
}

async function doUnlock() {
  const password = $("password").value;
  let account;
  try { account = await readAccount(); } catch (e) {
    if (e instanceof KeysChanged) { $("password").value = ""; return keysChanged(e); }
    throw e;
  }
  const { status, pin } = account;
  if (!status.enabled) return show("setup");
  let unlocked;
  try {
    unlocked = await deriving("master password", () => zk("unlock", { material: JSON.stringify(status.material), password, userId: uid() }));
  } catch (e) {
    const fingerprint = await zk("materialFingerprint", { material: JSON.stringify(status.material) }).catch(() => null);
    if (/wrong master password/.test(e.message) && pin && pin.fingerprint !== fingerprint)
      throw new Error(`${e.message} — or the server changed this account's keys: the key material changed since this browser last unlocked it ` +
        `(version ${pin.version} then, ${status.version} now). If you did not change your password elsewhere, do not trust this server.`);
    throw e;
  }
  $("password").value = "";
  proofs = { current: unlocked };
  // An account turned on before proofs existed: register this password's proof.
  if (!status.proofs?.password) await api("POST", "/v1/zk/proof", { password_proof: unlocked.proof });
  savePin(await pinFor(status.version, status.material, pin?.manifest));
  armIdleLock();
  await afterUnlock();
}

async function afterUnlock() {
  $("history").setAttribute("aria-busy", "true");
  await refreshStatus();
  await renderHistory();
  $("history-title").focus();
}

// Drops the keys: the worker (and its WASM memory) goes; what was shown goes too.
function lock(why) {
  lockEpoch += 1;
  if (worker) worker.terminate();
  worker = null;
  for (const call of waiting.values()) call.reject(new Error("locked"));
  waiting.clear();
  proofs = {};
  clearTimeout(idleTimer);
  idleTimer = null;
  $("sessions").replaceChildren();
  $("quarantined").replaceChildren();
  $("quarantine").hidden = true;
  $("credentials-unreadable").replaceChildren();
  $("recovery-key").textContent = "";
  $("password").value = "";
  $("rotate-password").value = "";
  $("lock-bar").hidden = true;
  if (!me) return show("signin");
  show("unlock");
  $("locked-status").textContent = why;
  $("password").focus();
}

function armIdleLock() {
  $("lock-bar").hidden = false;
  $("locked-status").textContent = "";
  clearTimeout(idleTimer);
  idleTimer = setTimeout(function idle() {
    if (busy) { idleTimer = setTimeout(idle, IDLE_MS); return; }
    lock(`Locked after ${Math.round(IDLE_MS / 60000) || "less than one"} minute(s) without activity: unlock again to continue.`);
  }, IDLE_MS);
}

for (const event of ["keydown", "pointerdown", "wheel", "touchstart"])
  document.addEventListener(event, () => { if (idleTimer) armIdleLock(); }, { passive: true });

// ---- Migration -------------------------------------------------------------------------------

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
  show(...UNLOCKED);
  $("migrate-button").disabled = left === 0;
  return s;
}

// Verifies what is sealed but not cleared (the CLI's verify step): clears the rows whose
// envelope opens to their plaintext, resets the others. Returns what it saw and did.
async function verifyBatch() {
  const done = { pending: 0, cleared: 0, reset: 0 };
  const verify = async (list, namespace, envelopeOf, matches, clearPath, resetPath) => {
    const good = [], bad = [];
    for (const row of list) {
      let ok = false;
      try { ok = await matches(await zk("openRecord", { ns: namespace, uid: uid(), row: row.id, envelope: envelopeOf(row) }), row); } catch { ok = false; }
      (ok ? good : bad).push({ system: row.system, id: row.id });
    }
    if (good.length) done.cleared += (await api("POST", clearPath, good, proved())).cleared;
    if (bad.length) done.reset += (await api("POST", resetPath, bad)).reset;
    done.pending += list.length;
  };
  await verify((await api("GET", `/v1/zk/migration/unverified?limit=${BATCH}`)).messages, NAMESPACE, (m) => m.encrypted_content,
    async (opened, m) => opened.record ? await recordHash(opened.record) === await recordHash(messageRecord(m)) : opened.bare === m.content,
    "/v1/zk/migration/clear", "/v1/zk/migration/reset");
  await verify((await api("GET", `/v1/zk/migration/sessions/unverified?limit=${BATCH}`)).messages, SESSION_NAMESPACE, (s) => s.encrypted_meta,
    async (opened, s) => !!opened.record && await recordHash(opened.record) === await recordHash(sessionRecord(s)),
    "/v1/zk/migration/sessions/clear", "/v1/zk/migration/sessions/reset");
  return done;
}

// The same steps as `polydev zk migrate`: verify and clear what is encrypted, then encrypt the
// next batch (only rows the manifest lists) with compare-and-swap; safe to interrupt and restart.
// Like the CLI, it stops with an error when the server keeps serving rows to verify that
// neither clear nor reset (three rounds without progress), instead of looping.
async function migrate() {
  const manifest = await checkedManifest(true);
  const notListed = new Set();
  const allPhases = () => [["plaintext", "chat"], ["plaintext", "sessions"], ["sessions", "chat"], ["sessions", "sessions"]];
  let phases = allPhases();
  let after = null;
  let resets = 0, passes = 0, stuck = 0;
  for (;;) {
    const verified = await verifyBatch();
    resets += verified.reset;
    if (!phases.length) {
      if (verified.pending) {
        stuck = verified.cleared || verified.reset ? 0 : stuck + 1;
        if (stuck >= 3) throw new Error("the migration makes no progress: the server keeps serving rows to verify that neither clear nor reset");
        continue;
      }
      // Rows put back in the queue are tried again, a few times.
      if (resets && passes < 3) { passes += 1; resets = 0; phases = allPhases(); after = null; continue; }
      break;
    }
    const [what, system] = phases[0];
    const rows = (await api("GET", `/v1/zk/migration/${what}?system=${system}&limit=${BATCH}${after ? `&after=${after}` : ""}`)).messages;
    if (!rows.length) { phases.shift(); after = null; continue; }
    after = rows[rows.length - 1].id;
    const writes = [];
    for (const row of rows) {
      const isMessage = what === "plaintext";
      const record = isMessage ? messageRecord(row) : sessionRecord(row);
      if (!await listedIn(manifest, row.system, isMessage ? "message" : "session", row.id, record)) { notListed.add(row.id); continue; }
      const sealed = await zk("sealRecord", { ns: isMessage ? NAMESPACE : SESSION_NAMESPACE, uid: uid(), row: row.id, record: JSON.stringify(record) });
      writes.push(isMessage
        ? { system: row.system, id: row.id, content_sha256: await zk("contentHash", { text: row.content }), encrypted_content: sealed }
        : { system: row.system, id: row.id, texts_sha256: row.texts_sha256, encrypted_meta: sealed });
    }
    if (writes.length) await api("POST", what === "plaintext" ? "/v1/zk/migration/encrypted" : "/v1/zk/migration/sessions", writes);
    await refreshStatus();
  }
  await refreshStatus(notListed.size);
  await renderHistory();
  if (notListed.size) $("error").textContent = `${notListed.size} plaintext items were not there when encryption was turned on: they were not encrypted and are not shown as yours.`;
}

// ---- History ---------------------------------------------------------------------------------

function line(roleText, textValue, badge, badgeClass) {
  const div = document.createElement("div");
  div.className = "message";
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = roleText ?? "";
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
}

// Shows what opens and matches its row. An envelope that does not open is shown in its place as
// unreadable (the rest goes on); plaintext the manifest does not list, and sealed records served
// somewhere else (moved, reordered, role flipped), are listed apart, quarantined, never as the
// user's.
async function renderHistory() {
  const epoch = lockEpoch;
  $("history").setAttribute("aria-busy", "true");
  try { await renderInto(epoch); } finally { $("history").removeAttribute("aria-busy"); }
}

async function renderInto(epoch) {
  const manifest = await checkedManifest(false);
  const box = $("sessions");
  const append = (node) => { if (epoch !== lockEpoch) throw new Error("locked"); box.append(node); };
  box.replaceChildren();
  const quarantined = [];
  const quarantine = (what, id, reason, text) => quarantined.push({ what, id, reason, text });
  for (const session of await api("GET", "/v1/chat/sessions")) {
    const h = document.createElement("h3");
    let title = session.title ?? "(untitled)";
    if (session.encrypted_meta) {
      try {
        const opened = await zk("openRecord", { ns: SESSION_NAMESPACE, uid: uid(), row: session.id, envelope: session.encrypted_meta });
        if (opened.record?.kind === "session" && opened.record.session === session.id) title = opened.record.text ?? "(untitled)";
        else { title = "(untitled)"; quarantine("session title", session.id, `sealed for session ${opened.record?.session ?? "?"}`, opened.record?.text ?? opened.bare ?? ""); }
      } catch (e) { title = "(title unreadable)"; quarantine("session title", session.id, `unreadable: ${e.message}`, ""); }
    } else if (session.title != null && !await listedIn(manifest, session.system, "session", session.id, sessionRecord(session))) {
      quarantine("session title", session.id, "plaintext not in the manifest", session.title);
      title = "(untitled)";
    }
    h.textContent = title;
    append(h);
    let messages;
    try { messages = await api("GET", `/v1/chat/sessions/${session.id}/messages`); } catch (e) {
      append(line("", `This session's messages could not be read: ${e.message}`, "unreadable", "flag unreadable-flag"));
      continue;
    }
    for (const m of messages) {
      if (m.encrypted_content) {
        let opened;
        try { opened = await zk("openRecord", { ns: NAMESPACE, uid: uid(), row: m.id, envelope: m.encrypted_content }); } catch (e) {
          const shown = line(m.role, `This message cannot be opened: ${e.message}`, "unreadable", "flag unreadable-flag");
          shown.classList.add("unreadable");
          shown.dataset.id = m.id;
          append(shown);
          continue;
        }
        if (opened.bare !== undefined) { append(line(m.role, opened.bare, "older format, not bound", "flag")); continue; }
        const r = opened.record;
        const why = r.kind !== "message" ? "not a message" : r.session !== session.id ? `moved from session ${r.session}`
          : (r.role ?? null) !== (m.role ?? null) ? `role changed from ${r.role} to ${m.role}` : (r.created_at_us ?? null) !== micros(m.created_at) ? "reordered (its time was changed)" : null;
        if (why) { quarantine("message", m.id, why, r.text); continue; }
        append(line(m.role, r.text, "encrypted", "lock"));
      } else if (await listedIn(manifest, session.system, "message", m.id, messageRecord({ ...m, session_id: session.id }))) {
        append(line(m.role, m.content ?? "", "not yet encrypted", "flag"));
      } else {
        quarantine("message", m.id, "plaintext not in the manifest", m.content ?? "");
      }
    }
  }
  if (epoch !== lockEpoch) throw new Error("locked");
  const list = $("quarantined");
  list.replaceChildren();
  for (const q of quarantined) {
    const li = document.createElement("li");
    li.className = "quarantined";
    li.dataset.id = q.id;
    const reason = document.createElement("strong");
    reason.className = "reason";
    reason.textContent = `${q.what} ${q.id}: ${q.reason}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = q.text;
    li.append(reason, text);
    list.append(li);
  }
  $("quarantine").hidden = !quarantined.length;
}

// ---- Credentials -----------------------------------------------------------------------------

// The CLI's `migrate_credentials`: the server hands each legacy credential over once (given the
// proof of the password), walking past unreadable rows with `next`; they are sealed here and
// stored; then every stored envelope is opened, compared with what was handed over, and only
// then is the legacy ciphertext cleared.
async function migrateCredentials() {
  const held = new Map();
  const unreadable = [];
  let moved = 0;
  let from = "";
  for (;;) {
    const batch = await api("POST", `/v1/zk/credentials/hand-over?limit=50${from}`, {}, proved());
    unreadable.push(...batch.unreadable);
    const sealed = [];
    for (const h of batch.credentials) {
      const ns = CREDENTIAL_NAMESPACE[h.table];
      sealed.push({ table: h.table, credential_id: h.credential_id, envelope: await zk("sealBase64", { ns, uid: uid(), row: h.credential_id, base64: h.plaintext }) });
      held.set(h.credential_id, h.plaintext);
    }
    if (sealed.length) moved += (await api("POST", "/v1/zk/credentials/encrypted", sealed)).stored.length;
    if (!batch.next) break;
    from = `&table=${encodeURIComponent(batch.next.table)}&after=${encodeURIComponent(batch.next.after)}`;
  }
  const verified = [];
  let wrong = 0;
  for (const s of await api("GET", "/v1/zk/credentials")) {
    let opened = null;
    try { opened = await zk("openBase64", { ns: CREDENTIAL_NAMESPACE[s.table], uid: uid(), row: s.credential_id, envelope: s.envelope }); } catch { wrong += 1; continue; }
    if (!held.has(s.credential_id) || held.get(s.credential_id) === opened) verified.push({ table: s.table, credential_id: s.credential_id });
    else wrong += 1;
  }
  held.clear();
  const cleared = verified.length ? (await api("POST", "/v1/zk/credentials/clear", verified)).cleared : 0;
  $("credentials-status").textContent = `${moved} credentials moved to keys only you hold, ${cleared} verified and their server-readable copy removed` +
    (unreadable.length ? `; ${unreadable.length} could not be moved (listed below)` : "") + (wrong ? `; ${wrong} stored envelopes did not open and were left alone` : "") + ".";
  const list = $("credentials-unreadable");
  list.replaceChildren();
  for (const u of unreadable) {
    const li = document.createElement("li");
    li.textContent = `${u.table} ${u.credential_id}: ${u.reason}`;
    list.append(li);
  }
}

// ---- Key rotation ----------------------------------------------------------------------------

// The CLI's `rotate`: a new account key (stored first, wrapped by the password, as the rotation
// in progress), every envelope re-sealed under it with compare-and-swap, then the final material
// (a new recovery key) swapped in. Resumable: run it again with the same password.
async function rotate() {
  const password = $("rotate-password").value;
  if (!password) throw new Error("enter your master password to rotate the key");
  const { status } = await readAccount();
  const material = status.material;
  const user = uid();
  const old = await deriving("master password", () => zk("unlock", { material: JSON.stringify(material), password, userId: user, as: "old" }));
  proofs.old = old;
  $("rotate-password").value = "";
  let pending;
  if (status.rotation) {
    try {
      proofs.new = await deriving("master password", () => zk("unlockPasswordEnvelope", { wrapped: status.rotation, password, userId: user, as: "new" }));
    } catch (e) {
      throw new Error(`a key rotation is in progress but its new key does not open with this password (${e.message}): it was started with the password of that time`);
    }
    const probe = await zk("seal", { name: "old", ns: "zk.probe", uid: user, row: "probe", text: "probe" });
    if (await zk("opens", { name: "new", ns: "zk.probe", uid: user, row: "probe", envelope: probe }))
      throw new KeysChanged("it serves the current account key as the rotation's new one");
    pending = status.rotation;
  } else {
    const made = await deriving("master password", () => zk("setup", { password, userId: user, as: "new" }));
    proofs.new = { proof: made.proof, proofKind: made.proofKind };
    pending = JSON.parse(made.material).password_wrapped;
    await api("POST", "/v1/zk/rotation", { wrapped_key: pending }, proved("old"));
  }
  const total = (await api("GET", "/v1/zk/rotation/count")).total;
  let done = 0, resealed = 0, already = 0;
  const unreadable = [];
  const progress = () => {
    $("rotation-progress").max = Math.max(total, done, 1);
    $("rotation-progress").value = done;
    $("rotation-status").textContent = `${done} of ${Math.max(total, done)} items re-sealed or checked`;
  };
  progress();
  for (const [kind, ns] of ROTATION_KINDS) {
    let after = null;
    for (;;) {
      const items = await api("GET", `/v1/zk/rotation/items?kind=${kind}&limit=${BATCH}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      if (!items.length) break;
      after = items[items.length - 1].id;
      const writes = [];
      for (const item of items) {
        if (await zk("opens", { name: "new", ns, uid: user, row: item.id, envelope: item.envelope })) { already += 1; continue; }
        try {
          writes.push({ id: item.id, previous: item.envelope, envelope: await zk("resealFrom", { name: "new", from: "old", ns, uid: user, row: item.id, envelope: item.envelope }) });
        } catch { unreadable.push(`${kind} ${item.id}`); }
      }
      if (writes.length) {
        const written = await api("POST", "/v1/zk/rotation/items", { kind, items: writes }, proved("old"));
        if (written.resealed.length !== writes.length)
          throw new Error(`${writes.length - written.resealed.length} items changed while being re-sealed: rotate again to finish`);
        resealed += written.resealed.length;
      }
      done += items.length;
      progress();
    }
  }
  let hint;
  if (material.password_hint) {
    hint = await zk("resealFrom", { name: "new", from: "old", ns: HINT_NAMESPACE, uid: user, row: user, envelope: material.password_hint }).catch(() => undefined);
  }
  const rotated = await zk("replaceRecoveryKey", {
    name: "new",
    material: JSON.stringify({ password_wrapped: pending, recovery_wrapped: "", ...(hint ? { password_hint: hint } : {}) }),
  });
  await api("POST", "/v1/zk/rotation/commit", {
    previous: material.password_wrapped,
    material: rotated.material,
    password_proof: proofs.new.proof,
    recovery_proof: rotated.recovery_proof,
  }, proved("old"));
  await repin(rotated.material);
  proofs.current = await zk("rename", { from: "new", to: "current" });
  await zk("drop", { name: "old" });
  delete proofs.old;
  delete proofs.new;
  $("rotation-status").textContent = `Rotated: ${resealed} items re-sealed under the new key` + (already ? `, ${already} already were` : "") +
    (unreadable.length ? `; ${unreadable.length} opened with neither key and were left alone (${unreadable.join(", ")})` : "") + ".";
  showRecoveryKey(rotated.recovery_key, "rotation");
}

// ---- Wiring ----------------------------------------------------------------------------------

function on(id, handler) {
  $(id).addEventListener("click", async () => {
    $(id).disabled = true;
    $(id).setAttribute("aria-busy", "true");
    busy += 1;
    try { $("error").textContent = ""; await handler(); } catch (e) {
      if (e instanceof KeysChanged) keysChanged(e);
      else if (!(e?.message === "locked" && !Object.keys(proofs).length)) fail(e); // stopped by the lock
    } finally { busy -= 1; $(id).disabled = false; $(id).removeAttribute("aria-busy"); }
  });
}

// Enter in a password field presses its button.
for (const [field, button] of [["password", "unlock-button"], ["rotate-password", "rotate-button"], ["account-password", "signin-button"]])
  $(field).addEventListener("keydown", (e) => { if (e.key === "Enter") $(button).click(); });

on("signin-button", async () => {
  csrf = (await api("GET", "/v1/account/session")).csrf_token;
  csrf = (await api("POST", "/v1/account/signin", { email: $("email").value.trim(), password: $("account-password").value })).csrf_token;
  $("account-password").value = "";
  await signIn();
});
on("setup-button", turnOn);
on("recovery-saved", recoverySaved);
on("unlock-button", doUnlock);
on("migrate-button", migrate);
on("credentials-button", migrateCredentials);
on("rotate-button", rotate);
on("lock-button", async () => lock("Locked: the keys were dropped from this page."));
on("forget-pin", async () => {
  if (!$("forget-pin-sure").checked) throw new Error("tick the box first: only forget the pin if you made this change yourself");
  localStorage.removeItem(pinKey());
  $("forget-pin-sure").checked = false;
  await showAccount();
});
$("new-password").addEventListener("input", (e) => { $("strength").textContent = `Strength: ${strength(e.target.value)}`; });
api("GET", "/v1/account/session").then((session) => {
  csrf = session.csrf_token;
  if (session.signed_in) return signIn();
  show("signin");
}).catch((e) => { show("signin"); fail(e); });
