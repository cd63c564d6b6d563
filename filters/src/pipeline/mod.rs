//! The filter pipeline: a fixed sequence of phases over a per-request [`Context`], in the style
//! of Pingora's `ProxyHttp`. A capability is a [`Filter`] plugged into the phases it needs; the
//! chain order is written once, in the proxy's pipeline builder. The proxy's forwarding code
//! only runs the phases: request, upstream request, request body (the streamed rest of a body
//! too large to buffer), (send), after response, response head, response body, logging, plus
//! the refusal phase when a request phase refused.

mod body;
mod context;
pub mod timing;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use crate::error::Rejection;

pub use body::{
    ask_uncompressed, content_encoding, BodyCheck, BodyTransform, CannotRead, TransformError,
    Transforms,
};
pub use context::{
    hex, hex_into, span_hex, ActionKind, ApprovalNote, Context, CredentialUse, DecisionRecord,
    Gates, Mcp, McpSummary, Peer, Proof, RequestBody, Trace, TraceId, Via,
};

/// What a phase decided.
#[derive(Debug)]
pub enum Action {
    Continue,
    Respond(Rejection),
}

/// The end of an action, as the logging phase sees it.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub status: u16,
    /// Response body bytes sent to the client (for CONNECT: 0).
    pub bytes: u64,
    pub duration: Duration,
}

/// What an asynchronous phase returns: its answer at once, or a future to await (a filter
/// that must wait for a store, an OAuth server, Redis). A filter with nothing to wait for
/// costs its phase no allocation and no extra poll; awaiting a `Phase` works either way.
pub enum Phase<'a, T> {
    Done(T),
    Wait(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> Phase<'a, T> {
    /// The phase's answer is `f`'s.
    pub fn wait(f: impl Future<Output = T> + Send + 'a) -> Phase<'a, T> {
        Phase::Wait(Box::pin(f))
    }
}

impl<'a, T> IntoFuture for Phase<'a, T> {
    type Output = T;
    type IntoFuture = PhaseFuture<'a, T>;

    fn into_future(self) -> PhaseFuture<'a, T> {
        PhaseFuture(match self {
            Phase::Done(v) => Pending::Done(std::future::ready(v)),
            Phase::Wait(f) => Pending::Wait(f),
        })
    }
}

/// An awaited [`Phase`].
pub struct PhaseFuture<'a, T>(Pending<'a, T>);

enum Pending<'a, T> {
    Done(std::future::Ready<T>),
    Wait(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

// Neither variant is pinned in place: `Ready` is `Unpin` and the other is a pinned box.
impl<T> Unpin for PhaseFuture<'_, T> {}

impl<T> Future for PhaseFuture<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<T> {
        match &mut self.get_mut().0 {
            Pending::Done(ready) => Pin::new(ready).poll(cx),
            Pending::Wait(f) => f.as_mut().poll(cx),
        }
    }
}

/// One capability, hooked into the phases it needs. Every phase has a no-op default.
pub trait Filter: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Whether this filter needs the request body buffered (up to the inspection limit)
    /// before the request phase. Asked once per request, before any phase runs.
    fn wants_body(&self, _ctx: &Context, _req: &http::request::Parts) -> bool {
        false
    }

    /// The client's request, before anything is sent upstream. For CONNECT, `req` is the
    /// CONNECT request itself (`ctx.kind == Connect`). A filter that may have to wait
    /// overrides this; one that never waits implements [`Filter::request_now`] instead.
    fn request<'a>(
        &'a self,
        ctx: &'a mut Context,
        req: &'a mut http::request::Parts,
    ) -> Phase<'a, Action> {
        Phase::Done(self.request_now(ctx, req))
    }

    /// The request phase of a filter with nothing to wait for (what the provided
    /// [`Filter::request`] runs): answered at once.
    fn request_now(&self, _ctx: &mut Context, _req: &mut http::request::Parts) -> Action {
        Action::Continue
    }

    /// The request as it will go upstream: last chance to rewrite it.
    fn upstream_request(&self, _ctx: &mut Context, _req: &mut http::request::Parts) -> Action {
        Action::Continue
    }

    /// The request body streams upstream unbuffered after the request phase saw its head (a
    /// body over the inspection limit): a filter that must see the rest returns a check, fed
    /// every later chunk before it goes upstream.
    fn request_body(&self, _ctx: &mut Context) -> Option<Box<dyn BodyCheck>> {
        None
    }

    /// The upstream answered (headers only). A filter may ask for the request to be sent once
    /// more (the proxy sends at most one retry per action and delivers its answer), or refuse
    /// instead of delivering. The first filter that does not say `Deliver` wins.
    fn after_response<'a>(
        &'a self,
        _ctx: &'a mut Context,
        _resp: &'a http::response::Parts,
    ) -> Phase<'a, AfterResponse> {
        Phase::Done(AfterResponse::Deliver)
    }

    /// The upstream's response headers, before they reach the client.
    fn response(&self, _ctx: &mut Context, _resp: &mut http::response::Parts) {}

    /// The response body: a filter that must see or change it returns a transform. `chain` is
    /// the chain this phase runs in, for a transform that must run the phase again for a later
    /// body (answers that arrive on another response's stream).
    fn response_body(
        &self,
        _ctx: &Context,
        _resp: &http::response::Parts,
        _chain: &Chain,
    ) -> Option<Box<dyn BodyTransform>> {
        None
    }

    /// A request phase refused the request: a filter may change how the refusal is delivered
    /// (never whether).
    fn refused(&self, _ctx: &Context, _req: &http::request::Parts, _rej: &mut Rejection) {}

    /// The action finished (response body fully handed to the connection, or the request
    /// refused), before logging: work kept off the request path (shadow decisions) that the
    /// logging phase reports.
    fn finished(&self, _ctx: &mut Context) {}

    /// After the action finished (response body fully sent, or the request refused).
    fn logging(&self, _ctx: &Context, _outcome: &Outcome) {}
}

