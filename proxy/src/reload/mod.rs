//! Hot reload. Two kinds of material are watched by content hash every `reload_interval`,
//! and both are reloaded at once on SIGHUP: the proxy's identity material (server certificate,
//! key, trust bundles, including trust domains added to or removed from the config file) and
//! the policy (`policy.paths`). With `tls.workload_api`, the server SVID and the bundles of
//! `workload_api` trust domains arrive from the Workload API instead and are swapped in at the
//! same two points (`ServerCert::replace`, `Trust::replace`). A change is applied atomically; a
//! bad change is logged and counted while the last good material keeps serving. In-flight
//! requests keep what they had; open connections re-check their client's chain against new
//! trust bundles at their next request, and tunnels at once (`edge::lifetime`).

pub(crate) mod jwt_bundles;
pub(crate) mod workload_api;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use portcullis_filters::stages::shadow::ShadowSlot;
use portcullis_policy::{Policy, PolicyError};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::certs::{certified_key, provider, TlsError};
use crate::config::{Config, ConfigError};
use crate::edge::admin::Status;
use crate::edge::tls::{load_bundles, Roots, ServerCert, Trust, TrustStore};
use crate::reload::workload_api::{Bundles, X509Svid};

/// Why a reload failed; the last good material keeps serving.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("policy.shadow: {0}")]
    Shadow(PolicyError),
    #[error("SVID {spiffe_id}: {source}")]
    Svid {
        spiffe_id: String,
        source: rustls::Error,
    },
    #[error("{0} changed (or tls switched between files and the Workload API): restart to apply")]
    NeedsRestart(&'static str),
    #[error("{0}")]
    JwtBundle(crate::config::Invalid),
}

/// What the Workload API watchers publish (`tls.workload_api`).
pub struct WorkloadApiFeeds {
    pub svid: watch::Receiver<Option<Arc<X509Svid>>>,
    /// The X.509 bundles stream (used by `workload_api` trust domains).
    pub bundles: watch::Receiver<Option<Arc<Bundles>>>,
}

pub struct Reloader {
    config_path: PathBuf,
    config: Config,
    trust: Arc<Trust>,
    /// The bundle files' certificates as last loaded, so a Workload API bundle update can
    /// rebuild the store without re-reading (possibly mid-change) files.
    file_roots: Roots,
    /// The latest bundles the Workload API sent.
    api_bundles: Option<Arc<Bundles>>,
    cert: Arc<ServerCert>,
    policy: Arc<Policy>,
    /// `policy.shadow`, reloaded with the enforcing policy, each keeping its last good set.
    shadow: Option<Arc<ShadowSlot>>,
    /// JWT authorities: files reloaded with the trust bundles.
    jwt_bundles: Arc<jwt_bundles::JwtBundleStore>,
    status: Arc<Status>,
    /// Fingerprints of what is being served, taken when it was loaded (before the proxy says
    /// it is listening), so a change made right after start-up is never mistaken for the
    /// baseline.
    last_tls: u64,
    last_policy: u64,
}

fn tls_files(config_path: &Path, cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![config_path.to_owned()];
    files.extend(cfg.tls.cert.iter().chain(&cfg.tls.key).cloned());
    files.extend(
        cfg.trust_domains
            .values()
            .flat_map(|t| t.bundle.iter().chain(&t.jwt_bundle).cloned()),
    );
    files
}

/// Every file under the policy paths (directories walked recursively, sorted), so a file
/// added to a policy directory is noticed too.
fn policy_files(cfg: &Config) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>, depth: usize) {
        match std::fs::read_dir(p) {
            Ok(entries) if depth < 16 => {
                let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                children.sort();
                children.iter().for_each(|c| walk(c, out, depth + 1));
            }
            _ => out.push(p.to_owned()),
        }
    }
    let mut out = Vec::new();
    let shadow = cfg.policy.shadow.iter().flat_map(|s| &s.paths);
    cfg.policy
        .paths
        .iter()
        .chain(shadow)
        .for_each(|p| walk(p, &mut out, 0));
    out
}

/// Hash of the files' contents (a missing file hashes differently from an empty one).
pub(crate) fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// True when `now` differs from what is served and was already seen on the previous tick.
pub(crate) fn settled(pending: &mut Option<u64>, now: u64, served: u64) -> bool {
    if now == served {
        *pending = None;
        return false;
    }
    let stable = *pending == Some(now);
    *pending = if stable { None } else { Some(now) };
    stable
}

pub(crate) fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

/// Wait for the feed's next value; false on shutdown or when the feed is gone.
async fn changed_or_shutdown<T>(rx: &mut watch::Receiver<T>, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        r = rx.changed() => r.is_ok(),
        _ = shutdown.cancelled() => false,
    }
}

/// The next change on an optional feed; never, when there is none or its sender is gone.
async fn next_change<T>(rx: &mut Option<watch::Receiver<T>>) {
    let alive = match rx {
        Some(r) => r.changed().await.is_ok(),
        None => false,
    };
    if !alive {
        std::future::pending::<()>().await;
    }
}

