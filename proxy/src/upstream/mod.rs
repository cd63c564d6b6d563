//! The upstream side: a pooled hyper client whose only way to open a socket is [`dial`], which
//! resolves the host, runs the egress guard on every address and connects to exactly those
//! addresses (no second lookup, so DNS rebinding cannot slip past the check). Upstream TLS is
//! always verified against the system roots plus `upstream.extra_roots`.

pub(crate) mod backend;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_filters::parse::destination::Host;
use portcullis_filters::parse::egress::{Blocked, EgressGuard};
use portcullis_filters::{ErrorCode, Rejection};
use tokio::net::TcpStream;

use crate::certs::{load_certs, provider, TlsError};
use crate::config::UpstreamConfig;
use crate::http::read_ahead::ReadAhead;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Blocked(#[from] Blocked),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("connecting to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("cannot connect to {host}: {source}")]
    Connect { host: String, source: io::Error },
}

impl DialError {
    pub fn rejection(&self) -> Rejection {
        let code = match self {
            DialError::Blocked(_) => ErrorCode::DestinationBlocked,
            DialError::Timeout { .. } => ErrorCode::UpstreamTimeout,
            DialError::Resolve { .. } | DialError::Connect { .. } => ErrorCode::UpstreamUnreachable,
        };
        Rejection::new(code, self.to_string())
    }
}

/// Resolve `host` and check every address with the guard. IP literals are checked as they are.
pub async fn resolve_checked(
    guard: &EgressGuard,
    host: &Host,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let addrs: Vec<SocketAddr> = match host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Dns(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|source| DialError::Resolve {
                host: name.clone(),
                source,
            })?
            .collect(),
    };
    guard.check_all(&addrs)?;
    Ok(addrs)
}

/// Connect to the first reachable address of an already checked list.
pub async fn connect_checked(
    addrs: &[SocketAddr],
    host: &Host,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(source)) => {
                last = Some(DialError::Connect {
                    host: host.to_string(),
                    source,
                })
            }
            Err(_) => last = Some(DialError::Timeout { addr: *addr }),
        }
    }
    Err(last.unwrap_or(DialError::Connect {
        host: host.to_string(),
        source: io::Error::new(io::ErrorKind::NotFound, "no address"),
    }))
}

/// Resolve, guard, connect: the one way Portcullis opens an upstream socket.
pub async fn dial(
    guard: &EgressGuard,
    host: &Host,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let addrs = resolve_checked(guard, host, port).await?;
    connect_checked(&addrs, host, timeout).await
}

/// The hyper connector built on [`dial`].
#[derive(Clone)]
pub struct GuardedConnector {
    guard: Arc<EgressGuard>,
    connect_timeout: Duration,
}

/// An upstream connection whose write side may die before its answer is read: an upstream
/// that answers before reading the whole request body (a 401 to a large upload) and closes.
/// The first broken-pipe or reset error on a write is taken as "the upstream stopped
/// reading": the rest of the request is discarded instead of failing the exchange, so the
/// client keeps reading and the upstream's answer reaches the agent (hyper would otherwise
/// report the write error and lose the answer already on the wire). Reads are untouched: if
/// no answer comes, the read side fails or ends and the request fails as before. Reads come
/// through a [`ReadAhead`], in large pieces for the TLS above.
pub struct UpstreamIo {
    inner: ReadAhead<TcpStream>,
    write_closed: bool,
}

impl UpstreamIo {
    fn swallow(&mut self, r: io::Result<usize>, len: usize) -> io::Result<usize> {
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!(error = %e, "upstream stopped reading the request: the rest is discarded, its answer is still read");
                self.write_closed = true;
                Ok(len)
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Ok(data.len()));
        }
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, data));
        Poll::Ready(self.swallow(r, data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.write_closed {
            return Poll::Ready(Ok(len));
        }
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        Poll::Ready(self.swallow(r, len))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx));
        Poll::Ready(self.swallow(r.map(|()| 0), 0).map(|_| ()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl hyper_util::client::legacy::connect::Connection for UpstreamIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.get_ref().connected()
    }
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<UpstreamIo>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri_host(&uri).map_err(|e| DialError::Connect {
                host: uri.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let s = dial(&this.guard, &host, port, this.connect_timeout).await?;
            Ok(TokioIo::new(UpstreamIo {
                inner: ReadAhead::new(s),
                write_closed: false,
            }))
        })
    }
}

