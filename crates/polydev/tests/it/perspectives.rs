//! get_perspectives against real PostgreSQL and a mock upstream: fan-out, quotas, usage rows,
//! deadline, cancellation, month rollover, idempotency.

use std::sync::Arc;
use std::time::Duration;

use polydev::accounts::{self, Plan};
use polydev::db::Pools;
use polydev::error::Error;
use polydev::perspectives::provider::ErrorClass;
use polydev::perspectives::{
    Gateway, PerspectivesRequest, Progress, ProgressSink, Status, get_perspectives,
};
use polydev_mock::{MockUpstream, answer_for};
use uuid::Uuid;

use crate::common::{TestDb, eventually, mock_gateway};

/// The user's counters against their usage rows this month: messages = calls with a usage row,
/// each tier = its usage rows.
pub async fn ledger(
    pool: &sqlx::PgPool,
    user: Uuid,
) -> ((i32, i32, i32, i32), (i32, i32, i32, i32)) {
    let counters: (i32, i32, i32, i32) = sqlx::query_as(
        "SELECT messages_used, premium_perspectives_used, normal_perspectives_used, eco_perspectives_used
           FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap();
    let usage: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT session_id), count(*) FILTER (WHERE model_tier = 'premium'),
                count(*) FILTER (WHERE model_tier = 'normal'), count(*) FILTER (WHERE model_tier = 'eco')
           FROM perspective_usage WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap();
    (
        counters,
        (
            usage.0 as i32,
            usage.1 as i32,
            usage.2 as i32,
            usage.3 as i32,
        ),
    )
}

fn ask(models: &[&str]) -> PerspectivesRequest {
    PerspectivesRequest {
        prompt: "Is it worth rewriting our queue in Rust?".into(),
        models: Some(models.iter().map(|m| m.to_string()).collect()),
        max_perspectives: None,
        temperature: None,
        max_tokens: None,
        exclude_providers: vec![],
        request_providers: vec![],
        deadline_ms: None,
        idempotency_key: None,
        ..Default::default()
    }
}

struct Fixture {
    db: TestDb,
    mock: MockUpstream,
    gateway: Arc<Gateway>,
    user: Uuid,
}

async fn fixture(plan: Plan) -> Fixture {
    let db = TestDb::migrated().await;
    let mock = MockUpstream::start().await;
    let gateway = Arc::new(mock_gateway(&mock.base_url()));
    let user = accounts::create_user(&db.pool, "p@example.com", plan)
        .await
        .unwrap()
        .user_id;
    Fixture {
        db,
        mock,
        gateway,
        user,
    }
}

impl Fixture {
    /// get_perspectives for the fixture's user, without progress events.
    async fn call(
        &self,
        request: &PerspectivesRequest,
    ) -> Result<polydev::perspectives::PerspectivesResult, Error> {
        get_perspectives(
            Pools::single(&self.db.pool),
            &self.gateway,
            self.user,
            request,
            ProgressSink::none(),
        )
        .await
    }
}

