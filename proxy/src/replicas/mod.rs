//! Redis as the cache shared by replicas (optional, `redis:` in the config). Fetched credentials
//! are stored AES-256-GCM encrypted (the key name and the source's fingerprint are the
//! associated data, so a value cannot be replayed under another name or source) and expire
//! with the secret; one replica fetches while the others wait on a short lock, so N replicas
//! ask a token endpoint once. Revocations are published so every replica drops its copy.
//!
//! Redis is never on the request path of a cached secret, and never required: any Redis error
//! or timeout falls back to the replica's own cache and the source (and is counted), so a Redis
//! outage costs extra fetches, never a forwarded placeholder.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use redis::aio::ConnectionManager;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use tokio_util::sync::CancellationToken;

use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::pinning::{PinEvent, ToolPins};

use crate::config::{resolve_reference, RedisConfig};

/// Fetches from remote credential sources (Vault, OAuth), for `/metrics`.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub fetches: AtomicU64,
    pub errors: AtomicU64,
}

impl FetchStats {
    /// Count one fetch from a source and its outcome.
    pub fn record<T>(&self, r: Result<T, String>) -> Result<T, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        crate::credentials::note_fetch();
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// A secret fetched from a remote source, with how long it may be used.
#[derive(Clone)]
pub struct Fetched {
    pub value: Arc<SecretValue>,
    pub lifetime: Duration,
}

/// Stored value layout: version byte, nonce, ciphertext with tag.
const VERSION: u8 = 1;
/// After a Redis error, skip Redis for this long instead of paying a timeout on every miss.
const BACK_OFF: Duration = Duration::from_secs(5);
/// How often a waiting replica looks for the value another replica is fetching.
const POLL: Duration = Duration::from_millis(20);

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

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StoreError(String);

impl RedisStore {
    /// Connects lazily: a Redis that is down at start delays nothing.
    pub fn new(cfg: &RedisConfig) -> Result<RedisStore, String> {
        let key = resolve_reference(&cfg.encryption_key)
            .map_err(|e| format!("redis.encryption_key: {e}"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|_| "redis.encryption_key: not base64".to_owned())?;
        let key = UnboundKey::new(&AES_256_GCM, &raw)
            .map_err(|_| "redis.encryption_key: must be 32 bytes (base64)".to_owned())?;
        let mut info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
            .map_err(|e| format!("redis.url: {e}"))?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &cfg.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &cfg.password {
            let p = resolve_reference(p).map_err(|e| format!("redis.password: {e}"))?;
            settings = settings.set_password(p.expose());
        }
        info = info.set_redis_settings(settings);
        let client = match &cfg.ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| format!("redis.ca: {e}"))?;
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
        .map_err(|e| format!("redis.url: {e}"))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = client
            .get_connection_manager_lazy(manager)
            .map_err(|e| format!("redis: {e}"))?;
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

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    fn secret_key(&self, name: &str) -> String {
        format!("{}:secret:{name}", self.prefix)
    }

    fn revoke_channel(&self) -> String {
        format!("{}:revoke", self.prefix)
    }

    /// One command with the configured timeout; a failure marks Redis down for a while.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async::<T>(&mut conn)).await
    }

