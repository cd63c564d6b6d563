//! The SPIFFE Workload API (a SPIRE agent's socket) as a source of X.509-SVIDs and trust
//! bundles. Each watcher holds one server stream open and re-opens it with capped, jittered
//! backoff when it fails; every message is published on a `watch` channel, and consumers swap
//! it in at their own hot-swap points. A failing stream never clears what was published: the
//! last good material keeps serving until a new one arrives.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use portcullis_filters::parse::identity::TrustDomain;
use portcullis_filters::parse::jwt::parse_jwt_bundle;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::delegation::unix_now;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::WorkloadApiEndpoint;
use crate::reload::jwt_bundles::JwtKeys;

/// CA certificates per trust domain.
pub type Bundles = BTreeMap<TrustDomain, Vec<CertificateDer<'static>>>;

/// The workload's default X.509-SVID, with the bundles that came with it (its own trust
/// domain's and the federated ones), ready for rustls.
pub struct X509Svid {
    pub spiffe_id: String,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    pub bundles: Bundles,
    pub expires_unix: i64,
}

impl X509Svid {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    fn same_as(&self, other: &X509Svid) -> bool {
        self.chain == other.chain
            && self.key.secret_pkcs8_der() == other.key.secret_pkcs8_der()
            && self.bundles == other.bundles
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

/// Why the Workload API gave nothing usable: a stream that could not be opened or ended, or a
/// message that cannot be used (the last good material keeps serving either way).
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("{call}: {reason}")]
    Call { call: &'static str, reason: String },
    #[error("{0}")]
    Stream(String),
    #[error("the stream ended")]
    Ended,
    #[error("the Workload API sent no X.509-SVID")]
    NoSvid,
    #[error("trust domain {domain}: {reason}")]
    TrustDomain { domain: String, reason: String },
}

fn trust_domain(td: &spiffe::TrustDomain) -> Result<TrustDomain, WorkloadApiError> {
    TrustDomain::parse(td.as_str()).map_err(|e| WorkloadApiError::TrustDomain {
        domain: td.to_string(),
        reason: e.to_string(),
    })
}

fn bundle_set(set: &spiffe::X509BundleSet) -> Result<Bundles, WorkloadApiError> {
    let mut out = Bundles::new();
    for (td, bundle) in set.iter() {
        let certs = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        out.insert(trust_domain(td)?, certs);
    }
    Ok(out)
}

fn convert_context(ctx: &spiffe::X509Context) -> Result<X509Svid, WorkloadApiError> {
    let svid = ctx.default_svid().ok_or(WorkloadApiError::NoSvid)?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let expires_unix = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0);
    Ok(X509Svid {
        spiffe_id: svid.spiffe_id().to_string(),
        chain,
        key: PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()),
        bundles: bundle_set(ctx.bundle_set())?,
        expires_unix,
    })
}

/// Exponential backoff from 200 ms to 30 s with ±20% jitter, reset after a good message.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff(Self::FIRST)
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d.mul_f64(rand::random_range(0.8..1.2))
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn client(
    endpoint: &WorkloadApiEndpoint,
) -> Result<spiffe::WorkloadApiClient, WorkloadApiError> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        spiffe::WorkloadApiClient::connect_to(endpoint.as_str()),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(WorkloadApiError::Connect(e.to_string())),
        Err(_) => Err(WorkloadApiError::ConnectTimeout),
    }
}

/// Connect and open one server stream with `open` (the `call` named in errors).
async fn open_stream<S, Fut>(
    endpoint: &WorkloadApiEndpoint,
    call: &'static str,
    open: impl FnOnce(spiffe::WorkloadApiClient) -> Fut,
) -> Result<S, WorkloadApiError>
where
    Fut: std::future::Future<Output = Result<S, spiffe::WorkloadApiError>>,
{
    open(client(endpoint).await?)
        .await
        .map_err(|e| WorkloadApiError::Call {
            call,
            reason: e.to_string(),
        })
}

