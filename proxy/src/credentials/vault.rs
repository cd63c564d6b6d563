//! A Vault KV v2 client for credential sources (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2):
//! `GET /v1/{mount}/data/{path}` with `X-Vault-Token` (and `X-Vault-Namespace`), token auth or
//! AppRole login (`POST /v1/auth/{mount}/login`). Vault is an operator-configured internal
//! service, so it is reached directly, not through the egress guard; its TLS is verified.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use moka::future::Cache;
use portcullis_filters::parse::secret::SecretValue;

use crate::config::{Invalid, VaultConfig, VaultSecretRef};
use crate::credentials::fetch::{fingerprint, ByLifetime, FetchStats, SourceError};
use crate::replicas::{Fetched, RedisStore};
use crate::upstream::backend::Backend;

pub struct Vault {
    cfg: VaultConfig,
    backend: Backend,
    /// Secret values by credential name.
    values: Cache<String, Arc<Fetched>>,
    shared: Option<Arc<RedisStore>>,
    stats: Arc<FetchStats>,
    /// The AppRole login token (token auth reads its reference each time: cheap and rotatable).
    login: Cache<(), Arc<SecretValue>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("address", &self.cfg.address)
            .finish()
    }
}

impl Vault {
    pub fn new(
        cfg: &VaultConfig,
        shared: Option<Arc<RedisStore>>,
        stats: Arc<FetchStats>,
    ) -> Result<Vault, Invalid> {
        Ok(Vault {
            cfg: cfg.clone(),
            backend: Backend::new("vault", cfg.ca.clone(), cfg.timeout)
                .map_err(|e| Invalid::new("vault.ca", e))?,
            values: Cache::builder()
                .max_capacity(10_000)
                .expire_after(ByLifetime)
                .build(),
            shared,
            stats,
            login: Cache::builder()
                .max_capacity(1)
                .time_to_live(cfg.cache_ttl)
                .build(),
        })
    }

    pub async fn revoke(&self, name: &str) {
        self.values.invalidate(name).await;
    }

    /// The secret for credential `name`: cached, or fetched once for all concurrent callers
    /// (and, with Redis, once for all replicas).
    pub async fn get(
        &self,
        name: &str,
        r: &VaultSecretRef,
    ) -> Result<Arc<SecretValue>, SourceError> {
        let fetch = async {
            let fetched = match &self.shared {
                Some(s) => {
                    let source = fingerprint([
                        Some(self.cfg.address.as_str()),
                        self.cfg.namespace.as_deref(),
                        Some(r.mount.as_str()),
                        Some(r.path.as_str()),
                        Some(r.field.as_str()),
                    ]);
                    s.get_or_fetch(name, &source, || self.fetch_counted(r))
                        .await
                }
                None => self.fetch_counted(r).await,
            };
            fetched.map(Arc::new)
        };
        self.values
            .try_get_with(name.to_owned(), fetch)
            .await
            .map(|f| f.value.clone())
            .map_err(|e| (*e).clone())
    }

    async fn fetch_counted(&self, r: &VaultSecretRef) -> Result<Fetched, SourceError> {
        self.stats.record(self.fetch(r).await)
    }

    async fn fetch(&self, r: &VaultSecretRef) -> Result<Fetched, SourceError> {
        let url = format!(
            "{}/v1/{}/data/{}",
            self.cfg.address.trim_end_matches('/'),
            r.mount.trim_matches('/'),
            r.path.trim_matches('/')
        );
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let (status, body) = self.call(Method::GET, &url, Some(&token), None).await?;
            match status {
                StatusCode::OK => {
                    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
                        SourceError::Answer("vault answered with invalid JSON".into())
                    })?;
                    let field = v
                        .pointer("/data/data")
                        .and_then(|d| d.get(&r.field))
                        .and_then(|f| f.as_str())
                        .ok_or_else(|| {
                            SourceError::Answer(format!(
                                "vault secret {}/{} has no string field {}",
                                r.mount, r.path, r.field
                            ))
                        })?;
                    // A lease (KV v1, dynamic secrets) shorter than cache_ttl wins; KV v2
                    // answers lease_duration 0 (no lease).
                    let lease = v
                        .get("lease_duration")
                        .and_then(serde_json::Value::as_u64)
                        .filter(|s| *s > 0)
                        .map(std::time::Duration::from_secs);
                    let lifetime = lease.map_or(self.cfg.cache_ttl, |l| l.min(self.cfg.cache_ttl));
                    return Ok(Fetched {
                        value: Arc::new(SecretValue::new(field.to_owned())),
                        lifetime,
                    });
                }
                // An expired AppRole token: log in again, once.
                StatusCode::FORBIDDEN if self.cfg.approle.is_some() && !retried => {
                    self.login.invalidate_all();
                    retried = true;
                }
                s => {
                    return Err(SourceError::Answer(format!(
                        "vault answered {s} for {}/{}",
                        r.mount, r.path
                    )))
                }
            }
        }
    }

    async fn token(&self) -> Result<Arc<SecretValue>, SourceError> {
        if let Some(t) = &self.cfg.token {
            return t
                .resolve()
                .map(Arc::new)
                .map_err(|e| SourceError::Local(format!("vault token: {e}")));
        }
        self.login
            .try_get_with((), self.approle_login())
            .await
            .map_err(|e| (*e).clone())
    }

    async fn approle_login(&self) -> Result<Arc<SecretValue>, SourceError> {
        let Some(a) = &self.cfg.approle else {
            return Err(SourceError::Local("no vault auth configured".into()));
        };
        let role_id = a
            .role_id
            .resolve()
            .map_err(|e| SourceError::Local(e.to_string()))?;
        let secret_id = a
            .secret_id
            .resolve()
            .map_err(|e| SourceError::Local(e.to_string()))?;
        let body =
            serde_json::json!({"role_id": role_id.expose(), "secret_id": secret_id.expose()});
        let url = format!(
            "{}/v1/auth/{}/login",
            self.cfg.address.trim_end_matches('/'),
            a.mount.trim_matches('/')
        );
        let (status, resp) = self
            .call(
                Method::POST,
                &url,
                None,
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(SourceError::Answer(format!(
                "vault AppRole login answered {status}"
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&resp)
            .map_err(|_| SourceError::Answer("vault login: invalid JSON".into()))?;
        let token = v
            .pointer("/auth/client_token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| SourceError::Answer("vault login: no auth.client_token".into()))?;
        Ok(Arc::new(SecretValue::new(token.to_owned())))
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        token: Option<&SecretValue>,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), SourceError> {
        let mut headers = Vec::new();
        if let Some(t) = token {
            let v = HeaderValue::from_str(t.expose()).map_err(|_| {
                SourceError::Local("vault token is not a valid header value".into())
            })?;
            headers.push((HeaderName::from_static("x-vault-token"), v));
        }
        if let Some(ns) = &self.cfg.namespace {
            let v = HeaderValue::from_str(ns).map_err(|_| {
                SourceError::Local("vault namespace is not a valid header value".into())
            })?;
            headers.push((HeaderName::from_static("x-vault-namespace"), v));
        }
        self.backend.call(method, url, &headers, body).await
    }
}
