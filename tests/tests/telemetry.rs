//! OpenTelemetry export, checked at an in-process OTLP/HTTP collector (no collector binary can
//! be installed here; the receiver decodes the documented OTLP protobuf): spans per action with
//! the identity and policy attributes, continuing the caller's trace, deny spans marked as
//! errors, no secret anywhere, and a dead collector never affecting requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_tests::*;
use serde_json::json;

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": true, "reason": "ok"}

decision := {"allow": false, "reason": "no writes"} if {
	input.request.method == "POST"
}
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_tie_each_action_to_the_workload_identity() {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let otlp = OtlpReceiver::start().await;
    let mut cfg = pki.base_config();
    cfg["telemetry"] = json!({"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "http/protobuf", "service_name": "portcullis-test"});
    cfg["credentials"] =
        json!([{"name": "gh", "hosts": ["localhost"], "source": {"env": "PCX_TEST_SECRET"}}]);
    let secret = "otel-leak-check-secret-42";
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[
            ("PCX_TEST_SECRET", secret),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/research");
    let url = format!("https://localhost:{}/v1/things", up.port());
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("traceparent: 00-{caller_trace}-00f067aa0ba902b7-01");
    let out = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &["-H", &tp, "-H", "Authorization: Bearer pcx_gh", &url],
    )
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let denied = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &["-X", "POST", "-d", "x", &url],
    )
    .await;
    assert_eq!(denied.status, 403);

    let get = otlp.wait_span("GET", |s| s.name == "GET").await;
    assert_eq!(
        hex(&get.trace_id),
        caller_trace,
        "the caller's trace is continued"
    );
    assert_eq!(hex(&get.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(
        span_attr(&get, "portcullis.identity.spiffe_id").as_deref(),
        Some("spiffe://acme.test/agents/research")
    );
    assert_eq!(
        span_attr(&get, "portcullis.identity.trust_domain").as_deref(),
        Some("acme.test")
    );
    assert_eq!(
        span_attr(&get, "portcullis.policy.decision").as_deref(),
        Some("allow")
    );
    assert_eq!(
        span_attr(&get, "portcullis.credentials").as_deref(),
        Some("gh")
    );
    assert_eq!(
        span_attr(&get, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        span_attr(&get, "server.address").as_deref(),
        Some("localhost")
    );
    // The span the upstream saw as its parent is this span.
    let sent = up.seen()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(sent, format!("00-{caller_trace}-{}-01", hex(&get.span_id)));

    let post = otlp.wait_span("POST", |s| s.name == "POST").await;
    assert_eq!(
        span_attr(&post, "portcullis.policy.decision").as_deref(),
        Some("deny")
    );
    assert_eq!(
        span_attr(&post, "portcullis.policy.reason").as_deref(),
        Some("no writes")
    );
    assert_eq!(
        post.status.as_ref().unwrap().code,
        2,
        "deny spans have status Error"
    );
    otlp.wait_span("CONNECT", |s| s.name.starts_with("CONNECT localhost:"))
        .await;
    assert!(
        !otlp.dump().contains(secret),
        "a secret reached the exported spans"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_collector_does_not_affect_requests() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    // A port nobody listens on.
    let dead = free_addr();
    let mut cfg = pki.base_config();
    cfg["telemetry"] =
        json!({"otlp_endpoint": format!("http://{dead}"), "otlp_protocol": "http/protobuf"});
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    let agent = pki.client("agent", "spiffe://acme.test/a");
    let url = format!("https://localhost:{}/", up.port());
    for _ in 0..5 {
        assert_eq!(
            curl(&pki, proxy.addr, Some(&agent), &[&url]).await.status,
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_otlp_grpc() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let otlp = OtlpReceiver::start_grpc().await;
    let mut cfg = pki.base_config();
    cfg["telemetry"] = json!({"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "grpc"});
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/grpc");
    let url = format!("https://localhost:{}/g", up.port());
    assert_eq!(
        curl(&pki, proxy.addr, Some(&agent), &[&url]).await.status,
        200
    );
    let span = otlp.wait_span("GET over gRPC", |s| s.name == "GET").await;
    assert_eq!(
        span_attr(&span, "portcullis.identity.spiffe_id").as_deref(),
        Some("spiffe://acme.test/agents/grpc")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_exports_spans_with_otlp_endpoint() {
    let otlp = OtlpReceiver::start_grpc().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin())
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--otlp-endpoint",
            &otlp.endpoint(),
            "--dir",
        ])
        .arg(dir.path().join("dev"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::sync::Arc::new(Logs::default());
    capture(child.stdout.take().unwrap(), stdout.clone());
    stdout.wait_for("the banner", |l| l.contains("Ctrl-C"));
    let line = stdout
        .lines()
        .into_iter()
        .find(|l| l.starts_with("curl "))
        .unwrap();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{line} -sS"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let span = otlp.wait_span("the demo GET", |s| s.name == "GET").await;
    assert_eq!(
        span_attr(&span, "portcullis.identity.spiffe_id").as_deref(),
        Some("spiffe://dev.portcullis/agent/demo")
    );
    assert_eq!(
        span_attr(&span, "portcullis.credentials").as_deref(),
        Some("demo")
    );
    let _ = child.kill();
    let _ = child.wait();
}
