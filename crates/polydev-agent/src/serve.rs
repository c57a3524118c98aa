//! `polydev-agent serve`: the agent proper. Makes an X25519 key pair (the private half lives in
//! this process's memory only), registers the public half with the container's bootstrap
//! secret, then takes jobs one at a time: opens the sealed command, runs it under limits in a
//! private directory on the sandbox's tmpfs, seals stdout and stderr in chunks to the user's
//! public key as they come (or to the output key the sealed command names), and reports the
//! exit code. A container's credential grant, when its user made one, is opened per job and
//! its files written only for a job that runs the granted CLI. The command and its output exist in
//! plaintext only in this process, the job's process and that tmpfs directory.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use polydev_zk::{Context, X25519KeyPair};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::proto::{
    Assignment, CHUNK_BYTES, CHUNKS_PER_BATCH, COMMAND_NAMESPACE, Finish, GRANT_NAMESPACE, Grant,
    JobCommand, OutputAck, OutputBatch, OutputChunk, Register, Stream, granted_args, output_row,
    truncation_marker,
};

/// How often pending output is sent (and cancellation asked for) while a job runs.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

struct Agent {
    client: reqwest::Client,
    server: String,
    auth: Zeroizing<String>,
    keys: X25519KeyPair,
    /// This container's id (the row a grant is bound to).
    container: String,
    /// Where job directories go: a tmpfs (the sandbox's home; Nomad's secrets dir).
    base: PathBuf,
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

pub fn serve() -> Result<i32, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(run())
}

async fn run() -> Result<i32, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = env("POLYDEV_SERVER")?.trim_end_matches('/').to_string();
    let container = env("POLYDEV_CONTAINER")?;
    let secret = Zeroizing::new(env("POLYDEV_BOOTSTRAP")?);
    let base = std::env::var("NOMAD_SECRETS_DIR")
        .or_else(|_| std::env::var("HOME"))
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/tmp"));
    let client = reqwest::Client::builder()
        .no_proxy() // the proxy variables are for jobs; the server is reached directly
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let agent = Agent {
        client,
        server,
        auth: Zeroizing::new(format!("Bearer {}.{}", container, secret.as_str())),
        keys: X25519KeyPair::generate().map_err(|e| e.to_string())?,
        container,
        base,
    };
    agent.register().await?;
    loop {
        match agent.next().await {
            Ok(Some(assignment)) => agent.run_job(assignment).await,
            Ok(None) => {}
            // The container was destroyed (or never ours): nothing more to do.
            Err(Fatal(message)) => return Err(message),
        }
    }
}

struct Fatal(String);

