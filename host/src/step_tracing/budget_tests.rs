//! The step budget end to end: a real engine (deterministic runner), the real tracer and the
//! `stall` test policy. A slow policy is set aside for the built-in default (spans marked
//! `policy.degraded`, counted), answers only its probe steps, and the engine's requests all
//! finish; a fast one is never degraded; with the budget off the slow one decides every step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::test_support::{TEST_VOCAB, TestRequest, distinct_prompt, run_engine};
use super::*;
use crate::engine::{EngineConfig, SamplingParams};
use crate::policy::budget::{BudgetConfig, PROBE_EVERY};
use crate::policy::{GUEST_COMPONENT_DIR, PolicyLimits, PolicySource};

const SEED: u64 = 7;

/// 320 requests of 32 output tokens, 4 at a time: about 2 600 short steps (two probe periods).
fn workload() -> (EngineConfig, Vec<TestRequest>) {
    let config = EngineConfig {
        block_size: 16,
        num_kv_blocks: 256,
        max_num_seqs: 4,
        max_num_batched_tokens: 128,
        ..EngineConfig::default()
    };
    let requests = (0..320)
        .map(|i| TestRequest {
            prompt: distinct_prompt(i, 12, TEST_VOCAB),
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(32)
            },
            add_before_step: 0,
        })
        .collect();
    (config, requests)
}

fn stall_config(args: &[(&str, &str)], budget: BudgetConfig, file: &Path) -> StepTracingConfig {
    StepTracingConfig {
        policy: PolicySource::File(PathBuf::from(GUEST_COMPONENT_DIR).join("stall.wasm")),
        policy_params: crate::policy::PolicyParams {
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..crate::policy::PolicyParams::rates(1.0, 0.0)
        },
        policy_budget: budget,
        policy_limits: PolicyLimits {
            fuel_per_call: 0,
            call_deadline: Duration::from_secs(5),
            ..PolicyLimits::default()
        },
        step_tracing_file: Some(file.to_path_buf()),
        ..StepTracingConfig::enabled_with_rates(1.0, 0.0, SEED)
    }
}

fn temp_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepscope-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// (step id, policy.name, policy.degraded, policy.probe) of every traced step.
fn traced(file: &Path) -> Vec<(u64, String, bool, Option<String>)> {
    std::fs::read_to_string(file)
        .expect("trace file")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            (
                v["step.id"].as_u64().expect("step.id"),
                v["policy.name"].as_str().expect("policy.name").to_string(),
                v.get("policy.degraded").and_then(|d| d.as_bool()) == Some(true),
                v.get("policy.probe")
                    .and_then(|p| p.as_str())
                    .map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn a_slow_policy_is_set_aside_for_the_default_and_probed_rarely() {
    let file = temp_file("slow.jsonl");
    // ~2 ms per call against steps of a few µs: the 250 µs floor applies.
    let config = stall_config(
        &[("mode", "slow"), ("spin", "2000000")],
        BudgetConfig::default(),
        &file,
    );
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let (engine, requests) = workload();
    let (steps, finished) = run_engine(engine, &requests, observer, SEED, 10_000);
    assert_eq!(finished, requests.len());
    let m = handle.shutdown();
    assert_eq!(m.policy.degradations, 1, "{:?}", m.policy);
    assert!(m.policy.degraded);
    let lines = traced(&file);
    assert_eq!(
        lines.len(),
        steps.len(),
        "every step traced, by one policy or the other"
    );
    let by_stall: Vec<u64> = lines.iter().filter(|l| !l.2).map(|l| l.0).collect();
    let by_default = lines.iter().filter(|l| l.2).count() as u64;
    assert_eq!(m.policy.fallback_steps, by_default);
    for (step, name, degraded, probe) in &lines {
        if *degraded {
            assert_eq!(name, "builtin:default", "step {step}");
            assert!(probe.is_none(), "step {step}");
        } else {
            assert!(name.ends_with("stall.wasm"), "step {step}: {name}");
            assert!(probe.as_deref().is_some_and(|p| p.starts_with("spun")));
        }
    }
    // The slow policy decided the first few steps and the probes, nothing else.
    let first_fallback = lines.iter().find(|l| l.2).expect("a fallback step").0;
    assert!(
        first_fallback <= 8,
        "degraded only at step {first_fallback}"
    );
    let probes: Vec<u64> = by_stall
        .iter()
        .copied()
        .filter(|&s| s > first_fallback)
        .collect();
    assert!(!probes.is_empty(), "never probed in {} steps", steps.len());
    assert!(
        probes.len() as u64 <= steps.len() as u64 / PROBE_EVERY + 1,
        "{by_stall:?}"
    );
    for pair in probes.windows(2) {
        assert_eq!(pair[1] - pair[0], PROBE_EVERY, "{probes:?}");
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_fast_policy_or_a_budget_turned_off_keeps_every_step() {
    // The budget is on, with a floor that a fast policy meets even in an unoptimised test build
    // on a loaded machine (its calls cost tens of µs there; the 250 µs default floor is for
    // release builds, where they cost about 1 µs).
    let on_for_a_debug_build = BudgetConfig {
        floor: Duration::from_millis(5),
        ..BudgetConfig::default()
    };
    for (args, budget) in [
        (vec![("mode", "ok")], on_for_a_debug_build),
        (
            vec![("mode", "slow"), ("spin", "200000")],
            BudgetConfig::OFF,
        ),
    ] {
        let file = temp_file("fast.jsonl");
        let (observer, mut handle) =
            StepTracer::start(stall_config(&args, budget, &file)).expect("tracer");
        let (engine, requests) = workload();
        let (steps, finished) = run_engine(engine, &requests, observer, SEED, 10_000);
        assert_eq!(finished, requests.len());
        let m = handle.shutdown();
        assert_eq!(
            (m.policy.degradations, m.policy.fallback_steps),
            (0, 0),
            "{args:?}"
        );
        let lines = traced(&file);
        assert_eq!(lines.len(), steps.len());
        assert!(
            lines.iter().all(|l| !l.2 && l.1.ends_with("stall.wasm")),
            "{args:?}"
        );
        let _ = std::fs::remove_file(&file);
    }
}
