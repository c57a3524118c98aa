//! Section 6: the login signalling relay across replicas. A second `polydev serve` runs on the
//! same database; the "browser" posts on the first process and the "agent" streams (SSE) from
//! the second. Each sample is one message: from the POST being sent to its event arriving on
//! the other process's stream (HTTP request, the UPDATE with its NOTIFY, delivery to the other
//! process's listener, the SSE write). The baseline, in the same run: a plain authenticated
//! request round trip (`GET /v1/login/sessions/{id}`) on the first process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::{Polydev, Run, ms};
use polydev::accounts::{self, Plan};

pub async fn relay_bench(polydev: &Polydev, quick: bool) -> anyhow::Result<Value> {
    let bin = std::env::current_exe()?.with_file_name("polydev");
    let mut replica = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--runtime", "off"])
        .env("DATABASE_URL", &polydev.db_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the second polydev serve")?;
    let line = BufReader::new(replica.stdout.take().context("stdout")?)
        .lines()
        .next_line()
        .await?
        .context("the second polydev serve exited")?;
    let second = line
        .strip_prefix("polydev listening on ")
        .context("unexpected output")?
        .to_string();

    // A user and a live session with a known agent secret.
    let user = accounts::create_user(&polydev.pool, "bench-login@example.com", Plan::Pro).await?;
    let token = accounts::create_scoped_token(
        &polydev.pool,
        user.user_id,
        "bench-login",
        None,
        accounts::Scope::Account,
    )
    .await?
    .token;
    let id = uuid::Uuid::new_v4();
    let secret = hex_secret();
    sqlx::query(
        "INSERT INTO auth_sessions (session_id, user_id, provider, status, retry_count, started_at,
                                    timeout_at, agent_secret_hash)
         VALUES ($1, $2, 'openai', 'pending', 0, NOW(), NOW() + interval '1 hour', $3)",
    )
    .bind(id)
    .bind(user.user_id)
    .bind(polydev::runtime::pool::sha256_hex(&secret))
    .execute(&polydev.pool)
    .await?;

    let client = super::client();
    let response = client
        .get(format!("{second}/v1/login/agent/{id}/signal"))
        .bearer_auth(&secret)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("agent stream: {}", response.status());
    }
    let mut events = response
        .bytes_stream()
        .map(|chunk| chunk.map(|b| b.to_vec()))
        .boxed();
    let mut buffer = String::new();
    // Waits for the next `signal` event and returns its `seq`.
    async fn next_signal(
        events: &mut futures_util::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
        buffer: &mut String,
    ) -> anyhow::Result<i64> {
        loop {
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if !block.lines().any(|l| l == "event: signal") {
                    continue;
                }
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .context("an event without data")?;
                let value: Value = serde_json::from_str(data)?;
                return value["seq"].as_i64().context("no seq");
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .context("no event within 10 s")?
                .context("the stream ended")??;
            buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    let total = if quick { 300 } else { 2000 };
    let post_url = format!("{}/v1/login/sessions/{id}/signal", polydev.url);
    let get_url = format!("{}/v1/login/sessions/{id}", polydev.url);
    let (mut relay, mut baseline) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let started = Instant::now();
    for i in 0..total + 20 {
        // Interleaved, so that both see the same machine load; the first 20 warm up.
        let t = Instant::now();
        let response = client.get(&get_url).bearer_auth(&token).send().await?;
        if !response.status().is_success() {
            bail!("baseline: {}", response.status());
        }
        response.bytes().await?;
        let round_trip = t.elapsed();

        let body = json!({"type": "offer", "sdp": format!("v=0\r\no=- {i} 1 IN IP4 127.0.0.1\r\ns=-\r\n")});
        let t = Instant::now();
        let response = client
            .post(&post_url)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await?;
        if response.status().as_u16() != 202 {
            bail!("post: {}", response.status());
        }
        let posted: Value = response.json().await?;
        let seq = posted["seq"].as_i64().context("no seq")?;
        let got = next_signal(&mut events, &mut buffer).await?;
        if got != seq {
            bail!("expected message {seq}, got {got}");
        }
        let arrived = t.elapsed();
        if i >= 20 {
            baseline.push(round_trip);
            relay.push(arrived);
        }
    }
    let elapsed = started.elapsed();
    let relay = Run {
        latencies: relay,
        elapsed,
        errors: 0,
    };
    let baseline = Run {
        latencies: baseline,
        elapsed,
        errors: 0,
    };
    println!(
        "relay (post on A → SSE on B), {total} messages: p50 {} p99 {} | plain round trip on A: p50 {} p99 {} | target p99 < 20 ms: {}",
        ms(relay.percentile(0.5)),
        ms(relay.percentile(0.99)),
        ms(baseline.percentile(0.5)),
        ms(baseline.percentile(0.99)),
        if relay.percentile(0.99) < Duration::from_millis(20) {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(replica);
    Ok(json!({
        "messages": total,
        "relay_p50_ms": relay.percentile(0.5).as_secs_f64() * 1e3,
        "relay_p99_ms": relay.percentile(0.99).as_secs_f64() * 1e3,
        "round_trip_p50_ms": baseline.percentile(0.5).as_secs_f64() * 1e3,
        "round_trip_p99_ms": baseline.percentile(0.99).as_secs_f64() * 1e3,
    }))
}

/// 64 random hex digits (two v4 UUIDs: 244 random bits).
fn hex_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}
