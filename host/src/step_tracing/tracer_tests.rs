//! Tracer-level edge cases the seed also tests: an empty step, a rich step with no running
//! request, a `plan-rich` fault (the batch summary stays, marked `policy.rich_fault`), and
//! `request.effective_prompt_len` on a prefix-cache miss. Each runs a real `EngineCore` with the
//! deterministic runner and the real policy runtime, and reads the JSON-lines file back.

use std::path::PathBuf;

use serde_json::Value as Json;

use super::test_support::{TEST_VOCAB, run_engine};
use super::tests::mixed_workload;
use super::*;
use crate::engine::{EngineConfig, EngineCore};
use crate::policy::{FaultKind, GUEST_COMPONENT_DIR, PolicyParams, PolicySource};
use crate::testing::DeterministicRunner;

const SEED: u64 = 7;

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepscope-tracer-edges-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn read_lines(path: &PathBuf) -> Vec<Json> {
    std::fs::read_to_string(path)
        .expect("trace file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Runs `steps` steps of an engine that never receives a request, traced at these rates into
/// a JSON-lines file; returns the lines and the tracer's counters.
fn trace_idle_engine(
    rates: (f64, f64),
    steps: usize,
    file: &str,
) -> (Vec<Json>, TracerMetricsSnapshot) {
    let path = temp_path(file);
    let config = StepTracingConfig {
        step_tracing_file: Some(path.clone()),
        ..StepTracingConfig::enabled_with_rates(rates.0, rates.1, SEED)
    };
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let engine_config = EngineConfig {
        block_size: 16,
        num_kv_blocks: 32,
        seed: SEED,
        ..EngineConfig::default()
    };
    let runner = DeterministicRunner::new(32, 16, TEST_VOCAB, 4096);
    let mut core = EngineCore::new(engine_config, Box::new(runner), Box::new(observer))
        .expect("engine config");
    for _ in 0..steps {
        let out = core.step();
        assert!(out.outputs.is_empty());
    }
    drop(core);
    let metrics = handle.shutdown();
    let lines = read_lines(&path);
    let _ = std::fs::remove_file(&path);
    (lines, metrics)
}

fn batch_summary(line: &Json) -> &serde_json::Map<String, Json> {
    let events = line["events"].as_array().expect("events");
    assert_eq!(events[0]["name"], "step.BATCH_SUMMARY");
    events[0]["attributes"].as_object().expect("attributes")
}

#[test]
fn an_empty_step_is_traced_with_a_zero_batch_summary() {
    let (lines, metrics) = trace_idle_engine((1.0, 0.0), 3, "empty.jsonl");
    assert_eq!(metrics.steps_seen, 3);
    assert_eq!(metrics.steps_batch_sampled, 3);
    assert_eq!(metrics.steps_rich_sampled, 0);
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step.id"], i as u64 + 1, "empty steps still get ids");
        assert!(line.get("sampling.rich_probability").is_none());
        assert_eq!(line["events"].as_array().expect("events").len(), 1);
        let batch = batch_summary(line);
        assert_eq!(
            batch.keys().map(String::as_str).collect::<Vec<_>>().len(),
            record::BATCH_SUMMARY_ATTRIBUTES.len()
        );
        for name in record::BATCH_SUMMARY_ATTRIBUTES {
            let value = &batch[name];
            match name {
                "step.id" | "step.ts_start_ns" | "step.ts_end_ns" | "step.duration_us" => {}
                "kv.usage_gpu_ratio" => assert_eq!(value, 0.0),
                "kv.blocks_total_gpu" | "kv.blocks_free_gpu" => assert_eq!(value, 32, "{name}"),
                _ => assert_eq!(value, 0, "{name}"),
            }
        }
    }
}

#[test]
fn a_rich_step_with_no_running_request_has_its_summary_and_no_snapshot() {
    let (lines, metrics) = trace_idle_engine((1.0, 1.0), 2, "rich-empty.jsonl");
    assert_eq!(metrics.steps_batch_sampled, 2);
    assert_eq!(
        metrics.steps_rich_sampled, 2,
        "plan-rich ran over zero rows"
    );
    assert_eq!(metrics.steps_rich_faulted, 0);
    assert_eq!(metrics.snapshots_emitted, 0);
    assert_eq!(metrics.policy.total_faults(), 0);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(line["sampling.rich_probability"], 1.0);
        assert_eq!(line["events"].as_array().expect("events").len(), 1);
        assert_eq!(batch_summary(line)["queue.running_depth"], 0);
        assert!(line.get("policy.rich_fault").is_none());
    }
}

