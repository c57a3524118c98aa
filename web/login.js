// The login viewer: starts a login session, connects to its agent over WebRTC (this page makes
// the offer; signalling goes through the server: POST …/signal, SSE GET …/signal), draws the
// sandboxed browser's frames from the `screen` data channel on a canvas, and sends mouse,
// keyboard and paste events on the `input` channel. The `control` channel measures the round
// trip (ping/pong). Protocol: docs/login.md, "The stream protocol". Text goes into the page with
// textContent only.
const $ = (id) => document.getElementById(id);
let csrf = null;
let session = null;
let peer = null;

const TERMINAL = new Set(["completed", "failed", "cancelled", "canceled", "expired", "timeout", "timed_out"]);
// What the page measured (read by the end-to-end test, shown in #stats).
const stats = { rtts: [], frames: 0, frameTimes: [], bytes: 0, connected: false, status: null, error: null };
window.polydevLogin = stats;

function say(text) { $("status").textContent = text; $("error").textContent = ""; }
function fail(error) { $("error").textContent = String(error?.message ?? error); }

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
const handler = (fn) => async (event) => { event?.preventDefault(); try { await fn(event); } catch (e) { fail(e); } };

function showState(s) {
  stats.status = s.status;
  stats.error = s.error_message ?? null;
  const words = {
    pending: "Starting the login browser…",
    authenticating: "Sign in to your provider in the browser below.",
    completed: "Done: the credential is stored, sealed to your key.",
    failed: `Failed: ${s.error_message ?? "unknown reason"}`,
    cancelled: "Cancelled.",
  };
  $("session-state").textContent = words[s.status] ?? s.status;
  $("retry").hidden = !(s.status === "failed");
  $("cancel").hidden = TERMINAL.has(s.status);
  if (TERMINAL.has(s.status)) peer?.close();
}

function percentile(values, p) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function showStats() {
  const p50 = percentile(stats.rtts, 50);
  const recent = stats.frameTimes.filter((t) => t > performance.now() - 5000).length / 5;
  $("stats").textContent = p50 === null ? "" : `round trip ${p50.toFixed(1)} ms · ${recent.toFixed(1)} frames/s`;
}

// One WebRTC connection to the session's agent.
class Peer {
  constructor(s) {
    this.id = s.id;
    this.pc = new RTCPeerConnection({
      iceServers: (s.ice_servers ?? []).map(({ urls, username, credential }) => ({ urls, username, credential })),
    });
    this.pc.onconnectionstatechange = () => {
      stats.connected = this.pc.connectionState === "connected";
      if (stats.connected) say("Connected to the login browser: click it, type, paste.");
      if (this.pc.connectionState === "failed") fail("The connection to the login browser failed.");
    };
    this.screen = this.pc.createDataChannel("screen");
    this.screen.binaryType = "arraybuffer";
    this.screen.onmessage = (e) => this.piece(e.data);
    this.input = this.pc.createDataChannel("input");
    this.control = this.pc.createDataChannel("control");
    this.control.onopen = () => { this.pinger = setInterval(() => this.ping(), 250); };
    this.control.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.t === "pong" && typeof m.ts === "number") { stats.rtts.push(performance.now() - m.ts); showStats(); }
    };
    this.pingId = 0;
    this.frame = null;
    this.drawn = -1;
    this.offerSent = false;
    this.localQueue = [];
    this.remoteQueue = [];
    this.pc.onicecandidate = (e) => {
      if (!e.candidate || !e.candidate.candidate) return;
      const message = { type: "candidate", candidate: e.candidate.toJSON() };
      if (this.offerSent) this.signal(message); else this.localQueue.push(message);
    };
  }

  signal(message) {
    return api("POST", `/v1/login/sessions/${this.id}/signal`, message).catch(fail);
  }

  async start() {
    this.events = new EventSource(`/v1/login/sessions/${this.id}/signal`);
    this.events.addEventListener("signal", (e) => this.onSignal(JSON.parse(e.data)).catch(fail));
    this.events.addEventListener("status", (e) => showState(JSON.parse(e.data)));
    const offer = await this.pc.createOffer();
    await this.pc.setLocalDescription(offer);
    await this.signal({ type: "offer", sdp: offer.sdp });
    this.offerSent = true;
    for (const message of this.localQueue.splice(0)) this.signal(message);
  }

  async onSignal(m) {
    if (m.from !== "agent") return;
    if (m.type === "answer" && this.pc.signalingState === "have-local-offer") {
      await this.pc.setRemoteDescription({ type: "answer", sdp: m.sdp });
      for (const c of this.remoteQueue.splice(0)) await this.pc.addIceCandidate(c);
    } else if (m.type === "candidate" && m.candidate) {
      if (this.pc.remoteDescription) await this.pc.addIceCandidate(m.candidate);
      else this.remoteQueue.push(m.candidate);
    }
  }

  send(message) {
    if (this.input.readyState === "open") this.input.send(JSON.stringify(message));
  }

  ping() {
    if (this.control.readyState === "open") {
      this.control.send(JSON.stringify({ t: "ping", id: ++this.pingId, ts: performance.now() }));
    }
  }

  // `[u32 frame id][u16 index][u16 count][payload]`: a frame is drawn when all its pieces are
  // in; a piece of a newer frame replaces an unfinished one.
  piece(buffer) {
    stats.bytes += buffer.byteLength;
    if (buffer.byteLength < 8) return;
    const view = new DataView(buffer);
    const id = view.getUint32(0), index = view.getUint16(4), count = view.getUint16(6);
    if (count === 0 || index >= count) return;
    if (!this.frame || this.frame.id !== id || this.frame.count !== count) {
      this.frame = { id, count, pieces: new Array(count), got: 0 };
    }
    if (!this.frame.pieces[index]) { this.frame.pieces[index] = new Uint8Array(buffer, 8); this.frame.got++; }
    if (this.frame.got === count) {
      const done = this.frame;
      this.frame = null;
      this.draw(done).catch(() => {});
    }
  }

  async draw(frame) {
    const bitmap = await createImageBitmap(new Blob(frame.pieces, { type: "image/jpeg" }));
    if (frame.id < this.drawn) { bitmap.close(); return; }
    this.drawn = frame.id;
    const canvas = $("screen");
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    stats.frames++;
    stats.frameTimes.push(performance.now());
    if (stats.frameTimes.length > 2000) stats.frameTimes.splice(0, 1000);
  }

  close() {
    clearInterval(this.pinger);
    this.events?.close();
    this.pc.close();
  }
}

