# Entrypoint `data.portcullis.decision` for the compose stack. Default deny; any `deny`
# message wins over any allow. An identity in `data.agents` may reach its `hosts` (CONNECT,
# HTTP and MCP transport), call the MCP tools matching its `tools` patterns, and use its
# `credentials`; tools starting with a `data.denied_tool_prefixes` entry are refused for all.
package portcullis

import rego.v1

default decision := {"allow": false, "reason": "default deny: destination not in the identity's allow-list"}

decision := {"allow": false, "reason": concat("; ", sort(deny))} if {
	count(deny) > 0
} else := {"allow": true, "reason": "connect: host in the identity's allow-list"} if {
	input.kind == "connect"
	host_allowed
} else := {"allow": true, "reason": "http: host in the identity's allow-list"} if {
	input.kind == "http"
	host_allowed
} else := {"allow": true, "reason": "mcp: tool in the identity's allow-list"} if {
	input.kind == "mcp"
	host_allowed
	tool_call
	tool_allowed
} else := {"allow": true, "reason": "mcp: protocol message to an allowed server"} if {
	# initialize, tools/list, notifications, ping, and responses to server requests.
	input.kind == "mcp"
	host_allowed
	not tool_call
}

agent := data.agents[input.identity.spiffe_id]

host_allowed if lower(input.destination.host) in agent.hosts

host_allowed if {
	some pattern in agent.hosts
	startswith(pattern, "*.")
	endswith(lower(input.destination.host), substring(pattern, 1, -1))
}

tool_call if input.mcp.method == "tools/call"

tool_allowed if input.mcp.tool in agent.tools

tool_allowed if {
	some pattern in agent.tools
	endswith(pattern, "*")
	startswith(input.mcp.tool, trim_suffix(pattern, "*"))
}

denied_tool if {
	some prefix in data.denied_tool_prefixes
	startswith(input.mcp.tool, prefix)
}

deny contains msg if {
	input.kind == "mcp"
	tool_call
	denied_tool
	msg := sprintf("no deletes, ever: %s", [input.mcp.tool])
}

deny contains msg if {
	input.kind == "mcp"
	tool_call
	host_allowed
	not denied_tool
	not tool_allowed
	msg := sprintf("tool %s is not in the identity's allow-list", [input.mcp.tool])
}

deny contains msg if {
	some name in input.credentials
	not name in object.get(agent, "credentials", [])
	msg := sprintf("credential %s is not allowed for %s", [name, input.identity.spiffe_id])
}
