//! Span export. Each action's span (CONNECT, HTTP request, MCP request) and its child spans
//! (`policy.evaluate`, `credential.fetch`, the upstream HTTP client call) are built at logging
//! time from what the request path recorded in its `Context` (ids, decisions, step timings):
//! nothing runs on the request path. They go either to an OTLP collector — encoded straight
//! to protobuf (`otlp.rs`) into a bounded queue that one export task drains in batches; a full
//! queue or a failed export drops spans and counts them, so a slow or dead collector never
//! blocks a request — or, as one compact line per action, to the log (`dev` without a
//! collector), so a new user sees the identity link at once.

pub(crate) mod access_log;
pub(crate) mod decision_log;
pub(crate) mod metrics;
pub(crate) mod otlp;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use portcullis_filters::parse::destination::Host;
use portcullis_filters::pipeline::timing::{sampled, Step, StepKind};
use portcullis_filters::pipeline::{span_hex, DecisionRecord, McpSummary};
use portcullis_filters::{ActionKind, Context, Filter, Outcome};
use tokio::sync::{oneshot, Notify};

use crate::config::{OtlpEndpoint, OtlpProtocol, TelemetryConfig, UpstreamConfig, ValueOrRef};
use crate::telemetry::otlp::{Attributes, Encoder, Envelope, Kind, SpanHead, Transport};

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

/// Encoded spans waiting for export, and where each action's spans end: a batch is cut
/// between actions.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Per queued action: its end offset in `bytes` and the spans queued up to there.
    marks: Vec<(usize, usize)>,
}

impl Pending {
    fn spans(&self) -> usize {
        self.marks.last().map_or(0, |m| m.1)
    }
}

/// The spans waiting for export: bounded in spans, and the export task is woken only when a
/// batch is full (a wake-up per span cost more than encoding the span).
struct Queue {
    pending: std::sync::Mutex<Pending>,
    capacity: usize,
    batch: usize,
    full: Notify,
}

impl Queue {
    fn new(cfg: &Batching) -> Queue {
        Queue {
            pending: std::sync::Mutex::default(),
            capacity: cfg.queue,
            batch: cfg.batch,
            full: Notify::new(),
        }
    }

    /// One action's encoded spans; false when they do not fit (they are dropped).
    fn push(&self, encoded: &[u8], spans: usize) -> bool {
        let Ok(mut q) = self.pending.lock() else {
            return false;
        };
        let before = q.spans();
        if before + spans > self.capacity {
            return false;
        }
        q.bytes.extend_from_slice(encoded);
        let end = q.bytes.len();
        q.marks.push((end, before + spans));
        drop(q);
        if before < self.batch && before + spans >= self.batch {
            self.full.notify_one();
        }
        true
    }

    /// Up to one batch of whole actions, oldest first, with its span count; only a full
    /// batch unless `partial`.
    fn take(&self, partial: bool) -> Option<(Vec<u8>, usize)> {
        let mut q = self.pending.lock().ok()?;
        let total = q.spans();
        if total == 0 || (total < self.batch && !partial) {
            return None;
        }
        if total <= self.batch {
            q.marks.clear();
            return Some((std::mem::take(&mut q.bytes), total));
        }
        // The last action that still fits; the first always goes.
        let cut = q.marks.iter().rposition(|m| m.1 <= self.batch).unwrap_or(0);
        let (end, n) = q.marks[cut];
        let bytes = q.bytes.drain(..end).collect();
        q.marks.drain(..=cut);
        for m in &mut q.marks {
            m.0 -= end;
            m.1 -= n;
        }
        Some((bytes, n))
    }
}

