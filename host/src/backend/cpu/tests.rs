//! Tests of the CPU runner against a dense f64 reference forward (no paging, no batching) and
//! of its invariances: batched == unbatched, chunked prefill == whole prefill, any block
//! assignment, prefix blocks reused from another request, logits rows in batch order, invalid
//! batches rejected, and the tiny model's speed.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner, ModelRunnerError};
use crate::model::tiny::{self, tiny_config, tiny_weights};
use crate::model::weights::LlamaWeights;
use crate::model::{KvCacheShape, ModelConfig};
use crate::splitmix::SplitMix64;
use crate::testing::greedy::{GreedyOptions, greedy_generate};
use crate::testing::model_configs::variant_config;

use super::CpuModelRunner;

/// Head dimensions with specialised attention paths (64, 128), a single layer.
fn wide_configs() -> Vec<ModelConfig> {
    [64, 128]
        .into_iter()
        .map(|head_dim| {
            let mut c = tiny_config();
            c.num_layers = 1;
            c.num_heads = 4;
            c.num_kv_heads = 2;
            c.head_dim = head_dim;
            c
        })
        .collect()
}

fn runner(cfg: &ModelConfig, kv: KvCacheShape) -> CpuModelRunner {
    CpuModelRunner::new(cfg.clone(), Arc::new(tiny_weights(cfg)), kv).unwrap()
}

fn prompts(n: usize, seed: u64, vocab: u32) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7 + 3) % 29;
            (0..len)
                .map(|_| (rng.next_u64() % u64::from(vocab)) as u32)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Straightforward dense f64 forward over one sequence; logits at its last position.
fn reference_logits(cfg: &ModelConfig, w: &LlamaWeights, tokens: &[u32]) -> Vec<f32> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let eps = f64::from(cfg.rms_norm_eps);
    let inv_freq: Vec<f64> = cfg.rope_inv_freq().into_iter().map(f64::from).collect();
    let norm = |x: &[f64], g: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter()
            .zip(g)
            .map(|(v, g)| v * r * f64::from(*g))
            .collect()
    };
    let proj =
        |x: &[f64], m: &crate::model::weight_matrix::WeightMatrix, row0: usize, rows: usize| {
            let m = m.to_f32();
            (row0..row0 + rows)
                .map(|j| {
                    m.row(j)
                        .iter()
                        .zip(x)
                        .map(|(a, b)| f64::from(*a) * b)
                        .sum::<f64>()
                })
                .collect::<Vec<f64>>()
        };
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let a = pos as f64 * inv_freq[i];
                let (x1, x2) = (head[i], head[i + d / 2]);
                head[i] = x1 * a.cos() - x2 * a.sin();
                head[i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            w.embed
                .to_f32()
                .row(t as usize)
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        })
        .collect();
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    for lw in &w.layers {
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let hn = norm(x, &lw.input_norm);
            let mut qkv = proj(&hn, &lw.qkv, 0, qd + 2 * kvd);
            if let Some(b) = &lw.qkv_bias {
                qkv.iter_mut().zip(b).for_each(|(v, b)| *v += f64::from(*b));
            }
            let mut q = qkv[..qd].to_vec();
            let mut k = qkv[qd..qd + kvd].to_vec();
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(qkv[qd + kvd..].to_vec());
        }
        for (p, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f64; qd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[p][head * d..(head + 1) * d];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        let k = &ks[j][kvh * d..(kvh + 1) * d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for i in 0..d {
                        attn[head * d + i] += ej / sum * vs[j][kvh * d + i];
                    }
                }
            }
            let o = proj(&attn, &lw.o, 0, h);
            for i in 0..h {
                x[i] += o[i] + lw.o_bias.as_ref().map_or(0.0, |b| f64::from(b[i]));
            }
            let hn = norm(x, &lw.post_norm);
            let gu = proj(&hn, &lw.gate_up, 0, 2 * cfg.intermediate_size);
            let inter = cfg.intermediate_size;
            let act: Vec<f64> = (0..inter)
                .map(|i| gu[i] / (1.0 + (-gu[i]).exp()) * gu[inter + i])
                .collect();
            let down = proj(&act, &lw.down, 0, h);
            x.iter_mut().zip(down).for_each(|(v, d)| *v += d);
        }
    }
    let last = norm(xs.last().unwrap(), &w.final_norm);
    proj(&last, w.lm_head(), 0, cfg.vocab_size)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

