package portcullis.decision_test

import data.portcullis.decision
import rego.v1

research := "spiffe://acme.test/agents/research"

reporter := "spiffe://acme.test/agents/reporter"

identity(id) := {"spiffe_id": id, "trust_domain": split(trim_prefix(id, "spiffe://"), "/")[0]}

friday_noon := {"unix": 1763726400, "rfc3339": "2025-11-21T12:00:00Z", "weekday": "Fri", "hour_utc": 12}

http(id, method, host) := {
	"kind": "http",
	"identity": identity(id),
	"destination": {"host": host, "port": 443, "scheme": "https"},
	"request": {"method": method, "path": "/", "query": {}, "headers": {}},
	"time": friday_noon,
}

connect(id, host) := {
	"kind": "connect",
	"identity": identity(id),
	"destination": {"host": host, "port": 443, "scheme": "https"},
	"time": friday_noon,
}

test_allow_names_the_allow_list if {
	decision == {"allow": true, "reason": "agents: host in the identity's allow-list"} with input as http(research, "POST", "api.github.com")
}

test_default_deny if {
	d := decision with input as http(research, "GET", "example.com")
	d.allow == false
	startswith(d.reason, "default deny")
}

test_unknown_identity_is_denied if {
	not decision.allow with input as http("spiffe://acme.test/agents/nobody", "GET", "api.github.com")
}

test_empty_input_is_denied if not decision.allow with input as {}

test_connect_allowed_for_allowed_host if decision.allow with input as connect(reporter, "api.github.com")

test_connect_denied_for_other_host if not decision.allow with input as connect(reporter, "example.com")

test_read_only_deny_wins_over_allow_list if {
	d := decision with input as http(reporter, "POST", "api.github.com")
	d.allow == false
	startswith(d.reason, "read_only: ")
}

test_read_only_get_allowed if decision.allow with input as http(reporter, "GET", "api.github.com")

test_business_hours_deny if {
	d := decision with input as object.union(http(reporter, "GET", "api.github.com"), {"time": {"weekday": "Sun", "hour_utc": 12}})
	d.allow == false
	startswith(d.reason, "business_hours: ")
}

test_every_deny_reason_is_reported if {
	d := decision with input as object.union(http(reporter, "DELETE", "api.github.com"), {"time": {"weekday": "Sun", "hour_utc": 2}})
	d.reason == "business_hours: spiffe://acme.test/agents/reporter is outside business hours (Sun 02:00 UTC); read_only: spiffe://acme.test/agents/reporter may only use GET/HEAD, not DELETE"
}

test_sandbox_allows_sandbox_hosts if {
	decision == {"allow": true, "reason": "sandbox: host in data.sandbox_hosts"} with input as http("spiffe://sandbox.test/agents/anyone", "POST", "httpbin.org")
}

test_sandbox_overrides_agents if {
	d := decision with input as http("spiffe://sandbox.test/agents/tinker", "GET", "api.github.com")
	d.allow == false
	startswith(d.reason, "trust_domain: ")
}

test_mcp_follows_host_rules if {
	decision.allow with input as object.union(http(research, "POST", "api.github.com"), {"kind": "mcp", "mcp": {"method": "tools/call", "tool": "create_issue"}})
}
