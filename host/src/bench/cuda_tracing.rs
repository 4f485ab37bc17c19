//! Step-tracing overhead on the GPU (`#[ignore]`d; `scripts/gpu-check.sh` runs it).
//!
//! Tracing's cost is per step and per request on the CPU, so it only shows where steps are
//! short, and GPU steps are. This drives the real engine loop ([`EngineCore`] as `serve` runs
//! it: scheduler, step observer, sampler) on the CUDA runner of the random Llama of realistic
//! size (CUDA graphs on, as `serve` defaults), with tracing off, at the default rates
//! (0.01 / 0.001) and at 1.0 / 1.0 (JSON lines to `/dev/null`, so the exporter thread does its
//! real work), interleaved over `STEPSCOPE_BENCH_ROUNDS` rounds (default 5), through
//! [`step_tracing::run_variants`], the same code as `stepscope bench tracing`. One runner
//! serves every round (each round a fresh engine over it). It prints tokens/s and step time per
//! variant and each one's ratio to off, against the targets (default within 1 %,
//! 1.0 / 1.0 within 5 %). It asserts only that every round ran and traced what its rates ask
//! (a benchmark, not a timed test); the ratios go into the README's GPU table once run.
//!
//! [`EngineCore`]: crate::engine::EngineCore

use std::sync::{Arc, Mutex, PoisonError};

use super::cuda::realistic_random_weights;
use super::step_tracing::{self, TracingBenchRow, VARIANTS};
use crate::backend::cuda::CudaModelRunner;
use crate::backend::cuda::runner::CudaOptions;
use crate::backend::cuda::tests::device_or_skip;
use crate::engine::model_runner::{BatchLimits, Logits, ModelBatch, ModelRunner, ModelRunnerError};
use crate::model::KvCacheShape;

/// One runner behind every round's engine.
struct SharedRunner(Arc<Mutex<CudaModelRunner>>);

impl ModelRunner for SharedRunner {
    fn limits(&self) -> BatchLimits {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .limits()
    }

    fn forward(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forward(batch)
    }
}

fn env(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "GPU benchmark (about a minute); scripts/gpu-check.sh runs it"]
fn cuda_tracing_overhead_benchmark() {
    if !device_or_skip("cuda_tracing_overhead_benchmark") {
        return;
    }
    let requests = env("STEPSCOPE_BENCH_REQUESTS", 32);
    let output_tokens = env("STEPSCOPE_BENCH_OUTPUT_TOKENS", 128);
    let rounds = env("STEPSCOPE_BENCH_ROUNDS", 5);
    let (cfg, weights) = realistic_random_weights();
    let (block_size, num_blocks) = step_tracing::kv_cache_needed(requests, output_tokens);
    let kv = KvCacheShape {
        num_blocks,
        block_size,
    };
    let runner = CudaModelRunner::with_options(cfg.clone(), weights, kv, &CudaOptions::default())
        .expect("cuda runner");
    let device = runner.device().clone();
    assert!(cfg.vocab_size >= step_tracing::BENCH_VOCAB);
    assert!(cfg.max_model_len >= step_tracing::max_sequence_len(output_tokens));
    let shared = Arc::new(Mutex::new(runner));
    let variants = [VARIANTS[0], VARIANTS[1], VARIANTS[3]];
    assert_eq!(
        variants.map(|v| v.label),
        ["off", "default 0.01/0.001", "1.0/1.0"]
    );
    let rows =
        step_tracing::run_variants(&variants, (requests, output_tokens, rounds), &mut |_| {
            Box::new(SharedRunner(Arc::clone(&shared)))
        })
        .expect("tracing benchmark");
    let graph_launches = shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .cuda_graph_launches();

    println!();
    println!(
        "step tracing on the GPU: engine loop on the CUDA runner, random Llama hidden {} ({} layers, vocab {}), {requests} requests x {output_tokens} tokens (prompt 64), {rounds} rounds interleaved, median round; device: {device}; CUDA graph launches: {graph_launches}",
        cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    );
    println!(
        "| tracing | tokens/s | step (mean) | vs off | target | engine CPU/step | steps sampled (batch / rich) | records dropped |"
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |");
    let off = rows[0].tokens_per_s;
    for (row, target) in rows.iter().zip([None, Some(0.99), Some(0.95)]) {
        let ratio = row.tokens_per_s / off.max(1e-9);
        println!(
            "| {} | {:.0} | {:.2} ms | {:.3} | {} | {} | {} / {} | {} |",
            row.variant.label,
            row.tokens_per_s,
            row.step_mean_us / 1e3,
            ratio,
            target.map_or("-".to_owned(), |t: f64| format!(
                ">= {t} ({})",
                if ratio >= t { "met" } else { "NOT met" }
            )),
            row.cpu_per_step_us
                .map_or("-".to_owned(), |us| format!("{us:.0} us")),
            row.batch_sampled,
            row.rich_sampled,
            row.records_dropped,
        );
    }
    check_rows(&rows, rounds);
}

/// Every variant ran its rounds and sampled what its rates ask: none with tracing off, every
/// step at 1.0 / 1.0, not every step at the default rates (whether it sampled any at all is
/// left to chance: about one step in a hundred).
fn check_rows(rows: &[TracingBenchRow], rounds: usize) {
    let [off, default, full] = rows else {
        panic!("{} rows", rows.len())
    };
    let steps = full.steps_per_round * rounds as u64;
    assert!(steps > 0);
    assert_eq!((off.batch_sampled, off.rich_sampled), (0, 0));
    assert_eq!(full.batch_sampled, steps);
    assert_eq!(full.rich_sampled, steps);
    assert!(default.batch_sampled < steps, "{}", default.batch_sampled);
    for r in rows {
        assert!(r.tokens_per_s > 0.0, "{}", r.variant.label);
    }
}

/// The same flow and checks on the deterministic runner, so the GPU run cannot fail on the
/// benchmark's own bookkeeping.
#[test]
fn the_checks_hold_on_the_deterministic_runner() {
    use crate::testing::deterministic_runner::DeterministicRunner;

    let (requests, output_tokens, rounds) = (8, 16, 2);
    let variants = [VARIANTS[0], VARIANTS[1], VARIANTS[3]];
    let rows = step_tracing::run_variants(
        &variants,
        (requests, output_tokens, rounds),
        &mut |config| {
            Box::new(DeterministicRunner::new(
                config.num_kv_blocks,
                config.block_size,
                step_tracing::BENCH_VOCAB,
                step_tracing::max_sequence_len(output_tokens) + 16,
            ))
        },
    )
    .expect("tracing benchmark");
    check_rows(&rows, rounds);
}
