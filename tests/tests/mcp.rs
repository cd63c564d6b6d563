//! MCP through the proxy with the official MCP Python SDK as both server and client:
//! per-tool-call policy (by tool name, by argument, by identity), denies surfaced to the SDK
//! client as tool errors, denied calls never reaching the server, SSE streamed event by event,
//! and the MCP-only host rules (malformed JSON-RPC, oversized bodies, mixed batches).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Child;

use portcullis::pki::LeafSpec;
use portcullis_tests::*;
use serde_json::{json, Value};

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

research := "spiffe://acme.test/agents/research"

# The transport itself: tunnels, the SSE GET stream, session DELETE.
decision := {"allow": true, "reason": "mcp transport"} if {
	input.kind in {"connect", "http"}
	input.destination.host == "localhost"
}

decision := {"allow": true, "reason": "mcp protocol"} if {
	input.kind == "mcp"
	input.mcp.method != "tools/call"
}

decision := {"allow": true, "reason": "search is read-only"} if {
	input.kind == "mcp"
	startswith(input.mcp.tool, "search_")
}

decision := {"allow": true, "reason": "slow tool"} if {
	input.kind == "mcp"
	input.mcp.tool == "slow_progress"
}

decision := {"allow": true, "reason": "research may file issues in acme"} if {
	input.kind == "mcp"
	input.identity.spiffe_id == research
	input.mcp.tool == "create_issue"
	input.mcp.arguments.owner == "acme"
}

# tools/list shows research the tool it may call with some arguments.
decision := {"allow": true, "reason": "research may see create_issue"} if {
	input.kind == "mcp"
	input.mcp.listing
	input.identity.spiffe_id == research
	input.mcp.tool == "create_issue"
}

decision := {"allow": false, "reason": "no deletes, ever"} if {
	input.kind == "mcp"
	startswith(input.mcp.tool, "delete_")
}
"#;

