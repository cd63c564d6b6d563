//! The caller's JWT-SVID: a second proof of the same workload, in a form the proxy can hand on.
//! A caller (or `portcullis connect --jwt-audience`, for it) sends its JWT-SVID from the
//! SPIFFE Workload API in `x-portcullis-jwt-svid`; the header is taken out before anything else
//! reads the request, the token is verified against its trust domain's JWT bundle (SPIFFE
//! JWT-SVID spec: RS/ES/PS signature, `sub`, `aud`, `exp`), and it must name the very workload
//! the connection's X.509-SVID names. A token exchange can then send it as the `actor_token`
//! (`actor: {jwt_svid: ...}`). On a CONNECT it holds for every request of the tunnel.
//!
//! A token that cannot be verified is refused, never ignored: 403 `jwt_svid_invalid`, or 503
//! `jwt_svid_unavailable` when no JWT bundle is known for its trust domain.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ErrorCode, Rejection};
use crate::parse::identity::TrustDomain;
use crate::parse::jwt::{self, Jwk, JwtError, JwtSvid};
use crate::pipeline::{Action, Context, Filter};
use crate::stages::delegation::{take_token, unix_now, VerifiedCache};

/// The request header a JWT-SVID comes in.
pub const JWT_SVID_HEADER: &str = "x-portcullis-jwt-svid";

/// Tokens remembered as verified (each until its `exp`, at most a minute).
const VERIFIED_TOKENS: usize = 10_000;
const KEEP_VERIFIED: Duration = Duration::from_secs(60);

/// The JWT authorities of each trust domain (files or the Workload API, kept by the proxy).
pub trait JwtBundles: Send + Sync + fmt::Debug + 'static {
    fn keys(&self, trust_domain: &TrustDomain) -> Option<Arc<Vec<Jwk>>>;
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct JwtSvidStats {
    pub verified: AtomicU64,
    pub refused: AtomicU64,
    pub unavailable: AtomicU64,
}

/// Verifies JWT-SVIDs against the trust domains' JWT bundles, remembering recent ones.
#[derive(Debug)]
pub struct JwtSvidVerifier {
    bundles: Arc<dyn JwtBundles>,
    max_skew: Duration,
    verified: VerifiedCache<JwtSvid>,
    pub stats: Arc<JwtSvidStats>,
}

impl JwtSvidVerifier {
    pub fn new(
        bundles: Arc<dyn JwtBundles>,
        max_skew: Duration,
        stats: Arc<JwtSvidStats>,
    ) -> JwtSvidVerifier {
        JwtSvidVerifier {
            bundles,
            max_skew,
            verified: VerifiedCache::new(VERIFIED_TOKENS, KEEP_VERIFIED),
            stats,
        }
    }

    /// The verified token (not counted: callers count the outcome they act on).
    pub fn verify(&self, token: &str) -> Result<Arc<JwtSvid>, JwtError> {
        let key = VerifiedCache::<JwtSvid>::key(token);
        let (now, skew) = (
            unix_now(),
            i64::try_from(self.max_skew.as_secs()).unwrap_or(0),
        );
        if let Some(v) = self.verified.get(&key, now, skew) {
            return Ok(v);
        }
        let t = jwt::decode(token)?;
        let claimed = t.svid_subject()?;
        let domain = TrustDomain::parse(claimed.trust_domain())
            .map_err(|e| JwtError::Claims(e.to_string()))?;
        let keys = self
            .bundles
            .keys(&domain)
            .ok_or_else(|| JwtError::Keys(format!("no JWT bundle for trust domain {domain:?}")))?;
        let v = Arc::new(t.verify_svid(&keys, now, skew, token)?);
        self.verified.put(key, v.clone(), v.expires, now, skew);
        Ok(v)
    }

    /// The refusal for a token that did not verify, counted.
    pub fn refusal(&self, e: JwtError) -> Rejection {
        let (code, reason) = match e {
            JwtError::Keys(e) => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                (
                    ErrorCode::JwtSvidUnavailable,
                    format!("the JWT-SVID cannot be verified: {e}"),
                )
            }
            e => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                (ErrorCode::JwtSvidInvalid, format!("JWT-SVID refused: {e}"))
            }
        };
        Rejection::new(code, reason)
    }
}

/// The chain's stage: the `x-portcullis-jwt-svid` header of a caller authenticated by mTLS.
#[derive(Debug)]
pub struct JwtSvidFilter {
    header: http::HeaderName,
    verifier: Arc<JwtSvidVerifier>,
}

impl JwtSvidFilter {
    pub fn new(verifier: Arc<JwtSvidVerifier>) -> JwtSvidFilter {
        JwtSvidFilter {
            header: http::HeaderName::from_static(JWT_SVID_HEADER),
            verifier,
        }
    }
}

impl Filter for JwtSvidFilter {
    fn name(&self) -> &'static str {
        "jwt_svid"
    }

    fn request_now(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let verdict = match take_token(req, &self.header) {
            None => return Action::Continue,
            Some(token) => token.and_then(|t| self.verifier.verify(&t)),
        };
        let v = match verdict {
            Ok(v) => v,
            Err(e) => return Action::Respond(self.verifier.refusal(e)),
        };
        if v.spiffe_id != ctx.peer.spiffe_id {
            return Action::Respond(self.verifier.refusal(JwtError::Claims(
                "it names another workload than the client certificate".into(),
            )));
        }
        self.verifier.stats.verified.fetch_add(1, Ordering::Relaxed);
        ctx.jwt_svid = Some(v);
        Action::Continue
    }
}
