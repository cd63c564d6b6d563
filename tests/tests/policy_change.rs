//! Changing a policy safely, end to end: a shadow policy decided beside the enforcing one
//! under load (differences counted exactly, errors harmless, hot reload), the decision log's
//! recorded inputs replayed against a changed policy with known differences, and test
//! coverage of the example policies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use portcullis_tests::*;
use serde_json::json;

/// Enforcing: GETs are allowed ("read"), everything else denied.
const ENFORCING: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

decision := {"allow": true, "reason": "tunnel"} if input.kind == "connect"

decision := {"allow": true, "reason": "read"} if {
	input.kind == "http"
	input.request.method == "GET"
}
"#;

/// The candidate: the same, but /admin is off limits, and /boom is a policy failure (two
/// different values for one complete rule: an error, or undefined on regorus's VM).
const CANDIDATE: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

decision := {"allow": true, "reason": "tunnel"} if input.kind == "connect"

decision := {"allow": true, "reason": "read"} if {
	input.kind == "http"
	input.request.method == "GET"
	not startswith(input.request.path, "/admin")
	input.request.path != "/boom"
}

decision := {"allow": false, "reason": "admin is off limits"} if {
	startswith(input.request.path, "/admin")
}

decision := {"allow": true, "reason": "one"} if input.request.path == "/boom"

decision := {"allow": false, "reason": "two"} if input.request.path == "/boom"
"#;

/// A test the candidate keeps passing (shadow policies must pass their tests too).
const CANDIDATE_TEST: &str = r#"package portcullis_test

import rego.v1

test_admin_denied if not data.portcullis.decision.allow with input as {"kind": "http", "request": {"method": "GET", "path": "/admin/x"}}
"#;

fn candidate_dir(pki: &Pki) -> std::path::PathBuf {
    let dir = pki.path("candidate");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("decision.rego"), CANDIDATE).unwrap();
    std::fs::write(dir.join("decision_test.rego"), CANDIDATE_TEST).unwrap();
    dir
}

