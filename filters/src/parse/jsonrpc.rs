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

    /// `params.name` of `prompts/get`.
    pub fn prompt(&self) -> Option<&str> {
        self.param_str("prompts/get", "name")
    }

    /// `params.uri` of `resources/read`.
    pub fn resource_uri(&self) -> Option<&str> {
        self.param_str("resources/read", "uri")
    }

    /// The revision a 2026-07-28-style request names in `params._meta`.
    pub fn meta_protocol_version(&self) -> Option<&str> {
        self.params
            .as_ref()?
            .get("_meta")?
            .get("io.modelcontextprotocol/protocolVersion")?
            .as_str()
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

impl McpRequest {
    /// The JSON-RPC answer refusing this request: every request id answered with an error
    /// (`reason_of(id)`), notifications dropped.
    pub fn refusal<'a>(
        &self,
        reason_of: impl Fn(&Value) -> &'a str,
        trace_id: &str,
    ) -> crate::error::JsonRpcAnswer {
        let responses = self
            .messages
            .iter()
            .filter(|m| m.method.is_some())
            .filter_map(|m| {
                let id = m.id.as_ref()?;
                Some(error_response(id, reason_of(id), trace_id))
            })
            .collect();
        crate::error::JsonRpcAnswer {
            responses,
            batch: self.batch,
            status: None,
        }
    }
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
    from_value(v, session_id, protocol_header)
}

/// A parsed JSON value as a JSON-RPC message or batch.
fn from_value(
    v: Value,
    session_id: Option<&str>,
    protocol_header: Option<&str>,
) -> Result<McpRequest, NotJsonRpc> {
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
            .find_map(|m| {
                m.param_str("initialize", "protocolVersion")
                    .or_else(|| m.meta_protocol_version())
            })
            .map(str::to_owned)
    });
    Ok(McpRequest {
        messages,
        batch,
        session_id: session_id.map(str::to_owned),
        protocol_version,
    })
}

/// What a request body is to a JSON-RPC server. The proxy classifies by content, never by the
/// `Content-Type` label: the official MCP SDK servers accept JSON-RPC under content-type lists
/// and parameters, and the older HTTP+SSE transport under any content type at all.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyKind {
    /// JSON-RPC messages: decided per message.
    JsonRpc(McpRequest),
    /// JSON that holds no JSON-RPC message, or no JSON object or array at all: plain HTTP.
    Other,
}

/// A body the proxy cannot read exactly as a JSON-RPC server would. Never passed on as plain
/// HTTP: "not understood" must not mean "less restricted".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// JSON in UTF-16 or UTF-32 (Python's `json.loads` accepts those; this parser does not).
    #[error("the body looks like JSON in {0}, which the proxy cannot inspect: send UTF-8")]
    Encoding(&'static str),
    /// It starts like JSON but does not parse here (nesting over 128, a lone surrogate escape,
    /// invalid UTF-8, trailing data...), while a server's parser might accept it.
    #[error("the body starts like JSON but is not JSON the proxy can read ({0}): refused rather than passed uninspected")]
    Malformed(String),
    /// JSON with a `"jsonrpc"` member that is not a valid JSON-RPC 2.0 message or batch.
    #[error("the body has a \"jsonrpc\" member but is not a valid JSON-RPC 2.0 message: {0}")]
    NotJsonRpc(String),
}

/// JSON whitespace (RFC 8259; also what Python's `json` skips).
fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The body without a UTF-8 byte-order mark (servers drop it), or why it cannot be read: UTF-16
/// or UTF-32, detected as Python's `json.detect_encoding` does (a BOM, or zero bytes among the
/// first four, which UTF-8 JSON never has there).
fn utf8_text(body: &[u8]) -> Result<&[u8], Unreadable> {
    if let Some(rest) = body.strip_prefix(b"\xEF\xBB\xBF") {
        return Ok(rest);
    }
    let head = &body[..body.len().min(4)];
    if head.starts_with(b"\x00\x00\xFE\xFF") || head.starts_with(b"\xFF\xFE\x00\x00") {
        return Err(Unreadable::Encoding("UTF-32"));
    }
    if head.starts_with(b"\xFE\xFF") || head.starts_with(b"\xFF\xFE") {
        return Err(Unreadable::Encoding("UTF-16"));
    }
    if head.len() >= 2 && head.contains(&0) {
        return Err(Unreadable::Encoding("UTF-16 or UTF-32"));
    }
    Ok(body)
}

