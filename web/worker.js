// The page's keyring lives here, in a Web Worker: Argon2id runs off the main thread (the page
// stays responsive and shows "deriving key…"), and the account keys never enter the page's own
// memory. The main thread sends {id, op, args} and gets {id, ok, value | error} back. Keyrings
// are named: "current" (the unlocked account), and during a key rotation "old" and "new".
// Locking the page terminates this worker, which frees every key with the WASM memory.
import init, * as zk from "/pkg/polydev_zk.js";

const ready = init();
const keyrings = new Map();

function keyring(name = "current") {
  const k = keyrings.get(name);
  if (!k) throw new Error("locked");
  return k;
}

function keep(name, k) {
  keyrings.get(name)?.free();
  keyrings.set(name, k);
  return { proof: k.proof, proofKind: k.proofKind };
}

const ops = {
  // Sets a master password up: a new account key under it and a new recovery key.
  setup({ password, userId, as = "current" }) {
    const made = zk.setup(password, userId);
    const result = { material: made.material, recoveryKey: made.recoveryKey, recoveryProof: made.recoveryProof };
    const proved = keep(as, made.keyring());
    made.free();
    return { ...result, ...proved };
  },
  unlock({ material, password, userId, as = "current" }) {
    return keep(as, zk.unlock(material, password, userId));
  },
  unlockPasswordEnvelope({ wrapped, password, userId, as }) {
    return keep(as, zk.unlockPasswordEnvelope(wrapped, password, userId));
  },
  rename({ from, to }) {
    const k = keyring(from);
    keyrings.delete(from);
    return keep(to, k);
  },
  drop({ name }) {
    keyrings.get(name)?.free();
    keyrings.delete(name);
    return null;
  },
  seal: ({ name, ns, uid, row, text }) => keyring(name).seal(ns, uid, row, text),
  open: ({ name, ns, uid, row, envelope }) => keyring(name).open(ns, uid, row, envelope),
  sealRecord: ({ name, ns, uid, row, record }) => keyring(name).sealRecord(ns, uid, row, record),
  openRecord: ({ name, ns, uid, row, envelope }) => JSON.parse(keyring(name).openRecord(ns, uid, row, envelope)),
  sealBase64: ({ name, ns, uid, row, base64 }) => keyring(name).sealBase64(ns, uid, row, base64),
  openBase64: ({ name, ns, uid, row, envelope }) => keyring(name).openBase64(ns, uid, row, envelope),
  opens: ({ name, ns, uid, row, envelope }) => keyring(name).opens(ns, uid, row, envelope),
  resealFrom: ({ name, from, ns, uid, row, envelope }) => keyring(name).resealFrom(keyring(from), ns, uid, row, envelope),
  replaceRecoveryKey: ({ name, material }) => JSON.parse(keyring(name).replaceRecoveryKey(material)),
  recordHash: ({ record }) => zk.recordHash(record),
  contentHash: ({ text }) => zk.contentHash(text),
  materialFingerprint: ({ material }) => zk.materialFingerprint(material),
  materialKdfParams: ({ material }) => JSON.parse(zk.materialKdfParams(material)),
};

self.onmessage = async ({ data: { id, op, args } }) => {
  try {
    await ready;
    const run = ops[op];
    if (!run) throw new Error(`unknown operation ${op}`);
    self.postMessage({ id, ok: true, value: run(args ?? {}) });
  } catch (e) {
    self.postMessage({ id, ok: false, error: String(e?.message ?? e) });
  }
};
