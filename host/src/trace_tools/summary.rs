//! `stepscope trace summary`: what a sampled step trace says about every step of the run.
//!
//! [`Summary::of`] re-weights the traced steps by their recorded probabilities (see
//! [`estimate`](super::estimate)) into population estimates with 95% intervals for the batch
//! size, tokens per step, prefill share, KV usage, queue depths, preemptions and step duration,
//! weighted percentiles of each, the slowest steps and the steps that preempted. It serialises
//! as `--json` prints it, and [`Summary::render`] writes the terminal report.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use super::estimate::{self, Estimate};
use super::load::{TraceFile, TracedStep};

/// Percentiles reported for every quantity.
pub const PERCENTILES: [f64; 4] = [0.5, 0.9, 0.99, 1.0];

/// Slow steps and preempting steps listed at most.
const LISTED: usize = 10;

/// One per-step quantity across the population.
#[derive(Debug, Clone, Serialize)]
pub struct Quantity {
    pub name: &'static str,
    pub unit: &'static str,
    /// Population mean (Hájek; for `prefill_share`, total prefill tokens / total tokens).
    pub mean: Estimate,
    /// Population total (Horvitz–Thompson), where a total means something.
    pub total: Option<Estimate>,
    /// p50, p90, p99 and max of the re-weighted distribution.
    pub percentiles: [f64; 4],
}

impl Quantity {
    /// The estimates of `ys` over steps traced with probabilities `pis` (a total too when
    /// `with_total`).
    fn of(
        name: &'static str,
        unit: &'static str,
        ys: &[f64],
        pis: &[f64],
        with_total: bool,
    ) -> Self {
        Quantity {
            name,
            unit,
            mean: estimate::mean(ys, pis),
            total: with_total.then(|| estimate::total(ys, pis)),
            percentiles: to_array(estimate::percentiles(ys, pis, &PERCENTILES)),
        }
    }
}

/// A slow step: `step_id` took `duration_us` (reported by the next step, which was traced).
#[derive(Debug, Clone, Serialize)]
pub struct SlowStep {
    pub step_id: u64,
    pub duration_us: u64,
    pub batch_size: u64,
    pub scheduled_tokens: u64,
}

/// A traced step that preempted requests.
#[derive(Debug, Clone, Serialize)]
pub struct PreemptingStep {
    pub step_id: u64,
    pub num_preempted: u64,
    pub kv_usage: f64,
    pub waiting_depth: u64,
}

/// The whole summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub file: String,
    pub policies: Vec<String>,
    /// Lines traced (sampled steps).
    pub steps_traced: u64,
    /// Traced steps with request snapshots, and the snapshots.
    pub steps_rich: u64,
    pub snapshots: u64,
    pub journey_spans: u64,
    /// Steps in the run: at least the last traced step id (steps are numbered from 1) ...
    pub steps_seen_at_least: u64,
    /// ... and the Horvitz–Thompson estimate Σ 1/π.
    pub steps_estimated: Estimate,
    /// Whether every traced step had probability 1 (a census: exact numbers).
    pub census: bool,
    /// Smallest and largest recorded batch probability.
    pub batch_probability_range: (f64, f64),
    pub quantities: Vec<Quantity>,
    pub slowest_steps: Vec<SlowStep>,
    /// Traced steps that preempted, in step order (the first few).
    pub preempting_steps: Vec<PreemptingStep>,
    pub preempting_steps_traced: u64,
    /// What the estimates assume.
    pub note: &'static str,
}

const NOTE: &str = "Estimates re-weight each traced step by 1/π, its recorded sampling.batch_probability \
(Horvitz-Thompson totals, Hajek means, normal 95% intervals). They are unbiased when π is the \
probability the step really had of being traced, whether a constant rate or a policy's rule; \
steps whose policy faulted or backed off are not in the file and are not represented.";

