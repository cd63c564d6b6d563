//! Request handling on an authenticated client connection: CONNECT (MITM or passthrough),
//! absolute-form HTTP, and the requests inside an intercepted tunnel. Every action runs the same
//! filter chain and ends in the same logging phase; refusals become responses in `error.rs`.

pub(crate) mod error;
pub(crate) mod gateway;
pub(crate) mod mitm;
pub(crate) mod request_body;
pub(crate) mod response_body;
pub(crate) mod sse;

use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, Uri, Version};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_filters::parse::destination::{Destination, Host, Scheme};
use portcullis_filters::parse::egress::EgressGuard;
use portcullis_filters::pipeline::timing::StepKind;
use portcullis_filters::pipeline::RequestBody;
use portcullis_filters::{
    Action, ActionKind, AfterResponse, Chain, Context, ErrorCode, Outcome, Peer, Rejection,
    TraceId, Via,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::LimitsConfig;
use crate::edge::idle::{idle_watch, Activity};
use crate::http::error::{empty, error_response};
use crate::http::mitm::Mitm;
use crate::http::request_body::{read_limited, Read};
use crate::http::response_body::LoggedBody;
use crate::upstream::{self, Body, Upstream};

/// Everything request handling needs, shared by all connections.
pub struct Shared {
    pub chain: Chain,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    /// The credential sources, for revocation on the admin API.
    pub secrets: Arc<crate::credentials::LocalSecrets>,
    /// Gateway routes for origin-form requests (none: gateway mode off).
    pub routes: crate::http::gateway::Routes,
    pub pins: Arc<portcullis_filters::stages::pinning::ToolPins>,
    pub upstream: Upstream,
    pub mitm: Mitm,
    pub guard: Arc<EgressGuard>,
    pub limits: LimitsConfig,
    pub connect_timeout: Duration,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// One authenticated client connection. Tunnels hold it too, so the connection-limit permit is
/// released only when the last tunnel over it ends.
pub struct Conn {
    pub peer: Arc<Peer>,
    pub activity: Arc<Activity>,
    pub _permit: tokio::sync::OwnedSemaphorePermit,
}

fn new_trace_id() -> TraceId {
    TraceId(rand::random())
}

/// A request on the proxy connection itself.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return handle_connect(shared, conn, req).await;
    }
    let (parts, body) = req.into_parts();
    let trace_id = new_trace_id();
    if parts.uri.scheme().is_none() && !shared.routes.is_empty() {
        return gateway(&shared, &conn, trace_id, parts, body).await;
    }
    let dest = match Destination::from_absolute_uri(&parts.uri) {
        Ok(d) => d,
        Err(e) => {
            let reason = if parts.uri.scheme().is_none() {
                "not a proxy request: send CONNECT host:port or an absolute-form URI (http://host/path)".to_owned()
            } else {
                e.to_string()
            };
            return reject_early(&shared, &conn, trace_id, &parts, reason);
        }
    };
    let ctx = Context::new(
        conn.peer.clone(),
        dest,
        ActionKind::Http,
        Via::AbsoluteForm,
        trace_id,
        &parts,
    );
    forward(&shared, ctx, parts, body).await
}

/// An origin-form request in gateway mode: route it, or 404 `no_route`.
async fn gateway(
    shared: &Shared,
    conn: &Conn,
    trace_id: TraceId,
    mut parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let host = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let Some(route) = shared.routes.find(host.as_deref(), parts.uri.path()) else {
        let reason = format!("no gateway route matches {}", parts.uri.path());
        let ctx = Context::new(
            conn.peer.clone(),
            no_destination(),
            ActionKind::Http,
            Via::Gateway,
            trace_id,
            &parts,
        );
        return refuse(shared, ctx, Rejection::new(ErrorCode::NoRoute, reason));
    };
    let uri = route.upstream_uri(&parts.uri);
    let rewritten = uri.is_ok();
    if let Ok(uri) = uri {
        parts.uri = uri;
    }
    route.inject(&mut parts.headers);
    let mut ctx = Context::new(
        conn.peer.clone(),
        route.upstream.clone(),
        ActionKind::Http,
        Via::Gateway,
        trace_id,
        &parts,
    );
    ctx.gateway_route = Some(route.name.clone());
    if !rewritten {
        let rej = Rejection::new(ErrorCode::BadRequest, "the path cannot be routed");
        return refuse(shared, ctx, rej);
    }
    forward(shared, ctx, parts, body).await
}

