//! Model weights: the f32 tensors of a Llama-family model ([`LlamaWeights`]) and their loading
//! from the `*.safetensors` files of a Hugging Face directory. Files are memory-mapped
//! (`memmap2`), headers parsed with the `safetensors` crate, and each tensor is converted from
//! f32, f16 or bf16 to f32 and checked against the shape the config implies. The q/k/v and the
//! gate/up projections are fused at load time so the forward does one GEMM for each pair.

use std::collections::HashMap;
use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata};

use super::config::ModelConfig;
use super::error::ModelError;
use super::quant::BlockFormat;
use super::weight_matrix::{BlockMatrix, WeightMatrix};

/// A row-major f32 matrix; projection weights keep the Hugging Face `[out, in]` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(rows * cols, data.len(), "matrix data length");
        Matrix { rows, cols, data }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Stacks matrices with the same number of columns on top of each other.
    pub fn vstack(parts: &[Matrix]) -> Matrix {
        let cols = parts.first().map_or(0, |m| m.cols);
        let rows = parts.iter().map(|m| m.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for m in parts {
            assert_eq!(m.cols, cols, "vstack column mismatch");
            data.extend_from_slice(&m.data);
        }
        Matrix { rows, cols, data }
    }
}

/// Weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    /// `[q_dim + 2 * kv_dim, hidden]`: q, k and v projections stacked.
    pub qkv: WeightMatrix,
    pub qkv_bias: Option<Vec<f32>>,
    /// `[hidden, q_dim]`.
    pub o: WeightMatrix,
    pub o_bias: Option<Vec<f32>>,
    pub post_norm: Vec<f32>,
    /// `[2 * intermediate, hidden]`: gate rows then up rows.
    pub gate_up: WeightMatrix,
    /// `[hidden, intermediate]`.
    pub down: WeightMatrix,
}

/// How the matrices of a Hugging Face checkpoint are held in memory (`--dtype` on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatrixStorage {
    /// f32, whatever the file's dtype.
    #[default]
    F32,
    /// f16 or bf16 ([`BlockFormat::F16`], [`BlockFormat::Bf16`]), multiplied with f32 accumulation.
    Half(BlockFormat),
}

impl MatrixStorage {
    /// `m` in this storage.
    pub fn store(self, m: Matrix) -> WeightMatrix {
        match self {
            MatrixStorage::F32 => WeightMatrix::F32(m),
            MatrixStorage::Half(format) => match BlockMatrix::quantize(&m, format) {
                Ok(b) => WeightMatrix::Blocks(b),
                // Half formats have one element per block: every shape converts.
                Err(_) => WeightMatrix::F32(m),
            },
        }
    }
}

