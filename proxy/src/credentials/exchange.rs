//! OAuth 2.0 Token Exchange (RFC 8693) as a credential source: an access token minted for the
//! principal a request is made for. The request's verified delegation token is the
//! `subject_token` (or, with the JWT bearer grant of RFC 7523, the `assertion`); the answer is cached per principal (issuer and subject) until
//! `refresh_before` before its `expires_in` (concurrent misses coalesce into one exchange; with
//! Redis, encrypted and shared by replicas). A request without a delegation token gets none:
//! the credential is refused (503 `credential_unavailable`), never another principal's token.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use moka::future::Cache;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::credentials::OnBehalf;

use crate::config::{Invalid, TokenExchangeConfig};
use crate::credentials::fetch::{fingerprint, ByLifetime, FetchStats, SourceError};
use crate::credentials::oauth::client_authentication;
use crate::replicas::{Fetched, RedisStore};
use crate::upstream::backend::Backend;

/// How the delegation token is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// RFC 8693: `subject_token` + `subject_token_type`.
    TokenExchange,
    /// RFC 7523 §2.1: `assertion`.
    JwtBearer,
}

impl Grant {
    fn uri(self) -> &'static str {
        match self {
            Grant::TokenExchange => "urn:ietf:params:oauth:grant-type:token-exchange",
            Grant::JwtBearer => "urn:ietf:params:oauth:grant-type:jwt-bearer",
        }
    }
}
/// Principals whose tokens a replica keeps in memory.
const MAX_PRINCIPALS: u64 = 10_000;

pub struct TokenExchange {
    name: String,
    cfg: TokenExchangeConfig,
    grant: Grant,
    backend: Backend,
    /// By principal (a digest of issuer and subject).
    tokens: Cache<String, Arc<Fetched>>,
    shared: Option<Arc<RedisStore>>,
    fingerprint: String,
    stats: Arc<FetchStats>,
}

impl std::fmt::Debug for TokenExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenExchange")
            .field("token_url", &self.cfg.token_url)
            .finish()
    }
}

impl TokenExchange {
    pub fn new(
        name: &str,
        key: &str,
        cfg: &TokenExchangeConfig,
        grant: Grant,
        shared: Option<Arc<RedisStore>>,
        stats: Arc<FetchStats>,
    ) -> Result<TokenExchange, Invalid> {
        let scopes = cfg.scopes.join(" ");
        let secret = cfg.client_secret.to_string();
        Ok(TokenExchange {
            name: name.to_owned(),
            cfg: cfg.clone(),
            grant,
            backend: Backend::new("token exchange endpoint", cfg.ca.clone(), cfg.timeout)
                .map_err(|e| Invalid::new(format!("{key}.ca"), e))?,
            tokens: Cache::builder()
                .max_capacity(MAX_PRINCIPALS)
                .expire_after(ByLifetime)
                .build(),
            fingerprint: fingerprint([
                Some(cfg.token_url.as_str()),
                Some(grant.uri()),
                Some(cfg.client_id.as_str()),
                Some(secret.as_str()),
                Some(scopes.as_str()),
                cfg.audience.as_deref(),
                cfg.resource.as_deref(),
            ]),
            shared,
            stats,
        })
    }

    pub async fn revoke(&self) {
        self.tokens.invalidate_all();
    }

    pub async fn get(&self, on_behalf: Option<&OnBehalf>) -> Result<Arc<SecretValue>, SourceError> {
        let Some((who, subject_token)) = on_behalf.and_then(|o| Some((o, o.token.clone()?))) else {
            return Err(SourceError::Local(
                "it is minted per user: the request carries no delegation token".into(),
            ));
        };
        // One token per principal: keyed by the issuer and subject themselves (in memory) and
        // their full SHA-256 (in Redis), nothing the next user could share.
        let principal = format!("{}\0{}", who.issuer, who.subject);
        let digest = ring::digest::digest(&ring::digest::SHA256, principal.as_bytes());
        let shared_name = format!(
            "{}:{}",
            self.name,
            portcullis_filters::pipeline::hex(digest.as_ref())
        );
        let fetch = async {
            let exchange = || self.exchange_counted(&subject_token);
            match &self.shared {
                Some(s) => {
                    s.get_or_fetch(&shared_name, &self.fingerprint, exchange)
                        .await
                }
                None => exchange().await,
            }
            .map(Arc::new)
        };
        self.tokens
            .try_get_with(principal, fetch)
            .await
            .map(|t| t.value.clone())
            .map_err(|e| (*e).clone())
    }

    async fn exchange_counted(&self, subject_token: &SecretValue) -> Result<Fetched, SourceError> {
        self.stats.record(self.exchange(subject_token).await)
    }

    async fn exchange(&self, subject_token: &SecretValue) -> Result<Fetched, SourceError> {
        let (headers, body) = self.request(subject_token)?;
        let (status, resp) = self
            .backend
            .call(Method::POST, &self.cfg.token_url, &headers, Some(body))
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&resp).map_err(|_| {
            SourceError::Answer(format!(
                "token exchange endpoint answered {status} without JSON"
            ))
        })?;
        if status != StatusCode::OK {
            // The error code only: a description may quote what was sent.
            let code = v.get("error").and_then(|e| e.as_str()).unwrap_or("?");
            let code: String = code
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            return Err(SourceError::Answer(format!(
                "token exchange refused ({status}, {code})"
            )));
        }
        let token = v
            .get("access_token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| {
                SourceError::Answer("token exchange answer has no access_token".into())
            })?;
        let expires_in = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(300);
        let lifetime = Duration::from_secs(expires_in).saturating_sub(self.cfg.refresh_before);
        tracing::info!(credential = %self.name, token_url = %self.cfg.token_url, expires_in,
            "exchanged a delegation token for an access token");
        Ok(Fetched {
            value: Arc::new(SecretValue::new(token.to_owned())),
            lifetime,
        })
    }

    /// The exchange request (no await here: the form builder is not Send).
    fn request(
        &self,
        subject_token: &SecretValue,
    ) -> Result<(Vec<(http::HeaderName, http::HeaderValue)>, Bytes), SourceError> {
        let secret = self
            .cfg
            .client_secret
            .resolve()
            .map_err(|e| SourceError::Local(format!("client_secret: {e}")))?;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", self.grant.uri());
        match self.grant {
            Grant::TokenExchange => {
                form.append_pair("subject_token", subject_token.expose());
                form.append_pair("subject_token_type", &self.cfg.subject_token_type);
                form.append_pair(
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                );
            }
            Grant::JwtBearer => {
                form.append_pair("assertion", subject_token.expose());
            }
        }
        if let Some(a) = &self.cfg.audience {
            form.append_pair("audience", a);
        }
        if let Some(r) = &self.cfg.resource {
            form.append_pair("resource", r);
        }
        if !self.cfg.scopes.is_empty() {
            form.append_pair("scope", &self.cfg.scopes.join(" "));
        }
        let headers = client_authentication(
            &self.cfg.client_id,
            &secret,
            &self.cfg.client_auth,
            &mut form,
        )?;
        Ok((headers, Bytes::from(form.finish())))
    }
}
