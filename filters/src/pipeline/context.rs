//! The per-action context every phase reads and fills: who (the peer), what (destination,
//! kind, method and path), the trace ids, the request body as inspection saw it, the MCP
//! messages, the policy decisions and the credentials used.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::error::ErrorCode;
use crate::parse::destination::Destination;
use crate::parse::identity::SpiffeId;
use crate::parse::jsonrpc::McpRequest;

/// What kind of action a context describes; the policy input's `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionKind {
    Connect,
    Http,
    Mcp,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Connect => "connect",
            ActionKind::Http => "http",
            ActionKind::Mcp => "mcp",
        }
    }
}

/// A W3C trace id (16 random bytes), used to join error bodies, logs and spans.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        f.write_str(hex_into(&self.0, &mut buf))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes` into `buf` (twice as long): no allocation, no formatter per byte
/// (ids are written several times per request).
pub fn hex_into<'a>(bytes: &[u8], buf: &'a mut [u8]) -> &'a str {
    let mut n = 0;
    for (b, out) in bytes.iter().zip(buf.chunks_exact_mut(2)) {
        out[0] = HEX[usize::from(b >> 4)];
        out[1] = HEX[usize::from(b & 15)];
        n += 2;
    }
    // Only ASCII hex digits were written.
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A span id from the trace id's fresh randomness: the proxy draws both at once. The id is
/// the first half of the trace id mixed, so it neither repeats the trace id's text nor
/// correlates with the half the samplers read.
fn span_id(trace_id: &TraceId) -> [u8; 8] {
    let mut high = [0u8; 8];
    high.copy_from_slice(&trace_id.0[..8]);
    crate::pipeline::timing::mixed_id(u64::from_be_bytes(high))
}

/// Hex of a span id, for logs.
pub fn span_hex(id: &[u8; 8]) -> String {
    hex(id)
}

/// Who is on the other end of the client connection: fixed for the connection's lifetime.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The verified SPIFFE ID from the client's X.509-SVID. There is no context without one.
    pub spiffe_id: SpiffeId,
    pub source: SocketAddr,
    /// `source`'s IP as text, formatted once per connection (the policy input wants it).
    pub source_ip: String,
    /// How the caller proved its SPIFFE ID.
    pub proof: Proof,
}

/// How a caller proved its SPIFFE ID (`input.identity.proof`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// An X.509-SVID in the TLS handshake (mTLS): the proxy listener.
    X509Svid,
    /// A JWT-SVID as `Authorization: Bearer`, per request: the bearer listener.
    JwtSvid,
}

impl Proof {
    pub fn as_str(self) -> &'static str {
        match self {
            Proof::X509Svid => "x509_svid",
            Proof::JwtSvid => "jwt_svid",
        }
    }
}

/// How a request reached the proxy, for logs and for rebuilding the upstream URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `CONNECT host:port` itself.
    Connect,
    /// A request inside an intercepted CONNECT tunnel.
    Mitm,
    /// An absolute-form request (`GET http://host/path`) on the proxy connection.
    AbsoluteForm,
    /// An origin-form request on the proxy connection, routed by a gateway route.
    Gateway,
}

/// Everything the pipeline knows about one action, in parts: what the action is (peer,
/// destination, kind, method, path, body), and what the phases found and decided (the trace,
/// the MCP messages, the decisions, the credentials used). Filters read and fill it.
#[derive(Debug)]
pub struct Context {
    pub peer: Arc<Peer>,
    pub destination: Destination,
    pub kind: ActionKind,
    pub via: Via,
    /// The request method (`CONNECT` for a tunnel) and path without the query string: what
    /// logs may show. Query values can carry secrets and are never logged.
    pub method: http::Method,
    pub path: String,
    /// The gateway route that matched (`Via::Gateway`).
    pub gateway_route: Option<Arc<str>>,
    pub started: Instant,
    /// The request body as the request phase sees it (buffered only if a filter asked).
    pub body: RequestBody,
    /// Set when a phase refused the request (or the proxy failed it): the error code logged.
    pub error: Option<ErrorCode>,
    /// Policy decisions taken for this action: one, or one per JSON-RPC message.
    pub decisions: Vec<DecisionRecord>,
    pub trace: Trace,
    pub mcp: Mcp,
    pub credentials: CredentialUse,
    pub gates: Gates,
    /// The principal the agent acts for (a verified delegation token), when it sent one.
    pub delegation: Option<Arc<crate::parse::jwt::Verified>>,
    /// The caller's verified JWT-SVID (`x-portcullis-jwt-svid`, on this request or on the
    /// CONNECT of its tunnel), for token exchanges that send it as the actor token.
    pub jwt_svid: Option<Arc<crate::parse::jwt::JwtSvid>>,
}

