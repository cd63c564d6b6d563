package portcullis.hosts_test

import data.portcullis.agent_host_allowed
import rego.v1

research := "spiffe://acme.test/agents/research"

req(id, host) := {"identity": {"spiffe_id": id}, "destination": {"host": host}}

test_exact_host if agent_host_allowed with input as req(research, "api.github.com")

test_host_is_case_insensitive if agent_host_allowed with input as req(research, "API.GitHub.com")

test_suffix_pattern_matches_subdomains if {
	agent_host_allowed with input as req(research, "raw.githubusercontent.com")
	agent_host_allowed with input as req(research, "a.b.githubusercontent.com")
}

test_suffix_pattern_excludes_the_bare_domain if {
	not agent_host_allowed with input as req(research, "githubusercontent.com")
	not agent_host_allowed with input as req(research, "evilgithubusercontent.com")
}

test_unlisted_host if not agent_host_allowed with input as req(research, "example.com")

test_unknown_identity if {
	not agent_host_allowed with input as req("spiffe://acme.test/agents/unknown", "api.github.com")
}
