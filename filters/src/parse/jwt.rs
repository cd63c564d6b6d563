//! JSON Web Tokens (RFC 7519) as delegation assertions: the compact JWS form (RFC 7515) signed
//! with an asymmetric key from the issuer's JWK Set (RFC 7517). Verified with `ring`, nothing
//! else: `none`, HMAC (`HS*`, which would let anyone holding the public key forge tokens) and
//! unknown algorithms are refused, the header's `alg` must fit the key's type (and the key's
//! own `alg` when it names one), and a `crit` header is refused (no extension is understood).

use std::collections::BTreeMap;

use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

/// Largest token accepted (compact form, bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Deepest `act` chain accepted.
pub const MAX_CHAIN: usize = 8;

/// Why a token was refused. Safe to show the caller: never the token or a claim value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT (three base64url parts of at most {MAX_TOKEN_BYTES} bytes)")]
    Malformed,
    #[error("unsupported JWT: {0}")]
    Unsupported(String),
    #[error("issuer not allowed")]
    UnknownIssuer,
    #[error("no key of the issuer matches the token (kid {0:?})")]
    NoKey(Option<String>),
    #[error("bad signature")]
    BadSignature,
    #[error("{0}")]
    Claims(String),
    #[error("the issuer's keys cannot be fetched: {0}")]
    Keys(String),
}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct Unverified {
    pub alg: String,
    pub kid: Option<String>,
    pub claims: serde_json::Map<String, Value>,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)
}

/// Split and decode `token` (`header.payload.signature`).
pub fn decode(token: &str) -> Result<Unverified, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&b64(h)?).map_err(|_| JwtError::Malformed)?;
    let claims: serde_json::Map<String, Value> =
        serde_json::from_slice(&b64(p)?).map_err(|_| JwtError::Malformed)?;
    if header.contains_key("crit") {
        return Err(JwtError::Unsupported("crit header".into()));
    }
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(JwtError::Unsupported("no alg".into())),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    Ok(Unverified {
        alg,
        kid,
        claims,
        signed: format!("{h}.{p}").into_bytes(),
        signature: b64(s)?,
    })
}

/// A public key from a JWK Set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The key's own `alg`, when it names one.
    pub alg: Option<String>,
    key: KeyMaterial,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point (0x04 ‖ x ‖ y) on `curve` (`P-256` or `P-384`).
    Ec {
        curve: &'static str,
        point: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

/// The signature keys of a JWK Set document (`{"keys": [...]}`); keys of other types or uses
/// (`use: enc`) are skipped.
pub fn parse_jwks(doc: &[u8]) -> Result<Vec<Jwk>, String> {
    parse_keys(doc, &["sig"])
}

/// The JWT-SVID keys of a trust domain's bundle: a SPIFFE bundle (a JWK Set whose keys say
/// `use: jwt-svid`; its `x509-svid` entries are skipped) or a plain JWK Set (signature keys).
pub fn parse_jwt_bundle(doc: &[u8]) -> Result<Vec<Jwk>, String> {
    parse_keys(doc, &["jwt-svid", "sig"])
}

/// Keys without a `use`, or with one of the `wanted` uses.
fn parse_keys(doc: &[u8], wanted: &[&str]) -> Result<Vec<Jwk>, String> {
    let v: Value = serde_json::from_slice(doc).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let text = |k: &Value, name: &str| k.get(name).and_then(Value::as_str).map(str::to_owned);
    let bytes = |k: &Value, name: &str| -> Option<Vec<u8>> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.get(name)?.as_str()?)
            .ok()
    };
    let mut out = Vec::new();
    for k in keys {
        if text(k, "use").is_some_and(|u| !wanted.contains(&u.as_str())) {
            continue;
        }
        let key = match (text(k, "kty").as_deref(), text(k, "crv").as_deref()) {
            (Some("RSA"), _) => match (bytes(k, "n"), bytes(k, "e")) {
                (Some(n), Some(e)) => KeyMaterial::Rsa { n, e },
                _ => continue,
            },
            (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => {
                let (Some(x), Some(y)) = (bytes(k, "x"), bytes(k, "y")) else {
                    continue;
                };
                let curve = if crv == "P-256" { "P-256" } else { "P-384" };
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::Ec { curve, point }
            }
            (Some("OKP"), Some("Ed25519")) => match bytes(k, "x") {
                Some(x) => KeyMaterial::Ed25519(x),
                None => continue,
            },
            _ => continue,
        };
        out.push(Jwk {
            kid: text(k, "kid"),
            alg: text(k, "alg"),
            key,
        });
    }
    Ok(out)
}

