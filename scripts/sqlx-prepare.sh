#!/usr/bin/env bash
# Regenerates .sqlx/, the offline data of the sqlx query macros (query!, query_as!,
# query_scalar!), without sqlx-cli. Run it after changing a macro's SQL or a migration.
#
#   scripts/sqlx-prepare.sh           rewrite .sqlx/query-*.json
#   scripts/sqlx-prepare.sh --check   change nothing; exit 1 if .sqlx/ is not what the code needs
#
# DATABASE_URL names the PostgreSQL server (its database is used only to create and drop
# another); default postgres://postgres@127.0.0.1:5432/postgres. The script:
#   1. creates a scratch database there and applies migrations/ to it with psql, the way sqlx
#      does (each file as one statement batch, in a transaction unless it starts with
#      `-- no-transaction`). psql, not `polydev migrate`: building polydev needs .sqlx/ to be
#      current already, which is what this script is for;
#   2. re-expands every macro in the workspace live against it (SQLX_OFFLINE=false, after touching
#      the sources of the crates that use sqlx so that cargo recompiles them), with
#      SQLX_OFFLINE_DIR set: sqlx writes one query-<hash>.json per query there;
#   3. replaces .sqlx/query-*.json with that output (or, with --check, compares them), and drops
#      the scratch database.
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
case "${1:-}" in
  --check) check=true ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

server=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
command -v psql >/dev/null || { echo "psql not found (apt-get install postgresql-client)" >&2; exit 1; }

# The scratch database's URL: the server's URL with its database name replaced.
db="polydev_sqlx_prepare_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
base=${server%%\?*}
params=${server#"$base"}
rest=${base#*://}
case "$rest" in
  */*) url="${base%/*}/$db$params" ;;
  *) url="$base/$db$params" ;;
esac

work=$(mktemp -d)
out="$work/needed" committed="$work/committed"
mkdir "$out" "$committed"
psql_() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
  psql_ "$server" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> scratch database $db"
psql_ "$server" -c "CREATE DATABASE $db"
for file in migrations/*.sql; do
  sql=$(cat "$file")
  if [[ $sql == "-- no-transaction"* ]]; then
    psql_ "$url" -c "$sql"
  else
    psql_ "$url" --single-transaction -c "$sql"
  fi
done
echo "    $(ls migrations/*.sql | wc -l) migrations applied"

echo "==> expanding the query macros against it"
for manifest in crates/*/Cargo.toml; do
  if grep -q '^sqlx' "$manifest"; then
    find "$(dirname "$manifest")" -name '*.rs' -not -path '*/target/*' -exec touch {} +
  fi
done
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$out" DATABASE_URL="$url" \
  cargo check --quiet --workspace --all-targets
echo "    $(find "$out" -name 'query-*.json' | wc -l) queries"

mkdir -p .sqlx
find .sqlx -maxdepth 1 -name 'query-*.json' -exec cp {} "$committed"/ \;
if $check; then
  if (cd "$work" && diff -r -u committed needed) >"$work/diff"; then
    echo "==> .sqlx/ is up to date"
  else
    head -200 "$work/diff" >&2
    # A query whose SQL changed has a new hash: name the SQL of files on one side only.
    only() {
      comm -23 <(ls "$work/$1") <(ls "$work/$2") | while read -r file; do
        echo "  only in $1: $(sed -n 's/^  "query": "//p' "$work/$1/$file" | sed 's/",$//' | cut -c1-100)"
      done
    }
    { only committed needed; only needed committed; } >&2
    echo "==> .sqlx/ is out of date: run scripts/sqlx-prepare.sh and commit .sqlx/" >&2
    exit 1
  fi
else
  find .sqlx -maxdepth 1 -name 'query-*.json' -delete
  cp "$out"/query-*.json .sqlx/ 2>/dev/null || true
  echo "==> .sqlx/ rewritten: $(git status --porcelain --untracked-files=all -- .sqlx | wc -l) file(s) changed"
fi