/// The tool names of a `list_tools` result, sorted.
fn listed_tools(result: &Value) -> Vec<String> {
    let mut tools: Vec<String> = result["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    tools.sort();
    tools
}

struct McpServer {
    child: Child,
    port: u16,
    record: PathBuf,
    /// `/mcp` (Streamable HTTP) or `/sse` (the older HTTP+SSE transport).
    path: &'static str,
}

impl McpServer {
    fn start(pki: &Pki, variant: &str, json_response: bool) -> McpServer {
        let port = free_addr().port();
        McpServer::start_on(pki, port, variant, json_response)
    }

    fn start_on(pki: &Pki, port: u16, variant: &str, json_response: bool) -> McpServer {
        let extra = json_response.then_some("--json-response");
        McpServer::start_with(pki, port, variant, &Vec::from_iter(extra))
    }

    /// `extra`: more mcp_server.py flags (`--transport sse`, `--event-store`, ...).
    fn start_with(pki: &Pki, port: u16, variant: &str, extra: &[&str]) -> McpServer {
        let cert = pki.path("mcp-server.pem");
        let key = pki.path("mcp-server.key");
        pki.upstream_ca
            .issue(&LeafSpec::server(
                &["localhost", "127.0.0.1"],
                std::time::Duration::from_secs(3600),
            ))
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        let record = pki.path(&format!("mcp-record-{port}-{variant}.jsonl"));
        let (child, _) = spawn_ready(
            std::process::Command::new(python())
                .arg(python_script("mcp_server.py"))
                .args(["--port", &port.to_string(), "--variant", variant, "--cert"])
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .arg("--record")
                .arg(&record)
                .args(extra),
            "the MCP server",
        );
        let sse = extra.windows(2).any(|w| w == ["--transport", "sse"]);
        McpServer {
            child,
            port,
            record,
            path: if sse { "/sse" } else { "/mcp" },
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}{}", self.port, self.path)
    }

    /// JSON-RPC messages the server received, in order.
    fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn received_tools(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter_map(|m| m["tool"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    pki: Pki,
    proxy: Proxy,
    server: McpServer,
}

async fn setup(edit: impl FnOnce(&mut Value) + 'static) -> Setup {
    setup_with(false, edit).await
}

/// The harness's proxy and PKI in front of the SDK server instead of its upstream.
async fn setup_with(json_response: bool, edit: impl FnOnce(&mut Value) + 'static) -> Setup {
    let Harness { pki, proxy, .. } = Harness::builder().policy(POLICY).config(edit).start().await;
    let server = McpServer::start(&pki, "v1", json_response);
    Setup { pki, proxy, server }
}

/// Run the official SDK client through the proxy as `client`; one JSON value per op.
async fn mcp_client(s: &Setup, client: &ClientCert, ops: Value) -> Vec<Value> {
    mcp_client_via(&s.pki, &s.server, &s.proxy, client, ops).await
}

async fn mcp_client_via(
    pki: &Pki,
    server: &McpServer,
    proxy: &Proxy,
    client: &ClientCert,
    ops: Value,
) -> Vec<Value> {
    mcp_sdk_client(pki, proxy.addr, client, &server.url(), ops).await
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_are_decided_one_by_one() {
    let s = setup(|_| {}).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let ops = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "bug"}},
        {"op": "call", "tool": "delete_repo", "args": {"owner": "acme", "repo": "web"}},
        {"op": "call", "tool": "create_issue", "args": {"owner": "acme", "repo": "web", "title": "t"}},
        {"op": "call", "tool": "create_issue", "args": {"owner": "evil", "repo": "web", "title": "t"}},
    ]);
    let r = mcp_client(&s, &research, ops).await;
    // tools/list is filtered: delete_repo is never shown.
    let tools = listed_tools(&r[0]);
    assert_eq!(
        tools,
        ["create_issue", "search_issues", "slow_progress"],
        "{r:?}"
    );
    assert_eq!(r[1]["is_error"], false, "{r:?}");
    assert_eq!(r[1]["text"], "found 3 issues for bug");
    // Denied: the SDK client sees a tool error carrying our JSON-RPC error, and the session
    // goes on (the next call works).
    assert_eq!(r[2]["is_error"], true, "{r:?}");
    assert_eq!(r[2]["error"]["code"], -32001);
    assert_eq!(r[2]["error"]["data"]["reason"], "no deletes, ever");
    assert_eq!(
        r[2]["error"]["data"]["trace_id"].as_str().unwrap().len(),
        32
    );
    assert_eq!(r[3]["is_error"], false, "{r:?}");
    // Denied by argument value.
    assert_eq!(r[4]["is_error"], true, "{r:?}");
    assert_eq!(r[4]["error"]["data"]["reason"], "default deny");

    let arrived = s.server.received_tools();
    assert!(arrived.contains(&"search_issues".to_owned()), "{arrived:?}");
    assert!(
        !arrived.contains(&"delete_repo".to_owned()),
        "a denied call reached the server"
    );
    let creates: Vec<Value> = s
        .server
        .received()
        .into_iter()
        .filter(|m| m["tool"] == "create_issue")
        .collect();
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert_eq!(creates[0]["arguments"]["owner"], "acme");

    let denied = s
        .proxy
        .decisions
        .wait_for("the delete decision", |l| l.contains("delete_repo"));
    let d: Value = serde_json::from_str(&denied).unwrap();
    assert_eq!(d["kind"], "mcp");
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["mcp"]["method"], "tools/call");
    assert!(
        !denied.contains("\"web\""),
        "tool arguments must not be logged: {denied}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identities_get_different_tool_rights() {
    let s = setup(|_| {}).await;
    let intern = s.pki.client("intern", "spiffe://acme.test/agents/intern");
    let ops = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "x"}},
        {"op": "call", "tool": "create_issue", "args": {"owner": "acme", "repo": "web", "title": "t"}},
    ]);
    let r = mcp_client(&s, &intern, ops).await;
    let tools = listed_tools(&r[0]);
    assert_eq!(
        tools,
        ["search_issues", "slow_progress"],
        "the intern sees fewer tools: {r:?}"
    );
    assert_eq!(r[0]["cache_scope"], "private", "{r:?}");
    assert_eq!(r[1]["is_error"], false, "{r:?}");
    assert_eq!(r[2]["is_error"], true, "{r:?}");
    assert!(!s
        .server
        .received_tools()
        .contains(&"create_issue".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn tools_list_is_filtered_in_json_responses_too() {
    let s = setup_with(true, |_| {}).await;
    let intern = s.pki.client("intern", "spiffe://acme.test/agents/intern");
    let r = mcp_client(&s, &intern, json!([{"op": "list_tools"}])).await;
    let tools = listed_tools(&r[0]);
    assert_eq!(tools, ["search_issues", "slow_progress"], "{r:?}");
    // Filtered for this identity: never to be cached for another (MCP 2026-07-28).
    assert_eq!(r[0]["cache_scope"], "private", "{r:?}");
}

/// An SDK server that compresses its answers although the proxy asked for `identity`: a
/// `tools/list` answer the proxy must filter cannot be read, so the client gets it as the
/// JSON-RPC error of its request (the session goes on), never the unfiltered list; what needs
/// no filtering (initialize) passes compressed.
#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_tools_list_is_refused_not_passed_unfiltered() {
    let Harness { pki, proxy, .. } = Harness::builder().policy(POLICY).start().await;
    let port = free_addr().port();
    let server = McpServer::start_with(&pki, port, "v1", &["--json-response", "--gzip"]);
    let intern = pki.client("intern", "spiffe://acme.test/agents/intern");
    let ops = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "x"}},
    ]);
    let r = mcp_client_via(&pki, &server, &proxy, &intern, ops).await;
    assert!(r[0]["tools"].is_null(), "an unfiltered list passed: {r:?}");
    let error = r[0]["error"].as_str().unwrap();
    assert!(
        error.contains("McpError") && error.contains("Content-Encoding gzip cannot be filtered"),
        "{r:?}"
    );
    // The SDK lists the tools itself after a call (to validate its result): refused alike.
    assert_eq!(r[1]["is_error"], true, "{r:?}");
    assert!(
        r[1]["error"]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot be filtered"),
        "{r:?}"
    );
    // Both lists, logged as refusals (answered as JSON-RPC errors in an HTTP 200).
    let refused = proxy.wait_access(2, |e| e["error"] == "unsupported_encoding");
    assert!(refused.iter().all(|e| e["status"] == 200), "{refused:?}");
}

/// An event-stream answer whose data a client reads as JSON but the proxy cannot (here a lone
/// surrogate escape, which JavaScript and Python accept and serde_json refuses) cannot be
/// filtered: the stream ends before it, after the events before it went out edited. The same
/// listing without it arrives filtered, so the test tells the two apart.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_the_proxy_cannot_read_ends_the_stream() {
    let h = Harness::builder().policy(POLICY).start().await;
    let intern = h.identity("intern");
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
    let post = |query: &'static str| {
        let url = format!("https://localhost:{}/sse-tools{query}", h.up.port());
        let (h, intern, list) = (&h, &intern, list.clone());
        async move {
            let args = [
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-H",
                "accept: application/json, text/event-stream",
                "--data-binary",
                &list,
                &url,
            ];
            h.curl_as(intern, &args).await
        }
    };
    let clean = post("").await;
    assert!(clean.success, "{clean:?}");
    assert!(clean.body.contains("notifications/progress"), "{clean:?}");
    assert!(clean.body.contains("search_issues"), "{clean:?}");
    assert!(!clean.body.contains("delete_repo"), "{clean:?}");

    let unreadable = post("?surrogate").await;
    assert!(
        !unreadable.success,
        "the stream ended normally: {unreadable:?}"
    );
    assert!(!unreadable.body.contains("delete_repo"), "{unreadable:?}");
    assert!(!unreadable.body.contains("search_issues"), "{unreadable:?}");
}

