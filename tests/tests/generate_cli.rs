//! `stepscope generate` on the real binary: the built-in tiny model always, and the default
//! SmolLM2 checkpoint when it is set up (CI sets it up and sets STEPSCOPE_REQUIRE_DEFAULT_MODEL,
//! so there it must run), compared token for token with Hugging Face `transformers`.

use serde_json::Value;
use std::path::PathBuf;
use stepscope_tests::{stepscope, stepscope_bin};

fn generate_json(args: &[&str]) -> Value {
    let mut full = vec!["generate"];
    full.extend_from_slice(args);
    full.push("--json");
    let out = stepscope(&full);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stepscope {full:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn ids(value: &Value) -> Vec<u64> {
    value["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect()
}

#[test]
fn tiny_greedy_generation_is_deterministic_and_respects_max_tokens() {
    let args = [
        "builtin:tiny",
        "--prompt",
        "hello world",
        "--max-tokens",
        "24",
        "--ignore-eos",
    ];
    let a = generate_json(&args);
    let b = generate_json(&args);
    assert_eq!(ids(&a).len(), 24, "{a}");
    assert_eq!(a, b);
    assert_eq!(a["finish_reason"], "length");
}

#[test]
fn the_default_device_is_chosen_automatically_and_the_log_says_which_and_why() {
    // No CUDA device is usable on the machines the suite runs on (a GPU machine runs
    // scripts/gpu-check.sh instead): `auto` falls back to the CPU and says why in one line.
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "builtin:tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(stepscope_bin())
            .args(&args)
            .env("RUST_LOG", "info")
            .output()
            .expect("run stepscope");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&[]);
    let line = stderr
        .lines()
        .find(|l| l.contains("--device auto: "))
        .unwrap_or_else(|| panic!("no --device auto line in:\n{stderr}"));
    let why = [
        "no NVIDIA driver",
        "no CUDA device",
        "compute capability",
        "not found",
    ];
    assert!(
        line.contains("using the CPU: ") && why.iter().any(|w| line.contains(w)),
        "{line}"
    );
    // An explicit device logs no choice.
    let cpu = run(&["--device", "cpu"]);
    assert!(!cpu.contains("--device auto"), "{cpu}");
}

#[test]
fn tiny_generation_takes_penalties_and_reports_logprobs() {
    let base = [
        "builtin:tiny",
        "--prompt",
        "hello world, tell me",
        "--max-tokens",
        "32",
        "--ignore-eos",
    ];
    let plain = generate_json(&base);
    let mut with_logprobs = base.to_vec();
    with_logprobs.extend(["--logprobs", "3"]);
    let out = generate_json(&with_logprobs);
    assert_eq!(
        ids(&out),
        ids(&plain),
        "logprobs must not change the tokens"
    );
    let logprobs = out["logprobs"].as_array().expect("logprobs");
    assert_eq!(logprobs.len(), 32);
    for (entry, id) in logprobs.iter().zip(ids(&out)) {
        assert_eq!(entry["token_id"].as_u64(), Some(id));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry["rank"].as_u64(), Some(1), "{entry}");
        assert_eq!(entry["top"][0][0].as_u64(), Some(id));
        assert!(entry["logprob"].as_f64().is_some_and(|l| l <= 0.0));
        assert_eq!(entry["top"].as_array().map(Vec::len), Some(3));
    }
    assert!(plain.get("logprobs").is_none());

    let mut penalised = base.to_vec();
    penalised.extend(["--repetition-penalty", "3", "--presence-penalty", "-0.5"]);
    let out = generate_json(&penalised);
    assert_ne!(ids(&out), ids(&plain), "the penalties changed nothing");

    let bad = stepscope_tests::stepscope(&[
        "generate",
        "builtin:tiny",
        "--prompt",
        "x",
        "--frequency-penalty",
        "3",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("frequency_penalty"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn tiny_generation_with_a_small_kv_pool_matches_a_large_one() {
    // 6 blocks of 4 tokens cannot hold prompt + 40 tokens at once with a second request
    // around, but a single request always fits; the output must not depend on the pool.
    let small = generate_json(&[
        "builtin:tiny",
        "--prompt",
        "the quick brown fox",
        "--max-tokens",
        "40",
        "--ignore-eos",
        "--block-size",
        "4",
        "--num-kv-blocks",
        "16",
    ]);
    let large = generate_json(&[
        "builtin:tiny",
        "--prompt",
        "the quick brown fox",
        "--max-tokens",
        "40",
        "--ignore-eos",
    ]);
    assert_eq!(ids(&small), ids(&large));
}

#[test]
fn generate_traces_its_journey_with_the_same_flags_as_serve() {
    let dir = stepscope_tests::TempDir::new("generate-journey");
    let file = dir.path("trace.jsonl");
    let out = generate_json(&[
        "builtin:tiny",
        "--prompt",
        "journeys from the command line",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--enable-journey-tracing",
        "--step-tracing-file",
        file.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(ids(&out).len(), 5);
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .expect("trace file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    // Journeys on, steps off: exactly the two spans of the one request, in one trace.
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "llm_request").count(),
        1,
        "{names:?}"
    );
    assert_eq!(names.iter().filter(|n| **n == "llm_core").count(), 1);
    assert!(!names.contains(&"scheduler.step"), "{names:?}");
    let request = lines.iter().find(|l| l["name"] == "llm_request").unwrap();
    let core = lines.iter().find(|l| l["name"] == "llm_core").unwrap();
    assert_eq!(core["trace_id"], request["trace_id"]);
    assert_eq!(core["parent_span_id"], request["span_id"]);
    assert_eq!(request["gen_ai.operation.name"], "generate");
    assert_eq!(request["gen_ai.usage.output_tokens"], 5);
    let finished = core["events"].as_array().unwrap().last().unwrap();
    assert_eq!(finished["name"], "journey.FINISHED");
    assert_eq!(finished["attributes"]["finish.status"], "length");
    // A rate without the switch is refused by name, not ignored.
    let refused = stepscope(&[
        "generate",
        "builtin:tiny",
        "--prompt",
        "x",
        "--journey-tracing-sample-rate",
        "0.5",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--enable-journey-tracing"));
}

fn smollm2_dir() -> Option<PathBuf> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct");
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("STEPSCOPE_REQUIRE_DEFAULT_MODEL").is_none(),
        "{} is missing: run ./scripts/setup-default-model.sh",
        dir.display()
    );
    eprintln!(
        "skipping: {} not set up (./scripts/setup-default-model.sh)",
        dir.display()
    );
    None
}

#[test]
fn smollm2_greedy_ids_match_transformers() {
    let Some(dir) = smollm2_dir() else { return };
    let dir = dir.display().to_string();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/smollm2_reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let expected: Vec<u64> = case["output_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let max_tokens = expected.len().to_string();
        let out = if case["kind"] == "chat" {
            generate_json(&[
                &dir,
                "--chat",
                "--prompt",
                "What is the capital of France?",
                "--max-tokens",
                &max_tokens,
            ])
        } else {
            generate_json(&[
                &dir,
                "--prompt",
                case["prompt"].as_str().unwrap(),
                "--max-tokens",
                &max_tokens,
            ])
        };
        assert_eq!(
            ids(&out),
            expected,
            "prompt {:?}: got {out}",
            case["prompt"]
        );
    }
}

#[test]
fn smollm2_answers_paris() {
    let Some(dir) = smollm2_dir() else { return };
    let out = generate_json(&[
        &dir.display().to_string(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "30",
        "--temperature",
        "0",
    ]);
    assert!(out["text"].as_str().unwrap().contains("Paris"), "{out}");
}
