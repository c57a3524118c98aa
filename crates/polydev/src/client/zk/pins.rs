//! What this machine remembers about an account's zero-knowledge keys ("pins"), so a server
//! that later turns zero-knowledge off, serves older key material, other material at the same
//! version, weaker KDF parameters, or loses the migration manifest is noticed and refused.
//!
//! One file per server and account: `<config dir>/zk-pins/<sha256(server, user)>.json`, mode
//! 0600 in a 0700 directory, written atomically (a temporary file renamed over the old one). The
//! config directory is `$POLYDEV_CONFIG_DIR`, else `$XDG_CONFIG_HOME/polydev`, else
//! `~/.config/polydev`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use polydev_zk::KdfParams;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What was seen for one account on one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub server: String,
    pub user_id: String,
    /// The key material's version (`GET /v1/zk`), which only grows.
    pub version: i64,
    /// `KeyMaterial::fingerprint` of the material at that version.
    pub fingerprint: String,
    /// The password envelope's Argon2id parameters.
    pub kdf: KdfParams,
    /// The migration manifest, once recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestPin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPin {
    pub chunks: u64,
    /// SHA-256 of the manifest's entries.
    pub digest: String,
}

/// Where pins live.
#[derive(Debug, Clone)]
pub struct PinStore {
    dir: PathBuf,
}

impl PinStore {
    pub fn new(config_dir: impl Into<PathBuf>) -> PinStore {
        PinStore {
            dir: config_dir.into(),
        }
    }

    /// `$POLYDEV_CONFIG_DIR`, else `$XDG_CONFIG_HOME/polydev`, else `~/.config/polydev`.
    pub fn default_dir() -> PathBuf {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("POLYDEV_CONFIG_DIR") {
            return PathBuf::from(dir);
        }
        var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("polydev")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, server: &str, user_id: &str) -> PathBuf {
        let mut hash = Sha256::new();
        hash.update(server.trim_end_matches('/').as_bytes());
        hash.update([0]);
        hash.update(user_id.as_bytes());
        let name = hex::encode(&hash.finalize()[..16]);
        self.dir.join("zk-pins").join(format!("{name}.json"))
    }

    pub fn load(&self, server: &str, user_id: &str) -> anyhow::Result<Option<Pin>> {
        let path = self.path(server, user_id);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a valid pin file", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, pin: &Pin) -> anyhow::Result<()> {
        let path = self.path(&pin.server, &pin.user_id);
        let dir = path.parent().expect("a pin file has a directory");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).context("random")?;
        let tmp = dir.join(format!(".{}.tmp", hex::encode(random)));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(pin)?)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Forgets an account's pin (after its owner checked that the server's change is theirs).
    pub fn forget(&self, server: &str, user_id: &str) -> anyhow::Result<bool> {
        match std::fs::remove_file(self.path(server, user_id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pins_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let store = PinStore::new(dir.path().join("polydev"));
        assert_eq!(store.load("http://a", "u").unwrap(), None);
        let pin = Pin {
            server: "http://a".into(),
            user_id: "u".into(),
            version: 3,
            fingerprint: "f".into(),
            kdf: KdfParams::MINIMUM,
            manifest: None,
        };
        store.save(&pin).unwrap();
        store.save(&pin).unwrap();
        assert_eq!(store.load("http://a/", "u").unwrap(), Some(pin));
        assert_eq!(store.load("http://a", "v").unwrap(), None);
        let path = store.path("http://a", "u");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(store.forget("http://a", "u").unwrap());
        assert_eq!(store.load("http://a", "u").unwrap(), None);
    }
}
