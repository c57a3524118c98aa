//! The agent that runs inside every runtime container (docs/runtime.md).
//!
//! `polydev-agent init --forward 127.0.0.1:3128=/run/polydev/proxy.sock -- CMD ARGS...` is the
//! sandbox's first process under the local driver: the sandbox has its own network namespace
//! with nothing but loopback, so each `--forward` listens on a loopback port inside and carries
//! every connection through a Unix socket that the driver bind-mounted in from the host, where
//! the driver connects it on to one fixed address (the user's proxy, or the polydev server).
//! Then it runs CMD and exits with its status. A connection to anything else has no route.
//!
//! `polydev-agent serve` is the agent itself ([`serve`]); [`proto`] is its protocol with the
//! server.
#![forbid(unsafe_code)]

pub mod proto;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// A loopback port inside the sandbox joined to a Unix socket from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub socket: PathBuf,
}

impl std::str::FromStr for Forward {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let (listen, socket) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected ADDR=SOCKET"))?;
        Ok(Forward {
            listen: listen
                .parse()
                .map_err(|e| format!("`{listen}`: not an address: {e}"))?,
            socket: PathBuf::from(socket),
        })
    }
}

/// The exit code a shell would report for a status: the code, or 128 + the signal.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// The entry point of the `polydev-agent` binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("init") => init(&args[1..]),
        Some("serve") => serve::serve(),
        _ => Err(
            "usage: polydev-agent init [--forward ADDR=SOCKET]... -- CMD [ARGS]... | polydev-agent serve"
                .into(),
        ),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(message) => {
            eprintln!("polydev-agent: {message}");
            ExitCode::from(125)
        }
    }
}

fn init(args: &[String]) -> Result<i32, String> {
    let split = args
        .iter()
        .position(|a| a == "--")
        .ok_or("missing `--` before the command")?;
    let (options, command) = (&args[..split], &args[split + 1..]);
    let mut forwards = Vec::new();
    let mut options = options.iter();
    while let Some(option) = options.next() {
        match option.as_str() {
            "--forward" => forwards.push(
                options
                    .next()
                    .ok_or("--forward needs ADDR=SOCKET")?
                    .parse::<Forward>()?,
            ),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    let (program, rest) = command.split_first().ok_or("no command to run")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // Bind every port before the command starts, so it can connect at once.
    let mut listeners = Vec::new();
    for forward in &forwards {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(forward.listen))
            .map_err(|e| format!("listen on {}: {e}", forward.listen))?;
        listeners.push((listener, forward.socket.clone()));
    }
    std::thread::spawn(move || {
        runtime.block_on(async move {
            for (listener, socket) in listeners {
                tokio::spawn(forward(listener, socket));
            }
            std::future::pending::<()>().await
        })
    });
    let status = std::process::Command::new(program)
        .args(rest)
        .status()
        .map_err(|e| format!("run {program}: {e}"))?;
    Ok(exit_code(status))
}

async fn forward(listener: tokio::net::TcpListener, socket: PathBuf) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_parse() {
        let f: Forward = "127.0.0.1:3128=/run/polydev/proxy.sock".parse().unwrap();
        assert_eq!(f.listen.port(), 3128);
        assert_eq!(f.socket, PathBuf::from("/run/polydev/proxy.sock"));
        assert!("nonsense".parse::<Forward>().is_err());
        assert!("host:1=/x".parse::<Forward>().is_err());
    }
}
