//! OpenTelemetry export. Each action's span (CONNECT, HTTP request, MCP request) and its child
//! spans (`policy.evaluate`, `credential.fetch`, the upstream HTTP client call) are built at
//! logging time from what the request path recorded in its `Context` (ids, decisions, step
//! timings) — no OpenTelemetry call runs on the request path. Spans go through a bounded queue
//! to one export task (OTLP gRPC or HTTP/protobuf); a full queue or a failed export drops spans
//! and counts them (`portcullis_otel_spans_dropped_total`), so a slow or dead collector never
//! blocks a request. The queue wakes the export task once per full batch (or on its timer),
//! not per span: a wake-up per span cost more than building the span.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use portcullis_filters::timing::{sampled, StepKind};
use portcullis_filters::{ActionKind, Context, Filter, Outcome};
use tokio::sync::{oneshot, Notify};

use crate::config::TelemetryConfig;

/// What happened to the spans handed to the exporter, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans accepted by the collector.
    pub exported: AtomicU64,
    /// Spans lost: the queue was full, or their export failed or timed out.
    pub dropped: AtomicU64,
    /// Export calls (batches) that failed or timed out.
    pub export_errors: AtomicU64,
}

/// The spans waiting for export: bounded, and the export task is woken only when a batch is
/// full.
struct Queue {
    spans: std::sync::Mutex<Vec<SpanData>>,
    capacity: usize,
    batch: usize,
    full: Notify,
}

impl Queue {
    fn new(cfg: &Batching) -> Queue {
        Queue {
            spans: std::sync::Mutex::new(Vec::with_capacity(cfg.batch)),
            capacity: cfg.queue,
            batch: cfg.batch,
            full: Notify::new(),
        }
    }

    /// False when the queue is full (the span is dropped).
    fn push(&self, span: SpanData) -> bool {
        let Ok(mut q) = self.spans.lock() else {
            return false;
        };
        if q.len() >= self.capacity {
            return false;
        }
        q.push(span);
        let batch_ready = q.len() % self.batch == 0;
        drop(q);
        if batch_ready {
            self.full.notify_one();
        }
        true
    }

    /// Up to one batch, oldest first; only a full one unless `partial`.
    fn take(&self, partial: bool) -> Vec<SpanData> {
        let Ok(mut q) = self.spans.lock() else {
            return Vec::new();
        };
        if q.len() < self.batch && !partial {
            return Vec::new();
        }
        if q.len() <= self.batch {
            std::mem::replace(&mut *q, Vec::with_capacity(self.batch))
        } else {
            q.drain(..self.batch).collect()
        }
    }
}

/// The batch settings, from the standard `OTEL_BSP_*` variables (OpenTelemetry's defaults).
#[derive(Debug, Clone, Copy)]
struct Batching {
    queue: usize,
    batch: usize,
    delay: Duration,
    timeout: Duration,
}

impl Batching {
    fn from_env() -> Batching {
        let num = |name: &str, default: u64| {
            env(name)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let queue = usize::try_from(num("OTEL_BSP_MAX_QUEUE_SIZE", 2048)).unwrap_or(2048);
        let batch = usize::try_from(num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)).unwrap_or(512);
        Batching {
            queue,
            batch: batch.min(queue),
            delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            timeout: Duration::from_millis(num("OTEL_BSP_EXPORT_TIMEOUT", 30_000)),
        }
    }
}

