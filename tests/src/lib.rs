//! End-to-end test scaffolding: a PKI generated at test time with the project's own `pki`
//! module, a real TLS upstream that records what reaches it, the real `portcullis` binary as a
//! child process (JSON logs captured), real curl, and a raw mTLS client for malformed input.
// This crate only exists to test; failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod workload_api;
pub use workload_api::WorkloadApiServer;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::pki::{Authority, LeafSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything that should happen "soon"; loops never run longer.
pub const WAIT: Duration = Duration::from_secs(30);
/// Bound on a peer process becoming ready.
pub const PEER_START: Duration = Duration::from_secs(90);

/// The `portcullis` binary, built once if the workspace build has not produced it yet.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("PORTCULLIS_BIN") {
            return PathBuf::from(p);
        }
        // target/debug/deps/<test-binary> -> target/debug/portcullis
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap();
        let path = dir.join("portcullis");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "portcullis", "--bin", "portcullis"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building the portcullis binary failed");
        assert!(path.is_file(), "no binary at {}", path.display());
        path
    })
    .clone()
}

/// A policy that allows every action.
pub const ALLOW_ALL: &str = "package portcullis\n\ndecision := true\n";

/// A client identity on disk.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The test PKI: two trust domains, the proxy's server SVID, the MITM CA, an upstream CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub acme: Authority,
    pub other: Authority,
    pub upstream_ca: Authority,
    pub upstream_tls: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f);
        let acme = Authority::generate("acme.test CA", Some("spiffe://acme.test")).unwrap();
        acme.write(&p("acme-ca.pem"), &p("acme-ca.key")).unwrap();
        let other = Authority::generate("other.test CA", Some("spiffe://other.test")).unwrap();
        other.write(&p("other-ca.pem"), &p("other-ca.key")).unwrap();
        let mut server = LeafSpec::svid("spiffe://acme.test/portcullis", Duration::from_secs(3600));
        server.dns = vec!["localhost".into()];
        server.ips = vec![[127, 0, 0, 1].into()];
        acme.issue(&server)
            .unwrap()
            .write(&p("server.pem"), &p("server.key"))
            .unwrap();
        let mitm = Authority::generate("test MITM CA", None).unwrap();
        mitm.write(&p("mitm-ca.pem"), &p("mitm-ca.key")).unwrap();
        let upstream_ca = Authority::generate("test upstream CA", None).unwrap();
        upstream_ca
            .write(&p("upstream-ca.pem"), &p("upstream-ca.key"))
            .unwrap();
        let upstream_tls = server_tls(&upstream_ca, &["localhost", "127.0.0.1", "127.0.0.2"]);
        // The network tests run on an allow-all policy; policy tests replace it.
        std::fs::create_dir(p("policy")).unwrap();
        std::fs::write(p("policy/allow.rego"), ALLOW_ALL).unwrap();
        Pki {
            dir,
            acme,
            other,
            upstream_ca,
            upstream_tls,
        }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// Issue a client certificate from `spec` with `ca`, written as `name.pem`/`name.key`.
    pub fn client_with(&self, name: &str, ca: &Authority, spec: &LeafSpec) -> ClientCert {
        let c = ClientCert {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        };
        ca.issue(spec).unwrap().write(&c.cert, &c.key).unwrap();
        c
    }

    /// A valid SVID for `spiffe_id` from the acme.test CA.
    pub fn client(&self, name: &str, spiffe_id: &str) -> ClientCert {
        self.client_with(
            name,
            &self.acme,
            &LeafSpec::svid(spiffe_id, Duration::from_secs(3600)),
        )
    }

    /// The config every test starts from, as JSON (which is YAML), paths relative to the dir.
    pub fn base_config(&self) -> Value {
        json!({
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "reload_interval": "100ms",
            "tls": {"cert": "server.pem", "key": "server.key"},
            "trust_domains": {
                "acme.test": {"bundle": "acme-ca.pem"},
                "other.test": {"bundle": "other-ca.pem"},
            },
            "mitm": {"ca_cert": "mitm-ca.pem", "ca_key": "mitm-ca.key"},
            "upstream": {"extra_roots": ["upstream-ca.pem"]},
            "egress": {"allow": ["127.0.0.1/32"]},
            "policy": {"paths": ["policy"]},
        })
    }

    pub fn write_config(&self, cfg: &Value) -> PathBuf {
        let path = self.path("config.yaml");
        portcullis::pki::write_file(&path, cfg.to_string().as_bytes(), false).unwrap();
        path
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A TLS server config for `names`, signed by `ca`.
pub fn server_tls(ca: &Authority, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let issued = ca
        .issue(&LeafSpec::server(names, Duration::from_secs(3600)))
        .unwrap();
    let cert = rustls_pki_types::CertificateDer::from(issued.cert_der.clone());
    let key = rustls_pki_types::pem::PemObject::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The HTTP version the request arrived with.
    pub version: String,
    pub path: String,
    pub headers: http::HeaderMap,
}

/// Requests the upstream saw, and a counter tests can wait on.
pub struct Recorder {
    seen: Mutex<Vec<Seen>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl Recorder {
    fn record(&self, s: Seen) {
        let mut seen = self.seen.lock().unwrap();
        seen.push(s);
        self.count.send_replace(seen.len());
    }
}

/// A real HTTP(S) server on loopback that records requests. `/slow` waits until `release()`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    recorder: Arc<Recorder>,
    gate: Arc<tokio::sync::Semaphore>,
    slow_arrived: Arc<tokio::sync::Notify>,
}

impl Upstream {
    /// TLS when `tls` is given, plain HTTP otherwise; binds `ip:0`.
    pub async fn start(ip: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let u = Upstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            recorder: Arc::new(Recorder {
                seen: Mutex::default(),
                count: tokio::sync::watch::channel(0).0,
            }),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            slow_arrived: Arc::default(),
        };
        let (conns, seen, gate, arrived) = (
            u.connections.clone(),
            u.recorder.clone(),
            u.gate.clone(),
            u.slow_arrived.clone(),
        );
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (seen, gate, arrived, acceptor) = (
                    seen.clone(),
                    gate.clone(),
                    arrived.clone(),
                    acceptor.clone(),
                );
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, gate, arrived) = (seen.clone(), gate.clone(), arrived.clone());
                        async move { Ok::<_, Infallible>(respond(req, &seen, &gate, &arrived).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        u
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.recorder.seen.lock().unwrap().clone()
    }

    /// Wait until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.recorder.count.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .expect("requests did not arrive")
            .unwrap();
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Wait until a `/slow` request has arrived.
    pub async fn slow_arrived(&self) {
        tokio::time::timeout(WAIT, self.slow_arrived.notified())
            .await
            .expect("no /slow request arrived");
    }

    /// Let one waiting `/slow` request answer.
    pub fn release(&self) {
        self.gate.add_permits(1);
    }
}

async fn respond(
    req: Request<Incoming>,
    seen: &Recorder,
    gate: &tokio::sync::Semaphore,
    arrived: &tokio::sync::Notify,
) -> Response<Full<Bytes>> {
    seen.record(Seen {
        method: req.method().to_string(),
        version: format!("{:?}", req.version()),
        path: req.uri().path().to_owned(),
        headers: req.headers().clone(),
    });
    if req.uri().path() == "/echo" {
        // Echo what arrived (headers, query, body), in the body and in a header: lets tests
        // check substitution upstream and redaction on the way back.
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
            .collect();
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        let echo = json!({"headers": headers, "query": query, "body": body}).to_string();
        return Response::builder()
            .header("content-type", "application/json")
            .header("x-echo-authorization", auth)
            .body(Full::new(Bytes::from(echo)))
            .unwrap();
    }
    if req.uri().path().starts_with("/first-auth-fails") {
        // An upstream that rejects the first credential it sees on a path (say, revoked at
        // the provider) and accepts the next request.
        let path = req.uri().path().to_owned();
        let earlier = seen
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count();
        if earlier == 1 {
            // Read the request first, as an API server checking a token usually does: this
            // peer tests the 401 handling, not an answer that races the upload.
            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
            return Response::builder()
                .status(401)
                .header("www-authenticate", "Bearer error=\"invalid_token\"")
                .body(Full::new(Bytes::from_static(
                    b"{\"error\":\"invalid_token\"}",
                )))
                .unwrap();
        }
    }
    if req.uri().path() == "/slow" {
        arrived.notify_one();
        let _ = gate.acquire().await.map(|p| p.forget());
    }
    let body = json!({"upstream": "test", "path": req.uri().path()}).to_string();
    Response::builder()
        .header("content-type", "application/json")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "must-not-reach-client")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Captured log lines of a child process.
#[derive(Default)]
pub struct Logs {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Logs {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// JSON log events (lines that parse as JSON objects).
    pub fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Block until a line satisfies `pred`, up to [`WAIT`].
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_within(what, WAIT, pred)
    }

    /// Block until a line satisfies `pred`, up to `limit`.
    pub fn wait_for_within(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; log:\n{}",
                lines.join("\n")
            );
            lines = self.changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Wait until at least `n` lines exist or `deadline` passes.
    pub fn wait_for_len(&self, n: usize, deadline: Instant) {
        let mut lines = self.lines.lock().unwrap();
        while lines.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            lines = self.changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }
}

/// A loopback address nobody listens on right now (the probe socket is closed on return): for
/// peers that take a port argument, and for "the service is down" cases.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Start a peer process whose stdout says `READY` once it listens; returns it with its
/// captured stdout.
pub fn spawn_ready(cmd: &mut Command, what: &str) -> (Child, Arc<Logs>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Arc::new(Logs::default());
    capture(child.stdout.take().unwrap(), out.clone());
    // Interpreted peers (Python importing the MCP SDK, node) start slowly when a dozen start
    // at once on two cores: a longer bound than for log lines.
    out.wait_for_within(what, PEER_START, |l| l == "READY");
    (child, out)
}

/// Spawn a thread that copies `r` line by line into `logs`.
pub fn capture(r: impl std::io::Read + Send + 'static, logs: Arc<Logs>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            match line {
                Ok(l) => logs.push(l),
                Err(_) => return,
            }
        }
    });
}

