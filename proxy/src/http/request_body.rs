//! Request bodies for inspection: read a body up to a limit (bounded in size and time). A
//! body that fits is buffered; one that does not is passed on as the already-read prefix
//! followed by the rest of the stream, so nothing is lost and memory stays bounded.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_filters::{ErrorCode, Rejection};

use crate::upstream::{Body, BoxError};

/// The outcome of [`read_limited`].
pub enum Read {
    Complete(Bytes),
    /// Over the limit: the first bytes (for classification), and the whole body to send on
    /// (the prefix read so far, then the untouched rest).
    TooLarge {
        head: Bytes,
        body: Body,
    },
}

/// Read `body` if it fits in `limit` bytes, within `timeout`. A larger one (declared or not)
/// is read up to the limit too, so its head can be classified.
pub async fn read_limited(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Read, Rejection> {
    let read = async {
        let mut chunks: VecDeque<Bytes> = VecDeque::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Rejection::new(
                    ErrorCode::BadRequest,
                    format!("reading the request body: {e}"),
                )
            })?;
            // Trailers are not inspected; request trailers are rare and dropped here.
            if let Ok(data) = frame.into_data() {
                total += data.len();
                chunks.push_back(data);
                if total > limit {
                    let mut head = bytes::BytesMut::with_capacity(total);
                    chunks.iter().for_each(|c| head.extend_from_slice(c));
                    return Ok(Read::TooLarge {
                        head: head.freeze(),
                        body: Prefixed {
                            prefix: chunks,
                            rest: body,
                        }
                        .boxed(),
                    });
                }
            }
        }
        let mut buf = bytes::BytesMut::with_capacity(total);
        chunks.iter().for_each(|c| buf.extend_from_slice(c));
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

pub fn stream(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// Chunks already read, then the rest of the stream.
struct Prefixed {
    prefix: VecDeque<Bytes>,
    rest: Incoming,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.prefix.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + buffered);
        }
        hint
    }
}
