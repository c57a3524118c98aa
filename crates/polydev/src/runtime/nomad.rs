//! The `nomad` driver: HashiCorp Nomad's HTTP API, by hand with reqwest + serde.
//!
//! | call | API |
//! |---|---|
//! | start | `POST /v1/jobs` (a batch job `polydev-<row>`, one group, one task, no restarts or rescheduling), then `GET /v1/job/:id/allocations` (blocking query) until it is placed: the container id is the allocation id |
//! | inspect | `GET /v1/allocation/:id` |
//! | list | `GET /v1/allocations` in the namespace, filtered to jobs named `polydev-` |
//! | stop | `GET /v1/allocation/:id` (its job), then `DELETE /v1/job/:job?purge=true` (stop + purge) |
//! | events | `GET /v1/event/stream?topic=Allocation` (NDJSON; `{}` lines are heartbeats), reconnected from the last index |
//!
//! Every request carries `X-Nomad-Token` (when set), `namespace` and `region`. Calls are
//! retried with the crate's policy on connection errors, 429 and 5xx; what still fails is
//! [`OrchestratorError::Unreachable`]. Nomad has no wall-clock limit for a task: the driver
//! stops a container whose `wall_clock` has passed itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::orchestrator::{
    BoxFuture, ContainerInfo, ContainerSpec, Event, ExitReason, Orchestrator, OrchestratorError,
    Result, State,
};
use super::pool::NAME_PREFIX;
use crate::retry::{RetryPolicy, Verdict};

#[derive(Debug, Clone)]
pub struct NomadConfig {
    /// e.g. `http://127.0.0.1:4646`.
    pub address: String,
    pub token: Option<String>,
    pub namespace: String,
    pub region: Option<String>,
    pub datacenters: Vec<String>,
    /// The task driver: `exec` (chroot + cgroups, the binary on the node), or `docker`.
    pub task_driver: String,
    /// For `docker`: the image holding the agent.
    pub image: Option<String>,
    pub retry: RetryPolicy,
    /// How long a start waits for the allocation to be placed.
    pub placement_timeout: Duration,
}

impl NomadConfig {
    pub fn new(address: &str) -> NomadConfig {
        NomadConfig {
            address: address.trim_end_matches('/').to_string(),
            token: None,
            namespace: "default".into(),
            region: None,
            datacenters: vec!["*".into()],
            task_driver: "exec".into(),
            image: None,
            retry: RetryPolicy {
                max_attempts: 4,
                base_delay: Duration::from_millis(200),
                max_wait: Duration::from_secs(5),
            },
            placement_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone)]
pub struct NomadDriver {
    config: std::sync::Arc<NomadConfig>,
    client: reqwest::Client,
}

/// The parts of an allocation (or its list stub) the driver reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Allocation {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "JobID")]
    job_id: String,
    #[serde(default)]
    client_status: String,
    #[serde(default)]
    desired_status: String,
    #[serde(default)]
    client_description: String,
    #[serde(default)]
    task_states: Option<BTreeMap<String, TaskState>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TaskState {
    #[serde(default)]
    events: Option<Vec<TaskEvent>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TaskEvent {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(default)]
    exit_code: i32,
    #[serde(default)]
    signal: i32,
    #[serde(default)]
    display_message: String,
    #[serde(default)]
    details: Option<BTreeMap<String, String>>,
}

impl Allocation {
    fn last_exit(&self) -> Option<&TaskEvent> {
        self.task_states
            .as_ref()?
            .values()
            .filter_map(|t| t.events.as_ref())
            .flatten()
            .rfind(|e| e.kind == "Terminated" || e.kind == "OOM Killed")
    }

    fn state(&self) -> State {
        match self.client_status.as_str() {
            "pending" => State::Pending,
            "running" => State::Running,
            "lost" => State::Lost,
            "failed" => State::Failed(
                self.task_states
                    .iter()
                    .flat_map(|t| t.values())
                    .filter_map(|t| t.events.as_ref())
                    .flatten()
                    .rfind(|e| !e.display_message.is_empty())
                    .map(|e| e.display_message.clone())
                    .or_else(|| Some(self.client_description.clone()).filter(|d| !d.is_empty()))
                    .unwrap_or_else(|| "failed".into()),
            ),
            "complete" => {
                let exit = self.last_exit();
                let code = exit.map_or(0, |e| {
                    if e.signal > 0 {
                        128 + e.signal
                    } else {
                        e.exit_code
                    }
                });
                let oom = exit.is_some_and(|e| {
                    e.kind == "OOM Killed"
                        || e.details
                            .as_ref()
                            .and_then(|d| d.get("oom_killed"))
                            .is_some_and(|v| v == "true")
                });
                let reason = if oom {
                    ExitReason::OutOfMemory
                } else if self.desired_status == "stop" || self.desired_status == "evict" {
                    ExitReason::Stopped
                } else {
                    ExitReason::Completed
                };
                State::Exited { code, reason }
            }
            // `unknown`: the client is disconnected and may come back (max_client_disconnect).
            _ => State::Pending,
        }
    }

