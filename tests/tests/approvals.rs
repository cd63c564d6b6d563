//! Approvals and rate limits end to end: curl through the real proxy, the admin API, the CLI,
//! two replicas sharing a real `redis-server`, and the console driven in headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use portcullis_tests::*;
use serde_json::{json, Value};

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := true

risky if {
	input.request.method == "POST"
	input.request.path == "/pay"
}

risky if {
	input.kind == "mcp"
	input.mcp.tool == "transfer"
}

# What the approver is shown: the agent's note too (attacker-controlled text in the console).
default note := "payments need a human"

note := concat(": ", ["payments need a human", input.request.headers["x-note"][0]]) if input.request.headers["x-note"]

decision := {"allow": false, "reason": "payments need a human", "approval": {"ttl": "10m", "reason": note}} if {
	risky
	input.approval.state in {"none", "pending"}
}

decision := {"allow": true, "reason": sprintf("approved by %s", [input.approval.decided_by])} if {
	risky
	input.approval.state == "granted"
}

decision := {"allow": false, "reason": "a human said no"} if {
	risky
	input.approval.state == "denied"
}

decision := {"allow": true, "limit": {"name": "per-agent", "key": input.identity.spiffe_id, "rate": "3/2s", "burst": 3}} if {
	input.request.path == "/limited"
}

# No refill within a test, however slow the requests (each waits out a Redis timeout below).
decision := {"allow": true, "limit": {"name": "per-agent-hourly", "key": input.identity.spiffe_id, "rate": "3/h", "burst": 3}} if {
	input.request.path == "/limited-hourly"
}
"#;

struct Setup {
    pki: Pki,
    up: Upstream,
    agent: ClientCert,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let agent = pki.client("agent", "spiffe://acme.test/agents/pay");
    Setup { pki, up, agent }
}

impl Setup {
    fn config(&self, extra: Value) -> std::path::PathBuf {
        let mut cfg = self.pki.base_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        self.pki.write_config(&cfg)
    }

    async fn pay(&self, proxy: &Proxy, amount: u32) -> CurlOut {
        self.pay_to(proxy, amount, "/pay").await
    }

    async fn pay_to(&self, proxy: &Proxy, amount: u32, path: &str) -> CurlOut {
        let url = format!("https://localhost:{}{path}", self.up.port());
        let body = format!("{{\"amount\": {amount}}}");
        curl(
            &self.pki,
            proxy.addr,
            Some(&self.agent),
            &["-X", "POST", "--data", &body, &url],
        )
        .await
    }

    async fn get(&self, proxy: &Proxy, path: &str) -> CurlOut {
        let url = format!("https://localhost:{}{path}", self.up.port());
        curl(&self.pki, proxy.addr, Some(&self.agent), &[&url]).await
    }

    fn pays_seen(&self) -> usize {
        self.up.seen().iter().filter(|s| s.path == "/pay").count()
    }
}

