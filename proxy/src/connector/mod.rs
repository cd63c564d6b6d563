//! `portcullis connect`: the local connector for agent runtimes that cannot present a client
//! certificate to a proxy. It listens on loopback as a plain HTTP proxy and carries each client
//! connection, byte for byte, inside its own mTLS connection to the central Portcullis,
//! authenticated with the workload's SVID. It decides nothing: the central proxy sees the
//! client's CONNECT or absolute-form requests as if the client had sent them over mTLS.
//! Anyone who can reach the listener acts as this workload, hence loopback and `--allow-clients`.

mod tls;
pub mod transparent;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use portcullis_filters::parse::identity::SpiffeId;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::jwt_svid::JWT_SVID_HEADER;
use portcullis_filters::{ErrorCode, Rejection};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WorkloadApiEndpoint;
use crate::edge::slots::Slots;
use crate::edge::tls::check_leaf;
use crate::http::head_gate::{AddHeader, HeadGate, OnRefuse, Targets};
use crate::reload::workload_api::{self, X509Svid};
use crate::reload::{fingerprint, hangups, next_hangup, settled};

/// Where the connector's identity comes from.
#[derive(Debug)]
pub enum IdentitySource {
    /// SVID, key and the bundle that verifies the central proxy, re-read when they change.
    Files {
        svid: PathBuf,
        key: PathBuf,
        bundle: PathBuf,
    },
    WorkloadApi(WorkloadApiEndpoint),
}

#[derive(Debug)]
pub struct Options {
    pub upstream: Upstream,
    /// When set, the central proxy's certificate must be this SPIFFE ID's X.509-SVID.
    pub upstream_id: Option<SpiffeId>,
    pub listen: SocketAddr,
    pub identity: IdentitySource,
    pub allow_clients: Vec<IpNet>,
    pub connect_timeout: Duration,
    pub reload_interval: Duration,
    pub shutdown_grace: Duration,
    /// Open client connections at most; more wait in the accept queue.
    pub max_connections: usize,
    /// Accept connections the kernel redirected here (see [`transparent`]) instead of
    /// proxy requests.
    pub transparent: bool,
    /// Fetch the workload's JWT-SVID for these audiences (Workload API only) and send it with
    /// every CONNECT and absolute-form request head.
    pub jwt_audiences: Vec<String>,
}

/// The central proxy: `https://host[:port]` (port 443 by default).
#[derive(Clone, Debug)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    name: ServerName<'static>,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let bad = |why: &str| format!("--upstream {url:?}: {why}");
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(
                "must be https://HOST:PORT (the connector always speaks mTLS to Portcullis)",
            ));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info is not allowed"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("give only scheme, host and port"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = ServerName::try_from(host.clone()).map_err(|e| bad(&e.to_string()))?;
        Ok(Upstream {
            port: authority.port_u16().unwrap_or(443),
            host,
            name,
        })
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "[{}]:{}", self.host, self.port),
            false => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// The identity new connections use: swapped whole when the SVID or bundle rotates.
pub struct Identity {
    pub spiffe_id: String,
    tls: Arc<rustls::ClientConfig>,
}

fn from_files(
    svid: &Path,
    key: &Path,
    bundle: &Path,
    upstream_id: Option<&SpiffeId>,
) -> Result<Identity, String> {
    let chain = crate::certs::load_certs(svid).map_err(|e| e.to_string())?;
    let id = chain
        .first()
        .map(|leaf| check_leaf(leaf, SystemTime::now()))
        .transpose()
        .map_err(|e| format!("{}: not a usable X.509-SVID: {e}", svid.display()))?
        .ok_or_else(|| format!("{}: no certificate", svid.display()))?;
    warn_if_readable_by_others(key);
    let key = crate::certs::load_key(key).map_err(|e| e.to_string())?;
    let roots = crate::certs::load_certs(bundle).map_err(|e| e.to_string())?;
    let cfg = tls::connector_config(chain, key, &roots, upstream_id)
        .map_err(|e| format!("{}: {e}", svid.display()))?;
    Ok(Identity {
        spiffe_id: id.to_string(),
        tls: Arc::new(cfg),
    })
}

