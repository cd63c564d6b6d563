//! The official MCP conformance suite (`@modelcontextprotocol/conformance`, tests/node/conformance)
//! through the proxy, both directions, revisions 2025-11-25 and 2026-07-28: the suite's runner as
//! the client of the TypeScript SDK's everything server, and the SDK's everything client against
//! the runner's scenario servers, each with every request going through Portcullis (CONNECT,
//! mTLS with an SVID, the plain-HTTP MCP traffic inside the tunnel inspected and decided per
//! message). Every scenario the SDK passes directly must pass through the proxy too: the
//! proxy neither breaks the protocol nor lets it go around it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use portcullis_tests::*;

/// Everything to and from localhost is allowed: the suite checks the protocol, not a policy.
const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

decision := {"allow": true, "reason": "conformance peers"} if {
	input.destination.host in {"localhost", "127.0.0.1"}
}
"#;

/// `bash run.sh MODE` with the proxy's dispatcher applied to the MCP client; its exit status and
/// output.
async fn run_suite(h: &Harness, mode: &str) -> (bool, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node/conformance");
    assert!(
        dir.join("node_modules").is_dir(),
        "run `npm ci` in {} (.ci/run does)",
        dir.display()
    );
    let agent = h.identity("conformance");
    let results = h.pki.path(&format!("conformance-{mode}"));
    let out = tokio::process::Command::new("bash")
        .arg(dir.join("run.sh"))
        .arg(mode)
        .env("PORTCULLIS_PROXY", format!("https://{}", h.proxy.addr))
        .env("PORTCULLIS_PROXY_CA", h.pki.path("acme-ca.pem"))
        .env("PORTCULLIS_CLIENT_CERT", &agent.cert)
        .env("PORTCULLIS_CLIENT_KEY", &agent.key)
        .env("PORTCULLIS_ORIGIN_CA", h.pki.path("mitm-ca.pem"))
        .env("CONFORMANCE_RESULTS", &results)
        .kill_on_drop(true)
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

#[tokio::test(flavor = "multi_thread")]
async fn the_conformance_suite_passes_through_the_proxy() {
    let h = Harness::builder().policy(POLICY).start().await;
    for mode in ["server", "client"] {
        let (ok, out) = run_suite(&h, mode).await;
        assert!(
            ok,
            "conformance {mode} mode through the proxy failed:\n{out}"
        );
    }
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
