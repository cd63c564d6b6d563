//! The load client's connections, built by hand so connection counts are exact: TCP, TLS to the
//! proxy with the client SVID, `CONNECT`, then TLS to the upstream through the tunnel and a
//! hyper HTTP/1.1 (or h2) connection on top (or TLS straight to the upstream for direct runs).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::scenario::{Route, Workload};
use crate::setup::{ClientTls, MITM_HOST, PASSTHROUGH_HOST};

/// One client connection; with h2 the worker still keeps a single request in flight on it.
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A CONNECT response head larger than this is refused (the proxy's is a few dozen bytes).
const MAX_CONNECT_HEAD: usize = 8192;

const MCP_CALL: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello from portcullis-bench"}}}"#;

/// Where and how to connect; shared by every worker of a scenario.
pub struct Dialer {
    pub tls: ClientTls,
    pub proxy: Option<SocketAddr>,
    /// mTLS with the client SVID to the proxy (Portcullis); plain TCP for peers.
    pub proxy_tls: bool,
    pub upstream: SocketAddr,
    pub body_bytes: u64,
    /// Speak h2 on the innermost connection (ALPN `h2`) instead of HTTP/1.1.
    pub http2: bool,
    /// Sent with every request (the `full` profile's credential placeholder).
    pub headers: Vec<(header::HeaderName, header::HeaderValue)>,
}

/// The request a scenario repeats, built once.
pub struct Template {
    method: Method,
    path: String,
    host: String,
    body: Bytes,
    headers: Vec<(header::HeaderName, header::HeaderValue)>,
    /// Expected response body length, checked on every response.
    pub expect_len: Option<u64>,
}

impl Template {
    pub fn new(dialer: &Dialer, route: Route, workload: Workload) -> Template {
        let host = format!("{}:{}", host_for(route), dialer.upstream.port());
        let (method, path, body, expect_len) = match workload {
            Workload::Small => (
                Method::GET,
                "/small".to_owned(),
                Bytes::new(),
                Some(crate::upstream::SMALL_BODY.len() as u64),
            ),
            Workload::Large => (
                Method::GET,
                format!("/bytes/{}", dialer.body_bytes),
                Bytes::new(),
                Some(dialer.body_bytes),
            ),
            Workload::Huge => (
                Method::GET,
                format!("/bytes/{}", dialer.body_bytes.saturating_mul(16)),
                Bytes::new(),
                Some(dialer.body_bytes.saturating_mul(16)),
            ),
            Workload::Mcp => (
                Method::POST,
                "/mcp".to_owned(),
                Bytes::from_static(MCP_CALL),
                None,
            ),
        };
        Template {
            method,
            path,
            host,
            body,
            headers: dialer.headers.clone(),
            expect_len,
        }
    }

    fn request(&self, h2: bool) -> Result<Request<Full<Bytes>>> {
        let b = Request::builder().method(self.method.clone());
        // h2 carries the authority in the URI (`:authority`); HTTP/1.1 in origin form + Host.
        let mut b = if h2 {
            b.uri(format!("https://{}{}", self.host, self.path))
        } else {
            b.uri(self.path.as_str())
                .header(header::HOST, self.host.as_str())
        };
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        if !self.body.is_empty() {
            b = b
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json, text/event-stream");
        }
        Ok(b.body(Full::new(self.body.clone()))?)
    }
}

/// The host name the client asks for: the CONNECT target, SNI and `Host`.
fn host_for(route: Route) -> &'static str {
    match route {
        Route::Direct | Route::Mitm => MITM_HOST,
        Route::Tunnel => PASSTHROUGH_HOST,
    }
}

impl Dialer {
    /// Open one HTTP/1.1 connection to the upstream over `route`.
    pub async fn open(&self, route: Route) -> Result<Sender> {
        let host = host_for(route);
        let name = ServerName::try_from(host.to_owned())?;
        match (route, self.proxy) {
            (Route::Direct, _) => {
                let tcp = tcp(self.upstream)
                    .await
                    .context("connecting to the upstream")?;
                let tls = TlsConnector::from(self.tls.upstream.clone())
                    .connect(name, tcp)
                    .await
                    .context("TLS to the upstream")?;
                let h2 = negotiated_h2(tls.get_ref().1.alpn_protocol(), self.http2)?;
                handshake(tls, h2).await
            }
            (_, None) => bail!("scenario needs a proxy but none is running"),
            (Route::Tunnel | Route::Mitm, Some(proxy)) => {
                let outer = self.connect_tunnel(proxy, host).await?;
                let inner_cfg: Arc<rustls::ClientConfig> = if route == Route::Mitm {
                    self.tls.mitm.clone()
                } else {
                    self.tls.upstream.clone()
                };
                let tls = TlsConnector::from(inner_cfg)
                    .connect(name, outer)
                    .await
                    .context("TLS inside the CONNECT tunnel")?;
                let h2 = negotiated_h2(tls.get_ref().1.alpn_protocol(), self.http2)?;
                handshake(tls, h2).await
            }
        }
    }

