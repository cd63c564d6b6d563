# Tests for decision.rego. They bring their own data (`with data...`), so they hold for any
# data.yaml: the Kubernetes example ships these two files unchanged with its own data.
package portcullis.decision_test

import data.portcullis.decision
import rego.v1

agent := "spiffe://test.portcullis/agent/research"

agents := {agent: {"hosts": ["mcp.test", "api.test", "*.tools.test"], "tools": ["search_*", "get_status"], "credentials": ["api"]}}

decide(doc) := d if {
	d := decision with input as doc with data.agents as agents with data.denied_tool_prefixes as ["delete_"]
}

identity(id) := {"spiffe_id": id, "trust_domain": split(trim_prefix(id, "spiffe://"), "/")[0]}

connect(id, host) := {"kind": "connect", "identity": identity(id), "destination": {"host": host, "port": 443, "scheme": "https"}}

http(id, host) := {
	"kind": "http",
	"identity": identity(id),
	"destination": {"host": host, "port": 443, "scheme": "https"},
	"request": {"method": "GET", "path": "/", "query": {}, "headers": {}},
}

mcp(method, tool) := object.union(http(agent, "mcp.test"), {"kind": "mcp", "mcp": {"method": method, "tool": tool}})

test_connect_to_allowed_hosts if {
	decide(connect(agent, "mcp.test")).allow
	decide(connect(agent, "API.test")).allow
	decide(connect(agent, "a.tools.test")).allow
}

test_connect_elsewhere_denied if {
	d := decide(connect(agent, "vault"))
	d.allow == false
	startswith(d.reason, "default deny")
	not decide(connect(agent, "tools.test")).allow
}

test_unknown_identity_denied if not decide(connect("spiffe://test.portcullis/agent/other", "mcp.test")).allow

test_empty_input_denied if not decide({}).allow

test_http_with_own_credential if decide(object.union(http(agent, "api.test"), {"credentials": ["api"]})).allow

test_http_with_foreign_credential_denied if {
	decide(object.union(http(agent, "api.test"), {"credentials": ["github"]})) == {"allow": false, "reason": "credential github is not allowed for spiffe://test.portcullis/agent/research"}
}

test_mcp_search_allowed if {
	decide(mcp("tools/call", "search_issues")) == {"allow": true, "reason": "mcp: tool in the identity's allow-list"}
	decide(mcp("tools/call", "get_status")).allow
}

test_mcp_delete_denied if {
	decide(mcp("tools/call", "delete_repo")) == {"allow": false, "reason": "no deletes, ever: delete_repo"}
}

test_mcp_other_tool_denied if {
	decide(mcp("tools/call", "create_issue")) == {"allow": false, "reason": "tool create_issue is not in the identity's allow-list"}
}

test_mcp_protocol_messages_allowed if {
	decide(mcp("initialize", null)).allow
	decide(mcp("tools/list", null)).allow
	decide(mcp("notifications/initialized", null)).allow
}

test_mcp_response_to_server_request_allowed if {
	decide(object.union(http(agent, "mcp.test"), {"kind": "mcp", "mcp": {"response": true}})).allow
}

test_mcp_on_other_host_denied if {
	not decide(object.union(mcp("tools/call", "search_issues"), {"destination": {"host": "evil.test"}})).allow
}
