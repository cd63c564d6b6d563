# The stack's own data: what docker-compose.yml's agent may do (deploy/agent/agent.py
# expects exactly this).
package portcullis.data_test

import data.portcullis.decision
import rego.v1

research := "spiffe://demo.portcullis/agent/research"

req(kind, host, mcp) := {
	"kind": kind,
	"identity": {"spiffe_id": research, "trust_domain": "demo.portcullis"},
	"destination": {"host": host, "port": 8443, "scheme": "https"},
	"mcp": mcp,
}

test_agent_reaches_the_demo_upstreams_only if {
	decision.allow with input as req("connect", "mcp-server", null)
	decision.allow with input as req("connect", "demo-api", null)
	not decision.allow with input as req("connect", "vault", null)
}

test_agent_tools if {
	decision.allow with input as req("mcp", "mcp-server", {"method": "tools/call", "tool": "search_issues"})
	not decision.allow with input as req("mcp", "mcp-server", {"method": "tools/call", "tool": "create_issue"})
	not decision.allow with input as req("mcp", "mcp-server", {"method": "tools/call", "tool": "delete_repo"})
}

test_agent_may_use_the_demo_api_credential if {
	decision.allow with input as object.union(req("http", "demo-api", null), {"credentials": ["demo_api"]})
}