fn from_workload_api(svid: &X509Svid, upstream_id: Option<&SpiffeId>) -> Result<Identity, String> {
    // The central proxy's certificate may come from this trust domain or a federated one.
    let roots = svid.bundles.values().flatten();
    let cfg = tls::connector_config(svid.chain.clone(), svid.key(), roots, upstream_id)
        .map_err(|e| format!("SVID {}: {e}", svid.spiffe_id))?;
    Ok(Identity {
        spiffe_id: svid.spiffe_id.clone(),
        tls: Arc::new(cfg),
    })
}

#[cfg(unix)]
fn warn_if_readable_by_others(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(key = %key.display(), "group or others can access the SVID key file; make it mode 0600");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_key: &Path) {}

type Current = watch::Receiver<Option<Arc<Identity>>>;

/// Start the identity source: files are loaded now (a bad file is a usage error) and then
/// polled; the Workload API is followed in the background (`None` until its first SVID).
fn identity(opts: &Options, shutdown: &CancellationToken) -> Result<Current, String> {
    let (tx, rx) = watch::channel(None);
    let upstream_id = opts.upstream_id.clone();
    match &opts.identity {
        IdentitySource::Files { svid, key, bundle } => {
            let files = vec![svid.clone(), key.clone(), bundle.clone()];
            let mut served = fingerprint(&files);
            let first = from_files(svid, key, bundle, upstream_id.as_ref())?;
            tx.send_replace(Some(Arc::new(first)));
            let (interval, shutdown) = (opts.reload_interval, shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                let (mut pending, mut hup) = (None, hangups());
                loop {
                    let forced = tokio::select! {
                        _ = tick.tick() => false,
                        _ = next_hangup(&mut hup) => true,
                        _ = shutdown.cancelled() => return,
                    };
                    let now = fingerprint(&files);
                    // Applied once the files have held still for a tick (temp file + rename),
                    // or at once on SIGHUP.
                    if !forced && !settled(&mut pending, now, served) {
                        continue;
                    }
                    served = now;
                    match from_files(&files[0], &files[1], &files[2], upstream_id.as_ref()) {
                        Ok(id) => {
                            tracing::info!(spiffe_id = %id.spiffe_id, "SVID files changed: new connections use the new SVID");
                            tx.send_replace(Some(Arc::new(id)));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "SVID reload failed; keeping the last good SVID")
                        }
                    }
                }
            });
        }
        IdentitySource::WorkloadApi(endpoint) => {
            let mut feed = workload_api::watch_svid(endpoint.clone(), shutdown.clone());
            let mut hup = hangups();
            tokio::spawn(async move {
                loop {
                    next_hangup(&mut hup).await;
                    tracing::info!("SIGHUP: nothing to reload, the Workload API pushes new SVIDs");
                }
            });
            tokio::spawn(async move {
                while feed.changed().await.is_ok() {
                    let svid = feed.borrow_and_update().clone();
                    let id = svid
                        .as_deref()
                        .map(|s| from_workload_api(s, upstream_id.as_ref()));
                    match id {
                        Some(Ok(id)) => {
                            tracing::info!(spiffe_id = %id.spiffe_id, "SVID from the Workload API: new connections use it");
                            tx.send_replace(Some(Arc::new(id)));
                        }
                        Some(Err(e)) => {
                            tracing::error!(error = %e, "unusable SVID from the Workload API; keeping the last good SVID")
                        }
                        None => {}
                    }
                }
            });
        }
    }
    Ok(rx)
}

fn allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allow.iter().any(|n| n.contains(&ip))
}

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The SVID, key or bundle cannot be used (bad usage or config).
    #[error("{0}")]
    Identity(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl ConnectorError {
    /// Per the CLI contract: 2 for bad usage or config, 1 for a runtime failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConnectorError::Identity(_) => 2,
            ConnectorError::Listen { .. } => 1,
        }
    }
}

