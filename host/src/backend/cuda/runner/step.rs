//! The per-step state: [`HostMeta`], the host-side staging of one batch (token ids,
//! positions, KV slots, context lengths, block tables and logits rows, packed into one `i32`
//! buffer), and [`Buffers`], the device buffers it is copied to and the activation buffers the
//! forward writes, which grow on demand and are reused across steps. [`CudaModelRunner::prepare`]
//! validates a batch and fills the staging; [`CudaModelRunner::upload_and_size`] copies it to
//! the device in one transfer and returns the step's device pointers ([`StepPtrs`]). The
//! attention split count is decided here too, since it sizes a buffer, and so is which tokens
//! the tensor-core prefill attention takes (whole entries of at least
//! [`PREFILL_ATTENTION_MIN_TOKENS`] new tokens, as tiles of [`PREFILL_ATTENTION_ROWS`] query rows)
//! and which the paged kernel takes (the others, as a token list).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use crate::engine::model_runner::{ModelBatch, ModelRunnerError};
use crate::model::ModelConfig;

use super::super::CudaError;
use super::CudaModelRunner;

/// Largest query-head group one attention block handles (`ATTN_MAX_GROUP` in attention.cu).
pub(super) const ATTN_MAX_GROUP: usize = 8;

/// Most key ranges one token's attention is split into, and the thread blocks per SM the
/// split aims for.
pub(super) const MAX_ATTENTION_SPLITS: usize = 32;
pub(super) const ATTENTION_BLOCKS_PER_SM: usize = 4;
/// Fewest keys in one range (`ATTN_MIN_SPLIT` in attention.cu).
pub(super) const ATTENTION_MIN_SPLIT: usize = 64;

/// Fewest new tokens for which an entry's attention runs on the tensor-core prefill kernel
/// (`prefill_attention.cu`); decode tokens and shorter chunks stay on the paged kernel. Above 1,
/// so that pure decode steps (one token per entry, the ones captured as CUDA graphs) never use
/// it and keep the paged kernel over every token without a list.
pub(super) const PREFILL_ATTENTION_MIN_TOKENS: usize = 64;
/// Query rows (tokens × query heads of a KV head) per block of the prefill attention
/// (`PREFILL_ROWS` in prefill_attention.cu).
pub(super) const PREFILL_ATTENTION_ROWS: usize = 64;
/// Ints per prefill tile: the entry's first token in the step, its token count, the tile's
/// first row.
pub(super) const PREFILL_TILE_INTS: usize = 3;

/// A growable device buffer.
pub(super) struct Buf<T> {
    pub(super) slice: Option<CudaSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Buf<T> {
    pub(super) fn new() -> Self {
        Buf { slice: None }
    }

    /// Ensures room for `len` elements (contents are not kept) and returns the device pointer.
    /// Ensures room for `len` elements (contents are not kept) and returns the device pointer;
    /// a reallocation bumps `generation` (captured CUDA graphs hold the old addresses).
    pub(super) fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        len: usize,
        generation: &mut u64,
    ) -> Result<u64, CudaError> {
        let len = len.max(1);
        if self.slice.as_ref().is_none_or(|s| s.len() < len) {
            self.slice = None;
            *generation += 1;
            // Grow by 1.5x so that slowly growing batches do not reallocate every step.
            let cap = len + len / 2;
            self.slice = Some(
                stream
                    .alloc_zeros::<T>(cap)
                    .map_err(|e| CudaError::driver("cuMemAlloc", e))?,
            );
        }
        Ok(self.ptr(stream))
    }

    pub(super) fn ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        self.slice.as_ref().map_or(0, |s| dptr(s, stream))
    }
}

pub(super) fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    // Event tracking is off (one stream), so the guard records nothing.
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// Activation buffers, reused across steps.
pub(super) struct Buffers {
    pub(super) x: Buf<f32>,
    pub(super) h: Buf<u16>,
    pub(super) qkv: Buf<f32>,
    pub(super) attn: Buf<u16>,
    /// Partial results of a split attention: [tokens, heads, splits, head_dim + 2] f32.
    pub(super) attn_part: Buf<f32>,
    pub(super) gate_up: Buf<f32>,
    pub(super) act: Buf<u16>,
    pub(super) meta: Buf<i32>,
    pub(super) final_h: Buf<u16>,
    pub(super) logits: Buf<f32>,
    pub(super) ids: Buf<u32>,
    /// Bumped whenever a buffer is reallocated.
    pub(super) generation: u64,
}