/// Whether a text starts like a JSON object or array (a JSON-RPC message is one of those).
fn starts_like_json(text: &[u8]) -> bool {
    matches!(
        text.iter().copied().find(|b| !is_json_ws(*b)),
        Some(b'{' | b'[')
    )
}

/// Classify a whole request body.
pub fn classify(
    body: &[u8],
    session_id: Option<&str>,
    protocol_header: Option<&str>,
) -> Result<BodyKind, Unreadable> {
    let text = utf8_text(body)?;
    if !starts_like_json(text) {
        return Ok(BodyKind::Other);
    }
    let v: Value =
        serde_json::from_slice(text).map_err(|e| Unreadable::Malformed(e.to_string()))?;
    let names_jsonrpc = |v: &Value| v.as_object().is_some_and(|o| o.contains_key("jsonrpc"));
    let looks_like_jsonrpc = match &v {
        Value::Array(items) => items.iter().any(names_jsonrpc),
        other => names_jsonrpc(other),
    };
    match from_value(v, session_id, protocol_header) {
        Ok(req) => Ok(BodyKind::JsonRpc(req)),
        Err(e) if looks_like_jsonrpc => Err(Unreadable::NotJsonRpc(e.to_string())),
        Err(_) => Ok(BodyKind::Other),
    }
}

/// A body too large to buffer, read as it streams past: could the whole be JSON-RPC? It may
/// be when it is in UTF-16/32, or starts like JSON (after any amount of whitespace) and a
/// `"jsonrpc"` member (escapes decoded) appears in the top-level object, or in an object
/// directly inside a top-level array. Fed chunk by chunk, in constant memory; once it says
/// yes or "not JSON", that is final.
#[derive(Debug, Default)]
pub struct LargeBodyScan {
    /// The first bytes, until there are enough to tell the encoding (a byte-order mark, UTF-16
    /// or UTF-32) whatever the chunks.
    start: Vec<u8>,
    started: bool,
    /// Set once the first non-whitespace byte opened an object or array.
    json: Option<KeyScan>,
    /// `Some(true)`: may be JSON-RPC; `Some(false)`: not JSON, plain HTTP.
    verdict: Option<bool>,
}

/// Bytes that tell the encoding of a JSON text (RFC 8259 §8.1, RFC 4627 §3).
const ENCODING_BYTES: usize = 4;

impl LargeBodyScan {
    /// The next bytes of the body; `true` once the body may be JSON-RPC.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.verdict.is_some() || self.started {
            return self.scan(chunk);
        }
        self.start.extend_from_slice(chunk);
        if self.start.len() < ENCODING_BYTES {
            return false;
        }
        self.begin()
    }

    /// The end of the body: a body shorter than the encoding bytes is judged as it is.
    pub fn end(&mut self) -> bool {
        if !self.started && self.verdict.is_none() {
            return self.begin();
        }
        self.verdict == Some(true)
    }

    fn begin(&mut self) -> bool {
        self.started = true;
        let start = std::mem::take(&mut self.start);
        match utf8_text(&start) {
            Ok(text) => self.scan(text),
            Err(_) => *self.verdict.insert(true),
        }
    }

    fn scan(&mut self, mut text: &[u8]) -> bool {
        if let Some(v) = self.verdict {
            return v;
        }
        if self.json.is_none() {
            let Some(at) = text.iter().position(|b| !is_json_ws(*b)) else {
                return false; // whitespace so far: a JSON body may still follow
            };
            if !matches!(text[at], b'{' | b'[') {
                return *self.verdict.insert(false);
            }
            text = &text[at..];
        }
        if self
            .json
            .get_or_insert_with(KeyScan::default)
            .finds_jsonrpc(text)
        {
            self.verdict = Some(true);
        }
        self.verdict == Some(true)
    }

    /// The body is not JSON: nothing later can make it JSON-RPC.
    pub fn is_plain(&self) -> bool {
        self.verdict == Some(false)
    }
}

