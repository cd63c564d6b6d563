//! The shared credential cache: read-through with one fetching replica at a time (a short
//! Redis lock; the others wait for its result, then fetch themselves), revocation, and the
//! rotated OAuth refresh tokens.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_filters::parse::secret::SecretValue;
use ring::rand::SecureRandom;

use super::{Fetched, RedisStore, StoreError};

/// How often a waiting replica looks for the value another replica is fetching.
const POLL: Duration = Duration::from_millis(20);

impl RedisStore {
    async fn read(&self, name: &str, fingerprint: &str) -> Result<Option<Fetched>, StoreError> {
        let hit = self.get_sealed(&self.secret_key(name), fingerprint).await?;
        Ok(hit.and_then(|(v, ttl)| {
            ttl.map(|lifetime| Fetched {
                value: Arc::new(v),
                lifetime,
            })
        }))
    }

    async fn write(&self, name: &str, fingerprint: &str, f: &Fetched) {
        self.set_sealed(
            &self.secret_key(name),
            fingerprint,
            &f.value,
            Some(f.lifetime),
        )
        .await;
    }

    /// The latest rotated OAuth refresh token of credential `name` that descends from the
    /// configured token `seed_hash` (a re-seeded config starts a new chain).
    pub async fn load_refresh(
        &self,
        name: &str,
        fingerprint: &str,
        seed_hash: &str,
    ) -> Option<SecretValue> {
        if self.is_down() {
            return None;
        }
        let key = format!("{}:refresh:{name}", self.prefix);
        let aad = format!("{fingerprint}\n{seed_hash}");
        self.get_sealed(&key, &aad)
            .await
            .ok()
            .flatten()
            .map(|(v, _)| v)
    }

    pub async fn store_refresh(
        &self,
        name: &str,
        fingerprint: &str,
        seed_hash: &str,
        token: &SecretValue,
    ) {
        let key = format!("{}:refresh:{name}", self.prefix);
        let aad = format!("{fingerprint}\n{seed_hash}");
        self.set_sealed(&key, &aad, token, None).await;
    }

    /// The credential from the shared cache, or fetched with `fetch` by exactly one replica
    /// at a time (the others wait for its result up to `lock_ttl`, then fetch themselves).
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        name: &str,
        fingerprint: &str,
        fetch: F,
    ) -> Result<Fetched, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
    {
        if self.is_down() {
            return fetch().await;
        }
        match self.read(name, fingerprint).await {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => {}
            Err(_) => return fetch().await,
        }
        let lock = format!("{}:lock", self.secret_key(name));
        let mut token = [0u8; 16];
        let _ = self.rng.fill(&mut token);
        let lock_ms = u64::try_from(self.lock_ttl.as_millis()).unwrap_or(5_000);
        let acquired = self
            .query::<Option<String>>(
                redis::cmd("SET")
                    .arg(&lock)
                    .arg(&token[..])
                    .arg("NX")
                    .arg("PX")
                    .arg(lock_ms),
            )
            .await;
        match acquired {
            Ok(Some(_)) => {
                let r = self.fetch_and_share(name, fingerprint, fetch).await;
                // Release only our own lock (it may have expired and been taken since).
                let release = redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
                );
                let mut conn = self.conn.clone();
                let _ = tokio::time::timeout(
                    self.timeout,
                    release
                        .key(&lock)
                        .arg(&token[..])
                        .invoke_async::<i64>(&mut conn),
                )
                .await;
                r
            }
            Ok(None) => {
                let deadline = Instant::now() + self.lock_ttl;
                while Instant::now() < deadline {
                    tokio::time::sleep(POLL).await;
                    match self.read(name, fingerprint).await {
                        Ok(Some(hit)) => return Ok(hit),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                    // The fetching replica gave up (its fetch failed): stop waiting.
                    match self.query::<bool>(redis::cmd("EXISTS").arg(&lock)).await {
                        Ok(true) => {}
                        _ => break,
                    }
                }
                self.fetch_and_share(name, fingerprint, fetch).await
            }
            Err(_) => fetch().await,
        }
    }

    /// Fetch from the source and, on success, store the value for the other replicas.
    async fn fetch_and_share<F, Fut, E>(
        &self,
        name: &str,
        fingerprint: &str,
        fetch: F,
    ) -> Result<Fetched, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
    {
        let r = fetch().await;
        match &r {
            // A value with no lifetime left is for the request that fetched it only.
            Ok(f) if !f.lifetime.is_zero() => self.write(name, fingerprint, f).await,
            _ => {}
        }
        r
    }

    /// Drop the shared value and tell every replica to drop its own copy.
    /// Claim `what` for `every` across the replicas (`SET NX PX`): `Some(true)` for the first
    /// claimer in the window, `Some(false)` for the others, `None` when Redis cannot say.
    pub async fn claim(&self, what: &str, every: std::time::Duration) -> Option<bool> {
        if self.is_down() {
            return None;
        }
        let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
        let key = format!("{}:claim:{what}", self.prefix);
        let cmd = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .clone();
        self.query::<Option<String>>(&cmd)
            .await
            .ok()
            .map(|r| r.is_some())
    }

    pub async fn revoke(&self, name: &str) {
        let _ = self
            .query::<i64>(redis::cmd("DEL").arg(self.secret_key(name)))
            .await;
        let _ = self
            .query::<i64>(redis::cmd("PUBLISH").arg(self.revoke_channel()).arg(name))
            .await;
    }
}
