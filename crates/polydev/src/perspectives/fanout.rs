//! `get_perspectives`: ask the chosen models in parallel, each paid for by a quota reservation
//! taken before its upstream call and given back if the call fails, times out or is cancelled.

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::catalogue::{Cost, ModelSpec};
use super::idempotency::{self, Claim};
use super::provider::{
    Completion, CompletionRequest, DeltaSink, ErrorClass, Provider, ProviderError,
};
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

/// One call past its idempotency check: choose the models, reserve their quota, fan out until
/// the deadline, add up.
async fn run(
    pools: Pools<'_>,
    gateway: &Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    progress: &ProgressSink,
    deadline: Duration,
) -> Result<PerspectivesResult> {
    let started = Instant::now();
    let today = chrono::Utc::now().date_naive();
    let models = choose_models(pools.durable, gateway, user_id, request, today).await?;
    let reserved = reserve_all(pools, user_id, &models, today).await?;
    progress.started(&models);
    let request_id = Uuid::new_v4();
    let call = ModelCall {
        pools,
        gateway,
        user_id,
        request,
        session_id: request_id.to_string(),
        cancel: CancellationToken::new(),
        progress,
        today,
    };
    let perspectives = fan_out(&call, &models, reserved.models, deadline).await;
    charge_message(reserved.message, &perspectives).await?;
    let totals = totals(gateway, &perspectives, started.elapsed());
    Ok(PerspectivesResult {
        request_id,
        perspectives,
        totals,
        replayed: false,
    })
}

/// The models to ask; an error when none can run. Settings and the quota snapshot only matter
/// when polydev chooses the models.
async fn choose_models<'g>(
    pool: &PgPool,
    gateway: &'g Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    today: NaiveDate,
) -> Result<Vec<&'g ModelSpec>> {
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
    Ok(models)
}

/// What is reserved before any model is called.
struct Reserved {
    message: ReservationGuard,
    /// One per model, in order; `None` when the model reserves its own unit as it starts.
    models: Vec<Option<ReservationGuard>>,
}

/// The common case in one atomic statement: the message and a perspective per model. When some
/// limit is reached, the message alone, and each model reserves on its own as it starts, so the
/// models that can run do and the others say which limit stopped them.
async fn reserve_all(
    pools: Pools<'_>,
    user_id: Uuid,
    models: &[&ModelSpec],
    today: NaiveDate,
) -> Result<Reserved> {
    let wants: Vec<Counter> = std::iter::once(Counter::Messages)
        .chain(models.iter().map(|m| m.tier.counter()))
        .collect();
    let guard = |reservation| ReservationGuard::new(pools.durable, reservation);
    // Reservations commit without waiting for the WAL flush: the usage row's durable commit
    // later flushes them too (WAL is flushed in order); concurrency is unaffected.
    if let Some(reservations) = quota::reserve_all(pools.relaxed, user_id, &wants, today).await? {
        let mut guards = reservations.into_iter().map(guard);
        let message = guards.next().expect("the message was reserved");
        return Ok(Reserved {
            message,
            models: guards.map(Some).collect(),
        });
    }
    match quota::reserve(pools.relaxed, user_id, Counter::Messages, today).await? {
        Ok(reservation) => Ok(Reserved {
            message: guard(reservation),
            models: models.iter().map(|_| None).collect(),
        }),
        Err(exhausted) => Err(Error::QuotaExceeded(exhausted.to_string())),
    }
}

/// Calls every model at once and reports each as it finishes. At the deadline the calls still
/// running are cut: they give their quota back and report `timeout`. Results in model order.
async fn fan_out(
    call: &ModelCall<'_>,
    models: &[&ModelSpec],
    prepaid: Vec<Option<ReservationGuard>>,
    deadline: Duration,
) -> Vec<ModelResult> {
    let mut pending: FuturesUnordered<_> = models
        .iter()
        .zip(prepaid)
        .enumerate()
        .map(|(index, (model, prepaid))| async move { (index, call.run(model, prepaid).await) })
        .collect();
    let mut results: Vec<Option<ModelResult>> = vec![None; models.len()];
    let timer = tokio::time::sleep(deadline);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            next = pending.next() => match next {
                Some((index, result)) => {
                    call.progress.finished(&result);
                    results[index] = Some(result);
                }
                None => break,
            },
            () = &mut timer, if !call.cancel.is_cancelled() => call.cancel.cancel(),
        }
    }
    results.into_iter().flatten().collect()
}

