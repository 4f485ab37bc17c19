//! A stepscope step-tracing policy (template).
//!
//! `./build.sh` compiles this crate for `wasm32-wasip2` into a WebAssembly component
//! (build/policy.wasm) exporting the `policy` interface of the WIT world
//! `stepscope:policy/step-policy@0.2.0` (wit/policy.wit).
//!
//! As written it is exactly the built-in default policy: two-stage sampling. A step is
//! batch-sampled when the host's batch draw is below `sample_rate`; a batch-sampled step is
//! rich-sampled when the independent rich draw is below `rich_subsample_rate`. A rich step
//! snapshots every running request with every attribute. A request's journey (with
//! `--enable-journey-tracing`) is traced by OpenTelemetry's ParentBased rule over
//! `journey_sample_rate`.
//!
//! The host calls `configure` once per instance, `decide` once per scheduler step (keep it
//! cheap), `plan_rich` after each `decide` that returned `emit_rich`, and `decide_request` once
//! per client request when journey tracing is on. State kept in statics
//! persists across calls, but decisions must depend on the inputs only (no clock, no OS
//! randomness) so that every run can be reproduced.

wit_bindgen::generate!({
    path: "wit",
    world: "step-policy",
});

use exports::stepscope::policy::policy::{
    ExtraAttribute, Guest, JourneyDecision, RequestArrival, RequestViews, RichPlan,
    SnapshotAttributes, StepDecision, StepSummary,
};
use std::cell::Cell;

// ---- Parameters --------------------------------------------------------------------------------
// The host always passes `sample_rate`, `rich_subsample_rate` and `journey_sample_rate` (from
// the flags), plus every `--step-tracing-policy-arg key=value`. The guest is single-threaded,
// so thread-local cells are enough.
thread_local! {
    static SAMPLE_RATE: Cell<f64> = const { Cell::new(0.01) };
    static RICH_SUBSAMPLE_RATE: Cell<f64> = const { Cell::new(0.001) };
    static JOURNEY_SAMPLE_RATE: Cell<f64> = const { Cell::new(1.0) };
}

/// Parse a number in [0, 1]; the error names the key.
fn parse_unit(key: &str, value: &str) -> Result<f64, String> {
    let x: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("parameter `{key}`: `{value}` is not a number"))?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("parameter `{key}`: {x} is outside [0, 1]"));
    }
    Ok(x)
}

struct Policy;

impl Guest for Policy {
    /// `configure(params) -> result<_, string>`: an `Err` refuses the policy.
    fn configure(params: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in &params {
            match key.as_str() {
                "sample_rate" => SAMPLE_RATE.set(parse_unit(key, value)?),
                "rich_subsample_rate" => RICH_SUBSAMPLE_RATE.set(parse_unit(key, value)?),
                "journey_sample_rate" => JOURNEY_SAMPLE_RATE.set(parse_unit(key, value)?),
                // ---- add your own parameters here ----
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (this policy takes sample_rate, \
                         rich_subsample_rate and journey_sample_rate)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// One call per scheduler step.
    // ---- put your own per-step logic here (e.g. triggers on `summary.num_preempted`,
    // `summary.kv_usage_ratio`, `summary.last_step_duration_us`) ----
    fn decide(summary: StepSummary) -> StepDecision {
        let sample_rate = SAMPLE_RATE.get();
        let rich_rate = RICH_SUBSAMPLE_RATE.get();
        let emit_batch = summary.random_batch < sample_rate;
        StepDecision {
            emit_batch,
            emit_rich: emit_batch && summary.random_rich < rich_rate, // never rich without batch
            batch_probability: sample_rate,
            rich_probability: rich_rate,
            // At most 4, e.g. `ExtraAttribute { key: "reason".into(), value: "slow".into() }`.
            extra: Vec::<ExtraAttribute>::new(),
        }
    }

    /// One call per rich step: which running requests to snapshot, with which attributes.
    // ---- e.g. only requests queued longer than X (`requests.time_since_arrival_us`), or
    // always those whose journey is traced (`requests.journey_traced`) ----
    fn plan_rich(_summary: StepSummary, requests: RequestViews) -> RichPlan {
        RichPlan {
            requests: (0..requests.request_id.len() as u32).collect(),
            attributes: SnapshotAttributes::all(),
            extra: Vec::new(),
        }
    }

    /// One call per client request (journey tracing on): trace its journey or not.
    // ---- e.g. trace every request that arrives while `arrival.kv_usage_ratio` is high ----
    fn decide_request(arrival: RequestArrival) -> JourneyDecision {
        let rate = JOURNEY_SAMPLE_RATE.get();
        // ParentBased: follow the caller's sampled flag when it sent a `traceparent`.
        let (trace, probability) = match arrival.parent_sampled {
            Some(sampled) => (sampled, 1.0),
            None => (arrival.random < rate, rate),
        };
        JourneyDecision {
            trace,
            probability,
            extra: Vec::new(),
        }
    }
}

export!(Policy);
