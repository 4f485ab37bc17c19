//! `stepscope policy replay`: a policy over a recorded step stream.
//!
//! The steps come from a JSON-lines trace (`--step-tracing-file`; record at
//! `--step-tracing-sample-rate 1` to capture every step). Each recorded summary is passed to
//! `decide` exactly as the engine would have (the draws recomputed from the recording's seed);
//! for a rich decision, `plan-rich` gets the request views rebuilt from that line's snapshots when
//! it has any. The report says which steps the policy would have sampled, why (its `reason`
//! extra attribute, if it gives one), and the rates, so a policy can be tried offline on real
//! traffic before it is swapped in. [`replay_arrivals`] does the same for `decide-request` over
//! the request arrivals a `--record-steps` file holds when journey tracing was on.

use crate::policy::runtime::{PolicyOutcome, PolicyRuntime};
use crate::policy::{RequestViews, StepSummary};
use std::collections::BTreeMap;

/// One recorded step: its summary, and the running requests if the recording snapshotted them.
#[derive(Debug, Clone)]
pub struct RecordedStep {
    pub summary: StepSummary,
    pub requests: Option<RequestViews>,
}

/// One step the replayed policy sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledStep {
    pub step_id: u64,
    pub rich: bool,
    pub batch_probability: f64,
    /// Requests the rich plan chose, when the recording had request views for this step.
    pub rich_requests: Option<usize>,
    pub extra: Vec<(String, String)>,
}

/// What a replay observed.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub steps: u64,
    pub first_step: Option<u64>,
    pub last_step: Option<u64>,
    /// Step time the recording spans (first start to last end), in seconds.
    pub span_seconds: f64,
    pub sampled: Vec<SampledStep>,
    pub rich: u64,
    /// Sampled steps by their `reason` extra attribute (`-` when none).
    pub reasons: BTreeMap<String, u64>,
    pub faults: u64,
    pub backing_off: u64,
}

impl ReplayReport {
    pub fn batch_rate(&self) -> f64 {
        self.sampled.len() as f64 / self.steps.max(1) as f64
    }

    pub fn rich_rate(&self) -> f64 {
        self.rich as f64 / self.steps.max(1) as f64
    }

    /// Sampled steps per second of recorded step time.
    pub fn sampled_per_second(&self) -> Option<f64> {
        (self.span_seconds > 0.0).then(|| self.sampled.len() as f64 / self.span_seconds)
    }
}

/// Runs `runtime` over `steps` in order.
pub fn replay(runtime: &mut PolicyRuntime, steps: &[RecordedStep]) -> ReplayReport {
    let mut report = ReplayReport {
        steps: steps.len() as u64,
        first_step: steps.first().map(|s| s.summary.step_id),
        last_step: steps.last().map(|s| s.summary.step_id),
        ..ReplayReport::default()
    };
    if let (Some(first), Some(last)) = (steps.first(), steps.last()) {
        let span_ns = last
            .summary
            .ts_end_ns
            .saturating_sub(first.summary.ts_start_ns);
        report.span_seconds = span_ns as f64 / 1e9;
    }
    for step in steps {
        let decision = match runtime.decide(&step.summary) {
            PolicyOutcome::Answer(decision) => decision,
            PolicyOutcome::Fault(_) => {
                report.faults += 1;
                continue;
            }
            PolicyOutcome::BackingOff => {
                report.backing_off += 1;
                continue;
            }
        };
        if !decision.emit_batch {
            continue;
        }
        let mut extra = decision.extra;
        let mut rich_requests = None;
        if decision.emit_rich {
            report.rich += 1;
            if let Some(views) = &step.requests {
                let mut views = views.clone();
                match runtime.plan_rich(&step.summary, &mut views) {
                    PolicyOutcome::Answer(selection) => {
                        rich_requests = Some(selection.requests.len());
                        extra.retain(|(k, _)| !selection.extra.iter().any(|(key, _)| key == k));
                        extra.extend(selection.extra);
                    }
                    PolicyOutcome::Fault(_) => report.faults += 1,
                    PolicyOutcome::BackingOff => report.backing_off += 1,
                }
            }
        }
        let reason = extra
            .iter()
            .find(|(k, _)| k == "reason")
            .map_or("-", |(_, v)| v.as_str());
        *report.reasons.entry(reason.to_string()).or_default() += 1;
        report.sampled.push(SampledStep {
            step_id: step.summary.step_id,
            rich: decision.emit_rich,
            batch_probability: decision.batch_probability,
            rich_requests,
            extra,
        });
    }
    report
}

/// What `decide-request` made of recorded arrivals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JourneyReplay {
    pub arrivals: u64,
    pub traced: u64,
    /// Traced journeys by their `reason` extra attribute (`-` when none).
    pub reasons: BTreeMap<String, u64>,
    pub faults: u64,
    pub backing_off: u64,
    /// The policy was built against contract 0.1: it has no `decide-request` (the host would
    /// decide its journeys by rate), so nothing was replayed.
    pub no_decide_request: bool,
}

/// Runs `decide-request` over recorded arrivals (`--record-steps` with journey tracing on), in
/// order. Each arrival is passed as recorded, its `random` draw included.
pub fn replay_arrivals(
    runtime: &mut PolicyRuntime,
    arrivals: &[crate::policy::RequestArrival],
) -> JourneyReplay {
    let mut report = JourneyReplay {
        arrivals: arrivals.len() as u64,
        ..JourneyReplay::default()
    };
    for (i, arrival) in arrivals.iter().enumerate() {
        match runtime.decide_request(arrival, i as u64 + 1) {
            None => {
                report.no_decide_request = true;
                return report;
            }
            Some(PolicyOutcome::Answer(answer)) => {
                if answer.trace {
                    report.traced += 1;
                    let reason = answer
                        .extra
                        .iter()
                        .find(|(k, _)| k == "reason")
                        .map_or("-", |(_, v)| v.as_str());
                    *report.reasons.entry(reason.to_string()).or_default() += 1;
                }
            }
            Some(PolicyOutcome::Fault(_)) => report.faults += 1,
            Some(PolicyOutcome::BackingOff) => report.backing_off += 1,
        }
    }
    report
}
