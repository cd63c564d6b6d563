# Entrypoint `data.portcullis.decision`. Default deny; any `deny` message (contributed
# by methods.rego, hours.rego, trust_domains.rego) wins over any allow; the reason names
# the rule(s) that decided. All files share one package: in regorus's VM every extra
# rule call costs ~0.3 µs, so the rules stay few and flat.
package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny: destination not in the identity's allow-list"}

decision := {"allow": false, "reason": concat("; ", sort(deny))} if {
	count(deny) > 0
} else := {"allow": true, "reason": "sandbox: host in data.sandbox_hosts"} if {
	sandboxed
	sandbox_host_allowed
} else := {"allow": true, "reason": "agents: host in the identity's allow-list"} if {
	agent_host_allowed
}
