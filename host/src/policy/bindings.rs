//! Host bindings generated from `wit/policy.wit` by wasmtime's `bindgen!`.
//!
//! Kept in one place so the rest of the runtime names the guest types through short aliases.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "step-policy",
});

pub use exports::stepscope::policy::policy::{
    ExtraAttribute, RequestViews, RichPlan, SnapshotAttributes, StepDecision, StepSummary,
};
