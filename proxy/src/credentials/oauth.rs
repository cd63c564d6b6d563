//! OAuth 2.0 access tokens as a credential source: the client_credentials grant (RFC 6749
//! §4.4) and the refresh_token grant (§6), with refresh-token rotation kept (Redis, else the
//! `file:` it came from, else memory). The token endpoint is asked once, the token is cached
//! until `refresh_before` (30 s) before `expires_in` runs out (concurrent misses coalesce into one request; with
//! Redis, one request across replicas), and a failed fetch with no valid cached token is an
//! error (the request gets 503, never the placeholder forwarded).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use moka::future::Cache;
use portcullis_filters::parse::secret::SecretValue;

use crate::config::{Invalid, OAuthGrant, OAuthSourceConfig, SecretRef};
use crate::credentials::fetch::{fingerprint, ByLifetime, FetchStats, SourceError};
use crate::replicas::{Fetched, RedisStore};
use crate::upstream::backend::Backend;

pub struct OAuthSource {
    name: String,
    cfg: OAuthSourceConfig,
    backend: Backend,
    token: Cache<(), Arc<Fetched>>,
    shared: Option<Arc<RedisStore>>,
    fingerprint: String,
    /// The latest rotated refresh token and the hash of the configured one it descends from.
    rotated: tokio::sync::Mutex<Option<(String, SecretValue)>>,
    stats: Arc<FetchStats>,
}

/// Which token endpoint, client and grant the token comes from (not how it is reached: the CA
/// and the timeout do not change the token).
fn source_fingerprint(cfg: &OAuthSourceConfig) -> String {
    let grant = match cfg.grant {
        OAuthGrant::ClientCredentials => "client_credentials",
        OAuthGrant::RefreshToken => "refresh_token",
    };
    let scopes = cfg.scopes.join(" ");
    let refresh_token = cfg.refresh_token.as_ref().map(SecretRef::to_string);
    let client_secret = cfg.client_secret.to_string();
    fingerprint([
        Some(cfg.token_url.as_str()),
        Some(grant),
        refresh_token.as_deref(),
        Some(cfg.client_id.as_str()),
        Some(client_secret.as_str()),
        Some(scopes.as_str()),
        cfg.audience.as_deref(),
        Some(cfg.client_auth.as_str()),
    ])
}

impl std::fmt::Debug for OAuthSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthSource")
            .field("token_url", &self.cfg.token_url)
            .finish()
    }
}

impl OAuthSource {
    /// `key` names the source in the config, for errors.
    pub fn new(
        name: &str,
        key: &str,
        cfg: &OAuthSourceConfig,
        shared: Option<Arc<RedisStore>>,
        stats: Arc<FetchStats>,
    ) -> Result<OAuthSource, Invalid> {
        if cfg.grant == OAuthGrant::RefreshToken
            && shared.is_none()
            && matches!(cfg.refresh_token, Some(SecretRef::Env(_)))
        {
            tracing::warn!(
                credential = name,
                "a rotated OAuth refresh token is kept in memory only (no redis, not a file: reference): a restart starts again from the configured token"
            );
        }
        Ok(OAuthSource {
            name: name.to_owned(),
            cfg: cfg.clone(),
            backend: Backend::new("OAuth token endpoint", cfg.ca.clone(), cfg.timeout)
                .map_err(|e| Invalid::new(format!("{key}.ca"), e))?,
            token: Cache::builder()
                .max_capacity(1)
                .expire_after(ByLifetime)
                .build(),
            fingerprint: source_fingerprint(cfg),
            shared,
            rotated: tokio::sync::Mutex::new(None),
            stats,
        })
    }

    /// Drop the local copy (the shared one is the caller's business).
    pub async fn revoke(&self) {
        self.token.invalidate(&()).await;
    }

    pub async fn get(&self) -> Result<Arc<SecretValue>, SourceError> {
        let fetch = async {
            match &self.shared {
                Some(s) => {
                    s.get_or_fetch(&self.name, &self.fingerprint, || self.fetch_counted())
                        .await
                }
                None => self.fetch_counted().await,
            }
            .map(Arc::new)
        };
        self.token
            .try_get_with((), fetch)
            .await
            .map(|t| t.value.clone())
            .map_err(|e| (*e).clone())
    }

    /// The refresh token to use now: the latest rotation descending from the configured one,
    /// or the configured one (a changed configured token starts a new chain).
    async fn refresh_token(&self) -> Result<(String, SecretValue), SourceError> {
        let Some(reference) = &self.cfg.refresh_token else {
            return Err(SourceError::Local("no refresh_token configured".into()));
        };
        let seed = reference
            .resolve()
            .map_err(|e| SourceError::Local(format!("refresh_token: {e}")))?;
        let seed_hash = fingerprint([Some(seed.expose())]);
        if let Some(s) = &self.shared {
            if let Some(t) = s
                .load_refresh(&self.name, &self.fingerprint, &seed_hash)
                .await
            {
                return Ok((seed_hash, t));
            }
        }
        let rotated = self.rotated.lock().await;
        match rotated.as_ref() {
            Some((h, t)) if *h == seed_hash => Ok((seed_hash, t.clone())),
            _ => Ok((seed_hash, seed)),
        }
    }

