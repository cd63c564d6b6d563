//! Gateway mode end to end: curl talks to Portcullis as if it were the API (origin-form, mTLS
//! with its SVID); routes pick the upstream, strip or keep the prefix, inject the route's
//! credential (substituted like any placeholder), the policy sees `input.gateway.route`, and an
//! unknown path is a 404 `no_route`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_tests::*;
use serde_json::json;

const SECRET: &str = "ghp_gatewaySecret0123456789";

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": true, "reason": "ok"}

decision := {"allow": false, "reason": "route closed"} if input.gateway.route == "closed"
"#;

struct Gateway {
    pki: Pki,
    up: Upstream,
    proxy: Proxy,
    agent: ClientCert,
}

async fn gateway() -> Gateway {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let base = format!("https://localhost:{}", up.port());
    let mut cfg = pki.base_config();
    cfg["credentials"] = json!([
        {"name": "github", "hosts": ["localhost:*"], "source": {"env": "GW_SECRET"}},
        {"name": "keyed", "hosts": ["localhost:*"], "source": {"env": "GW_SECRET"},
         "inject": {"header": "x-api-key", "format": "key={}"}},
    ]);
    cfg["routes"] = json!([
        {"name": "github", "match": {"path_prefix": "/github/"}, "upstream": base, "credential": "github"},
        {"name": "keyed", "match": {"path_prefix": "/keyed"}, "upstream": format!("{base}/echo"), "credential": "keyed"},
        {"name": "kept", "match": {"path_prefix": "/echo"}, "upstream": base, "strip_prefix": false},
        {"name": "closed", "match": {"path_prefix": "/closed/"}, "upstream": base},
    ]);
    let proxy = Proxy::start_with_env(&pki.write_config(&cfg), &[("GW_SECRET", SECRET)]);
    let agent = pki.client("agent", "spiffe://acme.test/agents/research");
    Gateway {
        pki,
        up,
        proxy,
        agent,
    }
}

impl Gateway {
    /// curl straight at Portcullis (no proxy), with the agent's SVID.
    async fn get(&self, path: &str, extra: &[&str]) -> CurlOut {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-"])
            .arg("--cacert")
            .arg(self.pki.path("acme-ca.pem"))
            .arg("--cert")
            .arg(&self.agent.cert)
            .arg("--key")
            .arg(&self.agent.key)
            .args(extra)
            .arg(format!(
                "https://localhost:{}{path}",
                self.proxy.addr.port()
            ));
        run_curl(cmd).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_rewrite_inject_and_go_through_the_policy() {
    let g = gateway().await;

    // Prefix stripped, credential injected and substituted; the agent never held it.
    let out = g.get("/github/echo?page=2", &[]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = g.up.seen();
    let first = seen.last().unwrap();
    assert_eq!(first.path, "/echo");
    assert_eq!(
        first.headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    let echo = out.json();
    assert_eq!(
        echo["headers"]["host"],
        format!("localhost:{}", g.up.port())
    );
    assert_eq!(echo["query"], "page=2");
    assert_eq!(echo["headers"]["authorization"], "Bearer [REDACTED]");
    assert!(!out.body.contains(SECRET));
    assert_eq!(
        out.header("x-echo-authorization").as_deref(),
        Some("Bearer [REDACTED]"),
        "an echoed secret is redacted"
    );

    // A custom inject header and format, onto an upstream base path.
    let out = g.get("/keyed", &[]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = g.up.seen();
    assert_eq!(
        seen.last().unwrap().headers["x-api-key"],
        format!("key={SECRET}").as_str()
    );

    // Prefix kept.
    let out = g.get("/echo/kept", &[]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(g.up.seen().iter().any(|s| s.path == "/echo/kept"));

    // The policy decides on the route.
    let before = g.up.seen().len();
    let out = g.get("/closed/x", &[]).await;
    out.assert_refused(403, "policy_denied");
    assert_eq!(out.json()["reason"], "route closed");

    // No route: 404 no_route, nothing forwarded.
    let out = g.get("/gitlab/projects", &[]).await;
    out.assert_refused(404, "no_route");
    assert_eq!(g.up.seen().len(), before);

    // The decision log ties the route to the identity.
    let line = g
        .proxy
        .decisions
        .wait_for("the github route's decision", |l| {
            l.contains("\"route\":\"github\"")
        });
    assert!(
        line.contains("spiffe://acme.test/agents/research"),
        "{line}"
    );
    let logged = format!(
        "{}\n{}",
        g.proxy.logs.lines().join("\n"),
        g.proxy.decisions.lines().join("\n")
    );
    assert!(!logged.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_needs_a_client_svid_too() {
    let g = gateway().await;
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-o", "/dev/null", "--cacert"])
        .arg(g.pki.path("acme-ca.pem"))
        .arg(format!(
            "https://localhost:{}/github/echo",
            g.proxy.addr.port()
        ));
    let out = run_curl(cmd).await;
    assert!(
        !out.success,
        "no client certificate must mean no response: {out:?}"
    );
    assert!(g.up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn route_config_errors_are_precise() {
    let pki = Pki::new();
    let cases = [
        (
            json!([{"name": "a", "match": {"path_prefix": "x/"}, "upstream": "https://api.example.com"}]),
            "routes[0].match.path_prefix",
        ),
        (
            json!([{"name": "a", "match": {"path_prefix": "/x/"}, "upstream": "ftp://api.example.com"}]),
            "routes[0].upstream",
        ),
        (
            json!([{"name": "a", "match": {"path_prefix": "/x/"}, "upstream": "https://api.example.com", "credential": "nope"}]),
            "no credential named",
        ),
        (
            json!([{"name": "a", "match": {"path_prefix": "/x/"}, "upstream": "https://evil.example.com", "credential": "github"}]),
            "is not bound to",
        ),
        (
            json!([{"name": "a", "match": {"path_prefix": "/x/"}, "upstream": "https://api.example.com"},
                {"name": "a", "match": {"path_prefix": "/y/"}, "upstream": "https://api.example.com"}]),
            "duplicate route",
        ),
    ];
    for (routes, expect) in cases {
        let mut cfg = pki.base_config();
        cfg["credentials"] =
            json!([{"name": "github", "hosts": ["api.example.com"], "source": {"env": "X"}}]);
        cfg["routes"] = routes;
        let err = check_refuses(&pki, &cfg);
        assert!(err.contains(expect), "{expect:?} not in {err}");
    }
}

/// A route's base path cannot be escaped: dot segments (raw or percent-encoded) and encoded
/// separators are refused before anything is sent, so `/keyed/../x` never reaches `/x`.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_base_path_cannot_be_escaped() {
    let g = gateway().await;
    for path in [
        "/keyed/../admin",
        "/keyed/%2e%2e/admin",
        "/keyed/a%2F..%2Fadmin",
    ] {
        let out = g.get(path, &["--path-as-is"]).await;
        assert_eq!(out.status, 400, "{path}: {out:?}");
        assert_eq!(
            out.header("x-portcullis-error").as_deref(),
            Some("bad_request"),
            "{path}"
        );
    }
    assert!(g.up.seen().is_empty(), "{:?}", g.up.seen().len());
}
