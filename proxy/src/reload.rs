//! Hot reload of the proxy's identity material: its server certificate/key and the trust
//! bundles, including trust domains added to or removed from the config file. Files are polled
//! by content hash every `reload_interval`; a change is applied atomically, and a bad change is
//! logged and counted while the last good material keeps serving.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::admin::Status;
use crate::config::Config;
use crate::tls::{certified_key, ServerCert, TrustStore};

pub struct Reloader {
    pub config_path: PathBuf,
    pub config: Config,
    pub trust: Arc<ArcSwap<TrustStore>>,
    pub cert: Arc<ServerCert>,
    pub status: Arc<Status>,
}

fn watched(config_path: &Path, cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![
        config_path.to_owned(),
        cfg.tls.cert.clone(),
        cfg.tls.key.clone(),
    ];
    files.extend(cfg.trust_domains.values().map(|t| t.bundle.clone()));
    files
}

/// Hash of the watched files' contents (a missing file hashes differently from an empty one).
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

impl Reloader {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut last = fingerprint(&watched(&self.config_path, &self.config));
        let mut tick = tokio::time::interval(self.config.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let now = fingerprint(&watched(&self.config_path, &self.config));
            if now == last {
                continue;
            }
            // Remember the attempt either way: a broken file is reported once, not every tick.
            last = now;
            match self.reload() {
                Ok(()) => {
                    self.status.reloads.fetch_add(1, Ordering::Relaxed);
                    last = fingerprint(&watched(&self.config_path, &self.config));
                }
                Err(e) => {
                    self.status.reload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "reload failed; keeping the last good certificates and bundles");
                }
            }
        }
    }

    fn reload(&mut self) -> Result<(), String> {
        let cfg = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let store = TrustStore::load(&cfg.trust_domain_bundles()).map_err(|e| e.to_string())?;
        let ck = certified_key(&cfg.tls.cert, &cfg.tls.key).map_err(|e| e.to_string())?;
        let domains: Vec<String> = store.trust_domains().map(|t| t.to_string()).collect();
        self.trust.store(Arc::new(store));
        self.cert.replace(ck);
        tracing::info!(trust_domains = ?domains, "reloaded server certificate and trust bundles");
        self.config = cfg;
        Ok(())
    }
}
