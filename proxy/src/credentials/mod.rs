//! Secret sources: environment variables, files (re-read when their modification time
//! changes, looked at most once per [`FILE_RECHECK`], so rotation needs no restart) and Vault
//! KV v2 (token or AppRole auth, namespaces; values cached for `vault.cache_ttl`, concurrent
//! misses coalesced into one fetch) and OAuth, both shared across replicas through Redis when
//! configured. A source
//! that cannot answer and has no valid cached value is an error: the request is refused (503),
//! never forwarded with its placeholder.

pub(crate) mod exchange;
pub(crate) mod fetch;
pub(crate) mod oauth;
pub(crate) mod vault;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::credentials::{OnBehalf, SecretStore, StoreError};

use crate::config::{Invalid, SourceConfig};
use crate::credentials::exchange::Grant;
use crate::credentials::fetch::{note_fetch, FetchStats, SourceError, FETCHED};
use crate::replicas::RedisStore;

/// How long a file secret is used before its file's modification time is looked at again: a
/// `statx` per request was ~3 % of the full pipeline's CPU; a rotation (or removal) takes
/// effect within this, a revocation at once.
pub const FILE_RECHECK: Duration = Duration::from_secs(1);

/// A file secret as last read: the file's modification time then, and when it was last
/// looked at.
#[derive(Debug)]
struct FileSecret {
    mtime: SystemTime,
    checked: Instant,
    value: Arc<SecretValue>,
}

#[derive(Debug)]
pub struct LocalSecrets {
    sources: HashMap<String, SourceConfig>,
    files: Mutex<HashMap<PathBuf, FileSecret>>,
    vault: Option<crate::credentials::vault::Vault>,
    oauth: HashMap<String, crate::credentials::oauth::OAuthSource>,
    exchange: HashMap<String, crate::credentials::exchange::TokenExchange>,
    shared: Option<Arc<RedisStore>>,
    pub stats: Arc<FetchStats>,
    /// `credentials[].refresh_interval`, and when each was last refreshed here.
    refresh: HashMap<String, Duration>,
    refreshed: Mutex<HashMap<String, Instant>>,
}

impl LocalSecrets {
    pub fn new(
        creds: &[crate::config::CredentialConfig],
        vault: Option<&crate::config::VaultConfig>,
        shared: Option<Arc<RedisStore>>,
    ) -> Result<LocalSecrets, Invalid> {
        let stats = Arc::new(FetchStats::default());
        let vault = vault
            .map(|v| crate::credentials::vault::Vault::new(v, shared.clone(), stats.clone()))
            .transpose()?;
        let mut oauth = HashMap::new();
        let mut exchange = HashMap::new();
        for (i, c) in creds.iter().enumerate() {
            let grant = match &c.source {
                SourceConfig::TokenExchange(t) => Some((t, Grant::TokenExchange)),
                SourceConfig::JwtBearer(t) => Some((t, Grant::JwtBearer)),
                _ => None,
            };
            if let Some((t, grant)) = grant {
                let kind = match grant {
                    Grant::TokenExchange => "token_exchange",
                    Grant::JwtBearer => "jwt_bearer",
                };
                let source = crate::credentials::exchange::TokenExchange::new(
                    &c.name,
                    &format!("credentials[{i}].source.{kind}"),
                    t,
                    grant,
                    shared.clone(),
                    stats.clone(),
                )?;
                exchange.insert(c.name.clone(), source);
            }
            if let SourceConfig::Oauth(o) = &c.source {
                let source = crate::credentials::oauth::OAuthSource::new(
                    &c.name,
                    &format!("credentials[{i}].source.oauth"),
                    o,
                    shared.clone(),
                    stats.clone(),
                )?;
                oauth.insert(c.name.clone(), source);
            }
        }
        Ok(LocalSecrets {
            sources: creds
                .iter()
                .map(|c| (c.name.clone(), c.source.clone()))
                .collect(),
            files: Mutex::default(),
            vault,
            oauth,
            exchange,
            shared,
            stats,
            refresh: creds
                .iter()
                .map(|c| (c.name.clone(), c.refresh_interval))
                .collect(),
            refreshed: Mutex::default(),
        })
    }