/// The configured exporter, if any (none: spans are not exported; logs still carry ids).
pub struct Telemetry {
    queue: Arc<Queue>,
    stats: Arc<ExportStats>,
    sampling_ratio: f64,
    shutdown: std::sync::Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Telemetry {
    /// From `telemetry.*`, falling back to the standard `OTEL_*` variables. Must run inside
    /// the Tokio runtime: it spawns the export task.
    pub fn init(
        cfg: &TelemetryConfig,
        stats: Arc<ExportStats>,
    ) -> Result<Option<Telemetry>, String> {
        let Some(endpoint) = cfg
            .otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            return Ok(None);
        };
        let protocol = cfg
            .otlp_protocol
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "grpc".into());
        let batching = Batching::from_env();
        let mut exporter = match protocol.as_str() {
            "grpc" => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(batching.timeout)
                .build(),
            "http/protobuf" | "http" => {
                let url = if endpoint.ends_with("/v1/traces") {
                    endpoint.clone()
                } else {
                    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(url)
                    .with_timeout(batching.timeout)
                    .build()
            }
            other => {
                return Err(format!(
                    "telemetry.otlp_protocol {other:?}: use grpc or http/protobuf"
                ))
            }
        }
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new(
                    "service.instance.id",
                    format!("{:032x}", rand::random::<u128>()),
                ),
            ])
            .build();
        exporter.set_resource(&resource);
        let queue = Arc::new(Queue::new(&batching));
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(export_loop(
            exporter,
            queue.clone(),
            batching,
            stats.clone(),
            stop_rx,
        ));
        tracing::info!(endpoint = %endpoint, protocol = %protocol, "exporting spans over OTLP");
        Ok(Some(Telemetry {
            queue,
            stats,
            sampling_ratio: cfg.sampling_ratio,
            shutdown: std::sync::Mutex::new(Some(stop_tx)),
        }))
    }

    pub fn filter(&self) -> SpanExport {
        SpanExport {
            queue: self.queue.clone(),
            stats: self.stats.clone(),
            sampling_ratio: self.sampling_ratio,
            scope: InstrumentationScope::builder("portcullis")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    /// Export what is queued, then stop the export task (bounded by the export timeout; the
    /// caller bounds the wait too).
    pub async fn shutdown(&self) {
        let stop = self.shutdown.lock().ok().and_then(|mut s| s.take());
        if let Some(stop) = stop {
            let (done_tx, done_rx) = oneshot::channel();
            if stop.send(done_tx).is_ok() {
                let _ = done_rx.await;
            }
        }
    }
}

/// The export task: batches of up to `batch` spans, sent when one is full or every `delay`,
/// one export at a time, each bounded by `timeout`. Spans of a failed batch are counted as
/// dropped (no retry: the queue behind it would only grow).
async fn export_loop<E: opentelemetry_sdk::trace::SpanExporter + 'static>(
    exporter: E,
    queue: Arc<Queue>,
    cfg: Batching,
    stats: Arc<ExportStats>,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let mut tick = tokio::time::interval(cfg.delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let (partial, done) = tokio::select! {
            _ = queue.full.notified() => (false, None),
            _ = tick.tick() => (true, None),
            done = &mut stop => (true, Some(done)),
        };
        // The full batches (spans keep arriving while one is exported), and on the timer or
        // at shutdown what is left too.
        loop {
            let batch = queue.take(partial);
            let last = batch.len() < cfg.batch;
            export(&exporter, batch, &cfg, &stats, &mut failing).await;
            if last {
                break;
            }
        }
        if let Some(done) = done {
            if let Err(e) = exporter.shutdown() {
                tracing::debug!(error = %e, "span exporter shutdown");
            }
            if let Ok(done) = done {
                let _ = done.send(());
            }
            return;
        }
    }
}

async fn export<E: opentelemetry_sdk::trace::SpanExporter>(
    exporter: &E,
    spans: Vec<SpanData>,
    cfg: &Batching,
    stats: &ExportStats,
    failing: &mut bool,
) {
    if spans.is_empty() {
        return;
    }
    let n = spans.len() as u64;
    let error = match tokio::time::timeout(cfg.timeout, exporter.export(spans)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("timed out after {:?}", cfg.timeout)),
    };
    match error {
        None => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
            if std::mem::take(failing) {
                tracing::info!("span export works again");
            }
        }
        Some(e) => {
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            stats.export_errors.fetch_add(1, Ordering::Relaxed);
            // Once per outage, not per batch.
            if !std::mem::replace(failing, true) {
                tracing::warn!(error = %e, spans = n, "span export failed; dropping spans until the collector answers (counted in portcullis_otel_spans_dropped_total)");
            }
        }
    }
}

