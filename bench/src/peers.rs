//! Peer proxies for side-by-side ratios (`--peers`): mitmproxy's `mitmdump` intercepting TLS
//! (its own CA, generated in a temp confdir at start; upstream verified against the bench's
//! upstream CA) and squid as a CONNECT blind tunnel. Both listen on 127.0.0.1 only, log
//! nothing per request, and are killed at the end of the run like the proxy under test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::proxy_proc::{glibc_tunables, ProxyProcess};

const STARTUP: Duration = Duration::from_secs(60);

/// `name` on PATH (squid also in /usr/sbin, where Debian puts it).
pub fn find(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait until `addr` accepts TCP and `ready()` holds, or the child dies, or the bound passes.
async fn wait_ready(proc: &mut ProxyProcess, what: &str, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if tokio::net::TcpStream::connect(proc.addr).await.is_ok() && ready() {
            return Ok(());
        }
        if let Some(why) = proc.exited() {
            bail!("{what}: {why}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {} within {STARTUP:?}", proc.addr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// mitmdump intercepting on a free loopback port; returns it and the CA clients must trust.
pub async fn mitmdump(
    bin: &Path,
    dir: &Path,
    upstream_ca: &Path,
) -> Result<(ProxyProcess, CertificateDer<'static>)> {
    let port = free_port()?;
    let confdir = dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir)?;
    let child = Command::new(bin)
        .env("GLIBC_TUNABLES", glibc_tunables())
        .args([
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &port.to_string(),
        ])
        .arg("--set")
        .arg(format!("confdir={}", confdir.display()))
        .arg("--set")
        .arg(format!(
            "ssl_verify_upstream_trusted_ca={}",
            upstream_ca.display()
        ))
        .args(["--set", "flow_detail=0", "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut proc = ProxyProcess::peer(child, SocketAddr::from(([127, 0, 0, 1], port)));
    let ca = confdir.join("mitmproxy-ca-cert.pem");
    wait_ready(&mut proc, "mitmdump", || ca.is_file()).await?;
    let der = CertificateDer::from_pem_file(&ca)
        .with_context(|| format!("mitmproxy CA {}", ca.display()))?;
    Ok((proc, der))
}

/// squid allowing CONNECT from loopback to the upstream's port, no cache, no logs.
pub async fn squid(bin: &Path, dir: &Path, upstream_port: u16) -> Result<ProxyProcess> {
    let port = free_port()?;
    let sdir = dir.join("squid");
    std::fs::create_dir_all(&sdir)?;
    let conf = sdir.join("squid.conf");
    let text = format!(
        "http_port 127.0.0.1:{port}\n\
         acl localhost_src src 127.0.0.0/8\n\
         acl bench_port port {upstream_port}\n\
         acl CONNECT method CONNECT\n\
         http_access deny CONNECT !bench_port\n\
         http_access allow localhost_src\n\
         http_access deny all\n\
         cache deny all\n\
         cache_mem 8 MB\n\
         access_log none\n\
         cache_log /dev/null\n\
         cache_store_log none\n\
         pid_filename none\n\
         logfile_rotate 0\n\
         shutdown_lifetime 0 seconds\n"
    );
    std::fs::write(&conf, text)?;
    let child = Command::new(bin)
        .env("GLIBC_TUNABLES", glibc_tunables())
        .arg("-N")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut proc = ProxyProcess::peer(child, SocketAddr::from(([127, 0, 0, 1], port)));
    wait_ready(&mut proc, "squid", || true).await?;
    Ok(proc)
}
