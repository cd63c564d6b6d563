//! `filters/src/parse/jwt.rs`: the delegation token parser and verifier.
//!
//! Invariants besides "never panics":
//! - arbitrary bytes never verify against keys generated at start (no forgery: the fuzzer
//!   cannot sign, so anything that verifies would be a bug in the verifier);
//! - the input read as a claims object and signed with that key always verifies, and one
//!   changed byte of the signed part never does;
//! - claims that pass `check` name a non-empty subject, hold an accepted audience, are not
//!   expired beyond the skew, and carry an `act` chain of at most `MAX_CHAIN` actors;
//! - the same signed claims as a JWT-SVID (`verify_svid`): accepted only with a SPIFFE ID
//!   `sub` that names a workload (a path), 1 to 16 string audiences, an `exp` not passed
//!   beyond the skew; the token kept is the one given; `parse_jwt_bundle` never takes a key
//!   `parse_jwks` would skip for its type.
#![no_main]

use std::sync::LazyLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::jwt::{self, Expect, Jwk, MAX_CHAIN};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

struct Keys {
    pair: EcdsaKeyPair,
    set: Vec<Jwk>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let rng = SystemRandom::new();
    let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key");
    let public = pair.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k",
        "x": b64(&public[1..33]), "y": b64(&public[33..])}]});
    let set = jwt::parse_jwks(jwks.to_string().as_bytes()).expect("jwks");
    Keys { pair, set }
});

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

const NOW: i64 = 1_800_000_000;
const SKEW: i64 = 30;

fuzz_target!(|data: &[u8]| {
    let keys = &*KEYS;
    // Arbitrary bytes: never a verified token.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = jwt::decode(text) {
            assert!(t.verify(&keys.set).is_err(), "an unsigned input verified");
        }
        let _ = jwt::parse_jwks(data);
        let _ = jwt::parse_jwt_bundle(data);
    }
    // The input as claims, signed: verifies; tampered: does not.
    let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"ES256","kid":"k"}"#),
        b64(serde_json::Value::Object(claims.clone())
            .to_string()
            .as_bytes())
    );
    let sig = keys
        .pair
        .sign(&SystemRandom::new(), signed.as_bytes())
        .expect("sign");
    let token = format!("{signed}.{}", b64(sig.as_ref()));
    if token.len() > jwt::MAX_TOKEN_BYTES {
        assert!(jwt::decode(&token).is_err(), "an oversized token was read");
        return;
    }
    let t = jwt::decode(&token).expect("a signed token decodes");
    assert_eq!(t.claims, claims);
    t.verify(&keys.set)
        .expect("a token signed with the key verifies");
    let mut bytes = token.clone().into_bytes();
    let at = data.len() % signed.len();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    if let Ok(tampered) = String::from_utf8(bytes) {
        if let Ok(t2) = jwt::decode(&tampered) {
            assert!(t2.verify(&keys.set).is_err(), "a tampered token verified");
        }
    }
    let audiences = ["portcullis".to_owned()];
    let copy = ["tenant".to_owned()];
    let want = Expect {
        issuer: "https://idp.test",
        audiences: &audiences,
        now: NOW,
        skew: SKEW,
        copy: &copy,
    };
    if let Ok(svid) = t.verify_svid(&keys.set, NOW, SKEW, &token) {
        assert!(!svid.spiffe_id.path().is_empty());
        assert_eq!(claims.get("sub").and_then(|s| s.as_str()), Some(svid.spiffe_id.as_str()));
        assert!((1..=16).contains(&svid.audience.len()));
        assert!(NOW < svid.expires.saturating_add(SKEW));
        assert_eq!(svid.token.expose(), token);
    }
    if let Ok(v) = t.check(&want) {
        assert!(!v.subject.is_empty());
        assert!(v.audience.iter().any(|a| a == "portcullis"));
        assert!(NOW < v.expires.saturating_add(SKEW));
        assert!(v.chain.len() <= MAX_CHAIN);
        assert!(v.claims.keys().all(|k| k == "tenant"));
        assert_eq!(v.issuer, "https://idp.test");
    }
});
