//! Approvals: a deny a human may lift. A decision with `approval: {reason, ttl, scope, uses}`
//! opens (or finds) the approval record of this exact action — identity and fingerprint —
//! and refuses with `approval_required` (naming the record) until an approver grants it; with
//! `approvals.hold`, the request waits for the decision instead (bounded). The policy then
//! decides again with `input.approval` set (state, id, who decided), so Rego says what a grant
//! allows, and a grant's use is taken atomically from the store.
//!
//! Records live in an [`ApprovalStore`]: this process ([`MemoryApprovals`]) or Redis (the
//! proxy's, shared by replicas).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_policy::{ApprovalAsk, ApprovalScope, Input};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    Pending,
    Granted,
    Denied,
    /// Undecided within `approvals.pending_ttl`, or a decision past its TTL or uses.
    Expired,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Granted => "granted",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<ApprovalState> {
        Some(match s {
            "pending" => ApprovalState::Pending,
            "granted" => ApprovalState::Granted,
            "denied" => ApprovalState::Denied,
            "expired" => ApprovalState::Expired,
            _ => return None,
        })
    }
}

/// One approval record, as stored, listed by the admin API and shown in the console.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub id: String,
    pub state: ApprovalState,
    /// The caller's SPIFFE ID.
    pub identity: String,
    /// The principal it acts for (delegation), when known.
    pub subject: Option<String>,
    /// SHA-256 (hex) of what a grant covers (identity, scope and action).
    pub fingerprint: String,
    pub scope: String,
    /// Calls a grant allows (left, once granted); `None`: any number within its TTL.
    pub uses: Option<u32>,
    /// What is asked: kind, method, destination, path, and for MCP the tool and its arguments
    /// (values under secret-looking keys redacted, large ones elided).
    pub action: Value,
    pub reason: String,
    pub policy_revision: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: u64,
    /// How long a decision holds (the policy's `ttl`).
    pub ttl_ms: u64,
    pub decided_by: Option<String>,
    pub decided_at_ms: Option<u64>,
    pub trace_id: String,
}

impl ApprovalRecord {
    /// The record as the admin API shows it: RFC 3339 times besides the milliseconds.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("created".into(), rfc3339(self.created_ms).into());
            o.insert("expires".into(), rfc3339(self.expires_ms).into());
            o.insert(
                "decided_at".into(),
                self.decided_at_ms
                    .map(rfc3339)
                    .map_or(Value::Null, Value::from),
            );
        }
        v
    }

    /// `input.approval` when the policy decides again.
    pub fn policy_input(&self) -> Value {
        json!({
            "id": self.id,
            "state": self.state.as_str(),
            "decided_by": self.decided_by,
            "decided_at": self.decided_at_ms.map(rfc3339),
            "scope": self.scope,
            "uses_left": self.uses,
            "expires": rfc3339(self.expires_ms),
        })
    }

    /// Whether the record no longer covers its call at `now_ms`: past its expiry, or a grant
    /// with no use left (which stays `granted`, with `uses: 0`, until it expires).
    pub fn is_over(&self, now_ms: u64) -> bool {
        self.is_expired(now_ms) || (self.state == ApprovalState::Granted && self.uses == Some(0))
    }

    /// Whether its time is up (or it was already marked expired).
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms || self.state == ApprovalState::Expired
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of milliseconds since the epoch.
pub fn rfc3339(ms: u64) -> String {
    portcullis_policy::TimeInfo::at(i64::try_from(ms / 1000).unwrap_or(i64::MAX)).rfc3339
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    crate::stages::quota::unix_micros() / 1000
}

/// A store call that failed: the action is refused (`approval_unavailable`), never allowed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Why an approver's decision was not recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecideError {
    #[error("no approval {0}")]
    NotFound(String),
    #[error("approval {0} is {1}, not pending")]
    NotPending(String, &'static str),
    #[error("store: {0}")]
    Store(String),
}

/// A change of a record, announced to held requests and the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub id: String,
    pub state: ApprovalState,
}

