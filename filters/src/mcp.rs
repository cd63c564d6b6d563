//! MCP inspection: recognise JSON-RPC 2.0 messages (single or batch) in a request body and
//! extract what policy decides on, per message: method, id, tool and arguments
//! (`tools/call`), resource URI (`resources/read`), prompt name (`prompts/get`), plus the
//! session id and protocol version of the HTTP request. Also builds the JSON-RPC error
//! responses a denied request gets. Pure: bytes in, values out.

use serde_json::{json, Map, Value};

use crate::error::{ErrorCode, Rejection};
use crate::pipeline::{Action, ActionKind, Context, Filter, RequestBody};

/// JSON-RPC error code for a request refused by Portcullis (implementation-defined range).
pub const DENIED_CODE: i64 = -32001;

/// One JSON-RPC message of a request body.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// `None` for a response the client sends (to a server-initiated request).
    pub method: Option<String>,
    /// `None` for a notification.
    pub id: Option<Value>,
    pub params: Option<Value>,
}

impl Message {
    pub fn is_notification(&self) -> bool {
        self.method.is_some() && self.id.is_none()
    }

    /// `params.name` of `tools/call`.
    pub fn tool(&self) -> Option<&str> {
        (self.method.as_deref() == Some("tools/call"))
            .then(|| self.params.as_ref()?.get("name")?.as_str())
            .flatten()
    }

    fn param_str(&self, method: &str, key: &str) -> Option<&str> {
        (self.method.as_deref() == Some(method))
            .then(|| self.params.as_ref()?.get(key)?.as_str())
            .flatten()
    }
}

/// The JSON-RPC content of one HTTP request.
#[derive(Clone, Debug, PartialEq)]
pub struct McpRequest {
    pub messages: Vec<Message>,
    pub batch: bool,
    /// `Mcp-Session-Id` header.
    pub session_id: Option<String>,
    /// `MCP-Protocol-Version` header, or `initialize`'s `params.protocolVersion`.
    pub protocol_version: Option<String>,
}

/// Why a body is not JSON-RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotJsonRpc {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not a JSON-RPC 2.0 message: {0}")]
    NotJsonRpc(&'static str),
}

fn message(v: Value) -> Result<Message, NotJsonRpc> {
    let Value::Object(mut o) = v else {
        return Err(NotJsonRpc::NotJsonRpc("a message must be an object"));
    };
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(NotJsonRpc::NotJsonRpc("\"jsonrpc\" must be \"2.0\""));
    }
    let method = match o.remove("method") {
        Some(Value::String(m)) => Some(m),
        Some(_) => return Err(NotJsonRpc::NotJsonRpc("\"method\" must be a string")),
        None if o.contains_key("result") || o.contains_key("error") => None,
        None => {
            return Err(NotJsonRpc::NotJsonRpc(
                "no \"method\", \"result\" or \"error\"",
            ))
        }
    };
    let id = match o.remove("id") {
        None | Some(Value::Null) => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id),
        Some(_) => return Err(NotJsonRpc::NotJsonRpc("\"id\" must be a string or number")),
    };
    Ok(Message {
        method,
        id,
        params: o.remove("params"),
    })
}

/// Parse a request body as a JSON-RPC message or batch.
pub fn parse(
    body: &[u8],
    session_id: Option<&str>,
    protocol_header: Option<&str>,
) -> Result<McpRequest, NotJsonRpc> {
    let v: Value = serde_json::from_slice(body).map_err(|e| NotJsonRpc::NotJson(e.to_string()))?;
    let (messages, batch) = match v {
        Value::Array(items) if items.is_empty() => {
            return Err(NotJsonRpc::NotJsonRpc("empty batch"))
        }
        Value::Array(items) => (
            items
                .into_iter()
                .map(message)
                .collect::<Result<Vec<_>, _>>()?,
            true,
        ),
        other => (vec![message(other)?], false),
    };
    let protocol_version = protocol_header.map(str::to_owned).or_else(|| {
        messages
            .iter()
            .find_map(|m| m.param_str("initialize", "protocolVersion"))
            .map(str::to_owned)
    });
    Ok(McpRequest {
        messages,
        batch,
        session_id: session_id.map(str::to_owned),
        protocol_version,
    })
}

