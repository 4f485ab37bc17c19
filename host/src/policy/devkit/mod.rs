//! The policy dev kit: what `policy check`, `policy run`, `policy replay` and the benchmarks use
//! to exercise a policy outside a serving engine.
//!
//! [`synthetic`] makes reproducible step summaries and request views; [`conformance`] drives a
//! policy through them (the `policy check` suite, the pre-swap check, latency measurements);
//! [`replay`] feeds recorded JSON-lines steps back to a policy and compares decisions; [`native`]
//! is a native twin of the default policy, the baseline of `bench policy` and of the default
//! policy's tests. Nothing in the serving path depends on this module except the pre-swap check.

pub mod conformance;
pub mod native;
pub mod replay;
pub mod synthetic;

pub use replay::RecordedStep;
