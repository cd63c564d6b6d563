//! Pure SPIFFE identity logic: parsing and validation of SPIFFE IDs and trust domains per the
//! SPIFFE-ID spec, and the structural checks on an X.509-SVID leaf per the X509-SVID spec.
//! Chain and signature verification happen elsewhere (rustls webpki, per trust domain).

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, KeyUsage, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{
    Oid, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::time::ASN1Time;

const SCHEME: &str = "spiffe://";
/// Maximum length of a trust domain name, in bytes (SPIFFE-ID spec 2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Maximum length of a whole SPIFFE ID, in bytes (SPIFFE-ID spec 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain. One variant per rule of the spec.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes; the maximum is 2048")]
    TooLong(usize),
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {0} bytes; the maximum is 255")]
    TrustDomainTooLong(usize),
    #[error("trust domain must not contain userinfo ('@')")]
    UserInfo,
    #[error("trust domain must not contain a port (':')")]
    Port,
    #[error("SPIFFE ID must not contain a query ('?')")]
    Query,
    #[error("SPIFFE ID must not contain a fragment ('#')")]
    Fragment,
    #[error("trust domain must not contain percent-encoded characters")]
    PercentEncodedTrustDomain,
    #[error(
        "trust domain contains invalid character {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    InvalidTrustDomainChar(char),
    #[error("trust domain must not have a path, got {0:?}")]
    UnexpectedPath(String),
    #[error("path contains an empty segment ('//')")]
    EmptySegment,
    #[error("path must not end with '/'")]
    TrailingSlash,
    #[error("path must not contain the dot segment {0:?}")]
    DotSegment(&'static str),
    #[error("path must not contain percent-encoded characters")]
    PercentEncodedPath,
    #[error(
        "path contains invalid character {0:?}; only letters, digits, '.', '-' and '_' are allowed"
    )]
    InvalidPathChar(char),
}

/// A validated SPIFFE trust domain name, e.g. `acme.test` (always lowercase).
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`acme.test`) or a path-less SPIFFE ID (`spiffe://acme.test`).
    pub fn parse(s: &str) -> Result<TrustDomain, SpiffeIdError> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::UnexpectedPath(id.path().to_owned()));
            }
            return Ok(TrustDomain(id.trust_domain().to_owned()));
        }
        validate_trust_domain(s)?;
        Ok(TrustDomain(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Derived Hash/Eq/Ord on the single `String` field agree with those of `str`.
impl Borrow<str> for TrustDomain {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated SPIFFE ID such as `spiffe://acme.test/agents/research`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset of the path (its leading `/`), or `id.len()` when there is no path.
    path_start: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            id: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// The whole ID, e.g. `spiffe://acme.test/agents/research`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, e.g. `acme.test`.
    pub fn trust_domain(&self) -> &str {
        self.id.get(SCHEME.len()..self.path_start).unwrap_or("")
    }

    /// The path including its leading `/`, e.g. `/agents/research`, or `""` when there is none.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or("")
    }

    /// The path segments, e.g. `["agents", "research"]`; empty when there is no path.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        // The path is empty or starts with '/', so the first split item is always "".
        self.path().split('/').skip(1)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.id).finish()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            '@' => return Err(SpiffeIdError::UserInfo),
            ':' => return Err(SpiffeIdError::Port),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            '%' => return Err(SpiffeIdError::PercentEncodedTrustDomain),
            _ => return Err(SpiffeIdError::InvalidTrustDomainChar(c)),
        }
    }
    Ok(())
}

/// `path` is either empty or starts with '/'.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(());
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "" if segments.peek().is_none() => return Err(SpiffeIdError::TrailingSlash),
            "" => return Err(SpiffeIdError::EmptySegment),
            "." => return Err(SpiffeIdError::DotSegment(".")),
            ".." => return Err(SpiffeIdError::DotSegment("..")),
            _ => {}
        }
        for c in segment.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                '%' => return Err(SpiffeIdError::PercentEncodedPath),
                _ => return Err(SpiffeIdError::InvalidPathChar(c)),
            }
        }
    }
    Ok(())
}