/// The batch settings, from the standard `OTEL_BSP_*` variables (OpenTelemetry's defaults).
#[derive(Debug, Clone, Copy)]
struct Batching {
    queue: usize,
    batch: usize,
    delay: Duration,
    /// Per export call: the smaller of `OTEL_BSP_EXPORT_TIMEOUT` (30 s) and
    /// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` (10 s).
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
        let otlp = otlp::timeout_from(
            env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
                .as_deref(),
            Duration::from_secs(10),
        );
        Batching {
            queue,
            batch: batch.min(queue),
            delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            timeout: Duration::from_millis(num("OTEL_BSP_EXPORT_TIMEOUT", 30_000)).min(otlp),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The first of `vars` that is set, parsed; an error names the variable.
fn from_env<T>(
    vars: &[&str],
    parse: impl FnOnce(String) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match vars.iter().find_map(|var| Some((var, env(var)?))) {
        Some((var, value)) => parse(value).map(Some).map_err(|e| format!("{var}: {e}")),
        None => Ok(None),
    }
}

/// The export side: queue, counters, and the task that drains the queue.
struct Export {
    queue: Arc<Queue>,
    stats: Arc<ExportStats>,
    shutdown: std::sync::Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
}

/// Span output as configured: an OTLP exporter, the summary line, both, or neither (then
/// `init` returns `None`; logs still carry the ids).
pub struct Telemetry {
    export: Option<Export>,
    summary: bool,
    sampling_ratio: f64,
}

impl Telemetry {
    /// From `telemetry.*`, falling back to the standard `OTEL_*` variables. Must run inside
    /// the Tokio runtime: it spawns the export task.
    pub fn init(
        cfg: &TelemetryConfig,
        stats: Arc<ExportStats>,
    ) -> Result<Option<Telemetry>, String> {
        let endpoint = match &cfg.otlp_endpoint {
            Some(e) => Some(e.clone()),
            None => from_env(
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                ],
                |v| OtlpEndpoint::try_from(v).map_err(str::to_owned),
            )?,
        };
        let export = match endpoint {
            Some(endpoint) => Some(Self::exporter(cfg, &endpoint, stats)?),
            None => None,
        };
        if export.is_none() && !cfg.span_summary {
            return Ok(None);
        }
        Ok(Some(Telemetry {
            export,
            summary: cfg.span_summary,
            sampling_ratio: cfg.sampling_ratio,
        }))
    }

    fn exporter(
        cfg: &TelemetryConfig,
        endpoint: &OtlpEndpoint,
        stats: Arc<ExportStats>,
    ) -> Result<Export, String> {
        let protocol = match cfg.otlp_protocol {
            Some(p) => p,
            None => from_env(
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                ],
                OtlpProtocol::try_from,
            )?
            .unwrap_or(OtlpProtocol::Grpc),
        };
        let headers = export_headers(cfg)?;
        let roots = UpstreamConfig {
            extra_roots: cfg.otlp_ca.iter().cloned().collect(),
            ..UpstreamConfig::default()
        };
        let tls = crate::upstream::client_tls_config(&roots, Vec::new())
            .map_err(|e| format!("telemetry.otlp_ca: {e}"))?;
        let transport = Transport::new(protocol, endpoint, headers, tls)
            .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        let envelope = envelope(cfg)?;
        let batching = Batching::from_env();
        let queue = Arc::new(Queue::new(&batching));
        let (stop_tx, stop_rx) = oneshot::channel();
        tracing::info!(url = %transport.describe(), protocol = %protocol, "exporting spans over OTLP");
        tokio::spawn(export_loop(
            Sender {
                transport,
                envelope,
            },
            queue.clone(),
            batching,
            stats.clone(),
            stop_rx,
        ));
        Ok(Export {
            queue,
            stats,
            shutdown: std::sync::Mutex::new(Some(stop_tx)),
        })
    }

    pub fn filter(&self) -> SpanExport {
        SpanExport {
            otlp: self
                .export
                .as_ref()
                .map(|e| (e.queue.clone(), e.stats.clone())),
            summary: self.summary,
            sampling_ratio: self.sampling_ratio,
        }
    }

    /// Export what is queued, then stop the export task (bounded by the export timeout; the
    /// caller bounds the wait too).
    pub async fn shutdown(&self) {
        let stop = self
            .export
            .as_ref()
            .and_then(|e| e.shutdown.lock().ok().and_then(|mut s| s.take()));
        if let Some(stop) = stop {
            let (done_tx, done_rx) = oneshot::channel();
            if stop.send(done_tx).is_ok() {
                let _ = done_rx.await;
            }
        }
    }
}