/// What the approval and quota stages did, for telemetry, and what they hold until the action
/// ends.
#[derive(Debug, Default)]
pub struct Gates {
    /// Approvals this action consulted.
    pub approvals: Vec<ApprovalNote>,
    /// The limit that refused the action.
    pub limited: Option<String>,
    /// This action's in-flight slot (`rate_limits.in_flight_per_identity`), freed with it.
    pub slot: Option<crate::stages::quota::Slot>,
}

/// An approval an action consulted: its id, state then, and who decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalNote {
    pub id: String,
    pub state: &'static str,
    pub decided_by: Option<String>,
}

/// The action's place in a distributed trace.
#[derive(Debug)]
pub struct Trace {
    pub id: TraceId,
    /// This action's span id (random), sent upstream as the `traceparent` parent.
    pub span_id: [u8; 8],
    /// The caller's span, when it sent a `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C trace flags (01: sampled).
    pub flags: u8,
    /// Timings of the policy, credential and upstream steps, for child spans: `Some` only when
    /// this action's span is exported (set by the trace propagation stage), so stages record
    /// nothing when telemetry is off.
    pub steps: Option<Box<crate::pipeline::timing::Steps>>,
}

/// What MCP inspection found (`kind == Mcp`) and what its response phases need.
#[derive(Debug, Default)]
pub struct Mcp {
    /// The JSON-RPC messages of the request.
    pub request: Option<McpRequest>,
    /// The policy input of a `tools/list` request, kept for the decisions taken on its
    /// response (each listed tool is decided as the call it would be).
    pub listing_input: Option<portcullis_policy::Input>,
    /// Tools called by this request whose definition changed since it was pinned.
    pub changed_tools: Vec<String>,
    /// A body over the inspection limit whose head was JSON without a `"jsonrpc"` member: the
    /// scan goes on over the rest as it streams (the request-body phase).
    pub large_body: Option<crate::parse::jsonrpc::LargeBodyScan>,
}

/// The credentials an action carries and what substitution did with them.
#[derive(Debug, Default)]
pub struct CredentialUse {
    /// Names of the credentials whose placeholders the request carries.
    pub names: Vec<String>,
    /// The secrets substituted into the request, to redact from its response.
    pub secrets: Vec<Arc<crate::parse::secret::SecretValue>>,
    /// Encodings the proxy produced that hold a secret (a Basic token), redacted whole.
    pub produced: Vec<Arc<crate::parse::secret::SecretValue>>,
    /// What the response is searched for: every form of `secrets` and `produced`, built once
    /// when they were substituted.
    pub needles: Option<Arc<crate::parse::redact::Needles>>,
    /// The request as it was just before its credentials were substituted (idempotent
    /// requests only): replayed once with fresh secrets if the upstream answers 401.
    pub before_substitution: Option<(http::request::Parts, RequestBody)>,
}

/// The request body, for filters that inspect it. `Debug` shows only its size: after
/// substitution the bytes may hold a secret.
#[derive(Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// Streams through untouched (no filter asked to see it).
    NotBuffered,
    /// The request has no body (known before any phase ran).
    Empty,
    /// Read completely (within `limits.inspect_body_bytes`). A filter may replace the bytes;
    /// what is here is what goes upstream.
    Buffered(bytes::Bytes),
    /// Larger than the inspection limit: it streams through, and filters see only its first
    /// bytes (at least the limit).
    TooLarge(bytes::Bytes),
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestBody::NotBuffered => f.write_str("NotBuffered"),
            RequestBody::Empty => f.write_str("Empty"),
            RequestBody::Buffered(b) => write!(f, "Buffered({} bytes)", b.len()),
            RequestBody::TooLarge(head) => write!(f, "TooLarge(head {} bytes)", head.len()),
        }
    }
}

