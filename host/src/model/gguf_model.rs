//! A Llama-family model (llama, qwen2) served straight from a GGUF file: the hyper-parameters,
//! the byte-level BPE tokenizer (vocabulary, merges, token types, pre-tokenizer), the special
//! tokens and chat template all come from the GGUF metadata, and the weights stay in their
//! block formats (Q8_0, Q5_0, Q4_0, Q4_1, F16, BF16) inside the file's memory map, or are
//! converted at load (Q4_K, Q6_K, and Q5_0 in a fused stack with other formats: see `kquant`).
//! This mirrors
//! `scripts/gguf_to_hf.py`, which the tests use as the reference: the config and
//! tokenizer built here are those the converter writes, and llama.cpp's interleaved Q/K rows
//! are put back in Hugging Face order (the only rows copied out of the map, besides the
//! converted ones).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::config::ModelConfig;
use super::error::ModelError;
use super::gguf::{GgufFile, GgufTensor, GgufValue, ggml_type_name};
use super::kquant::ConvertedFormat;
use super::quant::BlockFormat;
use super::weight_matrix::{BlockMatrix, WeightBytes, WeightMatrix};
use super::weights::{LayerWeights, LlamaWeights, Matrix};
use super::{LoadedModel, ModelInfo, SpecialTokens, TextTokenizer};

/// GGUF token types (llama.cpp): 3 control (special), 4 user defined.
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Whether `path` names a GGUF file (by extension).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Loads config, tokenizer, special tokens and weights from a GGUF file.
pub fn load_gguf(path: &Path) -> Result<LoadedModel, ModelError> {
    let file = GgufFile::open(path)?;
    let meta = Meta { file: &file };
    let arch = meta.str("general.architecture")?;
    let (hf_arch, permuted) = match arch {
        "llama" => ("LlamaForCausalLM", true),
        "qwen2" => ("Qwen2ForCausalLM", false),
        other => {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                message: format!("GGUF architecture `{other}` (supported: llama, qwen2)"),
            });
        }
    };
    let tokenizer_json = tokenizer_json(&meta)?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json.to_string().as_bytes())
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    let tokenizer = TextTokenizer::new(tokenizer);

    let config_json = config_json(&meta, arch, hf_arch)?;
    let config = ModelConfig::from_json(&config_json, path)?;
    let token = |key: &str| meta.opt_u64(key).map(|v| v as u32);
    let token_str = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let mut eos_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = token(key).filter(|id| !eos_ids.contains(id)) {
            eos_ids.push(id);
        }
    }
    let tok_cfg = json!({
        "bos_token": token_str(token("tokenizer.ggml.bos_token_id")),
        "eos_token": token_str(token("tokenizer.ggml.eos_token_id")),
        "chat_template": meta.opt("tokenizer.chat_template").and_then(GgufValue::as_str),
    });
    let gen_cfg = json!({
        "bos_token_id": token("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids,
    });
    let special = SpecialTokens::from_values(
        Some(&tok_cfg),
        None,
        Some(&gen_cfg),
        &tokenizer,
        &config.eos_token_ids,
        config.bos_token_id,
    );
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    let info = ModelInfo::new(name, path.display().to_string(), config, tokenizer, special)?;
    let weights = load_weights(&file, &info.config, permuted)?;
    Ok(LoadedModel {
        info,
        weights: Arc::new(weights),
    })
}

/// Typed access to the metadata with errors that name the file and key.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl Meta<'_> {
    fn err(&self, message: String) -> ModelError {
        ModelError::parse(&self.file.path, format!("GGUF metadata: {message}"))
    }

    fn opt(&self, key: &str) -> Option<&GgufValue> {
        self.file.get(key)
    }

    fn req(&self, key: &str) -> Result<&GgufValue, ModelError> {
        self.opt(key)
            .ok_or_else(|| self.err(format!("missing required key `{key}`")))
    }

    fn str(&self, key: &str) -> Result<&str, ModelError> {
        self.req(key)?
            .as_str()
            .ok_or_else(|| self.err(format!("`{key}` is not a string")))
    }

    fn u64(&self, key: &str) -> Result<u64, ModelError> {
        self.req(key)?
            .as_u64()
            .ok_or_else(|| self.err(format!("`{key}` is not an unsigned integer")))
    }

    fn opt_u64(&self, key: &str) -> Option<u64> {
        self.opt(key).and_then(GgufValue::as_u64)
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        let bad = || self.err(format!("`{key}` is not an array of strings"));
        self.req(key)?
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|v| v.as_str().ok_or_else(bad))
            .collect()
    }
}

