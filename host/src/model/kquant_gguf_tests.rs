//! A GGUF file of Q4_K, Q6_K, Q5_0 and Q8_0 tensors, written here, loaded through
//! `load_model_files` and run on the CPU backend against the f32 model of its exactly
//! dequantized weights; and another tensor type refused with the supported list.

use std::path::PathBuf;
use std::sync::Arc;

use super::kquant::ConvertedFormat::{self, Q4K, Q5_0, Q6K};
use super::kquant_tests::quantize_row;
use super::quant::BlockFormat;
use super::weight_matrix::WeightMatrix;
use super::weights::{LayerWeights, LlamaWeights, Matrix};
use crate::splitmix::SplitMix64;

/// A GGUF v3 file built in memory: metadata then tensors, 32-byte aligned.
#[derive(Default)]
struct GgufBuilder {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl GgufBuilder {
    fn key(&mut self, k: &str, ty: u32) -> &mut Vec<u8> {
        self.n_kv += 1;
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        &mut self.kv
    }

    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4).extend(v.to_le_bytes());
    }

    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6).extend(v.to_le_bytes());
    }

    fn str(&mut self, k: &str, v: &str) {
        put_str(self.key(k, 8), v);
    }

    fn strs(&mut self, k: &str, v: &[String]) {
        let b = self.key(k, 9);
        b.extend(8u32.to_le_bytes());
        b.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(b, s);
        }
    }

    fn i32s(&mut self, k: &str, v: &[i32]) {
        let b = self.key(k, 9);
        b.extend(5u32.to_le_bytes());
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }

    /// A tensor; `dims` innermost first (`[cols, rows]`).
    fn tensor(&mut self, name: &str, dims: &[usize], ggml_type: u32, bytes: Vec<u8>) {
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, bytes));
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| b.extend((*d as u64).to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (bytes.len() as u64).div_ceil(32) * 32;
        }
        for (_, _, _, bytes) in &self.tensors {
            b.resize(b.len().div_ceil(32) * 32, 0);
            b.extend(bytes);
        }
        b
    }
}

/// A ggml type for the tensors of the test model.
#[derive(Clone, Copy)]
enum Ty {
    K(ConvertedFormat),
    Q8_0,
}

impl Ty {
    fn ggml_type(self) -> u32 {
        match self {
            Ty::K(Q5_0) => 6,
            Ty::K(Q4K) => 12,
            Ty::K(Q6K) => 14,
            Ty::Q8_0 => 8,
        }
    }

    /// `m`'s rows quantized, and their exact dequantization.
    fn quantize(self, m: &Matrix) -> (Vec<u8>, Matrix) {
        let mut bytes = Vec::new();
        let mut exact = vec![0f32; m.data.len()];
        for (i, out) in exact.chunks_exact_mut(m.cols).enumerate() {
            let row = match self {
                Ty::K(f) => quantize_row(f, m.row(i)),
                Ty::Q8_0 => BlockFormat::Q8_0.quantize_row(m.row(i)),
            };
            match self {
                Ty::K(f) => f.dequantize_row(&row, out),
                Ty::Q8_0 => BlockFormat::Q8_0.dequantize_row(&row, out),
            }
            bytes.extend(row);
        }
        (bytes, Matrix::new(m.rows, m.cols, exact))
    }
}

/// The rows of a `heads`-head projection in llama.cpp's rotary order (what its converter writes).
fn permuted(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let (rb, d) = (bytes.len() / rows, rows / heads);
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let (hf, gguf) = (h * d + j * (d / 2) + i, h * d + 2 * i + j);
                out[gguf * rb..(gguf + 1) * rb].copy_from_slice(&bytes[hf * rb..(hf + 1) * rb]);
            }
        }
    }
    out
}

fn rows_of(m: &Matrix, start: usize, len: usize) -> Matrix {
    Matrix::new(
        len,
        m.cols,
        m.data[start * m.cols..(start + len) * m.cols].to_vec(),
    )
}

