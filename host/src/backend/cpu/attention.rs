//! Causal attention over the paged KV cache. Each sequence of the batch attends, for each of
//! its new tokens at absolute position `p`, to positions `0..=p` read through its block table
//! (its own new K/V were written to the cache just before). Work is split into one rayon task
//! per (sequence, query head); each task writes a contiguous region of a task-major scratch
//! buffer, which is then scattered into the `[token, head * head_dim]` output.

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernels::{axpy_lanes, exp_fast, has_avx2_fma, max_lanes, sum_lanes};
use super::kv_cache::PagedKvCache;

/// One sequence's share of the batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// Row of its first new token in the batch.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Absolute position of its first new token.
    pub start: usize,
    pub block_table: &'a [u32],
}

/// Shapes the attention needs.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Row stride of the fused q/k/v activations (queries at column 0).
    pub qkv_stride: usize,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Computes attention for every sequence into `out` (`[tokens, num_heads * head_dim]`).
pub fn paged_attention(
    shape: AttnShape,
    seqs: &[SeqSpan<'_>],
    qkv: &[f32],
    kv: &PagedKvCache,
    layer: usize,
    out: &mut [f32],
    tmp: &mut Vec<f32>,
) {
    let d = shape.head_dim;
    let q_dim = shape.num_heads * d;
    let total: usize = seqs.iter().map(|s| s.len).sum();
    tmp.clear();
    tmp.resize(total * q_dim, 0.0);

    let mut tasks = Vec::with_capacity(seqs.len() * shape.num_heads);
    let mut rest: &mut [f32] = tmp;
    for seq in seqs {
        for h in 0..shape.num_heads {
            let (region, tail) = rest.split_at_mut(seq.len * d);
            tasks.push((*seq, h, region));
            rest = tail;
        }
    }
    let fma = has_avx2_fma();
    let (kc, vc) = kv.layer(layer);
    tasks.into_par_iter().for_each(|(seq, h, dst)| {
        SCORES.with_borrow_mut(|scores| {
            let args = TaskArgs {
                shape,
                seq,
                head: h,
                qkv,
                kv,
                kc,
                vc,
            };
            if fma {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe {
                    attend_avx2(&args, dst, scores)
                };
            } else {
                attend::<false>(&args, dst, scores);
            }
        });
    });

    // Scatter the task-major results into token-major rows.
    let mut offset = 0;
    for seq in seqs {
        for h in 0..shape.num_heads {
            for i in 0..seq.len {
                let src = &tmp[offset + i * d..offset + (i + 1) * d];
                let row = seq.row + i;
                out[row * q_dim + h * d..row * q_dim + (h + 1) * d].copy_from_slice(src);
            }
            offset += seq.len * d;
        }
    }
}

struct TaskArgs<'a> {
    shape: AttnShape,
    seq: SeqSpan<'a>,
    head: usize,
    qkv: &'a [f32],
    kv: &'a PagedKvCache,
    kc: &'a [f32],
    vc: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(a: &TaskArgs<'_>, dst: &mut [f32], scores: &mut Vec<f32>) {
    attend::<true>(a, dst, scores)
}

/// One (sequence, head): `dst` is `[len, head_dim]`.
#[inline(always)]
fn attend<const FMA: bool>(a: &TaskArgs<'_>, dst: &mut [f32], scores: &mut Vec<f32>) {
    let s = a.shape;
    let d = s.head_dim;
    let bs = s.block_size;
    let kv_head = a.head / (s.num_heads / s.num_kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    for (i, o) in dst.chunks_exact_mut(d).enumerate() {
        let ctx = a.seq.start + i + 1;
        let nblocks = ctx.div_ceil(bs);
        let row = a.seq.row + i;
        let q = &a.qkv[row * s.qkv_stride + a.head * d..][..d];
        scores.clear();
        scores.resize(nblocks * bs, 0.0);
        // Scores of a whole block at once: keys are stored `[dim][slot]`.
        for (&block, sc) in a.seq.block_table[..nblocks]
            .iter()
            .zip(scores.chunks_exact_mut(bs))
        {
            let base = a.kv.offset(block as usize, kv_head);
            let kt = &a.kc[base..base + d * bs];
            match bs {
                16 => block_scores::<16, FMA>(q, scale, kt, sc),
                32 => block_scores::<32, FMA>(q, scale, kt, sc),
                _ => {
                    for (&qd, row) in q.iter().zip(kt.chunks_exact(bs)) {
                        axpy_lanes::<FMA>(sc, qd * scale, row);
                    }
                }
            }
        }
        let valid = &mut scores[..ctx];
        let max = max_lanes(valid);
        for x in valid.iter_mut() {
            *x = exp_fast(*x - max);
        }
        let inv = 1.0 / sum_lanes(valid);
        let blocks = &a.seq.block_table[..nblocks];
        match d {
            64 => weighted_values::<64, FMA>(a, blocks, kv_head, valid, inv, o),
            128 => weighted_values::<128, FMA>(a, blocks, kv_head, valid, inv, o),
            _ => {
                o.fill(0.0);
                for (&block, w) in blocks.iter().zip(valid.chunks(bs)) {
                    let base = a.kv.offset(block as usize, kv_head);
                    let values = &a.vc[base..base + w.len() * d];
                    for (&wj, v) in w.iter().zip(values.chunks_exact(d)) {
                        axpy_lanes::<FMA>(o, wj, v);
                    }
                }
                for x in o.iter_mut() {
                    *x *= inv;
                }
            }
        }
    }
}

/// `sc[slot] = scale * q · key[slot]` for one block of `B` keys stored `[dim][slot]`, with four
/// independent accumulator sets over the head dimension so the FMAs pipeline.
#[inline(always)]
fn block_scores<const B: usize, const FMA: bool>(
    q: &[f32],
    scale: f32,
    kt: &[f32],
    sc: &mut [f32],
) {
    let mut acc = [[0f32; B]; 4];
    let q4 = q.chunks_exact(4);
    let q_tail = q4.remainder();
    let k4 = kt.chunks_exact(4 * B);
    let k_tail = k4.remainder();
    for (qc, kc) in q4.zip(k4) {
        for u in 0..4 {
            let qv = qc[u] * scale;
            let row: &[f32; B] = kc[u * B..(u + 1) * B].try_into().unwrap_or(&[0f32; B]);
            for l in 0..B {
                acc[u][l] = if FMA {
                    qv.mul_add(row[l], acc[u][l])
                } else {
                    acc[u][l] + qv * row[l]
                };
            }
        }
    }
    for (&qd, row) in q_tail.iter().zip(k_tail.chunks_exact(B)) {
        for l in 0..B {
            acc[0][l] += qd * scale * row[l];
        }
    }
    for (l, out) in sc.iter_mut().enumerate().take(B) {
        *out = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
}

/// `o = inv * Σ_j w_j v_j` over the valid positions, the `D`-wide output held in registers.
#[inline(always)]
fn weighted_values<const D: usize, const FMA: bool>(
    a: &TaskArgs<'_>,
    blocks: &[u32],
    kv_head: usize,
    weights: &[f32],
    inv: f32,
    o: &mut [f32],
) {
    let bs = a.shape.block_size;
    let mut acc = [0f32; D];
    for (&block, w) in blocks.iter().zip(weights.chunks(bs)) {
        let base = a.kv.offset(block as usize, kv_head);
        let values = &a.vc[base..base + w.len() * D];
        for (&wj, v) in w.iter().zip(values.chunks_exact(D)) {
            let v: &[f32; D] = v.try_into().unwrap_or(&[0f32; D]);
            for l in 0..D {
                acc[l] = if FMA {
                    wj.mul_add(v[l], acc[l])
                } else {
                    acc[l] + wj * v[l]
                };
            }
        }
    }
    for (x, &v) in o.iter_mut().zip(&acc) {
        *x = v * inv;
    }
}
