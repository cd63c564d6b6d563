//! The older MCP transport (HTTP+SSE, 2024-11-05) answers every POSTed message on the client's
//! GET event stream, not in the POST's response, so a JSON-RPC error in the POST's body never
//! reaches that transport's clients, and `tools/list` results arrive where the POST's pipeline
//! cannot see them. Here each such stream that passes through the proxy is registered under
//! the endpoint its server announced (`event: endpoint`): a denied POST to that endpoint has
//! its JSON-RPC errors delivered on the stream, between two events, and an allowed
//! `tools/list` leaves its policy context with the stream, whose answer is then filtered
//! like a Streamable HTTP one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::Method;
use portcullis_filters::parse::destination::Destination;
use portcullis_filters::parse::jsonrpc::McpRequest;
use portcullis_filters::parse::mcp_body::{message_ids, EventData, SseEvent, SseEvents};
use portcullis_filters::{
    Action, ActionKind, BodyTransform, Chain, Context, ErrorCode, Filter, Peer, Rejection,
    TransformError, Via,
};
use tokio::sync::mpsc;

use crate::telemetry::metrics::Metrics;

/// Only the first bytes of a stream are read for the endpoint event.
const HEAD_LIMIT: usize = 4096;

/// (caller's SPIFFE ID, server authority, announced POST endpoint path and query): a denial
/// only ever reaches a stream of the identity whose request was denied.
type Key = (String, String, String);

/// One open stream: where denials go, and the `tools/list` requests whose answers it will
/// carry.
#[derive(Debug)]
struct Session {
    /// Bounded (`mcp.sse_queue` batches): a client that stops reading cannot make the proxy
    /// queue denials without end.
    tx: mpsc::Sender<Bytes>,
    /// The `tools/list` requests awaiting their answer on this stream, by JSON-RPC id.
    lists: Mutex<HashMap<IdKey, Listing>>,
}

/// A JSON-RPC id as a map key (its JSON text: `1` and `"1"` differ, as they do in JSON-RPC).
type IdKey = String;

/// One awaited `tools/list` answer: the listing request's policy input (shared by all its
/// messages) and the one message, so a batch of n listings costs O(n), not a copy of the
/// whole batch per id.
#[derive(Debug)]
struct Listing {
    input: Arc<portcullis_policy::Input>,
    mcp: McpRequest,
}

impl Session {
    /// The listing request awaiting the answer with this JSON-RPC id, if any (taken: an id is
    /// answered once).
    fn take_list(&self, id: &serde_json::Value) -> Option<Listing> {
        self.lists.lock().ok()?.remove(&id.to_string())
    }
}

/// How a denial was (or was not) put on an event stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    NoStream,
    /// The stream's queue is full: its client is not reading.
    Full,
}

/// Open HTTP+SSE streams by [`Key`].
#[derive(Debug)]
pub struct SseSessions {
    streams: Mutex<HashMap<Key, Arc<Session>>>,
    /// Capacity of each stream's queue (`mcp.sse_queue`).
    queue: usize,
    metrics: Arc<Metrics>,
}

impl SseSessions {
    /// Put JSON-RPC messages on the stream whose endpoint is `endpoint` at `authority`;
    /// false when there is no such stream.
    pub fn deliver(
        &self,
        identity: &str,
        authority: &str,
        endpoint: &str,
        messages: &[serde_json::Value],
    ) -> Delivery {
        let Ok(streams) = self.streams.lock() else {
            return Delivery::NoStream;
        };
        let key = (
            identity.to_owned(),
            authority.to_owned(),
            endpoint.to_owned(),
        );
        let Some(session) = streams.get(&key) else {
            return Delivery::NoStream;
        };
        let mut events = String::new();
        for m in messages {
            events.push_str("event: message\r\ndata: ");
            events.push_str(&m.to_string());
            events.push_str("\r\n\r\n");
        }
        match session.tx.try_send(Bytes::from(events)) {
            Ok(()) => Delivery::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.sse_queue_full.fetch_add(1, Ordering::Relaxed);
                Delivery::Full
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::NoStream,
        }
    }

