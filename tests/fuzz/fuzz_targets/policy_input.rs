//! The policy input (`policy/src/input.rs`) built from request parts by the policy stage
//! (`filters/src/stages/policy.rs` `build_input`): method, path (and its normalised form,
//! `filters/src/parse/path.rs`), query, headers (with credential values redacted), plus the
//! `mcp` document of a JSON-RPC body (`jsonrpc::policy_input`); then `Input::exceeded` and
//! `Input::bounded` under default and fuzzed `InputLimits`.
//!
//! Input: a limits byte, then lines: method; path and query; `name: value` headers up to an
//! empty line; the rest is a JSON-RPC body.
//!
//! Invariants: never panics; the input serializes to JSON and deserializes to the same value;
//! the normalised path is no longer than the path (but for a stray `%`, which becomes `%25`),
//! has no dot segments and is a fixed point;
//! credential-bearing headers are redacted; an input within its limits is left whole by
//! `bounded`, and a bounded input is within its limits.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::destination::{Destination, Host, Scheme};
use portcullis_filters::parse::identity::SpiffeId;
use portcullis_filters::parse::jsonrpc;
use portcullis_filters::parse::path::normalize;
use portcullis_filters::stages::policy::build_input;
use portcullis_filters::{Context, Peer, Via};
use portcullis_policy::input::{REDACTED, TRUNCATED_MARKER};
use portcullis_policy::{redact_headers, Input, InputLimits};

fn lines<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    if data.is_empty() {
        return None;
    }
    let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let line = &data[..end];
    *data = data.get(end + 1..).unwrap_or_default();
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fn limits(ctl: u8) -> InputLimits {
    if ctl & 0x80 == 0 {
        return InputLimits::default();
    }
    // Small limits, each at least the truncation marker so a cut string fits its bound.
    let small = |shift: u32| TRUNCATED_MARKER.len() + usize::from((ctl >> (shift % 7)) & 0x1f);
    InputLimits {
        path_bytes: small(0),
        query_keys: usize::from(ctl & 7),
        header_names: usize::from((ctl >> 2) & 7),
        values_per_key: usize::from((ctl >> 4) & 3),
        string_bytes: small(1),
        header_value_bytes: small(2),
        mcp_depth: usize::from(ctl & 7),
        mcp_nodes: 1 + usize::from(ctl & 0x3f),
        mcp_string_bytes: small(3),
    }
}

/// How many `%` are not followed by two hex digits.
fn stray_percents(path: &str) -> usize {
    let b = path.as_bytes();
    (0..b.len())
        .filter(|&i| {
            b[i] == b'%'
                && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        })
        .count()
}

/// Equal, floats included: serde_json reads decimals correctly rounded (the workspace
/// enables its `float_roundtrip` feature), so a value comes back exactly.
fn assert_same(back: &Input, input: &Input) {
    assert_eq!(back, input);
}

