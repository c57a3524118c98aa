//! MCP: the tools (`get_perspectives`, `list_available_models`, `get_usage`), served over
//! streamable HTTP at `/mcp` ([`server`]) and bridged to stdio by `polydev mcp` ([`bridge`]).

pub mod bridge;
pub mod local;
pub mod server;
pub mod sessions;

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

use crate::perspectives::{ModelResult, PerspectivesRequest, PerspectivesResult, Status};

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

/// `get_perspectives`'s output: its result, or (with `isError`) the error body every surface
/// sends. Clients such as the official TypeScript SDK validate `structuredContent` against the
/// output schema even for tool errors, so the schema names both shapes.
fn perspectives_output_schema() -> Arc<JsonObject> {
    let mut result = (*schema_for_output::<PerspectivesResult>()).clone();
    let defs = result.remove("$defs");
    result.remove("$schema");
    let error = serde_json::json!({
        "type": "object",
        "required": ["error"],
        "properties": { "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": { "code": { "type": "string" }, "message": { "type": "string" } }
        } }
    });
    let mut schema = serde_json::json!({ "type": "object", "anyOf": [result, error] });
    if let (Some(defs), serde_json::Value::Object(object)) = (defs, &mut schema) {
        object.insert("$defs".into(), defs);
    }
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
        .with_raw_output_schema(perspectives_output_schema())
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

/// The message of the progress notification for one finished model: its answer with latency,
/// tokens and cost, or its error (the same over HTTP and for `polydev mcp`'s local CLIs).
pub fn finished_message(model: &ModelResult) -> String {
    match (model.status, &model.text, &model.error) {
        (Status::Ok, Some(text), _) => format!(
            "{} ({} ms, {} in / {} out tokens, ${}):\n{}",
            model.model,
            model.latency_ms,
            model.input_tokens.unwrap_or(0),
            model.output_tokens.unwrap_or(0),
            model.cost_usd.as_deref().unwrap_or("0"),
            text
        ),
        (_, _, Some(error)) => format!("{}: {:?}: {}", model.model, model.status, error.message),
        _ => format!("{}: {:?}", model.model, model.status),
    }
}
