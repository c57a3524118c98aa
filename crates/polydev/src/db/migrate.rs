//! Schema migrations (`migrations/`), including adoption of the existing production database.
//!
//! Migration 1 is the production baseline. A database that already has the legacy tables but no
//! migration history is *adopted*: its live columns are compared with the ones the baseline would
//! create, and only when they match is the baseline recorded as applied (never run). Every run
//! holds an advisory lock, so several processes starting together migrate once.

use std::collections::BTreeMap;
use std::fmt;

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection};

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// The migration that creates the legacy production schema.
pub const BASELINE_VERSION: i64 = 1;
const HISTORY_TABLE: &str = "_sqlx_migrations";
/// Serialises adopt-then-migrate across processes (sqlx's own lock covers only its part).
const LOCK_KEY: i64 = 0x0070_6f6c_7964_6576; // "polydev" in ASCII

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the existing database does not match the production schema this version expects:\n{0}\nnothing was changed"
    )]
    SchemaMismatch(SchemaReport),
    #[error(transparent)]
    Sqlx(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The state of a database with respect to the shipped migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No legacy tables: every migration runs (the baseline creates the schema).
    Fresh { pending: Vec<(i64, String)> },
    /// Legacy tables without history: the baseline is checked and recorded, the rest runs.
    Adopt {
        report: SchemaReport,
        pending: Vec<(i64, String)>,
    },
    /// Migration history exists.
    Managed { pending: Vec<(i64, String)> },
}

impl Plan {
    pub fn pending(&self) -> &[(i64, String)] {
        match self {
            Plan::Fresh { pending } | Plan::Adopt { pending, .. } | Plan::Managed { pending } => {
                pending
            }
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Plan::Adopt { report, .. } = self {
            writeln!(
                f,
                "existing production database without migration history: adopting it"
            )?;
            if report.is_match() {
                writeln!(
                    f,
                    "  schema check: OK; baseline {BASELINE_VERSION} would be recorded as applied, not run"
                )?;
            } else {
                writeln!(
                    f,
                    "  schema check FAILED, migrate would stop here:\n{report}"
                )?;
            }
            for extra in &report.extra {
                writeln!(f, "  note: {extra}")?;
            }
        }
        let pending = self.pending();
        if pending.is_empty() {
            return writeln!(f, "database is up to date");
        }
        writeln!(f, "{} migration(s) would run:", pending.len())?;
        for (version, description) in pending {
            writeln!(f, "  {version:04} {description}")?;
        }
        Ok(())
    }
}

/// Differences between the live legacy tables and the baseline's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaReport {
    /// Each: table, column, expected type, found type (`missing` when absent).
    pub mismatches: Vec<ColumnMismatch>,
    /// Tolerated differences (columns production has that the baseline does not), for the log.
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMismatch {
    pub table: String,
    pub column: String,
    pub expected: String,
    pub found: String,
}

impl SchemaReport {
    pub fn is_match(&self) -> bool {
        self.mismatches.is_empty()
    }
}

impl fmt::Display for SchemaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:<26} {:<28} {:<28} found",
            "table", "column", "expected"
        )?;
        for m in &self.mismatches {
            writeln!(
                f,
                "  {:<26} {:<28} {:<28} {}",
                m.table, m.column, m.expected, m.found
            )?;
        }
        Ok(())
    }
}

/// Works out what [`run`] would do, changing nothing.
pub async fn plan(conn: &mut PgConnection) -> Result<Plan, MigrateError> {
    let applied = applied_versions(conn).await?;
    let pending_after = |skip_baseline: bool| -> Vec<(i64, String)> {
        MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .filter(|m| !(skip_baseline && m.version == BASELINE_VERSION))
            .map(|m| (m.version, m.description.to_string()))
            .collect()
    };
    if applied.contains(&BASELINE_VERSION) {
        return Ok(Plan::Managed {
            pending: pending_after(false),
        });
    }
    if !table_exists(conn, "users").await? {
        return Ok(Plan::Fresh {
            pending: pending_after(false),
        });
    }
    let report = compare_with_baseline(conn).await?;
    Ok(Plan::Adopt {
        report,
        pending: pending_after(true),
    })
}

