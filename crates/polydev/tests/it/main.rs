//! Integration tests against real PostgreSQL (one binary, so the suite links once).

mod accounts;
pub mod accounts_web;
mod accounts_web_browser;
mod architecture;
mod common;
mod errors;
pub mod http_api;
mod mcp;
mod migrations;
pub mod oauth;
mod oauth_device;
mod perspectives;
mod providers;
mod scopes;
mod serve;
mod web;
pub mod zk;
