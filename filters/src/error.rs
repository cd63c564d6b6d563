//! Why a request was refused. Every stage reports refusals as a [`Rejection`] with an
//! [`ErrorCode`]; the proxy turns it into a response in exactly one place, so the status and the
//! `x-portcullis-error` code can never disagree.

use std::fmt;

/// The error table of DESIGN.md, one variant per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    IdentityRequired,
    /// A request on a connection whose client SVID has passed its notAfter.
    IdentityExpired,
    /// A request on a connection whose client chain no longer verifies against the trust
    /// bundles served now (its trust domain removed, or its bundle replaced, by a reload).
    IdentityRevoked,
    PolicyDenied,
    CredentialNotAllowed,
    DestinationBlocked,
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    NoRoute,
    UpstreamUnreachable,
    UpstreamTimeout,
    CredentialUnavailable,
    /// An `Upgrade` (WebSocket, h2c) inside an intercepted connection: not supported yet.
    UpgradeNotSupported,
    /// The local connector refuses a client outside its `--allow-clients` networks.
    ClientNotAllowed,
    /// A method the proxy cannot forward where it was sent (`CONNECT` inside a tunnel).
    MethodNotAllowed,
    /// A request body in an encoding the proxy must inspect but cannot read (a
    /// `Content-Encoding`, JSON in UTF-16/32).
    UnsupportedEncoding,
    /// An MCP request whose mirrored headers (`Mcp-Method`, `Mcp-Name`,
    /// `MCP-Protocol-Version`) disagree with its body, or lack ones its revision requires.
    HeaderMismatch,
    /// A bounded queue or budget of the proxy is full (an HTTP+SSE stream its client does not
    /// read): the request is refused rather than queued without bound.
    Overloaded,
    /// A policy asked for a human's approval of this call, and none is granted (yet).
    ApprovalRequired,
    /// A rate limit or an in-flight limit is exceeded.
    RateLimited,
    /// The approval store cannot be read or written (Redis down, too many pending).
    ApprovalUnavailable,
    /// The delegation token (`delegation.header`) is malformed, unsigned by an allowed
    /// issuer, expired, for another audience, or otherwise refused.
    DelegationInvalid,
    /// The delegation token's issuer keys cannot be fetched (and none are cached).
    DelegationUnavailable,
    /// The caller's JWT-SVID (`x-portcullis-jwt-svid`) is malformed, not signed by its trust
    /// domain, expired, or names another workload than the caller's X.509-SVID.
    JwtSvidInvalid,
    /// No JWT bundle is known (yet) for the JWT-SVID's trust domain.
    JwtSvidUnavailable,
    /// A bug or resource failure inside the proxy; never caused by the peer.
    Internal,
}

impl ErrorCode {
    /// The default HTTP status for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::IdentityRequired => 407,
            ErrorCode::PolicyDenied
            | ErrorCode::IdentityExpired
            | ErrorCode::IdentityRevoked
            | ErrorCode::CredentialNotAllowed
            | ErrorCode::DestinationBlocked
            | ErrorCode::ClientNotAllowed
            | ErrorCode::ApprovalRequired
            | ErrorCode::DelegationInvalid
            | ErrorCode::JwtSvidInvalid => 403,
            ErrorCode::RateLimited => 429,
            ErrorCode::BadRequest | ErrorCode::HeaderMismatch => 400,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::NoRoute => 404,
            ErrorCode::UpstreamUnreachable => 502,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::CredentialUnavailable
            | ErrorCode::Overloaded
            | ErrorCode::ApprovalUnavailable
            | ErrorCode::DelegationUnavailable
            | ErrorCode::JwtSvidUnavailable => 503,
            ErrorCode::UpgradeNotSupported => 501,
            ErrorCode::UnsupportedEncoding => 415,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Internal => 500,
        }
    }

    /// The value of the `x-portcullis-error` header and of `error` in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::IdentityRequired => "identity_required",
            ErrorCode::IdentityExpired => "identity_expired",
            ErrorCode::IdentityRevoked => "identity_revoked",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::CredentialNotAllowed => "credential_not_allowed",
            ErrorCode::DestinationBlocked => "destination_blocked",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::HeaderMismatch => "header_mismatch",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::CredentialUnavailable => "credential_unavailable",
            ErrorCode::UpgradeNotSupported => "upgrade_not_supported",
            ErrorCode::ClientNotAllowed => "client_not_allowed",
            ErrorCode::UnsupportedEncoding => "unsupported_encoding",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ApprovalRequired => "approval_required",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ApprovalUnavailable => "approval_unavailable",
            ErrorCode::DelegationInvalid => "delegation_invalid",
            ErrorCode::DelegationUnavailable => "delegation_unavailable",
            ErrorCode::JwtSvidInvalid => "jwt_svid_invalid",
            ErrorCode::JwtSvidUnavailable => "jwt_svid_unavailable",
            ErrorCode::Internal => "internal_error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code, a human reason safe to show the caller (never a secret), and optional