#[test]
fn paged_forward_matches_dense_reference() {
    let mut configs = vec![tiny_config(), variant_config()];
    configs.extend(wide_configs());
    for (cfg, block_size) in configs
        .into_iter()
        .flat_map(|c| [4, 16, 32].map(|b| (c.clone(), b)))
    {
        let w = tiny_weights(&cfg);
        let kv = KvCacheShape {
            num_blocks: 256 / block_size,
            block_size,
        };
        let mut r = runner(&cfg, kv);
        let ps = prompts(5, 11, cfg.vocab_size as u32);
        let opts = GreedyOptions {
            max_new_tokens: 1,
            ..Default::default()
        };
        let out = greedy_generate(&mut r, kv, &ps, &opts).unwrap();
        for (p, got) in ps.iter().zip(&out.prompt_logits) {
            let want = reference_logits(&cfg, &w, p);
            let err = max_diff(got, &want);
            assert!(
                err < 1e-4,
                "{:?}: prompt len {} error {err}",
                cfg.architecture,
                p.len()
            );
        }
    }
}

#[test]
fn batching_chunking_and_block_order_do_not_change_results() {
    for cfg in [tiny_config(), variant_config()] {
        for block_size in [1, 3, 16] {
            let kv = KvCacheShape {
                num_blocks: 2000 / block_size,
                block_size,
            };
            let ps = prompts(7, 5, cfg.vocab_size as u32);
            let base = GreedyOptions {
                max_new_tokens: 12,
                batched: false,
                ..Default::default()
            };
            let want = greedy_generate(&mut runner(&cfg, kv), kv, &ps, &base).unwrap();
            for opts in [
                GreedyOptions {
                    batched: true,
                    ..base.clone()
                },
                GreedyOptions {
                    prefill_chunk: Some(3),
                    ..base.clone()
                },
                GreedyOptions {
                    batched: true,
                    prefill_chunk: Some(5),
                    shuffle_blocks: Some(block_size as u64),
                    ..base.clone()
                },
            ] {
                let got = greedy_generate(&mut runner(&cfg, kv), kv, &ps, &opts).unwrap();
                assert_eq!(got.tokens, want.tokens, "bs {block_size} {opts:?}");
                for (a, b) in got.prompt_logits.iter().zip(&want.prompt_logits) {
                    assert!(max_diff(a, b) < 1e-4, "bs {block_size} {opts:?}");
                }
            }
        }
    }
}

fn entry<'a>(
    id: u64,
    toks: &'a [u32],
    start: usize,
    table: &'a [u32],
    logits: bool,
) -> BatchEntry<'a> {
    BatchEntry {
        request_id: id,
        token_ids: toks,
        start_position: start,
        block_table: table,
        needs_logits: logits,
        all_logits: false,
    }
}

#[test]
fn prefix_blocks_from_another_request_are_reused() {
    let cfg = tiny_config();
    let kv = KvCacheShape {
        num_blocks: 32,
        block_size: 4,
    };
    let mut r = runner(&cfg, kv);
    let shared: Vec<u32> = (10..18).collect(); // two full blocks
    let mut a = shared.clone();
    a.extend([40, 41, 42]);
    let mut b = shared.clone();
    b.extend([50, 51, 52, 53, 54]);
    // Request A computes everything in blocks 7, 3, 9.
    r.forward(&ModelBatch {
        entries: vec![entry(1, &a, 0, &[7, 3, 9], true)],
    })
    .unwrap();
    // Request B gets A's two prefix blocks from the "prefix cache" and computes only its tail.
    let with_cache = r
        .forward(&ModelBatch {
            entries: vec![entry(2, &b[8..], 8, &[7, 3, 20, 21], true)],
        })
        .unwrap();
    let mut fresh = runner(&cfg, kv);
    let from_scratch = fresh
        .forward(&ModelBatch {
            entries: vec![entry(2, &b, 0, &[0, 1, 2, 5], true)],
        })
        .unwrap();
    assert!(max_diff(with_cache.row(0), from_scratch.row(0)) < 1e-5);
}

