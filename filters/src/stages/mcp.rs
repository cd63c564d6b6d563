//! The MCP inspection stage. Every request body is classified by its content
//! ([`crate::parse::jsonrpc::classify`]), never by its `Content-Type`: JSON-RPC marks the action
//! `kind: mcp` so the policy stage decides per message; a body the proxy cannot read exactly as
//! a server would (an encoding, JSON that does not parse here, a large body that shows
//! JSON-RPC) is refused, never passed on as plain HTTP, and so is one whose mirrored MCP headers
//! disagree with it ([`crate::parse::mcp_headers`]). Also the response-body transform that
//! edits the JSON-RPC messages of a response (`tools/list` filtering and pinning use it).

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::Value;

use crate::error::{ErrorCode, JsonRpcAnswer, Rejection};
use crate::parse::jsonrpc::{classify, BodyKind, LargeBodyScan, Unreadable};
use crate::parse::mcp_body::ResponseRewriter;
use crate::parse::mcp_headers;
use crate::parse::mcp_params::{self, Declared};
use crate::pipeline::{
    ask_uncompressed, content_encoding, Action, ActionKind, BodyCheck, BodyTransform, CannotRead,
    Context, Filter, RequestBody, TransformError,
};

/// The inspection stage. Hosts in `mcp.servers` are MCP-only: a POST there that is not
/// JSON-RPC is refused too (400), as is one too large to inspect (413).
#[derive(Debug, Default)]
pub struct McpFilter {
    /// `mcp.servers`: exact host names or `*.suffix` patterns.
    pub servers: Vec<String>,
    /// `mcp.max_batch`: most JSON-RPC messages in one request (a batch over it: 413).
    pub max_batch: usize,
    /// Largest `tools/list` answer read (`limits.inspect_body_bytes`).
    pub list_limit: usize,
    /// The `x-mcp-header` parameters of the tools seen listed, per server.
    pub param_headers: std::sync::Arc<ParamHeaders>,
}

/// The `x-mcp-header` declarations of the tools the proxy has seen in `tools/list` answers,
/// per server (`host:port`) and tool name: what makes an `Mcp-Param-*` header "recognised".
/// Learnt from every listing (the latest one wins); bounded: when full, the map is emptied and
/// learnt again from the next listings (a header not recognised is forwarded, as before).
#[derive(Debug, Default)]
pub struct ParamHeaders {
    tools: std::sync::Mutex<HashMap<ServerTool, std::sync::Arc<[Declared]>>>,
}

/// A server's `host:port` and a tool name.
type ServerTool = (String, String);

/// Most tools whose declarations are remembered.
const MAX_PARAM_TOOLS: usize = 16_384;

impl ParamHeaders {
    fn get(&self, server: &str, tool: &str) -> Option<std::sync::Arc<[Declared]>> {
        let tools = self.tools.lock().ok()?;
        tools.get(&(server.to_owned(), tool.to_owned())).cloned()
    }

    /// Learn from one JSON-RPC message of a `tools/list` answer.
    fn observe(&self, server: &str, msg: &Value) {
        let Some(listed) = msg.pointer("/result/tools").and_then(Value::as_array) else {
            return;
        };
        let Ok(mut tools) = self.tools.lock() else {
            return;
        };
        for tool in listed {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                continue;
            };
            let key = (server.to_owned(), name.to_owned());
            let declared = tool.get("inputSchema").and_then(mcp_params::declarations);
            match declared {
                Some(d) => {
                    if tools.len() >= MAX_PARAM_TOOLS && !tools.contains_key(&key) {
                        tools.clear();
                    }
                    tools.insert(key, d.into());
                }
                None => {
                    tools.remove(&key);
                }
            }
        }
    }
}

impl McpFilter {
    fn mcp_only(&self, host: &crate::parse::destination::Host) -> bool {
        self.servers.iter().any(|p| host.matches(p))
    }

    /// A `tools/call` of a tool whose listing declared `x-mcp-header` parameters: its
    /// `Mcp-Param-*` headers must mirror its arguments ([`mcp_params::check`]).
    fn check_params(
        &self,
        ctx: &Context,
        headers: &http::HeaderMap,
        mcp: &crate::parse::jsonrpc::McpRequest,
    ) -> Result<(), String> {
        let [m] = mcp.messages.as_slice() else {
            return Ok(());
        };
        let (Some("tools/call"), Some(params)) = (m.method.as_deref(), m.params.as_ref()) else {
            return Ok(());
        };
        let Some(tool) = params.get("name").and_then(Value::as_str) else {
            return Ok(());
        };
        let server = ctx.destination.authority();
        let Some(declared) = self.param_headers.get(&server, tool) else {
            return Ok(());
        };
        let modern = mcp_headers::declares_modern(headers);
        mcp_params::check(headers, &declared, params.get("arguments"), modern)
    }
}

