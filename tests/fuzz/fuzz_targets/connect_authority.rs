//! CONNECT targets and request authorities (`filters/src/parse/destination.rs`):
//! `Destination::parse_connect_authority`, `Destination::from_absolute_uri`, `Host::parse` and
//! the credential `Binding::parse`.
//!
//! Invariants: an accepted value re-rendered parses to the same value; an accepted destination
//! satisfies the module's documented invariants (lowercase valid DNS name or IP literal, port
//! 1..=65535, no zone id); what the `http` crate reads as host and port of the same authority
//! agrees with it.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::destination::{Binding, Destination, Host, Scheme};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    if let Ok(d) = Destination::parse_connect_authority(s) {
        check_destination(&d);
        assert_eq!(d.scheme, Scheme::Https);
        // Only an authority-form target is accepted.
        assert!(
            s.is_ascii() && !s.contains(['@', '/', '?', '#', ' ']),
            "{s:?}"
        );
        assert!(!s.bytes().any(|b| b.is_ascii_control()), "{s:?}");
        let again = Destination::parse_connect_authority(&d.authority());
        assert_eq!(again.as_ref(), Ok(&d), "{s:?} -> {}", d.authority());
        assert_eq!(d.to_string(), d.authority());
        agrees_with_http(s, &d);
    }

    if let Ok(h) = Host::parse(s) {
        check_host(&h);
        assert_eq!(Host::parse(&h.to_string()).as_ref(), Ok(&h), "{s:?}");
        assert_eq!(
            Host::parse(&h.to_authority_host()).as_ref(),
            Ok(&h),
            "{s:?}"
        );
        // A host matches itself as an exact pattern.
        assert!(h.matches(&h.to_string()), "{s:?}");
        assert!(h.matches(&h.to_authority_host()), "{s:?}");
    }

    // The same text as the authority of an absolute-form URI.
    for scheme in ["http", "https"] {
        let Ok(uri) = format!("{scheme}://{s}/").parse::<http::Uri>() else {
            continue;
        };
        if let Ok(d) = Destination::from_absolute_uri(&uri) {
            check_destination(&d);
            let rendered = format!("{}://{}/", d.scheme, d.authority());
            let again = rendered
                .parse::<http::Uri>()
                .map_err(|e| e.to_string())
                .and_then(|u| Destination::from_absolute_uri(&u).map_err(|e| e.to_string()));
            assert_eq!(again.as_ref(), Ok(&d), "{s:?} -> {rendered}");
        }
    }

    if let Ok(b) = Binding::parse(s) {
        // Found by this target ('*.]::' was accepted), fixed in e523eb6: a binding is stored
        // normalized, an exact host or `*.` and a DNS name.
        match b.host.strip_prefix("*.") {
            Some(suffix) => {
                let h = Host::parse(suffix);
                assert!(
                    matches!(&h, Ok(Host::Dns(n)) if n == suffix),
                    "{s:?}: {:?}",
                    b.host
                );
            }
            None => {
                let h = Host::parse(&b.host);
                assert_eq!(
                    h.map(|h| h.to_string()).as_deref(),
                    Ok(b.host.as_str()),
                    "{s:?}"
                );
            }
        }
        let rendered = b.to_string();
        assert_eq!(
            Binding::parse(&rendered).as_ref(),
            Ok(&b),
            "{s:?} -> {rendered}"
        );
    }
});

fn check_destination(d: &Destination) {
    assert_ne!(d.port, 0);
    check_host(&d.host);
}

fn check_host(h: &Host) {
    match h {
        Host::Dns(name) => {
            assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
            assert!(!name.ends_with('.'), "{name:?}");
            for label in name.split('.') {
                assert!(!label.is_empty() && label.len() <= 63, "{name:?}");
                assert!(
                    label.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'-'
                        || b == b'_'),
                    "{name:?}"
                );
                assert!(!label.starts_with('-') && !label.ends_with('-'), "{name:?}");
            }
            // A name a resolver could read as an IPv4 address is never a DNS name here.
            let last = name.rsplit('.').next().unwrap_or(name);
            let hex = last.strip_prefix("0x");
            let numeric = match hex {
                Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
                None => last.bytes().all(|b| b.is_ascii_digit()),
            };
            assert!(!numeric, "{name:?}");
            assert!(name.parse::<IpAddr>().is_err(), "{name:?}");
        }
        Host::Ip(_) => {}
    }
}

/// What the `http` crate (which hyper uses to read the CONNECT line) makes of the same
/// authority, when it accepts it: the same host and port.
fn agrees_with_http(s: &str, d: &Destination) {
    let Ok(a) = s.parse::<http::uri::Authority>() else {
        return;
    };
    assert_eq!(a.port_u16(), Some(d.port), "{s:?}");
    let host = a.host();
    match &d.host {
        Host::Dns(name) => {
            let theirs = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
            assert_eq!(&theirs, name, "{s:?}");
        }
        Host::Ip(ip) => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            assert_eq!(bare.parse::<IpAddr>().ok(), Some(*ip), "{s:?}");
        }
    }
}