/// The logging-phase stage that builds the action's span and its children.
pub struct SpanExport {
    queue: Arc<Queue>,
    stats: Arc<ExportStats>,
    sampling_ratio: f64,
    scope: InstrumentationScope,
}

impl std::fmt::Debug for SpanExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanExport")
    }
}

fn span_name(ctx: &Context) -> Cow<'static, str> {
    match ctx.kind {
        ActionKind::Connect => format!("CONNECT {}", ctx.destination).into(),
        ActionKind::Mcp => {
            let first = ctx.decisions.iter().find_map(|r| r.mcp.as_ref());
            match first {
                Some(m) => match &m.tool {
                    Some(t) => format!("{} {t}", m.method).into(),
                    None => m.method.clone().into(),
                },
                None => "mcp".into(),
            }
        }
        ActionKind::Http => method(&ctx.method),
    }
}

/// Converts the request path's `Instant`s to wall-clock times, from one reading of both.
struct Clock {
    now: Instant,
    wall: SystemTime,
}

impl Clock {
    fn wall(&self, at: Instant) -> SystemTime {
        self.wall
            .checked_sub(self.now.saturating_duration_since(at))
            .unwrap_or(self.wall)
    }
}

impl SpanExport {
    /// The sampling ratio for new traces (the propagation stage decides with it too).
    pub fn sampling_ratio(&self) -> f64 {
        self.sampling_ratio
    }

