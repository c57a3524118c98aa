//! `get_perspectives`: ask the chosen models in parallel, each paid for by a quota reservation
//! taken before its upstream call and given back if the call fails, times out or is cancelled.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::catalogue::{Cost, ModelSpec};
use super::idempotency::{self, Claim};
use super::provider::{CompletionRequest, DeltaSink, ErrorClass};
use super::result::{ModelError, ModelResult, PerspectivesResult, ProgressSink, Status, Totals};
use super::usage::{self, UsageRecord};
use super::{Gateway, PerspectivesRequest, get_settings};
use crate::db::Pools;
use crate::error::{Error, Result};
use crate::quota::{self, Counter, ReservationGuard};

/// Runs `get_perspectives` for `user_id`, sending its progress events to `progress`. Dropping
/// the returned future cancels the upstream calls still running and gives their reservations
/// back.
pub async fn get_perspectives(
    pools: Pools<'_>,
    gateway: &Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    progress: ProgressSink,
) -> Result<PerspectivesResult> {
    request.validate(gateway)?;
    let pool = pools.durable;
    let deadline = Duration::from_millis(request.deadline_ms());
    let key = request.idempotency_key.as_deref();
    if let Some(key) = key {
        let hash = idempotency::request_hash(request);
        // A first call that has not finished well after its deadline has crashed: take over.
        let running_for = deadline + Duration::from_secs(30);
        if let Claim::Replay(result) =
            idempotency::claim(pool, user_id, key, &hash, running_for).await?
        {
            return Ok(*result);
        }
    }
    let result = run(pools, gateway, user_id, request, &progress, deadline).await;
    if let Some(key) = key {
        match &result {
            Ok(result) => idempotency::complete(pool, user_id, key, result).await?,
            Err(_) => idempotency::release(pool, user_id, key).await?,
        }
    }
    result
}