pub(crate) async fn next_hangup(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Everything the reloader swaps, as loaded at start.
pub struct Served {
    pub trust: Arc<Trust>,
    pub file_roots: Roots,
    pub cert: Arc<ServerCert>,
    pub policy: Arc<Policy>,
    pub shadow: Option<Arc<ShadowSlot>>,
    pub jwt_bundles: Arc<jwt_bundles::JwtBundleStore>,
}

impl Reloader {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        served: Served,
        status: Arc<Status>,
    ) -> Reloader {
        let last_tls = fingerprint(&tls_files(&config_path, &config));
        let last_policy = fingerprint(&policy_files(&config));
        Reloader {
            config_path,
            config,
            trust: served.trust,
            file_roots: served.file_roots,
            api_bundles: None,
            cert: served.cert,
            policy: served.policy,
            shadow: served.shadow,
            jwt_bundles: served.jwt_bundles,
            status,
            last_tls,
            last_policy,
        }
    }

    /// Fail closed: with the Workload API, nothing is served before a usable SVID (and the
    /// first bundles, when a trust domain takes them from there) has been swapped in. Returns
    /// false on shutdown.
    async fn first_material(
        &mut self,
        feeds: &mut WorkloadApiFeeds,
        shutdown: &CancellationToken,
    ) -> bool {
        while !self.svid_update(&mut feeds.svid) {
            if !changed_or_shutdown(&mut feeds.svid, shutdown).await {
                return false;
            }
        }
        let need_bundles = !self.config.workload_api_trust_domains().is_empty();
        while !self.bundles_update(&mut feeds.bundles) && need_bundles {
            if !changed_or_shutdown(&mut feeds.bundles, shutdown).await {
                return false;
            }
        }
        true
    }

    /// Swap in the feed's SVID, if there is one; true when it is now served.
    fn svid_update(&mut self, rx: &mut watch::Receiver<Option<Arc<X509Svid>>>) -> bool {
        let Some(svid) = rx.borrow_and_update().clone() else {
            return false;
        };
        let r = self.apply_svid(&svid);
        let ok = r.is_ok();
        self.record("server SVID from the Workload API", r);
        ok
    }

    /// Rebuild the trust store with the feed's bundles, if there are any; true on success.
    fn bundles_update(&mut self, rx: &mut watch::Receiver<Option<Arc<Bundles>>>) -> bool {
        let Some(bundles) = rx.borrow_and_update().clone() else {
            return false;
        };
        self.api_bundles = Some(bundles);
        let r = self.rebuild_trust();
        let ok = r.is_ok();
        self.record("trust bundles from the Workload API", r);
        ok
    }

    /// Runs until shutdown; `ready` fires once the server certificate and bundles are in place
    /// (at once without `feeds`, when they come from files).
    pub async fn run(
        mut self,
        feeds: Option<WorkloadApiFeeds>,
        shutdown: CancellationToken,
        ready: oneshot::Sender<()>,
    ) {
        let (mut svid_feed, mut bundle_feed) = (None, None);
        if let Some(mut feeds) = feeds {
            if !self.first_material(&mut feeds, &shutdown).await {
                return;
            }
            (svid_feed, bundle_feed) = (Some(feeds.svid), Some(feeds.bundles));
        }
        let _ = ready.send(());
        let (mut last_tls, mut last_policy) = (self.last_tls, self.last_policy);
        let (mut pending_tls, mut pending_policy) = (None, None);
        let mut tick = tokio::time::interval(self.config.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hup = hangups();
        loop {
            let forced = tokio::select! {
                _ = next_change(&mut svid_feed) => {
                    if let Some(rx) = &mut svid_feed {
                        let _ = self.svid_update(rx);
                    }
                    continue;
                }
                _ = next_change(&mut bundle_feed) => {
                    if let Some(rx) = &mut bundle_feed {
                        let _ = self.bundles_update(rx);
                    }
                    continue;
                }
                _ = tick.tick() => false,
                _ = next_hangup(&mut hup) => {
                    tracing::info!("SIGHUP: reloading certificates, bundles and policy");
                    true
                }
                _ = shutdown.cancelled() => return,
            };
            // A change is applied once the files have stayed the same for one tick, so a
            // deployment that writes a temp file and renames it is loaded once, complete.
            // Each attempt is remembered either way: a broken file is reported once, not per tick.
            // (After a TLS reload the watched set itself may have changed: new bundles.)
            let now = fingerprint(&tls_files(&self.config_path, &self.config));
            if forced || settled(&mut pending_tls, now, last_tls) {
                self.apply("certificates and trust bundles", Self::reload_tls);
                last_tls = fingerprint(&tls_files(&self.config_path, &self.config));
            }
            let now = fingerprint(&policy_files(&self.config));
            if forced || settled(&mut pending_policy, now, last_policy) {
                last_policy = now;
                self.apply("policy", Self::reload_policy);
            }
        }
    }

    /// Reload one kind of material and count the outcome (before logging it, so whoever sees
    /// the log line sees the count).
    fn apply(&mut self, what: &str, reload: fn(&mut Self) -> Result<(), ReloadError>) {
        let r = reload(self);
        self.record(what, r);
    }

    fn record(&self, what: &str, result: Result<(), ReloadError>) {
        let (all, policy_counter) = match result {
            Ok(()) => (&self.status.reloads, &self.status.policy_reloads),
            Err(_) => (
                &self.status.reload_errors,
                &self.status.policy_reload_errors,
            ),
        };
        all.fetch_add(1, Ordering::Relaxed);
        if what == "policy" {
            policy_counter.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "{what} reload failed; keeping the last good {what}")
            }
        }
    }

    fn reload_tls(&mut self) -> Result<(), ReloadError> {
        let cfg = Config::load(&self.config_path)?;
        if cfg.tls.workload_api != self.config.tls.workload_api {
            return Err(ReloadError::NeedsRestart("tls.workload_api"));
        }
        let file_roots = load_bundles(&cfg.trust_domain_bundles())?;
        let store = self.trust_store(&file_roots, &cfg)?;
        let jwt = jwt_bundles::JwtBundleStore::read(&cfg).map_err(ReloadError::JwtBundle)?;
        let ck = match cfg.tls.files() {
            Some((cert, key)) => Some(certified_key(cert, key)?),
            None => None,
        };
        // Everything read: applied together.
        let domains: Vec<String> = store.trust_domains().map(|t| t.to_string()).collect();
        self.jwt_bundles.apply(jwt);
        self.trust.replace(store);
        if let Some(ck) = ck {
            self.cert.replace(ck);
        }
        tracing::info!(trust_domains = ?domains, "reloaded server certificate and trust bundles");
        self.file_roots = file_roots;
        self.config.trust_domains = cfg.trust_domains;
        self.config.tls = cfg.tls;
        Ok(())
    }

    /// The store for `cfg`: file bundles plus the latest Workload API bundles of the trust
    /// domains that take theirs from there. Such a trust domain the Workload API has sent no
    /// bundle for is left out, so its clients are refused (fail closed).
    fn trust_store(&self, file_roots: &Roots, cfg: &Config) -> Result<TrustStore, TlsError> {
        let api = self.api_bundles.as_ref();
        let mut roots = file_roots.clone();
        for td in cfg.workload_api_trust_domains() {
            match api.and_then(|b| b.get(&td)) {
                Some(certs) => roots.push((td, certs.clone())),
                None => tracing::warn!(trust_domain = %td,
                    "the Workload API has no bundle for this trust domain; its clients are refused"),
            }
        }
        TrustStore::build(&roots)
    }

    fn rebuild_trust(&mut self) -> Result<(), ReloadError> {
        let store = self.trust_store(&self.file_roots, &self.config)?;
        let domains: Vec<String> = store.trust_domains().map(|t| t.to_string()).collect();
        self.trust.replace(store);
        tracing::info!(trust_domains = ?domains, "trust bundles updated from the Workload API");
        Ok(())
    }

    fn apply_svid(&self, svid: &X509Svid) -> Result<(), ReloadError> {
        let ck = rustls::sign::CertifiedKey::from_der(svid.chain.clone(), svid.key(), &provider())
            .map_err(|source| ReloadError::Svid {
                spiffe_id: svid.spiffe_id.clone(),
                source,
            })?;
        self.cert.replace(Arc::new(ck));
        tracing::info!(spiffe_id = %svid.spiffe_id, expires_unix = svid.expires_unix,
            "server certificate updated from the Workload API");
        Ok(())
    }

    /// The enforcing policy and the shadow policy, each on its own: a broken shadow never holds
    /// back the enforcing policy, nor the other way round.
    fn reload_policy(&mut self) -> Result<(), ReloadError> {
        let enforcing = self.config.policy.load().map(|set| {
            let revision = set.revision().clone();
            let old = self.policy.replace(set);
            tracing::info!(revision = %revision, previous = %old.revision(), "reloaded policy");
        });
        let shadow = match (&self.shadow, self.config.policy.load_shadow()) {
            (Some(policy), Some(loaded)) => loaded
                .map(|set| {
                    let revision = set.revision().clone();
                    let old = policy.replace(set).map(|o| o.revision().clone());
                    tracing::info!(revision = %revision, previous = ?old, "reloaded shadow policy");
                })
                .map_err(ReloadError::Shadow),
            _ => Ok(()),
        };
        if let (Err(_), Err(e)) = (&enforcing, &shadow) {
            tracing::warn!(error = %e, "shadow policy reload failed too; the last good shadow policy stays");
        }
        enforcing?;
        shadow
    }
}

#[cfg(test)]
mod tests {
    use super::settled;

    #[test]
    fn a_change_applies_once_it_holds_for_a_tick() {
        let mut pending = None;
        assert!(!settled(&mut pending, 1, 1), "nothing changed");
        assert!(
            !settled(&mut pending, 2, 1),
            "first sight of a change waits"
        );
        assert!(!settled(&mut pending, 3, 1), "still changing: wait again");
        assert!(settled(&mut pending, 3, 1), "stable for a tick: apply");
        assert!(!settled(&mut pending, 1, 1), "back to what is served");
    }
}