/// Brings the database up to date: adopts a legacy database if needed, then applies pending
/// migrations. Safe to call from several processes at once.
pub async fn run(conn: &mut PgConnection) -> Result<Plan, MigrateError> {
    // Poll rather than block: a session blocked in pg_advisory_lock holds a transaction, and
    // the holder's CREATE INDEX CONCURRENTLY waits for every open transaction: a deadlock.
    let mut logged = false;
    while !sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "locked!""#, LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?
    {
        if !std::mem::replace(&mut logged, true) {
            tracing::info!("another process is migrating this database; waiting for it");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let result = run_locked(conn).await;
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?;
    result
}

async fn run_locked(conn: &mut PgConnection) -> Result<Plan, MigrateError> {
    let plan = plan(conn).await?;
    if let Plan::Adopt { report, .. } = &plan {
        if !report.is_match() {
            return Err(MigrateError::SchemaMismatch(report.clone()));
        }
        for extra in &report.extra {
            tracing::info!("adopting production schema: {extra}");
        }
        // `run_direct(.., skip = true)` is `Migrator::skip` without the `Acquire` bound that makes
        // the future non-`Send`-general (sqlx documents run_direct as that workaround).
        MIGRATOR
            .run_direct(Some(BASELINE_VERSION), &mut *conn, true)
            .await?;
        tracing::info!(
            version = BASELINE_VERSION,
            "existing schema matches the baseline: recorded as applied"
        );
    }
    // Before the pending ones run: a pending `CREATE INDEX CONCURRENTLY IF NOT EXISTS` would
    // skip its INVALID leftover and be recorded as applied.
    rebuild_invalid_indexes(conn).await?;
    for (version, description) in plan.pending() {
        tracing::info!(version, %description, "applying migration");
    }
    MIGRATOR.run_direct(None, &mut *conn, false).await?;
    Ok(plan)
}

/// True when every shipped migration has been applied successfully and none of the indexes
/// they build is INVALID (for `/readyz`).
pub async fn is_current(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let applied = applied_versions(conn).await?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version))
        && invalid_indexes(conn).await?.is_empty())
}

/// The indexes the migrations build concurrently, with the file that builds each: `(name,
/// version)`. Such a file holds that one statement (see operations.md).
pub fn concurrent_indexes() -> Vec<(String, i64)> {
    MIGRATOR
        .iter()
        .filter(|m| m.no_tx)
        .filter_map(|m| index_name(m.sql.as_str()).map(|name| (name, m.version)))
        .collect()
}

/// The name in `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON ...`, comments aside.
fn index_name(sql: &str) -> Option<String> {
    let code: String = sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = code.split_whitespace().collect();
    let at = words.windows(2).position(|w| {
        w[0].eq_ignore_ascii_case("INDEX") && w[1].eq_ignore_ascii_case("CONCURRENTLY")
    })?;
    let mut rest = words[at + 2..].iter();
    let mut name = rest.next()?;
    if name.eq_ignore_ascii_case("IF") {
        rest.next(); // NOT
        rest.next(); // EXISTS
        name = rest.next()?;
    }
    Some(name.trim_matches('"').to_string())
}

/// Those of [`concurrent_indexes`] that exist and are INVALID: a `CREATE INDEX CONCURRENTLY`
/// that failed part way (a lock or statement timeout, a duplicate for a unique index, a crash).
pub async fn invalid_indexes(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    let names: Vec<String> = concurrent_indexes()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    sqlx::query_scalar!(
        r#"SELECT c.relname::text AS "name!"
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema()
              AND c.relname = ANY($1) AND NOT i.indisvalid
            ORDER BY 1"#,
        &names
    )
    .fetch_all(conn)
    .await
}