fn refuse(code: ErrorCode, reason: impl Into<String>) -> Action {
    Action::Respond(Rejection::new(code, reason))
}

impl Filter for McpFilter {
    fn name(&self) -> &'static str {
        "mcp_inspect"
    }

    /// Every body: JSON-RPC is recognised by content, whatever the request says it is.
    fn wants_body(&self, ctx: &Context, _req: &http::request::Parts) -> bool {
        ctx.kind != ActionKind::Connect
    }

    /// The streamed rest of a large JSON body: a `"jsonrpc"` member found there stops the body
    /// before that chunk goes upstream (the server never gets a whole message to act on).
    fn request_body(&self, ctx: &mut Context) -> Option<Box<dyn BodyCheck>> {
        let scan = ctx.mcp.large_body.take()?;
        Some(Box::new(JsonRpcWatch(scan)))
    }

    /// A `tools/list` answer is filtered on its way back: it must come uncompressed.
    fn upstream_request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if ctx.lists_tools() {
            ask_uncompressed(req);
        }
        Action::Continue
    }

    /// `tools/list` answers teach which `Mcp-Param-*` headers the server's tools declare.
    fn response_body(
        &self,
        ctx: &Context,
        resp: &http::response::Parts,
        _chain: &crate::pipeline::Chain,
    ) -> Option<Box<dyn BodyTransform>> {
        if !ctx.lists_tools() {
            return None;
        }
        let (registry, server) = (self.param_headers.clone(), ctx.destination.authority());
        EditMessages::for_response(resp, self.list_limit, move |msg| {
            registry.observe(&server, msg)
        })
    }

    fn request_now(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if ctx.kind == ActionKind::Connect {
            return Action::Continue;
        }
        let mcp_only = self.mcp_only(&ctx.destination.host) && req.method == http::Method::POST;
        let body = match &ctx.body {
            RequestBody::Buffered(b) => b,
            RequestBody::TooLarge(head) => {
                if let Some(coding) = content_encoding(&req.headers) {
                    return refuse(ErrorCode::UnsupportedEncoding, encoded(&coding));
                }
                let mut scan = LargeBodyScan::default();
                if mcp_only || scan.feed(head) {
                    return refuse(ErrorCode::BodyTooLarge, LARGE_JSONRPC);
                }
                // JSON so far without a "jsonrpc" member: the rest is scanned as it streams.
                if !scan.is_plain() {
                    ctx.mcp.large_body = Some(scan);
                }
                return Action::Continue;
            }
            RequestBody::Empty | RequestBody::NotBuffered if mcp_only => {
                return refuse(
                    ErrorCode::BadRequest,
                    "an empty POST is not JSON-RPC; this host is an MCP server (mcp.servers)",
                )
            }
            RequestBody::Empty | RequestBody::NotBuffered => return Action::Continue,
        };
        if let Some(coding) = content_encoding(&req.headers) {
            return refuse(ErrorCode::UnsupportedEncoding, encoded(&coding));
        }
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        match classify(
            body,
            header("mcp-session-id"),
            header("mcp-protocol-version"),
        ) {
            Ok(BodyKind::JsonRpc(mcp)) if mcp.messages.len() > self.max_batch => refuse(
                ErrorCode::BodyTooLarge,
                format!(
                    "a JSON-RPC batch of {} messages is over mcp.max_batch ({})",
                    mcp.messages.len(),
                    self.max_batch
                ),
            ),
            Ok(BodyKind::JsonRpc(mcp)) => {
                ctx.kind = ActionKind::Mcp;
                let checked = mcp_headers::check(&req.headers, &mcp)
                    .and_then(|()| self.check_params(ctx, &req.headers, &mcp));
                ctx.mcp.request = Some(mcp);
                match checked {
                    Ok(()) => Action::Continue,
                    Err(why) => Action::Respond(header_mismatch(ctx, why)),
                }
            }
            Ok(BodyKind::Other) if mcp_only => refuse(
                ErrorCode::BadRequest,
                "the body is not JSON-RPC; this host is an MCP server (mcp.servers)",
            ),
            Ok(BodyKind::Other) => Action::Continue,
            Err(e @ Unreadable::Encoding(_)) => {
                refuse(ErrorCode::UnsupportedEncoding, e.to_string())
            }
            Err(e) => refuse(ErrorCode::BadRequest, e.to_string()),
        }
    }
}

