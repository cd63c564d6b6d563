//! The response body on its way to the client: counts bytes, runs the logging phase once
//! when the body ends (or is dropped), and applies the body transformations a request asked
//! for: `tools/list` filtering (MCP) and redaction of echoed secrets. Frames stream through;
//! nothing is buffered beyond what a transformation needs.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use portcullis_filters::credentials::Redactor;
use portcullis_filters::mcp::ResponseRewriter;
use portcullis_filters::{Chain, Context, Outcome};

use crate::upstream::BoxError;

/// Counts response bytes and runs the logging phase once, when the body ends or is dropped.
pub struct LoggedBody {
    pub inner: Incoming,
    pub bytes: u64,
    pub status: StatusCode,
    /// Set for responses to `tools/list`: their JSON-RPC messages go through the chain's
    /// `mcp_response` phase before reaching the client.
    pub rewriter: Option<ResponseRewriter>,
    /// Set when the request carried substituted secrets: echoes of them are redacted.
    pub redactor: Option<Redactor>,
    /// The transformers' last output was sent after the upstream body ended.
    pub flushed: bool,
    pub done: Option<(Context, Chain)>,
}

impl LoggedBody {
    fn finish(&mut self) {
        if let Some((ctx, chain)) = self.done.take() {
            let outcome = Outcome {
                status: self.status.as_u16(),
                bytes: self.bytes,
                duration: ctx.started.elapsed(),
            };
            chain.logging(&ctx, &outcome);
        }
    }

    /// Pass a chunk through the rewriter (if any); `None` when nothing is ready to send yet.
    /// Pass a chunk through the MCP rewriter and the secret redactor (when present); `None`
    /// when nothing is ready to send yet.
    fn rewrite(&mut self, data: Bytes, end: bool) -> Result<Option<Bytes>, BoxError> {
        if self.rewriter.is_none() && self.redactor.is_none() {
            return Ok(Some(data));
        }
        let mut out = data.to_vec();
        if let (Some(rw), Some((ctx, chain))) = (self.rewriter.as_mut(), self.done.as_ref()) {
            let mut edit = |m: &mut serde_json::Value| chain.mcp_response(ctx, m);
            out = rw.push(&out, &mut edit);
            if end {
                out.extend(rw.finish(&mut edit));
            }
            if rw.overflowed() {
                tracing::warn!(trace_id = %ctx.trace_id, "tools/list response too large to filter; cut off");
                return Err(
                    "tools/list response exceeds limits.inspect_body_bytes and cannot be filtered"
                        .into(),
                );
            }
        }
        if let Some(r) = self.redactor.as_mut() {
            out = r.push(&out);
            if end {
                out.extend(r.finish());
            }
        }
        Ok((!out.is_empty()).then(|| Bytes::from(out)))
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
        loop {
            let r = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r,
            };
            let frame = match r {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None if (self.rewriter.is_some() || self.redactor.is_some()) && !self.flushed => {
                    self.flushed = true;
                    match self.rewrite(Bytes::new(), true) {
                        Ok(Some(out)) => {
                            self.bytes += out.len() as u64;
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Ok(None) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                None => {
                    self.finish();
                    return Poll::Ready(None);
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => match self.rewrite(data, false) {
                    Ok(Some(out)) => Frame::data(out),
                    Ok(None) => continue,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
                Err(trailers) => trailers,
            };
            if let Some(d) = frame.data_ref() {
                self.bytes += d.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
            && ((self.rewriter.is_none() && self.redactor.is_none()) || self.flushed)
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewriter.is_some() || self.redactor.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
