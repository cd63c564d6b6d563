//! The decision: what the entrypoint's value means. Anything that is not a well-formed
//! allow is a deny (fail closed); a deny never carries a 2xx/3xx status, and headers a
//! policy asks for are checked so they cannot smuggle CR/LF into a response.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use regorus::Value;

use crate::units::{parse_duration, Rate};

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
    /// A deny a human may lift (`approval`): only on a deny.
    pub approval: Option<ApprovalAsk>,
    /// Rate limits an allow is subject to (`limit`: one object or a list).
    pub limits: Vec<LimitAsk>,
}

/// The decision's `approval` member: this deny is lifted for the same call when a human
/// approves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalAsk {
    /// What the approver is shown (default: the decision's reason).
    pub reason: String,
    /// How long a grant (or a denial) holds once decided.
    pub ttl: Duration,
    pub scope: ApprovalScope,
    /// Calls a grant allows; `None`: any number within its TTL.
    pub uses: Option<u32>,
}

impl ApprovalAsk {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
    pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
}

/// What one grant covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApprovalScope {
    /// This exact call: identity, method, destination, path (query keys, not values) and, for
    /// MCP, the tool and its canonical arguments. Single use unless `uses` says otherwise.
    Call,
    /// The same action in the same MCP session (any arguments) or, for plain HTTP, the same
    /// method and destination, for the TTL.
    Session,
}

impl ApprovalScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalScope::Call => "call",
            ApprovalScope::Session => "session",
        }
    }
}

/// One member of the decision's `limit`: a rate limit on `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitAsk {
    /// The metrics label (`[a-z0-9_.-]`, default `policy`).
    pub name: String,
    /// The bucket: any string the policy computes (identity, tool, tenant, …).
    pub key: String,
    pub rate: Rate,
    /// Calls allowed at once before the rate applies (default: the rate's count).
    pub burst: u32,
}

impl LimitAsk {
    /// Longest key; a longer one is a policy error (keys are stored in Redis).
    pub const MAX_KEY_BYTES: usize = 1024;
    /// Most limits one decision may carry.
    pub const MAX_PER_DECISION: usize = 8;
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

    /// The policy did not decide: an error, an undefined result or an exceeded limit.
    pub fn is_failure(&self) -> bool {
        !self.allow
            && (self.reason == Self::UNDEFINED
                || self.reason == Self::EVAL_LIMIT
                || self.reason.starts_with(Self::ERROR_PREFIX))
    }

