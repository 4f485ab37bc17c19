//! Decode benchmark of the CUDA runner (`#[ignore]`d; `scripts/gpu-check.sh` runs it).
//!
//! The random Llama of realistic size (see `tests::realistic_config`) decodes one token per
//! request for batches of 1, 32 and 128 requests, each with `STEPSCOPE_BENCH_CONTEXT` (default
//! 512) tokens already in its KV blocks (the blocks are zero: attention reads them all the same,
//! and skipping the prefill saves device time). Each row reports the median wall time of a step
//! as the engine sees it, both with the greedy argmax on the device (ids copied back) and with
//! the full logits copied back, next to the HBM floor: the bytes a step must read (every weight
//! matrix once, plus every request's K and V in all layers) divided by the device-to-device copy
//! bandwidth measured in the same run (bytes read + written per second, as `cudaMemcpy` D2D
//! benchmarks count it).

use std::sync::Arc;
use std::time::Instant;

use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner};
use crate::model::KvCacheShape;
use crate::model::tiny::tiny_weights;

use super::CudaModelRunner;
use super::runner::CudaOptions;
use super::tests::{device_or_skip, realistic_config};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Device-to-device copy bandwidth in bytes/s, counting bytes read and written.
fn d2d_bandwidth(runner: &CudaModelRunner) -> f64 {
    let stream = runner.stream();
    let n = 1usize << 30; // 1 GiB each way
    let src = stream.alloc_zeros::<u8>(n).expect("alloc");
    let mut dst = stream.alloc_zeros::<u8>(n).expect("alloc");
    let mut best = 0f64;
    for round in 0..4 {
        stream.synchronize().expect("sync");
        let t = Instant::now();
        let iters = 10;
        for _ in 0..iters {
            stream.memcpy_dtod(&src, &mut dst).expect("dtod");
        }
        stream.synchronize().expect("sync");
        let bw = (2 * n * iters) as f64 / t.elapsed().as_secs_f64();
        if round > 0 {
            best = best.max(bw);
        }
    }
    best
}

/// Median step times (device argmax, full logits) of `steps` decode steps of `b` requests whose
/// contexts start at `context`; returns them with the mean context length.
fn measure(
    runner: &mut CudaModelRunner,
    b: usize,
    context: usize,
    per_seq: usize,
    warmup: usize,
    steps: usize,
) -> (f64, f64, usize) {
    let vocab = runner.vocab_size();
    let tables: Vec<Vec<u32>> = (0..b)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let tokens: Vec<[u32; 1]> = (0..b).map(|i| [(i * 7919 % vocab) as u32]).collect();
    let step = |runner: &mut CudaModelRunner, greedy: bool, pos: usize| -> f64 {
        let batch = ModelBatch {
            entries: (0..b)
                .map(|i| BatchEntry {
                    request_id: i as u64,
                    token_ids: &tokens[i],
                    start_position: pos,
                    block_table: &tables[i],
                    needs_logits: true,
                })
                .collect(),
        };
        let t = Instant::now();
        if greedy {
            let ids = runner.forward_greedy(&batch).expect("forward_greedy");
            assert_eq!(ids.len(), b);
        } else {
            let l = runner.forward(&batch).expect("forward");
            assert_eq!(l.rows(), b);
        }
        t.elapsed().as_secs_f64()
    };
    let mut pos = context;
    for _ in 0..warmup {
        step(runner, true, pos);
        pos += 1;
    }
    let mean_ctx = pos + steps / 2 + 1;
    let greedy: Vec<f64> = (0..steps)
        .map(|_| {
            pos += 1;
            step(runner, true, pos - 1)
        })
        .collect();
    let full: Vec<f64> = (0..steps)
        .map(|_| {
            pos += 1;
            step(runner, false, pos - 1)
        })
        .collect();
    (median(greedy), median(full), mean_ctx)
}

/// (batch, context, eager: argmax, eager: logits, graphs: argmax, graphs: logits).
type Row = (usize, usize, f64, f64, Option<f64>, Option<f64>);