#[test]
fn a_plan_rich_fault_keeps_the_batch_summary_marks_the_span_and_is_counted() {
    let path = temp_path("rich-fault.jsonl");
    let config = StepTracingConfig {
        policy: PolicySource::File(PathBuf::from(GUEST_COMPONENT_DIR).join("hostile.wasm")),
        policy_params: PolicyParams {
            // `decide` samples every step rich; `plan-rich` names an index past the end.
            args: vec![("mode".into(), "out-of-range".into())],
            ..PolicyParams::rates(1.0, 1.0)
        },
        step_tracing_file: Some(path.clone()),
        ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
    };
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let (engine_config, requests) = mixed_workload();
    let (steps, finished) = run_engine(engine_config, &requests, observer, SEED, 1000);
    assert_eq!(finished, requests.len(), "the engine is unharmed");
    let m = handle.shutdown();
    assert_eq!(m.steps_seen, steps.len() as u64);
    assert!(
        m.steps_batch_sampled > 0,
        "faulted rich steps keep their batch summary"
    );
    assert_eq!(m.steps_rich_sampled, 0);
    assert_eq!(m.steps_rich_faulted, m.steps_batch_sampled);
    // Every plan-rich call faults: malformed, or (on a loaded machine) past its deadline.
    let malformed = m.policy.faults_of(FaultKind::Malformed);
    assert!(malformed >= 1 && malformed <= m.steps_rich_faulted, "{m:?}");
    assert!(m.policy.total_faults() >= m.steps_rich_faulted, "{m:?}");
    assert_eq!(m.snapshots_emitted, 0);
    assert!(
        m.policy.skipped_backoff > 0,
        "the runtime still backs off after a fault"
    );

    let lines = read_lines(&path);
    assert_eq!(lines.len() as u64, m.steps_batch_sampled);
    let by_id: std::collections::HashMap<u64, _> =
        steps.iter().map(|s| (s.summary.step_id, s)).collect();
    let marked_malformed = lines
        .iter()
        .filter(|line| line["policy.rich_fault"] == "malformed")
        .count();
    assert_eq!(marked_malformed as u64, malformed);
    for line in &lines {
        let kind = line["policy.rich_fault"]
            .as_str()
            .expect("policy.rich_fault");
        assert!(FaultKind::ALL.iter().any(|k| k.as_str() == kind), "{kind}");
        assert!(line.get("sampling.rich_probability").is_none());
        assert_eq!(
            line["events"].as_array().expect("events").len(),
            1,
            "no snapshot"
        );
        let step_id = line["step.id"].as_u64().expect("step.id");
        let want = by_id[&step_id];
        let batch = batch_summary(line);
        assert_eq!(batch["queue.running_depth"], want.summary.running_depth);
        assert_eq!(
            batch["batch.scheduled_tokens"],
            want.summary.scheduled_tokens
        );
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn effective_prompt_len_is_prompt_minus_cached_on_a_miss_and_on_a_partial_hit() {
    let path = temp_path("effective.jsonl");
    let config = StepTracingConfig {
        step_tracing_file: Some(path.clone()),
        ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
    };
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let (engine_config, requests) = mixed_workload();
    let (_, finished) = run_engine(engine_config, &requests, observer, SEED, 1000);
    assert_eq!(finished, requests.len());
    handle.shutdown();
    // Request ids count from 1 in the order of `mixed_workload()`. Ids 1–3 miss the cache (nothing
    // was cached when they were admitted); ids 4 and 5 find the 32-token prefix of id 1.
    let expected = |id: u64, prompt: u64| match id {
        1..=3 => prompt,
        4 | 5 => prompt - 32,
        _ => panic!("unexpected request id {id}"),
    };
    let mut seen = std::collections::BTreeSet::new();
    for line in read_lines(&path) {
        for event in line["events"].as_array().expect("events").iter().skip(1) {
            let a = &event["attributes"];
            let id: u64 = a["request.id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .expect("request.id: the engine's id in decimal (no client id given)");
            let prompt = a["request.num_prompt_tokens"].as_u64().expect("prompt");
            assert_eq!(
                a["request.effective_prompt_len"].as_u64(),
                Some(expected(id, prompt)),
                "request {id}"
            );
            seen.insert(id);
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let _ = std::fs::remove_file(&path);
}
