//! Assembly: turns a validated [`Config`] into running listeners. The filter chain is built
//! here, in one place, so the whole request path reads top to bottom in [`build_chain`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use portcullis_filters::parse::egress::EgressGuard;
use portcullis_filters::parse::secret::Placeholder;
use portcullis_filters::stages::credentials::{
    Credential, CredentialDetect, CredentialSet, CredentialSubstitute,
};
use portcullis_filters::stages::hygiene::HeaderHygiene;
use portcullis_filters::stages::mcp::McpFilter;
use portcullis_filters::stages::pinning::{OnChange, PinLimits, ToolPinning, ToolPins};
use portcullis_filters::stages::policy::PolicyFilter;
use portcullis_filters::stages::shadow::{ShadowPolicy, ShadowSlot};
use portcullis_filters::stages::trace::TracePropagation;
use portcullis_filters::Chain;
use portcullis_policy::{Policy, PolicyError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certs::TlsError;
use crate::config::{Config, Invalid, ToolChanges};
use crate::credentials::LocalSecrets;
use crate::edge::admin::{self, Status};
use crate::edge::listener;
use crate::edge::tls::{self, ServerCert, SpiffeVerifier, Trust, TrustStore};
use crate::gates::Gates;
use crate::http::mitm::{Mitm, MitmError};
use crate::http::sse::SseTransport;
use crate::http::{Operations, Shared, Tasks};
use crate::reload::jwt_bundles::JwtBundleStore;
use crate::reload::workload_api;
use crate::reload::{Reloader, Served, WorkloadApiFeeds};
use crate::replicas::RedisStore;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::decision_log::DecisionLog;
use crate::telemetry::metrics::{Metrics, MetricsFilter};
use crate::telemetry::{SpanExport, Telemetry};
use crate::upstream::Upstream;
use portcullis_filters::stages::jwt_svid::{JwtSvidFilter, JwtSvidVerifier};

/// The filter chain, in order. Identity is established before any of this runs (the TLS
/// handshake refuses peers without a valid SVID) and the egress guard sits at the dial
/// (`upstream::dial`), so neither can be skipped by reordering filters.
pub fn build_chain(
    cfg: &Config,
    policy: Arc<Policy>,
    ops: &Operations,
    decision_log: Option<DecisionLog>,
    spans: Option<SpanExport>,
) -> Result<Chain, StartError> {
    let (pins, metrics, secrets, gates) = (
        ops.pins.clone(),
        ops.metrics.clone(),
        ops.secrets.clone(),
        &ops.gates,
    );
    let creds = cfg
        .credentials
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let placeholder = Placeholder::parse(&c.placeholder()).ok_or_else(|| {
                Invalid::new(
                    format!("credentials[{i}].placeholder"),
                    format!("{:?} is not a valid placeholder", c.placeholder()),
                )
            })?;
            Ok(Credential {
                name: c.name.clone(),
                placeholder,
                hosts: c.hosts.clone(),
                body: c.body,
            })
        })
        .collect::<Result<Vec<_>, StartError>>()?;
    let creds = Arc::new(CredentialSet::new(creds));

    let chain = Chain::new()
        .with(HeaderHygiene {
            max_header_bytes: cfg.limits.max_header_bytes,
        })
        .with(McpFilter {
            servers: cfg
                .mcp
                .servers
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            max_batch: cfg.mcp.max_batch,
            list_limit: cfg.limits.inspect_body_bytes,
            param_headers: Default::default(),
        })
        .with(TracePropagation {
            sampling: spans.as_ref().map(|s| s.sampling_ratio()),
        })
        // Before anything reads headers for placeholders or policy: the tokens are taken out.
        .with(JwtSvidFilter::new(ops.jwt_svids.clone()))
        .with_optional(
            cfg.delegation
                .as_ref()
                .map(|d| crate::delegation::JwksCache::filter(d, gates.delegation.clone()))
                .transpose()?,
        )
        .with(ToolPinning {
            pins,
            list_limit: cfg.limits.inspect_body_bytes,
        })
        .with(CredentialDetect { set: creds.clone() })
        .with(
            PolicyFilter::new(
                policy,
                cfg.policy.redact_headers.clone(),
                cfg.limits.inspect_body_bytes,
                cfg.policy.input_limits.clone(),
            )
            .with_approvals(Some(gates.approvals.clone()))
            .keeping_inputs(ops.shadow.is_some() || cfg.telemetry.decision_log_input),
        )
        // Limits are charged only for what the policy allowed, before credentials are fetched.
        .with(gates.quota_filter(cfg))
        .with(CredentialSubstitute::new(creds, secrets))
        .with(SseTransport::new(
            cfg.limits.inspect_body_bytes,
            cfg.mcp.sse_queue,
            metrics.clone(),
        ))
        // Decides every kept input again after the action finished, before logging.
        .with_optional(ops.shadow.as_ref().map(|policy| ShadowPolicy {
            policy: policy.clone(),
            stats: metrics.shadow.clone(),
        }))
        .with(AccessLog)
        .with(MetricsFilter(metrics))
        .with_optional(decision_log)
        .with_optional(spans);
    Ok(chain)
}

