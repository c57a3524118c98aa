//! The browser API (feature `wasm`): the same Rust code, exported with wasm-bindgen.
//! Key material crosses the boundary as JSON; errors become JS exceptions with clear messages.

use wasm_bindgen::prelude::*;

use crate::{Context, KdfParams, KeyMaterial, Keyring, Opened, Record};

fn js_error(error: crate::Error) -> JsError {
    JsError::new(&error.to_string())
}

/// An unlocked account in the browser.
#[wasm_bindgen]
pub struct ZkKeyring(Keyring);

/// `{ material, recovery_key }`: the material to upload and the recovery key to show once.
#[wasm_bindgen]
pub struct ZkSetup {
    keyring: Option<Keyring>,
    material: String,
    recovery_key: String,
    recovery_proof: String,
}

#[wasm_bindgen]
impl ZkSetup {
    #[wasm_bindgen(getter)]
    pub fn material(&self) -> String {
        self.material.clone()
    }
    #[wasm_bindgen(getter, js_name = recoveryKey)]
    pub fn recovery_key(&self) -> String {
        self.recovery_key.clone()
    }
    /// The recovery key's proof (hex) for `POST /v1/zk/enable`; the password's is the
    /// keyring's `proof`.
    #[wasm_bindgen(getter, js_name = recoveryProof)]
    pub fn recovery_proof(&self) -> String {
        self.recovery_proof.clone()
    }
    /// The unlocked keyring (can be taken once).
    pub fn keyring(&mut self) -> Result<ZkKeyring, JsError> {
        self.keyring
            .take()
            .map(ZkKeyring)
            .ok_or_else(|| JsError::new("keyring already taken"))
    }
}

fn parse_material(json: &str) -> Result<KeyMaterial, JsError> {
    serde_json::from_str(json).map_err(|e| JsError::new(&format!("invalid key material: {e}")))
}

/// Sets a master password up with the default Argon2id parameters.
#[wasm_bindgen]
pub fn setup(password: &str, user_id: &str) -> Result<ZkSetup, JsError> {
    let (keyring, material, recovery) =
        Keyring::setup(password, user_id, KdfParams::DEFAULT).map_err(js_error)?;
    Ok(ZkSetup {
        keyring: Some(keyring),
        material: serde_json::to_string(&material).expect("material serializes"),
        recovery_key: recovery.display(),
        recovery_proof: recovery.proof().to_hex(),
    })
}

#[wasm_bindgen]
pub fn unlock(material_json: &str, password: &str, user_id: &str) -> Result<ZkKeyring, JsError> {
    Keyring::unlock(&parse_material(material_json)?, password, user_id)
        .map(ZkKeyring)
        .map_err(js_error)
}

/// Unlocks one password envelope (the new key of a key rotation in progress).
#[wasm_bindgen(js_name = unlockPasswordEnvelope)]
pub fn unlock_password_envelope(
    password_wrapped: &str,
    password: &str,
    user_id: &str,
) -> Result<ZkKeyring, JsError> {
    Keyring::unlock_password_envelope(password_wrapped, password, user_id)
        .map(ZkKeyring)
        .map_err(js_error)
}

#[wasm_bindgen(js_name = unlockWithRecovery)]
pub fn unlock_with_recovery(
    material_json: &str,
    recovery_key: &str,
    user_id: &str,
) -> Result<ZkKeyring, JsError> {
    Keyring::unlock_with_recovery(&parse_material(material_json)?, recovery_key, user_id)
        .map(ZkKeyring)
        .map_err(js_error)
}

#[wasm_bindgen]
impl ZkKeyring {
    pub fn seal(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        plaintext: &str,
    ) -> Result<String, JsError> {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        self.0.seal(&ctx, plaintext.as_bytes()).map_err(js_error)
    }

    pub fn open(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        envelope: &str,
    ) -> Result<String, JsError> {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        let bytes = self.0.open(&ctx, envelope).map_err(js_error)?;
        String::from_utf8(bytes).map_err(|_| JsError::new("the plaintext is not UTF-8 text"))
    }

    /// The proof (hex) of the secret this keyring was unlocked with, for the server
    /// (`Polydev-Zk-Proof` or `Polydev-Zk-Recovery-Proof`, per `proofKind`).
    #[wasm_bindgen(getter)]
    pub fn proof(&self) -> String {
        self.0.proof().to_hex()
    }

    /// `password` or `recovery`.
    #[wasm_bindgen(getter, js_name = proofKind)]
    pub fn proof_kind(&self) -> String {
        match self.0.proof().kind() {
            crate::ProofKind::Password => "password".into(),
            crate::ProofKind::Recovery => "recovery".into(),
        }
    }

    /// New material for a new password (re-wraps the account key only), as JSON
    /// `{material, password_proof}`.
    #[wasm_bindgen(js_name = changePassword)]
    pub fn change_password(
        &self,
        material_json: &str,
        new_password: &str,
    ) -> Result<String, JsError> {
        let (material, proof) = self
            .0
            .change_password(
                &parse_material(material_json)?,
                new_password,
                KdfParams::DEFAULT,
            )
            .map_err(js_error)?;
        Ok(
            serde_json::json!({ "material": material, "password_proof": proof.to_hex() })
                .to_string(),
        )
    }

