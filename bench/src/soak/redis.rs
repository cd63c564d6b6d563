//! A real `redis-server` for the soak's shared credential cache: a free loopback port, no
//! persistence (`--save '' --appendonly no`), killed and reaped on drop. `INFO` is read over
//! the wire (RESP) at the end, so the report can show that the proxy really used it.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Start `redis-server` (from PATH) and wait for "Ready to accept connections".
    pub fn start() -> Result<RedisServer> {
        // The kernel picks a free port; redis-server takes it over right after.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("finding a free port for redis-server")?
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "notice"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let (tx, rx) = mpsc::channel();
        // Drained for the whole run so a full pipe never stalls the server.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if line.contains("Ready to accept connections") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let pid = child.id();
        let mut server = RedisServer {
            child,
            pid,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        };
        if rx.recv_timeout(STARTUP_TIMEOUT).is_err() {
            let why = match server.child.try_wait() {
                Ok(Some(status)) => format!("exited ({status})"),
                _ => format!("not ready within {STARTUP_TIMEOUT:?}"),
            };
            server.stop();
            bail!("redis-server on port {port}: {why}");
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// `INFO section` as `field:value` lines.
    pub async fn info(&self, section: &str) -> Result<String> {
        let ask = async {
            let mut s = tokio::net::TcpStream::connect(self.addr).await?;
            s.write_all(format!("INFO {section}\r\n").as_bytes())
                .await?;
            let mut r = tokio::io::BufReader::new(s);
            let mut head = String::new();
            r.read_line(&mut head).await?;
            let len: usize = head
                .strip_prefix('$')
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| anyhow!("unexpected INFO reply {head:?}"))?;
            let mut body = vec![0; len];
            r.read_exact(&mut body).await?;
            Ok::<_, anyhow::Error>(String::from_utf8_lossy(&body).into_owned())
        };
        tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .context("redis INFO timed out")?
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

/// A numeric field of an `INFO` reply.
pub fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn info_fields() {
        let info = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:1234\r\n";
        assert_eq!(info_field(info, "total_commands_processed"), Some(1234));
        assert_eq!(info_field(info, "total_connections"), None);
    }
}