    /// An allowed `tools/list` POST to a registered endpoint: its answer, on the stream, is
    /// filtered with this request's policy context. False when there is no such stream.
    pub fn expect_lists(
        &self,
        key: (&str, &str, &str),
        input: &portcullis_policy::Input,
        mcp: &McpRequest,
    ) -> bool {
        let Ok(streams) = self.streams.lock() else {
            return false;
        };
        let key = (key.0.to_owned(), key.1.to_owned(), key.2.to_owned());
        let Some(session) = streams.get(&key) else {
            return false;
        };
        let Ok(mut lists) = session.lists.lock() else {
            return false;
        };
        let input = Arc::new(input.clone());
        for m in &mcp.messages {
            if let (Some("tools/list"), Some(id)) = (m.method.as_deref(), &m.id) {
                let one = McpRequest {
                    messages: vec![m.clone()],
                    batch: false,
                    session_id: mcp.session_id.clone(),
                    protocol_version: mcp.protocol_version.clone(),
                };
                let listing = Listing {
                    input: input.clone(),
                    mcp: one,
                };
                lists.insert(id.to_string(), listing);
            }
        }
        true
    }

    fn register(&self, key: Key, session: Arc<Session>) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.insert(key, session);
        }
    }

    fn unregister(&self, key: &Key) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(key);
        }
    }
}

/// The HTTP+SSE transport's filter: registers streams (response-body phase of a GET event
/// stream), parks allowed `tools/list` POSTs with their stream (request phase, after the
/// policy) and delivers the JSON-RPC errors of denied POSTs on the stream (refusal phase).
#[derive(Debug)]
pub struct SseTransport {
    sessions: Arc<SseSessions>,
    /// Largest event held while a `tools/list` answer is awaited.
    event_limit: usize,
}

impl SseTransport {
    pub fn new(event_limit: usize, queue: usize, metrics: Arc<Metrics>) -> SseTransport {
        SseTransport {
            sessions: Arc::new(SseSessions {
                streams: Mutex::default(),
                queue: queue.max(1),
                metrics,
            }),
            event_limit,
        }
    }
}

impl Filter for SseTransport {
    fn name(&self) -> &'static str {
        "mcp_sse_transport"
    }

    /// An allowed `tools/list` POST of the older transport: its answer will come on the
    /// session's event stream, which filters it with this request's policy context.
    /// A denied POST to an endpoint whose event stream passes through this proxy: its JSON-RPC
    /// errors go on that stream (where the client waits for answers) and leave the refusal,
    /// which is then the transport's bare 202.
    fn refused(&self, ctx: &Context, req: &http::request::Parts, rej: &mut Rejection) {
        let Some(answer) = rej.jsonrpc.as_mut() else {
            return;
        };
        let Some(endpoint) = req.uri.path_and_query() else {
            return;
        };
        if req.method != Method::POST || answer.responses.is_empty() {
            return;
        }
        let authority = ctx.destination.authority();
        let identity = ctx.peer.spiffe_id.as_str();
        let delivery =
            self.sessions
                .deliver(identity, &authority, endpoint.as_str(), &answer.responses);
        match delivery {
            Delivery::Delivered => answer.responses.clear(),
            Delivery::NoStream => {}
            // The client is not reading its stream: the POST itself says so.
            Delivery::Full => {
                *rej = Rejection::new(
                    ErrorCode::Overloaded,
                    "the event stream of this session is not being read: its queue (mcp.sse_queue) is full",
                );
            }
        }
    }

    /// A GET event stream may be an HTTP+SSE session whose denials must travel on it.
    fn response_body(
        &self,
        ctx: &Context,
        resp: &http::response::Parts,
        chain: &Chain,
    ) -> Option<Box<dyn BodyTransform>> {
        let event_stream = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if ctx.method != Method::GET || !event_stream || ctx.mcp.request.is_some() {
            return None;
        }
        Some(Box::new(SseTap::new(
            self.sessions.clone(),
            ctx,
            chain.clone(),
            self.event_limit,
        )))
    }

    fn request_now(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        if req.method != Method::POST || !ctx.lists_tools() {
            return Action::Continue;
        }
        let (Some(input), Some(mcp), Some(endpoint)) = (
            &ctx.mcp.listing_input,
            &ctx.mcp.request,
            req.uri.path_and_query(),
        ) else {
            return Action::Continue;
        };
        let authority = ctx.destination.authority();
        let key = (
            ctx.peer.spiffe_id.as_str(),
            authority.as_str(),
            endpoint.as_str(),
        );
        self.sessions.expect_lists(key, input, mcp);
        Action::Continue
    }
}

