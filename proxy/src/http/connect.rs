//! CONNECT: the tunnel's own action (egress guard and policy before the tunnel exists), then
//! either bytes both ways (`mitm.passthrough`) or interception: TLS terminated with a leaf for
//! the CONNECT host and HTTP/1.1 or h2 served inside, every request of which must name that
//! host and then runs the same pipeline as any other.

use std::sync::Arc;

use http::header::HOST;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_filters::parse::destination::{
    parse_port, split_authority, Destination, Host, Scheme,
};
use portcullis_filters::{Action, Context, ErrorCode, Outcome, Rejection, Via};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::error::empty;
use crate::http::forward::forward;
use crate::http::head_gate::{HeadGate, MAX_HEADERS};
use crate::http::idle::idle_watch;
use crate::http::{head_refusal, refuse, reject_early, Conn, Shared};
use crate::upstream::Body;

pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    let target = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let dest = match Destination::parse_connect_authority(target) {
        Ok(d) if parts.uri.path_and_query().is_none() => d,
        Ok(_) => {
            return reject_early(
                &shared,
                &conn,
                &parts,
                "CONNECT target must be authority-form host:port".into(),
            )
        }
        Err(e) => return reject_early(&shared, &conn, &parts, e.to_string()),
    };
    let mut ctx = Context::new(conn.peer.clone(), Via::Connect, dest, &parts);
    if let Action::Respond(rej) = shared.chain.request(&mut ctx, &mut parts).await {
        return refuse(&shared, ctx, rej);
    }
    // Check the destination now, so a blocked CONNECT is refused before the tunnel exists.
    let addrs = match shared
        .upstream
        .resolve(&ctx.destination.host, ctx.destination.port)
        .await
    {
        Ok(a) => a,
        Err(e) => return refuse(&shared, ctx, e.rejection()),
    };
    let passthrough = shared.mitm.is_passthrough(&ctx.destination.host);
    let upstream_tcp = if passthrough {
        match shared.upstream.connect(&addrs, &ctx.destination.host).await {
            Ok(s) => Some(s),
            Err(e) => return refuse(&shared, ctx, e.rejection()),
        }
    } else {
        None
    };
    let outcome = Outcome {
        status: 200,
        bytes: 0,
        duration: ctx.started.elapsed(),
    };
    shared.chain.logging(&mut ctx, &outcome);
    let tunnel_of = TunnelOf::new(ctx.destination.clone(), ctx.jwt_svid.clone());
    let shared2 = shared.clone();
    shared.tasks.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        match upstream_tcp {
            Some(tcp) => tunnel(&shared2, &conn, upgraded, tcp).await,
            None => mitm(shared2, conn, tunnel_of, upgraded).await,
        }
    });
    Response::new(empty())
}

/// Bytes a tunnel copies per read and write, each way: one full TLS record (16 KiB of
/// plaintext) where one side is TLS, so a bulk transfer is one record per write instead of
/// tokio's default 8 KiB, at 32 KiB per tunnel.
pub(crate) const TUNNEL_COPY_BUFFER: usize = 16 * 1024;

/// Both ways until either side closes, [`TUNNEL_COPY_BUFFER`] at a time.
pub(crate) async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, TUNNEL_COPY_BUFFER, TUNNEL_COPY_BUFFER).await
}

/// `mitm.passthrough`: bytes both ways, no interception, until either side closes.
async fn tunnel(
    shared: &Shared,
    conn: &Conn,
    mut client: TokioIo<hyper::upgrade::Upgraded>,
    mut upstream: TcpStream,
) {
    tokio::select! {
        r = copy_both_ways(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "passthrough tunnel closed with error");
            }
        }
        // No shutdown branch: a draining proxy lets tunnels run until the grace period ends.
        _ = idle_watch(&conn.activity, shared.limits.idle_timeout) => {}
        // Nothing to end gracefully between: the bytes stop when the identity does.
        end = conn.lifetime.tunnel_ends() => {
            tracing::info!(spiffe_id = %conn.peer.spiffe_id, reason = %end, "closing passthrough tunnel");
        }
    }
}