/// Where approval records live.
#[async_trait::async_trait]
pub trait ApprovalStore: Send + Sync + fmt::Debug + 'static {
    /// The live record with `new.fingerprint`, or `new` stored as pending (`true`: created).
    async fn find_or_open(&self, new: ApprovalRecord)
        -> Result<(ApprovalRecord, bool), StoreError>;
    /// Take one use of the granted record `id`; `false` when it is no longer granted, has no
    /// use left or is past its TTL.
    async fn consume(&self, id: &str) -> Result<bool, StoreError>;
    /// Record an approver's decision of a pending record.
    async fn decide(&self, id: &str, grant: bool, by: &str) -> Result<ApprovalRecord, DecideError>;
    async fn get(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError>;
    /// The newest records first (at most `limit`).
    async fn list(&self, limit: usize) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// Changes as they happen (on every replica, with Redis).
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
}

/// Records in this process. Pending records are bounded (`max_pending`, then new asks are
/// refused as `overloaded`); finished ones are kept for listing up to `keep_finished`.
pub struct MemoryApprovals {
    state: Mutex<Records>,
    max_pending: usize,
    keep_finished: usize,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    changes: tokio::sync::broadcast::Sender<Change>,
}

#[derive(Default)]
struct Records {
    by_id: HashMap<String, ApprovalRecord>,
    /// fingerprint → id of the live record.
    live: HashMap<String, String>,
}

impl fmt::Debug for MemoryApprovals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryApprovals").finish_non_exhaustive()
    }
}

impl MemoryApprovals {
    pub fn new(max_pending: usize) -> MemoryApprovals {
        MemoryApprovals::with_clock(max_pending, unix_millis)
    }

