//! The older MCP transport (HTTP+SSE, 2024-11-05) answers every POSTed message on the client's
//! GET event stream, not in the POST's response, so a JSON-RPC error in the POST's body never
//! reaches that transport's clients, and `tools/list` results arrive where the POST's pipeline
//! cannot see them. Here each such stream that passes through the proxy is registered under
//! the endpoint its server announced (`event: endpoint`): a denied POST to that endpoint has
//! its JSON-RPC errors delivered on the stream, between two events, and an allowed
//! `tools/list` leaves its policy context with the stream, whose answer is then filtered
//! like a Streamable HTTP one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use portcullis_filters::mcp::{McpRequest, ResponseRewriter};
use portcullis_filters::pipeline::{ActionKind, Peer, TraceId, Via};
use portcullis_filters::{destination::Destination, Chain, Context};
use tokio::sync::mpsc;

use crate::upstream::BoxError;

/// Only the first bytes of a stream are read for the endpoint event.
const HEAD_LIMIT: usize = 4096;

/// (caller's SPIFFE ID, server authority, announced POST endpoint path and query): a denial
/// only ever reaches a stream of the identity whose request was denied.
type Key = (String, String, String);

/// One open stream: where denials go, and the `tools/list` requests whose answers it will
/// carry.
#[derive(Debug)]
struct Session {
    tx: mpsc::UnboundedSender<Bytes>,
    /// (JSON-RPC id, the listing request's policy input and messages).
    lists: Mutex<Vec<(serde_json::Value, portcullis_policy::Input, McpRequest)>>,
}

