//! [`ReadAhead`]: a socket read in large pieces for the TLS layer above it.
//!
//! rustls asks its transport for at most 4 KiB per read (its deframer's read size), so a 1 MiB
//! body through the proxy cost ~256 `recvfrom` calls on each leg that reads it. `ReadAhead`
//! reads up to [`READ_AHEAD`] bytes per call into its own buffer and hands them out in the
//! pieces asked for. The buffer is held only while it has bytes to hand out or the peer keeps
//! sending: a read that would block with nothing buffered returns it, so an idle connection
//! holds no buffer at all. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read: a 1 MiB body is 16 reads instead of 256.
pub const READ_AHEAD: usize = 64 * 1024;

pub struct ReadAhead<T> {
    inner: T,
    buf: BytesMut,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> ReadAhead<T> {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            // Nothing asked for: read nothing (a read here would look like the end).
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                this.buf = BytesMut::new();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        // End of stream leaves `buf` empty and `out` unfilled, which reads as EOF.
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every byte arrives, in order, through reads smaller than what was buffered, and the
    /// end of the stream is still an end.
    #[tokio::test]
    async fn hands_out_every_byte_then_eof() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(70_000) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut ra = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            let n = ra.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    /// A read with no room reads nothing from the socket, so what follows is not lost.
    #[tokio::test]
    async fn no_room_reads_nothing() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut ra = ReadAhead::new(rx);
        tx.write_all(b"kept").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut none = ReadBuf::new(&mut []);
        assert!(Pin::new(&mut ra).poll_read(&mut cx, &mut none).is_ready());
        assert_eq!(ra.buf.capacity(), 0);
        let mut piece = [0u8; 16];
        assert_eq!(ra.read(&mut piece).await.unwrap(), 4);
        assert_eq!(&piece[..4], b"kept");
    }

    /// A read that would block with nothing buffered gives the buffer back.
    #[tokio::test]
    async fn idle_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut ra = ReadAhead::new(rx);
        tx.write_all(b"hello").await.unwrap();
        let mut piece = [0u8; 16];
        assert_eq!(ra.read(&mut piece).await.unwrap(), 5);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut rb = ReadBuf::new(&mut piece);
        assert!(Pin::new(&mut ra).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(ra.buf.capacity(), 0);
    }
}