impl Jwk {
    /// Verify `signature` over `message` with `alg`, if `alg` fits this key.
    fn verify(&self, alg: &str, message: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        if self.alg.as_deref().is_some_and(|a| a != alg) {
            return Err(JwtError::BadSignature);
        }
        let ok = match (&self.key, alg) {
            (KeyMaterial::Rsa { n, e }, _) => {
                let params: &signature::RsaParameters = match alg {
                    "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                    "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                    "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                    "PS512" => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(JwtError::BadSignature),
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok()
            }
            (KeyMaterial::Ec { curve, point }, _) => {
                let algorithm: &dyn signature::VerificationAlgorithm = match (*curve, alg) {
                    ("P-256", "ES256") => &signature::ECDSA_P256_SHA256_FIXED,
                    ("P-384", "ES384") => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return Err(JwtError::BadSignature),
                };
                UnparsedPublicKey::new(algorithm, point)
                    .verify(message, sig)
                    .is_ok()
            }
            (KeyMaterial::Ed25519(x), "EdDSA" | "Ed25519") => {
                UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        };
        ok.then_some(()).ok_or(JwtError::BadSignature)
    }
}

const ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "Ed25519",
];

impl Unverified {
    /// The issuer the token claims (not yet verified: only to pick the issuer's keys).
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Verify the signature with one of `keys` (the one named by `kid`, or, without a `kid`,
    /// any that fits).
    pub fn verify(&self, keys: &[Jwk]) -> Result<(), JwtError> {
        if !ALGORITHMS.contains(&self.alg.as_str()) {
            return Err(JwtError::Unsupported(format!("alg {:?}", self.alg)));
        }
        let candidates: Vec<&Jwk> = match &self.kid {
            Some(kid) => keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(JwtError::NoKey(self.kid.clone()));
        }
        candidates
            .iter()
            .find(|k| k.verify(&self.alg, &self.signed, &self.signature).is_ok())
            .map(|_| ())
            .ok_or(JwtError::BadSignature)
    }
}

/// What the claims must say.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    /// `aud` must hold one of these.
    pub audiences: &'a [String],
    /// Seconds since the epoch.
    pub now: i64,
    /// Tolerated clock difference, seconds.
    pub skew: i64,
    /// Claims copied into the result (bounded).
    pub copy: &'a [String],
}

/// A verified delegation: who the agent acts for, and through whom.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub subject: String,
    pub issuer: String,
    pub audience: Vec<String>,
    pub scopes: Vec<String>,
    pub claims: BTreeMap<String, Value>,
    /// `act` chain, outermost (the current actor) first.
    pub chain: Vec<String>,
    pub expires: i64,
    /// The token itself (set by the delegation stage): the subject token of a token exchange.
    /// Never logged (its `Debug` is redacted), never in the policy input.
    pub token: Option<std::sync::Arc<crate::parse::secret::SecretValue>>,
}

/// Largest copied claim (serialized bytes).
const MAX_CLAIM_BYTES: usize = 4096;

fn int_claim(claims: &serde_json::Map<String, Value>, name: &str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| JwtError::Claims(format!("{name} is not a number"))),
    }
}

