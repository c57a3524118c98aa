//! The `nomad` driver against an in-process fake of Nomad's documented HTTP API: it records the
//! submitted job JSON and every request, checks `X-Nomad-Token`, answers blocking queries,
//! streams allocation events as NDJSON with `{}` heartbeats, and lets a test drive allocation
//! states (running, failed, lost).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use polydev::retry::RetryPolicy;
use polydev::runtime::{
    ContainerSpec, ExitReason, NetworkPolicy, NomadConfig, NomadDriver, Orchestrator,
    OrchestratorError, Resources, Runtime, State,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::common::TestDb;

pub const TOKEN: &str = "nomad-test-token";
const NAMESPACE: &str = "polydev";
const REGION: &str = "eu";
const HANG_GUARD: Duration = Duration::from_secs(20);

#[derive(Default)]
pub struct FakeNomad {
    /// Every `POST /v1/jobs` body, as sent.
    pub submitted: Mutex<Vec<Value>>,
    /// `METHOD path?query` of every request.
    pub requests: Mutex<Vec<String>>,
    jobs: Mutex<BTreeMap<String, Value>>,
    allocs: Mutex<BTreeMap<String, Value>>,
    index: AtomicU64,
    changed: Notify,
    events: Mutex<Option<broadcast::Sender<String>>>,
    /// Answer this many requests with 500 first.
    pub fail_next: AtomicU32,
    pub heartbeats: AtomicU32,
}

impl FakeNomad {
    fn next_index(&self) -> u64 {
        self.index.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn publish(&self, alloc: &Value) {
        let index = self.next_index();
        let line = json!({
            "Index": index,
            "Events": [{
                "Topic": "Allocation",
                "Type": "AllocationUpdated",
                "Key": alloc["ID"],
                "Namespace": alloc["Namespace"],
                "FilterKeys": [alloc["JobID"]],
                "Index": index,
                "Payload": { "Allocation": alloc },
            }],
        });
        if let Some(sender) = &*self.events.lock().unwrap() {
            let _ = sender.send(line.to_string());
        }
        self.changed.notify_waiters();
    }

    /// Drives an allocation to `client_status`, with task events.
    pub fn set_status(&self, alloc_id: &str, client_status: &str, events: Value) {
        let alloc = {
            let mut allocs = self.allocs.lock().unwrap();
            let alloc = allocs.get_mut(alloc_id).expect("known allocation");
            alloc["ClientStatus"] = json!(client_status);
            alloc["TaskStates"] = json!({ "agent": { "State": "dead", "Events": events } });
            alloc.clone()
        };
        self.publish(&alloc);
    }

    /// Waits (bounded) until an event stream is connected.
    pub async fn wait_for_subscriber(&self) {
        let connected = crate::common::eventually(|| async {
            self.events
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|s| s.receiver_count() > 0)
        })
        .await;
        assert!(connected, "the driver connected to the event stream");
    }

    pub fn alloc_ids(&self) -> Vec<String> {
        self.allocs.lock().unwrap().keys().cloned().collect()
    }

    /// The job's environment as submitted (what the agent reads).
    pub fn env_of_job(&self, job_id: &str) -> HashMap<String, String> {
        let jobs = self.jobs.lock().unwrap();
        serde_json::from_value(jobs[job_id]["TaskGroups"][0]["Tasks"][0]["Env"].clone()).unwrap()
    }

    pub fn job_of_alloc(&self, alloc_id: &str) -> String {
        self.allocs.lock().unwrap()[alloc_id]["JobID"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A job registered by someone else in the same namespace.
    pub fn add_foreign_allocation(&self) {
        let alloc = json!({"ID": uuid::Uuid::new_v4().to_string(), "JobID": "billing-cron",
                           "Namespace": NAMESPACE, "ClientStatus": "running", "DesiredStatus": "run"});
        self.allocs
            .lock()
            .unwrap()
            .insert(alloc["ID"].as_str().unwrap().into(), alloc);
    }
}

type Fake = Arc<FakeNomad>;
type Params = Query<HashMap<String, String>>;

/// Token, scope and injected failures: what every handler checks first.
fn admit(
    fake: &FakeNomad,
    what: String,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Option<Response> {
    fake.requests.lock().unwrap().push(what);
    if fake
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Some((StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response());
    }
    if headers.get("X-Nomad-Token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
        return Some((StatusCode::FORBIDDEN, "Permission denied").into_response());
    }
    if params.get("namespace").map(String::as_str) != Some(NAMESPACE)
        || params.get("region").map(String::as_str) != Some(REGION)
    {
        return Some((StatusCode::BAD_REQUEST, "wrong namespace or region").into_response());
    }
    None
}

fn json_with_index(fake: &FakeNomad, body: Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        "X-Nomad-Index",
        fake.index
            .load(Ordering::SeqCst)
            .to_string()
            .parse()
            .unwrap(),
    );
    response
}

fn query_string(params: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join("&")
}

async fn register(
    AxumState(fake): AxumState<Fake>,
    headers: HeaderMap,
    Query(params): Params,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(refused) = admit(
        &fake,
        format!("POST /v1/jobs?{}", query_string(&params)),
        &headers,
        &params,
    ) {
        return refused;
    }
    fake.submitted.lock().unwrap().push(body.clone());
    let job = body["Job"].clone();
    let Some(id) = job["ID"].as_str().map(String::from) else {
        return (StatusCode::BAD_REQUEST, "missing job ID").into_response();
    };
    fake.jobs.lock().unwrap().insert(id.clone(), job.clone());
    let alloc = json!({
        "ID": uuid::Uuid::new_v4().to_string(),
        "EvalID": uuid::Uuid::new_v4().to_string(),
        "Name": format!("{id}.agent[0]"),
        "Namespace": job["Namespace"],
        "JobID": id,
        "TaskGroup": "agent",
        "DesiredStatus": "run",
        "ClientStatus": "pending",
        "TaskStates": null,
    });
    fake.allocs
        .lock()
        .unwrap()
        .insert(alloc["ID"].as_str().unwrap().into(), alloc.clone());
    fake.publish(&alloc);
    let index = fake.index.load(Ordering::SeqCst);
    json_with_index(
        &fake,
        json!({"EvalID": uuid::Uuid::new_v4().to_string(), "EvalCreateIndex": index,
               "JobModifyIndex": index, "Warnings": "", "Index": index}),
    )
}

async fn job_allocations(
    AxumState(fake): AxumState<Fake>,
    Path(job): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    if let Some(refused) = admit(
        &fake,
        format!("GET /v1/job/{job}/allocations?{}", query_string(&params)),
        &headers,
        &params,
    ) {
        return refused;
    }
    // A blocking query: wait (up to `wait`) while nothing changed since `index`.
    let since: u64 = params
        .get("index")
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    if since > 0 && fake.index.load(Ordering::SeqCst) <= since {
        let _ = tokio::time::timeout(Duration::from_secs(5), fake.changed.notified()).await;
    }
    let allocs: Vec<Value> = fake
        .allocs
        .lock()
        .unwrap()
        .values()
        .filter(|a| a["JobID"] == json!(job))
        .cloned()
        .collect();
    json_with_index(&fake, json!(allocs))
}

async fn allocation(
    AxumState(fake): AxumState<Fake>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    if let Some(refused) = admit(&fake, format!("GET /v1/allocation/{id}"), &headers, &params) {
        return refused;
    }
    match fake.allocs.lock().unwrap().get(&id) {
        Some(alloc) => axum::Json(alloc.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "alloc not found").into_response(),
    }
}

async fn allocations(
    AxumState(fake): AxumState<Fake>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    if let Some(refused) = admit(&fake, "GET /v1/allocations".into(), &headers, &params) {
        return refused;
    }
    let allocs: Vec<Value> = fake.allocs.lock().unwrap().values().cloned().collect();
    json_with_index(&fake, json!(allocs))
}

async fn deregister(
    AxumState(fake): AxumState<Fake>,
    Path(job): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    if let Some(refused) = admit(
        &fake,
        format!("DELETE /v1/job/{job}?{}", query_string(&params)),
        &headers,
        &params,
    ) {
        return refused;
    }
    if fake.jobs.lock().unwrap().remove(&job).is_none() {
        return (StatusCode::NOT_FOUND, "job not found").into_response();
    }
    // Stop: every allocation is killed; purge: they are forgotten.
    let stopped: Vec<Value> = {
        let mut allocs = fake.allocs.lock().unwrap();
        let ids: Vec<String> = allocs
            .iter()
            .filter(|(_, a)| a["JobID"] == json!(job))
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| allocs.remove(id))
            .map(|mut a| {
                a["DesiredStatus"] = json!("stop");
                a["ClientStatus"] = json!("complete");
                a["TaskStates"] = json!({"agent": {"State": "dead", "Events": [{"Type": "Terminated", "Signal": 9}]}});
                a
            })
            .collect()
    };
    for alloc in &stopped {
        fake.publish(alloc);
    }
    let index = fake.index.load(Ordering::SeqCst);
    json_with_index(
        &fake,
        json!({"EvalID": uuid::Uuid::new_v4().to_string(), "EvalCreateIndex": index, "JobModifyIndex": index}),
    )
}

async fn event_stream(
    AxumState(fake): AxumState<Fake>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    if let Some(refused) = admit(
        &fake,
        format!("GET /v1/event/stream?{}", query_string(&params)),
        &headers,
        &params,
    ) {
        return refused;
    }
    assert_eq!(params.get("topic").map(String::as_str), Some("Allocation"));
    let receiver = fake
        .events
        .lock()
        .unwrap()
        .get_or_insert_with(|| broadcast::channel(256).0)
        .subscribe();
    let heartbeat_fake = fake.clone();
    // Heartbeats every 50 ms (Nomad: every 10 s), events as they happen.
    let heartbeats = futures_util::stream::unfold((), move |()| {
        let fake = heartbeat_fake.clone();
        async move {
            if fake.heartbeats.fetch_add(1, Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(("{}\n".to_string(), ()))
        }
    });
    let events = futures_util::stream::unfold(receiver, |mut r| async move {
        loop {
            match r.recv().await {
                Ok(line) => return Some((format!("{line}\n"), r)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    let body = futures_util::stream::select(heartbeats, events)
        .map(|line| Ok::<_, std::io::Error>(bytes::Bytes::from(line)));
    Response::builder()
        .header("Content-Type", "application/json")
        .body(Body::from_stream(body))
        .unwrap()
}

pub async fn fake_nomad() -> (Fake, SocketAddr) {
    let fake = Fake::default();
    // The event channel exists from the start, so no event is lost before a subscriber.
    *fake.events.lock().unwrap() = Some(broadcast::channel(256).0);
    let app = Router::new()
        .route("/v1/jobs", post(register))
        .route("/v1/job/{id}/allocations", get(job_allocations))
        .route("/v1/job/{id}", axum::routing::delete(deregister))
        .route("/v1/allocation/{id}", get(allocation))
        .route("/v1/allocations", get(allocations))
        .route("/v1/event/stream", get(event_stream))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, addr)
}

/// The next non-pending state of `id` on the stream (bounded against hangs).
async fn next_for(
    id: &str,
    events: &mut futures_util::stream::BoxStream<'static, polydev::runtime::Event>,
) -> State {
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let event = events.next().await.expect("stream open");
            if event.id == id && event.state != State::Pending {
                return event.state;
            }
        }
    })
    .await
    .expect("event within the hang guard")
}

pub fn nomad_config(addr: SocketAddr) -> NomadConfig {
    let mut config = NomadConfig::new(&format!("http://{addr}"));
    config.token = Some(TOKEN.into());
    config.namespace = NAMESPACE.into();
    config.region = Some(REGION.into());
    config.datacenters = vec!["dc1".into()];
    config.retry = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(5),
        max_wait: Duration::from_millis(50),
    };
    config.placement_timeout = Duration::from_secs(10);
    config
}

fn driver(addr: SocketAddr) -> NomadDriver {
    NomadDriver::new(nomad_config(addr), polydev::net::http_client())
}

fn spec(name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        command: vec!["/opt/polydev/polydev-agent".into(), "serve".into()],
        env: BTreeMap::from([("POLYDEV_BOOTSTRAP".to_string(), "secret".to_string())]),
        resources: Resources {
            memory_bytes: 256 * 1024 * 1024,
            cpu_mhz: 300,
            ..Resources::default()
        },
        network: NetworkPolicy::default(),
        binds: Vec::new(),
    }
}

#[tokio::test]
async fn runtime_nomad_registers_the_documented_job_and_returns_its_allocation() {
    let (fake, addr) = fake_nomad().await;
    let driver = driver(addr);
    let alloc = driver.start(spec("polydev-one")).await.unwrap();
    assert_eq!(fake.alloc_ids(), std::slice::from_ref(&alloc));
    let submitted = fake.submitted.lock().unwrap()[0].clone();
    let job = &submitted["Job"];
    assert_eq!(job["ID"], "polydev-one");
    assert_eq!(job["Type"], "batch");
    assert_eq!(job["Namespace"], NAMESPACE);
    assert_eq!(job["Region"], REGION);
    assert_eq!(job["Datacenters"], json!(["dc1"]));
    let group = &job["TaskGroups"][0];
    assert_eq!(group["Count"], 1);
    assert_eq!(group["RestartPolicy"]["Attempts"], 0);
    assert_eq!(group["ReschedulePolicy"]["Attempts"], 0);
    let task = &group["Tasks"][0];
    assert_eq!(task["Driver"], "exec");
    assert_eq!(task["Config"]["command"], "/opt/polydev/polydev-agent");
    assert_eq!(task["Config"]["args"], json!(["serve"]));
    assert_eq!(task["Env"]["POLYDEV_BOOTSTRAP"], "secret");
    assert_eq!(task["Resources"], json!({"CPU": 300, "MemoryMB": 256}));
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(requests[0], "POST /v1/jobs?namespace=polydev&region=eu");
    assert!(
        requests[1].starts_with("GET /v1/job/polydev-one/allocations?"),
        "{requests:?}"
    );
    // The allocation is pending until the client runs it.
    let info = driver.inspect(&alloc).await.unwrap().unwrap();
    assert_eq!(
        (info.name.as_str(), info.state),
        ("polydev-one", State::Pending)
    );
}

#[tokio::test]
async fn runtime_nomad_allocation_states_through_inspect_list_and_the_event_stream() {
    let (fake, addr) = fake_nomad().await;
    let driver = driver(addr);
    let mut events = driver.events();
    fake.wait_for_subscriber().await;
    let a = driver.start(spec("polydev-a")).await.unwrap();
    let b = driver.start(spec("polydev-b")).await.unwrap();
    fake.add_foreign_allocation();
    // Heartbeats flow and are skipped.
    fake.set_status(&a, "running", json!([{"Type": "Started"}]));
    assert_eq!(next_for(&a, &mut events).await, State::Running);
    fake.set_status(
        &a,
        "failed",
        json!([{"Type": "Started"}, {"Type": "Driver Failure", "DisplayMessage": "failed to launch command: no such file"}]),
    );
    assert_eq!(
        next_for(&a, &mut events).await,
        State::Failed("failed to launch command: no such file".into())
    );
    fake.set_status(&b, "lost", json!([]));
    assert_eq!(next_for(&b, &mut events).await, State::Lost);
    assert!(fake.heartbeats.load(Ordering::SeqCst) > 0);

    assert_eq!(
        driver.inspect(&b).await.unwrap().unwrap().state,
        State::Lost
    );
    let mut listed: Vec<_> = driver
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.state))
        .collect();
    listed.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        listed,
        [
            (
                "polydev-a".to_string(),
                State::Failed("failed to launch command: no such file".into())
            ),
            ("polydev-b".to_string(), State::Lost),
        ],
        "only polydev's jobs"
    );
}

