//! Certificate authority helpers (rcgen): the dev/test PKI behind `ca init`, `svid issue` and
//! `dev`, and the signer the MITM leaf issuer uses. All keys are ECDSA P-256. Private keys are
//! written with mode 0600.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// Re-exported so callers can name key usages and EKUs in a [`LeafSpec`].
pub use rcgen;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A CA that can sign certificates: its certificate (PEM) and signing key.
pub struct Authority {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A freshly issued certificate and its private key (PEM).
pub struct Issued {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

/// What to put in a certificate. Deliberately permissive: tests use it to build bad SVIDs;
/// the CLI validates its input before filling it.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub common_name: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    /// Extensions written as given (tests: a non-critical keyUsage or subjectAltName).
    pub extensions: Vec<CustomExtension>,
}

impl LeafSpec {
    /// An X.509-SVID per the SPIFFE spec: one URI SAN, not a CA, digitalSignature, client and
    /// server auth.
    pub fn svid(spiffe_id: &str, ttl: Duration) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: spiffe_id.rsplit('/').next().unwrap_or("svid").to_owned(),
            uris: vec![spiffe_id.to_owned()],
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::from_secs(300),
            not_after: now + ttl,
            is_ca: false,
            key_usages: vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            extended_key_usages: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            extensions: Vec::new(),
        }
    }

    /// A TLS server certificate for names (DNS names or IP literals).
    pub fn server(names: &[&str], ttl: Duration) -> LeafSpec {
        let mut spec = LeafSpec::svid("", ttl);
        spec.uris.clear();
        spec.common_name = names.first().copied().unwrap_or("server").to_owned();
        spec.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for n in names {
            match n.parse::<IpAddr>() {
                Ok(ip) => spec.ips.push(ip),
                Err(_) => spec.dns.push((*n).to_owned()),
            }
        }
        spec
    }

    fn params(&self) -> Result<CertificateParams, PkiError> {
        let mut p = CertificateParams::default();
        // An empty common name leaves the subject empty.
        let mut dn = DistinguishedName::new();
        if !self.common_name.is_empty() {
            dn.push(DnType::CommonName, self.common_name.as_str());
        }
        p.distinguished_name = dn;
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        for u in &self.uris {
            p.subject_alt_names
                .push(SanType::URI(u.as_str().try_into()?));
        }
        for d in &self.dns {
            p.subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into()?));
        }
        p.subject_alt_names
            .extend(self.ips.iter().copied().map(SanType::IpAddress));
        p.is_ca = if self.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = self.key_usages.clone();
        p.extended_key_usages = self.extended_key_usages.clone();
        p.custom_extensions = self.extensions.clone();
        p.use_authority_key_identifier_extension = true;
        Ok(p)
    }
}

fn ca_params(common_name: &str, ttl: Duration) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Portcullis");
    p.distinguished_name = dn;
    p.not_before = now - Duration::from_secs(300);
    p.not_after = now + ttl;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Ten years: dev CAs outlive any dev setup.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Authority {
    /// A new self-signed root CA. For a SPIFFE trust domain, pass its name as `uri` so the CA
    /// carries the trust domain's SPIFFE ID (`spiffe://td`), as SPIRE does.
    pub fn generate(common_name: &str, uri: Option<&str>) -> Result<Authority, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(common_name, CA_TTL);
        if let Some(u) = uri {
            params.subject_alt_names.push(SanType::URI(u.try_into()?));
        }
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An intermediate CA signed by `self`.
    pub fn intermediate(&self, common_name: &str) -> Result<Authority, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(common_name, CA_TTL / 2);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A signing certificate issued by `self` exactly as `spec` says (tests build bad
    /// intermediates with it: no keyCertSign, not a CA, an ID with a path).
    pub fn intermediate_from(&self, spec: &LeafSpec) -> Result<Authority, PkiError> {
        let issued = self.issue(spec)?;
        Authority::from_pem(&issued.cert_pem, &issued.key_pem)
    }

    /// Load a CA from its PEM certificate and PEM (PKCS#8) key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .map_err(|e| PkiError::Invalid(format!("CA certificate is not PEM: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    pub fn load(cert: &Path, key: &Path) -> Result<Authority, PkiError> {
        Authority::from_pem(&read(cert)?, &read(key)?)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issue a certificate with a fresh P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert = spec.params()?.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Sign a certificate for an existing key (the MITM issuer reuses one leaf key).
    pub fn sign(&self, spec: &LeafSpec, key: &KeyPair) -> Result<Vec<u8>, PkiError> {
        Ok(spec.params()?.signed_by(key, &self.issuer)?.der().to_vec())
    }

    /// Write `cert.pem`-style and `key`-style files; the key with mode 0600.
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), PkiError> {
        write_file(cert, self.cert_pem.as_bytes(), false)?;
        write_file(key, self.key_pem().as_bytes(), true)
    }
}

impl Issued {
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), PkiError> {
        write_file(cert, self.cert_pem.as_bytes(), false)?;
        write_file(key, self.key_pem.as_bytes(), true)
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Write a file atomically (temp file + rename) so a reloading proxy never reads half a file.
pub fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
