//! The envelope parser and opener must never panic, whatever the bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use polydev_zk::{Context, KdfParams, Keyring, inspect};

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| Keyring::setup("fuzz", "user", KdfParams::MINIMUM).unwrap().0)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = inspect(&text);
    let ctx = Context { namespace: "chat.message", user_id: "user", row_id: "row" };
    let _ = keyring().open(&ctx, &text);
    use base64::Engine;
    let envelope = format!("pdz.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data));
    let _ = inspect(&envelope);
    let _ = keyring().open(&ctx, &envelope);
});
