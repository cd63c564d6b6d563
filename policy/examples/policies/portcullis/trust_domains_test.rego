package portcullis.trust_domains_test

import data.portcullis.deny
import data.portcullis.sandbox_host_allowed
import data.portcullis.sandboxed
import rego.v1

tinker := "spiffe://sandbox.test/agents/tinker"

req(id, td, host) := {"identity": {"spiffe_id": id, "trust_domain": td}, "destination": {"host": host}}

test_sandbox_host_allowed if {
	sandboxed with input as req(tinker, "sandbox.test", "httpbin.org")
	sandbox_host_allowed with input as req(tinker, "sandbox.test", "httpbin.org")
	count(deny) == 0 with input as req(tinker, "sandbox.test", "httpbin.org")
}

test_sandbox_suffix_pattern if {
	count(deny) == 0 with input as req(tinker, "sandbox.test", "db.sandbox.internal")
}

test_sandbox_denied_elsewhere_even_if_listed_in_agents if {
	deny == {"trust_domain: sandbox.test may only reach data.sandbox_hosts, not api.github.com"} with input as req(tinker, "sandbox.test", "api.github.com")
}

test_other_trust_domains_unaffected if {
	not sandboxed with input as req("spiffe://acme.test/agents/research", "acme.test", "example.com")
	count(deny) == 0 with input as req("spiffe://acme.test/agents/research", "acme.test", "example.com")
}
