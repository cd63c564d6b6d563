//! Request bodies for inspection: read a body up to a limit (bounded in size and time). A
//! body that fits is buffered; one that does not goes on as the already-read head followed by
//! the rest of the stream, so nothing is lost and memory stays bounded. The streamed rest is
//! shown to the request-body checks of the filters first; a check's refusal, or a client-side
//! read error (malformed chunked framing), stops the body and is kept as the action's
//! [`Fault`], so the client gets that refusal and not an upstream error.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_filters::{BodyCheck, ErrorCode, Rejection};

use crate::upstream::BoxError;

/// The outcome of [`read_limited`].
pub enum Read {
    Complete(Bytes),
    /// Over the limit: the bytes read so far (for classification) and the unread rest.
    TooLarge {
        head: Bytes,
        rest: Incoming,
    },
}

/// Read `body` if it fits in `limit` bytes, within `timeout`. A larger one (declared or not)
/// is read up to the limit too, so its head can be classified. `reserve` is asked for the
/// bytes about to be held (in total) before they are.
pub async fn read_limited(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
    mut reserve: impl FnMut(usize) -> Result<(), Rejection>,
) -> Result<Read, Rejection> {
    let read = async {
        let declared = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
        let mut buf = bytes::BytesMut::with_capacity(declared.min(limit.saturating_add(1)));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreadable(&e))?;
            // Trailers are not inspected; request trailers are rare and dropped here.
            if let Ok(data) = frame.into_data() {
                // Reserved before it is held: over a budget, the request is refused.
                reserve((buf.len() + data.len()).min(limit + 1))?;
                buf.extend_from_slice(&data);
                if buf.len() > limit {
                    return Ok(Read::TooLarge {
                        head: buf.freeze(),
                        rest: body,
                    });
                }
            }
        }
        Ok(Read::Complete(buf.freeze()))
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(Rejection::new(
                ErrorCode::BadRequest,
                format!("request body not received within {timeout:?}"),
            ))
        })
}

fn unreadable(e: &hyper::Error) -> Rejection {
    Rejection::new(
        ErrorCode::BadRequest,
        format!("reading the request body: {e}"),
    )
}

/// Why a streamed request body stopped, when the cause is the client's side: set once by the
/// body, read by the action when sending fails.
#[derive(Clone, Default)]
pub struct Fault(Arc<OnceLock<Rejection>>);

impl Fault {
    pub fn get(&self) -> Option<Rejection> {
        self.0.get().cloned()
    }
}

/// A request body that streams upstream: the head already read (if any), then the rest of
/// the client's stream, each chunk of the rest shown to the checks first.
pub struct Streamed {
    head: Option<Bytes>,
    /// `None` only once dropped.
    rest: Option<Incoming>,
    checks: Vec<Box<dyn BodyCheck>>,
    fault: Fault,
}

impl Streamed {
    pub fn new(head: Option<Bytes>, rest: Incoming, fault: Fault) -> Streamed {
        Streamed {
            head,
            rest: Some(rest),
            checks: Vec::new(),
            fault,
        }
    }

    pub fn check_with(&mut self, checks: Vec<Box<dyn BodyCheck>>) {
        self.checks = checks;
    }

    fn stop(&self, rej: Rejection) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let _ = self.fault.0.set(rej.clone());
        Poll::Ready(Some(Err(Box::new(rej))))
    }
}

/// How much of an upload is still read after the upstream stopped taking it (an early
/// answer), so the client gets that answer instead of a reset.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Read and discard what is left of a client's upload, bounded in bytes and time, in the
/// background: the client's connection (h1) or stream (h2) then ends cleanly after the answer.
pub fn drain<B>(mut body: B, limit: usize, within: Duration)
where
    B: HttpBody + Send + Unpin + 'static,
    B::Data: Send,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let drain = async {
            let mut seen = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, bytes::Buf::remaining);
                if seen > limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    });
}

impl Drop for Streamed {
    /// The upstream answered before taking the whole body (or the action was refused): the
    /// rest of the client's upload is drained, not left to reset the client.
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take().filter(|r| !r.is_end_stream()) {
            drain(rest, DRAIN_BYTES, DRAIN_TIME);
        }
    }
}

impl HttpBody for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(&mut *rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return self.stop(unreadable(&e)),
            Poll::Ready(None) => {
                return match self.checks.iter_mut().find_map(|c| c.end().err()) {
                    Some(rej) => self.stop(rej),
                    None => Poll::Ready(None),
                }
            }
            Poll::Pending => return Poll::Pending,
        };
        let ends = rest.is_end_stream();
        let this = &mut *self;
        let data = frame.data_ref().map_or(&[][..], |d| &d[..]);
        let refused = this.checks.iter_mut().find_map(|c| {
            c.data(data)
                .and_then(|()| if ends { c.end() } else { Ok(()) })
                .err()
        });
        match refused {
            Some(rej) => self.stop(rej),
            None => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let rest = self
            .rest
            .as_ref()
            .map(HttpBody::size_hint)
            .unwrap_or_default();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + buffered);
        }
        hint
    }
}
