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
use portcullis_filters::stages::delegation::unix_now;

use crate::config::{ActorAssertionConfig, ActorConfig, Invalid, TokenExchangeConfig};

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

/// What a token exchange sends as its `actor_token`.
enum Actor {
    None,
    /// A JWT the proxy signs, naming the caller.
    Assertion(ActorAssertionConfig, Box<ring::signature::EcdsaKeyPair>),
    /// The caller's own JWT-SVID, issued for this audience.
    JwtSvid {
        audience: String,
    },
}

pub struct TokenExchange {
    name: String,
    cfg: TokenExchangeConfig,
    grant: Grant,
    actor: Actor,
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
        let actor = match (&cfg.actor, grant) {
            (None, _) => Actor::None,
            (Some(_), Grant::JwtBearer) => {
                return Err(Invalid::new(
                    format!("{key}.actor"),
                    "an actor token is part of token exchange, not of the JWT bearer grant",
                ))
            }
            (
                Some(ActorConfig {
                    assertion: None,
                    jwt_svid: Some(j),
                }),
                _,
            ) => Actor::JwtSvid {
                audience: j.audience.clone(),
            },
            (
                Some(ActorConfig {
                    assertion: Some(a),
                    jwt_svid: None,
                }),
                _,
            ) => {
                let der = crate::certs::load_key(&a.key)
                    .map_err(|e| Invalid::new(format!("{key}.actor.assertion.key"), e))?;
                let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der.secret_der(),
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|_| {
                    Invalid::new(
                        format!("{key}.actor.assertion.key"),
                        "must be a P-256 (ES256) private key in PKCS#8",
                    )
                })?;
                Actor::Assertion(a.clone(), Box::new(pair))
            }
            (Some(_), _) => {
                return Err(Invalid::new(
                    format!("{key}.actor"),
                    "give exactly one of assertion or jwt_svid",
                ))
            }
        };
        Ok(TokenExchange {
            name: name.to_owned(),
            cfg: cfg.clone(),
            grant,
            actor,
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

    pub async fn get(
        &self,
        on_behalf: Option<&OnBehalf<'_>>,
    ) -> Result<Arc<SecretValue>, SourceError> {
        let Some((who, subject_token)) =
            on_behalf.and_then(|o| Some((o, o.delegation.token.clone()?)))
        else {
            return Err(SourceError::Local(
                "it is minted per user: the request carries no delegation token".into(),
            ));
        };
        // The agent's own JWT-SVID is required on every use, not only when a token is minted:
        // a request without one never gets the token minted with it.
        let svid = match &self.actor {
            Actor::JwtSvid { audience } => match who.jwt_svid {
                Some(s) if s.usable_for(audience, unix_now()) => Some(s.token.clone()),
                _ => {
                    return Err(SourceError::Local(format!(
                        "its actor token is the agent's JWT-SVID for audience {audience:?}, and \
                         the request carries none (send it in x-portcullis-jwt-svid, e.g. with \
                         portcullis connect --jwt-audience)"
                    )))
                }
            },
            _ => None,
        };
        // One token per principal (and per acting workload when the actor is sent): keyed by
        // those names themselves (in memory) and their full SHA-256 (in Redis), nothing the
        // next user could share.
        let actor = match self.actor {
            Actor::None => "",
            _ => who.actor,
        };
        let principal = format!(
            "{}\0{}\0{actor}",
            who.delegation.issuer, who.delegation.subject
        );
        // Only a miss needs the Redis name (a SHA-256): the hit path stays a map lookup.
        let fetch = async {
            let exchange = || self.exchange_counted(&subject_token, who.actor, svid.as_deref());
            match &self.shared {
                Some(s) => {
                    let digest = ring::digest::digest(&ring::digest::SHA256, principal.as_bytes());
                    let shared_name = format!(
                        "{}:{}",
                        self.name,
                        portcullis_filters::pipeline::hex(digest.as_ref())
                    );
                    s.get_or_fetch(&shared_name, &self.fingerprint, exchange)
                        .await
                }
                None => exchange().await,
            }
            .map(Arc::new)
        };
        self.tokens
            .try_get_with(principal.clone(), fetch)
            .await
            .map(|t| t.value.clone())
            .map_err(|e| (*e).clone())
    }

    /// The actor token: the caller's JWT-SVID (`svid`), or an assertion the proxy signs for
    /// `actor` (the caller's SPIFFE ID), or none.
    fn actor_token(
        &self,
        actor: &str,
        svid: Option<&SecretValue>,
    ) -> Result<Option<String>, SourceError> {
        let (a, pair) = match &self.actor {
            Actor::None => return Ok(None),
            Actor::JwtSvid { .. } => return Ok(svid.map(|t| t.expose().to_owned())),
            Actor::Assertion(a, pair) => (a, pair),
        };
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let now = unix_now().unsigned_abs();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": a.kid});
        let claims = serde_json::json!({
            "iss": a.issuer,
            "sub": actor,
            "aud": a.audience.as_deref().unwrap_or(&self.cfg.token_url),
            "iat": now,
            "exp": now + a.ttl.as_secs(),
            "jti": portcullis_filters::pipeline::hex(&rand_bytes()),
        });
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .map_err(|_| SourceError::Local("cannot sign the actor assertion".into()))?;
        Ok(Some(format!("{signed}.{}", b64(sig.as_ref()))))
    }

    async fn exchange_counted(
        &self,
        subject_token: &SecretValue,
        actor: &str,
        svid: Option<&SecretValue>,
    ) -> Result<Fetched, SourceError> {
        self.stats
            .record(self.exchange(subject_token, actor, svid).await)
    }

    async fn exchange(
        &self,
        subject_token: &SecretValue,
        actor: &str,
        svid: Option<&SecretValue>,
    ) -> Result<Fetched, SourceError> {
        let actor_token = self.actor_token(actor, svid)?;
        let (headers, body) = self.request(subject_token, actor_token.as_deref())?;
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
        actor_token: Option<&str>,
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
                if let Some(actor) = actor_token {
                    form.append_pair("actor_token", actor);
                    form.append_pair("actor_token_type", "urn:ietf:params:oauth:token-type:jwt");
                }
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

/// 128 random bits (a `jti`).
fn rand_bytes() -> [u8; 16] {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b
}
