//! The response body on its way to the client: counts bytes, runs the logging phase once when
//! the body ends (or is dropped), and runs the body transforms the chain's response-body phase
//! returned (`tools/list` filtering, redaction of echoed secrets, the HTTP+SSE tap). Frames
//! stream through; nothing is buffered beyond what a transform holds back.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use portcullis_filters::{BodyTransform, Chain, Context, Outcome, Transforms};

use crate::upstream::BoxError;

/// Counts response bytes and runs the logging phase once, when the body ends or is dropped.
pub struct LoggedBody {
    inner: Incoming,
    bytes: u64,
    status: StatusCode,
    transforms: Option<Transforms>,
    /// The upstream body ended and the transforms' held-back bytes were sent.
    flushed: bool,
    /// Trailers that arrived while held-back bytes still had to go out first.
    trailers: Option<http::HeaderMap>,
    done: Option<(Context, Chain)>,
}

impl LoggedBody {
    pub fn new(
        inner: Incoming,
        status: StatusCode,
        transforms: Option<Transforms>,
        ctx: Context,
        chain: Chain,
    ) -> LoggedBody {
        LoggedBody {
            inner,
            bytes: 0,
            status,
            transforms,
            flushed: false,
            trailers: None,
            done: Some((ctx, chain)),
        }
    }

    fn finish(&mut self) {
        if let Some((mut ctx, chain)) = self.done.take() {
            let outcome = Outcome {
                status: self.status.as_u16(),
                bytes: self.bytes,
                duration: ctx.started.elapsed(),
            };
            chain.logging(&mut ctx, &outcome);
        }
    }

    fn cut_off(
        &self,
        e: portcullis_filters::TransformError,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some((ctx, _)) = &self.done {
            tracing::warn!(trace_id = %ctx.trace.id, error = %e, "response body cut off");
        }
        Poll::Ready(Some(Err(Box::new(e))))
    }

    fn send(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.bytes += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        loop {
            if let (Some(t), false) = (this.transforms.as_mut(), this.flushed) {
                if let Poll::Ready(Some(inserted)) = t.poll_insert(cx) {
                    return this.send(inserted);
                }
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => match (this.transforms.as_mut(), this.flushed) {
                    (Some(t), false) => {
                        this.flushed = true;
                        match t.end() {
                            Ok(rest) if rest.is_empty() => continue,
                            Ok(rest) => return this.send(rest),
                            Err(e) => return this.cut_off(e),
                        }
                    }
                    _ => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                },
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => match (frame.into_trailers(), this.transforms.as_mut()) {
                    (Ok(trailers), None) => {
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    // The held-back bytes go first, then the trailers, transformed.
                    (Ok(mut trailers), Some(t)) => {
                        t.trailers(&mut trailers);
                        this.flushed = true;
                        match t.end() {
                            Ok(rest) if rest.is_empty() => {
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                            }
                            Ok(rest) => {
                                this.trailers = Some(trailers);
                                return this.send(rest);
                            }
                            Err(e) => return this.cut_off(e),
                        }
                    }
                    (Err(_), _) => continue, // neither data nor trailers: nothing to send
                },
            };
            let data = match this.transforms.as_mut() {
                None => data,
                Some(t) => match t.data(data) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => out,
                    Err(e) => return this.cut_off(e),
                },
            };
            return this.send(data);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
            && (self.transforms.is_none() || self.flushed)
            && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.transforms.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
