//! Model geometries the backend tests share (compiled for tests only).

use crate::model::tiny::tiny_config;
use crate::model::{ModelConfig, RopeScaling};

/// A geometry unlike the tiny model's: biases everywhere, tied embeddings, one KV head,
/// `head_dim * num_heads != hidden_size`, llama3 RoPE scaling.
pub fn variant_config() -> ModelConfig {
    let mut c = tiny_config();
    c.hidden_size = 48;
    c.intermediate_size = 80;
    c.num_layers = 3;
    c.num_heads = 3;
    c.num_kv_heads = 1;
    c.head_dim = 32;
    c.qkv_bias = true;
    c.o_bias = true;
    c.tie_word_embeddings = true;
    c.max_model_len = 256;
    c.rope_theta = 500_000.0;
    c.rope_scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32,
    };
    c
}

/// A small model with the head_dim of most real models (128; the tiny ones have 16 or 32):
/// hidden 512, 4 query heads over 2 KV heads, 3 layers, the tiny vocabulary. Cheap enough on
/// the CPU reference for a prompt of several hundred tokens.
pub fn head_dim_128_config() -> ModelConfig {
    let mut c = tiny_config();
    c.hidden_size = 512;
    c.intermediate_size = 1024;
    c.num_layers = 3;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.rope_theta = 500_000.0;
    c
}