    fn send(&self, span: SpanData) {
        if !self.queue.push(span) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)] // one call per span kind, each naming every field
    fn span(
        &self,
        ctx: &Context,
        id: [u8; 8],
        parent: Option<[u8; 8]>,
        kind: SpanKind,
        name: Cow<'static, str>,
        times: (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(ctx.trace_id.0),
                SpanId::from_bytes(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: parent.is_some() && id == ctx.span_id,
            span_kind: kind,
            name,
            start_time: times.0,
            end_time: times.1,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }

    fn action_attributes(ctx: &Context, outcome: &Outcome, url: Option<&str>) -> Vec<KeyValue> {
        let denied = ctx.decisions.iter().find(|r| !r.decision.allow);
        let decision = match (denied, ctx.decisions.first()) {
            (Some(d), _) => Some(("deny", d)),
            (None, Some(d)) => Some(("allow", d)),
            (None, None) => None,
        };
        let mut attrs = vec![
            KeyValue::new(
                "portcullis.identity.spiffe_id",
                ctx.peer.spiffe_id.as_str().to_owned(),
            ),
            KeyValue::new(
                "portcullis.identity.trust_domain",
                ctx.peer.spiffe_id.trust_domain().to_owned(),
            ),
            KeyValue::new("portcullis.credentials", ctx.credentials.join(",")),
            KeyValue::new("http.request.method", method(&ctx.method)),
            KeyValue::new("server.address", ctx.destination.host.to_string()),
            KeyValue::new("server.port", i64::from(ctx.destination.port)),
            KeyValue::new("http.response.status_code", i64::from(outcome.status)),
            KeyValue::new("client.address", ctx.peer.source.ip().to_string()),
        ];
        if let Some(url) = url {
            attrs.push(KeyValue::new("url.full", url.to_owned()));
        }
        if let Some((word, rec)) = decision {
            attrs.push(KeyValue::new("portcullis.policy.decision", word));
            attrs.push(KeyValue::new(
                "portcullis.policy.reason",
                rec.decision.reason.clone(),
            ));
            attrs.push(KeyValue::new(
                "portcullis.policy.revision",
                rec.decision.revision.to_string(),
            ));
        }
        if let Some(m) = ctx.decisions.iter().find_map(|r| r.mcp.as_ref()) {
            attrs.push(KeyValue::new("mcp.method.name", m.method.clone()));
            if let Some(t) = &m.tool {
                attrs.push(KeyValue::new("gen_ai.tool.name", t.clone()));
            }
            if let Some(id) = &m.id {
                attrs.push(KeyValue::new("jsonrpc.request.id", id.to_string()));
            }
            if let Some(s) = ctx.mcp.as_ref().and_then(|r| r.session_id.clone()) {
                attrs.push(KeyValue::new("mcp.session.id", s));
            }
        }
        if let Some(code) = ctx.error {
            attrs.push(KeyValue::new("error.type", code.as_str()));
        }
        attrs
    }

    /// One child span per recorded step, parented to the action's span.
    fn children(&self, ctx: &Context, clock: &Clock, url: Option<&str>) {
        let Some(steps) = ctx.steps.as_deref() else {
            return;
        };
        for step in &steps.steps {
            let times = (clock.wall(step.start), clock.wall(step.end));
            let (kind, name, attrs, status): (_, Cow<'static, str>, _, _) = match &step.kind {
                StepKind::Policy { decision } => {
                    let Some(rec) = ctx.decisions.get(*decision) else {
                        continue;
                    };
                    let d = &rec.decision;
                    let mut attrs = vec![
                        KeyValue::new(
                            "portcullis.policy.decision",
                            if d.allow { "allow" } else { "deny" },
                        ),
                        KeyValue::new("portcullis.policy.reason", d.reason.clone()),
                        KeyValue::new("portcullis.policy.revision", d.revision.to_string()),
                        KeyValue::new(
                            "portcullis.policy.eval_time_us",
                            i64::try_from(d.eval_time.as_micros()).unwrap_or(i64::MAX),
                        ),
                    ];
                    if let Some(m) = &rec.mcp {
                        attrs.push(KeyValue::new("mcp.method.name", m.method.clone()));
                        if let Some(t) = &m.tool {
                            attrs.push(KeyValue::new("gen_ai.tool.name", t.clone()));
                        }
                    }
                    (
                        SpanKind::Internal,
                        "policy.evaluate".into(),
                        attrs,
                        Status::Unset,
                    )
                }
                StepKind::Credential {
                    name,
                    cache_hit,
                    error,
                } => {
                    let mut attrs = vec![KeyValue::new("portcullis.credential.name", name.clone())];
                    if let Some(hit) = cache_hit {
                        attrs.push(KeyValue::new("portcullis.credential.cache_hit", *hit));
                    }
                    let status = if *error {
                        attrs.push(KeyValue::new("error.type", "credential_unavailable"));
                        Status::error("credential_unavailable")
                    } else {
                        Status::Unset
                    };
                    (SpanKind::Internal, "credential.fetch".into(), attrs, status)
                }
                StepKind::Upstream { status, error } => {
                    let mut attrs = vec![
                        KeyValue::new("http.request.method", method(&ctx.method)),
                        KeyValue::new("server.address", ctx.destination.host.to_string()),
                        KeyValue::new("server.port", i64::from(ctx.destination.port)),
                    ];
                    if let Some(url) = url {
                        attrs.push(KeyValue::new("url.full", url.to_owned()));
                    }
                    if let Some(s) = status {
                        attrs.push(KeyValue::new("http.response.status_code", i64::from(*s)));
                    }
                    // HTTP semconv: a client span is an error for 4xx and 5xx and for
                    // failures with no response.
                    let failed = match (error, status) {
                        (Some(code), _) => Some(code.as_str().to_owned()),
                        (None, Some(s)) if *s >= 400 => Some(s.to_string()),
                        _ => None,
                    };
                    let status = match failed {
                        Some(why) => {
                            attrs.push(KeyValue::new("error.type", why.clone()));
                            Status::error(why)
                        }
                        None => Status::Unset,
                    };
                    (SpanKind::Client, method(&ctx.method), attrs, status)
                }
            };
            self.send(self.span(
                ctx,
                step.span_id,
                Some(ctx.span_id),
                kind,
                name,
                times,
                attrs,
                status,
            ));
        }
    }
}

/// `url.full` without the query string (it may hold placeholders or data).
fn url(ctx: &Context) -> String {
    let mut u = String::with_capacity(ctx.path.len() + 48);
    let _ = write!(
        u,
        "{}://{}{}",
        ctx.destination.scheme.as_str(),
        ctx.destination,
        ctx.path
    );
    u
}

/// The method as a string, without an allocation for the standard ones.
fn method(m: &http::Method) -> Cow<'static, str> {
    use http::Method;
    let known = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    match known.iter().find(|(k, _)| k == m) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(m.as_str().to_owned()),
    }
}