/// Intercept the tunnel. Its first byte says what it carries: a TLS handshake (terminated
/// with a leaf for the CONNECT host, then HTTP/1.1 or h2), or plain HTTP/1.1 (clients such as
/// Node's undici `ProxyAgent` tunnel `http://` URLs too), served through the same pipeline
/// and sent upstream over plain TCP. Anything else gets a 400 and the tunnel closes.
async fn mitm(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut tunnel_of: TunnelOf,
    mut io: TokioIo<hyper::upgrade::Upgraded>,
) {
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(shared.limits.header_read_timeout, io.read(&mut first));
    let io = match read.await {
        Ok(Ok(1)) => Rewind {
            first: Some(first[0]),
            inner: io,
        },
        _ => return,
    };
    match first[0] {
        // A TLS record of type handshake (RFC 8446 §5.1).
        0x16 => intercept_tls(shared, conn, tunnel_of, io).await,
        // The first letter of an HTTP method token.
        b'A'..=b'Z' => {
            tunnel_of.plain_http();
            serve_inner(shared, conn, tunnel_of, io).await;
        }
        _ => refuse_tunnel(shared, conn, tunnel_of.dest, io).await,
    }
}

/// Bytes that are neither TLS nor HTTP: a 400 with the error contract, then the tunnel closes.
async fn refuse_tunnel(shared: Arc<Shared>, conn: Arc<Conn>, dest: Destination, mut io: Rewind) {
    let rej = Rejection::new(
        ErrorCode::BadRequest,
        "the tunnel carries neither TLS nor HTTP/1.1",
    );
    let answer = head_refusal(shared, conn.peer.clone(), Via::Mitm, dest)(rej);
    let _ = io.write_all(&answer).await;
    let _ = io.shutdown().await;
}

/// The client side of a tunnel with its first byte read back in front.
struct Rewind {
    first: Option<u8>,
    inner: TokioIo<hyper::upgrade::Upgraded>,
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(b) = self.first.take() {
            buf.put_slice(&[b]);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Terminate TLS with a leaf for the CONNECT host, then serve what is inside.
async fn intercept_tls(shared: Arc<Shared>, conn: Arc<Conn>, tunnel_of: TunnelOf, io: Rewind) {
    let dest = &tunnel_of.dest;
    let cfg = match shared.mitm.server_config(&dest.host).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(host = %dest.host, error = %e, "cannot issue MITM leaf certificate");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let tls = match tokio::time::timeout(shared.limits.tls_handshake_timeout, acceptor.accept(io))
        .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(host = %dest.host, spiffe_id = %conn.peer.spiffe_id, error = %e, "TLS handshake inside CONNECT tunnel failed (does the client trust the MITM CA?)");
            return;
        }
        Err(_) => return,
    };
    serve_inner(shared, conn, tunnel_of, tls).await;
}

/// What every request inside a tunnel inherits from its CONNECT: the destination, and the
/// JWT-SVID the CONNECT carried (`x-portcullis-jwt-svid`, verified then).
struct TunnelOf {
    dest: Destination,
    jwt_svid: Option<Arc<portcullis_filters::parse::jwt::JwtSvid>>,
    /// `dest`'s scheme and authority as URI parts, parsed once per tunnel (`None`: they do
    /// not parse, and every request says why).
    origin: Option<(http::uri::Scheme, http::uri::Authority)>,
}

impl TunnelOf {
    fn new(
        dest: Destination,
        jwt_svid: Option<Arc<portcullis_filters::parse::jwt::JwtSvid>>,
    ) -> TunnelOf {
        TunnelOf {
            origin: origin(&dest),
            dest,
            jwt_svid,
        }
    }

    /// Plain HTTP inside the tunnel: the same host and port, scheme `http`.
    fn plain_http(&mut self) {
        self.dest.scheme = Scheme::Http;
        self.origin = origin(&self.dest);
    }