/// Why a certificate is not an acceptable X.509-SVID leaf or signing certificate.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SvidError {
    #[error("SVID is not a valid DER X.509 certificate: {0}")]
    Malformed(String),
    #[error("SVID certificate is followed by {0} bytes of trailing data")]
    TrailingData(usize),
    #[error("SVID has more than one {0} extension")]
    DuplicateExtension(&'static str),
    #[error("SVID has a malformed {0} extension")]
    MalformedExtension(&'static str),
    #[error("SVID has no URI SAN; exactly one is required")]
    NoUriSan,
    #[error("SVID has {0} URI SANs; exactly one is required")]
    MultipleUriSans(usize),
    #[error("SVID URI SAN is not valid IA5 text")]
    UnreadableUriSan,
    #[error("SVID URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    InvalidSpiffeId { uri: String, reason: SpiffeIdError },
    #[error("SVID leaf SPIFFE ID {0:?} has no path: a trust domain's ID names no workload")]
    NoPath(String),
    #[error("SVID has an empty subject but its subjectAltName extension is not critical")]
    NonCriticalSan,
    #[error("SVID leaf is a CA certificate (basicConstraints CA=true)")]
    CaCertificate,
    #[error("SVID has no keyUsage extension; it is required on every SVID")]
    MissingKeyUsage,
    #[error("SVID keyUsage extension is not marked critical")]
    NonCriticalKeyUsage,
    #[error("SVID leaf lacks the digitalSignature key usage")]
    MissingDigitalSignature,
    #[error("SVID leaf has the keyCertSign key usage")]
    KeyCertSign,
    #[error("SVID leaf has the cRLSign key usage")]
    CrlSign,
    #[error("SVID leaf has an extendedKeyUsage extension without {0}")]
    MissingExtendedKeyUsage(&'static str),
    #[error("signing certificate is not a CA (basicConstraints CA=true is required)")]
    NotCa,
    #[error("signing certificate lacks the keyCertSign key usage")]
    MissingKeyCertSign,
    #[error("signing certificate SPIFFE ID {0:?} has a path")]
    SigningIdWithPath(String),
    #[error("intermediate certificate {index}: {reason}")]
    Intermediate {
        index: usize,
        reason: Box<SvidError>,
    },
    #[error("certificate not valid until {not_before}")]
    NotYetValid { not_before: String },
    #[error("certificate expired at {not_after}")]
    Expired { not_after: String },
}

/// Structural checks on an X.509-SVID leaf certificate (DER), returning its SPIFFE ID
/// (X509-SVID spec 2, 3.1, 4.1, 4.3, 4.4, 5.2).
///
/// Enforces: exactly one URI SAN which is a valid SPIFFE ID with a path (other SAN types are
/// allowed), a critical subjectAltName when the subject is empty, basicConstraints CA not true,
/// a critical keyUsage with digitalSignature and without keyCertSign / cRLSign, and, when an
/// extendedKeyUsage is present, both serverAuth and clientAuth in it. Does not verify the
/// chain, signature or validity window.
pub fn check_svid_leaf(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse_cert(der)?;
    let id = spiffe_id(&cert)?.ok_or(SvidError::NoUriSan)?;
    if id.path().is_empty() {
        return Err(SvidError::NoPath(id.to_string()));
    }
    if is_ca(&cert)? {
        return Err(SvidError::CaCertificate);
    }
    let ku = key_usage(&cert)?;
    if !ku.digital_signature() {
        return Err(SvidError::MissingDigitalSignature);
    }
    if ku.key_cert_sign() {
        return Err(SvidError::KeyCertSign);
    }
    if ku.crl_sign() {
        return Err(SvidError::CrlSign);
    }
    match unique_extension(&cert, &OID_X509_EXT_EXTENDED_KEY_USAGE, "extendedKeyUsage")? {
        None => {}
        Some(ext) => match ext.parsed_extension() {
            ParsedExtension::ExtendedKeyUsage(eku) if !eku.server_auth => {
                return Err(SvidError::MissingExtendedKeyUsage("id-kp-serverAuth"))
            }
            ParsedExtension::ExtendedKeyUsage(eku) if !eku.client_auth => {
                return Err(SvidError::MissingExtendedKeyUsage("id-kp-clientAuth"))
            }
            ParsedExtension::ExtendedKeyUsage(_) => {}
            _ => return Err(SvidError::MalformedExtension("extendedKeyUsage")),
        },
    }
    Ok(id)
}

/// Structural checks on an X.509-SVID signing certificate (an intermediate the client sends):
/// basicConstraints CA=true, a critical keyUsage with keyCertSign, and, when it carries a URI
/// SAN (it SHOULD be an SVID), exactly one, a SPIFFE ID without a path (X509-SVID spec 3.2,
/// 4.1, 4.3). digitalSignature is not refused on signing certificates: the spec's MUSTs do
/// not forbid it and SPIRE's CAs set it.
pub fn check_signing_cert(der: &[u8]) -> Result<(), SvidError> {
    let cert = parse_cert(der)?;
    if let Some(id) = spiffe_id(&cert)? {
        if !id.path().is_empty() {
            return Err(SvidError::SigningIdWithPath(id.to_string()));
        }
    }
    if !is_ca(&cert)? {
        return Err(SvidError::NotCa);
    }
    if !key_usage(&cert)?.key_cert_sign() {
        return Err(SvidError::MissingKeyCertSign);
    }
    Ok(())
}

/// The SPIFFE ID of the certificate's only URI SAN; `None` without URI SANs. A subject-less
/// certificate needs a critical subjectAltName (RFC 5280 4.1.2.6, X509-SVID spec 3.1).
fn spiffe_id(cert: &X509Certificate<'_>) -> Result<Option<SpiffeId>, SvidError> {
    let mut uris = 0usize;
    let mut uri: Option<Result<&str, ()>> = None;
    if let Some(ext) = unique_extension(cert, &OID_X509_EXT_SUBJECT_ALT_NAME, "subjectAltName")? {
        let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
            return Err(SvidError::MalformedExtension("subjectAltName"));
        };
        if !ext.critical && cert.subject().iter().next().is_none() {
            return Err(SvidError::NonCriticalSan);
        }
        for name in &san.general_names {
            match name {
                GeneralName::URI(u) => uri = Some(Ok(u)),
                // A URI entry (context tag 6) that x509-parser could not decode as IA5.
                GeneralName::Invalid(tag, _) if tag.0 == 6 => uri = Some(Err(())),
                _ => continue,
            }
            uris += 1;
        }
    }
    match (uris, uri) {
        (0, _) => Ok(None),
        (1, Some(Ok(u))) => {
            SpiffeId::parse(u)
                .map(Some)
                .map_err(|reason| SvidError::InvalidSpiffeId {
                    uri: u.to_owned(),
                    reason,
                })
        }
        (1, _) => Err(SvidError::UnreadableUriSan),
        (n, _) => Err(SvidError::MultipleUriSans(n)),
    }
}

/// basicConstraints CA; absent means not a CA.
fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, SvidError> {
    match unique_extension(cert, &OID_X509_EXT_BASIC_CONSTRAINTS, "basicConstraints")? {
        None => Ok(false),
        Some(ext) => match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => Ok(bc.ca),
            _ => Err(SvidError::MalformedExtension("basicConstraints")),
        },
    }
}

