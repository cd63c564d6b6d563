# The `portcullis dev` demo identity may reach the local upstream and nothing else.
package portcullis.dev_test

import data.portcullis.decision
import rego.v1

req(host) := {
	"kind": "http",
	"identity": {"spiffe_id": "spiffe://dev.portcullis/agent/demo", "trust_domain": "dev.portcullis", "path": "/agent/demo", "segments": ["agent", "demo"]},
	"destination": {"host": host, "port": 8080, "scheme": "http"},
	"request": {"method": "GET", "path": "/", "query": {}, "headers": {}},
	"time": {"unix": 0, "rfc3339": "1970-01-01T00:00:00Z", "weekday": "Thu", "hour_utc": 0},
}

test_demo_reaches_localhost if decision.allow with input as req("localhost")

test_demo_reaches_loopback_ip if decision.allow with input as req("127.0.0.1")

test_demo_denied_elsewhere if {
	not decision.allow with input as req("example.com")
	not decision.allow with input as req("127.0.0.2")
}