/// A Llama of `builtin:tiny`'s kind widened to whole super-blocks (hidden 256, intermediate
/// 512, 4 heads of 64, 2 KV heads, 2 layers, 256 byte tokens + 3 specials), its matrices in a
/// Q4_K_M-like mix: layer 0 q/k Q4_K with v Q6_K (so that stack converts to Q8_0), o and
/// gate/up Q4_K, down Q6_K; layer 1 q/k/v Q4_K, o Q5_0, gate Q5_0 with up Q8_0, down Q4_K;
/// embeddings Q4_K, output Q6_K. Returns the file and the f32 weights of its exact values.
fn k_quant_model() -> (GgufBuilder, super::ModelConfig, LlamaWeights) {
    let mut cfg = super::tiny::tiny_config();
    cfg.hidden_size = 256;
    cfg.intermediate_size = 512;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 64;
    cfg.vocab_size = 259;
    cfg.bos_token_id = None;
    cfg.eos_token_ids = vec![256];
    let f = super::tiny::tiny_weights(&cfg);
    let (h, q, kv, inter) = (256, 256, 128, 512);

    let mut g = GgufBuilder::default();
    g.str("general.architecture", "llama");
    g.u32("llama.block_count", 2);
    g.u32("llama.context_length", 256);
    g.u32("llama.embedding_length", h as u32);
    g.u32("llama.feed_forward_length", inter as u32);
    g.u32("llama.attention.head_count", 4);
    g.u32("llama.attention.head_count_kv", 2);
    g.u32("llama.rope.dimension_count", 64);
    g.f32("llama.rope.freq_base", 10_000.0);
    g.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    g.str("tokenizer.ggml.model", "gpt2");
    g.str("tokenizer.ggml.pre", "gpt-2");
    let mut tokens: Vec<String> = super::tiny::bytes_to_unicode()
        .iter()
        .map(char::to_string)
        .collect();
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i < 256 { 1 } else { 3 })
        .collect();
    g.strs("tokenizer.ggml.tokens", &tokens);
    g.i32s("tokenizer.ggml.token_type", &types);
    g.strs("tokenizer.ggml.merges", &[]);
    g.u32("tokenizer.ggml.eos_token_id", 256);

    let vector = |g: &mut GgufBuilder, name: &str, v: &[f32]| {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        g.tensor(name, &[v.len()], 0, bytes);
    };
    let matrix = |g: &mut GgufBuilder, name: &str, m: &Matrix, ty: Ty, heads: Option<usize>| {
        let (bytes, exact) = ty.quantize(m);
        let bytes = heads.map_or(bytes.clone(), |n| permuted(&bytes, m.rows, n));
        g.tensor(name, &[m.cols, m.rows], ty.ggml_type(), bytes);
        exact
    };
    let (k4, k6, q5) = (Ty::K(Q4K), Ty::K(Q6K), Ty::K(Q5_0));
    let embed = matrix(&mut g, "token_embd.weight", &f.embed.to_f32(), k4, None);
    vector(&mut g, "output_norm.weight", &f.final_norm);
    let lm_head = matrix(&mut g, "output.weight", &f.lm_head().to_f32(), k6, None);
    let mut layers = Vec::new();
    for (i, l) in f.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        let [tq, tk, tv, to, tg, tu, td] = if i == 0 {
            [k4, k4, k6, k4, k4, k4, k6]
        } else {
            [k4, k4, k4, q5, q5, Ty::Q8_0, k4]
        };
        let (qkv, gate_up) = (l.qkv.to_f32(), l.gate_up.to_f32());
        vector(&mut g, &format!("{p}.attn_norm.weight"), &l.input_norm);
        let eq = matrix(
            &mut g,
            &format!("{p}.attn_q.weight"),
            &rows_of(&qkv, 0, q),
            tq,
            Some(4),
        );
        let ek = matrix(
            &mut g,
            &format!("{p}.attn_k.weight"),
            &rows_of(&qkv, q, kv),
            tk,
            Some(2),
        );
        let ev = matrix(
            &mut g,
            &format!("{p}.attn_v.weight"),
            &rows_of(&qkv, q + kv, kv),
            tv,
            None,
        );
        let eo = matrix(
            &mut g,
            &format!("{p}.attn_output.weight"),
            &l.o.to_f32(),
            to,
            None,
        );
        vector(&mut g, &format!("{p}.ffn_norm.weight"), &l.post_norm);
        let eg = matrix(
            &mut g,
            &format!("{p}.ffn_gate.weight"),
            &rows_of(&gate_up, 0, inter),
            tg,
            None,
        );
        let eu = matrix(
            &mut g,
            &format!("{p}.ffn_up.weight"),
            &rows_of(&gate_up, inter, inter),
            tu,
            None,
        );
        let ed = matrix(
            &mut g,
            &format!("{p}.ffn_down.weight"),
            &l.down.to_f32(),
            td,
            None,
        );
        layers.push(LayerWeights {
            input_norm: l.input_norm.clone(),
            qkv: Matrix::vstack(&[eq, ek, ev]).into(),
            qkv_bias: None,
            o: eo.into(),
            o_bias: None,
            post_norm: l.post_norm.clone(),
            gate_up: Matrix::vstack(&[eg, eu]).into(),
            down: ed.into(),
        });
    }
    let exact = LlamaWeights {
        embed: embed.into(),
        layers,
        final_norm: f.final_norm.clone(),
        lm_head: Some(lm_head.into()),
    };
    (g, cfg, exact)
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepscope-kquant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Every position's logits of one forward over `tokens`.
fn all_logits(
    cfg: &super::ModelConfig,
    weights: Arc<LlamaWeights>,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    use crate::backend::cpu::CpuModelRunner;
    use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner};
    let kv = super::KvCacheShape {
        num_blocks: 8,
        block_size: 16,
    };
    let mut runner = CpuModelRunner::new(cfg.clone(), weights, kv).unwrap();
    let table: Vec<u32> = (0..8).collect();
    let logits = runner
        .forward(&ModelBatch {
            entries: vec![BatchEntry {
                request_id: 1,
                token_ids: tokens,
                start_position: 0,
                block_table: &table,
                needs_logits: true,
                all_logits: true,
            }],
        })
        .unwrap();
    (0..tokens.len()).map(|i| logits.row(i).to_vec()).collect()
}

