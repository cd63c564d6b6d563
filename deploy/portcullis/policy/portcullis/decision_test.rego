package portcullis.decision_test

import data.portcullis.decision
import rego.v1

agent := "spiffe://demo.portcullis/agent/research"

identity(id) := {"spiffe_id": id, "trust_domain": split(trim_prefix(id, "spiffe://"), "/")[0]}

connect(id, host) := {"kind": "connect", "identity": identity(id), "destination": {"host": host, "port": 8443, "scheme": "https"}}

http(id, host) := {
	"kind": "http",
	"identity": identity(id),
	"destination": {"host": host, "port": 8443, "scheme": "https"},
	"request": {"method": "GET", "path": "/hello", "query": {}, "headers": {}},
}

mcp(method, tool) := object.union(http(agent, "mcp-server"), {"kind": "mcp", "mcp": {"method": method, "tool": tool}})

test_connect_to_allowed_hosts if {
	decision.allow with input as connect(agent, "mcp-server")
	decision.allow with input as connect(agent, "demo-api")
}

test_connect_elsewhere_denied if {
	d := decision with input as connect(agent, "vault")
	d.allow == false
	startswith(d.reason, "default deny")
}

test_unknown_identity_denied if not decision.allow with input as connect("spiffe://demo.portcullis/agent/other", "mcp-server")

test_empty_input_denied if not decision.allow with input as {}

test_http_with_own_credential if {
	decision.allow with input as object.union(http(agent, "demo-api"), {"credentials": ["demo_api"]})
}

test_http_with_foreign_credential_denied if {
	d := decision with input as object.union(http(agent, "demo-api"), {"credentials": ["github"]})
	d == {"allow": false, "reason": "credential github is not allowed for spiffe://demo.portcullis/agent/research"}
}

test_mcp_search_allowed if {
	decision == {"allow": true, "reason": "mcp: tool in the identity's allow-list"} with input as mcp("tools/call", "search_issues")
}

test_mcp_delete_denied if {
	decision == {"allow": false, "reason": "no deletes, ever: delete_repo"} with input as mcp("tools/call", "delete_repo")
}

test_mcp_other_tool_denied if {
	d := decision with input as mcp("tools/call", "create_issue")
	d.allow == false
	d.reason == "tool create_issue is not in the identity's allow-list"
}

test_mcp_protocol_messages_allowed if {
	decision.allow with input as mcp("initialize", null)
	decision.allow with input as mcp("tools/list", null)
	decision.allow with input as mcp("notifications/initialized", null)
}

test_mcp_response_to_server_request_allowed if {
	decision.allow with input as object.union(http(agent, "mcp-server"), {"kind": "mcp", "mcp": {"response": true}})
}
