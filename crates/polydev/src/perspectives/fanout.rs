//! `get_perspectives`: ask the chosen models in parallel, each paid for by a quota reservation
//! taken before its upstream call and given back if the call fails, times out or is cancelled.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use super::usage::{self, Settles, UsageRecord};
use super::{Gateway, PerspectivesRequest, get_settings};
use crate::db::Pools;
use crate::error::{Error, Result};
use crate::quota::{self, CountRequest, Counter, ReservationGuard};

/// How long past its deadline a call may still be writing its usage rows; a claim or a quota
/// reservation older than deadline + this belongs to a call that died.
pub const CALL_MARGIN: Duration = Duration::from_secs(30);

/// Runs `get_perspectives` for `user_id`, sending its progress events to `progress`. Dropping
/// the returned future cancels the upstream calls still running and gives their reservations
/// back (a model whose text already reached the client is charged for it), and frees its
/// idempotency key.
pub async fn get_perspectives(
    pools: Pools<'_>,
    gateway: &Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    progress: ProgressSink,
) -> Result<PerspectivesResult> {
    get_perspectives_counting(pools, gateway, user_id, request, progress, None).await
}

/// [`get_perspectives`] for a request that its surface has not yet counted against its rate
/// limits (`count`): the common call counts it in the statement that reserves its quota (one
/// round trip for both); every other path counts it on its own before going on (an invalid
/// request, one with an idempotency key, one no model can run). Either way a request over a
/// limit is refused with `rate_limited` before anything is reserved.
pub async fn get_perspectives_counting(
    pools: Pools<'_>,
    gateway: &Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    progress: ProgressSink,
    count: Option<CountRequest>,
) -> Result<PerspectivesResult> {
    if let Err(error) = request.validate(gateway) {
        count_now(pools, count).await?;
        return Err(error);
    }
    let pool = pools.durable;
    // The deadline runs from here: the claim and the reservations are inside it.
    let deadline = Deadline::from_now(Duration::from_millis(request.deadline_ms()));
    let Some(key) = request.idempotency_key.as_deref() else {
        return run(
            pools,
            gateway,
            user_id,
            request,
            &progress,
            deadline,
            Resume::fresh(),
            count,
        )
        .await;
    };
    count_now(pools, count).await?;
    let secret = gateway.idempotency_secret(pool).await?;
    let hash = idempotency::request_hash(secret, request);
    // A first call that has not finished well after its deadline has crashed: take over.
    let running_for = deadline.length + CALL_MARGIN;
    let claim = match idempotency::claim(
        pool,
        user_id,
        key,
        &hash,
        running_for,
        gateway.idempotency_wait(),
    )
    .await?
    {
        Claim::Replay(result) => return Ok(*result),
        Claim::Owner(claim) => claim,
    };
    let keep_text = !crate::zk::is_enabled(pool, user_id).await?;
    let resume = Resume {
        request_id: claim.request_id,
        paid: claim.outcomes.clone(),
        keep: Some(Keep {
            key,
            token: claim.token(),
            keep_text,
        }),
    };
    let result = run(
        pools, gateway, user_id, request, &progress, deadline, resume, None,
    )
    .await;
    match &result {
        Ok(result) => {
            if let Err(error) = claim.complete(result, keep_text).await {
                // The answers are paid for and kept with the claim: a retry reuses them.
                tracing::error!(%error, "storing the idempotent result failed");
            }
        }
        Err(_) => {
            if let Err(error) = claim.release().await {
                tracing::warn!(%error, "idempotency key release failed");
            }
        }
    }
    result
}

/// Counts a request not yet counted against its rate limits (`Error::RateLimited` over one).
async fn count_now(pools: Pools<'_>, count: Option<CountRequest>) -> Result<()> {
    match count {
        Some(count) => quota::count_request(pools.relaxed, &count).await,
        None => Ok(()),
    }
}

/// When a call started and when it must return. At `at`, the model calls still running are
/// cut; what is written after it (their refunds, an answer's usage row that was already being
/// written) goes through the relaxed pool or was already in flight, so a call returns within a
/// database round trip of its deadline.
#[derive(Clone, Copy)]
struct Deadline {
    started: Instant,
    at: Instant,
    length: Duration,
}

