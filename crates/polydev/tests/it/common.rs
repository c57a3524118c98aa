//! The test harness: real PostgreSQL for every test, each in a database of its own.
//!
//! The server is `DATABASE_URL` when set, else a private cluster that the harness starts itself
//! (the same embedded cluster `polydev serve` uses) in the system temp directory; it is left
//! running for the next test process. A template database is migrated once per set of
//! migrations, and every test gets a fresh copy of it, so tests run in parallel without sharing
//! state.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::OnceCell;

use polydev::db::embedded::EmbeddedPostgres;
use polydev::db::migrate::{self, MIGRATOR};

/// A database for one test, dropped when the test ends.
pub struct TestDb {
    pub pool: PgPool,
    pub options: PgConnectOptions,
    name: String,
}

impl TestDb {
    /// A database with every migration applied.
    pub async fn migrated() -> TestDb {
        let template = template().await;
        Self::create(&format!("TEMPLATE {template}")).await
    }

    /// An empty database (no tables), for migration tests.
    pub async fn empty() -> TestDb {
        Self::create("").await
    }

    async fn create(clause: &str) -> TestDb {
        let name = format!("polydev_test_{}", random_hex(6));
        let mut admin = admin_connection().await;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {name} {clause}"
            )))
            .await
            .expect("create test database");
        admin.close().await.ok();
        let options = server().await.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options.clone())
            .await
            .expect("connect to test database");
        TestDb {
            pool,
            options,
            name,
        }
    }

    /// A single connection of its own (outside the pool).
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect_with(&self.options)
            .await
            .expect("connect")
    }

    /// A URL for the `polydev` binary (`--database-url`).
    pub fn url(&self) -> String {
        let host = self.options.get_host();
        let socket = self.options.get_socket();
        let user = self.options.get_username();
        match socket {
            Some(dir) => format!(
                "postgres://{user}@localhost/{}?host={}",
                self.name,
                dir.display()
            ),
            None => format!(
                "postgres://{user}@{host}:{}/{}",
                self.options.get_port(),
                self.name
            ),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any async context we could borrow; use a short-lived runtime.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move {
                    let mut admin = admin_connection().await;
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                });
        })
        .join()
        .ok();
    }
}

/// Connection options of the server the tests use (database: the admin one).
pub async fn server() -> &'static PgConnectOptions {
    static SERVER: OnceCell<PgConnectOptions> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
                return url.parse().expect("DATABASE_URL is not a valid URL");
            }
            let cluster = EmbeddedPostgres::start(&test_cluster_dir(), None)
                .await
                .expect("start the test PostgreSQL cluster");
            // Left running on purpose: the next test process attaches to it.
            let options = cluster.connect_options().database("postgres");
            std::mem::forget(cluster);
            options
        })
        .await
}

fn test_cluster_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    std::env::temp_dir().join(format!("polydev-test-pg-{uid}"))
}

async fn admin_connection() -> PgConnection {
    PgConnection::connect_with(server().await)
        .await
        .expect("connect to the test PostgreSQL server")
}

/// The template database for the current migrations, created once (under an advisory lock, as
/// test processes run in parallel). Its name changes whenever a migration does.
async fn template() -> String {
    let mut hasher = Sha256::new();
    for m in MIGRATOR.iter() {
        hasher.update(m.version.to_le_bytes());
        hasher.update(&m.checksum);
    }
    let name = format!("polydev_tpl_{}", &hex::encode(hasher.finalize())[..16]);
    let mut admin = admin_connection().await;
    admin
        .execute("SELECT pg_advisory_lock(727272)")
        .await
        .expect("lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .expect("query");
    if !exists {
        // Build under another name and rename, so a crash never leaves a half-built template.
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin
                .execute(sqlx::AssertSqlSafe(sql))
                .await
                .expect("template");
        }
        let mut conn = PgConnection::connect_with(&server().await.clone().database(&building))
            .await
            .expect("connect");
        migrate::run(&mut conn).await.expect("migrate the template");
        conn.close().await.ok();
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {building} RENAME TO {name}"
            )))
            .await
            .expect("rename template");
    }
    admin.close().await.ok();
    name
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("random");
    hex::encode(buf)
}