/// overrides a policy may set (status, extra headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub reason: String,
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    /// For a refused MCP request: the JSON-RPC answer (errors for every request id), sent as
    /// HTTP 200 `application/json` (202 with no body when only notifications were refused),
    /// because MCP clients surface that as a tool error where an HTTP 403 breaks the session.
    pub jsonrpc: Option<JsonRpcAnswer>,
    /// Members added to the JSON error body and to each JSON-RPC error's `data` (an approval
    /// id, a retry delay).
    pub details: Details,
}

/// Extra members of an error body: fixed names, values the proxy made (never a secret).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Details(pub Vec<(&'static str, serde_json::Value)>);

impl Eq for Details {}

impl<const N: usize> From<[(&'static str, serde_json::Value); N]> for Details {
    fn from(all: [(&'static str, serde_json::Value); N]) -> Details {
        Details(all.into())
    }
}

impl Details {
    /// Add every member to `object` (members already there are kept).
    pub fn merge_into(&self, object: &mut serde_json::Map<String, serde_json::Value>) {
        for (k, v) in &self.0 {
            object.entry(*k).or_insert_with(|| v.clone());
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct JsonRpcAnswer {
    pub responses: Vec<serde_json::Value>,
    pub batch: bool,
    /// The HTTP status, when the protocol prescribes one other than 200/202 (400 for a
    /// `HeaderMismatch`).
    pub status: Option<u16>,
}

impl Eq for JsonRpcAnswer {}

impl JsonRpcAnswer {
    /// Add `code` (as `data.error`) and `details` to the `data` of the error answering `id`,
    /// or of every error when `id` is `None`.
    pub fn add_details(
        &mut self,
        id: Option<&serde_json::Value>,
        code: ErrorCode,
        details: &Details,
    ) {
        for r in &mut self.responses {
            if id.is_some_and(|id| r.get("id") != Some(id)) {
                continue;
            }
            if let Some(data) = r
                .pointer_mut("/error/data")
                .and_then(serde_json::Value::as_object_mut)
            {
                data.insert("error".into(), code.as_str().into());
                details.merge_into(data);
            }
        }
    }
}

impl Rejection {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Rejection {
        Rejection {
            code,
            reason: reason.into(),
            status: None,
            headers: Vec::new(),
            jsonrpc: None,
            details: Details::default(),
        }
    }

    /// The status to answer with: the override when it is a valid 4xx/5xx, else the code's.
    pub fn status(&self) -> u16 {
        match self.status {
            Some(s) if (400..=599).contains(&s) => s,
            _ => self.code.status(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_design_table() {
        let table = [
            (ErrorCode::IdentityRequired, 407, "identity_required"),
            (ErrorCode::IdentityExpired, 403, "identity_expired"),
            (ErrorCode::IdentityRevoked, 403, "identity_revoked"),
            (ErrorCode::PolicyDenied, 403, "policy_denied"),
            (
                ErrorCode::CredentialNotAllowed,
                403,
                "credential_not_allowed",
            ),
            (ErrorCode::DestinationBlocked, 403, "destination_blocked"),
            (ErrorCode::BadRequest, 400, "bad_request"),
            (ErrorCode::BodyTooLarge, 413, "body_too_large"),
            (ErrorCode::HeadersTooLarge, 431, "headers_too_large"),
            (ErrorCode::NoRoute, 404, "no_route"),
            (ErrorCode::UpstreamUnreachable, 502, "upstream_unreachable"),
            (ErrorCode::UpstreamTimeout, 504, "upstream_timeout"),
            (
                ErrorCode::CredentialUnavailable,
                503,
                "credential_unavailable",
            ),
            (ErrorCode::UpgradeNotSupported, 501, "upgrade_not_supported"),
            (ErrorCode::ClientNotAllowed, 403, "client_not_allowed"),
            (ErrorCode::UnsupportedEncoding, 415, "unsupported_encoding"),
            (ErrorCode::MethodNotAllowed, 405, "method_not_allowed"),
            (ErrorCode::Overloaded, 503, "overloaded"),
            (ErrorCode::ApprovalRequired, 403, "approval_required"),
            (ErrorCode::RateLimited, 429, "rate_limited"),
            (ErrorCode::ApprovalUnavailable, 503, "approval_unavailable"),
            (ErrorCode::DelegationInvalid, 403, "delegation_invalid"),
            (
                ErrorCode::DelegationUnavailable,
                503,
                "delegation_unavailable",
            ),
            (ErrorCode::JwtSvidInvalid, 403, "jwt_svid_invalid"),
            (ErrorCode::JwtSvidUnavailable, 503, "jwt_svid_unavailable"),
        ];
        for (code, status, name) in table {
            assert_eq!(code.status(), status, "{name}");
            assert_eq!(code.as_str(), name);
        }
    }

    #[test]
    fn status_override_must_be_an_error_status() {
        let mut r = Rejection::new(ErrorCode::PolicyDenied, "no");
        r.status = Some(451);
        assert_eq!(r.status(), 451);
        r.status = Some(200);
        assert_eq!(r.status(), 403, "a deny can never be turned into a success");
    }
}
