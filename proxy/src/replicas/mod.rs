//! Redis as the cache shared by replicas (optional, `redis:` in the config). Fetched credentials
//! are stored AES-256-GCM encrypted (the key name and the source's fingerprint are the
//! associated data, so a value cannot be replayed under another name or source) and expire
//! with the secret; one replica fetches while the others wait on a short lock, so N replicas
//! ask a token endpoint once. Revocations are published so every replica drops its copy.
//!
//! Redis is never on the request path of a cached secret, and never required: any Redis error
//! or timeout falls back to the replica's own cache and the source (and is counted), so a Redis
//! outage costs extra fetches, never a forwarded placeholder.

mod cache;
mod gates;
mod identity;
mod pins;
mod pubsub;
mod sealed;

pub use gates::{RedisApprovals, RedisLimiter};
pub use pins::share_pins;
pub use pubsub::Followers;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use portcullis_filters::parse::secret::SecretValue;
use redis::aio::ConnectionManager;
use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::rand::SystemRandom;

use crate::config::{Invalid, RedisConfig};

/// A secret fetched from a remote source, with how long it may be used: what sources return
/// and what the shared cache stores.
#[derive(Clone)]
pub struct Fetched {
    pub value: Arc<SecretValue>,
    pub lifetime: Duration,
}

/// After a Redis error, skip Redis for this long instead of paying a timeout on every miss.
const BACK_OFF: Duration = Duration::from_secs(5);

pub struct RedisStore {
    conn: ConnectionManager,
    client: redis::Client,
    key: LessSafeKey,
    rng: SystemRandom,
    prefix: String,
    timeout: Duration,
    lock_ttl: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` until which Redis is skipped.
    down_until_ms: AtomicU64,
    pub errors: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A Redis call that failed or timed out (Redis is then skipped for a while).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub(super) String);

impl RedisStore {
    /// Connects lazily: a Redis that is down at start delays nothing.
    pub fn new(cfg: &RedisConfig) -> Result<RedisStore, Invalid> {
        let key_error = |reason: &str| Invalid::new("redis.encryption_key", reason);
        let key = cfg
            .encryption_key
            .resolve()
            .map_err(|e| key_error(&e.to_string()))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|_| key_error("not base64"))?;
        let key = UnboundKey::new(&AES_256_GCM, &raw)
            .map_err(|_| key_error("must be 32 bytes (base64)"))?;
        let mut info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
            .map_err(|e| Invalid::new("redis.url", e))?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &cfg.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &cfg.password {
            let p = p.resolve().map_err(|e| Invalid::new("redis.password", e))?;
            settings = settings.set_password(p.expose());
        }
        info = info.set_redis_settings(settings);
        let client = match &cfg.ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| Invalid::new("redis.ca", e))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| Invalid::new("redis.url", e))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = client
            .get_connection_manager_lazy(manager)
            .map_err(|e| Invalid::new("redis", e))?;
        Ok(RedisStore {
            conn,
            client,
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            lock_ttl: cfg.lock_ttl,
            epoch: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    pub(super) fn secret_key(&self, name: &str) -> String {
        format!("{}:secret:{name}", self.prefix)
    }

    pub(super) fn revoke_channel(&self) -> String {
        format!("{}:revoke", self.prefix)
    }

    /// One command with the configured timeout; a failure marks Redis down for a while.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async::<T>(&mut conn)).await
    }

    /// A Redis call with the configured timeout; a failure marks Redis down for a while.
    pub(super) async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let err = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        Err(self.failed(err))
    }

    pub(super) fn failed(&self, err: String) -> StoreError {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + u64::try_from(BACK_OFF.as_millis()).unwrap_or(5_000);
        if self.down_until_ms.swap(until, Ordering::Relaxed) < self.now_ms() {
            tracing::warn!(error = %err, "redis unavailable: using the local cache and sources for {}s", BACK_OFF.as_secs());
        }
        StoreError(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretRef;

    fn store() -> RedisStore {
        std::env::set_var(
            "PORTCULLIS_TEST_REDIS_KEY",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
        );
        let cfg = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            username: None,
            password: None,
            encryption_key: SecretRef::Env("PORTCULLIS_TEST_REDIS_KEY".into()),
            ca: None,
            prefix: "t".into(),
            timeout: Duration::from_millis(100),
            lock_ttl: Duration::from_millis(100),
        };
        match RedisStore::new(&cfg) {
            Ok(s) => s,
            Err(e) => unreachable!("{e}"),
        }
    }

    #[tokio::test]
    async fn sealed_values_open_only_under_the_same_key_and_source() {
        let s = store();
        let sealed = s.seal("t:secret:a\nfp1", "tok3n").unwrap_or_default();
        assert!(
            !sealed.windows(5).any(|w| w == b"tok3n"),
            "ciphertext holds the secret"
        );
        assert_eq!(
            s.open("t:secret:a\nfp1", &sealed)
                .map(|v| v.expose().to_owned()),
            Some("tok3n".to_owned())
        );
        assert!(s.open("t:secret:b\nfp1", &sealed).is_none());
        assert!(s.open("t:secret:a\nfp2", &sealed).is_none());
        let mut tampered = sealed.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert!(s.open("t:secret:a\nfp1", &tampered).is_none());
    }

    #[tokio::test]
    async fn a_dead_redis_falls_back_to_the_source() {
        let s = store();
        let got: Result<Fetched, ()> = s
            .get_or_fetch("a", "fp", || async {
                Ok(Fetched {
                    value: Arc::new(SecretValue::new("v".into())),
                    lifetime: Duration::from_secs(1),
                })
            })
            .await;
        assert_eq!(got.map(|f| f.value.expose().to_owned()), Ok("v".to_owned()));
        assert!(s.errors.load(Ordering::Relaxed) >= 1);
        assert!(s.is_down());
    }
}