fn no_destination() -> Destination {
    Destination {
        host: Host::Dns("-".into()),
        port: 0,
        scheme: Scheme::Http,
    }
}

/// A bad request that never got a destination: log it against a placeholder destination.
fn reject_early(
    shared: &Shared,
    conn: &Conn,
    trace_id: TraceId,
    parts: &http::request::Parts,
    reason: String,
) -> Response<Body> {
    let ctx = Context::new(
        conn.peer.clone(),
        no_destination(),
        ActionKind::Http,
        Via::AbsoluteForm,
        trace_id,
        parts,
    );
    refuse(shared, ctx, Rejection::new(ErrorCode::BadRequest, reason))
}

/// Answer with the error and run the logging phase.
fn refuse(shared: &Shared, mut ctx: Context, rej: Rejection) -> Response<Body> {
    ctx.error = Some(rej.code);
    let resp = error_response(&rej, ctx.trace_id);
    let outcome = Outcome {
        status: resp.status().as_u16(),
        bytes: 0,
        duration: ctx.started.elapsed(),
    };
    shared.chain.logging(&ctx, &outcome);
    resp
}

async fn handle_connect(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    let trace_id = new_trace_id();
    let target = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let dest = match Destination::parse_connect_authority(target) {
        Ok(d) if parts.uri.path_and_query().is_none() => d,
        Ok(_) => {
            return reject_early(
                &shared,
                &conn,
                trace_id,
                &parts,
                "CONNECT target must be authority-form host:port".into(),
            )
        }
        Err(e) => return reject_early(&shared, &conn, trace_id, &parts, e.to_string()),
    };
    let mut ctx = Context::new(
        conn.peer.clone(),
        dest,
        ActionKind::Connect,
        Via::Connect,
        trace_id,
        &parts,
    );
    if let Action::Respond(rej) = shared.chain.request(&mut ctx, &mut parts).await {
        return refuse(&shared, ctx, rej);
    }
    // Check the destination now, so a blocked CONNECT is refused before the tunnel exists.
    let addrs =
        match upstream::resolve_checked(&shared.guard, &ctx.destination.host, ctx.destination.port)
            .await
        {
            Ok(a) => a,
            Err(e) => return refuse(&shared, ctx, e.rejection()),
        };
    let passthrough = shared.mitm.is_passthrough(&ctx.destination.host);
    let upstream_tcp = if passthrough {
        match upstream::connect_checked(&addrs, &ctx.destination.host, shared.connect_timeout).await
        {
            Ok(s) => Some(s),
            Err(e) => return refuse(&shared, ctx, e.rejection()),
        }
    } else {
        None
    };
    shared.chain.logging(
        &ctx,
        &Outcome {
            status: 200,
            bytes: 0,
            duration: ctx.started.elapsed(),
        },
    );
    let dest = ctx.destination.clone();
    let shared2 = shared.clone();
    shared.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        match upstream_tcp {
            Some(tcp) => tunnel(&shared2, &conn, upgraded, tcp).await,
            None => mitm(shared2, conn, dest, upgraded).await,
        }
    });
    Response::new(empty())
}

/// `mitm.passthrough`: bytes both ways, no interception, until either side closes.
async fn tunnel(
    shared: &Shared,
    conn: &Conn,
    mut client: TokioIo<hyper::upgrade::Upgraded>,
    mut upstream: TcpStream,
) {
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "passthrough tunnel closed with error");
            }
        }
        // No shutdown branch: a draining proxy lets tunnels run until the grace period ends.
        _ = idle_watch(&conn.activity, shared.limits.idle_timeout) => {}
    }
}

