//! Portcullis policy: the Rego contract (typed input, decision), loading and compiling
//! policy sets, bounded lock-free evaluation on regorus, hot swap and the test runner.
//! Evaluation never fails: anything but a well-formed allow is a deny (fail closed).

#![forbid(unsafe_code)]

mod decision;
mod error;
mod eval;
pub mod input;
mod load;
mod policy;
mod reads;
mod testing;
mod units;

pub use decision::{ApprovalAsk, ApprovalScope, Decision, LimitAsk};
pub use error::PolicyError;
#[doc(hidden)]
pub use eval::Strategy;
pub use eval::{EngineInput, Limits, TIMER_CHECK_INTERVAL};
pub use input::{
    redact_headers, Destination, Exceeded, Gateway, Identity, Input, InputLimits, Kind, Part,
    RequestInfo, Source, TimeInfo,
};
pub use load::PolicySet;
pub use policy::Policy;
pub use testing::{
    Coverage, FileCoverage, RuleCoverage, TestOutcome, TestReport, TestResult, TEST_TIME_LIMIT,
};
pub use units::{parse_duration, Rate};
