# Allow-all policy for benchmarks: every action is allowed.
package portcullis

import rego.v1

decision := true
