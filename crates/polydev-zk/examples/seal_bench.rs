//! Envelope seal/open vs the raw AEAD on 1 KiB items (a profiling aid; the figures of record
//! come from `bench/run.sh --only zk`). `cargo run --release -p polydev-zk --example seal_bench [rounds]`
use chacha20poly1305::aead::{Aead, KeyInit};
use polydev_zk::{Context, KdfParams, Keyring};
use std::time::Instant;

/// The best of 7 timings of `rounds` calls, in calls per second (the machine is shared).
fn best(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..7)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..rounds {
                f();
            }
            rounds as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let only = std::env::args().nth(2).unwrap_or_default();
    let item = vec![0x5au8; 1024];
    let (keyring, _, _) =
        Keyring::setup("bench password", "bench-user", KdfParams::MINIMUM).unwrap();
    let ctx = Context {
        namespace: "chat.message",
        user_id: "bench-user",
        row_id: "row",
    };
    let mut sealed = keyring.seal(&ctx, &item).unwrap();
    if only.is_empty() || only == "seal" {
        let seal = best(rounds, || {
            sealed = std::hint::black_box(keyring.seal(&ctx, &item).unwrap())
        });
        println!("seal {seal:.0}/s");
    }
    if only.is_empty() || only == "open" {
        let open = best(rounds, || {
            std::hint::black_box(keyring.open(&ctx, &sealed).unwrap());
        });
        println!("open {open:.0}/s");
    }
    if only.is_empty() || only == "raw" {
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(&[7u8; 32].into());
        let nonce = chacha20poly1305::XNonce::from([9u8; 24]);
        let raw = best(rounds, || {
            std::hint::black_box(cipher.encrypt(&nonce, item.as_slice()).unwrap());
        });
        println!("raw {raw:.0}/s");
    }
}