/// The resource (`service.name` from the config, else `OTEL_SERVICE_NAME`, else
/// `portcullis`; `service.version`; a random `service.instance.id`; then what
/// `OTEL_RESOURCE_ATTRIBUTES` adds) and the instrumentation scope, encoded once.
fn envelope(cfg: &TelemetryConfig) -> Result<Envelope, String> {
    let service = cfg
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "portcullis".into());
    let version = env!("CARGO_PKG_VERSION");
    let mut resource = vec![
        ("service.name".to_owned(), service),
        ("service.version".to_owned(), version.to_owned()),
        (
            "service.instance.id".to_owned(),
            format!("{:032x}", rand::random::<u128>()),
        ),
    ];
    if let Some(extra) = env("OTEL_RESOURCE_ATTRIBUTES") {
        for (k, v) in
            otlp::parse_pairs(&extra).map_err(|e| format!("OTEL_RESOURCE_ATTRIBUTES: {e}"))?
        {
            if !resource.iter().any(|(name, _)| *name == k) {
                resource.push((k, v));
            }
        }
    }
    let resource: Vec<(&str, &str)> = resource
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Ok(Envelope::new(&resource, "portcullis", version))
}

/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (else `OTEL_EXPORTER_OTLP_HEADERS`), then
/// `telemetry.otlp_headers` on top. Errors never include a value.
fn export_headers(
    cfg: &TelemetryConfig,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    let mut headers = match env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
    {
        Some(list) => {
            otlp::parse_headers(&list).map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {e}"))?
        }
        None => Vec::new(),
    };
    for (name, value) in &cfg.otlp_headers {
        let key = || format!("telemetry.otlp_headers.{name}");
        let value = match value {
            ValueOrRef::Ref(r) => {
                let secret = r.resolve().map_err(|e| format!("{}: {e}", key()))?;
                otlp::header(name, secret.expose())
            }
            ValueOrRef::Value(v) => otlp::header(name, v),
        }
        .map_err(|e| format!("{}: {e}", key()))?;
        headers.retain(|(n, _)| *n != value.0);
        headers.push(value);
    }
    Ok(headers)
}

/// What the export task sends with.
struct Sender {
    transport: Transport,
    envelope: Envelope,
}

/// The export task: batches of up to `batch` spans, sent when one is full or every `delay`,
/// one export at a time, each bounded by `timeout`. Spans of a failed batch are counted as
/// dropped (no retry: the queue behind it would only grow).
async fn export_loop(
    sender: Sender,
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
        while let Some((spans, n)) = queue.take(partial) {
            let result =
                tokio::time::timeout(cfg.timeout, sender.transport.send(&sender.envelope, &spans))
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {:?}", cfg.timeout)));
            count(result, n as u64, &stats, &mut failing);
        }
        if let Some(done) = done {
            if let Ok(done) = done {
                let _ = done.send(());
            }
            return;
        }
    }
}

fn count(result: Result<(), String>, n: u64, stats: &ExportStats, failing: &mut bool) {
    match result {
        Ok(()) => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
            if std::mem::take(failing) {
                tracing::info!("span export works again");
            }
        }
        Err(e) => {
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
    otlp: Option<(Arc<Queue>, Arc<ExportStats>)>,
    summary: bool,
    sampling_ratio: f64,
}

impl std::fmt::Debug for SpanExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanExport")
    }
}

/// Per-thread scratch space: encoding allocates nothing once these have grown.
#[derive(Default)]
struct Scratch {
    enc: Encoder,
    name: String,
    url: String,
    text: String,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Scratch buffers above this are given back after use (one huge action does not pin memory).
const SCRATCH_KEEP: usize = 64 * 1024;

/// Converts the request path's `Instant`s to Unix nanoseconds, from one reading of both.
struct Clock {
    now: Instant,
    wall: u64,
}

impl Clock {
    fn read() -> Clock {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Clock {
            now: Instant::now(),
            wall,
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        let ago = self.now.saturating_duration_since(at).as_nanos();
        self.wall
            .saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX))
    }
}

