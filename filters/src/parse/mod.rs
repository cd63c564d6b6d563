//! Pure parsers of what peers send: total functions from bytes to types or errors, with no
//! phase logic, so each can be tested and fuzzed alone.

pub mod destination;
pub mod egress;
pub mod identity;
pub mod jsonrpc;
pub mod jwt;
pub mod mcp_body;
pub mod mcp_headers;
pub mod mcp_params;
pub mod path;
pub mod redact;
pub mod secret;
