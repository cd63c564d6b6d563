//! Clients: real curl through the proxy, and a raw mTLS client for malformed input.

use super::*;

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
        header_in(&self.headers, name)
    }

    /// The proxy refused with `status` and `x-portcullis-error: code`.
    #[track_caller]
    pub fn assert_refused(&self, status: u16, code: &str) {
        assert_refused(
            self.status,
            self.header("x-portcullis-error"),
            (status, code),
            self,
        );
    }
}

/// The first value of header `name` in a response head (case-insensitive name).
fn header_in(head: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_owned())
}

#[track_caller]
fn assert_refused(
    status: u16,
    error: Option<String>,
    (want_status, code): (u16, &str),
    what: &dyn std::fmt::Debug,
) {
    assert_eq!(status, want_status, "{what:?}");
    assert_eq!(error.as_deref(), Some(code), "{what:?}");
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
    raw_tls_with(client_tls(pki, client), proxy).await
}

/// The TLS client config of [`raw_tls`]: the proxy's CA trusted, `client`'s SVID presented,
/// rustls's default session resumption.
pub fn client_tls(pki: &Pki, client: &ClientCert) -> Arc<rustls::ClientConfig> {
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
    Arc::new(cfg)
}

/// A TLS connection to the proxy with `cfg` (from [`client_tls`]).
pub async fn raw_tls_with(
    cfg: Arc<rustls::ClientConfig>,
    proxy: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
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

/// Send raw bytes inside an intercepted tunnel to `target` (`host:port`): CONNECT, then TLS
/// to the proxy's MITM leaf (trusting the test MITM CA), then `request` as written.
pub async fn raw_in_tunnel(
    pki: &Pki,
    proxy: SocketAddr,
    client: &ClientCert,
    target: &str,
    request: &str,
) -> RawResponse {
    let mut inner = raw_tunnel(pki, proxy, client, target).await;
    inner.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut inner).await
}

/// An intercepted tunnel to `target`, TLS to the MITM leaf done, speaking HTTP/1.1.
pub async fn raw_tunnel(
    pki: &Pki,
    proxy: SocketAddr,
    client: &ClientCert,
    target: &str,
) -> tokio_rustls::client::TlsStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut outer = raw_tls(pki, proxy, client).await;
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    outer.write_all(connect.as_bytes()).await.unwrap();
    let established = read_response(&mut outer).await;
    assert_eq!(established.status, 200, "{established:?}");
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("mitm-ca.pem")).unwrap();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = target
        .rsplit_once(':')
        .map_or(target, |(h, _)| h)
        .to_owned();
    let name = rustls_pki_types::ServerName::try_from(host).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, outer)
        .await
        .unwrap()
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        header_in(&self.head, name)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The proxy refused with `status` and `x-portcullis-error: code`.
    #[track_caller]
    pub fn assert_refused(&self, status: u16, code: &str) {
        assert_refused(
            self.status,
            self.header("x-portcullis-error"),
            (status, code),
            self,
        );
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