/// `portcullis approvals ARGS --admin ADDR`: (exit ok, stdout).
fn cli(proxy: &Proxy, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(bin())
        .arg("approvals")
        .args(args)
        .arg("--admin")
        .arg(proxy.admin.to_string())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The approvals the admin API lists in `state`.
async fn listed(proxy: &Proxy, state: &str) -> Vec<Value> {
    let (status, body) = proxy.admin_get(&format!("/approvals?state={state}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<Value>>(&body).unwrap()
}

/// Poll the admin API until one approval is pending; returns it.
async fn wait_pending(proxy: &Proxy) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(first) = listed(proxy, "pending").await.into_iter().next() {
            return first;
        }
        assert!(Instant::now() < deadline, "no approval became pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_needing_approval_is_refused_until_granted_then_goes_through_once() {
    let s = setup().await;
    let proxy = Proxy::start(&s.config(json!({})));

    let first = s.pay(&proxy, 5).await;
    first.assert_refused(403, "approval_required");
    let body = first.json();
    let id = body["approval_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{body}");
    assert_eq!(first.header("retry-after").as_deref(), Some("30"));
    assert!(body["reason"]
        .as_str()
        .unwrap()
        .contains("payments need a human"));
    assert_eq!(
        s.pays_seen(),
        0,
        "nothing reaches the upstream before a grant"
    );

    // The same call again: the same approval, still pending.
    let again = s.pay(&proxy, 5).await;
    again.assert_refused(403, "approval_required");
    assert_eq!(again.json()["approval_id"], id.as_str());
    // Another call (for plain HTTP: method, destination, path and query keys) is another
    // approval.
    let other = s.pay_to(&proxy, 6, "/pay?to=bob").await;
    assert_ne!(other.json()["approval_id"], id.as_str());

    // The approver sees what is asked, through the CLI.
    let (ok, out) = cli(&proxy, &["list"]);
    assert!(ok, "{out}");
    let pending: Vec<Value> = serde_json::from_str(&out).unwrap();
    let rec = pending.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(rec["identity"], "spiffe://acme.test/agents/pay");
    assert_eq!(rec["action"]["method"], "POST");
    assert_eq!(rec["action"]["path"], "/pay");
    assert_eq!(rec["reason"], "payments need a human");
    assert_eq!(rec["state"], "pending");

    let (ok, out) = cli(&proxy, &["approve", &id]);
    assert!(ok, "{out}");
    let decided: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(decided["state"], "granted");
    assert_eq!(decided["decided_by"], "admin");
    // Deciding twice is refused.
    let (ok, _) = cli(&proxy, &["deny", &id]);
    assert!(!ok);

    let granted = s.pay(&proxy, 5).await;
    assert_eq!(granted.status, 200, "{granted:?}");
    assert_eq!(s.pays_seen(), 1);
    // Single use: the next identical call asks again.
    let used = s.pay(&proxy, 5).await;
    used.assert_refused(403, "approval_required");
    assert_ne!(used.json()["approval_id"], id.as_str());
    assert_eq!(s.pays_seen(), 1);

    // A denial holds: the policy refuses with its own reason.
    let other_id = other.json()["approval_id"].as_str().unwrap().to_owned();
    assert!(cli(&proxy, &["deny", &other_id]).0);
    let denied = s.pay_to(&proxy, 6, "/pay?to=carol").await;
    denied.assert_refused(403, "policy_denied");
    assert_eq!(denied.json()["reason"], "a human said no");
    assert_eq!(denied.json()["approval_id"], other_id.as_str());

    // Telemetry: the decision log names the approval and the approver.
    let line = proxy.decisions.wait_for("the approved /pay", |l| {
        l.contains("\"/pay\"") && l.contains("\"decision\":\"allow\"")
    });
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["approvals"][0]["id"], id.as_str());
    assert_eq!(line["approvals"][0]["state"], "granted");
    assert_eq!(line["approvals"][0]["decided_by"], "admin");
    assert_eq!(line["reason"], "approved by admin");
    assert_eq!(proxy.metric("portcullis_approvals_used_total").await, 1);
    assert_eq!(proxy.metric("portcullis_approvals_opened_total").await, 3);
    assert_eq!(proxy.metric("portcullis_approvals_pending").await, 1);
    assert_eq!(
        proxy
            .metric("portcullis_approvals_decided_total{decision=\"granted\"}")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_call_proceeds_as_soon_as_an_approver_decides() {
    let s = setup().await;
    let config = s.config(json!({
        "approvals": {"hold": "30s", "approvers": [
            {"name": "alice", "token": "env:ALICE_TOKEN"},
        ]},
    }));
    let proxy = Proxy::start_with_env(&config, &[("ALICE_TOKEN", "alice-secret-token")]);

    let started = Instant::now();
    let held = s.pay(&proxy, 1);
    let approve = async {
        // Approvers are authenticated: no token, or the wrong one, lists nothing.
        let deadline = Instant::now() + Duration::from_secs(20);
        let rec = loop {
            let (status, _) = proxy.admin_get("/approvals?state=pending").await;
            assert_eq!(status, 401);
            let out = std::process::Command::new(bin())
                .args([
                    "approvals",
                    "list",
                    "--admin-token",
                    "env:ALICE_TOKEN",
                    "--admin",
                ])
                .arg(proxy.admin.to_string())
                .env("ALICE_TOKEN", "alice-secret-token")
                .output()
                .unwrap();
            assert!(out.status.success());
            let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(first) = all.into_iter().next() {
                break first;
            }
            assert!(Instant::now() < deadline, "no approval became pending");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let out = std::process::Command::new(bin())
            .args(["approvals", "approve", rec["id"].as_str().unwrap()])
            .args(["--admin-token", "env:ALICE_TOKEN", "--admin"])
            .arg(proxy.admin.to_string())
            .env("ALICE_TOKEN", "alice-secret-token")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let (done, ()) = tokio::join!(held, approve);
    assert_eq!(done.status, 200, "{done:?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "released by the decision, not the hold"
    );
    assert_eq!(s.pays_seen(), 1);
    let line = proxy
        .decisions
        .wait_for("the /pay decision", |l| l.contains("\"/pay\""));
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["approvals"][0]["decided_by"], "alice");
    assert!(!proxy.logs.lines().join("\n").contains("alice-secret-token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_refuse_the_burst_overflow_then_recover() {
    let s = setup().await;
    let config = s.config(json!({
        "rate_limits": {"limits": [{"name": "per-destination", "by": ["destination"], "rate": "100/m"}]},
    }));
    let proxy = Proxy::start(&config);
    for _ in 0..3 {
        assert_eq!(s.get(&proxy, "/limited").await.status, 200);
    }
    let over = s.get(&proxy, "/limited").await;
    over.assert_refused(429, "rate_limited");
    let body = over.json();
    assert_eq!(body["limit"], "per-agent");
    let wait_ms = body["retry_after_ms"].as_u64().unwrap();
    assert!(wait_ms > 0 && wait_ms <= 667, "{body}");
    assert_eq!(over.header("retry-after").as_deref(), Some("1"));
    // Other paths are not under the policy's limit.
    assert_eq!(s.get(&proxy, "/other").await.status, 200);
    // After the delay the proxy gave, one more call fits.
    tokio::time::sleep(Duration::from_millis(wait_ms + 20)).await;
    assert_eq!(s.get(&proxy, "/limited").await.status, 200);
    s.get(&proxy, "/limited")
        .await
        .assert_refused(429, "rate_limited");
    assert_eq!(
        proxy
            .metric("portcullis_rate_limited_total{limit=\"per-agent\"}")
            .await,
        2
    );
    let refused = s.up.seen().iter().filter(|r| r.path == "/limited").count();
    assert_eq!(refused, 4, "refused calls never reach the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_limit_by_identity_counts_across_paths() {
    let s = setup().await;
    let config = s.config(json!({
        "rate_limits": {"limits": [{"name": "agents", "by": ["identity"], "rate": "2/h"}]},
    }));
    let proxy = Proxy::start(&config);
    assert_eq!(s.get(&proxy, "/a").await.status, 200);
    assert_eq!(s.get(&proxy, "/b").await.status, 200);
    let over = s.get(&proxy, "/c").await;
    over.assert_refused(429, "rate_limited");
    assert_eq!(over.json()["limit"], "agents");
    let secs: u64 = over.header("retry-after").unwrap().parse().unwrap();
    assert!((1700..=1800).contains(&secs), "{secs}");
    // Another identity has its own bucket.
    let other = s.pki.client("other", "spiffe://acme.test/agents/other");
    let url = format!("https://localhost:{}/a", s.up.port());
    assert_eq!(
        curl(&s.pki, proxy.addr, Some(&other), &[&url]).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_approvals_and_limits_through_redis() {
    let redis = RedisServer::start();
    let s = setup().await;
    let config = s.config(json!({
        "approvals": {"hold": "30s"},
        "redis": {"url": redis.url(), "encryption_key": "env:PCX_REDIS_KEY", "timeout": "500ms"},
    }));
    let env = [(
        "PCX_REDIS_KEY",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )];
    let a = Proxy::start_with_env(&config, &env);
    let b = Proxy::start_with_env(&config, &env);

    // Held on A, approved on B: A's call completes.
    let held = s.pay(&a, 7);
    let approve = async {
        let rec = wait_pending(&b).await;
        let (status, body) = b
            .admin_request(
                "POST",
                &format!("/approvals/{}/approve", rec["id"].as_str().unwrap()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        rec
    };
    let (done, rec) = tokio::join!(held, approve);
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(s.pays_seen(), 1);
    // The grant was used once, whichever replica is asked next.
    let listed_a = listed(&a, "all").await;
    assert_eq!(listed_a[0]["id"], rec["id"]);

    // The policy's limit (3 at once) holds across both replicas.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        statuses.push(s.get(proxy, "/limited").await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(a.metric("portcullis_rate_limit_fallback_total").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_in_chromium_approves_a_held_call() {
    let s = setup().await;
    let config = s.config(json!({
        "approvals": {"hold": "40s", "approvers": [{"name": "carol", "token": "env:CAROL_TOKEN"}]},
    }));
    let proxy = Proxy::start_with_env(&config, &[("CAROL_TOKEN", "carol-console-token")]);
    let url = format!("https://localhost:{}/pay", s.up.port());
    let note = "x-note: <img src=x onerror=\"window.__pwned=1\">";
    let args = ["-X", "POST", "-H", note, "--data", "{\"amount\": 9}", &url];
    let held = curl(&s.pki, proxy.addr, Some(&s.agent), &args);
    let approve = async {
        // The id, as the operator learns it from the proxy's log (or the webhook).
        let line = proxy
            .logs
            .wait_for("the pending approval", |l| l.contains("approval requested"));
        let id = line[line.find("apr_").unwrap()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>();
        let out = tokio::process::Command::new(node())
            .arg(node_script("console_approve.mjs"))
            .args([
                "--console",
                &format!("http://{}/approvals/console", proxy.admin),
            ])
            .args(["--token", "carol-console-token", "--approval", &id])
            .output()
            .await
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(report["pwned"], false);
        assert_eq!(report["decided_state"], "granted");
        assert_eq!(report["row"]["identity"], "spiffe://acme.test/agents/pay");
        let shown = report["row"]["reason"].as_str().unwrap();
        assert!(shown.contains("<img src=x"), "shown as text: {shown}");
        id
    };
    let (done, id) = tokio::join!(held, approve);
    assert_eq!(done.status, 200, "{done:?}");
    // The console's files are public; the records are not.
    assert_eq!(proxy.admin_get("/approvals/console").await.0, 200);
    assert_eq!(proxy.admin_get(&format!("/approvals/{id}")).await.0, 401);
}

/// A one-shot HTTP receiver: the first request's head and body.
async fn receive_one(listener: tokio::net::TcpListener) -> (String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body) = loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the webhook request ended early");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break (head.to_owned(), body.to_owned());
            }
        }
    };
    s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    (head, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_announces_each_new_pending_approval() {
    let s = setup().await;
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", hook.local_addr().unwrap());
    let config = s.config(json!({
        "approvals": {"webhook": {"url": url, "headers": {"authorization": "env:HOOK_TOKEN"}}},
    }));
    let proxy = Proxy::start_with_env(&config, &[("HOOK_TOKEN", "Bearer hook-secret-123")]);
    let received = tokio::spawn(receive_one(hook));
    let refused = s.pay(&proxy, 3).await;
    refused.assert_refused(403, "approval_required");
    let (head, body) = tokio::time::timeout(Duration::from_secs(20), received)
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("POST /hook HTTP/1.1"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("authorization: bearer hook-secret-123"));
    assert_eq!(body["type"], "approval.pending");
    let id = refused.json()["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(body["approval"]["id"], id.as_str());
    assert_eq!(
        body["approval"]["identity"],
        "spiffe://acme.test/agents/pay"
    );
    assert_eq!(body["approve"], format!("/approvals/{id}/approve"));
    proxy
        .wait_metric("portcullis_approval_webhook_sent_total", |n| n == 1)
        .await;
    assert!(!proxy.logs.lines().join("\n").contains("hook-secret-123"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecided_approval_expires_and_the_next_call_asks_again() {
    let s = setup().await;
    let proxy = Proxy::start(&s.config(json!({"approvals": {"pending_ttl": "1s"}})));
    let first = s.pay(&proxy, 1).await;
    let id = first.json()["approval_id"].as_str().unwrap().to_owned();
    // Expiry is the subject here: wait (bounded) until the record says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listed(&proxy, "expired")
        .await
        .iter()
        .any(|r| r["id"] == id.as_str())
    {
        assert!(Instant::now() < deadline, "the approval never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = proxy
        .admin_request("POST", &format!("/approvals/{id}/approve"))
        .await;
    assert_eq!(status, 409, "an expired approval cannot be granted: {body}");
    assert_eq!(proxy.metric("portcullis_approvals_expired").await, 1);
    let again = s.pay(&proxy, 1).await;
    again.assert_refused(403, "approval_required");
    assert_ne!(again.json()["approval_id"], id.as_str());
    assert_eq!(s.pays_seen(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_approvals_fail_closed_and_limits_hold_per_replica() {
    let s = setup().await;
    let dead = free_addr();
    let config = s.config(json!({
        "redis": {"url": format!("redis://{dead}"), "encryption_key": "env:PCX_REDIS_KEY",
                  "timeout": "200ms"},
    }));
    let env = [(
        "PCX_REDIS_KEY",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )];
    let proxy = Proxy::start_with_env(&config, &env);
    let out = s.pay(&proxy, 1).await;
    out.assert_refused(503, "approval_unavailable");
    assert_eq!(s.pays_seen(), 0, "no approval store, no payment");
    for _ in 0..3 {
        assert_eq!(s.get(&proxy, "/limited-hourly").await.status, 200);
    }
    s.get(&proxy, "/limited-hourly")
        .await
        .assert_refused(429, "rate_limited");
    assert!(proxy.metric("portcullis_rate_limit_fallback_total").await >= 4);
    assert!(proxy.metric("portcullis_approval_store_errors_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn action_spans_carry_the_approval_and_the_limit() {
    let s = setup().await;
    let otlp = OtlpReceiver::start().await;
    let config = s.config(json!({
        "telemetry": {"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "http/protobuf"},
    }));
    let proxy = Proxy::start_with_env(&config, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let id = s.pay(&proxy, 2).await.json()["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(cli(&proxy, &["approve", &id]).0);
    assert_eq!(s.pay(&proxy, 2).await.status, 200);
    for _ in 0..3 {
        assert_eq!(s.get(&proxy, "/limited").await.status, 200);
    }
    s.get(&proxy, "/limited")
        .await
        .assert_refused(429, "rate_limited");

    let attr = |span: &opentelemetry_proto::tonic::trace::v1::Span, k| span_attr(span, k);
    let approved = otlp
        .wait_span("the approved POST", |sp| {
            sp.name == "POST"
                && span_attr(sp, "portcullis.approval.state").as_deref() == Some("granted")
        })
        .await;
    assert_eq!(
        attr(&approved, "portcullis.approval.id").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(
        attr(&approved, "portcullis.approval.approver").as_deref(),
        Some("admin")
    );
    assert_eq!(
        attr(&approved, "portcullis.policy.decision").as_deref(),
        Some("allow")
    );
    let pending = otlp
        .wait_span("the refused POST", |sp| {
            sp.name == "POST"
                && span_attr(sp, "portcullis.approval.state").as_deref() == Some("pending")
        })
        .await;
    assert_eq!(
        attr(&pending, "portcullis.approval.id").as_deref(),
        Some(id.as_str())
    );
    let limited = otlp
        .wait_span("the limited GET", |sp| {
            span_attr(sp, "portcullis.rate_limit.name").as_deref() == Some("per-agent")
        })
        .await;
    assert_eq!(
        attr(&limited, "http.response.status_code").as_deref(),
        Some("429")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_in_flight_cap_refuses_a_second_concurrent_request_of_one_identity() {
    let s = setup().await;
    let proxy = Proxy::start(&s.config(json!({"rate_limits": {"in_flight_per_identity": 1}})));
    let slow = s.get(&proxy, "/slow");
    let second = async {
        s.up.slow_arrived().await;
        let out = s.get(&proxy, "/quick").await;
        s.up.release();
        out
    };
    let (first, second) = tokio::join!(slow, second);
    assert_eq!(first.status, 200, "{first:?}");
    second.assert_refused(429, "rate_limited");
    assert_eq!(second.json()["limit"], "in_flight");
    // The slot is free again once the first request is done.
    assert_eq!(s.get(&proxy, "/quick").await.status, 200);
    // Freed when the action ends, which is after the client has the last byte of the answer.
    proxy
        .wait_metric("portcullis_in_flight_requests", |n| n == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_refuses_bad_approval_limit_and_delegation_settings_by_key() {
    let pki = Pki::new();
    for (edit, key) in [
        (
            json!({"rate_limits": {"limits": [{"name": "x", "rate": "10/y"}]}}),
            "rate_limits.limits[0].rate",
        ),
        (
            json!({"rate_limits": {"limits": [{"name": "x", "by": ["tenant"], "rate": "1/s"}]}}),
            "rate_limits.limits[0].by",
        ),
        (
            json!({"approvals": {"approvers": [{"name": "a", "token": "env:PCX_UNSET_APPROVER"}]}}),
            "approvals.approvers[0].token",
        ),
        (
            json!({"approvals": {"webhook": {"url": "ftp://x"}}}),
            "approvals.webhook.url",
        ),
        (
            json!({"delegation": {"issuers": [{"issuer": "https://i", "jwks_file": "missing.json",
                "audiences": ["p"]}]}}),
            "delegation.issuers[0].jwks_file",
        ),
        (
            json!({"delegation": {"issuers": [{"issuer": "https://i", "audiences": ["p"]}]}}),
            "delegation.issuers[0].jwks_url",
        ),
        (
            json!({"delegation": {"header": "authorization", "issuers": []}}),
            "delegation.header",
        ),
    ] {
        let mut cfg = pki.base_config();
        for (k, v) in edit.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let err = check_refuses(&pki, &cfg);
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_covers_the_exact_body_of_a_plain_http_call() {
    let s = setup().await;
    let proxy = Proxy::start(&s.config(json!({})));
    let five = s.pay(&proxy, 5).await.json()["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same method, destination and path with another body is another call.
    let five_thousand = s.pay(&proxy, 5000).await;
    five_thousand.assert_refused(403, "approval_required");
    assert_ne!(five_thousand.json()["approval_id"], five.as_str());
    assert!(cli(&proxy, &["approve", &five]).0);
    // Granting 5 does not let 5000 through; it lets 5 through.
    s.pay(&proxy, 5000)
        .await
        .assert_refused(403, "approval_required");
    assert_eq!(s.pay(&proxy, 5).await.status, 200);
    assert_eq!(s.pays_seen(), 1);
    let (_, rec) = proxy.admin_get(&format!("/approvals/{five}")).await;
    let rec: Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["action"]["body_sha256"].as_str().unwrap().len(), 64);
}
