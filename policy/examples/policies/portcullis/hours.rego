# Identities in `data.business_hours_only` may act only on `data.business_hours.days`,
# from start_hour_utc (inclusive) to end_hour_utc (exclusive), using input.time.
package portcullis

import rego.v1

within_business_hours if {
	input.time.weekday in data.business_hours.days
	input.time.hour_utc >= data.business_hours.start_hour_utc
	input.time.hour_utc < data.business_hours.end_hour_utc
}

deny contains msg if {
	input.identity.spiffe_id in data.business_hours_only
	not within_business_hours
	msg := sprintf("business_hours: %s is outside business hours (%s %02d:00 UTC)", [input.identity.spiffe_id, input.time.weekday, input.time.hour_utc])
}