/// All weights of a Llama-family model: norms and biases in f32, matrices in f32 or a block
/// format.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// `[vocab, hidden]`.
    pub embed: WeightMatrix,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]`; `None` when the embeddings are tied.
    pub lm_head: Option<WeightMatrix>,
}

impl LlamaWeights {
    /// The output projection (the embedding matrix when tied).
    pub fn lm_head(&self) -> &WeightMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Number of parameters held (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let layer = |l: &LayerWeights| {
            l.input_norm.len()
                + l.qkv.len()
                + l.qkv_bias.as_ref().map_or(0, Vec::len)
                + l.o.len()
                + l.o_bias.as_ref().map_or(0, Vec::len)
                + l.post_norm.len()
                + l.gate_up.len()
                + l.down.len()
        };
        self.embed.len()
            + self.layers.iter().map(layer).sum::<usize>()
            + self.final_norm.len()
            + self.lm_head.as_ref().map_or(0, WeightMatrix::len)
    }

    /// Bytes the matrices, norms and biases occupy in memory.
    pub fn byte_len(&self) -> usize {
        let vec = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| 4 * v.len());
        let layer = |l: &LayerWeights| {
            4 * (l.input_norm.len() + l.post_norm.len())
                + l.qkv.byte_len()
                + vec(&l.qkv_bias)
                + l.o.byte_len()
                + vec(&l.o_bias)
                + l.gate_up.byte_len()
                + l.down.byte_len()
        };
        self.embed.byte_len()
            + self.layers.iter().map(layer).sum::<usize>()
            + 4 * self.final_norm.len()
            + self.lm_head.as_ref().map_or(0, WeightMatrix::byte_len)
    }

    /// The same weights with every f32 matrix moved into `storage`.
    pub fn into_storage(self, storage: MatrixStorage) -> LlamaWeights {
        let f = |m: WeightMatrix| match m {
            WeightMatrix::F32(m) => storage.store(m),
            blocks => blocks,
        };
        LlamaWeights {
            embed: f(self.embed),
            layers: self
                .layers
                .into_iter()
                .map(|l| LayerWeights {
                    qkv: f(l.qkv),
                    o: f(l.o),
                    gate_up: f(l.gate_up),
                    down: f(l.down),
                    ..l
                })
                .collect(),
            lm_head: self.lm_head.map(f),
            ..self
        }
    }

    /// The storage format of the matrices (`F32`, `BF16`, `Q4_1`, ... of the first layer's
    /// q/k/v projection).
    pub fn matrix_format(&self) -> &'static str {
        self.layers
            .first()
            .map_or(self.embed.format_name(), |l| l.qkv.format_name())
    }

    /// Every storage format among the matrices, the one holding the most bytes first
    /// (`Q5_0+Q8_0+Q4_K` for a Q4_K_M file of a small model), for reports.
    pub fn matrix_formats(&self) -> String {
        let mut bytes: Vec<(&'static str, usize)> = Vec::new();
        let matrices = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain([&self.embed])
            .chain(self.lm_head.as_ref());
        for m in matrices {
            match bytes.iter_mut().find(|(name, _)| *name == m.format_name()) {
                Some((_, total)) => *total += m.byte_len(),
                None => bytes.push((m.format_name(), m.byte_len())),
            }
        }
        bytes.sort_by_key(|b| std::cmp::Reverse(b.1));
        bytes
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join("+")
    }

    /// A copy with every matrix in f32 (what a backend that only computes in f32 uploads).
    pub fn to_f32(&self) -> LlamaWeights {
        let f = |m: &WeightMatrix| WeightMatrix::F32(m.to_f32().into_owned());
        LlamaWeights {
            embed: f(&self.embed),
            layers: self
                .layers
                .iter()
                .map(|l| LayerWeights {
                    input_norm: l.input_norm.clone(),
                    qkv: f(&l.qkv),
                    qkv_bias: l.qkv_bias.clone(),
                    o: f(&l.o),
                    o_bias: l.o_bias.clone(),
                    post_norm: l.post_norm.clone(),
                    gate_up: f(&l.gate_up),
                    down: f(&l.down),
                })
                .collect(),
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(f),
        }
    }

    /// Loads and checks every tensor the config requires from the directory's safetensors
    /// files, keeping the matrices in `storage` (each tensor converted on its own, so the whole
    /// model never exists in f32 when a half-precision storage is asked for).
    pub fn load(dir: &Path, cfg: &ModelConfig, storage: MatrixStorage) -> Result<Self, ModelError> {
        let src = SafetensorsDir::open(dir)?;
        let (h, q, kv, inter, v) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let per_layer = 9 + if cfg.qkv_bias { 3 } else { 0 } + usize::from(cfg.o_bias);
        let total = 2 + cfg.num_layers * per_layer + usize::from(!cfg.tie_word_embeddings);
        let bar = progress_bar(total as u64);
        let get = |name: &str, shape: &[usize]| {
            bar.set_message(name.to_owned());
            let t = src.get(name, shape);
            bar.inc(1);
            t
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Matrix, ModelError> {
            Ok(Matrix::new(rows, cols, get(name, &[rows, cols])?))
        };
        let weight = |m: Matrix| storage.store(m);

        let embed = weight(mat("model.embed_tokens.weight", v, h)?);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let qkv = weight(Matrix::vstack(&[
                mat(&format!("{p}.self_attn.q_proj.weight"), q, h)?,
                mat(&format!("{p}.self_attn.k_proj.weight"), kv, h)?,
                mat(&format!("{p}.self_attn.v_proj.weight"), kv, h)?,
            ]));
            let qkv_bias = if cfg.qkv_bias {
                let mut b = get(&format!("{p}.self_attn.q_proj.bias"), &[q])?;
                b.extend(get(&format!("{p}.self_attn.k_proj.bias"), &[kv])?);
                b.extend(get(&format!("{p}.self_attn.v_proj.bias"), &[kv])?);
                Some(b)
            } else {
                None
            };
            let o_bias = if cfg.o_bias {
                Some(get(&format!("{p}.self_attn.o_proj.bias"), &[h])?)
            } else {
                None
            };
            layers.push(LayerWeights {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o: weight(mat(&format!("{p}.self_attn.o_proj.weight"), h, q)?),
                o_bias,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: weight(Matrix::vstack(&[
                    mat(&format!("{p}.mlp.gate_proj.weight"), inter, h)?,
                    mat(&format!("{p}.mlp.up_proj.weight"), inter, h)?,
                ])),
                down: weight(mat(&format!("{p}.mlp.down_proj.weight"), h, inter)?),
            });
        }
        let final_norm = get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(weight(mat("lm_head.weight", v, h)?))
        };
        bar.finish_and_clear();
        Ok(LlamaWeights {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("loading weights {bar:30} {pos}/{len} tensors {wide_msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// One memory-mapped safetensors file with its parsed header.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// All `*.safetensors` files of a directory, indexed by tensor name.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Memory-maps every `*.safetensors` file in `dir` and indexes their tensors.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::MissingFile {
                path: dir.join("*.safetensors"),
            });
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while it is being loaded
            // is outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::parse(&path, e))?;
            for name in metadata.offset_keys() {
                index.insert(name, files.len());
            }
            files.push(SafetensorsFile {
                path,
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    /// Reads tensor `name`, checks its shape and converts it to f32.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let missing = || ModelError::MissingTensor {
            dir: self.dir.clone(),
            tensor: name.to_owned(),
        };
        let file = &self.files[*self.index.get(name).ok_or_else(missing)?];
        let info = file.metadata.info(name).ok_or_else(missing)?;
        let err = |message: String| ModelError::Tensor {
            path: file.path.clone(),
            tensor: name.to_owned(),
            message,
        };
        if info.shape != shape {
            return Err(err(format!(
                "shape {:?} does not match the {:?} the config implies",
                info.shape, shape
            )));
        }
        let (start, end) = info.data_offsets;
        let bytes = file
            .mmap
            .get(file.data_start + start..file.data_start + end)
            .ok_or_else(|| err("data offsets out of bounds".into()))?;
        convert_to_f32(bytes, info.dtype).map_err(err)
    }
}

/// Converts little-endian tensor bytes of a float dtype to f32.
pub fn convert_to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>, String> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not supported (f32, f16, bf16, f64)"
            ));
        }
    };
    Ok(out)
}
