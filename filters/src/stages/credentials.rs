//! Credential brokering: agents hold placeholders (`pcx_<name>`), never secrets. The detect
//! stage finds placeholders in header values (including decoded Basic credentials), the query
//! string and, opt-in per credential, JSON bodies; it refuses unknown placeholders and
//! placeholders headed to a host their credential is not bound to, and tells the policy which
//! credentials the request carries. The substitute stage runs after the policy allowed the
//! request: it fetches the real secrets and swaps them in. Responses that echo a secret back
//! are redacted before the agent sees them.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use http::header::{HeaderValue, AUTHORIZATION};

use crate::error::{ErrorCode, Rejection};
use crate::parse::destination::Host;
use bytes::Bytes;

use crate::parse::secret::{find_placeholders, Placeholder, SecretValue};
use crate::pipeline::timing::StepKind;
use crate::pipeline::{
    ask_uncompressed, content_encoding, Action, ActionKind, AfterResponse, BodyTransform,
    CannotRead, Chain, Context, Filter, RequestBody, TransformError,
};

/// One configured credential.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub placeholder: Placeholder,
    /// Destinations it may be substituted for: `host` or `*.suffix`.
    pub hosts: Vec<String>,
    /// Also substitute inside JSON request bodies.
    pub body: bool,
}

impl Credential {
    pub fn bound_to(&self, host: &Host) -> bool {
        self.hosts.iter().any(|p| host.matches(p))
    }
}

/// Where real secret values come from (env, file, Vault, OAuth), with its own caching.
/// Why a store produced no secret. Its message is safe to show the agent: it becomes the reason
/// of the 503 `credential_unavailable` (stores never put a value or a token in it).
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

#[async_trait::async_trait]
pub trait SecretStore: Send + Sync + std::fmt::Debug {
    /// The current secret of credential `name`. The error is a reason safe to show the agent.
    async fn get(&self, name: &str) -> Result<Arc<SecretValue>, StoreError>;

    /// [`SecretStore::get`], also telling whether the value was served from a cache (no source
    /// asked) when the store can tell. Called instead of `get` only when the action's spans are
    /// exported (the `credential.fetch` child span).
    async fn get_traced(&self, name: &str) -> (Result<Arc<SecretValue>, StoreError>, Option<bool>) {
        (self.get(name).await, None)
    }

    /// Forget any cached value of credential `name`, so the next use fetches it again.
    /// Returns false for an unknown name.
    async fn revoke(&self, name: &str) -> bool;
}

/// The configured credentials, by placeholder.
#[derive(Debug, Clone, Default)]
pub struct CredentialSet {
    by_placeholder: HashMap<Placeholder, Arc<Credential>>,
}

