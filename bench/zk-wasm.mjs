// Zero-knowledge in WASM under Node (target/zk-node, from web/build.sh): unlock time with the
// default Argon2id parameters, and 1 KiB envelope seal/open rates. bench/run.sh prints these
// next to the native figures from polydev-bench.
import { createRequire } from "node:module";
import { performance } from "node:perf_hooks";

const zk = createRequire(import.meta.url)(new URL("../target/zk-node/polydev_zk.js", import.meta.url).pathname);
const user = "bench-user";
const made = zk.setup("bench password", user);
const times = [];
for (let i = 0; i < 3; i++) {
  const t = performance.now();
  zk.unlock(made.material, "bench password", user);
  times.push(performance.now() - t);
}
times.sort((a, b) => a - b);
const keyring = made.keyring();
const item = "x".repeat(1024);
const rounds = 2000;
let t = performance.now();
let sealed = "";
for (let i = 0; i < rounds; i++) sealed = keyring.seal("chat.message", user, "row", item);
const seal = rounds / ((performance.now() - t) / 1000);
t = performance.now();
for (let i = 0; i < rounds; i++) keyring.open("chat.message", user, "row", sealed);
const open = rounds / ((performance.now() - t) / 1000);
console.log(`WASM (Node): unlock (Argon2id m=64 MiB t=3 p=1) median ${times[1].toFixed(1)} ms | 1 KiB seal ${seal.toFixed(0)}/s, open ${open.toFixed(0)}/s`);
