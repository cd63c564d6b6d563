//! The filters that run in the chain, one capability each. Their order is written once, in the
//! proxy's pipeline builder (`build_chain`).

pub mod approval;
pub mod credentials;
pub mod delegation;
pub mod hygiene;
pub mod jwt_svid;
pub mod mcp;
pub mod pinning;
pub mod policy;
pub mod quota;
pub mod shadow;
pub mod trace;
