//! The `polydev` command line: configuration (flags and environment) and one thin function per
//! subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::accounts::{self, Plan, Scope};
use crate::app::AppState;
use crate::db::{Database, DbConfig, Plan as MigrationPlan};
use crate::http;
use crate::perspectives::{Catalogue, Gateway};

#[derive(Debug, Parser)]
#[command(
    name = "polydev",
    version,
    about = "Multi-model AI perspectives server (MCP)"
)]
pub struct Cli {
    /// Log lines as text (for a terminal) or as one JSON object per line (for a log pipeline).
    #[arg(
        long,
        env = "POLYDEV_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL server to use. Without it, polydev runs its own private cluster in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded PostgreSQL cluster lives [default: /var/lib/polydev as root, else
    /// $XDG_DATA_HOME/polydev or ~/.local/share/polydev].
    #[arg(long, env = "POLYDEV_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Directory holding initdb, pg_ctl and postgres [default: found on PATH, then
    /// /usr/lib/postgresql/<newest>/bin].
    #[arg(long, env = "POLYDEV_PG_BIN_DIR", global = true)]
    pub pg_bin_dir: Option<PathBuf>,
    /// Size of the database connection pool.
    #[arg(
        long,
        env = "POLYDEV_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then serve HTTP until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Apply pending migrations (adopting an existing production database first).
    Migrate {
        /// Print what would run and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Sign in to a polydev server from this machine (OAuth device grant): shows a code and a
    /// URL, waits for approval in the browser, and stores the token (mode 0600) for
    /// `polydev mcp`.
    Login {
        /// The polydev server.
        #[arg(
            long,
            env = "POLYDEV_SERVER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        server_url: String,
    },
    /// MCP over stdio for IDEs: answers initialize and tools/list locally, forwards tool calls
    /// to a polydev server with POLYDEV_USER_TOKEN (or the token `polydev login` stored).
    Mcp {
        /// The polydev server to forward tool calls to.
        #[arg(
            long,
            env = "POLYDEV_SERVER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        server_url: String,
        /// The user's `pd_` token.
        #[arg(long, env = "POLYDEV_USER_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Zero-knowledge encryption of your stored chat history (docs/crypto.md). Talks to a
    /// polydev server with POLYDEV_USER_TOKEN (an `account` token); all cryptography happens
    /// here.
    Zk {
        /// The polydev server.
        #[arg(
            long,
            env = "POLYDEV_SERVER_URL",
            default_value = "http://127.0.0.1:8080",
            global = true
        )]
        server_url: String,
        /// Your `pd_` token.
        #[arg(
            long,
            env = "POLYDEV_USER_TOKEN",
            hide_env_values = true,
            global = true
        )]
        token: Option<String>,
        #[command(subcommand)]
        command: ZkCommand,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "POLYDEV_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Model catalogue (TOML) replacing the shipped one (config/models.toml).
    #[arg(long, env = "POLYDEV_MODELS")]
    models: Option<PathBuf>,
    /// Host names the MCP endpoint accepts in `Host` (DNS-rebinding protection); add your
    /// public host name when serving beyond this machine.
    #[arg(
        long,
        env = "POLYDEV_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) whose pages may call the MCP endpoint, besides
    /// the server's own (an `Origin` equal to the request's allowed `Host`). Requests without
    /// `Origin` (IDEs, CLIs) are not affected.
    #[arg(long, env = "POLYDEV_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// The server master secret the legacy credentials were encrypted with; needed only while
    /// users move their credentials to client-side keys.
    #[arg(long, env = "POLYDEV_LEGACY_CREDENTIAL_SECRET", hide_env_values = true)]
    legacy_credential_secret: Option<String>,
    /// Seconds a request may take before it is answered 408 (longer than the longest
    /// get_perspectives deadline, 600 s).
    #[arg(long, env = "POLYDEV_REQUEST_TIMEOUT", default_value_t = crate::app::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    request_timeout: u64,
    /// The server's public URL as browsers and MCP clients reach it (`https://polydev.example.com`):
    /// the OAuth issuer, the MCP resource (`<url>/mcp`) and the base of e-mailed links. Default:
    /// `http://` and the listen address.
    #[arg(long, env = "POLYDEV_PUBLIC_URL")]
    public_url: Option<String>,
    /// SMTP server for account e-mail (`smtps://user:pass@mail.example.com`,
    /// `smtp://mail.example.com?tls=required`, `smtp://127.0.0.1:2525` for a local relay).
    /// Without it, e-mail (with its links) is written to the server log.
    #[arg(long, env = "POLYDEV_SMTP_URL", hide_env_values = true)]
    smtp_url: Option<String>,
    /// Host names whose client ID metadata documents (an https URL as OAuth client_id) may be
    /// fetched even though they resolve to private or loopback addresses (internal clients,
    /// tests). Others must resolve to public addresses only.
    #[arg(long, env = "POLYDEV_CIMD_PRIVATE_HOSTS", value_delimiter = ',')]
    cimd_private_hosts: Vec<String>,
    /// The sender of account e-mail.
    #[arg(
        long,
        env = "POLYDEV_SMTP_FROM",
        default_value = "Polydev <no-reply@polydev.local>"
    )]
    smtp_from: String,
}

