//! Hot reload. Two kinds of material are watched by content hash every `reload_interval`,
//! and both are reloaded at once on SIGHUP: the proxy's identity material (server certificate,
//! key, trust bundles, including trust domains added to or removed from the config file) and
//! the policy (`policy.paths`). A change is applied atomically; a bad change is logged and
//! counted while the last good material keeps serving. In-flight requests keep what they had.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_policy::Policy;
use tokio_util::sync::CancellationToken;

use crate::admin::Status;
use crate::app::load_policy;
use crate::config::Config;
use crate::tls::{certified_key, ServerCert, TrustStore};

pub struct Reloader {
    config_path: PathBuf,
    config: Config,
    trust: Arc<ArcSwap<TrustStore>>,
    cert: Arc<ServerCert>,
    policy: Arc<Policy>,
    status: Arc<Status>,
    /// Fingerprints of what is being served, taken when it was loaded (before the proxy says
    /// it is listening), so a change made right after start-up is never mistaken for the
    /// baseline.
    last_tls: u64,
    last_policy: u64,
}

fn tls_files(config_path: &Path, cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![
        config_path.to_owned(),
        cfg.tls.cert.clone(),
        cfg.tls.key.clone(),
    ];
    files.extend(cfg.trust_domains.values().map(|t| t.bundle.clone()));
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
    cfg.policy.paths.iter().for_each(|p| walk(p, &mut out, 0));
    out
}

/// Hash of the files' contents (a missing file hashes differently from an empty one).
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// True when `now` differs from what is served and was already seen on the previous tick.
fn settled(pending: &mut Option<u64>, now: u64, served: u64) -> bool {
    if now == served {
        *pending = None;
        return false;
    }
    let stable = *pending == Some(now);
    *pending = if stable { None } else { Some(now) };
    stable
}

fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

async fn next_hangup(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl Reloader {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        trust: Arc<ArcSwap<TrustStore>>,
        cert: Arc<ServerCert>,
        policy: Arc<Policy>,
        status: Arc<Status>,
    ) -> Reloader {
        let last_tls = fingerprint(&tls_files(&config_path, &config));
        let last_policy = fingerprint(&policy_files(&config));
        Reloader {
            config_path,
            config,
            trust,
            cert,
            policy,
            status,
            last_tls,
            last_policy,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let (mut last_tls, mut last_policy) = (self.last_tls, self.last_policy);
        let (mut pending_tls, mut pending_policy) = (None, None);
        let mut tick = tokio::time::interval(self.config.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hup = hangups();
        loop {
            let forced = tokio::select! {
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
    fn apply(&mut self, what: &str, reload: fn(&mut Self) -> Result<(), String>) {
        let policy = what == "policy";
        let result = reload(self);
        let (all, policy_counter) = match result {
            Ok(()) => (&self.status.reloads, &self.status.policy_reloads),
            Err(_) => (
                &self.status.reload_errors,
                &self.status.policy_reload_errors,
            ),
        };
        all.fetch_add(1, Ordering::Relaxed);
        if policy {
            policy_counter.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "{what} reload failed; keeping the last good {what}")
            }
        }
    }

    fn reload_tls(&mut self) -> Result<(), String> {
        let cfg = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let store = TrustStore::load(&cfg.trust_domain_bundles()).map_err(|e| e.to_string())?;
        let ck = certified_key(&cfg.tls.cert, &cfg.tls.key).map_err(|e| e.to_string())?;
        let domains: Vec<String> = store.trust_domains().map(|t| t.to_string()).collect();
        self.trust.store(Arc::new(store));
        self.cert.replace(ck);
        tracing::info!(trust_domains = ?domains, "reloaded server certificate and trust bundles");
        self.config.trust_domains = cfg.trust_domains;
        self.config.tls = cfg.tls;
        Ok(())
    }

    fn reload_policy(&mut self) -> Result<(), String> {
        let set = load_policy(&self.config.policy)?;
        let revision = set.revision().clone();
        let old = self.policy.replace(set);
        tracing::info!(revision = %revision, previous = %old.revision(), "reloaded policy");
        Ok(())
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