impl Deadline {
    fn from_now(length: Duration) -> Self {
        let started = Instant::now();
        Deadline {
            started,
            at: started + length,
            length,
        }
    }
}

/// Where a call starts: afresh, or taking over an idempotency key with answers already paid for.
struct Resume<'a> {
    request_id: Uuid,
    /// Answers an earlier holder of the key paid for, reused as they are.
    paid: Vec<ModelResult>,
    keep: Option<Keep<'a>>,
}

impl Resume<'_> {
    fn fresh() -> Self {
        Resume {
            request_id: Uuid::new_v4(),
            paid: Vec::new(),
            keep: None,
        }
    }
}

/// Where each answer is kept for retries: the claim of an idempotency key.
#[derive(Clone, Copy)]
struct Keep<'a> {
    key: &'a str,
    token: Uuid,
    /// False for zero-knowledge accounts: the kept outcome has no text.
    keep_text: bool,
}

/// One call past its idempotency check: choose the models, reserve their quota (counting the
/// request against its rate limits in the same statement when `count` says it is not yet),
/// fan out until the deadline, add up.
#[allow(clippy::too_many_arguments)]
async fn run(
    pools: Pools<'_>,
    gateway: &Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    progress: &ProgressSink,
    deadline: Deadline,
    resume: Resume<'_>,
    count: Option<CountRequest>,
) -> Result<PerspectivesResult> {
    let today = chrono::Utc::now().date_naive();
    let (models, unavailable) =
        match choose_models(pools.durable, gateway, user_id, request, today).await {
            Ok(chosen) => chosen,
            Err(error) => {
                count_now(pools, count).await?;
                return Err(error);
            }
        };
    // A `cli` model of a user with no granted container is like an unconfigured provider's.
    let runnable = |m: &ModelSpec| runnable(gateway, &unavailable, m);
    let paid = |m: &ModelSpec| {
        resume
            .paid
            .iter()
            .find(|p| p.model == m.id && p.status == Status::Ok)
    };
    // Models whose provider is not configured are answered at once and reserve nothing.
    let to_run: Vec<&ModelSpec> = models
        .iter()
        .copied()
        .filter(|m| paid(m).is_none() && runnable(m))
        .collect();
    // The message was paid with the first answer of an earlier holder of the key.
    let with_message = !resume.paid.iter().any(|p| p.status == Status::Ok);
    let reserved = reserve_all(
        pools,
        user_id,
        resume.request_id,
        &to_run,
        with_message,
        count,
    )
    .await?;
    progress.started(&models);
    let unconfigured: Vec<ModelResult> = models
        .iter()
        .filter(|m| paid(m).is_none() && !runnable(m))
        .map(|m| {
            let result = Failure::not_configured(gateway, m).into_result(m, 0);
            progress.finished(&result);
            result
        })
        .collect();
    let mut unconfigured = unconfigured.into_iter();
    let call = ModelCall {
        pools,
        gateway,
        user_id,
        request,
        request_id: resume.request_id,
        session_id: resume.request_id.to_string(),
        cancel: CancellationToken::new(),
        progress,
        message: reserved.message.clone(),
        keep: resume.keep,
        deadline: deadline.at,
    };
    let mut fresh = fan_out(&call, &to_run, reserved.models, deadline.at)
        .await
        .into_iter();
    drop(call);
    let mut perspectives: Vec<ModelResult> = models
        .iter()
        .map(|m| match paid(m) {
            Some(answer) => answer.clone(),
            None if !runnable(m) => unconfigured
                .next()
                .expect("a result per unconfigured model"),
            None => fresh.next().expect("a result per model run"),
        })
        .collect();
    // Paid answers of models no longer chosen (settings changed in between) are kept too.
    let unchosen: Vec<ModelResult> = resume
        .paid
        .iter()
        .filter(|p| p.status == Status::Ok && !models.iter().any(|m| m.id == p.model))
        .cloned()
        .collect();
    perspectives.extend(unchosen);
    charge_message(reserved.message, &perspectives).await?;
    let totals = totals(gateway, &perspectives, deadline.started.elapsed());
    Ok(PerspectivesResult {
        request_id: resume.request_id,
        perspectives,
        totals,
        replayed: false,
    })
}

