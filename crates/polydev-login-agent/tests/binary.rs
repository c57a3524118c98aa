//! The `polydev-login-agent` binary on its own: configuration errors, and a session the server
//! refuses (it stops without starting a browser). The whole flow is tested end to end by the
//! server's `login_e2e` tests, which run this binary in a login sandbox.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

fn agent() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_polydev-login-agent"));
    command.env_clear();
    command
}

#[test]
fn missing_configuration_is_exit_2_naming_the_variable() {
    let out = agent().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("POLYDEV_LOGIN_PROVIDER is not set"));
    let out = agent()
        .env("POLYDEV_LOGIN_PROVIDER", "acme")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown provider"));
}

#[test]
fn a_refused_session_stops_the_agent_before_any_browser_starts() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let n = stream.read(&mut request).unwrap();
        let body = r#"{"error":{"code":"unauthorized","message":"bad secret"}}"#;
        write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&request[..n]).to_string()
    });
    let out = agent()
        .env("POLYDEV_SERVER_URL", format!("http://{addr}"))
        .env(
            "POLYDEV_LOGIN_SESSION_ID",
            "0b9f9a52-7c1e-4f7e-9a53-2f1f7b4f6a11",
        )
        .env("POLYDEV_LOGIN_SECRET", "the-secret")
        .env("POLYDEV_LOGIN_PROVIDER", "openai")
        .env("POLYDEV_LOGIN_CHROMIUM", "/nonexistent/chromium")
        .output()
        .unwrap();
    let request = server.join().unwrap();
    assert!(
        request.starts_with("GET /v1/login/agent/0b9f9a52-7c1e-4f7e-9a53-2f1f7b4f6a11 "),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: bearer the-secret")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("session refused: bad secret (401)"),
        "{stderr}"
    );
}