/// Terminate TLS inside the tunnel with a leaf for the CONNECT host and serve HTTP/1.1 or h2.
async fn mitm(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    dest: Destination,
    io: TokioIo<hyper::upgrade::Upgraded>,
) {
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
    let dest = Arc::new(dest);
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
        .max_buf_size(hyper_buf_size(&shared.limits));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hyper_buf_size(&shared.limits)).unwrap_or(u32::MAX));
    let served = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(served);
    tokio::select! {
        r = served.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "intercepted connection ended with error");
            }
        }
        _ = idle_watch(&conn.activity, shared.limits.idle_timeout) => {}
        _ = shared.shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

/// hyper's own header buffer limit sits above ours so our 431 (with the error contract) answers
/// first; anything beyond it still gets hyper's bare 431.
pub fn hyper_buf_size(limits: &LimitsConfig) -> usize {
    (limits.max_header_bytes * 2).max(8192)
}

/// A request inside an intercepted tunnel. Its target must be the CONNECT host: a different
/// Host header would let a client reach a name the CONNECT (and its policy) never saw.
async fn handle_inner(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    dest: Arc<Destination>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let ctx = Context::new(
        conn.peer.clone(),
        (*dest).clone(),
        ActionKind::Http,
        Via::Mitm,
        new_trace_id(),
        &parts,
    );
    if let Err(reason) = check_inner_authority(&parts, &dest) {
        return refuse(&shared, ctx, Rejection::new(ErrorCode::BadRequest, reason));
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    match Uri::try_from(format!("https://{}{}", dest.authority(), path)) {
        Ok(uri) => parts.uri = uri,
        Err(e) => {
            return refuse(
                &shared,
                ctx,
                Rejection::new(ErrorCode::BadRequest, e.to_string()),
            )
        }
    }
    forward(&shared, ctx, parts, body).await
}

fn check_inner_authority(parts: &http::request::Parts, dest: &Destination) -> Result<(), String> {
    let from_uri = parts.uri.authority().map(|a| a.as_str());
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
        let matches = claimed
            .parse::<http::uri::Authority>()
            .ok()
            .and_then(|a| Some((Host::parse(a.host()).ok()?, a.port_u16())))
            .is_some_and(|(host, port)| {
                host == dest.host && port.unwrap_or(dest.port) == dest.port
            });
        if !matches {
            return Err(format!(
                "request authority {claimed:?} does not match the CONNECT target {}",
                dest.authority()
            ));
        }
    }
    Ok(())
}