function modifiers(e) { return (e.altKey ? 1 : 0) | (e.ctrlKey ? 2 : 0) | (e.metaKey ? 4 : 0) | (e.shiftKey ? 8 : 0); }
function position(e) {
  const canvas = $("screen");
  const r = canvas.getBoundingClientRect();
  return { x: ((e.clientX - r.left) * canvas.width) / r.width, y: ((e.clientY - r.top) * canvas.height) / r.height };
}
const BUTTONS = ["left", "middle", "right"];

function wireInput() {
  const canvas = $("screen");
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("mousedown", (e) => {
    canvas.focus();
    e.preventDefault();
    peer?.send({ t: "mouse", type: "mousePressed", ...position(e), button: BUTTONS[e.button] ?? "none", clickCount: e.detail || 1, modifiers: modifiers(e) });
  });
  canvas.addEventListener("mouseup", (e) => {
    peer?.send({ t: "mouse", type: "mouseReleased", ...position(e), button: BUTTONS[e.button] ?? "none", clickCount: e.detail || 1, modifiers: modifiers(e) });
  });
  let pendingMove = null;
  canvas.addEventListener("mousemove", (e) => {
    const first = pendingMove === null;
    pendingMove = { t: "mouse", type: "mouseMoved", ...position(e), button: e.buttons & 1 ? "left" : "none", modifiers: modifiers(e) };
    if (first) requestAnimationFrame(() => { peer?.send(pendingMove); pendingMove = null; });
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    peer?.send({ t: "mouse", type: "mouseWheel", ...position(e), deltaX: e.deltaX, deltaY: e.deltaY, modifiers: modifiers(e) });
  }, { passive: false });
  canvas.addEventListener("keydown", (e) => {
    // Ctrl/Cmd+V: let the browser raise the paste event below.
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "v") return;
    e.preventDefault();
    const text = e.key.length === 1 && !e.ctrlKey && !e.metaKey ? e.key : "";
    peer?.send({ t: "key", type: "keyDown", key: e.key, code: e.code, text, modifiers: modifiers(e) });
  });
  canvas.addEventListener("keyup", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "v") return;
    e.preventDefault();
    peer?.send({ t: "key", type: "keyUp", key: e.key, code: e.code, modifiers: modifiers(e) });
  });
  canvas.addEventListener("paste", (e) => {
    e.preventDefault();
    const text = e.clipboardData?.getData("text/plain") ?? "";
    if (text) peer?.send({ t: "paste", text });
  });
  $("paste-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("paste-text").value;
    if (text) peer?.send({ t: "paste", text });
    $("paste-text").value = "";
    canvas.focus();
  });
}

async function attach(s) {
  session = s;
  $("start-form").hidden = true;
  $("viewer").hidden = false;
  history.replaceState(null, "", `/login-session?session=${encodeURIComponent(s.id)}`);
  showState(s);
  if (TERMINAL.has(s.status)) return;
  peer?.close();
  peer = new Peer(s);
  await peer.start();
  say("Connecting to the login browser…");
}

async function init() {
  const account = await api("GET", "/v1/account/session");
  csrf = account.csrf_token;
  if (!account.signed_in) { $("signed-out").hidden = false; return; }
  wireInput();
  $("start-form").hidden = false;
  $("start-form").addEventListener("submit", handler(async () => {
    $("start").disabled = true;
    try { await attach(await api("POST", "/v1/login/sessions", { provider: $("provider").value })); }
    finally { $("start").disabled = false; }
  }));
  $("cancel").addEventListener("click", handler(async () => showState(await api("POST", `/v1/login/sessions/${session.id}/cancel`))));
  $("retry").addEventListener("click", handler(async () => attach(await api("POST", `/v1/login/sessions/${session.id}/retry`))));
  const existing = new URLSearchParams(location.search).get("session");
  if (existing) await attach(await api("GET", `/v1/login/sessions/${encodeURIComponent(existing)}`));
}

init().catch(fail);
