//! How long an authenticated connection's identity holds: until its SVID's notAfter, while its
//! chain still verifies against the trust bundles served now, and at most
//! `limits.max_connection_age`. Requests check it on the way in (an atomic compare unless the
//! trust store changed since the last check); tunnels, which have no requests to check,
//! wait for it to end.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_filters::parse::identity;
use portcullis_filters::{ErrorCode, Rejection};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::edge::tls::{rejection_reason, verified_window, Refusal, SpiffeVerifier};

/// Why a connection's identity stopped holding, or its time is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Past the notAfter of the SVID (or of an intermediate the client sent).
    Expired { not_after: i64 },
    /// An operator revoked the identity (the revocation's selector and reason).
    Revoked(String),
    /// The chain no longer verifies against the trust bundles served now.
    Untrusted(String),
    /// `limits.max_connection_age` reached.
    MaxAge,
}

impl End {
    /// The refusal for a request that arrives after the end (`None` for `MaxAge`, which only
    /// closes gracefully).
    pub fn rejection(&self) -> Option<Rejection> {
        let (code, reason) = match self {
            End::Expired { not_after } => (
                ErrorCode::IdentityExpired,
                format!(
                    "the client SVID expired at {}; open a new connection with a current SVID",
                    rfc3339(*not_after)
                ),
            ),
            End::Revoked(why) => (
                ErrorCode::IdentityRevoked,
                format!("the client identity was revoked by an operator: {why}"),
            ),
            End::Untrusted(why) => (
                ErrorCode::IdentityRevoked,
                format!("the client SVID no longer verifies against the trust bundles: {why}"),
            ),
            End::MaxAge => return None,
        };
        Some(Rejection::new(code, reason))
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Expired { not_after } => {
                write!(f, "client SVID expired at {}", rfc3339(*not_after))
            }
            End::Revoked(why) => write!(f, "client identity revoked: {why}"),
            End::Untrusted(why) => write!(f, "client SVID no longer verifies: {why}"),
            End::MaxAge => f.write_str("limits.max_connection_age reached"),
        }
    }
}

/// One connection's identity over time: its verified chain and the generation of the trust
/// store it last verified against.
pub struct Lifetime {
    verifier: Arc<SpiffeVerifier>,
    /// Leaf first, then the intermediates the client sent (DER).
    chain: Vec<CertificateDer<'static>>,
    /// The trust domain of the leaf's SPIFFE ID.
    trust_domain: String,
    /// Unix seconds; the chain is valid through the whole of this second.
    not_after: i64,
    /// When `not_after` has passed, on the runtime's clock.
    expires_at: Instant,
    /// When `limits.max_connection_age` is reached.
    max_age_at: Instant,
    /// The trust epoch (store and revocations) the chain last verified against; 0: not yet
    /// on this connection (the first request re-verifies, from the verifier's cache).
    verified: AtomicU64,
    /// Cancelled when a request finds the identity gone (`ended` says why): the connection
    /// and its tunnels close.
    closing: CancellationToken,
    ended: OnceLock<End>,
}