/// The keyUsage extension, which every SVID must carry, marked critical (X509-SVID spec 4.3).
fn key_usage<'c>(cert: &'c X509Certificate<'_>) -> Result<&'c KeyUsage, SvidError> {
    let ext = unique_extension(cert, &OID_X509_EXT_KEY_USAGE, "keyUsage")?
        .ok_or(SvidError::MissingKeyUsage)?;
    let ParsedExtension::KeyUsage(ku) = ext.parsed_extension() else {
        return Err(SvidError::MalformedExtension("keyUsage"));
    };
    if !ext.critical {
        return Err(SvidError::NonCriticalKeyUsage);
    }
    Ok(ku)
}

/// Validity window check (separate so callers pass "now"; webpki also checks it but we want a
/// precise reason). Both bounds are inclusive, as in RFC 5280.
pub fn check_validity(der: &[u8], now: SystemTime) -> Result<(), SvidError> {
    let cert = parse_cert(der)?;
    let validity = cert.validity();
    let now = unix_nanos(now);
    if now < i128::from(validity.not_before.timestamp()) * 1_000_000_000 {
        return Err(SvidError::NotYetValid {
            not_before: rfc3339(validity.not_before),
        });
    }
    // notAfter has one-second granularity and covers that whole second.
    if now >= (i128::from(validity.not_after.timestamp()) + 1) * 1_000_000_000 {
        return Err(SvidError::Expired {
            not_after: rfc3339(validity.not_after),
        });
    }
    Ok(())
}