impl CredentialSet {
    pub fn new(creds: Vec<Credential>) -> CredentialSet {
        CredentialSet {
            by_placeholder: creds
                .into_iter()
                .map(|c| (c.placeholder.clone(), Arc::new(c)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_placeholder.is_empty()
    }

    fn any_body(&self) -> bool {
        self.by_placeholder.values().any(|c| c.body)
    }
}

/// A header value's text, with `Basic` credentials decoded so placeholders inside count.
fn scan_texts(req: &http::request::Parts) -> Vec<String> {
    let mut texts = Vec::new();
    for (name, value) in &req.headers {
        let Ok(v) = value.to_str() else { continue };
        texts.push(v.to_owned());
        if name == AUTHORIZATION {
            if let Some(decoded) = decode_basic(v) {
                texts.push(decoded);
            }
        }
    }
    if let Some(q) = req.uri.query() {
        texts.push(q.to_owned());
    }
    texts
}

fn decode_basic(v: &str) -> Option<String> {
    let (scheme, rest) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

fn refuse(reason: String) -> Action {
    Action::Respond(Rejection::new(ErrorCode::CredentialNotAllowed, reason))
}

/// Detects placeholders; runs before the policy.
#[derive(Debug)]
pub struct CredentialDetect {
    pub set: Arc<CredentialSet>,
}

#[async_trait::async_trait]
impl Filter for CredentialDetect {
    fn name(&self) -> &'static str {
        "credential_detect"
    }

    fn wants_body(&self, ctx: &Context, req: &http::request::Parts) -> bool {
        ctx.kind != ActionKind::Connect
            && self.set.any_body()
            && matches!(
                req.method,
                http::Method::POST | http::Method::PUT | http::Method::PATCH
            )
    }

    async fn request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if ctx.kind == ActionKind::Connect {
            return Action::Continue;
        }
        let mut found: Vec<Placeholder> = scan_texts(req)
            .iter()
            .flat_map(|t| find_placeholders(t))
            .collect();
        let body_found: Vec<Placeholder> = match &ctx.body {
            RequestBody::Buffered(b) => find_placeholders(&String::from_utf8_lossy(b)),
            _ => Vec::new(),
        };
        for p in &body_found {
            // Placeholders in bodies only count for credentials that opted in.
            if self.set.by_placeholder.get(p).is_some_and(|c| c.body) {
                found.push(p.clone());
            }
        }
        found.sort();
        found.dedup();
        for p in &found {
            let Some(cred) = self.set.by_placeholder.get(p) else {
                return refuse(format!("unknown placeholder {p}"));
            };
            if !cred.bound_to(&ctx.destination.host) {
                return refuse(format!(
                    "credential {} may not be sent to {}",
                    cred.name, ctx.destination.host
                ));
            }
            if !ctx.credentials.names.contains(&cred.name) {
                ctx.credentials.names.push(cred.name.clone());
            }
        }
        Action::Continue
    }
}

/// Swaps placeholders for secrets; runs after the policy allowed the request.
#[derive(Debug)]
pub struct CredentialSubstitute {
    pub set: Arc<CredentialSet>,
    pub store: Arc<dyn SecretStore>,
}

fn replace_all(text: &str, pairs: &[(Placeholder, Arc<SecretValue>)]) -> String {
    let mut out = text.to_owned();
    for (p, s) in pairs {
        if out.contains(p.as_str()) {
            out = replace_token(&out, p.as_str(), s.expose());
        }
    }
    out
}

/// Replace whole-token occurrences only (`pcx_ab` must not match inside `pcx_abc`).
fn replace_token(text: &str, token: &str, with: &str) -> String {
    let is_tok = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(pos) = text[i..].find(token) {
        let start = i + pos;
        let end = start + token.len();
        let before_ok = start == 0 || !is_tok(bytes[start - 1]);
        let after_ok = end == bytes.len() || !is_tok(bytes[end]);
        out.push_str(&text[i..start]);
        out.push_str(if before_ok && after_ok { with } else { token });
        i = end;
    }
    out.push_str(&text[i..]);
    out
}

#[async_trait::async_trait]
impl Filter for CredentialSubstitute {
    fn name(&self) -> &'static str {
        "credential_substitute"
    }

    async fn request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if ctx.credentials.names.is_empty() {
            return Action::Continue;
        }
        if is_idempotent(&req.method) {
            ctx.credentials.before_substitution = Some((req.clone(), ctx.body.clone()));
        }
        self.substitute(ctx, req).await
    }

    fn response(&self, ctx: &mut Context, resp: &mut http::response::Parts) {
        if ctx.credentials.secrets.is_empty() {
            return;
        }
        for value in resp.headers.values_mut() {
            let Ok(text) = value.to_str() else { continue };
            if ctx
                .credentials
                .secrets
                .iter()
                .any(|s| text.contains(s.expose()))
            {
                let mut redacted = text.to_owned();
                for s in &ctx.credentials.secrets {
                    redacted = redacted.replace(s.expose(), REDACTED);
                }
                if let Ok(v) = HeaderValue::from_str(&redacted) {
                    *value = v;
                }
            }
        }
    }

