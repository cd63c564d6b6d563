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
/// The bucket bounds the OTel MCP conventions advise for operation durations (0.01 s to
/// 300 s), in microseconds.
const MCP_BUCKETS_US: [u64; 14] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::with_bounds(&BUCKETS_US)
    }
}

impl Histogram {
    /// Bucket upper bounds in microseconds, ascending.
    fn with_bounds(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = self.bounds.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }

    /// The series of one label set (`labels`: `key="value",` pairs, or empty).
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += n.load(Ordering::Relaxed);
            let le = *b as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let series = match labels.trim_end_matches(',') {
            "" => String::new(),
            set => format!("{{{set}}}"),
        };
        let _ = writeln!(
            out,
            "{name}_sum{series} {sum}\n{name}_count{series} {count}"
        );
    }
}

/// The MCP methods the duration metrics are labelled with; any other method (a client may send
/// anything) is counted as `other`, so the label set stays bounded.
const MCP_METHODS: [&str; 18] = [
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "subscriptions/listen",
    "notifications/initialized",
    "response",
    "other",
];

/// `mcp.server.operation.duration` (the proxy's side: a message received until its answer
/// was sent) or `mcp.client.operation.duration` (its upstream call), per MCP method.
#[derive(Debug)]
pub struct McpDurations([Histogram; MCP_METHODS.len()]);

impl Default for McpDurations {
    fn default() -> McpDurations {
        McpDurations(std::array::from_fn(|_| {
            Histogram::with_bounds(&MCP_BUCKETS_US)
        }))
    }
}

impl McpDurations {
    pub fn observe(&self, method: &str, d: Duration) {
        let i = MCP_METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(MCP_METHODS.len() - 1);
        self.0[i].observe(d);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (method, h) in MCP_METHODS.iter().zip(&self.0) {
            if h.count.load(Ordering::Relaxed) > 0 {
                h.render_series(out, name, &format!("mcp_method_name=\"{method}\","));
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[[AtomicU64; 5]; 3]; 3],
    pub policy_eval: Histogram,
    pub upstream_latency: Histogram,
    /// OTel `mcp.server.operation.duration` and `mcp.client.operation.duration`.
    pub mcp_server: McpDurations,
    pub mcp_client: McpDurations,
    pub active_connections: AtomicI64,
    /// Every `limits.max_connections` slot is taken: the listener waits instead of accepting.
    pub at_connection_limit: AtomicBool,
    /// The span exporter's counters (zero when spans are not exported).
    pub otel: std::sync::Arc<crate::telemetry::ExportStats>,
    /// The decision log's dropped lines and omitted inputs.
    pub decision_log: std::sync::Arc<crate::telemetry::decision_log::Counters>,
    /// The shadow policy's decisions and differences (rendered with `policy.shadow`).
    pub shadow: std::sync::Arc<portcullis_filters::stages::shadow::ShadowStats>,
    /// Denied POSTs refused because their HTTP+SSE stream's queue was full.
    pub sse_queue_full: AtomicU64,
    /// Requests refused because buffering their body would exceed a body budget.
    pub body_budget_refused: AtomicU64,
}

/// Keeps `active_connections` right however a connection ends.
pub struct ConnectionGuard<'a>(&'a Metrics);

impl Metrics {
    /// Metrics that report the decision log's counters.
    pub fn with_decision_log(
        counters: std::sync::Arc<crate::telemetry::decision_log::Counters>,
    ) -> Metrics {
        Metrics {
            decision_log: counters,
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
        self.mcp_server.render(
            out,
            "mcp_server_operation_duration_seconds",
            "OTel mcp.server.operation.duration: an MCP request received by the proxy until its answer was sent, by its (first) method.",
        );
        self.mcp_client.render(
            out,
            "mcp_client_operation_duration_seconds",
            "OTel mcp.client.operation.duration: an MCP request sent upstream until the response headers, by its (first) method.",
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
                &self.decision_log.dropped,
            ),
            (
                "portcullis_decision_log_input_omitted_total",
                "Decision-log lines written without their policy input: it was over telemetry.decision_log_input_max_bytes.",
                &self.decision_log.input_omitted,
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
        if let Some(method) = mcp_method(ctx) {
            self.0.mcp_server.observe(method, outcome.duration);
        }
    }
}

/// The method of an MCP action's first message (`response` for a client's response).
pub fn mcp_method(ctx: &Context) -> Option<&str> {
    if ctx.kind != ActionKind::Mcp {
        return None;
    }
    let m = ctx.mcp.request.as_ref()?.messages.first()?;
    Some(m.method.as_deref().unwrap_or("response"))
}
