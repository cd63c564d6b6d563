//! The transparent connector's naming of a redirected connection
//! (`proxy/src/connector/transparent.rs`): the TLS ClientHello's SNI (`sni`, records
//! reassembled), a plain request's `Host` (`http_host`), and the CONNECT authority built from
//! either (`authority_for`).
//!
//! Invariants: never panics; a prefix of an input whose name is found is never named
//! differently (the connector reads in chunks and stops at the first answer); a found
//! name is lowercase; an authority `authority_for` accepts is a CONNECT target
//! the central proxy's parser reads back the same, with no byte that could end the request
//! line or a header (no CR, LF, space or other control character).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use portcullis::fuzzing::{authority_for, http_host, sni, Named};
use portcullis_filters::parse::destination::Destination;

fuzz_target!(|data: &[u8]| {
    let original: SocketAddr = "127.0.0.1:443".parse().unwrap();
    for parse in [sni as fn(&[u8]) -> Named, http_host] {
        if let Named::Done(Some(name)) = &parse(data) {
            assert_eq!(name, &name.to_ascii_lowercase());
            // A shorter read never gives another name.
            for cut in [data.len() / 2, data.len().saturating_sub(1)] {
                match parse(&data[..cut]) {
                    Named::Done(Some(other)) => assert_eq!(&other, name, "cut {cut}"),
                    Named::Done(None) | Named::Partial | Named::Invalid(_) => {}
                }
            }
            check_authority(Some(name), original);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        check_authority(Some(s), original);
    }
});

fn check_authority(name: Option<&str>, original: SocketAddr) {
    if let Ok(authority) = authority_for(name, original) {
        assert!(
            !authority.bytes().any(|b| b.is_ascii_control() || b == b' '),
            "{authority:?}"
        );
        let d = Destination::parse_connect_authority(&authority).expect("accepted authority");
        assert_eq!(d.authority(), authority);
        assert_eq!(d.port, original.port());
    }
}
