//! Delegation: the principal an agent acts for, asserted by a JWT in a configured header
//! (`delegation.header`, e.g. `x-portcullis-on-behalf-of: <JWT>`): a user's access or ID
//! token, a transaction token, an ID-JAG. The token is verified (issuer allow-list, the
//! issuer's JWKS, signature, `aud`, `exp`/`nbf`/`iat` with bounded skew, the `act` chain), the
//! header is stripped before anything else reads the request, and the result is what the
//! policy sees as `input.delegation` and what logs and spans carry — never the token.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, Rejection};
use crate::parse::jwt::{self, Expect, Jwk, JwtError};
use crate::pipeline::{Action, Context, Filter, Phase};

/// Where an issuer's keys come from (the proxy fetches and caches its JWKS).
#[async_trait::async_trait]
pub trait IssuerKeys: Send + Sync + fmt::Debug + 'static {
    /// The signature keys of `issuer`; `fresh`: the token names a key the cached set lacks
    /// (rotation), fetch again if the source allows it now.
    async fn keys(&self, issuer: &str, fresh: bool) -> Result<Arc<Vec<Jwk>>, String>;
}

/// One allowed issuer.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// Exactly the `iss` its tokens carry.
    pub issuer: String,
    /// `aud` must hold one of these.
    pub audiences: Vec<String>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DelegationStats {
    pub verified: AtomicU64,
    pub refused: AtomicU64,
    pub keys_unavailable: AtomicU64,
}

#[derive(Debug)]
pub struct DelegationFilter {
    pub header: http::HeaderName,
    pub issuers: Vec<Issuer>,
    pub keys: Arc<dyn IssuerKeys>,
    /// Claims copied into `input.delegation.claims`.
    pub claims: Vec<String>,
    pub max_skew: Duration,
    pub stats: Arc<DelegationStats>,
    /// Tokens verified lately (by SHA-256), each kept until its `exp` but at most `verified_for`:
    /// an agent sends one token with many requests, and a signature check costs more than
    /// the rest of the request. A key removed from the issuer's set stops being trusted for
    /// new tokens at once and for cached ones within `verified_for`.
    pub verified: VerifiedCache,
}

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

/// A verified token, its `exp`, and when it was verified.
type Remembered<T> = (Arc<T>, i64, Instant);

/// Recently verified tokens, bounded: each with its `exp` and when it was verified.
pub struct VerifiedCache<T = jwt::Verified> {
    entries: Mutex<HashMap<TokenDigest, Remembered<T>>>,
    max: usize,
    keep: Duration,
}

impl<T> fmt::Debug for VerifiedCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCache")
            .field("max", &self.max)
            .finish()
    }
}

impl<T> VerifiedCache<T> {
    pub fn new(max: usize, keep: Duration) -> VerifiedCache<T> {
        VerifiedCache {
            entries: Mutex::new(HashMap::new()),
            max,
            keep,
        }
    }

    /// The SHA-256 of `token`: what the cache is keyed by.
    pub fn key(token: &str) -> TokenDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        key
    }

    pub fn get(&self, key: &TokenDigest, now: i64, skew: i64) -> Option<Arc<T>> {
        let entries = self.entries.lock().ok()?;
        let (v, expires, at) = entries.get(key)?;
        (at.elapsed() < self.keep && now < expires.saturating_add(skew)).then(|| v.clone())
    }

    pub fn put(&self, key: TokenDigest, v: Arc<T>, expires: i64, now: i64, skew: i64) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= self.max {
            let keep = self.keep;
            entries.retain(|_, (_, expires, at)| {
                at.elapsed() < keep && now < expires.saturating_add(skew)
            });
            if entries.len() >= self.max {
                return;
            }
        }
        entries.insert(key, (v, expires, Instant::now()));
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    i64::try_from(crate::stages::quota::unix_micros() / 1_000_000).unwrap_or(i64::MAX)
}

