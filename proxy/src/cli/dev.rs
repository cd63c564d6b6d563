//! `portcullis dev`: a zero-setup local run. Creates (or reuses) a dev PKI and config in a
//! directory, starts a demo HTTPS/HTTP upstream on loopback and the proxy in front of it, and
//! prints curl commands that work through the proxy with the demo agent's SVID.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use portcullis_filters::parse::secret::SecretValue;

use crate::app;
use crate::config::Config;
use crate::http::error::full;
use crate::pki::{write_file, Authority, LeafSpec};
use crate::upstream::Body;

pub const TRUST_DOMAIN: &str = "dev.portcullis";
pub const DEMO_AGENT: &str = "spiffe://dev.portcullis/agent/demo";

/// The example policy (`policy/examples/policies/`), written to `DIR/policy/` on every start:
/// the demo identity may reach the local upstream and nothing else.
const EXAMPLE_POLICY: &[(&str, &str)] = &[
    (
        "data.yaml",
        include_str!("../../../policy/examples/policies/data.yaml"),
    ),
    (
        "portcullis/decision.rego",
        include_str!("../../../policy/examples/policies/portcullis/decision.rego"),
    ),
    (
        "portcullis/decision_test.rego",
        include_str!("../../../policy/examples/policies/portcullis/decision_test.rego"),
    ),
    (
        "portcullis/dev_test.rego",
        include_str!("../../../policy/examples/policies/portcullis/dev_test.rego"),
    ),
    (
        "portcullis/hosts.rego",
        include_str!("../../../policy/examples/policies/portcullis/hosts.rego"),
    ),
    (
        "portcullis/hosts_test.rego",
        include_str!("../../../policy/examples/policies/portcullis/hosts_test.rego"),
    ),
    (
        "portcullis/hours.rego",
        include_str!("../../../policy/examples/policies/portcullis/hours.rego"),
    ),
    (
        "portcullis/hours_test.rego",
        include_str!("../../../policy/examples/policies/portcullis/hours_test.rego"),
    ),
    (
        "portcullis/methods.rego",
        include_str!("../../../policy/examples/policies/portcullis/methods.rego"),
    ),
    (
        "portcullis/methods_test.rego",
        include_str!("../../../policy/examples/policies/portcullis/methods_test.rego"),
    ),
    (
        "portcullis/trust_domains.rego",
        include_str!("../../../policy/examples/policies/portcullis/trust_domains.rego"),
    ),
    (
        "portcullis/trust_domains_test.rego",
        include_str!("../../../policy/examples/policies/portcullis/trust_domains_test.rego"),
    ),
];

/// The files `dev` keeps in its directory.
pub struct DevFiles {
    pub dir: PathBuf,
}

impl DevFiles {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    const ALL: [&'static str; 12] = [
        "trust-ca.pem",
        "trust-ca.key",
        "server.pem",
        "server.key",
        "agent.pem",
        "agent.key",
        "mitm-ca.pem",
        "mitm-ca.key",
        "upstream-ca.pem",
        "upstream-ca.key",
        "upstream.pem",
        "upstream.key",
    ];

    /// Reuse a complete PKI; otherwise generate all of it (a partial set is never mixed).
    pub fn ensure_pki(&self) -> anyhow::Result<bool> {
        if Self::ALL.iter().all(|f| self.path(f).is_file()) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let year = Duration::from_secs(365 * 24 * 3600);
        let trust = Authority::generate(
            "Portcullis dev trust domain CA",
            Some("spiffe://dev.portcullis"),
        )?;
        trust.write(&self.path("trust-ca.pem"), &self.path("trust-ca.key"))?;
        let mut server = LeafSpec::svid("spiffe://dev.portcullis/portcullis", year);
        server.dns = vec!["localhost".into()];
        server.ips = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        trust
            .issue(&server)?
            .write(&self.path("server.pem"), &self.path("server.key"))?;
        trust
            .issue(&LeafSpec::svid(DEMO_AGENT, year))?
            .write(&self.path("agent.pem"), &self.path("agent.key"))?;
        let mitm = Authority::generate("Portcullis dev MITM CA", None)?;
        mitm.write(&self.path("mitm-ca.pem"), &self.path("mitm-ca.key"))?;
        let up = Authority::generate("Portcullis dev demo upstream CA", None)?;
        up.write(&self.path("upstream-ca.pem"), &self.path("upstream-ca.key"))?;
        up.issue(&LeafSpec::server(&["localhost", "127.0.0.1"], year))?
            .write(&self.path("upstream.pem"), &self.path("upstream.key"))?;
        Ok(true)
    }

    /// The demo credential's real value: random, kept in `demo-token` (mode 0600). Agents only
    /// ever send its placeholder `pcx_demo`.
    fn ensure_demo_secret(&self) -> anyhow::Result<Arc<SecretValue>> {
        let path = self.path("demo-token");
        if !path.is_file() {
            let bytes: [u8; 16] = rand::random();
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_file(&path, format!("demo-{token}\n").as_bytes(), true)?;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Arc::new(SecretValue::new(text.trim_end().to_owned())))
    }

