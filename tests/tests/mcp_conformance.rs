//! The official MCP conformance suite (`@modelcontextprotocol/conformance`, tests/node/conformance)
//! through the proxy, both directions, revisions 2025-11-25 and 2026-07-28: the suite's runner as
//! the client of the TypeScript SDK's everything server, and the SDK's everything client against
//! the runner's scenario servers, each with every request going through Portcullis (CONNECT,
//! mTLS with an SVID, the plain-HTTP MCP traffic inside the tunnel inspected and decided per
//! message). Every scenario the SDK passes directly must pass through the proxy too: the
//! proxy neither breaks the protocol nor lets it go around it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use portcullis::pki::LeafSpec;
use portcullis_tests::*;

/// Everything to and from localhost is allowed: the suite checks the protocol, not a policy.
const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

decision := {"allow": true, "reason": "conformance peers"} if {
	input.destination.host in {"localhost", "127.0.0.1"}
}
"#;

/// How the suite's runner reaches the everything server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// No proxy: the baseline.
    Direct,
    /// CONNECT, TLS inside the tunnel terminated by the proxy (the server on HTTPS).
    Mitm,
    /// CONNECT, plain HTTP inside the tunnel.
    Tunnel,
    /// Plain HTTP requests in absolute form to the proxy itself.
    Absolute,
    /// No proxy protocol: HTTPS to a gateway route of the proxy.
    Gateway,
}

fn conformance_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node/conformance");
    assert!(
        dir.join("node_modules").is_dir(),
        "run `npm ci` in {} (.ci/run does)",
        dir.display()
    );
    dir
}