/// The start of a large body: could the whole be JSON-RPC, judging by `head` alone?
pub fn head_may_be_jsonrpc(head: &[u8]) -> bool {
    let mut scan = LargeBodyScan::default();
    scan.feed(head) || scan.end()
}

/// A JSON tokenizer that only tracks containers, strings and the member names of the first
/// two levels; it never fails (the text may be cut anywhere) and resumes across chunks.
#[derive(Debug, Default)]
struct KeyScan {
    /// `true` for an object, `false` for an array, per open container (bounded).
    stack: Vec<bool>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Raw bytes of the string being read, when it is a member name at a watched level.
    key: Option<Vec<u8>>,
    /// In an object, a member name is expected next (after `{` or `,`).
    expect_key: bool,
}

impl KeyScan {
    const MAX_KEY: usize = 64;

    fn watched(&self) -> bool {
        // A member of the top-level object, or of an object right inside a top-level array.
        match self.depth {
            1 => self.stack.first() == Some(&true),
            2 => self.stack.first() == Some(&false) && self.stack.get(1) == Some(&true),
            _ => false,
        }
    }

    fn finds_jsonrpc(&mut self, text: &[u8]) -> bool {
        for &b in text {
            if self.in_string {
                if let Some(k) = self.key.as_mut() {
                    if k.len() <= Self::MAX_KEY {
                        k.push(b);
                    }
                }
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if let Some(mut k) = self.key.take() {
                        k.pop(); // the closing quote
                        if unescape_key(&k).as_deref() == Some("jsonrpc") {
                            return true;
                        }
                    }
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.key = (self.expect_key && self.watched()).then(Vec::new);
                    self.expect_key = false;
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.stack.len() < 2 {
                        self.stack.push(b == b'{');
                    }
                    self.expect_key = b == b'{';
                }
                b'}' | b']' => {
                    if self.depth <= self.stack.len() {
                        self.stack.pop();
                    }
                    self.depth = self.depth.saturating_sub(1);
                    self.expect_key = false;
                }
                b',' => {
                    self.expect_key = self.depth <= self.stack.len()
                        && self.stack.get(self.depth.wrapping_sub(1)) == Some(&true);
                }
                _ => {}
            }
        }
        false
    }
}

