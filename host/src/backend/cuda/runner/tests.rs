//! Host-side checks of the runner: constants shared with the kernels, the attention split, which
//! entries the prefill attention takes; with a GPU, the prefill attention against the CPU runner.

use std::sync::Arc;

use crate::backend::cpu::CpuModelRunner;
use crate::model::tiny::{tiny_config, tiny_weights};
use crate::testing::model_configs::variant_config;

use super::super::nvrtc::{
    ATTENTION_HEAD_DIMS, ActDtype, KERNEL_SOURCES, PREFILL_ATTENTION_FUNCTIONS,
    PREFILL_ATTENTION_HEAD_DIMS, PREFILL_ATTENTION_WARPS, SKINNY_GEMM_FUNCTIONS,
    SKINNY_GEMM_TOKEN_TILES, SKINNY_GEMM_WARPS, attention_warps, prefill_attention_key_tile,
    prefill_attention_smem_bytes,
};
use super::super::tests::{REL_TOL, device_or_skip, lockstep, small_model_row_tol};
use super::step::{
    ATTENTION_MIN_SPLIT, ATTN_MAX_GROUP, PREFILL_ATTENTION_MIN_TOKENS, PREFILL_ATTENTION_ROWS,
    PREFILL_TILE_INTS, assign_attention, attention_splits,
};
use super::{CudaModelRunner, CudaOptions, weights_rounded_to};

fn kernel_source(file: &str) -> &'static str {
    KERNEL_SOURCES
        .iter()
        .find(|s| s.file == file)
        .expect("kernel file")
        .source
}

/// The integer of `#define NAME value` in `src`.
fn define(src: &str, name: &str) -> usize {
    src.lines()
        .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no #define {name}"))
}

/// The arguments of every top-level `MACRO(a, b, ...)` line in `src`.
fn instantiations(src: &str, mac: &str) -> Vec<Vec<usize>> {
    src.lines()
        .filter_map(|l| l.strip_prefix(&format!("{mac}(")))
        .map(|rest| {
            rest.trim_end_matches(')')
                .split(',')
                .map(|a| a.trim().parse().expect("integer argument"))
                .collect()
        })
        .collect()
}

#[test]
fn host_constants_match_the_kernels() {
    // A mismatch here would launch kernels with the wrong grid or shared memory on a GPU.
    let attention = kernel_source("attention.cu");
    assert_eq!(define(attention, "ATTN_MAX_GROUP"), ATTN_MAX_GROUP);
    assert_eq!(define(attention, "ATTN_MIN_SPLIT"), ATTENTION_MIN_SPLIT);
    let heads = instantiations(attention, "STEPSCOPE_DEFINE_ATTENTION");
    assert_eq!(
        heads.iter().map(|a| a[0]).collect::<Vec<_>>(),
        ATTENTION_HEAD_DIMS
    );
    for a in &heads {
        assert_eq!(attention_warps(a[0]), a[1], "warps of head_dim {}", a[0]);
    }
    let gemm = kernel_source("gemm.cu");
    assert_eq!(define(gemm, "GEMM_NWARPS"), SKINNY_GEMM_WARPS);
    // SKINNY_GEMM_FUNCTIONS is [variant][token tile]: r1, r2, then the SwiGLU variant.
    let mut names: Vec<String> = instantiations(gemm, "STEPSCOPE_DEFINE_SKINNY_GEMM")
        .iter()
        .map(|a| format!("skinny_gemm_r{}_m{}", a[0], a[1]))
        .collect();
    names.extend(
        instantiations(gemm, "STEPSCOPE_DEFINE_SKINNY_GEMM_SILU")
            .iter()
            .map(|a| format!("skinny_gemm_silu_m{}", a[0])),
    );
    assert_eq!(names, SKINNY_GEMM_FUNCTIONS);
    for (i, name) in SKINNY_GEMM_FUNCTIONS.iter().enumerate() {
        let tile = SKINNY_GEMM_TOKEN_TILES[i % SKINNY_GEMM_TOKEN_TILES.len()];
        assert!(name.ends_with(&format!("_m{tile}")), "{name} at {i}");
    }
}

#[test]
fn prefill_attention_constants_match_the_kernel() {
    let prefill = kernel_source("prefill_attention.cu");
    assert_eq!(define(prefill, "PREFILL_NWARPS"), PREFILL_ATTENTION_WARPS);
    assert_eq!(define(prefill, "PREFILL_ROWS"), PREFILL_ATTENTION_ROWS);
    let inst = instantiations(prefill, "STEPSCOPE_DEFINE_PREFILL_ATTENTION");
    assert_eq!(
        inst.iter().map(|a| a[0]).collect::<Vec<_>>(),
        PREFILL_ATTENTION_HEAD_DIMS
    );
    for a in &inst {
        assert_eq!(
            prefill_attention_key_tile(a[0]),
            a[1],
            "key tile of head_dim {}",
            a[0]
        );
        // Within the 48 KiB of shared memory a launch gets without opting in.
        assert!(
            prefill_attention_smem_bytes(a[0]) <= 48 * 1024,
            "head_dim {}",
            a[0]
        );
    }
    let names: Vec<String> = PREFILL_ATTENTION_HEAD_DIMS
        .iter()
        .map(|d| format!("prefill_attention_d{d}"))
        .collect();
    assert_eq!(names, PREFILL_ATTENTION_FUNCTIONS);
    // Every head size of the paged kernel that is a multiple of 16.
    let sixteens: Vec<usize> = ATTENTION_HEAD_DIMS
        .iter()
        .copied()
        .filter(|d| d % 16 == 0)
        .collect();
    assert_eq!(sixteens, PREFILL_ATTENTION_HEAD_DIMS);
}