    /// Keep a rotated refresh token where the next fetch (on any replica) will find it.
    async fn keep_rotated(&self, seed_hash: String, new: SecretValue) {
        let file = match &self.cfg.refresh_token {
            Some(SecretRef::File(path)) => Some(path.as_path()),
            _ => None,
        };
        match (&self.shared, file) {
            (Some(s), _) => {
                s.store_refresh(&self.name, &self.fingerprint, &seed_hash, &new)
                    .await
            }
            (None, Some(path)) => {
                if let Err(e) = write_secret_file(path, &new) {
                    tracing::error!(credential = %self.name, error = %e, "cannot persist the rotated OAuth refresh token");
                }
                // The file now holds the new token: it is the seed of the next fetch.
                *self.rotated.lock().await = None;
                return;
            }
            (None, None) => {}
        }
        *self.rotated.lock().await = Some((seed_hash, new));
    }

    /// The token request's headers and form body (no await here: the form builder is not Send).
    fn token_request(
        &self,
        refresh: Option<&SecretValue>,
    ) -> Result<(Vec<(HeaderName, HeaderValue)>, Bytes), SourceError> {
        let secret = self
            .cfg
            .client_secret
            .resolve()
            .map_err(|e| SourceError::Local(format!("client_secret: {e}")))?;
        let mut form = form_urlencoded::Serializer::new(String::new());
        match refresh {
            Some(r) => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", r.expose());
            }
            None => {
                form.append_pair("grant_type", "client_credentials");
            }
        }
        if !self.cfg.scopes.is_empty() {
            form.append_pair("scope", &self.cfg.scopes.join(" "));
        }
        if let Some(aud) = &self.cfg.audience {
            form.append_pair("audience", aud);
        }
        let headers = client_authentication(
            &self.cfg.client_id,
            &secret,
            &self.cfg.client_auth,
            &mut form,
        )?;
        Ok((headers, Bytes::from(form.finish())))
    }

    async fn fetch_counted(&self) -> Result<Fetched, SourceError> {
        self.stats.record(self.fetch().await)
    }

    async fn fetch(&self) -> Result<Fetched, SourceError> {
        let refresh = match self.cfg.grant {
            OAuthGrant::RefreshToken => Some(self.refresh_token().await?),
            OAuthGrant::ClientCredentials => None,
        };
        let (headers, body) = self.token_request(refresh.as_ref().map(|(_, t)| t))?;
        let (status, resp) = self
            .backend
            .call(Method::POST, &self.cfg.token_url, &headers, Some(body))
            .await?;
        if status != StatusCode::OK {
            return Err(SourceError::Answer(format!(
                "OAuth token endpoint answered {status}"
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&resp).map_err(|_| {
            SourceError::Answer("OAuth token endpoint answered with invalid JSON".into())
        })?;
        let token = v
            .get("access_token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| {
                SourceError::Answer("OAuth token response has no access_token".into())
            })?;
        let expires_in = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(300);
        // Zero (a token that expires within `refresh_before`): not cached, here or in Redis.
        let lifetime = Duration::from_secs(expires_in).saturating_sub(self.cfg.refresh_before);
        let value = Arc::new(SecretValue::new(token.to_owned()));
        if let (Some((seed_hash, old)), Some(new)) =
            (refresh, v.get("refresh_token").and_then(|t| t.as_str()))
        {
            if new != old.expose() {
                self.keep_rotated(seed_hash, SecretValue::new(new.to_owned()))
                    .await;
            }
        }
        tracing::info!(credential = %self.name, token_url = %self.cfg.token_url, expires_in, "fetched an OAuth access token");
        Ok(Fetched { value, lifetime })
    }
}

/// The headers of a token request authenticating `client_id`: HTTP Basic (`basic`, RFC 6749
/// §2.3.1, both parts form-urlencoded first) or the form body (`post`), plus the form's
/// content type.
pub(crate) fn client_authentication(
    client_id: &str,
    secret: &SecretValue,
    method: &str,
    form: &mut form_urlencoded::Serializer<'_, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, SourceError> {
    let mut headers = vec![(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    )];
    if method == "post" {
        form.append_pair("client_id", client_id);
        form.append_pair("client_secret", secret.expose());
    } else {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(client_id),
            enc(secret.expose())
        ));
        let v = HeaderValue::from_str(&format!("Basic {basic}")).map_err(|_| {
            SourceError::Local("OAuth client credentials are not valid in a header".into())
        })?;
        headers.push((HeaderName::from_static("authorization"), v));
    }
    Ok(headers)
}

/// Replace a secret file atomically (temp file in the same directory, mode 0600, rename).
fn write_secret_file(path: &std::path::Path, value: &SecretValue) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(value.expose().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
