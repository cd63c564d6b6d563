//! The policy stage: builds the Rego input (DESIGN "Policy input and decision") from the
//! request context, evaluates the current policy revision, records the decision in the
//! context, and refuses denied actions. Credential-bearing header values never enter the input.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use portcullis_policy::{
    redact_headers, Decision, Destination as PDestination, EngineInput, Identity, Input,
    InputLimits, Kind, Part, Policy, RequestInfo, Source, TimeInfo,
};
use serde_json::Value;

use crate::error::{ErrorCode, Rejection};
use crate::parse::jsonrpc::{self as mcp, McpRequest};
use crate::pipeline::timing::StepKind;
use crate::pipeline::{
    Action, ActionKind, BodyTransform, Chain, Context, DecisionRecord, Filter, McpSummary, Phase,
    RequestBody,
};
use crate::stages::approval::{ApprovalState, Approvals};
use crate::stages::mcp::EditMessages;

#[derive(Debug)]
pub struct PolicyFilter {
    policy: Arc<Policy>,
    /// Header names whose values are redacted in the input, besides the built-in ones.
    sensitive_headers: Vec<String>,
    /// Largest `tools/list` response (or SSE event) filtered (`limits.inspect_body_bytes`).
    list_limit: usize,
    /// `policy.input_limits`: a request over one is refused, never decided truncated.
    input_limits: InputLimits,
    /// `approvals:`; without it a decision asking for approval is a plain deny.
    approvals: Option<Arc<Approvals>>,
    /// Keep each decision's input (for a shadow policy or the decision log's `input`).
    keep_inputs: bool,
}

impl PolicyFilter {
    pub fn new(
        policy: Arc<Policy>,
        sensitive_headers: Vec<String>,
        list_limit: usize,
        input_limits: InputLimits,
    ) -> PolicyFilter {
        PolicyFilter {
            policy,
            sensitive_headers,
            list_limit,
            input_limits,
            approvals: None,
            keep_inputs: false,
        }
    }

    /// Keep every decision's input in its [`DecisionRecord`] (costs one shared value per
    /// decision; off unless a shadow policy or the decision log needs it).
    #[must_use]
    pub fn keeping_inputs(mut self, keep: bool) -> PolicyFilter {
        self.keep_inputs = keep;
        self
    }

    #[must_use]
    pub fn with_approvals(mut self, approvals: Option<Arc<Approvals>>) -> PolicyFilter {
        self.approvals = approvals;
        self
    }
}

fn kind(k: ActionKind) -> Kind {
    match k {
        ActionKind::Connect => Kind::Connect,
        ActionKind::Http => Kind::Http,
        ActionKind::Mcp => Kind::Mcp,
    }
}

/// The policy input for this action, not yet bounded: check it with `over_bounds` first.
pub fn build_input(ctx: &Context, req: &http::request::Parts, sensitive: &[String]) -> Input {
    let id = &ctx.peer.spiffe_id;
    let request = (ctx.kind != ActionKind::Connect).then(|| RequestInfo {
        method: req.method.as_str().to_owned(),
        path: req.uri.path().to_owned(),
        normalized_path: crate::parse::path::normalize(req.uri.path()),
        query: req
            .uri
            .query()
            .map(|q| {
                let mut m = std::collections::BTreeMap::<String, Vec<String>>::new();
                for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                    m.entry(k.into_owned()).or_default().push(v.into_owned());
                }
                m
            })
            .unwrap_or_default(),
        headers: redact_headers(
            req.headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
            sensitive,
        ),
        body_size: req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
    });
    Input {
        kind: kind(ctx.kind),
        identity: Identity {
            spiffe_id: id.as_str().to_owned(),
            trust_domain: id.trust_domain().to_owned(),
            path: id.path().to_owned(),
            segments: id.segments().map(str::to_owned).collect(),
            proof: ctx.peer.proof.as_str().to_owned(),
        },
        source: Some(Source {
            address: ctx.peer.source_ip.clone(),
            port: ctx.peer.source.port(),
        }),
        destination: PDestination {
            host: ctx.destination.host.to_string(),
            port: ctx.destination.port,
            scheme: ctx.destination.scheme.as_str().to_owned(),
        },
        request,
        mcp: None,
        credentials: ctx.credentials.names.clone(),
        time: TimeInfo::now(),
        gateway: ctx
            .gateway_route
            .as_ref()
            .map(|r| portcullis_policy::input::Gateway {
                route: r.to_string(),
            }),
        approval: None,
        delegation: ctx.delegation.as_deref().map(delegation_input),
    }
}