    /// A new recovery key for this account key: JSON `{material, recovery_key, recovery_proof}`
    /// (the material keeps its password envelope and hint).
    #[wasm_bindgen(js_name = replaceRecoveryKey)]
    pub fn replace_recovery_key(&self, material_json: &str) -> Result<String, JsError> {
        let (material, recovery) = self
            .0
            .replace_recovery_key(&parse_material(material_json)?)
            .map_err(js_error)?;
        Ok(serde_json::json!({
            "material": material,
            "recovery_key": recovery.display(),
            "recovery_proof": recovery.proof().to_hex(),
        })
        .to_string())
    }

    /// Seals bytes given as standard base64 (credentials).
    #[wasm_bindgen(js_name = sealBase64)]
    pub fn seal_base64(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        base64: &str,
    ) -> Result<String, JsError> {
        use base64::Engine;
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|_| JsError::new("not base64"))?,
        );
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        self.0.seal(&ctx, &bytes).map_err(js_error)
    }

    /// Opens an item as standard base64 of its bytes (credentials).
    #[wasm_bindgen(js_name = openBase64)]
    pub fn open_base64(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        envelope: &str,
    ) -> Result<String, JsError> {
        use base64::Engine;
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        let bytes = zeroize::Zeroizing::new(self.0.open(&ctx, envelope).map_err(js_error)?);
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes.as_slice()))
    }

    /// Whether the item opens with this key (a rotation skips what is already re-sealed).
    pub fn opens(&self, namespace: &str, user_id: &str, row_id: &str, envelope: &str) -> bool {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        self.0.open(&ctx, envelope).is_ok()
    }

    /// Key rotation: opens an item with `old` and seals the same bytes for the same place with
    /// this key. The plaintext never leaves WASM.
    #[wasm_bindgen(js_name = resealFrom)]
    pub fn reseal_from(
        &self,
        old: &ZkKeyring,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        envelope: &str,
    ) -> Result<String, JsError> {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        let bytes = zeroize::Zeroizing::new(old.0.open(&ctx, envelope).map_err(js_error)?);
        self.0.seal(&ctx, &bytes).map_err(js_error)
    }

    /// Seals a chat record (JSON, see `Record`): its text and its place.
    #[wasm_bindgen(js_name = sealRecord)]
    pub fn seal_record(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        record_json: &str,
    ) -> Result<String, JsError> {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        self.0
            .seal_record(&ctx, &parse_record(record_json)?)
            .map_err(js_error)
    }

    /// Opens a chat item: JSON `{"record": {...}}`, or `{"bare": "text"}` for the older format
    /// (its place is not bound: show it flagged).
    #[wasm_bindgen(js_name = openRecord)]
    pub fn open_record(
        &self,
        namespace: &str,
        user_id: &str,
        row_id: &str,
        envelope: &str,
    ) -> Result<String, JsError> {
        let ctx = Context {
            namespace,
            user_id,
            row_id,
        };
        Ok(
            match self.0.open_record(&ctx, envelope).map_err(js_error)? {
                Opened::Record(record) => serde_json::json!({ "record": record }),
                Opened::Bare(text) => serde_json::json!({ "bare": text }),
            }
            .to_string(),
        )
    }
}

fn parse_record(json: &str) -> Result<Record, JsError> {
    serde_json::from_str(json).map_err(|e| JsError::new(&format!("invalid record: {e}")))
}

/// SHA-256 (hex) of a record's sealed form: what the migration manifest lists.
#[wasm_bindgen(js_name = recordHash)]
pub fn record_hash(record_json: &str) -> Result<String, JsError> {
    Ok(parse_record(record_json)?.hash())
}

/// SHA-256 (hex) of key material (JSON): what a client pins.
#[wasm_bindgen(js_name = materialFingerprint)]
pub fn material_fingerprint(material_json: &str) -> Result<String, JsError> {
    Ok(parse_material(material_json)?.fingerprint())
}

/// The Argon2id parameters of key material (JSON), read from the password envelope's header
/// without a key, as JSON `{memory_kib, iterations, parallelism}`: what a client pins.
#[wasm_bindgen(js_name = materialKdfParams)]
pub fn material_kdf_params(material_json: &str) -> Result<String, JsError> {
    let params = parse_material(material_json)?
        .kdf_params()
        .map_err(js_error)?;
    Ok(serde_json::to_string(&params).expect("params serialize"))
}

/// SHA-256 (hex) of a text's UTF-8 bytes: the migration's compare-and-swap token.
#[wasm_bindgen(js_name = contentHash)]
pub fn content_hash(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Runs the primitives' known-answer tests inside this build; returns the names that failed.
#[wasm_bindgen(js_name = selfTest)]
pub fn self_test() -> Vec<String> {
    crate::kat::failures()
        .into_iter()
        .map(str::to_string)
        .collect()
}