/// A GET event stream on its way to the client: watches for the endpoint event, then
/// interleaves events the proxy has to deliver, only at event boundaries.
struct SseTap {
    sessions: Arc<SseSessions>,
    identity: String,
    authority: String,
    head: Vec<u8>,
    key: Option<Key>,
    rx: Option<mpsc::Receiver<Bytes>>,
    session: Option<Arc<Session>>,
    /// For `tools/list` answers: the chain whose response-body phase filters them, and the
    /// stream's caller and server.
    chain: Chain,
    peer: Arc<Peer>,
    destination: Destination,
    /// Set while answers are awaited (or an event is half-read): the stream is then split
    /// into events.
    events: Option<SseEvents>,
    event_limit: usize,
    /// The bytes sent so far end an event (a blank line).
    at_boundary: bool,
    tail: [u8; 4],
}

impl SseTap {
    fn new(sessions: Arc<SseSessions>, ctx: &Context, chain: Chain, event_limit: usize) -> SseTap {
        SseTap {
            sessions,
            identity: ctx.peer.spiffe_id.as_str().to_owned(),
            authority: ctx.destination.authority(),
            head: Vec::new(),
            key: None,
            rx: None,
            session: None,
            chain,
            peer: ctx.peer.clone(),
            destination: ctx.destination.clone(),
            events: None,
            event_limit,
            at_boundary: true,
            tail: [0; 4],
        }
    }

    fn observe(&mut self, data: &[u8]) {
        for &b in data {
            self.tail = [self.tail[1], self.tail[2], self.tail[3], b];
        }
        self.at_boundary = self.tail[2..] == *b"\n\n"
            || self.tail[2..] == *b"\r\r"
            || self.tail == *b"\r\n\r\n"
            || data.is_empty() && self.at_boundary;
        if self.key.is_some() || self.head.len() >= HEAD_LIMIT {
            return;
        }
        self.head
            .extend_from_slice(&data[..data.len().min(HEAD_LIMIT - self.head.len())]);
        if let Some(endpoint) = endpoint_event(&self.head) {
            let key = (self.identity.clone(), self.authority.clone(), endpoint);
            let (tx, rx) = mpsc::channel(self.sessions.queue);
            let session = Arc::new(Session {
                tx,
                lists: Mutex::default(),
            });
            self.sessions.register(key.clone(), session.clone());
            self.key = Some(key);
            self.rx = Some(rx);
            self.session = Some(session);
        }
    }

    /// Whether `tools/list` answers are awaited (or an event is half-read): only then is the
    /// stream split into events.
    fn filtering(&self) -> bool {
        let awaited = self
            .session
            .as_ref()
            .and_then(|s| s.lists.lock().ok().map(|l| !l.is_empty()))
            .unwrap_or(false);
        awaited || self.events.is_some()
    }

    /// Complete events go out (awaited answers filtered); a half event is held back.
    fn filter(&mut self, data: &[u8]) -> Result<Vec<u8>, TransformError> {
        let limit = self.event_limit;
        let events = self.events.get_or_insert_with(|| SseEvents::new(limit));
        let complete = events.push(data).map_err(|_| {
            TransformError(
                "an event exceeds limits.inspect_body_bytes while a tools/list answer is awaited"
                    .into(),
            )
        })?;
        let mut out = Vec::new();
        for event in complete {
            out.extend_from_slice(&self.answer(event)?);
        }
        Ok(out)
    }

    /// An event that answers an awaited `tools/list` goes through the chain's response-body
    /// phase for the listing request's context, exactly as a Streamable HTTP answer would. A
    /// message event whose data the proxy cannot read (see [`EventData`]) might be that
    /// answer: it ends the stream.
    fn answer(&self, event: Vec<u8>) -> Result<Bytes, TransformError> {
        let mut event = Bytes::from(event);
        let Some(session) = &self.session else {
            return Ok(event);
        };
        let json = match EventData::of(&event) {
            EventData::Json(json) => json,
            EventData::Empty => return Ok(event),
            EventData::Unreadable if is_endpoint(&event) => return Ok(event),
            EventData::Unreadable => {
                return Err(TransformError(
                    "an event whose data is not JSON the proxy reads, while a tools/list \
                     answer is awaited"
                        .into(),
                ))
            }
        };
        for id in message_ids(&json) {
            let Some(Listing { input, mcp }) = session.take_list(id) else {
                continue;
            };
            let (mut parts, ()) = http::Request::new(()).into_parts();
            parts.method = Method::POST;
            let mut ctx = Context::new(
                self.peer.clone(),
                Via::Mitm,
                self.destination.clone(),
                &parts,
            );
            ctx.kind = ActionKind::Mcp;
            ctx.mcp.listing_input = Some((*input).clone());
            ctx.mcp.request = Some(mcp);
            if let Some(mut t) = self.chain.response_body(&ctx, &event_stream_head()) {
                let mut out = t.data(event)?.to_vec();
                out.extend_from_slice(&t.end()?);
                event = Bytes::from(out);
            }
        }
        Ok(event)
    }
}