/// The message stays used when some model answered. With no answer it goes back too (no
/// answer, no charge), and when every model was skipped for its quota the call fails.
async fn charge_message(message: ReservationGuard, perspectives: &[ModelResult]) -> Result<()> {
    if perspectives.iter().any(|p| p.status == Status::Ok) {
        message.settle();
        return Ok(());
    }
    message.refund().await;
    if !perspectives.iter().all(|p| p.status == Status::Skipped) {
        return Ok(());
    }
    let reasons: Vec<String> = perspectives
        .iter()
        .filter_map(|p| {
            p.error
                .as_ref()
                .map(|e| format!("{}: {}", p.model, e.message))
        })
        .collect();
    Err(Error::QuotaExceeded(format!(
        "no model could run: {}",
        reasons.join("; ")
    )))
}

fn totals(gateway: &Gateway, perspectives: &[ModelResult], elapsed: Duration) -> Totals {
    let answered = || perspectives.iter().filter(|p| p.status == Status::Ok);
    let succeeded = answered().count();
    let cost = answered()
        .filter_map(|p| gateway.catalogue().model(&p.model).map(|m| (m, p)))
        .fold(Cost::default(), |sum, (m, p)| {
            sum + m.cost(
                p.input_tokens.unwrap_or(0).into(),
                p.output_tokens.unwrap_or(0).into(),
            )
        });
    let tokens = |of: fn(&ModelResult) -> Option<u32>| -> u64 {
        perspectives.iter().filter_map(of).map(u64::from).sum()
    };
    Totals {
        models: perspectives.len(),
        succeeded,
        failed: perspectives.len() - succeeded,
        input_tokens: tokens(|p| p.input_tokens),
        output_tokens: tokens(|p| p.output_tokens),
        cost_usd: cost.to_string(),
        elapsed_ms: elapsed.as_millis() as u64,
    }
}

/// What every model call of one `get_perspectives` shares.
struct ModelCall<'a> {
    pools: Pools<'a>,
    gateway: &'a Gateway,
    user_id: Uuid,
    request: &'a PerspectivesRequest,
    /// The request id, as the usage rows' `session_id`.
    session_id: String,
    /// Cancelled at the deadline.
    cancel: CancellationToken,
    progress: &'a ProgressSink,
    today: NaiveDate,
}

/// A model's answer, recorded in a usage row and paid for.
struct Answer {
    completion: Completion,
    cost: Cost,
    latency_ms: u64,
}

/// Why a model has no answer.
struct Failure {
    status: Status,
    error: ModelError,
}

