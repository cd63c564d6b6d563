//! The access log: one line per action at the end of its logging phase (target
//! `portcullis::access`). It shows the path but never the query string, and no header values.

use portcullis_filters::pipeline::span_hex;
use portcullis_filters::{Context, Filter, Outcome};

#[derive(Debug)]
pub struct AccessLog;

impl Filter for AccessLog {
    fn name(&self) -> &'static str {
        "access_log"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        tracing::info!(
            target: "portcullis::access",
            spiffe_id = %ctx.peer.spiffe_id,
            source = %ctx.peer.source,
            kind = ctx.kind.as_str(),
            method = %ctx.method,
            host = %ctx.destination.host,
            port = ctx.destination.port,
            path = %ctx.path,
            status = outcome.status,
            error = ctx.error.map(|e| e.as_str()).unwrap_or(""),
            bytes = outcome.bytes,
            duration_ms = outcome.duration.as_secs_f64() * 1000.0,
            trace_id = %ctx.trace.id,
            span_id = %span_hex(&ctx.trace.span_id),
            "access"
        );
    }
}