/// `aud`: one string or an array of strings (RFC 7519 §4.1.3); `None` when absent.
fn audience_claim(
    claims: &serde_json::Map<String, Value>,
) -> Result<Option<Vec<String>>, JwtError> {
    match claims.get("aud") {
        None => Ok(None),
        Some(Value::String(a)) => Ok(Some(vec![a.clone()])),
        Some(Value::Array(all)) => all
            .iter()
            .map(|a| a.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .map(Some)
            .ok_or_else(|| JwtError::Claims("aud holds a non-string".into())),
        Some(_) => Err(JwtError::Claims("aud is not a string or array".into())),
    }
}

impl Unverified {
    /// Check the claims of a verified token (call [`Unverified::verify`] first).
    pub fn check(&self, want: &Expect<'_>) -> Result<Verified, JwtError> {
        let c = &self.claims;
        if self.issuer() != Some(want.issuer) {
            return Err(JwtError::UnknownIssuer);
        }
        let exp = int_claim(c, "exp")?.ok_or_else(|| JwtError::Claims("no exp".into()))?;
        if want.now >= exp.saturating_add(want.skew) {
            return Err(JwtError::Claims("expired".into()));
        }
        if let Some(nbf) = int_claim(c, "nbf")? {
            if want.now.saturating_add(want.skew) < nbf {
                return Err(JwtError::Claims("not valid yet (nbf)".into()));
            }
        }
        if let Some(iat) = int_claim(c, "iat")? {
            if want.now.saturating_add(want.skew) < iat {
                return Err(JwtError::Claims("issued in the future (iat)".into()));
            }
        }
        let audience = audience_claim(c)?.ok_or_else(|| JwtError::Claims("no aud".into()))?;
        if !audience.iter().any(|a| want.audiences.contains(a)) {
            return Err(JwtError::Claims("aud is not an accepted audience".into()));
        }
        let subject = match c.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(JwtError::Claims("no sub".into())),
        };
        let scopes = match (c.get("scope"), c.get("scp")) {
            (Some(Value::String(s)), _) => s.split_whitespace().map(str::to_owned).collect(),
            (None, Some(Value::Array(all))) => all
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
            (None, Some(Value::String(s))) => s.split_whitespace().map(str::to_owned).collect(),
            (None, None) => Vec::new(),
            _ => return Err(JwtError::Claims("scope is not a string".into())),
        };
        let mut chain = Vec::new();
        let mut act = c.get("act");
        while let Some(a) = act {
            if chain.len() == MAX_CHAIN {
                return Err(JwtError::Claims(format!(
                    "act chain deeper than {MAX_CHAIN}"
                )));
            }
            match a.get("sub") {
                Some(Value::String(s)) => chain.push(s.clone()),
                _ => return Err(JwtError::Claims("act without sub".into())),
            }
            act = a.get("act");
        }
        let mut claims = BTreeMap::new();
        for name in want.copy {
            if let Some(v) = c.get(name) {
                if v.to_string().len() > MAX_CLAIM_BYTES {
                    return Err(JwtError::Claims(format!(
                        "claim {name} is over {MAX_CLAIM_BYTES} bytes"
                    )));
                }
                claims.insert(name.clone(), v.clone());
            }
        }
        Ok(Verified {
            subject,
            issuer: want.issuer.to_owned(),
            audience,
            scopes,
            claims,
            chain,
            expires: exp,
            token: None,
        })
    }
}

/// The signature algorithms a JWT-SVID may use (SPIFFE JWT-SVID §3: RS, ES and PS only).
const SVID_ALGORITHMS: [&str; 8] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512",
];

/// A verified JWT-SVID: the workload it names, the audiences it was issued for, until when.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSvid {
    pub spiffe_id: crate::parse::identity::SpiffeId,
    pub audience: Vec<String>,
    pub expires: i64,
    /// The token itself: sent as the actor token of a token exchange. Never logged.
    pub token: std::sync::Arc<crate::parse::secret::SecretValue>,
}