/// `Mcp-Param-*` headers (MCP 2026-07-28): once the proxy has seen a server list a tool whose
/// schema mirrors a parameter into a header (`x-mcp-header`), a call whose header disagrees
/// with its arguments, or omits it while the arguments have the value, is refused with 400
/// `HeaderMismatch` and never reaches the server; a matching one (Base64 sentinel form too)
/// passes with its header. Before the listing the header is not recognised: forwarded as is.
#[tokio::test(flavor = "multi_thread")]
async fn mcp_param_headers_must_mirror_the_arguments_of_a_listed_tool() {
    let policy = r#"package portcullis
import rego.v1
decision := {"allow": true, "reason": "all"}
"#;
    let h = Harness::builder().policy(policy).start().await;
    let agent = h.identity("research");
    let url = format!("https://localhost:{}/mcp-params", h.up.port());
    let post = |method: &str, region: Option<&str>, header: Option<&str>| {
        let mut body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        let mut headers = vec![
            "content-type: application/json".to_owned(),
            "accept: application/json, text/event-stream".to_owned(),
            "mcp-protocol-version: 2026-07-28".to_owned(),
            format!("mcp-method: {method}"),
        ];
        if method == "tools/call" {
            body["params"]["name"] = json!("query");
            body["params"]["arguments"] = json!({"sql": "select 1"});
            if let Some(r) = region {
                body["params"]["arguments"]["region"] = json!(r);
            }
            headers.push("mcp-name: query".into());
        }
        if let Some(v) = header {
            headers.push(format!("mcp-param-region: {v}"));
        }
        let (h, agent, url) = (&h, &agent, url.clone());
        async move {
            let mut args = vec!["-X".to_owned(), "POST".to_owned()];
            for x in headers {
                args.extend(["-H".to_owned(), x]);
            }
            args.extend(["--data-binary".to_owned(), body.to_string(), url]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            h.curl_as(agent, &args).await
        }
    };
    // Not recognised yet: forwarded untouched, even when it disagrees.
    let out = post("tools/call", Some("us-west1"), Some("eu-north1")).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        out.json()["result"]["params"]["mcp-param-region"],
        "eu-north1"
    );

    let out = post("tools/list", None, None).await;
    assert_eq!(out.status, 200, "{out:?}");
    let forwarded = h.up.seen().len();
    for (region, header, why) in [
        (Some("us-west1"), Some("eu-north1"), "does not match"),
        (Some("us-west1"), None, "is missing"),
        (None, Some("us-west1"), "arguments have no region"),
        (
            Some("us-west1"),
            Some("=?base64?bm9wZQ==?="),
            "does not match",
        ),
    ] {
        let out = post("tools/call", region, header).await;
        out.assert_refused(400, "header_mismatch");
        let error = &out.json()["error"];
        assert_eq!(error["code"], -32020, "{out:?}");
        assert!(
            error["message"].as_str().unwrap().contains(why),
            "{why}: {out:?}"
        );
    }
    assert_eq!(
        h.up.seen().len(),
        forwarded,
        "a mismatched call was forwarded"
    );

    for header in ["us-west1", "=?base64?dXMtd2VzdDE=?="] {
        let out = post("tools/call", Some("us-west1"), Some(header)).await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.json()["result"]["params"]["mcp-param-region"], header);
    }
    // No value, no header: nothing to mirror.
    let out = post("tools/call", None, None).await;
    assert_eq!(out.status, 200, "{out:?}");
}

/// MCP 2026-07-28 mirrors the method and the tool name into `Mcp-Method` and `Mcp-Name` and
/// requires whoever processes the body to refuse a request whose headers disagree with it:
/// refused with 400 and a JSON-RPC `HeaderMismatch` (-32020), never forwarded; headers that
/// match (the name Base64-encoded too) pass to the server, and policy decides on the body.
#[tokio::test(flavor = "multi_thread")]
async fn mcp_headers_that_disagree_with_the_body_are_refused() {
    let s = setup(|_| {}).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let call = |tool: &str| {
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": tool, "arguments": {"query": "x", "owner": "acme", "repo": "web"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
        .to_string()
    };
    let modern = [
        "content-type: application/json",
        "mcp-protocol-version: 2026-07-28",
        "mcp-method: tools/call",
    ];
    let with = |extra: &'static str| {
        let mut h = modern.to_vec();
        h.push(extra);
        h
    };
    // A gateway routing on the header would see an allowed tool; the body deletes a repo.
    let cases = [
        (
            with("mcp-name: search_issues"),
            call("delete_repo"),
            "does not match",
        ),
        (
            modern.to_vec(),
            call("search_issues"),
            "Mcp-Name header is missing",
        ),
        (
            vec!["content-type: application/json", "mcp-name: search_issues"],
            call("delete_repo"),
            "MCP-Protocol-Version header is missing",
        ),
    ];
    for (headers, body, why) in &cases {
        let out = post_as(&s, &research, headers, body.as_bytes()).await;
        out.assert_refused(400, "header_mismatch");
        let answer = out.json();
        assert_eq!(answer["id"], 7, "{answer}");
        assert_eq!(answer["error"]["code"], -32020, "{answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(why),
            "{why}: {answer}"
        );
    }
    let b64 = format!("mcp-name: =?base64?{}?=", base64_encode("search_issues"));
    let mut matching = modern.to_vec();
    matching.push(&b64);
    let out = post_as(&s, &research, &matching, call("search_issues").as_bytes()).await;
    assert_eq!(out.header("x-portcullis-error"), None, "{out:?}");
    assert_eq!(s.server.received_tools(), ["search_issues"]);
    // Matching headers do not make the body's decision: a denied tool stays denied.
    let out = post_as(
        &s,
        &research,
        &with("mcp-name: delete_repo"),
        call("delete_repo").as_bytes(),
    )
    .await;
    assert_eq!(
        out.header("x-portcullis-error").as_deref(),
        Some("policy_denied")
    );
    assert_eq!(s.server.received_tools(), ["search_issues"]);
}