#[derive(Debug, Subcommand)]
pub enum ZkCommand {
    /// Set a master password and turn zero-knowledge on; prints the recovery key once.
    Enable,
    /// Encrypt your existing plaintext messages (safe to interrupt and run again).
    Migrate {
        /// Messages per batch.
        #[arg(long, default_value_t = 200)]
        batch: usize,
    },
    /// Show whether zero-knowledge is on and how far the migration is.
    Status,
    /// Change the master password (re-wraps one key; no data is re-encrypted).
    ChangePassword,
    /// Forgot the password: unlock with the recovery key and set a new password.
    Recover,
    /// Issue a new recovery key (the old one stops working); prints it once.
    NewRecoveryKey,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user with its profile and the quota of its plan.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum, default_value = "free")]
        tier: Plan,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (this is the only time it is shown).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// Days until it expires [default: never].
        #[arg(long)]
        expires_in: Option<u32>,
        /// `mcp`: MCP tools, perspectives, usage, chat (what an IDE needs). `account`: also
        /// tokens, settings writes, zero-knowledge keys and credentials (`polydev zk`, the web
        /// page).
        #[arg(long, value_enum, default_value = "mcp")]
        scope: Scope,
    },
    /// List a user's tokens.
    List {
        #[arg(long)]
        email: String,
    },
    /// Revoke a token by id.
    Revoke { id: Uuid },
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        // The stdio bridge needs no database: it must answer the IDE at once.
        if let Command::Mcp { server_url, token } = self.command {
            crate::net::install_tls_provider();
            let token = match token.filter(|t| !t.is_empty()) {
                Some(token) => Some(token),
                None => crate::client::login::token_for(&server_url).await,
            };
            return crate::mcp::bridge::Bridge::new(server_url, token)
                .run()
                .await;
        }
        if let Command::Login { server_url } = self.command {
            let mut stdout = std::io::stdout();
            let login = crate::client::login::login(&server_url, &mut stdout).await?;
            let path = crate::client::login::save(&login)?;
            println!(
                "Signed in. The token (scope `{}`) is stored in {}; `polydev mcp` uses it when POLYDEV_USER_TOKEN is unset.",
                login.scope,
                path.display()
            );
            return Ok(());
        }
        if let Command::Zk {
            server_url,
            token,
            command,
        } = self.command
        {
            return zk(&server_url, token.as_deref(), command).await;
        }
        let db = Database::open(&self.db.config()).await?;
        let result = match self.command {
            Command::Serve(args) => serve(&db, args).await,
            Command::Migrate { dry_run: true } => db
                .plan()
                .await
                .map(|plan| print!("{plan}"))
                .map_err(Into::into),
            Command::Migrate { dry_run: false } => migrate(&db).await,
            Command::Mcp { .. } | Command::Zk { .. } | Command::Login { .. } => {
                unreachable!("handled above")
            }
            Command::User(command) => match ensure_schema(&db).await {
                Ok(()) => user(&db, command).await,
                Err(e) => Err(e),
            },
            Command::Token(command) => match ensure_schema(&db).await {
                Ok(()) => token(&db, command).await,
                Err(e) => Err(e),
            },
        };
        // Stop the embedded cluster even when the command failed.
        let closed = db.close().await;
        result?;
        Ok(closed?)
    }
}

