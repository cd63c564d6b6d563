//! TLS for the client-facing listener: the proxy's own (hot-swappable) server certificate and the
//! SPIFFE client-certificate verifier. The verifier first applies the X.509-SVID structural rules
//! (`filters::identity`), then verifies the chain against the bundle of *the trust domain named
//! in the SVID's SPIFFE ID* only, so one trust domain's CA can never vouch for another's IDs.

pub use crate::certs::TlsError;
use crate::certs::{load_certs, provider};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use portcullis_filters::parse::identity::{self, SpiffeId, SvidError, TrustDomain};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;

use super::revocation::{Record, Revocations, Selector, Subject};

/// The proxy's own server certificate, swapped in place when its files change or the Workload
/// API rotates it. Empty until the first SVID arrives from the Workload API: a handshake then
/// fails (and the listener is not served before it is filled).
#[derive(Debug)]
pub struct ServerCert {
    current: ArcSwapOption<CertifiedKey>,
}

impl ServerCert {
    pub fn new(ck: Option<Arc<CertifiedKey>>) -> Arc<ServerCert> {
        Arc::new(ServerCert {
            current: ArcSwapOption::new(ck),
        })
    }

    pub fn replace(&self, ck: Arc<CertifiedKey>) {
        self.current.store(Some(ck));
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// CA certificates per trust domain, as read from bundle files or sent by the Workload API.
pub type Roots = Vec<(TrustDomain, Vec<CertificateDer<'static>>)>;

/// Read `(trust domain, bundle file)` pairs. Any unreadable or empty bundle fails the whole load
/// (the caller keeps what it had).
pub fn load_bundles(bundles: &[(TrustDomain, std::path::PathBuf)]) -> Result<Roots, TlsError> {
    bundles
        .iter()
        .map(|(td, path)| Ok((td.clone(), load_certs(path)?)))
        .collect()
}

/// One verifier per trust domain, each knowing only its own bundle.
#[derive(Default)]
pub struct TrustStore {
    domains: HashMap<TrustDomain, Arc<dyn ClientCertVerifier>>,
    /// Distinguishes this store from every other one built in the process (verified chains
    /// are cached per store).
    generation: u64,
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// The trust store being served, swapped whole by reloads, the identity revocations in force,
/// and a signal carrying the epoch that moves on every change of either: open connections and
/// tunnels re-check their chain when it moves.
pub struct Trust {
    store: ArcSwap<TrustStore>,
    revoked: ArcSwap<Revocations>,
    /// Serializes revocation changes (each is a copy-and-swap of the whole set).
    revoking: Mutex<()>,
    epoch: AtomicU64,
    changed: watch::Sender<u64>,
    /// Refusals because of a revocation.
    pub refused_handshakes: AtomicU64,
    pub closed_connections: AtomicU64,
}

impl Trust {
    pub fn new(store: TrustStore) -> Arc<Trust> {
        Arc::new(Trust {
            store: ArcSwap::from_pointee(store),
            revoked: ArcSwap::from_pointee(Revocations::default()),
            revoking: Mutex::new(()),
            epoch: AtomicU64::new(1),
            changed: watch::Sender::new(1),
            refused_handshakes: AtomicU64::new(0),
            closed_connections: AtomicU64::new(0),
        })
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<TrustStore>> {
        self.store.load()
    }

    /// Moves on every change of the store or of the revocations (never 0).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn changed(&self) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.send_replace(epoch);
    }

    /// Serve `store` from now on, and tell whoever watches.
    pub fn replace(&self, store: TrustStore) {
        self.store.store(Arc::new(store));
        self.changed();
    }

    /// Notified on every change (the value is the new epoch).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn revocations(&self) -> arc_swap::Guard<Arc<Revocations>> {
        self.revoked.load()
    }

    /// Revoke (or update the record of) `selector`.
    pub fn revoke(&self, selector: Selector, record: Record) {
        let _one = self.revoking.lock().unwrap_or_else(|p| p.into_inner());
        let next = self.revoked.load().with(selector, record);
        self.revoked.store(Arc::new(next));
        self.changed();
    }

    /// Lift `selector`'s revocation; false if there was none.
    pub fn restore(&self, selector: &Selector) -> bool {
        let _one = self.revoking.lock().unwrap_or_else(|p| p.into_inner());
        let Some(next) = self.revoked.load().without(selector) else {
            return false;
        };
        self.revoked.store(Arc::new(next));
        self.changed();
        true
    }

    /// Replace every revocation (the shared set, as loaded from Redis); false if that
    /// changes nothing.
    pub fn set_revocations(&self, all: Revocations) -> bool {
        let _one = self.revoking.lock().unwrap_or_else(|p| p.into_inner());
        if self.revoked.load().records().eq(all.records()) {
            return false;
        }
        self.revoked.store(Arc::new(all));
        self.changed();
        true
    }
}

impl TrustStore {
    /// Build from each trust domain's CA certificates; a bundle rustls cannot use fails the
    /// whole build (the caller keeps the previous store).
    pub fn build<'a>(
        roots: impl IntoIterator<Item = &'a (TrustDomain, Vec<CertificateDer<'static>>)>,
    ) -> Result<TrustStore, TlsError> {
        let provider = provider();
        let mut domains = HashMap::new();
        for (td, certs) in roots {
            let bad = |e: &dyn fmt::Display| TlsError::Bundle(format!("bundle for {td}: {e}"));
            let mut store = RootCertStore::empty();
            for cert in certs {
                store.add(cert.clone()).map_err(|e| bad(&e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| bad(&e))?;
            domains.insert(td.clone(), verifier);
        }
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        Ok(TrustStore {
            domains,
            generation,
        })
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.domains.keys()
    }

    pub fn trusts(&self, trust_domain: &str) -> bool {
        self.domains.contains_key(trust_domain)
    }
}

/// Why a client certificate was refused; carried inside the rustls error (and so in the
/// handshake failure log line) and mapped to the matching TLS alert.
#[derive(Debug, thiserror::Error)]
pub enum SvidRejected {
    #[error("{0}")]
    Svid(#[from] SvidError),
    #[error("trust domain {0:?} is not trusted")]
    UnknownTrustDomain(String),
}

fn reject(e: SvidRejected) -> rustls::Error {
    let cert_err = match &e {
        SvidRejected::Svid(SvidError::Expired { .. }) => CertificateError::Expired,
        SvidRejected::Svid(SvidError::NotYetValid { .. }) => CertificateError::NotValidYet,
        SvidRejected::UnknownTrustDomain(_) => CertificateError::UnknownIssuer,
        SvidRejected::Svid(_) => CertificateError::Other(OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// The rustls client verifier: SVID rules, then the chain against the SVID's own trust domain.
pub struct SpiffeVerifier {
    trust: Arc<Trust>,
    provider: Arc<CryptoProvider>,
    /// Chains verified recently, by SHA-256 of the presented certificates: an agent opening
    /// many connections with the same SVID pays the chain verification once per trust store,
    /// not per handshake (its CertificateVerify signature is still checked every time).
    verified: moka::sync::Cache<[u8; 32], VerifiedChain>,
}

/// A chain that passed every check against store `generation`, valid (all of its
/// certificates) from `not_before` to `not_after` (Unix seconds, inclusive).
#[derive(Clone, Copy)]
struct VerifiedChain {
    generation: u64,
    not_before: i64,
    not_after: i64,
}

fn chain_key(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for cert in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// The window in which every certificate of the chain is valid.
fn chain_window(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<(i64, i64)> {
    let mut window = identity::validity_window(end_entity).ok()?;
    for c in intermediates {
        let (nb, na) = identity::validity_window(c).ok()?;
        window = (window.0.max(nb), window.1.min(na));
    }
    Some(window)
}

impl SpiffeVerifier {
    pub fn new(trust: Arc<Trust>) -> Arc<SpiffeVerifier> {
        Arc::new(SpiffeVerifier {
            trust,
            provider: provider(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        })
    }
}

impl SpiffeVerifier {
    /// The trust store this verifier verifies against.
    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// Every check on a client's chain against the store and revocations served now, whose
    /// epoch is returned: at the handshake, and again on an open connection after a change.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<u64, Refusal> {
        let epoch = self.trust.epoch();
        let revoked = self.trust.revocations();
        if !revoked.is_empty() {
            let subject = Subject::of(end_entity, intermediates);
            if let Some(r) = subject.as_ref().and_then(|s| revoked.matching(s)) {
                return Err(Refusal::Revoked(r.clone()));
            }
        }
        let store = self.trust.load();
        let generation = store.generation;
        let key = chain_key(end_entity, intermediates);
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if let Some(v) = self.verified.get(&key) {
            if v.generation == generation && (v.not_before..=v.not_after).contains(&secs) {
                return Ok(epoch);
            }
        }
        let now_sys = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let id = check_leaf(end_entity, now_sys).map_err(|e| reject(e.into()))?;
        check_intermediates(intermediates).map_err(|e| reject(e.into()))?;
        let verifier = store.domains.get(id.trust_domain()).ok_or_else(|| {
            reject(SvidRejected::UnknownTrustDomain(
                id.trust_domain().to_owned(),
            ))
        })?;
        verifier.verify_client_cert(end_entity, intermediates, now)?;
        if let Some((not_before, not_after)) = chain_window(end_entity, intermediates) {
            self.verified.insert(
                key,
                VerifiedChain {
                    generation,
                    not_before,
                    not_after,
                },
            );
        }
        Ok(epoch)
    }
}

/// Why [`SpiffeVerifier::verify_chain`] refused a chain.
#[derive(Debug)]
pub enum Refusal {
    /// An operator revoked the identity or one of the chain's certificates.
    Revoked(Record),
    /// The chain is not a valid SVID of a trusted trust domain.
    Chain(rustls::Error),
}

impl From<rustls::Error> for Refusal {
    fn from(e: rustls::Error) -> Refusal {
        Refusal::Chain(e)
    }
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = self.trust.load();
        f.debug_struct("SpiffeVerifier")
            .field("trust_domains", &store.domains.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The SVID checks that do not need the bundle: structure, SPIFFE ID, validity window.
pub fn check_leaf(der: &[u8], now: SystemTime) -> Result<SpiffeId, SvidError> {
    let id = identity::check_svid_leaf(der)?;
    identity::check_validity(der, now)?;
    Ok(id)
}

/// The signing-certificate rules on every intermediate the client sends (numbered from 1,
/// the one after the leaf): webpki requires CA=true but not keyCertSign, nor the SPIFFE
/// rules on the intermediate's own ID.
fn check_intermediates(intermediates: &[CertificateDer<'_>]) -> Result<(), SvidError> {
    for (i, c) in intermediates.iter().enumerate() {
        identity::check_signing_cert(c).map_err(|reason| SvidError::Intermediate {
            index: i + 1,
            reason: Box::new(reason),
        })?;
    }
    Ok(())
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Several trust domains: hinting one CA list would be misleading; clients send their SVID.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.verify_chain(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(Refusal::Chain(e)) => Err(e),
            Err(Refusal::Revoked(r)) => {
                self.trust
                    .refused_handshakes
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(revocation = %r.selector, reason = %r.reason,
                    "handshake refused: the client identity is revoked");
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client-facing TLS config: mTLS required, SPIFFE verification, HTTP/1.1 (the proxy
/// protocol; intercepted connections negotiate h2 separately).
///
/// No session resumption (no TLS 1.3 tickets, no TLS 1.2 session IDs): a resumed session
/// would bring back the client chain verified at its first handshake, against the trust
/// bundle and revocations of then, so every connection verifies its SVID in full. Not
/// issuing tickets also saves their encryption and storage on every handshake; agent
/// runtimes keep their proxy connections alive, so few would have resumed.
pub fn server_config(
    verifier: Arc<SpiffeVerifier>,
    cert: Arc<ServerCert>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The suite by our order (see `certs::provider`).
    cfg.ignore_client_order = true;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The bearer listener's TLS config: no client certificate asked for (callers prove their
/// workload with a JWT-SVID per request), the same server certificate, HTTP/1.1.
pub fn bearer_server_config(cert: Arc<ServerCert>) -> rustls::ServerConfig {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| rustls::ServerConfig::builder())
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    cfg
}

/// A readable reason for a failed client handshake: rustls prints our SVID rejections with
/// `Debug`, so unwrap them to their messages.
pub fn handshake_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => rejection_reason(tls),
        None => e.to_string(),
    }
}

/// Why [`SpiffeVerifier`] refused a chain, readable.
pub fn rejection_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            format!("invalid client certificate: {inner}")
        }
        rustls::Error::InvalidCertificate(c) => format!("invalid client certificate: {c:?}"),
        other => other.to_string(),
    }
}

/// The validity window (Unix seconds, notAfter inclusive) of a chain the verifier accepted.
pub fn verified_window(chain: &[CertificateDer<'_>]) -> Option<(i64, i64)> {
    let (leaf, intermediates) = chain.split_first()?;
    chain_window(leaf, intermediates)
}

/// The SPIFFE ID of an authenticated connection (already verified by [`SpiffeVerifier`]).
pub fn peer_spiffe_id(conn: &rustls::ServerConnection) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    identity::check_svid_leaf(leaf).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::pki::{rcgen, Authority, LeafSpec};

    fn store_for(ca: &Authority) -> TrustStore {
        let td = TrustDomain::parse("acme.test").unwrap();
        let roots = [(td, vec![CertificateDer::from(ca.cert_der().to_vec())])];
        TrustStore::build(roots.iter()).unwrap()
    }

    fn signing_spec(uri: &str) -> LeafSpec {
        let mut spec = LeafSpec::svid(uri, Duration::from_secs(3600));
        spec.is_ca = true;
        spec.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        spec
    }

    fn verify_via(store: &Arc<Trust>, inter: &LeafSpec) -> Result<(), String> {
        let ca = Authority::generate("acme", Some("spiffe://acme.test")).unwrap();
        store.replace(store_for(&ca));
        let inter_ca = ca.intermediate_from(inter).unwrap();
        let leaf = inter_ca
            .issue(&LeafSpec::svid(
                "spiffe://acme.test/agents/research",
                Duration::from_secs(3600),
            ))
            .unwrap();
        let v = SpiffeVerifier::new(store.clone());
        let chain = [CertificateDer::from(inter_ca.cert_der().to_vec())];
        v.verify_client_cert(
            &CertificateDer::from(leaf.cert_der),
            &chain,
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| {
            let io = std::io::Error::other(e);
            handshake_error(&io)
        })
    }

    #[test]
    fn intermediates_must_be_signing_certificates() {
        let store = Trust::new(TrustStore::default());
        assert_eq!(
            verify_via(&store, &signing_spec("spiffe://acme.test")),
            Ok(())
        );
        let mut no_cert_sign = signing_spec("spiffe://acme.test");
        no_cert_sign.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let err = verify_via(&store, &no_cert_sign).unwrap_err();
        assert!(
            err.contains("intermediate certificate 1: signing certificate lacks the keyCertSign"),
            "{err}"
        );
        let mut not_ca = signing_spec("spiffe://acme.test");
        not_ca.is_ca = false;
        let err = verify_via(&store, &not_ca).unwrap_err();
        assert!(err.contains("is not a CA"), "{err}");
        let err = verify_via(&store, &signing_spec("spiffe://acme.test/ca")).unwrap_err();
        assert!(err.contains("has a path"), "{err}");
    }

    #[test]
    fn a_trust_domain_id_is_not_a_workload_identity() {
        let ca = Authority::generate("acme", Some("spiffe://acme.test")).unwrap();
        let store = Trust::new(store_for(&ca));
        let leaf = ca
            .issue(&LeafSpec::svid(
                "spiffe://acme.test",
                Duration::from_secs(3600),
            ))
            .unwrap();
        let v = SpiffeVerifier::new(store);
        let err = v
            .verify_client_cert(&CertificateDer::from(leaf.cert_der), &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("NoPath"), "{err}");
    }

    #[test]
    fn cached_chains_still_expire_and_follow_the_trust_store() {
        let ca = Authority::generate("acme", Some("spiffe://acme.test")).unwrap();
        let leaf = ca
            .issue(&LeafSpec::svid(
                "spiffe://acme.test/agents/research",
                Duration::from_secs(3600),
            ))
            .unwrap();
        let der = CertificateDer::from(leaf.cert_der.clone());
        let store = Trust::new(store_for(&ca));
        let v = SpiffeVerifier::new(store.clone());
        let now = UnixTime::now();
        assert!(v.verify_client_cert(&der, &[], now).is_ok());
        v.verified.run_pending_tasks();
        assert_eq!(v.verified.entry_count(), 1, "a verified chain is cached");
        // From the cache.
        assert!(v.verify_client_cert(&der, &[], now).is_ok());
        // Past notAfter, a cached chain is refused like any other.
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 7200));
        assert!(v.verify_client_cert(&der, &[], later).is_err());
        // A new trust store (another CA for the domain) is not served from the old entries.
        let other = Authority::generate("other", Some("spiffe://acme.test")).unwrap();
        store.replace(store_for(&other));
        assert!(v.verify_client_cert(&der, &[], now).is_err());
    }
}
