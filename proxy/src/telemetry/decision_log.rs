//! The decision log: one JSON line per policy decision, written in the logging phase. It holds
//! what was decided and why (identity, action, destination, method, path, decision, reason,
//! policy revision, evaluation time), never a header value or query string.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_filters::pipeline::span_hex;
use portcullis_filters::stages::shadow::Change;
use portcullis_filters::{Context, Filter, Outcome};
use serde::Serialize;

/// How often the writer thread flushes what requests have queued.
const FLUSH_EVERY: Duration = Duration::from_millis(10);

/// Lines are appended to an in-memory buffer (no syscall, no thread wake-up on the request
/// path) that a writer thread flushes every 10 ms. Nothing on the request path ever waits for
/// the output: past `telemetry.decision_log_buffer` bytes queued (a stalled pipe), or when a
/// write fails (a full disk, a file size limit), lines are dropped and counted
/// (`portcullis_decision_log_dropped_total`). Dropping the log (shutdown) flushes the rest.
pub struct DecisionLog {
    queue: Arc<Queue>,
    max_queued: usize,
    counters: Arc<Counters>,
    /// `telemetry.decision_log_input`: the largest input written on a line.
    input_max: Option<usize>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What `/metrics` reports of the decision log.
#[derive(Debug, Default)]
pub struct Counters {
    /// Lines dropped: the output did not keep up, or failed.
    pub dropped: AtomicU64,
    /// Inputs left off their line: over `telemetry.decision_log_input_max_bytes`.
    pub input_omitted: AtomicU64,
}

#[derive(Default)]
struct Queue {
    state: Mutex<(Vec<u8>, bool)>, // (queued bytes, closed)
}

impl DecisionLog {
    /// `stdout`, `stderr`, `off` (returns `None`), or a file path opened for appending. At most
    /// `max_queued` bytes wait for the writer; lines beyond are counted as dropped.
    pub fn open(
        target: &str,
        max_queued: usize,
        counters: Arc<Counters>,
    ) -> std::io::Result<Option<DecisionLog>> {
        let out: Box<dyn Write + Send> = match target {
            "off" => return Ok(None),
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        let queue = Arc::new(Queue::default());
        let (q, c) = (queue.clone(), counters.clone());
        let writer = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_loop(&q, out, &c.dropped))?;
        Ok(Some(DecisionLog {
            queue,
            max_queued,
            counters,
            input_max: None,
            writer: Some(writer),
        }))
    }

    /// Write each decision's policy input (at most `max_bytes` of JSON) on its line.
    #[must_use]
    pub fn with_input(mut self, max_bytes: Option<usize>) -> DecisionLog {
        self.input_max = max_bytes;
        self
    }

    fn write(&self, line: &[u8]) {
        let Ok(mut state) = self.queue.state.lock() else {
            return;
        };
        if state.0.len() + line.len() > self.max_queued {
            drop(state);
            if self.counters.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("decision log output is not keeping up: dropping lines (portcullis_decision_log_dropped_total)");
            }
            return;
        }
        state.0.extend_from_slice(line);
    }
}

fn write_loop(queue: &Queue, mut out: Box<dyn Write + Send>, dropped: &AtomicU64) {
    let mut batch = Vec::new();
    // Lines lost since the output last failed (a full disk, a file size limit): counted in
    // `dropped`, said once when it starts failing and once when it recovers.
    let mut failing: Option<u64> = None;
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let closed = match queue.state.lock() {
            Ok(mut state) => {
                std::mem::swap(&mut batch, &mut state.0);
                state.1
            }
            Err(_) => return,
        };
        if !batch.is_empty() {
            // A failed log write must not fail requests: the batch is lost and counted (a
            // line cut by a short write may remain in the file, torn).
            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => {
                    if let Some(lost) = failing.take() {
                        tracing::warn!(lost, "decision log writable again");
                    }
                }
                Err(e) => {
                    let lines = batch.iter().filter(|b| **b == b'\n').count() as u64;
                    dropped.fetch_add(lines, Ordering::Relaxed);
                    if failing.is_none() {
                        tracing::warn!(error = %e, "cannot write the decision log: dropping lines (portcullis_decision_log_dropped_total)");
                    }
                    *failing.get_or_insert(0) += lines;
                }
            }
            batch.clear();
        }
        if closed {
            return;
        }
    }
}