    /// A deny with `reason` and no status or headers.
    pub fn deny(reason: impl Into<String>, revision: Arc<str>, eval_time: Duration) -> Decision {
        Decision {
            allow: false,
            reason: reason.into(),
            status: None,
            headers: BTreeMap::new(),
            revision,
            eval_time,
            approval: None,
            limits: Vec::new(),
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
                approval: parsed.approval,
                limits: parsed.limits,
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
    approval: Option<ApprovalAsk>,
    limits: Vec<LimitAsk>,
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
                approval: None,
                limits: Vec::new(),
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
    let (mut approval, mut limit) = (None, None);
    for (key, value) in object.iter() {
        match key {
            Value::String(k) if k.as_ref() == "allow" => allow = Some(value),
            Value::String(k) if k.as_ref() == "reason" => reason = Some(value),
            Value::String(k) if k.as_ref() == "status" => status = Some(value),
            Value::String(k) if k.as_ref() == "headers" => headers = Some(value),
            Value::String(k) if k.as_ref() == "approval" => approval = Some(value),
            Value::String(k) if k.as_ref() == "limit" => limit = Some(value),
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
    let approval = match approval {
        None => None,
        Some(_) if allow => {
            return Err(Failure::Invalid(
                "decision.approval is only valid on a deny (allow: false)".to_owned(),
            ))
        }
        Some(value) => Some(approval_ask(value, &reason)?),
    };
    let limits = match limit {
        None => Vec::new(),
        Some(Value::Array(all)) => {
            if all.len() > LimitAsk::MAX_PER_DECISION {
                return Err(Failure::Invalid(format!(
                    "decision.limit has more than {} limits",
                    LimitAsk::MAX_PER_DECISION
                )));
            }
            all.iter().map(limit_ask).collect::<Result<_, _>>()?
        }
        Some(one) => vec![limit_ask(one)?],
    };
    Ok(Parsed {
        allow,
        reason,
        status,
        headers,
        approval,
        limits,
    })
}

/// The members of an object, by name (unknown members are errors: a misspelt `ttl` must not
/// silently mean the default).
fn members<'a>(
    value: &'a Value,
    what: &str,
    known: &[&str],
) -> Result<BTreeMap<&'a str, &'a Value>, Failure> {
    let Value::Object(object) = value else {
        return Err(Failure::Invalid(format!(
            "decision.{what} must be an object, got {}",
            type_name(value)
        )));
    };
    let mut out = BTreeMap::new();
    for (k, v) in object.iter() {
        let Value::String(k) = k else {
            return Err(Failure::Invalid(format!(
                "decision.{what} has a non-string key"
            )));
        };
        if !known.contains(&k.as_ref()) {
            return Err(Failure::Invalid(format!(
                "decision.{what} has an unknown member {k:?} (known: {})",
                known.join(", ")
            )));
        }
        out.insert(k.as_ref(), v);
    }
    Ok(out)
}

fn string<'a>(value: &'a Value, what: &str) -> Result<&'a str, Failure> {
    match value {
        Value::String(s) => Ok(s.as_ref()),
        other => Err(Failure::Invalid(format!(
            "decision.{what} must be a string, got {}",
            type_name(other)
        ))),
    }
}

fn positive_u32(value: &Value, what: &str) -> Result<u32, Failure> {
    match value {
        Value::Number(n) if n.is_integer() => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| Failure::Invalid(format!("decision.{what} must be an integer ≥ 1"))),
        other => Err(Failure::Invalid(format!(
            "decision.{what} must be an integer ≥ 1, got {}",
            type_name(other)
        ))),
    }
}

fn approval_ask(value: &Value, reason: &str) -> Result<ApprovalAsk, Failure> {
    let m = members(value, "approval", &["reason", "ttl", "scope", "uses"])?;
    let ttl = match m.get("ttl") {
        None => ApprovalAsk::DEFAULT_TTL,
        Some(Value::Number(n)) if n.is_integer() => n
            .as_u64()
            .map(Duration::from_secs)
            .ok_or_else(|| Failure::Invalid("decision.approval.ttl must be ≥ 1s".to_owned()))?,
        Some(v) => parse_duration(string(v, "approval.ttl")?)
            .map_err(|e| Failure::Invalid(format!("decision.approval.ttl: {e}")))?,
    };
    if ttl < Duration::from_secs(1) || ttl > ApprovalAsk::MAX_TTL {
        return Err(Failure::Invalid(
            "decision.approval.ttl must be between 1s and 30d".to_owned(),
        ));
    }
    let scope = match m.get("scope") {
        None => ApprovalScope::Call,
        Some(v) => match string(v, "approval.scope")? {
            "call" => ApprovalScope::Call,
            "session" => ApprovalScope::Session,
            other => {
                return Err(Failure::Invalid(format!(
                    "decision.approval.scope must be \"call\" or \"session\", got {other:?}"
                )))
            }
        },
    };
    let uses = match (m.get("uses"), scope) {
        (Some(v), _) => Some(positive_u32(v, "approval.uses")?),
        (None, ApprovalScope::Call) => Some(1),
        (None, ApprovalScope::Session) => None,
    };
    let reason = match m.get("reason") {
        Some(v) => string(v, "approval.reason")?.to_owned(),
        None => reason.to_owned(),
    };
    Ok(ApprovalAsk {
        reason,
        ttl,
        scope,
        uses,
    })
}

