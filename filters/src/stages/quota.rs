//! Rate limits and in-flight limits, checked after the policy allowed an action. A limit is a
//! GCRA bucket (generic cell rate algorithm: one timestamp per key, the "theoretical arrival
//! time") asked for by the decision (`limit: {key, rate, burst}`) or declared in the config
//! (`rate_limits.limits`, keyed by identity, destination, route, method or MCP tool). All the
//! limits of one action are charged together or not at all. Over a limit: `429 rate_limited`
//! with `Retry-After`; for MCP, the JSON-RPC error of each request with the delay in `data`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_policy::{LimitAsk, Rate};

use crate::error::{ErrorCode, Rejection};
use crate::pipeline::{Action, ActionKind, Context, Filter, Phase};

/// One bucket to charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The metrics label: the config limit's name, or the decision's `name` (`policy`).
    pub name: String,
    /// The bucket's key (name-spaced: `config:<name>:…` or `policy:…`).
    pub key: String,
    /// Microseconds between two calls at the steady rate.
    pub interval_us: u64,
    /// How far ahead of now the bucket may run (`burst × interval`).
    pub capacity_us: u64,
    /// Calls charged at once (a batch of several calls on one key).
    pub cost: u32,
}

impl Charge {
    pub fn new(name: &str, key: String, rate: Rate, burst: u32) -> Charge {
        let interval_us = u64::try_from(rate.interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        Charge {
            name: name.to_owned(),
            key,
            interval_us,
            capacity_us: interval_us.saturating_mul(u64::from(burst)),
            cost: 1,
        }
    }
}

/// The answer of a limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every bucket was charged.
    Allowed,
    /// `charges[index]` is over its limit; nothing was charged. Retry after `retry_after`.
    Limited { index: usize, retry_after: Duration },
    /// The limiter has no room for another key (a bounded table full of live buckets).
    Full,
}

/// Where buckets live: this process ([`LocalLimiter`]) or Redis (the proxy's, shared by
/// replicas, falling back to a local one).
#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync + fmt::Debug + 'static {
    async fn charge(&self, charges: &[Charge]) -> Verdict;
}

/// GCRA over all `charges` at `now_us`: `tat` reads a bucket's theoretical arrival time (0
/// when none). Returns the new arrival times to store, or the refusal. Shared by the local
/// limiter and (in Lua) the Redis one.
pub fn gcra(
    charges: &[Charge],
    now_us: u64,
    tat: impl Fn(&str) -> u64,
) -> Result<Vec<u64>, Verdict> {
    let mut next = Vec::with_capacity(charges.len());
    let mut worst: Option<(usize, u64)> = None;
    for (i, c) in charges.iter().enumerate() {
        let t = tat(&c.key).max(now_us);
        let new = t.saturating_add(c.interval_us.saturating_mul(u64::from(c.cost)));
        let ahead = new - now_us;
        if ahead > c.capacity_us {
            let wait = ahead - c.capacity_us;
            if worst.is_none_or(|(_, w)| wait > w) {
                worst = Some((i, wait));
            }
        }
        next.push(new);
    }
    match worst {
        Some((index, wait)) => Err(Verdict::Limited {
            index,
            retry_after: Duration::from_micros(wait),
        }),
        None => Ok(next),
    }
}