/// Keep one stream open, publishing each message through `publish`; returns why it ended.
async fn follow<S, T>(
    stream: S,
    backoff: &mut Backoff,
    mut publish: impl FnMut(T) -> Result<(), WorkloadApiError>,
) -> WorkloadApiError
where
    S: futures_util::Stream<Item = Result<T, spiffe::WorkloadApiError>>,
{
    futures_util::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        let published = match item {
            Ok(message) => publish(message),
            // The stream itself failed (or the agent refused us): reconnect.
            Err(
                e @ (spiffe::WorkloadApiError::Transport(_)
                | spiffe::WorkloadApiError::PermissionDenied(_)
                | spiffe::WorkloadApiError::NoIdentityIssued),
            ) => return WorkloadApiError::Stream(e.to_string()),
            Err(e) => Err(WorkloadApiError::Stream(e.to_string())),
        };
        match published {
            Ok(()) => backoff.reset(),
            // A message we cannot use: keep the last good material, and keep listening.
            Err(e) => {
                tracing::error!(error = %e, "unusable message from the Workload API; keeping the last good material")
            }
        }
    }
    WorkloadApiError::Ended
}

type Attempt<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = WorkloadApiError> + Send + 'a>>;

/// Run `attempt` (one stream, until it fails) again and again, with backoff, until shutdown.
fn spawn_retrying<F>(
    what: &'static str,
    endpoint: WorkloadApiEndpoint,
    shutdown: CancellationToken,
    mut attempt: F,
) where
    F: for<'a> FnMut(&'a WorkloadApiEndpoint, &'a mut Backoff) -> Attempt<'a> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            let why = tokio::select! {
                why = attempt(&endpoint, &mut backoff) => why,
                _ = shutdown.cancelled() => return,
            };
            let wait = backoff.next();
            tracing::warn!(endpoint = %endpoint, reason = %why, retry_in = ?wait,
                "Workload API {what} stream lost; keeping the last good material");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// Watch the workload's X.509-SVID (FetchX509SVID). The receiver holds `None` until the first