/// A server that announces a changed tool list (`notifications/tools/list_changed`, here on the
/// session's GET stream) with `tool_changes: deny`: calls wait for a fresh listing (whose
/// definitions are checked against their pins) before they go through again.
#[tokio::test(flavor = "multi_thread")]
async fn a_list_changed_announcement_makes_calls_wait_for_a_fresh_listing() {
    let Harness { pki, proxy, .. } = Harness::builder()
        .config(|c| c["mcp"] = json!({"tool_changes": "deny"}))
        .start()
        .await;
    let server = McpServer::start_with(&pki, free_addr().port(), "v1", &["--list-changed"]);
    let research = pki.client("research", "spiffe://acme.test/agents/research");
    let ops = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "change_tools", "args": {}},
    ]);
    let r = mcp_client_via(&pki, &server, &proxy, &research, ops).await;
    assert!(
        listed_tools(&r[0]).contains(&"change_tools".to_owned()),
        "{r:?}"
    );
    assert_eq!(r[1]["text"], "announced", "{r:?}");
    // The announcement travels on the session's GET stream: wait until the proxy saw it.
    proxy.logs.wait_for("the announcement", |l| {
        l.contains("announced a changed tool list")
    });
    let ops = json!([
        {"op": "call", "tool": "search_issues", "args": {"query": "a"}},
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "b"}},
    ]);
    let r = mcp_client_via(&pki, &server, &proxy, &research, ops).await;
    assert_eq!(r[0]["is_error"], true, "{r:?}");
    let reason = r[0]["error"]["data"]["reason"].as_str().unwrap();
    assert!(reason.contains("list the tools again"), "{reason}");
    assert_eq!(r[2]["is_error"], false, "{r:?}");
    assert_eq!(r[2]["text"], "found 3 issues for b", "{r:?}");
    let calls: Vec<_> = server
        .received()
        .into_iter()
        .filter(|m| m["tool"] == "search_issues")
        .map(|m| m["arguments"]["query"].clone())
        .collect();
    assert_eq!(calls, [json!("b")], "the refused call was forwarded");
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_progress_is_streamed_not_buffered() {
    let s = setup(|_| {}).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let ops = json!([{"op": "call_progress", "tool": "slow_progress", "args": {"steps": 4}}]);
    let r = mcp_client(&s, &research, ops).await;
    assert_eq!(r[0]["text"], "done", "{r:?}");
    let times: Vec<f64> = r[0]["progress_times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 4, "{r:?}");
    // The server sends them 300 ms apart; buffering would deliver them together at the end.
    assert!(
        times[3] - times[0] > 0.6,
        "progress arrived in a burst: {times:?}"
    );
}

async fn post(s: &Setup, client: &ClientCert, body: &str) -> CurlOut {
    curl(
        &s.pki,
        s.proxy.addr,
        Some(client),
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            "accept: application/json, text/event-stream",
            "--data-binary",
            body,
            &s.server.url(),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_only_hosts_refuse_what_cannot_be_inspected() {
    let s = setup(|c| {
        c["mcp"] = json!({"servers": ["localhost"]});
        c["limits"] = json!({"inspect_body_bytes": 2048});
    })
    .await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");

    let out = post(&s, &research, "this is not json").await;
    out.assert_refused(400, "bad_request");

    let padded = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "delete_repo", "arguments": {"pad": "x".repeat(4096)}}});
    let out = post(&s, &research, &padded.to_string()).await;
    out.assert_refused(413, "body_too_large");

    // A batch with one denied call: every id is answered, nothing is forwarded.
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_issues", "arguments": {"query": "q"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_repo", "arguments": {}}},
    ]);
    let out = post(&s, &research, &batch.to_string()).await;
    out.assert_refused(200, "policy_denied");
    let answers = out.json();
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0]["id"], 1);
    assert!(answers[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not forwarded"));
    assert_eq!(answers[1]["id"], 2);
    assert_eq!(answers[1]["error"]["data"]["reason"], "no deletes, ever");

    // A body of only a JSON-RPC response is decided too (the policy has no rule for
    // `input.mcp.response`, so default deny): dropped with 202, nothing forwarded.
    let response = json!({"jsonrpc": "2.0", "id": 9, "result": {"exfiltrated": "data"}});
    let out = post(&s, &research, &response.to_string()).await;
    out.assert_refused(202, "policy_denied");

    // A denied notification is dropped (202, nothing forwarded).
    let note = json!({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_repo"}});
    let out = post(&s, &research, &note.to_string()).await;
    assert_eq!(out.status, 202, "{out:?}");
    assert!(s.server.received().is_empty(), "{:?}", s.server.received());
}

/// POST `body` through the proxy with exactly `headers` (curl's own content type removed).
async fn post_as(s: &Setup, client: &ClientCert, headers: &[&str], body: &[u8]) -> CurlOut {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = s.pki.path(&format!("body-{n}.bin"));
    std::fs::write(&file, body).unwrap();
    let data = format!("@{}", file.display());
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "content-type:",
        "-H",
        "accept: application/json, text/event-stream",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    let url = s.server.url();
    args.extend(["--data-binary", &data, &url]);
    curl(&s.pki, s.proxy.addr, Some(client), &args).await
}

/// Fail closed where parsing stops: a denied tools/call is decided as MCP whatever its label
/// says, and a body the proxy cannot read exactly as the server would is refused. On a host
/// that is not declared MCP-only, which is where these used to pass as plain HTTP.
#[tokio::test(flavor = "multi_thread")]
async fn a_tool_call_is_decided_whatever_its_label_and_refused_where_unreadable() {
    let s = setup(|c| c["limits"] = json!({"inspect_body_bytes": 2048})).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let call = |args: Value| {
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "delete_repo", "arguments": args}})
        .to_string()
    };

    // The official SDK server takes a content-type list with application/json in it.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}});
    let mut direct = tokio::process::Command::new("curl");
    direct
        .args([
            "-sS",
            "--max-time",
            "20",
            "-D",
            "-",
            "-o",
            "-",
            "-X",
            "POST",
        ])
        .args(["-H", "content-type: application/json, text/plain"])
        .args(["-H", "accept: application/json, text/event-stream"])
        .arg("--cacert")
        .arg(s.pki.path("upstream-ca.pem"))
        .args(["--data-binary", &init.to_string(), &s.server.url()]);
    clear_proxy_env(direct.as_std_mut());
    let out = run_curl(direct).await;
    assert_eq!(out.status, 200, "the SDK server takes the list: {out:?}");

    let body = call(json!({"owner": "acme"}));
    for (what, headers) in [
        (
            "a content-type list",
            &["content-type: application/json, text/plain"][..],
        ),
        ("text/plain", &["content-type: text/plain"][..]),
        ("no content type", &[][..]),
        (
            "a parameterised upper-case type",
            &["content-type: Application/JSON; charset=utf-8"][..],
        ),
    ] {
        let out = post_as(&s, &research, headers, body.as_bytes()).await;
        assert_eq!(out.status, 200, "{what}: {out:?}");
        assert_eq!(
            out.header("x-portcullis-error").as_deref(),
            Some("policy_denied"),
            "{what}: {out:?}"
        );
        assert_eq!(
            out.json()["error"]["data"]["reason"],
            "no deletes, ever",
            "{what}"
        );
    }

    // Compressed: the bytes are not what the server parses.
    let gzipped = gzip_bytes(body.as_bytes());
    let headers = ["content-type: application/json", "content-encoding: gzip"];
    let out = post_as(&s, &research, &headers, &gzipped).await;
    out.assert_refused(415, "unsupported_encoding");

    // JSON a server may read but this parser cannot: refused, never plain HTTP.
    let nested = format!("{}1{}", "[".repeat(150), "]".repeat(150));
    let deep = call(json!({"a": "NESTED"})).replace("\"NESTED\"", &nested);
    let lone = call(json!({"a": "LONE"})).replace("LONE", "\\ud800");
    for (what, bad) in [("nested 150 deep", &deep), ("a lone surrogate", &lone)] {
        let out = post_as(&s, &research, &["content-type: text/plain"], bad.as_bytes()).await;
        assert_eq!(out.status, 400, "{what}: {out:?}");
        assert_eq!(
            out.header("x-portcullis-error").as_deref(),
            Some("bad_request"),
            "{what}"
        );
    }

    // Padded past limits.inspect_body_bytes: JSON-RPC shows in its head, so it is refused.
    let padded = call(json!({"pad": "x".repeat(4096)}));
    let out = post_as(
        &s,
        &research,
        &["content-type: text/plain"],
        padded.as_bytes(),
    )
    .await;
    out.assert_refused(413, "body_too_large");

    // JSON-RPC that shows only past the limit: the rest is scanned as it streams, and the body
    // stops before the "jsonrpc" member reaches the server. (Padded well past what one read of
    // the body returns, so the member is not in the head.)
    let pad = "x".repeat(256 * 1024);
    let late_member = format!(
        r#"{{"pad":"{pad}","jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"delete_repo","arguments":{{}}}}}}"#
    );
    let late_start = format!("{}{}", " ".repeat(256 * 1024), call(json!({})));
    for (what, body) in [
        ("a late member", &late_member),
        ("leading spaces", &late_start),
    ] {
        let out = post_as(
            &s,
            &research,
            &["content-type: application/json"],
            body.as_bytes(),
        )
        .await;
        assert_eq!(out.status, 413, "{what}: {out:?}");
        assert_eq!(
            out.header("x-portcullis-error").as_deref(),
            Some("body_too_large"),
            "{what}"
        );
    }
    // A large JSON body with no top-level "jsonrpc" member is plain HTTP: it goes on.
    let plain = format!(r#"{{"pad":"{pad}","nested":{{"jsonrpc":"2.0"}}}}"#);
    let out = post_as(
        &s,
        &research,
        &["content-type: application/json"],
        plain.as_bytes(),
    )
    .await;
    assert_eq!(out.header("x-portcullis-error"), None, "{out:?}");

    let tools = s.server.received_tools();
    assert!(!tools.contains(&"delete_repo".to_owned()), "{tools:?}");
}

/// A JSON-RPC batch over `mcp.max_batch` messages is refused whole (413), never decided
/// message by message without bound.
#[tokio::test(flavor = "multi_thread")]
async fn batches_over_the_limit_are_refused() {
    let s = setup(|c| c["mcp"] = json!({"max_batch": 3})).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let batch = |n: usize| {
        Value::from(
            (0..n)
                .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "tools/list"}))
                .collect::<Vec<_>>(),
        )
        .to_string()
    };
    let out = post(&s, &research, &batch(4)).await;
    out.assert_refused(413, "body_too_large");
    assert!(
        out.json()["reason"]
            .as_str()
            .unwrap()
            .contains("mcp.max_batch"),
        "{out:?}"
    );
    // Within the limit the batch is decided per message and goes on.
    let out = post(&s, &research, &batch(3)).await;
    assert_eq!(out.header("x-portcullis-error"), None, "{out:?}");
}

