//! Approvals and rate limits shared by replicas.
//!
//! Rate limits: one GCRA bucket per key (`<prefix>:rl:<sha256(key)>`, the arrival time in
//! microseconds of Redis's own clock), every limit of an action checked and charged in one Lua
//! script: one round trip. When Redis fails, the replica's local limiter decides (counted in
//! `portcullis_rate_limit_fallback_total`): a limit then holds per replica, never not at all.
//!
//! Approvals: a hash per record (`<prefix>:approval:<id>`: the record's JSON, plus its mutable
//! fields `state`, `expires_ms`, `uses`, `decided_by`, `decided_at_ms`), the live record of a
//! fingerprint (`<prefix>:approval:fp:<fingerprint>` → id), a sorted set of ids by creation
//! for listing, and a channel announcing every change so held requests and consoles on every
//! replica wake. Every transition is one Lua script, so two replicas cannot both open a record
//! for the same call or both take a grant's last use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use portcullis_filters::stages::approval::{
    ApprovalRecord, ApprovalState, ApprovalStore, Change, DecideError, StoreError as ApprovalError,
};
use portcullis_filters::stages::quota::{Charge, LocalLimiter, RateLimiter, Verdict};

use super::RedisStore;

/// Records are kept this long after they end, for listing.
const KEEP_FINISHED_MS: u64 = 24 * 3600 * 1000;

const CHARGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local new = {}
local worst, which = 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local nt = tat + interval * cost
  local over = nt - now - capacity
  if over > 0 and over > worst then worst = over; which = i end
  new[i] = nt
end
if which > 0 then return {0, which - 1, string.format('%.0f', worst)} end
for i = 1, n do
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', math.ceil((new[i] - now) / 1000) + 1)
end
return {1, 0, '0'}
";

/// KEYS: fp key, record key, index. ARGV: id, record JSON, expires_ms, prefix, channel,
/// uses ('' = any number), keep_ms, ttl_ms.
/// Returns {1, id} when created, {0, id} when a live record exists.
const FIND_OR_OPEN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = redis.call('GET', KEYS[1])
if id then
  local rec = ARGV[4] .. ':approval:' .. id
  local f = redis.call('HMGET', rec, 'state', 'expires_ms', 'uses')
  if f[1] and tonumber(f[2]) > now and not (f[1] == 'granted' and f[3] == '0') then
    return {0, id}
  end
end
redis.call('HSET', KEYS[2], 'record', ARGV[2], 'state', 'pending', 'expires_ms', ARGV[3],
  'uses', ARGV[6], 'ttl_ms', ARGV[8], 'decided_by', '', 'decided_at_ms', '')
redis.call('PEXPIREAT', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[7]))
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[1] .. ' pending')
return {1, ARGV[1]}
";

/// KEYS: record key, fp key. ARGV: id, channel. Returns 1 when a use was taken.
const CONSUME: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'state', 'expires_ms', 'uses')
if f[1] ~= 'granted' or tonumber(f[2]) <= now or f[3] == '0' then return 0 end
if f[3] ~= '' then
  local left = tonumber(f[3]) - 1
  redis.call('HSET', KEYS[1], 'uses', tostring(left))
  if left == 0 then
    if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
    redis.call('PUBLISH', ARGV[2], ARGV[1] .. ' granted')
  end
end
return 1
";

/// KEYS: record key, fp key. ARGV: id, state, by, channel, keep_ms.
/// Returns {0, state} when not pending (or gone: {0, ''}), {1, ''} when decided.
const DECIDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'state', 'expires_ms', 'ttl_ms')
if not f[1] then return {0, ''} end
if f[1] ~= 'pending' then return {0, f[1]} end
if tonumber(f[2]) <= now then return {0, 'expired'} end
local ttl = tonumber(f[3])
local expires = now + ttl
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'decided_by', ARGV[3], 'decided_at_ms', tostring(now),
  'expires_ms', string.format('%.0f', expires))
redis.call('PEXPIREAT', KEYS[1], expires + tonumber(ARGV[5]))
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('SET', KEYS[2], ARGV[1], 'PXAT', string.format('%.0f', expires)) end
redis.call('PUBLISH', ARGV[4], ARGV[1] .. ' ' .. ARGV[2])
return {1, ''}
";

