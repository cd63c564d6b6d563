//! Identity revocation: an operator revokes a SPIFFE ID (exactly, or a path prefix and
//! everything under it) or one certificate (serial number or SHA-256 fingerprint, of the leaf
//! or of any intermediate the client sends). A revoked identity fails new handshakes
//! (`certificate_revoked` alert) and, on open connections, the next request (`403
//! identity_revoked`); its tunnels close. Revocations live in the [`Trust`](super::tls::Trust)
//! beside the bundles, so one check serves both; with Redis they are shared by replicas.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::SystemTime;

use portcullis_filters::parse::identity::{self, SpiffeId};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// What a revocation matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// Exactly this SPIFFE ID.
    Id(String),
    /// This SPIFFE ID and every ID under it, on path-segment boundaries (a trust-domain ID
    /// revokes the whole trust domain).
    Prefix(String),
    /// A certificate serial number: lowercase hex, no leading zeros. Serials are unique per
    /// issuing CA, so this matches that serial from any CA of a trusted chain.
    Serial(String),
    /// A certificate's SHA-256 fingerprint (of its DER): 64 lowercase hex digits.
    Sha256(String),
}

/// The selector kinds, as the admin API and the CLI name them.
pub const KINDS: [&str; 4] = ["id", "prefix", "serial", "sha256"];

impl Selector {
    /// `kind` is one of [`KINDS`]; the value is checked and normalized (hex may carry colons,
    /// as `openssl x509 -fingerprint` prints it, and any case).
    pub fn parse(kind: &str, value: &str) -> Result<Selector, String> {
        let id = |v: &str| {
            SpiffeId::parse(v)
                .map(|id| id.as_str().to_owned())
                .map_err(|e| format!("{kind}: {e}"))
        };
        match kind {
            "id" => {
                let id = SpiffeId::parse(value).map_err(|e| format!("id: {e}"))?;
                if id.path().is_empty() {
                    return Err(
                        "id: a trust-domain ID names no workload; revoke it with prefix".into(),
                    );
                }
                Ok(Selector::Id(id.as_str().to_owned()))
            }
            "prefix" => Ok(Selector::Prefix(id(value.trim_end_matches('/'))?)),
            "serial" => {
                let hex = hex_digits(value).ok_or("serial: give hexadecimal digits")?;
                let trimmed = hex.trim_start_matches('0');
                Ok(Selector::Serial(if trimmed.is_empty() {
                    "0".into()
                } else {
                    trimmed.into()
                }))
            }
            "sha256" => match hex_digits(value) {
                Some(hex) if hex.len() == 64 => Ok(Selector::Sha256(hex)),
                _ => Err("sha256: give the 64 hex digits of the certificate's fingerprint".into()),
            },
            other => Err(format!(
                "unknown selector {other:?}: use one of {}",
                KINDS.join(", ")
            )),
        }
    }

    /// `kind:value`, the form stored in Redis and printed.
    pub fn key(&self) -> String {
        self.to_string()
    }

    pub fn from_key(key: &str) -> Result<Selector, String> {
        let (kind, value) = key
            .split_once(':')
            .ok_or_else(|| format!("{key:?} is not kind:value"))?;
        Selector::parse(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Id(v) => write!(f, "id:{v}"),
            Selector::Prefix(v) => write!(f, "prefix:{v}"),
            Selector::Serial(v) => write!(f, "serial:{v}"),
            Selector::Sha256(v) => write!(f, "sha256:{v}"),
        }
    }
}

/// Lowercase hex digits of `s` with `:` separators removed; `None` if anything else is there.
fn hex_digits(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (!hex.is_empty() && hex.len() <= 128 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(hex)
}

/// One revocation, as listed and shared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The selector's `kind:value` form.
    pub selector: String,
    pub reason: String,
    /// Unix seconds.
    pub revoked_at: i64,
}