/// The action's span name: `CONNECT {host}:{port}`, `{METHOD}`, or `{method} {tool}` (MCP).
fn span_name(ctx: &Context, out: &mut String) {
    out.clear();
    let _ = match ctx.kind {
        ActionKind::Connect => write!(out, "CONNECT {}", ctx.destination),
        ActionKind::Mcp => match mcp(ctx) {
            Some(m) => match &m.tool {
                Some(t) => write!(out, "{} {t}", m.method),
                None => write!(out, "{}", m.method),
            },
            None => write!(out, "mcp"),
        },
        ActionKind::Http => write!(out, "{}", ctx.method),
    };
}

/// `url.full` without the query string (it may hold placeholders or data).
fn url(ctx: &Context, out: &mut String) {
    out.clear();
    let _ = write!(
        out,
        "{}://{}{}",
        ctx.destination.scheme.as_str(),
        ctx.destination,
        ctx.path
    );
}

/// The first MCP message's summary.
fn mcp(ctx: &Context) -> Option<&McpSummary> {
    ctx.decisions.iter().find_map(|r| r.mcp.as_ref())
}

/// The action's verdict: the first denial if any, else the first decision.
fn verdict(ctx: &Context) -> Option<(&'static str, &DecisionRecord)> {
    match ctx.decisions.iter().find(|r| !r.decision.allow) {
        Some(d) => Some(("deny", d)),
        None => ctx.decisions.first().map(|d| ("allow", d)),
    }
}

/// Names joined with commas, without building the string first.
struct Joined<'a>(&'a [String]);

impl std::fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(s)?;
        }
        Ok(())
    }
}

/// `jsonrpc.request.id`: a string id as it is, a number as written.
fn write_id(a: &mut Attributes<'_>, id: &serde_json::Value) {
    match id {
        serde_json::Value::String(s) => a.str("jsonrpc.request.id", s),
        other => a.display("jsonrpc.request.id", other),
    }
}

fn server_address(a: &mut Attributes<'_>, ctx: &Context) {
    match &ctx.destination.host {
        Host::Dns(name) => a.str("server.address", name),
        ip => a.display("server.address", ip),
    }
}

fn action_attributes(a: &mut Attributes<'_>, ctx: &Context, outcome: &Outcome, url: Option<&str>) {
    a.str("portcullis.identity.spiffe_id", ctx.peer.spiffe_id.as_str());
    a.str(
        "portcullis.identity.trust_domain",
        ctx.peer.spiffe_id.trust_domain(),
    );
    match &ctx.credentials.names[..] {
        [] => a.str("portcullis.credentials", ""),
        [one] => a.str("portcullis.credentials", one),
        many => a.display("portcullis.credentials", Joined(many)),
    }
    a.str("http.request.method", ctx.method.as_str());
    server_address(a, ctx);
    a.int("server.port", i64::from(ctx.destination.port));
    a.int("http.response.status_code", i64::from(outcome.status));
    a.str("client.address", &ctx.peer.source_ip);
    if let Some(url) = url {
        a.str("url.full", url);
    }
    if let Some((word, rec)) = verdict(ctx) {
        a.str("portcullis.policy.decision", word);
        a.str("portcullis.policy.reason", &rec.decision.reason);
        a.str("portcullis.policy.revision", &rec.decision.revision);
    }
    if let Some(m) = mcp(ctx) {
        a.str("mcp.method.name", &m.method);
        if let Some(t) = &m.tool {
            a.str("gen_ai.tool.name", t);
        }
        if let Some(id) = &m.id {
            write_id(a, id);
        }
        if let Some(s) = ctx
            .mcp
            .request
            .as_ref()
            .and_then(|r| r.session_id.as_deref())
        {
            a.str("mcp.session.id", s);
        }
    }
    if let Some(code) = ctx.error {
        a.str("error.type", code.as_str());
    }
}

/// Why an upstream call failed, for its client span: the error code, or the status for 4xx
/// and 5xx (HTTP semconv: a client span is an error then).
fn upstream_failure(
    status: Option<u16>,
    error: Option<portcullis_filters::ErrorCode>,
    text: &mut String,
) -> Option<&str> {
    match (error, status) {
        (Some(code), _) => Some(code.as_str()),
        (None, Some(s)) if s >= 400 => {
            text.clear();
            let _ = write!(text, "{s}");
            Some(text.as_str())
        }
        _ => None,
    }
}

