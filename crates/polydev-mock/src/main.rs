//! `polydev-mock [ADDR]`: serve the mock upstreams (default 127.0.0.1:9090) until killed.
//! Used by the benchmarks, so that polydev and LiteLLM call the same upstream.

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9090".into());
    let mock = polydev_mock::MockUpstream::start_on(&addr).await;
    println!("polydev-mock listening on {}", mock.base_url());
    std::future::pending::<()>().await;
}