impl DbArgs {
    pub fn config(&self) -> DbConfig {
        DbConfig {
            database_url: self.database_url.clone().filter(|url| !url.is_empty()),
            data_dir: self.data_dir.clone().unwrap_or_else(default_data_dir),
            pg_bin_dir: self.pg_bin_dir.clone(),
            max_connections: self.db_max_connections,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/polydev");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("polydev")
}

/// Logs go to stderr (stdout is for command output); `RUST_LOG` overrides the default level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr (stdout carries command output). In JSON, each line is one object with
/// the event's fields and those of its spans: a request's `id`, `method`, `path`, `route` and
/// `user`, and on its last line `status` and `latency`.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

async fn serve(db: &Database, args: ServeArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::load(args.models.as_deref())?;
    let listen = args.listen;
    migrate(db).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving HTTP");
    println!("polydev listening on http://{addr}");
    let public_url = match args.public_url.filter(|u| !u.trim().is_empty()) {
        Some(url) => {
            let parsed = url::Url::parse(url.trim())
                .with_context(|| format!("--public-url `{url}` is not a URL"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(),
                "--public-url must be an http(s) URL with a host"
            );
            url.trim().trim_end_matches('/').to_string()
        }
        None => format!("http://{addr}"),
    };
    let mailer = match args.smtp_url.filter(|u| !u.is_empty()) {
        Some(url) => crate::accounts::Mailer::smtp(&url, &args.smtp_from)?,
        None => crate::accounts::Mailer::Log,
    };
    tracing::info!(%public_url, "OAuth issuer and public URL");
    let state = AppState::new(db.pool.clone(), Gateway::new(catalogue))
        .with_public_url(&public_url)
        .with_mailer(mailer)
        .with_cimd_private_hosts(
            args.cimd_private_hosts
                .into_iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect(),
        )
        .with_relaxed_pool(db.relaxed_pool.clone())
        .with_allowed_hosts(args.allowed_hosts)
        .with_request_timeout(std::time::Duration::from_secs(args.request_timeout))
        .with_allowed_origins(
            args.allowed_origins
                .into_iter()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect(),
        )
        .with_legacy_secret(
            args.legacy_credential_secret
                .filter(|s| !s.is_empty())
                .map(|s| crate::vault::LegacySecret::new(s.as_bytes())),
        );
    tokio::select! {
        served = http::serve(listener, state, shutdown_signal()) => served?,
        () = db.supervise(std::time::Duration::from_secs(2)) => unreachable!("supervise never returns"),
    }
    tracing::info!("in-flight requests finished; shutting down");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("cannot install a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("cannot install a SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

async fn migrate(db: &Database) -> anyhow::Result<()> {
    let plan = db.migrate().await?;
    let applied = plan.pending().len();
    match plan {
        MigrationPlan::Adopt { .. } => {
            tracing::info!(applied, "adopted the existing database and migrated it")
        }
        _ if applied == 0 => tracing::info!("database schema is up to date"),
        _ => tracing::info!(applied, "database migrated"),
    }
    Ok(())
}

/// Account commands need a current schema. The embedded cluster is polydev's own, so it is
/// migrated on the spot; an external server is only migrated when asked to (`migrate`, `serve`).
async fn ensure_schema(db: &Database) -> anyhow::Result<()> {
    if db.is_embedded() {
        return migrate(db).await;
    }
    let mut conn = db.pool.acquire().await?;
    anyhow::ensure!(
        crate::db::migrate::is_current(&mut conn).await?,
        "the database schema is not current: run `polydev migrate` (or start `polydev serve`) first"
    );
    Ok(())
}

async fn user(db: &Database, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Create { email, tier } => {
            let user = accounts::create_user(&db.pool, &email, tier).await?;
            println!("{}", user.user_id);
            eprintln!(
                "created user {} ({}) on the {} plan",
                user.user_id,
                email.trim(),
                tier.as_str()
            );
        }
    }
    Ok(())
}

async fn token(db: &Database, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            email,
            name,
            expires_in,
            scope,
        } => {
            let user = accounts::find_user_by_email(&db.pool, &email).await?;
            let created =
                accounts::create_scoped_token(&db.pool, user.user_id, &name, expires_in, scope)
                    .await?;
            println!("{}", created.token);
            eprintln!(
                "created {scope} token {} for {}: store it now, it will not be shown again",
                created.info.id,
                email.trim()
            );
        }
        TokenCommand::List { email } => {
            let user = accounts::find_user_by_email(&db.pool, &email).await?;
            println!(
                "{:<36}  {:<20}  {:<8}  {:<7}  {:<7}  {:<20}  LAST USED",
                "ID", "NAME", "PREVIEW", "SCOPE", "ACTIVE", "EXPIRES"
            );
            for t in accounts::list_tokens(&db.pool, user.user_id).await? {
                let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
                };
                println!(
                    "{:<36}  {:<20}  ...{:<5}  {:<7}  {:<7}  {:<20}  {}",
                    t.id,
                    t.token_name.unwrap_or_default(),
                    t.token_preview.unwrap_or_default(),
                    t.scope.as_str(),
                    t.active.unwrap_or(false),
                    time(t.expires_at),
                    time(t.last_used_at)
                );
            }
        }
        TokenCommand::Revoke { id } => {
            accounts::revoke_token(&db.pool, None, id).await?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

/// The master password: `POLYDEV_MASTER_PASSWORD` (for scripts), else a prompt without echo.
fn master_password(prompt: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("POLYDEV_MASTER_PASSWORD") {
        return Ok(password);
    }
    Ok(rpassword::prompt_password(prompt)?)
}

/// A new master password, asked twice (or `POLYDEV_MASTER_PASSWORD`), of at least 10 characters.
fn new_master_password() -> anyhow::Result<String> {
    let password = master_password("new master password: ")?;
    if std::env::var("POLYDEV_MASTER_PASSWORD").is_err() {
        anyhow::ensure!(
            password == master_password("again: ")?,
            "the passwords differ"
        );
    }
    anyhow::ensure!(
        password.chars().count() >= 10,
        "use at least 10 characters (a passphrase of several words is best)"
    );
    Ok(password)
}

async fn zk(server_url: &str, token: Option<&str>, command: ZkCommand) -> anyhow::Result<()> {
    let token = token.filter(|t| !t.is_empty()).context(
        "POLYDEV_USER_TOKEN is not set: create one with `polydev token create --scope account`",
    )?;
    let client = crate::client::zk::ZkClient::new(server_url, token);
    match command {
        ZkCommand::Status => {
            let status = client.status().await?;
            println!(
                "zero-knowledge: {}",
                if status.enabled { "on" } else { "off" }
            );
            if status.enabled {
                let m = client.migration_status().await?;
                println!(
                    "messages: {} encrypted, {} encrypted but not yet verified, {} still plaintext",
                    m.done, m.unverified, m.plaintext
                );
            }
        }
        ZkCommand::Enable => {
            eprintln!(
                "Choose a master password. It never leaves this machine. If you lose BOTH the \
                 password and the recovery key printed next, your encrypted data is lost for good."
            );
            let password = new_master_password()?;
            let (_, recovery) = client
                .enable(&password, polydev_zk::KdfParams::DEFAULT)
                .await?;
            println!("{}", recovery.display());
            eprintln!(
                "That is your recovery key, shown only this once: store it offline. Next: `polydev zk migrate`."
            );
        }
        ZkCommand::ChangePassword | ZkCommand::Recover => {
            let current = match command {
                ZkCommand::Recover => rpassword::prompt_password("recovery key: ")?,
                _ => master_password("current master password: ")?,
            };
            let unlock = match command {
                ZkCommand::Recover => crate::client::zk::Unlock::RecoveryKey(&current),
                _ => crate::client::zk::Unlock::Password(&current),
            };
            let new_password = new_master_password()?;
            client.set_password(unlock, &new_password).await?;
            eprintln!("master password changed");
        }
        ZkCommand::NewRecoveryKey => {
            let password = master_password("master password: ")?;
            let recovery = client.new_recovery_key(&password).await?;
            println!("{}", recovery.display());
            eprintln!(
                "That is your new recovery key, shown only this once; the old one no longer works."
            );
        }
        ZkCommand::Migrate { batch } => {
            let password = master_password("master password: ")?;
            let keyring = client.unlock(&password).await?;
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} messages encrypted and verified {msg}",
                )
                .expect("valid template"),
            );
            let report = client
                .migrate(
                    &keyring,
                    batch.clamp(1, 500),
                    |s| {
                        bar.set_length(s.total() as u64);
                        bar.set_position(s.done as u64);
                        bar.set_message(format!("({} awaiting verification)", s.unverified));
                    },
                    |_| std::ops::ControlFlow::Continue(()),
                )
                .await?;
            bar.finish();
            println!(
                "messages: encrypted {}, verified and cleared {}, re-queued {}, changed meanwhile {}",
                report.encrypted, report.verified_and_cleared, report.reset, report.retried
            );
            let credentials = client.migrate_credentials(&keyring).await?;
            println!(
                "credentials: moved to client-side keys {}, verified and cleared {}",
                credentials.moved, credentials.verified_and_cleared
            );
            for unreadable in &credentials.unreadable {
                println!(
                    "credentials: {} {} was not moved: {} (left as it is; ask your operator)",
                    unreadable.table.as_str(),
                    unreadable.credential_id,
                    unreadable.reason
                );
            }
        }
    }
    Ok(())
}