    /// Drop this replica's cached value of `name` (what a revocation from any replica does
    /// here). Returns false for an unknown name.
    pub async fn revoke_local(&self, name: &str) -> bool {
        match self.sources.get(name) {
            Some(SourceConfig::File(path)) => {
                if let Ok(mut files) = self.files.lock() {
                    files.remove(path);
                }
            }
            Some(SourceConfig::Vault(_)) => {
                if let Some(v) = &self.vault {
                    v.revoke(name).await;
                }
            }
            Some(SourceConfig::Oauth(_)) => {
                if let Some(o) = self.oauth.get(name) {
                    o.revoke().await;
                }
            }
            Some(SourceConfig::TokenExchange(_) | SourceConfig::JwtBearer(_)) => {
                if let Some(t) = self.exchange.get(name) {
                    t.revoke().await;
                }
            }
            Some(SourceConfig::Env(_)) => {}
            None => return false,
        }
        true
    }

    pub fn shared(&self) -> Option<&Arc<RedisStore>> {
        self.shared.as_ref()
    }

    /// The current secret of credential `name`, from its source (or that source's cache).
    async fn fetch(
        &self,
        name: &str,
        on_behalf: Option<&OnBehalf<'_>>,
    ) -> Result<Arc<SecretValue>, SourceError> {
        let missing = |what: &str| Err(SourceError::Local(format!("no {what} configured")));
        match self.sources.get(name) {
            Some(SourceConfig::Env(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Arc::new(SecretValue::new(v))),
                _ => Err(SourceError::Local(format!(
                    "environment variable {var} is not set"
                ))),
            },
            Some(SourceConfig::File(path)) => self.read_file(path, Instant::now()),
            Some(SourceConfig::Oauth(_)) => match self.oauth.get(name) {
                Some(o) => o.get().await,
                None => missing("OAuth source"),
            },
            Some(SourceConfig::TokenExchange(_) | SourceConfig::JwtBearer(_)) => {
                match self.exchange.get(name) {
                    Some(t) => t.get(on_behalf).await,
                    None => missing("token exchange source"),
                }
            }
            Some(SourceConfig::Vault(r)) => match &self.vault {
                Some(v) => v.get(name, r).await,
                None => missing("vault"),
            },
            None => missing("source"),
        }
    }

    /// The secret in `path`: the value read before while it was looked at less than
    /// [`FILE_RECHECK`] before `now` or its modification time has not changed since, else the
    /// file read again.
    fn read_file(&self, path: &PathBuf, now: Instant) -> Result<Arc<SecretValue>, SourceError> {
        let unavailable =
            |e: std::io::Error| SourceError::Local(format!("cannot read its file: {}", e.kind()));
        if let Ok(files) = self.files.lock() {
            if let Some(f) = files.get(path) {
                if now.saturating_duration_since(f.checked) < FILE_RECHECK {
                    return Ok(f.value.clone());
                }
            }
        }
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(unavailable)?;
        if let Ok(mut files) = self.files.lock() {
            if let Some(f) = files.get_mut(path) {
                if f.mtime == mtime {
                    f.checked = now;
                    return Ok(f.value.clone());
                }
            }
        }
        note_fetch();
        let text = std::fs::read_to_string(path).map_err(unavailable)?;
        let value = SecretValue::new(text.trim_end_matches(['\n', '\r']).to_owned());
        if value.is_empty() {
            return Err(SourceError::Local("its file is empty".into()));
        }
        let value = Arc::new(value);
        if let Ok(mut files) = self.files.lock() {
            let f = FileSecret {
                mtime,
                checked: now,
                value: value.clone(),
            };
            files.insert(path.clone(), f);
        }
        Ok(value)
    }
}