/// Host-side staging for one step.
#[derive(Default)]
pub(super) struct HostMeta {
    /// ids | positions | slots | context lengths | block-table offsets | logits rows | tables |
    /// paged tokens | prefill tiles.
    pub(super) packed: Vec<i32>,
    pub(super) ids: Vec<i32>,
    pub(super) positions: Vec<i32>,
    pub(super) slots: Vec<i32>,
    pub(super) ctx_lens: Vec<i32>,
    pub(super) bt_offsets: Vec<i32>,
    pub(super) logit_rows: Vec<i32>,
    pub(super) tables: Vec<i32>,
    /// The tokens the paged attention takes when the prefill attention takes others (empty when
    /// it takes none: the paged kernel then covers every token without a list).
    pub(super) paged_tokens: Vec<i32>,
    /// The prefill attention's tiles, [`PREFILL_TILE_INTS`] ints each.
    pub(super) prefill_tiles: Vec<i32>,
    pub(super) num_entries: usize,
}

#[derive(Clone, Copy)]
pub(super) struct StepPtrs {
    pub(super) meta: MetaPtrs,
    pub(super) x: u64,
    pub(super) h: u64,
    pub(super) qkv: u64,
    pub(super) attn: u64,
    pub(super) attn_part: u64,
    /// Key ranges of the split attention (1: not split).
    pub(super) attn_splits: usize,
    /// Tokens the paged attention takes (grid.x; all `t` unless the prefill attention runs).
    pub(super) paged_tokens: usize,
    /// Tiles of the prefill attention (0: not launched).
    pub(super) prefill_tiles: usize,
    pub(super) gate_up: u64,
    pub(super) act: u64,
    pub(super) final_h: u64,
    pub(super) logits: u64,
}

/// Device pointers into the packed metadata of the current step.
#[derive(Clone, Copy)]
pub(super) struct MetaPtrs {
    pub(super) ids: u64,
    pub(super) positions: u64,
    pub(super) slots: u64,
    pub(super) ctx_lens: u64,
    pub(super) bt_offsets: u64,
    pub(super) logit_rows: u64,
    pub(super) tables: u64,
    /// The paged attention's token list, or 0 (null: every token).
    pub(super) paged_tokens: u64,
    pub(super) prefill_tiles: u64,
}

/// Per-token widths of the activations, from the model's configuration.
#[derive(Clone, Copy)]
pub(super) struct Widths {
    pub(super) hidden: usize,
    pub(super) q: usize,
    /// Fused Q, K and V.
    pub(super) qkv: usize,
    pub(super) inter: usize,
    pub(super) vocab: usize,
}

impl Widths {
    pub(super) fn of(cfg: &ModelConfig) -> Widths {
        Widths {
            hidden: cfg.hidden_size,
            q: cfg.q_dim(),
            qkv: cfg.q_dim() + 2 * cfg.kv_dim(),
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
        }
    }
}

impl Buffers {
    pub(super) fn new() -> Self {
        Buffers {
            x: Buf::new(),
            h: Buf::new(),
            qkv: Buf::new(),
            attn: Buf::new(),
            attn_part: Buf::new(),
            gate_up: Buf::new(),
            act: Buf::new(),
            meta: Buf::new(),
            final_h: Buf::new(),
            logits: Buf::new(),
            ids: Buf::new(),
            generation: 0,
        }
    }
}

impl CudaModelRunner {
    /// See [`attention_splits`].
    fn attention_splits(&self, t: usize, max_ctx: usize) -> usize {
        if !self.split_attention {
            return 1;
        }
        attention_splits(
            t,
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.sm_count,
            max_ctx,
        )
    }