async fn run(
    pools: Pools<'_>,
    gateway: &Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    progress: &ProgressSink,
    deadline: Duration,
) -> Result<PerspectivesResult> {
    let started = Instant::now();
    let pool = pools.durable;
    let today = chrono::Utc::now().date_naive();
    // Settings and the quota snapshot only matter when polydev chooses the models.
    let models = if request.models.is_some() {
        request.choose(gateway, &Default::default(), None)
    } else {
        let settings = get_settings(pool, user_id).await?;
        let quota_state = quota::for_user(pool, user_id)
            .await?
            .map(|q| q.state(today));
        request.choose(gateway, &settings, quota_state.as_ref())
    };
    if models.is_empty() {
        return Err(Error::QuotaExceeded(
            "no model can run: every eligible tier's monthly quota is used up, or no provider is configured (see list_available_models)".into(),
        ));
    }
    // The common case in one atomic statement: the message and a perspective per model.
    let wants: Vec<Counter> = std::iter::once(Counter::Messages)
        .chain(models.iter().map(|m| Counter::for_tier(m.tier)))
        .collect();
    let (message, prepaid): (ReservationGuard, Vec<Option<ReservationGuard>>) =
        // Reservations commit without waiting for the WAL flush: the usage row's durable commit
        // later flushes them too (WAL is flushed in order); concurrency is unaffected.
        match quota::reserve_all(pools.relaxed, user_id, &wants, today).await? {
            Some(reservations) => {
                let mut guards = reservations
                    .into_iter()
                    .map(|r| ReservationGuard::new(pool, r));
                let message = guards.next().expect("the message was reserved");
                (message, guards.map(Some).collect())
            }
            // Some limit is reached: reserve the message alone, then each model on its own, so
            // the models that can run do and the others say which limit stopped them.
            None => match quota::reserve(pools.relaxed, user_id, Counter::Messages, today).await? {
                Ok(reservation) => (
                    ReservationGuard::new(pool, reservation),
                    models.iter().map(|_| None).collect(),
                ),
                Err(exhausted) => return Err(Error::QuotaExceeded(exhausted.to_string())),
            },
        };

    progress.started(&models);
    let request_id = Uuid::new_v4();
    let session_id = request_id.to_string();
    let cancel = CancellationToken::new();
    let call = ModelCall {
        pool,
        relaxed: pools.relaxed,
        gateway,
        user_id,
        request,
        session_id: &session_id,
        cancel: &cancel,
        progress,
        today,
    };
    let mut pending: FuturesUnordered<_> = models
        .iter()
        .zip(prepaid)
        .enumerate()
        .map(|(index, (model, prepaid))| {
            let call = &call;
            async move { (index, call.run(model, prepaid).await) }
        })
        .collect();
    let mut results: Vec<Option<ModelResult>> = vec![None; models.len()];
    let timer = tokio::time::sleep(deadline);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            next = pending.next() => match next {
                Some((index, result)) => {
                    progress.finished(&result);
                    results[index] = Some(result);
                }
                None => break,
            },
            // At the deadline the calls still running are cut; they give their quota back and
            // report `timeout`, and the loop drains them.
            () = &mut timer, if !cancel.is_cancelled() => cancel.cancel(),
        }
    }
    drop(pending);

    let perspectives: Vec<ModelResult> = results.into_iter().flatten().collect();
    let succeeded = perspectives
        .iter()
        .filter(|p| p.status == Status::Ok)
        .count();
    if succeeded > 0 {
        message.settle();
    } else {
        // No answer, no charge: the message goes back too.
        message.refund().await;
        if perspectives.iter().all(|p| p.status == Status::Skipped) {
            let reasons: Vec<String> = perspectives
                .iter()
                .filter_map(|p| {
                    p.error
                        .as_ref()
                        .map(|e| format!("{}: {}", p.model, e.message))
                })
                .collect();
            return Err(Error::QuotaExceeded(format!(
                "no model could run: {}",
                reasons.join("; ")
            )));
        }
    }
    let cost = perspectives
        .iter()
        .filter(|p| p.status == Status::Ok)
        .filter_map(|p| gateway.catalogue().model(&p.model).map(|m| (m, p)))
        .fold(Cost::default(), |sum, (m, p)| {
            sum + m.cost(
                p.input_tokens.unwrap_or(0).into(),
                p.output_tokens.unwrap_or(0).into(),
            )
        });
    let totals = Totals {
        models: perspectives.len(),
        succeeded,
        failed: perspectives.len() - succeeded,
        input_tokens: perspectives
            .iter()
            .filter_map(|p| p.input_tokens)
            .map(u64::from)
            .sum(),
        output_tokens: perspectives
            .iter()
            .filter_map(|p| p.output_tokens)
            .map(u64::from)
            .sum(),
        cost_usd: cost.to_string(),
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    Ok(PerspectivesResult {
        request_id,
        perspectives,
        totals,
        replayed: false,
    })
}

/// What every model call of one `get_perspectives` shares.
struct ModelCall<'a> {
    pool: &'a PgPool,
    relaxed: &'a PgPool,
    gateway: &'a Gateway,
    user_id: Uuid,
    request: &'a PerspectivesRequest,
    session_id: &'a str,
    cancel: &'a CancellationToken,
    progress: &'a ProgressSink,
    today: chrono::NaiveDate,
}

