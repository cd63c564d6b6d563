//! JSON-RPC 2.0 messages as MCP carries them: recognise a message or batch in a request body
//! and extract what policy decides on, per message: method, id, tool and arguments
//! (`tools/call`), resource URI (`resources/read`), prompt name (`prompts/get`), plus the
//! session id and protocol version of the HTTP request. Also builds the JSON-RPC error
//! responses a denied request gets. Pure: bytes in, values out.

use serde_json::{json, Map, Value};

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