#[test]
#[ignore = "GPU benchmark (about a minute); scripts/gpu-check.sh runs it"]
fn cuda_decode_benchmark() {
    if !device_or_skip("cuda_decode_benchmark") {
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let context = env("STEPSCOPE_BENCH_CONTEXT", 512);
    let steps = env("STEPSCOPE_BENCH_STEPS", 30);
    let warmup = 3;
    let batches = [1usize, 32, 128];
    let max_batch = *batches.iter().max().expect("batches");
    let cfg = realistic_config();
    let t0 = Instant::now();
    let weights = Arc::new(tiny_weights(&cfg));
    eprintln!(
        "random weights: {} params in {:.1} s",
        weights.num_params(),
        t0.elapsed().as_secs_f64()
    );
    let bs = 16;
    let per_seq = (context + warmup + 2 * steps + 1).div_ceil(bs);
    let kv = KvCacheShape {
        num_blocks: max_batch * per_seq,
        block_size: bs,
    };

    let mut rows: Vec<Row> = Vec::new();
    let (bw, dev, arch, dtype, weight_bytes, kv_tok) = {
        let mut runner =
            CudaModelRunner::new(cfg.clone(), weights.clone(), kv).expect("cuda runner");
        let bw = d2d_bandwidth(&runner);
        for &b in &batches {
            let (g, f, ctx) = measure(&mut runner, b, context, per_seq, warmup, steps);
            rows.push((b, ctx, g, f, None, None));
        }
        (
            bw,
            runner.device().clone(),
            runner.arch().to_owned(),
            runner.dtype(),
            runner.weight_matrix_bytes(),
            runner.kv_bytes_per_token(),
        )
    };
    let opts = CudaOptions {
        cuda_graphs: true,
        ..CudaOptions::default()
    };
    match CudaModelRunner::with_options(cfg.clone(), weights.clone(), kv, &opts) {
        Ok(mut runner) => {
            for row in rows.iter_mut() {
                let (g, f, _) = measure(&mut runner, row.0, context, per_seq, warmup, steps);
                row.4 = Some(g);
                row.5 = Some(f);
            }
        }
        Err(e) => eprintln!("CUDA graphs runner failed: {e}"),
    }

    println!();
    println!(
        "decode step, random Llama hidden {} / intermediate {} ({} layers, {} heads / {} KV heads, head_dim {}, vocab {}), {} weights {:.2} GB, KV {:.0} KiB/token, block size {bs}",
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        dtype.name(),
        weight_bytes as f64 / 1e9,
        kv_tok as f64 / 1024.0
    );
    println!(
        "device: {dev}; kernels {arch}; D2D copy bandwidth {:.0} GB/s (read + write)",
        bw / 1e9
    );
    println!(
        "step = wall time of one forward as the engine sees it (median of {steps}); floor = (weight bytes + KV bytes read) / D2D bandwidth"
    );
    println!(
        "| batch | context | bytes read/step | HBM floor | step, device argmax | x floor | step, logits to host | x floor | with CUDA graphs: argmax | x floor | tokens/s |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.3} ms", v * 1e3));
    let ratio =
        |v: Option<f64>, floor: f64| v.map_or("-".to_owned(), |v| format!("{:.2}", v / floor));
    for &(b, ctx, g, f, gg, _gf) in &rows {
        let bytes = weight_bytes + b * ctx * kv_tok;
        let floor = bytes as f64 / bw;
        let best = gg.map_or(g, |x| x.min(g));
        println!(
            "| {b} | {ctx} | {:.2} GB | {:.3} ms | {:.3} ms | {:.2} | {:.3} ms | {:.2} | {} | {} | {:.0} |",
            bytes as f64 / 1e9,
            floor * 1e3,
            g * 1e3,
            g / floor,
            f * 1e3,
            f / floor,
            fmt(gg),
            ratio(gg, floor),
            b as f64 / best
        );
    }
    if let Some(&(b, ctx, g, _, gg, _)) = rows.iter().find(|r| r.0 == 32) {
        let floor = (weight_bytes + b * ctx * kv_tok) as f64 / bw;
        println!(
            "batch 32: {:.2}x the floor eager, {} with CUDA graphs (target <= 1.5x)",
            g / floor,
            ratio(gg, floor)
        );
    }
}
