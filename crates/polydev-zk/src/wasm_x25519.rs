//! The browser API of the X25519 parts (feature `wasm`): key pairs and sealed boxes for the
//! runtime's sealed jobs. The private key is wrapped with the keyring like any item:
//! `keyring.seal("runtime.x25519", user, user, pair.exportSecret())`, and back with
//! `ZkX25519KeyPair.fromSecret(keyring.open("runtime.x25519", user, user, wrapped))`.

use wasm_bindgen::prelude::*;

use crate::{Context, X25519KeyPair};

fn js_error(error: crate::Error) -> JsError {
    JsError::new(&error.to_string())
}

#[wasm_bindgen]
pub struct ZkX25519KeyPair(X25519KeyPair);

#[wasm_bindgen]
impl ZkX25519KeyPair {
    pub fn generate() -> Result<ZkX25519KeyPair, JsError> {
        X25519KeyPair::generate()
            .map(ZkX25519KeyPair)
            .map_err(js_error)
    }

    #[wasm_bindgen(js_name = fromSecret)]
    pub fn from_secret(secret: &str) -> Result<ZkX25519KeyPair, JsError> {
        X25519KeyPair::from_secret(secret)
            .map(ZkX25519KeyPair)
            .map_err(js_error)
    }

    #[wasm_bindgen(getter, js_name = publicKey)]
    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    #[wasm_bindgen(js_name = exportSecret)]
    pub fn export_secret(&self) -> String {
        self.0.export_secret().to_string()
    }

    /// Opens a box sealed to this key (job output) as bytes.
    pub fn open(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        sealed: &str,
    ) -> Result<Vec<u8>, JsError> {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        self.0.open(&ctx, sealed).map_err(js_error)
    }
}

/// Seals bytes to a public key (a job's command, to the container's agent).
#[wasm_bindgen(js_name = sealTo)]
pub fn seal_to(
    public_key: &str,
    namespace: &str,
    user_id: &str,
    row_id: &str,
    plaintext: &[u8],
) -> Result<String, JsError> {
    let ctx = Context {
        namespace,
        user_id,
        row_id,
    };
    crate::seal_to(public_key, &ctx, plaintext).map_err(js_error)
}

/// RFC 7748 X25519 vectors inside this build.
#[wasm_bindgen(js_name = selfTestX25519)]
pub fn self_test_x25519() -> bool {
    crate::kat_rfc7748()
}