/// Buckets in this process: a bounded map of key → arrival time. Expired buckets (arrival time
/// in the past: a fresh bucket behaves the same) are swept when the map is full; a full map
/// of live buckets refuses new keys (`Verdict::Full`) instead of growing.
pub struct LocalLimiter {
    buckets: Mutex<HashMap<String, u64>>,
    max_keys: usize,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl fmt::Debug for LocalLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl LocalLimiter {
    pub fn new(max_keys: usize) -> LocalLimiter {
        LocalLimiter::with_clock(max_keys, unix_micros)
    }

    /// With an injected clock (microseconds), for tests.
    pub fn with_clock(
        max_keys: usize,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> LocalLimiter {
        LocalLimiter {
            buckets: Mutex::new(HashMap::new()),
            max_keys,
            clock: Box::new(clock),
        }
    }

    pub fn charge_now(&self, charges: &[Charge]) -> Verdict {
        let now = (self.clock)();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let next = match gcra(charges, now, |k| buckets.get(k).copied().unwrap_or(0)) {
            Ok(next) => next,
            Err(refused) => return refused,
        };
        let new_keys = charges
            .iter()
            .filter(|c| !buckets.contains_key(&c.key))
            .count();
        if buckets.len() + new_keys > self.max_keys {
            buckets.retain(|_, tat| *tat > now);
            if buckets.len() + new_keys > self.max_keys {
                return Verdict::Full;
            }
        }
        for (c, tat) in charges.iter().zip(next) {
            buckets.insert(c.key.clone(), tat);
        }
        Verdict::Allowed
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().map_or(0, |b| b.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait]
impl RateLimiter for LocalLimiter {
    async fn charge(&self, charges: &[Charge]) -> Verdict {
        self.charge_now(charges)
    }
}

/// What a config limit is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart {
    Identity,
    Destination,
    Route,
    Method,
    /// The MCP tool of each `tools/call` (a limit keyed by tool applies to tool calls only).
    Tool,
}

impl KeyPart {
    pub fn parse(s: &str) -> Option<KeyPart> {
        Some(match s {
            "identity" => KeyPart::Identity,
            "destination" => KeyPart::Destination,
            "route" => KeyPart::Route,
            "method" => KeyPart::Method,
            "tool" => KeyPart::Tool,
            _ => return None,
        })
    }
}

/// A limit declared in the config.
#[derive(Debug, Clone)]
pub struct StaticLimit {
    pub name: String,
    pub by: Vec<KeyPart>,
    pub rate: Rate,
    pub burst: u32,
}

impl StaticLimit {
    /// The buckets this limit charges for the action: one, or one per tool call when keyed by
    /// tool (none when it has no tool calls); the key joins the parts' values.
    fn charges(&self, ctx: &Context, out: &mut Vec<Charge>) {
        let mut base = format!("config:{}", self.name);
        for part in &self.by {
            let value = match part {
                KeyPart::Identity => ctx.peer.spiffe_id.as_str().to_owned(),
                KeyPart::Destination => ctx.destination.to_string(),
                KeyPart::Route => match &ctx.gateway_route {
                    Some(r) => r.to_string(),
                    None => return,
                },
                KeyPart::Method => ctx.method.as_str().to_owned(),
                KeyPart::Tool => continue,
            };
            base.push('\0');
            base.push_str(&value);
        }
        if !self.by.contains(&KeyPart::Tool) {
            add(out, Charge::new(&self.name, base, self.rate, self.burst));
            return;
        }
        let Some(mcp) = &ctx.mcp.request else {
            return;
        };
        for tool in mcp.messages.iter().filter_map(|m| m.tool()) {
            let key = format!("{base}\0tool\0{tool}");
            add(out, Charge::new(&self.name, key, self.rate, self.burst));
        }
    }
}

/// Add a charge, or raise the cost of the same bucket already there.
fn add(out: &mut Vec<Charge>, charge: Charge) {
    match out.iter_mut().find(|c| c.key == charge.key) {
        Some(c) => c.cost = c.cost.saturating_add(charge.cost),
        None => out.push(charge),
    }
}

/// Refusals per limit name, for `/metrics`.
#[derive(Debug, Default)]
pub struct QuotaStats {
    pub limited: Mutex<HashMap<String, u64>>,
    pub full: AtomicU64,
}

impl QuotaStats {
    fn count(&self, name: &str) {
        let mut m = self.limited.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(name) {
            Some(n) => *n += 1,
            None => {
                m.insert(name.to_owned(), 1);
            }
        }
    }
}

/// In-flight requests per identity (this replica's).
#[derive(Debug, Default)]
pub struct InFlight {
    by_identity: Mutex<HashMap<String, u32>>,
}

/// One in-flight request, released when the action's context is dropped.
#[derive(Debug)]
pub struct Slot {
    table: Arc<InFlight>,
    identity: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .table
            .by_identity
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.identity);
            }
        }
    }
}