/// The scripts, hashed once (they are sent by hash, and loaded on a `NOSCRIPT` answer).
struct Scripts {
    charge: redis::Script,
    find_or_open: redis::Script,
    consume: redis::Script,
    decide: redis::Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
        charge: redis::Script::new(CHARGE),
        find_or_open: redis::Script::new(FIND_OR_OPEN),
        consume: redis::Script::new(CONSUME),
        decide: redis::Script::new(DECIDE),
    });
    &SCRIPTS
}

impl RedisStore {
    fn approval_key(&self, id: &str) -> String {
        format!("{}:approval:{id}", self.prefix)
    }

    fn approval_fp_key(&self, fingerprint: &str) -> String {
        format!("{}:approval:fp:{fingerprint}", self.prefix)
    }

    fn approvals_index(&self) -> String {
        format!("{}:approvals", self.prefix)
    }

    pub(super) fn approvals_channel(&self) -> String {
        format!("{}:approvals", self.prefix)
    }

    fn bucket_key(&self, key: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        format!(
            "{}:rl:{}",
            self.prefix,
            portcullis_filters::pipeline::hex(digest.as_ref())
        )
    }
}

/// A rate limiter on Redis, falling back to this replica's buckets when Redis fails.
#[derive(Debug)]
pub struct RedisLimiter {
    pub store: Arc<RedisStore>,
    pub local: LocalLimiter,
    pub fallbacks: AtomicU64,
}

