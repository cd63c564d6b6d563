//! The JWT authorities of each trust domain, which verify the JWT-SVIDs callers send: from a
//! file (`trust_domains.<td>.jwt_bundle`, reloaded with the other trust files) or, for a trust
//! domain with `workload_api: true`, from the Workload API's JWT bundles stream
//! (`FetchJWTBundles`). A trust domain with neither has no keys: its JWT-SVIDs are refused
//! with 503 `jwt_svid_unavailable`, as are those of a `workload_api` trust domain until the
//! agent has sent its bundle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_filters::parse::identity::TrustDomain;
use portcullis_filters::parse::jwt::{parse_jwt_bundle, Jwk};
use portcullis_filters::stages::jwt_svid::JwtBundles;

use crate::config::{Config, Invalid};

/// JWT authorities per trust domain.
pub type JwtKeys = BTreeMap<TrustDomain, Arc<Vec<Jwk>>>;

/// What a config says of JWT bundles: the files' keys (read), the Workload API trust domains.
#[derive(Debug, Default)]
pub struct Sources {
    files: JwtKeys,
    /// The trust domains whose keys come from the Workload API.
    from_api: BTreeSet<TrustDomain>,
}

#[derive(Debug, Default)]
pub struct JwtBundleStore {
    sources: ArcSwap<Sources>,
    /// What the Workload API sent last (every trust domain it knows).
    api: ArcSwap<JwtKeys>,
}

impl JwtBundleStore {
    /// Read the configured files (a bad one is a config error).
    pub fn load(cfg: &Config) -> Result<JwtBundleStore, Invalid> {
        let store = JwtBundleStore::default();
        store.apply(JwtBundleStore::read(cfg)?);
        Ok(store)
    }

    /// Read the files `cfg` names (nothing is applied: see [`JwtBundleStore::apply`]).
    pub fn read(cfg: &Config) -> Result<Sources, Invalid> {
        let mut files = JwtKeys::new();
        for (name, td) in &cfg.trust_domains {
            let (Some(path), Ok(domain)) = (&td.jwt_bundle, TrustDomain::parse(name)) else {
                continue;
            };
            let key = format!("trust_domains.{name}.jwt_bundle");
            let doc = std::fs::read(path)
                .map_err(|e| Invalid::new(&key, format!("{}: {e}", path.display())))?;
            let keys = parse_jwt_bundle(&doc).map_err(|e| Invalid::new(&key, e))?;
            if keys.is_empty() {
                return Err(Invalid::new(key, "holds no JWT authority (use: jwt-svid)"));
            }
            files.insert(domain, Arc::new(keys));
        }
        let from_api = cfg.workload_api_trust_domains().into_iter().collect();
        Ok(Sources { files, from_api })
    }

    /// Serve what [`JwtBundleStore::read`] read.
    pub fn apply(&self, sources: Sources) {
        self.sources.store(Arc::new(sources));
    }

    /// The Workload API's latest JWT bundles.
    pub fn set_from_api(&self, keys: JwtKeys) {
        self.api.store(Arc::new(keys));
    }

    /// Whether a trust domain takes its JWT bundle from the Workload API.
    pub fn wants_api(&self) -> bool {
        !self.sources.load().from_api.is_empty()
    }
}

impl JwtBundles for JwtBundleStore {
    fn keys(&self, trust_domain: &TrustDomain) -> Option<Arc<Vec<Jwk>>> {
        let sources = self.sources.load();
        if let Some(keys) = sources.files.get(trust_domain) {
            return Some(keys.clone());
        }
        if sources.from_api.contains(trust_domain) {
            return self.api.load().get(trust_domain).cloned();
        }
        None
    }
}