/// `bash run.sh MODE` (server: the runner is the MCP client; client: the SDK's everything
/// client is) with the proxy's dispatcher applied to the MCP client as `way` says; its exit
/// status and output. Results go to `results`.
async fn run_suite(h: &Harness, mode: &str, way: Way, port: u16, results: &Path) -> (bool, String) {
    let dir = conformance_dir();
    let agent = h.identity("conformance");
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(dir.join("run.sh"))
        .arg(mode)
        .env("PORT", port.to_string())
        .env("CONFORMANCE_RESULTS", results)
        .kill_on_drop(true);
    if way != Way::Direct {
        cmd.env("PORTCULLIS_PROXY", format!("https://{}", h.proxy.addr))
            .env("PORTCULLIS_PROXY_CA", h.pki.path("acme-ca.pem"))
            .env("PORTCULLIS_CLIENT_CERT", &agent.cert)
            .env("PORTCULLIS_CLIENT_KEY", &agent.key)
            .env("PORTCULLIS_ORIGIN_CA", h.pki.path("mitm-ca.pem"));
    }
    match way {
        Way::Direct | Way::Tunnel => {}
        Way::Mitm => {
            // Not `conformance.pem`: that is the agent's SVID (`h.identity("conformance")`).
            let (cert, key) = (
                h.pki.path("conformance-server.pem"),
                h.pki.path("conformance-server.key"),
            );
            h.pki
                .upstream_ca
                .issue(&LeafSpec::server(
                    &["localhost", "127.0.0.1"],
                    std::time::Duration::from_secs(3600),
                ))
                .unwrap()
                .write(&cert, &key)
                .unwrap();
            cmd.env("CONFORMANCE_SERVER_CERT", cert)
                .env("CONFORMANCE_SERVER_KEY", key)
                .env("PORTCULLIS_PROXY_MODE", "connect");
        }
        Way::Absolute => {
            cmd.env("PORTCULLIS_PROXY_MODE", "absolute");
        }
        Way::Gateway => {
            let url = format!("https://localhost:{}/conformance/mcp", h.proxy.addr.port());
            cmd.env("PORTCULLIS_PROXY_MODE", "direct")
                .env("CONFORMANCE_URL", url);
        }
    }
    // More runner arguments, for a look at one scenario (`--scenario NAME`).
    if let Ok(extra) = std::env::var("PORTCULLIS_CONFORMANCE_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    let out = match tokio::time::timeout(RUN_LIMIT, cmd.output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!(
            "conformance {mode} {way:?} still running after {RUN_LIMIT:?}; proxy log tail:\n{}",
            tail(&h.proxy.logs.lines(), 40)
        ),
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The evaluation bound is wall time: with some fifty Node processes starting on two cores, a
/// trivial evaluation can wait past the 50 ms default for a core and be denied (failing closed,
/// as it must). The suite checks the protocol, not that bound.
const EVAL_TIME: &str = "5s";

/// A whole run of one mode takes seconds to a minute; a hang is a failure, not a wait.
const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(420);

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `node compare.mjs BASE OTHER --allowed FILE`: every check whose result differs.
async fn compare(base: &Path, other: &Path) -> (bool, String) {
    let dir = conformance_dir();
    let out = tokio::process::Command::new(node())
        .arg(dir.join("compare.mjs"))
        .arg(base)
        .arg(other)
        .arg("--allowed")
        .arg(dir.join("proxy-differences.json"))
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The server scenarios, directly and through the proxy in each of the four ways an agent's
/// traffic reaches it: the same results, but for what the proxy enforces on purpose
/// (`tests/node/conformance/proxy-differences.json`, each with its reason).
#[tokio::test(flavor = "multi_thread")]
async fn server_scenarios_give_the_same_results_through_the_proxy_every_way() {
    let port = free_addr().port();
    let h = Harness::builder()
        .policy(POLICY)
        .config(move |c| {
            c["policy"]["max_eval_time"] = serde_json::json!(EVAL_TIME);
            c["routes"] = serde_json::json!([{"name": "conformance",
                "match": {"path_prefix": "/conformance/"},
                "upstream": format!("http://127.0.0.1:{port}")}]);
        })
        .start()
        .await;
    let base = h.pki.path("conformance-direct");
    let (ok, out) = run_suite(&h, "server", Way::Direct, port, &base).await;
    assert!(ok, "the suite fails without the proxy:\n{out}");
    let only = std::env::var("PORTCULLIS_CONFORMANCE_WAY").ok();
    for way in [Way::Mitm, Way::Tunnel, Way::Absolute, Way::Gateway] {
        if only.as_ref().is_some_and(|w| *w != format!("{way:?}")) {
            continue;
        }
        let results = h.pki.path(&format!("conformance-{way:?}"));
        let (ok, out) = run_suite(&h, "server", way, port, &results).await;
        let (same, diff) = compare(&base, &results).await;
        assert!(
            same,
            "{way:?}: results differ from the direct run:\n{diff}\n--- run:\n{out}"
        );
        assert!(ok, "{way:?}: the suite failed through the proxy:\n{out}");
    }
}

/// The SDK's everything client against the runner's scenario servers, every request through
/// the proxy (CONNECT, plain HTTP in the tunnel).
#[tokio::test(flavor = "multi_thread")]
async fn client_scenarios_pass_through_the_proxy() {
    let h = Harness::builder()
        .policy(POLICY)
        .config(|c| c["policy"]["max_eval_time"] = serde_json::json!(EVAL_TIME))
        .start()
        .await;
    let results = h.pki.path("conformance-client");
    let (ok, out) = run_suite(&h, "client", Way::Tunnel, free_addr().port(), &results).await;
    assert!(
        ok,
        "conformance client mode through the proxy failed:\n{out}"
    );
    // It really went through the proxy: MCP messages decided, from this identity.
    let decisions = h.proxy.decisions.events();
    let mcp = decisions.iter().filter(|d| d["kind"] == "mcp").count();
    assert!(mcp > 100, "only {mcp} MCP decisions: {decisions:?}");
    assert!(
        decisions
            .iter()
            .all(|d| d["spiffe_id"] == "spiffe://acme.test/agents/conformance"),
        "a decision without this identity: {decisions:?}"
    );
}
