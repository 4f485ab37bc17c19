//! CPU throughput benchmark: loads a model with a CPU runner and measures prefill tokens/s
//! (every prompt of the batch prefilled in one forward) and decode tokens/s (one token per
//! request per forward) for each requested batch size. The `bench` CLI subcommand calls
//! [`cpu_throughput_bench`]; [`default_bench_model`] picks SmolLM2 when it is present.

use std::path::Path;
use std::time::Instant;

use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner};

use crate::backend::cpu::CpuModelRunner;
use crate::engine::sampler::argmax;
use crate::model::{BUILTIN_TINY, KvCacheShape, MatrixStorage, ModelError};
use crate::splitmix::SplitMix64;

/// Prompt length used by the benchmark.
pub const BENCH_PROMPT_LEN: usize = 128;
/// Decode steps measured per batch size.
pub const BENCH_DECODE_STEPS: usize = 32;
const BLOCK_SIZE: usize = 16;

/// One line of benchmark results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchRow {
    pub engine: &'static str,
    pub model: String,
    /// The matrices' storage formats, most bytes first (`F32`, `BF16`, `Q4_1`,
    /// `Q8_0+Q5_0+Q4_1`, ...).
    pub weights: String,
    pub threads: usize,
    pub batch_size: usize,
    pub prompt_len: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_steps: usize,
    pub decode_tokens_per_s: f64,
    /// Bytes the weights occupy in memory.
    pub weight_bytes: usize,
    /// The process's resident set after loading, before any forward (Linux; `None` elsewhere).
    pub rss_after_load_bytes: Option<u64>,
}

/// This process's resident set size, from `/proc/self/status` (Linux only).
pub fn resident_set_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// SmolLM2-135M-Instruct under `root/.cache/models` if it is there, else `builtin:tiny`.
pub fn default_bench_model(root: &Path) -> String {
    let dir = root.join(".cache/models/SmolLM2-135M-Instruct");
    if dir.join("config.json").is_file() {
        dir.display().to_string()
    } else {
        BUILTIN_TINY.to_owned()
    }
}