    /// Checks the batch ([`ModelBatch::validate`], as the CPU runner does) and fills the host
    /// metadata.
    pub(super) fn prepare(&mut self, batch: &ModelBatch<'_>) -> Result<(), ModelRunnerError> {
        batch.validate(&self.kv_shape.batch_limits(&self.cfg))?;
        let bs = self.kv_shape.block_size;
        let prefill_min = if self.k.prefill_attention.is_some() {
            PREFILL_ATTENTION_MIN_TOKENS
        } else {
            usize::MAX
        };
        let group = self.cfg.num_heads / self.cfg.num_kv_heads;
        let h = &mut self.host;
        h.ids.clear();
        h.positions.clear();
        h.slots.clear();
        h.ctx_lens.clear();
        h.bt_offsets.clear();
        h.logit_rows.clear();
        h.tables.clear();
        h.paged_tokens.clear();
        h.prefill_tiles.clear();
        h.num_entries = batch.entries.len();
        for e in &batch.entries {
            let used = (e.start_position + e.token_ids.len()).div_ceil(bs);
            let table_offset = h.tables.len() as i32;
            h.tables
                .extend(e.block_table[..used].iter().map(|&b| b as i32));
            assign_attention(
                h.ids.len(),
                e.token_ids.len(),
                group,
                prefill_min,
                &mut h.paged_tokens,
                &mut h.prefill_tiles,
            );
            for (i, &tok) in e.token_ids.iter().enumerate() {
                let p = e.start_position + i;
                h.ids.push(tok as i32);
                h.positions.push(p as i32);
                h.slots
                    .push((e.block_table[p / bs] as usize * bs + p % bs) as i32);
                h.ctx_lens.push(p as i32 + 1);
                h.bt_offsets.push(table_offset);
            }
            let (end, rows) = (h.ids.len() as i32, e.num_logits_rows() as i32);
            h.logit_rows.extend(end - rows..end);
        }
        if h.prefill_tiles.is_empty() {
            h.paged_tokens.clear(); // every token, no list
        }
        Ok(())
    }

    /// Copies the step's metadata to the device and makes every activation buffer big enough.
    pub(super) fn upload_and_size(&mut self, t: usize, r: usize) -> Result<StepPtrs, CudaError> {
        let cfg = &self.cfg;
        let stream = &self.stream;
        // The paged attention's tokens (all, or the list) and their longest context.
        let h = &self.host;
        let (paged_tokens, max_ctx) = if h.prefill_tiles.is_empty() {
            (t, h.ctx_lens.iter().copied().max().unwrap_or(0))
        } else {
            let longest = h.paged_tokens.iter().map(|&i| h.ctx_lens[i as usize]).max();
            (h.paged_tokens.len(), longest.unwrap_or(0))
        };
        let prefill_tiles = h.prefill_tiles.len() / PREFILL_TILE_INTS;
        let token_list = !h.paged_tokens.is_empty();
        let attn_splits = self.attention_splits(paged_tokens, max_ctx.max(0) as usize);

        // Metadata: one host-to-device copy. Every part's offset depends on (t, r) only: the
        // block tables, whose length varies, come after them, and the attention's token list and
        // tiles, which only steps with a prefill entry have (never captured as graphs), last.
        let h = &mut self.host;
        h.packed.clear();
        let mut offsets = [0usize; 9];
        for (i, part) in [
            &h.ids,
            &h.positions,
            &h.slots,
            &h.ctx_lens,
            &h.bt_offsets,
            &h.logit_rows,
            &h.tables,
            &h.paged_tokens,
            &h.prefill_tiles,
        ]
        .into_iter()
        .enumerate()
        {
            offsets[i] = h.packed.len();
            h.packed.extend_from_slice(part);
        }
        let b = &mut self.bufs;
        let meta_base = b.meta.ensure(stream, h.packed.len(), &mut b.generation)?;
        {
            let dst = b.meta.slice.as_mut().expect("ensured");
            let mut view = dst.slice_mut(0..h.packed.len());
            stream
                .memcpy_htod(&h.packed[..], &mut view)
                .map_err(|e| CudaError::driver("cuMemcpyHtoD", e))?;
        }
        let at = |i: usize| meta_base + (offsets[i] * 4) as u64;
        let g = &mut b.generation;
        let mut lens = BufferLens::of(cfg, t, r, attn_splits);
        // The split partials are for the paged kernel's tokens only.
        lens.attn_part = BufferLens::of(cfg, paged_tokens, 0, attn_splits).attn_part;
        Ok(StepPtrs {
            meta: MetaPtrs {
                ids: at(0),
                positions: at(1),
                slots: at(2),
                ctx_lens: at(3),
                bt_offsets: at(4),
                logit_rows: at(5),
                tables: at(6),
                paged_tokens: if token_list { at(7) } else { 0 },
                prefill_tiles: at(8),
            },
            x: b.x.ensure(stream, lens.x, g)?,
            h: b.h.ensure(stream, lens.h, g)?,
            qkv: b.qkv.ensure(stream, lens.qkv, g)?,
            attn: b.attn.ensure(stream, lens.attn, g)?,
            attn_part: b.attn_part.ensure(stream, lens.attn_part, g)?,
            attn_splits,
            paged_tokens,
            prefill_tiles,
            gate_up: b.gate_up.ensure(stream, lens.gate_up, g)?,
            act: b.act.ensure(stream, lens.act, g)?,
            final_h: b.final_h.ensure(stream, lens.final_h, g)?,
            logits: b.logits.ensure(stream, lens.logits, g)?,
        })
    }
}

