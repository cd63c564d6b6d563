//! Values at rest in Redis: AES-256-GCM with a fresh nonce per write, the key name and the
//! source's fingerprint as associated data (a value cannot be replayed under another name or
//! source), expiring with the secret.

use std::time::Duration;

use portcullis_filters::parse::secret::SecretValue;
use ring::aead::{Aad, Nonce, NONCE_LEN};
use ring::rand::SecureRandom;

use super::{RedisStore, StoreError};

/// Stored value layout: version byte, nonce, ciphertext with tag.
const VERSION: u8 = 1;

impl RedisStore {
    pub(super) fn seal(&self, aad: &str, plain: &str) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut buf = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Some(out)
    }

    pub(super) fn open(&self, aad: &str, stored: &[u8]) -> Option<SecretValue> {
        let (&version, rest) = stored.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?;
        let value = std::str::from_utf8(plain).ok().map(str::to_owned);
        zeroize::Zeroize::zeroize(&mut buf);
        value.map(SecretValue::new)
    }

    /// A sealed value and its remaining lifetime (`None` without expiry); a value sealed
    /// under other associated data (another source, another seed) is a miss.
    pub(super) async fn get_sealed(
        &self,
        key: &str,
        aad: &str,
    ) -> Result<Option<(SecretValue, Option<Duration>)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        let mut conn = self.conn.clone();
        let (stored, ttl_ms) = self
            .bounded(pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut conn))
            .await?;
        let ttl = match ttl_ms {
            -1 => None,
            ms => match u64::try_from(ms) {
                Ok(ms @ 1..) => Some(Duration::from_millis(ms)),
                _ => return Ok(None), // gone or expiring this instant
            },
        };
        Ok(stored
            .and_then(|s| self.open(&format!("{key}\n{aad}"), &s))
            .map(|v| (v, ttl)))
    }

    pub(super) async fn set_sealed(
        &self,
        key: &str,
        aad: &str,
        value: &SecretValue,
        ttl: Option<Duration>,
    ) {
        let Some(sealed) = self.seal(&format!("{key}\n{aad}"), value.expose()) else {
            return;
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(sealed);
        if let Some(ttl) = ttl {
            cmd.arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        let _ = self.query::<()>(&cmd).await;
    }
}
