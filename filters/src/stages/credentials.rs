//! Credential brokering: agents hold placeholders (`pcx_<name>`), never secrets. The detect
//! stage finds placeholders in header values (including decoded Basic credentials), the query
//! string and, opt-in per credential, JSON bodies; it refuses unknown placeholders and
//! placeholders headed to a host their credential is not bound to, and tells the policy which
//! credentials the request carries. The substitute stage runs after the policy allowed the
//! request: it fetches the real secrets and swaps them in. Responses that echo a secret back
//! are redacted before the agent sees them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use base64::Engine as _;
use http::header::{HeaderValue, AUTHORIZATION};

use crate::error::{ErrorCode, Rejection};
use crate::parse::destination::{Binding, Destination};
use bytes::Bytes;

use crate::parse::redact::Needles;
use crate::parse::secret::{find_placeholders, Placeholder, SecretValue};
use crate::pipeline::timing::StepKind;
use crate::pipeline::{
    ask_uncompressed, content_encoding, Action, ActionKind, AfterResponse, BodyTransform,
    CannotRead, Chain, Context, Filter, Phase, RequestBody, TransformError,
};

/// One configured credential.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub placeholder: Placeholder,
    /// Destinations it may be substituted for (scheme, host pattern, port).
    pub hosts: Vec<Binding>,
    /// Also substitute inside JSON request bodies.
    pub body: bool,
}

impl Credential {
    pub fn bound_to(&self, dest: &Destination) -> bool {
        self.hosts.iter().any(|b| b.covers(dest))
    }
}

/// Where real secret values come from (env, file, Vault, OAuth), with its own caching.
/// Why a store produced no secret. Its message is safe to show the agent: it becomes the reason
/// of the 503 `credential_unavailable` (stores never put a value or a token in it).
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

#[async_trait::async_trait]
pub trait SecretStore: Send + Sync + std::fmt::Debug {
    /// The current secret of credential `name`, for the principal the request is made for
    /// (`on_behalf`, from a verified delegation token; a source that mints per-user tokens
    /// needs it, the others ignore it). The error is a reason safe to show the agent.
    async fn get(
        &self,
        name: &str,
        on_behalf: Option<&OnBehalf<'_>>,
    ) -> Result<Arc<SecretValue>, StoreError>;

    /// [`SecretStore::get`], also telling whether the value was served from a cache (no source
    /// asked) when the store can tell. Called instead of `get` only when the action's spans are
    /// exported (the `credential.fetch` child span).
    async fn get_traced(
        &self,
        name: &str,
        on_behalf: Option<&OnBehalf<'_>>,
    ) -> (Result<Arc<SecretValue>, StoreError>, Option<bool>) {
        (self.get(name, on_behalf).await, None)
    }

    /// Forget any cached value of credential `name`, so the next use fetches it again.
    /// Returns false for an unknown name.
    async fn revoke(&self, name: &str) -> bool;

    /// Whether credential `name` may be refreshed now because an upstream rejected it (at
    /// most once per its refresh interval). Taking the answer `true` claims the refresh.
    async fn claim_refresh(&self, _name: &str) -> bool {
        true
    }
}

/// Whom a request is made for, as a credential source needs it: the principal (a verified
/// delegation token) and the workload acting for it (the caller's SPIFFE ID).
#[derive(Debug, Clone, Copy)]
pub struct OnBehalf<'a> {
    pub delegation: &'a crate::parse::jwt::Verified,
    pub actor: &'a str,
    /// The caller's verified JWT-SVID, when it sent one.
    pub jwt_svid: Option<&'a crate::parse::jwt::JwtSvid>,
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

/// Header values (as bytes: a non-UTF-8 value is scanned too), with `Basic` credentials
/// decoded so placeholders inside count, and the query string.
fn scan_texts(req: &http::request::Parts) -> Vec<Vec<u8>> {
    let mut texts = Vec::new();
    for (name, value) in &req.headers {
        texts.push(value.as_bytes().to_vec());
        if name == AUTHORIZATION {
            if let Some(decoded) = decode_basic(value.as_bytes()) {
                texts.push(decoded);
            }
        }
    }
    if let Some(q) = req.uri.query() {
        texts.push(q.as_bytes().to_vec());
    }
    texts
}