/// The shared path of every HTTP action: request phase, upstream request phase, send, after
/// response phase (which may ask for one retry), response phase, response-body phase, and a
/// body that runs the logging phase when it ends. Features live in the filters, not here.
async fn forward(
    shared: &Shared,
    mut ctx: Context,
    mut parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    // Buffer the body only when a filter needs to see it (JSON-RPC, body placeholders).
    let body = if shared.chain.wants_body(&ctx, &parts) {
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let limits = &shared.limits;
        match read_limited(
            body,
            declared,
            limits.inspect_body_bytes,
            limits.body_read_timeout,
        )
        .await
        {
            Ok(Read::Complete(b)) => {
                ctx.body = RequestBody::Buffered(b);
                None
            }
            Ok(Read::TooLarge(rest)) => {
                ctx.body = RequestBody::TooLarge;
                Some(rest)
            }
            Err(rej) => return refuse(shared, ctx, rej),
        }
    } else if http_body::Body::is_end_stream(&body) {
        ctx.body = RequestBody::Empty;
        None
    } else {
        Some(crate::http::request_body::stream(body))
    };
    if let Action::Respond(mut rej) = shared.chain.request(&mut ctx, &mut parts).await {
        shared.chain.refused(&ctx, &parts, &mut rej);
        return refuse_draining(shared, ctx, rej, body);
    }
    let (mut ctx, mut req) = match prepare(shared, ctx, parts, body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let mut retried = false;
    let (mut rparts, rbody) = loop {
        let (rparts, rbody) = match send(shared, &mut ctx, req).await {
            Ok(r) => r.into_parts(),
            Err(rej) => return refuse(shared, ctx, rej),
        };
        match shared.chain.after_response(&mut ctx, &rparts).await {
            AfterResponse::Retry(parts) if !retried => {
                retried = true;
                (ctx, req) = match prepare(shared, ctx, parts, None) {
                    Ok(r) => r,
                    Err(resp) => return resp,
                };
            }
            AfterResponse::Respond(rej) => return refuse(shared, ctx, rej),
            AfterResponse::Deliver | AfterResponse::Retry(_) => break (rparts, rbody),
        }
    };
    shared.chain.response(&mut ctx, &mut rparts);
    let transforms = shared.chain.response_body(&ctx, &rparts);
    if transforms.is_some() {
        // A transformed body has another length.
        rparts.headers.remove(http::header::CONTENT_LENGTH);
    }
    let body = LoggedBody::new(rbody, rparts.status, transforms, ctx, shared.chain.clone());
    Response::from_parts(rparts, BodyExt::boxed(body))
}

/// The request as it goes upstream: Host for absolute-form, the upstream-request phase, and
/// the body (streamed, or what the filters left of a buffered one).
#[allow(clippy::result_large_err)] // the error is the response itself
fn prepare(
    shared: &Shared,
    mut ctx: Context,
    mut parts: http::request::Parts,
    mut body: Option<Body>,
) -> Result<(Context, Request<Body>), Response<Body>> {
    if matches!(ctx.via, Via::AbsoluteForm | Via::Gateway) {
        // RFC 9112 §3.2.2: the absolute-form authority replaces any Host header (and a
        // gateway request is addressed to the route's upstream, not to the gateway).
        match HeaderValue::from_str(&ctx.destination.authority()) {
            Ok(h) => {
                parts.headers.insert(HOST, h);
            }
            Err(e) => {
                let rej = Rejection::new(ErrorCode::BadRequest, e.to_string());
                return Err(refuse_draining(shared, ctx, rej, body));
            }
        }
    }
    // hyper picks the upstream protocol per connection (ALPN); the request version must not pin it.
    parts.version = Version::HTTP_11;
    if let Action::Respond(rej) = shared.chain.upstream_request(&mut ctx, &mut parts) {
        return Err(refuse_draining(shared, ctx, rej, body));
    }
    let body = match (body.take(), &ctx.body) {
        (Some(b), _) => b,
        // Buffered: send what the filters left (they may have rewritten it).
        (None, RequestBody::Buffered(b)) => {
            parts.headers.remove(http::header::TRANSFER_ENCODING);
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            crate::http::error::full(b.clone())
        }
        (None, _) => crate::http::error::empty(),
    };
    Ok((ctx, Request::from_parts(parts, body)))
}

async fn send(
    shared: &Shared,
    ctx: &mut Context,
    req: Request<Body>,
) -> Result<Response<Incoming>, Rejection> {
    let sent = std::time::Instant::now();
    let resp = shared.upstream.send(req).await;
    shared.metrics.upstream_latency.observe(sent.elapsed());
    // The upstream client span (telemetry on only): until the response headers.
    ctx.step_end(Some(sent), || StepKind::Upstream {
        status: resp.as_ref().ok().map(|r| r.status().as_u16()),
        error: resp.as_ref().err().map(|r| r.code),
    });
    resp
}

/// Refuse, but keep reading the unread request body in the background (bounded in size and
/// time), so the client gets the answer instead of a reset (an h2 `RST_STREAM` or an HTTP/1.1
/// close in the middle of its upload).
fn refuse_draining(
    shared: &Shared,
    ctx: Context,
    rej: Rejection,
    body: Option<Body>,
) -> Response<Body> {
    if let Some(mut b) = body {
        let limit = shared.limits.inspect_body_bytes;
        shared.tracker.spawn(async move {
            let drain = async {
                let mut seen = 0usize;
                while let Some(Ok(frame)) = b.frame().await {
                    seen += frame.data_ref().map_or(0, |d| d.len());
                    if seen > limit {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        });
    }
    refuse(shared, ctx, rej)
}