#[async_trait::async_trait]
impl SecretStore for LocalSecrets {
    async fn get_traced(
        &self,
        name: &str,
        on_behalf: Option<&OnBehalf<'_>>,
    ) -> (Result<Arc<SecretValue>, StoreError>, Option<bool>) {
        // An environment variable has no cache to hit.
        let cached = !matches!(self.sources.get(name), Some(SourceConfig::Env(_)) | None);
        FETCHED
            .scope(std::cell::Cell::new(false), async {
                let r = self.get(name, on_behalf).await;
                let hit = cached.then(|| !FETCHED.with(std::cell::Cell::get));
                (r, hit)
            })
            .await
    }

    async fn get(
        &self,
        name: &str,
        on_behalf: Option<&OnBehalf<'_>>,
    ) -> Result<Arc<SecretValue>, StoreError> {
        Ok(self.fetch(name, on_behalf).await?)
    }

    /// Claimed in Redis (`SET NX PX`, shared by the replicas) when it is configured and up,
    /// else in this replica's memory.
    async fn claim_refresh(&self, name: &str) -> bool {
        let Some(&every) = self.refresh.get(name) else {
            return false;
        };
        if let Some(claimed) = match &self.shared {
            Some(shared) => shared.claim(&format!("refresh:{name}"), every).await,
            None => None,
        } {
            return claimed;
        }
        let Ok(mut refreshed) = self.refreshed.lock() else {
            return false;
        };
        let now = Instant::now();
        match refreshed.get(name) {
            Some(at) if now.duration_since(*at) < every => false,
            _ => {
                refreshed.insert(name.to_owned(), now);
                true
            }
        }
    }

    async fn revoke(&self, name: &str) -> bool {
        if !self.revoke_local(name).await {
            return false;
        }
        if let Some(shared) = &self.shared {
            shared.revoke(name).await;
        }
        tracing::info!(credential = name, "revoked: cached value dropped");
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file_source(path: &std::path::Path) -> LocalSecrets {
        let cfg: crate::config::CredentialConfig = serde_json::from_value(serde_json::json!({
            "name": "f", "placeholder": "pcx_f", "hosts": ["api.example.com"],
            "source": {"file": path},
        }))
        .unwrap();
        LocalSecrets::new(&[cfg], None, None).unwrap()
    }

    fn read(s: &LocalSecrets, path: &std::path::Path, at: Instant) -> Result<String, String> {
        s.read_file(&path.to_path_buf(), at)
            .map(|v| v.expose().to_owned())
            .map_err(|e| e.to_string())
    }

    /// A rotated or removed file is seen at the first look after [`FILE_RECHECK`], not
    /// before; a revocation drops the value at once.
    #[test]
    fn a_file_is_looked_at_again_after_the_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let s = file_source(&path);
        let t0 = Instant::now();
        assert_eq!(read(&s, &path, t0).unwrap(), "first");

        std::fs::write(&path, "second\n").unwrap();
        // A different modification time even on a coarse clock.
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let soon = t0 + FILE_RECHECK / 2;
        assert_eq!(read(&s, &path, soon).unwrap(), "first");
        let after = t0 + FILE_RECHECK;
        assert_eq!(read(&s, &path, after).unwrap(), "second");

        std::fs::remove_file(&path).unwrap();
        assert_eq!(read(&s, &path, after).unwrap(), "second");
        let err = read(&s, &path, after + FILE_RECHECK).unwrap_err();
        assert!(err.contains("cannot read its file"), "{err}");

        std::fs::write(&path, "third\n").unwrap();
        assert_eq!(read(&s, &path, after + FILE_RECHECK).unwrap(), "third");
        std::fs::write(&path, "fourth\n").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(s.revoke_local("f")));
        assert_eq!(read(&s, &path, after + FILE_RECHECK).unwrap(), "fourth");
    }
}
