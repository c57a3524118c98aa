//! Provider adapters against a mock upstream speaking each provider's wire format.

use crate::common::eventually;
use std::sync::Mutex;

use polydev::perspectives::catalogue::ProviderKind;
use polydev::perspectives::provider::{
    CompletionRequest, ErrorClass, HttpProvider, Provider, RetryPolicy,
};
use polydev_mock::{MockUpstream, answer_for};

const KINDS: [ProviderKind; 3] = [
    ProviderKind::Openai,
    ProviderKind::Anthropic,
    ProviderKind::Gemini,
];

fn provider(mock: &MockUpstream, kind: ProviderKind, streaming: bool) -> HttpProvider {
    let base = match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => format!("{}/v1", mock.base_url()),
        _ => mock.base_url(),
    };
    HttpProvider::new(
        "mock",
        kind,
        &base,
        Some("test-key".into()),
        streaming,
        polydev::net::http_client(),
    )
    .with_retry(RetryPolicy {
        max_attempts: 3,
        base_delay: std::time::Duration::from_millis(5),
        max_wait: std::time::Duration::from_secs(2),
    })
}

fn request(model: &str) -> CompletionRequest {
    CompletionRequest::user(
        model,
        "Should I use a B-tree or an LSM tree for a write-heavy workload?",
        Some(0.2),
        256,
    )
}

#[tokio::test]
async fn every_format_answers_with_the_reported_usage_streaming_or_not() {
    let mock = MockUpstream::start().await;
    for kind in KINDS {
        for streaming in [false, true] {
            let req = request("model-a");
            let (text, input, output) =
                answer_for(&req.model, req.messages[0].content.as_deref().unwrap());
            let deltas = Mutex::new(Vec::new());
            let sink = |t: &str| deltas.lock().unwrap().push(t.to_string());
            let completion = provider(&mock, kind, streaming)
                .complete(&req, Some(&sink))
                .await
                .unwrap_or_else(|e| panic!("{kind:?} streaming={streaming}: {e}"));
            assert_eq!(completion.text, text, "{kind:?} {streaming}");
            assert_eq!(
                (completion.input_tokens, completion.output_tokens),
                (input, output),
                "{kind:?} {streaming}"
            );
            let deltas = deltas.into_inner().unwrap();
            if streaming {
                assert!(deltas.len() > 1, "{kind:?}: streamed in pieces");
                assert_eq!(deltas.concat(), text);
            } else {
                assert!(deltas.is_empty());
            }
        }
    }
}

#[tokio::test]
async fn errors_are_classified_and_only_transient_ones_retried() {
    for kind in KINDS {
        for streaming in [false, true] {
            let cases = [
                ("m~status400", ErrorClass::BadRequest, 1),
                ("m~status401", ErrorClass::Auth, 1),
                ("m~status429", ErrorClass::RateLimited, 3),
                ("m~status500", ErrorClass::Upstream, 3),
                ("m~status529", ErrorClass::Upstream, 3),
                ("m~malformed", ErrorClass::Malformed, 1),
                ("m~drop", ErrorClass::Connection, 3),
            ];
            for (model, class, attempts) in cases {
                let mock = MockUpstream::start().await;
                let err = provider(&mock, kind, streaming)
                    .complete(&request(model), None)
                    .await
                    .expect_err(model);
                assert_eq!(
                    err.class, class,
                    "{kind:?} streaming={streaming} {model}: {err}"
                );
                assert_eq!(
                    mock.stats().started(),
                    attempts,
                    "{kind:?} streaming={streaming} {model}: attempts"
                );
                if model.ends_with("400") {
                    assert!(
                        err.message.contains("mock status 400"),
                        "the provider's message is kept: {err}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn a_flaky_upstream_succeeds_within_the_retry_bound() {
    for kind in KINDS {
        let mock = MockUpstream::start().await;
        let completion = provider(&mock, kind, false)
            .complete(&request("m~flaky2"), None)
            .await;
        assert!(completion.is_ok(), "{kind:?}: {completion:?}");
        assert_eq!(mock.stats().started(), 3);
        let mock = MockUpstream::start().await;
        let err = provider(&mock, kind, false)
            .complete(&request("m~flaky3"), None)
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Upstream);
        assert_eq!(mock.stats().started(), 3, "never more than the bound");
    }
}

#[tokio::test]
async fn a_stream_without_usage_is_refused_rather_than_billed_wrong() {
    let mock = MockUpstream::start().await;
    for kind in KINDS {
        let err = provider(&mock, kind, true)
            .complete(&request("m~nousage"), None)
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Malformed, "{kind:?}");
    }
}

#[tokio::test]
async fn a_missing_key_is_not_configured_and_calls_nothing() {
    let mock = MockUpstream::start().await;
    let spec = polydev::perspectives::catalogue::ProviderSpec {
        kind: ProviderKind::Openai,
        base_url: format!("{}/v1", mock.base_url()),
        api_key_env: Some("POLYDEV_TEST_UNSET_KEY_VARIABLE".into()),
        streaming: true,
        cli: None,
        program: None,
    };
    let provider = HttpProvider::from_spec("openai", &spec, polydev::net::http_client());
    assert!(!provider.is_configured());
    let err = provider.complete(&request("m"), None).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::NotConfigured);
    assert_eq!(mock.stats().started(), 0);
}

#[tokio::test]
async fn dropping_a_call_aborts_the_upstream_request() {
    let mock = MockUpstream::start().await;
    for kind in KINDS {
        let p = provider(&mock, kind, true);
        let req = request("m~delay10000");
        let call = p.complete(&req, None);
        let _ = tokio::time::timeout(std::time::Duration::from_millis(300), call).await;
    }
    eventually(|| async { mock.stats().abandoned() == 3 }).await;
    assert_eq!(
        mock.stats().abandoned(),
        3,
        "the upstream saw each request abandoned"
    );
}