/// (messages, premium, normal, eco) used this month.
async fn used(db: &TestDb, user: Uuid) -> (i32, i32, i32, i32) {
    sqlx::query_as(
        "SELECT messages_used, premium_perspectives_used, normal_perspectives_used, eco_perspectives_used
           FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn usage_rows(db: &TestDb, user: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// model, tier, provider, input, output, total, cost, deducted, request_metadata, session_id
type UsageRow = (
    String,
    String,
    String,
    i32,
    i32,
    i32,
    String,
    i32,
    serde_json::Value,
    String,
);

/// Waits (bounded) for background refunds of dropped calls to land.
async fn eventually_used(db: &TestDb, user: Uuid, expected: (i32, i32, i32, i32)) {
    eventually(|| async { used(db, user).await == expected }).await;
    assert_eq!(used(db, user).await, expected);
}

#[tokio::test]
async fn three_providers_answer_in_parallel_and_each_answer_is_billed_exactly() {
    let f = fixture(Plan::Pro).await;
    let request = ask(&["gpt-premium", "claude-normal", "gemini-eco"]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let result = get_perspectives(
        Pools::single(&f.db.pool),
        &f.gateway,
        f.user,
        &request,
        ProgressSink::new(tx),
    )
    .await
    .unwrap();
    assert_eq!(result.totals.succeeded, 3);
    for p in &result.perspectives {
        let (text, input, output) = answer_for(&p.model, &request.prompt);
        assert_eq!(p.status, Status::Ok);
        assert_eq!(p.text.as_deref(), Some(text.as_str()));
        assert_eq!(
            (p.input_tokens, p.output_tokens),
            (Some(input), Some(output))
        );
    }
    let mut finished = 0;
    while let Ok(event) = rx.try_recv() {
        if matches!(event, Progress::Finished(_)) {
            finished += 1;
        }
    }
    assert_eq!(finished, 3, "a progress event per model");

    assert_eq!(used(&f.db, f.user).await, (1, 1, 1, 1));
    let rows: Vec<UsageRow> = sqlx::query_as(
        "SELECT model_name, model_tier, provider, input_tokens, output_tokens, total_tokens,
                estimated_cost::text, perspectives_deducted, request_metadata, session_id
           FROM perspective_usage WHERE user_id = $1 ORDER BY model_name",
    )
    .bind(f.user)
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3);
    let mut total_cost = 0f64;
    for (model, tier, _provider, input, output, total, cost, deducted, meta, session) in &rows {
        let (_, i, o) = answer_for(model, &request.prompt);
        assert_eq!(
            (*input, *output, *total),
            (i as i32, o as i32, (i + o) as i32),
            "{model}"
        );
        assert_eq!(*deducted, 1);
        // $2.50 per M input, $10 per M output, exactly.
        let expected = format!(
            "{}",
            (i as u128 * 2_500_000 + o as u128 * 10_000_000) as f64 / 1e12
        );
        assert_eq!(
            cost.parse::<f64>().unwrap().to_string(),
            expected,
            "{model}"
        );
        total_cost += cost.parse::<f64>().unwrap();
        assert_eq!(meta["status"], "ok");
        assert!(meta["latency_ms"].is_u64());
        assert_eq!(session, &result.request_id.to_string());
        assert!(["premium", "normal", "eco"].contains(&tier.as_str()));
    }
    assert_eq!(result.totals.cost_usd.parse::<f64>().unwrap(), total_cost);
    let leaked: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM perspective_usage p WHERE p::text LIKE '%rewriting our queue%' OR p::text LIKE '%thinks about%')",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert!(!leaked, "neither prompt nor answer is stored");
    assert!(
        result
            .to_text()
            .contains("## gpt-premium (openai, premium)")
    );
}

#[tokio::test]
async fn one_failing_model_never_fails_the_others_and_costs_nothing() {
    let f = fixture(Plan::Pro).await;
    let result = get_perspectives(
        Pools::single(&f.db.pool),
        &f.gateway,
        f.user,
        &ask(&["broken-premium", "bad-request-normal", "gemini-eco"]),
        ProgressSink::none(),
    )
    .await
    .unwrap();
    let by_model = |m: &str| {
        result
            .perspectives
            .iter()
            .find(|p| p.model == m)
            .unwrap()
            .clone()
    };
    assert_eq!(by_model("gemini-eco").status, Status::Ok);
    assert_eq!(
        by_model("broken-premium").error.unwrap().class,
        ErrorClass::Upstream
    );
    assert_eq!(
        by_model("bad-request-normal").error.unwrap().class,
        ErrorClass::BadRequest
    );
    assert_eq!(
        used(&f.db, f.user).await,
        (1, 0, 0, 1),
        "failed calls gave their reservation back"
    );
    assert_eq!(usage_rows(&f.db, f.user).await, 1);

    // Nothing answered: the message is given back too.
    let result = f.call(&ask(&["broken-premium"])).await.unwrap();
    assert_eq!(result.totals.succeeded, 0);
    assert_eq!(used(&f.db, f.user).await, (1, 0, 0, 1));
}

#[tokio::test]
async fn concurrent_calls_against_a_small_limit_grant_exactly_the_limit() {
    let f = fixture(Plan::Free).await;
    sqlx::query("UPDATE user_perspective_quotas SET premium_perspectives_limit = 5, messages_per_month = NULL WHERE user_id = $1")
        .bind(f.user)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let (pool, gateway, user) = (f.db.pool.clone(), f.gateway.clone(), f.user);
            tokio::spawn(async move {
                get_perspectives(
                    Pools::single(&pool),
                    &gateway,
                    user,
                    &ask(&["gpt-premium"]),
                    ProgressSink::none(),
                )
                .await
            })
        })
        .collect();
    let (mut granted, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(result) if result.totals.succeeded == 1 => granted += 1,
            Err(Error::QuotaExceeded(message)) => {
                assert!(message.contains("premium perspectives limit"), "{message}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((granted, refused), (5, 25));
    assert_eq!(
        used(&f.db, f.user).await,
        (5, 5, 0, 0),
        "never over the limit; refused calls charge no message"
    );
    assert_eq!(
        usage_rows(&f.db, f.user).await,
        5,
        "one usage row per successful call, none lost"
    );
}

#[tokio::test]
async fn at_the_deadline_finished_answers_return_and_the_rest_time_out_uncharged() {
    let f = fixture(Plan::Pro).await;
    let mut request = ask(&["fast-premium", "slow-premium"]);
    request.deadline_ms = Some(1000);
    let result = f.call(&request).await.unwrap();
    let slow = result
        .perspectives
        .iter()
        .find(|p| p.model == "slow-premium")
        .unwrap();
    assert_eq!(slow.status, Status::Timeout);
    assert_eq!(slow.error.as_ref().unwrap().class, ErrorClass::Timeout);
    let fast = result
        .perspectives
        .iter()
        .find(|p| p.model == "fast-premium")
        .unwrap();
    assert_eq!(fast.status, Status::Ok);
    // Refunds for timed-out models happen before the call returns.
    assert_eq!(used(&f.db, f.user).await, (1, 1, 0, 0));
    assert_eq!(usage_rows(&f.db, f.user).await, 1);
    eventually(|| async { f.mock.stats().abandoned() >= 1 }).await;
    assert_eq!(
        f.mock.stats().abandoned(),
        1,
        "the slow upstream call was aborted"
    );
}

#[tokio::test]
async fn cancelling_a_call_aborts_upstream_calls_and_refunds_them() {
    let f = fixture(Plan::Pro).await;
    let request = ask(&["slow-premium", "gemini-eco"]);
    let call = f.call(&request);
    // Cancel (drop) once the slow model is in flight.
    let cancelled = tokio::time::timeout(Duration::from_millis(700), call).await;
    assert!(cancelled.is_err(), "the call was still running");
    // gemini-eco answered and was charged, and its usage row paid the message: the ledger
    // (usage rows) and the counters agree.
    eventually_used(&f.db, f.user, (1, 0, 0, 1)).await;
    eventually(|| async { f.mock.stats().abandoned() >= 1 }).await;
    assert_eq!(f.mock.stats().abandoned(), 1);
}

#[tokio::test]
async fn the_first_call_in_a_new_month_resets_the_counters() {
    let f = fixture(Plan::Free).await;
    // Last month the user used everything.
    sqlx::query(
        "UPDATE user_perspective_quotas
            SET current_month_start = (date_trunc('month', current_date) - interval '1 month')::date,
                messages_used = 200, premium_perspectives_used = 10, normal_perspectives_used = 40,
                eco_perspectives_used = 150, last_reset_date = current_date - 40
          WHERE user_id = $1",
    )
    .bind(f.user)
    .execute(&f.db.pool)
    .await
    .unwrap();
    let result = f.call(&ask(&["gpt-premium"])).await.unwrap();
    assert_eq!(result.totals.succeeded, 1);
    assert_eq!(used(&f.db, f.user).await, (1, 1, 0, 0));
    let (start, reset): (chrono::NaiveDate, chrono::NaiveDate) = sqlx::query_as(
        "SELECT current_month_start, last_reset_date FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(f.user)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    let today = chrono::Utc::now().date_naive();
    assert_eq!(start, polydev::quota::month_start(today));
    assert_eq!(reset, today);
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_first_result_and_charges_once() {
    let f = fixture(Plan::Pro).await;
    let mut request = ask(&["gpt-premium", "claude-normal"]);
    request.idempotency_key = Some("retry-1".into());
    let first = f.call(&request).await.unwrap();
    let second = f.call(&request).await.unwrap();
    assert!(!first.replayed && second.replayed);
    assert_eq!(first.request_id, second.request_id);
    assert_eq!(first.perspectives, second.perspectives);
    assert_eq!(used(&f.db, f.user).await, (1, 1, 1, 0));
    assert_eq!(usage_rows(&f.db, f.user).await, 2);
    assert_eq!(f.mock.stats().started(), 2, "no upstream call on replay");

    // Concurrent retries with a fresh key also run once.
    request.idempotency_key = Some("retry-2".into());
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let (pool, gateway, user, request) = (
                f.db.pool.clone(),
                f.gateway.clone(),
                f.user,
                request.clone(),
            );
            tokio::spawn(async move {
                get_perspectives(
                    Pools::single(&pool),
                    &gateway,
                    user,
                    &request,
                    ProgressSink::none(),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut replays = 0;
    for call in calls {
        replays += usize::from(call.await.unwrap().replayed);
    }
    assert_eq!(replays, 4);
    assert_eq!(used(&f.db, f.user).await, (2, 2, 2, 0));

    request.models = Some(vec!["gemini-eco".into()]);
    let reused = f.call(&request).await;
    assert!(matches!(reused, Err(Error::Conflict(_))), "{reused:?}");
}

#[tokio::test]
async fn invalid_arguments_are_refused_with_a_clear_error_and_charge_nothing() {
    let f = fixture(Plan::Pro).await;
    let mut cases = Vec::new();
    let mut r = ask(&["no-such-model"]);
    cases.push((r.clone(), "unknown model"));
    r = ask(&["gpt-premium"]);
    r.prompt = "   ".into();
    cases.push((r.clone(), "prompt"));
    r = ask(&["gpt-premium"]);
    r.prompt = "x".repeat(100_001);
    cases.push((r.clone(), "limit"));
    r = ask(&["gpt-premium"]);
    r.temperature = Some(3.0);
    cases.push((r.clone(), "temperature"));
    r = ask(&["gpt-premium"]);
    r.deadline_ms = Some(10);
    cases.push((r.clone(), "deadline_ms"));
    r = ask(&["gpt-premium"]);
    r.exclude_providers = vec!["nope".into()];
    cases.push((r.clone(), "unknown provider"));
    r = ask(&["gpt-premium"]);
    r.idempotency_key = Some("has spaces".into());
    cases.push((r.clone(), "idempotency_key"));
    for (request, needle) in cases {
        let err = f.call(&request).await.unwrap_err();
        assert!(
            matches!(err, Error::Invalid(_) | Error::TooLarge(_)),
            "{err:?}"
        );
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    assert_eq!(used(&f.db, f.user).await, (0, 0, 0, 0));
    assert_eq!(f.mock.stats().started(), 0);
}

#[tokio::test]
async fn polydev_chooses_distinct_providers_by_tier_and_respects_exclusions() {
    let f = fixture(Plan::Pro).await;
    let mut request = ask(&[]);
    request.models = None;
    request.max_perspectives = Some(3);
    request.exclude_providers = vec!["openai".into()];
    let result = f.call(&request).await.unwrap();
    let models: Vec<&str> = result
        .perspectives
        .iter()
        .map(|p| p.model.as_str())
        .collect();
    // premium first (fast-premium: anthropic; slow/broken/gpt are openai, excluded), then
    // normal (bad-request-normal: google), then eco from a new provider (compat).
    assert_eq!(models, ["fast-premium", "bad-request-normal", "compat-eco"]);

    // The user's preferences come before the catalogue order.
    polydev::perspectives::put_settings(
        &f.db.pool,
        &f.gateway,
        f.user,
        &polydev::perspectives::PerspectiveSettings {
            preferred_models: vec!["gemini-eco".into()],
            max_perspectives: Some(1),
        },
    )
    .await
    .unwrap();
    request.max_perspectives = None;
    let result = f.call(&request).await.unwrap();
    assert_eq!(result.perspectives.len(), 1);
    assert_eq!(result.perspectives[0].model, "gemini-eco");

    // A tier with no quota left is skipped when polydev chooses.
    sqlx::query("UPDATE user_perspective_quotas SET eco_perspectives_used = eco_perspectives_limit WHERE user_id = $1")
        .bind(f.user)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let result = f.call(&request).await.unwrap();
    assert_ne!(result.perspectives[0].tier, "eco");
}

#[tokio::test]
async fn the_month_comes_from_the_database_clock_and_never_moves_backwards() {
    let f = fixture(Plan::Free).await;
    // Another replica (or the database) is already in the next month, with used counters: to
    // this process, whose clock says it is still the previous month, the row is "in the future".
    sqlx::query(
        "UPDATE user_perspective_quotas
            SET current_month_start = (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month')::date,
                messages_used = 3, premium_perspectives_used = 2
          WHERE user_id = $1",
    )
    .bind(f.user)
    .execute(&f.db.pool)
    .await
    .unwrap();
    let next_month: chrono::NaiveDate = sqlx::query_scalar(
        "SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month')::date",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    for _ in 0..2 {
        let result = f.call(&ask(&["gpt-premium"])).await.unwrap();
        assert_eq!(result.totals.succeeded, 1);
    }
    let start: chrono::NaiveDate = sqlx::query_scalar(
        "SELECT current_month_start FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(f.user)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(
        start, next_month,
        "current_month_start never moves backwards"
    );
    assert_eq!(
        used(&f.db, f.user).await,
        (5, 4, 0, 0),
        "the used-up counters of the later month were not reset"
    );
}

#[tokio::test]
async fn a_retry_after_the_result_could_not_be_stored_charges_nothing_again() {
    let f = fixture(Plan::Pro).await;
    // Storing the result fails (as a database blip after the models answered would).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_response() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'storage failure'; END $$;
         CREATE TRIGGER refuse_response BEFORE UPDATE ON perspective_idempotency
           FOR EACH ROW WHEN (NEW.response IS NOT NULL) EXECUTE FUNCTION refuse_response();",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();
    let mut request = ask(&["gpt-premium", "claude-normal", "broken-premium"]);
    request.idempotency_key = Some("store-fails".into());
    request.deadline_ms = Some(2000);
    let first = f.call(&request).await;
    assert_eq!(used(&f.db, f.user).await, (1, 1, 1, 0));
    sqlx::raw_sql("DROP TRIGGER refuse_response ON perspective_idempotency")
        .execute(&f.db.pool)
        .await
        .unwrap();

    // Retries (the broken model runs again; the two answers are not paid for again).
    for _ in 0..3 {
        let retry = tokio::time::timeout(Duration::from_secs(20), f.call(&request))
            .await
            .expect("the retry does not wait for the first call's deadline")
            .unwrap();
        assert_eq!(retry.totals.succeeded, 2);
        if let Ok(first) = &first {
            assert_eq!(retry.request_id, first.request_id);
        }
    }
    assert_eq!(used(&f.db, f.user).await, (1, 1, 1, 0), "charged once");
    assert_eq!(usage_rows(&f.db, f.user).await, 2);
    let (counters, usage) = ledger(&f.db.pool, f.user).await;
    assert_eq!(counters, usage);
}

#[tokio::test]
async fn a_cancelled_first_call_frees_its_key_at_once() {
    let f = fixture(Plan::Pro).await;
    let mut request = ask(&["slow-premium"]);
    request.idempotency_key = Some("cancelled".into());
    request.deadline_ms = Some(1500);
    let cancelled = tokio::time::timeout(Duration::from_millis(500), f.call(&request)).await;
    assert!(cancelled.is_err(), "the first call was still running");
    // The retry runs at once (not after the first call's deadline + 30 s).
    let retry = tokio::time::timeout(Duration::from_secs(10), f.call(&request))
        .await
        .expect("the key was released when the first call was dropped")
        .unwrap();
    assert!(!retry.replayed);
    assert_eq!(retry.perspectives[0].status, Status::Timeout);
}

#[tokio::test]
async fn a_second_call_with_a_running_key_is_told_in_progress() {
    let f = fixture(Plan::Pro).await;
    let gateway = Arc::new(
        mock_gateway(&f.mock.base_url()).with_idempotency_wait(Duration::from_millis(300)),
    );
    let mut request = ask(&["slow-premium"]);
    request.idempotency_key = Some("busy".into());
    let first = {
        let (pool, gateway, user, request) =
            (f.db.pool.clone(), gateway.clone(), f.user, request.clone());
        tokio::spawn(async move {
            get_perspectives(
                Pools::single(&pool),
                &gateway,
                user,
                &request,
                ProgressSink::none(),
            )
            .await
        })
    };
    assert!(eventually(|| async { f.mock.stats().started() >= 1 }).await);
    let second = get_perspectives(
        Pools::single(&f.db.pool),
        &gateway,
        f.user,
        &request,
        ProgressSink::none(),
    )
    .await;
    match second {
        Err(Error::InProgress { retry_after }) => assert!(retry_after >= Duration::from_secs(1)),
        other => panic!("expected in_progress, got {other:?}"),
    }
    let error = Error::InProgress {
        retry_after: Duration::from_secs(1),
    };
    assert_eq!(error.code(), "in_progress");
    let response = axum::response::IntoResponse::into_response(polydev::http::ApiError(error));
    assert_eq!(response.status(), axum::http::StatusCode::CONFLICT);
    assert_eq!(response.headers()["retry-after"], "1");
    first.abort();
}

#[tokio::test]
async fn a_call_in_which_every_model_failed_is_not_cached() {
    let f = fixture(Plan::Pro).await;
    let mut request = ask(&["broken-premium"]);
    request.idempotency_key = Some("all-failed".into());
    let first = f.call(&request).await.unwrap();
    assert_eq!(first.totals.succeeded, 0);
    let second = f.call(&request).await.unwrap();
    assert!(!second.replayed, "a failed call is run again, not replayed");
    assert_eq!(used(&f.db, f.user).await, (0, 0, 0, 0));
}

#[tokio::test]
async fn idempotency_rows_keep_no_answer_text_for_zero_knowledge_users_and_no_plain_hash() {
    let f = fixture(Plan::Pro).await;
    sqlx::query("UPDATE users SET zero_knowledge_enabled = true WHERE user_id = $1")
        .bind(f.user)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let mut request = ask(&["gpt-premium"]);
    request.idempotency_key = Some("zk".into());
    let first = f.call(&request).await.unwrap();
    let text = first.perspectives[0]
        .text
        .clone()
        .expect("the caller gets the answer");
    let (stored, hash): (String, String) = sqlx::query_as(
        "SELECT p::text, request_hash FROM perspective_idempotency p WHERE user_id = $1",
    )
    .bind(f.user)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert!(
        !stored.contains(text.trim()),
        "no answer text stored: {stored}"
    );
    // The hash is keyed: the plain SHA-256 of the arguments does not match it.
    use sha2::Digest;
    let mut plain = request.clone();
    plain.idempotency_key = None;
    let unkeyed = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&plain).unwrap()));
    assert_ne!(hash, unkeyed);
    let replay = f.call(&request).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.perspectives[0].text, None);
    assert!(replay.perspectives[0].text_withheld);
    assert_eq!(replay.perspectives[0].status, Status::Ok);
    assert!(replay.to_text().contains("not kept"));
    assert_eq!(used(&f.db, f.user).await, (1, 1, 0, 0));
}

#[tokio::test]
async fn the_sweeper_deletes_idempotency_keys_older_than_a_day() {
    let f = fixture(Plan::Pro).await;
    let mut request = ask(&["gpt-premium"]);
    request.idempotency_key = Some("old".into());
    f.call(&request).await.unwrap();
    request.idempotency_key = Some("new".into());
    f.call(&request).await.unwrap();
    sqlx::query("UPDATE perspective_idempotency SET created_at = now() - interval '25 hours' WHERE idempotency_key = 'old'")
        .execute(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(
        polydev::perspectives::sweep_idempotency(&f.db.pool)
            .await
            .unwrap(),
        1
    );
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM perspective_idempotency")
            .fetch_all(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(keys, ["new"]);
}

#[tokio::test]
async fn stale_reservations_are_refunded_once_and_live_ones_are_not() {
    let f = fixture(Plan::Pro).await;
    use polydev::quota::{self, Counter};
    // A call whose process died after reserving (its reservation is never settled).
    let dead = quota::reserve_all(
        &f.db.pool,
        f.user,
        Uuid::new_v4(),
        &[Counter::Messages, Counter::Premium],
    )
    .await
    .unwrap()
    .unwrap();
    sqlx::query("UPDATE quota_reservations SET created_at = now() - interval '1 hour'")
        .execute(&f.db.pool)
        .await
        .unwrap();
    let live = quota::reserve(&f.db.pool, f.user, Uuid::new_v4(), Counter::Eco)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(used(&f.db, f.user).await, (1, 1, 0, 1));
    let (a, b) = tokio::join!(
        quota::reconcile(&f.db.pool, Duration::from_secs(60)),
        quota::reconcile(&f.db.pool, Duration::from_secs(60))
    );
    assert_eq!(a.unwrap() + b.unwrap(), 2, "each stale unit refunded once");
    assert_eq!(used(&f.db, f.user).await, (0, 0, 0, 1));
    // A late refund of a unit the sweeper already gave back changes nothing.
    quota::refund(&f.db.pool, &dead[1]).await.unwrap();
    quota::refund(&f.db.pool, &live).await.unwrap();
    quota::refund(&f.db.pool, &live).await.unwrap();
    assert_eq!(used(&f.db, f.user).await, (0, 0, 0, 0));
}

/// A call with a 500 ms deadline on a 100 ms, a 900 ms and a failing model returns at its
/// deadline: the clock starts when the call does (its reservations are inside the deadline),
/// the failing model's retry backoff is not slept past the deadline (it reports its own
/// error, not a timeout), and the cut model is refunded before the call returns.
#[tokio::test]
async fn a_deadline_is_kept_with_a_slow_and_a_failing_model() {
    use polydev::perspectives::provider::{HttpProvider, Provider, RetryPolicy};
    let db = TestDb::migrated().await;
    let mock = MockUpstream::start().await;
    let model = |id: &str, upstream: &str| {
        format!(
            "[[models]]\nid = \"{id}\"\nprovider = \"openai\"\ntier = \"premium\"\ninput_price = \"1\"\noutput_price = \"1\"\ncontext_window = 1000\nupstream = \"{upstream}\"\n\n"
        )
    };
    let catalogue = polydev::perspectives::Catalogue::parse(&format!(
        "[providers.openai]\nkind = \"openai\"\nbase_url = \"{}/v1\"\n\n{}{}{}",
        mock.base_url(),
        model("m100", "a~delay100"),
        model("m900", "b~delay900"),
        model("failing", "c~status500"),
    ))
    .unwrap();
    // The second backoff (400-800 ms after the second attempt, which starts 200-400 ms in)
    // always ends past the deadline: a policy that ignored the deadline would be asleep at it.
    let retry = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(400),
        max_wait: Duration::from_secs(5),
    };
    let provider = HttpProvider::new(
        "openai",
        polydev::perspectives::catalogue::ProviderKind::Openai,
        &format!("{}/v1", mock.base_url()),
        Some("test-key".into()),
        true,
        polydev::net::http_client(),
    )
    .with_retry(retry);
    let gateway = Gateway::with_providers(
        catalogue,
        [(
            "openai".to_string(),
            Arc::new(provider) as Arc<dyn Provider>,
        )]
        .into(),
    );
    let user = accounts::create_user(&db.pool, "deadline@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;
    let mut request = ask(&["m100", "m900", "failing"]);
    request.deadline_ms = Some(500);
    let result = get_perspectives(
        Pools::single(&db.pool),
        &gateway,
        user,
        &request,
        ProgressSink::none(),
    )
    .await
    .unwrap();
    let status = |id: &str| {
        let p = result.perspectives.iter().find(|p| p.model == id).unwrap();
        (p.status, p.error.as_ref().map(|e| e.class))
    };
    assert_eq!(status("m100"), (Status::Ok, None));
    assert_eq!(status("m900"), (Status::Timeout, Some(ErrorClass::Timeout)));
    assert_eq!(
        status("failing"),
        (Status::Error, Some(ErrorClass::Upstream)),
        "the failing model gave up rather than sleeping past the deadline"
    );
    // A bound against waiting for the 900 ms model, not a timing measurement.
    assert!(
        result.totals.elapsed_ms < 900,
        "returned at the deadline, not with the slow model: {} ms",
        result.totals.elapsed_ms
    );
    // The message and m100 are charged; the cut m900 and the failing model are refunded.
    assert_eq!(used(&db, user).await, (1, 1, 0, 0));
    let (counters, usage) = ledger(&db.pool, user).await;
    assert_eq!(counters, usage);
    eventually(|| async { mock.stats().abandoned() >= 1 }).await;
    assert_eq!(mock.stats().abandoned(), 1, "the 900 ms call was cut");
}
