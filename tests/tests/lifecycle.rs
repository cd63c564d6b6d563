//! The binary as an operator meets it: `dev` (its printed curl must work), `check`, `ca init`
//! and `svid issue`, readiness, and graceful shutdown with a request in flight.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::Arc;

use portcullis_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn dev_prints_curl_commands_that_work() {
    let dev = DevProxy::start(&[], &[]);
    let curls = dev.curls();
    assert_eq!(curls.len(), 3, "{:?}", dev.stdout.lines());
    for line in &curls[..2] {
        let body = DevProxy::run(line).await;
        assert!(
            body.contains("hello from the Portcullis demo upstream"),
            "{body}"
        );
    }
    let denied: serde_json::Value = serde_json::from_str(&DevProxy::run(&curls[2]).await).unwrap();
    assert_eq!(denied["error"], "policy_denied", "{denied}");
    // The decision log (stdout) has the allow and the deny.
    dev.stdout.wait_for("the deny decision", |l| {
        l.contains("\"decision\":\"deny\"") && l.contains("127.0.0.2")
    });
    dev.stdout.wait_for("an allow decision", |l| {
        l.contains("\"decision\":\"allow\"")
    });
    dev.stderr
        .wait_for("access lines with the demo identity", |l| {
            l.contains("spiffe://dev.portcullis/agent/demo") && l.contains("/hello")
        });
}

#[test]
fn check_accepts_a_good_config_and_names_the_bad_key() {
    let pki = Pki::new();
    let good = pki.write_config(&pki.base_config());
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cases = [
        ("unknown key", serde_json::json!({"bogus": 1}), "bogus"),
        (
            "missing bundle",
            serde_json::json!({"trust_domains": {"acme.test": {"bundle": "nope.pem"}}}),
            "trust_domains.acme.test.bundle",
        ),
        (
            "bad trust domain",
            serde_json::json!({"trust_domains": {"ACME": {"bundle": "acme-ca.pem"}}}),
            "trust_domains.ACME",
        ),
        (
            "bad duration",
            serde_json::json!({"limits": {"idle_timeout": "soon"}}),
            "idle_timeout",
        ),
        (
            "zero connection age",
            serde_json::json!({"limits": {"max_connection_age": "0s"}}),
            "limits.max_connection_age: must be greater than zero",
        ),
        (
            "bad cidr",
            serde_json::json!({"egress": {"allow": ["10.0.0.0/33"]}}),
            "egress",
        ),
        (
            "otlp protocol",
            serde_json::json!({"telemetry": {"otlp_protocol": "thrift"}}),
            "telemetry.otlp_protocol",
        ),
        (
            "otlp endpoint with credentials",
            serde_json::json!({"telemetry": {"otlp_endpoint": "https://u:pw-never-shown@c:4317"}}),
            "telemetry.otlp_endpoint",
        ),
        (
            "otlp header name",
            serde_json::json!({"telemetry": {"otlp_headers": {"bad name": "x"}}}),
            "telemetry.otlp_headers",
        ),
    ];
    for (name, patch, key) in cases {
        let mut cfg = pki.base_config();
        for (k, v) in patch.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let path = pki.write_config(&cfg);
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(key), "{name}: expected {key:?} in: {err}");
        assert!(
            err.contains("config.yaml"),
            "{name}: the file must be named: {err}"
        );
        assert!(!err.contains("pw-never-shown"), "{name}: {err}");
    }
    // A key file that is not a key: found at load time, still exit 2.
    let good = pki.write_config(&pki.base_config());
    std::fs::write(pki.path("server.key"), "garbage").unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.key"));
}