    /// The upstream URI of a request in this tunnel: the tunnel's scheme and authority, the
    /// request's path and query. Built from parts already parsed; anything but an
    /// origin-form path is put together as text and parsed, the way that refuses it.
    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, String> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        if let (Some((scheme, authority)), true) = (&self.origin, path.starts_with('/')) {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(scheme.clone());
            parts.authority = Some(authority.clone());
            parts.path_and_query = Some(match uri.path_and_query() {
                Some(p) => p.clone(),
                None => http::uri::PathAndQuery::from_static("/"),
            });
            return Uri::from_parts(parts).map_err(|e| e.to_string());
        }
        let text = format!(
            "{}://{}{}",
            self.dest.scheme.as_str(),
            self.dest.authority(),
            path
        );
        Uri::try_from(text).map_err(|e| e.to_string())
    }
}

fn origin(dest: &Destination) -> Option<(http::uri::Scheme, http::uri::Authority)> {
    let scheme = http::uri::Scheme::try_from(dest.scheme.as_str()).ok();
    scheme.zip(http::uri::Authority::try_from(dest.authority()).ok())
}

/// Serve HTTP/1.1 or h2 (h2 only over TLS, by ALPN) inside a tunnel to `dest`, every request
/// through [`handle_inner`].
async fn serve_inner<I>(shared: Arc<Shared>, conn: Arc<Conn>, tunnel_of: TunnelOf, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let dest = tunnel_of.dest.clone();
    let gate = head_refusal(shared.clone(), conn.peer.clone(), Via::Mitm, dest.clone());
    let io = HeadGate::new(io, shared.limits.head_read_bytes(), gate);
    let dest_host = dest.host.to_string();
    let dest = Arc::new(tunnel_of);
    let svc_shared = shared.clone();
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (s, c, d) = (svc_shared.clone(), svc_conn.clone(), dest.clone());
        async move { Ok::<_, std::convert::Infallible>(handle_inner(s, c, d, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(shared.limits.hyper_buf_size());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.limits.head_read_bytes()).unwrap_or(u32::MAX));
    let served = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    tokio::select! {
        r = served.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "intercepted connection ended with error");
            }
        }
        _ = idle_watch(&conn.activity, shared.limits.idle_timeout) => {}
        _ = shared.tasks.shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
        // GOAWAY on h2, close after the response in flight on HTTP/1.1; then a bound.
        end = conn.lifetime.tunnel_ends() => {
            tracing::info!(spiffe_id = %conn.peer.spiffe_id, host = %dest_host, reason = %end,
                "closing intercepted tunnel");
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(shared.limits.shutdown_grace, served).await;
        }
    }
}

/// A request inside an intercepted tunnel. Its target must be the CONNECT host: a different
/// Host header would let a client reach a name the CONNECT (and its policy) never saw.
async fn handle_inner(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    tunnel_of: Arc<TunnelOf>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let dest = &tunnel_of.dest;
    if let Some(refused) = conn.identity_refusal(&shared, Via::Mitm, dest, &parts) {
        return refused;
    }
    let mut ctx = Context::new(conn.peer.clone(), Via::Mitm, dest.clone(), &parts);
    ctx.jwt_svid = tunnel_of.jwt_svid.clone();
    // A tunnel inside the tunnel would carry bytes no phase sees: never handed upstream.
    if parts.method == http::Method::CONNECT {
        let rej = Rejection::new(
            ErrorCode::MethodNotAllowed,
            "CONNECT inside an intercepted tunnel is not forwarded",
        );
        return refuse(&shared, ctx, rej);
    }
    if let Err(reason) = check_inner_authority(&parts, dest) {
        return refuse(&shared, ctx, Rejection::new(ErrorCode::BadRequest, reason));
    }
    match tunnel_of.upstream_uri(&parts.uri) {
        Ok(uri) => parts.uri = uri,
        Err(e) => return refuse(&shared, ctx, Rejection::new(ErrorCode::BadRequest, e)),
    }
    forward(&shared, &conn.body_budget, ctx, parts, body).await
}

