//! MCP: the tools (`get_perspectives`, `list_available_models`, `get_usage`), served over
//! streamable HTTP at `/mcp` ([`server`]) and bridged to stdio by `polydev mcp` ([`bridge`]).

pub mod bridge;
pub mod server;

/// The `ServerHandler` methods both servers answer the same way, from static definitions:
/// `get_info`, `list_tools`, `get_tool`.
macro_rules! static_tool_handlers {
    () => {
        fn get_info(&self) -> rmcp::model::ServerConfig {
            super::server_info()
        }

        async fn list_tools(
            &self,
            _request: Option<rmcp::model::PaginatedRequestParams>,
            _ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
        ) -> Result<rmcp::model::ListToolsResult, rmcp::ErrorData> {
            Ok(rmcp::model::ListToolsResult::with_all_items(super::tools()))
        }

        fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
            super::tools().into_iter().find(|t| t.name == name)
        }
    };
}
use static_tool_handlers;

use std::sync::Arc;

use rmcp::handler::server::tool::{schema_for_input, schema_for_output};
use rmcp::model::{
    Implementation, JsonObject, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};

use crate::perspectives::{PerspectivesRequest, PerspectivesResult};

pub const GET_PERSPECTIVES: &str = "get_perspectives";
pub const LIST_MODELS: &str = "list_available_models";
pub const GET_USAGE: &str = "get_usage";

/// The server's identity and capabilities, the same over HTTP and stdio.
#[allow(deprecated)] // logging: see server.rs
pub fn server_info() -> ServerConfig {
    ServerConfig::new(
        ServerCapabilities::builder()
            .enable_tools()
            .enable_logging()
            .build(),
    )
    .with_server_info(Implementation::new("polydev", env!("CARGO_PKG_VERSION")))
    .with_instructions(
        "Ask several frontier models the same question in parallel with get_perspectives; \
             each answer comes back with its model, latency, tokens and cost.",
    )
}

fn no_arguments() -> Arc<JsonObject> {
    let schema =
        serde_json::json!({ "type": "object", "properties": {}, "additionalProperties": false });
    let serde_json::Value::Object(object) = schema else {
        unreachable!()
    };
    Arc::new(object)
}

/// The tool definitions. Static: `polydev mcp` answers `tools/list` from these without a
/// network call.
pub fn tools() -> Vec<Tool> {
    let input = schema_for_input::<PerspectivesRequest>().expect("the request schema is an object");
    vec![
        Tool::new(
            GET_PERSPECTIVES,
            "Ask several AI models (OpenAI, Anthropic, Google, and more) the same prompt in \
             parallel and get every answer with its model, latency, tokens and cost. Answers \
             stream back as progress notifications as each model finishes.",
            input,
        )
        .with_raw_output_schema(schema_for_output::<PerspectivesResult>())
        .with_annotations(ToolAnnotations::new().read_only(false).open_world(true)),
        Tool::new(
            LIST_MODELS,
            "List the models get_perspectives can use, with provider, tier, prices and availability.",
            no_arguments(),
        )
        .with_annotations(ToolAnnotations::new().read_only(true)),
        Tool::new(
            GET_USAGE,
            "Your plan, this month's quota per tier, and your usage and cost so far this month.",
            no_arguments(),
        )
        .with_annotations(ToolAnnotations::new().read_only(true)),
    ]
}