fn limit_ask(value: &Value) -> Result<LimitAsk, Failure> {
    let m = members(value, "limit", &["name", "key", "rate", "burst"])?;
    let key = match m.get("key") {
        Some(v) => string(v, "limit.key")?,
        None => return Err(Failure::Invalid("decision.limit.key is missing".to_owned())),
    };
    if key.is_empty() || key.len() > LimitAsk::MAX_KEY_BYTES {
        return Err(Failure::Invalid(format!(
            "decision.limit.key must be 1..={} bytes",
            LimitAsk::MAX_KEY_BYTES
        )));
    }
    let rate = match m.get("rate") {
        Some(v) => Rate::parse(string(v, "limit.rate")?)
            .map_err(|e| Failure::Invalid(format!("decision.limit.rate: {e}")))?,
        None => {
            return Err(Failure::Invalid(
                "decision.limit.rate is missing".to_owned(),
            ))
        }
    };
    let burst = match m.get("burst") {
        Some(v) => positive_u32(v, "limit.burst")?,
        None => rate.count,
    };
    let name = match m.get("name") {
        Some(v) => string(v, "limit.name")?,
        None => "policy",
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
    {
        return Err(Failure::Invalid(
            "decision.limit.name must be 1..=64 of [a-z0-9_.-]".to_owned(),
        ));
    }
    Ok(LimitAsk {
        name: name.to_owned(),
        key: key.to_owned(),
        rate,
        burst,
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
    fn approvals_and_limits() {
        let d = decide(r#"{"allow": false, "reason": "pay", "approval": {}}"#);
        let a = d.approval.unwrap();
        assert_eq!(
            (a.reason.as_str(), a.ttl, a.scope, a.uses),
            (
                "pay",
                ApprovalAsk::DEFAULT_TTL,
                ApprovalScope::Call,
                Some(1)
            )
        );
        let d = decide(
            r#"{"allow": false, "approval": {"reason": "r", "ttl": "1h", "scope": "session"}}"#,
        );
        let a = d.approval.unwrap();
        assert_eq!(
            (a.reason.as_str(), a.ttl, a.scope, a.uses),
            ("r", Duration::from_secs(3600), ApprovalScope::Session, None)
        );
        assert_eq!(
            decide(r#"{"allow": false, "approval": {"ttl": 60, "uses": 3}}"#).approval,
            Some(ApprovalAsk {
                reason: Decision::DENIED.into(),
                ttl: Duration::from_secs(60),
                scope: ApprovalScope::Call,
                uses: Some(3)
            })
        );
        let d = decide(r#"{"allow": true, "limit": {"key": "k", "rate": "10/m"}}"#);
        assert!(d.allow);
        assert_eq!(
            d.limits,
            vec![LimitAsk {
                name: "policy".into(),
                key: "k".into(),
                rate: Rate::parse("10/m").unwrap(),
                burst: 10
            }]
        );
        let d = decide(
            r#"{"allow": true, "limit": [{"key": "a", "rate": "1/s", "burst": 2, "name": "per-tool"}, {"key": "b", "rate": "5/h"}]}"#,
        );
        assert_eq!(d.limits.len(), 2);
        assert_eq!(
            (d.limits[0].burst, d.limits[0].name.as_str()),
            (2, "per-tool")
        );
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
            (r#"{"allow": true, "approval": {}}"#, "only valid on a deny"),
            (r#"{"allow": false, "approval": true}"#, "must be an object"),
            (
                r#"{"allow": false, "approval": {"tll": "1m"}}"#,
                "unknown member",
            ),
            (
                r#"{"allow": false, "approval": {"ttl": "0s"}}"#,
                "between 1s",
            ),
            (
                r#"{"allow": false, "approval": {"ttl": "31d"}}"#,
                "between 1s",
            ),
            (
                r#"{"allow": false, "approval": {"scope": "x"}}"#,
                "scope must be",
            ),
            (
                r#"{"allow": false, "approval": {"uses": 0}}"#,
                "uses must be",
            ),
            (
                r#"{"allow": true, "limit": {"rate": "1/s"}}"#,
                "key is missing",
            ),
            (r#"{"allow": true, "limit": {"key": ""}}"#, "key must be"),
            (
                r#"{"allow": true, "limit": {"key": "k"}}"#,
                "rate is missing",
            ),
            (
                r#"{"allow": true, "limit": {"key": "k", "rate": "1/y"}}"#,
                "limit.rate",
            ),
            (
                r#"{"allow": true, "limit": {"key": "k", "rate": "1/s", "burst": 0}}"#,
                "burst must be",
            ),
            (
                r#"{"allow": true, "limit": {"key": "k", "rate": "1/s", "name": "Bad Name"}}"#,
                "name must be",
            ),
            (
                r#"{"allow": true, "limit": [1,2,3,4,5,6,7,8,9]}"#,
                "more than 8",
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
