//! X.509-SVID structural checks on arbitrary DER (`filters/src/parse/identity.rs`):
//! `check_svid_leaf`, `check_signing_cert`, `check_validity`, `validity_window`,
//! `serial_hex`, and the proxy's `portcullis::tls::check_leaf` (leaf rules + validity) that
//! the mTLS client-certificate verifier runs.
//!
//! Invariants: all of them agree on whether the bytes are one DER certificate; a certificate
//! is never both an acceptable leaf and an acceptable signing certificate; an accepted leaf's
//! ID is its only URI SAN and a SPIFFE ID with a path; `check_validity` agrees with
//! `validity_window` at the window's edges; `serial_hex` is lowercase hex without leading
//! zeros.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::identity::{
    check_signing_cert, check_svid_leaf, check_validity, serial_hex, validity_window, SpiffeId,
    SvidError,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};

fuzz_target!(|der: &[u8]| {
    let leaf = check_svid_leaf(der);
    let signing = check_signing_cert(der);
    let window = validity_window(der);
    let serial = serial_hex(der);
    // Error messages are built from untrusted fields: they must not panic either.
    for e in [
        leaf.as_ref().err(),
        signing.as_ref().err(),
        window.as_ref().err(),
        serial.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        let _ = e.to_string();
    }

    let whole_cert = match x509_parser::parse_x509_certificate(der) {
        Ok((rest, cert)) if rest.is_empty() => Some(cert),
        _ => None,
    };
    let unparsable = |r: Result<(), &SvidError>| {
        matches!(r, Err(SvidError::Malformed(_) | SvidError::TrailingData(_)))
    };
    match &whole_cert {
        None => {
            assert!(unparsable(leaf.as_ref().map(|_| ())), "{leaf:?}");
            assert!(unparsable(signing.as_ref().map(|_| ())), "{signing:?}");
            assert!(unparsable(window.as_ref().map(|_| ())), "{window:?}");
            assert!(unparsable(serial.as_ref().map(|_| ())), "{serial:?}");
            return;
        }
        Some(_) => {
            assert!(!unparsable(leaf.as_ref().map(|_| ())), "{leaf:?}");
            assert!(!unparsable(signing.as_ref().map(|_| ())), "{signing:?}");
        }
    }
    let Some(cert) = whole_cert else { return };
    let (not_before, not_after) = window.unwrap_or_else(|e| panic!("validity_window: {e}"));
    let serial = serial.unwrap_or_else(|e| panic!("serial_hex: {e}"));

    assert!(
        !(leaf.is_ok() && signing.is_ok()),
        "both a leaf and a signing certificate"
    );

    if let Ok(id) = &leaf {
        assert!(!id.path().is_empty(), "{id:?}");
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(id));
        // Exactly one URI SAN, and it is the ID.
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push(u.to_string()),
                        GeneralName::Invalid(tag, _) if tag.0 == 6 => uris.push(String::new()),
                        _ => {}
                    }
                }
            }
        }
        assert_eq!(uris, [id.as_str().to_owned()]);
        // Not a CA.
        assert!(!cert.is_ca(), "{id:?}");
    }
    if signing.is_ok() {
        assert!(cert.is_ca());
    }

    // Serial: lowercase hex without leading zeros.
    assert!(!serial.is_empty());
    assert!(
        serial
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{serial}"
    );
    assert!(serial == "0" || !serial.starts_with('0'), "{serial}");

    // check_validity agrees with the window, both bounds inclusive, notAfter to its last ns.
    let at = |secs: i64, nanos: u32| -> Option<SystemTime> {
        let t = if secs >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))?
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
        };
        t.checked_add(Duration::from_nanos(u64::from(nanos)))
    };
    let probes = [
        (not_before.checked_sub(1), 999_999_999, false),
        (Some(not_before), 0, true),
        (Some(not_after), 999_999_999, true),
        (not_after.checked_add(1), 0, false),
    ];
    for (secs, nanos, inside_if_window) in probes {
        let Some(t) = secs.and_then(|s| at(s, nanos)) else {
            continue;
        };
        let in_window = not_before <= not_after && inside_if_window;
        let got = check_validity(der, t);
        if in_window {
            assert!(
                got.is_ok(),
                "{secs:?}: {got:?} (window {not_before}..={not_after})"
            );
        } else if !inside_if_window {
            assert!(
                got.is_err(),
                "{secs:?}: {got:?} (window {not_before}..={not_after})"
            );
        }
        // The proxy's leaf check is the leaf rules plus the validity window.
        let proxy = portcullis::tls::check_leaf(der, t);
        match (&leaf, &got) {
            (Ok(id), Ok(())) => assert_eq!(proxy.as_ref(), Ok(id)),
            (Err(e), _) => assert_eq!(proxy.as_ref().err(), Some(e)),
            (Ok(_), Err(e)) => assert_eq!(proxy.as_ref().err(), Some(e)),
        }
    }
});