/// `input.mcp` for one message (DESIGN "Policy input"). `listing: true` marks the synthetic
/// `tools/call` inputs used to filter `tools/list` results.
pub fn policy_input(req: &McpRequest, m: &Message) -> Value {
    let mut o = Map::new();
    match &m.method {
        Some(method) => {
            o.insert("method".into(), json!(method));
        }
        // A response (result or error) the client sends to a server-initiated request.
        None => {
            o.insert("response".into(), json!(true));
        }
    }
    if let Some(id) = &m.id {
        o.insert("id".into(), id.clone());
    }
    if let Some(tool) = m.tool() {
        o.insert("tool".into(), json!(tool));
        let args = m.params.as_ref().and_then(|p| p.get("arguments")).cloned();
        o.insert("arguments".into(), args.unwrap_or(Value::Null));
    }
    if let Some(uri) = m.param_str("resources/read", "uri") {
        o.insert("uri".into(), json!(uri));
    }
    if let Some(prompt) = m.param_str("prompts/get", "name") {
        o.insert("prompt".into(), json!(prompt));
    }
    if let Some(s) = &req.session_id {
        o.insert("session_id".into(), json!(s));
    }
    if let Some(v) = &req.protocol_version {
        o.insert("protocol_version".into(), json!(v));
    }
    o.insert("batch".into(), json!(req.batch));
    Value::Object(o)
}

/// A JSON-RPC error response for a refused request.
pub fn error_response(id: &Value, reason: &str, trace_id: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": DENIED_CODE,
            "message": format!("denied by Portcullis: {reason}"),
            "data": {"reason": reason, "trace_id": trace_id},
        },
    })
}

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
    fn mcp_only(&self, host: &crate::destination::Host) -> bool {
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
                ctx.mcp = Some(mcp);
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn tools_call_is_parsed() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"owner":"acme"}}}"#;
        let r = parse(body, Some("s1"), Some("2025-06-18")).unwrap();
        assert!(!r.batch);
        let m = &r.messages[0];
        assert_eq!(m.tool(), Some("create_issue"));
        let input = policy_input(&r, m);
        assert_eq!(input["method"], "tools/call");
        assert_eq!(input["id"], 7);
        assert_eq!(input["tool"], "create_issue");
        assert_eq!(input["arguments"]["owner"], "acme");
        assert_eq!(input["session_id"], "s1");
        assert_eq!(input["protocol_version"], "2025-06-18");
    }

    #[test]
    fn batches_notifications_and_other_methods() {
        let body = br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},
            {"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}},
            {"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"p"}},
            {"jsonrpc":"2.0","id":3,"result":{}}]"#;
        let r = parse(body, None, None).unwrap();
        assert!(r.batch);
        assert_eq!(r.messages.len(), 4);
        assert!(r.messages[0].is_notification());
        assert_eq!(policy_input(&r, &r.messages[1])["uri"], "file:///x");
        assert_eq!(policy_input(&r, &r.messages[2])["prompt"], "p");
        assert_eq!(r.messages[3].method, None);
        assert_eq!(policy_input(&r, &r.messages[3])["response"], true);
    }

    #[test]
    fn protocol_version_from_initialize() {
        let body = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}"#;
        assert_eq!(
            parse(body, None, None).unwrap().protocol_version.as_deref(),
            Some("2025-11-25")
        );
    }

    #[test]
    fn not_json_rpc() {
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"[1]",
            br#"{"jsonrpc":"1.0","method":"x"}"#,
            br#"{"jsonrpc":"2.0","method":5}"#,
            br#"{"jsonrpc":"2.0","id":{},"method":"x"}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
        ] {
            assert!(
                parse(bad, None, None).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn error_response_shape() {
        let e = error_response(&json!(7), "no deletes", "abc");
        assert_eq!(e["id"], 7);
        assert_eq!(e["error"]["code"], DENIED_CODE);
        assert_eq!(e["error"]["data"]["reason"], "no deletes");
    }
}

/// Rewrites the JSON-RPC messages of an MCP response body as it streams: an SSE body
/// (`text/event-stream`) event by event, with no buffering beyond the current event; a JSON
/// body whole, up to `limit` bytes. Each JSON-RPC message (and each element of a batch) is
/// passed to the edit function; events without JSON data pass through byte for byte. A body
/// (or one event) over the limit cannot be edited: it is dropped and `overflowed()` turns
/// true, so the caller can end the response with an error instead of passing it unedited.
#[derive(Debug)]
pub struct ResponseRewriter {
    sse: bool,
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
}

impl ResponseRewriter {
    pub fn new(content_type: Option<&str>, limit: usize) -> Option<ResponseRewriter> {
        let ct = content_type?.split(';').next()?.trim().to_ascii_lowercase();
        let sse = match ct.as_str() {
            "text/event-stream" => true,
            "application/json" => false,
            _ => return None,
        };
        Some(ResponseRewriter {
            sse,
            buf: Vec::new(),
            limit,
            overflow: false,
        })
    }

    /// Feed a chunk; returns the bytes ready to send now.
    pub fn push(&mut self, chunk: &[u8], edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
        if self.overflow {
            return Vec::new();
        }
        self.buf.extend_from_slice(chunk);
        if !self.sse {
            if self.buf.len() > self.limit {
                self.overflow = true;
                self.buf = Vec::new();
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            out.extend_from_slice(&rewrite_event(&event, edit));
        }
        if self.buf.len() > self.limit {
            self.overflow = true;
            self.buf = Vec::new();
        }
        out
    }

    /// The end of the body: flush what is left.
    pub fn finish(&mut self, edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
        let rest = std::mem::take(&mut self.buf);
        if self.overflow || rest.is_empty() {
            return rest;
        }
        if self.sse {
            return rewrite_event(&rest, edit);
        }
        match serde_json::from_slice::<Value>(&rest) {
            Ok(mut v) => {
                edit_messages(&mut v, edit);
                v.to_string().into_bytes()
            }
            Err(_) => rest,
        }
    }

    /// True when a body (or an event) exceeded the limit and was dropped.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }
}

fn edit_messages(v: &mut Value, edit: &mut dyn FnMut(&mut Value)) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(edit),
        other => edit(other),
    }
}