/// `input.delegation`: who the agent acts for (never the token).
pub fn delegation_input(d: &crate::parse::jwt::Verified) -> Value {
    serde_json::json!({
        "subject": d.subject,
        "issuer": d.issuer,
        "audience": d.audience,
        "scopes": d.scopes,
        "claims": d.claims,
        "chain": d.chain,
    })
}

/// Refuse what the policy input cannot hold whole, instead of deciding on a truncated view.
fn over_bounds(input: &Input, limits: &InputLimits) -> Option<Rejection> {
    let e = input.exceeded(limits)?;
    let code = match e.part {
        Part::Target => ErrorCode::BadRequest,
        Part::Headers => ErrorCode::HeadersTooLarge,
        Part::Mcp => ErrorCode::BodyTooLarge,
    };
    Some(Rejection::new(code, e.to_string()))
}

fn rejection(d: &Decision) -> Rejection {
    Rejection {
        code: ErrorCode::PolicyDenied,
        reason: d.reason.clone(),
        status: d.status,
        headers: d
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        jsonrpc: None,
        details: Default::default(),
    }
}

/// A refusal as the action's client reads it: for an MCP request, the JSON-RPC error of each
/// of its requests (with `rej`'s code and details in `data`); otherwise `rej` as it is.
pub fn refusal_for(ctx: &Context, mut rej: Rejection) -> Rejection {
    if let Some(mcp) = &ctx.mcp.request {
        let mut answer = mcp.refusal(|_| rej.reason.as_str(), &ctx.trace.id.to_string());
        answer.add_details(None, rej.code, &rej.details);
        rej.jsonrpc = Some(answer);
    }
    rej
}

impl PolicyFilter {
    /// Evaluate one input and record the decision (`mcp`: the message it was about).
    fn decide(&self, ctx: &mut Context, input: &Input, mcp: Option<McpSummary>) -> Decision {
        let start = ctx.step_start();
        let (decision, input) = self.evaluate(input);
        let index = ctx.decisions.len();
        ctx.step_end(start, || StepKind::Policy { decision: index });
        ctx.decisions.push(DecisionRecord {
            decision: decision.clone(),
            mcp,
            input,
            shadow: None,
        });
        decision
    }

    /// The decision, and the input as the engine read it when it is to be kept.
    fn evaluate(&self, input: &Input) -> (Decision, Option<EngineInput>) {
        if self.keep_inputs {
            let (decision, kept) = self.policy.evaluate_keeping(input);
            (decision, Some(kept))
        } else {
            (self.policy.evaluate(input), None)
        }
    }

    /// One decision per JSON-RPC request or notification (`kind: mcp`). If any is denied,
    /// nothing is forwarded: every request id is answered with a JSON-RPC error (the denied
    /// ones with their reason), and denied notifications are dropped.
    async fn decide_mcp(&self, ctx: &mut Context, mcp: &McpRequest, base: Input) -> Action {
        let mut first_deny: Option<Rejection> = None;
        let mut refused: Vec<(Value, Rejection)> = Vec::new();
        // One input for every message: only `mcp` differs between them.
        let mut input = base;
        input.kind = Kind::Mcp;
        for m in &mcp.messages {
            // Responses the client sends to server-initiated requests are decided too (with
            // `input.mcp.response: true`): otherwise a body of only responses would carry data
            // upstream with no decision at all.
            input.mcp = Some(mcp::policy_input(mcp, m));
            if let Some(rej) = over_bounds(&input, &self.input_limits) {
                return Action::Respond(rej);
            }
            let summary = McpSummary {
                method: m.method.clone().unwrap_or_else(|| "response".to_owned()),
                id: m.id.clone(),
                tool: m.tool().map(str::to_owned),
                prompt: m.prompt().map(str::to_owned),
                resource: m.resource_uri().map(str::to_owned),
                tool_changed: m
                    .tool()
                    .is_some_and(|t| ctx.mcp.changed_tools.iter().any(|c| c == t)),
            };
            input = input.bounded(&self.input_limits);
            let d = self.decide(ctx, &input, Some(summary));
            if let Err(rej) = self.gate(ctx, &input, d, false).await {
                if let Some(id) = &m.id {
                    refused.push((id.clone(), rej.clone()));
                }
                first_deny.get_or_insert(rej);
            }
        }
        let Some(mut deny) = first_deny else {
            return Action::Continue;
        };
        let reason_of = |id: &Value| {
            refused.iter().find(|(i, _)| i == id).map_or(
                "not forwarded: another message in this batch was denied",
                |(_, r)| r.reason.as_str(),
            )
        };
        let mut answer = mcp.refusal(reason_of, &ctx.trace.id.to_string());
        for (id, rej) in &refused {
            answer.add_details(Some(id), rej.code, &rej.details);
        }
        deny.jsonrpc = Some(answer);
        Action::Respond(deny)
    }