    fn info(&self) -> ContainerInfo {
        ContainerInfo {
            id: self.id.clone(),
            name: self.job_id.clone(),
            state: self.state(),
        }
    }
}

fn unreachable(error: impl std::fmt::Display) -> OrchestratorError {
    OrchestratorError::Unreachable(error.to_string())
}

impl NomadDriver {
    pub fn new(config: NomadConfig, client: reqwest::Client) -> NomadDriver {
        NomadDriver {
            config: std::sync::Arc::new(config),
            client,
        }
    }

    /// The job Nomad runs for a spec (what `POST /v1/jobs` receives; `deploy/nomad/` has the
    /// same job as HCL).
    pub fn job(&self, spec: &ContainerSpec) -> Value {
        let c = &self.config;
        let (command, args) = spec
            .command
            .split_first()
            .map_or(("", &[][..]), |(c, a)| (c.as_str(), a));
        let mut task_config = json!({ "command": command, "args": args });
        if let Some(image) = &c.image {
            task_config["image"] = json!(image);
        }
        let memory_mb = spec.resources.memory_bytes.div_ceil(1024 * 1024);
        let mut job = json!({
            "ID": spec.name,
            "Name": spec.name,
            "Type": "batch",
            "Namespace": c.namespace,
            "Datacenters": c.datacenters,
            "Meta": { "polydev": "runtime" },
            "TaskGroups": [{
                "Name": "agent",
                "Count": 1,
                // A container that dies is destroyed and replaced by polydev, never restarted
                // or rescheduled by Nomad (a new one would be a different, unregistered agent).
                "RestartPolicy": { "Attempts": 0, "Mode": "fail" },
                "ReschedulePolicy": { "Attempts": 0, "Unlimited": false },
                "EphemeralDisk": { "SizeMB": 300 },
                "Tasks": [{
                    "Name": "agent",
                    "Driver": c.task_driver,
                    "Config": task_config,
                    "Env": spec.env,
                    "Resources": {
                        "CPU": spec.resources.cpu_mhz,
                        "MemoryMB": memory_mb,
                    },
                    "KillTimeout": 5_000_000_000u64,
                }],
            }],
        });
        if let Some(region) = &c.region {
            job["Region"] = json!(region);
        }
        job
    }

