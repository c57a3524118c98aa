//! Argon2id password stretching, with client-side floors no stored value can lower.

use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;

/// Argon2id parameters. They travel inside the authenticated password envelope, and are checked
/// against [`KdfParams::MINIMUM`] before any use, so a server cannot weaken them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes: about 0.1 s natively on this project's machines.
    pub const DEFAULT: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };
    /// OWASP's floor for Argon2id: m = 19 MiB, t = 2, p = 1.
    pub const MINIMUM: KdfParams = KdfParams {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// Ceilings, so stored parameters cannot make unlocking hang or crash a browser tab (the
    /// page runs Argon2 single-threaded in a Web Worker): 256 MiB, 10 passes. The frozen v1
    /// vectors use 19 MiB and 2 passes, well below.
    pub const MAX_MEMORY_KIB: u32 = 256 * 1024;
    pub const MAX_ITERATIONS: u32 = 10;
    pub const MAX_PARALLELISM: u32 = 16;

    pub fn check(&self) -> Result<(), Error> {
        let ok = self.memory_kib >= Self::MINIMUM.memory_kib
            && self.iterations >= Self::MINIMUM.iterations
            && self.parallelism >= Self::MINIMUM.parallelism
            && self.memory_kib <= Self::MAX_MEMORY_KIB
            && self.iterations <= Self::MAX_ITERATIONS
            && self.parallelism <= Self::MAX_PARALLELISM;
        if ok {
            Ok(())
        } else {
            Err(Error::WeakKdfParams {
                min_memory_kib: Self::MINIMUM.memory_kib,
                min_iterations: Self::MINIMUM.iterations,
            })
        }
    }

    /// 32 bytes from `password` and `salt`. Checks the floors first.
    pub(crate) fn derive(
        &self,
        password: &[u8],
        salt: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, Error> {
        self.check()?;
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|_| Error::InvalidInput("Argon2 parameters"))?;
        let mut out = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password, salt, out.as_mut())
            .map_err(|_| Error::InvalidInput("password or salt"))?;
        Ok(out)
    }
}