/// A started proxy: its bound addresses and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub shutdown: CancellationToken,
    shared: Arc<Shared>,
    telemetry: Option<Arc<Telemetry>>,
}

/// Why the proxy could not start. Everything but `Bind` is about what the config names (a
/// file, a certificate, the policy, a back end's settings): exit 2; `Bind` is exit 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A config value that parsed but cannot be used, with its key.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Mitm(#[from] MitmError),
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("telemetry.decision_log {path}: {source}")]
    DecisionLog {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl StartError {
    /// Per the CLI contract: 2 for bad config, 1 for a runtime failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Bind { .. } => 1,
            _ => 2,
        }
    }
}

/// Everything the config names, loaded and checked; nothing bound yet. `check` stops here.
pub struct Loaded {
    trust: Arc<Trust>,
    verifier: Arc<SpiffeVerifier>,
    file_roots: tls::Roots,
    cert: Arc<ServerCert>,
    server_tls: rustls::ServerConfig,
    mitm: Mitm,
    upstream: Upstream,
    policy: Arc<Policy>,
    decision_log: Option<DecisionLog>,
    /// Decision-log lines dropped (the metrics read it).
    decision_log_counters: Arc<crate::telemetry::decision_log::Counters>,
    /// `policy.shadow`: its slot (empty when the candidate did not load), and why not.
    shadow: Option<Arc<ShadowSlot>>,
    shadow_error: Option<PolicyError>,
    secrets: Arc<LocalSecrets>,
    jwt_bundles: Arc<JwtBundleStore>,
}

impl Loaded {
    /// A failure here is a config error (exit 2): a file, certificate or policy is bad.
    pub fn load(cfg: &Config) -> Result<Loaded, StartError> {
        let file_roots = tls::load_bundles(&cfg.trust_domain_bundles())?;
        // Trust domains whose bundle comes from the Workload API join when it arrives.
        let store = TrustStore::build(&file_roots)?;
        let trust = Trust::new(store);
        let verifier = SpiffeVerifier::new(trust.clone());
        // With the Workload API the certificate arrives after start (see `start`).
        let cert = ServerCert::new(match cfg.tls.files() {
            Some((cert, key)) => Some(crate::certs::certified_key(cert, key)?),
            None => None,
        });
        let server_tls = tls::server_config(verifier.clone(), cert.clone())?;
        let mitm = Mitm::new(&cfg.mitm)?;
        let guard = Arc::new(EgressGuard::new(
            cfg.egress.allow.clone(),
            cfg.egress.deny.clone(),
        ));
        let upstream = Upstream::new(&cfg.upstream, guard)?;
        let policy = Arc::new(Policy::new(cfg.policy.load()?));
        // A candidate that does not load is an error for `check`, not for `serve` (it serves
        // without one until a reload loads it): it must never keep the proxy from serving.
        let (shadow, shadow_error) = match cfg.policy.load_shadow() {
            None => (None, None),
            Some(Ok(set)) => (Some(Arc::new(ShadowSlot::new(Some(set)))), None),
            Some(Err(e)) => (Some(Arc::new(ShadowSlot::default())), Some(e)),
        };
        let decision_log_counters = Arc::default();
        let decision_log = DecisionLog::open(
            &cfg.telemetry.decision_log,
            cfg.telemetry.decision_log_buffer,
            Arc::clone(&decision_log_counters),
        )
        .map_err(|source| StartError::DecisionLog {
            path: cfg.telemetry.decision_log.clone(),
            source,
        })?
        .map(|log| {
            log.with_input(
                cfg.telemetry
                    .decision_log_input
                    .then_some(cfg.telemetry.decision_log_input_max_bytes),
            )
        });
        // Credential back ends (Vault, OAuth) are set up here too, so `check` validates them.
        let shared = cfg
            .redis
            .as_ref()
            .map(RedisStore::new)
            .transpose()?
            .map(Arc::new);
        let secrets = Arc::new(LocalSecrets::new(
            &cfg.credentials,
            cfg.vault.as_ref(),
            shared,
        )?);
        // What `serve` reads at start besides, so `check` refuses it too: approvers' tokens
        // and the delegation issuers' key files.
        for (i, a) in cfg.approvals.approvers.iter().enumerate() {
            a.token.resolve().map_err(|e| {
                Invalid::new(format!("approvals.approvers[{i}].token"), e.to_string())
            })?;
        }
        if let Some(d) = &cfg.delegation {
            crate::delegation::JwksCache::new(d)?;
        }
        let jwt_bundles = Arc::new(JwtBundleStore::load(cfg)?);
        Ok(Loaded {
            trust,
            verifier,
            file_roots,
            cert,
            server_tls,
            mitm,
            upstream,
            policy,
            decision_log,
            decision_log_counters,
            shadow,
            shadow_error,
            secrets,
            jwt_bundles,
        })
    }

