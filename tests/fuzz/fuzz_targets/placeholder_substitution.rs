//! Placeholder detection and substitution (`filters/src/parse/secret.rs`,
//! `filters/src/stages/credentials.rs`). `Place`, `replace_all` and `replace_token` are
//! private, so the substitution is driven through its public API: the
//! `CredentialSubstitute` filter's request phase, on a request whose header values, query
//! string and JSON body come from the input.
//!
//! Input, line by line: the secret; the placeholder's name after `pcx_`; a header value
//! (sent as `x-token` and as `authorization`); the query string; the rest is the body.
//!
//! Invariants: `find_placeholders` finds exactly the maximal `[A-Za-z0-9_]` runs that are
//! placeholders; substitution replaces each whole-token occurrence of the placeholder with the
//! secret written for its place (as is in a header, percent-encoded in the query, JSON-escaped
//! in the body, re-encoded inside a `Basic` token) and keeps every other byte exactly.
#![no_main]

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};

use base64::Engine as _;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::destination::{Binding, Destination, Host, Scheme};
use portcullis_filters::parse::identity::SpiffeId;
use portcullis_filters::parse::secret::{find_placeholders, Placeholder, SecretValue};
use portcullis_filters::pipeline::RequestBody;
use portcullis_filters::stages::credentials::{
    Credential, CredentialSet, CredentialSubstitute, OnBehalf, SecretStore, StoreError,
};
use portcullis_filters::{Action, Context, Filter, Peer, Via};

#[derive(Debug)]
struct Store(Arc<SecretValue>);

#[async_trait::async_trait]
impl SecretStore for Store {
    async fn get(
        &self,
        _name: &str,
        _on_behalf: Option<&OnBehalf<'_>>,
    ) -> Result<Arc<SecretValue>, StoreError> {
        Ok(self.0.clone())
    }
    async fn revoke(&self, _name: &str) -> bool {
        true
    }
}

