//! `stepscope bench tracing`: what step tracing costs the step loop, side by side in one run.
//!
//! Each configuration — tracing off, the default rates (0.01 / 0.001), 1.0 / 0 and 1.0 / 1.0 —
//! drives a real [`EngineCore`] with the deterministic paged-KV runner over the same workload
//! (`requests` concurrent requests, `output_tokens` each), exporting JSON lines to `/dev/null`
//! so the exporter thread does its real work without a collector; a last row runs 1.0 / 1.0
//! with no sink (the exporter thread drops the records), which isolates the step-loop cost
//! from the exporter's CPU on a machine with few cores. Configurations are
//! interleaved over `rounds` rounds; end-to-end tokens/s and mean step time are the medians of
//! the rounds. The step-loop cost is measured by timing the observer's `on_step` and
//! `on_step_end` on every step
//! and classifying the step (unsampled, batch-only, rich with N snapshots) from the tracer's
//! counters; the per-snapshot cost is (rich step − batch-only step) / snapshots per rich step.
//! The journey row traces every request's journey (rate 1.0) on top of the default step rates;
//! beside it, [`unsampled_journey_decision_ns`] times what an untraced request costs (its
//! ticket and the one decision), to set against the engine's own time per request.
//! [`run_variants`] runs chosen configurations on another runner (the GPU benchmark in
//! `bench/cuda_tracing.rs` runs off, default and 1.0 / 1.0 on the CUDA runner).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::bench::{LatencyStats, format_ns};
use crate::engine::journey::{JourneyArrival, JourneyDecision, JourneyLog, JourneyTicket};
use crate::engine::model_runner::ModelRunner;
use crate::engine::{EngineConfig, EngineCore, SamplingParams, StepObserver, StepView};
use crate::testing::deterministic_runner::DeterministicRunner;

use crate::step_tracing::{
    StepTracer, StepTracerObserver, StepTracingConfig, StepTracingError, TracerMetrics,
};

/// Prompt token ids are below this.
pub const BENCH_VOCAB: usize = 1024;
const PROMPT_TOKENS: usize = 64;

/// A configuration measured by the benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TracingVariant {
    pub label: &'static str,
    /// `None`: tracing off.
    pub rates: Option<(f64, f64)>,
    /// Write JSON lines to `/dev/null`; otherwise the exporter thread discards the records
    /// (the step-loop cost alone, without the exporter's CPU competing for the cores).
    pub jsonl: bool,
    /// `--journey-tracing-sample-rate` (`None`: journeys off).
    pub journey_rate: Option<f64>,
}

/// The configurations, in report order.
pub const VARIANTS: [TracingVariant; 6] = [
    TracingVariant {
        label: "off",
        rates: None,
        jsonl: false,
        journey_rate: None,
    },
    TracingVariant {
        label: "default 0.01/0.001",
        rates: Some((0.01, 0.001)),
        jsonl: true,
        journey_rate: None,
    },
    TracingVariant {
        label: "1.0/0",
        rates: Some((1.0, 0.0)),
        jsonl: true,
        journey_rate: None,
    },
    TracingVariant {
        label: "1.0/1.0",
        rates: Some((1.0, 1.0)),
        jsonl: true,
        journey_rate: None,
    },
    TracingVariant {
        label: "1.0/1.0 no sink",
        rates: Some((1.0, 1.0)),
        jsonl: false,
        journey_rate: None,
    },
    TracingVariant {
        label: "journeys 1.0+default",
        rates: Some((0.01, 0.001)),
        jsonl: true,
        journey_rate: Some(1.0),
    },
];

/// How a step looked to the tracer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Unsampled,
    Batch,
    Rich(u64),
}