fn check_inner_authority(parts: &http::request::Parts, dest: &Destination) -> Result<(), String> {
    let from_uri = parts.uri.authority().map(|a| a.as_str());
    // Two Host fields would reach the upstream, which may read the other one.
    if parts.headers.get_all(HOST).iter().nth(1).is_some() {
        return Err("request has more than one Host header".into());
    }
    let from_host = match parts.headers.get(HOST).map(|h| h.to_str()) {
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => return Err("Host header is not valid text".into()),
        None => None,
    };
    if from_uri.is_none() && from_host.is_none() {
        return Err("request has no Host header".into());
    }
    // Both must name the CONNECT target when both are present (HTTP/1.1 absolute-form inside
    // the tunnel carries both; only one is ever forwarded).
    for claimed in from_uri.into_iter().chain(from_host) {
        // The same splitter and host rules as the CONNECT target itself: no second, looser
        // reading (userinfo, a lenient port) of what the upstream will be told.
        let matches = split_authority(claimed)
            .ok()
            .and_then(|(host, port)| {
                let port = match port {
                    Some(p) => parse_port(p).ok()?,
                    None => dest.port,
                };
                Some(Host::parse(host).ok()? == dest.host && port == dest.port)
            })
            .unwrap_or(false);
        if !matches {
            return Err(format!(
                "request authority {claimed:?} does not match the CONNECT target {}",
                dest.authority()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&[u8]>) -> http::request::Parts {
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header(HOST, http::HeaderValue::from_bytes(h).unwrap());
        }
        req.body(()).unwrap().into_parts().0
    }

    fn target() -> Destination {
        Destination::parse_connect_authority("api.example.com:443").unwrap()
    }

    #[test]
    fn the_upstream_uri_is_the_one_the_text_form_gave() {
        for dest in ["api.example.com:443", "[::1]:8443", "127.0.0.1:80"] {
            let mut dest = Destination::parse_connect_authority(dest).unwrap();
            let mut tunnel = TunnelOf::new(dest.clone(), None);
            if dest.port == 80 {
                tunnel.plain_http();
                dest.scheme = Scheme::Http;
            }
            for uri in [
                "/",
                "/a/b?c=d&e",
                "/%2e%2E/x?%00",
                "https://api.example.com/p?q=1",
                "*",
            ] {
                let uri: Uri = uri.parse().unwrap();
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                let text = format!("{}://{}{}", dest.scheme.as_str(), dest.authority(), path);
                let want = Uri::try_from(text).map_err(|e| e.to_string());
                assert_eq!(tunnel.upstream_uri(&uri), want, "{dest} {uri}");
            }
        }
    }

    #[test]
    fn inner_requests_must_name_the_connect_target() {
        for ok in [
            parts("/x", Some(b"api.example.com")),
            parts("/x", Some(b"API.example.com:443")),
            parts("https://api.example.com/x", None),
            parts("https://api.example.com:443/x", Some(b"api.example.com")),
        ] {
            assert_eq!(check_inner_authority(&ok, &target()), Ok(()), "{ok:?}");
        }
        let mut twice = parts("/x", Some(b"api.example.com"));
        twice
            .headers
            .append(HOST, http::HeaderValue::from_static("api.example.com"));
        assert!(check_inner_authority(&twice, &target()).is_err());
        for bad in [
            parts("/x", None),
            parts("/x", Some(b"other.example.com")),
            parts("/x", Some(b"api.example.com:8443")),
            parts("/x", Some(b"api.example.com:+443")),
            parts("/x", Some(b"user@api.example.com")),
            parts("/x", Some(b"api.example.com.evil.test")),
            parts("/x", Some(b"api.example.com\xff")),
            // Both present: both must match, whichever is forwarded.
            parts("https://api.example.com/x", Some(b"other.example.com")),
            parts("https://other.example.com/x", Some(b"api.example.com")),
        ] {
            assert!(check_inner_authority(&bad, &target()).is_err(), "{bad:?}");
        }
    }
}
