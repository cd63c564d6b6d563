# Read-only identities (`data.read_only`) may only send GET/HEAD. Only `http` actions
# are method-checked: a CONNECT is decided by host, and each request inside it again.
package portcullis

import rego.v1

read_methods := {"GET", "HEAD"}

deny contains msg if {
	input.kind == "http"
	input.identity.spiffe_id in data.read_only
	not input.request.method in read_methods
	msg := sprintf("read_only: %s may only use GET/HEAD, not %s", [input.identity.spiffe_id, input.request.method])
}