impl SpanExport {
    /// The sampling ratio for new traces (the propagation stage decides with it too).
    pub fn sampling_ratio(&self) -> f64 {
        self.sampling_ratio
    }

    /// Encode the action's span and one child span per recorded step into `s.enc.out`;
    /// returns how many spans.
    fn encode(&self, ctx: &Context, outcome: &Outcome, s: &mut Scratch) -> usize {
        let clock = Clock::read();
        span_name(ctx, &mut s.name);
        let has_url = ctx.kind != ActionKind::Connect;
        if has_url {
            url(ctx, &mut s.url);
        }
        let url = has_url.then_some(s.url.as_str());
        s.enc.span(
            &SpanHead {
                trace_id: ctx.trace.id.0,
                span_id: ctx.trace.span_id,
                parent: ctx.trace.parent_span_id,
                parent_is_remote: ctx.trace.parent_span_id.is_some(),
                kind: Kind::Server,
                name: &s.name,
                start: clock.nanos(ctx.started),
                end: clock.wall,
                error: ctx.error.map(|e| e.as_str()),
            },
            |a| action_attributes(a, ctx, outcome, url),
        );
        let steps = ctx.trace.steps.as_deref().map_or(&[][..], |s| &s.steps[..]);
        let mut n = 1;
        for step in steps {
            let head = |kind, name, error| SpanHead {
                trace_id: ctx.trace.id.0,
                span_id: step.span_id,
                parent: Some(ctx.trace.span_id),
                parent_is_remote: false,
                kind,
                name,
                start: clock.nanos(step.start),
                end: clock.nanos(step.end),
                error,
            };
            match &step.kind {
                StepKind::Policy { decision } => {
                    let Some(rec) = ctx.decisions.get(*decision) else {
                        continue;
                    };
                    s.enc
                        .span(&head(Kind::Internal, "policy.evaluate", None), |a| {
                            let d = &rec.decision;
                            a.str(
                                "portcullis.policy.decision",
                                if d.allow { "allow" } else { "deny" },
                            );
                            a.str("portcullis.policy.reason", &d.reason);
                            a.str("portcullis.policy.revision", &d.revision);
                            a.int(
                                "portcullis.policy.eval_time_us",
                                i64::try_from(d.eval_time.as_micros()).unwrap_or(i64::MAX),
                            );
                            if let Some(m) = &rec.mcp {
                                a.str("mcp.method.name", &m.method);
                                if let Some(t) = &m.tool {
                                    a.str("gen_ai.tool.name", t);
                                }
                            }
                        });
                }
                StepKind::Credential {
                    name,
                    cache_hit,
                    error,
                } => {
                    let failed = error.then_some("credential_unavailable");
                    s.enc
                        .span(&head(Kind::Internal, "credential.fetch", failed), |a| {
                            a.str("portcullis.credential.name", name);
                            if let Some(hit) = cache_hit {
                                a.bool("portcullis.credential.cache_hit", *hit);
                            }
                            if let Some(why) = failed {
                                a.str("error.type", why);
                            }
                        });
                }
                StepKind::Upstream { status, error } => {
                    let failed = upstream_failure(*status, *error, &mut s.text);
                    s.enc
                        .span(&head(Kind::Client, ctx.method.as_str(), failed), |a| {
                            a.str("http.request.method", ctx.method.as_str());
                            server_address(a, ctx);
                            a.int("server.port", i64::from(ctx.destination.port));
                            if let Some(url) = url {
                                a.str("url.full", url);
                            }
                            if let Some(st) = status {
                                a.int("http.response.status_code", i64::from(*st));
                            }
                            if let Some(why) = failed {
                                a.str("error.type", why);
                            }
                        });
                }
            }
            n += 1;
        }
        n
    }

    fn export(&self, queue: &Queue, stats: &ExportStats, ctx: &Context, outcome: &Outcome) {
        SCRATCH.with_borrow_mut(|s| {
            s.enc.out.clear();
            let n = self.encode(ctx, outcome, s);
            if !queue.push(&s.enc.out, n) {
                stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
            }
            if s.enc.out.capacity() > SCRATCH_KEEP {
                *s = Scratch::default();
            }
        });
    }
}