/// Run the connector until `stop` resolves (the CLI passes SIGTERM/Ctrl-C).
pub async fn run(opts: Options, stop: impl Future<Output = ()>) -> Result<(), ConnectorError> {
    let shutdown = CancellationToken::new();
    let mut current = identity(&opts, &shutdown).map_err(ConnectorError::Identity)?;
    let jwt = match (&opts.identity, opts.jwt_audiences.is_empty()) {
        (_, true) => None,
        (IdentitySource::WorkloadApi(endpoint), false) => Some(workload_api::watch_jwt_svid(
            endpoint.clone(),
            opts.jwt_audiences.clone(),
            shutdown.clone(),
        )),
        (IdentitySource::Files { .. }, false) => {
            return Err(ConnectorError::Identity(
                "--jwt-audience needs --workload-api: JWT-SVIDs come from the Workload API".into(),
            ))
        }
    };
    let listener =
        TcpListener::bind(opts.listen)
            .await
            .map_err(|source| ConnectorError::Listen {
                addr: opts.listen,
                source,
            })?;
    let listen = listener.local_addr().unwrap_or(opts.listen);
    // Redirected IPv6 connections arrive at [::1]: in transparent mode on IPv4 loopback, the
    // same port there too (without it, IPv6 egress fails closed: nothing listens).
    let listener_v6 = match (opts.transparent, listen.ip()) {
        (true, IpAddr::V4(ip)) if ip.is_loopback() => {
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()));
            match TcpListener::bind(v6).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(listen = %v6, error = %e, "cannot listen on IPv6 loopback: redirected IPv6 connections will fail");
                    None
                }
            }
        }
        _ => None,
    };
    if !listen.ip().is_loopback() {
        tracing::warn!(listen = %listen, "listening beyond loopback: every allowed client acts as this workload");
    }
    let tracker = TaskTracker::new();
    let serve = async {
        if current.borrow().is_none() {
            tracing::info!(listen = %listen, "waiting for the X.509-SVID from the Workload API");
            let _ = current.wait_for(Option::is_some).await;
        }
        let spiffe_id = current
            .borrow()
            .as_ref()
            .map(|i| i.spiffe_id.clone())
            .unwrap_or_default();
        tracing::info!(listen = %listen, upstream = %opts.upstream,
            spiffe_id = %spiffe_id, "connector listening");
        let feeds = Feeds {
            identity: &current,
            jwt: jwt.as_ref(),
        };
        accept_loop(&listener, listener_v6.as_ref(), &opts, feeds, &tracker).await;
    };
    tokio::select! {
        _ = serve => {}
        _ = stop => {}
    }
    tracing::info!("shutting down: no new connections; waiting for open tunnels");
    shutdown.cancel();
    drop(listener);
    drop(listener_v6);
    tracker.close();
    if tokio::time::timeout(opts.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?opts.shutdown_grace, "grace period over; closing open tunnels");
    }
    Ok(())
}

/// What each connection takes when it starts: the current SVID, and the JWT-SVID feed.
#[derive(Clone, Copy)]
struct Feeds<'a> {
    identity: &'a Current,
    jwt: Option<&'a JwtFeed>,
}

type JwtFeed = watch::Receiver<Option<Arc<SecretValue>>>;

async fn accept_loop(
    listener: &TcpListener,
    also: Option<&TcpListener>,
    opts: &Options,
    feeds: Feeds<'_>,
    tracker: &TaskTracker,
) {
    let current = feeds.identity;
    let upstream = Arc::new(opts.upstream.clone());
    let slots = Slots::new(opts.max_connections);
    let full = || {
        tracing::debug!(
            max_connections = opts.max_connections,
            "every connection slot is taken: new clients wait"
        );
    };
    loop {
        let Some(permit) = slots.take(full).await else {
            return;
        };
        let accepted = match also {
            Some(v6) => tokio::select! {
                a = listener.accept() => a,
                a = v6.accept() => a,
            },
            None => listener.accept().await,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        if opts.transparent {
            // Only a connection the kernel redirected has an original destination other than
            // this listener; anything else (a client dialling the port itself) is closed.
            match transparent::original_destination(&tcp) {
                Ok(original)
                    if original.port() != listen_port(listener) || !original.ip().is_loopback() =>
                {
                    let Some(id) = current.borrow().clone() else {
                        continue;
                    };
                    let (upstream, timeout) = (upstream.clone(), opts.connect_timeout);
                    let jwt = feeds.jwt.and_then(|rx| rx.borrow().clone());
                    tracker.spawn(async move {
                        let to = To {
                            id,
                            up: upstream,
                            timeout,
                        };
                        redirected(tcp, peer, original, to, jwt).await;
                        drop(permit);
                    });
                }
                Ok(_) => {
                    tracing::warn!(peer = %peer, "refused a connection made to the transparent listener itself")
                }
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "refused a connection that was not redirected here (no original destination)")
                }
            }
            continue;
        }
        if !allowed(&opts.allow_clients, peer.ip()) {
            tracing::warn!(peer = %peer, "refused a client outside --allow-clients");
            let reason = format!("{} may not use this connector (--allow-clients)", peer.ip());
            tracker.spawn(refuse(
                tcp,
                true,
                Rejection::new(ErrorCode::ClientNotAllowed, reason),
            ));
            continue;
        }
        let Some(id) = current.borrow().clone() else {
            continue;
        };
        let (upstream, timeout) = (upstream.clone(), opts.connect_timeout);
        let jwt = feeds.jwt.cloned();
        tracker.spawn(async move {
            let to = To {
                id,
                up: upstream,
                timeout,
            };
            tunnel(tcp, peer, to, jwt).await;
            drop(permit);
        });
    }
}

