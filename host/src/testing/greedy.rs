//! A minimal greedy generation loop for tests and benchmarks, independent of the engine: it
//! hands out KV blocks itself (optionally in a shuffled order, as after preemption), prefills
//! prompts whole or in chunks, batches all requests into one forward per step or runs them one
//! by one, and appends the argmax token until `max_new_tokens`.

use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner, ModelRunnerError};

use crate::model::KvCacheShape;
use crate::splitmix::SplitMix64;

/// How to drive the runner.
#[derive(Debug, Clone)]
pub struct GreedyOptions {
    pub max_new_tokens: usize,
    /// Prefill at most this many prompt tokens per request per forward (`None`: whole prompt).
    pub prefill_chunk: Option<usize>,
    /// All requests in one forward per step (`true`) or one request per forward (`false`).
    pub batched: bool,
    /// Hand out block ids in an order shuffled with this seed (`None`: 0, 1, 2, …).
    pub shuffle_blocks: Option<u64>,
}

impl Default for GreedyOptions {
    fn default() -> Self {
        GreedyOptions {
            max_new_tokens: 16,
            prefill_chunk: None,
            batched: true,
            shuffle_blocks: None,
        }
    }
}

/// Greedy continuations and the logits at each prompt's last position.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyOutput {
    pub tokens: Vec<Vec<u32>>,
    pub prompt_logits: Vec<Vec<f32>>,
}

/// The engine's greedy choice: the first largest logit, as `torch.argmax` (NaNs skipped).
pub use crate::engine::sampler::argmax;

struct Seq {
    tokens: Vec<u32>,
    computed: usize,
    generated: usize,
    blocks: Vec<u32>,
    prompt_logits: Option<Vec<f32>>,
}

/// Generates greedily for every prompt; `kv` must match the runner's cache.
pub fn greedy_generate(
    runner: &mut dyn ModelRunner,
    kv: KvCacheShape,
    prompts: &[Vec<u32>],
    opts: &GreedyOptions,
) -> Result<GreedyOutput, ModelRunnerError> {
    let mut free: Vec<u32> = (0..kv.num_blocks as u32).collect();
    if let Some(seed) = opts.shuffle_blocks {
        let mut rng = SplitMix64::new(seed);
        for i in (1..free.len()).rev() {
            free.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
    }
    free.reverse();
    let mut seqs = Vec::with_capacity(prompts.len());
    for p in prompts {
        if p.is_empty() {
            return Err(ModelRunnerError::InvalidBatch("empty prompt".into()));
        }
        let need = (p.len() + opts.max_new_tokens).div_ceil(kv.block_size);
        if need > free.len() {
            return Err(ModelRunnerError::InvalidBatch(format!(
                "not enough KV blocks: need {need}, {} free",
                free.len()
            )));
        }
        let blocks = free.split_off(free.len() - need);
        seqs.push(Seq {
            tokens: p.clone(),
            computed: 0,
            generated: 0,
            blocks,
            prompt_logits: None,
        });
    }
    if opts.max_new_tokens > 0 {
        if opts.batched {
            run(runner, &mut seqs, opts)?;
        } else {
            for s in seqs.iter_mut() {
                run(runner, std::slice::from_mut(s), opts)?;
            }
        }
    }
    Ok(GreedyOutput {
        tokens: seqs
            .iter()
            .map(|s| s.tokens[s.tokens.len() - s.generated..].to_vec())
            .collect(),
        prompt_logits: seqs
            .into_iter()
            .map(|s| s.prompt_logits.unwrap_or_default())
            .collect(),
    })
}

fn run(
    runner: &mut dyn ModelRunner,
    seqs: &mut [Seq],
    opts: &GreedyOptions,
) -> Result<(), ModelRunnerError> {
    loop {
        let mut picked = Vec::new();
        let entries: Vec<BatchEntry<'_>> = seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.generated < opts.max_new_tokens)
            .map(|(i, s)| {
                let remaining = s.tokens.len() - s.computed;
                let n = opts
                    .prefill_chunk
                    .map_or(remaining, |c| c.max(1).min(remaining));
                let needs_logits = s.computed + n == s.tokens.len();
                if needs_logits {
                    picked.push(i);
                }
                BatchEntry {
                    request_id: i as u64,
                    token_ids: &s.tokens[s.computed..s.computed + n],
                    start_position: s.computed,
                    block_table: &s.blocks,
                    needs_logits,
                    all_logits: false,
                }
            })
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let advanced: Vec<(usize, usize)> = entries
            .iter()
            .map(|e| (e.request_id as usize, e.token_ids.len()))
            .collect();
        let logits = runner.forward(&ModelBatch { entries })?;
        if logits.rows() != picked.len() {
            return Err(ModelRunnerError::Backend(format!(
                "runner returned {} logits rows, expected {}",
                logits.rows(),
                picked.len()
            )));
        }
        for (i, n) in advanced {
            seqs[i].computed += n;
        }
        for (row, &i) in picked.iter().enumerate() {
            let s = &mut seqs[i];
            let l = logits.row(row);
            if s.prompt_logits.is_none() {
                s.prompt_logits = Some(l.to_vec());
            }
            s.tokens.push(argmax(l));
            s.generated += 1;
        }
    }
}