fn uri_host(uri: &Uri) -> Result<Host, String> {
    let h = uri.host().ok_or("URI has no host")?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    match h.parse::<IpAddr>() {
        Ok(ip) => Ok(Host::Ip(ip)),
        Err(_) => Host::parse(h).map_err(|e| e.to_string()),
    }
}

/// Bounds the whole connect (TCP + TLS handshake).
#[derive(Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream TLS handshake timed out")]
pub struct TlsTimeout;

impl<C> tower_service::Service<Uri> for TimeoutConnector<C>
where
    C: tower_service::Service<Uri, Error = BoxError> + Send + 'static,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(Box::new(TlsTimeout) as BoxError),
            }
        })
    }
}

type Connector = TimeoutConnector<HttpsConnector<GuardedConnector>>;

/// The pooled upstream client and its response-header timeout.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, Body>,
    response_header_timeout: Duration,
    /// For CONNECT: its addresses are checked before the tunnel exists.
    guard: Arc<EgressGuard>,
    connect_timeout: Duration,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, guard: Arc<EgressGuard>) -> Result<Upstream, TlsError> {
        // hyper-rustls sets ALPN itself (h2 and/or http/1.1) from the enabled versions.
        let tls = client_tls_config(cfg, Vec::new())?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let guarded = GuardedConnector {
            guard: guard.clone(),
            connect_timeout: cfg.connect_timeout,
        };
        let https = if cfg.http2 {
            builder.enable_all_versions().wrap_connector(guarded)
        } else {
            builder.enable_http1().wrap_connector(guarded)
        };
        let connector = TimeoutConnector {
            inner: https,
            timeout: cfg.connect_timeout + cfg.tls_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(connector);
        Ok(Upstream {
            client,
            response_header_timeout: cfg.response_header_timeout,
            guard,
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// A CONNECT target's addresses, each checked by the egress guard, so a blocked CONNECT
    /// is refused before the tunnel exists.
    pub async fn resolve(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, DialError> {
        resolve_checked(&self.guard, host, port).await
    }

    /// A TCP connection to addresses from [`Upstream::resolve`], for a passthrough tunnel.
    pub async fn connect(&self, addrs: &[SocketAddr], host: &Host) -> Result<TcpStream, DialError> {
        connect_checked(addrs, host, self.connect_timeout).await
    }

    /// Send a request; errors are already mapped to the DESIGN error table.
    pub async fn send(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, Rejection> {
        match tokio::time::timeout(self.response_header_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Rejection::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "no response headers from upstream within {:?}",
                    self.response_header_timeout
                ),
            )),
        }
    }
}

/// Map a client error to the error table by walking its source chain.
fn classify(e: &hyper_util::client::legacy::Error) -> Rejection {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(d) = err.downcast_ref::<DialError>() {
            return d.rejection();
        }
        if err.is::<TlsTimeout>() {
            return Rejection::new(ErrorCode::UpstreamTimeout, err.to_string());
        }
        if let Some(t) = find_tls_error(err) {
            return Rejection::new(
                ErrorCode::UpstreamUnreachable,
                format!("upstream TLS failed: {t}"),
            );
        }
        src = err.source();
    }
    let what = if e.is_connect() {
        "cannot connect to upstream"
    } else {
        "upstream connection failed"
    };
    // The innermost cause says what happened (hyper's own error reads "client error (...)").
    let mut cause = std::error::Error::source(e);
    let mut root = None;
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    let reason = match root {
        Some(root) => format!("{what}: {e}: {root}"),
        None => format!("{what}: {e}"),
    };
    Rejection::new(ErrorCode::UpstreamUnreachable, reason)
}

/// A rustls error, possibly nested in `io::Error`s (which hide their payload from `source()`:
/// tokio-rustls and hyper-rustls each wrap it once).
fn find_tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = err;
    for _ in 0..4 {
        if let Some(t) = cur.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        cur = cur.downcast_ref::<io::Error>()?.get_ref()?;
    }
    None
}

/// Client TLS: system roots plus `extra_roots`, always verified.
pub fn client_tls_config(
    cfg: &UpstreamConfig,
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    // A missing or partly unreadable system store is not fatal: extra_roots may be all we need.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    for path in &cfg.extra_roots {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| TlsError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn;
    Ok(tls)
}