/// A float metadata value as the shortest decimal that round-trips in f32 (what the original
/// `config.json` said: 1e-05, not 9.999999747378752e-06).
fn f32_value(v: f64) -> Value {
    let f = v as f32;
    let text = format!("{f}");
    serde_json::from_str::<Value>(&text).unwrap_or(json!(v))
}

/// The `config.json` that `scripts/gguf_to_hf.py` writes for this file.
fn config_json(meta: &Meta<'_>, arch: &str, hf_arch: &str) -> Result<Value, ModelError> {
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = meta.u64(&key("attention.head_count"))?;
    let hidden = meta.u64(&key("embedding_length"))?;
    let head_dim = meta
        .opt_u64(&key("attention.key_length"))
        .unwrap_or(hidden / n_head.max(1));
    let rope_dim = meta
        .opt_u64(&key("rope.dimension_count"))
        .unwrap_or(head_dim);
    if rope_dim != head_dim {
        return Err(meta.err(format!(
            "partial rotary ({rope_dim} of {head_dim} dimensions) is not supported"
        )));
    }
    if let Some(s) = meta
        .opt(&key("rope.scaling.type"))
        .and_then(GgufValue::as_str)
        && s != "none"
    {
        return Err(meta.err(format!("rope scaling `{s}` is not supported")));
    }
    let eps = meta
        .req(&key("attention.layer_norm_rms_epsilon"))?
        .as_f64()
        .ok_or_else(|| meta.err("the RMSNorm epsilon is not a number".into()))?;
    let theta = meta
        .opt(&key("rope.freq_base"))
        .and_then(GgufValue::as_f64)
        .unwrap_or(10_000.0);
    let tokens = meta.strings("tokenizer.ggml.tokens")?.len() as u64;
    let vocab = meta.opt_u64(&key("vocab_size")).unwrap_or(tokens);
    if vocab != tokens {
        return Err(meta.err(format!("{tokens} tokens but vocab_size {vocab}")));
    }
    let tied = meta.file.tensor("output.weight").is_none();
    let has_bias = meta.file.tensor("blk.0.attn_q.bias").is_some();
    Ok(json!({
        "architectures": [hf_arch],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta.u64(&key("feed_forward_length"))?,
        "num_hidden_layers": meta.u64(&key("block_count"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.opt_u64(&key("attention.head_count_kv")).unwrap_or(n_head),
        "head_dim": head_dim,
        "max_position_embeddings": meta.opt_u64(&key("context_length")).unwrap_or(2048),
        "rms_norm_eps": f32_value(eps),
        "rope_theta": f32_value(theta),
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "bos_token_id": meta.opt_u64("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.opt_u64("tokenizer.ggml.eos_token_id"),
        "attention_bias": has_bias,
    }))
}

/// The Hugging Face pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre`.
fn pre_tokenizer(meta: &Meta<'_>, pre: &str) -> Result<Value, ModelError> {
    let byte_level = |use_regex: bool, trim: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true, true)]})
        }
        "gpt-2" | "default" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "olmo" | "jais" => {
            byte_level(true, true)
        }
        "llama-bpe" | "llama3" | "smaug-bpe" | "falcon3" => json!({"type": "Sequence",
            "pretokenizers": [split(LLAMA3_REGEX), byte_level(false, true)]}),
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence",
            "pretokenizers": [split(QWEN2_REGEX), byte_level(false, false)]}),
        other => {
            return Err(meta.err(format!(
                "tokenizer.ggml.pre `{other}` has no known pre-tokenizer"
            )));
        }
    })
}

