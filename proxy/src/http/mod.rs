//! HTTP on an authenticated client connection: what kind of request it is (CONNECT,
//! absolute-form, origin-form for a gateway route) and where it goes next. Every action runs
//! the same filter chain ([`forward`]) and ends in the same logging phase; refusals become
//! responses in [`error`].

pub(crate) mod budget;
pub(crate) mod connect;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod gateway;
pub(crate) mod head_gate;
pub(crate) mod idle;
pub(crate) mod mitm;
pub(crate) mod read_ahead;
pub(crate) mod request_body;
pub(crate) mod response_body;
pub(crate) mod sse;

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use portcullis_filters::parse::destination::{Destination, Host, Scheme};
use portcullis_filters::stages::pinning::ToolPins;
use portcullis_filters::{Chain, Context, ErrorCode, Outcome, Peer, Rejection, Via};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::LimitsConfig;
use crate::credentials::LocalSecrets;
use crate::edge::lifetime::Lifetime;
use crate::edge::tls::SpiffeVerifier;
use crate::http::error::error_response;
use crate::http::gateway::Routes;
use crate::http::idle::Activity;
use crate::http::mitm::Mitm;
use crate::telemetry::metrics::Metrics;
use crate::upstream::{Body, Upstream};

/// Everything request handling needs, shared by all connections, by concern: the request
/// path (chain, routes, upstream, MITM, limits), the process's tasks, and what operators see
/// and act on through the admin listener.
pub struct Shared {
    pub chain: Chain,
    /// Gateway routes for origin-form requests (none: gateway mode off).
    pub routes: Routes,
    pub upstream: Upstream,
    pub mitm: Mitm,
    /// Verifies client chains: at the handshake, and on open connections after a reload.
    pub verifier: Arc<SpiffeVerifier>,
    /// Request-body bytes buffered for inspection, process-wide.
    pub body_budget: budget::Budget,
    /// `limits.max_connections`, for the proxy and bearer listeners together.
    pub slots: crate::edge::slots::Slots,
    pub limits: LimitsConfig,
    pub tasks: Tasks,
    pub ops: Operations,
}

/// The tasks connections and tunnels run in, and the signal that the proxy is draining.
pub struct Tasks {
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// What the admin listener reads (metrics, pins) and acts on (credential revocation, pin
/// acceptance).
pub struct Operations {
    pub metrics: Arc<Metrics>,
    pub secrets: Arc<LocalSecrets>,
    pub pins: Arc<ToolPins>,
    pub gates: Arc<crate::gates::Gates>,
    /// `policy.shadow`: decided beside the enforcing policy, never enforced.
    pub shadow: Option<Arc<portcullis_filters::stages::shadow::ShadowSlot>>,
    /// Verifies callers' JWT-SVIDs (the chain's stage and the bearer listener).
    pub jwt_svids: Arc<portcullis_filters::stages::jwt_svid::JwtSvidVerifier>,
}

/// One authenticated client connection. Tunnels hold it too, so the connection-limit permit is
/// released only when the last tunnel over it ends.
pub struct Conn {
    pub peer: Arc<Peer>,
    pub activity: Arc<Activity>,
    /// How long the peer's identity holds; every request checks it first.
    pub lifetime: Lifetime,
    /// Request-body bytes this connection (and its tunnels) may have buffered at once.
    pub body_budget: budget::Budget,
    pub _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Conn {
    /// The refusal for a request when the connection's identity no longer holds (expired,
    /// or no longer verifying after a reload): logged towards `dest`, answered with
    /// `Connection: close` on HTTP/1.1; the connection and its tunnels close.
    pub(crate) fn identity_refusal(
        &self,
        shared: &Shared,
        via: Via,
        dest: &Destination,
        parts: &http::request::Parts,
    ) -> Option<Response<Body>> {
        let end = self.lifetime.check(std::time::SystemTime::now()).err()?;
        let rej = end.rejection()?;
        tracing::info!(peer = %self.peer.source, spiffe_id = %self.peer.spiffe_id, reason = %end,
            "refusing the request and closing the connection");
        let ctx = Context::new(self.peer.clone(), via, dest.clone(), parts);
        let mut resp = refuse(shared, ctx, rej);
        if parts.version <= http::Version::HTTP_11 {
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        Some(resp)
    }
}

/// A request on the proxy connection itself.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if let Some(refused) =
        conn.identity_refusal(&shared, Via::AbsoluteForm, &no_destination(), &parts)
    {
        return refused;
    }
    let req = Request::from_parts(parts, body);
    if req.method() == Method::CONNECT {
        return connect::handle(shared, conn, req).await;
    }
    let (parts, body) = req.into_parts();
    if parts.uri.scheme().is_none() && !shared.routes.is_empty() {
        return gateway::handle(&shared, &conn, parts, body).await;
    }
    let dest = match Destination::from_absolute_uri(&parts.uri) {
        Ok(d) => d,
        Err(e) => {
            let reason = if parts.uri.scheme().is_none() {
                "not a proxy request: send CONNECT host:port or an absolute-form URI (http://host/path)".to_owned()
            } else {
                e.to_string()
            };
            return reject_early(&shared, &conn, &parts, reason);
        }
    };
    let ctx = Context::new(conn.peer.clone(), Via::AbsoluteForm, dest, &parts);
    forward::forward(&shared, &conn.body_budget, ctx, parts, body).await
}

pub(crate) fn no_destination() -> Destination {
    Destination {
        host: Host::Dns("-".into()),
        port: 0,
        scheme: Scheme::Http,
    }
}

/// A bad request that never got a destination: log it against a placeholder destination.
pub(crate) fn reject_early(
    shared: &Shared,
    conn: &Conn,
    parts: &http::request::Parts,
    reason: String,
) -> Response<Body> {
    let ctx = Context::new(
        conn.peer.clone(),
        Via::AbsoluteForm,
        no_destination(),
        parts,
    );
    refuse(shared, ctx, Rejection::new(ErrorCode::BadRequest, reason))
}

/// What the head gate does with a request head it refuses on a connection from `peer`
/// (towards `dest`: a tunnel's, or none): log it like any refusal (method and path unknown:
/// `-`), and answer with the error contract as raw bytes.
pub(crate) fn head_refusal(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    via: Via,
    dest: Destination,
) -> head_gate::OnRefuse {
    Box::new(move |rej| {
        let (parts, ()) = Request::new(()).into_parts();
        let mut ctx = Context::new(peer, via, dest, &parts);
        ctx.method = Method::from_bytes(b"-").unwrap_or_default();
        ctx.path = "-".into();
        ctx.error = Some(rej.code);
        let answer = error::raw_error_response(&rej, ctx.trace.id);
        let outcome = Outcome {
            status: rej.status(),
            bytes: 0,
            duration: ctx.started.elapsed(),
        };
        shared.chain.logging(&mut ctx, &outcome);
        answer
    })
}

/// Answer with the error and run the logging phase.
pub(crate) fn refuse(shared: &Shared, mut ctx: Context, rej: Rejection) -> Response<Body> {
    ctx.error = Some(rej.code);
    let resp = error_response(&rej, ctx.trace.id);
    let outcome = Outcome {
        status: resp.status().as_u16(),
        bytes: 0,
        duration: ctx.started.elapsed(),
    };
    shared.chain.logging(&mut ctx, &outcome);
    resp
}
