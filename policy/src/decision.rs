//! The decision: what the entrypoint's value means. Anything that is not a well-formed
//! allow is a deny (fail closed); a deny never carries a 2xx/3xx status, and headers a
//! policy asks for are checked so they cannot smuggle CR/LF into a response.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use regorus::Value;

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Why: the policy's own reason, or one of the `Decision::*` reason codes.
    pub reason: String,
    /// Status the policy asked for (a deny: 400–599 only).
    pub status: Option<u16>,
    /// Headers the policy asked to add to the response (lowercase names).
    pub headers: BTreeMap<String, String>,
    /// Revision id of the policy set that decided.
    pub revision: Arc<str>,
    /// Wall-clock time spent evaluating.
    pub eval_time: Duration,
}

impl Decision {
    /// Reason of `true`.
    pub const ALLOWED: &'static str = "allowed by policy";
    /// Reason of `false`, or of an object deny without a reason.
    pub const DENIED: &'static str = "denied by policy";
    /// The entrypoint was undefined for this input.
    pub const UNDEFINED: &'static str = "policy_undefined";
    /// The evaluation hit a time, instruction or generated-size limit.
    pub const EVAL_LIMIT: &'static str = "policy_eval_limit";
    /// Prefix of every type or evaluation error reason.
    pub const ERROR_PREFIX: &'static str = "policy_error: ";

    /// A deny with `reason` and no status or headers.
    pub fn deny(reason: impl Into<String>, revision: Arc<str>, eval_time: Duration) -> Decision {
        Decision {
            allow: false,
            reason: reason.into(),
            status: None,
            headers: BTreeMap::new(),
            revision,
            eval_time,
        }
    }

    /// A deny with reason `policy_error: <what>`.
    pub fn error(
        what: impl std::fmt::Display,
        revision: Arc<str>,
        eval_time: Duration,
    ) -> Decision {
        Decision::deny(
            format!("{}{what}", Decision::ERROR_PREFIX),
            revision,
            eval_time,
        )
    }

    /// Interprets the entrypoint's value (`true`/`false`, or
    /// `{allow, reason?, status?, headers?}`); anything else is a deny.
    pub(crate) fn from_value(value: &Value, revision: Arc<str>, eval_time: Duration) -> Decision {
        match parse(value) {
            Ok(parsed) => Decision {
                allow: parsed.allow,
                reason: parsed.reason,
                status: parsed.status,
                headers: parsed.headers,
                revision,
                eval_time,
            },
            Err(Failure::Undefined) => Decision::deny(Decision::UNDEFINED, revision, eval_time),
            Err(Failure::Invalid(what)) => Decision::error(what, revision, eval_time),
        }
    }
}

struct Parsed {
    allow: bool,
    reason: String,
    status: Option<u16>,
    headers: BTreeMap<String, String>,
}

enum Failure {
    Undefined,
    Invalid(String),
}

fn parse(value: &Value) -> Result<Parsed, Failure> {
    let object = match value {
        Value::Undefined => return Err(Failure::Undefined),
        Value::Bool(allow) => {
            return Ok(Parsed {
                allow: *allow,
                reason: default_reason(*allow).to_owned(),
                status: None,
                headers: BTreeMap::new(),
            })
        }
        Value::Object(object) => object,
        other => {
            return Err(Failure::Invalid(format!(
                "decision must be a boolean or an object, got {}",
                type_name(other)
            )))
        }
    };
    // One pass over the members: looking keys up would allocate a key per lookup.
    let (mut allow, mut reason, mut status, mut headers) = (None, None, None, None);
    for (key, value) in object.iter() {
        match key {
            Value::String(k) if k.as_ref() == "allow" => allow = Some(value),
            Value::String(k) if k.as_ref() == "reason" => reason = Some(value),
            Value::String(k) if k.as_ref() == "status" => status = Some(value),
            Value::String(k) if k.as_ref() == "headers" => headers = Some(value),
            _ => {}
        }
    }
    let allow = match allow {
        Some(Value::Bool(allow)) => *allow,
        Some(other) => {
            return Err(Failure::Invalid(format!(
                "decision.allow must be a boolean, got {}",
                type_name(other)
            )))
        }
        None => return Err(Failure::Invalid("decision.allow is missing".to_owned())),
    };
    let mut reason = match reason {
        Some(Value::String(reason)) => reason.to_string(),
        Some(other) => {
            return Err(Failure::Invalid(format!(
                "decision.reason must be a string, got {}",
                type_name(other)
            )))
        }
        None => default_reason(allow).to_owned(),
    };
    let mut status = match status {
        None => None,
        Some(Value::Number(n)) => match n.as_i64().and_then(|n| u16::try_from(n).ok()) {
            Some(code @ 100..=599) if n.is_integer() => Some(code),
            _ => {
                return Err(Failure::Invalid(format!(
                    "decision.status must be an integer in 100..=599, got {value}",
                    value = Value::Number(n.clone())
                )))
            }
        },
        Some(other) => {
            return Err(Failure::Invalid(format!(
                "decision.status must be an integer, got {}",
                type_name(other)
            )))
        }
    };
    if let (false, Some(code)) = (allow, status) {
        if code < 400 {
            reason = format!("{reason} (status {code} ignored: a deny must be 4xx/5xx)");
            status = None;
        }
    }
    let headers = match headers {
        None => BTreeMap::new(),
        Some(Value::Object(headers)) => {
            let mut out = BTreeMap::new();
            for (name, value) in headers.iter() {
                let (Value::String(name), Value::String(value)) = (name, value) else {
                    return Err(Failure::Invalid(
                        "decision.headers must map strings to strings".to_owned(),
                    ));
                };
                if !is_header_name(name) || !is_header_value(value) {
                    return Err(Failure::Invalid(format!(
                        "decision.headers has an invalid header {name:?}"
                    )));
                }
                out.insert(name.to_ascii_lowercase(), value.to_string());
            }
            out
        }
        Some(other) => {
            return Err(Failure::Invalid(format!(
                "decision.headers must be an object, got {}",
                type_name(other)
            )))
        }
    };
    Ok(Parsed {
        allow,
        reason,
        status,
        headers,
    })
}