/// Drops each INVALID index of the migrations and builds it again concurrently, with the SQL of
/// the migration that creates it. `IF NOT EXISTS` would otherwise skip it for ever.
async fn rebuild_invalid_indexes(conn: &mut PgConnection) -> Result<(), MigrateError> {
    let invalid = invalid_indexes(conn).await?;
    for (name, version) in concurrent_indexes() {
        if !invalid.contains(&name) {
            continue;
        }
        let migration = MIGRATOR
            .iter()
            .find(|m| m.version == version)
            .expect("the index comes from a shipped migration");
        tracing::warn!(index = %name, version, "index is INVALID (a concurrent build failed): rebuilding it");
        // Dynamic: the index name comes from the shipped migration files, not from input.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS \"{name}\""
        )))
        .execute(&mut *conn)
        .await?;
        sqlx::raw_sql(migration.sql.clone())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i64>, sqlx::Error> {
    if !table_exists(conn, HISTORY_TABLE).await? {
        return Ok(Vec::new());
    }
    // Dynamic: sqlx's own history table is created by the migrator at run time, not by
    // migrations/, so it is not in the schema the query macros are checked against.
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {HISTORY_TABLE} WHERE success ORDER BY version"
    )))
    .fetch_all(conn)
    .await
}

async fn table_exists(conn: &mut PgConnection, table: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT to_regclass($1) IS NOT NULL AS "exists!""#, table)
        .fetch_one(conn)
        .await
}

/// Runs the baseline inside a scratch schema in a transaction that is rolled back, and compares
/// the columns it creates with the live ones. The baseline file is the single source of truth.
async fn compare_with_baseline(conn: &mut PgConnection) -> Result<SchemaReport, sqlx::Error> {
    let baseline = MIGRATOR
        .iter()
        .find(|m| m.version == BASELINE_VERSION)
        .expect("the baseline migration is shipped");
    let mut tx = conn.begin().await?;
    let live_schema = sqlx::query_scalar!(r#"SELECT current_schema() AS "schema!""#)
        .fetch_one(&mut *tx)
        .await?;
    // raw_sql, not the query macros: several statements (DDL) in one string, no result columns.
    sqlx::raw_sql(
        "CREATE SCHEMA polydev_baseline_check; SET LOCAL search_path = polydev_baseline_check",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::raw_sql(baseline.sql.clone())
        .execute(&mut *tx)
        .await?;
    let expected = columns(&mut tx, "polydev_baseline_check").await?;
    let live = columns(&mut tx, &live_schema).await?;
    tx.rollback().await?;

    let mut report = SchemaReport::default();
    for ((table, column), expected_type) in &expected {
        let found = live.get(&(table.clone(), column.clone()));
        if found != Some(expected_type) {
            let table_exists = live.keys().any(|(t, _)| t == table);
            report.mismatches.push(ColumnMismatch {
                table: table.clone(),
                column: column.clone(),
                expected: expected_type.clone(),
                found: match found {
                    Some(found) => found.clone(),
                    None if table_exists => "missing".into(),
                    None => "missing (no such table)".into(),
                },
            });
        }
    }
    let baseline_tables: Vec<&String> = expected.keys().map(|(t, _)| t).collect();
    for ((table, column), found) in &live {
        if baseline_tables.contains(&table)
            && !expected.contains_key(&(table.clone(), column.clone()))
        {
            report.extra.push(format!(
                "{table}.{column} ({found}) is not in the baseline; kept as is"
            ));
        }
    }
    Ok(report)
}

type Columns = BTreeMap<(String, String), String>;

async fn columns(conn: &mut PgConnection, schema: &str) -> Result<Columns, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT c.relname::text AS "table!", a.attname::text AS "column!",
                  format_type(a.atttypid, a.atttypmod) AS "type!"
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped"#,
        schema
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| ((row.table, row.column), row.r#type))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_concurrent_index_of_the_migrations_is_found() {
        assert_eq!(
            index_name(
                "-- no-transaction\n-- a comment\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON t (c);"
            ),
            Some("a_idx".into())
        );
        assert_eq!(
            index_name("CREATE INDEX CONCURRENTLY b_idx ON t (c)"),
            Some("b_idx".into())
        );
        let names: Vec<String> = concurrent_indexes().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"user_perspective_quotas_user_id_idx".to_string()),
            "{names:?}"
        );
        let no_tx = MIGRATOR.iter().filter(|m| m.no_tx).count();
        assert_eq!(
            names.len(),
            no_tx,
            "every no-transaction file builds one index"
        );
    }
}
