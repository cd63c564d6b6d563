//! Rego policy, end to end: decisions per CONNECT and per request (inside one MITM tunnel),
//! the deny contract, identity-based rules, hot reload under load, keep-last-good, the
//! evaluation limit, redaction of credential headers, and the `policy` CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use portcullis_tests::*;
use serde_json::json;

/// Research may GET anything on localhost; POST to /write is denied with a custom status and
/// header; reporters may not even CONNECT.
const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

research := "spiffe://acme.test/agents/research"

decision := {"allow": true, "reason": "tunnel to localhost"} if {
	input.kind == "connect"
	input.identity.spiffe_id == research
	input.destination.host == "localhost"
}

decision := {"allow": true, "reason": "read"} if {
	input.kind == "http"
	input.identity.spiffe_id == research
	input.request.method == "GET"
	input.request.path != "/echo-auth"
}

decision := {"allow": false, "reason": "writes need review", "status": 451, "headers": {"x-review": "required"}} if {
	input.kind == "http"
	input.request.method == "POST"
}

decision := {"allow": false, "reason": concat(" ", ["saw", input.request.headers.authorization[0]])} if {
	input.request.path == "/echo-auth"
}
"#;

async fn setup(policy: &str, edit: impl FnOnce(&mut serde_json::Value) + 'static) -> Harness {
    Harness::builder().policy(policy).config(edit).start().await
}

#[tokio::test(flavor = "multi_thread")]
async fn per_request_decisions_inside_one_tunnel() {
    let s = setup(POLICY, |_| {}).await;
    let base = format!("https://localhost:{}", s.up.port());
    // One curl, two requests, one connection: GET allowed, then POST denied.
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{num_connects}\n",
    ])
    .args(s.proxy_args(&s.agent))
    .arg(format!("{base}/read"))
    .arg("--next")
    .args([
        "-sS",
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{num_connects}\n",
        "-X",
        "POST",
    ])
    .args(s.proxy_args(&s.agent))
    .arg(format!("{base}/write"));
    let out = cmd.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["200 1", "451 0"],
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.up.seen().len(), 1, "the denied POST reached the upstream");
    assert_eq!(s.up.seen()[0].path, "/read");
    // Both requests came over the same client connection.
    let access = s.proxy.wait_access(2, |e| e["kind"] == "http");
    assert_eq!(access[0]["source"], access[1]["source"]);
    s.proxy.decisions.wait_for("the second http decision", |l| {
        l.contains("writes need review")
    });
    let decisions: Vec<serde_json::Value> = s.proxy.decisions.events();
    let http: Vec<_> = decisions.iter().filter(|d| d["kind"] == "http").collect();
    assert_eq!(http.len(), 2, "{decisions:?}");
    assert_eq!(http[0]["decision"], "allow");
    assert_eq!(http[1]["decision"], "deny");
    assert_eq!(http[1]["reason"], "writes need review");
    assert!(http[1]["policy_revision"].as_str().unwrap().len() >= 12);
    // The same actions, counted in /metrics.
    let (_, metrics) = s.proxy.admin_get("/metrics").await;
    for line in [
        r#"portcullis_requests_total{kind="connect",decision="allow",status="2xx"} 1"#,
        r#"portcullis_requests_total{kind="http",decision="allow",status="2xx"} 1"#,
        r#"portcullis_requests_total{kind="http",decision="deny",status="4xx"} 1"#,
        "portcullis_policy_eval_seconds_count 3",
        "portcullis_upstream_response_seconds_count 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing in:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_contract_with_policy_status_and_headers() {
    let s = setup(POLICY, |_| {}).await;
    let url = s.url("/write");
    let out = s.curl(&["-X", "POST", &url]).await;
    out.assert_refused(451, "policy_denied");
    assert_eq!(out.header("x-review").as_deref(), Some("required"));
    let body = out.json();
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(body["reason"], "writes need review");
    assert_eq!(body["trace_id"].as_str().unwrap().len(), 32);
}