/// The decoded credentials of a `Basic` value.
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

fn refuse(reason: String) -> Action {
    Action::Respond(Rejection::new(ErrorCode::CredentialNotAllowed, reason))
}

/// Detects placeholders; runs before the policy.
#[derive(Debug)]
pub struct CredentialDetect {
    pub set: Arc<CredentialSet>,
}

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

    fn request_now(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if ctx.kind == ActionKind::Connect {
            return Action::Continue;
        }
        let mut found: Vec<Placeholder> =
            scan_texts(req).iter().flat_map(find_placeholders).collect();
        let body_found: Vec<Placeholder> = match &ctx.body {
            RequestBody::Buffered(b) => find_placeholders(b),
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
            let dest = &ctx.destination;
            if !cred.bound_to(dest) {
                return refuse(format!(
                    "credential {} may not be sent to {}://{}",
                    cred.name,
                    dest.scheme,
                    dest.authority()
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
    set: Arc<CredentialSet>,
    store: Arc<dyn SecretStore>,
    /// The needles of the last substitution, reused while its secrets are the same.
    last_needles: Mutex<Option<LastNeedles>>,
}

/// Every form of some secrets, and which secrets: compared by identity (the store hands out
/// the same `Arc` until the secret rotates or is revoked), held weakly so a revoked secret
/// is not kept alive by this (its needles are zeroized when the next ones replace them).
#[derive(Debug)]
struct LastNeedles {
    secrets: Vec<Weak<SecretValue>>,
    needles: Arc<Needles>,
}

impl CredentialSubstitute {
    pub fn new(set: Arc<CredentialSet>, store: Arc<dyn SecretStore>) -> CredentialSubstitute {
        CredentialSubstitute {
            set,
            store,
            last_needles: Mutex::new(None),
        }
    }

    /// What the response is searched for: [`needles`], built once per set of secrets. A
    /// Basic token the proxy produced is part of them: not reused across requests.
    fn needles_for(&self, c: &crate::pipeline::CredentialUse) -> Arc<Needles> {
        if !c.produced.is_empty() {
            return Arc::new(needles(c));
        }
        let same = |last: &LastNeedles| {
            last.secrets.len() == c.secrets.len()
                && last
                    .secrets
                    .iter()
                    .zip(&c.secrets)
                    .all(|(weak, strong)| std::ptr::eq(weak.as_ptr(), Arc::as_ptr(strong)))
        };
        // A poisoned lock only loses the reuse.
        let Ok(mut last) = self.last_needles.lock() else {
            return Arc::new(needles(c));
        };
        match last.as_ref() {
            Some(l) if same(l) => l.needles.clone(),
            _ => {
                let needles = Arc::new(needles(c));
                *last = Some(LastNeedles {
                    secrets: c.secrets.iter().map(Arc::downgrade).collect(),
                    needles: needles.clone(),
                });
                needles
            }
        }
    }
}

/// How a secret is written where its placeholder was: as it is (a header), percent-encoded
/// (a query string: its bytes keep their meaning there), or JSON-escaped (a JSON body).
#[derive(Clone, Copy)]
enum Place {
    Header,
    Query,
    Json,
}

impl Place {
    fn encode(self, secret: &str) -> Vec<u8> {
        match self {
            Place::Header => secret.as_bytes().to_vec(),
            Place::Query => {
                let mut out = Vec::with_capacity(secret.len());
                for b in secret.bytes() {
                    match b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                        true => out.push(b),
                        false => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
                    }
                }
                out
            }
            // The quotes of the JSON string literal are dropped: the placeholder sits inside one.
            Place::Json => {
                let quoted = serde_json::to_string(secret).unwrap_or_default();
                quoted.as_bytes()[1..quoted.len().saturating_sub(1).max(1)].to_vec()
            }
        }
    }
}

/// `text` with every whole placeholder token of `pairs` replaced by its secret, written for
/// `place`; `None` when it holds none. Bytes in, bytes out: nothing else changes.
fn replace_all(
    text: &[u8],
    pairs: &[(Placeholder, Arc<SecretValue>)],
    place: Place,
) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for (p, s) in pairs {
        let current = out.as_deref().unwrap_or(text);
        if let Some(new) = replace_token(current, p.as_str().as_bytes(), &place.encode(s.expose()))
        {
            out = Some(new);
        }
    }
    out
}

/// Replace whole-token occurrences only (`pcx_ab` must not match inside `pcx_abc`); `None`
/// when there is none.
fn replace_token(text: &[u8], token: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let is_tok = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::with_capacity(text.len());
    let (mut i, mut replaced) = (0, false);
    while let Some(pos) = text[i..].windows(token.len()).position(|w| w == token) {
        let start = i + pos;
        let end = start + token.len();
        let before_ok = start == 0 || !is_tok(text[start - 1]);
        let after_ok = end == text.len() || !is_tok(text[end]);
        out.extend_from_slice(&text[i..start]);
        match before_ok && after_ok {
            true => {
                out.extend_from_slice(with);
                replaced = true;
            }
            false => out.extend_from_slice(token),
        }
        i = end;
    }
    out.extend_from_slice(&text[i..]);
    replaced.then_some(out)
}

impl Filter for CredentialSubstitute {
    fn name(&self) -> &'static str {
        "credential_substitute"
    }

    fn request<'a>(
        &'a self,
        ctx: &'a mut Context,
        req: &'a mut http::request::Parts,
    ) -> Phase<'a, Action> {
        if ctx.credentials.names.is_empty() {
            return Phase::Done(Action::Continue);
        }
        if is_idempotent(&req.method) {
            ctx.credentials.before_substitution = Some((req.clone(), ctx.body.clone()));
        }
        Phase::wait(self.substitute(ctx, req))
    }

    /// Echoes of the substituted secrets in response headers (every form, at byte level).
    fn response(&self, ctx: &mut Context, resp: &mut http::response::Parts) {
        let Some(needles) = ctx.credentials.needles.as_deref() else {
            return;
        };
        if needles.is_empty() {
            return;
        }
        for value in resp.headers.values_mut() {
            redact_header(needles, value);
        }
    }

    /// One refresh and one retry when the upstream rejects a substituted credential, for
    /// idempotent requests whose body the proxy still has: the cached secrets are dropped
    /// (everywhere, so no replica reuses them), fresh ones fetched and substituted into the
    /// request as it was before the first substitution.
    fn after_response<'a>(
        &'a self,
        ctx: &'a mut Context,
        resp: &'a http::response::Parts,
    ) -> Phase<'a, AfterResponse> {
        if resp.status != http::StatusCode::UNAUTHORIZED {
            return Phase::Done(AfterResponse::Deliver);
        }
        let Some((mut req, body)) = ctx.credentials.before_substitution.take() else {
            return Phase::Done(AfterResponse::Deliver);
        };
        if !body.replayable() {
            return Phase::Done(AfterResponse::Deliver);
        }
        Phase::wait(async move {
            // One refresh per credential per interval, however many requests come back 401.
            for name in &ctx.credentials.names {
                if !self.store.claim_refresh(name).await {
                    tracing::info!(credential = %name, "upstream answered 401; refreshed recently: not refreshing again yet");
                    return AfterResponse::Deliver;
                }
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
        })
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
        let redactor = Redactor::new(ctx.credentials.needles.clone()?)?;
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
            let on_behalf = ctx.delegation.as_deref().map(|delegation| OnBehalf {
                delegation,
                actor: ctx.peer.spiffe_id.as_str(),
                jwt_svid: ctx.jwt_svid.as_deref(),
            });
            let on_behalf = on_behalf.as_ref();
            let (got, cache_hit) = match start {
                Some(_) => self.store.get_traced(&cred.name, on_behalf).await,
                None => (self.store.get(&cred.name, on_behalf).await, None),
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
        let mut produced = Vec::new();
        for (name, value) in req.headers.iter_mut() {
            let text = value.as_bytes();
            let mut new = replace_all(text, &pairs, Place::Header);
            if name == AUTHORIZATION {
                if let Some(swapped) = decode_basic(text)
                    .and_then(|decoded| replace_all(&decoded, &pairs, Place::Header))
                {
                    let token = base64::engine::general_purpose::STANDARD.encode(swapped);
                    new = Some(format!("Basic {token}").into_bytes());
                    // Redacted whole if it comes back.
                    produced.push(Arc::new(SecretValue::new(token)));
                }
            }
            let Some(new) = new else { continue };
            match HeaderValue::from_bytes(&new) {
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
        if let Some(new_q) = req
            .uri
            .query()
            .and_then(|q| replace_all(q.as_bytes(), &pairs, Place::Query))
        {
            let mut pq = req.uri.path().as_bytes().to_vec();
            pq.push(b'?');
            pq.extend_from_slice(&new_q);
            let mut parts = req.uri.clone().into_parts();
            match http::uri::PathAndQuery::try_from(pq) {
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
        if let RequestBody::Buffered(b) = &ctx.body {
            let body_pairs: Vec<_> = pairs
                .iter()
                .filter(|(p, _)| self.set.by_placeholder.get(p).is_some_and(|c| c.body))
                .cloned()
                .collect();
            if let Some(new) = replace_all(b, &body_pairs, Place::Json) {
                ctx.body = RequestBody::Buffered(bytes::Bytes::from(new));
            }
        }
        ctx.credentials.produced = produced;
        ctx.credentials.secrets = pairs.into_iter().map(|(_, s)| s).collect();
        // Every form to look for on the way back.
        ctx.credentials.needles = Some(self.needles_for(&ctx.credentials));
        Action::Continue
    }
}

/// Every form of the secrets this action substituted, and the encodings the proxy produced.
fn needles(c: &crate::pipeline::CredentialUse) -> Needles {
    Needles::new(
        c.secrets.iter().map(|s| s.expose().as_bytes()),
        c.produced.iter().map(|s| s.expose().as_bytes()),
    )
}

/// A header value with every echo of a secret replaced (bytes: non-UTF-8 values too).
fn redact_header(needles: &Needles, value: &mut HeaderValue) {
    let (out, _) = needles.redact(value.as_bytes(), true);
    if out != value.as_bytes() {
        // The redacted value is made of the original's bytes and ASCII: always valid.
        if let Ok(v) = HeaderValue::from_bytes(&out) {
            *value = v;
        }
    }
}

/// Streaming redaction of secrets in a response body (every form, see
/// [`crate::parse::redact`]), across chunk boundaries, holding back only a tail that could
/// still become a match (so an SSE event is not delayed unless its tail really looks like
/// one). Trailers are redacted too.
#[derive(Debug)]
pub struct Redactor {
    needles: Arc<Needles>,
    carry: Vec<u8>,
}

impl Redactor {
    pub fn new(needles: Arc<Needles>) -> Option<Redactor> {
        (!needles.is_empty()).then_some(Redactor {
            needles,
            carry: Vec::new(),
        })
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let (mut out, held) = self.needles.redact(&buf, false);
        self.carry = out.split_off(out.len() - held);
        out
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        self.needles.redact(&carry, true).0
    }
}

impl BodyTransform for Redactor {
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
        Ok(Bytes::from(self.push(&chunk)))
    }

    fn end(&mut self) -> Result<Bytes, TransformError> {
        Ok(Bytes::from(self.finish()))
    }

    fn trailers(&mut self, trailers: &mut http::HeaderMap) {
        for value in trailers.values_mut() {
            redact_header(&self.needles, value);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Arc<SecretValue> {
        Arc::new(SecretValue::new(s.into()))
    }

    #[derive(Debug)]
    struct NoStore;

    #[async_trait::async_trait]
    impl SecretStore for NoStore {
        async fn get(
            &self,
            _: &str,
            _: Option<&OnBehalf<'_>>,
        ) -> Result<Arc<SecretValue>, StoreError> {
            Err("none".into())
        }
        async fn revoke(&self, _: &str) -> bool {
            false
        }
    }

    #[test]
    fn needles_are_reused_for_the_same_secrets_only() {
        let sub =
            CredentialSubstitute::new(Arc::new(CredentialSet::new(vec![])), Arc::new(NoStore));
        let use_of = |secrets: &[&Arc<SecretValue>], produced: &[&Arc<SecretValue>]| {
            crate::pipeline::CredentialUse {
                secrets: secrets.iter().map(|s| (*s).clone()).collect(),
                produced: produced.iter().map(|s| (*s).clone()).collect(),
                ..Default::default()
            }
        };
        let (old, rotated) = (secret("old-secret-value"), secret("new-secret-value"));
        let first = sub.needles_for(&use_of(&[&old], &[]));
        let again = sub.needles_for(&use_of(&[&old], &[]));
        assert!(Arc::ptr_eq(&first, &again), "same secret: built once");

        // A rotated secret (another Arc, even of an equal value) gets needles of its own.
        let new = sub.needles_for(&use_of(&[&rotated], &[]));
        assert!(!Arc::ptr_eq(&first, &new));
        assert!(new.found_in(b"x new-secret-value x") && !new.found_in(b"old-secret-value"));
        let both = sub.needles_for(&use_of(&[&rotated, &old], &[]));
        assert!(both.found_in(b"old-secret-value") && both.found_in(b"new-secret-value"));

        // A produced Basic token is never taken from (or left in) the reuse.
        let token = secret("produced-token-0123456789");
        let with_token = sub.needles_for(&use_of(&[&rotated], &[&token]));
        assert!(with_token.found_in(token.expose().as_bytes()));
        let after = sub.needles_for(&use_of(&[&rotated], &[]));
        assert!(!after.found_in(token.expose().as_bytes()));

        // A secret dropped everywhere (revoked) is not kept alive by the reuse.
        let weak = Arc::downgrade(&rotated);
        drop((rotated, both, new, with_token, after));
        assert_eq!(weak.strong_count(), 0);
    }

    #[test]
    fn whole_tokens_only() {
        let swap =
            |t: &[u8]| replace_token(t, b"pcx_ab", b"S").map(|v| String::from_utf8(v).unwrap());
        assert_eq!(swap(b"a pcx_ab pcx_abc").as_deref(), Some("a S pcx_abc"));
        assert_eq!(swap(b"pcx_ab").as_deref(), Some("S"));
        assert_eq!(swap(b"pcx_abc"), None);
    }

    #[test]
    fn substitution_keeps_every_other_byte_and_encodes_for_its_place() {
        let pairs = vec![(Placeholder::parse("pcx_k").unwrap(), secret("a\"b&c d"))];
        let body = b"\xff\xfe{\"t\":\"pcx_k\"}\x80";
        let out = replace_all(body, &pairs, Place::Json).unwrap();
        assert_eq!(out, b"\xff\xfe{\"t\":\"a\\\"b&c d\"}\x80");
        let q = replace_all(b"x=1&key=pcx_k", &pairs, Place::Query).unwrap();
        assert_eq!(q, b"x=1&key=a%22b%26c%20d");
        assert_eq!(replace_all(b"no placeholder", &pairs, Place::Header), None);
    }

    #[test]
    fn basic_auth_is_decoded() {
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:pcx_gh")
        );
        assert_eq!(
            decode_basic(v.as_bytes()).as_deref(),
            Some(&b"user:pcx_gh"[..])
        );
        assert_eq!(decode_basic(b"Bearer x"), None);
    }

    #[test]
    fn redactor_works_across_chunks_and_holds_back_only_possible_prefixes() {
        let needles = Needles::new([&b"s3cr3t-value"[..]], []);
        let mut r = Redactor::new(Arc::new(needles)).unwrap();
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
            hosts: ["api.github.com", "*.githubusercontent.com"]
                .iter()
                .map(|b| Binding::parse(b).unwrap())
                .collect(),
            body: false,
        };
        let https = |h: &str| Destination {
            host: crate::parse::destination::Host::parse(h).unwrap(),
            port: 443,
            scheme: crate::parse::destination::Scheme::Https,
        };
        assert!(c.bound_to(&https("api.github.com")));
        assert!(c.bound_to(&https("raw.githubusercontent.com")));
        assert!(!c.bound_to(&https("githubusercontent.com")));
        assert!(!c.bound_to(&https("evil.com")));
        let clear = Destination {
            scheme: crate::parse::destination::Scheme::Http,
            port: 80,
            ..https("api.github.com")
        };
        assert!(!c.bound_to(&clear), "never in cleartext unless bound so");
    }
}
