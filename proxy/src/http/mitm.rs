//! MITM leaf issuance: a certificate per CONNECT host, signed by the configured MITM CA, issued
//! once and cached (moka: bounded, TTL below the leaf lifetime, single-flight so N concurrent
//! first requests for a host sign one certificate). All leaves share one P-256 key made at
//! start-up, so a miss costs one ECDSA signature, not a key generation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use portcullis_filters::parse::destination::Host;
use rcgen::KeyPair;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::certs::provider;
use crate::config::MitmConfig;
use crate::pki::{Authority, LeafSpec, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum MitmError {
    #[error("MITM CA: {0}")]
    Pki(#[from] PkiError),
    #[error("MITM leaf: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Counters for `/metrics` and the bench harness.
#[derive(Debug, Default)]
pub struct LeafStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Total nanoseconds spent signing leaves.
    pub issue_nanos: AtomicU64,
}

pub struct Mitm {
    ca: Authority,
    leaf_key: KeyPair,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    leaf_ttl: Duration,
    cache: Cache<Host, Arc<rustls::ServerConfig>>,
    passthrough: Vec<String>,
    pub stats: LeafStats,
}

/// Serves one fixed certificate (the leaf for the CONNECT host, whatever the SNI says: IP
/// targets have no SNI, and the host was already decided by the CONNECT line).
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl Mitm {
    pub fn new(cfg: &MitmConfig) -> Result<Mitm, MitmError> {
        let ca = Authority::load(&cfg.ca_cert, &cfg.ca_key)?;
        let leaf_key = KeyPair::generate().map_err(PkiError::from)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = provider().key_provider.load_private_key(der)?;
        let cache = Cache::builder()
            .max_capacity(cfg.cache_size)
            // Re-issue well before expiry so a cached leaf is never served stale.
            .time_to_live(cfg.leaf_ttl / 2)
            .build();
        Ok(Mitm {
            ca,
            leaf_key,
            signing_key,
            leaf_ttl: cfg.leaf_ttl,
            cache,
            passthrough: cfg
                .passthrough
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            stats: LeafStats::default(),
        })
    }

    /// `mitm.passthrough`: exact names, or `*.suffix` for any subdomain of suffix.
    pub fn is_passthrough(&self, host: &Host) -> bool {
        self.passthrough.iter().any(|p| host.matches(p))
    }

    /// The TLS server config presenting a leaf for `host`; issued on first use, then cached.
    pub async fn server_config(
        &self,
        host: &Host,
    ) -> Result<Arc<rustls::ServerConfig>, Arc<MitmError>> {
        let mut issued = false;
        let cfg = self
            .cache
            .try_get_with_by_ref(host, async {
                issued = true;
                self.issue(host)
            })
            .await;
        let counter = if issued {
            &self.stats.misses
        } else {
            &self.stats.hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
        cfg
    }

    fn issue(&self, host: &Host) -> Result<Arc<rustls::ServerConfig>, MitmError> {
        let started = Instant::now();
        let name = host.to_string();
        let mut spec = LeafSpec::server(&[name.as_str()], self.leaf_ttl);
        // Browsers and TLS stacks reject leaves valid for more than ~398 days; ours are short.
        spec.not_before = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        let der = self.ca.sign(&spec, &self.leaf_key)?;
        let chain = vec![
            CertificateDer::from(der),
            CertificateDer::from(self.ca.cert_der().to_vec()),
        ];
        let ck = Arc::new(CertifiedKey::new(chain, self.signing_key.clone()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(ck)));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The suite by our order (see `certs::provider`).
        cfg.ignore_client_order = true;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.issue_nanos.fetch_add(nanos, Ordering::Relaxed);
        tracing::debug!(host = %name, micros = nanos / 1000, "issued MITM leaf certificate");
        Ok(Arc::new(cfg))
    }
}