/// What the after-response phase decided.
#[derive(Debug)]
pub enum AfterResponse {
    /// Send this response to the client.
    Deliver,
    /// Send the request again, as these parts (with the context's buffered body).
    Retry(http::request::Parts),
    /// Refuse instead of delivering the response.
    Respond(Rejection),
}

/// The ordered filters. Phases run in order; the first refusal wins and stops the phase.
#[derive(Clone, Default)]
pub struct Chain {
    filters: Vec<Arc<dyn Filter>>,
}

impl Chain {
    pub fn new() -> Chain {
        Chain::default()
    }

    #[must_use]
    pub fn with(mut self, filter: impl Filter) -> Chain {
        self.filters.push(Arc::new(filter));
        self
    }

    /// Add a filter that is configured only sometimes (the decision log, span export).
    #[must_use]
    pub fn with_optional(self, filter: Option<impl Filter>) -> Chain {
        match filter {
            Some(f) => self.with(f),
            None => self,
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.filters.iter().map(|f| f.name())
    }

    pub fn wants_body(&self, ctx: &Context, req: &http::request::Parts) -> bool {
        self.filters.iter().any(|f| f.wants_body(ctx, req))
    }

    pub async fn request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        for f in &self.filters {
            if let Action::Respond(r) = f.request(ctx, req).await {
                ctx.error = Some(r.code);
                return Action::Respond(r);
            }
        }
        Action::Continue
    }

    pub fn upstream_request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        for f in &self.filters {
            if let Action::Respond(r) = f.upstream_request(ctx, req) {
                ctx.error = Some(r.code);
                return Action::Respond(r);
            }
        }
        Action::Continue
    }

    /// The checks of every filter that must see the streamed rest of the request body.
    pub fn request_body(&self, ctx: &mut Context) -> Vec<Box<dyn BodyCheck>> {
        self.filters
            .iter()
            .filter_map(|f| f.request_body(ctx))
            .collect()
    }

    pub async fn after_response(
        &self,
        ctx: &mut Context,
        resp: &http::response::Parts,
    ) -> AfterResponse {
        for f in &self.filters {
            match f.after_response(ctx, resp).await {
                AfterResponse::Deliver => {}
                AfterResponse::Respond(r) => {
                    ctx.error = Some(r.code);
                    return AfterResponse::Respond(r);
                }
                retry => return retry,
            }
        }
        AfterResponse::Deliver
    }

    pub fn response(&self, ctx: &mut Context, resp: &mut http::response::Parts) {
        for f in &self.filters {
            f.response(ctx, resp);
        }
    }

    /// The transforms of every filter that wants the body, in chain order; `None` when no
    /// filter does (the body then streams through untouched).
    pub fn response_body(&self, ctx: &Context, resp: &http::response::Parts) -> Option<Transforms> {
        let mut all = Transforms::default();
        for f in &self.filters {
            if let Some(t) = f.response_body(ctx, resp, self) {
                all.push(t);
            }
        }
        (!all.is_empty()).then_some(all)
    }

    pub fn refused(&self, ctx: &Context, req: &http::request::Parts, rej: &mut Rejection) {
        for f in &self.filters {
            f.refused(ctx, req, rej);
        }
    }

    /// The finished phase, then the logging phase.
    pub fn logging(&self, ctx: &mut Context, outcome: &Outcome) {
        for f in &self.filters {
            f.finished(ctx);
        }
        for f in &self.filters {
            f.logging(ctx, outcome);
        }
    }
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}