/// The `tokenizer.json` that `scripts/gguf_to_hf.py` builds from `tokenizer.ggml.*`.
fn tokenizer_json(meta: &Meta<'_>) -> Result<Value, ModelError> {
    let model = meta.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(meta.err(format!(
            "tokenizer model `{model}` (only byte-level BPE, `gpt2`, is supported)"
        )));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match meta.opt("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .ok_or_else(|| meta.err("tokenizer.ggml.token_type is not an array".into()))?
            .iter()
            .map(|t| t.as_u64().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = meta
        .opt("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert((*t).to_owned(), json!(i)).is_some() {
            return Err(meta.err(format!("duplicate token {t:?} (id {i})")));
        }
    }
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(meta.err(format!("malformed merge {m:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": *ty == TOKEN_CONTROL})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(meta, pre)?,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}

/// How a GGUF tensor's rows are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TensorFormat {
    F32,
    /// Used in this block format as stored.
    Blocks(BlockFormat),
    /// Converted at load into a block format the kernels run.
    Converted(ConvertedFormat),
}

impl TensorFormat {
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            TensorFormat::F32 => 4 * cols,
            TensorFormat::Blocks(f) => f.row_bytes(cols),
            TensorFormat::Converted(c) => c.row_bytes(cols),
        }
    }

    /// The block format the rows are used in on their own (`None` for F32).
    fn loaded(self) -> Option<BlockFormat> {
        match self {
            TensorFormat::F32 => None,
            TensorFormat::Blocks(f) => Some(f),
            TensorFormat::Converted(c) => Some(c.target()),
        }
    }
}

/// The storage format of a tensor's ggml type.
fn tensor_format(file: &GgufFile, t: &GgufTensor) -> Result<TensorFormat, ModelError> {
    Ok(TensorFormat::Blocks(match t.ggml_type {
        0 => return Ok(TensorFormat::F32),
        1 => BlockFormat::F16,
        30 => BlockFormat::Bf16,
        2 => BlockFormat::Q4_0,
        3 => BlockFormat::Q4_1,
        8 => BlockFormat::Q8_0,
        6 => BlockFormat::Q5_0,
        other => {
            return ConvertedFormat::from_ggml_type(other)
                .map(TensorFormat::Converted)
                .ok_or_else(|| ModelError::Tensor {
                    path: file.path.clone(),
                    tensor: t.name.clone(),
                    message: format!(
                        "{} is not supported (supported: F32, F16, BF16, Q8_0, Q5_0, Q4_0, \
                         Q4_1; Q4_K and Q6_K converted at load)",
                        ggml_type_name(other)
                    ),
                });
        }
    }))
}

/// Tensor lookup with shape checks.
struct Tensors<'a> {
    file: &'a GgufFile,
}