    pub fn policy_revision(&self) -> Arc<str> {
        self.policy.revision()
    }

    /// Why `policy.shadow` did not load (`check` refuses it; `serve` runs without it).
    pub fn shadow_error(&self) -> Option<&PolicyError> {
        self.shadow_error.as_ref()
    }
}

/// Clock difference tolerated on a JWT-SVID's `exp`, `nbf` and `iat`.
const JWT_SVID_SKEW: std::time::Duration = std::time::Duration::from_secs(30);

/// The JWT-SVID verifier the chain's stage and the bearer listener share.
fn jwt_svid_verifier(bundles: &Arc<JwtBundleStore>, gates: &Gates) -> Arc<JwtSvidVerifier> {
    Arc::new(JwtSvidVerifier::new(
        bundles.clone(),
        JWT_SVID_SKEW,
        gates.jwt_svid.clone(),
    ))
}

/// Keep the JWT bundles of `workload_api` trust domains as the Workload API sends them.
fn follow_jwt_bundles(
    endpoint: &crate::config::WorkloadApiEndpoint,
    store: &Arc<JwtBundleStore>,
    shutdown: &CancellationToken,
) {
    let mut feed = workload_api::watch_jwt_bundles(endpoint.clone(), shutdown.clone());
    let store = store.clone();
    tokio::spawn(async move {
        while feed.changed().await.is_ok() {
            let keys = feed.borrow_and_update().clone();
            if let Some(keys) = keys {
                store.set_from_api((*keys).clone());
            }
        }
    });
}