impl ModelCall<'_> {
    async fn run(&self, model: &ModelSpec, prepaid: Option<ReservationGuard>) -> ModelResult {
        let started = Instant::now();
        let mut result = ModelResult {
            model: model.id.clone(),
            provider: model.provider.clone(),
            tier: model.tier.as_str().to_string(),
            status: Status::Error,
            text: None,
            latency_ms: 0,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
            error: None,
        };
        let fail = |mut result: ModelResult, status: Status, class: ErrorClass, message: String| {
            result.status = status;
            result.latency_ms = started.elapsed().as_millis() as u64;
            result.error = Some(ModelError { class, message });
            result
        };
        let provider = match self.gateway.provider(&model.provider) {
            Some(provider) if self.gateway.is_configured(&model.provider) => provider,
            _ => {
                if let Some(unused) = prepaid {
                    unused.refund().await;
                }
                let message = format!("provider `{}` has no API key configured", model.provider);
                return fail(result, Status::Error, ErrorClass::NotConfigured, message);
            }
        };
        // Reserved BEFORE the upstream call (here or with the message): concurrent calls can
        // never overspend.
        let reservation = match prepaid {
            Some(reservation) => reservation,
            None => {
                match quota::reserve(
                    self.relaxed,
                    self.user_id,
                    Counter::for_tier(model.tier),
                    self.today,
                )
                .await
                {
                    Ok(Ok(reservation)) => ReservationGuard::new(self.pool, reservation),
                    Ok(Err(exhausted)) => {
                        return fail(
                            result,
                            Status::Skipped,
                            ErrorClass::QuotaExceeded,
                            exhausted.to_string(),
                        );
                    }
                    Err(error) => {
                        tracing::error!(%error, "quota reservation failed");
                        return fail(
                            result,
                            Status::Error,
                            ErrorClass::Internal,
                            "the quota could not be checked".into(),
                        );
                    }
                }
            }
        };
        let completion_request = CompletionRequest {
            model: model.upstream_name().to_string(),
            prompt: self.request.prompt.clone(),
            temperature: self.request.temperature,
            max_tokens: self.request.max_tokens(),
        };
        let progress = self.progress;
        let sink = |text: &str| progress.delta(&model.id, text);
        let deltas = progress.wants_deltas().then_some(&sink as DeltaSink<'_>);
        let outcome = tokio::select! {
            outcome = provider.complete(&completion_request, deltas) => Some(outcome),
            () = self.cancel.cancelled() => None,
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        let metadata = |status: &str, class: Option<&str>| {
            json!({
                "request_id": self.session_id,
                "status": status,
                "error_class": class,
                "latency_ms": latency_ms,
                "max_tokens": completion_request.max_tokens,
                "temperature": completion_request.temperature,
            })
        };
        match outcome {
            Some(Ok(completion)) => {
                let cost = model.cost(
                    completion.input_tokens.into(),
                    completion.output_tokens.into(),
                );
                let record = UsageRecord {
                    user_id: self.user_id,
                    session_id: self.session_id,
                    model,
                    input_tokens: completion.input_tokens,
                    output_tokens: completion.output_tokens,
                    cost,
                    request_metadata: metadata("ok", None),
                    response_metadata: json!({
                        "status": "ok",
                        "latency_ms": latency_ms,
                        "finish_reason": completion.finish_reason,
                    }),
                };
                if let Err(error) = usage::record(self.pool, &record).await {
                    // Without its usage row the call is not billable: give the unit back.
                    tracing::error!(%error, model = %model.id, "usage record failed");
                    reservation.refund().await;
                    return fail(
                        result,
                        Status::Error,
                        ErrorClass::Internal,
                        "the usage could not be recorded".into(),
                    );
                }
                reservation.settle();
                result.status = Status::Ok;
                result.text = Some(completion.text);
                result.latency_ms = latency_ms;
                result.input_tokens = Some(completion.input_tokens);
                result.output_tokens = Some(completion.output_tokens);
                result.cost_usd = Some(cost.to_string());
                result
            }
            Some(Err(error)) => {
                reservation.refund().await;
                tracing::info!(model = %model.id, class = error.class.as_str(), "model call failed");
                let status = if error.class == ErrorClass::Timeout {
                    Status::Timeout
                } else {
                    Status::Error
                };
                fail(result, status, error.class, error.message)
            }
            None => {
                reservation.refund().await;
                fail(
                    result,
                    Status::Timeout,
                    ErrorClass::Timeout,
                    format!(
                        "no answer within the deadline of {} ms",
                        self.request.deadline_ms()
                    ),
                )
            }
        }
    }
}
