//! The default policy's logic as a native Rust function.
//!
//! Used as the baseline of `stepscope bench policy` (Wasm vs native, side by side) and by
//! tests that check the embedded component decides exactly like it.

use crate::policy::bindings::StepSummary;
use crate::policy::validate::Decision;

/// Two-stage sampling: batch with `sample_rate`, then rich with `rich_subsample_rate`.
pub fn default_decide(
    sample_rate: f64,
    rich_subsample_rate: f64,
    summary: &StepSummary,
) -> Decision {
    let emit_batch = summary.random_batch < sample_rate;
    Decision {
        emit_batch,
        emit_rich: emit_batch && summary.random_rich < rich_subsample_rate,
        batch_probability: sample_rate,
        rich_probability: rich_subsample_rate,
        extra: Vec::new(),
    }
}

/// The default's `decide-request`: ParentBased over `journey_sample_rate`.
pub fn default_decide_request(
    journey_sample_rate: f64,
    arrival: &crate::policy::RequestArrival,
) -> crate::policy::JourneyAnswer {
    let (trace, probability) = match arrival.parent_sampled {
        Some(sampled) => (sampled, 1.0),
        None => (arrival.random < journey_sample_rate, journey_sample_rate),
    };
    crate::policy::JourneyAnswer {
        trace,
        probability,
        extra: Vec::new(),
    }
}
