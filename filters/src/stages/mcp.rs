//! The MCP inspection stage: buffers JSON POST bodies, recognises JSON-RPC
//! ([`crate::parse::jsonrpc`]) and marks the action as `kind: mcp`, so the policy stage decides
//! per message. Also the response-body transform that edits the JSON-RPC messages of a
//! response (`tools/list` filtering and pinning use it).

use bytes::Bytes;
use serde_json::Value;

use crate::error::{ErrorCode, Rejection};
use crate::parse::jsonrpc::parse;
use crate::parse::mcp_body::ResponseRewriter;
use crate::pipeline::{
    Action, ActionKind, BodyTransform, Context, Filter, RequestBody, TransformError,
};

/// The inspection stage: buffers JSON POST bodies, recognises JSON-RPC, and marks the action
/// as `kind: mcp` so the policy stage decides per message. Hosts in `mcp.servers` are
/// MCP-only: a POST there that is not JSON-RPC (400) or too large to inspect (413) is refused,
/// so no tool call can slip past inspection by padding or mislabelling its body.
#[derive(Debug, Default)]
pub struct McpFilter {
    /// `mcp.servers`: exact host names or `*.suffix` patterns.
    pub servers: Vec<String>,
}

impl McpFilter {
    fn mcp_only(&self, host: &crate::parse::destination::Host) -> bool {
        self.servers.iter().any(|p| host.matches(p))
    }
}

fn is_json(req: &http::request::Parts) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| m == "application/json" || m.ends_with("+json"))
}

#[async_trait::async_trait]
impl Filter for McpFilter {
    fn name(&self) -> &'static str {
        "mcp_inspect"
    }

    fn wants_body(&self, ctx: &Context, req: &http::request::Parts) -> bool {
        ctx.kind != ActionKind::Connect
            && req.method == http::Method::POST
            && (is_json(req) || self.mcp_only(&ctx.destination.host))
    }

    async fn request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if !self.wants_body(ctx, req) {
            return Action::Continue;
        }
        let mcp_only = self.mcp_only(&ctx.destination.host);
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let parsed = match &ctx.body {
            RequestBody::Buffered(b) => parse(b, header("mcp-session-id"), header("mcp-protocol-version")),
            RequestBody::TooLarge if mcp_only => {
                return Action::Respond(Rejection::new(
                    ErrorCode::BodyTooLarge,
                    "request body is larger than limits.inspect_body_bytes; MCP requests to this host must be inspected",
                ))
            }
            _ => return Action::Continue,
        };
        match parsed {
            Ok(mcp) => {
                ctx.kind = ActionKind::Mcp;
                ctx.mcp.request = Some(mcp);
                Action::Continue
            }
            Err(e) if mcp_only => Action::Respond(Rejection::new(
                ErrorCode::BadRequest,
                format!("{e}; this host is an MCP server (mcp.servers)"),
            )),
            // JSON that is not JSON-RPC is plain HTTP.
            Err(_) => Action::Continue,
        }
    }
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
    /// `None` when the response is neither JSON nor an event stream.
    pub fn for_response(
        resp: &http::response::Parts,
        limit: usize,
        edit: F,
    ) -> Option<Box<dyn BodyTransform>> {
        let ct = resp.headers.get(http::header::CONTENT_TYPE);
        let rewriter = ResponseRewriter::new(ct.and_then(|v| v.to_str().ok()), limit)?;
        Some(Box::new(EditMessages { rewriter, edit }))
    }

    fn checked(&self, out: Vec<u8>) -> Result<Bytes, TransformError> {
        if self.rewriter.overflowed() {
            return Err(TransformError(
                "an MCP response exceeds limits.inspect_body_bytes and cannot be filtered".into(),
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
