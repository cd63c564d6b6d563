//! MCP through the proxy with every official SDK on both sides: the Python SDK 1.x and 2.x and
//! the TypeScript SDK 1.x and 2.x, as client and as server, each pair through the proxy's
//! MITM. The 2.x SDKs speak revision 2026-07-28 with each other (no `initialize`, no session,
//! `Mcp-Method`/`Mcp-Name`/`MCP-Protocol-Version` on every request) and fall back to 2025-11-25
//! with a 1.x peer. Whatever the pair, the same calls are decided the same way: the listing is
//! filtered per identity, a denied call is a tool error the client surfaces and never reaches
//! the server, an allowed one arrives with its mirrored headers intact.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_tests::*;
use serde_json::{json, Value};

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

# The transport: tunnels, SSE GET streams, session DELETE.
decision := {"allow": true, "reason": "mcp transport"} if {
	input.kind in {"connect", "http"}
	input.destination.host == "localhost"
}

# Everything but tool calls (initialize, server/discover, tools/list, notifications...).
decision := {"allow": true, "reason": "mcp protocol"} if {
	input.kind == "mcp"
	input.mcp.method != "tools/call"
}

decision := {"allow": true, "reason": "search is read-only"} if {
	input.kind == "mcp"
	startswith(input.mcp.tool, "search_")
}

decision := {"allow": true, "reason": "deletes are confirmed by a human"} if {
	input.kind == "mcp"
	input.mcp.tool == "confirm_delete"
}

decision := {"allow": false, "reason": "no deletes, ever"} if {
	input.kind == "mcp"
	startswith(input.mcp.tool, "delete_")
}
"#;

/// What one client SDK saw of one server SDK through the proxy.
async fn run_pair(h: &Harness, client: Sdk, server: &McpSdkServer) -> Vec<Value> {
    let ops = json!([
        {"op": "session"},
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "bug"}},
        {"op": "call", "tool": "delete_repo", "args": {"owner": "acme", "repo": "web"}},
    ]);
    let agent = h.identity("intern");
    mcp_sdk_client_as(client, &h.pki, h.proxy.addr, &agent, &server.url(), ops).await
}

fn both_modern(client: Sdk, server: Sdk) -> bool {
    let modern = |s| matches!(s, Sdk::Python2 | Sdk::Ts2);
    modern(client) && modern(server)
}

/// Every client SDK against every server SDK (16 pairs), through the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn every_sdk_pair_is_decided_alike_through_the_proxy() {
    let h = Harness::builder().policy(POLICY).start().await;
    for server_sdk in Sdk::ALL {
        let server = McpSdkServer::start_sdk(&h.pki, server_sdk, &[]);
        // The four clients at once: they share nothing but the proxy and the server.
        let results =
            futures_util::future::join_all(Sdk::ALL.map(|c| run_pair(&h, c, &server))).await;
        for (client_sdk, r) in Sdk::ALL.into_iter().zip(results) {
            let pair = format!("{client_sdk:?} client -> {server_sdk:?} server: {r:?}");
            let modern = both_modern(client_sdk, server_sdk);
            let version = r[0]["protocol_version"].as_str().unwrap_or_default();
            match modern {
                true => assert_eq!(version, "2026-07-28", "{pair}"),
                false => assert!(version < "2026-07-28" && !version.is_empty(), "{pair}"),
            }
            // The listing, filtered for this identity (only search_issues allowed).
            let mut tools: Vec<&str> = r[1]["tools"]
                .as_array()
                .unwrap_or_else(|| panic!("{pair}"))
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            tools.sort();
            assert_eq!(tools, ["search_issues"], "{pair}");
            assert_eq!(r[1]["cache_scope"], "private", "{pair}");
            // Allowed: the server's answer.
            assert_eq!(r[2]["is_error"], false, "{pair}");
            assert_eq!(r[2]["text"], "found 3 issues for bug", "{pair}");
            // Denied: a tool error naming the reason, whatever the SDK.
            assert_eq!(r[3]["is_error"], true, "{pair}");
            assert_eq!(
                r[3]["error"]["data"]["reason"], "no deletes, ever",
                "{pair}"
            );
        }
        let received = server.received();
        let calls: Vec<&Value> = received
            .iter()
            .filter(|m| m["method"] == "tools/call")
            .collect();
        assert!(
            calls.iter().all(|m| m["tool"] != "delete_repo"),
            "{server_sdk:?}: a denied call reached the server: {calls:?}"
        );
        // One allowed call per client, each with its mirrored headers when it is 2026-07-28.
        assert_eq!(calls.len(), 4, "{server_sdk:?}: {calls:?}");
        let modern_calls: Vec<&&Value> = calls
            .iter()
            .filter(|m| m["headers"]["mcp-protocol-version"] == "2026-07-28")
            .collect();
        let expected = match server_sdk {
            Sdk::Python2 | Sdk::Ts2 => 2,
            Sdk::Python1 | Sdk::Ts1 => 0,
        };
        assert_eq!(modern_calls.len(), expected, "{server_sdk:?}: {calls:?}");
        for m in modern_calls {
            assert_eq!(m["headers"]["mcp-method"], "tools/call", "{m}");
            assert_eq!(m["headers"]["mcp-name"], "search_issues", "{m}");
        }
    }
}