/// The models to ask; an error when none can run, saying why: no provider configured for any
/// of them (`no_provider_configured`), or no quota left for the configured ones
/// (`quota_exceeded`). Settings and the quota snapshot only matter when polydev chooses the
/// models.
async fn choose_models<'g>(
    pool: &PgPool,
    gateway: &'g Gateway,
    user_id: Uuid,
    request: &PerspectivesRequest,
    today: NaiveDate,
) -> Result<(Vec<&'g ModelSpec>, HashSet<String>)> {
    // The `cli` providers this user has no granted container for (one query per CLI).
    let cli_providers: Vec<&str> = gateway
        .catalogue()
        .providers
        .keys()
        .map(String::as_str)
        .filter(|p| gateway.cli_of(p).is_some() && gateway.is_configured(p))
        .collect();
    let unavailable = gateway.cli_unavailable(user_id, &cli_providers).await?;
    let models = if request.models.is_some() {
        request.choose(gateway, &Default::default(), None, &unavailable)
    } else {
        let settings = get_settings(pool, user_id).await?;
        let quota_state = quota::for_user(pool, user_id)
            .await?
            .map(|q| q.state(today));
        request.choose(gateway, &settings, quota_state.as_ref(), &unavailable)
    };
    if models.is_empty() {
        return Err(why_none_can_run(gateway, request, &unavailable));
    }
    if !models.iter().any(|m| runnable(gateway, &unavailable, m)) {
        return Err(no_provider_configured(gateway, &models));
    }
    Ok((models, unavailable))
}

/// Whether `model` can be asked for this user: its provider is configured, and for a `cli`
/// provider the user has a granted container.
fn runnable(gateway: &Gateway, unavailable: &HashSet<String>, model: &ModelSpec) -> bool {
    gateway.is_configured(&model.provider) && !unavailable.contains(&model.provider)
}

/// Why polydev's own choice came out empty: the providers left are not configured, the
/// configured ones' tiers have no quota left, or the provider filters left no model at all.
fn why_none_can_run(
    gateway: &Gateway,
    request: &PerspectivesRequest,
    unavailable: &HashSet<String>,
) -> Error {
    let candidates: Vec<&ModelSpec> = gateway
        .catalogue()
        .models
        .iter()
        .filter(|m| {
            !request.exclude_providers.contains(&m.provider)
                && (request.models.is_some()
                    || request.request_providers.is_empty()
                    || request.request_providers.contains(&m.provider))
        })
        .collect();
    if candidates.is_empty() {
        return Error::Invalid(
            "no model left to ask: `exclude_providers` and `request_providers` rule out every model of the catalogue (see list_available_models)".into(),
        );
    }
    if !candidates.iter().any(|m| runnable(gateway, unavailable, m)) {
        return no_provider_configured(gateway, &candidates);
    }
    Error::QuotaExceeded(
        "no model can run: the monthly quota of every tier with a configured provider is used up (see get_usage)".into(),
    )
}