/// The head of an event-stream response, for the response-body phase of a parked listing.
fn event_stream_head() -> http::response::Parts {
    let mut resp = http::Response::new(());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp.into_parts().0
}

impl Drop for SseTap {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.sessions.unregister(key);
        }
    }
}

/// Whether an event is the older transport's `event: endpoint` (its data is a URL).
fn is_endpoint(event: &[u8]) -> bool {
    std::str::from_utf8(event).is_ok_and(|text| SseEvent::parse(text).kind == "endpoint")
}

/// The path and query announced by an `event: endpoint` among complete events in `head`.
fn endpoint_event(head: &[u8]) -> Option<String> {
    let events = SseEvents::new(usize::MAX).push(head).ok()?;
    for event in events {
        let event = SseEvent::parse(std::str::from_utf8(&event).ok()?);
        if let ("endpoint", Some(d)) = (event.kind, event.data) {
            // Relative (the usual) or absolute; the proxy sees POSTs with path and query.
            let uri: http::Uri = d.trim().parse().ok()?;
            return uri.path_and_query().map(|pq| pq.as_str().to_owned());
        }
    }
    None
}

impl BodyTransform for SseTap {
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
        if !self.filtering() {
            self.observe(&chunk);
            return Ok(chunk);
        }
        // Whole events only: what was sent still ends at an event boundary.
        let out = self.filter(&chunk)?;
        self.observe(&out);
        Ok(Bytes::from(out))
    }

    /// An event the stream ended in without its blank line is an event too (a client may take
    /// it): filtered like any other.
    fn end(&mut self) -> Result<Bytes, TransformError> {
        let rest = self.events.take().map(|mut e| e.rest()).unwrap_or_default();
        if rest.is_empty() || !self.filtering() {
            return Ok(Bytes::from(rest));
        }
        self.answer(rest)
    }

    fn poll_insert(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Bytes>> {
        match self.rx.as_mut() {
            Some(rx) if self.at_boundary => match rx.poll_recv(cx) {
                Poll::Ready(Some(events)) => Poll::Ready(Some(events)),
                _ => Poll::Pending,
            },
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_nobody_reads_queues_a_bounded_number_of_denials() {
        let metrics = Arc::new(Metrics::default());
        let transport = SseTransport::new(1 << 20, 2, metrics.clone());
        let sessions = &transport.sessions;
        let (tx, _rx) = mpsc::channel(sessions.queue);
        let key: Key = (
            "spiffe://a/b".into(),
            "mcp:443".into(),
            "/messages/?s=1".into(),
        );
        sessions.register(
            key.clone(),
            Arc::new(Session {
                tx,
                lists: Mutex::default(),
            }),
        );
        let deny = [serde_json::json!({"jsonrpc": "2.0", "id": 1, "error": {}})];
        let send = || sessions.deliver(&key.0, &key.1, &key.2, &deny);
        assert_eq!(send(), Delivery::Delivered);
        assert_eq!(send(), Delivery::Delivered);
        assert_eq!(send(), Delivery::Full);
        assert_eq!(metrics.sse_queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(
            sessions.deliver("spiffe://other/x", &key.1, &key.2, &deny),
            Delivery::NoStream,
            "a denial only reaches a stream of the same identity"
        );
    }

    #[test]
    fn the_endpoint_event_is_found_relative_or_absolute() {
        let rel = b"event: endpoint\r\ndata: /messages/?session_id=abc\r\n\r\n";
        assert_eq!(
            endpoint_event(rel).as_deref(),
            Some("/messages/?session_id=abc")
        );
        let abs = b": ping\n\nevent: endpoint\ndata: https://h:1/m?s=1\n\n";
        assert_eq!(endpoint_event(abs).as_deref(), Some("/m?s=1"));
        // CR-only line endings, as the SSE spec allows.
        let cr = b"event: endpoint\rdata: /m?s=2\r\r";
        assert_eq!(endpoint_event(cr).as_deref(), Some("/m?s=2"));
        assert_eq!(endpoint_event(b"event: message\ndata: {}\n\n"), None);
    }
}
