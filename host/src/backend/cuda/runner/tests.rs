//! Host-side checks of the runner: constants shared with the kernels, the attention split.

use super::super::nvrtc::{
    ATTENTION_HEAD_DIMS, KERNEL_SOURCES, PREFILL_ATTENTION_FUNCTIONS, PREFILL_ATTENTION_HEAD_DIMS,
    PREFILL_ATTENTION_WARPS, SKINNY_GEMM_FUNCTIONS, SKINNY_GEMM_TOKEN_TILES, SKINNY_GEMM_WARPS,
    attention_warps, prefill_attention_key_tile, prefill_attention_smem_bytes,
};
use super::step::{ATTENTION_MIN_SPLIT, ATTN_MAX_GROUP, attention_splits};

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
    assert_eq!(layout.kv_blocks(0.9), Some(55 * 512));
    // Capped by free memory: 79 − 17 = 62 GiB at a share of 1.
    assert_eq!(layout.kv_blocks(1.0), Some(62 * 512));
    // A share that does not even hold the weights fits no block.
    assert_eq!(layout.kv_blocks(0.2), None);
}
