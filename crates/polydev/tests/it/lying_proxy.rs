//! A server that lies: an in-process axum proxy in front of the real test server that forwards
//! every request and rewrites chosen answers (JSON of GET requests), or fails chosen requests.
//! The zero-knowledge client is pointed at it to check that it notices.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::oneshot;

/// Rewrites the JSON answer to `GET path` (path with its query).
type Rewrite = Box<dyn Fn(&str, &mut Value) + Send + Sync>;
/// Whether to fail a request (answered 503 without reaching the server).
type Fail = Box<dyn Fn(&Method, &str) -> bool + Send + Sync>;

#[derive(Default)]
struct Lies {
    rewrite: Option<Rewrite>,
    fail: Option<Fail>,
}

pub struct LyingProxy {
    pub base: String,
    lies: Arc<Mutex<Lies>>,
    _stop: oneshot::Sender<()>,
}

impl LyingProxy {
    pub async fn start(upstream: &str) -> LyingProxy {
        let lies = Arc::new(Mutex::new(Lies::default()));
        let client = polydev::net::http_client();
        let upstream = upstream.trim_end_matches('/').to_string();
        let state = (lies.clone(), client, upstream);
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (lies, client, upstream) = state.clone();
                async move { forward(lies, client, upstream, method, uri, headers, body).await }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        LyingProxy {
            base,
            lies,
            _stop: stop,
        }
    }

    /// From now on, rewrite the JSON answers of GET requests with `rewrite(path, body)`.
    pub fn lie(&self, rewrite: impl Fn(&str, &mut Value) + Send + Sync + 'static) {
        self.lies.lock().unwrap().rewrite = Some(Box::new(rewrite));
    }

    /// From now on, answer 503 to requests for which `fail(method, path)` holds.
    pub fn fail(&self, fail: impl Fn(&Method, &str) -> bool + Send + Sync + 'static) {
        self.lies.lock().unwrap().fail = Some(Box::new(fail));
    }

    /// Forward everything as it is again.
    pub fn honest(&self) {
        *self.lies.lock().unwrap() = Lies::default();
    }
}

async fn forward(
    lies: Arc<Mutex<Lies>>,
    client: reqwest::Client,
    upstream: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string());
    let failed = lies
        .lock()
        .unwrap()
        .fail
        .as_ref()
        .is_some_and(|fail| fail(&method, &path));
    if failed {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            r#"{"error":{"code":"database_unavailable","message":"the lying proxy failed this request"}}"#,
        )
            .into_response();
    }
    let mut request = client.request(method.clone(), format!("{upstream}{path}"));
    for (name, value) in &headers {
        if name == "host" || name == "content-length" {
            continue;
        }
        request = request.header(name, value);
    }
    let answer = request.body(body).send().await.unwrap();
    let status = answer.status();
    let headers = answer.headers().clone();
    let content_type = headers.get("content-type").cloned();
    let bytes = answer.bytes().await.unwrap();
    let is_json = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let bytes = match (&method, is_json, &lies.lock().unwrap().rewrite) {
        (&Method::GET, true, Some(rewrite)) if status.is_success() => {
            let mut value: Value = serde_json::from_slice(&bytes).unwrap();
            rewrite(&path, &mut value);
            Bytes::from(serde_json::to_vec(&value).unwrap())
        }
        _ => bytes,
    };
    // The server's headers pass on (session cookies, CSP, ...), but not those of the body it
    // may have rewritten.
    let mut response = Response::builder().status(status.as_u16());
    for (name, value) in &headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            response = response.header(name, value);
        }
    }
    response.body(Body::from(bytes)).unwrap()
}