/// Load everything the config names, then bind and serve.
pub async fn start(cfg: Config, config_path: PathBuf) -> Result<Running, StartError> {
    let Loaded {
        trust,
        verifier,
        file_roots,
        cert,
        server_tls,
        mitm,
        upstream,
        policy,
        decision_log,
        decision_log_counters,
        shadow,
        shadow_error,
        secrets,
        jwt_bundles,
    } = Loaded::load(&cfg)?;
    if let Some(e) = shadow_error {
        tracing::warn!(error = %e, "policy.shadow does not load: serving without a shadow policy until a reload loads it");
    }
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let admin_token = match &cfg.admin_token {
        Some(r) => Some(Arc::new(
            r.resolve()
                .map_err(|e| Invalid::new("admin_token", e.to_string()))?,
        )),
        None => None,
    };
    let listener = bind(cfg.listen).await?;
    let admin_listener = bind(cfg.admin_listen).await?;
    let bearer_listener = match cfg.bearer_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let bearer_addr = bearer_listener.as_ref().and_then(|l| l.local_addr().ok());
    let proxy_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.admin_listen,
            source,
        })?;

    let shutdown = CancellationToken::new();
    let on_change = match cfg.mcp.tool_changes {
        ToolChanges::Log => OnChange::Log,
        ToolChanges::Deny => OnChange::Deny,
    };
    let pin_limits = PinLimits {
        per_server: cfg.mcp.max_pins_per_server,
        total: cfg.mcp.max_pins,
    };
    let pins = Arc::new(ToolPins::with_limits(on_change, pin_limits));
    let gates = Arc::new(Gates::build(&cfg, secrets.shared())?);
    if let Some(store) = secrets.shared() {
        // Pins other replicas already agreed on, before the first request is served.
        match store.load_pins().await {
            Ok(all) => all
                .iter()
                .for_each(|(server, tool, hash)| pins.set_pinned(server, tool, hash)),
            Err(e) => tracing::warn!(error = %e, "redis: cannot load the shared MCP tool pins"),
        }
        crate::replicas::share_pins(store, &pins);
        // Identity revocations in force before the first handshake is accepted.
        store.follow_revocations(verifier.trust()).await;
        let local = secrets.clone();
        store.spawn_listener(
            crate::replicas::Followers {
                on_revoke: move |name: String| {
                    let local = local.clone();
                    Box::pin(async move {
                        if local.revoke_local(&name).await {
                            tracing::info!(credential = %name, "revoked by a replica: cached value dropped");
                        }
                    }) as futures_util::future::BoxFuture<'static, ()>
                },
                pins: pins.clone(),
                trust: verifier.trust().clone(),
                approvals: gates.redis_changes.clone(),
            },
            shutdown.clone(),
        );
    }
    let metrics = Arc::new(Metrics::with_decision_log(decision_log_counters));
    let telemetry = Telemetry::init(&cfg.telemetry, metrics.otel.clone())?;
    let spans = telemetry.as_ref().map(Telemetry::filter);
    let ops = Operations {
        metrics,
        secrets,
        pins,
        jwt_svids: jwt_svid_verifier(&jwt_bundles, &gates),
        gates,
        shadow: shadow.clone(),
    };
    let chain = build_chain(&cfg, policy.clone(), &ops, decision_log, spans)?;
    let routes = crate::http::gateway::Routes::new(&cfg.routes, &cfg.credentials)?;
    let shared = Arc::new(Shared {
        chain,
        routes,
        upstream,
        mitm,
        verifier,
        body_budget: crate::http::budget::Budget::new(cfg.limits.buffered_body_bytes),
        slots: crate::edge::slots::Slots::new(cfg.limits.max_connections),
        limits: cfg.limits.clone(),
        tasks: Tasks {
            shutdown: shutdown.clone(),
            tracker: TaskTracker::new(),
        },
        ops,
    });
    let status = Arc::new(Status::default());
    tokio::spawn(admin::serve(
        admin_listener,
        admin_token,
        status.clone(),
        shared.clone(),
        shutdown.clone(),
    ));
    // Fail closed with the Workload API: the listener is bound (the addresses are known) but
    // not served, and /readyz says not ready, until the SVID and bundles have arrived.
    let feeds = cfg.tls.workload_api().map(|endpoint| {
        tracing::info!(proxy = %proxy_addr, admin = %admin_addr, endpoint = %endpoint,
            "waiting for the X.509-SVID and bundles from the Workload API");
        if jwt_bundles.wants_api() {
            follow_jwt_bundles(&endpoint, &jwt_bundles, &shutdown);
        }
        WorkloadApiFeeds {
            svid: workload_api::watch_svid(endpoint.clone(), shutdown.clone()),
            bundles: workload_api::watch_bundles(endpoint, shutdown.clone()),
        }
    });
    let bearer_acceptor = bearer_listener.as_ref().map(|_| {
        tokio_rustls::TlsAcceptor::from(Arc::new(crate::edge::tls::bearer_server_config(
            cert.clone(),
        )))
    });
    let served = Served {
        trust,
        file_roots,
        cert,
        policy: policy.clone(),
        shadow,
        jwt_bundles,
    };
    let reloader = Reloader::new(config_path, cfg, served, status.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(reloader.run(feeds, shutdown.clone(), ready_tx));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
    let (status2, shared2) = (status.clone(), shared.clone());
    shared.tasks.tracker.spawn(async move {
        if ready_rx.await.is_err() {
            return; // shut down before the Workload API delivered
        }
        status2.ready.store(true, Ordering::Relaxed);
        let revision = policy.revision();
        if let (Some(l), Some(a), Some(addr)) = (bearer_listener, bearer_acceptor, bearer_addr) {
            tracing::info!(proxy = %proxy_addr, admin = %admin_addr, bearer = %addr,
                policy_revision = %revision, "listening");
            let shared3 = shared2.clone();
            shared2.tasks.tracker.spawn(async move {
                listener::accept_with(l, a, shared3, crate::edge::bearer::serve_conn).await;
            });
        } else {
            tracing::info!(proxy = %proxy_addr, admin = %admin_addr, policy_revision = %revision, "listening");
        }
        listener::accept_loop(listener, acceptor, shared2).await;
    });
    Ok(Running {
        proxy_addr,
        shutdown,
        shared,
        telemetry: telemetry.map(Arc::new),
    })
}

