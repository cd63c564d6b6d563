//! The decision log: one JSON line per policy decision, written in the logging phase. It holds
//! what was decided and why (identity, action, destination, method, path, decision, reason,
//! policy revision, evaluation time), never a header value or query string.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::sync::Mutex;

use portcullis_filters::pipeline::span_hex;
use portcullis_filters::{Context, Filter, Outcome};

enum Sink {
    Stdout,
    Stderr,
    File(Mutex<LineWriter<File>>),
}

pub struct DecisionLog {
    sink: Sink,
}

impl DecisionLog {
    /// `stdout`, `stderr`, `off` (returns `None`), or a file path opened for appending.
    pub fn open(target: &str) -> std::io::Result<Option<DecisionLog>> {
        let sink = match target {
            "off" => return Ok(None),
            "stdout" => Sink::Stdout,
            "stderr" => Sink::Stderr,
            path => Sink::File(Mutex::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            ))),
        };
        Ok(Some(DecisionLog { sink }))
    }

    fn write(&self, line: &[u8]) {
        // A failed log write must not fail the request; it is reported once per failure.
        let r = match &self.sink {
            Sink::Stdout => std::io::stdout().lock().write_all(line),
            Sink::Stderr => std::io::stderr().lock().write_all(line),
            Sink::File(f) => match f.lock() {
                Ok(mut f) => f.write_all(line),
                Err(_) => Ok(()),
            },
        };
        if let Err(e) = r {
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