/// Tool pins are bounded per server: a server that lists more tools than its share gets the
/// rest treated as changed (hidden with `tool_changes: deny`), not an unbounded pin map.
#[tokio::test(flavor = "multi_thread")]
async fn pins_are_bounded_and_tools_without_room_count_as_changed() {
    let s = setup(|c| c["mcp"] = json!({"tool_changes": "deny", "max_pins_per_server": 2})).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let r = mcp_client(&s, &research, json!([{"op": "list_tools"}])).await;
    let tools = listed_tools(&r[0]);
    assert!(tools.len() <= 2, "only pinned tools are shown: {tools:?}");
    assert_eq!(s.proxy.metric("portcullis_mcp_pins").await, 2);
    assert!(s.proxy.metric("portcullis_mcp_pins_refused_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_tool_definitions_are_pinned_and_denied_until_accepted() {
    let mut s = setup(|c| c["mcp"] = json!({"tool_changes": "deny"})).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let list_and_search = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "q"}},
    ]);
    let r = mcp_client(&s, &research, list_and_search.clone()).await;
    assert_eq!(r[0]["descriptions"]["search_issues"], "Search issues");
    assert_eq!(r[1]["is_error"], false);

    // The server is replaced by one whose search_issues description changed (a rug pull).
    let port = s.server.port;
    let _ = s.server.child.kill();
    let _ = s.server.child.wait();
    s.server = McpServer::start_on(&s.pki, port, "v2", false);
    let r = mcp_client(&s, &research, list_and_search.clone()).await;
    let tools = listed_tools(&r[0]);
    assert!(
        !tools.contains(&"search_issues".to_owned()),
        "a changed tool is hidden: {r:?}"
    );
    assert_eq!(r[1]["is_error"], true, "{r:?}");
    assert!(
        r[1]["error"]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("changed"),
        "{r:?}"
    );
    assert!(!s
        .server
        .received_tools()
        .contains(&"search_issues".to_owned()));
    s.proxy.logs.wait_for("the change warning", |l| {
        l.contains("tool definition changed")
    });

    // The operator reviews and accepts the new definition.
    let (status, pins) = s.proxy.admin_get("/mcp/pins").await;
    assert_eq!(status, 200);
    assert!(pins.contains("search_issues"), "{pins}");
    let accept = format!("/mcp/pins/accept?server=localhost:{port}&tool=search_issues");
    assert_eq!(s.proxy.admin_request("POST", &accept).await.0, 200);
    let r = mcp_client(&s, &research, list_and_search).await;
    assert_eq!(
        r[0]["descriptions"]["search_issues"],
        "Search issues (v2: now also exfiltrates)"
    );
    assert_eq!(r[1]["is_error"], false, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_older_http_sse_transport_streams_through_and_denies_arrive_on_its_stream() {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let port = free_addr().port();
    let server = McpServer::start_with(&pki, port, "v1", &["--transport", "sse"]);
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let research = pki.client("research", "spiffe://acme.test/agents/research");
    let ops = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "bug"}},
        {"op": "call_progress", "tool": "slow_progress", "args": {"steps": 4}},
        // On this transport answers travel on the GET stream: the proxy puts the deny there.
        {"op": "call", "tool": "delete_repo", "args": {"owner": "acme", "repo": "x"}, "timeout": 20},
        {"op": "call", "tool": "search_issues", "args": {"query": "after"}},
    ]);
    let r = mcp_client_via(&pki, &server, &proxy, &research, ops).await;
    // The listing arrives on the GET stream, filtered like a Streamable HTTP one: no
    // delete_repo for anyone.
    assert_eq!(
        listed_tools(&r[0]),
        ["create_issue", "search_issues", "slow_progress"],
        "{r:?}"
    );
    assert_eq!(r[1]["is_error"], false, "{r:?}");
    assert_eq!(r[1]["text"], "found 3 issues for bug");
    let times: Vec<f64> = r[2]["progress_times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 4, "{r:?}");
    assert!(
        times[3] - times[0] > 0.6,
        "progress must stream through: {times:?}"
    );
    assert_eq!(r[3]["is_error"], true, "{r:?}");
    assert_eq!(
        r[3]["error"]["code"], -32001,
        "the deny itself, not a timeout: {r:?}"
    );
    assert_eq!(r[3]["error"]["data"]["reason"], "no deletes, ever", "{r:?}");
    // The stream stays usable after a delivered deny.
    assert_eq!(r[4]["is_error"], false, "{r:?}");
    assert!(!server.received_tools().contains(&"delete_repo".to_owned()));
    proxy.decisions.wait_for("the delete_repo deny", |l| {
        l.contains("delete_repo") && l.contains("\"deny\"")
    });
}