    /// One refresh and one retry when the upstream rejects a substituted credential, for
    /// idempotent requests whose body the proxy still has: the cached secrets are dropped
    /// (everywhere, so no replica reuses them), fresh ones fetched and substituted into the
    /// request as it was before the first substitution.
    async fn after_response(
        &self,
        ctx: &mut Context,
        resp: &http::response::Parts,
    ) -> AfterResponse {
        if resp.status != http::StatusCode::UNAUTHORIZED {
            return AfterResponse::Deliver;
        }
        let Some((mut req, body)) = ctx.credentials.before_substitution.take() else {
            return AfterResponse::Deliver;
        };
        if !body.replayable() {
            return AfterResponse::Deliver;
        }
        for name in &ctx.credentials.names {
            self.store.revoke(name).await;
        }
        tracing::info!(credentials = ?ctx.credentials.names, "upstream answered 401: refreshed the credentials; retrying once");
        ctx.body = body;
        match self.substitute(ctx, &mut req).await {
            Action::Continue => AfterResponse::Retry(req),
            Action::Respond(rej) => AfterResponse::Respond(rej),
        }
    }

    /// Echoes of the substituted secrets in the response body are redacted.
    /// A compressed echo cannot be searched: such a response is cut off at its first byte
    /// (the request asked for an uncompressed one, so only a server ignoring that sends it).
    fn response_body(
        &self,
        ctx: &Context,
        resp: &http::response::Parts,
        _chain: &Chain,
    ) -> Option<Box<dyn BodyTransform>> {
        let redactor = Redactor::new(ctx.credentials.secrets.clone())?;
        Some(match content_encoding(&resp.headers) {
            Some(coding) => Box::new(CannotRead(format!(
                "a response in Content-Encoding {coding} cannot be checked for echoed secrets"
            ))),
            None => Box::new(redactor),
        })
    }

    /// Echoes of the substituted secrets are searched for: the response must come uncompressed.
    fn upstream_request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if !ctx.credentials.secrets.is_empty() {
            ask_uncompressed(req);
        }
        Action::Continue
    }
}

/// RFC 9110 §9.2.2 (TRACE aside): safe to send twice.
fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

impl CredentialSubstitute {
    async fn substitute(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let mut pairs = Vec::new();
        for cred in self.set.by_placeholder.values() {
            if !ctx.credentials.names.contains(&cred.name) {
                continue;
            }
            let start = ctx.step_start();
            let (got, cache_hit) = match start {
                Some(_) => self.store.get_traced(&cred.name).await,
                None => (self.store.get(&cred.name).await, None),
            };
            ctx.step_end(start, || StepKind::Credential {
                name: cred.name.clone(),
                cache_hit,
                error: got.is_err(),
            });
            match got {
                Ok(secret) => pairs.push((cred.placeholder.clone(), secret)),
                Err(reason) => {
                    return Action::Respond(Rejection::new(
                        ErrorCode::CredentialUnavailable,
                        format!("credential {} is unavailable: {reason}", cred.name),
                    ))
                }
            }
        }
        for (name, value) in req.headers.iter_mut() {
            let Ok(text) = value.to_str() else { continue };
            let mut new = replace_all(text, &pairs);
            if name == AUTHORIZATION {
                if let Some(decoded) = decode_basic(text) {
                    let swapped = replace_all(&decoded, &pairs);
                    if swapped != decoded {
                        new = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(swapped)
                        );
                    }
                }
            }
            if new != text {
                match HeaderValue::from_str(&new) {
                    Ok(mut v) => {
                        // Keep it out of HPACK tables.
                        v.set_sensitive(true);
                        *value = v;
                    }
                    Err(_) => {
                        return Action::Respond(Rejection::new(
                            ErrorCode::CredentialUnavailable,
                            "a secret is not a valid header value",
                        ))
                    }
                }
            }
        }
        if let Some(q) = req.uri.query() {
            let new_q = replace_all(q, &pairs);
            if new_q != q {
                let path = req.uri.path();
                let mut parts = req.uri.clone().into_parts();
                match format!("{path}?{new_q}").parse() {
                    Ok(pq) => parts.path_and_query = Some(pq),
                    Err(_) => {
                        return Action::Respond(Rejection::new(
                            ErrorCode::CredentialUnavailable,
                            "a secret is not valid in a query string",
                        ))
                    }
                }
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    req.uri = uri;
                }
            }
        }
        if let RequestBody::Buffered(b) = &ctx.body {
            let body_pairs: Vec<_> = pairs
                .iter()
                .filter(|(p, _)| self.set.by_placeholder.get(p).is_some_and(|c| c.body))
                .cloned()
                .collect();
            if !body_pairs.is_empty() {
                let text = String::from_utf8_lossy(b);
                let new = replace_all(&text, &body_pairs);
                if new != text {
                    ctx.body = RequestBody::Buffered(bytes::Bytes::from(new));
                }
            }
        }
        ctx.credentials.secrets = pairs.into_iter().map(|(_, s)| s).collect();
        Action::Continue
    }
}

