//! The model's weights on the device: [`DeviceWeights`] owns the 16-bit projection matrices,
//! the embedding and LM head, and the f32 norms and biases of every layer, uploaded once at
//! start-up ([`DeviceWeights::upload`]). Also the host-side conversions to the 16-bit type
//! ([`to_half_bits`], [`round_to_dtype`], [`weights_rounded_to`]), the check of what the kernels
//! support before anything is allocated ([`check_model`]), and the list of projections the GEMM
//! tuner times ([`CudaModelRunner::gemm_shapes`]).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use rayon::prelude::*;

use crate::model::weight_matrix::WeightMatrix;
use crate::model::{KvCacheShape, LlamaWeights, ModelConfig};

use super::super::CudaError;
use super::super::gemm::GemmShape;
use super::super::nvrtc::{self, ActDtype};
use super::CudaModelRunner;
use super::step::dptr;

/// One decoder layer on the device: 16-bit matrices, f32 norms and biases.
pub(super) struct DeviceLayer {
    pub(super) input_norm: CudaSlice<f32>,
    pub(super) qkv: CudaSlice<u16>,
    pub(super) qkv_bias: Option<CudaSlice<f32>>,
    pub(super) o: CudaSlice<u16>,
    pub(super) o_bias: Option<CudaSlice<f32>>,
    pub(super) post_norm: CudaSlice<f32>,
    pub(super) gate_up: CudaSlice<u16>,
    pub(super) down: CudaSlice<u16>,
}

/// The whole model on the device.
pub(super) struct DeviceWeights {
    pub(super) embed: CudaSlice<u16>,
    pub(super) layers: Vec<DeviceLayer>,
    pub(super) final_norm: CudaSlice<f32>,
    /// `None` when tied to `embed`.
    pub(super) lm_head: Option<CudaSlice<u16>>,
    /// Bytes of the 16-bit matrices a decode step reads (all projections and the LM head).
    pub(super) matrix_bytes: usize,
}

/// Converts f32 values to the 16-bit type (round to nearest, ties to even), in parallel.
pub fn to_half_bits(data: &[f32], dtype: ActDtype) -> Vec<u16> {
    let mut out = vec![0u16; data.len()];
    out.par_chunks_mut(1 << 16)
        .zip(data.par_chunks(1 << 16))
        .for_each(|(o, d)| match dtype {
            ActDtype::Bf16 => o
                .iter_mut()
                .zip(d)
                .for_each(|(o, &x)| *o = half::bf16::from_f32(x).to_bits()),
            ActDtype::F16 => o
                .iter_mut()
                .zip(d)
                .for_each(|(o, &x)| *o = half::f16::from_f32(x).to_bits()),
        });
    out
}

/// Rounds f32 values to the 16-bit type and back (what the device computes with).
pub fn round_to_dtype(data: &mut [f32], dtype: ActDtype) {
    data.par_chunks_mut(1 << 16).for_each(|c| match dtype {
        ActDtype::Bf16 => c
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        ActDtype::F16 => c
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
    });
}

/// A copy of `w` with every matrix rounded to `dtype` (norms and biases kept in f32): the
/// weights a CPU reference must use to see only the GPU's arithmetic differences.
pub fn weights_rounded_to(w: &LlamaWeights, dtype: ActDtype) -> LlamaWeights {
    let mut w = w.to_f32();
    let round = |m: &mut WeightMatrix| {
        if let WeightMatrix::F32(m) = m {
            round_to_dtype(&mut m.data, dtype);
        }
    };
    round(&mut w.embed);
    if let Some(m) = w.lm_head.as_mut() {
        round(m);
    }
    for l in &mut w.layers {
        round(&mut l.qkv);
        round(&mut l.o);
        round(&mut l.gate_up);
        round(&mut l.down);
    }
    w
}