#[async_trait::async_trait]
impl RateLimiter for RedisLimiter {
    async fn charge(&self, charges: &[Charge]) -> Verdict {
        if !self.store.is_down() {
            let mut cmd = scripts().charge.prepare_invoke();
            for c in charges {
                cmd.key(self.store.bucket_key(&c.key));
                cmd.arg(c.interval_us).arg(c.capacity_us).arg(c.cost);
            }
            let mut conn = self.store.conn.clone();
            let answer: Result<(i64, usize, String), _> =
                self.store.bounded(cmd.invoke_async(&mut conn)).await;
            match answer {
                Ok((1, _, _)) => return Verdict::Allowed,
                Ok((_, index, wait)) => {
                    return Verdict::Limited {
                        index: index.min(charges.len().saturating_sub(1)),
                        retry_after: std::time::Duration::from_micros(wait.parse().unwrap_or(0)),
                    }
                }
                Err(_) => {}
            }
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.local.charge_now(charges)
    }
}

/// Approval records in Redis.
#[derive(Debug)]
pub struct RedisApprovals {
    pub store: Arc<RedisStore>,
    /// Changes announced on the channel (fed by the replica's subscription).
    pub changes: tokio::sync::broadcast::Sender<Change>,
}

impl RedisApprovals {
    pub fn new(store: Arc<RedisStore>) -> RedisApprovals {
        RedisApprovals {
            store,
            changes: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// A record from its hash fields.
    fn record(fields: &std::collections::HashMap<String, String>) -> Option<ApprovalRecord> {
        let mut rec: ApprovalRecord = serde_json::from_str(fields.get("record")?).ok()?;
        rec.state = ApprovalState::parse(fields.get("state")?)?;
        rec.expires_ms = fields.get("expires_ms")?.parse().ok()?;
        rec.uses = fields.get("uses").and_then(|u| u.parse().ok());
        rec.decided_by = fields.get("decided_by").filter(|s| !s.is_empty()).cloned();
        rec.decided_at_ms = fields.get("decided_at_ms").and_then(|s| s.parse().ok());
        let now = portcullis_filters::stages::approval::unix_millis();
        if rec.is_expired(now) {
            rec.state = ApprovalState::Expired;
        }
        Some(rec)
    }

    fn err(e: impl std::fmt::Display) -> ApprovalError {
        ApprovalError(format!("redis: {e}"))
    }
}

#[async_trait::async_trait]
impl ApprovalStore for RedisApprovals {
    async fn find_or_open(
        &self,
        new: ApprovalRecord,
    ) -> Result<(ApprovalRecord, bool), ApprovalError> {
        let s = &self.store;
        let json = serde_json::to_string(&new).map_err(Self::err)?;
        let mut cmd = scripts().find_or_open.prepare_invoke();
        cmd.key(s.approval_fp_key(&new.fingerprint))
            .key(s.approval_key(&new.id))
            .key(s.approvals_index())
            .arg(&new.id)
            .arg(json)
            .arg(new.expires_ms)
            .arg(&s.prefix)
            .arg(s.approvals_channel())
            .arg(new.uses.map_or(String::new(), |u| u.to_string()))
            .arg(KEEP_FINISHED_MS)
            .arg(new.ttl_ms);
        let mut conn = s.conn.clone();
        let (created, id): (i64, String) = s
            .bounded(cmd.invoke_async(&mut conn))
            .await
            .map_err(Self::err)?;
        if created == 1 {
            return Ok((new, true));
        }
        match self.get(&id).await? {
            Some(rec) => Ok((rec, false)),
            None => Err(ApprovalError("redis: the live record vanished".into())),
        }
    }

    async fn consume(&self, id: &str) -> Result<bool, ApprovalError> {
        let Some(rec) = self.get(id).await? else {
            return Ok(false);
        };
        let s = &self.store;
        let mut cmd = scripts().consume.prepare_invoke();
        cmd.key(s.approval_key(id))
            .key(s.approval_fp_key(&rec.fingerprint))
            .arg(id)
            .arg(s.approvals_channel());
        let mut conn = s.conn.clone();
        let taken: i64 = s
            .bounded(cmd.invoke_async(&mut conn))
            .await
            .map_err(Self::err)?;
        Ok(taken == 1)
    }

    async fn decide(&self, id: &str, grant: bool, by: &str) -> Result<ApprovalRecord, DecideError> {
        let store_err = |e: ApprovalError| DecideError::Store(e.0);
        let Some(rec) = self.get(id).await.map_err(store_err)? else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        let s = &self.store;
        let state = if grant { "granted" } else { "denied" };
        let mut cmd = scripts().decide.prepare_invoke();
        cmd.key(s.approval_key(id))
            .key(s.approval_fp_key(&rec.fingerprint))
            .arg(id)
            .arg(state)
            .arg(by)
            .arg(s.approvals_channel())
            .arg(KEEP_FINISHED_MS);
        let mut conn = s.conn.clone();
        let (done, was): (i64, String) = s
            .bounded(cmd.invoke_async(&mut conn))
            .await
            .map_err(|e| DecideError::Store(e.to_string()))?;
        if done != 1 {
            return Err(match ApprovalState::parse(&was) {
                Some(st) => DecideError::NotPending(id.to_owned(), st.as_str()),
                None => DecideError::NotFound(id.to_owned()),
            });
        }
        self.get(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| DecideError::NotFound(id.to_owned()))
    }

    async fn get(&self, id: &str) -> Result<Option<ApprovalRecord>, ApprovalError> {
        let s = &self.store;
        let fields: std::collections::HashMap<String, String> = s
            .query(redis::cmd("HGETALL").arg(s.approval_key(id)))
            .await
            .map_err(Self::err)?;
        Ok(Self::record(&fields))
    }

    async fn list(&self, limit: usize) -> Result<Vec<ApprovalRecord>, ApprovalError> {
        let s = &self.store;
        let ids: Vec<String> = s
            .query(
                redis::cmd("ZREVRANGE")
                    .arg(s.approvals_index())
                    .arg(0)
                    .arg(limit.saturating_sub(1)),
            )
            .await
            .map_err(Self::err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Every record in one round trip (a listing, and each `/metrics` scrape, may read
        // thousands).
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(s.approval_key(id));
        }
        let mut conn = s.conn.clone();
        let all: Vec<std::collections::HashMap<String, String>> = s
            .bounded(pipe.query_async(&mut conn))
            .await
            .map_err(Self::err)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, fields) in ids.into_iter().zip(all) {
            match Self::record(&fields) {
                Some(rec) => out.push(rec),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _ = s
                .query::<i64>(redis::cmd("ZREM").arg(s.approvals_index()).arg(gone))
                .await;
        }
        Ok(out)
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// A change as announced on the channel: `<id> <state>`.
pub fn parse_change(payload: &str) -> Option<Change> {
    let (id, state) = payload.split_once(' ')?;
    Some(Change {
        id: id.to_owned(),
        state: ApprovalState::parse(state)?,
    })
}