/// `(notBefore, notAfter)` in Unix seconds; notAfter covers its whole second.
pub fn validity_window(der: &[u8]) -> Result<(i64, i64), SvidError> {
    let validity = parse_cert(der)?.validity().clone();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// The certificate's serial number in lowercase hex without leading zeros (as
/// `openssl x509 -serial` prints it, case aside).
pub fn serial_hex(der: &[u8]) -> Result<String, SvidError> {
    let cert = parse_cert(der)?;
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let trimmed = hex.trim_start_matches('0');
    Ok(if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    })
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::TrailingData(rest.len()));
    }
    Ok(cert)
}

/// The extension with this OID, if present and parseable; errors if duplicated or unparseable.
fn unique_extension<'a, 'c>(
    cert: &'c X509Certificate<'a>,
    oid: &Oid<'_>,
    name: &'static str,
) -> Result<Option<&'c X509Extension<'a>>, SvidError> {
    let mut found = cert.extensions().iter().filter(|e| e.oid == *oid);
    let Some(ext) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(SvidError::DuplicateExtension(name));
    }
    match ext.parsed_extension() {
        ParsedExtension::ParseError { .. } | ParsedExtension::UnsupportedExtension { .. } => {
            Err(SvidError::MalformedExtension(name))
        }
        _ => Ok(Some(ext)),
    }
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => i128::try_from(e.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    }
}

