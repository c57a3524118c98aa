//! The OpenAPI document: the committed `docs/openapi.json` is what the code generates, every
//! route of the docs/api.md scope table is in it with the credentials the server asks for, and
//! `GET /openapi.json` serves it without a token.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::TestDb;
use crate::http_api::TestServer;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[test]
fn openapi_committed_copy_is_what_the_code_generates() {
    let committed = std::fs::read_to_string(repo_file("docs/openapi.json")).unwrap();
    assert!(
        committed == polydev::http::openapi_json(),
        "docs/openapi.json is stale: run `cargo run -q -- openapi > docs/openapi.json`"
    );
}

/// `(method, path, scope)` of the rows of the docs/api.md scope table (`none`: no token).
fn scope_table() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_file("docs/api.md")).unwrap();
    let section = text.split("## Scopes").nth(1).expect("a Scopes section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = Vec::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, route, scope, ..] = cells.as_slice() else {
            continue;
        };
        let Some(route) = route.strip_prefix('`') else {
            continue;
        };
        let route = route.split('`').next().unwrap();
        let Some((method, path)) = route.split_once(' ') else {
            continue;
        };
        rows.push((
            method.to_string(),
            path.to_string(),
            scope.trim_matches('`').to_string(),
        ));
    }
    assert!(rows.len() > 50, "the scope table was not found");
    rows
}

#[test]
fn openapi_has_every_route_of_the_scope_table_with_its_scope() {
    let spec = polydev::http::openapi_document();
    assert_eq!(spec["openapi"], "3.1.0");
    for (method, path, scope) in scope_table() {
        let operation = &spec["paths"][&path][method.to_ascii_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {path} is in docs/api.md but not in the OpenAPI document (http/openapi.rs)"
        );
        let security = &operation["security"];
        if scope == "none" {
            assert!(
                security.is_null(),
                "{method} {path} needs no token: {security}"
            );
        } else {
            assert_eq!(
                security[0]["bearer"][0], scope,
                "{method} {path}: the document's scope differs from docs/api.md"
            );
        }
    }
}

/// Every `$ref` of `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(target)) => out.push(target),
                    _ => refs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn openapi_references_resolve_and_operation_ids_are_unique() {
    let spec = polydev::http::openapi_document();
    let mut found = Vec::new();
    refs(&spec, &mut found);
    assert!(!found.is_empty());
    for target in found {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{target} points outside components/schemas"));
        assert!(
            spec["components"]["schemas"][name].is_object(),
            "{target} does not resolve"
        );
    }
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "{method} {path}: {id} twice");
        }
    }
    // The typed bodies come from the handlers' own types.
    let perspectives = &spec["paths"]["/v1/perspectives"]["post"];
    assert_eq!(
        perspectives["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/PerspectivesRequest"
    );
    assert!(
        spec["components"]["schemas"]["PerspectivesRequest"]["properties"]["prompt"].is_object()
    );
}

#[tokio::test]
async fn openapi_is_served_without_a_token() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let response = server.get("/openapi.json", None).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        response.text().await.unwrap(),
        polydev::http::openapi_json()
    );
}