#[async_trait::async_trait]
impl Filter for SpanExport {
    fn name(&self) -> &'static str {
        "span_export"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        // Actions refused before the propagation stage ran have no steps but are sampled the
        // same way (the decision depends only on the ids and flags).
        if ctx.steps.is_none()
            && !sampled(
                &ctx.trace_id.0,
                ctx.parent_span_id.is_some(),
                ctx.trace_flags,
                self.sampling_ratio,
            )
        {
            return;
        }
        let clock = Clock {
            now: Instant::now(),
            wall: SystemTime::now(),
        };
        let status = match ctx.error {
            Some(code) => Status::error(code.as_str()),
            None => Status::Unset,
        };
        let url = (ctx.kind != ActionKind::Connect).then(|| url(ctx));
        let action = self.span(
            ctx,
            ctx.span_id,
            ctx.parent_span_id,
            SpanKind::Server,
            span_name(ctx),
            (clock.wall(ctx.started), clock.wall),
            Self::action_attributes(ctx, outcome, url.as_deref()),
            status,
        );
        self.send(action);
        self.children(ctx, &clock, url.as_deref());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
    use std::sync::atomic::AtomicBool;

    /// An exporter that fails while `down` is set and counts what it accepted.
    #[derive(Debug, Default)]
    struct Fake {
        down: Arc<AtomicBool>,
        got: Arc<AtomicU64>,
    }

    impl opentelemetry_sdk::trace::SpanExporter for Fake {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.down.load(Ordering::SeqCst) {
                return Err(OTelSdkError::InternalFailure("down".into()));
            }
            self.got.fetch_add(batch.len() as u64, Ordering::SeqCst);
            Ok(())
        }
    }

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([1; 16]),
                SpanId::from_bytes([2; 8]),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "GET".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("t").build(),
        }
    }

    fn stage(queue: Arc<Queue>, stats: Arc<ExportStats>) -> SpanExport {
        SpanExport {
            queue,
            stats,
            sampling_ratio: 1.0,
            scope: InstrumentationScope::builder("t").build(),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let stats = Arc::new(ExportStats::default());
        let queue = Arc::new(Queue::new(&Batching {
            queue: 2,
            batch: 2,
            delay: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }));
        let stage = stage(queue, stats.clone());
        for _ in 0..5 {
            stage.send(span());
        }
        assert_eq!(stats.dropped.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn failed_exports_are_counted_then_delivery_resumes() {
        let stats = Arc::new(ExportStats::default());
        let fake = Fake::default();
        let (down, got) = (fake.down.clone(), fake.got.clone());
        down.store(true, Ordering::SeqCst);
        let cfg = Batching {
            queue: 16,
            batch: 4,
            delay: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
        };
        let queue = Arc::new(Queue::new(&cfg));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(export_loop(
            fake,
            queue.clone(),
            cfg,
            stats.clone(),
            stop_rx,
        ));
        let stage = stage(queue, stats.clone());
        for _ in 0..4 {
            stage.send(span());
        }
        let wait = |what: &'static str, f: Box<dyn Fn() -> bool>| async move {
            for _ in 0..500 {
                if f() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{what}");
        };
        let s = stats.clone();
        wait(
            "the failed batch",
            Box::new(move || s.dropped.load(Ordering::SeqCst) == 4),
        )
        .await;
        assert!(stats.export_errors.load(Ordering::SeqCst) >= 1);
        down.store(false, Ordering::SeqCst);
        for _ in 0..3 {
            stage.send(span());
        }
        // Shutdown flushes what is queued.
        let (done_tx, done_rx) = oneshot::channel();
        stop_tx.send(done_tx).unwrap();
        done_rx.await.unwrap();
        task.await.unwrap();
        assert_eq!(got.load(Ordering::SeqCst), 3);
        assert_eq!(stats.exported.load(Ordering::SeqCst), 3);
        assert_eq!(stats.dropped.load(Ordering::SeqCst), 4);
    }
}
