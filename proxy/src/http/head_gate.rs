//! HTTP/1.1 request heads, read and validated before hyper sees them, so every refusal the
//! proxy makes carries the error contract. hyper answers a head it cannot parse (bad framing
//! headers, obs-fold, bare CR, NUL, a space in the target, too many headers...) with a bare
//! 400/431 of its own; behind this gate it never gets such a head.
//!
//! The gate sits between the connection and hyper and follows the message framing: a head
//! (parsed with `httparse`, as hyper does, plus the checks hyper makes after parsing and a
//! few stricter ones: no `Content-Length` together with `Transfer-Encoding`, no transfer
//! coding but `chunked`), then the body by `Content-Length` or chunked framing, then the next
//! head. A head it refuses is never passed on: hyper sees the end of the stream there (after
//! the messages before it, whose answers it still writes), and when hyper shuts the
//! connection down the gate writes the refusal (`x-portcullis-error`, JSON body with the
//! trace id) and closes. The refusal is logged (access log, metrics, span) when it is made.
//!
//! The gate only withholds bytes or passes them unchanged: where it cannot follow the framing
//! (chunked syntax it does not know, an h2 preface, a `CONNECT` that becomes a tunnel) it lets
//! everything through from there on, and hyper decides as it did before. Body bytes pass
//! straight into hyper's buffer when no framing boundary is near (no copy).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::{ErrorCode, Rejection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most header fields in a request head (hyper's default, and what hyper is configured with).
pub const MAX_HEADERS: usize = 100;

/// Logs a refusal and renders the bytes of its answer.
pub type OnRefuse = Box<dyn FnOnce(Rejection) -> Vec<u8> + Send + Sync>;

/// A header field the gate writes into every request head it passes (the connector's
/// JWT-SVID), after dropping any field of that name the client sent. The value is read per
/// head (it rotates); `None`: the field is only dropped.
pub struct AddHeader {
    /// Lowercase.
    pub name: &'static str,
    pub value: Box<dyn Fn() -> Option<Arc<SecretValue>> + Send + Sync>,
}

/// Which request targets a gate passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// Any valid target (the proxy's own listeners: gateway routes take origin-form).
    Any,
    /// Proxy requests only: `CONNECT host:port` or an absolute-form URI. The connector takes
    /// nothing else, so a browser that reaches it by DNS rebinding (origin-form requests)
    /// cannot act as the workload.
    ProxyOnly,
}

pub struct HeadGate<IO> {
    io: IO,
    targets: Targets,
    /// Bytes read from `io`, not yet given to hyper.
    buf: BytesMut,
    /// The first `cleared` bytes of `buf` are examined and go to hyper as they are.
    cleared: usize,
    /// In `State::Head`: how far past `cleared` the search for the end of the head got.
    searched: usize,
    state: State,
    max_head_bytes: usize,
    on_refuse: Option<OnRefuse>,
    /// The refusal's answer, written when hyper shuts down; `.1` bytes of it written so far.
    answer: Option<(Vec<u8>, usize)>,
    add: Option<AddHeader>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A request head is expected next.
    Head,
    /// This many body bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// The gate no longer follows the framing: everything passes.
    Opaque,
    /// A head was refused: hyper gets the end of the stream after what was cleared before it.
    Refused,
}

/// Where a chunked body is (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the chunk size (`digits` hex digits so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size, or a chunk extension, up to CR.
    Ext {
        size: u64,
    },
    /// CR seen after the size line; LF expected.
    SizeLf {
        size: u64,
    },
    /// This many data bytes of the chunk remain.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    TrailerLf,
    EndLf,
}

enum Scan {
    /// All given bytes belong to the body; more follow.
    More,
    /// The body ends after this many bytes.
    End(usize),
    /// Not chunked syntax this gate knows.
    Unknown,
}

impl Chunk {
    fn start() -> Chunk {
        Chunk::Size { size: 0, digits: 0 }
    }