/// Index just past the blank line that ends the first complete SSE event.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Rewrite the `data:` of one SSE event if it is JSON; keep every other line as it was.
fn rewrite_event(event: &[u8], edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(event) else {
        return event.to_vec();
    };
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return event.to_vec();
    }
    let Ok(mut v) = serde_json::from_str::<Value>(&data.join("\n")) else {
        return event.to_vec();
    };
    edit_messages(&mut v, edit);
    let mut out = String::with_capacity(event.len());
    let mut wrote_data = false;
    for line in text.lines() {
        if line.starts_with("data:") {
            if !wrote_data {
                out.push_str("data: ");
                out.push_str(&v.to_string());
                out.push('\n');
                wrote_data = true;
            }
        } else if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod rewriter_tests {
    use super::*;

    fn drop_b(v: &mut Value) {
        if let Some(tools) = v.pointer_mut("/result/tools").and_then(Value::as_array_mut) {
            tools.retain(|t| t["name"] != "b");
        }
    }

    #[test]
    fn sse_events_are_rewritten_one_by_one() {
        let mut r = ResponseRewriter::new(Some("text/event-stream"), 1 << 20).unwrap();
        let ev1 = b"event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\n\n";
        // Split mid-event: nothing comes out until the event is complete.
        assert!(r.push(&ev1[..20], &mut drop_b).is_empty());
        let out = String::from_utf8(r.push(&ev1[20..], &mut drop_b)).unwrap();
        assert!(out.starts_with("event: message\nid: 1\ndata: "), "{out}");
        assert!(out.contains("\"a\"") && !out.contains("\"b\""), "{out}");
        assert!(out.ends_with("\n\n"));
        // A comment/keep-alive event passes byte for byte.
        assert_eq!(r.push(b": ping\n\n", &mut drop_b), b": ping\n\n");
        assert!(r.finish(&mut drop_b).is_empty());
    }

    #[test]
    fn json_bodies_are_rewritten_at_the_end() {
        let mut r =
            ResponseRewriter::new(Some("application/json; charset=utf-8"), 1 << 20).unwrap();
        let body = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#;
        assert!(r.push(body, &mut drop_b).is_empty());
        let v: Value = serde_json::from_slice(&r.finish(&mut drop_b)).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn oversized_json_is_dropped_not_passed_unedited() {
        let mut r = ResponseRewriter::new(Some("application/json"), 8).unwrap();
        assert!(r.push(b"0123456789", &mut drop_b).is_empty());
        assert!(r.overflowed());
        assert!(r.finish(&mut drop_b).is_empty());
    }

    #[test]
    fn other_content_types_are_not_rewritten() {
        assert!(ResponseRewriter::new(Some("text/html"), 10).is_none());
        assert!(ResponseRewriter::new(None, 10).is_none());
    }
}
