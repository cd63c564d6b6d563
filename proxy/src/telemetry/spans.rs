//! The logging-phase stage that builds an action's span and its children (`policy.evaluate`,
//! `credential.fetch`, the upstream client call) from what the request path recorded in its
//! `Context`, encodes them straight to OTLP protobuf into per-thread scratch space, and hands
//! them to the export queue (or to the summary line).

use super::*;
use portcullis_filters::stages::shadow::Change;
use portcullis_policy::Decision;

/// The logging-phase stage that builds the action's span and its children.
pub struct SpanExport {
    pub(super) otlp: Option<(Arc<Queue>, Arc<ExportStats>)>,
    pub(super) summary: bool,
    pub(super) sampling_ratio: f64,
}

impl std::fmt::Debug for SpanExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanExport")
    }
}

/// Per-thread scratch space: encoding allocates nothing once these have grown.
#[derive(Default)]
pub(super) struct Scratch {
    enc: Encoder,
    pub(super) name: String,
    pub(super) url: String,
    pub(super) text: String,
}

thread_local! {
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Scratch buffers above this are given back after use (one huge action does not pin memory).
pub(super) const SCRATCH_KEEP: usize = 64 * 1024;

/// Converts the request path's `Instant`s to Unix nanoseconds, from one reading of both.
pub(super) struct Clock {
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

/// The action's span name: `CONNECT {host}:{port}`, `{METHOD}`, or for MCP
/// `{mcp.method.name} {target}` with the tool or prompt name as the target (OTel MCP
/// conventions; a resource URI is not a low-cardinality target, so it is left out).
pub(super) fn span_name(ctx: &Context, out: &mut String) {
    out.clear();
    let _ = match ctx.kind {
        ActionKind::Connect => write!(out, "CONNECT {}", ctx.destination),
        ActionKind::Mcp => match mcp(ctx) {
            Some(m) => match m.tool.as_ref().or(m.prompt.as_ref()) {
                Some(t) => write!(out, "{} {t}", m.method),
                None => write!(out, "{}", m.method),
            },
            None => write!(out, "mcp"),
        },
        ActionKind::Http => write!(out, "{}", ctx.method),
    };
}

/// `url.full` without the query string (it may hold placeholders or data).
pub(super) fn url(ctx: &Context, out: &mut String) {
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
pub(super) fn mcp(ctx: &Context) -> Option<&McpSummary> {
    ctx.decisions.iter().find_map(|r| r.mcp.as_ref())
}

/// The action's verdict: the first denial if any, else the first decision about a JSON-RPC
/// message (an MCP request's HTTP decision comes first but says less), else the first.
pub(super) fn verdict(ctx: &Context) -> Option<(&'static str, &DecisionRecord)> {
    match ctx.decisions.iter().find(|r| !r.decision.allow) {
        Some(d) => Some(("deny", d)),
        None => ctx
            .decisions
            .iter()
            .find(|r| r.mcp.is_some())
            .or(ctx.decisions.first())
            .map(|d| ("allow", d)),
    }
}

/// Names joined with commas, without building the string first.
pub(super) struct Joined<'a>(pub(super) &'a [String]);

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

/// What the shadow policy decided on the same input (`policy.shadow`), and whether it differs.
fn shadow_attributes(a: &mut Attributes<'_>, enforced: &Decision, shadow: &Decision) {
    a.str(
        "portcullis.policy.shadow.decision",
        if shadow.allow { "allow" } else { "deny" },
    );
    a.str("portcullis.policy.shadow.reason", &shadow.reason);
    a.str("portcullis.policy.shadow.revision", &shadow.revision);
    a.bool(
        "portcullis.policy.shadow.differs",
        Change::between(enforced, shadow).is_some(),
    );
}

/// The OTel MCP attributes of one message: `mcp.method.name`, and by method
/// `gen_ai.operation.name` + `gen_ai.tool.name` (`tools/call`), `gen_ai.prompt.name`,
/// `mcp.resource.uri`.
pub(super) fn mcp_attributes(a: &mut Attributes<'_>, m: &McpSummary) {
    a.str("mcp.method.name", &m.method);
    if let Some(t) = &m.tool {
        a.str("gen_ai.operation.name", "execute_tool");
        a.str("gen_ai.tool.name", t);
    }
    if let Some(p) = &m.prompt {
        a.str("gen_ai.prompt.name", p);
    }
    if let Some(uri) = &m.resource {
        a.str("mcp.resource.uri", uri);
    }
}

/// The JSON-RPC error code of an MCP refusal the proxy answers as JSON-RPC.
fn jsonrpc_error_code(code: portcullis_filters::ErrorCode) -> Option<&'static str> {
    use portcullis_filters::ErrorCode;
    match code {
        ErrorCode::PolicyDenied => Some("-32001"),
        ErrorCode::HeaderMismatch => Some("-32020"),
        _ => None,
    }
}

/// `jsonrpc.request.id`: a string id as it is, a number as written.
pub(super) fn write_id(a: &mut Attributes<'_>, id: &serde_json::Value) {
    match id {
        serde_json::Value::String(s) => a.str("jsonrpc.request.id", s),
        other => a.display("jsonrpc.request.id", other),
    }
}

pub(super) fn server_address(a: &mut Attributes<'_>, ctx: &Context) {
    match &ctx.destination.host {
        Host::Dns(name) => a.str("server.address", name),
        ip => a.display("server.address", ip),
    }
}

pub(super) fn action_attributes(
    a: &mut Attributes<'_>,
    ctx: &Context,
    outcome: &Outcome,
    url: Option<&str>,
) {
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
        if let Some(shadow) = &rec.shadow {
            shadow_attributes(a, &rec.decision, shadow);
        }
    }
    if let Some(ap) = ctx.gates.approvals.last() {
        a.str("portcullis.approval.id", &ap.id);
        a.str("portcullis.approval.state", ap.state);
        if let Some(by) = &ap.decided_by {
            a.str("portcullis.approval.approver", by);
        }
    }
    if let Some(limit) = &ctx.gates.limited {
        a.str("portcullis.rate_limit.name", limit);
    }
    if let Some(d) = &ctx.delegation {
        a.str("portcullis.delegation.subject", &d.subject);
        a.str("portcullis.delegation.issuer", &d.issuer);
        if !d.chain.is_empty() {
            a.display("portcullis.delegation.chain", Joined(&d.chain));
        }
    }
    if let Some(m) = mcp(ctx) {
        mcp_attributes(a, m);
        if let Some(id) = &m.id {
            write_id(a, id);
        }
        a.str("network.transport", "tcp");
        a.str("network.protocol.name", "http");
        if let Some(r) = &ctx.mcp.request {
            if let Some(s) = &r.session_id {
                a.str("mcp.session.id", s);
            }
            if let Some(v) = &r.protocol_version {
                a.str("mcp.protocol.version", v);
            }
        }
        // A message the proxy answered itself carries the JSON-RPC error code it sent.
        if let Some(code) = ctx.error.and_then(jsonrpc_error_code) {
            a.str("rpc.response.status_code", code);
        }
    }
    if let Some(code) = ctx.error {
        a.str("error.type", code.as_str());
    }
}

/// Why an upstream call failed, for its client span: the error code, or the status for 4xx
/// and 5xx (HTTP semconv: a client span is an error then).
pub(super) fn upstream_failure(
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
                            if let Some(shadow) = &rec.shadow {
                                shadow_attributes(a, d, shadow);
                            }
                            a.int(
                                "portcullis.policy.eval_time_us",
                                i64::try_from(d.eval_time.as_micros()).unwrap_or(i64::MAX),
                            );
                            if let Some(m) = &rec.mcp {
                                mcp_attributes(a, m);
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
            super::summary::summary(ctx, outcome);
        }
    }
}