impl Agent {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    async fn register(&self) -> Result<(), String> {
        let body = Register {
            public_key: self.keys.public_key(),
        };
        // The server may still be starting: a bounded number of tries.
        let mut last = String::new();
        for attempt in 0..50u32 {
            match self
                .client
                .post(self.url("/v1/runtime/agent/register"))
                .header("Authorization", self.auth.as_str())
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if r.status().is_client_error() => {
                    return Err(format!("registration refused: {}", r.status()));
                }
                Ok(r) => last = r.status().to_string(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10) + 1))).await;
        }
        Err(format!("cannot register: {last}"))
    }

    async fn next(&self) -> Result<Option<Assignment>, Fatal> {
        let response = self
            .client
            .get(self.url("/v1/runtime/agent/next"))
            .header("Authorization", self.auth.as_str())
            .timeout(Duration::from_secs(60))
            .send()
            .await;
        match response {
            Ok(r) if r.status() == StatusCode::OK => Ok(r.json().await.ok()),
            Ok(r) if r.status() == StatusCode::NO_CONTENT => Ok(None),
            Ok(r) if r.status().is_client_error() => Err(Fatal(format!(
                "the server refused the agent: {}",
                r.status()
            ))),
            _ => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                Ok(None)
            }
        }
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Option<reqwest::Response> {
        for attempt in 0..5u64 {
            if let Ok(r) = self
                .client
                .post(self.url(path))
                .header("Authorization", self.auth.as_str())
                .json(body)
                .send()
                .await
                && !r.status().is_server_error()
            {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        None
    }

    async fn finish(&self, job_id: &str, finish: Finish) {
        let _ = self
            .post(&format!("/v1/runtime/agent/jobs/{job_id}/finish"), &finish)
            .await;
    }

    async fn run_job(&self, a: Assignment) {
        let started = Instant::now();
        let ctx = Context {
            namespace: COMMAND_NAMESPACE,
            user_id: &a.user_id,
            row_id: &a.job_id,
        };
        let opened = self
            .keys
            .open(&ctx, &a.encrypted_command)
            .map(Zeroizing::new);
        let job: Option<JobCommand> = opened
            .ok()
            .and_then(|plain| serde_json::from_slice(&plain).ok());
        let Some(job) = job.filter(|j| !j.command.is_empty()) else {
            let error = "the sealed command cannot be opened by this container or is not a job";
            return self.fail(&a.job_id, started, error).await;
        };
        let files = match self.files_of(&a, &job) {
            Ok(files) => files,
            Err(error) => return self.fail(&a.job_id, started, error).await,
        };
        let dir = self.base.join("jobs").join(&a.job_id);
        if let Err(error) = prepare_dir(&dir, &files) {
            let _ = std::fs::remove_dir_all(&dir);
            return self.fail(&a.job_id, started, &error).await;
        }
        let outcome = self.execute(&a, &job, &dir, started).await;
        let _ = std::fs::remove_dir_all(&dir);
        self.finish(&a.job_id, outcome).await;
    }

    /// The job's files, and the grant's credential files when the job runs the granted CLI.
    fn files_of(
        &self,
        a: &Assignment,
        job: &JobCommand,
    ) -> Result<BTreeMap<String, String>, &'static str> {
        let mut files = job.files.clone();
        let Some(sealed) = a.grant.as_deref() else {
            return Ok(files);
        };
        let ctx = Context {
            namespace: GRANT_NAMESPACE,
            user_id: &a.user_id,
            row_id: &self.container,
        };
        let grant: Grant = self
            .keys
            .open(&ctx, sealed)
            .ok()
            .map(Zeroizing::new)
            .and_then(|plain| serde_json::from_slice(&plain).ok())
            .ok_or("the container's credential grant cannot be opened by this container")?;
        let program = job
            .command
            .first()
            .and_then(|p| Path::new(p).file_name())
            .and_then(|n| n.to_str());
        let args: Vec<&str> = job.command.iter().skip(1).map(String::as_str).collect();
        if program != Some(grant.cli.as_str())
            || granted_args(&grant.cli) != Some(args.as_slice())
            || !job.env.is_empty()
            || !job.files.is_empty()
        {
            // Only the granted CLI, run as polydev runs it, gets the credential: not `cat`, not
            // a shell, not the CLI with tools, settings or hooks switched on.
            return Ok(files);
        }
        for (name, content) in grant.files {
            if files.insert(name, content).is_some() {
                return Err("a job file has the path of a granted credential file");
            }
        }
        Ok(files)
    }

    async fn fail(&self, job_id: &str, started: Instant, error: &str) {
        self.finish(
            job_id,
            Finish {
                exit_code: None,
                duration_ms: started.elapsed().as_millis() as u64,
                truncated: false,
                error: Some(error.to_string()),
            },
        )
        .await;
    }

    async fn execute(
        &self,
        a: &Assignment,
        job: &JobCommand,
        dir: &Path,
        started: Instant,
    ) -> Finish {
        let mut command = tokio::process::Command::new("/bin/sh");
        // The job, not the agent, is the memory cgroup's preferred victim.
        command
            .arg("-c")
            .arg(r#"echo 1000 > /proc/self/oom_score_adj 2>/dev/null; exec "$@""#)
            .arg("sh")
            .args(&job.command)
            .env_clear()
            .current_dir(dir)
            .stdin(if job.stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // A group of its own, killed whole: what the job started (a CLI's helpers, a
            // `sleep` behind a shell) dies with it rather than running on in the container.
            .process_group(0)
            .kill_on_drop(true);
        for (key, value) in job_env(a, job, dir) {
            command.env(key, value);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(_) => {
                return Finish {
                    exit_code: None,
                    duration_ms: started.elapsed().as_millis() as u64,
                    truncated: false,
                    error: Some("the job's program could not be started".into()),
                };
            }
        };
        let mut group = JobGroup(child.id());
        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), job.stdin.clone()) {
            tokio::spawn(async move {
                let input = Zeroizing::new(input);
                let _ = stdin.write_all(input.as_bytes()).await;
            });
        }
        let (sender, mut receiver) = mpsc::channel::<(Stream, Vec<u8>)>(64);
        let readers = [
            tokio::spawn(read_pipe(
                child.stdout.take(),
                Stream::Stdout,
                sender.clone(),
            )),
            tokio::spawn(read_pipe(child.stderr.take(), Stream::Stderr, sender)),
        ];
        let mut output = Output::new(a, job);
        let deadline = tokio::time::sleep(Duration::from_millis(a.limits.wall_clock_ms));
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(FLUSH_EVERY);
        let mut error = None;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.ok(),
                Some((stream, bytes)) = receiver.recv() => output.push(stream, &bytes),
                _ = ticker.tick() => {
                    if self.flush(&mut output).await {
                        error = Some("cancelled".to_string());
                        group.kill();
                        // By pid too: a job may have moved itself out of its group.
                        let _ = child.start_kill();
                    }
                }
                () = &mut deadline, if error.is_none() => {
                    error = Some(format!("wall-clock limit of {} ms exceeded", a.limits.wall_clock_ms));
                    group.kill();
                    let _ = child.start_kill();
                }
            }
        };
        // The job is over: what it left running goes too (and lets go of the pipes).
        group.kill();
        // What the pipes still hold; a background process that keeps them open is not waited
        // for long.
        let drain = async {
            while let Some((stream, bytes)) = receiver.recv().await {
                output.push(stream, &bytes);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        for reader in readers {
            reader.abort();
        }
        while output.pending() {
            self.flush(&mut output).await;
        }
        let exit_code = status.map(crate::exit_code);
        if error.is_none() && exit_code.is_some_and(|c| c == 137) {
            error = Some("killed (SIGKILL): the container's memory limit, most likely".into());
        }
        Finish {
            exit_code,
            duration_ms: started.elapsed().as_millis() as u64,
            truncated: output.truncated,
            error,
        }
    }

    /// Seals and sends what is pending (at most one batch); true if the job was cancelled.
    async fn flush(&self, output: &mut Output) -> bool {
        let batch = output.take_batch();
        let path = format!("/v1/runtime/agent/jobs/{}/output", output.job_id);
        match self.post(&path, &batch).await {
            Some(r) if r.status().is_success() => r
                .json::<OutputAck>()
                .await
                .map(|ack| ack.cancelled)
                .unwrap_or(false),
            // The job is gone (the container destroyed): stop it.
            Some(r) if r.status() == StatusCode::NOT_FOUND => true,
            _ => false,
        }
    }
}

