//! Clients of a polydev server, for the command line (`polydev zk`), the bench and agents:
//! typed requests and responses ([`crate::api`]) over HTTP with the user's `pd_` token. The
//! server's own modules never import this one.

pub mod login;
pub mod zk;

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ErrorResponse, Me};
use crate::retry::{RetryPolicy, Verdict, retry_after};

/// Requests refused for the rate limit (429) are tried again, waiting as `Retry-After` says,
/// up to a minute (the server's window): a long migration can exceed a plan's requests per
/// minute.
const RATE_LIMITED: RetryPolicy = RetryPolicy {
    max_attempts: 6,
    base_delay: Duration::from_secs(5),
    max_wait: Duration::from_secs(60),
};

/// A polydev server's HTTP API, called with one token.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiClient {
    pub fn new(base: &str, token: &str) -> ApiClient {
        ApiClient {
            http: crate::net::http_client(),
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// Sends a request and reads its typed answer (`()` for 204). An error answer becomes an
    /// error that carries the server's public message and code. Over the rate limit it waits
    /// and tries again ([`RATE_LIMITED`]).
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        self.call_with(method, path, body, &[]).await
    }

    /// [`ApiClient::call`] with extra headers (the zero-knowledge proofs).
    pub async fn call_with<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let (url, method_ref) = (&url, &method);
        let response = RATE_LIMITED
            .run(
                move || async move {
                    let mut request = self
                        .http
                        .request(method_ref.clone(), url)
                        .bearer_auth(&self.token);
                    for (name, value) in headers {
                        request = request.header(*name, value);
                    }
                    if let Some(body) = body {
                        request = request.json(body);
                    }
                    request
                        .send()
                        .await
                        .context("cannot reach the polydev server")
                },
                |outcome| match outcome {
                    Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                        Verdict::Retry {
                            after: retry_after(response.headers()),
                        }
                    }
                    _ => Verdict::Done,
                },
                |_, _, wait| {
                    tracing::info!(
                        wait_s = wait.as_secs(),
                        "rate limited by the server; waiting"
                    );
                },
            )
            .await?;
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(serde_json::from_value(serde_json::Value::Null)?);
        }
        let bytes = response
            .bytes()
            .await
            .context("the server's answer was cut off")?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorResponse>(&bytes) {
                Ok(body) => bail!("{} ({status}, {})", body.error.message, body.error.code),
                Err(_) => bail!("the server answered {status}"),
            }
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the server's answer to {method} {path} is not as expected"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// The server's base URL (no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /v1/me`.
    pub async fn me(&self) -> anyhow::Result<Me> {
        self.get("/v1/me").await
    }
}