pub const REDACTED: &str = "[REDACTED]";

/// Streaming redaction of secrets in a response body: replaces every occurrence, across chunk
/// boundaries, while holding back only a suffix that could be the start of a secret (so an SSE
/// event is not delayed unless its tail really looks like one).
#[derive(Debug)]
pub struct Redactor {
    secrets: Vec<Arc<SecretValue>>,
    carry: Vec<u8>,
}

impl Redactor {
    pub fn new(secrets: Vec<Arc<SecretValue>>) -> Option<Redactor> {
        let secrets: Vec<_> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        (!secrets.is_empty()).then_some(Redactor {
            secrets,
            carry: Vec::new(),
        })
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let mut out = self.redact(&buf);
        // Hold back the longest tail that is a proper prefix of a secret.
        let hold = self
            .secrets
            .iter()
            .map(|s| {
                let s = s.expose().as_bytes();
                (1..s.len().min(out.len() + 1))
                    .rev()
                    .find(|&n| out.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        self.carry = out.split_off(out.len() - hold);
        out
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

impl BodyTransform for Redactor {
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
        Ok(Bytes::from(self.push(&chunk)))
    }

    fn end(&mut self) -> Result<Bytes, TransformError> {
        Ok(Bytes::from(self.finish()))
    }
}

impl Redactor {
    fn redact(&self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        for s in &self.secrets {
            let needle = s.expose().as_bytes();
            let mut result = Vec::with_capacity(out.len());
            let mut i = 0;
            while i < out.len() {
                if out[i..].starts_with(needle) {
                    result.extend_from_slice(REDACTED.as_bytes());
                    i += needle.len();
                } else {
                    result.push(out[i]);
                    i += 1;
                }
            }
            out = result;
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Arc<SecretValue> {
        Arc::new(SecretValue::new(s.into()))
    }

    #[test]
    fn whole_tokens_only() {
        assert_eq!(
            replace_token("a pcx_ab pcx_abc", "pcx_ab", "S"),
            "a S pcx_abc"
        );
        assert_eq!(replace_token("pcx_ab", "pcx_ab", "S"), "S");
    }

    #[test]
    fn basic_auth_is_decoded() {
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:pcx_gh")
        );
        assert_eq!(decode_basic(&v).as_deref(), Some("user:pcx_gh"));
        assert_eq!(decode_basic("Bearer x"), None);
    }

    #[test]
    fn redactor_works_across_chunks_and_holds_back_only_possible_prefixes() {
        let mut r = Redactor::new(vec![secret("s3cr3t-value")]).unwrap();
        let mut out = r.push(b"echo: s3cr");
        assert_eq!(
            out, b"echo: ",
            "the possible start of the secret is held back"
        );
        out.extend(r.push(b"3t-value and more\n\n"));
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "echo: [REDACTED] and more\n\n"
        );
        // Text that cannot start a secret passes at once (SSE events are not delayed).
        assert_eq!(r.push(b"data: ok\n\n"), b"data: ok\n\n");
    }

    #[test]
    fn binding_patterns() {
        let c = Credential {
            name: "gh".into(),
            placeholder: Placeholder::parse("pcx_gh").unwrap(),
            hosts: vec!["api.github.com".into(), "*.githubusercontent.com".into()],
            body: false,
        };
        assert!(c.bound_to(&Host::parse("api.github.com").unwrap()));
        assert!(c.bound_to(&Host::parse("raw.githubusercontent.com").unwrap()));
        assert!(!c.bound_to(&Host::parse("githubusercontent.com").unwrap()));
        assert!(!c.bound_to(&Host::parse("evil.com").unwrap()));
    }
}
