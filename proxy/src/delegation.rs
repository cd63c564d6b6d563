//! The delegation stage's key source: each allowed issuer's JWK Set, from a file (read at
//! start) or a URL (fetched on first use, kept for `delegation.jwks_refresh`, fetched again
//! sooner when a token names a key the set lacks — at most every 30 s per issuer — one fetch
//! at a time per issuer). A failed fetch keeps serving the last good set for up to an hour;
//! with none, tokens of that issuer are refused with 503 `delegation_unavailable`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use portcullis_filters::parse::jwt::{parse_jwks, Jwk};
use portcullis_filters::stages::delegation::{
    DelegationFilter, DelegationStats, Issuer, IssuerKeys, VerifiedCache,
};

use crate::config::{DelegationConfig, Invalid};
use crate::upstream::backend::Backend;

/// Verified tokens remembered (each until its `exp`, at most `jwks_refresh`).
const VERIFIED_TOKENS: usize = 10_000;

/// Soonest refetch after the last one, for a token naming an unknown key.
const MIN_REFETCH: Duration = Duration::from_secs(30);
/// Longest a set is used after its refresh failed.
const MAX_STALE: Duration = Duration::from_secs(3600);

enum Source {
    Fixed(Arc<Vec<Jwk>>),
    Url {
        url: String,
        backend: Box<Backend>,
        /// The lock makes fetches single-flight.
        cached: tokio::sync::Mutex<Cached>,
    },
}

#[derive(Default)]
struct Cached {
    /// The last good set and when it was fetched.
    keys: Option<(Arc<Vec<Jwk>>, Instant)>,
    /// The last fetch attempt, and the last failed one: a fetch for an unknown `kid` comes at
    /// least [`MIN_REFETCH`] after the last attempt, and any fetch at least that long after a
    /// failure, so neither a stream of bad tokens nor a down IdP makes one fetch per request.
    tried: Option<Instant>,
    failed: Option<Instant>,
}

pub struct JwksCache {
    by_issuer: HashMap<String, Source>,
    refresh: Duration,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("issuers", &self.by_issuer.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl JwksCache {
    pub fn new(cfg: &DelegationConfig) -> Result<JwksCache, Invalid> {
        let mut by_issuer = HashMap::new();
        for (i, is) in cfg.issuers.iter().enumerate() {
            let key = |k: &str| format!("delegation.issuers[{i}].{k}");
            let source = match (&is.jwks_url, &is.jwks_file) {
                (_, Some(file)) => {
                    let doc = std::fs::read(file).map_err(|e| Invalid::new(key("jwks_file"), e))?;
                    let keys = parse_jwks(&doc).map_err(|e| Invalid::new(key("jwks_file"), e))?;
                    Source::Fixed(Arc::new(keys))
                }
                (Some(url), None) => Source::Url {
                    url: url.clone(),
                    backend: Box::new(
                        Backend::new("JWKS", is.ca.clone(), is.timeout)
                            .map_err(|e| Invalid::new(key("ca"), e.to_string()))?,
                    ),
                    cached: tokio::sync::Mutex::new(Cached::default()),
                },
                (None, None) => return Err(Invalid::new(key("jwks_url"), "required")),
            };
            by_issuer.insert(is.issuer.clone(), source);
        }
        Ok(JwksCache {
            by_issuer,
            refresh: cfg.jwks_refresh,
        })
    }

    /// The delegation stage for the chain.
    pub fn filter(
        cfg: &DelegationConfig,
        stats: Arc<DelegationStats>,
    ) -> Result<DelegationFilter, Invalid> {
        Ok(DelegationFilter {
            header: http::HeaderName::from_bytes(cfg.header.as_bytes())
                .map_err(|e| Invalid::new("delegation.header", e))?,
            issuers: cfg
                .issuers
                .iter()
                .map(|i| Issuer {
                    issuer: i.issuer.clone(),
                    audiences: i.audiences.clone(),
                })
                .collect(),
            keys: Arc::new(JwksCache::new(cfg)?),
            claims: cfg.claims.clone(),
            max_skew: cfg.max_skew,
            stats,
            verified: VerifiedCache::new(VERIFIED_TOKENS, cfg.jwks_refresh),
        })
    }
}

#[async_trait::async_trait]
impl IssuerKeys for JwksCache {
    async fn keys(&self, issuer: &str, fresh: bool) -> Result<Arc<Vec<Jwk>>, String> {
        let Some(source) = self.by_issuer.get(issuer) else {
            return Err("issuer not configured".into());
        };
        let (url, backend, cached) = match source {
            Source::Fixed(keys) => return Ok(keys.clone()),
            Source::Url {
                url,
                backend,
                cached,
            } => (url, backend, cached),
        };
        let mut cached = cached.lock().await;
        let recent = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() < MIN_REFETCH);
        let (tried_recently, failed_recently) = (recent(cached.tried), recent(cached.failed));
        match &cached.keys {
            Some((keys, at)) => {
                let stale = at.elapsed() >= self.refresh;
                let fetch = match stale {
                    true => !failed_recently,
                    false => fresh && !tried_recently,
                };
                if !fetch && (!stale || at.elapsed() < MAX_STALE) {
                    return Ok(keys.clone());
                }
                if !fetch {
                    return Err("the issuer's keys are stale and its JWKS is unreachable".into());
                }
            }
            None if failed_recently => {
                return Err("the last fetch failed; retried at most every 30 s".into());
            }
            None => {}
        }
        cached.tried = Some(Instant::now());
        let fetched = match backend.call(Method::GET, url, &[], None).await {
            Ok((status, body)) if status.is_success() => parse_jwks(&body),
            Ok((status, _)) => Err(format!("JWKS answered {status}")),
            Err(e) => Err(e.to_string()),
        };
        let e = match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                tracing::info!(issuer, keys = keys.len(), "fetched the issuer's JWKS");
                cached.keys = Some((keys.clone(), Instant::now()));
                return Ok(keys);
            }
            Err(e) => e,
        };
        cached.failed = Some(Instant::now());
        match &cached.keys {
            Some((keys, at)) if at.elapsed() < MAX_STALE => {
                tracing::warn!(issuer, error = %e, "JWKS refresh failed; using the last good set");
                Ok(keys.clone())
            }
            _ => {
                tracing::warn!(issuer, error = %e, "JWKS unavailable");
                Err(e)
            }
        }
    }
}
