//! The connector's side of its mTLS connection to the central proxy: the workload's SVID as
//! client certificate, and the central proxy's certificate verified against the trust bundle,
//! host name included and, with `--upstream-id`, its SPIFFE ID.

use std::sync::Arc;

use portcullis_filters::parse::identity::{self, SpiffeId};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::certs::{provider, TlsError};

/// The connector's client TLS config: the workload's SVID as client certificate, the central
/// proxy's certificate verified (host name included) against the trust bundles and, with
/// `upstream_id`, required to be the X.509-SVID of that SPIFFE ID; HTTP/1.1.
pub fn connector_config<'a>(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: impl IntoIterator<Item = &'a CertificateDer<'static>>,
    upstream_id: Option<&SpiffeId>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in roots {
        store
            .add(cert.clone())
            .map_err(|e| TlsError::Bundle(format!("trust bundle: {e}")))?;
    }
    if store.is_empty() {
        return Err(TlsError::Bundle(
            "the trust bundle has no CA certificate".into(),
        ));
    }
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| TlsError::Bundle(format!("trust bundle: {e}")))?;
    let verifier = Arc::new(UpstreamVerifier {
        webpki,
        expected: upstream_id.cloned(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous() // a verifier that adds a check to the WebPKI one, never removes one
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The WebPKI server verification (chain to the bundle, validity, host name), then, when
/// configured, the central proxy's SPIFFE ID.
#[derive(Debug)]
struct UpstreamVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    expected: Option<SpiffeId>,
}

/// The proxy's certificate chains to the bundle but is not the expected workload's SVID.
#[derive(Debug, thiserror::Error)]
#[error("the proxy's certificate is {found}, not {expected}")]
pub struct WrongUpstreamId {
    expected: String,
    found: String,
}

impl rustls::client::danger::ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let Some(expected) = &self.expected else {
            return Ok(verified);
        };
        match identity::check_svid_leaf(end_entity) {
            Ok(id) if &id == expected => Ok(verified),
            found => {
                let found = match found {
                    Ok(id) => id.to_string(),
                    Err(e) => format!("not an X.509-SVID ({e})"),
                };
                let e = WrongUpstreamId {
                    expected: expected.to_string(),
                    found,
                };
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(e)),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
