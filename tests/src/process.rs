//! The processes a test runs: the `portcullis` binary (serve, dev, connect) with its JSON
//! logs captured, peers started until they say they are ready, and their bounded waits.

use super::*;

/// The `portcullis` binary, built once if the workspace build has not produced it yet.
/// `portcullis check` on `cfg` (written into `pki`'s directory), which must refuse it as a
/// config error (exit 2): its stderr, naming the bad key.
#[track_caller]
pub fn check_refuses(pki: &crate::Pki, cfg: &serde_json::Value) -> String {
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(pki.write_config(cfg))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

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

    /// Block until `n` lines satisfy `pred`, up to [`WAIT`]; those lines.
    pub fn wait_count(&self, what: &str, n: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut lines = self.lines.lock().unwrap();
        loop {
            let found: Vec<String> = lines.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {n} x {what}; log:\n{}",
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
        Proxy::start_as(Command::new(bin()), config, env, message)
    }

    /// Started by `sh -c "PRELUDE; exec portcullis ..."`, e.g. with `ulimit -f 8` (a file
    /// size limit standing in for a full disk).
    pub fn start_after_shell(config: &Path, env: &[(&str, &str)], prelude: &str) -> Proxy {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("{prelude} && exec \"$0\" \"$@\""))
            .arg(bin());
        Proxy::start_as(sh, config, env, "listening")
    }

    fn start_as(mut cmd: Command, config: &Path, env: &[(&str, &str)], message: &str) -> Proxy {
        let mut child = cmd
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
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_exit(&mut self.child, "the proxy").await
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
            // The connector's own debug lines say when its connection limit holds.
            .env("PORTCULLIS_LOG", "info,portcullis::connector=debug")
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

/// Replace a file the proxy watches atomically (temp file + rename), as an operator's
/// deployment tool would: the proxy never sees it half-written.
pub fn replace_file(path: &Path, content: &str) {
    portcullis::pki::write_file(path, content.as_bytes(), false).unwrap();
}

/// Wait, bounded by [`WAIT`], for a child process to exit by itself.
pub async fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
