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
//! benchmarks count it). It also prints the start-up GEMM choice ([`crate::backend::cuda::gemm`]) per
//! projection, and, side by side, the CUDA-graph step time of the baseline (every GEMM on cuBLAS,
//! attention not split over key ranges: the runner before those two changes).

use std::sync::Arc;
use std::time::Instant;

use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner};
use crate::model::KvCacheShape;
use crate::model::tiny::tiny_weights;

use crate::backend::cuda::CudaModelRunner;
use crate::backend::cuda::gemm::GemmMode;
use crate::backend::cuda::runner::CudaOptions;
use crate::backend::cuda::tests::{device_or_skip, realistic_config};

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
/// contexts start at `context`; returns them with the mean context length and, when `profile`,
/// the mean device time per op kind over 5 more steps.
fn measure(
    runner: &mut CudaModelRunner,
    b: usize,
    context: usize,
    per_seq: usize,
    warmup: usize,
    steps: usize,
    profile: bool,
) -> (f64, f64, usize, Vec<(&'static str, f64)>) {
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
                    all_logits: false,
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
    let mut prof: Vec<(&'static str, f64)> = Vec::new();
    let reps = if profile { PROFILED_STEPS } else { 0 };
    for _ in 0..reps {
        let batch = ModelBatch {
            entries: (0..b)
                .map(|i| BatchEntry {
                    request_id: i as u64,
                    token_ids: &tokens[i],
                    start_position: pos,
                    block_table: &tables[i],
                    needs_logits: true,
                    all_logits: false,
                })
                .collect(),
        };
        pos += 1;
        for (label, ms) in runner.profile_step(&batch).expect("profile_step") {
            match prof.iter_mut().find(|(l, _)| *l == label) {
                Some((_, t)) => *t += ms / reps as f64,
                None => prof.push((label, ms / reps as f64)),
            }
        }
    }
    (median(greedy), median(full), mean_ctx, prof)
}

/// Steps of [`CudaModelRunner::profile_step`] per batch size.
const PROFILED_STEPS: usize = 5;

/// (batch, context, device ms per op kind).
type Profile = (usize, usize, Vec<(&'static str, f64)>);

/// One batch size's step times (seconds).
struct Row {
    batch: usize,
    context: usize,
    eager_argmax: f64,
    eager_logits: f64,
    graphs_argmax: Option<f64>,
    /// CUDA graphs as before the skinny GEMM and split attention: every GEMM on cuBLAS, one
    /// thread block per (token, KV head); for comparison in the same run.
    graphs_baseline_argmax: Option<f64>,
}

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
    // warm-up, timed steps with device argmax and with logits, 5 profiled steps
    let per_seq = (context + warmup + 2 * steps + PROFILED_STEPS + 1).div_ceil(bs);
    let kv = KvCacheShape {
        num_blocks: max_batch * per_seq,
        block_size: bs,
    };

    let mut rows: Vec<Row> = Vec::new();
    let mut profiles: Vec<Profile> = Vec::new();
    let (bw, dev, arch, dtype, weight_bytes, kv_tok) = {
        let mut runner =
            CudaModelRunner::new(cfg.clone(), weights.clone(), kv).expect("cuda runner");
        let bw = d2d_bandwidth(&runner);
        println!();
        println!(
            "GEMM choice per projection and token bucket ({} mode; start-up timings, microseconds per call, each layer's matrix in turn):",
            format!("{:?}", runner.gemm_plan().mode).to_lowercase()
        );
        for line in runner.gemm_plan().describe() {
            println!("  {line}");
        }
        for &b in &batches {
            let (g, f, ctx, prof) = measure(&mut runner, b, context, per_seq, warmup, steps, true);
            rows.push(Row {
                batch: b,
                context: ctx,
                eager_argmax: g,
                eager_logits: f,
                graphs_argmax: None,
                graphs_baseline_argmax: None,
            });
            profiles.push((b, ctx, prof));
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
    for baseline in [false, true] {
        let opts = CudaOptions {
            cuda_graphs: true,
            gemm: baseline.then_some(GemmMode::Cublas),
            split_attention: !baseline,
            ..CudaOptions::default()
        };
        match CudaModelRunner::with_options(cfg.clone(), weights.clone(), kv, &opts) {
            Ok(mut runner) => {
                for row in rows.iter_mut() {
                    let (g, _, _, _) = measure(
                        &mut runner,
                        row.batch,
                        context,
                        per_seq,
                        warmup,
                        steps,
                        false,
                    );
                    if baseline {
                        row.graphs_baseline_argmax = Some(g);
                    } else {
                        row.graphs_argmax = Some(g);
                    }
                }
            }
            Err(e) => eprintln!("CUDA graphs runner (baseline: {baseline}) failed: {e}"),
        }
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
        "| batch | context | bytes read/step | HBM floor | step, device argmax | x floor | step, logits to host | x floor | with CUDA graphs: argmax | x floor | graphs, baseline (cuBLAS, unsplit attention) | x floor | tokens/s |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.3} ms", v * 1e3));
    let ratio =
        |v: Option<f64>, floor: f64| v.map_or("-".to_owned(), |v| format!("{:.2}", v / floor));
    for r in &rows {
        let (b, g, f, gg, gc) = (
            r.batch,
            r.eager_argmax,
            r.eager_logits,
            r.graphs_argmax,
            r.graphs_baseline_argmax,
        );
        let bytes = weight_bytes + b * r.context * kv_tok;
        let floor = bytes as f64 / bw;
        let best = gg.map_or(g, |x| x.min(g));
        println!(
            "| {b} | {} | {:.2} GB | {:.3} ms | {:.3} ms | {:.2} | {:.3} ms | {:.2} | {} | {} | {} | {} | {:.0} |",
            r.context,
            bytes as f64 / 1e9,
            floor * 1e3,
            g * 1e3,
            g / floor,
            f * 1e3,
            f / floor,
            fmt(gg),
            ratio(gg, floor),
            fmt(gc),
            ratio(gc, floor),
            b as f64 / best
        );
    }
    // Where the device time goes (events after every op; eager, logits to host).
    let layers = cfg.num_layers as f64;
    let mat = |rows: usize, cols: usize| (2 * rows * cols) as f64 * layers;
    let (h, i, q, kvd) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    println!();
    println!(
        "device time per step by op (mean of 5 profiled steps; achieved bandwidth = bytes the op must read / its time)"
    );
    print!("| op |");
    for (b, _, _) in &profiles {
        print!(" batch {b} |");
    }
    println!();
    print!("| --- |");
    for _ in &profiles {
        print!(" ---: |");
    }
    println!();
    let labels: Vec<&'static str> = profiles
        .first()
        .map(|p| p.2.iter().map(|(l, _)| *l).collect())
        .unwrap_or_default();
    for label in labels.iter().chain(["total"].iter()) {
        print!("| {label} |");
        for (b, ctx, prof) in &profiles {
            let ms = if *label == "total" {
                prof.iter().map(|(_, t)| t).sum::<f64>()
            } else {
                prof.iter()
                    .find(|(l, _)| l == label)
                    .map_or(0.0, |(_, t)| *t)
            };
            let bytes = match *label {
                "gemm qkv" => mat(q + 2 * kvd, h),
                "gemm o" => mat(h, q),
                "gemm gate_up" | "gemm gate_up+silu" => mat(2 * i, h),
                "gemm down" => mat(h, i),
                "gemm lm_head" => (2 * cfg.vocab_size * h) as f64,
                "paged_attention" => (*b * ctx * kv_tok) as f64,
                "total" => (weight_bytes + *b * ctx * kv_tok) as f64,
                _ => 0.0,
            };
            if bytes > 0.0 && ms > 0.0 {
                print!(
                    " {:.1} us ({:.0} GB/s) |",
                    ms * 1e3,
                    bytes / (ms * 1e-3) / 1e9
                );
            } else {
                print!(" {:.1} us |", ms * 1e3);
            }
        }
        println!();
    }
    if let Some(r) = rows.iter().find(|r| r.batch == 32) {
        let floor = (weight_bytes + r.batch * r.context * kv_tok) as f64 / bw;
        println!(
            "batch 32: {:.2}x the floor eager, {} with CUDA graphs, {} for the baseline with CUDA graphs (target <= 1.5x)",
            r.eager_argmax / floor,
            ratio(r.graphs_argmax, floor),
            ratio(r.graphs_baseline_argmax, floor)
        );
    }
}