/// Open HTTP+SSE streams by [`Key`].
#[derive(Debug, Default)]
pub struct SseSessions {
    streams: Mutex<HashMap<Key, Arc<Session>>>,
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
    ) -> bool {
        let Ok(streams) = self.streams.lock() else {
            return false;
        };
        let key = (
            identity.to_owned(),
            authority.to_owned(),
            endpoint.to_owned(),
        );
        let Some(session) = streams.get(&key) else {
            return false;
        };
        let mut events = String::new();
        for m in messages {
            events.push_str("event: message\r\ndata: ");
            events.push_str(&m.to_string());
            events.push_str("\r\n\r\n");
        }
        session.tx.send(Bytes::from(events)).is_ok()
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
        for m in &mcp.messages {
            if let (Some("tools/list"), Some(id)) = (m.method.as_deref(), &m.id) {
                lists.push((id.clone(), input.clone(), mcp.clone()));
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

/// Whose stream it is: the caller and the server (taken from the GET's context).
pub struct StreamOf {
    pub peer: Arc<Peer>,
    pub destination: Destination,
}

impl StreamOf {
    pub fn of(ctx: &Context) -> StreamOf {
        StreamOf {
            peer: ctx.peer.clone(),
            destination: ctx.destination.clone(),
        }
    }
}

/// A GET event stream on its way to the client: watches for the endpoint event, then
/// interleaves events the proxy has to deliver, only at event boundaries.
pub struct SseTap<B> {
    inner: B,
    sessions: Arc<SseSessions>,
    identity: String,
    authority: String,
    head: Vec<u8>,
    key: Option<Key>,
    rx: Option<mpsc::UnboundedReceiver<Bytes>>,
    session: Option<Arc<Session>>,
    /// For `tools/list` answers: the filter chain and the stream's caller and server.
    chain: Chain,
    peer: Arc<Peer>,
    destination: Destination,
    rewriter: Option<ResponseRewriter>,
    /// The bytes sent so far end an event (a blank line).
    at_boundary: bool,
    tail: [u8; 4],
}

impl<B> SseTap<B> {
    pub fn new(inner: B, sessions: Arc<SseSessions>, stream: StreamOf, chain: Chain) -> SseTap<B> {
        SseTap {
            inner,
            sessions,
            identity: stream.peer.spiffe_id.as_str().to_owned(),
            authority: stream.destination.authority(),
            head: Vec::new(),
            key: None,
            rx: None,
            session: None,
            chain,
            peer: stream.peer,
            destination: stream.destination,
            rewriter: None,
            at_boundary: true,
            tail: [0; 4],
        }
    }

    fn observe(&mut self, data: &[u8]) {
        for &b in data {
            self.tail = [self.tail[1], self.tail[2], self.tail[3], b];
        }
        self.at_boundary = self.tail[2..] == *b"\n\n"
            || self.tail == *b"\r\n\r\n"
            || data.is_empty() && self.at_boundary;
        if self.key.is_some() || self.head.len() >= HEAD_LIMIT {
            return;
        }
        self.head
            .extend_from_slice(&data[..data.len().min(HEAD_LIMIT - self.head.len())]);
        if let Some(endpoint) = endpoint_event(&self.head) {
            let key = (self.identity.clone(), self.authority.clone(), endpoint);
            let (tx, rx) = mpsc::unbounded_channel();
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
    /// stream parsed event by event.
    fn filtering(&self) -> bool {
        let awaited = self
            .session
            .as_ref()
            .and_then(|s| s.lists.lock().ok().map(|l| !l.is_empty()))
            .unwrap_or(false);
        awaited || self.rewriter.is_some()
    }

    /// Pass a chunk through the `tools/list` filter; `Err` when an event is too large to
    /// filter (the stream ends rather than pass it unfiltered).
    fn filter(&mut self, data: &[u8]) -> Result<Vec<u8>, BoxError> {
        if self.rewriter.is_none() {
            self.rewriter = ResponseRewriter::new(Some("text/event-stream"), LIST_EVENT_LIMIT);
        }
        let Some(rewriter) = self.rewriter.as_mut() else {
            return Ok(data.to_vec());
        };
        let (session, chain, peer, destination) =
            (&self.session, &self.chain, &self.peer, &self.destination);
        let mut edit = |msg: &mut serde_json::Value| {
            let Some(session) = session else { return };
            let Some(id) = msg.get("id").cloned() else {
                return;
            };
            let found = session.lists.lock().ok().and_then(|mut lists| {
                let i = lists.iter().position(|(want, _, _)| *want == id)?;
                Some(lists.remove(i))
            });
            let Some((_, input, mcp)) = found else { return };
            let (parts, ()) = http::Request::new(()).into_parts();
            let mut ctx = Context::new(
                peer.clone(),
                destination.clone(),
                ActionKind::Mcp,
                Via::Mitm,
                TraceId([0; 16]),
                &parts,
            );
            ctx.policy_input = Some(input);
            ctx.mcp = Some(mcp);
            chain.mcp_response(&ctx, msg);
        };
        let out = rewriter.push(data, &mut edit);
        if rewriter.overflowed() {
            return Err(
                "a tools/list event exceeds limits.inspect_body_bytes and cannot be filtered"
                    .into(),
            );
        }
        Ok(out)
    }
}

/// Largest single event parsed while a `tools/list` answer is awaited.
const LIST_EVENT_LIMIT: usize = 4 << 20;

impl<B> Drop for SseTap<B> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.sessions.unregister(key);
        }
    }
}

/// The path and query announced by an `event: endpoint` among complete events in `head`.
fn endpoint_event(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?.replace("\r\n", "\n");
    for event in text.split("\n\n") {
        let mut is_endpoint = false;
        let mut data = None;
        for line in event.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                is_endpoint = v.trim() == "endpoint";
            } else if let Some(v) = line.strip_prefix("data:") {
                data = Some(v.trim().to_owned());
            }
        }
        if let (true, Some(d)) = (is_endpoint, data) {
            // Relative (the usual) or absolute; the proxy sees POSTs with path and query.
            let uri: http::Uri = d.parse().ok()?;
            return uri.path_and_query().map(|pq| pq.as_str().to_owned());
        }
    }
    None
}

impl<B> HttpBody for SseTap<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.at_boundary {
            if let Some(rx) = this.rx.as_mut() {
                if let Poll::Ready(Some(events)) = rx.poll_recv(cx) {
                    return Poll::Ready(Some(Ok(Frame::data(events))));
                }
            }
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(d) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    if !this.filtering() {
                        this.observe(d);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let d = d.clone();
                    match this.filter(&d) {
                        // Whole events only: what was sent still ends at an event boundary.
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => {
                            this.observe(&out);
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                Poll::Ready(None) => {
                    // A half event held back at the end of the stream goes out as it is.
                    if let Some(mut rw) = this.rewriter.take() {
                        let rest = rw.finish(&mut |_| {});
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                        }
                    }
                    return Poll::Ready(None);
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_event_is_found_relative_or_absolute() {
        let rel = b"event: endpoint\r\ndata: /messages/?session_id=abc\r\n\r\n";
        assert_eq!(
            endpoint_event(rel).as_deref(),
            Some("/messages/?session_id=abc")
        );
        let abs = b": ping\n\nevent: endpoint\ndata: https://h:1/m?s=1\n\n";
        assert_eq!(endpoint_event(abs).as_deref(), Some("/m?s=1"));
        assert_eq!(endpoint_event(b"event: message\ndata: {}\n\n"), None);
    }
}