impl Summary {
    /// Summarises `trace`, read from `file`.
    pub fn of(trace: &TraceFile, file: &str) -> Self {
        let steps = &trace.steps;
        let pis: Vec<f64> = steps.iter().map(|s| s.batch_probability).collect();
        let column = |f: &dyn Fn(&TracedStep) -> f64| steps.iter().map(f).collect::<Vec<f64>>();
        let quantity =
            |name, unit, ys: Vec<f64>, with_total| Quantity::of(name, unit, &ys, &pis, with_total);
        let tokens = column(&|s| s.scheduled_tokens as f64);
        let prefill = column(&|s| s.prefill_tokens as f64);
        let shares: Vec<f64> = steps
            .iter()
            .map(|s| {
                if s.scheduled_tokens == 0 {
                    0.0
                } else {
                    s.prefill_tokens as f64 / s.scheduled_tokens as f64
                }
            })
            .collect();
        let mut quantities = vec![
            quantity(
                "batch_size",
                "requests",
                column(&|s| s.batch_size() as f64),
                false,
            ),
            quantity("tokens_per_step", "tokens", tokens.clone(), true),
            Quantity {
                mean: estimate::ratio(&prefill, &tokens, &pis),
                ..quantity("prefill_share", "of tokens", shares, false)
            },
            quantity("kv_usage", "of blocks", column(&|s| s.kv_usage), false),
            quantity(
                "running_depth",
                "requests",
                column(&|s| s.running_depth as f64),
                false,
            ),
            quantity(
                "waiting_depth",
                "requests",
                column(&|s| s.waiting_depth as f64),
                false,
            ),
            quantity(
                "preemptions_per_step",
                "requests",
                column(&|s| s.num_preempted as f64),
                true,
            ),
            quantity(
                "finished_per_step",
                "requests",
                column(&|s| s.num_finished as f64),
                true,
            ),
        ];
        // `last_step_duration_us` is the previous step's; the first step reports none.
        let (durations, duration_pis): (Vec<f64>, Vec<f64>) = steps
            .iter()
            .filter(|s| s.step_id > 1)
            .map(|s| (s.last_step_duration_us as f64, s.batch_probability))
            .unzip();
        if !durations.is_empty() {
            quantities.push(Quantity::of(
                "step_duration",
                "us",
                &durations,
                &duration_pis,
                true,
            ));
        }
        let mut slow: Vec<&TracedStep> = steps.iter().filter(|s| s.step_id > 1).collect();
        slow.sort_by(|a, b| {
            b.last_step_duration_us
                .cmp(&a.last_step_duration_us)
                .then(a.step_id.cmp(&b.step_id))
        });
        let preempting: Vec<&TracedStep> = steps.iter().filter(|s| s.num_preempted > 0).collect();
        let min_pi = pis.iter().copied().fold(f64::INFINITY, f64::min);
        let max_pi = pis.iter().copied().fold(0.0, f64::max);
        Summary {
            file: file.to_string(),
            policies: steps
                .iter()
                .map(|s| s.policy.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            steps_traced: steps.len() as u64,
            steps_rich: steps.iter().filter(|s| !s.snapshots.is_empty()).count() as u64,
            snapshots: steps.iter().map(|s| s.snapshots.len() as u64).sum(),
            journey_spans: trace.journey_spans,
            steps_seen_at_least: steps.iter().map(|s| s.step_id).max().unwrap_or(0),
            steps_estimated: estimate::count(&pis),
            census: min_pi >= 1.0,
            batch_probability_range: (min_pi, max_pi),
            quantities,
            slowest_steps: slow
                .iter()
                .take(LISTED)
                .map(|s| SlowStep {
                    step_id: s.step_id - 1,
                    duration_us: s.last_step_duration_us,
                    batch_size: s.batch_size(),
                    scheduled_tokens: s.scheduled_tokens,
                })
                .collect(),
            preempting_steps: preempting
                .iter()
                .take(LISTED)
                .map(|s| PreemptingStep {
                    step_id: s.step_id,
                    num_preempted: s.num_preempted,
                    kv_usage: s.kv_usage,
                    waiting_depth: s.waiting_depth,
                })
                .collect(),
            preempting_steps_traced: preempting.len() as u64,
            note: NOTE,
        }
    }

    /// The quantity called `name`.
    pub fn quantity(&self, name: &str) -> Option<&Quantity> {
        self.quantities.iter().find(|q| q.name == name)
    }

    /// The terminal report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "step trace {}", self.file);
        let _ = writeln!(out, "  policies        {}", self.policies.join(", "));
        let (lo, hi) = self.batch_probability_range;
        let sampling = if self.census {
            "every step (probability 1): exact".to_string()
        } else if lo == hi {
            format!("probability {lo}")
        } else {
            format!("probabilities {lo} to {hi}")
        };
        let _ = writeln!(
            out,
            "  steps traced    {} ({sampling}); rich {} with {} snapshots; {} journey spans",
            self.steps_traced, self.steps_rich, self.snapshots, self.journey_spans
        );
        let n = self.steps_estimated;
        let _ = writeln!(
            out,
            "  steps in run    at least {} (last traced id); estimated {:.0} [{:.0}, {:.0}]",
            self.steps_seen_at_least, n.value, n.ci95_low, n.ci95_high
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<34} {:>28}  {:>34}  {:>9} {:>9} {:>9} {:>9}",
            "per step", "mean [95% CI]", "total [95% CI]", "p50", "p90", "p99", "max"
        );
        for q in &self.quantities {
            let mean = interval(&q.mean);
            let total = q.total.as_ref().map_or_else(String::new, interval);
            let [p50, p90, p99, max] = q.percentiles;
            let _ = writeln!(
                out,
                "  {:<34} {:>28}  {:>34}  {:>9} {:>9} {:>9} {:>9}",
                format!("{} ({})", q.name, q.unit),
                mean,
                total,
                short(p50),
                short(p90),
                short(p99),
                short(max)
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  slowest steps (duration reported by the next step):");
        for s in &self.slowest_steps {
            let _ = writeln!(
                out,
                "    step {:>8}  {:>9} us  batch {:>4}  tokens {:>6}",
                s.step_id, s.duration_us, s.batch_size, s.scheduled_tokens
            );
        }
        let _ = writeln!(
            out,
            "  traced steps that preempted: {} (first {} shown)",
            self.preempting_steps_traced,
            self.preempting_steps.len()
        );
        for s in &self.preempting_steps {
            let _ = writeln!(
                out,
                "    step {:>8}  preempted {:>3}  kv {:>5.1}%  waiting {:>4}",
                s.step_id,
                s.num_preempted,
                s.kv_usage * 100.0,
                s.waiting_depth
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  {}", self.note);
        out
    }
}

fn to_array(values: Vec<f64>) -> [f64; 4] {
    let mut out = [f64::NAN; 4];
    for (slot, v) in out.iter_mut().zip(values) {
        *slot = v;
    }
    out
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn interval(e: &Estimate) -> String {
    format!(
        "{} [{}, {}]",
        short(e.value),
        short(e.ci95_low),
        short(e.ci95_high)
    )
}