    /// A deny stands, unless it asks for approval and the approval lets it through: the
    /// matching record is found or opened (and waited for, with `approvals.hold`); once it is
    /// decided, the policy decides again with `input.approval`, and an allow takes one use of
    /// the grant. `first` is the last decision recorded in `ctx`.
    async fn gate(
        &self,
        ctx: &mut Context,
        input: &Input,
        first: Decision,
        cover_body: bool,
    ) -> Result<(), Rejection> {
        if first.allow {
            return Ok(());
        }
        let (Some(ask), Some(approvals)) = (&first.approval, &self.approvals) else {
            return Err(rejection(&first));
        };
        // A plain HTTP request's grant covers its body: the digest of the body as the agent
        // sent it (placeholders, not secrets), or no approval at all when the proxy does not
        // hold it whole.
        let body = match (cover_body, &ctx.body) {
            (false, _) | (true, RequestBody::Empty) => None,
            (true, RequestBody::Buffered(b)) => {
                Some(ring::digest::digest(&ring::digest::SHA256, b))
            }
            (true, RequestBody::NotBuffered | RequestBody::TooLarge(_)) => {
                return Err(Rejection::new(
                    ErrorCode::PolicyDenied,
                    format!(
                        "{}: the request body is over limits.inspect_body_bytes, so no approval can cover it",
                        first.reason
                    ),
                ))
            }
        };
        let now = crate::stages::approval::unix_millis();
        let new = approvals.record(
            input,
            ask,
            &first.revision,
            ctx.trace.id.to_string(),
            now,
            body.as_ref().map(|d| d.as_ref()),
        );
        let unavailable = |e: crate::stages::approval::StoreError| {
            approvals.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            Rejection::new(
                ErrorCode::ApprovalUnavailable,
                format!("approval required, and approvals cannot be recorded: {e}"),
            )
        };
        let (mut rec, created) = approvals
            .store
            .find_or_open(new)
            .await
            .map_err(unavailable)?;
        if created {
            // Never the arguments: the console and the admin API show them to approvers.
            tracing::info!(approval = %rec.id, identity = %rec.identity, reason = %rec.reason,
                destination = %rec.action["destination"], "approval requested");
            approvals.stats.opened.fetch_add(1, Ordering::Relaxed);
            if let Some(announce) = &approvals.on_open {
                announce(&rec);
            }
        }
        if rec.state == ApprovalState::Pending {
            rec = approvals.hold(rec).await.map_err(unavailable)?;
        }
        let note = |rec: &crate::stages::approval::ApprovalRecord| crate::pipeline::ApprovalNote {
            id: rec.id.clone(),
            state: rec.state.as_str(),
            decided_by: rec.decided_by.clone(),
        };
        ctx.gates.approvals.push(note(&rec));
        let details = |rec: &crate::stages::approval::ApprovalRecord| {
            crate::error::Details::from([
                ("approval_id", rec.id.clone().into()),
                ("approval_state", rec.state.as_str().into()),
            ])
        };
        let required = |rec: &crate::stages::approval::ApprovalRecord| {
            approvals
                .stats
                .refused_pending
                .fetch_add(1, Ordering::Relaxed);
            let wait = approvals.retry_after;
            let mut rej = Rejection::new(
                ErrorCode::ApprovalRequired,
                format!(
                    "approval required ({}): {}; ask an approver, then retry",
                    rec.id, rec.reason
                ),
            );
            rej.headers
                .push(("retry-after".into(), wait.as_secs().max(1).to_string()));
            rej.details = details(rec);
            rej.details.0.push((
                "retry_after_ms",
                u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).into(),
            ));
            rej
        };
        if rec.state == ApprovalState::Expired {
            // Expired while held: the next call opens a new record.
            return Err(required(&rec));
        }
        // The policy decides again, seeing the record's state: pending, granted or denied.
        let mut again = input.clone();
        again.approval = Some(rec.policy_input());
        let (second, kept) = self.evaluate(&again);
        if let Some(last) = ctx.decisions.last_mut() {
            last.decision = second.clone();
            last.input = kept;
        }
        if !second.allow {
            if second.approval.is_some() && rec.state == ApprovalState::Pending {
                return Err(required(&rec));
            }
            approvals
                .stats
                .refused_denied
                .fetch_add(1, Ordering::Relaxed);
            let mut rej = rejection(&second);
            if second.approval.is_some() {
                rej.reason = format!(
                    "approval {} is {} (by {}) and the policy does not accept it",
                    rec.id,
                    rec.state.as_str(),
                    rec.decided_by.as_deref().unwrap_or("?")
                );
            }
            rej.details = details(&rec);
            return Err(rej);
        }
        if rec.state == ApprovalState::Granted {
            if !approvals
                .store
                .consume(&rec.id)
                .await
                .map_err(unavailable)?
            {
                let mut rej = Rejection::new(
                    ErrorCode::ApprovalRequired,
                    format!(
                        "approval {} is used up or expired; retry to ask again",
                        rec.id
                    ),
                );
                rej.details = details(&rec);
                return Err(rej);
            }
            approvals.stats.used.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Filter for PolicyFilter {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn request<'a>(
        &'a self,
        ctx: &'a mut Context,
        req: &'a mut http::request::Parts,
    ) -> Phase<'a, Action> {
        let input = build_input(ctx, req, &self.sensitive_headers);
        if let Some(rej) = over_bounds(&input, &self.input_limits) {
            return Phase::Done(Action::Respond(rej));
        }
        let input = input.bounded(&self.input_limits);
        let Some(mcp) = ctx.mcp.request.take() else {
            let decision = self.decide(ctx, &input, None);
            if decision.allow {
                return Phase::Done(Action::Continue);
            }
            // A deny may ask for an approval: the store is consulted.
            return Phase::wait(async move {
                match self.gate(ctx, &input, decision, true).await {
                    Ok(()) => Action::Continue,
                    Err(rej) => Action::Respond(rej),
                }
            });
        };
        Phase::wait(async move {
            // An MCP request is an HTTP request too, decided as one first (`kind: http`:
            // method, path, headers, destination), so no rule written for HTTP requests can be
            // bypassed by the shape of the body; then each of its messages (`kind: mcp`).
            let mut input = input;
            let kind = std::mem::replace(&mut input.kind, Kind::Http);
            let http = self.decide(ctx, &input, None);
            let action = match self.gate(ctx, &input, http, false).await {
                Ok(()) => {
                    input.kind = kind;
                    if ctx.lists_tools_in(&mcp) {
                        ctx.mcp.listing_input = Some(input.clone());
                    }
                    self.decide_mcp(ctx, &mcp, input).await
                }
                Err(rej) => {
                    ctx.mcp.request = Some(mcp);
                    return Action::Respond(refusal_for(ctx, rej));
                }
            };
            ctx.mcp.request = Some(mcp);
            action
        })
    }

