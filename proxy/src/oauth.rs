//! OAuth 2.0 access tokens as a credential source (RFC 6749 §4.4, client_credentials): the
//! token endpoint is asked once, the token is cached until shortly before `expires_in` runs
//! out (concurrent misses coalesce into one request), and a failed fetch with no valid cached
//! token is an error (the request gets 503, never the placeholder forwarded).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use moka::future::Cache;
use moka::Expiry;
use portcullis_filters::secret::SecretValue;

use crate::backend::Backend;
use crate::config::{resolve_reference, OAuthSourceConfig};

/// Refresh this long before the token expires, so a request never carries a dying token.
const EARLY: Duration = Duration::from_secs(30);

struct Token {
    value: Arc<SecretValue>,
    lifetime: Duration,
}

struct ByExpiresIn;

impl Expiry<(), Arc<Token>> for ByExpiresIn {
    fn expire_after_create(&self, _k: &(), t: &Arc<Token>, _now: Instant) -> Option<Duration> {
        Some(t.lifetime)
    }
}

pub struct OAuthSource {
    cfg: OAuthSourceConfig,
    backend: Backend,
    token: Cache<(), Arc<Token>>,
}

impl std::fmt::Debug for OAuthSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthSource")
            .field("token_url", &self.cfg.token_url)
            .finish()
    }
}

impl OAuthSource {
    pub fn new(cfg: &OAuthSourceConfig) -> Result<OAuthSource, String> {
        Ok(OAuthSource {
            cfg: cfg.clone(),
            backend: Backend::new("OAuth token endpoint", cfg.ca.clone(), cfg.timeout)?,
            token: Cache::builder()
                .max_capacity(1)
                .expire_after(ByExpiresIn)
                .build(),
        })
    }

    pub async fn revoke(&self) {
        self.token.invalidate(&()).await;
    }

    pub async fn get(&self) -> Result<Arc<SecretValue>, String> {
        self.token
            .try_get_with((), self.fetch())
            .await
            .map(|t| t.value.clone())
            .map_err(|e| (*e).clone())
    }

    /// The token request's headers and form body (no await here: the form builder is not Send).
    fn token_request(&self) -> Result<(Vec<(HeaderName, HeaderValue)>, Bytes), String> {
        let secret = resolve_reference(&self.cfg.client_secret)?;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !self.cfg.scopes.is_empty() {
            form.append_pair("scope", &self.cfg.scopes.join(" "));
        }
        if let Some(aud) = &self.cfg.audience {
            form.append_pair("audience", aud);
        }
        let mut headers = vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        )];
        if self.cfg.client_auth == "post" {
            form.append_pair("client_id", &self.cfg.client_id);
            form.append_pair("client_secret", secret.expose());
        } else {
            // RFC 6749 §2.3.1: both parts form-urlencoded before Basic encoding.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(&self.cfg.client_id),
                enc(secret.expose())
            ));
            let v = HeaderValue::from_str(&format!("Basic {basic}"))
                .map_err(|_| "OAuth client credentials are not valid in a header".to_owned())?;
            headers.push((HeaderName::from_static("authorization"), v));
        }
        Ok((headers, Bytes::from(form.finish())))
    }

    async fn fetch(&self) -> Result<Arc<Token>, String> {
        let (headers, body) = self.token_request()?;
        let (status, resp) = self
            .backend
            .call(Method::POST, &self.cfg.token_url, &headers, Some(body))
            .await?;
        if status != StatusCode::OK {
            return Err(format!("OAuth token endpoint answered {status}"));
        }
        let v: serde_json::Value = serde_json::from_slice(&resp)
            .map_err(|_| "OAuth token endpoint answered with invalid JSON".to_owned())?;
        let token = v
            .get("access_token")
            .and_then(|t| t.as_str())
            .ok_or("OAuth token response has no access_token")?;
        let expires_in = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(300);
        let lifetime = Duration::from_secs(expires_in)
            .checked_sub(EARLY)
            .unwrap_or(Duration::from_secs(expires_in) / 2)
            .max(Duration::from_secs(1));
        tracing::info!(token_url = %self.cfg.token_url, expires_in, "fetched an OAuth access token");
        Ok(Arc::new(Token {
            value: Arc::new(SecretValue::new(token.to_owned())),
            lifetime,
        }))
    }
}