fn rfc3339(t: ASN1Time) -> String {
    portcullis_policy::TimeInfo::at(t.timestamp()).rfc3339
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    use SpiffeIdError as E;

    /// Input, and either the expected (trust domain, path) or the expected error.
    type Case<'a> = (&'a str, Result<(&'a str, &'a str), SpiffeIdError>);

    #[test]
    fn spiffe_id_table() {
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let max_td = format!("spiffe://{}", "a".repeat(255));
        let max_id = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 12));
        let long_id = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 11));
        let cases: Vec<Case> = vec![
            // Valid.
            ("spiffe://trustdomain", Ok(("trustdomain", ""))),
            (
                "spiffe://acme.test/agents/research",
                Ok(("acme.test", "/agents/research")),
            ),
            ("spiffe://trustdomain/path", Ok(("trustdomain", "/path"))),
            (
                "spiffe://trustdomain/path/element",
                Ok(("trustdomain", "/path/element")),
            ),
            (
                "spiffe://abcdefghijklmnopqrstuvwxyz0123456789.-_/aA0.-_",
                Ok(("abcdefghijklmnopqrstuvwxyz0123456789.-_", "/aA0.-_")),
            ),
            ("spiffe://td/PATH/MiXeD", Ok(("td", "/PATH/MiXeD"))),
            ("spiffe://td/.../.a/a./..b", Ok(("td", "/.../.a/a./..b"))),
            ("spiffe://192.168.2.2/x", Ok(("192.168.2.2", "/x"))),
            ("spiffe://a_b-c/x", Ok(("a_b-c", "/x"))),
            (&max_td, Ok((&max_td[9..], ""))),
            (&max_id, Ok(("td", &max_id[11..]))),
            // Scheme.
            ("", Err(E::Empty)),
            ("trustdomain/path", Err(E::WrongScheme)),
            ("SPIFFE://trustdomain/path", Err(E::WrongScheme)),
            ("Spiffe://trustdomain", Err(E::WrongScheme)),
            ("spiffe:/trustdomain/path", Err(E::WrongScheme)),
            ("spiffe:trustdomain", Err(E::WrongScheme)),
            ("https://trustdomain/path", Err(E::WrongScheme)),
            ("://trustdomain", Err(E::WrongScheme)),
            // Trust domain.
            ("spiffe://", Err(E::MissingTrustDomain)),
            ("spiffe:///path", Err(E::MissingTrustDomain)),
            (
                "spiffe://Trustdomain/path",
                Err(E::InvalidTrustDomainChar('T')),
            ),
            ("spiffe://ACME.test", Err(E::InvalidTrustDomainChar('A'))),
            ("spiffe://user@trustdomain/path", Err(E::UserInfo)),
            ("spiffe://trustdomain:8080/path", Err(E::Port)),
            ("spiffe://trustdomain?query", Err(E::Query)),
            ("spiffe://trustdomain#fragment", Err(E::Fragment)),
            (
                "spiffe://trust%41domain/path",
                Err(E::PercentEncodedTrustDomain),
            ),
            ("spiffe://trust domain", Err(E::InvalidTrustDomainChar(' '))),
            ("spiffe://trust$domain", Err(E::InvalidTrustDomainChar('$'))),
            ("spiffe://exämple.org", Err(E::InvalidTrustDomainChar('ä'))),
            ("spiffe://[::1]/x", Err(E::InvalidTrustDomainChar('['))),
            (&long_td, Err(E::TrustDomainTooLong(256))),
            (&long_id, Err(E::TooLong(MAX_SPIFFE_ID_LEN + 1))),
            // Path.
            ("spiffe://trustdomain/", Err(E::TrailingSlash)),
            ("spiffe://trustdomain/path/", Err(E::TrailingSlash)),
            ("spiffe://trustdomain//", Err(E::EmptySegment)),
            ("spiffe://trustdomain//path", Err(E::EmptySegment)),
            ("spiffe://trustdomain/path//other", Err(E::EmptySegment)),
            ("spiffe://trustdomain/.", Err(E::DotSegment("."))),
            ("spiffe://trustdomain/./path", Err(E::DotSegment("."))),
            ("spiffe://trustdomain/path/..", Err(E::DotSegment(".."))),
            ("spiffe://trustdomain/../path", Err(E::DotSegment(".."))),
            ("spiffe://trustdomain/path?query", Err(E::Query)),
            ("spiffe://trustdomain/path#fragment", Err(E::Fragment)),
            ("spiffe://trustdomain/p%41th", Err(E::PercentEncodedPath)),
            ("spiffe://trustdomain/pa th", Err(E::InvalidPathChar(' '))),
            ("spiffe://trustdomain/pa:th", Err(E::InvalidPathChar(':'))),
            ("spiffe://trustdomain/p@th", Err(E::InvalidPathChar('@'))),
            ("spiffe://trustdomain/pa~th", Err(E::InvalidPathChar('~'))),
            ("spiffe://trustdomain/pa$th", Err(E::InvalidPathChar('$'))),
            ("spiffe://trustdomain/päth", Err(E::InvalidPathChar('ä'))),
            (
                "spiffe://trustdomain/path\\x",
                Err(E::InvalidPathChar('\\')),
            ),
        ];
        assert!(cases.len() >= 30);
        for (input, want) in cases {
            let got = SpiffeId::parse(input);
            match (&got, &want) {
                (Ok(id), Ok((td, path))) => {
                    assert_eq!(id.as_str(), input);
                    assert_eq!(id.trust_domain(), *td, "{input}");
                    assert_eq!(id.path(), *path, "{input}");
                }
                (Err(g), Err(w)) => assert_eq!(g, w, "{input}"),
                _ => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn spiffe_id_accessors_and_traits() {
        let id: SpiffeId = "spiffe://acme.test/agents/research".parse().unwrap();
        assert_eq!(id.segments().collect::<Vec<_>>(), ["agents", "research"]);
        assert_eq!(id.to_string(), "spiffe://acme.test/agents/research");
        assert_eq!(
            format!("{id:?}"),
            "SpiffeId(\"spiffe://acme.test/agents/research\")"
        );
        let bare = SpiffeId::parse("spiffe://acme.test").unwrap();
        assert_eq!(bare.segments().count(), 0);
        assert_eq!(bare.path(), "");
        assert_eq!(bare.trust_domain(), "acme.test");
    }

    #[test]
    fn error_messages_are_precise() {
        assert_eq!(
            E::InvalidTrustDomainChar('A').to_string(),
            "trust domain contains invalid character 'A'; only lowercase letters, digits, '.', '-' and '_' are allowed"
        );
        assert_eq!(
            SvidError::MultipleUriSans(2).to_string(),
            "SVID has 2 URI SANs; exactly one is required"
        );
    }

    #[test]
    fn trust_domain_parse() {
        let td = TrustDomain::parse("acme.test").unwrap();
        assert_eq!(td.as_str(), "acme.test");
        assert_eq!(td.to_string(), "acme.test");
        assert_eq!(TrustDomain::parse("spiffe://acme.test").unwrap(), td);
        assert_eq!(
            TrustDomain::parse("spiffe://acme.test/x"),
            Err(E::UnexpectedPath("/x".into()))
        );
        assert_eq!(
            TrustDomain::parse("spiffe://acme.test/"),
            Err(E::TrailingSlash)
        );
        assert_eq!(TrustDomain::parse(""), Err(E::MissingTrustDomain));
        assert_eq!(
            TrustDomain::parse("Acme.test"),
            Err(E::InvalidTrustDomainChar('A'))
        );
        assert_eq!(
            TrustDomain::parse("acme.test/x"),
            Err(E::InvalidTrustDomainChar('/'))
        );
        assert_eq!(TrustDomain::parse("acme.test:443"), Err(E::Port));
        assert_eq!(
            TrustDomain::parse(&"a".repeat(256)),
            Err(E::TrustDomainTooLong(256))
        );

        let mut map = HashMap::new();
        map.insert(td, 1);
        assert_eq!(map.get("acme.test"), Some(&1));
    }

    #[test]
    fn parse_never_panics_on_prefixes_and_mutations() {
        let base = "spiffe://acme.test/a/b.c/ä%?#@:";
        for (i, _) in base.char_indices() {
            let _ = SpiffeId::parse(&base[..i]);
            let _ = TrustDomain::parse(&base[..i]);
            let _ = SpiffeId::parse(&base[i..]);
        }
    }

    // ---- X.509-SVID ----

    use rcgen::{
        string::Ia5String, BasicConstraints, CertificateParams, CustomExtension,
        ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use time::OffsetDateTime;

    const GOOD: &str = "spiffe://acme.test/agents/research";

    fn params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
            .collect();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p
    }

    fn der(p: &CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn good_leaf() {
        let mut p = params(&[GOOD]);
        // Non-URI SANs and extra allowed key usages are fine.
        p.subject_alt_names.push(SanType::DnsName(
            Ia5String::try_from("agent.acme.test").unwrap(),
        ));
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        p.is_ca = IsCa::ExplicitNoCa;
        let id = check_svid_leaf(&der(&p)).unwrap();
        assert_eq!(id.as_str(), GOOD);
        assert_eq!(id.trust_domain(), "acme.test");
    }

    #[test]
    fn uri_san_count() {
        let mut p = params(&[]);
        assert_eq!(check_svid_leaf(&der(&p)), Err(SvidError::NoUriSan));
        p.subject_alt_names = vec![SanType::DnsName(Ia5String::try_from("a.test").unwrap())];
        assert_eq!(check_svid_leaf(&der(&p)), Err(SvidError::NoUriSan));
        let p = params(&[GOOD, "spiffe://acme.test/other"]);
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::MultipleUriSans(2));
        assert_eq!(
            err.to_string(),
            "SVID has 2 URI SANs; exactly one is required"
        );
        let p = params(&[GOOD, "https://acme.test/"]);
        assert_eq!(
            check_svid_leaf(&der(&p)),
            Err(SvidError::MultipleUriSans(2))
        );
    }

    #[test]
    fn uri_san_not_a_spiffe_id() {
        let p = params(&["https://acme.test/agents"]);
        assert_eq!(
            check_svid_leaf(&der(&p)),
            Err(SvidError::InvalidSpiffeId {
                uri: "https://acme.test/agents".into(),
                reason: E::WrongScheme
            })
        );
        let p = params(&["spiffe://ACME.test/agents"]);
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(
            err,
            SvidError::InvalidSpiffeId {
                uri: "spiffe://ACME.test/agents".into(),
                reason: E::InvalidTrustDomainChar('A')
            }
        );
        assert!(err.to_string().contains("invalid character 'A'"), "{err}");
    }

    #[test]
    fn ca_leaf_rejected() {
        let mut p = params(&[GOOD]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::CaCertificate);
        assert_eq!(
            err.to_string(),
            "SVID leaf is a CA certificate (basicConstraints CA=true)"
        );
    }

    #[test]
    fn key_usage_rules() {
        let mut p = params(&[GOOD]);
        p.key_usages = vec![];
        assert_eq!(check_svid_leaf(&der(&p)), Err(SvidError::MissingKeyUsage));

        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::MissingDigitalSignature);
        assert_eq!(
            err.to_string(),
            "SVID leaf lacks the digitalSignature key usage"
        );

        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::KeyCertSign);
        assert_eq!(err.to_string(), "SVID leaf has the keyCertSign key usage");

        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::CrlSign);
        assert_eq!(err.to_string(), "SVID leaf has the cRLSign key usage");
    }

    /// A DER TLV with a short-form length (tests only build small values).
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, u8::try_from(content.len()).unwrap()];
        v.extend_from_slice(content);
        v
    }

    /// A keyUsage extension with `bits` (first byte of the BIT STRING) and this criticality.
    fn key_usage_ext(bits: u8, critical: bool) -> CustomExtension {
        let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 15], tlv(0x03, &[0, bits]));
        ext.set_criticality(critical);
        ext
    }

    #[test]
    fn leaf_id_must_have_a_path() {
        let err = check_svid_leaf(&der(&params(&["spiffe://acme.test"]))).unwrap_err();
        assert_eq!(err, SvidError::NoPath("spiffe://acme.test".into()));
        assert!(err.to_string().contains("has no path"), "{err}");
    }

    #[test]
    fn key_usage_must_be_critical() {
        let mut p = params(&[GOOD]);
        p.key_usages = vec![];
        // digitalSignature is bit 0 (0x80); rcgen would mark its own keyUsage critical.
        p.custom_extensions = vec![key_usage_ext(0x80, false)];
        assert_eq!(
            check_svid_leaf(&der(&p)),
            Err(SvidError::NonCriticalKeyUsage)
        );
        p.custom_extensions = vec![key_usage_ext(0x80, true)];
        assert!(check_svid_leaf(&der(&p)).is_ok());
    }

    #[test]
    fn subjectless_svid_needs_a_critical_san() {
        let mut p = params(&[]);
        p.distinguished_name = rcgen::DistinguishedName::new();
        let san = tlv(0x30, &tlv(0x86, GOOD.as_bytes()));
        let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 17], san);
        ext.set_criticality(false);
        p.custom_extensions = vec![ext.clone()];
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::NonCriticalSan);
        ext.set_criticality(true);
        p.custom_extensions = vec![ext];
        assert_eq!(check_svid_leaf(&der(&p)).unwrap().as_str(), GOOD);
        // With a subject, a non-critical SAN is fine (what rcgen writes).
        assert!(check_svid_leaf(&der(&params(&[GOOD]))).is_ok());
    }

    #[test]
    fn extended_key_usage_when_present_has_both_tls_purposes() {
        let mut p = params(&[GOOD]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::MissingExtendedKeyUsage("id-kp-serverAuth"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let err = check_svid_leaf(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::MissingExtendedKeyUsage("id-kp-clientAuth"));
        assert_eq!(
            err.to_string(),
            "SVID leaf has an extendedKeyUsage extension without id-kp-clientAuth"
        );
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        assert!(check_svid_leaf(&der(&p)).is_ok());
    }

    fn signing(uris: &[&str]) -> CertificateParams {
        let mut p = params(uris);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    #[test]
    fn signing_certificate_rules() {
        assert_eq!(
            check_signing_cert(&der(&signing(&["spiffe://acme.test"]))),
            Ok(())
        );
        // Not an SVID itself: allowed (SHOULD, not MUST).
        assert_eq!(check_signing_cert(&der(&signing(&[]))), Ok(()));
        // SPIRE's CAs also set digitalSignature.
        let mut p = signing(&["spiffe://acme.test"]);
        p.key_usages.push(KeyUsagePurpose::DigitalSignature);
        assert_eq!(check_signing_cert(&der(&p)), Ok(()));

        let mut p = signing(&["spiffe://acme.test"]);
        p.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let err = check_signing_cert(&der(&p)).unwrap_err();
        assert_eq!(err, SvidError::MissingKeyCertSign);
        assert_eq!(
            err.to_string(),
            "signing certificate lacks the keyCertSign key usage"
        );
        p.key_usages = vec![];
        assert_eq!(
            check_signing_cert(&der(&p)),
            Err(SvidError::MissingKeyUsage)
        );
        // keyCertSign is bit 5 (0x04), cRLSign bit 6 (0x02).
        p.custom_extensions = vec![key_usage_ext(0x06, false)];
        assert_eq!(
            check_signing_cert(&der(&p)),
            Err(SvidError::NonCriticalKeyUsage)
        );

        let mut p = signing(&["spiffe://acme.test"]);
        p.is_ca = IsCa::ExplicitNoCa;
        assert_eq!(check_signing_cert(&der(&p)), Err(SvidError::NotCa));
        p.is_ca = IsCa::NoCa;
        assert_eq!(check_signing_cert(&der(&p)), Err(SvidError::NotCa));

        let p = signing(&["spiffe://acme.test/ca"]);
        let err = check_signing_cert(&der(&p)).unwrap_err();
        assert_eq!(
            err,
            SvidError::SigningIdWithPath("spiffe://acme.test/ca".into())
        );
        let p = signing(&["spiffe://acme.test", "spiffe://other.test"]);
        assert_eq!(
            check_signing_cert(&der(&p)),
            Err(SvidError::MultipleUriSans(2))
        );
        let p = signing(&["spiffe://ACME.test"]);
        assert!(matches!(
            check_signing_cert(&der(&p)),
            Err(SvidError::InvalidSpiffeId { .. })
        ));
        let wrapped = SvidError::Intermediate {
            index: 1,
            reason: Box::new(SvidError::MissingKeyCertSign),
        };
        assert_eq!(
            wrapped.to_string(),
            "intermediate certificate 1: signing certificate lacks the keyCertSign key usage"
        );
    }

    #[test]
    fn validity_window() {
        let mut p = params(&[GOOD]);
        p.not_before = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap(); // 2026-01-01
        p.not_after = OffsetDateTime::from_unix_timestamp(1_767_312_000).unwrap(); // 2026-01-02
        let d = der(&p);
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);

        assert_eq!(check_validity(&d, at(1_767_225_600)), Ok(()));
        assert_eq!(check_validity(&d, at(1_767_300_000)), Ok(()));
        assert_eq!(check_validity(&d, at(1_767_312_000)), Ok(()));

        let err = check_validity(&d, at(1_767_225_599)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate not valid until 2026-01-01T00:00:00Z"
        );
        let err = check_validity(&d, at(1_767_312_001)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate expired at 2026-01-02T00:00:00Z"
        );
        assert!(matches!(
            check_validity(&d, at(1_767_312_000) + Duration::from_millis(1500)),
            Err(SvidError::Expired { .. })
        ));
        assert!(matches!(
            check_validity(&d, UNIX_EPOCH - Duration::from_secs(10)),
            Err(SvidError::NotYetValid { .. })
        ));
        // The structural check ignores the window.
        assert!(check_svid_leaf(&d).is_ok());
    }

    #[test]
    fn garbage_der() {
        let now = SystemTime::now();
        for bad in [
            &b""[..],
            b"\x00",
            b"\x30\x03\x02\x01",
            b"not a certificate at all",
        ] {
            assert!(matches!(check_svid_leaf(bad), Err(SvidError::Malformed(_))));
            assert!(matches!(
                check_validity(bad, now),
                Err(SvidError::Malformed(_))
            ));
        }
        let mut d = der(&params(&[GOOD]));
        // Every truncation fails cleanly.
        for n in 0..d.len() {
            assert!(check_svid_leaf(&d[..n]).is_err(), "truncated to {n}");
        }
        d.extend_from_slice(b"\x00\x00");
        assert_eq!(check_svid_leaf(&d), Err(SvidError::TrailingData(2)));
        assert_eq!(check_validity(&d, now), Err(SvidError::TrailingData(2)));
    }
}