/// A catalogue whose providers all point at a mock upstream. Model behaviour comes from the
/// mock's directives in `upstream` (see polydev-mock).
pub fn mock_catalogue(base: &str) -> String {
    let model = |id: &str, provider: &str, tier: &str, upstream: &str| {
        format!(
            "[[models]]\nid = \"{id}\"\nprovider = \"{provider}\"\ntier = \"{tier}\"\ninput_price = \"2.50\"\noutput_price = \"10\"\ncontext_window = 128000\nupstream = \"{upstream}\"\n\n"
        )
    };
    let mut toml = format!(
        "[providers.openai]\nkind = \"openai\"\nbase_url = \"{base}/v1\"\napi_key_env = \"POLYDEV_TEST_MOCK_KEY\"\n\n\
         [providers.anthropic]\nkind = \"anthropic\"\nbase_url = \"{base}\"\napi_key_env = \"POLYDEV_TEST_MOCK_KEY\"\n\n\
         [providers.google]\nkind = \"gemini\"\nbase_url = \"{base}\"\napi_key_env = \"POLYDEV_TEST_MOCK_KEY\"\n\n\
         [providers.compat]\nkind = \"openai-compatible\"\nbase_url = \"{base}/v1\"\nstreaming = false\napi_key_env = \"POLYDEV_TEST_MOCK_KEY\"\n\n"
    );
    for (id, provider, tier, upstream) in [
        ("gpt-premium", "openai", "premium", "gpt-premium"),
        ("claude-normal", "anthropic", "normal", "claude-normal"),
        ("gemini-eco", "google", "eco", "gemini-eco"),
        ("compat-eco", "compat", "eco", "compat-eco"),
        ("slow-premium", "openai", "premium", "slow~delay5000"),
        ("fast-premium", "anthropic", "premium", "fast~delay50"),
        ("broken-premium", "openai", "premium", "broken~status500"),
        ("bad-request-normal", "google", "normal", "bad~status400"),
    ] {
        toml.push_str(&model(id, provider, tier, upstream));
    }
    toml
}

/// A gateway over the mock upstream (keys given directly, as the environment would).
pub fn mock_gateway(base: &str) -> polydev::perspectives::Gateway {
    use std::collections::HashMap;
    use std::sync::Arc;

    use polydev::perspectives::provider::{HttpProvider, Provider, RetryPolicy};
    let catalogue =
        polydev::perspectives::Catalogue::parse(&mock_catalogue(base)).expect("mock catalogue");
    let client = polydev::net::http_client();
    let fast_retry = RetryPolicy {
        max_attempts: 3,
        base_delay: std::time::Duration::from_millis(10),
        max_wait: std::time::Duration::from_secs(1),
    };
    let providers: HashMap<String, Arc<dyn Provider>> = catalogue
        .providers
        .iter()
        .map(|(name, spec)| {
            let base_url = spec.base_url.clone();
            let provider = HttpProvider::new(
                name,
                spec.kind,
                &base_url,
                Some("test-key".into()),
                spec.streaming,
                client.clone(),
            )
            .with_retry(fast_retry);
            (name.clone(), Arc::new(provider) as Arc<dyn Provider>)
        })
        .collect();
    polydev::perspectives::Gateway::with_providers(catalogue, providers)
}

/// Polls `condition` every 20 ms for up to 5 s (background work such as refunds of dropped
/// calls lands asynchronously) and returns its last value. A bound against hangs, not a timing
/// assertion: callers assert on the state afterwards.
pub async fn eventually<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if condition().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    condition().await
}

/// [`mock_gateway`] with more models (`[[models]]` TOML appended to the mock catalogue).
pub fn mock_gateway_with(base: &str, extra_models: &str) -> polydev::perspectives::Gateway {
    use std::collections::HashMap;
    use std::sync::Arc;

    use polydev::perspectives::provider::{HttpProvider, Provider};
    let catalogue =
        polydev::perspectives::Catalogue::parse(&format!("{}{extra_models}", mock_catalogue(base)))
            .expect("mock catalogue");
    let client = polydev::net::http_client();
    let providers: HashMap<String, Arc<dyn Provider>> = catalogue
        .providers
        .iter()
        .map(|(name, spec)| {
            let provider = HttpProvider::new(
                name,
                spec.kind,
                &spec.base_url,
                Some("test-key".into()),
                spec.streaming,
                client.clone(),
            );
            (name.clone(), Arc::new(provider) as Arc<dyn Provider>)
        })
        .collect();
    polydev::perspectives::Gateway::with_providers(catalogue, providers)
}

