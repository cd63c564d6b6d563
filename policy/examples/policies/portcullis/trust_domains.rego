# Every identity of a sandbox trust domain (`data.sandbox_trust_domains`) may reach the
# hosts in `data.sandbox_hosts` (same pattern syntax as data.agents) and nothing else,
# whatever `data.agents` says.
package portcullis

import rego.v1

sandboxed if input.identity.trust_domain in data.sandbox_trust_domains

sandbox_host_allowed if lower(input.destination.host) in data.sandbox_hosts

sandbox_host_allowed if {
	some pattern in data.sandbox_hosts
	startswith(pattern, "*.")
	endswith(lower(input.destination.host), substring(pattern, 1, -1))
}

deny contains msg if {
	sandboxed
	not sandbox_host_allowed
	msg := sprintf("trust_domain: %s may only reach data.sandbox_hosts, not %s", [input.identity.trust_domain, input.destination.host])
}