    /// A Redis call with the configured timeout; a failure marks Redis down for a while.
    async fn bounded<T>(
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

    fn seal(&self, aad: &str, plain: &str) -> Option<Vec<u8>> {
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

    fn open(&self, aad: &str, stored: &[u8]) -> Option<SecretValue> {
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
    async fn get_sealed(
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

    async fn set_sealed(&self, key: &str, aad: &str, value: &SecretValue, ttl: Option<Duration>) {
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

    fn failed(&self, err: String) -> StoreError {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + u64::try_from(BACK_OFF.as_millis()).unwrap_or(5_000);
        if self.down_until_ms.swap(until, Ordering::Relaxed) < self.now_ms() {
            tracing::warn!(error = %err, "redis unavailable: using the local cache and sources for {}s", BACK_OFF.as_secs());
        }
        StoreError(err)
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
    pub async fn get_or_fetch<F, Fut>(
        &self,
        name: &str,
        fingerprint: &str,
        fetch: F,
    ) -> Result<Fetched, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, String>>,
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
    async fn fetch_and_share<F, Fut>(
        &self,
        name: &str,
        fingerprint: &str,
        fetch: F,
    ) -> Result<Fetched, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, String>>,
    {
        let r = fetch().await;
        if let Ok(f) = &r {
            self.write(name, fingerprint, f).await;
        }
        r
    }

    /// Drop the shared value and tell every replica to drop its own copy.
    pub async fn revoke(&self, name: &str) {
        let _ = self
            .query::<i64>(redis::cmd("DEL").arg(self.secret_key(name)))
            .await;
        let _ = self
            .query::<i64>(redis::cmd("PUBLISH").arg(self.revoke_channel()).arg(name))
            .await;
    }

    fn pins_key(&self) -> String {
        format!("{}:pins", self.prefix)
    }

    fn pins_channel(&self) -> String {
        format!("{}:pins", self.prefix)
    }

    /// Every shared tool pin: (server, tool, hash).
    pub async fn load_pins(&self) -> Result<Vec<(String, String, String)>, String> {
        let all: Vec<(String, String)> = self
            .query(redis::cmd("HGETALL").arg(self.pins_key()))
            .await
            .map_err(|e| e.0)?;
        Ok(all
            .into_iter()
            .filter_map(|(field, hash)| {
                let (server, tool) = serde_json::from_str::<(String, String)>(&field).ok()?;
                Some((server, tool, hash))
            })
            .collect())
    }

    /// Offer this replica's first sight as the shared pin; returns the shared pin (ours, or
    /// the one another replica set first).
    pub async fn pin_first_sight(&self, server: &str, tool: &str, hash: &str) -> Option<String> {
        let field = serde_json::json!([server, tool]).to_string();
        let created: i64 = self
            .query(
                redis::cmd("HSETNX")
                    .arg(self.pins_key())
                    .arg(&field)
                    .arg(hash),
            )
            .await
            .ok()?;
        if created == 1 {
            self.publish_pin(&field).await;
            return Some(hash.to_owned());
        }
        self.query(redis::cmd("HGET").arg(self.pins_key()).arg(&field))
            .await
            .ok()
    }

    /// An operator accepted a new definition here: it becomes the shared pin.
    pub async fn pin_accept(&self, server: &str, tool: &str, hash: &str) {
        let field = serde_json::json!([server, tool]).to_string();
        let set = self
            .query::<i64>(
                redis::cmd("HSET")
                    .arg(self.pins_key())
                    .arg(&field)
                    .arg(hash),
            )
            .await;
        if set.is_ok() {
            self.publish_pin(&field).await;
        }
    }

    async fn publish_pin(&self, field: &str) {
        let _ = self
            .query::<i64>(redis::cmd("PUBLISH").arg(self.pins_channel()).arg(field))
            .await;
    }

    /// Follow what other replicas publish until shutdown — revocations (dropped here with
    /// `on_revoke`) and pin changes (applied to `pins`) — resubscribing after Redis failures.
    pub fn spawn_listener<F>(
        self: &Arc<Self>,
        on_revoke: F,
        pins: Arc<ToolPins>,
        shutdown: CancellationToken,
    ) where
        F: Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    {
        let store = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let run = store.listen_once(&on_revoke, &pins);
                tokio::select! {
                    r = run => if let Err(e) = r {
                        tracing::debug!(error = %e, "redis subscription ended; resubscribing");
                    },
                    _ = shutdown.cancelled() => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn listen_once<F>(&self, on_revoke: &F, pins: &ToolPins) -> Result<(), String>
    where
        F: Fn(String) -> futures_util::future::BoxFuture<'static, ()>,
    {
        use futures_util::StreamExt;
        let mut pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (revoke, pin) = (self.revoke_channel(), self.pins_channel());
        pubsub
            .subscribe(&[&revoke, &pin])
            .await
            .map_err(|e| e.to_string())?;
        // Pins changed while we were not listening.
        if let Ok(all) = self.load_pins().await {
            for (server, tool, hash) in all {
                pins.set_pinned(&server, &tool, &hash);
            }
        }
        tracing::debug!("listening for revocations and pin changes");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            if msg.get_channel_name() == revoke {
                on_revoke(payload).await;
            } else if let Ok((server, tool)) = serde_json::from_str::<(String, String)>(&payload) {
                let hash: Result<Option<String>, _> = self
                    .query(redis::cmd("HGET").arg(self.pins_key()).arg(&payload))
                    .await;
                if let Ok(Some(hash)) = hash {
                    pins.set_pinned(&server, &tool, &hash);
                }
            }
        }
        Err("subscription closed".into())
    }
}

/// Report this replica's pin events to the shared store (and apply its answer).
pub fn share_pins(store: &Arc<RedisStore>, pins: &Arc<ToolPins>) {
    let (store, weak) = (store.clone(), Arc::downgrade(pins));
    pins.set_hook(Arc::new(move |event| {
        let (store, weak) = (store.clone(), weak.clone());
        tokio::spawn(async move {
            match event {
                PinEvent::FirstSight { server, tool, hash } => {
                    let shared = store.pin_first_sight(&server, &tool, &hash).await;
                    if let (Some(shared), Some(pins)) = (shared, weak.upgrade()) {
                        pins.set_pinned(&server, &tool, &shared);
                    }
                }
                PinEvent::Accepted { server, tool, hash } => {
                    store.pin_accept(&server, &tool, &hash).await;
                }
            }
        });
    }));
}

/// A stable fingerprint of a source's configuration (which Vault path, which token endpoint
/// and client), so replicas share a value only when they fetch it from the same place.
pub fn fingerprint(source: &impl std::fmt::Debug) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{source:?}").as_bytes());
    d.as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> RedisStore {
        std::env::set_var(
            "PORTCULLIS_TEST_REDIS_KEY",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
        );
        let cfg = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            username: None,
            password: None,
            encryption_key: "env:PORTCULLIS_TEST_REDIS_KEY".into(),
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
        let got = s
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
