// The X25519 parts of the crypto core in the WASM build under Node (target/zk-node, made by
// web/build.sh): RFC 7748 inside WASM, the frozen sealed box, a user key pair wrapped by the
// keyring, and boxes sealed in WASM opened natively's way (and refused elsewhere).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const root = new URL("../../", import.meta.url);
const zk = createRequire(import.meta.url)(new URL("target/zk-node/polydev_zk.js", root).pathname);
const vectors = (name) => readFileSync(new URL(`crates/polydev-zk/tests/vectors/${name}`, root), "utf8").trim();

const USER = "7d3c1a3e-2f7b-4d55-9a43-0c3b8e4f7a10";
const ROW = "88888888-8888-4888-8888-888888888882";
const text = (bytes) => new TextDecoder().decode(bytes);
const results = [];
function check(name, fn) {
  try { fn(); results.push(`ok ${name}`); } catch (e) { results.push(`FAIL ${name}: ${e.message}`); }
}

check("RFC 7748 inside WASM", () => assert.equal(zk.selfTestX25519(), true));
check("frozen v1 sealed box opens", () => {
  const pair = zk.ZkX25519KeyPair.fromSecret(vectors("x25519-secret-v1.txt"));
  assert.equal(text(pair.open("job.command", USER, ROW, vectors("sealed-box-v1.txt"))), "frozen sealed box: echo Ünïcödé ✓\n");
});
check("a user key pair wrapped by the keyring, and a sealed round trip", () => {
  const keyring = zk.setup("a password for node", USER).keyring();
  const pair = zk.ZkX25519KeyPair.generate();
  const wrapped = keyring.seal("runtime.x25519", USER, USER, pair.exportSecret());
  const back = zk.ZkX25519KeyPair.fromSecret(keyring.open("runtime.x25519", USER, USER, wrapped));
  assert.equal(back.publicKey, pair.publicKey);
  const sealed = zk.sealTo(pair.publicKey, "job.stdout", USER, "job-1/0", new TextEncoder().encode("hello"));
  assert.equal(text(back.open("job.stdout", USER, "job-1/0", sealed)), "hello");
  assert.throws(() => back.open("job.stdout", USER, "job-1/1", sealed), /row/);
});

for (const line of results) console.log(line);
const failed = results.filter((r) => r.startsWith("FAIL")).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
