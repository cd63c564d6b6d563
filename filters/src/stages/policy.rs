//! The policy stage: builds the Rego input (DESIGN "Policy input and decision") from the
//! request context, evaluates the current policy revision, records the decision in the
//! context, and refuses denied actions. Credential-bearing header values never enter the input.

use std::sync::Arc;

use portcullis_policy::{
    redact_headers, Decision, Destination as PDestination, Identity, Input, Kind, Policy,
    RequestInfo, Source, TimeInfo,
};

use crate::error::{ErrorCode, JsonRpcAnswer, Rejection};
use crate::parse::jsonrpc as mcp;
use crate::pipeline::timing::StepKind;
use crate::pipeline::{
    Action, ActionKind, BodyTransform, Chain, Context, DecisionRecord, Filter, McpSummary,
};
use crate::stages::mcp::EditMessages;

#[derive(Debug)]
pub struct PolicyFilter {
    policy: Arc<Policy>,
    /// Header names whose values are redacted in the input, besides the built-in ones.
    sensitive_headers: Vec<String>,
    /// Largest `tools/list` response (or SSE event) filtered (`limits.inspect_body_bytes`).
    list_limit: usize,
}

impl PolicyFilter {
    pub fn new(
        policy: Arc<Policy>,
        sensitive_headers: Vec<String>,
        list_limit: usize,
    ) -> PolicyFilter {
        PolicyFilter {
            policy,
            sensitive_headers,
            list_limit,
        }
    }
}

fn kind(k: ActionKind) -> Kind {
    match k {
        ActionKind::Connect => Kind::Connect,
        ActionKind::Http => Kind::Http,
        ActionKind::Mcp => Kind::Mcp,
    }
}

/// The policy input for this action, bounded.
pub fn build_input(ctx: &Context, req: &http::request::Parts, sensitive: &[String]) -> Input {
    let id = &ctx.peer.spiffe_id;
    let request = (ctx.kind != ActionKind::Connect).then(|| RequestInfo {
        method: req.method.as_str().to_owned(),
        path: req.uri.path().to_owned(),
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
    }
    .bounded()
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
    }
}

impl PolicyFilter {
    /// One decision per JSON-RPC request or notification (`kind: mcp`). If any is denied,
    /// nothing is forwarded: every request id is answered with a JSON-RPC error (the denied
    /// ones with their reason), and denied notifications are dropped.
    fn decide_mcp(&self, ctx: &mut Context, base: Input) -> Action {
        let Some(mcp) = ctx.mcp.request.take() else {
            return Action::Continue;
        };
        let mut first_deny: Option<Decision> = None;
        let mut denied_ids = Vec::new();
        for m in &mcp.messages {
            // Responses the client sends to server-initiated requests are decided too (with
            // `input.mcp.response: true`): otherwise a body of only responses would carry data
            // upstream with no decision at all.
            let method = m.method.clone().unwrap_or_else(|| "response".to_owned());
            let mut input = base.clone();
            input.kind = Kind::Mcp;
            input.mcp = Some(mcp::policy_input(&mcp, m));
            let start = ctx.step_start();
            let d = self.policy.evaluate(&input.bounded());
            let decision = ctx.decisions.len();
            ctx.step_end(start, || StepKind::Policy { decision });
            if !d.allow {
                denied_ids.push(m.id.clone());
                first_deny.get_or_insert_with(|| d.clone());
            }
            ctx.decisions.push(DecisionRecord {
                mcp: Some(McpSummary {
                    method,
                    id: m.id.clone(),
                    tool: m.tool().map(str::to_owned),
                    tool_changed: m
                        .tool()
                        .is_some_and(|t| ctx.mcp.changed_tools.iter().any(|c| c == t)),
                }),
                decision: d,
            });
        }
        let trace = ctx.trace.id.to_string();
        let answer = first_deny.map(|deny| {
            let responses = mcp
                .messages
                .iter()
                .filter(|m| m.method.is_some())
                .filter_map(|m| {
                    let id = m.id.as_ref()?;
                    let reason = if denied_ids.contains(&m.id) {
                        ctx.decisions
                            .iter()
                            .find(|r| r.mcp.as_ref().is_some_and(|s| s.id.as_ref() == Some(id)))
                            .map_or(deny.reason.as_str(), |r| r.decision.reason.as_str())
                    } else {
                        "not forwarded: another message in this batch was denied"
                    };
                    Some(mcp::error_response(id, reason, &trace))
                })
                .collect();
            let mut rej = rejection(&deny);
            rej.jsonrpc = Some(JsonRpcAnswer {
                responses,
                batch: mcp.batch,
            });
            rej
        });
        ctx.mcp.request = Some(mcp);
        match answer {
            Some(rej) => Action::Respond(rej),
            None => Action::Continue,
        }
    }
}

#[async_trait::async_trait]
impl Filter for PolicyFilter {
    fn name(&self) -> &'static str {
        "policy"
    }

    async fn request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let input = build_input(ctx, req, &self.sensitive_headers);
        if ctx.mcp.request.is_some() {
            if ctx.lists_tools() {
                ctx.mcp.listing_input = Some(input.clone());
            }
            return self.decide_mcp(ctx, input);
        }
        let start = ctx.step_start();
        let decision = self.policy.evaluate(&input);
        let index = ctx.decisions.len();
        ctx.step_end(start, || StepKind::Policy { decision: index });
        let action = if decision.allow {
            Action::Continue
        } else {
            Action::Respond(rejection(&decision))
        };
        ctx.decisions.push(DecisionRecord {
            decision,
            mcp: None,
        });
        action
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
            self.policy.evaluate(&input.bounded()).allow
        });
    }
}
