//! Tests of the directory loader: the built-in tiny model written out as a Hugging Face
//! directory (f32 and bf16) loads back to the same model; broken directories give errors that
//! name the file and tensor; and, when present, SmolLM2-135M-Instruct answers a known question.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::tiny::{self, tiny_config, tiny_weights};
use super::{
    Architecture, ChatMessage, DetokenizerOptions, KvCacheShape, LoadedModel, ModelError,
    load_model_files,
};
use crate::backend::cpu::load_cpu_model;
use crate::testing::export::export_hf_dir;
use crate::testing::greedy::{GreedyOptions, greedy_generate};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("stepscope-model-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const KV: KvCacheShape = KvCacheShape {
    num_blocks: 64,
    block_size: 8,
};

fn spec(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn greedy(spec: &str, prompts: &[Vec<u32>]) -> crate::testing::greedy::GreedyOutput {
    let (mut r, _) = load_cpu_model(spec, KV).unwrap();
    let opts = GreedyOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    greedy_generate(&mut r, KV, prompts, &opts).unwrap()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn exported_tiny_model_loads_back_identically() {
    let dir = TempDir::new("roundtrip");
    export_hf_dir(&tiny::tiny_model(), &dir.0, false).unwrap();
    let loaded = load_model_files(spec(&dir.0)).unwrap();
    let builtin = tiny::tiny_model();
    assert_eq!(loaded.info.config, builtin.info.config);
    assert_eq!(loaded.weights.embed, builtin.weights.embed);
    assert_eq!(loaded.weights.layers[1].qkv, builtin.weights.layers[1].qkv);
    assert_eq!(
        loaded.weights.layers[0].gate_up,
        builtin.weights.layers[0].gate_up
    );
    assert_eq!(loaded.info.eos_token_ids, builtin.info.eos_token_ids);
    assert_eq!(loaded.info.bos_token_id, Some(tiny::BOS_ID));
    let msgs = [ChatMessage::new("user", "hello")];
    assert_eq!(
        loaded.info.encode_chat(&msgs).unwrap(),
        builtin.info.encode_chat(&msgs).unwrap()
    );
    let prompts = vec![vec![1, 2, 3], vec![72, 105]];
    assert_eq!(
        greedy(spec(&dir.0), &prompts),
        greedy("builtin:tiny", &prompts)
    );
}

#[test]
fn bf16_and_qwen2_checkpoints_load() {
    let mut cfg = tiny_config();
    cfg.architecture = Architecture::Qwen2;
    cfg.qkv_bias = true;
    cfg.tie_word_embeddings = true;
    let mut model: LoadedModel = tiny::tiny_model();
    model.weights = std::sync::Arc::new(tiny_weights(&cfg));
    model.info.config = cfg.clone();
    for bf16 in [false, true] {
        let dir = TempDir::new(if bf16 { "qwen-bf16" } else { "qwen-f32" });
        export_hf_dir(&model, &dir.0, bf16).unwrap();
        let loaded = load_model_files(spec(&dir.0)).unwrap();
        assert_eq!(loaded.info.config.architecture, Architecture::Qwen2);
        assert!(loaded.weights.lm_head.is_none());
        let bias = loaded.weights.layers[0].qkv_bias.as_ref().unwrap();
        let orig = model.weights.layers[0].qkv_bias.as_ref().unwrap();
        for (a, b) in bias.iter().zip(orig) {
            let tol = if bf16 { 1e-2 } else { 0.0 };
            assert!((a - b).abs() <= tol * b.abs().max(1e-3));
        }
    }
}

fn expect_err(spec: &str) -> String {
    match load_cpu_model(spec, KV) {
        Ok(_) => panic!("{spec} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_directories_give_clear_errors() {
    let msg = expect_err("/nonexistent/model/dir");
    assert!(msg.contains("/nonexistent/model/dir"), "{msg}");
    let msg = expect_err("builtin:huge");
    assert!(msg.contains("builtin:huge"), "{msg}");

    let dir = TempDir::new("broken");
    let msg = expect_err(spec(&dir.0));
    assert!(
        msg.contains("config.json") && msg.contains("missing"),
        "{msg}"
    );

    export_hf_dir(&tiny::tiny_model(), &dir.0, false).unwrap();
    edit_config(&dir.0, |v| {
        v["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    let msg = expect_err(spec(&dir.0));
    assert!(
        msg.contains("FalconForCausalLM") && msg.contains("config.json"),
        "{msg}"
    );

    edit_config(&dir.0, |v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["intermediate_size"] = serde_json::json!(100);
    });
    let msg = expect_err(spec(&dir.0));
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.layers.0.mlp.gate_proj.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("[128, 64]") && msg.contains("[100, 64]"),
        "{msg}"
    );

    edit_config(&dir.0, |v| {
        v["intermediate_size"] = serde_json::json!(128);
        v["attention_bias"] = serde_json::json!(true);
    });
    let msg = expect_err(spec(&dir.0));
    assert!(
        msg.contains("model.layers.0.self_attn.q_proj.bias"),
        "{msg}"
    );

    edit_config(&dir.0, |v| v["attention_bias"] = serde_json::json!(false));
    std::fs::remove_file(dir.0.join("tokenizer.json")).unwrap();
    let msg = expect_err(spec(&dir.0));
    assert!(msg.contains("tokenizer.json"), "{msg}");

    export_hf_dir(&tiny::tiny_model(), &dir.0, false).unwrap();
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    let msg = expect_err(spec(&dir.0));
    assert!(msg.contains("safetensors"), "{msg}");

    std::fs::write(dir.0.join("model.safetensors"), b"not a safetensors file").unwrap();
    let msg = expect_err(spec(&dir.0));
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(matches!(
        load_cpu_model(
            spec(&dir.0),
            KvCacheShape {
                num_blocks: 0,
                block_size: 16
            }
        ),
        Err(ModelError::Parse { .. })
    ));
    let ok = load_cpu_model(
        "builtin:tiny",
        KvCacheShape {
            num_blocks: 0,
            block_size: 16,
        },
    );
    assert!(matches!(ok, Err(ModelError::InvalidKvShape(_))));
}

/// SmolLM2-135M-Instruct, converted by the project into `.cache/models`, if present.
fn smollm2_dir() -> Option<PathBuf> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("STEPSCOPE_REQUIRE_DEFAULT_MODEL").is_none(),
        "{} is missing: run ./scripts/setup-default-model.sh",
        dir.display()
    );
    eprintln!("skipping: {} not present", dir.display());
    None
}

#[test]
fn smollm2_answers_capital_of_france() {
    let Some(dir) = smollm2_dir() else { return };
    let (mut runner, info) = load_cpu_model(spec(&dir), KV).unwrap();
    assert_eq!(info.config.num_layers, 30);
    assert_eq!(info.vocab_size, 49152);
    assert!(info.config.tie_word_embeddings);
    let msgs = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt = info.encode_chat(&msgs).unwrap();
    let text = info.render_chat(&msgs, true).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(text.ends_with(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ));
    let opts = GreedyOptions {
        max_new_tokens: 12,
        prefill_chunk: Some(16),
        ..Default::default()
    };
    let out = greedy_generate(&mut runner, KV, std::slice::from_ref(&prompt), &opts).unwrap();
    let mut det = info.detokenizer(
        &prompt,
        DetokenizerOptions {
            stop: vec!["Paris".into()],
            include_stop_str_in_output: true,
            ..Default::default()
        },
    );
    let mut streamed = String::new();
    let mut stopped = None;
    for &t in &out.tokens[0] {
        if info.is_eos(t) {
            break;
        }
        let step = det.push(t).unwrap();
        streamed.push_str(&step.delta);
        if step.stop.is_some() {
            stopped = step.stop;
            break;
        }
    }
    assert_eq!(streamed, "The capital of France is Paris");
    assert_eq!(stopped.as_deref(), Some("Paris"));
}

#[test]
fn smollm2_detokenizes_multibyte_text_incrementally() {
    let Some(dir) = smollm2_dir() else { return };
    let tok = super::TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let text = "Grüße, 世界! Emoji: 🎉🦀 done.";
    let ids = tok.encode(text, false).unwrap();
    let mut det =
        super::IncrementalDetokenizer::new(tok.clone(), &[1, 2], DetokenizerOptions::default());
    let mut out = String::new();
    for &id in &ids {
        let d = det.push(id).unwrap().delta;
        assert!(!d.contains('\u{FFFD}'), "broken character in {d:?}");
        out.push_str(&d);
    }
    out.push_str(&det.finish());
    assert_eq!(out, text);
}
