//! The policy runtime: runs step-tracing policies as sandboxed WebAssembly components.
//!
//! A policy is a component exporting the `stepscope:policy/policy` interface (see
//! `wit/policy.wit`). [`PolicyModule`] compiles and validates one (the embedded default or a
//! `.wasm` file) once, at start-up; [`PolicyRuntime`] owns a live instance and makes the two
//! per-step calls under a fuel bound, a wall-clock deadline ([`epoch`]) and a memory cap.
//! Nothing a policy does escapes the runtime: traps, timeouts, memory exhaustion, blocking
//! waits and malformed answers become counted [`FaultKind`]s, the step goes untraced, and the
//! instance is re-created after a back-off; a policy that is merely slow is set aside for the
//! built-in default by [`budget`]. Components may import WASI 0.2 (Python, JavaScript and
//! `wasm32-wasip2` toolchains need it): it is linked to an empty, deterministic sandbox in
//! which no host call blocks ([`wasi`]); nothing else may be imported. Text a guest chooses is
//! escaped and bounded before it is shown anywhere ([`guest_text`]).
//! Large components are compiled once and cached on disk ([`cache`]).
//! The module also holds the seed-derived per-step randomness ([`random`]); the tools that
//! exercise a policy outside an engine (conformance suite, synthetic steps, replay, native twin)
//! are its [`devkit`].

mod bindings;
pub mod budget;
pub mod cache;
pub mod devkit;
pub mod epoch;
mod faults;
pub mod guest_text;
mod limits;
mod module;
pub mod params;
pub mod random;
mod runtime;
mod validate;
mod wasi;

pub use bindings::{RequestArrival, RequestViews, SnapshotAttributes, StepSummary};
pub use devkit::RecordedStep;
pub use faults::{FaultKind, PolicyCounters, PolicyCountersSnapshot};
pub use limits::{
    DEFAULT_CALL_DEADLINE_MS, DEFAULT_CONFIGURE_DEADLINE_MS, DEFAULT_FUEL_PER_CALL, PolicyLimits,
};
pub use module::{ContractVersion, PolicyError, PolicyModule, PolicySource};
pub use params::PolicyParams;
pub use runtime::{PolicyOutcome, PolicyRuntime};
pub use validate::{Decision, JourneyAnswer, extra_attribute_key};

/// The default policy component, built from `policies/default` by `build.rs`.
pub const DEFAULT_POLICY_WASM: &[u8] =
    include_bytes!(concat!(env!("STEPSCOPE_GUEST_DIR"), "/default.wasm"));

/// `sha256:<hex>` of component bytes: the digest a policy is known by.
pub fn digest_of(bytes: &[u8]) -> String {
    module::sha256_hex(bytes)
}

/// The interface a policy exports (contract 0.2.0, `wit/policy.wit`).
pub const POLICY_INTERFACE: &str = "stepscope:policy/policy@0.2.0";
/// The interface of contract 0.1.0 (`wit/v0.1/policy.wit`), still accepted.
pub const POLICY_INTERFACE_V01: &str = "stepscope:policy/policy@0.1.0";

/// Where `build.rs` put the guest components (the default, and test-only ones such as
/// `hostile.wasm` and `wrong-world.wasm`). For tests in this workspace only.
#[doc(hidden)]
pub const GUEST_COMPONENT_DIR: &str = env!("STEPSCOPE_GUEST_DIR");
