//! `builtin:tiny`: a tiny Llama (hidden 64, 2 layers, 4 query / 2 KV heads, 256 byte tokens plus
//! 4 specials, 2048 positions) with deterministic random weights from a fixed seed, a byte-level
//! tokenizer built in code and a ChatML-style chat template. Tests and offline demos use it with
//! no files on disk; its output is gibberish, but always the same gibberish.

use crate::splitmix::SplitMix64;
use std::sync::Arc;

use serde_json::{Value, json};

use super::chat_template::ChatTemplate;
use super::config::{Architecture, ModelConfig, RopeScaling};
use super::tokenizer::TextTokenizer;
use super::weights::{LayerWeights, LlamaWeights, Matrix};
use super::{BUILTIN_TINY, LoadedModel, ModelInfo};

pub const BOS_ID: u32 = 256;
pub const EOS_ID: u32 = 257;
pub const IM_START_ID: u32 = 258;
pub const IM_END_ID: u32 = 259;
const SPECIALS: [&str; 4] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
];
const SEED: u64 = 0x5EED_57E9_5C09_E001;

/// The tiny model's chat template (ChatML with a BOS token).
pub const TINY_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tiny model's configuration.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 256 + SPECIALS.len(),
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 2048,
        max_model_len: 2048,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        dtype: Some("float32".into()),
        bos_token_id: Some(BOS_ID),
        eos_token_ids: vec![EOS_ID, IM_END_ID],
    }
}

/// The whole tiny model: config, weights, tokenizer and template.
pub fn tiny_model() -> LoadedModel {
    let config = tiny_config();
    let weights = tiny_weights(&config);
    let chat_template = ChatTemplate::new(
        TINY_CHAT_TEMPLATE,
        Some(SPECIALS[0].into()),
        Some(SPECIALS[1].into()),
    )
    .ok();
    let info = ModelInfo {
        name: BUILTIN_TINY.into(),
        source: BUILTIN_TINY.into(),
        tokenizer: tiny_tokenizer(),
        bos_token_id: Some(BOS_ID),
        eos_token_ids: config.eos_token_ids.clone(),
        chat_template,
        vocab_size: config.vocab_size,
        config,
    };
    LoadedModel {
        info,
        weights: Arc::new(weights),
    }
}

/// Deterministic random weights for `cfg` (any Llama geometry; used by tests too).
pub fn tiny_weights(cfg: &ModelConfig) -> LlamaWeights {
    let mut rng = SplitMix64::new(SEED);
    let (h, q, kv, inter, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut mat = |rows: usize, cols: usize, scale: f32| {
        let data = (0..rows * cols).map(|_| rng.uniform() * scale).collect();
        Matrix::new(rows, cols, data)
    };
    let embed = mat(v, h, 1.0).into();
    let proj = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let qkv = mat(q + 2 * kv, h, proj(h));
        let o = mat(h, q, proj(q));
        let gate_up = mat(2 * inter, h, proj(h));
        let down = mat(h, inter, proj(inter));
        let norm_a = mat(1, h, 0.1).data.iter().map(|x| 1.0 + x).collect();
        let norm_b = mat(1, h, 0.1).data.iter().map(|x| 1.0 + x).collect();
        let qkv_bias = cfg.qkv_bias.then(|| mat(1, q + 2 * kv, 0.1).data);
        let o_bias = cfg.o_bias.then(|| mat(1, h, 0.1).data);
        layers.push(LayerWeights {
            input_norm: norm_a,
            qkv: qkv.into(),
            qkv_bias,
            o: o.into(),
            o_bias,
            post_norm: norm_b,
            gate_up: gate_up.into(),
            down: down.into(),
        });
    }
    let final_norm = vec![1.0; h];
    let lm_head = (!cfg.tie_word_embeddings).then(|| mat(v, h, proj(h) * 4.0).into());
    LlamaWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    }
}

/// The tiny model's byte-level tokenizer: token `b` is byte `b` (GPT-2 byte-to-char alphabet,
/// no merges), followed by the special tokens.
pub fn tiny_tokenizer() -> TextTokenizer {
    let json = tiny_tokenizer_json();
    // The JSON is built right here and is known to be valid; a failure is a programming error.
    let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
        .expect("built-in tiny tokenizer JSON is valid");
    TextTokenizer::new(inner)
}

/// The `tokenizer.json` of the tiny model.
pub fn tiny_tokenizer_json() -> Value {
    let chars = bytes_to_unicode();
    let vocab: serde_json::Map<String, Value> = chars
        .iter()
        .enumerate()
        .map(|(b, c)| (c.to_string(), json!(b)))
        .collect();
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": false, "use_regex": false});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// GPT-2's reversible byte → printable char mapping, indexed by byte.
pub(crate) fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_bytes_and_specials() {
        let t = tiny_tokenizer();
        assert_eq!(t.vocab_size(), 260);
        let ids = t.encode("Hi é", false).unwrap();
        assert_eq!(ids, vec![72, 105, 32, 0xC3, 0xA9]);
        assert_eq!(t.decode(&ids, true).unwrap(), "Hi é");
        let ids = t.encode("<|im_start|>user\nx<|im_end|>", false).unwrap();
        assert_eq!(ids[0], IM_START_ID);
        assert_eq!(*ids.last().unwrap(), IM_END_ID);
        assert_eq!(t.decode(&ids, true).unwrap(), "user\nx");
    }

    #[test]
    fn chat_template_renders() {
        let m = tiny_model();
        let ids = m
            .info
            .encode_chat(&[super::super::ChatMessage::new("user", "hi")])
            .unwrap();
        assert_eq!(ids[0], BOS_ID);
        assert_eq!(ids[1], IM_START_ID);
        let text = m.info.tokenizer.decode(&ids, false).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn weights_are_deterministic() {
        let a = tiny_weights(&tiny_config());
        let b = tiny_weights(&tiny_config());
        assert_eq!(a.embed.to_f32(), b.embed.to_f32());
        assert_eq!(a.layers[1].down.to_f32(), b.layers[1].down.to_f32());
    }
}
