//! The older MCP transport (HTTP+SSE, 2024-11-05) answers every POSTed message on the client's
//! GET event stream, not in the POST's response, so a JSON-RPC error in the POST's body never
//! reaches that transport's clients. Here each such stream that passes through the proxy is
//! registered under the endpoint its server announced (`event: endpoint`), and a denied POST
//! to that endpoint has its JSON-RPC errors delivered on the stream, between two events.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::upstream::BoxError;

/// Only the first bytes of a stream are read for the endpoint event.
const HEAD_LIMIT: usize = 4096;

/// (caller's SPIFFE ID, server authority, announced POST endpoint path and query): a denial
/// only ever reaches a stream of the identity whose request was denied.
type Key = (String, String, String);

/// Open HTTP+SSE streams by [`Key`].
#[derive(Debug, Default)]
pub struct SseSessions {
    streams: Mutex<HashMap<Key, mpsc::UnboundedSender<Bytes>>>,
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
        let Some(tx) = streams.get(&key) else {
            return false;
        };
        let mut events = String::new();
        for m in messages {
            events.push_str("event: message\r\ndata: ");
            events.push_str(&m.to_string());
            events.push_str("\r\n\r\n");
        }
        tx.send(Bytes::from(events)).is_ok()
    }

    fn register(&self, key: Key, tx: mpsc::UnboundedSender<Bytes>) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.insert(key, tx);
        }
    }

    fn unregister(&self, key: &Key) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(key);
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
    /// The bytes sent so far end an event (a blank line).
    at_boundary: bool,
    tail: [u8; 4],
}

impl<B> SseTap<B> {
    pub fn new(
        inner: B,
        sessions: Arc<SseSessions>,
        identity: String,
        authority: String,
    ) -> SseTap<B> {
        SseTap {
            inner,
            sessions,
            identity,
            authority,
            head: Vec::new(),
            key: None,
            rx: None,
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
            self.sessions.register(key.clone(), tx);
            self.key = Some(key);
            self.rx = Some(rx);
        }
    }
}

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
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.at_boundary {
            if let Some(rx) = this.rx.as_mut() {
                if let Poll::Ready(Some(events)) = rx.poll_recv(cx) {
                    return Poll::Ready(Some(Ok(Frame::data(events))));
                }
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.observe(d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
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