/// `no_provider_configured`, naming the providers of `models` and what would configure them.
fn no_provider_configured(gateway: &Gateway, models: &[&ModelSpec]) -> Error {
    let mut providers: Vec<&str> = models.iter().map(|m| m.provider.as_str()).collect();
    providers.sort_unstable();
    providers.dedup();
    let mut keys: Vec<&str> = providers
        .iter()
        .filter(|p| gateway.cli_of(p).is_none())
        .filter_map(|p| gateway.catalogue().providers.get(*p))
        .filter_map(|spec| spec.api_key_env.as_deref())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let keys = if keys.is_empty() {
        "the provider's API key".to_string()
    } else {
        keys.join(", ")
    };
    let connect = if providers.iter().any(|p| gateway.cli_of(p).is_some()) {
        ", or you connect your subscription in a runtime container (cli_not_connected: claim a container, \
         then PUT /v1/runtime/containers/{id}/grant)"
    } else {
        ""
    };
    Error::NoProviderConfigured(format!(
        "no provider is configured for {}: the server operator sets an API key ({keys}; see the model catalogue), \
         or you ask the CLIs installed and signed in on your machine (Claude Code, Codex CLI, Gemini CLI) \
         through `polydev mcp`{connect} (docs/cli-backends.md)",
        providers
            .iter()
            .map(|p| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// What is reserved before any model is called.
struct Reserved {
    /// The message, shared with the model calls: the first usage row settles it, and a model
    /// charged after its call was dropped holds it until its row is written.
    message: Option<Arc<ReservationGuard>>,
    /// One per model, in order; `None` when the model reserves its own unit as it starts.
    models: Vec<Option<ReservationGuard>>,
}

/// The common case in one atomic statement: the message and a perspective per model. When some
/// limit is reached, the message alone, and each model reserves on its own as it starts, so the
/// models that can run do and the others say which limit stopped them.
async fn reserve_all(
    pools: Pools<'_>,
    user_id: Uuid,
    request_id: Uuid,
    models: &[&ModelSpec],
    with_message: bool,
    count: Option<CountRequest>,
) -> Result<Reserved> {
    let wants: Vec<Counter> = with_message
        .then_some(Counter::Messages)
        .into_iter()
        .chain(models.iter().map(|m| m.tier.counter()))
        .collect();
    if wants.is_empty() {
        count_now(pools, count).await?;
        return Ok(Reserved {
            message: None,
            models: Vec::new(),
        });
    }
    // Reservations and refunds commit without waiting for the WAL flush: the usage row's
    // durable commit later flushes them too (WAL is flushed in order); concurrency is
    // unaffected. A crash loses the counter increment and its reservation row together, or a
    // refund together with the deletion of its reservation row (which the sweeper then
    // refunds).
    let guard = |reservation| ReservationGuard::new(pools.relaxed, reservation);
    // The request is counted against its rate limits here, if not yet: in the same statement.
    if let Some(reservations) =
        quota::reserve_all_counting(pools.relaxed, user_id, request_id, &wants, count.as_ref())
            .await?
    {
        let mut guards = reservations.into_iter().map(guard);
        let message =
            with_message.then(|| Arc::new(guards.next().expect("the message was reserved")));
        return Ok(Reserved {
            message,
            models: guards.map(Some).collect(),
        });
    }
    if !with_message {
        return Ok(Reserved {
            message: None,
            models: models.iter().map(|_| None).collect(),
        });
    }
    match quota::reserve(pools.relaxed, user_id, request_id, Counter::Messages).await? {
        Ok(reservation) => Ok(Reserved {
            message: Some(Arc::new(guard(reservation))),
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
    deadline: Instant,
) -> Vec<ModelResult> {
    if models.is_empty() {
        return Vec::new();
    }
    let mut pending: FuturesUnordered<_> = models
        .iter()
        .zip(prepaid)
        .enumerate()
        .map(|(index, (model, prepaid))| async move { (index, call.run(model, prepaid).await) })
        .collect();
    let mut results: Vec<Option<ModelResult>> = vec![None; models.len()];
    let timer = tokio::time::sleep_until(deadline.into());
    tokio::pin!(timer);
    loop {
        tokio::select! {
            next = pending.next() => match next {
                Some((index, result)) => {
                    call.progress.finished(&result);
                    crate::telemetry::provider_call(
                        &result.model,
                        result.error.as_ref().map(|e| e.class.as_str()),
                        Duration::from_millis(result.latency_ms),
                    );
                    results[index] = Some(result);
                }
                None => break,
            },
            () = &mut timer, if !call.cancel.is_cancelled() => call.cancel.cancel(),
        }
    }
    results.into_iter().flatten().collect()
}

/// The message was settled by the call's first usage row, if any. With no answer it goes back
/// (no answer, no charge: the refund finds nothing when a partial answer settled it), and when
/// no model was called because every configured one was skipped for its quota (the others
/// having no provider configured), the call fails with `quota_exceeded`.
async fn charge_message(
    message: Option<Arc<ReservationGuard>>,
    perspectives: &[ModelResult],
) -> Result<()> {
    let answered = perspectives.iter().any(|p| p.status == Status::Ok);
    if let Some(message) = message {
        match Arc::try_unwrap(message) {
            Ok(message) if answered => message.settle(),
            Ok(message) => message.refund().await,
            // Still held by a model's background charge: it refunds when that finishes.
            Err(_) => {}
        }
    }
    let not_called = |p: &&ModelResult| {
        p.status == Status::Skipped
            || p.error
                .as_ref()
                .is_some_and(|e| e.class == ErrorClass::NotConfigured)
    };
    let skipped = perspectives.iter().any(|p| p.status == Status::Skipped);
    if answered || !skipped || !perspectives.iter().all(|p| not_called(&p)) {
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
    request_id: Uuid,
    /// The request id, as the usage rows' `session_id`.
    session_id: String,
    /// Cancelled at the deadline.
    cancel: CancellationToken,
    progress: &'a ProgressSink,
    /// The call's message unit: the first usage row settles it.
    message: Option<Arc<ReservationGuard>>,
    /// Where answers are kept for retries (an idempotency key's claim).
    keep: Option<Keep<'a>>,
    /// When the calls still running are cut.
    deadline: Instant,
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
            Ok(answer) => answer,
            Err(failure) => {
                self.record_failure(model, &failure).await;
                failure.into_result(model, elapsed_ms(started))
            }
        }
    }

    /// A call that reached (or should have reached) its provider and got no answer is counted
    /// in `model_call_failures` (the admin console's error rate and provider health). Best
    /// effort: losing the row loses a statistic, never an answer or a charge.
    async fn record_failure(&self, model: &ModelSpec, failure: &Failure) {
        let status = match failure.status {
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Ok | Status::Skipped => return,
        };
        if matches!(
            failure.error.class,
            ErrorClass::NotConfigured | ErrorClass::QuotaExceeded
        ) {
            return;
        }
        if let Err(error) = sqlx::query!(
            "INSERT INTO model_call_failures (user_id, model_name, model_tier, provider, status, error_class)
             VALUES ($1, $2, $3, $4, $5, $6)",
            self.user_id,
            &model.id,
            model.tier.as_str(),
            &model.provider,
            status,
            failure.error.class.as_str()
        )
        .execute(self.pools.relaxed)
        .await
        {
            tracing::warn!(%error, model = %model.id, "model call failure not counted");
        }
    }

    /// The answer, its unit settled; or why there is none, its unit given back (or charged for
    /// the text that already reached the client).
    async fn answer(
        &self,
        model: &ModelSpec,
        prepaid: Option<ReservationGuard>,
        started: Instant,
    ) -> Result<ModelResult, Failure> {
        let Some(provider) = self.configured_provider(model) else {
            if let Some(unused) = prepaid {
                unused.refund().await;
            }
            return Err(Failure::not_configured(self.gateway, model));
        };
        let reservation = self.reserve(model, prepaid).await?;
        let request = self.completion_request(model);
        let mut charge = PartialCharge::new(self, model, &request, reservation, started);
        match self
            .call(provider, model, &request, &charge.delivered)
            .await
        {
            Ok(completion) => {
                let latency_ms = elapsed_ms(started);
                self.record(model, &request, charge.take(), completion, latency_ms)
                    .await
            }
            Err(failure) => {
                charge.finish().await;
                Err(failure)
            }
        }
    }

    fn completion_request(&self, model: &ModelSpec) -> CompletionRequest {
        let (messages, tools) = self.request.messages_for(&model.id);
        CompletionRequest {
            model: model.upstream_name().to_string(),
            messages,
            temperature: self.request.temperature,
            max_tokens: self.request.max_tokens(),
            tools,
            deadline: Some(self.deadline),
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
        match quota::reserve(self.pools.relaxed, self.user_id, self.request_id, counter).await {
            Ok(Ok(reservation)) => Ok(ReservationGuard::new(self.pools.relaxed, reservation)),
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

    /// Asks the model, streaming its text to the progress sink when it wants deltas (counting
    /// the characters that were delivered), until it answers or the deadline cancels the call.
    async fn call(
        &self,
        provider: &dyn Provider,
        model: &ModelSpec,
        request: &CompletionRequest,
        delivered: &AtomicUsize,
    ) -> Result<Completion, Failure> {
        let progress = self.progress;
        let sink = |text: &str| {
            if progress.delta(&model.id, text) {
                delivered.fetch_add(text.chars().count(), Ordering::Relaxed);
            }
        };
        let deltas = progress.wants_deltas().then_some(&sink as DeltaSink<'_>);
        tokio::select! {
            outcome = provider.complete_for(self.user_id, request, deltas) => outcome.map_err(|error| {
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

    /// The answer's usage row (which settles its unit and the message, and keeps the answer
    /// for retries); without the row the unit goes back.
    async fn record(
        &self,
        model: &ModelSpec,
        request: &CompletionRequest,
        reservation: ReservationGuard,
        completion: Completion,
        latency_ms: u64,
    ) -> Result<ModelResult, Failure> {
        let cost = model.cost(
            completion.input_tokens.into(),
            completion.output_tokens.into(),
        );
        let result = ModelResult {
            text: Some(completion.text.clone()),
            input_tokens: Some(completion.input_tokens),
            output_tokens: Some(completion.output_tokens),
            cost_usd: Some(cost.to_string()),
            finish_reason: completion.finish_reason.clone(),
            tool_calls: completion.tool_calls.clone(),
            ..model_result(model, Status::Ok, latency_ms)
        };
        let record = UsageRecord {
            user_id: self.user_id,
            session_id: &self.session_id,
            model,
            input_tokens: completion.input_tokens,
            output_tokens: completion.output_tokens,
            cost,
            request_metadata: request_metadata(&self.session_id, request, "ok", latency_ms),
            response_metadata: json!({
                "status": "ok",
                "latency_ms": latency_ms,
                "finish_reason": completion.finish_reason,
            }),
        };
        let outcome = self.keep.map(|keep| {
            let mut kept = result.clone();
            if !keep.keep_text {
                idempotency::strip_text(&mut kept);
            }
            (
                keep.key,
                keep.token,
                serde_json::to_value(kept).expect("a result serializes"),
            )
        });
        let settles = Settles {
            reservation: reservation.reservation().map(|r| r.id).unwrap_or_default(),
            message: self.message_id(),
            outcome,
        };
        match usage::record(self.pools.durable, &record, &settles).await {
            Ok(true) => reservation.settle(),
            Ok(false) => {
                // The sweeper refunded this unit already (the call outlived every bound): the
                // answer is given free rather than charged twice.
                tracing::warn!(model = %model.id, "reservation gone before its usage row: not charged");
                reservation.settle();
            }
            Err(error) => {
                // Without its usage row the call is not billable: give the unit back.
                tracing::error!(%error, model = %model.id, "usage record failed");
                reservation.refund().await;
                return Err(Failure::error(
                    ErrorClass::Internal,
                    "the usage could not be recorded",
                ));
            }
        }
        Ok(result)
    }

    fn message_id(&self) -> Option<Uuid> {
        self.message
            .as_ref()
            .and_then(|m| m.reservation())
            .map(|r| r.id)
    }
}

fn request_metadata(
    session_id: &str,
    request: &CompletionRequest,
    status: &str,
    latency_ms: u64,
) -> serde_json::Value {
    json!({
        "request_id": session_id,
        "status": status,
        "error_class": null,
        "latency_ms": latency_ms,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    })
}

/// A model's reserved unit while its call runs. When the call ends without an answer, the unit
/// goes back, unless streamed text already reached the client: then that text is paid for (a
/// usage row with `response_metadata.partial = true`). Dropped mid-call (the client left), it
/// does the same in a background task.
struct PartialCharge {
    pool: PgPool,
    reservation: Option<ReservationGuard>,
    message: Option<Arc<ReservationGuard>>,
    /// Characters of this model's text handed to the client.
    delivered: AtomicUsize,
    user_id: Uuid,
    session_id: String,
    model: ModelSpec,
    prompt_chars: usize,
    /// The completion request without its prompt (for the usage row's metadata).
    request: CompletionRequest,
    started: Instant,
}

impl PartialCharge {
    fn new(
        call: &ModelCall<'_>,
        model: &ModelSpec,
        request: &CompletionRequest,
        reservation: ReservationGuard,
        started: Instant,
    ) -> Self {
        PartialCharge {
            pool: call.pools.durable.clone(),
            reservation: Some(reservation),
            message: call.message.clone(),
            delivered: AtomicUsize::new(0),
            user_id: call.user_id,
            session_id: call.session_id.clone(),
            model: model.clone(),
            // The messages themselves are not kept; their length estimates the input tokens.
            prompt_chars: request.input_chars(),
            request: CompletionRequest {
                messages: Vec::new(),
                tools: None,
                ..request.clone()
            },
            started,
        }
    }

    /// The unit, for an answer that is recorded in full.
    fn take(&mut self) -> ReservationGuard {
        self.reservation.take().expect("taken once")
    }

    /// The call ended without an answer: charge the delivered text, or give the unit back.
    async fn finish(mut self) {
        if let Some(reservation) = self.reservation.take() {
            let work = self.work(reservation);
            work.run().await;
        }
    }

    fn work(&mut self, reservation: ReservationGuard) -> ChargeWork {
        ChargeWork {
            pool: self.pool.clone(),
            reservation,
            message: self.message.take(),
            delivered: self.delivered.load(Ordering::Relaxed),
            prompt_chars: self.prompt_chars,
            user_id: self.user_id,
            session_id: std::mem::take(&mut self.session_id),
            model: self.model.clone(),
            request: self.request.clone(),
            latency_ms: elapsed_ms(self.started),
        }
    }
}

impl Drop for PartialCharge {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let work = self.work(reservation);
        if work.delivered == 0 {
            // Nothing reached the client: the guard refunds in the background.
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(work.run());
        }
    }
}

/// Charges the text a client already received, or gives the unit back.
struct ChargeWork {
    pool: PgPool,
    reservation: ReservationGuard,
    /// Held until the usage row is written, so the message is settled, not refunded, first.
    message: Option<Arc<ReservationGuard>>,
    delivered: usize,
    prompt_chars: usize,
    user_id: Uuid,
    session_id: String,
    model: ModelSpec,
    request: CompletionRequest,
    latency_ms: u64,
}

impl ChargeWork {
    async fn run(self) {
        if self.delivered == 0 {
            self.reservation.refund().await;
            return;
        }
        // No usage was reported for a cut stream: about four characters per token.
        let input_tokens = self.prompt_chars.div_ceil(4) as u32;
        let output_tokens = self.delivered.div_ceil(4) as u32;
        let cost = self.model.cost(input_tokens.into(), output_tokens.into());
        let record = UsageRecord {
            user_id: self.user_id,
            session_id: &self.session_id,
            model: &self.model,
            input_tokens,
            output_tokens,
            cost,
            request_metadata: request_metadata(
                &self.session_id,
                &self.request,
                "partial",
                self.latency_ms,
            ),
            response_metadata: json!({
                "status": "partial",
                "partial": true,
                "delivered_chars": self.delivered,
                "latency_ms": self.latency_ms,
                "tokens_estimated": true,
            }),
        };
        let settles = Settles {
            reservation: self
                .reservation
                .reservation()
                .map(|r| r.id)
                .unwrap_or_default(),
            message: self
                .message
                .as_ref()
                .and_then(|m| m.reservation())
                .map(|r| r.id),
            outcome: None,
        };
        match usage::record(&self.pool, &record, &settles).await {
            Ok(_) => self.reservation.settle(),
            Err(error) => {
                tracing::error!(%error, model = %self.model.id, "usage record of a partial answer failed");
                self.reservation.refund().await;
            }
        }
        drop(self.message);
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

    fn not_configured(gateway: &Gateway, model: &ModelSpec) -> Self {
        let message = match gateway.cli_of(&model.provider) {
            Some(kind) if gateway.is_configured(&model.provider) => {
                super::cli::container::ContainerCli::not_connected(kind)
            }
            Some(_) => format!(
                "provider `{}` runs a CLI in runtime containers, and this server has no runtime (`polydev serve --runtime`)",
                model.provider
            ),
            None => format!("provider `{}` has no API key configured", model.provider),
        };
        Failure::error(ErrorClass::NotConfigured, message)
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
        text_withheld: false,
        latency_ms,
        input_tokens: None,
        output_tokens: None,
        cost_usd: None,
        finish_reason: None,
        tool_calls: None,
        error: None,
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}
