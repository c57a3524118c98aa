//! The in-container agent (crates/polydev-agent). Built by this package so that the server's
//! integration tests can find it (`CARGO_BIN_EXE_polydev-agent`); it links only that crate.

fn main() -> std::process::ExitCode {
    polydev_agent::main()
}