/// The path of request `i` of a load run: every 5th under /admin, every 7th (from 3) /boom.
fn path_of(i: usize) -> String {
    if i.is_multiple_of(5) {
        format!("/admin/{i}")
    } else if i % 7 == 3 {
        "/boom".into()
    } else {
        format!("/read/{i}")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_policy_is_counted_exactly_under_load_and_never_enforced() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 50;
    let s = Harness::builder()
        .policy(ENFORCING)
        .config(|c| {
            c["policy"]["shadow"] = json!({"paths": ["candidate"]});
        })
        .file("candidate/decision.rego", CANDIDATE)
        .file("candidate/decision_test.rego", CANDIDATE_TEST)
        .start()
        .await;

    // Four curls at once, each 50 GETs on one connection.
    let runs = (0..CLIENTS).map(|c| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "-w", "%{http_code}\n"])
            .args(s.proxy_args(&s.agent));
        for i in 0..PER_CLIENT {
            cmd.args(["-o", "/dev/null"])
                .arg(s.url(&path_of(c * PER_CLIENT + i)));
        }
        async move { cmd.output().await.unwrap() }
    });
    let outs = futures_util::future::join_all(runs).await;
    for out in &outs {
        let codes = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            codes.lines().filter(|c| *c == "200").count(),
            PER_CLIENT,
            "the shadow policy changed traffic: {codes} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let total = CLIENTS * PER_CLIENT;
    let admin = (0..total)
        .filter(|i| path_of(*i).starts_with("/admin"))
        .count();
    let boom = (0..total).filter(|i| path_of(*i) == "/boom").count();
    assert_eq!(
        s.up.seen().len(),
        total,
        "every request reached the upstream"
    );

    let metric = |name: &str| format!("portcullis_policy_shadow_{name}");
    s.proxy
        .wait_metric(&metric("decisions_total{kind=\"http\"}"), |n| {
            n == total as u64
        })
        .await;
    let (_, text) = s.proxy.admin_get("/metrics").await;
    let want = [
        format!("{}{{kind=\"connect\"}} {CLIENTS}", metric("decisions_total")),
        format!(
            "{}{{kind=\"http\",change=\"allow_to_deny\",enforced_reason=\"read\",shadow_reason=\"admin is off limits\"}} {admin}",
            metric("differences_total")
        ),
        format!(
            "{}{{kind=\"http\",change=\"allow_to_deny\",enforced_reason=\"read\",shadow_reason=\"policy_",
            metric("differences_total")
        ),
        format!("{} {boom}", metric("errors_total")),
    ];
    for w in &want {
        assert!(text.contains(w.as_str()), "missing {w:?} in\n{text}");
    }
    let error_line = text
        .lines()
        .find(|l| l.contains("shadow_reason=\"policy_"))
        .unwrap();
    assert!(error_line.ends_with(&format!(" {boom}")), "{error_line}");
    // Exactly these two kinds of difference, nothing for the connects or the plain reads.
    let series = text
        .lines()
        .filter(|l| l.starts_with(&metric("differences_total{")))
        .count();
    assert_eq!(series, 2, "{text}");

    // Every decision-log line says what the shadow decided; exactly admin + boom differ.
    s.proxy
        .decisions
        .wait_for_len(total + CLIENTS, std::time::Instant::now() + WAIT);
    let lines = s.proxy.decisions.events();
    let http: Vec<_> = lines.iter().filter(|l| l["kind"] == "http").collect();
    assert_eq!(http.len(), total);
    assert!(http.iter().all(|l| l["decision"] == "allow"));
    let shadow_revision = http[0]["shadow"]["revision"].as_str().unwrap().to_owned();
    assert_ne!(
        shadow_revision,
        http[0]["policy_revision"].as_str().unwrap()
    );
    let differing: Vec<_> = http
        .iter()
        .filter(|l| l["shadow"]["differs"] == true)
        .collect();
    assert_eq!(differing.len(), admin + boom);
    assert!(differing.iter().all(|l| l["shadow"]["decision"] == "deny"
        && (l["path"].as_str().unwrap().starts_with("/admin") || l["path"] == "/boom")));
    assert!(http
        .iter()
        .all(|l| l["shadow"]["revision"] == shadow_revision.as_str()));
    // Without decision_log_input the lines carry no input.
    assert!(lines.iter().all(|l| l.get("input").is_none()));

    // Hot reload: the candidate, changed to the enforcing policy, is decided from then on; a
    // candidate whose tests fail is not loaded (the last good one stays).
    let dir = s.pki.path("candidate");
    replace_file(&dir.join("decision.rego"), ENFORCING);
    replace_file(&dir.join("decision_test.rego"), "package portcullis_test\n");
    s.proxy.logs.wait_for("the shadow reload", |l| {
        l.contains("reloaded shadow policy")
    });
    replace_file(
        &dir.join("decision_test.rego"),
        "package portcullis_test\nimport rego.v1\ntest_fails if false\n",
    );
    s.proxy.logs.wait_for("the refused shadow reload", |l| {
        l.contains("policy.shadow:") && l.contains("test_fails")
    });
    let out = s.curl(&[&s.url("/admin/again")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let line = s
        .proxy
        .decisions
        .wait_for("the /admin/again decision", |l| l.contains("/admin/again"));
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["shadow"]["differs"], false, "{line}");
    assert_ne!(line["shadow"]["revision"], shadow_revision.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_log_replays_against_a_changed_policy_with_the_expected_differences() {
    let s = Harness::builder()
        .policy(ENFORCING)
        .config(|c| {
            c["telemetry"]["decision_log_input"] = json!(true);
        })
        .start()
        .await;
    // Three reads (one of them /admin), one POST (denied), one read with a credential header.
    for path in ["/read/1", "/admin/users", "/read/2"] {
        assert_eq!(s.curl(&[&s.url(path)]).await.status, 200);
    }
    let out = s.curl(&["-X", "POST", "-d", "x=1", &s.url("/write")]).await;
    out.assert_refused(403, "policy_denied");
    let out = s
        .curl(&[
            "-H",
            "authorization: Bearer sekrit-agent-token-0042",
            &s.url("/read/3"),
        ])
        .await;
    assert_eq!(out.status, 200);
    s.proxy
        .decisions
        .wait_for_len(10, std::time::Instant::now() + WAIT);
    let lines = s.proxy.decisions.lines();
    let http: Vec<serde_json::Value> = s
        .proxy
        .decisions
        .events()
        .into_iter()
        .filter(|l| l["kind"] == "http")
        .collect();
    assert_eq!(http.len(), 5);
    // The input as the engine saw it, credential header redacted, secret nowhere.
    let with_auth = http.iter().find(|l| l["path"] == "/read/3").unwrap();
    assert_eq!(with_auth["input"]["request"]["path"], "/read/3");
    assert_eq!(
        with_auth["input"]["identity"]["spiffe_id"],
        "spiffe://acme.test/agents/research"
    );
    let auth = &with_auth["input"]["request"]["headers"]["authorization"];
    assert!(auth.to_string().contains("REDACTED"), "{auth}");
    assert!(!s.everything_logged().contains("sekrit-agent-token-0042"));

    let log = s.pki.path("decisions.jsonl");
    std::fs::write(&log, lines.join("\n") + "\nnot a decision line\n").unwrap();
    let dir = candidate_dir(&s.pki);
    let replay = |policy: &std::path::Path, json: bool| {
        let mut cmd = Command::new(bin());
        cmd.args(["policy", "replay", "--log"])
            .arg(&log)
            .arg("--policy")
            .arg(policy);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };

    // The candidate denies /admin: exactly one decision changes, allow -> deny.
    let out = replay(&dir, true);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["replayed"], 10, "{report:#}");
    assert_eq!(report["changed"], 1, "{report:#}");
    assert_eq!(report["unchanged"], 9, "{report:#}");
    assert_eq!(report["unreadable"], 1, "{report:#}");
    assert_eq!(report["by_change"], json!({"allow -> deny": 1}));
    assert_eq!(
        report["by_identity"],
        json!({"spiffe://acme.test/agents/research": 1})
    );
    assert_eq!(
        report["by_reason"],
        json!({"\"read\" -> \"admin is off limits\"": 1})
    );
    let example = &report["examples"][0];
    assert_eq!(example["path"], "/admin/users");
    assert_eq!(
        example["old"],
        json!({"decision": "allow", "reason": "read"})
    );
    assert_eq!(
        example["new"],
        json!({"decision": "deny", "reason": "admin is off limits"})
    );
    assert!(report["decisions_per_second"].as_f64().unwrap() > 0.0);

    // The human report says the same.
    let out = replay(&dir, false);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("9 unchanged, 1 changed"), "{text}");
    assert!(text.contains("allow -> deny"), "{text}");
    assert!(text.contains("/admin/users"), "{text}");

    // The enforcing policy itself: nothing changes, exit 0.
    let out = replay(&s.pki.path("policy"), true);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["changed"], 0);

    // A log without inputs cannot be replayed: exit 2 and say why.
    let bare: Vec<String> = http
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l.as_object_mut().unwrap().remove("input");
            l.to_string()
        })
        .collect();
    std::fs::write(&log, bare.join("\n")).unwrap();
    let out = replay(&dir, false);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("decision_log_input"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_input_over_the_line_limit_is_left_out_and_counted() {
    let s = Harness::builder()
        .config(|c| {
            c["telemetry"]["decision_log_input"] = json!(true);
            c["telemetry"]["decision_log_input_max_bytes"] = json!(2048);
        })
        .start()
        .await;
    let big = "v".repeat(4000);
    let out = s.curl(&[&s.url(&format!("/read?q={big}"))]).await;
    assert_eq!(out.status, 200);
    let line = s
        .proxy
        .decisions
        .wait_for("the http decision", |l| l.contains("\"kind\":\"http\""));
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(line.get("input").is_none(), "{line}");
    assert!(line["input_omitted"].as_u64().unwrap() > 4000, "{line}");
    assert_eq!(
        s.proxy
            .metric("portcullis_decision_log_input_omitted_total")
            .await,
        1
    );
}

#[test]
fn coverage_of_the_example_policies_and_of_a_gap() {
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples/policies");
    let out = Command::new(bin())
        .args(["policy", "test", "--coverage", "--json"])
        .arg(&examples)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert!(report["total_lines"].as_u64().unwrap() > 50, "{report:#}");
    assert_eq!(report["covered_lines"], report["total_lines"], "{report:#}");
    let files = report["coverage"]["files"].as_array().unwrap();
    assert!(files
        .iter()
        .any(|f| f["path"].as_str().unwrap().ends_with("hosts.rego")));

    // The candidate's one test stops the read rule at its /admin check (line 12), so the
    // line after it never runs; a helper rule nothing calls is never exercised.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("decision.rego"), CANDIDATE).unwrap();
    std::fs::write(dir.path().join("decision_test.rego"), CANDIDATE_TEST).unwrap();
    std::fs::write(
        dir.path().join("extra.rego"),
        "package portcullis.extra

import rego.v1

unused if input.never == 1
",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["policy", "test", "--coverage"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PASS: 1/1"), "{text}");
    assert!(text.contains("COVERAGE"), "{text}");
    let mut files = text.lines().skip_while(|l| *l != "COVERAGE");
    let decision = files
        .find(|l| l.contains("/decision.rego  ("))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(!decision.trim_start().starts_with("100.0%"), "{text}");
    let gaps = files.next().unwrap();
    assert!(
        gaps.trim_start().starts_with("not covered: lines"),
        "{text}"
    );
    assert!(
        gaps.split([' ', ',']).any(|n| n == "13"),
        "line 13 never ran: {text}"
    );
    assert!(
        text.contains("rule not exercised: data.portcullis.extra.unused (line 5)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_action_span_says_what_the_shadow_decided() {
    let otlp = OtlpReceiver::start().await;
    let endpoint = otlp.endpoint();
    let s = Harness::builder()
        .policy(ENFORCING)
        .file("candidate/decision.rego", CANDIDATE)
        .config(move |c| {
            c["policy"]["shadow"] = json!({"paths": ["candidate"]});
            c["telemetry"] = json!({"otlp_endpoint": endpoint, "otlp_protocol": "http/protobuf"});
        })
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    for path in ["/admin/x", "/read/y"] {
        assert_eq!(s.curl(&[&s.url(path)]).await.status, 200);
    }
    let attr = |span: &_, key: &str| span_attr(span, &format!("portcullis.policy.{key}"));
    let admin = otlp
        .wait_span("GET /admin/x", |sp| {
            sp.kind == 2 /* SERVER */ && span_attr(sp, "url.full").is_some_and(|u| u.ends_with("/admin/x"))
        })
        .await;
    assert_eq!(attr(&admin, "decision").as_deref(), Some("allow"));
    assert_eq!(attr(&admin, "shadow.decision").as_deref(), Some("deny"));
    assert_eq!(
        attr(&admin, "shadow.reason").as_deref(),
        Some("admin is off limits")
    );
    assert_eq!(attr(&admin, "shadow.differs").as_deref(), Some("true"));
    let revision = attr(&admin, "shadow.revision").unwrap();
    assert_ne!(Some(revision), attr(&admin, "revision"));
    let read = otlp
        .wait_span("GET /read/y", |sp| {
            sp.kind == 2 /* SERVER */ && span_attr(sp, "url.full").is_some_and(|u| u.ends_with("/read/y"))
        })
        .await;
    assert_eq!(attr(&read, "shadow.decision").as_deref(), Some("allow"));
    assert_eq!(attr(&read, "shadow.differs").as_deref(), Some("false"));
}

/// A candidate that does not load never keeps the proxy from serving: `check` refuses the
/// config, `serve` runs without a shadow (`portcullis_policy_shadow_loaded 0`) and picks the
/// candidate up once it is fixed.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_candidate_is_refused_by_check_and_never_stops_serving() {
    let failing_test = "package portcullis_test\nimport rego.v1\ntest_fails if false\n";
    let s = Harness::builder()
        .policy(ENFORCING)
        .file("candidate/decision.rego", CANDIDATE)
        .file("candidate/decision_test.rego", failing_test)
        .config(|c| c["policy"]["shadow"] = json!({"paths": ["candidate"]}))
        .start()
        .await;
    let mut cfg = s.pki.base_config();
    cfg["policy"]["shadow"] = json!({"paths": ["candidate"]});
    let err = check_refuses(&s.pki, &cfg);
    assert!(
        err.contains("policy.shadow") && err.contains("test_fails"),
        "{err}"
    );

    assert_eq!(s.curl(&[&s.url("/admin/1")]).await.status, 200);
    assert_eq!(s.proxy.metric("portcullis_policy_shadow_loaded").await, 0);
    let line = s
        .proxy
        .decisions
        .wait_for("the first decision", |l| l.contains("/admin/1"));
    assert!(!line.contains("\"shadow\""), "{line}");

    replace_file(&s.pki.path("candidate/decision_test.rego"), CANDIDATE_TEST);
    s.proxy
        .wait_metric("portcullis_policy_shadow_loaded", |n| n == 1)
        .await;
    assert_eq!(s.curl(&[&s.url("/admin/2")]).await.status, 200);
    let line = s
        .proxy
        .decisions
        .wait_for("the second decision", |l| l.contains("/admin/2"));
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["shadow"]["reason"], "admin is off limits", "{line}");
}
