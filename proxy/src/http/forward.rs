//! The path every HTTP action shares, written as the phases of the filter chain and nothing
//! else: read the body if a filter asked, request phase, upstream-request phase, send,
//! after-response phase (at most one retry), response phase, response-body phase; the body
//! runs the logging phase when it ends. A capability is a filter, never an `if` here.

use std::sync::atomic::Ordering;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_filters::pipeline::timing::StepKind;
use portcullis_filters::pipeline::{RequestBody, Transforms};
use portcullis_filters::{Action, AfterResponse, Context, ErrorCode, Rejection, Via};

use crate::http::budget::{Budget, Held};
use crate::http::request_body::{read_limited, Fault, Read, Streamed};
use crate::http::response_body::LoggedBody;
use crate::http::{refuse, Shared};
use crate::upstream::Body;

/// The shared path of every HTTP action: request phase, upstream request phase, send, after
/// response phase (which may ask for one retry), response phase, response-body phase, and a
/// body that runs the logging phase when it ends. Features live in the filters, not here.
pub(crate) async fn forward(
    shared: &Shared,
    conn_budget: &Budget,
    mut ctx: Context,
    mut parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    // A body is buffered (bounded) when a filter must see it: the MCP stage classifies every
    // non-empty one, so nothing reaches the upstream unread. A larger one streams on, its rest
    // shown to the request-body checks; why it stopped on the client's side is the `fault`.
    let fault = Fault::default();
    // The buffered body's share of the process and connection budgets, given back when this
    // action has its answer.
    let mut held = Held::default();
    let body = if http_body::Body::is_end_stream(&body) {
        ctx.body = RequestBody::Empty;
        None
    } else if shared.chain.wants_body(&ctx, &parts) {
        let limits = &shared.limits;
        let reserve = |bytes| held.cover(bytes, &shared.body_budget, conn_budget);
        match read_limited(
            body,
            limits.inspect_body_bytes,
            limits.body_read_timeout,
            reserve,
        )
        .await
        {
            Ok(Read::Complete(b)) => {
                ctx.body = RequestBody::Buffered(b);
                None
            }
            Ok(Read::TooLarge { head, rest }) => {
                ctx.body = RequestBody::TooLarge(head.clone());
                Some(Streamed::new(Some(head), rest, fault.clone()))
            }
            Err(rej) => {
                if rej.code == ErrorCode::Overloaded {
                    shared
                        .ops
                        .metrics
                        .body_budget_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
                return refuse(shared, ctx, rej);
            }
        }
    } else {
        Some(Streamed::new(None, body, fault.clone()))
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
            Err(rej) => return refuse(shared, ctx, fault.get().unwrap_or(rej)),
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
    let unreadable = transforms.as_ref().and_then(Transforms::refusal);
    if let (Some(why), false) = (unreadable, rbody.is_end_stream()) {
        // Refused at the head, before anything of it reaches the client.
        let mut rej = Rejection::new(
            ErrorCode::UnsupportedEncoding,
            format!(
                "{why}: the upstream's answer (status {}) was not delivered",
                rparts.status.as_u16()
            ),
        );
        rej.status = Some(502);
        // An MCP client gets it as the JSON-RPC error of its request, not a broken session.
        if let Some(mcp) = &ctx.mcp.request {
            let reason = rej.reason.clone();
            rej.jsonrpc = Some(mcp.refusal(|_| &reason, &ctx.trace.id.to_string()));
        }
        return refuse(shared, ctx, rej);
    }
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
    mut body: Option<Streamed>,
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
        (Some(mut b), _) => {
            b.check_with(shared.chain.request_body(&mut ctx));
            b.boxed()
        }
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
    let took = sent.elapsed();
    shared.ops.metrics.upstream_latency.observe(took);
    if let Some(method) = crate::telemetry::metrics::mcp_method(ctx) {
        shared.ops.metrics.mcp_client.observe(method, took);
    }
    // The upstream client span (telemetry on only): until the response headers.
    ctx.step_end(Some(sent), || StepKind::Upstream {
        status: resp.as_ref().ok().map(|r| r.status().as_u16()),
        error: resp.as_ref().err().map(|r| r.code),
    });
    resp
}

/// Refuse; the unread request body is dropped, which drains it in the background (bounded,
/// see `request_body::drain`), so the client gets the answer instead of a reset (an h2
/// `RST_STREAM` or an HTTP/1.1 close in the middle of its upload).
fn refuse_draining(
    shared: &Shared,
    ctx: Context,
    rej: Rejection,
    body: Option<Streamed>,
) -> Response<Body> {
    drop(body);
    refuse(shared, ctx, rej)
}
