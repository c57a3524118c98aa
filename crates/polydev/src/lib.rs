//! Polydev: a multi-model AI "perspectives" server for IDEs over MCP.
//!
//! One module per domain (docs/architecture.md): each owns the SQL of its tables, and the
//! `http` layer stays thin.

pub mod accounts;
pub mod admin;
pub mod api;
pub mod app;
pub mod chat;
pub mod cli;
pub mod client;
pub mod db;
pub mod error;
pub mod http;
pub mod login;
pub mod mcp;
pub mod net;
pub mod oauth;
pub mod perspectives;
pub mod proxy;
pub mod quota;
pub mod retry;
pub mod runtime;
pub mod telemetry;
pub mod vault;
pub mod zk;
