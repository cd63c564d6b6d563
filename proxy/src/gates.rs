//! Approvals and rate limits, assembled from the config: the stores (this process, or Redis
//! shared by replicas), the approvers' tokens, the webhook, and their `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::approval::{
    Announce, ApprovalRecord, ApprovalStats, ApprovalStore, Approvals, MemoryApprovals,
};
use portcullis_filters::stages::quota::{
    InFlight, KeyPart, LocalLimiter, QuotaFilter, QuotaStats, RateLimiter, StaticLimit,
};
use tokio::sync::mpsc;

use crate::config::{Config, Invalid, WebhookConfig};
use crate::replicas::{RedisApprovals, RedisLimiter, RedisStore};
use crate::upstream::backend::Backend;

/// Webhook announcements waiting to be sent; more are dropped (and counted).
const WEBHOOK_QUEUE: usize = 256;

/// Everything the approval and quota stages and the admin API share.
pub struct Gates {
    pub approvals: Arc<Approvals>,
    /// Approvers: (name, token). Empty: the admin token decides, recorded as `admin`.
    pub approvers: Vec<(String, Arc<SecretValue>)>,
    pub limiter: Arc<dyn RateLimiter>,
    pub quota_stats: Arc<QuotaStats>,
    pub in_flight: Arc<InFlight>,
    redis_limiter: Option<Arc<RedisLimiter>>,
    pub decisions: DecisionStats,
    /// Delegation tokens verified and refused (the stage is optional; the counters are not).
    pub delegation: Arc<portcullis_filters::stages::delegation::DelegationStats>,
    /// JWT-SVIDs verified and refused.
    pub jwt_svid: Arc<portcullis_filters::stages::jwt_svid::JwtSvidStats>,
    webhook: Option<Arc<WebhookStats>>,
    /// Approval changes from other replicas, when Redis shares the records.
    pub redis_changes:
        Option<tokio::sync::broadcast::Sender<portcullis_filters::stages::approval::Change>>,
}

