//! OpenTelemetry export: one span per action (CONNECT, HTTP request, MCP request), ended in the
//! logging phase, with the identity, policy and HTTP/MCP semantic-convention attributes of the
//! DESIGN contract, exported over OTLP (gRPC or HTTP/protobuf) by a bounded batch processor so
//! a slow or dead collector never blocks a request. The span uses the ids the proxy already
//! gave the action (and sent upstream in `traceparent`), through a thread-local id generator.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer, TracerProvider as _,
};
use opentelemetry::{Context as OtelContext, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{IdGenerator, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use portcullis_filters::{ActionKind, Context, Filter, Outcome};

use crate::config::TelemetryConfig;

thread_local! {
    /// The ids of the span about to be built on this thread.
    static NEXT_IDS: Cell<Option<([u8; 16], [u8; 8])>> = const { Cell::new(None) };
}

/// Hands the SDK the ids Portcullis chose for the action; random ones otherwise.
#[derive(Debug)]
struct ActionIds;

impl IdGenerator for ActionIds {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.with(Cell::get) {
            Some((t, _)) => TraceId::from_bytes(t),
            None => TraceId::from_bytes(rand::random()),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.with(Cell::get) {
            Some((_, s)) => SpanId::from_bytes(s),
            None => SpanId::from_bytes(rand::random()),
        }
    }
}

/// The configured exporter, if any (none: spans are not exported; logs still carry ids).
pub struct Telemetry {
    provider: SdkTracerProvider,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Telemetry {
    /// From `telemetry.*`, falling back to the standard `OTEL_*` variables.
    pub fn init(cfg: &TelemetryConfig) -> Result<Option<Telemetry>, String> {
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
        let exporter = match protocol.as_str() {
            "grpc" => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
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
                    .with_timeout(Duration::from_secs(5))
                    .build()
            }
            other => {
                return Err(format!(
                    "telemetry.otlp_protocol {other:?}: use grpc or http/protobuf"
                ))
            }
        }
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
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
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_id_generator(ActionIds)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        tracing::info!(endpoint = %endpoint, protocol = %protocol, "exporting spans over OTLP");
        Ok(Some(Telemetry { provider }))
    }

    pub fn filter(&self) -> SpanExport {
        SpanExport {
            tracer: self.provider.tracer("portcullis"),
        }
    }

    /// Flush what is queued (bounded by the exporter timeout).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "span exporter shutdown");
        }
    }
}

/// The logging-phase stage that emits the action's span.
pub struct SpanExport {
    tracer: opentelemetry_sdk::trace::SdkTracer,
}

impl std::fmt::Debug for SpanExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanExport")
    }
}

fn span_name(ctx: &Context) -> String {
    match ctx.kind {
        ActionKind::Connect => format!("CONNECT {}", ctx.destination.authority()),
        ActionKind::Mcp => {
            let first = ctx.decisions.iter().find_map(|r| r.mcp.as_ref());
            match first {
                Some(m) => match &m.tool {
                    Some(t) => format!("{} {t}", m.method),
                    None => m.method.clone(),
                },
                None => "mcp".into(),
            }
        }
        ActionKind::Http => ctx.method.to_string(),
    }
}

#[async_trait::async_trait]
impl Filter for SpanExport {
    fn name(&self) -> &'static str {
        "span_export"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        let end = SystemTime::now();
        let start = end.checked_sub(outcome.duration).unwrap_or(end);
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
            KeyValue::new("http.request.method", ctx.method.to_string()),
            KeyValue::new("server.address", ctx.destination.host.to_string()),
            KeyValue::new("server.port", i64::from(ctx.destination.port)),
            KeyValue::new("http.response.status_code", i64::from(outcome.status)),
            KeyValue::new("client.address", ctx.peer.source.ip().to_string()),
        ];
        if ctx.kind != ActionKind::Connect {
            // The query string may hold placeholders or data: only the path is recorded.
            attrs.push(KeyValue::new(
                "url.full",
                format!(
                    "{}://{}{}",
                    ctx.destination.scheme.as_str(),
                    ctx.destination.authority(),
                    ctx.path
                ),
            ));
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
        let parent = match ctx.parent_span_id {
            Some(p) => OtelContext::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(ctx.trace_id.0),
                SpanId::from_bytes(p),
                TraceFlags::new(ctx.trace_flags),
                true,
                TraceState::default(),
            )),
            None => OtelContext::new(),
        };
        NEXT_IDS.with(|ids| ids.set(Some((ctx.trace_id.0, ctx.span_id))));
        let mut span = self
            .tracer
            .span_builder(span_name(ctx))
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        NEXT_IDS.with(|ids| ids.set(None));
        if ctx.error.is_some() {
            let why = ctx.error.map(|c| c.as_str()).unwrap_or("error");
            opentelemetry::trace::Span::set_status(&mut span, Status::error(why));
        }
        opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
    }
}
