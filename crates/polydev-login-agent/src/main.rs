//! `polydev-login-agent`: see the crate's documentation and docs/login.md.

use std::process::ExitCode;

use polydev_login_agent::{Config, Outcome, run};

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("polydev-login-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(config)) {
        Outcome::Delivered => ExitCode::SUCCESS,
        Outcome::Stopped(why) => {
            eprintln!("polydev-login-agent: stopped: {why}");
            ExitCode::SUCCESS
        }
        Outcome::Failed(_) => ExitCode::from(1),
    }
}
