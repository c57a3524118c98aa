#!/usr/bin/env bash
# Polydev benchmarks (docs/benchmarks.md).
# Usage: bench/run.sh [--quick] [--no-litellm] [--only gateway|fanout|quota|mcp|zk|login|cli]
# Builds release binaries, starts the mock upstream, installs and starts the LiteLLM proxy from
# PyPI (in target/bench/litellm-venv) in front of the same mock, then runs polydev-bench, which
# starts `polydev serve` on a fresh database (DATABASE_URL, else an embedded cluster).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=() litellm=1 only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --no-litellm) litellm=0 ;;
    --only) only=(--only "$2"); [ "$2" = gateway ] || litellm=0; shift ;;
    *) echo "usage: bench/run.sh [--quick] [--no-litellm] [--only gateway|fanout|quota|mcp|zk|login|cli]" >&2; exit 2 ;;
  esac
  shift
done

cargo build --release --locked -p polydev -p polydev-mock -p polydev-bench
mkdir -p target/bench
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # The embedded cluster the bench may have started.
  if [ -f target/bench/pg/postgres/postmaster.pid ]; then
    pg_ctl=$(command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl | tail -n1)
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$pg_ctl" -D "$PWD/target/bench/pg/postgres" -m fast stop >/dev/null 2>&1 || true
    else "$pg_ctl" -D target/bench/pg/postgres -m fast stop >/dev/null 2>&1 || true; fi
  fi
}
trap cleanup EXIT

mock_port=${POLYDEV_BENCH_MOCK_PORT:-18901}
target/release/polydev-mock "127.0.0.1:$mock_port" >/dev/null & pids+=($!)
args=(--mock-url "http://127.0.0.1:$mock_port" "${quick[@]}" "${only[@]}")

if [ "$litellm" = 1 ]; then
  venv=target/bench/litellm-venv
  if [ ! -x "$venv/bin/litellm" ]; then
    echo "installing litellm[proxy] from PyPI into $venv ..."
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'litellm[proxy]'
  fi
  litellm_port=${POLYDEV_BENCH_LITELLM_PORT:-18902}
  key="sk-bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  cat > target/bench/litellm.yaml <<YAML
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:$mock_port/v1
      api_key: mock-key
YAML
  # No DATABASE_URL for LiteLLM (the bench's, for polydev): with one it wants its prisma
  # database set up and answers nothing.
  env -u DATABASE_URL LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_MASTER_KEY="$key" \
    "$venv/bin/litellm" --config target/bench/litellm.yaml --host 127.0.0.1 --port "$litellm_port" \
    > target/bench/litellm.log 2>&1 & pids+=($!)
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$litellm_port/health/liveliness" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$litellm_port/health/liveliness" >/dev/null || { echo "LiteLLM did not start; see target/bench/litellm.log" >&2; exit 1; }
  args+=(--litellm-url "http://127.0.0.1:$litellm_port" --litellm-key "$key")
fi

target/release/polydev-bench "${args[@]}"

# The same crypto in WASM (needs web/build.sh's Node build; .ci/run and web/build.sh make it).
if [ -f target/zk-node/polydev_zk.js ]; then
  node bench/zk-wasm.mjs
else
  echo "(WASM figures skipped: run web/build.sh first)"
fi