/// The summary line: the action, who, the verdict, the ids, then each step with its time.
/// Like the access log: no query string, no header values, no credential values.
fn summary(ctx: &Context, outcome: &Outcome) {
    SCRATCH.with_borrow_mut(|s| {
        span_name(ctx, &mut s.name);
        let line = &mut s.text;
        line.clear();
        line.push_str(&s.name);
        if ctx.kind != ActionKind::Connect {
            url(ctx, &mut s.url);
            line.push(' ');
            line.push_str(&s.url);
        }
        let _ = write!(
            line,
            " -> {} in {:.1?} | {}",
            outcome.status, outcome.duration, ctx.peer.spiffe_id
        );
        if let Some((word, rec)) = verdict(ctx) {
            let _ = write!(line, " {word} {:?}", rec.decision.reason);
        }
        if let Some(code) = ctx.error {
            let _ = write!(line, " error={}", code.as_str());
        }
        if !ctx.credentials.names.is_empty() {
            let _ = write!(line, " credentials={}", Joined(&ctx.credentials.names));
        }
        let _ = write!(
            line,
            " | trace={} span={}",
            ctx.trace.id,
            span_hex(&ctx.trace.span_id)
        );
        if let Some(p) = ctx.trace.parent_span_id {
            let _ = write!(line, " parent={}", span_hex(&p));
        }
        let steps = ctx.trace.steps.as_deref().map_or(&[][..], |s| &s.steps[..]);
        for (i, step) in steps.iter().enumerate() {
            line.push_str(if i == 0 { " | " } else { ", " });
            summary_step(line, ctx, step);
        }
        tracing::info!(target: "portcullis::span", "{line}");
        if line.capacity() > SCRATCH_KEEP {
            *line = String::new();
        }
    });
}

fn summary_step(line: &mut String, ctx: &Context, step: &Step) {
    let took = step.end.saturating_duration_since(step.start);
    let _ = match &step.kind {
        StepKind::Policy { decision } => {
            let word = match ctx.decisions.get(*decision) {
                Some(r) if r.decision.allow => "allow",
                Some(_) => "deny",
                None => "?",
            };
            write!(line, "policy.evaluate {took:.1?} {word}")
        }
        StepKind::Credential {
            name,
            cache_hit,
            error,
        } => {
            let how = match (error, cache_hit) {
                (true, _) => " unavailable",
                (false, Some(true)) => " cached",
                (false, Some(false)) => " fetched",
                (false, None) => "",
            };
            write!(line, "credential.fetch {name} {took:.1?}{how}")
        }
        StepKind::Upstream { status, error } => {
            let _ = write!(line, "upstream {} {took:.1?}", ctx.method);
            match (status, error) {
                (_, Some(code)) => write!(line, " {}", code.as_str()),
                (Some(s), None) => write!(line, " {s}"),
                (None, None) => Ok(()),
            }
        }
    };
}

