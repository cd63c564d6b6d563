//! Certificates and keys as every TLS side of the proxy loads them (PEM files, one rustls
//! crypto provider), and the error for a file that does not hold what it should. A leaf: the
//! listener, the upstream client, the MITM issuer and the connector all build on it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Bundle(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

pub(crate) fn file_err(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// ring, with the AES-128-GCM suites first: the key exchange (X25519 or P-256) gives 128-bit
/// security, so AES-256 and SHA-384 add cost and no strength. AES-128 runs 10 rounds
/// instead of 14, and SHA-256 has instructions (SHA-NI) where SHA-384 runs in plain code;
/// a handshake and a MiB of body cost less. Our servers choose by this order, not the
/// client's (`ignore_client_order`): OpenSSL-based clients (curl, Python, Node)
/// list AES-256 first. Go and BoringSSL (Envoy, Chrome) choose the same way.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> = std::sync::LazyLock::new(|| {
        let mut p = rustls::crypto::ring::default_provider();
        // Stable: the rest keep ring's order. Suites of the other TLS version are skipped by
        // rustls, so TLS 1.2 ones may sit among TLS 1.3 ones.
        p.cipher_suites.sort_by_key(|s| !is_aes_128_gcm(s.suite()));
        Arc::new(p)
    });
    PROVIDER.clone()
}

fn is_aes_128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// All certificates in a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, format!("private key: {e}")))
}

pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let ck = CertifiedKey::from_der(chain, key, &provider())?;
    Ok(Arc::new(ck))
}