fn default_reason(allow: bool) -> &'static str {
    if allow {
        Decision::ALLOWED
    } else {
        Decision::DENIED
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Set(_) => "set",
        Value::Object(_) => "object",
        Value::Undefined => "undefined",
    }
}

/// RFC 9110 token.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Visible ASCII, spaces and tabs only: no CR/LF/NUL.
fn is_header_value(value: &str) -> bool {
    value.len() <= 8192
        && value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn decide(json: &str) -> Decision {
        let value = Value::from_json_str(json).unwrap();
        Decision::from_value(&value, Arc::from("rev"), Duration::ZERO)
    }

    #[test]
    fn booleans() {
        let d = decide("true");
        assert!(d.allow);
        assert_eq!(d.reason, Decision::ALLOWED);
        let d = decide("false");
        assert!(!d.allow);
        assert_eq!(d.reason, Decision::DENIED);
        assert_eq!(&*d.revision, "rev");
    }

    #[test]
    fn undefined_denies() {
        let d = Decision::from_value(&Value::Undefined, Arc::from("r"), Duration::ZERO);
        assert!(!d.allow);
        assert_eq!(d.reason, Decision::UNDEFINED);
    }

    #[test]
    fn full_object() {
        let d = decide(
            r#"{"allow": false, "reason": "nope", "status": 429, "headers": {"Retry-After": "5"}}"#,
        );
        assert!(!d.allow);
        assert_eq!(d.reason, "nope");
        assert_eq!(d.status, Some(429));
        assert_eq!(d.headers["retry-after"], "5");
        let d = decide(r#"{"allow": true}"#);
        assert!(d.allow);
        assert_eq!(d.reason, Decision::ALLOWED);
        assert_eq!(d.status, None);
        let d = decide(r#"{"allow": false}"#);
        assert_eq!(d.reason, Decision::DENIED);
    }

    #[test]
    fn deny_with_success_status_drops_the_status() {
        for status in [100, 200, 302] {
            let d = decide(&format!(
                r#"{{"allow": false, "reason": "r", "status": {status}}}"#
            ));
            assert!(!d.allow);
            assert_eq!(d.status, None);
            assert!(d.reason.starts_with("r (status "), "{}", d.reason);
        }
    }

    #[test]
    fn type_errors_deny_with_a_policy_error() {
        for (json, what) in [
            (r#""yes""#, "must be a boolean or an object, got string"),
            ("[true]", "got array"),
            ("1", "got number"),
            ("null", "got null"),
            (r#"{"reason": "x"}"#, "allow is missing"),
            (
                r#"{"allow": "true"}"#,
                "allow must be a boolean, got string",
            ),
            (r#"{"allow": true, "reason": 1}"#, "reason must be a string"),
            (
                r#"{"allow": false, "status": 600}"#,
                "status must be an integer in 100..=599",
            ),
            (r#"{"allow": false, "status": 99}"#, "100..=599"),
            (r#"{"allow": false, "status": -1}"#, "100..=599"),
            (r#"{"allow": false, "status": 403.5}"#, "100..=599"),
            (
                r#"{"allow": false, "status": "403"}"#,
                "status must be an integer, got string",
            ),
            (
                r#"{"allow": true, "headers": {"x": 1}}"#,
                "map strings to strings",
            ),
            (
                r#"{"allow": true, "headers": ["x"]}"#,
                "headers must be an object",
            ),
            (
                r#"{"allow": true, "headers": {"x": "a\r\nb"}}"#,
                "invalid header",
            ),
            (
                r#"{"allow": true, "headers": {"bad name": "v"}}"#,
                "invalid header",
            ),
        ] {
            let d = decide(json);
            assert!(!d.allow, "{json}");
            assert!(
                d.reason.starts_with(Decision::ERROR_PREFIX),
                "{json}: {}",
                d.reason
            );
            assert!(d.reason.contains(what), "{json}: {}", d.reason);
        }
    }
}
