//! `stepscope bench budget`: what a slow policy does to the step time, with and without the
//! step budget, side by side in one run.
//!
//! The engine runs the real CPU model `builtin:tiny` (steps of about a millisecond on a small
//! machine, as `serve builtin:tiny` has) over a stream of requests: `requests` requests of
//! `output_tokens` tokens, at most `max_num_seqs` at a time. Three tracers are measured, each
//! at batch rate 1: the built-in default policy; a slow policy (by default the test policy
//! `stall` busy-looping about 1.1 ms per call, within its fuel and deadline) under the default
//! budget; and the same slow policy with the budget off. Each tracer lives across all rounds
//! (as a server's does), the rounds are interleaved (the order rotating from round to round,
//! which matters: whichever ran second after the default was up to 20% slower at p99 on this
//! machine), and every step's wall time (`EngineCore::step`) is pooled per tracer. The report
//! gives p50, p99 and max step times and the p99 ratio of each tracer to the default's.
//! Nothing here asserts a number: the README records what this machine measured.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::bench::format_ns;
use crate::engine::{EngineConfig, EngineCore, SamplingParams, StepObserver, StepView};
use crate::model::KvCacheShape;
use crate::policy::PolicySource;
use crate::policy::budget::BudgetConfig;

use crate::step_tracing::{StepTracer, StepTracerObserver, StepTracingConfig, StepTracingError};

/// What to run.
#[derive(Debug, Clone)]
pub struct BudgetBenchParams {
    /// The slow policy and its `configure` arguments.
    pub slow_policy: PathBuf,
    pub slow_args: Vec<(String, String)>,
    pub requests: usize,
    pub output_tokens: usize,
    pub max_num_seqs: usize,
    pub rounds: usize,
}

/// One tracer's pooled step times.
#[derive(Debug, Clone)]
pub struct BudgetBenchRow {
    pub label: &'static str,
    pub steps: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// Steps the built-in default decided for the degraded policy.
    pub fallback_steps: u64,
    pub degradations: u64,
}

/// A measured tracer: label, policy, its arguments, budget.
type Variant = (
    &'static str,
    PolicySource,
    Vec<(String, String)>,
    BudgetConfig,
);

/// An observer shared by the engines of all rounds (one tracer per row, as in a server).
struct SharedObserver(Arc<Mutex<StepTracerObserver>>);

impl StepObserver for SharedObserver {
    fn on_step(&mut self, step: &StepView<'_>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_step(step);
    }

    fn on_step_end(&mut self, step_id: u64, ts_end_ns: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_step_end(step_id, ts_end_ns);
    }
}

/// Runs the benchmark (see the module doc).
pub fn run(params: &BudgetBenchParams) -> anyhow::Result<Vec<BudgetBenchRow>> {
    let model = crate::model::load_model_files("builtin:tiny")?;
    let variants: [Variant; 3] = [
        (
            "default policy",
            PolicySource::BuiltinDefault,
            Vec::new(),
            BudgetConfig::default(),
        ),
        (
            "slow policy, budget on (default)",
            PolicySource::File(params.slow_policy.clone()),
            params.slow_args.clone(),
            BudgetConfig::default(),
        ),
        (
            "slow policy, budget off",
            PolicySource::File(params.slow_policy.clone()),
            params.slow_args.clone(),
            BudgetConfig::OFF,
        ),
    ];
    let mut tracers = Vec::new();
    for (label, policy, args, budget) in &variants {
        let config = StepTracingConfig {
            policy: policy.clone(),
            policy_params: crate::policy::PolicyParams {
                args: args.clone(),
                ..crate::policy::PolicyParams::rates(1.0, 0.0)
            },
            policy_budget: *budget,
            ..StepTracingConfig::enabled_with_rates(1.0, 0.0, 0)
        };
        let (observer, handle) = StepTracer::start(config)
            .map_err(|e: StepTracingError| anyhow::anyhow!("{label}: {e}"))?;
        tracers.push((Arc::new(Mutex::new(observer)), handle, Vec::<u64>::new()));
    }
    let engine_config = EngineConfig {
        max_num_seqs: params.max_num_seqs,
        num_kv_blocks: 2048,
        block_size: 16,
        ..EngineConfig::default()
    };
    let kv = KvCacheShape {
        num_blocks: engine_config.num_kv_blocks,
        block_size: engine_config.block_size,
    };
    let n = tracers.len();
    for round in 0..params.rounds {
        // Rotate the order every round, so no tracer always runs first or last.
        for k in 0..n {
            let (observer, _, samples) = &mut tracers[(round + k) % n];
            let runner = crate::backend::build_runner(
                &model,
                kv,
                &crate::backend::Device::Cpu,
                crate::backend::ModelDtype::Auto,
            )?;
            let mut core = EngineCore::new(
                engine_config.clone(),
                runner,
                Box::new(SharedObserver(Arc::clone(observer))),
            )?;
            for i in 0..params.requests {
                let prompt: Vec<u32> = (0..16)
                    .map(|j| ((i * 31 + j * 7) % 200 + 10) as u32)
                    .collect();
                let sampling = SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::greedy(params.output_tokens)
                };
                core.add_request(i as u64 + 1, prompt, sampling)?;
            }
            while core.has_unfinished_requests() {
                let started = Instant::now();
                core.step();
                samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
        }
    }
    let mut rows = Vec::new();
    for ((label, ..), (_, mut handle, mut samples)) in variants.iter().zip(tracers) {
        let metrics = handle.shutdown();
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1));
            samples.get(rank - 1).copied().unwrap_or(0)
        };
        rows.push(BudgetBenchRow {
            label,
            steps: samples.len(),
            p50_ns: at(0.50),
            p99_ns: at(0.99),
            max_ns: samples.last().copied().unwrap_or(0),
            fallback_steps: metrics.policy.fallback_steps,
            degradations: metrics.policy.degradations,
        });
    }
    Ok(rows)
}

/// The report table.
pub fn render(rows: &[BudgetBenchRow], params: &BudgetBenchParams) -> String {
    let mut out = format!(
        "bench budget: builtin:tiny on the CPU, {} requests x {} tokens, at most {} at a time, \
         {} interleaved rounds; batch rate 1; slow policy {} {:?}\n",
        params.requests,
        params.output_tokens,
        params.max_num_seqs,
        params.rounds,
        params.slow_policy.display(),
        params.slow_args
    );
    out.push_str(&format!(
        "{:<34} {:>7} {:>10} {:>10} {:>10} {:>12} {:>9} {:>9}\n",
        "tracer", "steps", "p50", "p99", "max", "p99 vs def.", "fallback", "degraded"
    ));
    let base = rows.first().map_or(1, |r| r.p99_ns.max(1));
    for row in rows {
        out.push_str(&format!(
            "{:<34} {:>7} {:>10} {:>10} {:>10} {:>11.1}% {:>9} {:>9}\n",
            row.label,
            row.steps,
            format_ns(row.p50_ns as f64),
            format_ns(row.p99_ns as f64),
            format_ns(row.max_ns as f64),
            (row.p99_ns as f64 / base as f64 - 1.0) * 100.0,
            row.fallback_steps,
            row.degradations
        ));
    }
    out
}