/// One configuration's results over all rounds.
#[derive(Debug, Clone)]
pub struct TracingBenchRow {
    pub variant: TracingVariant,
    /// Median over rounds.
    pub tokens_per_s: f64,
    /// Best round (the one least disturbed by other load on the machine).
    pub tokens_per_s_best: f64,
    /// Median over rounds of (wall time / steps), in µs.
    pub step_mean_us: f64,
    /// Lowest over rounds of the engine thread's CPU time per step, in µs (`None` where the OS
    /// does not report thread CPU time). Other load only ever adds to it (cache and memory
    /// contention), so the lowest round is the least disturbed.
    pub cpu_per_step_us: Option<f64>,
    pub steps_per_round: u64,
    /// `on_step` time of steps the policy did not sample (the decide-only cost; with tracing
    /// off, the no-op observer).
    pub unsampled: Option<LatencyStats>,
    /// `on_step` time of batch-sampled, non-rich steps.
    pub batch: Option<LatencyStats>,
    /// `on_step` time of rich steps.
    pub rich: Option<LatencyStats>,
    /// Mean snapshots per rich step.
    pub snapshots_per_rich: f64,
    pub batch_sampled: u64,
    pub rich_sampled: u64,
    pub records_dropped: u64,
    /// Request journeys traced, over all rounds.
    pub journeys_traced: u64,
}

/// Times the wrapped observer's `on_step` plus `on_step_end` (where a sampled step's record is
/// queued) and classifies each step from the tracer's counters.
struct TimedObserver {
    inner: StepTracerObserver,
    metrics: Arc<TracerMetrics>,
    samples: Vec<(u64, StepKind)>,
    out: Arc<Mutex<Vec<(u64, StepKind)>>>,
    /// The current step: `on_step`'s time and the counters before it.
    current: Option<(u64, [u64; 3])>,
}

impl TimedObserver {
    fn counters(&self) -> [u64; 3] {
        let m = &self.metrics;
        [
            m.steps_batch_sampled.load(Ordering::Relaxed),
            m.steps_rich_sampled.load(Ordering::Relaxed),
            m.snapshots_emitted.load(Ordering::Relaxed),
        ]
    }
}

impl StepObserver for TimedObserver {
    fn on_step(&mut self, step: &StepView<'_>) {
        let before = self.counters();
        let started = Instant::now();
        self.inner.on_step(step);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.current = Some((ns, before));
    }

    fn on_step_end(&mut self, step_id: u64, ts_end_ns: u64) {
        let started = Instant::now();
        self.inner.on_step_end(step_id, ts_end_ns);
        let end_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let Some((ns, [batch_before, rich_before, snaps_before])) = self.current.take() else {
            return;
        };
        let [batch, rich, snaps] = self.counters();
        let kind = if rich != rich_before {
            StepKind::Rich(snaps - snaps_before)
        } else if batch != batch_before {
            StepKind::Batch
        } else {
            StepKind::Unsampled
        };
        self.samples.push((ns + end_ns, kind));
    }

    fn decide_journey(&mut self, arrival: &JourneyArrival<'_>) -> Option<JourneyDecision> {
        self.inner.decide_journey(arrival)
    }

    fn on_journey_end(&mut self, journey: JourneyLog) {
        self.inner.on_journey_end(journey);
    }
}

impl Drop for TimedObserver {
    fn drop(&mut self) {
        self.out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&mut self.samples);
    }
}

struct RoundResult {
    tokens_per_s: f64,
    step_mean_us: f64,
    /// Engine-thread CPU time per step (µs), if the OS reports it.
    cpu_per_step_us: Option<f64>,
    steps: u64,
    batch_sampled: u64,
    rich_sampled: u64,
    records_dropped: u64,
    journeys_traced: u64,
}

/// The KV cache the workload of `requests` × `output_tokens` needs: (block size, blocks). A
/// runner built for [`run_variants`] must hold at least this many.
pub fn kv_cache_needed(requests: usize, output_tokens: usize) -> (usize, usize) {
    let block_size = 16;
    let per_request_blocks = (PROMPT_TOKENS + output_tokens).div_ceil(block_size) + 1;
    (block_size, requests * per_request_blocks + 16)
}

/// Tokens a request of the workload holds at most (prompt and output).
pub fn max_sequence_len(output_tokens: usize) -> usize {
    PROMPT_TOKENS + output_tokens
}

/// Builds the model runner of one round from the round's engine configuration (each round
/// runs a fresh engine; the runner may be shared between rounds).
pub type RunnerFactory<'a> = dyn FnMut(&EngineConfig) -> Box<dyn ModelRunner> + 'a;

