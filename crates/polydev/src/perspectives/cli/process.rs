//! Running a CLI: its own process group, the prompt on stdin, bounded output, a timeout. On
//! timeout, and when the future is dropped (the call was cancelled), the whole group is killed:
//! the CLIs are Node programs that start helpers of their own.

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Most bytes of stdout read (an answer is far smaller).
pub const MAX_STDOUT: u64 = 16 * 1024 * 1024;
/// Most bytes of stderr kept (its last lines explain a failure).
const MAX_STDERR: u64 = 256 * 1024;

pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug)]
pub enum RunError {
    Spawn(std::io::Error),
    Timeout,
    TooLarge,
}

/// Kills a process group when dropped, unless its leader was reaped normally.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH (already gone) is fine.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Runs `program args` with `stdin` as its input until it exits or `timeout` passes.
pub async fn run(
    program: &Path,
    args: &[OsString],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Output, RunError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own: killed whole, and a Ctrl-C in the IDE's terminal is not its.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(RunError::Spawn)?;
    let mut guard = GroupGuard {
        pgid: child.id().map(|id| Pid::from_raw(id as i32)),
    };
    let mut input = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let work = async {
        // A CLI that exits without reading all its input closes the pipe: not an error here,
        // its exit status and output say what happened.
        let write = async {
            let _ = input.write_all(stdin).await;
            drop(input);
        };
        let (_, out, err) = tokio::join!(
            write,
            read_bounded(&mut stdout, MAX_STDOUT),
            read_bounded(&mut stderr, MAX_STDERR)
        );
        let status = child.wait().await;
        (out, err, status)
    };
    let (out, err, status) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| RunError::Timeout)?;
    // The leader was reaped: its group id may be reused from now on, so no kill on drop. Its
    // helpers, if any outlived it, were already orphaned with the pipes closed.
    guard.pgid = None;
    let status = status.map_err(RunError::Spawn)?;
    let (stdout, complete) = out.map_err(RunError::Spawn)?;
    if !complete {
        return Err(RunError::TooLarge);
    }
    let (stderr, _) = err.map_err(RunError::Spawn)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Reads to the end, keeping at most `limit` bytes; the flag is false when there was more.
async fn read_bounded(
    stream: &mut (impl AsyncRead + Unpin),
    limit: u64,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    (&mut *stream).take(limit).read_to_end(&mut kept).await?;
    // Drain the rest so the program never blocks on a full pipe.
    let mut rest = [0u8; 8192];
    let mut complete = true;
    loop {
        match stream.read(&mut rest).await? {
            0 => break,
            _ => complete = false,
        }
    }
    Ok((kept, complete))
}