impl Record {
    pub fn new(selector: &Selector, reason: &str, now: SystemTime) -> Record {
        let revoked_at = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Record {
            selector: selector.key(),
            reason: reason.chars().take(512).collect(),
            revoked_at,
        }
    }
}

/// What a chain is known by: the leaf's SPIFFE ID, and each certificate's serial and
/// fingerprint (leaf first).
pub struct Subject {
    id: String,
    certs: Vec<(String, String)>,
}

impl Subject {
    /// `None` when the leaf is not an SVID (the handshake refuses such a chain anyway).
    pub fn of(leaf: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<Subject> {
        let id = identity::check_svid_leaf(leaf).ok()?.as_str().to_owned();
        let certs = std::iter::once(leaf)
            .chain(intermediates.iter().map(|c| c.as_ref()))
            .map(|der| {
                let serial = identity::serial_hex(der).unwrap_or_default();
                let digest = ring::digest::digest(&ring::digest::SHA256, der);
                let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                (serial, sha)
            })
            .collect();
        Some(Subject { id, certs })
    }

    /// A workload known only by its SPIFFE ID (a JWT-SVID's): ID and prefix revocations apply.
    pub fn of_id(id: &str) -> Subject {
        Subject {
            id: id.to_owned(),
            certs: Vec::new(),
        }
    }
}

/// The revocations in force, indexed for the check.
#[derive(Debug, Default)]
pub struct Revocations {
    records: BTreeMap<Selector, Record>,
    ids: HashSet<String>,
    prefixes: Vec<String>,
    serials: HashSet<String>,
    fingerprints: HashSet<String>,
}

impl Revocations {
    /// From records (as listed or loaded from Redis); unreadable selectors are skipped and
    /// logged.
    pub fn from_records(records: impl IntoIterator<Item = Record>) -> Revocations {
        let mut out = Revocations::default();
        for r in records {
            match Selector::from_key(&r.selector) {
                Ok(s) => out.insert(s, r),
                Err(e) => tracing::warn!(selector = %r.selector, error = %e,
                    "skipping an identity revocation that cannot be read"),
            }
        }
        out
    }