    /// TCP + mTLS to the proxy (plain TCP to a peer), then `CONNECT host:port` and its `200`.
    async fn connect_tunnel(&self, proxy: SocketAddr, host: &str) -> Result<Box<dyn Io>> {
        let tcp = tcp(proxy).await.context("connecting to the proxy")?;
        let mut io: Box<dyn Io> = if self.proxy_tls {
            let name = ServerName::try_from(proxy.ip().to_string())?;
            Box::new(
                TlsConnector::from(self.tls.proxy.clone())
                    .connect(name, tcp)
                    .await
                    .context("mTLS to the proxy")?,
            )
        } else {
            Box::new(tcp)
        };
        let target = format!("{host}:{}", self.upstream.port());
        io.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .context("sending CONNECT")?;
        read_connect_reply(&mut io).await?;
        Ok(io)
    }
}

/// A tunnel's byte stream: TLS to Portcullis, plain TCP to a peer.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

async fn tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Whether the TLS session speaks h2; asking for h2 and not getting it is an error, so a run
/// never silently measures the other protocol.
fn negotiated_h2(alpn: Option<&[u8]>, wanted: bool) -> Result<bool> {
    match (wanted, alpn) {
        (true, Some(b"h2")) => Ok(true),
        (true, other) => bail!(
            "asked for h2, server chose {:?}",
            other.map(String::from_utf8_lossy)
        ),
        (false, _) => Ok(false),
    }
}

async fn handshake<S>(io: S, h2: bool) -> Result<Sender>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .context("h2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Sender::H1(sender))
}

/// Read the CONNECT response head. Nothing follows it until the client speaks TLS, so reading
/// in chunks cannot swallow tunnel bytes.
async fn read_connect_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = s
            .read(&mut chunk)
            .await
            .context("reading the CONNECT reply")?;
        if n == 0 {
            bail!("proxy closed the connection after CONNECT");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            let status = head.lines().next().unwrap_or_default();
            if status.split_whitespace().nth(1) != Some("200") {
                bail!("CONNECT refused: {head}");
            }
            if end + 4 != buf.len() {
                bail!("unexpected bytes after the CONNECT reply");
            }
            return Ok(());
        }
        if buf.len() > MAX_CONNECT_HEAD {
            bail!("CONNECT reply head larger than {MAX_CONNECT_HEAD} bytes");
        }
    }
}

/// Send one request on `sender` and read the whole response body; returns its length.
pub async fn exchange(sender: &mut Sender, t: &Template) -> Result<u64> {
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await.context("connection closed")?;
            s.send_request(t.request(false)?).await
        }
        Sender::H2(s) => {
            s.ready().await.context("connection closed")?;
            s.send_request(t.request(true)?).await
        }
    }
    .context("sending the request")?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.context("reading the response body")?.into_data() {
            len += data.len() as u64;
        }
    }
    if !status.is_success() {
        return Err(anyhow!("HTTP {status}"));
    }
    if let Some(want) = t.expect_len {
        if len != want {
            bail!("response body was {len} bytes, expected {want}");
        }
    }
    Ok(len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_reply_must_be_200_and_alone() {
        let mut ok: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";
        read_connect_reply(&mut ok).await.unwrap();
        let mut denied: &[u8] = b"HTTP/1.1 403 Forbidden\r\nx-portcullis-error: x\r\n\r\n";
        let e = read_connect_reply(&mut denied).await.unwrap_err();
        assert!(e.to_string().contains("403"), "{e}");
        let mut extra: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nxyz";
        assert!(read_connect_reply(&mut extra).await.is_err());
        let mut closed: &[u8] = b"HTTP/1.1 200";
        assert!(read_connect_reply(&mut closed).await.is_err());
    }

    #[test]
    fn small_body_is_about_100_bytes() {
        assert_eq!(crate::upstream::SMALL_BODY.len(), 100);
    }
}
