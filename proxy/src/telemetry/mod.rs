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
mod export;
pub(crate) mod metrics;
pub(crate) mod otlp;
mod spans;
mod summary;

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

use crate::config::{
    Invalid, OtlpEndpoint, OtlpProtocol, TelemetryConfig, UpstreamConfig, ValueOrRef,
};
use crate::telemetry::otlp::{Attributes, Encoder, Envelope, Kind, SpanHead, Transport};

pub use export::ExportStats;
use export::*;
pub use spans::SpanExport;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The first of `vars` that is set, parsed; an error names the variable.
fn from_env<T>(
    vars: &[&str],
    parse: impl FnOnce(String) -> Result<T, String>,
) -> Result<Option<T>, Invalid> {
    match vars.iter().find_map(|var| Some((var, env(var)?))) {
        Some((var, value)) => parse(value).map(Some).map_err(|e| Invalid::new(*var, e)),
        None => Ok(None),
    }
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
    ) -> Result<Option<Telemetry>, Invalid> {
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
    ) -> Result<Export, Invalid> {
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
            .map_err(|e| Invalid::new("telemetry.otlp_ca", e))?;
        let transport = Transport::new(protocol, endpoint, headers, tls)
            .map_err(|e| Invalid::new("telemetry.otlp_endpoint", e))?;
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
fn envelope(cfg: &TelemetryConfig) -> Result<Envelope, Invalid> {
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
            otlp::parse_pairs(&extra).map_err(|e| Invalid::new("OTEL_RESOURCE_ATTRIBUTES", e))?
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
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, Invalid> {
    let mut headers = match env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
    {
        Some(list) => {
            otlp::parse_headers(&list).map_err(|e| Invalid::new("OTEL_EXPORTER_OTLP_HEADERS", e))?
        }
        None => Vec::new(),
    };
    for (name, value) in &cfg.otlp_headers {
        let key = || format!("telemetry.otlp_headers.{name}");
        let value = match value {
            ValueOrRef::Ref(r) => {
                let secret = r.resolve().map_err(|e| Invalid::new(key(), e))?;
                otlp::header(name, secret.expose())
            }
            ValueOrRef::Value(v) => otlp::header(name, v),
        }
        .map_err(|e| Invalid::new(key(), e))?;
        headers.retain(|(n, _)| *n != value.0);
        headers.push(value);
    }
    Ok(headers)
}