/// SVID arrives.
pub fn watch_svid(
    endpoint: WorkloadApiEndpoint,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<Arc<X509Svid>>> {
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    spawn_retrying(
        "X.509-SVID",
        endpoint,
        shutdown,
        move |endpoint, backoff| {
            let tx = tx.clone();
            Box::pin(async move {
                let open =
                    |c: spiffe::WorkloadApiClient| async move { c.stream_x509_contexts().await };
                let stream = match open_stream(endpoint, "FetchX509SVID", open).await {
                    Ok(s) => s,
                    Err(e) => return e,
                };
                follow(stream, backoff, |ctx| {
                    let svid = convert_context(&ctx)?;
                    // A reconnected stream starts with what we already have: no churn.
                    if tx
                        .borrow()
                        .as_deref()
                        .is_some_and(|cur: &X509Svid| cur.same_as(&svid))
                    {
                        return Ok(());
                    }
                    tracing::info!(endpoint = %endpoint, spiffe_id = %svid.spiffe_id,
                    expires_unix = svid.expires_unix, trust_domains = ?names(&svid.bundles),
                    "X.509-SVID from the Workload API");
                    tx.send_replace(Some(Arc::new(svid)));
                    Ok(())
                })
                .await
            })
        },
    );
    rx
}

/// Watch the X.509 trust bundles (FetchX509Bundles). `None` until the first message.
pub fn watch_bundles(
    endpoint: WorkloadApiEndpoint,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<Arc<Bundles>>> {
    watch_set(
        ("X.509 bundles", "FetchX509Bundles"),
        endpoint,
        shutdown,
        |c| Box::pin(async move { c.stream_x509_bundles().await }),
        |set| bundle_set(&set),
    )
}

/// Watch the JWT bundles (FetchJWTBundles): each trust domain's JWT authorities. `None` until
/// the first message.
pub fn watch_jwt_bundles(
    endpoint: WorkloadApiEndpoint,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<Arc<JwtKeys>>> {
    watch_set(
        ("JWT bundles", "FetchJWTBundles"),
        endpoint,
        shutdown,
        |c| Box::pin(async move { c.stream_jwt_bundles().await }),
        |set| jwt_bundle_set(&set),
    )
}

type Opened<S> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<S, spiffe::WorkloadApiError>> + Send>,
>;

/// Follow one bundles stream (`what`, opened by `call`), publishing each new set, converted.
fn watch_set<S, M, T>(
    (what, call): (&'static str, &'static str),
    endpoint: WorkloadApiEndpoint,
    shutdown: CancellationToken,
    open: fn(spiffe::WorkloadApiClient) -> Opened<S>,
    convert: fn(M) -> Result<T, WorkloadApiError>,
) -> watch::Receiver<Option<Arc<T>>>
where
    S: futures_util::Stream<Item = Result<M, spiffe::WorkloadApiError>> + Send + 'static,
    M: Send + 'static,
    T: PartialEq + Named + Send + Sync + 'static,
{
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    spawn_retrying(what, endpoint, shutdown, move |endpoint, backoff| {
        let tx = tx.clone();
        Box::pin(async move {
            let stream = match open_stream(endpoint, call, open).await {
                Ok(s) => s,
                Err(e) => return e,
            };
            follow(stream, backoff, |set| {
                let set = convert(set)?;
                if tx.borrow().as_deref() == Some(&set) {
                    return Ok(());
                }
                tracing::info!(endpoint = %endpoint, trust_domains = ?set.names(),
                    "{what} from the Workload API");
                tx.send_replace(Some(Arc::new(set)));
                Ok(())
            })
            .await
        })
    });
    rx
}

/// The workload's JWT-SVID for `audiences` (FetchJWTSVID), fetched again halfway through its
/// lifetime; `None` until the first one, and again once the last one has expired without a
/// successor (a stale token is never handed out).
pub fn watch_jwt_svid(
    endpoint: WorkloadApiEndpoint,
    audiences: Vec<String>,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<Arc<SecretValue>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        let mut expires = 0i64;
        loop {
            let wait = match fetch_jwt_svid(&endpoint, &audiences).await {
                Ok((token, exp)) => {
                    backoff.reset();
                    let now = unix_now();
                    tracing::info!(endpoint = %endpoint, audiences = ?audiences, expires_unix = exp,
                        "JWT-SVID from the Workload API");
                    tx.send_replace(Some(Arc::new(token)));
                    expires = exp;
                    Duration::from_secs(u64::try_from((exp - now) / 2).unwrap_or(0).max(1))
                }
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(endpoint = %endpoint, error = %e, retry_in = ?wait,
                        "cannot fetch the JWT-SVID from the Workload API");
                    if unix_now() >= expires && tx.borrow().is_some() {
                        tracing::warn!("the last JWT-SVID has expired: requests go without one");
                        tx.send_replace(None);
                    }
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
    rx
}

/// One JWT-SVID and its `exp`: a compact JWT of visible ASCII (it goes into a header), whose
/// claims say when it expires.
async fn fetch_jwt_svid(
    endpoint: &WorkloadApiEndpoint,
    audiences: &[String],
) -> Result<(SecretValue, i64), WorkloadApiError> {
    let token = client(endpoint)
        .await?
        .fetch_jwt_token(audiences, None)
        .await
        .map_err(|e| WorkloadApiError::Call {
            call: "FetchJWTSVID",
            reason: e.to_string(),
        })?;
    let token = SecretValue::new(token);
    let unusable = |reason: &str| WorkloadApiError::Call {
        call: "FetchJWTSVID",
        reason: reason.to_owned(),
    };
    if token.is_empty() || !token.expose().bytes().all(|b| b.is_ascii_graphic()) {
        return Err(unusable("the JWT-SVID is not a compact JWT"));
    }
    let exp = portcullis_filters::parse::jwt::decode(token.expose())
        .ok()
        .and_then(|t| t.claims.get("exp").and_then(serde_json::Value::as_i64))
        .ok_or_else(|| unusable("the JWT-SVID has no exp"))?;
    Ok((token, exp))
}

/// A per-trust-domain set, by its trust domains' names (for logs).
pub trait Named {
    fn names(&self) -> Vec<String>;
}

impl<V> Named for BTreeMap<TrustDomain, V> {
    fn names(&self) -> Vec<String> {
        self.keys().map(|t| t.to_string()).collect()
    }
}

fn jwt_bundle_set(set: &spiffe::JwtBundleSet) -> Result<JwtKeys, WorkloadApiError> {
    let mut out = JwtKeys::new();
    for (td, bundle) in set.iter() {
        let keys: Vec<&str> = bundle
            .jwt_authorities()
            .filter_map(|a| std::str::from_utf8(a.jwk_json()).ok())
            .collect();
        let doc = format!("{{\"keys\":[{}]}}", keys.join(","));
        let keys =
            parse_jwt_bundle(doc.as_bytes()).map_err(|reason| WorkloadApiError::TrustDomain {
                domain: td.to_string(),
                reason,
            })?;
        out.insert(trust_domain(td)?, Arc::new(keys));
    }
    Ok(out)
}

fn names(b: &Bundles) -> Vec<String> {
    b.names()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_api_context_becomes_rustls_material() {
        use crate::pki::{Authority, LeafSpec};
        let ca = Authority::generate("acme CA", Some("spiffe://acme.test")).unwrap();
        let other = Authority::generate("other CA", Some("spiffe://other.test")).unwrap();
        let leaf = ca
            .issue(&LeafSpec::svid(
                "spiffe://acme.test/agent",
                Duration::from_secs(3600),
            ))
            .unwrap();
        let key: PrivatePkcs8KeyDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let svid =
            spiffe::X509Svid::parse_from_der(&leaf.cert_der, key.secret_pkcs8_der()).unwrap();
        let mut set = spiffe::X509BundleSet::new();
        for (td, a) in [("acme.test", &ca), ("other.test", &other)] {
            let td = spiffe::TrustDomain::new(td).unwrap();
            set.add_bundle(spiffe::X509Bundle::parse_from_der(td, a.cert_der()).unwrap());
        }
        let ctx = spiffe::X509Context::new(vec![Arc::new(svid)], Arc::new(set));
        let got = convert_context(&ctx).unwrap();
        assert_eq!(got.spiffe_id, "spiffe://acme.test/agent");
        assert_eq!(got.chain, vec![CertificateDer::from(leaf.cert_der.clone())]);
        assert_eq!(got.key().secret_der(), key.secret_pkcs8_der());
        assert!(got.expires_unix > 0);
        assert_eq!(names(&got.bundles), ["acme.test", "other.test"]);
        let acme = TrustDomain::parse("acme.test").unwrap();
        assert_eq!(
            got.bundles[&acme],
            vec![CertificateDer::from(ca.cert_der().to_vec())]
        );
        // Usable as is by rustls.
        rustls::sign::CertifiedKey::from_der(
            got.chain.clone(),
            got.key(),
            &crate::certs::provider(),
        )
        .unwrap();
        // And the key never shows in Debug output.
        assert!(!format!("{got:?}").contains("key"), "{got:?}");
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= Duration::from_millis(160) && first <= Duration::from_millis(240));
        for _ in 0..20 {
            b.next();
        }
        assert!(b.next() <= Backoff::MAX.mul_f64(1.2));
        b.reset();
        assert!(b.next() <= Duration::from_millis(240));
    }
}
