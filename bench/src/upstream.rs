//! The built-in upstream: an HTTPS server on loopback that does as little as possible per
//! request, so the numbers measure the proxy. `/small` is a fixed ~100-byte JSON body,
//! `/bytes/N` streams N bytes from a static buffer (no allocation per chunk), and `/mcp`
//! answers a JSON-RPC request with a small result (a tool list for `tools/list`). For the soak:
//! `/cred` answers `/small`'s body only when the proxy substituted a credential, and
//! `/oauth/token` issues short-lived OAuth access tokens.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The `/small` body: 100 bytes of JSON.
pub const SMALL_BODY: &[u8] =
    br#"{"ok":true,"service":"portcullis-bench","path":"/small","note":"a small fixed JSON body: 100 bytes"}"#;

const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];

/// The tools `/mcp` lists; the soak's policy denies `delete_all`, so the proxy must filter it out.
pub const MCP_TOOLS: &[&str] = &["echo", "search", "delete_all"];

/// Prefix of the access tokens `/oauth/token` issues.
pub const OAUTH_TOKEN_PREFIX: &str = "soak-oauth-";
/// Their `expires_in`: with the proxy's default `refresh_before` (30 s) a token is used for
/// 10 s, so the soak's OAuth credential goes through the Redis cache every 10 s.
const OAUTH_EXPIRES_IN: u64 = 40;

/// Largest `/bytes/N` served, so a typo cannot make the server stream for hours.
const MAX_BYTES: u64 = 1 << 30;

pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(tls: Arc<rustls::ServerConfig>) -> Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the built-in upstream")?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|req| async move {
                        Ok::<_, Infallible>(respond(req).await)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, task })
    }
}

async fn respond(req: Request<Incoming>) -> Response<UpBody> {
    let path = req.uri().path();
    if path == "/small" {
        return json(StatusCode::OK, Bytes::from_static(SMALL_BODY));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return match n.parse::<u64>() {
            Ok(n) if n <= MAX_BYTES => Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(UpBody::Repeat { left: n })
                .unwrap_or_default(),
            _ => json(
                StatusCode::BAD_REQUEST,
                Bytes::from_static(br#"{"error":"bad length"}"#),
            ),
        };
    }
    if path == "/mcp" && req.method() == Method::POST {
        return mcp(req).await;
    }
    if path == "/cred" {
        return cred(&req);
    }
    if path == "/oauth/token" && req.method() == Method::POST {
        return oauth_token();
    }
    json(
        StatusCode::NOT_FOUND,
        Bytes::from_static(br#"{"error":"not found"}"#),
    )
}

/// A JSON-RPC answer with the request's `id`: the tool list for `tools/list`, a `tools/call`
/// result for any other method.
async fn mcp(req: Request<Incoming>) -> Response<UpBody> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(StatusCode::BAD_REQUEST, Bytes::new()),
    };
    let msg = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
    let id = msg.get("id").cloned().unwrap_or_default();
    let listing = msg.get("method").and_then(|m| m.as_str()) == Some("tools/list");
    let result = if listing {
        let tools: Vec<serde_json::Value> = MCP_TOOLS
            .iter()
            .map(|name| {
                serde_json::json!({
                    "name": name,
                    "description": format!("the bench's {name} tool"),
                    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
                })
            })
            .collect();
        serde_json::json!({ "tools": tools })
    } else {
        serde_json::json!({"content": [{"type": "text", "text": "ok"}], "isError": false})
    };
    let answer = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result});
    json(StatusCode::OK, Bytes::from(answer.to_string()))
}

/// `/small`'s body when `Authorization` carries a real secret (the file credential's value or
/// an issued OAuth token), 403 when it still carries a placeholder or nothing: the soak checks
/// every substitution end to end.
fn cred(req: &Request<Incoming>) -> Response<UpBody> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let real = auth.strip_prefix(b"Bearer ").is_some_and(|t| {
        t == crate::setup::BENCH_SECRET.as_bytes() || t.starts_with(OAUTH_TOKEN_PREFIX.as_bytes())
    });
    if real {
        json(StatusCode::OK, Bytes::from_static(SMALL_BODY))
    } else {
        json(
            StatusCode::FORBIDDEN,
            Bytes::from_static(br#"{"error":"no substituted credential"}"#),
        )
    }
}

/// A `client_credentials` token response; every token is new.
fn oauth_token() -> Response<UpBody> {
    static ISSUED: AtomicU64 = AtomicU64::new(0);
    let n = ISSUED.fetch_add(1, Ordering::Relaxed);
    let answer = serde_json::json!({
        "access_token": format!("{OAUTH_TOKEN_PREFIX}{n}"),
        "token_type": "Bearer",
        "expires_in": OAUTH_EXPIRES_IN,
    });
    json(StatusCode::OK, Bytes::from(answer.to_string()))
}

fn json(status: StatusCode, body: Bytes) -> Response<UpBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(UpBody::Full(Some(body)))
        .unwrap_or_default()
}

/// Response bodies: one buffer, or `left` bytes cut from the static chunk.
pub enum UpBody {
    Full(Option<Bytes>),
    Repeat { left: u64 },
}

impl Default for UpBody {
    fn default() -> Self {
        UpBody::Full(None)
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.get_mut() {
            UpBody::Full(b) => b.take(),
            UpBody::Repeat { left } if *left == 0 => None,
            UpBody::Repeat { left } => {
                let n = usize::try_from(*left).unwrap_or(CHUNK_LEN).min(CHUNK_LEN);
                *left -= n as u64;
                Some(Bytes::from_static(&CHUNK[..n]))
            }
        };
        Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Full(b) => b.is_none(),
            UpBody::Repeat { left } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Repeat { left } => SizeHint::with_exact(*left),
        }
    }
}