#[test]
fn logits_rows_follow_needs_logits_in_batch_order() {
    let cfg = tiny_config();
    let kv = KvCacheShape {
        num_blocks: 32,
        block_size: 8,
    };
    let (p1, p2, p3): (Vec<u32>, Vec<u32>, Vec<u32>) =
        ((0..5).collect(), (100..110).collect(), (200..203).collect());
    let mut r = runner(&cfg, kv);
    let out = r
        .forward(&ModelBatch {
            entries: vec![
                entry(1, &p1, 0, &[0], true),
                entry(2, &p2[..6], 0, &[1, 2], false),
                entry(3, &p3, 0, &[3], true),
            ],
        })
        .unwrap();
    assert_eq!(out.rows(), 2);
    assert_eq!(out.vocab_size, cfg.vocab_size);
    let single = |p: &[u32]| {
        let mut r = runner(&cfg, kv);
        r.forward(&ModelBatch {
            entries: vec![entry(9, p, 0, &[5], true)],
        })
        .unwrap()
        .data
    };
    assert!(max_diff(out.row(0), &single(&p1)) < 1e-5);
    assert!(max_diff(out.row(1), &single(&p3)) < 1e-5);
    // An empty batch is fine and yields no rows.
    assert_eq!(r.forward(&ModelBatch::default()).unwrap().rows(), 0);
}

#[test]
fn all_logits_gives_a_row_per_token_equal_to_each_prefix_alone() {
    let cfg = tiny_config();
    let kv = KvCacheShape {
        num_blocks: 32,
        block_size: 4,
    };
    let (p1, p2): (Vec<u32>, Vec<u32>) = ((0..5).collect(), (100..109).collect());
    let mut r = runner(&cfg, kv);
    // A chunk of p2 (positions 3..9) with every row, between two ordinary entries.
    r.forward(&ModelBatch {
        entries: vec![entry(2, &p2[..3], 0, &[1, 2, 4], false)],
    })
    .unwrap();
    let all = BatchEntry {
        all_logits: true,
        ..entry(2, &p2[3..], 3, &[1, 2, 4], true)
    };
    let out = r
        .forward(&ModelBatch {
            entries: vec![entry(1, &p1, 0, &[0, 3], true), all],
        })
        .unwrap();
    assert_eq!(out.rows(), 1 + 6);
    let single = |p: &[u32]| {
        let mut r = runner(&cfg, kv);
        r.forward(&ModelBatch {
            entries: vec![entry(9, p, 0, &[5, 6, 7], true)],
        })
        .unwrap()
        .data
    };
    assert!(max_diff(out.row(0), &single(&p1)) < 1e-5);
    for (i, end) in (4..=9).enumerate() {
        assert!(
            max_diff(out.row(1 + i), &single(&p2[..end])) < 1e-5,
            "{end}"
        );
    }
}

#[test]
fn invalid_batches_are_rejected() {
    let cfg = tiny_config();
    let kv = KvCacheShape {
        num_blocks: 4,
        block_size: 4,
    };
    let mut r = runner(&cfg, kv);
    let toks: Vec<u32> = (0..6).collect();
    let long: Vec<u32> = vec![1; 8];
    let cases: Vec<(BatchEntry<'_>, &str)> = vec![
        (entry(1, &[], 0, &[0], true), "no tokens"),
        (entry(2, &toks, 0, &[0], true), "cannot hold"),
        (entry(3, &toks, 0, &[0, 4], true), "out of range"),
        (entry(4, &[999], 0, &[0], true), "token id 999"),
        (entry(5, &long, 2045, &[0; 600], true), "max_model_len"),
    ];
    for (e, needle) in cases {
        match r.forward(&ModelBatch { entries: vec![e] }) {
            Err(ModelRunnerError::InvalidBatch(msg)) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
            }
            other => panic!("expected InvalidBatch({needle}), got {other:?}"),
        }
    }
}

#[test]
fn tiny_serves_64_requests_of_32_tokens_quickly() {
    let kv = KvCacheShape {
        num_blocks: 64 * 5,
        block_size: 16,
    };
    let model = tiny::tiny_model();
    let mut r = CpuModelRunner::new(model.info.config.clone(), model.weights, kv).unwrap();
    let ps = prompts(64, 3, 256);
    let started = Instant::now();
    let opts = GreedyOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let out = greedy_generate(&mut r, kv, &ps, &opts).unwrap();
    let elapsed = started.elapsed();
    eprintln!("builtin:tiny 64 requests x 32 tokens: {elapsed:?}");
    assert!(out.tokens.iter().all(|t| t.len() == 32));
    assert!(elapsed.as_secs_f64() < 10.0, "took {elapsed:?}");
    // Deterministic: the same run gives the same tokens.
    let mut r2 = CpuModelRunner::new(model.info.config.clone(), r.weights().clone(), kv).unwrap();
    assert_eq!(
        greedy_generate(&mut r2, kv, &ps, &opts).unwrap().tokens,
        out.tokens
    );
}