async fn dial(
    up: &Upstream,
    id: &Identity,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut last = None;
    let mut tcp = None;
    for addr in tokio::net::lookup_host((up.host.as_str(), up.port)).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        last.unwrap_or_else(|| std::io::Error::other("the host name resolved to no address"))
    })?;
    let _ = tcp.set_nodelay(true);
    tokio_rustls::TlsConnector::from(id.tls.clone())
        .connect(up.name.clone(), tcp)
        .await
}

/// One client connection: an mTLS connection to the central proxy with the current SVID,
/// then bytes both ways until either side closes.
async fn tunnel(client: TcpStream, peer: SocketAddr, to: To, jwt: Option<JwtFeed>) {
    let To { id, up, timeout } = to;
    let target = up.to_string();
    let mut upstream = match tokio::time::timeout(timeout, dial(&up, &id)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = format!(
                "the connector cannot reach Portcullis at {target}: {}",
                describe(&e)
            );
            tracing::warn!(peer = %peer, spiffe_id = %id.spiffe_id, %reason, "upstream unreachable");
            return refuse(
                client,
                true,
                Rejection::new(ErrorCode::UpstreamUnreachable, reason),
            )
            .await;
        }
        Err(_) => {
            let reason = format!(
                "the connector timed out after {timeout:?} connecting to Portcullis at {target}"
            );
            tracing::warn!(peer = %peer, %reason, "upstream timeout");
            return refuse(
                client,
                true,
                Rejection::new(ErrorCode::UpstreamTimeout, reason),
            )
            .await;
        }
    };
    // Proxy requests only: an origin-form request (a browser that reached the loopback
    // listener by DNS rebinding) is answered 400 here, never carried to a gateway route.
    let answer: OnRefuse = Box::new(|rej| answer(&rej).into_bytes());
    let mut client = HeadGate::with_targets(client, Targets::ProxyOnly, HEAD_BYTES, answer);
    if let Some(rx) = jwt {
        client = client.adding(AddHeader {
            name: JWT_SVID_HEADER,
            value: Box::new(move || rx.borrow().clone()),
        });
    }
    let mut client = Counted {
        inner: client,
        written: 0,
    };
    match crate::http::connect::copy_both_ways(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(peer = %peer, sent, received, "tunnel closed");
        }
        // TLS 1.3 completes the client side of the handshake before the server has checked
        // the client certificate: a refused SVID shows up as an alert on the first read.
        Err(e) if client.written == 0 => {
            let reason = format!(
                "Portcullis at {target} ended the connection: {}",
                describe(&e)
            );
            tracing::warn!(peer = %peer, spiffe_id = %id.spiffe_id, %reason, "upstream refused the connection");
            refuse(
                client.inner,
                false,
                Rejection::new(ErrorCode::UpstreamUnreachable, reason),
            )
            .await;
        }
        Err(e) => tracing::debug!(peer = %peer, error = %e, "tunnel ended with an error"),
    }
}

/// The central proxy, and who the connector is to it.
struct To {
    id: Arc<Identity>,
    up: Arc<Upstream>,
    timeout: Duration,
}

fn listen_port(listener: &TcpListener) -> u16 {
    listener.local_addr().map_or(0, |a| a.port())
}

