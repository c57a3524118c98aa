// The crypto core's vectors, run against the WASM build under Node (target/zk-node, made by
// web/build.sh): the primitives' KATs inside WASM, the frozen v1 envelopes, and a round trip.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const root = new URL("../../", import.meta.url);
const zk = createRequire(import.meta.url)(new URL("target/zk-node/polydev_zk.js", root).pathname);
const vectors = (name) => readFileSync(new URL(`crates/polydev-zk/tests/vectors/${name}`, root), "utf8").trim();

const USER = "7d3c1a3e-2f7b-4d55-9a43-0c3b8e4f7a10";
const ROW = "88888888-8888-4888-8888-888888888881";
const results = [];
function check(name, fn) {
  try { fn(); results.push(`ok ${name}`); } catch (e) { results.push(`FAIL ${name}: ${e.message}`); }
}

check("known-answer tests inside WASM", () => assert.deepEqual(zk.selfTest(), []));
check("frozen v1 material and item open", () => {
  const keyring = zk.unlock(vectors("material-v1.json"), "correct horse battery staple", USER);
  assert.equal(keyring.open("chat.message", USER, ROW, vectors("item-v1.txt")), "frozen vector: Ünïcödé ✓, and a newline\n");
});
check("frozen recovery key opens", () => {
  const keyring = zk.unlockWithRecovery(vectors("material-v1.json"), vectors("recovery-v1.txt"), USER);
  assert.equal(keyring.open("chat.message", USER, ROW, vectors("item-v1.txt")), "frozen vector: Ünïcödé ✓, and a newline\n");
});
check("frozen proofs and fingerprint", () => {
  const frozen = JSON.parse(vectors("proofs-v1.json"));
  assert.equal(zk.unlock(vectors("material-v1.json"), "correct horse battery staple", USER).proof, frozen.password);
  const byRecovery = zk.unlockWithRecovery(vectors("material-v1.json"), vectors("recovery-v1.txt"), USER);
  assert.equal(byRecovery.proof, frozen.recovery);
  assert.equal(byRecovery.proofKind, "recovery");
  assert.equal(zk.materialFingerprint(vectors("material-v1.json")), frozen.fingerprint);
});
check("records round trip; the frozen item opens as the older format", () => {
  const keyring = zk.unlock(vectors("material-v1.json"), "correct horse battery staple", USER);
  assert.deepEqual(JSON.parse(keyring.openRecord("chat.message", USER, ROW, vectors("item-v1.txt"))), { bare: "frozen vector: Ünïcödé ✓, and a newline\n" });
  const record = { kind: "message", session: "s1", role: "user", created_at_us: 1700000000123456, text: "hi" };
  const sealed = keyring.sealRecord("chat.message", USER, "row-9", JSON.stringify(record));
  assert.deepEqual(JSON.parse(keyring.openRecord("chat.message", USER, "row-9", sealed)), { record });
  assert.equal(zk.recordHash(JSON.stringify(record)).length, 64);
});
check("a wrong password is told apart", () => {
  assert.throws(() => zk.unlock(vectors("material-v1.json"), "wrong", USER), /wrong master password/);
});
check("round trip, and a moved envelope is refused", () => {
  const made = zk.setup("a password for node", USER);
  const keyring = made.keyring();
  const sealed = keyring.seal("chat.message", USER, "row-1", "hello from node");
  assert.equal(keyring.open("chat.message", USER, "row-1", sealed), "hello from node");
  assert.throws(() => keyring.open("chat.message", USER, "row-2", sealed), /row/);
  assert.equal(zk.contentHash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
});

check("frozen KDF parameters are read without a key", () => {
  assert.deepEqual(JSON.parse(zk.materialKdfParams(vectors("material-v1.json"))), { memory_kib: 19456, iterations: 2, parallelism: 1 });
});
check("bytes, rotation helpers and a new recovery key", () => {
  const old = zk.setup("the old one", USER).keyring();
  const made = zk.setup("the new one", USER);
  const material = made.material;
  const fresh = made.keyring();
  const sealed = old.sealBase64("credential.cli", USER, "c1", "AP8Q");
  assert.equal(old.openBase64("credential.cli", USER, "c1", sealed), "AP8Q");
  assert.equal(fresh.opens("credential.cli", USER, "c1", sealed), false);
  const resealed = fresh.resealFrom(old, "credential.cli", USER, "c1", sealed);
  assert.equal(fresh.openBase64("credential.cli", USER, "c1", resealed), "AP8Q");
  assert.equal(old.opens("credential.cli", USER, "c1", resealed), false);
  const pending = zk.unlockPasswordEnvelope(JSON.parse(material).password_wrapped, "the new one", USER);
  assert.equal(pending.opens("credential.cli", USER, "c1", resealed), true);
  const replaced = JSON.parse(fresh.replaceRecoveryKey(material));
  assert.equal(replaced.material.password_wrapped, JSON.parse(material).password_wrapped);
  const byRecovery = zk.unlockWithRecovery(JSON.stringify(replaced.material), replaced.recovery_key, USER);
  assert.equal(byRecovery.proof, replaced.recovery_proof);
});

for (const line of results) console.log(line);
const failed = results.filter((r) => r.startsWith("FAIL")).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