    fn insert(&mut self, selector: Selector, record: Record) {
        match &selector {
            Selector::Id(v) => {
                self.ids.insert(v.clone());
            }
            Selector::Prefix(v) => self.prefixes.push(v.clone()),
            Selector::Serial(v) => {
                self.serials.insert(v.clone());
            }
            Selector::Sha256(v) => {
                self.fingerprints.insert(v.clone());
            }
        }
        self.records.insert(selector, record);
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// A copy with `record` added (replacing one with the same selector).
    pub fn with(&self, selector: Selector, record: Record) -> Revocations {
        let mut records: Vec<Record> = self
            .records
            .iter()
            .filter(|(s, _)| **s != selector)
            .map(|(_, r)| r.clone())
            .collect();
        records.push(record);
        Revocations::from_records(records)
    }

    /// A copy without `selector`'s revocation; `None` if there is none.
    pub fn without(&self, selector: &Selector) -> Option<Revocations> {
        self.records.get(selector)?;
        let rest = self
            .records
            .iter()
            .filter(|(s, _)| *s != selector)
            .map(|(_, r)| r.clone());
        Some(Revocations::from_records(rest))
    }

    /// The revocation that covers `subject`, if any.
    pub fn matching(&self, subject: &Subject) -> Option<&Record> {
        let by = |s: Selector| self.records.get(&s);
        if self.ids.contains(&subject.id) {
            return by(Selector::Id(subject.id.clone()));
        }
        for p in &self.prefixes {
            let under = subject
                .id
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if under {
                return by(Selector::Prefix(p.clone()));
            }
        }
        for (serial, sha) in &subject.certs {
            if self.serials.contains(serial) {
                return by(Selector::Serial(serial.clone()));
            }
            if self.fingerprints.contains(sha) {
                return by(Selector::Sha256(sha.clone()));
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::pki::{Authority, LeafSpec};
    use std::time::Duration;

    fn subject(id: &str) -> (Subject, Vec<u8>) {
        let ca = Authority::generate("acme", Some("spiffe://acme.test")).unwrap();
        let leaf = ca
            .issue(&LeafSpec::svid(id, Duration::from_secs(3600)))
            .unwrap();
        (Subject::of(&leaf.cert_der, &[]).unwrap(), leaf.cert_der)
    }

    fn revoked(selectors: &[(&str, &str)]) -> Revocations {
        Revocations::from_records(selectors.iter().map(|(k, v)| {
            let s = Selector::parse(k, v).unwrap();
            Record::new(&s, "test", SystemTime::now())
        }))
    }

    #[test]
    fn selectors_are_checked_and_normalized() {
        assert_eq!(
            Selector::parse("serial", "00:0A:bc").unwrap(),
            Selector::Serial("abc".into())
        );
        assert_eq!(
            Selector::parse("prefix", "spiffe://acme.test/agents/").unwrap(),
            Selector::Prefix("spiffe://acme.test/agents".into())
        );
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(
            Selector::parse("sha256", &fp).unwrap(),
            Selector::Sha256("ab".repeat(32))
        );
        for (k, v) in [
            ("id", "spiffe://acme.test"),
            ("id", "https://acme.test/a"),
            ("prefix", "spiffe://ACME.test/a"),
            ("serial", "xyz"),
            ("serial", ""),
            ("sha256", "abcd"),
            ("name", "x"),
        ] {
            assert!(Selector::parse(k, v).is_err(), "{k}:{v}");
        }
        let s = Selector::parse("id", "spiffe://acme.test/a").unwrap();
        assert_eq!(Selector::from_key(&s.key()).unwrap(), s);
    }

    #[test]
    fn ids_and_prefixes_match_on_segment_boundaries() {
        let (a, _) = subject("spiffe://acme.test/agents/a");
        assert!(revoked(&[("id", "spiffe://acme.test/agents/a")])
            .matching(&a)
            .is_some());
        assert!(revoked(&[("id", "spiffe://acme.test/agents")])
            .matching(&a)
            .is_none());
        for p in ["spiffe://acme.test/agents", "spiffe://acme.test"] {
            assert!(revoked(&[("prefix", p)]).matching(&a).is_some(), "{p}");
        }
        for p in ["spiffe://acme.test/agent", "spiffe://acme.tes"] {
            assert!(revoked(&[("prefix", p)]).matching(&a).is_none(), "{p}");
        }
    }

    #[test]
    fn certificates_match_by_serial_or_fingerprint() {
        let (a, der) = subject("spiffe://acme.test/agents/a");
        let serial = identity::serial_hex(&der).unwrap();
        let fp: String = ring::digest::digest(&ring::digest::SHA256, &der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}:"))
            .collect();
        let r = revoked(&[("serial", &serial)]);
        assert_eq!(r.matching(&a).unwrap().selector, format!("serial:{serial}"));
        assert!(revoked(&[("sha256", fp.trim_end_matches(':'))])
            .matching(&a)
            .is_some());
        let (b, _) = subject("spiffe://acme.test/agents/a");
        assert!(r.matching(&b).is_none(), "another certificate, same ID");
    }

    #[test]
    fn with_and_without_replace_by_selector() {
        let s = Selector::parse("id", "spiffe://acme.test/a").unwrap();
        let r = Revocations::default().with(s.clone(), Record::new(&s, "one", SystemTime::now()));
        let r = r.with(s.clone(), Record::new(&s, "two", SystemTime::now()));
        assert_eq!(r.len(), 1);
        assert_eq!(r.records().next().unwrap().reason, "two");
        assert!(r.without(&s).unwrap().is_empty());
        assert!(Revocations::default().without(&s).is_none());
    }
}
