//! Writes a model held in memory back out as a Hugging Face directory (`config.json`,
//! `model.safetensors` in f32 or bf16, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`). Used to exercise the directory loader end to end with the
//! built-in tiny model, and handy for producing small test checkpoints for other tools.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

use crate::model::config::RopeScaling;
use crate::model::error::ModelError;
use crate::model::weight_matrix::WeightMatrix;
use crate::model::{LoadedModel, ModelConfig};

/// Writes `model` into `dir` (created if needed); weights in bf16 when `bf16`, else f32.
pub fn export_hf_dir(model: &LoadedModel, dir: &Path, bf16: bool) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg = &model.info.config;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| ModelError::io(&path, e))
    };
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    write("config.json", &pretty(&config_json(cfg, bf16)))?;
    write(
        "generation_config.json",
        &pretty(
            &json!({"bos_token_id": model.info.bos_token_id, "eos_token_id": model.info.eos_token_ids}),
        ),
    )?;
    let tok = model
        .info
        .tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    write("tokenizer.json", tok.as_bytes())?;
    let mut tok_cfg = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    if let Some(t) = &model.info.chat_template {
        tok_cfg["chat_template"] = json!(t.source());
        tok_cfg["bos_token"] = json!(t.bos_token());
        tok_cfg["eos_token"] = json!(t.eos_token());
    }
    write("tokenizer_config.json", &pretty(&tok_cfg))?;
    write("model.safetensors", &safetensors_bytes(model, bf16)?)
}

fn config_json(cfg: &ModelConfig, bf16: bool) -> Value {
    let rope_scaling = match cfg.rope_scaling {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings}),
    };
    json!({
        "architectures": [cfg.architecture.hf_name()],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.o_bias,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "torch_dtype": if bf16 { "bfloat16" } else { "float32" },
    })
}

fn safetensors_bytes(model: &LoadedModel, bf16: bool) -> Result<Vec<u8>, ModelError> {
    let cfg = &model.info.config;
    let w = &model.weights;
    let (q, kv, inter) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    // (name, shape, data)
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let add_mat = |name: String, m: &WeightMatrix, row0: usize, rows: usize| {
        let m = m.to_f32();
        let data = m.data[row0 * m.cols..(row0 + rows) * m.cols].to_vec();
        (name, vec![rows, m.cols], data)
    };
    tensors.push(add_mat(
        "model.embed_tokens.weight".into(),
        &w.embed,
        0,
        w.embed.rows(),
    ));
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        tensors.push(add_mat(
            format!("{p}.self_attn.q_proj.weight"),
            &l.qkv,
            0,
            q,
        ));
        tensors.push(add_mat(
            format!("{p}.self_attn.k_proj.weight"),
            &l.qkv,
            q,
            kv,
        ));
        tensors.push(add_mat(
            format!("{p}.self_attn.v_proj.weight"),
            &l.qkv,
            q + kv,
            kv,
        ));
        tensors.push(add_mat(
            format!("{p}.self_attn.o_proj.weight"),
            &l.o,
            0,
            l.o.rows(),
        ));
        tensors.push(add_mat(
            format!("{p}.mlp.gate_proj.weight"),
            &l.gate_up,
            0,
            inter,
        ));
        tensors.push(add_mat(
            format!("{p}.mlp.up_proj.weight"),
            &l.gate_up,
            inter,
            inter,
        ));
        tensors.push(add_mat(
            format!("{p}.mlp.down_proj.weight"),
            &l.down,
            0,
            l.down.rows(),
        ));
        let vec = |name: String, v: &[f32]| (name, vec![v.len()], v.to_vec());
        tensors.push(vec(format!("{p}.input_layernorm.weight"), &l.input_norm));
        tensors.push(vec(
            format!("{p}.post_attention_layernorm.weight"),
            &l.post_norm,
        ));
        if let Some(b) = &l.qkv_bias {
            tensors.push(vec(format!("{p}.self_attn.q_proj.bias"), &b[..q]));
            tensors.push(vec(format!("{p}.self_attn.k_proj.bias"), &b[q..q + kv]));
            tensors.push(vec(format!("{p}.self_attn.v_proj.bias"), &b[q + kv..]));
        }
        if let Some(b) = &l.o_bias {
            tensors.push(vec(format!("{p}.self_attn.o_proj.bias"), b));
        }
    }
    tensors.push((
        "model.norm.weight".into(),
        vec![w.final_norm.len()],
        w.final_norm.clone(),
    ));
    if let Some(head) = &w.lm_head {
        tensors.push(add_mat("lm_head.weight".into(), head, 0, head.rows()));
    }
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, data)| {
            let bytes = if bf16 {
                data.iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect()
            } else {
                data.iter().flat_map(|v| v.to_le_bytes()).collect()
            };
            (name, shape, bytes)
        })
        .collect();
    let dtype = if bf16 { Dtype::BF16 } else { Dtype::F32 };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Tensor {
                    path: "model.safetensors".into(),
                    tensor: name.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| ModelError::Tensor {
        path: "model.safetensors".into(),
        tensor: String::new(),
        message: e.to_string(),
    })
}
