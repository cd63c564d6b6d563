//! Prometheus metrics, lock-free: fixed arrays of atomic counters indexed by label values, so
//! recording on the hot path is a few relaxed increments. Rendered as text on the admin
//! listener's `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use portcullis_filters::{ActionKind, Context, Filter, Outcome};

const KINDS: [&str; 3] = ["connect", "http", "mcp"];
const DECISIONS: [&str; 3] = ["allow", "deny", "none"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Histogram bucket upper bounds, in microseconds.
const BUCKETS_US: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 25_000, 100_000, 1_000_000,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let le = *b as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[[AtomicU64; 5]; 3]; 3],
    pub policy_eval: Histogram,
    pub upstream_latency: Histogram,
    pub active_connections: AtomicI64,
    /// Every `limits.max_connections` slot is taken: the listener waits instead of accepting.
    pub at_connection_limit: AtomicBool,
    /// The span exporter's counters (zero when spans are not exported).
    pub otel: std::sync::Arc<crate::telemetry::ExportStats>,
    /// Decision-log lines dropped because the output did not keep up.
    pub decision_log_dropped: std::sync::Arc<AtomicU64>,
    /// Denied POSTs refused because their HTTP+SSE stream's queue was full.
    pub sse_queue_full: AtomicU64,
    /// Requests refused because buffering their body would exceed a body budget.
    pub body_budget_refused: AtomicU64,
}

/// Keeps `active_connections` right however a connection ends.
pub struct ConnectionGuard<'a>(&'a Metrics);

impl Metrics {
    /// Metrics that report the decision log's dropped lines from `dropped`.
    pub fn with_decision_log(dropped: std::sync::Arc<AtomicU64>) -> Metrics {
        Metrics {
            decision_log_dropped: dropped,
            ..Metrics::default()
        }
    }

    pub fn connection(&self) -> ConnectionGuard<'_> {
        self.active_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self)
    }

    pub fn render(&self, out: &mut String) {
        let name = "portcullis_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Actions by kind, policy decision and response status class.\n# TYPE {name} counter"
        );
        for (k, kind) in KINDS.iter().enumerate() {
            for (d, decision) in DECISIONS.iter().enumerate() {
                for (c, class) in CLASSES.iter().enumerate() {
                    let v = self.requests[k][d][c].load(Ordering::Relaxed);
                    if v > 0 {
                        let _ = writeln!(
                            out,
                            "{name}{{kind=\"{kind}\",decision=\"{decision}\",status=\"{class}\"}} {v}"
                        );
                    }
                }
            }
        }
        self.policy_eval.render(
            out,
            "portcullis_policy_eval_seconds",
            "Policy evaluation time per decision.",
        );
        self.upstream_latency.render(
            out,
            "portcullis_upstream_response_seconds",
            "Request sent upstream to response headers.",
        );
        let _ = writeln!(
            out,
            "# TYPE portcullis_active_connections gauge\nportcullis_active_connections {}",
            self.active_connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connection_limit_reached 1 while every limits.max_connections slot is taken (new clients wait in the backlog).\n# TYPE portcullis_connection_limit_reached gauge\nportcullis_connection_limit_reached {}",
            u8::from(self.at_connection_limit.load(Ordering::Relaxed))
        );
        for (name, help, v) in [
            (
                "portcullis_otel_spans_exported_total",
                "Spans the OTLP collector accepted.",
                &self.otel.exported,
            ),
            (
                "portcullis_otel_spans_dropped_total",
                "Spans lost: export queue full, or their export failed or timed out.",
                &self.otel.dropped,
            ),
            (
                "portcullis_otel_export_errors_total",
                "OTLP export calls (batches) that failed or timed out.",
                &self.otel.export_errors,
            ),
            (
                "portcullis_body_budget_refused_total",
                "Requests refused (503/429 overloaded): their body would exceed limits.buffered_body_bytes or its per-connection share.",
                &self.body_budget_refused,
            ),
            (
                "portcullis_mcp_sse_queue_full_total",
                "Denied HTTP+SSE POSTs refused (503 overloaded): their event stream was not being read (mcp.sse_queue full).",
                &self.sse_queue_full,
            ),
            (
                "portcullis_decision_log_dropped_total",
                "Decision-log lines dropped: the output did not keep up (telemetry.decision_log_buffer full).",
                &*self.decision_log_dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The logging-phase stage that feeds [`Metrics`].
#[derive(Debug)]
pub struct MetricsFilter(pub std::sync::Arc<Metrics>);

#[async_trait::async_trait]
impl Filter for MetricsFilter {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        let k = match ctx.kind {
            ActionKind::Connect => 0,
            ActionKind::Http => 1,
            ActionKind::Mcp => 2,
        };
        let d = if ctx.decisions.iter().any(|r| !r.decision.allow) {
            1
        } else if ctx.decisions.is_empty() {
            2
        } else {
            0
        };
        let c = usize::from(outcome.status / 100).clamp(1, 5) - 1;
        self.0.requests[k][d][c].fetch_add(1, Ordering::Relaxed);
        for r in &ctx.decisions {
            self.0.policy_eval.observe(r.decision.eval_time);
        }
    }
}