fn argmax(v: &[f32]) -> usize {
    crate::engine::sampler::argmax(v) as usize
}

#[test]
fn gguf_with_k_quants_loads_and_runs_like_its_exact_f32_model() {
    let (g, cfg, exact) = k_quant_model();
    let path = write_temp("model.gguf", &g.bytes());
    let loaded = super::load_model_files(path.to_str().unwrap()).expect("load the K-quant GGUF");
    let _ = std::fs::remove_file(&path);
    let (c, w) = (&loaded.info.config, &*loaded.weights);
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size
        ),
        (256, 512, 4, 2, 64, 259)
    );
    // Q4_K alone to its layout with unpacked scales; Q4_K fused with Q6_K to Q8_0; Q6_K alone to
    // its 32-element blocks; Q5_0 alone kept as stored, Q5_0 fused with Q8_0 converted to Q8_0.
    let names =
        |l: &LayerWeights| [&l.qkv, &l.o, &l.gate_up, &l.down].map(WeightMatrix::format_name);
    assert_eq!(w.embed.format_name(), "Q4_K");
    assert_eq!(w.lm_head().format_name(), "Q6_K");
    assert_eq!(names(&w.layers[0]), ["Q8_0", "Q4_K", "Q4_K", "Q6_K"]);
    assert_eq!(names(&w.layers[1]), ["Q4_K", "Q5_0", "Q8_0", "Q4_K"]);
    // Every weight within its conversion's bound of the exact value (Q/K rows back in Hugging
    // Face order): Q8_0 within 1/254 of the matrix's largest weight, the others exact.
    let close = |a: &WeightMatrix, b: &WeightMatrix, what: &str| {
        let rel = match a.format_name() {
            "Q4_K" | "Q5_0" | "Q6_K" => 0.0,
            _ => 1.0 / 254.0,
        };
        let (a, b) = (a.to_f32(), b.to_f32());
        let wmax = b.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .data
            .iter()
            .zip(&b.data)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= wmax * rel * 1.001, "{what}: {worst} of {wmax}");
    };
    close(&w.embed, &exact.embed, "embed");
    close(w.lm_head(), exact.lm_head(), "lm_head");
    for (i, (a, b)) in w.layers.iter().zip(&exact.layers).enumerate() {
        close(&a.qkv, &b.qkv, &format!("layer {i} qkv"));
        close(&a.o, &b.o, &format!("layer {i} o"));
        close(&a.gate_up, &b.gate_up, &format!("layer {i} gate_up"));
        close(&a.down, &b.down, &format!("layer {i} down"));
        assert_eq!((&a.input_norm, &a.post_norm), (&b.input_norm, &b.post_norm));
    }

    // The same forward: loaded (converted weights, int8 kernels), the converted weights in f32
    // (the conversion alone), and the exact f32 model.
    let mut rng = SplitMix64::new(5);
    let tokens: Vec<u32> = (0..48).map(|_| (rng.next_u64() % 256) as u32).collect();
    let want = all_logits(&cfg, Arc::new(exact), &tokens);
    let got = all_logits(c, loaded.weights.clone(), &tokens);
    let f32_of_converted = Arc::new(w.to_f32());
    let conv = all_logits(c, f32_of_converted, &tokens);
    let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = |a: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    };
    let (d_got, d_conv) = (diff(&got), diff(&conv));
    let agree = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    eprintln!(
        "logits up to {scale:.3}: converted+int8 kernels differ by {d_got:.4}, converted in f32 by \
         {d_conv:.5}; greedy agrees at {agree}/{} positions",
        tokens.len()
    );
    assert!(
        d_conv <= 0.01 * scale,
        "conversion alone: {d_conv} of {scale}"
    );
    assert!(
        d_got <= 0.05 * scale,
        "with int8 activations: {d_got} of {scale}"
    );
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let (ours, theirs) = (argmax(a), argmax(b));
        // A different choice only at a near-tie of the exact model's logits.
        assert!(
            b[theirs] - b[ours] <= 2.0 * d_got,
            "position {i}: {ours} vs {theirs}, {} apart",
            b[theirs] - b[ours]
        );
    }
    assert!(agree * 10 >= tokens.len() * 9, "{agree}/{}", tokens.len());
}

#[test]
fn other_types_are_refused_with_the_supported_list() {
    let (mut g, _, _) = k_quant_model();
    let down = g
        .tensors
        .iter_mut()
        .find(|t| t.0 == "blk.1.ffn_down.weight")
        .unwrap();
    down.2 = 13; // Q5_K
    down.3 = vec![0; 256 * 512 / 256 * 176];
    let path = write_temp("q5_k.gguf", &g.bytes());
    let err = super::load_model_files(path.to_str().unwrap())
        .unwrap_err()
        .to_string();
    let _ = std::fs::remove_file(&path);
    assert!(err.contains("blk.1.ffn_down.weight"), "{err}");
    assert!(err.contains("Q5_K is not supported"), "{err}");
    assert!(err.contains("Q4_K and Q6_K converted at load"), "{err}");
}