impl Running {
    /// Stop accepting, let in-flight requests finish for up to `grace`, then return.
    pub async fn drain(self, grace: std::time::Duration) {
        self.shutdown.cancel();
        self.shared.tasks.tracker.close();
        if tokio::time::timeout(grace, self.shared.tasks.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "shutdown grace period over; closing remaining connections"
            );
        }
        if let Some(t) = self.telemetry {
            // Flush queued spans; the exporter's own timeout bounds this too.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t.shutdown()).await;
        }
    }

    pub fn grace(&self) -> std::time::Duration {
        self.shared.limits.shutdown_grace
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use portcullis_filters::stages::pinning::OnChange;

    /// A config for `build_chain` alone (nothing it names is opened) and its policy.
    fn config(extra: &str) -> (tempfile::TempDir, Config, Arc<Policy>) {
        let dir = tempfile::tempdir().unwrap();
        let rego = dir.path().join("p.rego");
        std::fs::write(&rego, "package portcullis\ndecision := true\n").unwrap();
        let yaml = format!(
            "tls: {{cert: c, key: k}}\ntrust_domains: {{}}\nmitm: {{ca_cert: m, ca_key: k}}\n\
             policy: {{paths: ['{}']}}\n{extra}",
            rego.display()
        );
        let cfg: Config = serde_yaml_ng::from_str(&yaml).unwrap();
        let policy = Arc::new(Policy::new(cfg.policy.load().unwrap()));
        (dir, cfg, policy)
    }

    fn chain(
        cfg: &Config,
        policy: Arc<Policy>,
        log: Option<DecisionLog>,
    ) -> Result<Chain, StartError> {
        let secrets = Arc::new(LocalSecrets::new(&cfg.credentials, None, None).unwrap());
        let ops = Operations {
            metrics: Arc::default(),
            secrets,
            pins: Arc::new(ToolPins::new(OnChange::Log)),
            gates: Arc::new(Gates::build(cfg, None).unwrap()),
            shadow: None,
            jwt_svids: jwt_svid_verifier(
                &Arc::new(JwtBundleStore::load(cfg).unwrap()),
                &Gates::build(cfg, None).unwrap(),
            ),
        };
        build_chain(cfg, policy, &ops, log, None)
    }

    /// The order is the security argument: hygiene and inspection before anything reads the
    /// request, credentials detected before the policy sees them, substituted only after it
    /// allowed, the HTTP+SSE transport after every refusal could happen, logging last.
    #[test]
    fn the_chain_runs_its_filters_in_this_order() {
        let (_dir, cfg, policy) = config("");
        let log = DecisionLog::open("stderr", 1 << 20, Arc::default()).unwrap();
        let names: Vec<_> = chain(&cfg, policy, log).unwrap().names().collect();
        assert_eq!(
            names,
            [
                "header_hygiene",
                "mcp_inspect",
                "trace_propagation",
                "jwt_svid",
                "tool_pinning",
                "credential_detect",
                "policy",
                "quota",
                "credential_substitute",
                "mcp_sse_transport",
                "access_log",
                "metrics",
                "decision_log",
            ]
        );
    }

    #[test]
    fn a_credential_whose_placeholder_does_not_parse_is_a_config_error() {
        let (_dir, cfg, policy) = config(
            "credentials: [{name: demo, placeholder: 'not a placeholder', hosts: [localhost], \
             source: {env: DEMO_TOKEN}}]\n",
        );
        let Err(StartError::Invalid(e)) = chain(&cfg, policy, None) else {
            panic!("accepted an unparsable placeholder");
        };
        assert_eq!(e.key, "credentials[0].placeholder");
    }
}