impl Tensors<'_> {
    fn err(&self, name: &str, message: String) -> ModelError {
        ModelError::Tensor {
            path: self.file.path.clone(),
            tensor: name.to_owned(),
            message,
        }
    }

    fn get(&self, name: &str, dims: &[usize]) -> Result<&GgufTensor, ModelError> {
        let t = self
            .file
            .tensor(name)
            .ok_or_else(|| self.err(name, "missing from the GGUF file".into()))?;
        if t.dims != dims {
            return Err(self.err(
                name,
                format!("dimensions {:?}, the config implies {dims:?}", t.dims),
            ));
        }
        Ok(t)
    }

    /// A 1-D tensor (norm or bias) in f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(name, &[len])?;
        let mut out = vec![0f32; len];
        let bytes = self.file.bytes(t);
        match tensor_format(self.file, t)? {
            TensorFormat::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            TensorFormat::Blocks(f) => f.dequantize_row(bytes, &mut out),
            TensorFormat::Converted(c) => c.dequantize_row(bytes, &mut out),
        }
        Ok(out)
    }

    /// Matrices fused row-wise (q/k/v, gate/up), each `(name, rows, heads)` and `cols` wide.
    /// The parts must end up in one format: where they would not (K-quant files mix Q5_0, Q8_0
    /// and converted Q4_K/Q6_K parts), every Q5_0 part and every K-quant part is converted to
    /// Q8_0 (instead of to their own layouts); other mixes (Q4_0 or Q4_1 beside Q8_0, say) are
    /// refused by [`stack`] with the formats named.
    fn fused(
        &self,
        what: &str,
        cols: usize,
        parts: &[(String, usize, Option<usize>)],
    ) -> Result<WeightMatrix, ModelError> {
        let mut formats = Vec::with_capacity(parts.len());
        for (name, rows, _) in parts {
            formats.push(tensor_format(self.file, self.get(name, &[cols, *rows])?)?);
        }
        let q8 = formats.iter().any(|f| f.loaded() != formats[0].loaded());
        let mats = parts
            .iter()
            .map(|(name, rows, heads)| self.matrix_as(name, *rows, cols, *heads, q8))
            .collect::<Result<Vec<_>, _>>()?;
        stack(self.file, what, mats)
    }

    /// A `[rows, cols]` matrix: blocks used in place, converted (K-quants), or f32 copied out.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, ModelError> {
        self.matrix_as(name, rows, cols, None, false)
    }

    /// [`Self::matrix`], with `heads` the rows un-interleaved from llama.cpp's rotary layout
    /// (and so copied), and with `q8` Q5_0 and K-quants converted to Q8_0 (instead of to their
    /// own layouts).
    fn matrix_as(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        heads: Option<usize>,
        q8: bool,
    ) -> Result<WeightMatrix, ModelError> {
        let t = self.get(name, &[cols, rows])?;
        let bytes = self.file.bytes(t);
        let format = match tensor_format(self.file, t)? {
            TensorFormat::Blocks(BlockFormat::Q5_0) if q8 => {
                TensorFormat::Converted(ConvertedFormat::Q5_0)
            }
            other => other,
        };
        let row_bytes = format.row_bytes(cols);
        let order = match heads {
            Some(h) => unpermuted_rows(rows, h).map_err(|m| self.err(name, m))?,
            None => Vec::new(),
        };
        let reordered = |bytes: &[u8]| -> Vec<u8> {
            order
                .iter()
                .flat_map(|&r| bytes[r * row_bytes..(r + 1) * row_bytes].iter().copied())
                .collect()
        };
        match format {
            TensorFormat::F32 => {
                let owned = if heads.is_some() {
                    reordered(bytes)
                } else {
                    bytes.to_vec()
                };
                let data = owned
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(WeightMatrix::F32(Matrix::new(rows, cols, data)))
            }
            TensorFormat::Converted(c) => {
                let target = if q8 { BlockFormat::Q8_0 } else { c.target() };
                let rows_in: Cow<'_, [u8]> = if heads.is_some() {
                    Cow::Owned(reordered(bytes))
                } else {
                    Cow::Borrowed(bytes)
                };
                let converted = c.convert_rows(target, rows, cols, &rows_in).map_err(|m| {
                    self.err(name, format!("{} to {}: {m}", c.name(), target.name()))
                })?;
                BlockMatrix::new(target, rows, cols, WeightBytes::Owned(converted.into()))
                    .map(WeightMatrix::Blocks)
                    .map_err(|m| self.err(name, m))
            }
            TensorFormat::Blocks(f) => {
                let storage = if heads.is_some() {
                    WeightBytes::Owned(reordered(bytes).into())
                } else {
                    WeightBytes::Mapped {
                        map: self.file.map.clone(),
                        range: t.range.clone(),
                    }
                };
                BlockMatrix::new(f, rows, cols, storage)
                    .map(WeightMatrix::Blocks)
                    .map_err(|m| self.err(name, m))
            }
        }
    }
}

/// For each Hugging Face row, the GGUF row it is stored at: llama.cpp's converter stores each
/// head's rows as (pair, half) where Hugging Face has (half, pair).
fn unpermuted_rows(rows: usize, heads: usize) -> Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!(
            "cannot un-interleave {rows} rows over {heads} heads"
        ));
    }
    let d = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                order.push(h * d + 2 * i + j);
            }
        }
    }
    Ok(order)
}

