// The zero-knowledge page. All cryptography runs in WebAssembly built from crates/polydev-zk (the
// same Rust code as the server and CLI); this file only moves data between the page, the WASM
// module and the polydev API.
import init, { setup, unlock, contentHash } from "/pkg/polydev_zk.js";

const $ = (id) => document.getElementById(id);
const NAMESPACE = "chat.message";
const BATCH = 100;
// The browser session (an HttpOnly cookie) authenticates; writes carry its CSRF token.
let csrf = null;
let me = null;
let keyring = null;

function show(...ids) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = !ids.includes(s.id);
}

function fail(error) {
  $("error").textContent = String(error?.message ?? error);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "x-csrf-token": csrf ?? "", ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 204) return null;
  const json = await response.json();
  if (!response.ok) throw new Error(json?.error?.message ?? `${method} ${path}: ${response.status}`);
  return json;
}

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
  await api("POST", "/v1/zk/enable", JSON.parse(made.material));
  keyring = made.keyring();
  $("recovery-key").textContent = made.recoveryKey;
  show("recovery");
}

async function doUnlock() {
  const zk = await api("GET", "/v1/zk");
  keyring = unlock(JSON.stringify(zk.material), $("password").value, me.user.user_id);
  $("password").value = "";
  await afterUnlock();
}

async function afterUnlock() {
  await refreshStatus();
  await renderHistory();
}

async function refreshStatus() {
  const s = await api("GET", "/v1/zk/migration");
  const total = s.plaintext + s.unverified + s.done;
  $("migration-progress").max = Math.max(total, 1);
  $("migration-progress").value = s.done;
  $("migration-status").textContent =
    `${s.done} of ${total} messages encrypted` + (s.plaintext + s.unverified ? `, ${s.plaintext + s.unverified} to go` : " — done");
  show("migrate", "history");
  $("migrate-button").disabled = s.plaintext + s.unverified === 0;
  return s;
}

// The same steps as `polydev zk migrate`: verify and clear what is encrypted, then encrypt the
// next batch with compare-and-swap; safe to interrupt and restart.
async function migrate() {
  const uid = me.user.user_id;
  for (;;) {
    const unverified = (await api("GET", `/v1/zk/migration/unverified?limit=${BATCH}`)).messages;
    const good = [], bad = [];
    for (const m of unverified) {
      let ok = false;
      try { ok = keyring.open(NAMESPACE, uid, m.id, m.encrypted_content) === m.content; } catch { ok = false; }
      (ok ? good : bad).push({ system: m.system, id: m.id });
    }
    if (good.length) await api("POST", "/v1/zk/migration/clear", good);
    if (bad.length) await api("POST", "/v1/zk/migration/reset", bad);
    const plaintext = (await api("GET", `/v1/zk/migration/plaintext?limit=${BATCH}`)).messages;
    if (!plaintext.length && !unverified.length) break;
    const writes = plaintext.map((m) => ({
      system: m.system,
      id: m.id,
      content_sha256: contentHash(m.content),
      encrypted_content: keyring.seal(NAMESPACE, uid, m.id, m.content),
    }));
    if (writes.length) await api("POST", "/v1/zk/migration/encrypted", writes);
    await refreshStatus();
  }
  await refreshStatus();
  await renderHistory();
}

async function renderHistory() {
  const uid = me.user.user_id;
  const box = $("sessions");
  box.replaceChildren();
  for (const session of await api("GET", "/v1/chat/sessions")) {
    const h = document.createElement("h3");
    h.textContent = session.title ?? "(untitled)";
    box.append(h);
    for (const m of await api("GET", `/v1/chat/sessions/${session.id}/messages`)) {
      const div = document.createElement("div");
      div.className = "message";
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = m.role;
      const text = document.createElement("span");
      text.className = "text";
      if (m.encrypted_content) {
        text.textContent = keyring.open(NAMESPACE, uid, m.id, m.encrypted_content);
        const lock = document.createElement("span");
        lock.className = "lock";
        lock.textContent = "encrypted";
        div.append(role, text, lock);
      } else {
        text.textContent = m.content ?? "";
        div.append(role, text);
      }
      box.append(div);
    }
  }
}

function on(id, handler) {
  $(id).addEventListener("click", async () => {
    $(id).disabled = true;
    try { $("error").textContent = ""; await handler(); } catch (e) { fail(e); } finally { $(id).disabled = false; }
  });
}

await init();
on("signin-button", async () => {
  csrf = (await api("GET", "/v1/account/session")).csrf_token;
  csrf = (await api("POST", "/v1/account/signin", { email: $("email").value.trim(), password: $("account-password").value })).csrf_token;
  $("account-password").value = "";
  await signIn();
});
on("setup-button", turnOn);
on("recovery-saved", afterUnlock);
on("unlock-button", doUnlock);
on("migrate-button", migrate);
$("new-password").addEventListener("input", (e) => { $("strength").textContent = `Strength: ${strength(e.target.value)}`; });
api("GET", "/v1/account/session").then((session) => {
  csrf = session.csrf_token;
  if (session.signed_in) return signIn();
  show("signin");
}).catch((e) => { show("signin"); fail(e); });