/// One redirected connection: name its destination, check the name against where the client
/// was going, and carry it through `CONNECT name:port` on an mTLS connection to the central
/// proxy. A refusal closes the client's connection (a TLS client cannot read an HTTP answer);
/// a plain-HTTP client gets the proxy's answer.
async fn redirected(
    mut client: TcpStream,
    peer: SocketAddr,
    original: SocketAddr,
    to: To,
    jwt: Option<Arc<SecretValue>>,
) {
    let To { id, up, timeout } = to;
    let captured = match transparent::capture(&mut client, original, timeout).await {
        Ok(c) => c,
        Err(reason) => {
            tracing::warn!(peer = %peer, %original, %reason, "redirected connection refused");
            return;
        }
    };
    if let Err(reason) = transparent::check_agreement(&captured).await {
        tracing::warn!(peer = %peer, %original, authority = %captured.authority, %reason,
            "redirected connection refused: its name and destination disagree");
        return;
    }
    let mut upstream = match tokio::time::timeout(timeout, dial(&up, &id)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer, upstream = %up, error = %describe(&e), "upstream unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %peer, upstream = %up, ?timeout, "upstream timeout");
            return;
        }
    };
    if let Err((status, answer)) =
        transparent::open_tunnel(&mut upstream, &captured.authority, jwt.as_deref()).await
    {
        tracing::info!(peer = %peer, authority = %captured.authority, status,
            "the central proxy refused the redirected connection");
        if captured.protocol == "http" {
            let _ = client.write_all(&answer).await;
            let _ = client.shutdown().await;
        }
        return;
    }
    tracing::debug!(peer = %peer, authority = %captured.authority, protocol = captured.protocol, "redirected");
    if upstream.write_all(&captured.first).await.is_err() {
        return;
    }
    match crate::http::connect::copy_both_ways(&mut client, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(peer = %peer, sent, received, "tunnel closed"),
        Err(e) => tracing::debug!(peer = %peer, error = %e, "tunnel ended with an error"),
    }
}

/// Why a connection to the central proxy failed, from the connector's side of TLS.
fn describe(e: &std::io::Error) -> String {
    use rustls::AlertDescription as A;
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("the proxy's certificate is refused: {}", other.0)
        }
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("the proxy's certificate is not trusted by the connector's bundle: {c:?}")
        }
        Some(rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::CertificateExpired
            | A::CertificateRequired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied),
        )) => format!("the proxy did not accept this connector's SVID (TLS alert {a:?})"),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// Answer a client the connector cannot serve with a proxy error response, then close.
/// `read_head` first reads the client's request head: closing a socket with unread input
/// resets it, and the client would see a reset instead of the answer.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, read_head: bool, rej: Rejection) {
    if read_head {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let read = async {
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    }
    let _ = s.write_all(answer(&rej).as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A refusal as a complete HTTP/1.1 answer (no trace id: nothing reached the proxy).
fn answer(rej: &Rejection) -> String {
    let (status, code) = (rej.status(), rej.code.as_str());
    let body = serde_json::json!({"error": code, "reason": rej.reason}).to_string();
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nx-portcullis-error: {code}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The most of a request head the connector reads (the central proxy's default limit is
/// below this; larger heads are refused there or here).
const HEAD_BYTES: usize = 512 * 1024;

/// A stream that counts the bytes written to it: whether the client got anything yet.
struct Counted {
    inner: HeadGate<TcpStream>,
    written: u64,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("https://proxy.internal:8443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("proxy.internal", 8443));
        let u = Upstream::parse("https://proxy.internal/").unwrap();
        assert_eq!(u.port, 443);
        let u = Upstream::parse("https://[::1]:9").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.to_string(), "[::1]:9");
        assert!(matches!(u.name, ServerName::IpAddress(_)));
        for bad in [
            "http://proxy:8443",
            "proxy:8443",
            "https://user@proxy:8443",
            "https://proxy:8443/path",
            "https://proxy:8443/?q",
            "https://",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn refusals_are_complete_http_answers_after_the_request_head() {
        let (mut client, server) = tokio::io::duplex(4096);
        client
            .write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .await
            .unwrap();
        let reason = "127.0.0.9 may not use this connector".to_owned();
        refuse(
            server,
            true,
            Rejection::new(ErrorCode::ClientNotAllowed, reason),
        )
        .await;
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
        assert!(
            head.contains("x-portcullis-error: client_not_allowed"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "client_not_allowed");
        assert_eq!(body["reason"], "127.0.0.9 may not use this connector");
    }

    #[test]
    fn client_allow_list() {
        let allow: Vec<IpNet> = ["127.0.0.0/8", "::1/128"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(allowed(&allow, "127.0.0.1".parse().unwrap()));
        assert!(allowed(&allow, "::1".parse().unwrap()));
        // Seen on a dual-stack listener.
        assert!(allowed(&allow, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed(&allow, "10.0.0.1".parse().unwrap()));
        let only = vec!["127.0.0.2/32".parse().unwrap()];
        assert!(!allowed(&only, "127.0.0.1".parse().unwrap()));
    }
}