    /// Follow the framing over `bytes`; data bytes are skipped in one step.
    fn scan(&mut self, bytes: &[u8]) -> Scan {
        let mut i = 0;
        while i < bytes.len() {
            if let Chunk::Data(rem) = self {
                let k = usize::try_from(*rem)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                *rem -= k as u64;
                i += k;
                if *rem == 0 {
                    *self = Chunk::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            *self = match (*self, b) {
                (Chunk::Size { size, digits }, _) if b.is_ascii_hexdigit() && digits < 16 => {
                    let d = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                    Chunk::Size {
                        size: size * 16 + d,
                        digits: digits + 1,
                    }
                }
                (Chunk::Size { size, digits }, b' ' | b'\t' | b';') if digits > 0 => {
                    Chunk::Ext { size }
                }
                (Chunk::Size { size, digits }, b'\r') if digits > 0 => Chunk::SizeLf { size },
                (Chunk::Ext { size }, b'\r') => Chunk::SizeLf { size },
                (Chunk::Ext { size }, b) if b != b'\n' => Chunk::Ext { size },
                (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::TrailerStart,
                (Chunk::SizeLf { size }, b'\n') => Chunk::Data(size),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::start(),
                (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::TrailerStart | Chunk::Trailer, b) if b != b'\n' => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
                (Chunk::EndLf, b'\n') => return Scan::End(i),
                _ => return Scan::Unknown,
            };
        }
        Scan::More
    }
}

impl<IO> HeadGate<IO> {
    pub fn new(io: IO, max_head_bytes: usize, on_refuse: OnRefuse) -> HeadGate<IO> {
        Self::with_targets(io, Targets::Any, max_head_bytes, on_refuse)
    }

    pub fn with_targets(
        io: IO,
        targets: Targets,
        max_head_bytes: usize,
        on_refuse: OnRefuse,
    ) -> HeadGate<IO> {
        HeadGate {
            io,
            targets,
            buf: BytesMut::new(),
            cleared: 0,
            searched: 0,
            state: State::Head,
            max_head_bytes,
            on_refuse: Some(on_refuse),
            answer: None,
            add: None,
        }
    }

    /// Write `add` into every head passed on.
    pub fn adding(mut self, add: AddHeader) -> HeadGate<IO> {
        self.add = Some(add);
        self
    }

    /// Replace the head of `len` bytes at `cleared` with its rewritten form; its new length.
    fn rewrite_head(&mut self, len: usize) -> usize {
        let Some(add) = &self.add else {
            return len;
        };
        let value = (add.value)();
        let head = &self.buf[self.cleared..self.cleared + len];
        let new = with_header(head, add.name, value.as_ref().map(|v| v.expose()));
        let rest = self.buf.split_off(self.cleared + len);
        self.buf.truncate(self.cleared);
        self.buf.extend_from_slice(&new);
        self.buf.extend_from_slice(&rest);
        new.len()
    }

    fn refuse(&mut self, rej: Rejection) {
        tracing::debug!(reason = %rej.reason, "request head refused");
        self.state = State::Refused;
        if let Some(on_refuse) = self.on_refuse.take() {
            self.answer = Some((on_refuse(rej), 0));
        }
    }

    /// Examine the buffered bytes after `cleared` as far as the framing allows.
    fn examine(&mut self) {
        loop {
            let avail = &self.buf[self.cleared..];
            if avail.is_empty() {
                return;
            }
            match &mut self.state {
                State::Refused => return,
                State::Opaque => {
                    self.cleared = self.buf.len();
                    return;
                }
                State::Length(rem) => {
                    let k = usize::try_from(*rem).unwrap_or(usize::MAX).min(avail.len());
                    *rem -= k as u64;
                    if *rem == 0 {
                        self.state = State::Head;
                    }
                    self.cleared += k;
                }
                State::Chunked(chunk) => match chunk.scan(avail) {
                    Scan::More => self.cleared = self.buf.len(),
                    Scan::End(n) => {
                        self.cleared += n;
                        self.state = State::Head;
                    }
                    Scan::Unknown => self.state = State::Opaque,
                },
                State::Head => {
                    if avail.starts_with(b"PRI * HTTP/2.0") {
                        self.state = State::Opaque; // h2 with prior knowledge
                        continue;
                    }
                    // Parse once the end of the head is there (never again per byte read).
                    let from = self.searched.saturating_sub(3);
                    let end = find_head_end(&avail[from..]).map(|e| from + e);
                    self.searched = avail.len();
                    let Some(end) = end else {
                        if avail.len() > self.max_head_bytes {
                            self.refuse(too_large(self.max_head_bytes));
                        }
                        return;
                    };
                    if end > self.max_head_bytes {
                        self.refuse(too_large(self.max_head_bytes));
                        return;
                    }
                    match read_head(&avail[..end], self.targets) {
                        Ok(next) => {
                            let end = self.rewrite_head(end);
                            self.cleared += end;
                            self.searched = 0;
                            self.state = next;
                        }
                        Err(rej) => {
                            self.refuse(rej);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// `rem` body bytes to go and nothing buffered: read straight into hyper's buffer, no
    /// further than the end of the body (or chunk).
    fn read_body(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        rem: u64,
    ) -> Poll<io::Result<()>>
    where
        IO: AsyncRead + Unpin,
    {
        let room = out.remaining();
        let n = if rem >= room as u64 {
            let before = out.filled().len();
            ready!(Pin::new(&mut self.io).poll_read(cx, out))?;
            out.filled().len() - before
        } else {
            let want = usize::try_from(rem).unwrap_or(room);
            let mut limited = ReadBuf::new(out.initialize_unfilled_to(want));
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            out.advance(n);
            n
        };
        let left = rem - n as u64;
        self.state = match self.state {
            State::Length(_) if left == 0 => State::Head,
            State::Length(_) => State::Length(left),
            _ if left == 0 => State::Chunked(Chunk::DataCr),
            _ => State::Chunked(Chunk::Data(left)),
        };
        Poll::Ready(Ok(()))
    }
}

fn too_large(limit: usize) -> Rejection {
    Rejection::new(
        ErrorCode::HeadersTooLarge,
        format!("the request head is over {limit} bytes"),
    )
}

/// The end of a head (after its blank line), as httparse finds it: CRLF or bare LF lines.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(at) = bytes[i..].iter().position(|&b| b == b'\n') {
        let lf = i + at;
        match bytes.get(lf + 1..lf + 3) {
            _ if bytes.get(lf + 1) == Some(&b'\n') => return Some(lf + 2),
            Some(b"\r\n") => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
    None
}

/// `head` (validated by [`read_head`]: a request line, field lines, an empty line; CRLF or
/// bare LF) without its `name` fields and, when `value` is given, with `name: value` as its
/// last field. Lines are rewritten with CRLF.
fn with_header(head: &[u8], name: &str, value: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + value.map_or(0, |v| name.len() + v.len() + 4));
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
        out.extend_from_slice(b"\r\n");
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        let field = line.split(|&b| b == b':').next().unwrap_or_default();
        if field.eq_ignore_ascii_case(name.as_bytes()) {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(v) = value {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Validate a complete head; the state after it.
fn read_head(head: &[u8], targets: Targets) -> Result<State, Rejection> {
    let bad = |reason: String| Rejection::new(ErrorCode::BadRequest, reason);
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head".into())),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::new(
                ErrorCode::HeadersTooLarge,
                format!("the request has more than {MAX_HEADERS} header fields"),
            ))
        }
        Err(e) => return Err(bad(format!("malformed request head: {e}"))),
    }
    let target = req.path.unwrap_or_default();
    if http::Uri::try_from(target).is_err() {
        return Err(bad("the request target is not a valid URI".into()));
    }
    let method = req.method.unwrap_or_default();
    let absolute = target.split_once("://").is_some_and(|(scheme, _)| {
        ["http", "https"]
            .iter()
            .any(|s| s.eq_ignore_ascii_case(scheme))
    });
    if targets == Targets::ProxyOnly && method != "CONNECT" && !absolute {
        return Err(bad(
            "only proxy requests are taken here: CONNECT host:port or an absolute-form URI (http://host/path)".into(),
        ));
    }
    let http11 = req.version == Some(1);
    let mut chunked = false;
    let mut length: Option<u64> = None;
    for field in req.headers.iter() {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err(bad("Transfer-Encoding in an HTTP/1.0 request".into()));
            }
            let codings = std::str::from_utf8(field.value).unwrap_or("?");
            if chunked || !codings.trim().eq_ignore_ascii_case("chunked") {
                return Err(bad(format!(
                    "Transfer-Encoding {codings:?} is not supported: send chunked only"
                )));
            }
            chunked = true;
        } else if field.name.eq_ignore_ascii_case("content-length") {
            for value in field.value.split(|&b| b == b',') {
                let value = value.trim_ascii();
                let n = (!value.is_empty() && value.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| bad("invalid Content-Length".into()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad("Content-Length values disagree".into()));
                }
                length = Some(n);
            }
        }
    }
    if chunked && length.is_some() {
        return Err(bad(
            "both Content-Length and Transfer-Encoding: the body's length is ambiguous".into(),
        ));
    }
    Ok(match (method, chunked, length) {
        // A tunnel follows (or the proxy refuses and hyper closes): the framing ends here.
        ("CONNECT", _, _) => State::Opaque,
        (_, true, _) => State::Chunked(Chunk::start()),
        (_, false, Some(n)) if n > 0 => State::Length(n),
        _ => State::Head,
    })
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadGate<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.cleared > 0 {
                let n = this.cleared.min(out.remaining());
                out.put_slice(&this.buf.split_to(n));
                this.cleared -= n;
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Refused {
                return Poll::Ready(Ok(())); // the end of the stream, for hyper
            }
            if this.buf.is_empty() {
                match this.state {
                    State::Opaque => return Pin::new(&mut this.io).poll_read(cx, out),
                    State::Length(rem) | State::Chunked(Chunk::Data(rem)) => {
                        return this.read_body(cx, out, rem)
                    }
                    _ => {}
                }
            }
            this.examine();
            if this.cleared > 0 || this.state == State::Refused {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The end of the stream: whatever is buffered (a cut-off head or body) goes
                // to hyper as it is, and hyper sees the truncation.
                this.state = State::Opaque;
                this.cleared = this.buf.len();
                if this.cleared == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.buf.extend_from_slice(read.filled());
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadGate<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// hyper is done (every answer before the refused head written): the refusal goes out
    /// last, then the connection closes.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((answer, written)) = this.answer.as_mut() {
            while *written < answer.len() {
                let n = ready!(Pin::new(&mut this.io).poll_write(cx, &answer[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            ready!(Pin::new(&mut this.io).poll_flush(cx))?;
            this.answer = None;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn state(head: &str) -> Result<State, ErrorCode> {
        read_head(head.as_bytes(), Targets::Any).map_err(|r| r.code)
    }

    #[test]
    fn heads_are_framed_or_refused() {
        let ok = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(state(ok), Ok(State::Head));
        assert_eq!(
            state("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(State::Length(5))
        );
        assert_eq!(
            state("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(State::Length(5))
        );
        assert_eq!(
            state("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(State::Chunked(Chunk::start()))
        );
        assert_eq!(
            state("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            Ok(State::Opaque)
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nX : a\r\n\r\n",
            "GET http://[bad/ HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(state(bad), Err(ErrorCode::BadRequest), "{bad:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(state(&many), Err(ErrorCode::HeadersTooLarge));
    }

    #[test]
    fn a_proxy_only_gate_takes_connect_and_absolute_form() {
        let only = |h: &str| read_head(h.as_bytes(), Targets::ProxyOnly).map_err(|r| r.code);
        assert_eq!(only("CONNECT a:443 HTTP/1.1\r\n\r\n"), Ok(State::Opaque));
        assert_eq!(only("GET http://a/x HTTP/1.1\r\n\r\n"), Ok(State::Head));
        assert_eq!(only("GET HTTPS://a/x HTTP/1.1\r\n\r\n"), Ok(State::Head));
        for origin in [
            "GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(only(origin), Err(ErrorCode::BadRequest), "{origin}");
        }
    }

    #[test]
    fn a_field_is_written_into_a_head_and_the_clients_own_dropped() {
        let head = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nX-Portcullis-JWT-SVID: forged\r\nx-portcullis-jwt-svid-not: kept\r\n\r\n";
        let out = with_header(head, "x-portcullis-jwt-svid", Some("t.o.k"));
        assert_eq!(
            out,
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nx-portcullis-jwt-svid-not: kept\r\nx-portcullis-jwt-svid: t.o.k\r\n\r\n"
        );
        assert_eq!(read_head(&out, Targets::ProxyOnly).unwrap(), State::Opaque);
        // Bare LF lines; no value: the field is only dropped.
        let out = with_header(
            b"GET http://a/ HTTP/1.1\nx-portcullis-jwt-svid: x\nHost: a\n\n",
            "x-portcullis-jwt-svid",
            None,
        );
        assert_eq!(out, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn every_head_passed_on_carries_the_added_field() {
        use tokio::io::AsyncReadExt as _;
        let input: &[u8] = b"POST http://a/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
GET http://a/y HTTP/1.1\r\nHost: a\r\nx-portcullis-jwt-svid: forged\r\n\r\n\
CONNECT b:443 HTTP/1.1\r\nHost: b:443\r\n\r\n\x16\x03\x01x-portcullis-jwt-svid: tunnel bytes";
        let refuse: OnRefuse = Box::new(|_| Vec::new());
        let mut gate =
            HeadGate::with_targets(input, Targets::ProxyOnly, 1024, refuse).adding(AddHeader {
                name: "x-portcullis-jwt-svid",
                value: Box::new(|| Some(Arc::new(SecretValue::new("j.w.t".into())))),
            });
        let mut out = Vec::new();
        gate.read_to_end(&mut out).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST http://a/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nx-portcullis-jwt-svid: j.w.t\r\n\r\nhello\
GET http://a/y HTTP/1.1\r\nHost: a\r\nx-portcullis-jwt-svid: j.w.t\r\n\r\n\
CONNECT b:443 HTTP/1.1\r\nHost: b:443\r\nx-portcullis-jwt-svid: j.w.t\r\n\r\n\x16\x03\x01x-portcullis-jwt-svid: tunnel bytes"
        );
    }

    #[test]
    fn the_end_of_a_head() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn chunked_bodies_are_followed_to_their_end() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for cut in 0..body.len() {
            let mut c = Chunk::start();
            let end = match c.scan(&body[..cut]) {
                Scan::More => match c.scan(&body[cut..]) {
                    Scan::End(n) => cut + n,
                    _ => panic!("cut at {cut}"),
                },
                Scan::End(n) => n,
                Scan::Unknown => panic!("cut at {cut}"),
            };
            assert_eq!(&body[end..], b"NEXT", "cut at {cut}");
        }
        for bad in [&b"zz\r\n"[..], b"5\nhello", b"5\r\nhelloX"] {
            assert!(matches!(Chunk::start().scan(bad), Scan::Unknown), "{bad:?}");
        }
    }
}