impl Lifetime {
    /// The lifetime of a connection whose client presented `chain` (already verified by the
    /// handshake), accepted `now`. `None` when the chain cannot be read.
    pub fn new(
        verifier: Arc<SpiffeVerifier>,
        chain: Vec<CertificateDer<'static>>,
        max_age: Duration,
        now: SystemTime,
    ) -> Option<Lifetime> {
        let (_, not_after) = verified_window(&chain)?;
        let id = identity::check_svid_leaf(chain.first()?).ok()?;
        let end = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).ok()? + 1);
        let left = end.duration_since(now).unwrap_or(Duration::ZERO);
        let start = Instant::now();
        Some(Lifetime {
            verifier,
            chain,
            trust_domain: id.trust_domain().to_owned(),
            not_after,
            expires_at: start + left,
            max_age_at: start + max_age,
            verified: AtomicU64::new(0),
            closing: CancellationToken::new(),
            ended: OnceLock::new(),
        })
    }

    /// For a request arriving `now`: `Ok` while the identity holds. On an end, the connection
    /// is told to close (see [`Lifetime::closing`]).
    pub fn check(&self, now: SystemTime) -> Result<(), End> {
        let r = self.holds(now);
        if let Err(end) = &r {
            if self.ended.set(end.clone()).is_ok() && matches!(end, End::Revoked(_)) {
                self.verifier
                    .trust()
                    .closed_connections
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.closing.cancel();
        }
        r
    }

    fn holds(&self, now: SystemTime) -> Result<(), End> {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if i64::try_from(secs).unwrap_or(i64::MAX) > self.not_after {
            return Err(End::Expired {
                not_after: self.not_after,
            });
        }
        let trust = self.verifier.trust();
        if self.verified.load(Ordering::Acquire) == trust.epoch() {
            return Ok(());
        }
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| End::Untrusted("no client certificate".into()))?;
        let at = UnixTime::since_unix_epoch(Duration::from_secs(secs));
        match self.verifier.verify_chain(leaf, intermediates, at) {
            Ok(epoch) => {
                self.verified.store(epoch, Ordering::Release);
                Ok(())
            }
            Err(Refusal::Revoked(r)) => Err(End::Revoked(format!("{} ({})", r.selector, r.reason))),
            Err(Refusal::Chain(_)) if !trust.load().trusts(&self.trust_domain) => {
                Err(End::Untrusted(format!(
                    "trust domain {} is no longer trusted",
                    self.trust_domain
                )))
            }
            Err(Refusal::Chain(e)) => Err(End::Untrusted(format!(
                "its chain does not verify to the current bundle of {} ({})",
                self.trust_domain,
                rejection_reason(&e)
            ))),
        }
    }

    /// Resolves when the connection must close though it checks each request itself: at
    /// `limits.max_connection_age`, or once a request found the identity gone.
    pub async fn closing(&self) -> End {
        tokio::select! {
            _ = tokio::time::sleep_until(self.max_age_at) => End::MaxAge,
            _ = self.closing.cancelled() => self.ended.get().cloned().unwrap_or(End::MaxAge),
        }
    }

    /// Resolves when a tunnel must close: what [`Lifetime::closing`] waits for, and also at
    /// the SVID's notAfter and at a trust store change the chain no longer verifies against.
    pub async fn tunnel_ends(&self) -> End {
        let mut changes = self.verifier.trust().subscribe();
        loop {
            // A store swapped before the subscription is caught here too.
            if let Err(end) = self.check(SystemTime::now()) {
                return end;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(self.expires_at) => {
                    return End::Expired { not_after: self.not_after };
                }
                end = self.closing() => return end,
                r = changes.changed() => {
                    if r.is_err() {
                        // The trust store is gone with the process; only time ends this now.
                        return self.closing().await;
                    }
                }
            }
        }
    }
}

