//! Example step-tracing policy: trace the steps where the engine is under pressure.
//!
//! A step is traced, with batch probability 1.0 (a deterministic trigger), when it preempted a
//! request (`num-preempted > 0`), when KV usage is above `kv_usage_threshold` (default 0.9), or,
//! if `waiting_threshold` is given, when at least that many requests are waiting; the reason
//! (`preemption`, `kv_usage`, `waiting`) goes into the extra attribute `reason`. A triggered
//! step is also rich (probability 1.0) unless `rich_top_k` is 0, and its rich plan snapshots
//! only the `rich_top_k` (default 8) running requests holding the most KV blocks, with every
//! attribute. Any other step falls back to the default two-stage sampling at `sample_rate` and
//! `rich_subsample_rate` (reason `base_rate`); pass `sample_rate=0` to trace triggers only.
//!
//! The rich plan puts requests whose journey is traced first (so a traced request's step
//! snapshots link to it), then the heaviest.
//!
//! Journeys (`decide-request`): a request that arrives under pressure (KV usage above the
//! threshold, or at least `waiting_threshold` waiting) is traced (probability 1, reason
//! `kv_usage` or `waiting`); any other follows the default's ParentBased rule over
//! `journey_sample_rate` (reason `base_rate` when traced).
//!
//! Parameters: `sample_rate`, `rich_subsample_rate`, `journey_sample_rate`,
//! `kv_usage_threshold` (all in [0, 1]), `waiting_threshold` (a count, optional), `rich_top_k`
//! (a count). Unknown keys are refused.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "step-policy",
});

use exports::stepscope::policy::policy::{
    ExtraAttribute, Guest, JourneyDecision, RequestArrival, RequestViews, RichPlan,
    SnapshotAttributes, StepDecision, StepSummary,
};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// f64 parameters, stored as bits (the guest is single-threaded; atomics keep it safe Rust).
static SAMPLE_RATE: AtomicU64 = AtomicU64::new(0x3F84_7AE1_47AE_147B); // 0.01
static RICH_SUBSAMPLE_RATE: AtomicU64 = AtomicU64::new(0x3F50_624D_D2F1_A9FC); // 0.001
static JOURNEY_SAMPLE_RATE: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000); // 1.0
static KV_USAGE_THRESHOLD: AtomicU64 = AtomicU64::new(0x3FEC_CCCC_CCCC_CCCD); // 0.9
/// `u32::MAX` means "no waiting threshold".
static WAITING_THRESHOLD: AtomicU32 = AtomicU32::new(u32::MAX);
static RICH_TOP_K: AtomicU32 = AtomicU32::new(8);

fn get(cell: &AtomicU64) -> f64 {
    f64::from_bits(cell.load(Ordering::Relaxed))
}

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

fn parse_count(key: &str, value: &str) -> Result<u32, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("parameter `{key}`: `{value}` is not a non-negative integer"))
}

fn attr(key: &str, value: &str) -> ExtraAttribute {
    ExtraAttribute {
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// Why a step is traced regardless of the base rates, if it is.
fn trigger(summary: &StepSummary) -> Option<&'static str> {
    if summary.num_preempted > 0 {
        Some("preemption")
    } else if summary.kv_usage_ratio > get(&KV_USAGE_THRESHOLD) {
        Some("kv_usage")
    } else {
        let waiting = WAITING_THRESHOLD.load(Ordering::Relaxed);
        (waiting != u32::MAX && summary.waiting_depth >= waiting).then_some("waiting")
    }
}

struct PressurePolicy;

impl Guest for PressurePolicy {
    fn configure(params: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in &params {
            match key.as_str() {
                "sample_rate" => {
                    SAMPLE_RATE.store(parse_unit(key, value)?.to_bits(), Ordering::Relaxed)
                }
                "rich_subsample_rate" => {
                    RICH_SUBSAMPLE_RATE.store(parse_unit(key, value)?.to_bits(), Ordering::Relaxed)
                }
                "journey_sample_rate" => {
                    JOURNEY_SAMPLE_RATE.store(parse_unit(key, value)?.to_bits(), Ordering::Relaxed)
                }
                "kv_usage_threshold" => {
                    KV_USAGE_THRESHOLD.store(parse_unit(key, value)?.to_bits(), Ordering::Relaxed)
                }
                "waiting_threshold" => {
                    let n = parse_count(key, value)?;
                    if n == u32::MAX {
                        return Err(format!("parameter `{key}`: {n} is too large"));
                    }
                    WAITING_THRESHOLD.store(n, Ordering::Relaxed)
                }
                "rich_top_k" => RICH_TOP_K.store(parse_count(key, value)?, Ordering::Relaxed),
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (the pressure policy takes sample_rate, \
                         rich_subsample_rate, journey_sample_rate, kv_usage_threshold, \
                         waiting_threshold, rich_top_k)"
                    ));
                }
            }
        }
        Ok(())
    }

    fn decide(summary: StepSummary) -> StepDecision {
        if let Some(reason) = trigger(&summary) {
            let rich = RICH_TOP_K.load(Ordering::Relaxed) > 0 && summary.running_depth > 0;
            return StepDecision {
                emit_batch: true,
                emit_rich: rich,
                batch_probability: 1.0,
                rich_probability: if rich { 1.0 } else { 0.0 },
                extra: vec![attr("reason", reason)],
            };
        }
        let sample_rate = get(&SAMPLE_RATE);
        let rich_rate = get(&RICH_SUBSAMPLE_RATE);
        let emit_batch = summary.random_batch < sample_rate;
        StepDecision {
            emit_batch,
            emit_rich: emit_batch && summary.random_rich < rich_rate,
            batch_probability: sample_rate,
            rich_probability: rich_rate,
            extra: if emit_batch {
                vec![attr("reason", "base_rate")]
            } else {
                Vec::new()
            },
        }
    }

    fn plan_rich(_summary: StepSummary, requests: RequestViews) -> RichPlan {
        let k = RICH_TOP_K.load(Ordering::Relaxed) as usize;
        let blocks = &requests.kv_blocks_allocated;
        let traced = &requests.journey_traced;
        let mut order: Vec<u32> = (0..blocks.len() as u32).collect();
        // Traced journeys first, then most blocks; ties keep admission order.
        order.sort_by_key(|&i| {
            let i = i as usize;
            (std::cmp::Reverse((traced[i], blocks[i])), i)
        });
        order.truncate(k);
        RichPlan {
            requests: order,
            attributes: SnapshotAttributes::all(),
            extra: vec![attr("rich_top_k", &k.to_string())],
        }
    }

    fn decide_request(arrival: RequestArrival) -> JourneyDecision {
        let waiting = WAITING_THRESHOLD.load(Ordering::Relaxed);
        let pressure = if arrival.kv_usage_ratio > get(&KV_USAGE_THRESHOLD) {
            Some("kv_usage")
        } else {
            (waiting != u32::MAX && arrival.waiting_depth >= waiting).then_some("waiting")
        };
        if let Some(reason) = pressure {
            return JourneyDecision {
                trace: true,
                probability: 1.0,
                extra: vec![attr("reason", reason)],
            };
        }
        let rate = get(&JOURNEY_SAMPLE_RATE);
        let (trace, probability) = match arrival.parent_sampled {
            Some(sampled) => (sampled, 1.0),
            None => (arrival.random < rate, rate),
        };
        JourneyDecision {
            trace,
            probability,
            extra: if trace {
                vec![attr("reason", "base_rate")]
            } else {
                Vec::new()
            },
        }
    }
}

export!(PressurePolicy);