/// A short member name with its JSON escapes decoded; `None` when it cannot be (or is long).
fn unescape_key(raw: &[u8]) -> Option<String> {
    if raw.len() > KeyScan::MAX_KEY {
        return None;
    }
    let quoted = [b"\"".as_slice(), raw, b"\""].concat();
    serde_json::from_slice::<String>(&quoted).ok()
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
    if let Some(uri) = m.resource_uri() {
        o.insert("uri".into(), json!(uri));
    }
    if let Some(prompt) = m.prompt() {
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
    fn bodies_are_classified_by_content_never_passed_on_unread() {
        let rpc = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
        assert!(matches!(
            classify(rpc, None, None),
            Ok(BodyKind::JsonRpc(_))
        ));
        // Whitespace and a UTF-8 BOM in front, as servers accept them.
        let padded = [b"\xEF\xBB\xBF \r\n\t".as_slice(), rpc].concat();
        assert!(matches!(
            classify(&padded, None, None),
            Ok(BodyKind::JsonRpc(_))
        ));
        for other in [
            &b"hello"[..],
            b"",
            b"  ",
            br#"{"a":1}"#,
            br#"[1,2]"#,
            b"\"str\"",
            b"[]",
        ] {
            assert_eq!(
                classify(other, None, None),
                Ok(BodyKind::Other),
                "{other:?}"
            );
        }
        let deep = format!("{}{}", "[".repeat(150), "]".repeat(150));
        let lone = br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":"\ud800"}}"#;
        for bad in [
            deep.as_bytes(),
            lone,
            br#"{"a":1} trailing"#,
            b"{\"a\":\"\xff\"}",
            b"[oops",
        ] {
            assert!(
                matches!(classify(bad, None, None), Err(Unreadable::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let utf16: Vec<u8> = "{\"jsonrpc\":\"2.0\"}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert!(matches!(
            classify(&utf16, None, None),
            Err(Unreadable::Encoding(_))
        ));
        // A "jsonrpc" member makes it JSON-RPC or a refusal, never plain HTTP.
        for almost in [
            &br#"{"jsonrpc":"1.0","method":"x"}"#[..],
            br#"{"json\u0072pc":"2.0","id":{},"method":"x"}"#,
            br#"[{"jsonrpc":"2.0","method":"ok"},{"jsonrpc":"2.0"}]"#,
        ] {
            assert!(
                matches!(classify(almost, None, None), Err(Unreadable::NotJsonRpc(_))),
                "{}",
                String::from_utf8_lossy(almost)
            );
        }
    }

    #[test]
    fn the_head_of_a_large_body_shows_a_jsonrpc_member_at_the_top_levels_only() {
        for yes in [
            &br#"{"params":{"big":"...."},"jsonrpc":"2.0""#[..],
            br#"  {"json\u0072pc""#,
            br#"[{"id":1},{"method":"x","jsonrpc""#,
        ] {
            assert!(head_may_be_jsonrpc(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &br#"{"data":{"jsonrpc":"2.0"},"x":"jsonrpc","#[..],
            br#"{"s":"\"jsonrpc\"","#,
            br#"[[{"jsonrpc":"2.0"}]"#,
            b"plain text jsonrpc",
        ] {
            assert!(!head_may_be_jsonrpc(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn a_large_body_is_scanned_as_it_streams_across_chunk_boundaries() {
        let body = br#"  {"pad":"x\"jsonrpc\"","nested":{"jsonrpc":1},"json\u0072pc":"2.0"}"#;
        let last_key = body.len() - r#""json\u0072pc":"2.0"}"#.len();
        assert!(!LargeBodyScan::default().feed(&body[..last_key]));
        for cut in 1..body.len() {
            let (a, b) = body.split_at(cut);
            let mut scan = LargeBodyScan::default();
            let first = scan.feed(a);
            assert!(first || scan.feed(b), "cut at {cut}");
            assert!(!scan.is_plain());
        }
        // Whitespace of any length keeps the question open; anything else settles it.
        let mut scan = LargeBodyScan::default();
        assert!(!scan.feed(&[b' '; 4096]));
        assert!(!scan.is_plain());
        assert!(scan.feed(br#"[{"jsonrpc":"2.0"}]"#));
        let mut plain = LargeBodyScan::default();
        assert!(!plain.feed(b"   name=value&jsonrpc=2.0"));
        assert!(plain.is_plain());
        assert!(!plain.feed(br#"{"jsonrpc":"2.0"}"#));
    }

    #[test]
    fn duplicate_members_resolve_as_the_sdk_servers_do_last_wins() {
        // Python's json.loads (the official SDK servers) keeps the last duplicate member.
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"safe","arguments":{"a":1},"name":"delete_repo","arguments":{"a":2}}}"#;
        let Ok(BodyKind::JsonRpc(r)) = classify(body, None, None) else {
            panic!("not JSON-RPC")
        };
        let input = policy_input(&r, &r.messages[0]);
        assert_eq!(input["tool"], "delete_repo");
        assert_eq!(input["arguments"]["a"], 2);
    }

    #[test]
    fn error_response_shape() {
        let e = error_response(&json!(7), "no deletes", "abc");
        assert_eq!(e["id"], 7);
        assert_eq!(e["error"]["code"], DENIED_CODE);
        assert_eq!(e["error"]["data"]["reason"], "no deletes");
    }
}