#[tokio::test]
async fn runtime_nomad_stop_purges_the_job() {
    let (fake, addr) = fake_nomad().await;
    let driver = driver(addr);
    let mut events = driver.events();
    fake.wait_for_subscriber().await;
    let alloc = driver.start(spec("polydev-stop")).await.unwrap();
    fake.set_status(&alloc, "running", json!([]));
    driver.stop(&alloc).await.unwrap();
    assert!(fake.requests.lock().unwrap().contains(
        &"DELETE /v1/job/polydev-stop?namespace=polydev&purge=true&region=eu".to_string()
    ));
    assert_eq!(driver.inspect(&alloc).await.unwrap(), None);
    let stopped = tokio::time::timeout(HANG_GUARD, async {
        loop {
            let event = events.next().await.unwrap();
            if event.state.is_terminal() {
                return event.state;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        stopped,
        State::Exited {
            code: 137,
            reason: ExitReason::Stopped
        }
    );
    driver
        .stop(&alloc)
        .await
        .expect("stopping what is gone is fine");
}

#[tokio::test]
async fn runtime_nomad_retries_5xx_and_reports_refusal_and_unreachability() {
    let (fake, addr) = fake_nomad().await;
    fake.fail_next.store(2, Ordering::SeqCst);
    driver(addr)
        .start(spec("polydev-retry"))
        .await
        .expect("retried past two 500s");

    let mut wrong = nomad_config(addr);
    wrong.token = Some("wrong".into());
    let refused = NomadDriver::new(wrong, polydev::net::http_client())
        .list()
        .await
        .unwrap_err();
    assert!(
        matches!(refused, OrchestratorError::Refused(ref m) if m.contains("403")),
        "{refused}"
    );

    // Nothing listens on a port just released.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap();
    drop(closed);
    let error = driver(port).start(spec("polydev-down")).await.unwrap_err();
    assert!(
        matches!(error, OrchestratorError::Unreachable(_)),
        "{error}"
    );
    let domain: polydev::error::Error = error.into();
    assert_eq!(polydev::http::status(&domain).as_u16(), 503);
}

#[tokio::test]
async fn runtime_pool_on_nomad_replaces_a_lost_allocation() {
    let db = TestDb::migrated().await;
    let (fake, addr) = fake_nomad().await;
    let runtime = Runtime::new(
        db.pool.clone(),
        Arc::new(driver(addr)),
        crate::runtime_pool::config("anthropic", 2),
    );
    let done = runtime.reconcile().await.unwrap().unwrap();
    assert_eq!(done.started, 2);
    for alloc in fake.alloc_ids() {
        fake.set_status(&alloc, "running", json!([]));
        let env = fake.env_of_job(&fake.job_of_alloc(&alloc));
        let credential = format!("{}.{}", env["POLYDEV_CONTAINER"], env["POLYDEV_BOOTSTRAP"]);
        crate::runtime_pool::register(&runtime, &credential, &"A".repeat(43))
            .await
            .unwrap();
    }
    // container_id holds the allocation id, orchestrator says nomad.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT container_id, orchestrator FROM runtime_containers ORDER BY container_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut allocs = fake.alloc_ids();
    allocs.sort();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), allocs);
    assert!(rows.iter().all(|r| r.1 == "nomad"));

    let user = crate::runtime_pool::user(&db.pool).await;
    let claimed = runtime.claim(user, "anthropic").await.unwrap();
    let alloc: String =
        sqlx::query_scalar("SELECT container_id FROM runtime_containers WHERE id = $1")
            .bind(claimed.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    fake.set_status(&alloc, "lost", json!([]));
    let done = runtime.reconcile().await.unwrap().unwrap();
    assert_eq!((done.destroyed, done.started), (1, 1));
    let (status, reason): (String, String) =
        sqlx::query_as("SELECT status, destroy_reason FROM runtime_containers WHERE id = $1")
            .bind(claimed.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "destroyed");
    assert!(reason.contains("Lost"), "{reason}");
    assert!(
        fake.requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.starts_with(&format!("DELETE /v1/job/polydev-{}", claimed.id))),
        "the lost allocation's job was stopped and purged"
    );
}