/// An MCP request is an HTTP request too: a body that reads as JSON-RPC is decided as
/// `kind: http` first, so a rule for HTTP requests (no POSTs) cannot be bypassed by adding
/// `"jsonrpc"` to the body, even under a policy that allows every MCP message.
#[tokio::test(flavor = "multi_thread")]
async fn a_jsonrpc_body_does_not_escape_the_http_rules() {
    let policy = format!(
        "{POLICY}\ndecision := {{\"allow\": true, \"reason\": \"any message\"}} if input.kind == \"mcp\"\n"
    );
    let s = setup(&policy, |_| {}).await;
    let url = s.url("/repos/o/r/issues");
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"title":"t"}}"#;
    let out = s
        .curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            &url,
        ])
        .await;
    out.assert_refused(200, "policy_denied");
    let answer = out.json();
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["error"]["data"]["reason"], "writes need review");
    assert!(s.up.seen().is_empty(), "the POST reached the upstream");
    let line = s
        .proxy
        .decisions
        .wait_for("the http decision", |l| l.contains("writes need review"));
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["kind"], "http");
    assert_eq!(line["decision"], "deny");
}

/// Path rules match the normalised path: dot segments (also percent-encoded) and encoded
/// unreserved characters cannot hide `/admin` from a rule; the upstream gets the raw path.
#[tokio::test(flavor = "multi_thread")]
async fn path_rules_see_the_normalised_path() {
    let policy = r#"package portcullis

import rego.v1

default decision := {"allow": true, "reason": "open"}

decision := {"allow": false, "reason": concat(" ", ["admin is off limits:", input.request.path])} if {
	startswith(input.request.normalized_path, "/admin")
}
"#;
    let s = setup(policy, |_| {}).await;
    for raw in [
        "/public/../admin",
        "/public/%2e%2E/admin/x",
        "/%61dmin",
        "/./admin",
    ] {
        let out = s.curl(&["--path-as-is", &s.url(raw)]).await;
        out.assert_refused(403, "policy_denied");
        assert_eq!(
            out.json()["reason"],
            format!("admin is off limits: {raw}"),
            "the policy sees the raw path too"
        );
    }
    assert!(s.up.seen().is_empty(), "{:?}", s.up.seen());
    // Not a dot segment, not unreserved: the path is what it says.
    let out = s.curl(&["--path-as-is", &s.url("/a..dmin/%2Fadmin")]).await;
    assert_eq!(out.status, 200, "{out:?}");
}

/// No decision on a truncated view: what the policy input cannot hold whole is refused, and
/// what it can (thousands of arguments, a long string) is given to the policy whole.
#[tokio::test(flavor = "multi_thread")]
async fn the_policy_decides_on_the_whole_request_or_refuses_it() {
    let policy = r#"package portcullis

import rego.v1

default decision := true

decision := {"allow": false, "reason": "no DROP"} if {
	input.kind == "mcp"
	contains(input.mcp.arguments.sql, "DROP")
}

decision := {"allow": false, "reason": "not prod"} if {
	input.kind == "mcp"
	input.mcp.arguments.target == "prod"
}
"#;
    let s = setup(policy, |_| {}).await;
    let url = s.url("/rpc");
    let post = |body: String| {
        let (s, url) = (&s, url.clone());
        async move {
            s.curl(&[
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
                &url,
            ])
            .await
        }
    };
    let call = |args: serde_json::Value| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "query", "arguments": args}})
        .to_string()
    };
    // 9,000 spaces before DROP: the whole string reaches the policy.
    let out = post(call(
        json!({"sql": format!("{}DROP TABLE t", " ".repeat(9000))}),
    ))
    .await;
    assert_eq!(out.json()["error"]["data"]["reason"], "no DROP", "{out:?}");
    // 4,100 arguments before the one a rule checks.
    let mut args: serde_json::Map<String, serde_json::Value> =
        (0..4100).map(|i| (format!("a{i:05}"), json!(i))).collect();
    args.insert("target".into(), json!("prod"));
    let out = post(call(serde_json::Value::Object(args))).await;
    assert_eq!(out.json()["error"]["data"]["reason"], "not prod", "{out:?}");
    // Deeper than the input can hold: refused, not decided on a cut-off document.
    let mut deep = json!(1);
    for _ in 0..70 {
        deep = json!([deep]);
    }
    let out = post(call(json!({"x": deep}))).await;
    out.assert_refused(413, "body_too_large");
    // More query keys than the input holds: 400 naming the bound.
    let query: Vec<String> = (0..130).map(|i| format!("k{i}=v")).collect();
    let out = s
        .curl(&[&format!("{}?{}", s.url("/read"), query.join("&"))])
        .await;
    assert_eq!(out.status, 400, "{out:?}");
    assert!(
        out.json()["reason"]
            .as_str()
            .unwrap()
            .contains("query keys"),
        "{out:?}"
    );
    assert!(s.up.seen().is_empty(), "{:?}", s.up.seen().len());
}