/// Measures prefill and decode throughput of `model` (a directory, a GGUF file or
/// `builtin:tiny`, its matrices held in `storage`) at each batch size, after one untimed run
/// of the same work, printing one line per batch size to stdout (a JSON object with `json`).
pub fn cpu_throughput_bench(
    model: &str,
    batch_sizes: &[usize],
    storage: MatrixStorage,
    json: bool,
) -> Result<Vec<BenchRow>, ModelError> {
    let max_batch = batch_sizes.iter().copied().max().unwrap_or(1).max(1);
    let blocks_per_seq = (BENCH_PROMPT_LEN + BENCH_DECODE_STEPS + 1).div_ceil(BLOCK_SIZE);
    let kv = KvCacheShape {
        num_blocks: max_batch * blocks_per_seq,
        block_size: BLOCK_SIZE,
    };
    let loaded = crate::model::load_model_files_as(model, storage)?;
    let weights = loaded.weights.clone();
    let info = loaded.info;
    let mut runner = CpuModelRunner::new(info.config.clone(), loaded.weights, kv)?;
    let rss_after_load_bytes = resident_set_bytes();
    let vocab = info.tokenizer.vocab_size().min(info.vocab_size) as u64;
    let mut rng = SplitMix64::new(42);
    let mut rows = Vec::new();
    let threads = rayon::current_num_threads();
    if !json {
        println!(
            "model {} | {} weights, {:.1} MB, resident {} | prompt {BENCH_PROMPT_LEN} tokens | {BENCH_DECODE_STEPS} decode steps | {threads} threads",
            info.name,
            weights.matrix_formats(),
            weights.byte_len() as f64 / 1e6,
            rss_after_load_bytes.map_or("?".into(), |r| format!("{:.1} MB", r as f64 / 1e6)),
        );
    }
    for &b in batch_sizes {
        let b = b.max(1);
        // The first run (untimed) faults in the KV cache and warms the caches.
        let _ = measure(&mut runner, &mut rng, vocab, b, blocks_per_seq)?;
        let (prefill_s, decode_s) = measure(&mut runner, &mut rng, vocab, b, blocks_per_seq)?;
        let row = BenchRow {
            engine: "stepscope",
            model: info.name.clone(),
            weights: weights.matrix_formats(),
            threads,
            batch_size: b,
            prompt_len: BENCH_PROMPT_LEN,
            prefill_tokens_per_s: (b * BENCH_PROMPT_LEN) as f64 / prefill_s,
            decode_steps: BENCH_DECODE_STEPS,
            decode_tokens_per_s: (b * BENCH_DECODE_STEPS) as f64 / decode_s,
            weight_bytes: weights.byte_len(),
            rss_after_load_bytes,
        };
        if json {
            println!("{}", serde_json::to_string(&row).unwrap_or_default());
        } else {
            println!(
                "batch {:>3} | prefill {:>9.1} tok/s | decode {:>8.1} tok/s ({:.1} ms/step)",
                b,
                row.prefill_tokens_per_s,
                row.decode_tokens_per_s,
                decode_s * 1e3 / BENCH_DECODE_STEPS as f64
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// One prefill of `b` random prompts in one forward, then [`BENCH_DECODE_STEPS`] decode steps;
/// returns the seconds of each.
fn measure(
    runner: &mut CpuModelRunner,
    rng: &mut SplitMix64,
    vocab: u64,
    b: usize,
    blocks_per_seq: usize,
) -> Result<(f64, f64), ModelError> {
    let mut seqs: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            (0..BENCH_PROMPT_LEN)
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect()
        })
        .collect();
    let tables: Vec<Vec<u32>> = (0..b)
        .map(|i| ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect())
        .collect();

    let started = Instant::now();
    let entries = seqs
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(i, (s, t))| BatchEntry {
            request_id: i as u64,
            token_ids: s,
            start_position: 0,
            block_table: t,
            needs_logits: true,
            all_logits: false,
        })
        .collect();
    let logits = runner.forward(&ModelBatch { entries })?;
    let prefill_s = started.elapsed().as_secs_f64();
    let mut next: Vec<u32> = (0..b).map(|i| argmax(logits.row(i))).collect();

    let started = Instant::now();
    for _ in 0..BENCH_DECODE_STEPS {
        for (s, &n) in seqs.iter_mut().zip(&next) {
            s.push(n);
        }
        let entries = seqs
            .iter()
            .zip(&tables)
            .enumerate()
            .map(|(i, (s, t))| BatchEntry {
                request_id: i as u64,
                token_ids: &s[s.len() - 1..],
                start_position: s.len() - 1,
                block_table: t,
                needs_logits: true,
                all_logits: false,
            })
            .collect();
        let logits = runner.forward(&ModelBatch { entries })?;
        next = (0..b).map(|i| argmax(logits.row(i))).collect();
    }
    let decode_s = started.elapsed().as_secs_f64();
    Ok((prefill_s, decode_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::BlockFormat;

    #[test]
    fn rows_carry_the_storage_sizes_and_resident_memory() {
        for (storage, name) in [
            (MatrixStorage::F32, "F32"),
            (MatrixStorage::Half(BlockFormat::Bf16), "BF16"),
        ] {
            let rows = cpu_throughput_bench(BUILTIN_TINY, &[1, 2], storage, true).unwrap();
            assert_eq!(rows.len(), 2);
            for row in &rows {
                assert_eq!((row.engine, row.weights.as_str()), ("stepscope", name));
                assert!(row.prefill_tokens_per_s > 0.0 && row.decode_tokens_per_s > 0.0);
                assert!(row.weight_bytes > 0);
                if cfg!(target_os = "linux") {
                    assert!(row.rss_after_load_bytes.is_some_and(|r| r > 0));
                }
                let json = serde_json::to_value(row).unwrap();
                assert!(json.get("decode_tokens_per_s").is_some() && json.get("model").is_some());
            }
        }
        let f32_bytes = cpu_throughput_bench(BUILTIN_TINY, &[1], MatrixStorage::F32, true).unwrap()
            [0]
        .weight_bytes;
        let bf16_bytes = cpu_throughput_bench(
            BUILTIN_TINY,
            &[1],
            MatrixStorage::Half(BlockFormat::Bf16),
            true,
        )
        .unwrap()[0]
            .weight_bytes;
        assert!(
            bf16_bytes < f32_bytes * 6 / 10,
            "{bf16_bytes} vs {f32_bytes}"
        );
    }
}