impl JwtSvid {
    /// Issued for `audience` and still valid at `now` (seconds since the epoch).
    pub fn usable_for(&self, audience: &str, now: i64) -> bool {
        now < self.expires && self.audience.iter().any(|a| a == audience)
    }
}

impl Unverified {
    /// The SPIFFE ID the token claims (not yet verified: only to pick the trust domain's keys).
    pub fn svid_subject(&self) -> Result<crate::parse::identity::SpiffeId, JwtError> {
        match self.claims.get("sub") {
            Some(Value::String(s)) => match crate::parse::identity::SpiffeId::parse(s) {
                // The trust domain's own ID names no workload.
                Ok(id) if id.path().is_empty() => Err(JwtError::Claims(
                    "sub is a trust domain, not a workload".into(),
                )),
                Ok(id) => Ok(id),
                Err(e) => Err(JwtError::Claims(format!("sub is not a SPIFFE ID: {e}"))),
            },
            _ => Err(JwtError::Claims("no sub".into())),
        }
    }

    /// Verify a JWT-SVID (SPIFFE JWT-SVID §3, §4): an RS/ES/PS signature by one of the trust
    /// domain's JWT authorities, a SPIFFE ID `sub`, at least one `aud`, an `exp` not passed
    /// (allowing `skew` seconds), no `nbf`/`iat` in the future.
    pub fn verify_svid(
        &self,
        keys: &[Jwk],
        now: i64,
        skew: i64,
        token: &str,
    ) -> Result<JwtSvid, JwtError> {
        if !SVID_ALGORITHMS.contains(&self.alg.as_str()) {
            return Err(JwtError::Unsupported(format!(
                "alg {:?} in a JWT-SVID",
                self.alg
            )));
        }
        self.verify(keys)?;
        let c = &self.claims;
        let spiffe_id = self.svid_subject()?;
        let exp = int_claim(c, "exp")?.ok_or_else(|| JwtError::Claims("no exp".into()))?;
        if now >= exp.saturating_add(skew) {
            return Err(JwtError::Claims("expired".into()));
        }
        for name in ["nbf", "iat"] {
            if int_claim(c, name)?.is_some_and(|t| now.saturating_add(skew) < t) {
                return Err(JwtError::Claims(format!("{name} is in the future")));
            }
        }
        let audience = audience_claim(c)?.unwrap_or_default();
        if audience.is_empty() || audience.len() > MAX_AUDIENCES {
            return Err(JwtError::Claims(format!(
                "a JWT-SVID names 1 to {MAX_AUDIENCES} audiences"
            )));
        }
        Ok(JwtSvid {
            spiffe_id,
            audience,
            expires: exp,
            token: std::sync::Arc::new(crate::parse::secret::SecretValue::new(token.to_owned())),
        })
    }
}