/// Stateless serving (no `Mcp-Session-Id`, MCP 2026-07-28 makes sessions optional): the same
/// decisions as with a session.
#[tokio::test(flavor = "multi_thread")]
async fn stateless_servers_are_decided_like_sessions() {
    let h = Harness::builder().policy(POLICY).start().await;
    for (server_sdk, client_sdk) in [
        (Sdk::Ts2, Sdk::Ts2),
        (Sdk::Ts1, Sdk::Ts1),
        (Sdk::Ts2, Sdk::Python1),
    ] {
        let server = McpSdkServer::start_sdk(&h.pki, server_sdk, &["--stateless"]);
        let r = run_pair(&h, client_sdk, &server).await;
        let pair = format!("{client_sdk:?} client -> stateless {server_sdk:?} server: {r:?}");
        assert!(r[0]["session_id"].is_null(), "{pair}");
        assert_eq!(r[2]["text"], "found 3 issues for bug", "{pair}");
        assert_eq!(
            r[3]["error"]["data"]["reason"], "no deletes, ever",
            "{pair}"
        );
        assert!(
            server.received().iter().all(|m| m["tool"] != "delete_repo"),
            "{pair}"
        );
    }
}

/// An `InputRequiredResult` round trip (MCP 2026-07-28: the server asks the client for input
/// by answering the call, and the client calls again with `inputResponses`): both calls pass
/// the proxy intact and each is decided on its own, with the Python SDK 2.x on both sides.
#[tokio::test(flavor = "multi_thread")]
async fn input_required_round_trips_pass_and_each_call_is_decided() {
    let h = Harness::builder().policy(POLICY).start().await;
    let server = McpSdkServer::start_sdk(&h.pki, Sdk::Python2, &["--input-required"]);
    let agent = h.identity("intern");
    let args = json!({"owner": "acme", "repo": "web"});
    let ops = json!([
        {"op": "session"},
        {"op": "confirm", "tool": "confirm_delete", "args": args, "answer": true},
        {"op": "confirm", "tool": "confirm_delete", "args": args, "answer": false},
    ]);
    let r = mcp_sdk_client_as(
        Sdk::Python2,
        &h.pki,
        h.proxy.addr,
        &agent,
        &server.url(),
        ops,
    )
    .await;
    assert_eq!(r[0]["protocol_version"], "2026-07-28", "{r:?}");
    assert_eq!(r[1]["text"], "deleted acme/web", "{r:?}");
    assert_eq!(r[1]["asked"].as_array().map(Vec::len), Some(1), "{r:?}");
    assert_eq!(r[2]["text"], "kept acme/web", "{r:?}");
    // Two calls per round trip reached the server, the second with the client's answer.
    let calls: Vec<Value> = server
        .received()
        .into_iter()
        .filter(|m| m["tool"] == "confirm_delete")
        .collect();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls[0]["input_responses"].is_null(), "{calls:?}");
    assert_eq!(
        calls[1]["input_responses"]["confirm"]["content"]["confirm"], true,
        "{calls:?}"
    );
    // Each call was a decision of its own.
    let decided = h
        .proxy
        .decisions
        .wait_count("confirm_delete decisions", 4, |l| {
            l.contains("deletes are confirmed by a human")
        });
    assert_eq!(decided.len(), 4, "{decided:?}");
}