/// The bounds are configurable (`policy.input_limits`): raised, a request the default refuses
/// is decided whole; lowered, a smaller one is refused naming the configured bound.
#[tokio::test(flavor = "multi_thread")]
async fn the_policy_input_bounds_are_configurable() {
    let policy = r#"package portcullis

import rego.v1

default decision := true

decision := {"allow": false, "reason": "k199 is off"} if input.request.query.k199
"#;
    let s = setup(policy, |c| {
        c["policy"]["input_limits"] = json!({"query_keys": 300, "mcp_depth": 4})
    })
    .await;
    let query: Vec<String> = (0..200).map(|i| format!("k{i}=v")).collect();
    let url = format!("{}?{}", s.url("/read"), query.join("&"));
    let out = s.curl(&[&url]).await;
    out.assert_refused(403, "policy_denied");
    assert_eq!(out.json()["reason"], "k199 is off");
    let out = s
        .curl(&[
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"q","arguments":{"a":{"b":{"c":{}}}}}}"#,
            &s.url("/rpc"),
        ])
        .await;
    assert_eq!(
        out.header("x-portcullis-error").as_deref(),
        Some("body_too_large"),
        "{out:?}"
    );
    assert!(out.body.contains("MCP argument depth over 4"), "{out:?}");
    assert!(s.up.seen().is_empty());
    // Out of range: the proxy does not start.
    let pki = Pki::new();
    let mut cfg = pki.base_config();
    cfg["policy"]["input_limits"] = json!({"mcp_depth": 500});
    let err = check_refuses(&pki, &cfg);
    assert!(err.contains("policy.input_limits.mcp_depth"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn identities_get_different_outcomes() {
    let s = setup(POLICY, |_| {}).await;
    let url = s.url("/read");
    let ok = s.curl(&[&url]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // The reporter is refused at CONNECT: 403 on the tunnel, nothing dialled.
    let req = format!(
        "CONNECT localhost:{0} HTTP/1.1\r\nHost: localhost:{0}\r\n\r\n",
        s.up.port()
    );
    let denied = raw_request(&s.pki, s.proxy.addr, &s.identity("reporter"), &req).await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(
        denied.header("x-portcullis-error").as_deref(),
        Some("policy_denied")
    );
    assert_eq!(denied.json()["reason"], "default deny");
    assert_eq!(s.up.connection_count(), 1);
    s.proxy.decisions.wait_for("the CONNECT deny", |l| {
        l.contains("\"kind\":\"connect\"")
            && l.contains("agents/reporter")
            && l.contains("\"deny\"")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_headers_are_redacted_in_the_policy_input() {
    let s = setup(POLICY, |_| {}).await;
    let url = s.url("/echo-auth");
    let secret = "sk-live-51HzZ";
    let auth = format!("Authorization: Bearer {secret}");
    let out = s.curl(&["-H", &auth, &url]).await;
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "saw Bearer [REDACTED]");
    s.proxy.wait_access(1, |e| e["path"] == "/echo-auth");
    let everything = format!(
        "{}\n{}",
        s.proxy.logs.lines().join("\n"),
        s.proxy.decisions.lines().join("\n")
    );
    assert!(!everything.contains(secret), "the secret leaked into logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_loses_no_request_and_applies_the_new_rule() {
    let s = std::sync::Arc::new(setup(POLICY, |_| {}).await);
    let read = s.url("/read");
    // A bounded loop of requests runs while the policy changes.
    let (s2, read2) = (s.clone(), read.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..200 {
            statuses.push(s2.curl(&[&read2]).await.status);
            if stop2.load(std::sync::atomic::Ordering::SeqCst) && statuses.len() >= 5 {
                break;
            }
        }
        statuses
    });
    s.up.wait_for_requests(3).await;
    let stricter = POLICY.replace(
        "input.request.path != \"/echo-auth\"",
        "input.request.path != \"/secret\"",
    );
    replace_file(&s.pki.path("policy/allow.rego"), &stricter);
    s.proxy
        .logs
        .wait_for("the policy reload", |l| l.contains("reloaded policy"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|&c| c == 200),
        "a request failed during reload: {statuses:?}"
    );
    let secret = s.url("/secret");
    let out = s.curl(&[&secret]).await;
    assert_eq!(out.status, 403, "the new rule did not take effect: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_policies_are_rejected_and_the_last_good_one_serves() {
    let s = setup(POLICY, |_| {}).await;
    let url = s.url("/read");
    let write = s.url("/write");
    // A syntax error.
    replace_file(
        &s.pki.path("policy/allow.rego"),
        "package portcullis\n\ndecision := {\n",
    );
    let err = s
        .proxy
        .logs
        .wait_for("the reload error", |l| l.contains("policy reload failed"));
    assert!(
        err.contains("allow.rego"),
        "the error must name the file: {err}"
    );
    assert_eq!(s.curl(&[&url]).await.status, 200);
    assert_eq!(s.curl(&["-X", "POST", &write]).await.status, 451);
    // A policy whose own tests fail is not served either.
    let failing = format!("{POLICY}\ntest_nothing_is_allowed if {{ not decision.allow with input as {{}} }}\ntest_fails if false\n");
    replace_file(&s.pki.path("policy/allow.rego"), &failing);
    s.proxy.logs.wait_for("the second reload error", |l| {
        l.contains("policy reload failed") && l.contains("test_fails")
    });
    assert_eq!(s.proxy.metric("portcullis_reload_errors_total").await, 2);
    assert_eq!(
        s.proxy
            .metric("portcullis_policy_reload_errors_total")
            .await,
        2
    );
    assert_eq!(s.curl(&[&url]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn runaway_policy_is_stopped_by_the_eval_limit() {
    let heavy = r#"package portcullis

import rego.v1

decision := {"allow": true, "reason": "heavy"} if {
	input.kind == "connect"
}

decision := {"allow": n > 0, "reason": "heavy"} if {
	input.kind == "http"
	n := count([x | some x in numbers.range(1, 90000); x % 7 == 0; y := x * x; y > 0])
}
"#;
    let s = setup(heavy, |c| c["policy"]["max_instructions"] = json!(100_000)).await;
    let url = s.url("/read");
    let out = s.curl(&[&url]).await;
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "policy_eval_limit");
    assert!(s.up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_policy() {
    let s = setup(POLICY, |c| c["reload_interval"] = json!("1h")).await;
    let url = s.url("/read");
    assert_eq!(s.curl(&[&url]).await.status, 200);
    replace_file(
        &s.pki.path("policy/allow.rego"),
        "package portcullis\n\ndecision := false\n",
    );
    s.proxy.signal("HUP");
    s.proxy
        .logs
        .wait_for("the policy reload", |l| l.contains("reloaded policy"));
    assert_eq!(s.curl(&[&url]).await.status, 403);
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples/policies")
}

#[test]
fn policy_test_runs_the_example_tests() {
    let out = Command::new(bin())
        .args(["policy", "test"])
        .arg(examples())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("PASS"), "{text}");
    assert!(!text.contains("FAIL:"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        "package portcullis\n\nimport rego.v1\n\ndecision := false\n\ntest_allows if decision\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["policy", "test"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test_allows"));
}

#[test]
fn policy_eval_prints_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    let doc = json!({
        "kind": "http",
        "identity": {"spiffe_id": "spiffe://acme.test/agents/reporter", "trust_domain": "acme.test", "path": "/agents/reporter", "segments": ["agents", "reporter"]},
        "destination": {"host": "api.github.com", "port": 443, "scheme": "https"},
        "request": {"method": "POST", "path": "/repos/o/r/issues", "query": {}, "headers": {}},
        "time": {"unix": 1763900000, "rfc3339": "2025-11-23T12:13:20Z", "weekday": "Tue", "hour_utc": 10},
    });
    std::fs::write(&input, doc.to_string()).unwrap();
    let out = Command::new(bin())
        .args(["policy", "eval", "--input"])
        .arg(&input)
        .arg("--policy")
        .arg(examples())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], false, "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("read-only")
            || d["reason"].as_str().unwrap().contains("GET"),
        "{d}"
    );
    assert_eq!(d["revision"].as_str().unwrap().len(), 12);
}