/// The transport's answer to headers that disagree with the body: HTTP 400 with a JSON-RPC
/// `HeaderMismatch` error (for the request's id; `null` for a notification).
fn header_mismatch(ctx: &Context, why: String) -> Rejection {
    let id = ctx
        .mcp
        .request
        .as_ref()
        .and_then(|m| m.messages.first()?.id.clone())
        .unwrap_or(serde_json::Value::Null);
    let error = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": mcp_headers::HEADER_MISMATCH_CODE,
            "message": format!("Header mismatch: {why}"),
            "data": {"reason": why, "trace_id": ctx.trace.id.to_string()},
        },
    });
    let mut rej = Rejection::new(ErrorCode::HeaderMismatch, why);
    rej.jsonrpc = Some(JsonRpcAnswer {
        responses: vec![error],
        batch: false,
        status: Some(400),
    });
    rej
}

const LARGE_JSONRPC: &str = "the request body is larger than limits.inspect_body_bytes and may be JSON-RPC, which must be inspected";

/// The scan of a large body's rest for a top-level `"jsonrpc"` member.
struct JsonRpcWatch(LargeBodyScan);

impl BodyCheck for JsonRpcWatch {
    fn data(&mut self, chunk: &[u8]) -> Result<(), Rejection> {
        match self.0.feed(chunk) {
            true => Err(Rejection::new(ErrorCode::BodyTooLarge, LARGE_JSONRPC)),
            false => Ok(()),
        }
    }

    fn end(&mut self) -> Result<(), Rejection> {
        match self.0.end() {
            true => Err(Rejection::new(ErrorCode::BodyTooLarge, LARGE_JSONRPC)),
            false => Ok(()),
        }
    }
}

fn encoded(coding: &str) -> String {
    format!(
        "request bodies with Content-Encoding {coding} cannot be inspected: send them uncompressed"
    )
}

/// A response-body transform that passes every JSON-RPC message of a response (a JSON body
/// whole, an SSE stream event by event) through an edit function. A body or event larger than
/// its limit cannot be edited: the response ends with an error, never passes unedited.
pub struct EditMessages<F> {
    rewriter: ResponseRewriter,
    edit: F,
}

impl<F> EditMessages<F>
where
    F: FnMut(&mut Value) + Send + Sync + 'static,
{
    /// A `200 OK` (the status that carries JSON-RPC answers: a `202 Accepted` of the older
    /// transport or for notifications carries none) that the proxy cannot edit, compressed or
    /// neither JSON nor an event stream, gets [`CannotRead`]: it ends at its first byte rather
    /// than pass unedited.
    pub fn for_response(
        resp: &http::response::Parts,
        limit: usize,
        edit: F,
    ) -> Option<Box<dyn BodyTransform>> {
        let answers = resp.status == http::StatusCode::OK;
        if let (true, Some(coding)) = (answers, content_encoding(&resp.headers)) {
            let why = format!("an MCP response in Content-Encoding {coding} cannot be filtered");
            return Some(Box::new(CannotRead(why)));
        }
        let ct = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        match ResponseRewriter::new(ct, limit) {
            Some(rewriter) => Some(Box::new(EditMessages { rewriter, edit })),
            None if answers => Some(Box::new(CannotRead(format!(
                "an MCP response of type {} cannot be filtered",
                ct.unwrap_or("(none)")
            )))),
            None => None,
        }
    }

    fn checked(&self, out: Vec<u8>) -> Result<Bytes, TransformError> {
        if self.rewriter.overflowed() {
            return Err(TransformError(
                "an MCP response exceeds limits.inspect_body_bytes and cannot be filtered".into(),
            ));
        }
        if self.rewriter.unparsable() {
            return Err(TransformError(
                "an MCP JSON response does not parse and cannot be filtered".into(),
            ));
        }
        Ok(Bytes::from(out))
    }
}

impl<F> BodyTransform for EditMessages<F>
where
    F: FnMut(&mut Value) + Send + Sync + 'static,
{
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
        let out = self.rewriter.push(&chunk, &mut self.edit);
        self.checked(out)
    }

    fn end(&mut self) -> Result<Bytes, TransformError> {
        let out = self.rewriter.finish(&mut self.edit);
        self.checked(out)
    }
}
