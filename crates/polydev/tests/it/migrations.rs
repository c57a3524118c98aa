//! Migrations: fresh databases, adoption of the legacy production database, concurrency.

use std::collections::BTreeMap;

use sqlx::{Executor, PgConnection};

use crate::common::TestDb;
use polydev::db::migrate::{self, BASELINE_VERSION, MIGRATOR, MigrateError, Plan};

const LEGACY: &str = include_str!("../fixtures/legacy_production.sql");
const LEGACY_TABLES: [&str; 16] = [
    "users",
    "profiles",
    "mcp_user_tokens",
    "perspective_usage",
    "user_perspective_quotas",
    "user_proxy_ports",
    "chat_sessions",
    "chat_messages",
    "sessions",
    "messages",
    "vms",
    "auth_sessions",
    "vm_cleanup_tasks",
    "provider_credentials",
    "cli_credentials",
    "mcp_registered_clients",
];

async fn legacy_db() -> TestDb {
    let db = TestDb::empty().await;
    sqlx::raw_sql(LEGACY)
        .execute(&db.pool)
        .await
        .expect("load legacy fixture");
    db
}

async fn history(conn: &mut PgConnection) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(conn)
        .await
        .unwrap()
}

/// Per table: its legacy columns and an md5 over every row of them, in a stable order.
async fn checksums(
    conn: &mut PgConnection,
    columns: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, (i64, String)> {
    let mut sums = BTreeMap::new();
    for (table, cols) in columns {
        let row = format!("ROW({})::text", cols.join(", "));
        let (count, sum): (i64, Option<String>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), md5(string_agg({row}, '|' ORDER BY {row})) FROM {table}"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        sums.insert(table.clone(), (count, sum.unwrap_or_default()));
    }
    sums
}

async fn legacy_columns(conn: &mut PgConnection) -> BTreeMap<String, Vec<String>> {
    let columns = legacy_columns_present(conn).await;
    assert_eq!(
        columns.len(),
        LEGACY_TABLES.len(),
        "every legacy table exists"
    );
    columns
}

#[tokio::test]
async fn a_fresh_database_gets_every_migration() {
    let db = TestDb::empty().await;
    let mut conn = db.connect().await;
    let plan = migrate::plan(&mut conn).await.unwrap();
    assert!(matches!(plan, Plan::Fresh { .. }), "{plan:?}");
    assert_eq!(plan.pending().len(), MIGRATOR.iter().count());

    migrate::run(&mut conn).await.unwrap();
    let applied = history(&mut conn).await;
    assert_eq!(
        applied,
        MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    assert!(migrate::is_current(&mut conn).await.unwrap());
    // Running again is a no-op.
    let again = migrate::run(&mut conn).await.unwrap();
    assert!(again.pending().is_empty());
    assert_eq!(history(&mut conn).await, applied);
}

#[tokio::test]
async fn the_baseline_creates_exactly_the_tables_of_the_seed() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    for table in LEGACY_TABLES
        .iter()
        .chain(&["runtime_containers", "job_executions", "plan_tiers"])
    {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert!(exists, "{table}");
    }
    // The seed's dependency map: users.user_id is the root.
    let fks: Vec<(String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint
          WHERE contype = 'f' ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (child, parent) in [
        ("profiles", "users"),
        ("mcp_user_tokens", "users"),
        ("perspective_usage", "users"),
        ("user_perspective_quotas", "users"),
        ("user_proxy_ports", "users"),
        ("chat_sessions", "users"),
        ("chat_messages", "chat_sessions"),
        ("sessions", "users"),
        ("messages", "sessions"),
        ("vms", "users"),
        ("auth_sessions", "users"),
        ("vm_cleanup_tasks", "vms"),
        ("provider_credentials", "users"),
        ("cli_credentials", "users"),
        ("runtime_containers", "users"),
        ("job_executions", "users"),
        ("job_executions", "runtime_containers"),
    ] {
        assert!(
            fks.contains(&(child.into(), parent.into())),
            "{child} -> {parent} in {fks:?}"
        );
    }
}

#[tokio::test]
async fn adopting_production_changes_no_legacy_row_and_keeps_old_code_working() {
    let db = legacy_db().await;
    let mut conn = db.connect().await;
    let columns = legacy_columns(&mut conn).await;
    let before = checksums(&mut conn, &columns).await;
    assert!(
        before.values().all(|(count, _)| *count > 0),
        "every legacy table has rows: {before:?}"
    );

    let plan = migrate::plan(&mut conn).await.unwrap();
    let Plan::Adopt { report, pending } = &plan else {
        panic!("{plan:?}")
    };
    assert!(report.is_match(), "{report}");
    assert_eq!(
        report.extra.len(),
        1,
        "the production-only column is noted: {:?}",
        report.extra
    );
    assert!(report.extra[0].contains("users.referral_code"));
    assert!(!pending.iter().any(|(v, _)| *v == BASELINE_VERSION));

    migrate::run(&mut conn).await.unwrap();
    assert_eq!(
        history(&mut conn).await,
        MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    let after = checksums(&mut conn, &columns).await;
    assert_eq!(before, after, "no legacy row or value changed");

    // New columns read their defaults on old rows.
    let unmigrated: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_messages WHERE migrated_to_zk = false AND encrypted_content_v2 IS NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(unmigrated, 3);

    // Old-style writes (legacy columns only) and reads still work.
    conn.execute(
        "INSERT INTO users (user_id, email, tier, status) VALUES ('12121212-1212-4212-8212-121212121212', 'old@example.com', 'free', 'active');
         INSERT INTO chat_sessions (id, user_id, title) VALUES ('13131313-1313-4313-8313-131313131313', '12121212-1212-4212-8212-121212121212', 'old code');
         INSERT INTO chat_messages (session_id, role, content) VALUES ('13131313-1313-4313-8313-131313131313', 'user', 'still plaintext');
         UPDATE user_perspective_quotas SET premium_perspectives_used = premium_perspectives_used + 1 WHERE user_id = '11111111-1111-4111-8111-111111111111';
         INSERT INTO perspective_usage (user_id, model_name, model_tier, provider, input_tokens, output_tokens, total_tokens, estimated_cost, perspectives_deducted)
              VALUES ('11111111-1111-4111-8111-111111111111', 'gpt-4o', 'premium', 'openai', 1, 2, 3, 0.01, 1);
         UPDATE auth_sessions SET vnc_url = 'https://vnc.example.com/s/2' WHERE session_id = 'bbbbbbbb-0000-4000-8000-000000000001';",
    )
    .await
    .expect("legacy writes");
    let content: String = sqlx::query_scalar("SELECT m.content FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id WHERE s.title = 'old code'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(content, "still plaintext");
    let used: i32 = sqlx::query_scalar("SELECT premium_perspectives_used FROM user_perspective_quotas WHERE user_id = '11111111-1111-4111-8111-111111111111'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(used, 13);

    // The legacy token still authenticates.
    let caller =
        polydev::accounts::authenticate(&db.pool, Some(&format!("Bearer pd_{}", "ab".repeat(32))))
            .await
            .expect("legacy token");
    assert_eq!(
        caller.user_id.to_string(),
        "11111111-1111-4111-8111-111111111111"
    );
}

#[tokio::test]
async fn a_mismatched_production_schema_is_reported_and_nothing_changes() {
    let db = legacy_db().await;
    let mut conn = db.connect().await;
    conn.execute(
        "ALTER TABLE perspective_usage ALTER COLUMN estimated_cost TYPE double precision;
         ALTER TABLE messages DROP COLUMN cost_usd;
         DROP TABLE mcp_registered_clients;",
    )
    .await
    .unwrap();
    let columns = legacy_columns_present(&mut conn).await;
    let before = checksums(&mut conn, &columns).await;

    let err = migrate::run(&mut conn)
        .await
        .expect_err("must stop on a mismatch");
    let MigrateError::SchemaMismatch(report) = &err else {
        panic!("{err:?}")
    };
    let found = |table: &str, column: &str| {
        report
            .mismatches
            .iter()
            .find(|m| m.table == table && m.column == column)
            .cloned()
    };
    let cost = found("perspective_usage", "estimated_cost").expect("type mismatch reported");
    assert_eq!(
        (cost.expected.as_str(), cost.found.as_str()),
        ("numeric", "double precision")
    );
    assert_eq!(found("messages", "cost_usd").unwrap().found, "missing");
    assert_eq!(
        found("mcp_registered_clients", "client_id").unwrap().found,
        "missing (no such table)"
    );
    let message = err.to_string();
    assert!(
        message.contains("perspective_usage")
            && message.contains("double precision")
            && message.contains("nothing was changed"),
        "{message}"
    );

    let history_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(!history_exists, "no migration history was written");
    let v2_column: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'chat_messages' AND column_name = 'migrated_to_zk')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!v2_column, "no V2 migration ran");
    assert_eq!(checksums(&mut conn, &columns).await, before);
}

async fn legacy_columns_present(conn: &mut PgConnection) -> BTreeMap<String, Vec<String>> {
    let mut columns = BTreeMap::new();
    for table in LEGACY_TABLES {
        let cols: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns
              WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        if !cols.is_empty() {
            columns.insert(table.to_string(), cols);
        }
    }
    columns
}

#[tokio::test]
async fn dry_run_describes_the_adoption_and_changes_nothing() {
    let db = legacy_db().await;
    let mut conn = db.connect().await;
    let text = migrate::plan(&mut conn).await.unwrap().to_string();
    assert!(text.contains("adopting"), "{text}");
    assert!(text.contains("recorded as applied"), "{text}");
    assert!(text.contains("0002 zk chat messages"), "{text}");
    let history_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(!history_exists);
}

#[tokio::test]
async fn processes_migrating_at_once_apply_each_migration_once() {
    for db in [TestDb::empty().await, legacy_db().await] {
        let runs = (0..6).map(|_| {
            let options = db.options.clone();
            tokio::spawn(async move {
                use sqlx::Connection;
                let mut conn = PgConnection::connect_with(&options).await.unwrap();
                migrate::run(&mut conn).await.map(|_| ())
            })
        });
        for run in futures_join(runs).await {
            run.expect("migration succeeded");
        }
        let mut conn = db.connect().await;
        assert_eq!(
            history(&mut conn).await,
            MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>()
        );
    }
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn an_invalid_index_keeps_readyz_down_until_migrate_rebuilds_it() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    // What a CREATE INDEX CONCURRENTLY that failed part way leaves behind (the test runs as a
    // superuser, which may mark it so directly).
    conn.execute(
        "UPDATE pg_index SET indisvalid = false
          WHERE indexrelid = 'user_perspective_quotas_user_id_idx'::regclass",
    )
    .await
    .unwrap();
    assert_eq!(
        migrate::invalid_indexes(&mut conn).await.unwrap(),
        ["user_perspective_quotas_user_id_idx"]
    );
    assert!(
        !migrate::is_current(&mut conn).await.unwrap(),
        "not ready while an index is invalid"
    );
    migrate::run(&mut conn).await.unwrap();
    let valid: bool = sqlx::query_scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'user_perspective_quotas_user_id_idx'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(valid, "rebuilt");
    assert!(migrate::is_current(&mut conn).await.unwrap());

    // A real failed build: a unique index over duplicate data fails and stays INVALID; `IF NOT
    // EXISTS` would skip it, so migrate drops it and builds it again once the data allows.
    conn.execute("CREATE TABLE dup (v int)").await.unwrap();
    conn.execute("INSERT INTO dup VALUES (1), (1)")
        .await
        .unwrap();
    let failed = conn
        .execute("CREATE UNIQUE INDEX CONCURRENTLY dup_idx ON dup (v)")
        .await;
    assert!(failed.is_err());
    let invalid: bool = sqlx::query_scalar(
        "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'dup_idx'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(invalid, "a failed concurrent build leaves an INVALID index");
}