    fn write_config(
        &self,
        listen: SocketAddr,
        admin: SocketAddr,
        otlp: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let mut yaml = format!(
            "# Written by `portcullis dev` on every start.\n\
             listen: {listen}\n\
             admin_listen: {admin}\n\
             tls: {{cert: server.pem, key: server.key}}\n\
             trust_domains:\n  {TRUST_DOMAIN}: {{bundle: trust-ca.pem}}\n\
             mitm: {{ca_cert: mitm-ca.pem, ca_key: mitm-ca.key}}\n\
             upstream: {{extra_roots: [upstream-ca.pem]}}\n\
             egress: {{allow: [\"127.0.0.0/8\", \"::1/128\"]}}\n\
             policy: {{paths: [policy/]}}\n\
             credentials:\n  \
               - {{name: demo, hosts: [\"localhost:*\", \"127.0.0.1:*\"], source: {{file: demo-token}}}}\n"
        );
        // Spans go to the collector when one is given, else one summary line per action.
        match otlp {
            Some(endpoint) => {
                let endpoint = serde_json::Value::from(endpoint);
                yaml.push_str(&format!("telemetry: {{otlp_endpoint: {endpoint}}}\n"));
            }
            None => yaml.push_str("telemetry: {span_summary: true}\n"),
        }
        // The example policy is written once; after that it is the user's to edit.
        let written = self.dir.join("policy").exists();
        for (name, text) in EXAMPLE_POLICY.iter().filter(|_| !written) {
            let path = self.dir.join("policy").join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_file(&path, text.as_bytes(), false)?;
        }
        let path = self.path("config.yaml");
        write_file(&path, yaml.as_bytes(), false)?;
        Ok(path)
    }
}

/// Run the dev proxy until Ctrl-C.
pub async fn run(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    otlp: Option<&str>,
) -> anyhow::Result<()> {
    let files = DevFiles {
        dir: dir.to_owned(),
    };
    let created = files.ensure_pki()?;
    let secret = files.ensure_demo_secret()?;
    let (https_port, http_port) = start_demo_upstream(&files, secret).await?;
    let config_path = files.write_config(listen, admin, otlp)?;
    let cfg = Config::load(&config_path)?;
    let running = app::start(cfg, config_path).await?;
    print_banner(&files, created, running.proxy_addr, https_port, http_port);
    crate::cli::signal::shutdown_signal().await;
    let grace = running.grace();
    running.drain(grace).await;
    Ok(())
}

#[allow(clippy::print_stdout)] // the banner is this command's output
fn print_banner(
    files: &DevFiles,
    created: bool,
    proxy: SocketAddr,
    https_port: u16,
    http_port: u16,
) {
    let d = |f: &str| files.path(f).display().to_string();
    let proxy_flags = format!(
        "--proxy https://{proxy} --proxy-cacert {} --proxy-cert {} --proxy-key {}",
        d("trust-ca.pem"),
        d("agent.pem"),
        d("agent.key")
    );
    println!(
        "Portcullis dev proxy on https://{proxy} ({} dev PKI in {})\n\
         Demo agent identity: {DEMO_AGENT}\n\
         \n\
         HTTPS through CONNECT + MITM (trust the dev MITM CA with --cacert), holding only the\n\
         placeholder pcx_demo; the upstream receives the real secret from {}:\n\
         curl {proxy_flags} --cacert {} -H 'Authorization: Bearer pcx_demo' https://localhost:{https_port}/hello\n\
         \n\
         Plain HTTP (absolute-form):\n\
         curl {proxy_flags} http://localhost:{http_port}/hello\n\
         \n\
         Denied by the example policy (127.0.0.2 is not in the demo agent's allow-list): 403\n\
         curl {proxy_flags} http://127.0.0.2:{http_port}/hello\n\
         \n\
         Policy: {}/policy/ (yours to edit: changes apply live). Decisions are logged below as JSON.\n\
         \n\
         Ctrl-C to stop.",
        if created { "created" } else { "reusing" },
        files.dir.display(),
        d("demo-token"),
        d("mitm-ca.pem"),
        files.dir.display(),
    );
}

/// The demo upstream: answers every request with a small JSON document describing it.
async fn start_demo_upstream(
    files: &DevFiles,
    secret: Arc<SecretValue>,
) -> anyhow::Result<(u16, u16)> {
    let ck = crate::certs::certified_key(&files.path("upstream.pem"), &files.path("upstream.key"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::certs::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let https = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let ports = (https.local_addr()?.port(), http.local_addr()?.port());
    let secret2 = secret.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = https.accept().await {
            let (acceptor, secret) = (acceptor.clone(), secret.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve_demo(TokioIo::new(tls), secret).await;
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((tcp, _)) = http.accept().await {
            tokio::spawn(serve_demo(TokioIo::new(tcp), secret2.clone()));
        }
    });
    Ok(ports)
}

async fn serve_demo<I>(io: I, secret: Arc<SecretValue>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = demo_response(&req, &secret);
        async move { Ok::<_, Infallible>(resp) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(io, svc)
        .await;
}

/// Says whether the real demo secret arrived, without ever showing it.
fn demo_response(req: &Request<Incoming>, secret: &SecretValue) -> Response<Body> {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let credential = match auth {
        Some(a) if a == format!("Bearer {}", secret.expose()) => {
            "the real demo secret arrived (the agent only sent pcx_demo)"
        }
        Some(a) if a.contains("pcx_") => "a placeholder arrived: it was NOT substituted",
        Some(_) => "an Authorization header that is not the demo secret arrived",
        None => "no Authorization header (send one with pcx_demo to see substitution)",
    };
    let body = serde_json::json!({
        "message": "hello from the Portcullis demo upstream",
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "version": format!("{:?}", req.version()),
        "credential": credential,
    });
    let mut resp = Response::new(full(format!("{body}\n")));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