#[test]
fn entries_with_many_new_tokens_take_the_prefill_attention() {
    let (mut paged, mut tiles) = (Vec::new(), Vec::new());
    // A decode token, a 100-token chunk (GQA 2: 200 query rows, 4 tiles of 64), a short chunk,
    // then an entry of exactly the minimum (one query head per KV head: one tile).
    let min = PREFILL_ATTENTION_MIN_TOKENS;
    for (first, n, group) in [(0, 1, 2), (1, 100, 2), (101, 5, 2), (106, min, 1)] {
        assign_attention(first, n, group, min, &mut paged, &mut tiles);
    }
    assert_eq!(paged, [0, 101, 102, 103, 104, 105]);
    let tiles: Vec<&[i32]> = tiles.chunks(PREFILL_TILE_INTS).collect();
    assert_eq!(
        tiles,
        [
            [1, 100, 192],
            [1, 100, 128],
            [1, 100, 64],
            [1, 100, 0],
            [106, min as i32, 0]
        ]
    );
    // Turned off (the runner passes usize::MAX): every token on the paged kernel.
    let (mut paged, mut tiles) = (Vec::new(), Vec::new());
    assign_attention(3, 500, 4, usize::MAX, &mut paged, &mut tiles);
    assert_eq!(paged, (3..503).collect::<Vec<i32>>());
    assert!(tiles.is_empty());
}

#[test]
fn attention_is_split_only_where_blocks_are_few_and_contexts_long() {
    // 16 query heads over 8 KV heads on 132 SMs (an H100): 528 blocks wanted.
    let splits = |t, ctx| attention_splits(t, 16, 8, 132, ctx);
    assert_eq!(splits(1, 531), 9); // 8 blocks: as many 64-key ranges as the context has
    assert_eq!(splits(1, 100_000), 32); // capped
    assert_eq!(splits(32, 531), 3); // 256 blocks -> 3 ranges
    assert_eq!(splits(66, 531), 1); // 528 blocks: enough
    assert_eq!(splits(128, 531), 1);
    assert_eq!(splits(4, 64), 1); // one range holds the whole context
    assert_eq!(splits(4, 65), 2);
    assert_eq!(splits(0, 531), 1);
    // Query-head groups above 8 take more blocks per KV head.
    assert_eq!(attention_splits(1, 32, 2, 132, 4096), 32);
    assert_eq!(attention_splits(33, 32, 2, 132, 4096), 4);
}

/// `--gpu-memory-utilization`'s arithmetic (the device query itself needs a GPU): the share
/// of total memory holds weights, working buffers and KV blocks, capped by what is free.
#[test]
fn the_kv_pool_fills_the_memory_share_left_by_the_weights() {
    let gib = 1usize << 30;
    let layout = super::MemoryLayout {
        total: 80 * gib,
        free: 79 * gib,
        weight_bytes: 16 * gib,
        working_bytes: gib,
        block_bytes: 2 << 20,
    };
    // 0.9 × 80 GiB = 72 GiB; minus 17 GiB = 55 GiB of 2 MiB blocks.
    let blocks = |share| layout.kv_sizing(share).map(|s| s.blocks);
    assert_eq!(blocks(0.9), Some(55 * 512));
    // Capped by free memory: 79 − 17 = 62 GiB at a share of 1.
    assert_eq!(blocks(1.0), Some(62 * 512));
    // A share that does not even hold the weights fits no block.
    assert_eq!(blocks(0.2), None);
}