    /// `tools/list` results keep only the tools this identity may call: each tool is decided
    /// as the `tools/call` it would be (`arguments: null`, `listing: true`).
    fn response_body(
        &self,
        ctx: &Context,
        resp: &http::response::Parts,
        _chain: &Chain,
    ) -> Option<Box<dyn BodyTransform>> {
        let (Some(base), Some(mcp)) = (&ctx.mcp.listing_input, &ctx.mcp.request) else {
            return None;
        };
        let lists: Vec<serde_json::Value> = mcp
            .messages
            .iter()
            .filter(|m| m.method.as_deref() == Some("tools/list"))
            .filter_map(|m| m.id.clone())
            .collect();
        if lists.is_empty() {
            return None;
        }
        let listing = Listing {
            policy: self.policy.clone(),
            base: base.clone(),
            session_id: mcp.session_id.clone(),
            lists,
            input_limits: self.input_limits.clone(),
        };
        EditMessages::for_response(resp, self.list_limit, move |msg| listing.filter(msg))
    }
}

/// What `tools/list` filtering needs of the listing request.
struct Listing {
    policy: Arc<Policy>,
    base: Input,
    session_id: Option<String>,
    /// The JSON-RPC ids of the request's `tools/list` messages.
    lists: Vec<serde_json::Value>,
    input_limits: InputLimits,
}

