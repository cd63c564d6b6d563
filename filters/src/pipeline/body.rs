//! Body phases. Response-body transforms: what a filter's response-body phase returns when it
//! must see or change the body on its way to the client (`tools/list` filtering, secret
//! redaction, the HTTP+SSE tap). A transform is fed the body chunk by chunk and may hold bytes
//! back; the chain stacks the transforms of all its filters in chain order, each feeding the
//! next. Request-body checks: what the request-body phase returns for the part of a request
//! body that streams upstream unbuffered; a check reads each chunk and may stop the body.

use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;

/// Why a transform cannot go on: the response ends with an error (the client sees a cut-off
/// body), never with the untransformed rest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransformError(pub String);

/// One filter's view of one response body.
pub trait BodyTransform: Send + Sync + 'static {
    /// A chunk of the body; returns the bytes ready to go on now (empty: held back).
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError>;

    /// The body ended: whatever is still held back.
    fn end(&mut self) -> Result<Bytes, TransformError> {
        Ok(Bytes::new())
    }

    /// The response's trailers, after the last chunk: a transform may rewrite their values.
    fn trailers(&mut self, _trailers: &mut http::HeaderMap) {}

    /// Bytes the transform puts into the body on its own, between chunks (an event the proxy
    /// delivers on a stream). Polled before every chunk until the body ends; `Pending` (the
    /// default) registers the waker when there is something to wait for.
    fn poll_insert(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Option<Bytes>> {
        Poll::Pending
    }

    /// Why this transform cannot read any non-empty body ([`CannotRead`]): known at the
    /// response head, so the proxy refuses there with a clear error instead of starting a
    /// response it would have to cut off.
    fn refuses(&self) -> Option<&str> {
        None
    }
}

/// One filter's view of the streamed rest of a request body.
pub trait BodyCheck: Send + Sync + 'static {
    /// The next chunk, before it goes upstream. A refusal stops the body before this chunk, so
    /// the upstream never receives the whole request, and the action is refused with it.
    fn data(&mut self, chunk: &[u8]) -> Result<(), crate::Rejection>;

    /// The body ends (called before its last chunk goes upstream when the end is known with
    /// it, else after): a refusal stops the body before its end.
    fn end(&mut self) -> Result<(), crate::Rejection> {
        Ok(())
    }
}

/// A filter that must read a response body asks the upstream not to compress it.
pub fn ask_uncompressed(req: &mut http::request::Parts) {
    req.headers.insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
}

/// A message's `Content-Encoding` other than `identity`, if any: its bytes are not what the
/// other side will read, so a filter cannot read them either.
pub fn content_encoding(headers: &http::HeaderMap) -> Option<String> {
    let codings: Vec<String> = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("(not text)").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    (!codings.is_empty()).then(|| codings.join(", "))
}

/// The transform for a body a filter must read but cannot. At a response head the proxy
/// refuses the response (see [`BodyTransform::refuses`]); where a body is already under way
/// (an event on a stream) it ends with an error at its first byte, so nothing passes unread.
/// An empty body passes.
pub struct CannotRead(pub String);

impl BodyTransform for CannotRead {
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
        match chunk.is_empty() {
            true => Ok(chunk),
            false => Err(TransformError(self.0.clone())),
        }
    }

    fn refuses(&self) -> Option<&str> {
        Some(&self.0)
    }
}

/// The transforms of one response, in chain order: the output of each is the input of the next.
#[derive(Default)]
pub struct Transforms(Vec<Box<dyn BodyTransform>>);

impl Transforms {
    pub fn push(&mut self, t: Box<dyn BodyTransform>) {
        self.0.push(t);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first transform's reason not to read any body, if one has such a reason.
    pub fn refusal(&self) -> Option<&str> {
        self.0.iter().find_map(|t| t.refuses())
    }

    /// Run `bytes` through the transforms from index `from` on.
    fn feed(&mut self, from: usize, mut bytes: Bytes) -> Result<Bytes, TransformError> {
        for t in &mut self.0[from..] {
            if bytes.is_empty() {
                break;
            }
            bytes = t.data(bytes)?;
        }
        Ok(bytes)
    }
}

impl BodyTransform for Transforms {
    fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
        self.feed(0, chunk)
    }

    fn end(&mut self) -> Result<Bytes, TransformError> {
        let mut carry = Bytes::new();
        for t in &mut self.0 {
            let mut out = if carry.is_empty() {
                Vec::new()
            } else {
                t.data(carry)?.to_vec()
            };
            out.extend_from_slice(&t.end()?);
            carry = Bytes::from(out);
        }
        Ok(carry)
    }

    fn trailers(&mut self, trailers: &mut http::HeaderMap) {
        for t in &mut self.0 {
            t.trailers(trailers);
        }
    }

    fn poll_insert(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Bytes>> {
        for i in 0..self.0.len() {
            if let Poll::Ready(Some(bytes)) = self.0[i].poll_insert(cx) {
                // What a transform inserts goes through the ones after it, like its output.
                return Poll::Ready(self.feed(i + 1, bytes).ok());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Upper-cases; holds back a trailing `x` until the next chunk or the end.
    struct Upper(Vec<u8>);
    impl BodyTransform for Upper {
        fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
            let mut all = std::mem::take(&mut self.0);
            all.extend_from_slice(&chunk);
            if all.last() == Some(&b'x') {
                self.0 = all.split_off(all.len() - 1);
            }
            Ok(Bytes::from(all.to_ascii_uppercase()))
        }
        fn end(&mut self) -> Result<Bytes, TransformError> {
            Ok(Bytes::from(
                std::mem::take(&mut self.0).to_ascii_uppercase(),
            ))
        }
    }

    struct Bracket;
    impl BodyTransform for Bracket {
        fn data(&mut self, chunk: Bytes) -> Result<Bytes, TransformError> {
            Ok(Bytes::from(format!(
                "[{}]",
                String::from_utf8_lossy(&chunk)
            )))
        }
    }

    #[test]
    fn what_cannot_be_read_never_passes_and_encodings_are_seen() {
        let mut t = CannotRead("compressed".into());
        assert_eq!(t.data(Bytes::new()).unwrap(), "");
        assert!(t.data(Bytes::from_static(b"\x1f\x8b")).is_err());
        let mut h = http::HeaderMap::new();
        assert_eq!(content_encoding(&h), None);
        h.insert(http::header::CONTENT_ENCODING, "identity".parse().unwrap());
        assert_eq!(content_encoding(&h), None);
        h.append(http::header::CONTENT_ENCODING, "GZIP, br".parse().unwrap());
        assert_eq!(content_encoding(&h).as_deref(), Some("gzip, br"));
    }

    #[test]
    fn transforms_feed_each_other_in_order_and_flush_held_bytes_through_the_rest() {
        let mut t = Transforms::default();
        t.push(Box::new(Upper(Vec::new())));
        t.push(Box::new(Bracket));
        assert_eq!(t.data(Bytes::from_static(b"ab")).unwrap(), "[AB]");
        // `x` is held back by the first, so the second sees nothing of it yet.
        assert_eq!(t.data(Bytes::from_static(b"cx")).unwrap(), "[C]");
        assert_eq!(t.end().unwrap(), "[X]");
    }
}
