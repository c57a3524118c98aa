//! The runtime domain (docs/runtime.md): per-user containers that run the provider CLIs, warm
//! pools of them in `runtime_containers`, and sealed jobs in `job_executions`.
//!
//! - [`orchestrator`]: the trait a driver implements (start, stop, inspect, list, events).
//! - [`local`]: bubblewrap sandboxes on this machine (the default).
//! - [`nomad`]: HashiCorp Nomad's HTTP API.
//! - [`pool`]: warm pools, claims, the lifecycle, the reconcile loop.
//! - [`claims`]: the claim statement, shared by the claims that arrive together.
//! - [`jobs`]: sealed jobs: submit, follow, cancel; the agent's register, next, output, finish.
//! - [`grants`]: CLI credential grants, and CLI jobs the server runs for perspectives calls.

mod claims;
pub mod grants;
pub mod jobs;
pub mod local;
pub mod nomad;
pub mod orchestrator;
pub mod pool;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub use grants::{GrantView, GrantedOutput, GrantedRun, PutGrant};
pub use jobs::{Follow, Job, SubmitJob, UserKey};
pub use local::{LocalConfig, LocalDriver};
pub use nomad::{NomadConfig, NomadDriver};
pub use orchestrator::{
    Bind, ContainerInfo, ContainerSpec, Event, ExitReason, NetworkPolicy, Orchestrator,
    OrchestratorError, Resources, State,
};
pub use pool::{Claimed, LOGIN_NAME_PREFIX, Reconciled, Runtime, RuntimeConfig};

use crate::error::{Error, Result};

/// An X25519 public key as the API carries it: 32 bytes, base64url without padding.
pub fn check_public_key(key: &str) -> Result<()> {
    match URL_SAFE_NO_PAD.decode(key) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(Error::Invalid(
            "a public key is 32 bytes in base64url without padding".into(),
        )),
    }
}