impl Listing {
    fn filter(&self, msg: &mut serde_json::Value) {
        let answers_list = msg.get("id").is_some_and(|id| self.lists.contains(id));
        let Some(tools) = msg
            .pointer_mut("/result/tools")
            .and_then(|t| t.as_array_mut())
        else {
            return;
        };
        if !answers_list {
            return;
        }
        tools.retain(|tool| {
            let Some(name) = tool.get("name").and_then(|n| n.as_str()) else {
                return false;
            };
            let mut input = self.base.clone();
            input.kind = Kind::Mcp;
            let mut m = serde_json::json!({
                "method": "tools/call", "tool": name, "arguments": null, "listing": true,
            });
            if let Some(s) = &self.session_id {
                m["session_id"] = serde_json::json!(s);
            }
            input.mcp = Some(m);
            // A tool that needs an approval is listed: the call asks for it.
            let d = self.policy.evaluate(&input.bounded(&self.input_limits));
            d.allow || d.approval.is_some()
        });
        if let Some(result) = msg.get_mut("result").and_then(|r| r.as_object_mut()) {
            private_cache(result);
        }
    }
}

/// Longest freshness (`ttlMs`) a filtered listing keeps: the filter follows the policy, which
/// a reload can change.
pub const LISTING_MAX_TTL_MS: u64 = 300_000;

/// A result filtered for one identity may be cached only in that identity's authorization
/// context (MCP 2026-07-28 `CacheableResult`): `cacheScope: "private"`, and a server's `ttlMs`
/// capped at [`LISTING_MAX_TTL_MS`] (one that is not a non-negative number becomes 0: stale
/// at once). A result without `ttlMs` (an older revision's) gets none.
fn private_cache(result: &mut serde_json::Map<String, serde_json::Value>) {
    result.insert("cacheScope".into(), "private".into());
    if let Some(ttl) = result.get_mut("ttlMs") {
        let ms = ttl.as_u64().or_else(|| {
            ttl.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        });
        *ttl = ms.unwrap_or(0).min(LISTING_MAX_TTL_MS).into();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filtered_listings_are_private_and_fresh_for_at_most_five_minutes() {
        for (ttl, want) in [
            (
                serde_json::json!(3_600_000),
                serde_json::json!(LISTING_MAX_TTL_MS),
            ),
            (serde_json::json!(1000), serde_json::json!(1000)),
            (serde_json::json!(1000.7), serde_json::json!(1000)),
            (serde_json::json!(-5), serde_json::json!(0)),
            (serde_json::json!("soon"), serde_json::json!(0)),
        ] {
            let mut r = serde_json::json!({"tools": [], "ttlMs": ttl, "cacheScope": "public"});
            private_cache(r.as_object_mut().unwrap());
            assert_eq!(r["cacheScope"], "private");
            assert_eq!(r["ttlMs"], want, "{ttl}");
        }
        let mut older = serde_json::json!({"tools": []});
        private_cache(older.as_object_mut().unwrap());
        assert_eq!(
            older,
            serde_json::json!({"tools": [], "cacheScope": "private"})
        );
    }
}
