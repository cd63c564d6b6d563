//! The soak's open-loop load: request `n` is due at `start + n / rate` whatever happened to
//! the ones before it, with at most `inflight` running at once. A request that cannot start
//! within [`LATE_AFTER`] of its due time (every slot busy, or the scheduler itself behind)
//! counts as late, and its latency is counted from its due time (coordinated omission).
//! Requests share a small pool of keep-alive connections through the proxy, each retired
//! after a fixed number of requests so connection set-up and teardown run all along. Every
//! response is checked.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{Dialer, Sender};
use crate::scenario::Route;
use crate::setup::{BENCH_PLACEHOLDER, OAUTH_PLACEHOLDER};
use crate::upstream::{MCP_TOOLS, SMALL_BODY};

/// A request starting later than this after its due time is late (tokio's timer has 1 ms
/// granularity; the machine is shared).
pub const LATE_AFTER: Duration = Duration::from_millis(10);
/// Distinct error messages kept for the report (each with its count).
const KEEP_ERRORS: usize = 8;

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rate: f64,
    pub inflight: usize,
    /// Idle keep-alive connections kept for reuse.
    pub connections: usize,
    /// Requests per connection before it is closed and a new one opened.
    pub requests_per_connection: u32,
    pub request_timeout: Duration,
}