impl InFlight {
    fn acquire(self: &Arc<Self>, identity: &str, max: u32) -> Option<Slot> {
        let mut m = self.by_identity.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(identity.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            table: self.clone(),
            identity: identity.to_owned(),
        })
    }

    pub fn total(&self) -> u64 {
        self.by_identity
            .lock()
            .map_or(0, |m| m.values().map(|n| u64::from(*n)).sum())
    }
}

/// The quota stage: after the policy, charges the decision's and the config's limits.
#[derive(Debug)]
pub struct QuotaFilter {
    pub limiter: Arc<dyn RateLimiter>,
    pub limits: Vec<StaticLimit>,
    /// `rate_limits.in_flight_per_identity` (HTTP and MCP requests; tunnels are not counted).
    pub max_in_flight: Option<u32>,
    pub in_flight: Arc<InFlight>,
    pub stats: Arc<QuotaStats>,
}

impl QuotaFilter {
    fn limited(&self, ctx: &mut Context, name: &str, reason: String, wait: Duration) -> Action {
        self.stats.count(name);
        ctx.gates.limited = Some(name.to_owned());
        // Whole seconds, rounded up, never 0: the header is delta-seconds.
        let secs = wait.as_micros().div_ceil(1_000_000).max(1);
        let mut rej = Rejection::new(ErrorCode::RateLimited, reason);
        rej.headers.push(("retry-after".into(), secs.to_string()));
        rej.details = crate::error::Details::from([
            ("limit", serde_json::json!(name)),
            (
                "retry_after_ms",
                serde_json::json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
            ),
        ]);
        Action::Respond(crate::stages::policy::refusal_for(ctx, rej))
    }
}

impl Filter for QuotaFilter {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn request<'a>(
        &'a self,
        ctx: &'a mut Context,
        _req: &'a mut http::request::Parts,
    ) -> Phase<'a, Action> {
        let charges = match self.charges(ctx) {
            Ok(charges) if charges.is_empty() => return Phase::Done(Action::Continue),
            Ok(charges) => charges,
            Err(refused) => return Phase::Done(refused),
        };
        Phase::wait(async move {
            match self.limiter.charge(&charges).await {
                Verdict::Allowed => Action::Continue,
                Verdict::Limited { index, retry_after } => {
                    let c = &charges[index];
                    let reason = format!("rate limit {} exceeded", c.name);
                    let name = c.name.clone();
                    self.limited(ctx, &name, reason, retry_after)
                }
                Verdict::Full => {
                    self.stats.full.fetch_add(1, Ordering::Relaxed);
                    let rej = Rejection::new(
                        ErrorCode::Overloaded,
                        "the rate-limit table is full of live buckets",
                    );
                    Action::Respond(crate::stages::policy::refusal_for(ctx, rej))
                }
            }
        })
    }
}

impl QuotaFilter {
    /// The in-flight slot (refused at once when none is free), then what this action is
    /// charged: nothing to charge means nothing to wait for.
    fn charges(&self, ctx: &mut Context) -> Result<Vec<Charge>, Action> {
        if let (Some(max), false) = (self.max_in_flight, ctx.kind == ActionKind::Connect) {
            match self.in_flight.acquire(ctx.peer.spiffe_id.as_str(), max) {
                Some(slot) => ctx.gates.slot = Some(slot),
                None => {
                    let reason = format!("more than {max} requests in flight for this identity");
                    return Err(self.limited(ctx, "in_flight", reason, Duration::from_secs(1)));
                }
            }
        }
        let mut charges = Vec::new();
        // Config limits count requests (a tunnel's CONNECT is not one); a decision's limits
        // apply to whatever it decided.
        if ctx.kind != ActionKind::Connect {
            for limit in &self.limits {
                limit.charges(ctx, &mut charges);
            }
        }
        for ask in ctx.decisions.iter().flat_map(|d| &d.decision.limits) {
            add(&mut charges, policy_charge(ask));
        }
        Ok(charges)
    }
}

