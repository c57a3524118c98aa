//! The database: where it lives (an external server or the embedded cluster), the pool, and the
//! migrations.

pub mod embedded;
pub mod migrate;

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use embedded::{EmbeddedError, EmbeddedPostgres};
pub use migrate::{MigrateError, Plan};

/// The two pools a request may use: `durable` commits wait for the WAL flush; `relaxed`
/// commits do not (for writes whose loss in a crash is harmless, or that a later durable commit
/// on the same server makes durable anyway: WAL is flushed in order).
#[derive(Clone, Copy)]
pub struct Pools<'a> {
    pub durable: &'a PgPool,
    pub relaxed: &'a PgPool,
}

impl<'a> Pools<'a> {
    /// Both roles on one pool (tests, tools).
    pub fn single(pool: &'a PgPool) -> Self {
        Pools {
            durable: pool,
            relaxed: pool,
        }
    }
}

/// Where the database is.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// An existing PostgreSQL server; `None` means the embedded cluster in `data_dir`.
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub pg_bin_dir: Option<PathBuf>,
    pub max_connections: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    InvalidUrl(sqlx::Error),
    #[error("could not connect to PostgreSQL: {0}")]
    Connect(sqlx::Error),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// How long a request waits for a connection. When the database is down a request answers 503
/// after this long rather than hanging (the driver retries the connect until then).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a request's statement may run: a stuck query frees its connection.
pub const STATEMENT_TIMEOUT: &str = "30s";

/// The pools requests use: a short acquire timeout, so an unreachable database fails requests
/// fast (503) and the pool reconnects by itself once it is back.
pub fn request_pool(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
}

/// Session settings of request connections: every statement is bounded.
pub fn request_options(options: &PgConnectOptions) -> PgConnectOptions {
    options
        .clone()
        .options([("statement_timeout", STATEMENT_TIMEOUT)])
}

/// An open database: the pool, and the embedded cluster when there is one.
pub struct Database {
    pub pool: PgPool,
    /// For writes that may be lost in a crash (rate-limit windows, `last_used_at`): commits do
    /// not wait for the WAL flush, which keeps them off the request's critical path.
    pub relaxed_pool: PgPool,
    options: PgConnectOptions,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `database_url`, or starts (or attaches to) the embedded cluster.
    pub async fn open(config: &DbConfig) -> Result<Self, DbError> {
        let (options, embedded) = match &config.database_url {
            Some(url) => (url.parse().map_err(DbError::InvalidUrl)?, None),
            None => {
                let cluster =
                    EmbeddedPostgres::start(&config.data_dir, config.pg_bin_dir.as_deref()).await?;
                tracing::debug!(url = %cluster.url(), "embedded PostgreSQL");
                (cluster.connect_options(), Some(cluster))
            }
        };
        let options = options.application_name("polydev");
        // One connection first, so a wrong URL or a server that is down fails start-up with
        // its own error; the pools then connect as requests need them.
        PgConnection::connect_with(&options)
            .await
            .map_err(DbError::Connect)?
            .close()
            .await
            .map_err(DbError::Connect)?;
        let pool =
            request_pool(config.max_connections).connect_lazy_with(request_options(&options));
        let relaxed_pool = request_pool(config.max_connections.div_ceil(2))
            .connect_lazy_with(request_options(&options).options([("synchronous_commit", "off")]));
        Ok(Database {
            pool,
            relaxed_pool,
            options,
            embedded,
        })
    }

    /// Applies pending migrations (adopting a legacy database first if needed).
    pub async fn migrate(&self) -> Result<Plan, DbError> {
        let mut conn = self.migration_connection().await?;
        let plan = migrate::run(&mut conn).await?;
        conn.close().await.map_err(DbError::Connect)?;
        Ok(plan)
    }

    /// What [`Database::migrate`] would do.
    pub async fn plan(&self) -> Result<Plan, DbError> {
        let mut conn = self.migration_connection().await?;
        Ok(migrate::plan(&mut conn).await?)
    }

    /// A dedicated connection whose session defaults bound every migration statement: a
    /// migration waits at most 5 s for a lock (so it never queues behind a long transaction
    /// while blocking live traffic). Files set their own values too; `CREATE INDEX
    /// CONCURRENTLY` files cannot, and inherit these.
    async fn migration_connection(&self) -> Result<PgConnection, DbError> {
        let options = self
            .options
            .clone()
            .options([("lock_timeout", "5s"), ("statement_timeout", "30min")]);
        PgConnection::connect_with(&options)
            .await
            .map_err(DbError::Connect)
    }

    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Keeps the embedded cluster up while the server runs: checks it every `interval` and
    /// starts it again if it died (the pools reconnect by themselves). Never returns; does
    /// nothing for an external server.
    pub async fn supervise(&self, interval: Duration) {
        let Some(cluster) = &self.embedded else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(interval).await;
            if let Err(error) = cluster.restart_if_down().await {
                tracing::error!(%error, "cannot restart the embedded PostgreSQL");
            }
        }
    }

    /// Closes the pool and stops the embedded cluster unless another process still uses it.
    pub async fn close(self) -> Result<(), DbError> {
        self.pool.close().await;
        self.relaxed_pool.close().await;
        if let Some(cluster) = self.embedded {
            cluster.stop().await?;
        }
        Ok(())
    }
}