/// Decisions approvers made through this replica's admin API.
#[derive(Debug, Default)]
pub struct DecisionStats {
    pub granted: AtomicU64,
    pub denied: AtomicU64,
    /// Milliseconds from creation to decision, summed.
    pub wait_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct WebhookStats {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

impl Gates {
    /// Must run inside the runtime (the webhook sender is spawned).
    pub fn build(cfg: &Config, redis: Option<&Arc<RedisStore>>) -> Result<Gates, Invalid> {
        let a = &cfg.approvals;
        let (store, redis_changes): (Arc<dyn ApprovalStore>, _) = match redis {
            Some(r) => {
                let store = RedisApprovals::new(r.clone());
                let tx = store.changes.clone();
                (Arc::new(store), Some(tx))
            }
            None => (Arc::new(MemoryApprovals::new(a.max_pending)), None),
        };
        let approvers = a
            .approvers
            .iter()
            .enumerate()
            .map(|(i, ap)| {
                let token = ap.token.resolve().map_err(|e| {
                    Invalid::new(format!("approvals.approvers[{i}].token"), e.to_string())
                })?;
                Ok((ap.name.clone(), Arc::new(token)))
            })
            .collect::<Result<Vec<_>, Invalid>>()?;
        let (on_open, webhook) = match &a.webhook {
            Some(w) => {
                let (announce, stats) = webhook(w)?;
                (Some(announce), Some(stats))
            }
            None => (None, None),
        };
        let approvals = Arc::new(Approvals {
            store,
            hold: a.hold,
            max_held: a.max_held,
            retry_after: a.retry_after,
            pending_ttl: a.pending_ttl,
            stats: Arc::new(ApprovalStats::default()),
            on_open,
        });
        let r = &cfg.rate_limits;
        let (limiter, redis_limiter): (Arc<dyn RateLimiter>, _) = match redis {
            Some(store) => {
                let l = Arc::new(RedisLimiter {
                    store: store.clone(),
                    local: LocalLimiter::new(r.max_keys),
                    fallbacks: AtomicU64::new(0),
                });
                (l.clone(), Some(l))
            }
            None => (Arc::new(LocalLimiter::new(r.max_keys)), None),
        };
        Ok(Gates {
            approvals,
            approvers,
            limiter,
            quota_stats: Arc::default(),
            in_flight: Arc::default(),
            redis_limiter,
            decisions: DecisionStats::default(),
            delegation: Arc::default(),
            jwt_svid: Arc::default(),
            webhook,
            redis_changes,
        })
    }

    /// The quota stage for the chain.
    pub fn quota_filter(&self, cfg: &Config) -> QuotaFilter {
        let r = &cfg.rate_limits;
        QuotaFilter {
            limiter: self.limiter.clone(),
            limits: r
                .limits
                .iter()
                .filter_map(|l| {
                    // Validated: every part and the rate parse.
                    let rate = portcullis_policy::Rate::parse(&l.rate).ok()?;
                    Some(StaticLimit {
                        name: l.name.clone(),
                        by: l.by.iter().filter_map(|b| KeyPart::parse(b)).collect(),
                        rate,
                        burst: l.burst.unwrap_or(rate.count),
                    })
                })
                .collect(),
            max_in_flight: r.in_flight_per_identity,
            in_flight: self.in_flight.clone(),
            stats: self.quota_stats.clone(),
        }
    }

    /// Prometheus text of the approval and quota counters (`listed`: records pending and
    /// expired now).
    pub fn render_metrics(&self, out: &mut String, listed: Option<(usize, usize)>) {
        let s = &self.approvals.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let d = &self.decisions;
        let mut rows: Vec<(&str, &str, String, u64)> = vec![
            (
                "portcullis_approvals_opened_total",
                "counter",
                String::new(),
                get(&s.opened),
            ),
            (
                "portcullis_approvals_decided_total",
                "counter",
                "decision=\"granted\"".into(),
                get(&d.granted),
            ),
            (
                "portcullis_approvals_decided_total",
                "counter",
                "decision=\"denied\"".into(),
                get(&d.denied),
            ),
            (
                "portcullis_approval_decision_seconds_sum",
                "counter",
                String::new(),
                get(&d.wait_ms) / 1000,
            ),
            (
                "portcullis_approval_decision_seconds_count",
                "counter",
                String::new(),
                get(&d.granted) + get(&d.denied),
            ),
            (
                "portcullis_approvals_used_total",
                "counter",
                String::new(),
                get(&s.used),
            ),
            (
                "portcullis_approvals_refused_total",
                "counter",
                "state=\"pending\"".into(),
                get(&s.refused_pending),
            ),
            (
                "portcullis_approvals_refused_total",
                "counter",
                "state=\"denied\"".into(),
                get(&s.refused_denied),
            ),
            (
                "portcullis_approval_store_errors_total",
                "counter",
                String::new(),
                get(&s.store_errors),
            ),
            (
                "portcullis_approvals_held",
                "gauge",
                String::new(),
                s.held_now.load(Ordering::Relaxed) as u64,
            ),
            (
                "portcullis_approvals_hold_refused_total",
                "counter",
                String::new(),
                get(&s.held_refused),
            ),
        ];
        if let Some((pending, expired)) = listed {
            let gauge = |name, n: usize| (name, "gauge", String::new(), n as u64);
            rows.push(gauge("portcullis_approvals_pending", pending));
            rows.push(gauge("portcullis_approvals_expired", expired));
        }
        if let Some(w) = &self.webhook {
            rows.push((
                "portcullis_approval_webhook_sent_total",
                "counter",
                String::new(),
                get(&w.sent),
            ));
            rows.push((
                "portcullis_approval_webhook_failed_total",
                "counter",
                String::new(),
                get(&w.failed),
            ));
            rows.push((
                "portcullis_approval_webhook_dropped_total",
                "counter",
                String::new(),
                get(&w.dropped),
            ));
        }
        let dl = &self.delegation;
        for (which, n) in [
            ("verified", get(&dl.verified)),
            ("refused", get(&dl.refused)),
            ("keys_unavailable", get(&dl.keys_unavailable)),
        ] {
            rows.push((
                "portcullis_delegation_tokens_total",
                "counter",
                format!("outcome=\"{which}\""),
                n,
            ));
        }
        let js = &self.jwt_svid;
        for (which, n) in [
            ("verified", get(&js.verified)),
            ("refused", get(&js.refused)),
            ("unavailable", get(&js.unavailable)),
        ] {
            rows.push((
                "portcullis_jwt_svids_total",
                "counter",
                format!("outcome=\"{which}\""),
                n,
            ));
        }
        let q = &self.quota_stats;
        if let Ok(limited) = q.limited.lock() {
            let mut all: Vec<_> = limited.iter().collect();
            all.sort();
            for (name, n) in all {
                rows.push((
                    "portcullis_rate_limited_total",
                    "counter",
                    format!("limit={name:?}"),
                    *n,
                ));
            }
        }
        rows.push((
            "portcullis_rate_limit_table_full_total",
            "counter",
            String::new(),
            get(&q.full),
        ));
        rows.push((
            "portcullis_in_flight_requests",
            "gauge",
            String::new(),
            self.in_flight.total(),
        ));
        if let Some(r) = &self.redis_limiter {
            rows.push((
                "portcullis_rate_limit_fallback_total",
                "counter",
                String::new(),
                get(&r.fallbacks),
            ));
        }
        let mut typed = std::collections::HashSet::new();
        for (name, kind, labels, value) in rows {
            if typed.insert(name) {
                let _ = writeln!(out, "# TYPE {name} {kind}");
            }
            match labels.is_empty() {
                true => {
                    let _ = writeln!(out, "{name} {value}");
                }
                false => {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        }
    }
}

/// The webhook: a bounded queue and one task that POSTs each announcement in turn.
fn webhook(w: &WebhookConfig) -> Result<(Announce, Arc<WebhookStats>), Invalid> {
    let backend = Backend::new("approval webhook", w.ca.clone(), w.timeout)
        .map_err(|e| Invalid::new("approvals.webhook.ca", e.to_string()))?;
    let mut headers = vec![(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    for (k, v) in &w.headers {
        let key = format!("approvals.webhook.headers.{k}");
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| Invalid::new(&key, "not a header name"))?;
        let value = match v {
            crate::config::ValueOrRef::Ref(r) => {
                let secret = r.resolve().map_err(|e| Invalid::new(&key, e.to_string()))?;
                HeaderValue::from_str(secret.expose())
            }
            crate::config::ValueOrRef::Value(v) => HeaderValue::from_str(v),
        };
        let mut value = value.map_err(|_| Invalid::new(&key, "not a header value"))?;
        value.set_sensitive(true);
        headers.push((name, value));
    }
    let stats = Arc::new(WebhookStats::default());
    let (tx, mut rx) = mpsc::channel::<Bytes>(WEBHOOK_QUEUE);
    let (url, task_stats) = (w.url.clone(), stats.clone());
    tokio::spawn(async move {
        while let Some(body) = rx.recv().await {
            let sent = backend.call(Method::POST, &url, &headers, Some(body)).await;
            match sent {
                Ok((status, _)) if status.is_success() => {
                    task_stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok((status, _)) => {
                    task_stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%status, "approval webhook refused an announcement");
                }
                Err(e) => {
                    task_stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "approval webhook failed");
                }
            }
        }
    });
    let dropped = stats.clone();
    let announce = move |rec: &ApprovalRecord| {
        let body = serde_json::json!({
            "type": "approval.pending",
            "approval": rec.to_json(),
            "approve": format!("/approvals/{}/approve", rec.id),
            "deny": format!("/approvals/{}/deny", rec.id),
        });
        if tx.try_send(Bytes::from(body.to_string())).is_err() {
            dropped.dropped.fetch_add(1, Ordering::Relaxed);
        }
    };
    Ok((Box::new(announce), stats))
}