fn workload(requests: usize, output_tokens: usize) -> (EngineConfig, Vec<Vec<u32>>) {
    let (block_size, num_kv_blocks) = kv_cache_needed(requests, output_tokens);
    let config = EngineConfig {
        block_size,
        num_kv_blocks,
        max_num_seqs: requests,
        max_num_batched_tokens: 2048.max(requests),
        max_waiting_requests: requests.max(1),
        seed: 0,
        ..EngineConfig::default()
    };
    let prompts = (0..requests)
        .map(|i| {
            (0..PROMPT_TOKENS)
                .map(|j| ((i * 7919 + j * 31 + 1) % BENCH_VOCAB) as u32)
                .collect()
        })
        .collect();
    (config, prompts)
}

fn run_round(
    variant: TracingVariant,
    requests: usize,
    output_tokens: usize,
    samples: &Arc<Mutex<Vec<(u64, StepKind)>>>,
    make_runner: &mut RunnerFactory<'_>,
) -> Result<RoundResult, StepTracingError> {
    let (engine_config, prompts) = workload(requests, output_tokens);
    let config = match variant.rates {
        None => StepTracingConfig::default(),
        Some((rate, rich)) => StepTracingConfig {
            step_tracing_file: variant.jsonl.then(|| "/dev/null".into()),
            journey_sample_rate: variant.journey_rate,
            ..StepTracingConfig::enabled_with_rates(rate, rich, 0)
        },
    };
    let (tracer, mut handle) = StepTracer::start(config)?;
    let observer = TimedObserver {
        inner: tracer,
        metrics: handle.metrics_handle(),
        samples: Vec::with_capacity(4096),
        out: Arc::clone(samples),
        current: None,
    };
    let runner = make_runner(&engine_config);
    let mut core = EngineCore::new(engine_config, runner, Box::new(observer))
        .map_err(|e| StepTracingError::Config(format!("bench engine: {e}")))?;
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(output_tokens)
    };
    for (i, prompt) in prompts.into_iter().enumerate() {
        let id = i as u64 + 1;
        let added = if variant.journey_rate.is_some() {
            let ticket = JourneyTicket::new(None, 1);
            core.add_request_in_journey(id, prompt, params.clone(), &ticket)
        } else {
            core.add_request(id, prompt, params.clone())
        };
        added.map_err(|e| StepTracingError::Config(format!("bench request: {e}")))?;
    }
    let cpu_before = thread_cpu_ns();
    let started = Instant::now();
    let mut steps = 0u64;
    let mut tokens = 0u64;
    while core.has_unfinished_requests() {
        let out = core.step();
        steps += 1;
        tokens += out
            .outputs
            .iter()
            .map(|o| o.new_token_ids.len() as u64)
            .sum::<u64>();
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu_ns = match (cpu_before, thread_cpu_ns()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    drop(core);
    let metrics = handle.shutdown();
    Ok(RoundResult {
        tokens_per_s: tokens as f64 / wall.max(1e-9),
        step_mean_us: wall * 1e6 / steps.max(1) as f64,
        cpu_per_step_us: cpu_ns.map(|ns| ns as f64 / 1e3 / steps.max(1) as f64),
        steps,
        batch_sampled: metrics.steps_batch_sampled,
        rich_sampled: metrics.steps_rich_sampled,
        records_dropped: metrics.records_dropped(),
        journeys_traced: metrics.journeys_traced,
    })
}

/// What an untraced request costs, in ns: its ticket and the observer's one decision (journeys
/// on at rate 0, so every request is decided and none traced), the mean over `n` requests.
pub fn unsampled_journey_decision_ns(n: u64) -> Result<f64, StepTracingError> {
    let config = StepTracingConfig {
        journey_sample_rate: Some(0.0),
        ..StepTracingConfig::enabled_with_rates(0.01, 0.001, 0)
    };
    let (mut observer, mut handle) = StepTracer::start(config)?;
    let n = n.max(1);
    let started = Instant::now();
    for id in 0..n {
        let ticket = JourneyTicket::new(None, 1);
        let arrival = JourneyArrival {
            request_id: id,
            external_id: "bench",
            num_prompt_tokens: PROMPT_TOKENS,
            max_tokens: 64,
            temperature: 1.0,
            num_choices: 1,
            parent: ticket.parent(),
            running_depth: 8,
            waiting_depth: 0,
            kv_usage_ratio: 0.5,
            step_id: 0,
        };
        let decision = ticket.decide_once(|| observer.decide_journey(&arrival));
        std::hint::black_box(decision);
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    handle.shutdown();
    Ok(ns)
}

/// CPU time this thread has spent running, in ns (Linux `/proc/thread-self/schedstat`): unlike
/// wall time, it does not count the time other processes on a shared machine take the core.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs every configuration `rounds` times, interleaved, on the deterministic runner; one row
/// per configuration.
pub fn run(
    requests: usize,
    output_tokens: usize,
    rounds: usize,
) -> Result<Vec<TracingBenchRow>, StepTracingError> {
    run_variants(
        &VARIANTS,
        (requests, output_tokens, rounds),
        &mut |config: &EngineConfig| {
            Box::new(DeterministicRunner::new(
                config.num_kv_blocks,
                config.block_size,
                BENCH_VOCAB,
                max_sequence_len(output_tokens.clamp(1, 8192)) + 16,
            ))
        },
    )
}

/// Runs each of `variants` `rounds` times, interleaved, on the runners `make_runner` builds
/// (which must accept token ids below [`BENCH_VOCAB`] and hold [`kv_cache_needed`]); one row
/// per variant, in the order given.
pub fn run_variants(
    variants: &[TracingVariant],
    (requests, output_tokens, rounds): (usize, usize, usize),
    make_runner: &mut RunnerFactory<'_>,
) -> Result<Vec<TracingBenchRow>, StepTracingError> {
    if variants.is_empty() {
        return Ok(Vec::new());
    }
    let requests = requests.clamp(1, 4096);
    let output_tokens = output_tokens.clamp(1, 8192);
    let rounds = rounds.max(1);
    let samples: Vec<_> = variants.iter().map(|_| Arc::default()).collect();
    let mut results: Vec<Vec<RoundResult>> = variants.iter().map(|_| Vec::new()).collect();
    // Unmeasured warm-ups (page faults, Wasm compilation caches, allocator, GPU clocks and
    // CUDA graphs) on a short workload: the 1.0 / 1.0 variants, which touch the most (else the
    // first variant).
    let full: Vec<TracingVariant> = variants
        .iter()
        .copied()
        .filter(|v| v.rates == Some((1.0, 1.0)))
        .collect();
    for &variant in if full.is_empty() {
        &variants[..1]
    } else {
        &full[..]
    } {
        run_round(variant, requests.min(64), 8, &Arc::default(), make_runner)?;
    }
    for round in 0..rounds {
        // Rotate the order each round so no configuration always runs first or last.
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            let result = run_round(
                variants[i],
                requests,
                output_tokens,
                &samples[i],
                make_runner,
            )?;
            if std::env::var_os("STEPSCOPE_BENCH_VERBOSE").is_some() {
                eprintln!(
                    "round {round} {:<20} {:>10.0} tokens/s {:>8.1} us/step",
                    variants[i].label, result.tokens_per_s, result.step_mean_us
                );
            }
            results[i].push(result);
        }
    }
    Ok(variants
        .iter()
        .zip(results)
        .zip(samples)
        .map(|((variant, rounds), samples)| {
            let samples =
                std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
            let pick = |f: fn(&StepKind) -> bool| {
                LatencyStats::from_nanos(
                    samples
                        .iter()
                        .filter(|(_, k)| f(k))
                        .map(|&(ns, _)| ns)
                        .collect(),
                )
            };
            let rich_steps: Vec<u64> = samples
                .iter()
                .filter_map(|(_, k)| match k {
                    StepKind::Rich(n) => Some(*n),
                    _ => None,
                })
                .collect();
            TracingBenchRow {
                variant: *variant,
                tokens_per_s: median(rounds.iter().map(|r| r.tokens_per_s).collect()),
                tokens_per_s_best: rounds.iter().map(|r| r.tokens_per_s).fold(0.0, f64::max),
                step_mean_us: median(rounds.iter().map(|r| r.step_mean_us).collect()),
                cpu_per_step_us: rounds
                    .iter()
                    .map(|r| r.cpu_per_step_us)
                    .collect::<Option<Vec<f64>>>()
                    .and_then(|v| v.into_iter().reduce(f64::min)),
                steps_per_round: rounds.first().map_or(0, |r| r.steps),
                unsampled: pick(|k| *k == StepKind::Unsampled),
                batch: pick(|k| *k == StepKind::Batch),
                rich: pick(|k| matches!(k, StepKind::Rich(_))),
                snapshots_per_rich: if rich_steps.is_empty() {
                    0.0
                } else {
                    rich_steps.iter().sum::<u64>() as f64 / rich_steps.len() as f64
                },
                batch_sampled: rounds.iter().map(|r| r.batch_sampled).sum(),
                rich_sampled: rounds.iter().map(|r| r.rich_sampled).sum(),
                records_dropped: rounds.iter().map(|r| r.records_dropped).sum(),
                journeys_traced: rounds.iter().map(|r| r.journeys_traced).sum(),
            }
        })
        .collect())
}

/// What an untraced request's journey costs, next to what a request costs.
#[derive(Debug, Clone, Copy)]
pub struct JourneyCosts {
    /// [`unsampled_journey_decision_ns`].
    pub untraced_decision_ns: f64,
    /// [`crate::bench::server_path::request_path_ns`].
    pub server_path_ns: f64,
}

/// The report `stepscope bench tracing` prints.
pub fn render(
    rows: &[TracingBenchRow],
    (requests, output_tokens, rounds): (usize, usize, usize),
    journey_costs: Option<JourneyCosts>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "step tracing overhead: {requests} concurrent requests x {output_tokens} output tokens \
         (prompt {PROMPT_TOKENS}), deterministic paged-KV runner (vocab {BENCH_VOCAB}), \
         JSON lines -> /dev/null (but the no-sink row); median and best of {rounds} \
         interleaved rounds"
    );
    let off = rows.first();
    let pct = |value: f64, base: f64| {
        if base > 0.0 {
            format!("{:+.2}%", (value / base - 1.0) * 100.0)
        } else {
            "-".into()
        }
    };
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8} {:>5} {:>8} {:>7} {:>7}",
        "config",
        "tokens/s",
        "vs off",
        "best",
        "vs off",
        "step",
        "CPU min",
        "vs off",
        "steps",
        "sampled",
        "rich",
        "dropped"
    );
    for row in rows {
        let (cpu, cpu_vs) = match (row.cpu_per_step_us, off.and_then(|o| o.cpu_per_step_us)) {
            (Some(cpu), Some(base)) => (format_ns(cpu * 1e3), pct(base, cpu)),
            (Some(cpu), None) => (format_ns(cpu * 1e3), "-".into()),
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<20} {:>9.0} {:>8} {:>9.0} {:>8} {:>9} {:>9} {:>8} {:>5} {:>8} {:>7} {:>7}",
            row.variant.label,
            row.tokens_per_s,
            pct(row.tokens_per_s, off.map_or(0.0, |o| o.tokens_per_s)),
            row.tokens_per_s_best,
            pct(
                row.tokens_per_s_best,
                off.map_or(0.0, |o| o.tokens_per_s_best)
            ),
            format_ns(row.step_mean_us * 1e3),
            cpu,
            cpu_vs,
            row.steps_per_round,
            row.batch_sampled,
            row.rich_sampled,
            row.records_dropped
        );
    }
    let _ = writeln!(
        out,
        "(CPU min: the engine thread's CPU time per step in its least disturbed round; its \
         \"vs off\" is the implied throughput change. Wall-time rows move by several % from \
         round to round on a shared machine.)"
    );
    let journeys = rows.iter().find(|r| r.variant.journey_rate.is_some());
    if let (Some(journeys), Some(off)) = (journeys, off) {
        let cpu = match (journeys.cpu_per_step_us, off.cpu_per_step_us) {
            (Some(cpu), Some(base)) => pct(base, cpu),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "request journeys at rate 1.0 ({} traced per round, on top of the default step rates) \
             vs all tracing off: tokens/s {} (median), {} (best), CPU/step {}",
            journeys.journeys_traced / rounds.max(1) as u64,
            pct(journeys.tokens_per_s, off.tokens_per_s),
            pct(journeys.tokens_per_s_best, off.tokens_per_s_best),
            cpu
        );
    }
    if let Some(costs) = journey_costs {
        let _ = writeln!(
            out,
            "an untraced request's journey cost (its ticket and the one decision, rate 0): {}, \
             next to {} for a request's whole path through the server (builtin:tiny, \
             max_tokens 1, sequential, HTTP included): {:.3}%",
            format_ns(costs.untraced_decision_ns),
            format_ns(costs.server_path_ns),
            costs.untraced_decision_ns / costs.server_path_ns.max(1.0) * 100.0
        );
    }
    let _ = writeln!(out, "step-loop cost (observer on_step, all rounds):");
    let show = |stats: &Option<LatencyStats>| {
        stats
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string)
    };
    for row in rows {
        let _ = writeln!(
            out,
            "  {:<20} unsampled: {}",
            row.variant.label,
            show(&row.unsampled)
        );
        if row.batch.is_some() {
            let _ = writeln!(out, "  {:<20} batch-only: {}", "", show(&row.batch));
        }
        if row.rich.is_some() {
            let _ = writeln!(
                out,
                "  {:<20} rich ({:.0} snapshots): {}",
                "",
                row.snapshots_per_rich,
                show(&row.rich)
            );
        }
    }
    let median_of = |label: &str, f: fn(&TracingBenchRow) -> &Option<LatencyStats>| {
        rows.iter()
            .find(|r| r.variant.label == label)
            .and_then(|r| f(r).as_ref().map(|s| s.median_ns))
    };
    let decide_only = median_of("default 0.01/0.001", |r| &r.unsampled);
    let batch = median_of("1.0/0", |r| &r.batch);
    let rich_row = rows.iter().find(|r| r.variant.label == "1.0/1.0");
    let rich = rich_row.and_then(|r| r.rich.as_ref().map(|s| s.median_ns));
    if let (Some(decide), Some(batch)) = (decide_only, batch) {
        let _ = writeln!(
            out,
            "per sampled step: {} (decide-only step {}, so +{} to copy and queue the record)",
            format_ns(batch),
            format_ns(decide),
            format_ns((batch - decide).max(0.0))
        );
    }
    if let (Some(batch), Some(rich), Some(row)) = (batch, rich, rich_row)
        && row.snapshots_per_rich > 0.0
    {
        let _ = writeln!(
            out,
            "per snapshot: {} ((rich step {} - batch-only step {}) / {:.0} snapshots; includes plan-rich)",
            format_ns((rich - batch).max(0.0) / row.snapshots_per_rich),
            format_ns(rich),
            format_ns(batch),
            row.snapshots_per_rich
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_runs_and_the_journey_row_traces_every_request() {
        let rows = run(8, 4, 1).expect("bench");
        assert_eq!(rows.len(), VARIANTS.len());
        let journeys = rows
            .iter()
            .find(|r| r.variant.journey_rate == Some(1.0))
            .expect("journey row");
        assert_eq!(journeys.journeys_traced, 8);
        assert!(rows.iter().all(|r| r.tokens_per_s > 0.0));
        assert!(
            rows.iter()
                .filter(|r| r.variant.journey_rate.is_none())
                .all(|r| r.journeys_traced == 0)
        );
        let costs = JourneyCosts {
            untraced_decision_ns: unsampled_journey_decision_ns(1000).expect("decision cost"),
            server_path_ns: 100_000.0,
        };
        let report = render(&rows, (8, 4, 1), Some(costs));
        assert!(report.contains("request journeys at rate 1.0 (8 traced per round"));
        assert!(report.contains("an untraced request's journey cost"));
    }
}
