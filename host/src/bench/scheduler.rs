//! Scheduler CPU cost per step, without a model: the number behind "the scheduler is not the
//! bottleneck".
//!
//! [`scheduler_bench`] builds a [`Scheduler`] with `n` requests, prefills them all, and then times
//! decode-heavy steady-state steps: `schedule()`, the post-schedule update, and
//! `update_from_output` with a made-up token per request (appending tokens, stop checks, caching
//! blocks that fill up, allocating new blocks as requests grow). The pool has room for every
//! request's whole run, so nothing is preempted or finishes while measured. The CLI prints the rows.

use std::time::Instant;

use crate::engine::config::EngineConfig;
use crate::engine::request::{Request, RequestRng};
use crate::engine::sampling_params::SamplingParams;
use crate::engine::scheduler::Scheduler;

/// Prompt length of the benchmark requests (plus 0..block_size, staggered).
const PROMPT_TOKENS: usize = 128;
const WARMUP_STEPS: usize = 64;
const MEASURED_STEPS: usize = 2000;
const VOCAB_SIZE: usize = 32_000;
/// Running-queue sizes are clamped to `1..=MAX_RUNNING`.
pub const MAX_RUNNING: usize = 16_384;

/// Per-step scheduler time at one running-queue size, in µs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerBenchRow {
    /// Requests in the running queue (all decoding).
    pub running: usize,
    /// Steps measured.
    pub steps: usize,
    /// `schedule()` plus the post-schedule update.
    pub schedule_median_us: f64,
    pub schedule_p99_us: f64,
    /// The whole scheduler side of a step: the above plus `update_from_output`.
    pub step_median_us: f64,
    pub step_p99_us: f64,
    pub step_mean_us: f64,
}

impl std::fmt::Display for SchedulerBenchRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "running {:>4}: schedule+post-update median {:>6.2} µs p99 {:>6.2} µs | \
             with update_from_output median {:>6.2} µs p99 {:>6.2} µs mean {:>6.2} µs ({} steps)",
            self.running,
            self.schedule_median_us,
            self.schedule_p99_us,
            self.step_median_us,
            self.step_p99_us,
            self.step_mean_us,
            self.steps
        )
    }
}

/// Measures the scheduler at each running-queue size (e.g. `&[16, 64, 256]`).
pub fn scheduler_bench(running: &[usize]) -> Vec<SchedulerBenchRow> {
    running
        .iter()
        .map(|&n| scheduler_bench_one(n, WARMUP_STEPS, MEASURED_STEPS))
        .collect()
}

/// One row: `n` running requests (clamped to `1..=MAX_RUNNING`), `warmup` unmeasured decode steps, then `steps` measured ones.
pub fn scheduler_bench_one(n: usize, warmup: usize, steps: usize) -> SchedulerBenchRow {
    let n = n.clamp(1, MAX_RUNNING);
    let steps = steps.max(1);
    let block_size = 16;
    let max_len = PROMPT_TOKENS + block_size + warmup + steps + 64;
    let config = EngineConfig {
        block_size,
        num_kv_blocks: n * max_len.div_ceil(block_size) + 16,
        max_num_seqs: n,
        max_num_batched_tokens: 2048.max(n),
        max_waiting_requests: n,
        ..EngineConfig::default()
    };
    let limits = match config.validate(1 << 24, VOCAB_SIZE) {
        Ok(limits) => limits,
        Err(error) => unreachable!("benchmark config is valid: {error}"),
    };
    let mut scheduler = Scheduler::new(&config, limits);
    for id in 0..n as u64 {
        // Staggered lengths, so requests fill their blocks on different steps (as real ones do).
        let prompt_len = PROMPT_TOKENS + (id as usize % block_size);
        let prompt = (0..prompt_len as u64)
            .map(|i| ((id * 7919 + i * 104_729) % VOCAB_SIZE as u64) as u32)
            .collect();
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(usize::MAX)
        };
        if let Err(error) =
            scheduler.add_request(Request::new(id, prompt, params, RequestRng::new(id)))
        {
            unreachable!("benchmark request is valid: {error}");
        }
    }
    let mut token = 0u32;
    let mut step = |scheduler: &mut Scheduler| {
        let started = Instant::now();
        let out = scheduler.schedule();
        scheduler.update_after_schedule(&out);
        let scheduled_at = Instant::now();
        let sampled: Vec<Option<u32>> = out
            .scheduled
            .iter()
            .map(|s| {
                token = (token + 7) % VOCAB_SIZE as u32;
                s.needs_logits.then_some(token)
            })
            .collect();
        scheduler.update_from_output(&out, Some(&sampled));
        let schedule_ns = nanos_between(started, scheduled_at);
        (
            out.summary,
            schedule_ns,
            nanos_between(started, Instant::now()),
        )
    };
    // Prefill everything, then warm up in decode.
    while scheduler.num_waiting() > 0
        || scheduler
            .running()
            .iter()
            .any(|r| r.num_output_tokens() == 0)
    {
        step(&mut scheduler);
    }
    for _ in 0..warmup {
        step(&mut scheduler);
    }
    let mut schedule_ns = Vec::with_capacity(steps);
    let mut step_ns = Vec::with_capacity(steps);
    for _ in 0..steps {
        let (summary, schedule, whole) = step(&mut scheduler);
        schedule_ns.push(schedule);
        step_ns.push(whole);
        debug_assert_eq!(summary.num_decode_reqs, n);
    }
    debug_assert_eq!(scheduler.counters().num_preemptions_total, 0);
    let step_mean_us = step_ns.iter().sum::<u64>() as f64 / step_ns.len() as f64 / 1e3;
    let (schedule_median_us, schedule_p99_us) = median_and_p99_us(&mut schedule_ns);
    let (step_median_us, step_p99_us) = median_and_p99_us(&mut step_ns);
    SchedulerBenchRow {
        running: n,
        steps,
        schedule_median_us,
        schedule_p99_us,
        step_median_us,
        step_p99_us,
        step_mean_us,
    }
}

fn nanos_between(earlier: Instant, later: Instant) -> u64 {
    u64::try_from(later.duration_since(earlier).as_nanos()).unwrap_or(u64::MAX)
}

/// Sorts the samples (ns) and returns their median and 99th percentile in µs.
fn median_and_p99_us(samples_ns: &mut [u64]) -> (f64, f64) {
    if samples_ns.is_empty() {
        return (0.0, 0.0);
    }
    samples_ns.sort_unstable();
    let pick =
        |q: f64| samples_ns[((samples_ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    (pick(0.5), pick(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_runs_small() {
        let row = scheduler_bench_one(8, 4, 20);
        assert_eq!((row.running, row.steps), (8, 20));
        assert!(row.step_median_us > 0.0 && row.step_p99_us >= row.step_median_us);
        assert!(row.schedule_median_us <= row.step_median_us);
    }

    /// `cargo test --release -- --ignored --nocapture scheduler_bench_numbers` prints the numbers.
    #[test]
    #[ignore = "timing; run by hand"]
    fn scheduler_bench_numbers() {
        for row in scheduler_bench(&[16, 64, 256]) {
            println!("{row}");
        }
    }
}