/// A PostgreSQL cluster of the test's own (in a temporary directory), which the test may stop,
/// crash and start again: for outage tests, which must not disturb the shared server.
pub struct OwnedCluster {
    dir: tempfile::TempDir,
    cluster: Option<EmbeddedPostgres>,
    pub options: PgConnectOptions,
    /// Processes stopped by [`OwnedCluster::freeze`].
    frozen: std::sync::Mutex<Vec<i32>>,
}

impl OwnedCluster {
    /// A new cluster with every migration applied to its `polydev` database.
    pub async fn start() -> OwnedCluster {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        // Root runs the cluster as `postgres`, which must be able to traverse into it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cluster = EmbeddedPostgres::start(&dir.path().join("data"), None)
            .await
            .expect("start a test-owned PostgreSQL cluster");
        let options = cluster.connect_options();
        let mut conn = PgConnection::connect_with(&options).await.expect("connect");
        migrate::run(&mut conn).await.expect("migrate");
        conn.close().await.ok();
        OwnedCluster {
            dir,
            cluster: Some(cluster),
            options,
            frozen: Default::default(),
        }
    }

    /// Its URL (a Unix socket), for `polydev --database-url` and `Database::open`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/polydev?host={}",
            self.options.get_socket().expect("a socket").display()
        )
    }

    /// Stops it as a crash would (immediate shutdown).
    pub async fn crash(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster.crash().await.expect("crash the cluster");
        }
    }

    /// Freezes every process of the cluster (SIGSTOP to the postmaster and each of its
    /// children, which PostgreSQL puts in sessions of their own): connections are accepted by
    /// the kernel but nothing answers, as with a hung host or a network partition.
    pub fn freeze(&self) {
        let pid_file = self.dir.path().join("data/postgres/postmaster.pid");
        let postmaster: i32 = std::fs::read_to_string(&pid_file)
            .expect("postmaster.pid")
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so read after the last ')'.
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(postmaster) {
                pids.push(pid);
            }
        }
        for &pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        *self.frozen.lock().unwrap() = pids;
    }

    /// Lets a frozen cluster run on.
    pub fn thaw(&self) {
        for pid in std::mem::take(&mut *self.frozen.lock().unwrap()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }

    /// Starts it again (recovering from the WAL after a crash).
    pub async fn restart(&mut self) {
        assert!(self.cluster.is_none(), "the cluster is running");
        self.cluster = Some(
            EmbeddedPostgres::start(&self.dir.path().join("data"), None)
                .await
                .expect("restart the cluster"),
        );
    }
}

impl Drop for OwnedCluster {
    fn drop(&mut self) {
        self.thaw();
        if let Some(cluster) = self.cluster.take() {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(async move {
                        let _ = cluster.crash().await;
                    });
            })
            .join()
            .ok();
        }
    }
}

/// Runs a browser script of `tests/web` (`node <script> <args>`, playwright-core in Chromium),
/// with `SCREENSHOT_DIR` when given, and returns the JSON summary it prints, after checking that
/// it ran to its end (no `failure`) and that the page threw no script error (`pageErrors`).
pub async fn run_browser_script(
    script: &str,
    args: &[&str],
    screenshots: Option<&std::path::Path>,
) -> serde_json::Value {
    let mut command = tokio::process::Command::new("node");
    command
        .arg(script)
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/web"));
    if let Some(dir) = screenshots {
        command.env("SCREENSHOT_DIR", dir);
    }
    let out = command.output().await.expect("run node");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(out.get("failure").is_none(), "{script}: {out}");
    assert_eq!(out["pageErrors"], serde_json::json!([]), "{script}: {out}");
    out
}

/// Starts a configured `polydev serve --listen 127.0.0.1:0 …` (stdin closed, stdout piped,
/// killed on drop) and waits for its first line, which names its address: the process and its
/// base URL.
pub async fn spawn_serve(command: &mut tokio::process::Command) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn polydev serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(120), lines.next_line())
        .await
        .expect("polydev serve did not start")
        .unwrap()
        .expect("polydev serve exited before listening");
    let base = line
        .strip_prefix("polydev listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    (child, base)
}

/// The sum over the series `name{…}` on the replica's `/metrics` whose labels include every one
/// of `labels` (each `key="value"`).
pub async fn metric_sum(client: &reqwest::Client, base: &str, name: &str, labels: &[&str]) -> f64 {
    let page = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{name}{{");
    page.lines()
        .filter(|l| l.starts_with(&prefix) && labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}