impl ModelCall<'_> {
    /// One model's call: reserve → call → record.
    async fn run(&self, model: &ModelSpec, prepaid: Option<ReservationGuard>) -> ModelResult {
        let started = Instant::now();
        match self.answer(model, prepaid, started).await {
            Ok(answer) => answer.into_result(model),
            Err(failure) => failure.into_result(model, elapsed_ms(started)),
        }
    }

    /// The answer, its unit settled; or why there is none, its unit given back.
    async fn answer(
        &self,
        model: &ModelSpec,
        prepaid: Option<ReservationGuard>,
        started: Instant,
    ) -> Result<Answer, Failure> {
        let Some(provider) = self.configured_provider(model) else {
            if let Some(unused) = prepaid {
                unused.refund().await;
            }
            return Err(Failure::error(
                ErrorClass::NotConfigured,
                format!("provider `{}` has no API key configured", model.provider),
            ));
        };
        let reservation = self.reserve(model, prepaid).await?;
        let request = self.completion_request(model);
        match self.call(provider, model, &request).await {
            Ok(completion) => {
                let latency_ms = elapsed_ms(started);
                self.record(model, &request, reservation, completion, latency_ms)
                    .await
            }
            Err(failure) => {
                reservation.refund().await;
                Err(failure)
            }
        }
    }

    fn completion_request(&self, model: &ModelSpec) -> CompletionRequest {
        CompletionRequest {
            model: model.upstream_name().to_string(),
            prompt: self.request.prompt.clone(),
            temperature: self.request.temperature,
            max_tokens: self.request.max_tokens(),
        }
    }

    fn configured_provider(&self, model: &ModelSpec) -> Option<&dyn Provider> {
        let provider = self.gateway.provider(&model.provider)?;
        self.gateway
            .is_configured(&model.provider)
            .then_some(provider.as_ref())
    }

    /// The unit reserved with the message, or one reserved now: always BEFORE the upstream
    /// call, so concurrent calls can never overspend. `Skipped` when the tier's quota is out.
    async fn reserve(
        &self,
        model: &ModelSpec,
        prepaid: Option<ReservationGuard>,
    ) -> Result<ReservationGuard, Failure> {
        if let Some(reservation) = prepaid {
            return Ok(reservation);
        }
        let counter = model.tier.counter();
        match quota::reserve(self.pools.relaxed, self.user_id, counter, self.today).await {
            Ok(Ok(reservation)) => Ok(ReservationGuard::new(self.pools.durable, reservation)),
            Ok(Err(exhausted)) => Err(Failure::new(
                Status::Skipped,
                ErrorClass::QuotaExceeded,
                exhausted.to_string(),
            )),
            Err(error) => {
                tracing::error!(%error, "quota reservation failed");
                Err(Failure::error(
                    ErrorClass::Internal,
                    "the quota could not be checked",
                ))
            }
        }
    }

    /// Asks the model, streaming its text to the progress sink when it wants deltas, until it
    /// answers or the deadline cancels the call.
    async fn call(
        &self,
        provider: &dyn Provider,
        model: &ModelSpec,
        request: &CompletionRequest,
    ) -> Result<Completion, Failure> {
        let progress = self.progress;
        let sink = |text: &str| progress.delta(&model.id, text);
        let deltas = progress.wants_deltas().then_some(&sink as DeltaSink<'_>);
        tokio::select! {
            outcome = provider.complete(request, deltas) => outcome.map_err(|error| {
                tracing::info!(model = %model.id, class = error.class.as_str(), "model call failed");
                Failure::from(error)
            }),
            () = self.cancel.cancelled() => Err(Failure::new(
                Status::Timeout,
                ErrorClass::Timeout,
                format!("no answer within the deadline of {} ms", self.request.deadline_ms()),
            )),
        }
    }

    /// The answer's usage row, then its unit settled; without the row the unit goes back.
    async fn record(
        &self,
        model: &ModelSpec,
        request: &CompletionRequest,
        reservation: ReservationGuard,
        completion: Completion,
        latency_ms: u64,
    ) -> Result<Answer, Failure> {
        let cost = model.cost(
            completion.input_tokens.into(),
            completion.output_tokens.into(),
        );
        let record = self.usage_record(model, request, &completion, cost, latency_ms);
        if let Err(error) = usage::record(self.pools.durable, &record).await {
            // Without its usage row the call is not billable: give the unit back.
            tracing::error!(%error, model = %model.id, "usage record failed");
            reservation.refund().await;
            return Err(Failure::error(
                ErrorClass::Internal,
                "the usage could not be recorded",
            ));
        }
        reservation.settle();
        Ok(Answer {
            completion,
            cost,
            latency_ms,
        })
    }

    fn usage_record<'r>(
        &'r self,
        model: &'r ModelSpec,
        request: &CompletionRequest,
        completion: &Completion,
        cost: Cost,
        latency_ms: u64,
    ) -> UsageRecord<'r> {
        UsageRecord {
            user_id: self.user_id,
            session_id: &self.session_id,
            model,
            input_tokens: completion.input_tokens,
            output_tokens: completion.output_tokens,
            cost,
            request_metadata: json!({
                "request_id": self.session_id,
                "status": "ok",
                "error_class": null,
                "latency_ms": latency_ms,
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
            }),
            response_metadata: json!({
                "status": "ok",
                "latency_ms": latency_ms,
                "finish_reason": completion.finish_reason,
            }),
        }
    }
}

impl Answer {
    fn into_result(self, model: &ModelSpec) -> ModelResult {
        ModelResult {
            text: Some(self.completion.text),
            input_tokens: Some(self.completion.input_tokens),
            output_tokens: Some(self.completion.output_tokens),
            cost_usd: Some(self.cost.to_string()),
            ..model_result(model, Status::Ok, self.latency_ms)
        }
    }
}

impl Failure {
    fn new(status: Status, class: ErrorClass, message: impl Into<String>) -> Self {
        Failure {
            status,
            error: ModelError {
                class,
                message: message.into(),
            },
        }
    }

    fn error(class: ErrorClass, message: impl Into<String>) -> Self {
        Failure::new(Status::Error, class, message)
    }

    fn into_result(self, model: &ModelSpec, latency_ms: u64) -> ModelResult {
        ModelResult {
            error: Some(self.error),
            ..model_result(model, self.status, latency_ms)
        }
    }
}

impl From<ProviderError> for Failure {
    /// A provider's own timeout reads as `timeout`, like the deadline's.
    fn from(error: ProviderError) -> Self {
        let status = if error.class == ErrorClass::Timeout {
            Status::Timeout
        } else {
            Status::Error
        };
        Failure::new(status, error.class, error.message)
    }
}

/// A result for `model` with nothing but its status and latency.
fn model_result(model: &ModelSpec, status: Status, latency_ms: u64) -> ModelResult {
    ModelResult {
        model: model.id.clone(),
        provider: model.provider.clone(),
        tier: model.tier.as_str().to_string(),
        status,
        text: None,
        latency_ms,
        input_tokens: None,
        output_tokens: None,
        cost_usd: None,
        error: None,
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}
