//! `portcullis-bench --smoke` against the real proxy binary: every scenario must complete
//! without a single error and the JSON report must hold one row per scenario. No timing is
//! asserted; this only keeps the harness working as the proxy evolves.
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
    for want in ["direct", "tunnel", "mitm", "handshake", "large", "mcp"] {
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
fn unknown_scenario_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .args(["--scenarios", "mitm,warp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario \"warp\""));
}