impl RequestBody {
    /// Whether the request can be sent again as it was: the proxy holds all of its body.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Empty | RequestBody::Buffered(_))
    }
}

/// One policy decision and, for MCP, the message it was about (method, id, tool).
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    pub decision: portcullis_policy::Decision,
    pub mcp: Option<McpSummary>,
    /// The input as the engine read it: kept only when a shadow policy or the decision log's
    /// `input` needs it.
    pub input: Option<portcullis_policy::EngineInput>,
    /// The shadow policy's decision on the same input (filled in the finished phase).
    pub shadow: Option<portcullis_policy::Decision>,
}

impl DecisionRecord {
    /// What the decision was about: `mcp` for a JSON-RPC message, `http` for an MCP request's
    /// own decision (made before its messages are read), else the action's kind.
    pub fn kind(&self, action: ActionKind) -> &'static str {
        match (&self.mcp, action) {
            (Some(_), _) => "mcp",
            (None, ActionKind::Mcp) => "http",
            (None, kind) => kind.as_str(),
        }
    }
}

/// What logs may show of a JSON-RPC message: never its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct McpSummary {
    pub method: String,
    pub id: Option<serde_json::Value>,
    pub tool: Option<String>,
    /// `prompts/get`'s prompt name.
    pub prompt: Option<String>,
    /// `resources/read`'s URI.
    pub resource: Option<String>,
    /// The tool's definition changed since it was pinned (logged, or denied).
    pub tool_changed: bool,
}

impl Context {
    /// A new action arriving `via` the proxy for `destination`, described by `req` (its method
    /// and path). Its trace id and span id are fresh; trace propagation may adopt the caller's
    /// trace.
    pub fn new(
        peer: Arc<Peer>,
        via: Via,
        destination: Destination,
        req: &http::request::Parts,
    ) -> Context {
        let kind = match via {
            Via::Connect => ActionKind::Connect,
            Via::Mitm | Via::AbsoluteForm | Via::Gateway => ActionKind::Http,
        };
        let id = TraceId(rand::random());
        Context {
            peer,
            destination,
            kind,
            via,
            method: req.method.clone(),
            path: if kind == ActionKind::Connect {
                String::new()
            } else {
                req.uri.path().to_owned()
            },
            gateway_route: None,
            started: Instant::now(),
            body: RequestBody::NotBuffered,
            error: None,
            decisions: Vec::new(),
            trace: Trace {
                id,
                span_id: span_id(&id),
                parent_span_id: None,
                flags: 1,
                steps: None,
            },
            mcp: Mcp::default(),
            credentials: CredentialUse::default(),
            gates: Gates::default(),
            delegation: None,
            jwt_svid: None,
        }
    }

    /// When steps are recorded, the time a step starts; `None` otherwise (nothing to pay).
    pub fn step_start(&self) -> Option<Instant> {
        self.trace.steps.is_some().then(Instant::now)
    }

    /// Record a step started at `start` (from [`Context::step_start`]).
    pub fn step_end(
        &mut self,
        start: Option<Instant>,
        kind: impl FnOnce() -> crate::pipeline::timing::StepKind,
    ) {
        if let (Some(start), Some(steps)) = (start, self.trace.steps.as_deref_mut()) {
            steps.record(start, kind());
        }
    }

    /// Whether the response carries `tools/list` results to filter.
    pub fn lists_tools(&self) -> bool {
        self.mcp
            .request
            .as_ref()
            .is_some_and(|m| self.lists_tools_in(m))
    }

    /// Whether `mcp` (this action's messages) has a `tools/list` request.
    pub fn lists_tools_in(&self, mcp: &McpRequest) -> bool {
        mcp.messages
            .iter()
            .any(|m| m.method.as_deref() == Some("tools/list"))
    }
}
