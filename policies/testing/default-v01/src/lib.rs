//! The default step-tracing policy as it was before contract 0.2.0, built against
//! `wit/v0.1/policy.wit`: the host's tests load it to show that 0.1 components keep loading and
//! behaving as before (and that the host decides their journeys by rate).
//!
//! Two-stage sampling: a step is batch-sampled when the host's batch draw is below
//! `sample_rate`; only a batch-sampled step can be rich-sampled, when the independent rich
//! draw is below `rich_subsample_rate`. So P(rich) = sample_rate × rich_subsample_rate. Both
//! draws come from the host (derived from the seed and the step id), so the policy is a pure
//! function of its inputs. A rich step snapshots every running request with every attribute.

wit_bindgen::generate!({
    path: "../../../wit/v0.1",
    world: "step-policy",
});

use exports::stepscope::policy::policy::{
    ExtraAttribute, Guest, RequestViews, RichPlan, SnapshotAttributes, StepDecision, StepSummary,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// `sample_rate`, stored as f64 bits (the guest is single-threaded; atomics keep it safe Rust).
static SAMPLE_RATE: AtomicU64 = AtomicU64::new(0x3F84_7AE1_47AE_147B); // 0.01
/// `rich_subsample_rate`, stored as f64 bits.
static RICH_SUBSAMPLE_RATE: AtomicU64 = AtomicU64::new(0x3F50_624D_D2F1_A9FC); // 0.001

fn rate(cell: &AtomicU64) -> f64 {
    f64::from_bits(cell.load(Ordering::Relaxed))
}

fn parse_rate(key: &str, value: &str) -> Result<f64, String> {
    let rate: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("parameter `{key}`: `{value}` is not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("parameter `{key}`: {rate} is outside [0, 1]"));
    }
    Ok(rate)
}

struct DefaultPolicy;

impl Guest for DefaultPolicy {
    fn configure(params: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in &params {
            match key.as_str() {
                "sample_rate" => SAMPLE_RATE.store(parse_rate(key, value)?.to_bits(), Ordering::Relaxed),
                "rich_subsample_rate" => {
                    RICH_SUBSAMPLE_RATE.store(parse_rate(key, value)?.to_bits(), Ordering::Relaxed)
                }
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (the default policy takes sample_rate and rich_subsample_rate)"
                    ));
                }
            }
        }
        Ok(())
    }

    fn decide(summary: StepSummary) -> StepDecision {
        let sample_rate = rate(&SAMPLE_RATE);
        let rich_rate = rate(&RICH_SUBSAMPLE_RATE);
        let emit_batch = summary.random_batch < sample_rate;
        let emit_rich = emit_batch && summary.random_rich < rich_rate;
        StepDecision {
            emit_batch,
            emit_rich,
            batch_probability: sample_rate,
            rich_probability: rich_rate,
            extra: Vec::<ExtraAttribute>::new(),
        }
    }

    fn plan_rich(_summary: StepSummary, requests: RequestViews) -> RichPlan {
        RichPlan {
            requests: (0..requests.request_id.len() as u32).collect(),
            attributes: SnapshotAttributes::all(),
            extra: Vec::new(),
        }
    }
}

export!(DefaultPolicy);
