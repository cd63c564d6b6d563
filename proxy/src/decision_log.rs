//! The decision log: one JSON line per policy decision, written in the logging phase. It holds
//! what was decided and why (identity, action, destination, method, path, decision, reason,
//! policy revision, evaluation time), never a header value or query string.

use std::fs::OpenOptions;
use std::io::Write;

use portcullis_filters::pipeline::span_hex;
use portcullis_filters::{Context, Filter, Outcome};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines are handed to a writer thread (no write syscall on the request path). The queue is
/// not lossy: when it is full the request waits rather than a decision going unrecorded. The
/// guard flushes what is queued when the log is dropped at shutdown.
pub struct DecisionLog {
    writer: NonBlocking,
    _flush_on_drop: WorkerGuard,
}

impl DecisionLog {
    /// `stdout`, `stderr`, `off` (returns `None`), or a file path opened for appending.
    pub fn open(target: &str) -> std::io::Result<Option<DecisionLog>> {
        let builder = NonBlockingBuilder::default().lossy(false);
        let (writer, guard) = match target {
            "off" => return Ok(None),
            "stdout" => builder.finish(std::io::stdout()),
            "stderr" => builder.finish(std::io::stderr()),
            path => builder.finish(OpenOptions::new().create(true).append(true).open(path)?),
        };
        Ok(Some(DecisionLog {
            writer,
            _flush_on_drop: guard,
        }))
    }

    fn write(&self, line: &[u8]) {
        // A failed log write must not fail the request.
        if let Err(e) = self.writer.clone().write_all(line) {
            tracing::warn!(error = %e, "cannot write the decision log");
        }
    }
}

fn now_rfc3339() -> String {
    portcullis_policy::TimeInfo::now().rfc3339
}

#[async_trait::async_trait]
impl Filter for DecisionLog {
    fn name(&self) -> &'static str {
        "decision_log"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        let time = now_rfc3339();
        for rec in &ctx.decisions {
            let d = &rec.decision;
            let mut line = serde_json::json!({
                "time": time,
                "trace_id": ctx.trace_id.to_string(),
                "span_id": span_hex(&ctx.span_id),
                "spiffe_id": ctx.peer.spiffe_id.as_str(),
                "kind": if rec.mcp.is_some() { "mcp" } else { ctx.kind.as_str() },
                "destination": ctx.destination.authority(),
                "method": ctx.method.as_str(),
                "path": ctx.path,
                "decision": if d.allow { "allow" } else { "deny" },
                "reason": d.reason,
                "policy_revision": &*d.revision,
                "eval_us": u64::try_from(d.eval_time.as_micros()).unwrap_or(u64::MAX),
                "status": outcome.status,
            });
            if let Some(route) = &ctx.gateway_route {
                line["route"] = serde_json::Value::from(&**route);
            }
            if let Some(m) = &rec.mcp {
                line["mcp"] = serde_json::json!({
                    "method": m.method, "id": m.id, "tool": m.tool, "tool_changed": m.tool_changed,
                });
            }
            let mut text = line.to_string();
            text.push('\n');
            self.write(text.as_bytes());
        }
    }
}