fn policy_charge(ask: &LimitAsk) -> Charge {
    Charge::new(
        &ask.name,
        format!("policy:{}", ask.key),
        ask.rate,
        ask.burst,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn clocked() -> (Arc<AtomicU64>, LocalLimiter) {
        let now = Arc::new(AtomicU64::new(1_000_000_000));
        let n = now.clone();
        (
            now,
            LocalLimiter::with_clock(4, move || n.load(Ordering::Relaxed)),
        )
    }

    fn charge(key: &str, rate: &str, burst: u32) -> Charge {
        Charge::new("t", key.into(), Rate::parse(rate).unwrap(), burst)
    }

    #[test]
    fn burst_then_refusal_then_recovery() {
        let (now, l) = clocked();
        let c = [charge("k", "2/s", 3)];
        for _ in 0..3 {
            assert_eq!(l.charge_now(&c), Verdict::Allowed);
        }
        let Verdict::Limited { retry_after, .. } = l.charge_now(&c) else {
            panic!("the fourth call at once must be refused")
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        now.fetch_add(499_000, Ordering::Relaxed);
        assert!(matches!(l.charge_now(&c), Verdict::Limited { .. }));
        now.fetch_add(1_000, Ordering::Relaxed);
        assert_eq!(l.charge_now(&c), Verdict::Allowed);
        assert!(matches!(l.charge_now(&c), Verdict::Limited { .. }));
        // A long pause refills the whole burst, no more.
        now.fetch_add(60_000_000, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(l.charge_now(&c), Verdict::Allowed);
        }
        assert!(matches!(l.charge_now(&c), Verdict::Limited { .. }));
    }

    #[test]
    fn all_or_nothing_and_the_longest_wait_wins() {
        let (_now, l) = clocked();
        let a = charge("a", "1/s", 1);
        let b = charge("b", "1/m", 1);
        assert_eq!(l.charge_now(std::slice::from_ref(&a)), Verdict::Allowed);
        // `a` is over; `b` must not be charged by the refused pair.
        assert!(matches!(
            l.charge_now(&[a.clone(), b.clone()]),
            Verdict::Limited { index: 0, .. }
        ));
        assert_eq!(l.charge_now(std::slice::from_ref(&b)), Verdict::Allowed);
        let Verdict::Limited { index, retry_after } = l.charge_now(&[a, b]) else {
            panic!()
        };
        assert_eq!((index, retry_after), (1, Duration::from_secs(60)));
    }

    #[test]
    fn cost_counts_every_call_of_a_batch() {
        let (_now, l) = clocked();
        let mut c = charge("k", "5/m", 5);
        c.cost = 5;
        assert_eq!(l.charge_now(&[c.clone()]), Verdict::Allowed);
        c.cost = 1;
        assert!(matches!(l.charge_now(&[c]), Verdict::Limited { .. }));
    }

    #[test]
    fn the_table_is_bounded_and_expired_buckets_make_room() {
        let (now, l) = clocked();
        for k in ["a", "b", "c", "d"] {
            assert_eq!(l.charge_now(&[charge(k, "1/s", 1)]), Verdict::Allowed);
        }
        assert_eq!(l.charge_now(&[charge("e", "1/s", 1)]), Verdict::Full);
        now.fetch_add(2_000_000, Ordering::Relaxed);
        assert_eq!(l.charge_now(&[charge("e", "1/s", 1)]), Verdict::Allowed);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn in_flight_slots_are_released_on_drop() {
        let t = Arc::new(InFlight::default());
        let a = t.acquire("id", 2).unwrap();
        let b = t.acquire("id", 2).unwrap();
        assert!(t.acquire("id", 2).is_none());
        assert!(t.acquire("other", 2).is_some());
        drop(a);
        assert_eq!(t.total(), 1);
        let _c = t.acquire("id", 2).unwrap();
        drop(b);
        assert_eq!(t.total(), 1);
    }
}