pub(crate) fn rfc3339(unix: i64) -> String {
    portcullis_policy::TimeInfo::at(unix).rfc3339
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::edge::tls::{Trust, TrustStore};
    use crate::pki::{Authority, LeafSpec};
    use portcullis_filters::parse::identity::TrustDomain;

    const HOUR: Duration = Duration::from_secs(3600);

    fn store(tds: &[(&str, &Authority)]) -> TrustStore {
        let roots: Vec<_> = tds
            .iter()
            .map(|(td, ca)| {
                let certs = vec![CertificateDer::from(ca.cert_der().to_vec())];
                (TrustDomain::parse(td).unwrap(), certs)
            })
            .collect();
        TrustStore::build(&roots).unwrap()
    }

    struct Setup {
        acme: Authority,
        trust: Arc<Trust>,
        lifetime: Lifetime,
        /// The leaf's notAfter.
        not_after: SystemTime,
    }

    fn setup(ttl: Duration, max_age: Duration) -> Setup {
        let acme = Authority::generate("acme", Some("spiffe://acme.test")).unwrap();
        let trust = Trust::new(store(&[("acme.test", &acme)]));
        let spec = LeafSpec::svid("spiffe://acme.test/agents/a", ttl);
        let not_after = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(spec.not_after.unix_timestamp()).unwrap());
        let leaf = acme.issue(&spec).unwrap();
        let verifier = SpiffeVerifier::new(trust.clone());
        let chain = vec![CertificateDer::from(leaf.cert_der)];
        let lifetime = Lifetime::new(verifier, chain, max_age, SystemTime::now()).unwrap();
        Setup {
            acme,
            trust,
            lifetime,
            not_after,
        }
    }

    #[tokio::test]
    async fn a_request_after_not_after_is_refused_as_expired() {
        let s = setup(HOUR, 10 * HOUR);
        assert_eq!(
            s.lifetime.check(s.not_after),
            Ok(()),
            "notAfter is inclusive"
        );
        let end = s
            .lifetime
            .check(s.not_after + Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(end, End::Expired { .. }), "{end:?}");
        let rej = end.rejection().unwrap();
        assert_eq!(rej.code, ErrorCode::IdentityExpired);
        assert!(rej.reason.contains("expired at"), "{}", rej.reason);
        // The connection is told to close.
        assert!(matches!(s.lifetime.closing().await, End::Expired { .. }));
    }

    #[tokio::test]
    async fn a_reload_applies_at_the_next_check() {
        let s = setup(HOUR, 10 * HOUR);
        let now = SystemTime::now();
        assert_eq!(s.lifetime.check(now), Ok(()));
        // Same trust domain, same CA, new store: still verifies.
        s.trust.replace(store(&[("acme.test", &s.acme)]));
        assert_eq!(s.lifetime.check(now), Ok(()));
        // The bundle replaced by another CA.
        let other = Authority::generate("acme2", Some("spiffe://acme.test")).unwrap();
        s.trust.replace(store(&[("acme.test", &other)]));
        let end = s.lifetime.check(now).unwrap_err();
        assert!(
            matches!(&end, End::Untrusted(why) if why.contains("UnknownIssuer")),
            "{end:?}"
        );
        assert_eq!(end.rejection().unwrap().code, ErrorCode::IdentityRevoked);
        // The trust domain removed.
        s.trust.replace(store(&[("other.test", &other)]));
        let end = s.lifetime.check(now).unwrap_err();
        assert!(
            matches!(&end, End::Untrusted(why) if why.contains("acme.test is no longer trusted")),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_tunnel_ends_at_not_after() {
        let s = setup(HOUR, 10 * HOUR);
        // Accepted (by the injected wall clock) 50 ms before the SVID's last second ends.
        let accepted = s.not_after + Duration::from_millis(950);
        let chain = s.lifetime.chain.clone();
        let verifier = s.lifetime.verifier.clone();
        let lifetime = Lifetime::new(verifier, chain, 10 * HOUR, accepted).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), lifetime.tunnel_ends())
            .await
            .unwrap();
        assert!(matches!(end, End::Expired { .. }), "{end:?}");
    }

    #[tokio::test]
    async fn a_connection_closes_at_its_max_age() {
        let s = setup(HOUR, Duration::from_millis(50));
        let closing = tokio::time::timeout(Duration::from_secs(30), s.lifetime.closing());
        assert_eq!(closing.await.unwrap(), End::MaxAge);
        let ends = tokio::time::timeout(Duration::from_secs(30), s.lifetime.tunnel_ends());
        assert_eq!(ends.await.unwrap(), End::MaxAge);
        assert_eq!(End::MaxAge.rejection(), None);
    }

    #[tokio::test]
    async fn a_tunnel_ends_when_a_reload_revokes_its_chain() {
        let s = setup(HOUR, 10 * HOUR);
        let other = Authority::generate("other", Some("spiffe://other.test")).unwrap();
        let trust = s.trust.clone();
        let swap = tokio::spawn(async move {
            tokio::task::yield_now().await;
            // A reload that keeps acme.test first: the tunnel stays.
            trust.replace(store(&[("acme.test", &s.acme), ("other.test", &other)]));
            tokio::task::yield_now().await;
            trust.replace(store(&[("other.test", &other)]));
        });
        let end = tokio::time::timeout(Duration::from_secs(30), s.lifetime.tunnel_ends())
            .await
            .unwrap();
        swap.await.unwrap();
        assert!(
            matches!(&end, End::Untrusted(why) if why.contains("acme.test is no longer trusted")),
            "{end:?}"
        );
    }
}
