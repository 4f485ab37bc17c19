//! The CPU backend: [`CpuModelRunner`] runs the Llama-family forward in f32 over the engine's
//! flattened batch (prefill chunks and decode tokens of many requests in one call): embeddings,
//! then per layer RMSNorm → fused QKV GEMM over all tokens → RoPE at each token's absolute
//! position → K/V written into the paged cache through the block table → causal paged attention
//! per (request, head) in parallel → O projection + residual → RMSNorm → fused gate/up GEMM →
//! SwiGLU → down projection + residual; then the final norm and the LM head for the rows that
//! need logits only. Activation buffers live in the runner and are reused across steps.

pub mod attention;
pub mod half_matmul;
pub mod kernels;
pub mod kv_cache;
pub mod matmul;
pub mod qmatmul;
pub mod row_tiles;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::engine::model_runner::{BatchLimits, Logits, ModelBatch, ModelRunner, ModelRunnerError};
use crate::model::{
    KvCacheShape, LlamaWeights, ModelConfig, ModelError, ModelInfo, load_model_files,
};

use attention::{AttnShape, SeqSpan, paged_attention};
use kernels::{RopeTable, add_bias, rms_norm, silu_mul};
use kv_cache::PagedKvCache;
use matmul::{MatmulScratch, matmul};

/// Activation buffers reused across forward calls (they only grow).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    attn_tmp: Vec<f32>,
    mlp: Vec<f32>,
    act: Vec<f32>,
    mm: MatmulScratch,
    positions: Vec<usize>,
    /// (block id, slot) of each new token.
    slots: Vec<(usize, usize)>,
    logit_rows: Vec<usize>,
}

/// A Llama-family model on the CPU with its paged KV cache.
pub struct CpuModelRunner {
    cfg: ModelConfig,
    weights: Arc<LlamaWeights>,
    kv: PagedKvCache,
    rope: RopeTable,
    scratch: Scratch,
}

impl std::fmt::Debug for CpuModelRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuModelRunner")
            .field("architecture", &self.cfg.architecture)
            .field("kv", &self.kv.shape())
            .finish()
    }
}

/// Loads `spec` (`builtin:tiny` or a Hugging Face model directory) and builds a CPU runner
/// with a paged KV cache of the given shape.
pub fn load_cpu_model(
    spec: &str,
    kv: KvCacheShape,
) -> Result<(CpuModelRunner, ModelInfo), ModelError> {
    let model = load_model_files(spec)?;
    let runner = CpuModelRunner::new(model.info.config.clone(), model.weights, kv)?;
    Ok((runner, model.info))
}

impl CpuModelRunner {
    /// Builds a runner; allocates (lazily zeroed) K/V tensors for `kv`.
    pub fn new(
        cfg: ModelConfig,
        weights: Arc<LlamaWeights>,
        kv: KvCacheShape,
    ) -> Result<Self, ModelError> {
        if weights.layers.len() != cfg.num_layers {
            return Err(ModelError::InvalidKvShape(format!(
                "weights have {} layers, config {}",
                weights.layers.len(),
                cfg.num_layers
            )));
        }
        let kv = PagedKvCache::new(kv, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)?;
        // No sequence can outgrow the cache, so positions past its capacity need no table.
        let positions = cfg
            .max_model_len
            .min(kv.shape().num_blocks * kv.shape().block_size);
        let rope = RopeTable::new(&cfg.rope_inv_freq(), positions);
        Ok(CpuModelRunner {
            cfg,
            weights,
            kv,
            rope,
            scratch: Scratch::default(),
        })
    }

    pub fn weights(&self) -> &Arc<LlamaWeights> {
        &self.weights
    }

    /// Checks the batch and fills positions, slots and the logits rows; returns the spans.
    fn prepare<'b>(
        &mut self,
        batch: &ModelBatch<'b>,
    ) -> Result<Vec<SeqSpan<'b>>, ModelRunnerError> {
        batch.validate(&self.limits())?;
        let bs = self.kv.shape().block_size;
        let s = &mut self.scratch;
        s.positions.clear();
        s.slots.clear();
        s.logit_rows.clear();
        let mut spans = Vec::with_capacity(batch.entries.len());
        for e in &batch.entries {
            let end = e.start_position + e.token_ids.len();
            let row = s.positions.len();
            for p in e.start_position..end {
                s.positions.push(p);
                s.slots.push((e.block_table[p / bs] as usize, p % bs));
            }
            let rows = e.num_logits_rows();
            s.logit_rows
                .extend(row + e.token_ids.len() - rows..row + e.token_ids.len());
            spans.push(SeqSpan {
                row,
                len: e.token_ids.len(),
                start: e.start_position,
                block_table: e.block_table,
            });
        }
        Ok(spans)
    }
}