impl DeviceWeights {
    /// Converts every matrix to `dtype` and copies the model to the device.
    pub(super) fn upload(
        stream: &Arc<CudaStream>,
        w: &LlamaWeights,
        dtype: ActDtype,
    ) -> Result<DeviceWeights, CudaError> {
        // Bytes a forward reads: every projection, and the LM head (the embedding gather reads a
        // few rows only, so a tied embedding counts once, as the LM head).
        let matrix_bytes = 2
            * (w.lm_head().len()
                + w.layers
                    .iter()
                    .map(|l| l.qkv.len() + l.o.len() + l.gate_up.len() + l.down.len())
                    .sum::<usize>());
        // Matrices in a block format (GGUF) are dequantized first: the device computes in 16 bits.
        let mat = |m: &WeightMatrix| -> Result<CudaSlice<u16>, CudaError> {
            stream
                .clone_htod(&to_half_bits(&m.to_f32().data, dtype))
                .map_err(|e| CudaError::driver("cuMemcpyHtoD (weights)", e))
        };
        let vec32 = |v: &[f32]| -> Result<CudaSlice<f32>, CudaError> {
            stream
                .clone_htod(v)
                .map_err(|e| CudaError::driver("cuMemcpyHtoD (weights)", e))
        };
        let embed = mat(&w.embed)?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(DeviceLayer {
                input_norm: vec32(&l.input_norm)?,
                qkv: mat(&l.qkv)?,
                qkv_bias: l.qkv_bias.as_deref().map(vec32).transpose()?,
                o: mat(&l.o)?,
                o_bias: l.o_bias.as_deref().map(vec32).transpose()?,
                post_norm: vec32(&l.post_norm)?,
                gate_up: mat(&l.gate_up)?,
                down: mat(&l.down)?,
            });
        }
        let final_norm = vec32(&w.final_norm)?;
        let lm_head = w.lm_head.as_ref().map(mat).transpose()?;
        Ok(DeviceWeights {
            embed,
            layers,
            final_norm,
            lm_head,
            matrix_bytes,
        })
    }
}

/// Checks what the kernels support before anything is allocated.
pub(super) fn check_model(
    cfg: &ModelConfig,
    w: &LlamaWeights,
    kv: KvCacheShape,
) -> Result<(), CudaError> {
    if w.layers.len() != cfg.num_layers {
        return Err(CudaError::Unsupported(format!(
            "weights have {} layers, config {}",
            w.layers.len(),
            cfg.num_layers
        )));
    }
    if !nvrtc::ATTENTION_HEAD_DIMS.contains(&cfg.head_dim) {
        return Err(CudaError::Unsupported(format!(
            "head_dim {} (the attention kernel is built for {:?})",
            cfg.head_dim,
            nvrtc::ATTENTION_HEAD_DIMS
        )));
    }
    if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
        return Err(CudaError::Unsupported(format!(
            "{} query heads over {} KV heads",
            cfg.num_heads, cfg.num_kv_heads
        )));
    }
    if kv.num_blocks == 0 || kv.block_size == 0 {
        return Err(CudaError::InvalidKvShape(format!(
            "num_blocks ({}) and block_size ({}) must be positive",
            kv.num_blocks, kv.block_size
        )));
    }
    let slots = kv.num_blocks.checked_mul(kv.block_size);
    if slots.is_none_or(|s| s > i32::MAX as usize) {
        return Err(CudaError::InvalidKvShape(format!(
            "{} blocks of {} slots exceed 2^31 token slots",
            kv.num_blocks, kv.block_size
        )));
    }
    let dims = [
        cfg.hidden_size,
        cfg.q_dim() + 2 * cfg.kv_dim(),
        2 * cfg.intermediate_size,
        cfg.vocab_size,
    ];
    if dims.iter().any(|&x| x > i32::MAX as usize / 4) {
        return Err(CudaError::Unsupported(
            "a dimension exceeds the kernels' 32-bit sizes".into(),
        ));
    }
    Ok(())
}

impl CudaModelRunner {
    /// The model's projections, with every layer's matrix (for [`super::gemm::tune`]).
    pub(super) fn gemm_shapes(&self) -> Vec<GemmShape> {
        let cfg = &self.cfg;
        let s = &self.stream;
        let w = &self.weights;
        let per_layer = |f: fn(&DeviceLayer) -> &CudaSlice<u16>| -> Vec<u64> {
            w.layers.iter().map(|l| dptr(f(l), s)).collect()
        };
        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        vec![
            GemmShape {
                label: "gemm qkv",
                n: q + 2 * kv,
                k: h,
                weights: per_layer(|l| &l.qkv),
                swiglu: false,
            },
            GemmShape {
                label: "gemm o",
                n: h,
                k: q,
                weights: per_layer(|l| &l.o),
                swiglu: false,
            },
            GemmShape {
                label: "gemm gate_up",
                n: 2 * i,
                k: h,
                weights: per_layer(|l| &l.gate_up),
                swiglu: true,
            },
            GemmShape {
                label: "gemm down",
                n: h,
                k: i,
                weights: per_layer(|l| &l.down),
                swiglu: false,
            },
            GemmShape {
                label: "gemm lm_head",
                n: cfg.vocab_size,
                k: h,
                weights: vec![dptr(w.lm_head.as_ref().unwrap_or(&w.embed), s)],
                swiglu: false,
            },
        ]
    }
}