/// The older transport's denials travel on the client's GET stream, through a bounded queue
/// (`mcp.sse_queue`): a client that opens the stream and stops reading it cannot make the
/// proxy hold denials without bound. Once the stream's socket buffers and the queue are full, a
/// denied POST is answered 503 `overloaded` itself, counted in /metrics, and nothing is
/// forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn denials_for_a_stream_nobody_reads_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Harness { pki, proxy, .. } = Harness::builder()
        .policy(POLICY)
        .config(|c| c["mcp"] = json!({"sse_queue": 2}))
        .start()
        .await;
    let port = free_addr().port();
    let server = McpServer::start_with(&pki, port, "v1", &["--transport", "sse"]);
    let research = pki.client("research", "spiffe://acme.test/agents/research");
    let target = format!("localhost:{port}");

    // Open the stream, read up to the endpoint event, then never read again.
    let mut stream = raw_tunnel(&pki, proxy.addr, &research, &target).await;
    let get = format!("GET /sse HTTP/1.1\r\nHost: {target}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(get.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let endpoint = loop {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the endpoint event")
            .unwrap();
        assert!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(at) = text.find("data: /messages/") {
            let rest = &text[at + "data: ".len()..];
            if let Some(end) = rest.find(['\r', '\n']) {
                break rest[..end].to_owned();
            }
        }
    };

    // Denied calls with large ids (each denial event carries its id): the unread stream's
    // socket buffers fill, then the queue of two, then the POST itself says so.
    let id = "x".repeat(256 * 1024);
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "delete_repo", "arguments": {}}})
    .to_string();
    let post = format!(
        "POST {endpoint} HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut statuses = Vec::new();
    for _ in 0..200 {
        let r = raw_in_tunnel(&pki, proxy.addr, &research, &target, &post).await;
        statuses.push(r.status);
        if r.status == 503 {
            assert!(
                r.head.contains("x-portcullis-error: overloaded"),
                "{}",
                r.head
            );
            assert!(r.body.contains("mcp.sse_queue"), "{}", r.body);
            break;
        }
        assert_eq!(r.status, 202, "a delivered denial: {}", r.head);
    }
    assert_eq!(statuses.last(), Some(&503), "never bounded: {statuses:?}");
    assert!(
        statuses.len() > 2,
        "bounded before the queue could fill: {statuses:?}"
    );
    let (_, metrics) = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains("portcullis_mcp_sse_queue_full_total 1"),
        "{metrics}"
    );
    assert!(!server.received_tools().contains(&"delete_repo".to_owned()));
    drop(stream);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_stream_resumes_with_last_event_id() {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let port = free_addr().port();
    let server = McpServer::start_with(&pki, port, "v1", &["--event-store"]);
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let research = pki.client("research", "spiffe://acme.test/agents/research");
    let out = tokio::process::Command::new(python())
        .arg(python_script("mcp_resume.py"))
        .args(["--url", &server.url()])
        .args(["--proxy", &format!("https://{}", proxy.addr)])
        .arg("--proxy-ca")
        .arg(pki.path("acme-ca.pem"))
        .arg("--cert")
        .arg(&research.cert)
        .arg("--key")
        .arg(&research.key)
        .arg("--ca")
        .arg(pki.path("mitm-ca.pem"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["first"]["params"]["progress"], 1.0, "{v}");
    let replayed = v["replayed"].as_array().unwrap();
    let progress: Vec<_> = replayed
        .iter()
        .filter_map(|e| e["message"]["params"]["progress"].as_f64())
        .collect();
    assert_eq!(
        progress,
        [2.0, 3.0, 4.0],
        "events after Last-Event-ID only: {v}"
    );
    let last = &replayed.last().unwrap()["message"];
    assert_eq!(last["id"], 2);
    assert_eq!(last["result"]["content"][0]["text"], "done", "{v}");
    // Both the call and the resuming GET went through the pipeline.
    let e = proxy.wait_access(1, |e| e["method"] == "GET");
    assert_eq!(e[0]["status"], 200);
}

/// Wait (bounded) until `cond` holds for the proxy's `/mcp/pins` listing.
async fn wait_pins(proxy: &Proxy, what: &str, cond: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, body) = proxy.admin_get("/mcp/pins").await;
        let pins: Value = serde_json::from_str(&body).unwrap();
        if cond(&pins) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {pins}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_tool_pins_through_redis() {
    let redis = RedisServer::start();
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let mut server = McpServer::start(&pki, "v1", false);
    let mut cfg = pki.base_config();
    cfg["mcp"] = json!({"tool_changes": "deny"});
    cfg["redis"] = json!({"url": redis.url(), "encryption_key": "env:PCX_REDIS_KEY"});
    let config = pki.write_config(&cfg);
    let env = [(
        "PCX_REDIS_KEY",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )];
    let a = Proxy::start_with_env(&config, &env);
    let b = Proxy::start_with_env(&config, &env);
    let research = pki.client("research", "spiffe://acme.test/agents/research");
    let list_and_search = json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "search_issues", "args": {"query": "q"}},
    ]);

    // A sees v1 first: that is the pin for every replica.
    let r = mcp_client_via(&pki, &server, &a, &research, list_and_search.clone()).await;
    assert_eq!(r[1]["is_error"], false, "{r:?}");
    let tool_pinned_on = |pins: &Value| {
        pins.as_array()
            .unwrap()
            .iter()
            .any(|p| p["tool"] == "search_issues" && p["changed_to"].is_null())
    };
    wait_pins(&b, "B learns A's pin", tool_pinned_on).await;

    // Rug pull. B never saw v1 itself, yet hides and refuses the changed tool.
    let port = server.port;
    let _ = server.child.kill();
    let _ = server.child.wait();
    server = McpServer::start_on(&pki, port, "v2", false);
    let r = mcp_client_via(&pki, &server, &b, &research, list_and_search.clone()).await;
    assert!(
        !listed_tools(&r[0]).contains(&"search_issues".to_owned()),
        "{r:?}"
    );
    assert_eq!(r[1]["is_error"], true, "{r:?}");
    assert!(!server
        .received_tools()
        .contains(&"search_issues".to_owned()));

    // Accepted on B: A follows.
    let accept = format!("/mcp/pins/accept?server=localhost:{port}&tool=search_issues");
    assert_eq!(b.admin_request("POST", &accept).await.0, 200);
    // A last saw v1; its next listing shows it v2, which is now the pin.
    mcp_client_via(&pki, &server, &a, &research, json!([{"op": "list_tools"}])).await;
    wait_pins(&a, "A follows B's acceptance", tool_pinned_on).await;
    let r = mcp_client_via(&pki, &server, &a, &research, list_and_search).await;
    assert_eq!(
        r[0]["descriptions"]["search_issues"],
        "Search issues (v2: now also exfiltrates)"
    );
    assert_eq!(r[1]["is_error"], false, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_meta_traceparent_continues_the_trace() {
    let s = setup(|_| {}).await;
    let research = s
        .pki
        .client("research", "spiffe://acme.test/agents/research");
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized",
        "params": {"_meta": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}});
    let out = post(&s, &research, &note.to_string()).await;
    assert_ne!(out.status, 0, "{out:?}");
    let e = s.proxy.wait_access(1, |e| e["kind"] == "mcp");
    assert_eq!(e[0]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    s.proxy
        .decisions
        .wait_for("the decision in the same trace", |l| {
            l.contains("0af7651916cd43dd8448eb211c80319c")
                && l.contains("notifications/initialized")
        });
}