    /// With an injected clock (milliseconds since the epoch), for tests.
    pub fn with_clock(
        max_pending: usize,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> MemoryApprovals {
        MemoryApprovals {
            state: Mutex::new(Records::default()),
            max_pending,
            keep_finished: 1000,
            clock: Box::new(clock),
            changes: tokio::sync::broadcast::channel(1024).0,
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark what is over as expired (unindexed, kept for listing), and drop the oldest
    /// finished records beyond `keep_finished`.
    fn sweep(&self, r: &mut Records, now: u64) {
        let mut expired = Vec::new();
        for rec in r.by_id.values_mut() {
            if rec.state != ApprovalState::Expired && rec.is_expired(now) {
                rec.state = ApprovalState::Expired;
                expired.push(rec.id.clone());
            }
        }
        r.live
            .retain(|_, id| r.by_id.get(id).is_some_and(|rec| !rec.is_over(now)));
        for id in expired {
            let _ = self.changes.send(Change {
                id,
                state: ApprovalState::Expired,
            });
        }
        let finished = r
            .by_id
            .values()
            .filter(|rec| rec.state != ApprovalState::Pending)
            .count();
        if finished > self.keep_finished {
            let mut old: Vec<(u64, String)> = r
                .by_id
                .values()
                .filter(|rec| rec.state == ApprovalState::Expired)
                .map(|rec| (rec.created_ms, rec.id.clone()))
                .collect();
            old.sort();
            for (_, id) in old.into_iter().take(finished - self.keep_finished) {
                r.by_id.remove(&id);
            }
        }
    }
}

#[async_trait::async_trait]
impl ApprovalStore for MemoryApprovals {
    async fn find_or_open(
        &self,
        new: ApprovalRecord,
    ) -> Result<(ApprovalRecord, bool), StoreError> {
        let now = (self.clock)();
        let mut r = self.records();
        self.sweep(&mut r, now);
        if let Some(rec) = r.live.get(&new.fingerprint).and_then(|id| r.by_id.get(id)) {
            return Ok((rec.clone(), false));
        }
        let pending = r
            .by_id
            .values()
            .filter(|rec| rec.state == ApprovalState::Pending)
            .count();
        if pending >= self.max_pending {
            return Err(StoreError(format!(
                "{pending} approvals are pending (approvals.max_pending)"
            )));
        }
        r.live.insert(new.fingerprint.clone(), new.id.clone());
        r.by_id.insert(new.id.clone(), new.clone());
        let _ = self.changes.send(Change {
            id: new.id.clone(),
            state: new.state,
        });
        Ok((new, true))
    }

    async fn consume(&self, id: &str) -> Result<bool, StoreError> {
        let now = (self.clock)();
        let mut r = self.records();
        let Some(rec) = r.by_id.get_mut(id) else {
            return Ok(false);
        };
        if rec.state != ApprovalState::Granted || rec.is_over(now) {
            return Ok(false);
        }
        if let Some(n) = &mut rec.uses {
            *n -= 1;
        }
        if rec.is_over(now) {
            // Used up: the next ask opens a new record.
            let fp = rec.fingerprint.clone();
            r.live.remove(&fp);
            let _ = self.changes.send(Change {
                id: id.to_owned(),
                state: ApprovalState::Granted,
            });
        }
        Ok(true)
    }

    async fn decide(&self, id: &str, grant: bool, by: &str) -> Result<ApprovalRecord, DecideError> {
        let now = (self.clock)();
        let mut r = self.records();
        self.sweep(&mut r, now);
        let Some(rec) = r.by_id.get_mut(id) else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        if rec.state != ApprovalState::Pending {
            return Err(DecideError::NotPending(id.to_owned(), rec.state.as_str()));
        }
        decided(rec, grant, by, now);
        let rec = rec.clone();
        let _ = self.changes.send(Change {
            id: rec.id.clone(),
            state: rec.state,
        });
        Ok(rec)
    }

    async fn get(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let now = (self.clock)();
        let mut r = self.records();
        self.sweep(&mut r, now);
        Ok(r.by_id.get(id).cloned())
    }

    async fn list(&self, limit: usize) -> Result<Vec<ApprovalRecord>, StoreError> {
        let now = (self.clock)();
        let mut r = self.records();
        self.sweep(&mut r, now);
        let mut all: Vec<ApprovalRecord> = r.by_id.values().cloned().collect();
        all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        all.truncate(limit);
        Ok(all)
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// Apply an approver's decision at `now` (ms): the decision holds for the record's TTL.
pub fn decided(rec: &mut ApprovalRecord, grant: bool, by: &str, now: u64) {
    rec.state = match grant {
        true => ApprovalState::Granted,
        false => ApprovalState::Denied,
    };
    rec.decided_by = Some(by.to_owned());
    rec.decided_at_ms = Some(now);
    rec.expires_ms = now.saturating_add(rec.ttl_ms);
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ApprovalStats {
    pub opened: AtomicU64,
    /// Approved calls that went through (a grant's use taken).
    pub used: AtomicU64,
    pub refused_pending: AtomicU64,
    pub refused_denied: AtomicU64,
    pub store_errors: AtomicU64,
    pub held_now: AtomicUsize,
    pub held_refused: AtomicU64,
}

/// Announces a new pending record (the webhook).
pub type Announce = Box<dyn Fn(&ApprovalRecord) + Send + Sync>;

/// What the policy stage needs to run approvals (`approvals:` in the config).
pub struct Approvals {
    pub store: Arc<dyn ApprovalStore>,
    /// How long a request waits for a decision (0: not at all).
    pub hold: Duration,
    /// At most this many requests wait at once; the others are refused at once.
    pub max_held: usize,
    /// `Retry-After` of an `approval_required` refusal.
    pub retry_after: Duration,
    /// How long a pending record waits for an approver.
    pub pending_ttl: Duration,
    pub stats: Arc<ApprovalStats>,
    /// Called once per new pending record (the webhook).
    pub on_open: Option<Announce>,
}

impl fmt::Debug for Approvals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Approvals")
            .field("store", &self.store)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

/// Keys whose values the console and the admin API do not show.
const SECRET_KEYS: [&str; 9] = [
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "credential",
    "private_key",
];

/// Largest arguments shown whole (serialized bytes); larger ones are summarized.
const MAX_SHOWN_ARGUMENTS: usize = 16 * 1024;

/// `value` with the values of secret-looking keys replaced by `"[REDACTED]"`.
pub fn redact_arguments(value: &Value) -> Value {
    match value {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let secret = SECRET_KEYS.iter().any(|s| lower.contains(s));
                    let v = match secret {
                        true => Value::from("[REDACTED]"),
                        false => redact_arguments(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact_arguments).collect()),
        other => other.clone(),
    }
}

/// The fingerprint of what a grant covers, and the action as the approver sees it.
pub fn fingerprint(input: &Input, scope: ApprovalScope) -> (String, Value) {
    let mut h = Sha256::new();
    let mut part = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    part(scope.as_str());
    part(&input.identity.spiffe_id);
    // Acting for another principal is another identity: its grant is not theirs.
    part(subject(input).unwrap_or(""));
    let kind = match input.kind {
        portcullis_policy::Kind::Connect => "connect",
        portcullis_policy::Kind::Http => "http",
        portcullis_policy::Kind::Mcp => "mcp",
    };
    part(kind);
    let d = &input.destination;
    let destination = format!("{}:{}", d.host, d.port);
    part(&d.scheme);
    part(&destination);
    let mut action = json!({"kind": kind, "destination": destination});
    if let Some(r) = &input.request {
        part(&r.method);
        action["method"] = r.method.clone().into();
        action["path"] = r.normalized_path.clone().into();
        if scope == ApprovalScope::Call {
            part(&r.normalized_path);
            for key in r.query.keys() {
                part(key);
            }
        }
    }
    if let Some(m) = &input.mcp {
        let text = |k: &str| m.get(k).and_then(Value::as_str);
        for k in ["method", "tool", "prompt", "uri"] {
            part(text(k).unwrap_or(""));
            if let Some(v) = text(k) {
                action[if k == "method" { "mcp_method" } else { k }] = v.into();
            }
        }
        match scope {
            ApprovalScope::Session => part(text("session_id").unwrap_or("")),
            ApprovalScope::Call => {
                let args = m.get("arguments").unwrap_or(&Value::Null);
                // serde_json's maps are sorted: this is the canonical form.
                let canonical = args.to_string();
                part(&canonical);
                action["arguments"] = match canonical.len() > MAX_SHOWN_ARGUMENTS {
                    true => format!("({} bytes, not shown)", canonical.len()).into(),
                    false => redact_arguments(args),
                };
            }
        }
    }
    (crate::pipeline::hex(&h.finalize()), action)
}

/// The delegation subject the action is taken for, if any.
fn subject(input: &Input) -> Option<&str> {
    input.delegation.as_ref()?.get("subject")?.as_str()
}

/// A fresh record id: `apr_` and 96 random bits.
pub fn new_id() -> String {
    format!("apr_{}", crate::pipeline::hex(&rand::random::<[u8; 12]>()))
}

impl Approvals {
    /// The pending record this ask opens, at `now_ms`. `body`: the SHA-256 of a plain HTTP
    /// request's body, which a call-scoped grant covers too (an approved `POST /pay` is that
    /// payment, not any other); MCP messages are covered by their canonical arguments.
    pub fn record(
        &self,
        input: &Input,
        ask: &ApprovalAsk,
        revision: &str,
        trace_id: String,
        now_ms: u64,
        body: Option<&[u8]>,
    ) -> ApprovalRecord {
        let (mut fingerprint, mut action) = fingerprint(input, ask.scope);
        if let (Some(body), ApprovalScope::Call) = (body, ask.scope) {
            let mut h = Sha256::new();
            h.update(fingerprint.as_bytes());
            h.update(body);
            fingerprint = crate::pipeline::hex(&h.finalize());
            action["body_sha256"] = crate::pipeline::hex(body).into();
        }
        ApprovalRecord {
            id: new_id(),
            state: ApprovalState::Pending,
            identity: input.identity.spiffe_id.clone(),
            subject: subject(input).map(str::to_owned),
            fingerprint,
            scope: ask.scope.as_str().to_owned(),
            uses: ask.uses,
            action,
            reason: ask.reason.clone(),
            policy_revision: revision.to_owned(),
            created_ms: now_ms,
            expires_ms: now_ms
                .saturating_add(u64::try_from(self.pending_ttl.as_millis()).unwrap_or(u64::MAX)),
            ttl_ms: u64::try_from(ask.ttl.as_millis()).unwrap_or(u64::MAX),
            decided_by: None,
            decided_at_ms: None,
            trace_id,
        }
    }

    /// Wait (bounded by `hold` and `max_held`) until `rec` is decided; returns it as it is
    /// then (still pending when nobody decided in time).
    pub async fn hold(&self, rec: ApprovalRecord) -> Result<ApprovalRecord, StoreError> {
        if self.hold.is_zero() {
            return Ok(rec);
        }
        let held = self.stats.held_now.fetch_add(1, Ordering::Relaxed);
        let _release = Release(&self.stats.held_now);
        if held >= self.max_held {
            self.stats.held_refused.fetch_add(1, Ordering::Relaxed);
            return Ok(rec);
        }
        let mut changes = self.store.changes();
        let deadline = tokio::time::Instant::now() + self.hold;
        // A change may have happened before we subscribed: look once after subscribing, then
        // on every change of this id, and every second in case an announcement was lost.
        loop {
            if let Some(now) = self.store.get(&rec.id).await? {
                if now.state != ApprovalState::Pending {
                    return Ok(now);
                }
            }
            let tick = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            loop {
                match tokio::time::timeout_at(tick, changes.recv()).await {
                    Ok(Ok(c)) if c.id != rec.id => continue,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        tokio::time::sleep_until(tick).await;
                    }
                    _ => {}
                }
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(self.store.get(&rec.id).await?.unwrap_or(rec));
            }
        }
    }
}

struct Release<'a>(&'a AtomicUsize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn input(args: Value) -> Input {
        let mut i: Input = serde_json::from_value(json!({
            "kind": "mcp",
            "identity": {"spiffe_id": "spiffe://a.test/agent", "trust_domain": "a.test",
                         "path": "/agent", "segments": ["agent"]},
            "destination": {"host": "mcp.test", "port": 443, "scheme": "https"},
            "request": {"method": "POST", "path": "/mcp", "normalized_path": "/mcp",
                        "query": {}, "headers": {}},
            "time": {"unix": 0, "rfc3339": "", "weekday": "Mon", "hour_utc": 0},
        }))
        .unwrap();
        i.mcp = Some(
            json!({"method": "tools/call", "tool": "pay", "arguments": args,
                            "session_id": "s1"}),
        );
        i
    }

    fn approvals(store: Arc<dyn ApprovalStore>) -> Approvals {
        Approvals {
            store,
            hold: Duration::ZERO,
            max_held: 4,
            retry_after: Duration::from_secs(30),
            pending_ttl: Duration::from_secs(3600),
            stats: Default::default(),
            on_open: None,
        }
    }

    fn ask(scope: ApprovalScope, uses: Option<u32>) -> ApprovalAsk {
        ApprovalAsk {
            reason: "pay".into(),
            ttl: Duration::from_secs(60),
            scope,
            uses,
        }
    }

    #[test]
    fn fingerprints_cover_identity_and_canonical_arguments() {
        let call = |args: Value| fingerprint(&input(args), ApprovalScope::Call).0;
        let a = call(json!({"amount": 5, "to": "bob"}));
        assert_eq!(a, call(json!({"to": "bob", "amount": 5})), "key order");
        assert_ne!(a, call(json!({"amount": 6, "to": "bob"})));
        let mut other = input(json!({"amount": 5, "to": "bob"}));
        other.identity.spiffe_id = "spiffe://a.test/other".into();
        assert_ne!(a, fingerprint(&other, ApprovalScope::Call).0);
        // A session grant covers any arguments, not another session.
        let session = |args: Value, s: &str| {
            let mut i = input(args);
            i.mcp.as_mut().unwrap()["session_id"] = s.into();
            fingerprint(&i, ApprovalScope::Session).0
        };
        assert_eq!(session(json!(1), "s1"), session(json!(2), "s1"));
        assert_ne!(session(json!(1), "s1"), session(json!(1), "s2"));
        assert_ne!(session(json!(1), "s1"), call(json!(1)));
    }

    #[test]
    fn shown_arguments_hide_secret_looking_keys() {
        let (_, action) = fingerprint(
            &input(json!({"to": "bob", "api_key": "k", "nested": {"Password": "p"}})),
            ApprovalScope::Call,
        );
        assert_eq!(
            action["arguments"],
            json!({"to": "bob", "api_key": "[REDACTED]", "nested": {"Password": "[REDACTED]"}})
        );
        assert_eq!(action["tool"], "pay");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599_000), "2025-12-31T23:59:59Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[tokio::test]
    async fn lifecycle_with_an_injected_clock() {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let n = now.clone();
        let store = Arc::new(MemoryApprovals::with_clock(2, move || {
            n.load(Ordering::Relaxed)
        }));
        let a = approvals(store.clone());
        let i = input(json!({"amount": 5}));
        let rec = a.record(
            &i,
            &ask(ApprovalScope::Call, Some(1)),
            "r1",
            "t".into(),
            1_000_000,
            None,
        );
        let (first, created) = store.find_or_open(rec.clone()).await.unwrap();
        assert!(created);
        // The same call finds the same record.
        let again = a.record(
            &i,
            &ask(ApprovalScope::Call, Some(1)),
            "r1",
            "t".into(),
            1_000_000,
            None,
        );
        let (same, created) = store.find_or_open(again).await.unwrap();
        assert!(!created);
        assert_eq!(same.id, first.id);
        assert!(
            !store.consume(&first.id).await.unwrap(),
            "pending is no grant"
        );
        let granted = store.decide(&first.id, true, "alice").await.unwrap();
        assert_eq!(granted.state, ApprovalState::Granted);
        assert_eq!(granted.expires_ms, 1_000_000 + 60_000);
        assert!(matches!(
            store.decide(&first.id, false, "bob").await,
            Err(DecideError::NotPending(..))
        ));
        assert!(store.consume(&first.id).await.unwrap());
        assert!(!store.consume(&first.id).await.unwrap(), "single use");
        // Used up: the next ask opens a new record.
        let third = a.record(
            &i,
            &ask(ApprovalScope::Call, Some(1)),
            "r1",
            "t".into(),
            1_000_000,
            None,
        );
        let (fresh, created) = store.find_or_open(third).await.unwrap();
        assert!(created);
        assert_ne!(fresh.id, first.id);
        // Denials hold for their TTL, then expire.
        store.decide(&fresh.id, false, "bob").await.unwrap();
        let (denied, _) = store
            .find_or_open(a.record(
                &i,
                &ask(ApprovalScope::Call, Some(1)),
                "r1",
                "t".into(),
                0,
                None,
            ))
            .await
            .unwrap();
        assert_eq!(
            (denied.id.as_str(), denied.state),
            (fresh.id.as_str(), ApprovalState::Denied)
        );
        now.fetch_add(60_000, Ordering::Relaxed);
        assert_eq!(
            store.get(&fresh.id).await.unwrap().unwrap().state,
            ApprovalState::Expired
        );
    }

    #[tokio::test]
    async fn pending_records_are_bounded_and_expire() {
        let now = Arc::new(AtomicU64::new(0));
        let n = now.clone();
        let store = Arc::new(MemoryApprovals::with_clock(2, move || {
            n.load(Ordering::Relaxed)
        }));
        let a = approvals(store.clone());
        for amount in 0..2 {
            let rec = a.record(
                &input(json!(amount)),
                &ask(ApprovalScope::Call, Some(1)),
                "r",
                "t".into(),
                0,
                None,
            );
            store.find_or_open(rec).await.unwrap();
        }
        let third = a.record(
            &input(json!(9)),
            &ask(ApprovalScope::Call, Some(1)),
            "r",
            "t".into(),
            0,
            None,
        );
        assert!(store.find_or_open(third.clone()).await.is_err());
        now.store(3_600_000, Ordering::Relaxed);
        let mut third = third;
        third.expires_ms = 7_200_000;
        assert!(
            store.find_or_open(third).await.is_ok(),
            "expired ones made room"
        );
        let states: Vec<_> = store
            .list(10)
            .await
            .unwrap()
            .iter()
            .map(|r| r.state)
            .collect();
        assert_eq!(
            states
                .iter()
                .filter(|s| **s == ApprovalState::Expired)
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn a_held_request_wakes_on_the_decision() {
        let store = Arc::new(MemoryApprovals::new(10));
        let mut a = approvals(store.clone());
        a.hold = Duration::from_secs(30);
        let rec = a.record(
            &input(json!(1)),
            &ask(ApprovalScope::Call, Some(1)),
            "r",
            "t".into(),
            unix_millis(),
            None,
        );
        let (rec, _) = store.find_or_open(rec).await.unwrap();
        let id = rec.id.clone();
        let waiter = tokio::spawn(async move { a.hold(rec).await });
        // Decide once the waiter holds (it counts itself before it subscribes).
        let decider = store.clone();
        tokio::spawn(async move {
            decider.decide(&id, true, "alice").await.unwrap();
        });
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.state, ApprovalState::Granted);
        assert_eq!(got.decided_by.as_deref(), Some("alice"));
    }
}
