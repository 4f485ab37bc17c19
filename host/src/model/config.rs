//! The model configuration: `config.json` of a Hugging Face Llama-family checkpoint parsed and
//! validated into [`ModelConfig`]. Accepts both spellings that exist in the wild for RoPE
//! (`rope_theta` at the top level, or inside `rope_parameters`) and for the weight dtype
//! (`torch_dtype` or `dtype`); supports the `llama3` and `linear` RoPE scalings and refuses any
//! other scaling with a clear error rather than producing silently wrong output.

use std::path::Path;

use serde_json::Value;

use super::error::ModelError;

/// Which Hugging Face architecture the checkpoint declares (they differ only in biases here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM, TinyLlama).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (bias on the q/k/v projections).
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1 style frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// A validated Llama-family configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Longest sequence served: `max_position_embeddings`, capped by an active sliding window
    /// (within the window, sliding-window attention equals full attention).
    pub max_model_len: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Declared weight dtype (`torch_dtype` or `dtype`), informational: weights are converted
    /// from whatever dtype each tensor has.
    pub dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key (or value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes of f32 K and V cache one token occupies across all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::parse(path, e))?;
        Self::from_json(&value, path)
    }

    /// Validates an already parsed `config.json`; `path` is used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ModelError> {
        let unsupported = |message: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        let arch_name = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::parse(path, "missing `architectures`"))?;
        let architecture = match arch_name {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            other => {
                return Err(unsupported(format!(
                    "architecture `{other}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                )));
            }
        };
        let req = |key: &str| -> Result<usize, ModelError> {
            match v.get(key).and_then(Value::as_u64) {
                Some(0) => Err(ModelError::parse(path, format!("`{key}` must be positive"))),
                Some(n) => Ok(n as usize),
                None => Err(ModelError::parse(
                    path,
                    format!("missing or non-integer `{key}`"),
                )),
            }
        };
        let opt_usize = |key: &str| v.get(key).and_then(Value::as_u64).map(|n| n as usize);

        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = opt_usize("num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ModelError::parse(
                path,
                format!(
                    "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
                ),
            ));
        }
        let head_dim = match opt_usize("head_dim") {
            Some(d) if d > 0 => d,
            _ => {
                if hidden_size % num_heads != 0 {
                    return Err(ModelError::parse(
                        path,
                        format!(
                            "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                        ),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(unsupported(format!("odd head_dim {head_dim}")));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act `{act}` (only silu)")));
        }
        if v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported("mlp_bias = true".into()));
        }
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool) == Some(true);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };

        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0) as f32;
        let scaling_obj = v
            .get("rope_scaling")
            .filter(|s| s.is_object())
            .or(rope_params);
        let max_position_embeddings = opt_usize("max_position_embeddings").unwrap_or(2048);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s, max_position_embeddings).map_err(unsupported)?,
        };

        let sliding_window = match architecture {
            Architecture::Qwen2
                if v.get("use_sliding_window").and_then(Value::as_bool) != Some(true) =>
            {
                None
            }
            _ => opt_usize("sliding_window").filter(|&w| w > 0),
        };
        let max_model_len =
            sliding_window.map_or(max_position_embeddings, |w| w.min(max_position_embeddings));

        let rms_norm_eps = v
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6) as f32;
        let tie_word_embeddings = v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let dtype = v
            .get("torch_dtype")
            .or_else(|| v.get("dtype"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let bos_token_id = v
            .get("bos_token_id")
            .and_then(Value::as_u64)
            .map(|n| n as u32);
        let eos_token_ids = token_id_list(v.get("eos_token_id"));

        Ok(ModelConfig {
            architecture,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            max_model_len,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            dtype,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), computed in f32 as transformers does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base = self.rope_theta;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / self.head_dim as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => inv,
            RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Parses a `rope_scaling` / `rope_parameters` object.
fn parse_rope_scaling(s: &Value, max_pos: usize) -> Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f32, String> {
        s.get(key)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => {
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            if high <= low {
                return Err("llama3 rope scaling needs high_freq_factor > low_freq_factor".into());
            }
            Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: s
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map_or(max_pos, |n| n as usize),
            })
        }
        other => Err(format!(
            "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
        )),
    }
}

/// Reads a token id field that may be a single integer or a list of integers.
pub(crate) fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "torch_dtype": "bfloat16",
            "eos_token_id": [2, 3]
        })
    }

    #[test]
    fn parses_llama_defaults() {
        let c = ModelConfig::from_json(&base(), Path::new("config.json")).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
        // 2 (K, V) x 2 layers x 2 KV heads x 16 dims x 4 bytes.
        assert_eq!(c.kv_bytes_per_token(), 512);
        let kv = crate::model::KvCacheShape::from_budget(&c, 1 << 20, 16);
        assert_eq!(kv.num_blocks, 128);
        assert_eq!(kv.bytes(&c), 1 << 20);
    }

    #[test]
    fn rope_theta_both_spellings() {
        let mut v = base();
        v["rope_theta"] = json!(100000.0);
        let c = ModelConfig::from_json(&v, Path::new("c")).unwrap();
        assert_eq!(c.rope_theta, 100000.0);
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "default"});
        v["dtype"] = json!("float32");
        let c = ModelConfig::from_json(&v, Path::new("c")).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn unknown_arch_and_scaling_are_errors() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_json(&v, Path::new("x/config.json")).unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
        assert!(e.to_string().contains("x/config.json"), "{e}");
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(&v, Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn llama3_scaling_keeps_high_freqs() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let c = ModelConfig::from_json(&v, Path::new("c")).unwrap();
        let mut plain = c.clone();
        plain.rope_scaling = RopeScaling::None;
        let (a, b) = (c.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(a[0], b[0]);
        assert!((a[7] - b[7] / 8.0).abs() < 1e-9);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_sliding_window_caps_len() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["sliding_window"] = json!(128);
        let c = ModelConfig::from_json(&v, Path::new("c")).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.max_model_len, 512);
        v["architectures"] = json!(["MistralForCausalLM"]);
        let c = ModelConfig::from_json(&v, Path::new("c")).unwrap();
        assert_eq!(c.max_model_len, 128);
    }
}