/// The KV budget counts the activation buffers of the largest step, as the runner grows them:
/// for a Llama-3-8B shape at 2048 tokens the gate/up buffer alone is 235 MB.
#[test]
fn the_kv_budget_counts_the_largest_steps_activation_buffers() {
    let cfg = crate::model::ModelConfig {
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        ..crate::testing::model_configs::variant_config()
    };
    let sizes = |max_tokens, max_seqs| super::StepSizes {
        block_size: 16,
        max_tokens,
        max_seqs,
        max_prompt_logits: 0,
        max_model_len: 8192,
    };
    // By hand, at 2048 tokens and 256 logits rows: f32 residual, QKV, attention partials (not
    // split at this size), gate/up and logits; 16-bit normed input, attention output, SwiGLU
    // output and final norm.
    let f32s = 2048 * 4096 + 2048 * 6144 + 2048 * 32 * 130 + 2048 * 28672 + 256 * 128_256;
    let halves = 2048 * 4096 + 2048 * 4096 + 2048 * 14336 + 256 * 4096;
    let buffers = 4 * f32s + 2 * halves;
    let bytes = super::activation_bytes(&cfg, &sizes(2048, 256), 132);
    let meta = 4 * (7 * 2048 + 5 * 256 + 256 * 512);
    assert_eq!(bytes, (buffers + meta) * 3 / 2);
    // Four times the tokens: about four times the bytes (the logits rows stay).
    let big = super::activation_bytes(&cfg, &sizes(8192, 256), 132);
    assert!(big > 3 * bytes && big < 4 * bytes, "{big} vs {bytes}");
    // `prompt_logprobs` rows come on top of the sampled ones: a vocabulary-wide f32 row and a
    // row index each (grown to 1.5×).
    let with_prompt_logits = super::StepSizes {
        max_prompt_logits: 256,
        ..sizes(2048, 256)
    };
    let more = super::activation_bytes(&cfg, &with_prompt_logits, 132);
    let rows = 4 * 256 * 128_256 + 2 * 256 * 4096 + 4 * 5 * 256;
    assert_eq!(more, (buffers + meta + rows) * 3 / 2);
    // A small step budget on a model with few KV heads splits attention many ways: the
    // partials of those small steps are counted where they exceed the largest step's.
    let narrow = crate::model::ModelConfig {
        num_kv_heads: 1,
        ..cfg.clone()
    };
    let small = sizes(8, 8);
    let unsplit = super::step::BufferLens::of(&narrow, 8, 8, 1);
    let split = super::step::BufferLens::of(&narrow, 1, 0, 32);
    assert!(split.attn_part > unsplit.attn_part);
    assert!(super::activation_bytes(&narrow, &small, 132) * 2 / 3 >= unsplit.max(split).bytes());
}

/// With a GPU: prompts long enough for the tensor-core prefill attention (chunks of 100 tokens,
/// and whole prompts, next to requests that already decode and shorter chunks on the paged
/// kernel) against the CPU runner on the same 16-bit weights, for head sizes 16 (GQA 2), 32 (MQA)
/// and 128 (GQA 4), bf16 and f16; and against the GPU with the prefill attention turned off.
#[test]
fn prefill_attention_matches_the_cpu_runner() {
    if !device_or_skip("prefill_attention_matches_the_cpu_runner") {
        return;
    }
    let mut d128 = tiny_config();
    d128.hidden_size = 1024;
    d128.intermediate_size = 512;
    d128.num_heads = 8;
    d128.num_kv_heads = 2;
    d128.head_dim = 128;
    let new_tokens = 8;
    let cases: [(&str, _, [usize; 4]); 3] = [
        (
            "builtin:tiny (head_dim 16)",
            tiny_config(),
            [300, 70, 1, 150],
        ),
        (
            "variant (MQA, head_dim 32)",
            variant_config(),
            [200, 64, 3, 130],
        ),
        ("head_dim 128, GQA 4", d128, [260, 90, 2, 128]),
    ];
    for (name, cfg, lens) in cases {
        let weights = Arc::new(tiny_weights(&cfg));
        let prompts = super::super::tests::random_prompts(7, cfg.vocab_size, &lens);
        let bs = 16;
        let kv = super::super::tests::kv_for(&prompts, new_tokens, bs, 3);
        for dtype in [ActDtype::Bf16, ActDtype::F16] {
            let opts = |prefill_attention| CudaOptions {
                dtype: Some(dtype),
                cuda_graphs: false,
                prefill_attention,
                ..CudaOptions::default()
            };
            let mut gpu =
                CudaModelRunner::with_options(cfg.clone(), weights.clone(), kv, &opts(true))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut paged =
                CudaModelRunner::with_options(cfg.clone(), weights.clone(), kv, &opts(false))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            let rounded = Arc::new(weights_rounded_to(&weights, dtype));
            let mut cpu = CpuModelRunner::new(cfg.clone(), rounded, kv).expect("cpu runner");
            let row_tol = small_model_row_tol(dtype);
            for chunk in [100, 512] {
                let s = lockstep(&mut gpu, &mut cpu, kv, &prompts, chunk, new_tokens, 3);
                eprintln!("{name} [{}] chunk {chunk}: {}", dtype.name(), s.summary());
                assert!(
                    s.max_rel_err <= row_tol
                        && s.mean_rel_err <= REL_TOL
                        && s.unexplained().is_empty(),
                    "{name} [{}] chunk {chunk}: {}",
                    dtype.name(),
                    s.summary()
                );
                let sp = lockstep(&mut gpu, &mut paged, kv, &prompts, chunk, new_tokens, 3);
                eprintln!("  against the paged kernel alone: {}", sp.summary());
                assert!(
                    sp.max_rel_err <= row_tol && sp.unexplained().is_empty(),
                    "{name} [{}] chunk {chunk}, prefill vs paged attention: {}",
                    dtype.name(),
                    sp.summary()
                );
            }
        }
    }
}