/// Stacks matrices row-wise: block parts are shared; f32 rows are copied.
fn stack(
    file: &GgufFile,
    what: &str,
    parts: Vec<WeightMatrix>,
) -> Result<WeightMatrix, ModelError> {
    let err = |message: String| ModelError::Tensor {
        path: file.path.clone(),
        tensor: what.to_owned(),
        message,
    };
    if parts.iter().all(|p| matches!(p, WeightMatrix::F32(_))) {
        let mats: Vec<Matrix> = parts.iter().map(|p| p.to_f32().into_owned()).collect();
        return Ok(WeightMatrix::F32(Matrix::vstack(&mats)));
    }
    let blocks = parts
        .into_iter()
        .map(|p| match p {
            WeightMatrix::Blocks(b) => Ok(b),
            WeightMatrix::F32(_) => Err(err("mixes F32 and block-format tensors".into())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    BlockMatrix::vstack(blocks)
        .map(WeightMatrix::Blocks)
        .map_err(|m| {
            err(format!(
                "tensors in different formats cannot be fused ({m})"
            ))
        })
}

fn load_weights(
    file: &GgufFile,
    cfg: &ModelConfig,
    permuted: bool,
) -> Result<LlamaWeights, ModelError> {
    let t = Tensors { file };
    let (h, q, kv, inter, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let heads = |n: usize| permuted.then_some(n);
    let embed = t.matrix("token_embd.weight", v, h)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("blk.{i}");
        let qkv = t.fused(
            &format!("{p}.attn_q/k/v.weight"),
            h,
            &[
                (format!("{p}.attn_q.weight"), q, heads(cfg.num_heads)),
                (format!("{p}.attn_k.weight"), kv, heads(cfg.num_kv_heads)),
                (format!("{p}.attn_v.weight"), kv, None),
            ],
        )?;
        let qkv_bias = if cfg.qkv_bias {
            let bias = |name: &str, len: usize, n: Option<usize>| -> Result<Vec<f32>, ModelError> {
                let b = t.vector(&format!("{p}.{name}"), len)?;
                Ok(match n {
                    Some(n) => unpermuted_rows(len, n)
                        .map_err(|m| t.err(name, m))?
                        .into_iter()
                        .map(|r| b[r])
                        .collect(),
                    None => b,
                })
            };
            let mut b = bias("attn_q.bias", q, heads(cfg.num_heads))?;
            b.extend(bias("attn_k.bias", kv, heads(cfg.num_kv_heads))?);
            b.extend(bias("attn_v.bias", kv, None)?);
            Some(b)
        } else {
            None
        };
        let o_bias = if cfg.o_bias {
            Some(t.vector(&format!("{p}.attn_output.bias"), h)?)
        } else {
            None
        };
        layers.push(LayerWeights {
            input_norm: t.vector(&format!("{p}.attn_norm.weight"), h)?,
            qkv,
            qkv_bias,
            o: t.matrix(&format!("{p}.attn_output.weight"), h, q)?,
            o_bias,
            post_norm: t.vector(&format!("{p}.ffn_norm.weight"), h)?,
            gate_up: t.fused(
                &format!("{p}.ffn_gate/up.weight"),
                h,
                &[
                    (format!("{p}.ffn_gate.weight"), inter, None),
                    (format!("{p}.ffn_up.weight"), inter, None),
                ],
            )?,
            down: t.matrix(&format!("{p}.ffn_down.weight"), h, inter)?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(t.matrix("output.weight", v, h)?)
    };
    Ok(LlamaWeights {
        embed,
        layers,
        final_norm: t.vector("output_norm.weight", h)?,
        lm_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_inverts_llama_cpps_permutation() {
        // convert_hf_to_gguf.py: reshape(heads, 2, d/2).swapaxes(1, 2).
        let (heads, d) = (3, 8);
        let hf: Vec<usize> = (0..heads * d).collect();
        let mut gguf = Vec::new();
        for h in 0..heads {
            for i in 0..d / 2 {
                for j in 0..2 {
                    gguf.push(hf[h * d + j * (d / 2) + i]);
                }
            }
        }
        let order = unpermuted_rows(heads * d, heads).unwrap();
        let back: Vec<usize> = order.iter().map(|&r| gguf[r]).collect();
        assert_eq!(back, hf);
        assert!(unpermuted_rows(10, 3).is_err());
    }
}