impl Drop for DecisionLog {
    /// Flush everything queued before the process goes.
    fn drop(&mut self) {
        if let Ok(mut state) = self.queue.state.lock() {
            state.1 = true;
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn now_rfc3339() -> String {
    portcullis_policy::TimeInfo::now().rfc3339
}

/// One decision-log line.
#[derive(Serialize)]
struct Line<'a> {
    time: &'a str,
    trace_id: &'a str,
    span_id: &'a str,
    spiffe_id: &'a str,
    kind: &'a str,
    destination: &'a str,
    method: &'a str,
    path: &'a str,
    decision: &'a str,
    reason: &'a str,
    policy_revision: &'a str,
    eval_us: u64,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mcp: Option<McpLine<'a>>,
    /// Approvals the action consulted (id, state, who decided).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    approvals: &'a [ApprovalLine<'a>],
    /// The limit that refused the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limited: Option<&'a str>,
    /// Who the agent acted for (a verified delegation token; never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    delegation: Option<DelegationLine<'a>>,
    /// The shadow policy's decision on the same input (`policy.shadow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<ShadowLine<'a>>,
    /// Size of an input left off this line (over `telemetry.decision_log_input_max_bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    input_omitted: Option<usize>,
}

#[derive(Serialize)]
struct ShadowLine<'a> {
    decision: &'a str,
    reason: &'a str,
    revision: &'a str,
    /// Verdict or reason differ from the enforcing decision.
    differs: bool,
}

#[derive(Serialize)]
struct DelegationLine<'a> {
    subject: &'a str,
    issuer: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    chain: &'a [String],
}

#[derive(Serialize)]
struct ApprovalLine<'a> {
    id: &'a str,
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    decided_by: Option<&'a str>,
}

#[derive(Serialize)]
struct McpLine<'a> {
    method: &'a str,
    id: &'a Option<serde_json::Value>,
    tool: &'a Option<String>,
    tool_changed: bool,
}

impl Filter for DecisionLog {
    fn name(&self) -> &'static str {
        "decision_log"
    }

    fn logging(&self, ctx: &Context, outcome: &Outcome) {
        if ctx.decisions.is_empty() {
            return;
        }
        let time = now_rfc3339();
        let mut trace = [0u8; 32];
        let trace_id = portcullis_filters::pipeline::hex_into(&ctx.trace.id.0, &mut trace);
        let span_id = span_hex(&ctx.trace.span_id);
        let destination = ctx.destination.authority();
        let mut text = Vec::with_capacity(512);
        let approvals: Vec<ApprovalLine<'_>> = ctx
            .gates
            .approvals
            .iter()
            .map(|a| ApprovalLine {
                id: &a.id,
                state: a.state,
                decided_by: a.decided_by.as_deref(),
            })
            .collect();
        for rec in &ctx.decisions {
            let d = &rec.decision;
            let line = Line {
                time: &time,
                trace_id,
                span_id: &span_id,
                spiffe_id: ctx.peer.spiffe_id.as_str(),
                // An MCP request's own decision (without a message) is its `kind: http` one.
                kind: rec.kind(ctx.kind),
                destination: &destination,
                method: ctx.method.as_str(),
                path: &ctx.path,
                decision: if d.allow { "allow" } else { "deny" },
                reason: &d.reason,
                policy_revision: &d.revision,
                eval_us: u64::try_from(d.eval_time.as_micros()).unwrap_or(u64::MAX),
                status: outcome.status,
                route: ctx.gateway_route.as_deref(),
                mcp: rec.mcp.as_ref().map(|m| McpLine {
                    method: &m.method,
                    id: &m.id,
                    tool: &m.tool,
                    tool_changed: m.tool_changed,
                }),
                approvals: &approvals,
                rate_limited: ctx.gates.limited.as_deref(),
                delegation: ctx.delegation.as_deref().map(|d| DelegationLine {
                    subject: &d.subject,
                    issuer: &d.issuer,
                    chain: &d.chain,
                }),
                shadow: rec.shadow.as_ref().map(|s| ShadowLine {
                    decision: if s.allow { "allow" } else { "deny" },
                    reason: &s.reason,
                    revision: &s.revision,
                    differs: Change::between(d, s).is_some(),
                }),
                input_omitted: None,
            };
            let start = text.len();
            let input = self.input_max.zip(rec.input.as_ref());
            match input {
                None => {
                    if serde_json::to_writer(&mut text, &line).is_err() {
                        text.truncate(start);
                        continue;
                    }
                }
                Some((max, input)) => {
                    if !self.write_with_input(&mut text, line, input, max) {
                        text.truncate(start);
                        continue;
                    }
                }
            }
            text.push(b'\n');
        }
        self.write(&text);
    }
}

impl DecisionLog {
    /// `line` with `"input": …` as its last member, or with `input_omitted` when the input's
    /// JSON is over `max` bytes. False when nothing could be written.
    fn write_with_input(
        &self,
        text: &mut Vec<u8>,
        mut line: Line<'_>,
        input: &portcullis_policy::EngineInput,
        max: usize,
    ) -> bool {
        let mut json = Vec::with_capacity(1024);
        let fits = serde_json::to_writer(&mut json, input).is_ok() && json.len() <= max;
        if !fits {
            self.counters.input_omitted.fetch_add(1, Ordering::Relaxed);
            line.input_omitted = Some(json.len());
            return serde_json::to_writer(text, &line).is_ok();
        }
        if serde_json::to_writer(&mut *text, &line).is_err() || text.pop() != Some(b'}') {
            return false;
        }
        text.extend_from_slice(b",\"input\":");
        text.extend_from_slice(&json);
        text.push(b'}');
        true
    }
}