#[async_trait::async_trait]
impl Filter for SpanExport {
    fn name(&self) -> &'static str {
        "span_export"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        // Actions refused before the propagation stage ran have no steps but are sampled the
        // same way (the decision depends only on the ids and flags).
        if ctx.trace.steps.is_none()
            && !sampled(
                &ctx.trace.id.0,
                ctx.trace.parent_span_id.is_some(),
                ctx.trace.flags,
                self.sampling_ratio,
            )
        {
            return;
        }
        if let Some((queue, stats)) = &self.otlp {
            self.export(queue, stats, ctx, outcome);
        }
        if self.summary {
            summary(ctx, outcome);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    use std::sync::atomic::AtomicBool;

    fn batching(queue: usize, batch: usize) -> Batching {
        Batching {
            queue,
            batch,
            delay: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        }
    }

    /// `n` encoded spans named after `tag`, as one action.
    fn action(tag: &str, n: usize) -> Vec<u8> {
        let mut enc = Encoder::default();
        for i in 0..n {
            enc.span(
                &SpanHead {
                    trace_id: [1; 16],
                    span_id: [u8::try_from(i + 1).unwrap(); 8],
                    parent: None,
                    parent_is_remote: false,
                    kind: Kind::Server,
                    name: tag,
                    start: 1,
                    end: 2,
                    error: None,
                },
                |a| a.str("k", "v"),
            );
        }
        enc.out
    }

    fn names(body: &[u8]) -> Vec<String> {
        let req = ExportTraceServiceRequest::decode(body).unwrap();
        req.resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .map(|s| s.name)
            .collect()
    }

    #[test]
    fn a_full_queue_drops_whole_actions() {
        let q = Queue::new(&batching(5, 5));
        assert!(q.push(&action("a", 3), 3));
        assert!(!q.push(&action("b", 3), 3), "would exceed 5 spans");
        assert!(q.push(&action("c", 2), 2));
        assert!(!q.push(&action("d", 1), 1));
        let (bytes, n) = q.take(false).unwrap();
        assert_eq!(n, 5);
        let env = Envelope::new(&[], "t", "0");
        assert_eq!(names(&env.request(&bytes, 0)), ["a", "a", "a", "c", "c"]);
        assert!(q.take(true).is_none());
    }

    #[test]
    fn batches_are_cut_between_actions() {
        let q = Queue::new(&batching(100, 4));
        for tag in ["a", "b", "c", "d"] {
            q.push(&action(tag, 3), 3);
        }
        let env = Envelope::new(&[], "t", "0");
        // 12 spans queued, batches of at most 4: whole actions only, one per batch here.
        let (first, n) = q.take(false).unwrap();
        assert_eq!(
            (n, names(&env.request(&first, 0))),
            (3, vec!["a".to_owned(); 3])
        );
        let (second, n) = q.take(false).unwrap();
        assert_eq!(
            (n, names(&env.request(&second, 0))),
            (3, vec!["b".to_owned(); 3])
        );
        // 6 left: still a full batch's worth.
        assert!(q.take(false).is_some());
        // 3 left: only on the timer.
        assert!(q.take(false).is_none());
        let (last, n) = q.take(true).unwrap();
        assert_eq!(
            (n, names(&env.request(&last, 0))),
            (3, vec!["d".to_owned(); 3])
        );
    }

    /// An OTLP/HTTP collector that answers 503 while `down`, else decodes and counts spans,
    /// and remembers the `x-api-key` it was sent.
    async fn collector(down: Arc<AtomicBool>, got: Arc<AtomicU64>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (down, got) = (down.clone(), got.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (down, got) = (down.clone(), got.clone());
                            async move {
                                let key_ok =
                                    req.headers().get("x-api-key").is_some_and(|v| v == "k=1");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let status = if down.load(Ordering::SeqCst) || !key_ok {
                                    503
                                } else {
                                    got.fetch_add(names(&body).len() as u64, Ordering::SeqCst);
                                    200
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(bytes::Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn failed_exports_are_counted_then_delivery_resumes() {
        let (down, got) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        let addr = collector(down.clone(), got.clone()).await;
        let tls =
            crate::upstream::client_tls_config(&UpstreamConfig::default(), Vec::new()).unwrap();
        let transport = Transport::new(
            OtlpProtocol::HttpProtobuf,
            &OtlpEndpoint::try_from(format!("http://{addr}")).unwrap(),
            otlp::parse_headers("x-api-key=k%3D1").unwrap(),
            tls,
        )
        .unwrap();
        let stats = Arc::new(ExportStats::default());
        let cfg = batching(16, 4);
        let queue = Arc::new(Queue::new(&cfg));
        let (stop_tx, stop_rx) = oneshot::channel();
        let sender = Sender {
            transport,
            envelope: Envelope::new(&[("service.name", "t")], "t", "0"),
        };
        let task = tokio::spawn(export_loop(
            sender,
            queue.clone(),
            cfg,
            stats.clone(),
            stop_rx,
        ));
        assert!(queue.push(&action("a", 4), 4));
        let mut waited = 0;
        while stats.dropped.load(Ordering::SeqCst) < 4 {
            assert!(waited < 500, "the failed batch was never counted");
            waited += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stats.export_errors.load(Ordering::SeqCst) >= 1);
        down.store(false, Ordering::SeqCst);
        assert!(queue.push(&action("b", 3), 3));
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
