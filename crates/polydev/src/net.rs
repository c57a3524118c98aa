//! Outbound HTTP, for every part that calls out: the provider adapters and the command-line
//! clients. reqwest is built without a default TLS crypto backend; ring is the one we ship.

use std::time::Duration;

/// Installs ring as the process's TLS crypto provider. Call before building any HTTP client
/// (idempotent).
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client outbound callers share (connection pools per upstream host).
pub fn http_client() -> reqwest::Client {
    install_tls_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(600))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("polydev/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client configuration is valid")
}