/// The real binary running `serve --config` with JSON logs.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// stderr: logs, including the access log (JSON).
    pub logs: Arc<Logs>,
    /// stdout: the decision log (JSON lines).
    pub decisions: Arc<Logs>,
}

impl Proxy {
    pub fn start(config: &Path) -> Proxy {
        Proxy::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Proxy {
        Proxy::start_until(config, env, "listening")
    }

    /// Start and wait for the log line whose message is `message` and which carries the
    /// bound `proxy` and `admin` addresses (`listening`, or the Workload API's `waiting ...`).
    pub fn start_until(config: &Path, env: &[(&str, &str)], message: &str) -> Proxy {
        let mut child = Command::new(bin())
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("PORTCULLIS_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Logs::default());
        capture(child.stderr.take().unwrap(), logs.clone());
        let decisions = Arc::new(Logs::default());
        capture(child.stdout.take().unwrap(), decisions.clone());
        let quoted = format!("\"{message}\"");
        let line = logs.wait_for(message, |l| l.contains(&quoted) || l.contains("ERROR"));
        let ev: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ev["message"], message, "proxy failed to start: {line}");
        let addr = ev["proxy"].as_str().unwrap().parse().unwrap();
        let admin = ev["admin"].as_str().unwrap().parse().unwrap();
        Proxy {
            child,
            addr,
            admin,
            logs,
            decisions,
        }
    }

    /// Access log events (target `portcullis::access`).
    pub fn access_log(&self) -> Vec<Value> {
        self.logs
            .events()
            .into_iter()
            .filter(|e| e["target"] == "portcullis::access")
            .collect()
    }

    /// Wait until `n` access events match `pred` (the logging phase runs when a response body
    /// ends, which can be just after the client has read it). Returns the matching events.
    pub fn wait_access(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found: Vec<Value> = self.access_log().into_iter().filter(|e| pred(e)).collect();
            if found.len() >= n {
                assert_eq!(
                    found.len(),
                    n,
                    "more access events than expected: {found:?}"
                );
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} access events, have {found:?}"
            );
            let len = self.logs.lines().len();
            self.logs.wait_for_len(len + 1, deadline);
        }
    }

    /// GET an admin endpoint: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        self.admin_request("GET", path).await
    }

    /// Any method on an admin endpoint: (status, body).
    pub async fn admin_request(&self, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    /// A Prometheus counter from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
    }

    /// Wait until metric `name` satisfies `pred` (polling `/metrics`); returns its value.
    pub async fn wait_metric(&self, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(name).await;
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} stayed at {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for the process to exit by itself (bounded).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary running `dev` in a temporary directory, its stdout (banner, decision log)
/// and stderr (logs) captured; killed on drop.
pub struct DevProxy {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub stdout: Arc<Logs>,
    pub stderr: Arc<Logs>,
}

impl DevProxy {
    /// `dev` on free loopback ports with `args` added; returns once the banner is printed.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> DevProxy {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin())
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .arg("--dir")
            .arg(dir.path().join("dev"))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdout, stderr) = (Arc::new(Logs::default()), Arc::new(Logs::default()));
        capture(child.stdout.take().unwrap(), stdout.clone());
        capture(child.stderr.take().unwrap(), stderr.clone());
        stdout.wait_for("the banner", |l| l.contains("Ctrl-C"));
        DevProxy {
            child,
            dir,
            stdout,
            stderr,
        }
    }

    /// The curl commands the banner printed, in order.
    pub fn curls(&self) -> Vec<String> {
        self.stdout
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("curl "))
            .collect()
    }

    /// Run a printed curl command as a user pasting it into a shell would (plus `-sS`); it must
    /// succeed. Returns its stdout.
    pub async fn run(line: &str) -> String {
        let line = format!("{line} -sS");
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for DevProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary running `connect` (the local connector) with JSON logs on stderr.
pub struct Connector {
    pub child: Child,
    /// Where agents connect: `HTTPS_PROXY=http://{addr}`.
    pub addr: SocketAddr,
    pub logs: Arc<Logs>,
}

impl Connector {
    /// `portcullis connect ARGS --listen 127.0.0.1:0`, started without waiting.
    pub fn spawn(args: &[&str]) -> (Child, Arc<Logs>) {
        let mut child = Command::new(bin())
            .args(["--log-format", "json", "connect", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("PORTCULLIS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Logs::default());
        capture(child.stderr.take().unwrap(), logs.clone());
        (child, logs)
    }

    /// Start it and wait until it accepts connections.
    pub fn start(args: &[&str]) -> Connector {
        let (child, logs) = Connector::spawn(args);
        Connector::ready(child, logs)
    }

    /// Wait for the "connector listening" line of a spawned connector.
    pub fn ready(child: Child, logs: Arc<Logs>) -> Connector {
        let line = logs.wait_for("the connector listening line", |l| {
            l.contains("connector listening") || l.contains("\"ERROR\"")
        });
        let ev: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            ev["message"], "connector listening",
            "connector failed: {line}"
        );
        let addr = ev["listen"].as_str().unwrap().parse().unwrap();
        Connector { child, addr, logs }
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment an agent runtime gets: only the proxy variables (and the MITM CA).
    pub fn env(&self, pki: &Pki) -> Vec<(String, String)> {
        let mitm = pki.path("mitm-ca.pem").display().to_string();
        [
            ("HTTPS_PROXY", self.proxy_url()),
            ("https_proxy", self.proxy_url()),
            ("HTTP_PROXY", self.proxy_url()),
            ("http_proxy", self.proxy_url()),
            ("SSL_CERT_FILE", mitm.clone()),
            ("REQUESTS_CA_BUNDLE", mitm),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// curl with nothing but the proxy environment variables (plus `--cacert` for the MITM CA).
    pub async fn curl(&self, pki: &Pki, args: &[&str]) -> CurlOut {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-", "--cacert"])
            .arg(pki.path("mitm-ca.pem"))
            .args(args);
        clear_proxy_env(cmd.as_std_mut());
        cmd.env("HTTPS_PROXY", self.proxy_url())
            .env("http_proxy", self.proxy_url());
        run_curl(cmd).await
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Remove every proxy-related variable the test process may have inherited.
pub fn clear_proxy_env(cmd: &mut Command) {
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    ] {
        cmd.env_remove(v);
    }
}

/// The result of one curl run.
#[derive(Debug)]
pub struct CurlOut {
    pub success: bool,
    pub code: Option<i32>,
    pub status: u16,
    pub headers: String,
    pub body: String,
    pub stderr: String,
}

impl CurlOut {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    }
}

/// curl through `proxy` as `client` (no client cert when `None`), trusting the test CAs.
pub async fn curl(
    pki: &Pki,
    proxy: SocketAddr,
    client: Option<&ClientCert>,
    args: &[&str],
) -> CurlOut {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-"])
        .arg("--proxy")
        .arg(format!("https://{proxy}"))
        .arg("--proxy-cacert")
        .arg(pki.path("acme-ca.pem"))
        .arg("--cacert")
        .arg(pki.path("mitm-ca.pem"));
    if let Some(c) = client {
        cmd.arg("--proxy-cert")
            .arg(&c.cert)
            .arg("--proxy-key")
            .arg(&c.key);
    }
    cmd.args(args);
    run_curl(cmd).await
}

pub async fn run_curl(mut cmd: tokio::process::Command) -> CurlOut {
    let out = cmd.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // With -D - the (last) header block precedes the body; skip CONNECT's "200" block.
    let mut rest = text.as_str();
    let mut headers = String::new();
    while rest.starts_with("HTTP/") {
        let (h, b) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        headers = h.to_owned();
        rest = b;
    }
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    CurlOut {
        success: out.status.success(),
        code: out.status.code(),
        status,
        headers,
        body: rest.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A TLS connection to the proxy as `client`, for sending hand-written (malformed) requests.
pub async fn raw_tls(
    pki: &Pki,
    proxy: SocketAddr,
    client: &ClientCert,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("acme-ca.pem")).unwrap();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = portcullis::tls::load_certs(&client.cert).unwrap();
    let key = portcullis::tls::load_key(&client.key).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Send raw bytes on a fresh mTLS connection and read the response head and body (until close
/// or `Content-Length`).
pub async fn raw_request(
    pki: &Pki,
    proxy: SocketAddr,
    client: &ClientCert,
    request: &str,
) -> RawResponse {
    let mut s = raw_tls(pki, proxy, client).await;
    s.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut s).await
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                });
                if len.is_some_and(|n| body.len() >= n)
                    || (len.is_none() && head.starts_with("HTTP/1.1 200"))
                {
                    break;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("response timed out");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    RawResponse {
        status: head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The Python interpreter with the test requirements installed (`.ci/run` creates it).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("PORTCULLIS_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python venv at {}: run `bash .ci/run` (it creates it) or set PORTCULLIS_PYTHON",
        venv.display()
    );
    venv
}

/// A script in tests/python/.
pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// What an in-process collector received.
#[derive(Default)]
struct Received {
    spans: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
    /// The resource of every `ResourceSpans` received.
    resources: Vec<opentelemetry_proto::tonic::resource::v1::Resource>,
    /// The request headers of every export call.
    headers: Vec<http::HeaderMap>,
    /// Refuse exports (HTTP 503, gRPC `UNAVAILABLE`) and keep nothing.
    refuse: bool,
}

type Receiving = (Arc<Mutex<Received>>, tokio::sync::watch::Sender<usize>);

fn receive(
    into: &Receiving,
    headers: http::HeaderMap,
    export: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) {
    let mut r = into.0.lock().unwrap();
    r.headers.push(headers);
    for rs in export.resource_spans {
        r.resources.extend(rs.resource);
        for ss in rs.scope_spans {
            r.spans.extend(ss.spans);
        }
    }
    into.1.send_replace(r.spans.len());
}

/// An in-process OTLP collector (no collector binary can be installed here): OTLP/HTTP
/// (`POST /v1/traces`, protobuf `ExportTraceServiceRequest`) or OTLP/gRPC (tonic's generated
/// `TraceService` server over HTTP/2), plain or over TLS. It keeps every span, resource and
/// the export calls' headers.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    received: Receiving,
    tls: bool,
}

impl OtlpReceiver {
    /// OTLP/HTTP, plain.
    pub async fn start() -> OtlpReceiver {
        Self::serve(false, None).await
    }

    /// OTLP/gRPC, plain (HTTP/2 with prior knowledge).
    pub async fn start_grpc() -> OtlpReceiver {
        Self::serve(true, None).await
    }

    /// OTLP/gRPC or OTLP/HTTP over TLS with `tls` (a certificate for `localhost`).
    pub async fn start_tls(grpc: bool, tls: Arc<rustls::ServerConfig>) -> OtlpReceiver {
        Self::serve(grpc, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn serve(grpc: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = OtlpReceiver {
            addr: listener.local_addr().unwrap(),
            received: (Arc::default(), tokio::sync::watch::channel(0).0),
            tls: tls.is_some(),
        };
        let into = r.received.clone();
        let grpc_svc = TraceServiceServer::new(GrpcSink { into: into.clone() });
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, into, grpc_svc) = (tls.clone(), into.clone(), grpc_svc.clone());
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let http_svc = hyper::service::service_fn(move |req| {
                        let into = into.clone();
                        async move { Ok::<_, Infallible>(otlp_http(&into, req).await) }
                    });
                    let grpc_svc = hyper_util::service::TowerToHyperService::new(grpc_svc);
                    match (tls, grpc) {
                        (None, false) => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), http_svc).await;
                        }
                        (None, true) => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), grpc_svc).await;
                        }
                        (Some(tls), grpc) => {
                            let Ok(io) = tls.accept(tcp).await else {
                                return;
                            };
                            let io = TokioIo::new(io);
                            let _ = if grpc {
                                builder.serve_connection(io, grpc_svc).await
                            } else {
                                builder.serve_connection(io, http_svc).await
                            };
                        }
                    }
                });
            }
        });
        r
    }

    /// `http://127.0.0.1:port`, or `https://localhost:port` over TLS.
    pub fn endpoint(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Wait until a span satisfies `pred`; returns it.
    pub async fn wait_span(
        &self,
        what: &str,
        pred: impl Fn(&opentelemetry_proto::tonic::trace::v1::Span) -> bool,
    ) -> opentelemetry_proto::tonic::trace::v1::Span {
        let mut rx = self.received.1.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(s) = self.spans().into_iter().find(|s| pred(s)) {
                    return s;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no span {what}; have {:?}",
                self.spans()
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>()
            )
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.received.0.lock().unwrap().spans.clone()
    }

    /// Every resource received so far (one per `ResourceSpans`).
    pub fn resources(&self) -> Vec<opentelemetry_proto::tonic::resource::v1::Resource> {
        self.received.0.lock().unwrap().resources.clone()
    }

    /// The headers of every export call so far.
    pub fn headers(&self) -> Vec<http::HeaderMap> {
        self.received.0.lock().unwrap().headers.clone()
    }

    /// Refuse (or accept again) every export: HTTP 503 or gRPC status `UNAVAILABLE`.
    pub fn set_refusing(&self, refuse: bool) {
        self.received.0.lock().unwrap().refuse = refuse;
    }

    /// Everything received, as text (for leak checks).
    pub fn dump(&self) -> String {
        let r = self.received.0.lock().unwrap();
        format!("{:?} {:?}", r.resources, r.spans)
    }
}