/// Elements of each activation buffer for a step of `t` tokens, `r` logits rows and attention
/// split `splits` ways (one place for the runner's sizing and the KV pool's memory budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BufferLens {
    /// f32 buffers.
    pub(super) x: usize,
    pub(super) qkv: usize,
    pub(super) attn_part: usize,
    pub(super) gate_up: usize,
    pub(super) logits: usize,
    /// 16-bit buffers.
    pub(super) h: usize,
    pub(super) attn: usize,
    pub(super) act: usize,
    pub(super) final_h: usize,
}

impl BufferLens {
    pub(super) fn of(cfg: &ModelConfig, t: usize, r: usize, splits: usize) -> BufferLens {
        let w = Widths::of(cfg);
        BufferLens {
            x: t * w.hidden,
            qkv: t * w.qkv,
            attn_part: t * cfg.num_heads * splits * (cfg.head_dim + 2),
            gate_up: t * 2 * w.inter,
            logits: r * w.vocab,
            h: t * w.hidden,
            attn: t * w.q,
            act: t * w.inter,
            final_h: r * w.hidden,
        }
    }

    /// Bytes, given 4-byte f32 and 2-byte 16-bit elements.
    pub(super) fn bytes(&self) -> usize {
        4 * (self.x + self.qkv + self.attn_part + self.gate_up + self.logits)
            + 2 * (self.h + self.attn + self.act + self.final_h)
    }

    /// Element-wise maximum (buffers grow independently).
    pub(super) fn max(self, o: BufferLens) -> BufferLens {
        BufferLens {
            x: self.x.max(o.x),
            qkv: self.qkv.max(o.qkv),
            attn_part: self.attn_part.max(o.attn_part),
            gate_up: self.gate_up.max(o.gate_up),
            logits: self.logits.max(o.logits),
            h: self.h.max(o.h),
            attn: self.attn.max(o.attn),
            act: self.act.max(o.act),
            final_h: self.final_h.max(o.final_h),
        }
    }
}

/// Gives one entry's `n` tokens (the first at index `first` of the step) to an attention kernel:
/// with at least `min_tokens`, the prefill kernel, as tiles of [`PREFILL_ATTENTION_ROWS`] of the
/// entry's `n × group` query rows (the last tile, with the most keys, first); else the paged
/// kernel, as entries of its token list.
pub(super) fn assign_attention(
    first: usize,
    n: usize,
    group: usize,
    min_tokens: usize,
    paged_tokens: &mut Vec<i32>,
    prefill_tiles: &mut Vec<i32>,
) {
    if n >= min_tokens {
        for j in (0..(n * group).div_ceil(PREFILL_ATTENTION_ROWS)).rev() {
            prefill_tiles.extend([first as i32, n as i32, (j * PREFILL_ATTENTION_ROWS) as i32]);
        }
    } else {
        paged_tokens.extend(first as i32..(first + n) as i32);
    }
}

/// Key ranges each token's attention is split into for a step of `t` tokens whose longest
/// context is `max_ctx`, on a GPU of `sm_count` SMs: enough thread blocks for
/// [`ATTENTION_BLOCKS_PER_SM`] per SM, but no more ranges than the longest context fills with
/// [`ATTENTION_MIN_SPLIT`] keys each. Each block derives its range from its own token's context
/// on the device; a captured graph is keyed by the split count too.
pub(super) fn attention_splits(
    t: usize,
    num_heads: usize,
    num_kv_heads: usize,
    sm_count: usize,
    max_ctx: usize,
) -> usize {
    if t == 0 || num_kv_heads == 0 {
        return 1;
    }
    let blocks = t * num_kv_heads * (num_heads / num_kv_heads).div_ceil(ATTN_MAX_GROUP);
    let target = ATTENTION_BLOCKS_PER_SM * sm_count;
    if blocks >= target {
        return 1;
    }
    target
        .div_ceil(blocks)
        .min(MAX_ATTENTION_SPLITS)
        .min(max_ctx.div_ceil(ATTENTION_MIN_SPLIT))
        .max(1)
}