const SENSITIVE: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    data = rest;
    let method = lines(&mut data).unwrap_or_default();
    let target = lines(&mut data).unwrap_or_default();
    let mut headers = Vec::new();
    while let Some(line) = lines(&mut data) {
        if line.is_empty() {
            break;
        }
        headers.push(line);
    }
    let body = data;

    let mut req = http::Request::builder()
        .method(http::Method::from_bytes(method).unwrap_or(http::Method::GET));
    let uri = format!("https://api.example.com{}", String::from_utf8_lossy(target));
    req = req.uri(
        uri.parse::<http::Uri>()
            .unwrap_or_else(|_| http::Uri::from_static("https://api.example.com/")),
    );
    let mut extra_sensitive = Vec::new();
    for h in &headers {
        let (name, value) = match h.iter().position(|&b| b == b':') {
            Some(at) => (&h[..at], h[at + 1..].trim_ascii_start()),
            None => (&h[..], &b""[..]),
        };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        if name.as_str().starts_with("x-secret") {
            extra_sensitive.push(name.as_str().to_ascii_uppercase());
        }
        req = req.header(name, value);
    }
    let Ok(req) = req.body(()) else { return };
    let (parts, ()) = req.into_parts();

    let peer = Arc::new(Peer {
        spiffe_id: SpiffeId::parse("spiffe://fuzz.test/agents/a").expect("valid"),
        source: "[2001:db8::1]:40000".parse().expect("valid"),
        source_ip: "2001:db8::1".into(),
        proof: portcullis_filters::pipeline::Proof::X509Svid,
    });
    let dest = Destination {
        host: Host::parse("api.example.com").expect("valid"),
        port: 443,
        scheme: Scheme::Https,
    };
    let ctx = Context::new(peer, Via::Mitm, dest, &parts);
    let mut input = build_input(&ctx, &parts, &extra_sensitive);
    if let Ok(mcp) = jsonrpc::parse(body, None, None) {
        input.mcp = mcp.messages.first().map(|m| jsonrpc::policy_input(&mcp, m));
    }

    // The request as the policy sees it.
    let request = input.request.as_ref().expect("an HTTP request");
    assert_eq!(request.method, parts.method.as_str());
    assert_eq!(request.path, parts.uri.path());
    let normalized = &request.normalized_path;
    assert_eq!(normalized, &normalize(&request.path));
    // No longer, but for a stray `%` (without two hex digits), which becomes `%25`.
    assert!(
        normalized.len() <= request.path.len() + 2 * stray_percents(&request.path),
        "{:?} -> {normalized:?}",
        request.path
    );
    let again = normalize(normalized);
    assert_eq!(&again, normalized, "not a fixed point: {:?}", request.path);
    assert!(
        !normalized.split('/').any(|s| s == "." || s == ".."),
        "{:?} -> {normalized:?}",
        request.path
    );
    for (name, values) in &request.headers {
        assert_eq!(name, &name.to_ascii_lowercase());
        let sensitive = SENSITIVE.contains(&name.as_str())
            || extra_sensitive.iter().any(|s| s.eq_ignore_ascii_case(name));
        if sensitive {
            for v in values {
                let scheme_kept = v
                    .strip_suffix(REDACTED)
                    .and_then(|s| s.strip_suffix(' '))
                    .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()));
                assert!(v == REDACTED || scheme_kept, "{name}: {v:?}");
            }
        }
    }
    // The same redaction on arbitrary text, not only valid header values.
    let text = String::from_utf8_lossy(target);
    let redacted = redact_headers(
        [
            ("Authorization", text.as_ref()),
            ("X-Api-Key", text.as_ref()),
            ("x-other", text.as_ref()),
        ]
        .into_iter(),
        &[],
    );
    assert_eq!(redacted["x-api-key"], [REDACTED]);
    assert_eq!(redacted["x-other"], [text.as_ref()]);
    let auth = &redacted["authorization"][0];
    assert!(
        auth == REDACTED || auth.ends_with(&format!(" {REDACTED}")),
        "{auth:?}"
    );
    if auth != REDACTED {
        // Only the scheme word is kept: the output is that word and the marker, nothing else
        // of the value. (Comparing lengths instead was wrong: leading whitespace makes a bare
        // `Basic ` longer than `Basic [REDACTED]` although it holds no credential.)
        let scheme = text
            .trim_start()
            .split(|c: char| c.is_ascii_whitespace())
            .next()
            .unwrap_or("");
        assert_eq!(auth, &format!("{scheme} {REDACTED}"));
    }

    // JSON, both ways.
    let json = serde_json::to_string(&input).expect("the input serializes");
    let back: Input = serde_json::from_str(&json).expect("the input deserializes");
    assert_same(&back, &input);

    for limits in [InputLimits::default(), limits(ctl)] {
        let exceeded = input.exceeded(&limits);
        let bounded = input.clone().bounded(&limits);
        if exceeded.is_none() {
            assert_eq!(
                bounded.request, input.request,
                "cut although within {limits:?}"
            );
            assert_eq!(bounded.mcp, input.mcp, "cut although within {limits:?}");
        }
        assert_eq!(
            bounded.exceeded(&limits),
            None,
            "bounded but over {limits:?}"
        );
        // Bounding is idempotent.
        assert_eq!(bounded.clone().bounded(&limits), bounded);
        let json = serde_json::to_string(&bounded).expect("the bounded input serializes");
        let back: Input = serde_json::from_str(&json).expect("the bounded input deserializes");
        assert_same(&back, &bounded);
    }
});
