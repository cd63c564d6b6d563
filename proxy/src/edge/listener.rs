//! The client-facing listener: accept (bounded by `limits.max_connections`), TLS handshake with
//! a deadline and SPIFFE client verification, then HTTP/1.1 proxy requests until the connection
//! closes, idles out, or the proxy drains for shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_filters::{Peer, Via};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;

use crate::edge::lifetime::{End, Lifetime};
use crate::edge::tls::peer_spiffe_id;
use crate::http::head_gate::{HeadGate, MAX_HEADERS};
use crate::http::idle::{idle_watch, Activity, IdleIo};
use crate::http::read_ahead::ReadAhead;
use crate::http::{self, Conn, Shared};

pub async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    accept_with(listener, acceptor, shared, serve_conn).await;
}

/// Accept on `listener` (bounded by `limits.max_connections`), each connection served by
/// `serve`, until the proxy drains.
pub async fn accept_with<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    serve: F,
) where
    F: Fn(Arc<Shared>, TlsAcceptor, TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    accept_until_shutdown(&listener, acceptor, &shared, serve).await;
    drop(listener);
    tracing::info!("stopped accepting new connections");
}

async fn accept_until_shutdown<F, Fut>(
    listener: &TcpListener,
    acceptor: TlsAcceptor,
    shared: &Arc<Shared>,
    serve: F,
) where
    F: Fn(Arc<Shared>, TlsAcceptor, TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = &shared.slots;
    let at_limit = &shared.ops.metrics.at_connection_limit;
    loop {
        let permit = tokio::select! {
            p = slots.take(|| at_limit.store(true, Ordering::Relaxed)) => match p {
                Some(p) => p,
                None => return,
            },
            _ = shared.tasks.shutdown.cancelled() => return,
        };
        at_limit.store(false, Ordering::Relaxed);
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.tasks.shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, shared2) = (acceptor.clone(), shared.clone());
        shared
            .tasks
            .tracker
            .spawn(serve(shared2, acceptor, tcp, addr, permit));
    }
}

async fn serve_conn(
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
    // The verifier already required a valid SVID; this re-reads the ID and chain it checked.
    let session = tls.get_ref().1;
    let chain = session.peer_certificates().map(<[_]>::to_vec);
    let lifetime = chain.and_then(|chain| {
        let max_age = shared.limits.max_connection_age;
        Lifetime::new(shared.verifier.clone(), chain, max_age, SystemTime::now())
    });
    let (Some(spiffe_id), Some(lifetime)) = (peer_spiffe_id(session), lifetime) else {
        tracing::error!(peer = %addr, "authenticated connection without a SPIFFE ID; closing");
        return;
    };
    tracing::debug!(peer = %addr, spiffe_id = %spiffe_id, "client authenticated");
    let peer = Arc::new(Peer {
        spiffe_id,
        source: addr,
        source_ip: addr.ip().to_string(),
        proof: portcullis_filters::pipeline::Proof::X509Svid,
    });
    let conn = Arc::new(Conn {
        peer: peer.clone(),
        activity: activity.clone(),
        lifetime,
        body_budget: crate::http::budget::Budget::new(
            shared.limits.buffered_body_bytes_per_connection,
        ),
        _permit: permit,
    });
    let svc_conn = conn.clone();
    let svc_shared = shared.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (s, c) = (svc_shared.clone(), svc_conn.clone());
        async move { Ok::<_, Infallible>(http::handle(s, c, req).await) }
    });
    let gate = http::head_refusal(
        shared.clone(),
        peer,
        Via::AbsoluteForm,
        http::no_destination(),
    );
    let io = HeadGate::new(tls, shared.limits.head_read_bytes(), gate);
    serve_http1(&shared, io, svc, &activity, addr, Some(&conn.lifetime)).await;
}

/// A client connection's TLS stream, and its activity (for the idle timeout).
pub type ClientTls = tokio_rustls::server::TlsStream<IdleIo<ReadAhead<TcpStream>>>;

/// The TLS handshake, bounded by `limits.tls_handshake_timeout`; a failure is logged.
pub async fn handshake(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<(ClientTls, Arc<Activity>)> {
    let activity = Activity::new();
    let io = IdleIo::new(ReadAhead::new(tcp), activity.clone());
    let handshake = tokio::time::timeout(shared.limits.tls_handshake_timeout, acceptor.accept(io));
    match handshake.await {
        Ok(Ok(tls)) => Some((tls, activity)),
        Ok(Err(e)) => {
            let reason = crate::edge::tls::handshake_error(&e);
            tracing::warn!(peer = %addr, reason, "client TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(peer = %addr, "client TLS handshake timed out");
            None
        }
    }
}

/// Serve HTTP/1.1 on an accepted connection until it closes, idles out, the proxy drains, or
/// (with a `lifetime`) the client's identity ends.
pub async fn serve_http1<I, S>(
    shared: &Shared,
    io: I,
    svc: S,
    activity: &Activity,
    addr: SocketAddr,
    lifetime: Option<&Lifetime>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(shared.limits.hyper_buf_size());
    let served = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        r = served.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %addr, error = %e, "client connection ended with error");
            }
        }
        _ = idle_watch(activity, shared.limits.idle_timeout) => {
            tracing::debug!(peer = %addr, "client connection idle; closing");
        }
        _ = shared.tasks.shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
        // Requests check the identity themselves; this is the age limit, or a refused
        // request's close (its response already says `Connection: close`).
        end = closing(lifetime, shared.limits.max_connection_age) => {
            tracing::info!(peer = %addr, reason = %end, "closing the client connection");
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(shared.limits.shutdown_grace, served).await;
        }
    }
}

/// When a connection must close: its identity's end, or (without one: a bearer connection,
/// whose requests each carry their own proof) its maximum age.
async fn closing(lifetime: Option<&Lifetime>, max_age: Duration) -> End {
    match lifetime {
        Some(l) => l.closing().await,
        None => {
            tokio::time::sleep(max_age).await;
            End::MaxAge
        }
    }
}
