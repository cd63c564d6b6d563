package portcullis.hours_test

import data.portcullis.deny
import rego.v1

reporter := "spiffe://acme.test/agents/reporter"

at(id, weekday, hour) := {"identity": {"spiffe_id": id}, "time": {"weekday": weekday, "hour_utc": hour}}

test_inside_business_hours if count(deny) == 0 with input as at(reporter, "Wed", 8)

test_end_hour_is_exclusive if count(deny) == 1 with input as at(reporter, "Wed", 18)

test_before_start if count(deny) == 1 with input as at(reporter, "Mon", 7)

test_weekend if {
	deny == {"business_hours: spiffe://acme.test/agents/reporter is outside business hours (Sat 12:00 UTC)"} with input as at(reporter, "Sat", 12)
}

test_other_identities_any_time if {
	count(deny) == 0 with input as at("spiffe://acme.test/agents/research", "Sun", 3)
}
