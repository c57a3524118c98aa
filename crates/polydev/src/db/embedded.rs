//! The embedded default: a private PostgreSQL cluster inside polydev's data directory.
//!
//! The cluster is created with the machine's own PostgreSQL binaries (`initdb`, `pg_ctl`,
//! `postgres`) and listens on a Unix socket inside its own directory only (no TCP port, so it
//! never collides with another server). `initdb` and `postgres` refuse to run as root, so when
//! polydev runs as root the cluster runs as the unprivileged `postgres` system user.
//!
//! Several polydev processes may share one data directory (two `serve`s, CLI commands): an
//! exclusive file lock (`postgres.lock`) serialises starting and stopping, and every process
//! using the cluster holds a shared lock on `postgres.users` for as long as it does. Whoever
//! finishes last (its exclusive try-lock on `postgres.users` succeeds) stops the cluster, so one
//! process leaving never stops it under another. A process killed outright drops its locks
//! with it. [`EmbeddedPostgres::restart_if_down`] starts a cluster that died.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;

use sqlx::postgres::PgConnectOptions;
use tokio::process::Command;

/// The database polydev uses inside the embedded cluster.
pub const DATABASE_NAME: &str = "polydev";
const SUPERUSER: &str = "postgres";
/// Unix sockets have a 108-byte path limit; `.s.PGSQL.5432` takes 14 of them.
const MAX_SOCKET_DIR_LEN: usize = 107 - ".s.PGSQL.5432".len() - 1;
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH or in \
         /usr/lib/postgresql/*/bin.\n  Install them (Debian/Ubuntu: `apt-get install postgresql`; \
         Fedora: `dnf install postgresql-server`; macOS: `brew install postgresql@16`) or pass \
         --pg-bin-dir DIR,\n  or use an existing server instead: --database-url / DATABASE_URL \
         (for example postgres://user@127.0.0.1:5432/polydev)."
    )]
    BinariesNotFound,
    #[error(
        "polydev runs as root, and PostgreSQL refuses to: the embedded cluster runs as the \
         system user `postgres`, which does not exist here. Create it (`useradd --system postgres`) \
         or set DATABASE_URL"
    )]
    NoUnprivilegedUser,
    #[error(
        "the `postgres` system user cannot reach {0}: make every parent directory traversable \
         (chmod o+x) or choose another --data-dir"
    )]
    Unreachable(PathBuf),
    #[error(
        "the data directory path is too long for a Unix socket ({0}); choose a shorter --data-dir"
    )]
    PathTooLong(PathBuf),
    #[error("{what} failed ({status}):\n{detail}")]
    Command {
        what: String,
        status: String,
        detail: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let context = context.into();
    move |source| EmbeddedError::Io { context, source }
}

/// A running private cluster. Call [`EmbeddedPostgres::stop`] on shutdown.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    cluster_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    /// `postgres.users`, share-locked while this process uses the cluster.
    in_use: std::fs::File,
}

impl EmbeddedPostgres {
    /// Starts (creating on first use) the cluster in `data_dir/postgres`, or attaches to it when
    /// another polydev process already runs it, and makes sure the `polydev` database exists.
    pub async fn start(data_dir: &Path, bin_dir: Option<&Path>) -> Result<Self, EmbeddedError> {
        let bin_dir = find_binaries(bin_dir)?;
        let run_as = unprivileged_user()?;
        std::fs::create_dir_all(data_dir)
            .map_err(io_err(format!("creating {}", data_dir.display())))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", data_dir.display())))?;
        let cluster_dir = data_dir.join("postgres");
        if cluster_dir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(EmbeddedError::PathTooLong(cluster_dir));
        }
        if run_as.is_some() {
            make_reachable(&data_dir)?;
        }

        let lock = startup_lock(&data_dir).await?;
        let users_path = data_dir.join("postgres.users");
        let in_use = std::fs::File::create(&users_path)
            .map_err(io_err(format!("creating {}", users_path.display())))?;
        // Never blocks: the exclusive lock is only taken under the startup lock, which we hold.
        in_use
            .lock_shared()
            .map_err(io_err(format!("locking {}", users_path.display())))?;
        let cluster = EmbeddedPostgres {
            bin_dir,
            cluster_dir,
            run_as,
            in_use,
        };
        if !cluster.cluster_dir.join("PG_VERSION").exists() {
            cluster.init().await?;
        }
        if cluster.is_running().await? {
            tracing::info!(dir = %cluster.cluster_dir.display(), "attached to running embedded PostgreSQL");
        } else {
            cluster.start_server().await?;
            tracing::info!(dir = %cluster.cluster_dir.display(), "started embedded PostgreSQL");
        }
        cluster.ensure_database().await?;
        drop(lock);
        Ok(cluster)
    }

    /// Starts the cluster again if it is not running (its postmaster crashed or was killed).
    /// Returns true when it had to.
    pub async fn restart_if_down(&self) -> Result<bool, EmbeddedError> {
        if self.is_running().await? {
            return Ok(false);
        }
        let data_dir = self.data_dir();
        let lock = startup_lock(&data_dir).await?;
        // Another process may have restarted it while we waited for the lock.
        let restarted = !self.is_running().await?;
        if restarted {
            tracing::warn!(dir = %self.cluster_dir.display(), "embedded PostgreSQL is down: restarting it");
            self.start_server().await?;
        }
        drop(lock);
        Ok(restarted)
    }

    fn data_dir(&self) -> PathBuf {
        self.cluster_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf()
    }

    /// Connection options for the `polydev` database (Unix socket, trust auth inside a 0700
    /// socket directory: only the cluster's owner and root can connect).
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.cluster_dir)
            .username(SUPERUSER)
            .database(DATABASE_NAME)
    }

    /// The same as a URL, for tools such as `psql` (printed by `polydev serve` at debug level).
    pub fn url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{DATABASE_NAME}?host={}",
            self.cluster_dir.display()
        )
    }

    /// Stops the cluster if no other process uses it (fast shutdown: waits for the data to be
    /// flushed, disconnects clients); otherwise leaves it running for them.
    pub async fn stop(self) -> Result<(), EmbeddedError> {
        let data_dir = self.data_dir();
        let lock = startup_lock(&data_dir).await?;
        let users_path = data_dir.join("postgres.users");
        self.in_use
            .unlock()
            .map_err(io_err(format!("unlocking {}", users_path.display())))?;
        let users = std::fs::File::open(&users_path)
            .map_err(io_err(format!("opening {}", users_path.display())))?;
        let last = match users.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => false,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err(format!("locking {}", users_path.display()))(e));
            }
        };
        if last && self.is_running().await? {
            self.pg_ctl("stopping PostgreSQL", &["stop", "-w", "-m", "fast"])
                .await?;
            tracing::info!("stopped embedded PostgreSQL");
        } else if !last {
            tracing::info!("embedded PostgreSQL left running: another polydev process uses it");
        }
        drop(lock);
        Ok(())
    }

    /// Stops the cluster the way a crash would (immediate shutdown: clients are cut, nothing is
    /// checkpointed, the next start recovers from the WAL), whoever else uses it. For failure
    /// tests on a cluster of their own.
    pub async fn crash(self) -> Result<(), EmbeddedError> {
        self.pg_ctl("stopping PostgreSQL", &["stop", "-w", "-m", "immediate"])
            .await
    }

    async fn init(&self) -> Result<(), EmbeddedError> {
        // initdb into a scratch directory and rename: a crash mid-initdb leaves no half cluster.
        let scratch = self.cluster_dir.with_file_name("postgres.initdb");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .map_err(io_err(format!("removing {}", scratch.display())))?;
        }
        tracing::info!(dir = %self.cluster_dir.display(), "creating embedded PostgreSQL cluster (first start)");
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&scratch)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale"])
            .arg("--no-instructions");
        if let Some((uid, gid)) = self.run_as {
            // initdb runs as `postgres`, so it must own the place it writes to.
            std::fs::create_dir(&scratch)
                .map_err(io_err(format!("creating {}", scratch.display())))?;
            std::os::unix::fs::chown(&scratch, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", scratch.display())))?;
        }
        run("initdb", cmd).await?;
        std::fs::rename(&scratch, &self.cluster_dir)
            .map_err(io_err(format!("renaming {}", scratch.display())))
    }

    async fn is_running(&self) -> Result<bool, EmbeddedError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("status").arg("-D").arg(&self.cluster_dir);
        let out = cmd
            .output()
            .await
            .map_err(io_err("running pg_ctl status"))?;
        // 0: running; 3: not running; 4: no accessible data directory.
        Ok(out.status.success())
    }

    async fn start_server(&self) -> Result<(), EmbeddedError> {
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c unix_socket_permissions=0700",
            self.cluster_dir.display()
        );
        let log = self.cluster_dir.join("server.log");
        let log_arg = log.to_string_lossy().into_owned();
        let result = self
            .pg_ctl(
                "starting PostgreSQL",
                &["start", "-w", "-t", "120", "-l", &log_arg, "-o", &options],
            )
            .await;
        if let Err(EmbeddedError::Command { what, status, .. }) = result {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let detail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(EmbeddedError::Command {
                what,
                status,
                detail: format!("last lines of {}:\n{detail}", log.display()),
            });
        }
        result
    }

    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        use sqlx::Connection;
        let sql_err = |e: sqlx::Error| EmbeddedError::Command {
            what: "creating the polydev database".into(),
            status: "error".into(),
            detail: e.to_string(),
        };
        let mut conn =
            sqlx::PgConnection::connect_with(&self.connect_options().database("postgres"))
                .await
                .map_err(sql_err)?;
        let exists = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS "exists!""#,
            DATABASE_NAME
        )
        .fetch_one(&mut conn)
        .await
        .map_err(sql_err)?;
        if !exists {
            // raw_sql, not the query macros: DDL with no result columns (a const name).
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {DATABASE_NAME}"
            )))
            .execute(&mut conn)
            .await
            .map_err(sql_err)?;
        }
        conn.close().await.map_err(sql_err)
    }

    async fn pg_ctl(&self, what: &str, args: &[&str]) -> Result<(), EmbeddedError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.cluster_dir).args(args);
        // Its own process group: a Ctrl-C in the terminal must reach polydev (which drains
        // requests, then stops the cluster), not PostgreSQL directly.
        cmd.process_group(0);
        run(what, cmd).await
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(self.cluster_dir.parent().unwrap_or(Path::new("/")));
        cmd.stdin(std::process::Stdio::null());
        cmd.kill_on_drop(false);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

/// The exclusive lock that serialises starting and stopping the cluster (released on drop).
async fn startup_lock(data_dir: &Path) -> Result<std::fs::File, EmbeddedError> {
    let path = data_dir.join("postgres.lock");
    let lock =
        std::fs::File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
    tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .expect("lock task panicked")
        .map_err(io_err(format!("locking {}", path.display())))
}

async fn run(what: &str, mut cmd: Command) -> Result<(), EmbeddedError> {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .await
        .map_err(io_err(format!("running {what}")))?;
    if status.success() {
        return Ok(());
    }
    Err(EmbeddedError::Command {
        what: what.to_string(),
        status: status.to_string(),
        detail: format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    })
}

/// `--pg-bin-dir`, else the directory of `pg_ctl` on PATH, else the newest
/// `/usr/lib/postgresql/N/bin` (Debian keeps the server binaries off PATH).
fn find_binaries(explicit: Option<&Path>) -> Result<PathBuf, EmbeddedError> {
    let has_all = |dir: &Path| SERVER_PROGRAMS.iter().all(|p| dir.join(p).is_file());
    if let Some(dir) = explicit {
        return if has_all(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(EmbeddedError::BinariesNotFound)
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    debian.sort();
    on_path
        .into_iter()
        .chain(debian.into_iter().rev().map(|(_, dir)| dir))
        .find(|dir| has_all(dir))
        .ok_or(EmbeddedError::BinariesNotFound)
}

/// The (uid, gid) the cluster runs as when polydev is root; `None` when not root.
fn unprivileged_user() -> Result<Option<(u32, u32)>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name(SUPERUSER) {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(EmbeddedError::NoUnprivilegedUser),
    }
}

/// When root runs the cluster as `postgres`, that user must be able to traverse down to the
/// cluster directory. The data directory itself gets o+x (not o+r: nobody can list it).
fn make_reachable(data_dir: &Path) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(data_dir).map_err(io_err(format!("reading {}", data_dir.display())))?;
    let mut perms = meta.permissions();
    if perms.mode() & 0o001 == 0 {
        perms.set_mode(perms.mode() | 0o001);
        std::fs::set_permissions(data_dir, perms)
            .map_err(io_err(format!("chmod {}", data_dir.display())))?;
    }
    for ancestor in data_dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)
            .map_err(io_err(format!("reading {}", ancestor.display())))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(EmbeddedError::Unreachable(data_dir.to_path_buf()));
        }
    }
    Ok(())
}
