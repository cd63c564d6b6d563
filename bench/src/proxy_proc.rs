//! The proxy under test as a child process: `portcullis --log-format json serve --config FILE`.
//! Its stderr is drained for the whole run (a full pipe would stall the proxy) and the last
//! lines are kept for error messages. Dropping the handle kills and reaps the child.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

/// The glibc tuning the container image runs the proxy with (the Dockerfile's `ENV
/// GLIBC_TUNABLES`): no `rep movsb` for copies under 1 MiB. glibc before 2.39 (Debian 12 has
/// 2.36) copies anything over ~2 KiB with `rep movsb`, which on AMD Zen 3/4 is several times
/// slower than vector copies for some source/destination alignments (glibc bug 30994; 2.39
/// stopped using it there). rustls copies every record it seals, so on an EPYC host this was
/// a quarter of the proxy's CPU in `large`.
pub const IMAGE_GLIBC_TUNABLES: &str = "glibc.cpu.x86_rep_movsb_threshold=1048576";

/// `GLIBC_TUNABLES` of every proxy the bench starts (Portcullis and its peers alike): the
/// image's, unless the bench itself runs with one (then that, inherited).
pub fn glibc_tunables() -> String {
    std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| IMAGE_GLIBC_TUNABLES.to_owned())
}

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const KEEP_LINES: usize = 40;

pub struct ProxyProcess {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// `--proxy-bin`, or `portcullis` beside the bench executable.
pub fn resolve_bin(flag: Option<&Path>) -> Result<PathBuf> {
    let path = match flag {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("locating the bench executable")?
            .with_file_name("portcullis"),
    };
    if !path.is_file() {
        bail!(
            "proxy binary {} not found: build it (cargo build --release -p portcullis) or pass --proxy-bin PATH",
            path.display()
        );
    }
    Ok(path)
}

impl ProxyProcess {
    /// Start the proxy and wait for its JSON `listening` line. `log_filter` becomes
    /// `PORTCULLIS_LOG`.
    pub fn start(bin: &Path, config: &Path, log_filter: &str) -> Result<ProxyProcess> {
        ProxyProcess::start_with_env(bin, config, log_filter, &[])
    }

    /// As [`ProxyProcess::start`], with extra environment variables (secrets the config
    /// references as `env:NAME`).
    pub fn start_with_env(
        bin: &Path,
        config: &Path,
        log_filter: &str,
        env: &[(&str, &str)],
    ) -> Result<ProxyProcess> {
        let mut child = Command::new(bin)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("PORTCULLIS_LOG", log_filter)
            .env("GLIBC_TUNABLES", glibc_tunables())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let keep = tail.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Some(t) = &tx {
                    if let Some(found) = listening(&line) {
                        let _ = t.send(found);
                        tx = None;
                    }
                }
                if let Ok(mut tail) = keep.lock() {
                    if tail.len() == KEEP_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
        let mut proc = ProxyProcess {
            child,
            pid,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            tail,
        };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok((addr, admin)) => {
                proc.addr = addr;
                proc.admin = admin;
                Ok(proc)
            }
            Err(_) => {
                // Either the process died (the reader hung up) or it never said "listening".
                std::thread::sleep(Duration::from_millis(100));
                let why = match proc.child.try_wait() {
                    Ok(Some(status)) => format!("proxy exited ({status})"),
                    _ => format!("proxy did not log \"listening\" within {STARTUP_TIMEOUT:?}"),
                };
                Err(anyhow!("{why}; its log:\n{}", proc.log_tail()))
            }
        }
    }

    /// A peer proxy (mitmdump, squid) already started and listening on `addr`.
    pub fn peer(child: Child, addr: SocketAddr) -> ProxyProcess {
        ProxyProcess {
            pid: child.id(),
            child,
            addr,
            admin: addr,
            tail: Arc::default(),
        }
    }

    /// `Some(reason)` once the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "proxy (pid {}) exited mid-run ({status}); its log:\n{}",
                self.pid,
                self.log_tail()
            )),
            _ => None,
        }
    }

    pub fn log_tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A counter from the proxy's `/metrics` (admin listener), if it answers and has it.
pub async fn admin_metric(admin: SocketAddr, name: &str) -> Option<u64> {
    metric(&admin_metrics(admin).await?, name)
}

/// The proxy's whole `/metrics` text, if it answers within 5 s.
pub async fn admin_metrics(admin: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// The value of an unlabelled metric in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `proxy` and `admin` addresses of the JSON `listening` event, if `line` is it.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let ev: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = if ev.get("message").is_some() {
        &ev
    } else {
        ev.get("fields")?
    };
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    let addr = |k: &str| fields.get(k)?.as_str()?.parse().ok();
    Some((addr("proxy")?, addr("admin")?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_is_recognised() {
        let l = r#"{"timestamp":"t","level":"INFO","message":"listening","proxy":"127.0.0.1:4000","admin":"127.0.0.1:4001","target":"portcullis::app"}"#;
        let (p, a) = listening(l).unwrap();
        assert_eq!((p.port(), a.port()), (4000, 4001));
        let nested =
            r#"{"fields":{"message":"listening","proxy":"127.0.0.1:1","admin":"127.0.0.1:2"}}"#;
        assert!(listening(nested).is_some());
        assert!(listening(r#"{"message":"reloaded"}"#).is_none());
        assert!(listening("not json").is_none());
    }

    #[test]
    fn metrics_are_found_by_exact_name() {
        let text = "# TYPE a_total counter\na_total_x 9\na_total 3\nb{kind=\"x\"} 4\n";
        assert_eq!(metric(text, "a_total"), Some(3));
        assert_eq!(metric(text, "b"), None);
        assert_eq!(metric(text, "c"), None);
    }

    /// The bench runs the proxy as the image does: the Dockerfile sets the same tunable.
    #[test]
    fn the_image_sets_the_same_glibc_tunables() {
        let dockerfile =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Dockerfile"))
                .expect("reading the Dockerfile");
        let line = format!("ENV GLIBC_TUNABLES={IMAGE_GLIBC_TUNABLES}");
        assert!(
            dockerfile.lines().any(|l| l.trim() == line),
            "Dockerfile lacks `{line}`"
        );
    }
}