const APPROVAL_POLICY: &str = r#"package portcullis

import rego.v1

default decision := true

decision := {"allow": false, "reason": "issues need a human", "approval": {"ttl": "5m"}} if {
	input.kind == "mcp"
	input.mcp.tool == "create_issue"
	input.approval.state in {"none", "pending"}
}

decision := {"allow": true, "reason": "approved"} if {
	input.kind == "mcp"
	input.mcp.tool == "create_issue"
	input.approval.state == "granted"
}

decision := {"allow": true, "limit": {"name": "search", "key": input.identity.spiffe_id, "rate": "2/h"}} if {
	input.kind == "mcp"
	input.mcp.tool == "search_issues"
}
"#;

/// The approvals pending on `proxy`, polled until there is one.
async fn pending_approval(proxy: &Proxy) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, body) = proxy.admin_get("/approvals?state=pending").await;
        let all: Vec<Value> = serde_json::from_str(&body).unwrap();
        if let Some(first) = all.into_iter().next() {
            return first;
        }
        assert!(std::time::Instant::now() < deadline, "nothing pending");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_client_sees_approvals_and_limits_as_tool_errors_it_can_act_on() {
    let Harness { pki, proxy, .. } = Harness::builder()
        .policy(APPROVAL_POLICY)
        .config(|c| c["approvals"] = json!({"hold": "0s"}))
        .start()
        .await;
    let server = McpServer::start(&pki, "v1", false);
    let agent = pki.client("research", "spiffe://acme.test/agents/research");
    let issue = json!({"op": "call", "tool": "create_issue",
        "args": {"owner": "acme", "repo": "web", "title": "t", "token": "pcx_none"}});
    let search = json!({"op": "call", "tool": "search_issues", "args": {"query": "q"}});
    let r = mcp_client_via(
        &pki,
        &server,
        &proxy,
        &agent,
        json!([{"op": "list_tools"}, issue, search, search, search]),
    )
    .await;
    assert!(
        listed_tools(&r[0]).contains(&"create_issue".to_owned()),
        "listed: {r:?}"
    );
    // Approval required: a tool error naming the approval, the session goes on.
    assert_eq!(r[1]["is_error"], true, "{r:?}");
    let data = &r[1]["error"]["data"];
    assert_eq!(data["error"], "approval_required", "{data}");
    let id = data["approval_id"].as_str().unwrap().to_owned();
    assert!(r[1]["error"]["message"].as_str().unwrap().contains(&id));
    // The rate limit: two searches, then a tool error with the delay to wait.
    assert_eq!(r[2]["is_error"], false, "{r:?}");
    assert_eq!(r[3]["is_error"], false, "{r:?}");
    assert_eq!(r[4]["is_error"], true, "{r:?}");
    assert_eq!(r[4]["error"]["data"]["error"], "rate_limited");
    assert_eq!(r[4]["error"]["data"]["limit"], "search");
    assert!(r[4]["error"]["data"]["retry_after_ms"].as_u64().unwrap() > 1_000_000);
    assert!(!server.received_tools().contains(&"create_issue".to_owned()));

    // The approver sees the tool and its arguments, a secret-looking one redacted.
    let rec = pending_approval(&proxy).await;
    assert_eq!(rec["id"], id.as_str());
    assert_eq!(rec["action"]["tool"], "create_issue");
    assert_eq!(rec["action"]["arguments"]["owner"], "acme");
    assert_eq!(rec["action"]["arguments"]["token"], "[REDACTED]");
    let (status, _) = proxy
        .admin_request("POST", &format!("/approvals/{id}/approve"))
        .await;
    assert_eq!(status, 200);
    // The same call, retried in a new session, goes through once.
    let r = mcp_client_via(&pki, &server, &proxy, &agent, json!([issue, issue])).await;
    assert_eq!(r[0]["is_error"], false, "{r:?}");
    assert_eq!(r[1]["error"]["data"]["error"], "approval_required", "{r:?}");
    assert_ne!(r[1]["error"]["data"]["approval_id"], id.as_str());
    let creates = server
        .received_tools()
        .iter()
        .filter(|t| *t == "create_issue")
        .count();
    assert_eq!(creates, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_sdk_call_completes_when_approved() {
    let Harness { pki, proxy, .. } = Harness::builder()
        .policy(APPROVAL_POLICY)
        .config(|c| c["approvals"] = json!({"hold": "30s"}))
        .start()
        .await;
    let server = McpServer::start(&pki, "v1", false);
    let agent = pki.client("research", "spiffe://acme.test/agents/research");
    let ops = json!([{"op": "call", "tool": "create_issue",
        "args": {"owner": "acme", "repo": "web", "title": "held"}}]);
    let call = mcp_client_via(&pki, &server, &proxy, &agent, ops);
    let approve = async {
        let rec = pending_approval(&proxy).await;
        let id = rec["id"].as_str().unwrap();
        let (status, body) = proxy
            .admin_request("POST", &format!("/approvals/{id}/approve"))
            .await;
        assert_eq!(status, 200, "{body}");
    };
    let (r, ()) = tokio::join!(call, approve);
    assert_eq!(r[0]["is_error"], false, "{r:?}");
    assert!(server.received_tools().contains(&"create_issue".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_grant_covers_the_tool_for_the_rest_of_the_session_only() {
    let policy =
        APPROVAL_POLICY.replace(r#"{"ttl": "5m"}"#, r#"{"ttl": "5m", "scope": "session"}"#);
    let Harness { pki, proxy, .. } = Harness::builder()
        .policy(&policy)
        .config(|c| c["approvals"] = json!({"hold": "30s"}))
        .start()
        .await;
    let server = McpServer::start(&pki, "v1", false);
    let agent = pki.client("research", "spiffe://acme.test/agents/research");
    let call = |title: &str| {
        json!({"op": "call", "tool": "create_issue",
            "args": {"owner": "acme", "repo": "web", "title": title}})
    };
    let ops = json!([call("one"), call("two"), call("three")]);
    let session = mcp_client_via(&pki, &server, &proxy, &agent, ops);
    let approve = async {
        let rec = pending_approval(&proxy).await;
        assert_eq!(rec["scope"], "session");
        let id = rec["id"].as_str().unwrap().to_owned();
        let (status, _) = proxy
            .admin_request("POST", &format!("/approvals/{id}/approve"))
            .await;
        assert_eq!(status, 200);
        id
    };
    let (r, id) = tokio::join!(session, approve);
    for (i, one) in r.iter().enumerate() {
        assert_eq!(one["is_error"], false, "call {i}: {r:?}");
    }
    let (_, all) = proxy.admin_get("/approvals?state=all").await;
    let all: Vec<Value> = serde_json::from_str(&all).unwrap();
    assert_eq!(all.len(), 1, "one grant for the session: {all:?}");
    assert_eq!(all[0]["id"], id.as_str());
    // Another session asks again.
    let r = mcp_client_via(
        &pki,
        &server,
        &proxy,
        &agent,
        json!([{"op": "call", "tool": "create_issue", "timeout": 1,
            "args": {"owner": "acme", "repo": "web", "title": "four"}}]),
    )
    .await;
    let (_, pending) = proxy.admin_get("/approvals?state=pending").await;
    let pending: Vec<Value> = serde_json::from_str(&pending).unwrap();
    assert_eq!(pending.len(), 1, "{r:?}");
    assert_ne!(pending[0]["id"], id.as_str());
}
