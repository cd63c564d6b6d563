//! The official MCP SDKs: the Python SDK as server and client, run from the project venv.

use super::*;

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

/// tests/python/httpx_agent.py through `h`'s proxy as its agent: GET `url` with `headers`;
/// the script's JSON (`status`, `body`, `headers`) and everything it printed.
pub async fn httpx_get(h: &Harness, url: &str, headers: &Value) -> (Value, String) {
    let out = tokio::process::Command::new(python())
        .arg(python_script("httpx_agent.py"))
        .arg(format!("https://{}", h.proxy.addr))
        .arg(h.pki.path("acme-ca.pem"))
        .arg(&h.agent.cert)
        .arg(&h.agent.key)
        .arg(h.pki.path("mitm-ca.pem"))
        .arg(url)
        .arg(headers.to_string())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "httpx agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (serde_json::from_str(&stdout).unwrap(), stdout)
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