/// A job's process group (its leader's pid), killed when the job ends however it ends. Once:
/// the pid is not used again after that, so a later process that got it is never signalled.
struct JobGroup(Option<u32>);

impl JobGroup {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            // ESRCH (all gone already) is fine.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for JobGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

fn job_env(a: &Assignment, job: &JobCommand, dir: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("HOME".into(), dir.display().to_string());
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("LANG".into(), "C.UTF-8".into());
    let proxy = a
        .proxy
        .clone()
        .or_else(|| std::env::var("HTTPS_PROXY").ok());
    if let Some(proxy) = proxy {
        for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.insert(key.into(), proxy.clone());
        }
    }
    env.extend(job.env.clone());
    env
}

/// The job's private directory (0700), with its files (0600) at relative paths inside it.
fn prepare_dir(dir: &Path, files: &BTreeMap<String, String>) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|_| "cannot create the job's directory".to_string())?;
    for (name, content) in files {
        let relative = Path::new(name);
        if name.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err("a job file's path must be relative and stay inside its directory".into());
        }
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|_| "cannot create a job file's directory".to_string())?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|_| "cannot write a job file".to_string())?;
        std::io::Write::write_all(&mut file, content.as_bytes())
            .map_err(|_| "cannot write a job file".to_string())?;
    }
    Ok(())
}

async fn read_pipe<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<R>,
    stream: Stream,
    sender: mpsc::Sender<(Stream, Vec<u8>)>,
) {
    let Some(mut pipe) = pipe else { return };
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if sender.send((stream, buffer[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Output not yet sent, per stream, with the limit applied.
struct Output {
    job_id: String,
    user_id: String,
    user_key: String,
    limit: u64,
    seq: u64,
    kept: [u64; 2],
    pending: [Zeroizing<Vec<u8>>; 2],
    marked: [bool; 2],
    truncated: bool,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Output {
    /// Sealed to the command's own output key when it names one, else to the user's.
    fn new(a: &Assignment, job: &JobCommand) -> Output {
        Output {
            job_id: a.job_id.clone(),
            user_id: a.user_id.clone(),
            user_key: job
                .output_public_key
                .clone()
                .unwrap_or_else(|| a.user_public_key.clone()),
            limit: a.limits.max_output_bytes,
            seq: 0,
            kept: [0, 0],
            pending: [Zeroizing::new(Vec::new()), Zeroizing::new(Vec::new())],
            marked: [false, false],
            truncated: false,
        }
    }

    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let i = index(stream);
        let room = self.limit.saturating_sub(self.kept[i]) as usize;
        let keep = bytes.len().min(room);
        self.pending[i].extend_from_slice(&bytes[..keep]);
        self.kept[i] += keep as u64;
        if keep < bytes.len() && !self.marked[i] {
            self.marked[i] = true;
            self.truncated = true;
            self.pending[i].extend_from_slice(truncation_marker(self.limit).as_bytes());
        }
    }

    fn pending(&self) -> bool {
        self.pending.iter().any(|p| !p.is_empty())
    }

    /// Up to [`CHUNKS_PER_BATCH`] sealed chunks (an empty batch asks about cancellation).
    fn take_batch(&mut self) -> OutputBatch {
        let mut chunks = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = index(stream);
            while chunks.len() < CHUNKS_PER_BATCH && !self.pending[i].is_empty() {
                let n = self.pending[i].len().min(CHUNK_BYTES);
                let piece: Zeroizing<Vec<u8>> =
                    Zeroizing::new(self.pending[i].drain(..n).collect());
                let row = output_row(&self.job_id, self.seq);
                let ctx = Context {
                    namespace: stream.namespace(),
                    user_id: &self.user_id,
                    row_id: &row,
                };
                if let Ok(sealed) = polydev_zk::seal_to(&self.user_key, &ctx, &piece) {
                    chunks.push(OutputChunk {
                        seq: self.seq,
                        stream,
                        sealed,
                    });
                    self.seq += 1;
                }
            }
        }
        OutputBatch {
            chunks,
            truncated: self.truncated,
        }
    }
}
