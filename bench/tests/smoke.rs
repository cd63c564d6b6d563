//! `portcullis-bench --smoke` against the real proxy binary: every scenario must complete
//! without a single error and the JSON report must hold one row per scenario; and a 20 s
//! `--soak` through the full pipeline with a real `redis-server` (installed by .ci/run). No
//! timing is asserted; this only keeps the harness working as the proxy evolves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

/// The proxy binary: `PORTCULLIS_BIN` (CI builds it first), else built here.
fn proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PORTCULLIS_BIN") {
        return PathBuf::from(p);
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_portcullis-bench"));
    let path = bench.with_file_name("portcullis");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "portcullis", "--bin", "portcullis"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building the portcullis binary failed");
    path
}

#[test]
fn smoke_run_is_error_free() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .arg("--smoke")
        .arg("--proxy-bin")
        .arg(proxy_bin())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "smoke failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for want in [
        "direct",
        "tunnel",
        "mitm",
        "handshake",
        "large",
        "mcp",
        "ratelimit",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for r in rows {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
    }
    let mitm = rows.iter().find(|r| r["name"] == "mitm").unwrap();
    assert!(mitm["cpu_us_per_req"].as_f64().is_some(), "{mitm}");
    assert!(report["error"].is_null());
}

#[test]
fn soak_smoke_is_error_free() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .args(["--soak", "20s", "--rate", "50", "--soak-interval", "2s"])
        .arg("--proxy-bin")
        .arg(proxy_bin())
        .arg("--out-dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(s["requests"]["errors"], 0, "{s}");
    assert!(s["requests"]["ok"].as_u64().unwrap() >= 900, "{s}");
    for (kind, counts) in s["requests"]["by_kind"].as_object().unwrap() {
        assert!(counts[0].as_u64().unwrap() > 0, "{kind}: {s}");
    }
    let trends = s["trends"].as_array().unwrap();
    let tasks = trends.iter().find(|t| t["series"] == "tasks").unwrap();
    assert!(
        tasks["fit"]["mean"].as_f64().unwrap() > 0.0,
        "tasks not sampled: {s}"
    );
    assert!(
        s["pipeline"]["redis_commands_processed"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert!(
        s["pipeline"]["portcullis_otel_spans_exported_total"]
            .as_u64()
            .unwrap()
            > 0,
        "{s}"
    );
    // One row per 2 s sample after the header.
    let csv = std::fs::read_to_string(dir.path().join("soak.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11, "{csv}");
    let png = std::fs::read(dir.path().join("soak.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
}

#[test]
fn unknown_scenario_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .args(["--scenarios", "mitm,warp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario \"warp\""));
}