#[test]
fn ca_init_and_svid_issue_produce_a_usable_identity() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f);
    let ok = Command::new(bin())
        .args(["ca", "init", "--trust-domain", "acme.test", "--cert"])
        .arg(p("ca.pem"))
        .arg("--key")
        .arg(p("ca.key"))
        .status()
        .unwrap();
    assert!(ok.success());
    let ok = Command::new(bin())
        .args([
            "svid",
            "issue",
            "--spiffe-id",
            "spiffe://acme.test/agents/x",
            "--ca",
        ])
        .arg(p("ca.pem"))
        .arg("--ca-key")
        .arg(p("ca.key"))
        .arg("--out")
        .arg(p("agent"))
        .status()
        .unwrap();
    assert!(ok.success());
    let der = portcullis::tls::load_certs(&p("agent.pem")).unwrap();
    let id = portcullis_filters_id(&der[0]);
    assert_eq!(id, "spiffe://acme.test/agents/x");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p("agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
    }
    // An invalid SPIFFE ID is a usage error.
    let out = Command::new(bin())
        .args([
            "svid",
            "issue",
            "--spiffe-id",
            "spiffe://acme.test/../x",
            "--ca",
        ])
        .arg(p("ca.pem"))
        .arg("--ca-key")
        .arg(p("ca.key"))
        .arg("--out")
        .arg(p("bad"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn portcullis_filters_id(der: &[u8]) -> String {
    portcullis::tls::check_leaf(der, std::time::SystemTime::now())
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let mut proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let (status, body) = proxy.admin_get("/readyz").await;
    assert_eq!((status, body.trim()), (200, "ready"));
    let agent = pki.client("agent", "spiffe://acme.test/a");
    let url = format!("https://localhost:{}/slow", up.port());
    let (pki2, addr) = (Arc::new(pki), proxy.addr);
    let p2 = pki2.clone();
    let in_flight = tokio::spawn(async move { curl(&p2, addr, Some(&agent), &[&url]).await });
    up.slow_arrived().await;
    proxy.signal("TERM");
    proxy
        .logs
        .wait_for("the listener closing", |l| l.contains("stopped accepting"));
    // New connections are refused while draining.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "listener still accepting during drain");
    up.release();
    let out = in_flight.await.unwrap();
    assert_eq!(out.status, 200, "in-flight request was cut: {out:?}");
    let status = proxy.wait_exit().await;
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_usage_exits_2() {
    let out = Command::new(bin()).args(["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin()).args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin())
        .args(["serve", "--config", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = BufReader::new(&out.stderr[..])
        .lines()
        .map(|l| l.unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(stderr.contains("/nonexistent.yaml"), "{stderr}");
}

/// The admin API with a token: probes stay open, everything else needs `Bearer <token>`; off
/// loopback a token is required by the config check.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_requires_its_token_except_for_probes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Harness::builder()
        .env("PCX_ADMIN_TOKEN", "admin-token-for-test")
        .config(|c| c["admin_token"] = serde_json::json!("env:PCX_ADMIN_TOKEN"))
        .start()
        .await;
    let admin = |method: &'static str, path: &'static str, auth: Option<&'static str>| {
        let addr = s.proxy.admin;
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let auth = auth
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
            tcp.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            tcp.read_to_string(&mut out).await.unwrap();
            out[9..12].parse::<u16>().unwrap()
        }
    };
    assert_eq!(admin("GET", "/healthz", None).await, 200);
    assert_eq!(admin("GET", "/readyz", None).await, 200);
    assert_eq!(admin("GET", "/metrics", None).await, 401);
    assert_eq!(
        admin("GET", "/metrics", Some("Bearer wrong-token-for-tes")).await,
        401
    );
    assert_eq!(admin("POST", "/credentials/revoke?name=x", None).await, 401);
    assert_eq!(admin("GET", "/mcp/pins", None).await, 401);
    let good = Some("Bearer admin-token-for-test");
    assert_eq!(admin("GET", "/metrics", good).await, 200);

    let pki = Pki::new();
    let mut cfg = pki.base_config();
    cfg["admin_listen"] = serde_json::json!("0.0.0.0:9901");
    let err = check_refuses(&pki, &cfg);
    assert!(
        err.contains("admin_token") && err.contains("not a loopback"),
        "{err}"
    );
}