fn is_tok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Reference: the maximal token-character runs of `text`, with their offsets.
fn runs(text: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if is_tok(text[i]) {
            let start = i;
            while i < text.len() && is_tok(text[i]) {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

/// Reference substitution: every maximal token run equal to `token` becomes `with`.
fn reference_replace(text: &[u8], token: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    for (s, e) in runs(text) {
        if &text[s..e] == token {
            out.extend_from_slice(&text[at..s]);
            out.extend_from_slice(with);
            at = e;
        }
    }
    out.extend_from_slice(&text[at..]);
    out
}

fn reference_placeholders(text: &[u8]) -> Vec<String> {
    runs(text)
        .into_iter()
        .map(|(s, e)| &text[s..e])
        .filter(|r| r.len() > 4 && r.starts_with(b"pcx_"))
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect()
}

fn pct(secret: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for b in secret.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

fn json_inner(secret: &str) -> Vec<u8> {
    let q = serde_json::to_string(secret).expect("a string serializes");
    q.as_bytes()[1..q.len() - 1].to_vec()
}

fn decode_basic(v: &[u8]) -> Option<Vec<u8>> {
    let v = v.trim_ascii();
    let at = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = v.split_at(at);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()
}

fn block_on<F: IntoFuture>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f.into_future());
    let mut cx = TaskContext::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("the filter did not finish: it waits on nothing here");
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |&b| b == b'\n');
    let secret = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let name = parts.next().unwrap_or_default();
    let header = parts.next().unwrap_or_default();
    let query = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    // Detection, on each text.
    for text in [header, query, body, data] {
        let found: Vec<String> = find_placeholders(text)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            found,
            reference_placeholders(text),
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }

    let token = format!("pcx_{}", String::from_utf8_lossy(name));
    let placeholder = Placeholder::parse(&token).unwrap_or_else(|| {
        assert!(
            token[4..].is_empty() || !token[4..].bytes().all(is_tok),
            "{token:?}"
        );
        Placeholder::parse("pcx_k").expect("valid")
    });
    let token = placeholder.as_str().as_bytes().to_vec();

    let set = Arc::new(CredentialSet::new(vec![Credential {
        name: "fuzz".into(),
        placeholder: placeholder.clone(),
        hosts: vec![Binding::parse("api.example.com").expect("valid")],
        body: true,
    }]));
    let substitute =
        CredentialSubstitute::new(set, Arc::new(Store(Arc::new(SecretValue::new(secret.clone())))));

    let mut req = http::Request::builder().method("POST");
    let with_query = !query.is_empty()
        && format!(
            "https://api.example.com/p?{}",
            String::from_utf8_lossy(query)
        )
        .parse::<http::Uri>()
        .is_ok_and(|u| u.query().map(str::as_bytes) == Some(query));
    let uri = match with_query {
        true => format!(
            "https://api.example.com/p?{}",
            String::from_utf8_lossy(query)
        ),
        false => "https://api.example.com/p".to_owned(),
    };
    req = req.uri(uri);
    let header_ok = http::HeaderValue::from_bytes(header).is_ok();
    if header_ok {
        req = req
            .header("x-token", header)
            .header("authorization", header);
    }
    let (mut parts, ()) = req.body(()).expect("a valid request").into_parts();
    let before = parts.clone();

    let peer = Arc::new(Peer {
        spiffe_id: SpiffeId::parse("spiffe://fuzz.test/agent").expect("valid"),
        source: "127.0.0.1:40000".parse().expect("valid"),
        source_ip: "127.0.0.1".into(),
        proof: portcullis_filters::pipeline::Proof::X509Svid,
    });
    let dest = Destination {
        host: Host::parse("api.example.com").expect("valid"),
        port: 443,
        scheme: Scheme::Https,
    };
    let mut ctx = Context::new(peer, Via::Mitm, dest, &parts);
    ctx.credentials.names = vec!["fuzz".into()];
    ctx.body = RequestBody::Buffered(Bytes::copy_from_slice(body));

    let action = block_on(substitute.request(&mut ctx, &mut parts));

    let has_token = |v: &[u8]| runs(v).into_iter().any(|(s, e)| v[s..e] == token[..]);
    let expected_x_token = reference_replace(header, &token, secret.as_bytes());
    // A Basic credential holding the placeholder is decoded, substituted and re-encoded.
    let expected_authorization = match decode_basic(header) {
        Some(decoded) if has_token(&decoded) => {
            let swapped = reference_replace(&decoded, &token, secret.as_bytes());
            let b64 = base64::engine::general_purpose::STANDARD.encode(swapped);
            format!("Basic {b64}").into_bytes()
        }
        _ => expected_x_token.clone(),
    };
    if let Action::Respond(rej) = &action {
        // Only a secret that cannot be written where its placeholder was is refused.
        let invalid = |v: &[u8]| http::HeaderValue::from_bytes(v).is_err();
        let bad_header =
            header_ok && (invalid(&expected_x_token) || invalid(&expected_authorization));
        assert!(bad_header || with_query, "refused: {rej:?}");
        return;
    }
    assert!(matches!(action, Action::Continue));

    // Headers.
    if header_ok {
        let got = parts.headers.get("x-token").expect("kept").as_bytes();
        assert_eq!(got, expected_x_token.as_slice());
        let got = parts.headers.get("authorization").expect("kept").as_bytes();
        assert_eq!(got, expected_authorization.as_slice());
    }
    assert_eq!(parts.headers.len(), before.headers.len());

    // Query.
    assert_eq!(parts.uri.path(), before.uri.path());
    assert_eq!(parts.uri.authority(), before.uri.authority());
    if with_query {
        let want = reference_replace(query, &token, &pct(&secret));
        assert_eq!(parts.uri.query().map(str::as_bytes), Some(want.as_slice()));
    } else {
        assert_eq!(parts.uri.query(), None);
    }

    // Body.
    let want = reference_replace(body, &token, &json_inner(&secret));
    match &ctx.body {
        RequestBody::Buffered(b) => assert_eq!(b.as_ref(), want.as_slice()),
        other => panic!("body is now {other:?}"),
    }

    // What the response is searched for afterwards.
    assert_eq!(ctx.credentials.secrets.len(), 1);
    assert!(ctx.credentials.needles.is_some());
});
