//! The runtime domain (docs/runtime.md): per-user containers that run the provider CLIs, warm
//! pools of them in `runtime_containers`, and sealed jobs in `job_executions`.
//!
//! - [`orchestrator`]: the trait a driver implements (start, stop, inspect, list, events).
//! - [`local`]: bubblewrap sandboxes on this machine (the default).

pub mod local;
pub mod orchestrator;

pub use local::{LocalConfig, LocalDriver};
pub use orchestrator::{
    ContainerInfo, ContainerSpec, Event, ExitReason, NetworkPolicy, Orchestrator,
    OrchestratorError, Resources, State,
};