/// The OTLP/HTTP side: protobuf in, an empty `ExportTraceServiceResponse` out; 400 for a body
/// that does not decode or a wrong path.
async fn otlp_http(into: &Receiving, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use prost::Message;
    let ok = req.uri().path() == "/v1/traces"
        && req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-protobuf");
    let (parts, body) = req.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let refuse = into.0.lock().unwrap().refuse;
    let status = match ExportTraceServiceRequest::decode(body) {
        _ if refuse => 503,
        Ok(export) if ok => {
            receive(into, parts.headers, export);
            200
        }
        _ => 400,
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        )))
        .unwrap()
}

struct GrpcSink {
    into: Receiving,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcSink
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        if self.into.0.lock().unwrap().refuse {
            return Err(tonic::Status::unavailable("refusing exports"));
        }
        let headers = req.metadata().clone().into_headers();
        receive(&self.into, headers, req.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A span attribute's string (or integer, as text) value.
pub fn span_attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            V::IntValue(i) => Some(i.to_string()),
            V::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}

/// An in-process server implementing the documented Vault HTTP API subset Portcullis uses
/// (no Vault binary can be installed here): KV v2 reads (`GET /v1/{mount}/data/{path}`, with
/// `X-Vault-Token`, answering `{"data":{"data":{...},"metadata":{...}}}`, 403 on a bad token,
/// 404 on an unknown path) and AppRole login (`POST /v1/auth/approle/login`).
pub struct VaultServer {
    pub addr: SocketAddr,
    pub reads: Arc<AtomicUsize>,
    pub logins: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub const VAULT_ROOT_TOKEN: &str = "hvs.root-token-for-tests";
pub const VAULT_APPROLE_TOKEN: &str = "hvs.approle-token-for-tests";

impl VaultServer {
    /// `secrets`: (path under the `secret` mount, field, value).
    pub async fn start(secrets: Vec<(&'static str, &'static str, &'static str)>) -> VaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reads, logins) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r2, l2) = (reads.clone(), logins.clone());
        let secrets = Arc::new(secrets);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (reads, logins, secrets) = (r2.clone(), l2.clone(), secrets.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (reads, logins, secrets) =
                            (reads.clone(), logins.clone(), secrets.clone());
                        async move {
                            Ok::<_, Infallible>(vault_respond(req, &reads, &logins, &secrets).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        VaultServer {
            addr,
            reads,
            logins,
            task,
        }
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop answering: the listener closes, so new connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

async fn vault_respond(
    req: Request<Incoming>,
    reads: &AtomicUsize,
    logins: &AtomicUsize,
    secrets: &[(&str, &str, &str)],
) -> Response<Full<Bytes>> {
    let reply = |status: u16, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let path = req.uri().path().to_owned();
    let token = req
        .headers()
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if req.method() == http::Method::POST && path == "/v1/auth/approle/login" {
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["role_id"] == "role-1" && v["secret_id"] == "secret-1" {
            logins.fetch_add(1, Ordering::SeqCst);
            return reply(
                200,
                json!({"auth": {"client_token": VAULT_APPROLE_TOKEN, "lease_duration": 3600, "renewable": true}}),
            );
        }
        return reply(400, json!({"errors": ["invalid role or secret ID"]}));
    }
    let Some(secret_path) = path.strip_prefix("/v1/secret/data/") else {
        return reply(404, json!({"errors": []}));
    };
    if token != VAULT_ROOT_TOKEN && token != VAULT_APPROLE_TOKEN {
        return reply(403, json!({"errors": ["permission denied"]}));
    }
    reads.fetch_add(1, Ordering::SeqCst);
    let data: serde_json::Map<String, Value> = secrets
        .iter()
        .filter(|(p, _, _)| *p == secret_path)
        .map(|(_, f, v)| ((*f).to_owned(), json!(v)))
        .collect();
    if data.is_empty() {
        return reply(404, json!({"errors": []}));
    }
    reply(
        200,
        json!({"data": {"data": data, "metadata": {"version": 1}}, "lease_duration": 0}),
    )
}

/// oauth2-mock-server (npm), a real third-party OAuth 2.0 server, run with node. Each token it
/// issues is logged as a JSON line (`{"event":"token",...}`) on its stdout.
pub struct OAuthServer {
    child: Child,
    pub port: u16,
    pub out: Arc<Logs>,
}

impl OAuthServer {
    pub fn start(token_ttl_secs: u64) -> OAuthServer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
        assert!(
            dir.join("node_modules/oauth2-mock-server").is_dir(),
            "run `bash .ci/run` (or `npm ci --prefix tests/node`) to install oauth2-mock-server"
        );
        let port = free_addr().port();
        let (child, out) = spawn_ready(
            Command::new("node")
                .arg(dir.join("oauth_server.mjs"))
                .args([port.to_string(), token_ttl_secs.to_string()]),
            "the OAuth server",
        );
        OAuthServer { child, port, out }
    }

    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Token responses so far, once there are at least `n` (bounded wait: the log line is
    /// written before the response, but our reader thread may not have read it yet).
    pub fn tokens_after(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let tokens = self.tokens();
            let seen = self.out.lines().len();
            if tokens.len() >= n || Instant::now() >= deadline {
                return tokens;
            }
            self.out.wait_for_len(seen + 1, deadline);
        }
    }

    /// Token responses so far.
    pub fn tokens(&self) -> Vec<Value> {
        self.out
            .events()
            .into_iter()
            .filter(|e| e["event"] == "token")
            .collect()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Replace a file the proxy watches atomically (temp file + rename), as an operator's
/// deployment tool would: the proxy never sees it half-written.
pub fn replace_file(path: &Path, content: &str) {
    portcullis::pki::write_file(path, content.as_bytes(), false).unwrap();
}

/// A real `redis-server` on a free loopback port, no persistence; stopped on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_addr().port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "notice"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (installed by .ci/run)");
        let out = Arc::new(Logs::default());
        capture(child.stdout.take().unwrap(), out.clone());
        out.wait_for("redis-server", |l| {
            l.contains("Ready to accept connections")
        });
        RedisServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this server; stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-raw"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The official MCP Python SDK's server (tests/python/mcp_server.py) over TLS on loopback,
/// recording every JSON-RPC message it receives.
pub struct McpSdkServer {
    child: Child,
    pub port: u16,
    record: PathBuf,
}

impl McpSdkServer {
    pub fn start(pki: &Pki) -> McpSdkServer {
        let port = free_addr().port();
        let (cert, key) = (
            pki.path("mcp-sdk-server.pem"),
            pki.path("mcp-sdk-server.key"),
        );
        pki.upstream_ca
            .issue(&LeafSpec::server(
                &["localhost", "127.0.0.1"],
                Duration::from_secs(3600),
            ))
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        let record = pki.path(&format!("mcp-sdk-record-{port}.jsonl"));
        let (child, _) = spawn_ready(
            Command::new(python())
                .arg(python_script("mcp_server.py"))
                .args(["--port", &port.to_string(), "--cert"])
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .arg("--record")
                .arg(&record),
            "the MCP server",
        );
        McpSdkServer {
            child,
            port,
            record,
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}/mcp", self.port)
    }

    /// JSON-RPC messages the server received, in order.
    pub fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for McpSdkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the official SDK client (tests/python/mcp_client.py) through `proxy` as `client`; one
/// JSON value per op.
pub async fn mcp_sdk_client(
    pki: &Pki,
    proxy: SocketAddr,
    client: &ClientCert,
    url: &str,
    ops: Value,
) -> Vec<Value> {
    // A server on the older HTTP+SSE transport is reached at /sse.
    let transport = if url.ends_with("/sse") {
        "sse"
    } else {
        "streamable-http"
    };
    let out = tokio::process::Command::new(python())
        .arg(python_script("mcp_client.py"))
        .args(["--url", url, "--transport", transport])
        .args(["--proxy", &format!("https://{proxy}")])
        .arg("--proxy-ca")
        .arg(pki.path("acme-ca.pem"))
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .arg("--ca")
        .arg(pki.path("mitm-ca.pem"))
        .args(["--ops", &ops.to_string()])
        .output()
        .await
        .unwrap();
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "MCP client failed: {results:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    results
}