    /// The address, `path`, and the query: namespace, region, then `query`.
    fn url_with(&self, path: &str, query: &[(&str, String)]) -> reqwest::Url {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.config.address))
            .unwrap_or_else(|_| reqwest::Url::parse("http://invalid.nomad.address/").unwrap());
        url.query_pairs_mut()
            .extend_pairs(self.scope())
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        url
    }

    /// One API call with the retry policy; `Ok(None)` is a 404.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<(Value, Option<u64>)>> {
        let outcome = self
            .config
            .retry
            .run(
                || async {
                    let mut request = self
                        .client
                        .request(method.clone(), self.url_with(path, query))
                        .timeout(Duration::from_secs(70));
                    if let Some(token) = &self.config.token {
                        request = request.header("X-Nomad-Token", token);
                    }
                    if let Some(body) = body {
                        request = request.json(body);
                    }
                    request.send().await
                },
                |outcome| match outcome {
                    Err(_) => Verdict::Retry { after: None },
                    Ok(r)
                        if r.status() == StatusCode::TOO_MANY_REQUESTS
                            || r.status().is_server_error() =>
                    {
                        Verdict::Retry {
                            after: crate::retry::retry_after(r.headers()),
                        }
                    }
                    Ok(_) => Verdict::Done,
                },
                |_, attempt, wait| {
                    tracing::debug!(path, attempt, ?wait, "retrying a Nomad call");
                },
            )
            .await;
        let response = outcome.map_err(unreachable)?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let index = response
            .headers()
            .get("X-Nomad-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let text = response.text().await.map_err(unreachable)?;
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(unreachable(format!("{status}: {}", text.trim())));
        }
        if !status.is_success() {
            return Err(OrchestratorError::Refused(format!(
                "Nomad {method} {path}: {status}: {}",
                text.trim()
            )));
        }
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|e| OrchestratorError::Refused(format!("Nomad {path}: not JSON: {e}")))?
        };
        Ok(Some((value, index)))
    }

    fn scope(&self) -> Vec<(&'static str, String)> {
        let mut scope = vec![("namespace", self.config.namespace.clone())];
        if let Some(region) = &self.config.region {
            scope.push(("region", region.clone()));
        }
        scope
    }

    async fn allocation(&self, id: &str) -> Result<Option<Allocation>> {
        let Some((value, _)) = self
            .call(Method::GET, &format!("/v1/allocation/{id}"), &[], None)
            .await?
        else {
            return Ok(None);
        };
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| OrchestratorError::Refused(format!("allocation {id}: {e}")))
    }

    async fn start_job(&self, spec: ContainerSpec) -> Result<String> {
        let job = self.job(&spec);
        self.call(Method::POST, "/v1/jobs", &[], Some(&json!({ "Job": job })))
            .await?
            .ok_or_else(|| OrchestratorError::Refused("POST /v1/jobs: 404".into()))?;
        // Wait for placement with blocking queries (bounded).
        let deadline = tokio::time::Instant::now() + self.config.placement_timeout;
        let mut index = 0u64;
        let path = format!("/v1/job/{}/allocations", spec.name);
        while tokio::time::Instant::now() < deadline {
            let query = [("index", index.to_string()), ("wait", "5s".to_string())];
            if let Some((value, new_index)) = self.call(Method::GET, &path, &query, None).await? {
                let allocations: Vec<Allocation> = serde_json::from_value(value)
                    .map_err(|e| OrchestratorError::Refused(format!("{path}: {e}")))?;
                if let Some(allocation) = allocations.first() {
                    if let Some(limit) = spec.resources.wall_clock {
                        self.stop_after(allocation.id.clone(), limit);
                    }
                    return Ok(allocation.id.clone());
                }
                // A server that ignores blocking queries must not make this spin.
                match new_index {
                    Some(i) if i > index => index = i,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        let _ = self.purge_job(&spec.name).await;
        Err(OrchestratorError::Refused(format!(
            "Nomad did not place {} within {:?}",
            spec.name, self.config.placement_timeout
        )))
    }

    fn stop_after(&self, id: String, limit: Duration) {
        let driver = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            if let Err(error) = driver.stop_allocation(&id).await {
                tracing::warn!(%id, %error, "stopping a Nomad allocation past its wall clock");
            }
        });
    }

    async fn purge_job(&self, job: &str) -> Result<()> {
        self.call(
            Method::DELETE,
            &format!("/v1/job/{job}"),
            &[("purge", "true".into())],
            None,
        )
        .await?;
        Ok(())
    }

    async fn stop_allocation(&self, id: &str) -> Result<()> {
        match self.allocation(id).await? {
            Some(allocation) => self.purge_job(&allocation.job_id).await,
            None => Ok(()),
        }
    }

    async fn list_allocations(&self) -> Result<Vec<ContainerInfo>> {
        let Some((value, _)) = self.call(Method::GET, "/v1/allocations", &[], None).await? else {
            return Ok(Vec::new());
        };
        let allocations: Vec<Allocation> = serde_json::from_value(value)
            .map_err(|e| OrchestratorError::Refused(format!("/v1/allocations: {e}")))?;
        Ok(allocations
            .iter()
            .filter(|a| a.job_id.starts_with(NAME_PREFIX))
            .map(Allocation::info)
            .collect())
    }

    /// Streams allocation events into `sender` until it is closed, reconnecting (from the last
    /// index seen) with the retry policy's backoff when the stream breaks.
    async fn pump_events(self, sender: tokio::sync::mpsc::Sender<Event>) {
        let mut index = 0u64;
        let mut failures = 0u32;
        while !sender.is_closed() {
            let mut request = self.client.get(self.url_with(
                "/v1/event/stream",
                &[("topic", "Allocation".into()), ("index", index.to_string())],
            ));
            if let Some(token) = &self.config.token {
                request = request.header("X-Nomad-Token", token);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    failures = 0;
                    let mut body = response.bytes_stream();
                    let mut buffer = Vec::new();
                    loop {
                        let chunk = tokio::select! {
                            chunk = body.next() => chunk,
                            () = sender.closed() => return,
                        };
                        let Some(Ok(chunk)) = chunk else { break };
                        let chunk: bytes::Bytes = chunk;
                        buffer.extend_from_slice(&chunk);
                        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buffer.drain(..=end).collect();
                            for event in parse_event_line(&line, &mut index) {
                                if sender.send(event).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                Ok(response) => {
                    tracing::warn!(status = %response.status(), "Nomad event stream refused");
                    failures += 1;
                }
                Err(error) => {
                    tracing::debug!(%error, "Nomad event stream unreachable");
                    failures += 1;
                }
            }
            let wait = self
                .config
                .retry
                .backoff(1, None)
                .unwrap_or(Duration::from_millis(200))
                .saturating_mul(failures.clamp(1, 10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = sender.closed() => return,
            }
        }
    }
}

/// One NDJSON line of the event stream: `{}` is a heartbeat; otherwise `{"Index", "Events":
/// [{"Topic", "Type", "Key", "Index", "Payload": {"Allocation": {...}}}]}`.
fn parse_event_line(line: &[u8], index: &mut u64) -> Vec<Event> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Frame {
        #[serde(default)]
        index: u64,
        #[serde(default)]
        events: Vec<RawEvent>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RawEvent {
        #[serde(default)]
        topic: String,
        #[serde(default)]
        payload: Option<Payload>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Payload {
        allocation: Option<Allocation>,
    }
    let Ok(frame) = serde_json::from_slice::<Frame>(line) else {
        return Vec::new();
    };
    *index = (*index).max(frame.index);
    frame
        .events
        .into_iter()
        .filter(|e| e.topic == "Allocation")
        .filter_map(|e| e.payload?.allocation)
        .filter(|a| a.job_id.starts_with(NAME_PREFIX))
        .map(|a| {
            let info = a.info();
            Event {
                id: info.id,
                name: info.name,
                state: info.state,
            }
        })
        .collect()
}

impl Orchestrator for NomadDriver {
    fn driver(&self) -> &'static str {
        "nomad"
    }

    fn start(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<String>> {
        Box::pin(self.start_job(spec))
    }

    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.stop_allocation(id))
    }

    fn set_proxy<'a>(
        &'a self,
        _id: &'a str,
        _proxy: Option<SocketAddr>,
    ) -> BoxFuture<'a, Result<()>> {
        // Egress on Nomad is the cluster's network policy (docs/runtime.md); the agent hands
        // the user's proxy to each job.
        Box::pin(async { Ok(()) })
    }

    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ContainerInfo>>> {
        Box::pin(async move { Ok(self.allocation(id).await?.map(|a| a.info())) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>>> {
        Box::pin(self.list_allocations())
    }

    fn events(&self) -> BoxStream<'static, Event> {
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        tokio::spawn(self.clone().pump_events(sender));
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|event| (event, receiver))
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_skipped_and_allocation_events_read() {
        let mut index = 0;
        assert!(parse_event_line(b"{}\n", &mut index).is_empty());
        let line = br#"{"Index":7,"Events":[{"Topic":"Allocation","Type":"AllocationUpdated","Key":"a1","Index":7,"Payload":{"Allocation":{"ID":"a1","JobID":"polydev-x","ClientStatus":"failed","TaskStates":{"agent":{"State":"dead","Failed":true,"Events":[{"Type":"Driver Failure","DisplayMessage":"no such binary"}]}}}}},{"Topic":"Allocation","Payload":{"Allocation":{"ID":"a2","JobID":"someone-else","ClientStatus":"running"}}}]}"#;
        let events = parse_event_line(line, &mut index);
        assert_eq!(index, 7);
        assert_eq!(events.len(), 1, "other jobs are not ours");
        assert_eq!(events[0].state, State::Failed("no such binary".into()));
    }

    #[test]
    fn exit_codes_signals_and_oom_are_read_from_task_events() {
        let alloc = |status: &str, desired: &str, event: Value| -> Allocation {
            serde_json::from_value(json!({
                "ID": "a", "JobID": "polydev-x", "ClientStatus": status,
                "DesiredStatus": desired,
                "TaskStates": {"agent": {"Events": [event]}}
            }))
            .unwrap()
        };
        assert_eq!(
            alloc(
                "complete",
                "run",
                json!({"Type": "Terminated", "ExitCode": 3})
            )
            .state(),
            State::Exited {
                code: 3,
                reason: ExitReason::Completed
            }
        );
        assert_eq!(
            alloc(
                "complete",
                "stop",
                json!({"Type": "Terminated", "Signal": 9})
            )
            .state(),
            State::Exited {
                code: 137,
                reason: ExitReason::Stopped
            }
        );
        assert_eq!(
            alloc(
                "complete",
                "run",
                json!({"Type": "Terminated", "ExitCode": 137, "Details": {"oom_killed": "true"}})
            )
            .state(),
            State::Exited {
                code: 137,
                reason: ExitReason::OutOfMemory
            }
        );
        assert_eq!(alloc("lost", "stop", json!({})).state(), State::Lost);
    }
}