/// What each request of the mix is; chosen by its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// GET /cred with the file credential's placeholder: substituted, checked by the upstream.
    FileCredential,
    /// GET /cred with the OAuth credential's placeholder: a token cached through Redis.
    OAuthCredential,
    /// POST /mcp `tools/call`.
    McpCall,
    /// POST /mcp `tools/list`: the answer must come back filtered by the policy.
    McpList,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::FileCredential,
        Kind::OAuthCredential,
        Kind::McpCall,
        Kind::McpList,
    ];

    /// Half file credential, a fifth OAuth, a fifth `tools/call`, a tenth `tools/list`.
    pub fn of(seq: u64) -> Kind {
        match seq % 10 {
            1 | 5 => Kind::OAuthCredential,
            3 | 7 => Kind::McpCall,
            9 => Kind::McpList,
            _ => Kind::FileCredential,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::FileCredential => "file-credential",
            Kind::OAuthCredential => "oauth-credential",
            Kind::McpCall => "mcp-tools-call",
            Kind::McpList => "mcp-tools-list",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counts since the last sample.
pub struct Window {
    pub ok: u64,
    pub errors: u64,
    pub late: u64,
    pub hist: Histogram<u64>,
}

/// A window's figures, taken by the sampler.
pub struct WindowStats {
    pub ok: u64,
    pub errors: u64,
    pub late: u64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl Window {
    /// The figures so far, and a fresh start.
    pub fn take(&mut self) -> WindowStats {
        let pct = |q: f64| (!self.hist.is_empty()).then(|| self.hist.value_at_quantile(q));
        let stats = WindowStats {
            ok: self.ok,
            errors: self.errors,
            late: self.late,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
        };
        (self.ok, self.errors, self.late) = (0, 0, 0);
        self.hist.reset();
        stats
    }
}

/// Everything the requests report, read by the sampler.
pub struct Tally {
    pub window: Window,
    /// Latency of every request completed after the warm-up.
    pub settled: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub late: u64,
    pub ok_by_kind: [u64; 4],
    pub errors_by_kind: [u64; 4],
    pub connections_opened: u64,
    /// Distinct error messages (kind: message) and how often each happened.
    pub error_messages: Vec<(String, u64)>,
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

impl Tally {
    pub fn new() -> Result<Tally> {
        Ok(Tally {
            window: Window {
                ok: 0,
                errors: 0,
                late: 0,
                hist: histogram()?,
            },
            settled: histogram()?,
            ok: 0,
            errors: 0,
            late: 0,
            ok_by_kind: [0; 4],
            errors_by_kind: [0; 4],
            connections_opened: 0,
            error_messages: Vec::new(),
        })
    }

    fn late(&mut self) {
        self.late += 1;
        self.window.late += 1;
    }

    fn record(&mut self, kind: Kind, r: &Result<()>, latency: Duration, settled: bool) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        match r {
            Ok(()) => {
                self.ok += 1;
                self.window.ok += 1;
                self.ok_by_kind[kind.index()] += 1;
                self.window.hist.saturating_record(us);
                if settled {
                    self.settled.saturating_record(us);
                }
            }
            Err(e) => {
                self.errors += 1;
                self.window.errors += 1;
                self.errors_by_kind[kind.index()] += 1;
                let msg = format!("{}: {e:#}", kind.name());
                let known = self.error_messages.iter().position(|(m, _)| *m == msg);
                match known {
                    Some(at) => self.error_messages[at].1 += 1,
                    None if self.error_messages.len() < KEEP_ERRORS => {
                        self.error_messages.push((msg, 1));
                    }
                    None => {}
                }
            }
        }
    }
}

/// Idle connections, used in turn (oldest first) so none sits idle long enough for the
/// proxy's idle timeout; each with the number of requests it has carried.
type Pool = Mutex<VecDeque<(Sender, u32)>>;

/// Run the schedule from `start` until `end`, then wait (bounded by the request timeout) for
/// the requests still running. `settled_from`: requests completing after it are in the
/// post-warm-up latency.
pub async fn run(
    plan: Plan,
    dialer: Arc<Dialer>,
    tally: Arc<Mutex<Tally>>,
    start: Instant,
    settled_from: Instant,
    end: Instant,
) {
    let slots = Arc::new(Semaphore::new(plan.inflight));
    let pool: Arc<Pool> = Arc::default();
    let host: Arc<str> = format!("127.0.0.1:{}", dialer.upstream.port()).into();
    for seq in 0u64.. {
        let due = start + Duration::from_secs_f64(seq as f64 / plan.rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        // A request on time counts from when it really starts, so the timer's millisecond
        // granularity does not add to its latency; a late one from its due time.
        let (permit, origin) = match slots.clone().try_acquire_owned() {
            Ok(p) if due.elapsed() <= LATE_AFTER => (p, Instant::now()),
            Ok(p) => {
                lock(&tally).late();
                (p, due)
            }
            Err(_) => {
                lock(&tally).late();
                match slots.clone().acquire_owned().await {
                    Ok(p) => (p, due),
                    Err(_) => break,
                }
            }
        };
        let (dialer, pool, tally, host) =
            (dialer.clone(), pool.clone(), tally.clone(), host.clone());
        tokio::spawn(async move {
            let kind = Kind::of(seq);
            let deadline = due + plan.request_timeout;
            let r = tokio::time::timeout_at(
                deadline,
                one(&dialer, &pool, &tally, plan, &host, kind, seq),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow!("timed out after {:?}", plan.request_timeout)));
            let done = Instant::now();
            lock(&tally).record(kind, &r, done - origin, done >= settled_from);
            drop(permit);
        });
    }
    // Every slot back means every request has finished (each is bounded by its timeout).
    let all = u32::try_from(plan.inflight).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        plan.request_timeout + Duration::from_secs(1),
        slots.acquire_many(all),
    )
    .await;
    pool.lock().map(|mut p| p.clear()).ok();
}

/// One request of each kind, in order, on one new connection: a proxy or setup that cannot
/// serve the mix fails here, with the reason, instead of as a run of errors.
pub async fn preflight(dialer: &Dialer, plan: Plan) -> Result<()> {
    let pool = Pool::default();
    let tally = Mutex::new(Tally::new()?);
    let host = format!("127.0.0.1:{}", dialer.upstream.port());
    let plan = Plan {
        connections: 1,
        ..plan
    };
    for (seq, kind) in Kind::ALL.into_iter().enumerate() {
        tokio::time::timeout(
            plan.request_timeout,
            one(dialer, &pool, &tally, plan, &host, kind, seq as u64),
        )
        .await
        .map_err(|_| anyhow!("{}: timed out", kind.name()))?
        .with_context(|| kind.name())?;
    }
    Ok(())
}

fn lock(t: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    // A panic elsewhere while holding it leaves counts that are still worth reporting.
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One request on a pooled connection (or a new one), its answer checked.
async fn one(
    dialer: &Dialer,
    pool: &Pool,
    tally: &Mutex<Tally>,
    plan: Plan,
    host: &str,
    kind: Kind,
    seq: u64,
) -> Result<()> {
    let pooled = pool.lock().ok().and_then(|mut p| p.pop_front());
    let (mut sender, uses) = match pooled {
        Some(c) => c,
        None => {
            let s = dialer.open(Route::Mitm).await?;
            lock(tally).connections_opened += 1;
            (s, 0)
        }
    };
    let Sender::H1(h1) = &mut sender else {
        bail!("the soak speaks HTTP/1.1 inside the tunnel");
    };
    h1.ready().await.context("connection closed")?;
    let resp = h1
        .send_request(request(kind, seq, host)?)
        .await
        .context("sending the request")?;
    let status = resp.status();
    let refused = resp.headers().get("x-portcullis-error").cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    if let Some(code) = refused {
        bail!(
            "HTTP {status}, x-portcullis-error {code:?}: {}",
            snippet(&body)
        );
    }
    check(kind, seq, status, &body)?;
    if uses + 1 < plan.requests_per_connection {
        if let Ok(mut p) = pool.lock() {
            if p.len() < plan.connections {
                p.push_back((sender, uses + 1));
            }
        }
    }
    Ok(())
}

fn request(kind: Kind, seq: u64, host: &str) -> Result<Request<Full<Bytes>>> {
    let b = Request::builder().header(header::HOST, host);
    let req = match kind {
        Kind::FileCredential | Kind::OAuthCredential => {
            let placeholder = match kind {
                Kind::FileCredential => BENCH_PLACEHOLDER,
                _ => OAUTH_PLACEHOLDER,
            };
            b.method(Method::GET)
                .uri("/cred")
                .header(header::AUTHORIZATION, format!("Bearer {placeholder}"))
                .body(Full::new(Bytes::new()))?
        }
        Kind::McpCall | Kind::McpList => {
            let msg = match kind {
                Kind::McpCall => serde_json::json!({
                    "jsonrpc": "2.0", "id": seq, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "hello from the soak"}},
                }),
                _ => serde_json::json!({"jsonrpc": "2.0", "id": seq, "method": "tools/list"}),
            };
            b.method(Method::POST)
                .uri("/mcp")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json, text/event-stream")
                .body(Full::new(Bytes::from(msg.to_string())))?
        }
    };
    Ok(req)
}

/// What a right answer is: the upstream saw the real secret (it answers 403 otherwise), the
/// JSON-RPC answer carries the request's id, and a tool list comes back without the tool the
/// policy denies.
fn check(kind: Kind, seq: u64, status: StatusCode, body: &[u8]) -> Result<()> {
    if !status.is_success() {
        bail!("HTTP {status}: {}", snippet(body));
    }
    match kind {
        Kind::FileCredential | Kind::OAuthCredential => {
            if body != SMALL_BODY {
                bail!("unexpected body: {}", snippet(body));
            }
        }
        Kind::McpCall | Kind::McpList => {
            let v: serde_json::Value = serde_json::from_slice(body)
                .with_context(|| format!("not JSON: {}", snippet(body)))?;
            if v.get("id").and_then(serde_json::Value::as_u64) != Some(seq)
                || v.get("error").is_some()
            {
                bail!("unexpected JSON-RPC answer: {}", snippet(body));
            }
            if kind == Kind::McpList {
                let names: Vec<&str> = v["result"]["tools"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
                    .unwrap_or_default();
                let want: Vec<&str> = MCP_TOOLS
                    .iter()
                    .copied()
                    .filter(|t| *t != "delete_all")
                    .collect();
                if names != want {
                    bail!("tools/list gave {names:?}, expected {want:?}");
                }
            }
        }
    }
    Ok(())
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_repeats_every_ten_requests() {
        let mut counts = [0u32; 4];
        for seq in 0..1000 {
            counts[Kind::of(seq).index()] += 1;
        }
        assert_eq!(counts, [500, 200, 200, 100]);
        assert_eq!(Kind::ALL.map(Kind::index), [0, 1, 2, 3]);
    }

    #[test]
    fn answers_are_checked() {
        check(Kind::FileCredential, 1, StatusCode::OK, SMALL_BODY).unwrap();
        assert!(check(Kind::FileCredential, 1, StatusCode::FORBIDDEN, b"{}").is_err());
        let call = br#"{"jsonrpc":"2.0","id":7,"result":{"content":[]}}"#;
        check(Kind::McpCall, 7, StatusCode::OK, call).unwrap();
        assert!(check(Kind::McpCall, 8, StatusCode::OK, call).is_err());
        let filtered =
            br#"{"jsonrpc":"2.0","id":9,"result":{"tools":[{"name":"echo"},{"name":"search"}]}}"#;
        check(Kind::McpList, 9, StatusCode::OK, filtered).unwrap();
        let unfiltered = br#"{"jsonrpc":"2.0","id":9,"result":{"tools":[{"name":"echo"},{"name":"search"},{"name":"delete_all"}]}}"#;
        assert!(check(Kind::McpList, 9, StatusCode::OK, unfiltered).is_err());
    }

    #[test]
    fn errors_are_kept_by_message() {
        let mut t = Tally::new().unwrap();
        for _ in 0..3 {
            t.record(
                Kind::McpCall,
                &Err(anyhow!("boom")),
                Duration::from_millis(1),
                true,
            );
        }
        t.record(Kind::McpCall, &Ok(()), Duration::from_millis(2), true);
        assert_eq!((t.ok, t.errors), (1, 3));
        assert_eq!(
            t.error_messages,
            vec![("mcp-tools-call: boom".to_owned(), 3)]
        );
        assert_eq!(t.settled.len(), 1);
    }
}
