package portcullis.methods_test

import data.portcullis.deny
import rego.v1

reporter := "spiffe://acme.test/agents/reporter"

req(kind, id, method) := {"kind": kind, "identity": {"spiffe_id": id}, "request": {"method": method}}

test_read_only_may_get if count(deny) == 0 with input as req("http", reporter, "GET")

test_read_only_may_head if count(deny) == 0 with input as req("http", reporter, "HEAD")

test_read_only_may_not_post if {
	deny == {"read_only: spiffe://acme.test/agents/reporter may only use GET/HEAD, not POST"} with input as req("http", reporter, "POST")
}

test_connect_is_not_method_checked if {
	count(deny) == 0 with input as {"kind": "connect", "identity": {"spiffe_id": reporter}}
}

test_other_identities_are_not_read_only if {
	count(deny) == 0 with input as req("http", "spiffe://acme.test/agents/research", "DELETE")
}

# An MCP request is decided as `kind: http` first (its messages as `kind: mcp` after), so this
# rule also stops a read-only identity's JSON-RPC POST: the proxy asks with this very input.
test_a_read_only_jsonrpc_post_is_denied_as_http if {
	mcp_post := {
		"kind": "http", "identity": {"spiffe_id": reporter},
		"destination": {"host": "mcp.example.com", "port": 443, "scheme": "https"},
		"request": {"method": "POST", "path": "/mcp", "headers": {"content-type": ["application/json"]}},
	}
	deny == {"read_only: spiffe://acme.test/agents/reporter may only use GET/HEAD, not POST"} with input as mcp_post
}

# Its messages are not method-checked: the HTTP decision already was.
test_mcp_messages_are_not_method_checked if {
	count(deny) == 0 with input as {
		"kind": "mcp", "identity": {"spiffe_id": reporter},
		"request": {"method": "POST"}, "mcp": {"method": "tools/list"},
	}
}