/// Most audiences a JWT-SVID may name.
const MAX_AUDIENCES: usize = 16;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};
    use serde_json::json;

    fn enc(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    /// An ES256 key and its JWK Set.
    fn es256() -> (EcdsaKeyPair, Vec<Jwk>) {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref();
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": enc(&public[1..33]), "y": enc(&public[33..])}]});
        (pair, parse_jwks(jwks.to_string().as_bytes()).unwrap())
    }

    fn sign(pair: &EcdsaKeyPair, header: Value, claims: Value) -> String {
        let signed = format!(
            "{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let sig = pair.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", enc(sig.as_ref()))
    }

    fn claims(now: i64) -> Value {
        json!({"iss": "https://idp.test", "sub": "alice", "aud": ["portcullis", "x"],
               "exp": now + 300, "iat": now, "scope": "calendar.read mail.send",
               "tenant": "acme", "act": {"sub": "agent-1", "act": {"sub": "orchestrator"}}})
    }

    fn expect(now: i64) -> (Vec<String>, Vec<String>, i64) {
        (vec!["portcullis".into()], vec!["tenant".into()], now)
    }

    fn check(token: &str, keys: &[Jwk], now: i64) -> Result<Verified, JwtError> {
        let (aud, copy, now) = expect(now);
        let t = decode(token)?;
        t.verify(keys)?;
        t.check(&Expect {
            issuer: "https://idp.test",
            audiences: &aud,
            now,
            skew: 30,
            copy: &copy,
        })
    }

    #[test]
    fn a_valid_token_yields_subject_scopes_claims_and_chain() {
        let (pair, keys) = es256();
        let now = 1_800_000_000;
        let t = sign(&pair, json!({"alg": "ES256", "kid": "k1"}), claims(now));
        let v = check(&t, &keys, now).unwrap();
        assert_eq!(v.subject, "alice");
        assert_eq!(v.scopes, ["calendar.read", "mail.send"]);
        assert_eq!(v.chain, ["agent-1", "orchestrator"]);
        assert_eq!(v.claims["tenant"], "acme");
        assert_eq!(v.audience, ["portcullis", "x"]);
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_refused() {
        let (pair, keys) = es256();
        let now = 1_800_000_000;
        let good = sign(&pair, json!({"alg": "ES256", "kid": "k1"}), claims(now));
        // A changed payload breaks the signature.
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut forged = claims(now);
        forged["sub"] = "mallory".into();
        let payload = enc(forged.to_string().as_bytes());
        parts[1] = &payload;
        assert_eq!(
            check(&parts.join("."), &keys, now),
            Err(JwtError::BadSignature)
        );
        // Another key (same kid) cannot sign for the issuer.
        let (other, _) = es256();
        let t = sign(&other, json!({"alg": "ES256", "kid": "k1"}), claims(now));
        assert_eq!(check(&t, &keys, now), Err(JwtError::BadSignature));
        // alg none, HMAC, and a crit header are refused before any key is used.
        for header in [
            json!({"alg": "none"}),
            json!({"alg": "HS256", "kid": "k1"}),
            json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
        ] {
            let t = sign(&pair, header.clone(), claims(now));
            assert!(
                matches!(check(&t, &keys, now), Err(JwtError::Unsupported(_))),
                "{header}"
            );
        }
        // A key type the alg does not fit.
        let t = sign(&pair, json!({"alg": "RS256", "kid": "k1"}), claims(now));
        assert_eq!(check(&t, &keys, now), Err(JwtError::BadSignature));
        // Unknown kid.
        let t = sign(&pair, json!({"alg": "ES256", "kid": "k2"}), claims(now));
        assert!(matches!(check(&t, &keys, now), Err(JwtError::NoKey(_))));
        // Expired (beyond the skew), not yet valid, wrong audience, wrong issuer, no sub.
        for (edit, what) in [
            (json!({"exp": now - 31}), "expired"),
            (json!({"nbf": now + 31}), "nbf"),
            (json!({"iat": now + 31}), "iat"),
            (json!({"aud": "someone-else"}), "audience"),
            (json!({"sub": ""}), "sub"),
            (json!({"exp": "soon"}), "exp is not a number"),
        ] {
            let mut c = claims(now);
            for (k, v) in edit.as_object().unwrap() {
                c[k] = v.clone();
            }
            let t = sign(&pair, json!({"alg": "ES256", "kid": "k1"}), c);
            let e = check(&t, &keys, now).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
        let mut c = claims(now);
        c["iss"] = "https://evil.test".into();
        let t = sign(&pair, json!({"alg": "ES256", "kid": "k1"}), c);
        assert_eq!(check(&t, &keys, now), Err(JwtError::UnknownIssuer));
        // Within the skew is accepted.
        let mut c = claims(now);
        c["exp"] = json!(now - 29);
        let t = sign(&pair, json!({"alg": "ES256", "kid": "k1"}), c);
        assert!(check(&t, &keys, now).is_ok());
        for bad in ["", "a.b", "a.b.c.d", "!!.e30.e30"] {
            assert_eq!(decode(bad).err(), Some(JwtError::Malformed), "{bad}");
        }
    }

    #[test]
    fn ed25519_keys_verify() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519",
            "x": enc(pair.public_key().as_ref())}]});
        let keys = parse_jwks(jwks.to_string().as_bytes()).unwrap();
        let now = 1_800_000_000;
        let signed = format!(
            "{}.{}",
            enc(json!({"alg": "EdDSA"}).to_string().as_bytes()),
            enc(claims(now).to_string().as_bytes())
        );
        let t = format!("{signed}.{}", enc(pair.sign(signed.as_bytes()).as_ref()));
        assert_eq!(check(&t, &keys, now).unwrap().subject, "alice");
    }

    #[test]
    fn jwt_svids_are_checked_as_the_spiffe_spec_says() {
        let (pair, keys) = es256();
        let now = 1_800_000_000;
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        let good = json!({"sub": "spiffe://acme.test/agent", "aud": ["sts", "x"],
                          "exp": now + 300, "iat": now});
        let svid = |claims: &Value| {
            let t = sign(&pair, header.clone(), claims.clone());
            decode(&t)?.verify_svid(&keys, now, 30, &t)
        };
        let v = svid(&good).unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://acme.test/agent");
        assert_eq!(v.audience, ["sts", "x"]);
        assert!(v.usable_for("sts", now) && v.usable_for("x", now + 299));
        assert!(!v.usable_for("other", now) && !v.usable_for("sts", now + 300));
        assert!(!format!("{v:?}").contains(&sign(&pair, header.clone(), good.clone())[..20]));
        let with = |k: &str, val: Value| {
            let mut c = good.clone();
            c[k] = val;
            c
        };
        let without = |k: &str| {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        for (bad, why) in [
            (without("aud"), "no aud"),
            (with("aud", json!([])), "empty aud"),
            (with("aud", json!([1])), "non-string aud"),
            (with("sub", json!("alice")), "sub not a SPIFFE ID"),
            (with("sub", json!("spiffe://acme.test")), "no path"),
            (without("sub"), "no sub"),
            (without("exp"), "no exp"),
            (with("exp", json!(now - 31)), "expired"),
            (with("iat", json!(now + 31)), "issued in the future"),
            (with("nbf", json!(now + 31)), "not yet valid"),
        ] {
            assert!(svid(&bad).is_err(), "{why}: {bad}");
        }
        // Another key, or an algorithm the spec does not allow, never verifies.
        let (other, _) = es256();
        let t = sign(&other, header.clone(), good.clone());
        assert!(decode(&t).unwrap().verify_svid(&keys, now, 30, &t).is_err());
        let ed = json!({"alg": "EdDSA", "kid": "k1"});
        let t = sign(&pair, ed, good.clone());
        assert!(matches!(
            decode(&t).unwrap().verify_svid(&keys, now, 30, &t),
            Err(JwtError::Unsupported(_))
        ));
    }

    #[test]
    fn a_spiffe_bundle_gives_its_jwt_authorities_only() {
        let (_, keys) = es256();
        let KeyMaterial::Ec { point, .. } = &keys[0].key else {
            panic!()
        };
        let (x, y) = (enc(&point[1..33]), enc(&point[33..]));
        let key = |kid: &str, use_: Option<&str>| {
            let mut k = json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": x, "y": y});
            if let Some(u) = use_ {
                k["use"] = json!(u);
            }
            k
        };
        let doc = json!({"spiffe_sequence": 1, "keys": [
            key("jwt", Some("jwt-svid")), key("x509", Some("x509-svid")),
            key("sig", Some("sig")), key("plain", None)]});
        let kids = |keys: Vec<Jwk>| keys.into_iter().map(|k| k.kid.unwrap()).collect::<Vec<_>>();
        let doc = doc.to_string();
        assert_eq!(
            kids(parse_jwt_bundle(doc.as_bytes()).unwrap()),
            ["jwt", "sig", "plain"]
        );
        assert_eq!(kids(parse_jwks(doc.as_bytes()).unwrap()), ["sig", "plain"]);
    }
}
