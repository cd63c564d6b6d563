# Per-identity destination allow-lists: `data.agents[spiffe_id].hosts`. An entry is an
# exact host or a `*.suffix` pattern (sub-domains only, not the bare suffix); the
# destination host is compared lowercased. CONNECT, HTTP and MCP all use these lists.
# (`lower(...)` is repeated rather than put in a rule: a builtin call is cheaper.)
package portcullis

import rego.v1

agent_host_allowed if lower(input.destination.host) in data.agents[input.identity.spiffe_id].hosts

agent_host_allowed if {
	some pattern in data.agents[input.identity.spiffe_id].hosts
	startswith(pattern, "*.")
	endswith(lower(input.destination.host), substring(pattern, 1, -1))
}
