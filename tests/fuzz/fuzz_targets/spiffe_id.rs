//! SPIFFE IDs and trust domains (`filters/src/parse/identity.rs`): `SpiffeId::parse`,
//! `TrustDomain::parse`, and the policy crate's `Identity::from_spiffe_id` (the split the
//! policy input uses).
//!
//! Invariants: the parser accepts exactly what an independent implementation of the
//! SPIFFE-ID spec's rules accepts; parse(as_str()) is the same value; the accessors split the
//! ID as the spec does, and as the policy input does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::identity::{SpiffeId, TrustDomain};
use portcullis_policy::Identity;

fuzz_target!(|data: &[u8]| {
    let owned;
    let s = match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(_) => {
            owned = String::from_utf8_lossy(data).into_owned();
            &owned
        }
    };

    let parsed = SpiffeId::parse(s);
    assert_eq!(parsed.is_ok(), spec_valid_id(s), "{s:?}: {parsed:?}");
    if let Ok(id) = &parsed {
        assert_eq!(id.as_str(), s);
        assert_eq!(id.to_string(), s);
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(id));
        assert_eq!(s.parse::<SpiffeId>().as_ref(), Ok(id));
        let td = id.trust_domain();
        let path = id.path();
        assert_eq!(format!("spiffe://{td}{path}"), s);
        assert!(spec_valid_trust_domain(td), "{s:?}");
        assert!(path.is_empty() || path.starts_with('/'), "{s:?}");
        let segments: Vec<&str> = id.segments().collect();
        for seg in &segments {
            assert!(!seg.is_empty() && *seg != "." && *seg != "..", "{s:?}");
        }
        assert_eq!(segments.is_empty(), path.is_empty());
        // The trust domain of an ID is a trust domain, and its path-less form parses to it.
        let t = TrustDomain::parse(td).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(t.as_str(), td);
        if path.is_empty() {
            assert_eq!(TrustDomain::parse(s).as_ref(), Ok(&t));
        } else {
            assert!(TrustDomain::parse(s).is_err());
        }
        // The policy input's split of the same ID.
        let pi = Identity::from_spiffe_id(s).unwrap_or_else(|| panic!("{s:?}"));
        assert_eq!(pi.spiffe_id, s);
        assert_eq!(pi.trust_domain, td);
        assert_eq!(pi.path, path);
        assert_eq!(pi.segments, segments);
    }

    let td = TrustDomain::parse(s);
    let want = if s.starts_with("spiffe://") {
        spec_valid_id(s) && !s["spiffe://".len()..].contains('/')
    } else {
        spec_valid_trust_domain(s)
    };
    assert_eq!(td.is_ok(), want, "{s:?}: {td:?}");
    if let Ok(t) = &td {
        assert_eq!(TrustDomain::parse(t.as_str()).as_ref(), Ok(t));
        assert_eq!(t.to_string(), t.as_str());
        let as_id = format!("spiffe://{}", t.as_str());
        assert_eq!(TrustDomain::parse(&as_id).as_ref(), Ok(t));
        let id = SpiffeId::parse(&as_id).unwrap_or_else(|e| panic!("{as_id:?}: {e}"));
        assert_eq!(id.trust_domain(), t.as_str());
    }
});

/// SPIFFE-ID spec 2.1: a trust domain is 1..=255 bytes of lowercase letters, digits, `.`,
/// `-` and `_`.
fn spec_valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
}

/// SPIFFE-ID spec 2: `spiffe://` (lowercase), a trust domain, then zero or more `/segment`
/// where a segment is non-empty, not `.` or `..`, of letters, digits, `.`, `-`, `_`; at most
/// 2048 bytes in all. No query, fragment, port, userinfo or percent-encoding anywhere.
fn spec_valid_id(s: &str) -> bool {
    if s.len() > 2048 {
        return false;
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let mut parts = rest.split('/');
    let td = parts.next().unwrap_or("");
    if !spec_valid_trust_domain(td) {
        return false;
    }
    parts.all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    })
}