impl ModelRunner for CpuModelRunner {
    fn limits(&self) -> BatchLimits {
        self.kv.shape().batch_limits(&self.cfg)
    }

    /// Runs the forward pass on a thread of rayon's pool ([`CpuModelRunner::forward_on_pool`]).
    fn forward(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError> {
        rayon::scope(|_| self.forward_on_pool(batch))
    }
}

impl CpuModelRunner {
    /// One forward pass, called on a thread of rayon's global pool. Each of the ~150 parallel
    /// matmuls and attention calls of a decode step then starts from inside the pool, where the
    /// calling thread takes part and an idle worker is usually still spinning; called from
    /// outside, every one of them handed the work to a sleeping worker and put the caller to
    /// sleep (two futex wake-ups per call: a fifth of a 1-thread F16 decode step on the Zen 4
    /// machine went to that).
    fn forward_on_pool(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError> {
        let spans = self.prepare(batch)?;
        let cfg = &self.cfg;
        let w = &*self.weights;
        let s = &mut self.scratch;
        let t = s.positions.len();
        let (hid, q_dim, kv_dim, inter) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let qkv_dim = q_dim + 2 * kv_dim;
        let eps = cfg.rms_norm_eps;

        s.x.resize(t * hid, 0.0);
        let tokens = batch.entries.iter().flat_map(|e| e.token_ids.iter());
        for (row, &tok) in s.x.chunks_exact_mut(hid).zip(tokens) {
            w.embed.row_into(tok as usize, row);
        }
        s.h.resize(t * hid, 0.0);
        s.qkv.resize(t * qkv_dim, 0.0);
        s.attn.resize(t * q_dim, 0.0);
        s.mlp.resize(t * 2 * inter, 0.0);
        s.act.resize(t * inter, 0.0);
        let shape = AttnShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_size: self.kv.shape().block_size,
            qkv_stride: qkv_dim,
        };

        for (l, lw) in w.layers.iter().enumerate() {
            rms_norm(&s.x, &lw.input_norm, eps, &mut s.h);
            matmul(&s.h, t, &lw.qkv, &mut s.qkv, false, &mut s.mm);
            if let Some(b) = &lw.qkv_bias {
                add_bias(&mut s.qkv, b);
            }
            for (i, row) in s.qkv.chunks_exact_mut(qkv_dim).enumerate() {
                let (q, rest) = row.split_at_mut(q_dim);
                let (k, v) = rest.split_at_mut(kv_dim);
                let pos = s.positions[i];
                self.rope.apply(q, pos);
                self.rope.apply(k, pos);
                let (block, slot) = s.slots[i];
                self.kv.write(l, block, slot, k, v);
            }
            paged_attention(
                shape,
                &spans,
                &s.qkv,
                &self.kv,
                l,
                &mut s.attn,
                &mut s.attn_tmp,
            );
            matmul(&s.attn, t, &lw.o, &mut s.x, true, &mut s.mm);
            if let Some(b) = &lw.o_bias {
                add_bias(&mut s.x, b);
            }
            rms_norm(&s.x, &lw.post_norm, eps, &mut s.h);
            matmul(&s.h, t, &lw.gate_up, &mut s.mlp, false, &mut s.mm);
            silu_mul(&s.mlp, inter, &mut s.act);
            matmul(&s.act, t, &lw.down, &mut s.x, true, &mut s.mm);
        }

        let r = s.logit_rows.len();
        let vocab = cfg.vocab_size;
        let mut data = vec![0.0f32; r * vocab];
        if r > 0 {
            s.attn.clear();
            for &row in &s.logit_rows {
                s.attn.extend_from_slice(&s.x[row * hid..(row + 1) * hid]);
            }
            s.h.resize(r * hid, 0.0);
            rms_norm(&s.attn, &w.final_norm, eps, &mut s.h[..r * hid]);
            matmul(&s.h, r, w.lm_head(), &mut data, false, &mut s.mm);
        }
        Ok(Logits {
            vocab_size: vocab,
            data,
        })
    }
}
