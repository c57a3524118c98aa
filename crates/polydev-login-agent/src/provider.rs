//! The provider CLI's login command: it prints the login URL, waits for the provider's
//! callback, writes its credential file and exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

/// The login command and credential file of each provider's CLI (overridden by
/// `POLYDEV_LOGIN_CLI` and `POLYDEV_LOGIN_CREDENTIAL_FILE`).
pub fn defaults(provider: &str) -> Option<(&'static str, &'static str)> {
    Some(match provider {
        "anthropic" => ("claude setup-token", ".claude/.credentials.json"),
        "openai" => ("codex login", ".codex/auth.json"),
        "google" => ("gemini", ".gemini/oauth_creds.json"),
        _ => return None,
    })
}

/// Largest credential file the agent seals.
pub const MAX_CREDENTIAL: u64 = 256 * 1024;

pub struct ProviderCli {
    child: Child,
}

impl ProviderCli {
    /// Starts `command_line` (through `/bin/sh -c`) in `home`, in its own process group;
    /// every `http(s)://` URL it prints goes to the returned channel.
    pub fn start(
        command_line: &str,
        home: &Path,
    ) -> Result<(ProviderCli, mpsc::UnboundedReceiver<String>), String> {
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command_line)
            .current_dir(home)
            .env("HOME", home)
            // Tell the CLI there is no local browser to open: the agent opens the URL.
            .env("BROWSER", "true")
            .env_remove("POLYDEV_LOGIN_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start the provider CLI: {e}"))?;
        let (tx, urls) = mpsc::unbounded_channel();
        tokio::spawn(scan(child.stdout.take().expect("piped"), tx.clone()));
        tokio::spawn(scan(child.stderr.take().expect("piped"), tx));
        Ok((ProviderCli { child }, urls))
    }

    /// Waits for the CLI to exit: its exit code (128 + signal when killed).
    pub async fn wait(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match self.child.wait().await {
            Ok(status) => status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            Err(_) => 255,
        }
    }

    /// Kills the CLI and whatever it started.
    pub async fn kill(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill().await;
    }
}

/// Reads lines (never logged: a CLI may print codes) and passes on the URLs in them.
async fn scan(reader: impl AsyncRead + Unpin, urls: mpsc::UnboundedSender<String>) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        for url in find_urls(&line) {
            let _ = urls.send(url);
        }
    }
}

/// The `http://` and `https://` URLs in a line of text.
pub fn find_urls(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(start) = ["https://", "http://"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(tail.len());
        let url = tail[..end].trim_end_matches(['.', ',', ')', ';']);
        if url.len() > "https://".len() {
            out.push(url.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Where the credential file is: absolute as given, else under `home`.
pub fn credential_path(home: &Path, file: &str) -> PathBuf {
    let path = Path::new(file);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        home.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_found_in_cli_output() {
        assert_eq!(
            find_urls("Open https://x.test/login?a=1&b=2. Then wait (http://127.0.0.1:5/cb)"),
            vec!["https://x.test/login?a=1&b=2", "http://127.0.0.1:5/cb"]
        );
        assert!(find_urls("no url, just https:// here").is_empty());
    }

    #[test]
    fn every_provider_has_a_login_command() {
        for p in ["anthropic", "openai", "google"] {
            assert!(defaults(p).is_some());
        }
        assert!(defaults("other").is_none());
        assert_eq!(
            credential_path(Path::new("/h"), ".codex/auth.json"),
            PathBuf::from("/h/.codex/auth.json")
        );
        assert_eq!(
            credential_path(Path::new("/h"), "/abs"),
            PathBuf::from("/abs")
        );
    }
}