impl DelegationFilter {
    /// A verified token from the cache, or verified now (and cached).
    async fn verified(&self, token: &str) -> Result<Arc<jwt::Verified>, JwtError> {
        let key = VerifiedCache::<jwt::Verified>::key(token);
        let (now, skew) = (
            unix_now(),
            i64::try_from(self.max_skew.as_secs()).unwrap_or(0),
        );
        if let Some(v) = self.verified.get(&key, now, skew) {
            return Ok(v);
        }
        let v = Arc::new(self.verify(token).await?);
        self.verified.put(key, v.clone(), v.expires, now, skew);
        Ok(v)
    }

    async fn verify(&self, token: &str) -> Result<jwt::Verified, JwtError> {
        let t = jwt::decode(token)?;
        let issuer = t
            .issuer()
            .and_then(|iss| self.issuers.iter().find(|i| i.issuer == iss))
            .ok_or(JwtError::UnknownIssuer)?;
        let keys = self
            .keys
            .keys(&issuer.issuer, false)
            .await
            .map_err(JwtError::Keys)?;
        match t.verify(&keys) {
            Err(JwtError::NoKey(_)) => {
                let keys = self
                    .keys
                    .keys(&issuer.issuer, true)
                    .await
                    .map_err(JwtError::Keys)?;
                t.verify(&keys)?;
            }
            other => other?,
        }
        let mut v = t.check(&Expect {
            issuer: &issuer.issuer,
            audiences: &issuer.audiences,
            now: unix_now(),
            skew: i64::try_from(self.max_skew.as_secs()).unwrap_or(i64::MAX),
            copy: &self.claims,
        })?;
        v.token = Some(Arc::new(crate::parse::secret::SecretValue::new(
            token.to_owned(),
        )));
        Ok(v)
    }
}

/// Take every `name` field out of `req` first, so that whatever happens next the token never
/// goes upstream: `None` when there was none; the one value, trimmed; an error for several.
pub(crate) fn take_token(
    req: &mut http::request::Parts,
    name: &http::HeaderName,
) -> Option<Result<String, JwtError>> {
    let first = req
        .headers
        .get(name)?
        .to_str()
        .unwrap_or("")
        .trim()
        .to_owned();
    let several = req.headers.get_all(name).iter().nth(1).is_some();
    req.headers.remove(name);
    Some(match several {
        false => Ok(first),
        true => Err(JwtError::Claims(format!("more than one {name} header"))),
    })
}

impl Filter for DelegationFilter {
    fn name(&self) -> &'static str {
        "delegation"
    }

    fn request<'a>(
        &'a self,
        ctx: &'a mut Context,
        req: &'a mut http::request::Parts,
    ) -> Phase<'a, Action> {
        let token = match take_token(req, &self.header) {
            None => return Phase::Done(Action::Continue),
            Some(token) => token,
        };
        Phase::wait(async move {
            let verdict = match token {
                Ok(token) => {
                    let token = token.strip_prefix("Bearer ").unwrap_or(&token);
                    self.verified(token).await
                }
                Err(e) => Err(e),
            };
            self.settle(ctx, verdict)
        })
    }
}

impl DelegationFilter {
    fn settle(&self, ctx: &mut Context, verdict: Result<Arc<jwt::Verified>, JwtError>) -> Action {
        let (code, reason) = match verdict {
            Ok(v) => {
                self.stats.verified.fetch_add(1, Ordering::Relaxed);
                ctx.delegation = Some(v);
                return Action::Continue;
            }
            Err(JwtError::Keys(e)) => {
                self.stats.keys_unavailable.fetch_add(1, Ordering::Relaxed);
                (
                    ErrorCode::DelegationUnavailable,
                    format!("the delegation token cannot be verified now: {e}"),
                )
            }
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                (
                    ErrorCode::DelegationInvalid,
                    format!("delegation token refused: {e}"),
                )
            }
        };
        let rej = Rejection::new(code, reason);
        Action::Respond(crate::stages::policy::refusal_for(ctx, rej))
    }
}
