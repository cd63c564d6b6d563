//! The bearer listener (`bearer_listen`): gateway callers that cannot present a client
//! certificate prove their workload with a JWT-SVID in `Authorization: Bearer` instead. It is
//! a listener of its own, so the proxy listener stays mTLS-only whatever the routes say, and
//! it serves nothing but origin-form requests to routes with `jwt_svid` (each naming the
//! audience its callers' JWT-SVIDs must carry). No request here has an identity until its
//! token is verified: anything else — a CONNECT, an absolute-form request, a route that does
//! not take bearer callers, no token, a token that does not verify, is for another audience,
//! or names a revoked identity — is refused before a context exists. The verified SPIFFE ID is
//! then the request's identity for everything downstream (policy, credentials, logs, spans),
//! the bearer is removed, and the JWT-SVID can serve as the token exchange's actor token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use portcullis_filters::pipeline::TraceId;
use portcullis_filters::{ErrorCode, Peer, Rejection};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;

use crate::edge::listener::{handshake, serve_http1};
use crate::edge::revocation::Subject;
use crate::http::budget::Budget;
use crate::http::error::{error_response, raw_error_response};
use crate::http::gateway::{host_of, to_route, Caller};
use crate::http::head_gate::HeadGate;
use crate::http::Shared;
use crate::upstream::Body;

/// One bearer connection: nothing about the caller is known at this level.
struct BearerConn {
    source: SocketAddr,
    body_budget: Budget,
    _permit: OwnedSemaphorePermit,
}

/// Serve one accepted connection of the bearer listener.
pub async fn serve_conn(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _counted = shared.ops.metrics.connection();
    let Some((tls, activity)) = handshake(&shared, &acceptor, tcp, addr).await else {
        return;
    };
    let conn = Arc::new(BearerConn {
        source: addr,
        body_budget: Budget::new(shared.limits.buffered_body_bytes_per_connection),
        _permit: permit,
    });
    let (svc_shared, svc_conn) = (shared.clone(), conn.clone());
    let svc = hyper::service::service_fn(move |req| {
        let (s, c) = (svc_shared.clone(), svc_conn.clone());
        async move { Ok::<_, Infallible>(handle(&s, &c, req).await) }
    });
    // A malformed head is answered with the error contract; with no identity it is logged
    // here, not in the access log.
    let gate = Box::new(move |rej: Rejection| {
        tracing::info!(peer = %addr, code = rej.code.as_str(), reason = %rej.reason,
            "bearer listener: request head refused");
        raw_error_response(&rej, TraceId(rand::random()))
    });
    let io = HeadGate::new(tls, shared.limits.head_read_bytes(), gate);
    serve_http1(&shared, io, svc, &activity, addr, None).await;
}

async fn handle(shared: &Shared, conn: &BearerConn, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let caller = match authenticate(shared, conn, &mut parts) {
        Ok(c) => c,
        Err(rej) => {
            tracing::info!(peer = %conn.source, code = rej.code.as_str(), reason = %rej.reason,
                path = parts.uri.path(), "bearer listener: request refused");
            let mut resp = error_response(&rej, TraceId(rand::random()));
            if rej.status() == 401 {
                resp.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            return resp;
        }
    };
    let (route, peer, svid) = caller;
    let caller = Caller {
        peer: &peer,
        body_budget: &conn.body_budget,
        jwt_svid: Some(svid),
    };
    to_route(shared, caller, route, parts, body).await
}

type Authenticated<'a> = (
    &'a crate::http::gateway::Route,
    Arc<Peer>,
    Arc<portcullis_filters::parse::jwt::JwtSvid>,
);

/// The route and the verified caller of a bearer request, its `Authorization` removed.
fn authenticate<'a>(
    shared: &'a Shared,
    conn: &BearerConn,
    parts: &mut http::request::Parts,
) -> Result<Authenticated<'a>, Rejection> {
    let unauthenticated = |reason: &str| {
        let mut rej = Rejection::new(ErrorCode::IdentityRequired, reason);
        rej.status = Some(401);
        rej
    };
    if parts.method == Method::CONNECT || parts.uri.scheme().is_some() {
        return Err(unauthenticated(
            "this listener serves only gateway routes that take a JWT-SVID (Authorization: \
             Bearer); proxy requests need the mTLS listener",
        ));
    }
    let route = shared
        .routes
        .find(host_of(parts), parts.uri.path())
        .filter(|r| r.jwt_svid_audience.is_some())
        .ok_or_else(|| {
            let reason = format!(
                "no gateway route that takes JWT-SVID callers matches {}",
                parts.uri.path()
            );
            Rejection::new(ErrorCode::NoRoute, reason)
        })?;
    let audience = route.jwt_svid_audience.as_deref().unwrap_or_default();
    let verifier = &shared.ops.jwt_svids;
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let token = match (values.next(), values.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned()),
        _ => None,
    };
    parts.headers.remove(AUTHORIZATION);
    let Some(token) = token else {
        verifier.stats.refused.fetch_add(1, Ordering::Relaxed);
        return Err(unauthenticated(
            "send one Authorization: Bearer <JWT-SVID> header (no client certificate here)",
        ));
    };
    let svid = verifier.verify(&token).map_err(|e| verifier.refusal(e))?;
    if !svid.audience.iter().any(|a| a == audience) {
        verifier.stats.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Rejection::new(
            ErrorCode::JwtSvidInvalid,
            format!("JWT-SVID refused: it is not issued for this route's audience {audience:?}"),
        ));
    }
    let revocations = shared.verifier.trust().revocations();
    if let Some(r) = revocations.matching(&Subject::of_id(svid.spiffe_id.as_str())) {
        verifier.stats.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Rejection::new(
            ErrorCode::IdentityRevoked,
            format!(
                "the identity was revoked by an operator: {} ({})",
                r.selector, r.reason
            ),
        ));
    }
    verifier.stats.verified.fetch_add(1, Ordering::Relaxed);
    let peer = Arc::new(Peer {
        spiffe_id: svid.spiffe_id.clone(),
        source: conn.source,
        source_ip: conn.source.ip().to_string(),
        proof: portcullis_filters::pipeline::Proof::JwtSvid,
    });
    Ok((route, peer, svid))
}
