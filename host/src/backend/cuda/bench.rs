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

/// (batch, context, eager: argmax, eager: logits, graphs: argmax, graphs: logits).
type Row = (usize, usize, f64, f64, Option<f64>, Option<f64>);

/// cuBLAS alone on the model's GEMM shapes: weight bandwidth achieved by `GemmEx` with bf16
/// inputs and f32 output (what the runner does) against bf16 output, for a few batch sizes.
fn gemm_microbench(runner: &CudaModelRunner, cfg: &crate::model::ModelConfig) {
    use cudarc::cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
    };
    use cudarc::driver::DevicePtr;
    let stream = runner.stream();
    let blas = match cudarc::cublas::CudaBlas::new(stream.clone()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gemm microbench: {e:?}");
            return;
        }
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let shapes = [
        ("qkv", cfg.q_dim() + 2 * cfg.kv_dim(), h),
        ("o", h, cfg.q_dim()),
        ("gate_up", 2 * i, h),
        ("down", h, i),
        ("lm_head", cfg.vocab_size, h),
    ];
    let max_w = shapes.iter().map(|(_, n, k)| n * k).max().unwrap_or(1);
    let max_k = shapes.iter().map(|(_, _, k)| *k).max().unwrap_or(1);
    let max_n = shapes.iter().map(|(_, n, _)| *n).max().unwrap_or(1);
    let w = stream.alloc_zeros::<u16>(max_w).expect("alloc");
    let x = stream.alloc_zeros::<u16>(128 * max_k).expect("alloc");
    let y = stream.alloc_zeros::<f32>(128 * max_n).expect("alloc");
    let (wp, _) = w.device_ptr(stream);
    let (xp, _) = x.device_ptr(stream);
    let (yp, _) = y.device_ptr(stream);
    println!();
    println!(
        "cuBLAS GemmEx alone (bf16 weights and inputs, f32 compute; weight bytes / time; median of 20 rounds of 10 calls timed on the host: under ~5 us a call, the launch rate may dominate)"
    );
    println!("| shape (n x k) | m | f32 out | bf16 out |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, n, k) in shapes {
        for m in [1usize, 8, 32, 128] {
            let mut cells = Vec::new();
            for ctype in [cudaDataType::CUDA_R_32F, cudaDataType::CUDA_R_16BF] {
                let (alpha, beta) = (1.0f32, 0.0f32);
                let call = || unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        cublasOperation_t::CUBLAS_OP_T,
                        cublasOperation_t::CUBLAS_OP_N,
                        n as i32,
                        m as i32,
                        k as i32,
                        (&alpha as *const f32).cast(),
                        wp as *const std::ffi::c_void,
                        cudaDataType::CUDA_R_16BF,
                        k as i32,
                        xp as *const std::ffi::c_void,
                        cudaDataType::CUDA_R_16BF,
                        k as i32,
                        (&beta as *const f32).cast(),
                        yp as *mut std::ffi::c_void,
                        ctype,
                        n as i32,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    )
                };
                if call().is_err() {
                    cells.push("error".to_owned());
                    continue;
                }
                let mut times = Vec::new();
                for _ in 0..20 {
                    stream.synchronize().expect("sync");
                    let t = Instant::now();
                    for _ in 0..10 {
                        call().expect("gemm");
                    }
                    stream.synchronize().expect("sync");
                    times.push(t.elapsed().as_secs_f64() / 10.0);
                }
                let t = median(times);
                cells.push(format!(
                    "{:.1} us ({:.0} GB/s)",
                    t * 1e6,
                    (2 * n * k) as f64 / t / 1e9
                ));
            }
            println!("| {name} ({n} x {k}) | {m} | {} | {} |", cells[0], cells[1]);
        }
    }
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
        gemm_microbench(&runner, &cfg);
        for &b in &batches {
            let (g, f, ctx, prof) = measure(&mut runner, b, context, per_seq, warmup, steps, true);
            rows.push((b, ctx, g, f, None, None));
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
    let opts = CudaOptions {
        cuda_graphs: true,
        ..CudaOptions::default()
    };
    match CudaModelRunner::with_options(cfg.clone(), weights.clone(), kv, &opts) {
        Ok(mut runner) => {
            for row in rows.iter_mut() {
                let (g, f, _, _) =
                    measure(&mut runner, row.0, context, per_seq, warmup, steps, false);
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
                "gemm gate_up" => mat(2 * i, h),
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
    if let Some(&(b, ctx, g, _, gg, _)) = rows.iter().find(|r| r.0 == 32) {
        let floor = (weight_bytes + b * ctx * kv_tok) as f64 / bw;
        println!(
            "batch 32: {:.2}x the floor eager, {} with CUDA graphs (target <= 1.5x)",
            g / floor,
            ratio(gg, floor)
        );
    }
}
