//! Integration tests against real PostgreSQL (one binary, so the suite links once).

mod accounts;
pub mod accounts_web;
mod accounts_web_browser;
mod architecture;
mod billing;
mod cli_backends;
mod common;
mod errors;
pub mod http_api;
mod lying_proxy;
mod mcp;
mod migrations;
mod no_provider;
pub mod oauth;
mod oauth_device;
pub mod perspectives;
mod providers;
pub mod runtime_jobs;
pub mod runtime_local;
pub mod runtime_nomad;
pub mod runtime_pool;
mod scopes;
mod serve;
mod web;
pub mod zk;
mod zk_lies;
