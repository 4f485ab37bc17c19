//! Tests against reference fixtures generated with Hugging Face transformers (f32, unbatched):
//! each `tests/fixtures/models/<name>/` is a model directory plus `reference.json` with prompts,
//! the logits at each prompt's last position, and 16 greedy tokens per prompt. Logits must
//! match within 1e-4 and greedy ids exactly, batched, chunk-prefilled and with shuffled blocks.
//! A missing fixture directory skips its test with a message (set
//! `STEPSCOPE_REQUIRE_FIXTURES=1` to make that a failure).

use std::path::PathBuf;

use serde::Deserialize;

use super::KvCacheShape;
use crate::backend::cpu::load_cpu_model;
use crate::testing::greedy::{GreedyOptions, greedy_generate};

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Vec<u32>>,
    last_logits: Vec<Vec<f32>>,
    greedy: Vec<Vec<u32>>,
}

fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logits width");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_fixture(name: &str) {
    let dir = fixtures_root().join(name);
    if !dir.join("reference.json").is_file() {
        assert!(
            std::env::var_os("STEPSCOPE_REQUIRE_FIXTURES").is_none(),
            "fixture {} is missing",
            dir.display()
        );
        eprintln!("skipping: fixture {} not present", dir.display());
        return;
    }
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("read reference.json");
    let reference: Reference = serde_json::from_str(&text).expect("parse reference.json");
    let max_new = reference.greedy.iter().map(Vec::len).max().unwrap_or(0);
    let block_size = 4;
    let need: usize = reference
        .prompts
        .iter()
        .map(|p| (p.len() + max_new).div_ceil(block_size))
        .sum();
    let kv = KvCacheShape {
        num_blocks: need + 7,
        block_size,
    };
    let (mut runner, info) = load_cpu_model(dir.to_str().expect("utf-8 path"), kv).expect("load");
    assert_eq!(info.vocab_size, reference.last_logits[0].len());

    let variants = [
        (
            "unbatched",
            GreedyOptions {
                max_new_tokens: max_new,
                batched: false,
                ..Default::default()
            },
        ),
        (
            "batched",
            GreedyOptions {
                max_new_tokens: max_new,
                ..Default::default()
            },
        ),
        (
            "chunked+shuffled",
            GreedyOptions {
                max_new_tokens: max_new,
                prefill_chunk: Some(3),
                shuffle_blocks: Some(99),
                ..Default::default()
            },
        ),
    ];
    for (label, opts) in variants {
        let out = greedy_generate(&mut runner, kv, &reference.prompts, &opts).expect("generate");
        for (i, (got, want)) in out
            .prompt_logits
            .iter()
            .zip(&reference.last_logits)
            .enumerate()
        {
            let err = max_abs_diff(got, want);
            eprintln!("{name} {label} prompt {i}: max abs logits error {err:.2e}");
            assert!(
                err <= 1e-4,
                "{name} {label} prompt {i}: max abs logits error {err}"
            );
        }
        assert_eq!(
            out.tokens, reference.greedy,
            "{name} {label}: greedy tokens"
        );
    }
}

#[test]
fn tiny_llama_gqa_matches_transformers() {
    check_fixture("tiny-llama-gqa");
}

#[test]
fn tiny_llama_tied_matches_transformers() {
    check_fixture("tiny-llama-tied");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_fixture("tiny-qwen2");
}
