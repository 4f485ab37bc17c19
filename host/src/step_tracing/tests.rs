//! End-to-end tests of step tracing: a real `EngineCore` (deterministic paged-KV runner), the
//! real policy runtime, and real OTLP receivers in process (gRPC: `fake-opentelemetry-collector`,
//! which does not speak OTLP/HTTP; HTTP/protobuf: a minimal server in `test_support`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::config::OtlpConfig;
use super::test_support::{
    CollectedSpan, ExpectedStep, GrpcCollector, HttpCollector, TEST_VOCAB, TestRequest,
    distinct_prompt, run_engine,
};
use super::*;
use crate::cli::{Cli, Command};
use crate::engine::{EngineConfig, SamplingParams};
use crate::policy::random::step_draws;
use crate::policy::{GUEST_COMPONENT_DIR, PolicyLimits, PolicyParams, PolicySource};

const SEED: u64 = 42;

fn guest(name: &str) -> PathBuf {
    PathBuf::from(GUEST_COMPONENT_DIR).join(format!("{name}.wasm"))
}

/// A `request.id` of a request added without a client id: the engine's id, in decimal.
fn decimal_id(value: &super::test_support::TestValue) -> i64 {
    value.str().parse().expect("a decimal request id")
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepscope-step-tracing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize, add_before_step: usize) -> TestRequest {
    TestRequest {
        prompt,
        params: greedy(max_tokens),
        add_before_step,
    }
}

/// A mixed workload: short prompts, a long chunked prefill, and two late requests that share
/// a two-block prefix with an earlier one (a partial prefix-cache hit → effective_prompt_len).
pub(super) fn mixed_workload() -> (EngineConfig, Vec<TestRequest>) {
    let config = EngineConfig {
        block_size: 16,
        num_kv_blocks: 256,
        max_num_seqs: 16,
        max_num_batched_tokens: 128,
        ..EngineConfig::default()
    };
    let prefix = distinct_prompt(100, 32, TEST_VOCAB);
    let with_tail = |tail: usize, seed: usize| {
        let mut p = prefix.clone();
        p.extend(distinct_prompt(seed, tail, TEST_VOCAB));
        p
    };
    let requests = vec![
        request(with_tail(8, 1), 12, 0),
        request(distinct_prompt(2, 20, TEST_VOCAB), 8, 0),
        request(distinct_prompt(3, 200, TEST_VOCAB), 4, 0),
        request(with_tail(10, 4), 6, 3),
        request(with_tail(5, 5), 5, 4),
    ];
    (config, requests)
}

fn expected_by_step(steps: &[ExpectedStep]) -> HashMap<u64, &ExpectedStep> {
    steps.iter().map(|s| (s.summary.step_id, s)).collect()
}

/// Checks one step span against what the engine said at that step (16 batch attributes,
/// every snapshot's attributes and values, timestamps, sampling and policy attributes).
fn check_span(span: &CollectedSpan, expected: &ExpectedStep, rich: bool) {
    let s = &expected.summary;
    assert_eq!(span.name, record::SPAN_NAME);
    assert_eq!(span.start_time_unix_nano, s.ts_start_ns);
    // The span covers the whole step: it ends after the forward pass, not when the batch was
    // decided (the events keep the decision time).
    if s.scheduled_tokens > 0 {
        assert!(span.end_time_unix_nano > s.ts_end_ns, "step {}", s.step_id);
    } else {
        assert!(span.end_time_unix_nano >= s.ts_end_ns, "step {}", s.step_id);
    }
    assert_eq!(span.attr("openinference.span.kind").str(), "CHAIN");
    assert_eq!(span.dropped_events_count, 0);
    assert_eq!(span.attr("sampling.batch_probability").float(), 1.0);
    assert_eq!(
        span.attr("step.last_step_duration_us").int() as u64,
        s.last_step_duration_us
    );
    assert!(span.attr("policy.digest").str().starts_with("sha256:"));

    let batch = &span.events[0];
    assert_eq!(batch.name, "step.BATCH_SUMMARY");
    assert_eq!(batch.time_unix_nano, s.ts_end_ns);
    let names: BTreeSet<&str> = batch.attributes.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        record::BATCH_SUMMARY_ATTRIBUTES.into_iter().collect(),
        "exactly the 16 batch attributes"
    );
    let int = |name: &str| batch.attributes[name].int() as u64;
    // The 16 numbers are span attributes too, with the same values.
    for name in record::BATCH_SUMMARY_ATTRIBUTES {
        assert_eq!(span.attr(name), &batch.attributes[name], "{name}");
    }
    assert_eq!(int("step.id"), s.step_id);
    assert_eq!(int("step.ts_start_ns"), s.ts_start_ns);
    assert_eq!(int("step.ts_end_ns"), s.ts_end_ns);
    assert_eq!(int("step.duration_us"), s.duration_us);
    assert_eq!(int("queue.running_depth"), u64::from(s.running_depth));
    assert_eq!(int("queue.waiting_depth"), u64::from(s.waiting_depth));
    assert_eq!(int("batch.num_prefill_reqs"), u64::from(s.num_prefill_reqs));
    assert_eq!(int("batch.num_decode_reqs"), u64::from(s.num_decode_reqs));
    assert_eq!(int("batch.scheduled_tokens"), u64::from(s.scheduled_tokens));
    assert_eq!(int("batch.prefill_tokens"), u64::from(s.prefill_tokens));
    assert_eq!(int("batch.decode_tokens"), u64::from(s.decode_tokens));
    assert_eq!(int("batch.num_finished"), u64::from(s.num_finished));
    assert_eq!(int("batch.num_preempted"), u64::from(s.num_preempted));
    assert_eq!(int("kv.blocks_total_gpu"), u64::from(s.kv_blocks_total));
    assert_eq!(int("kv.blocks_free_gpu"), u64::from(s.kv_blocks_free));
    assert_eq!(
        batch.attributes["kv.usage_gpu_ratio"].float(),
        s.kv_usage_ratio
    );
    assert_eq!(
        int("batch.scheduled_tokens"),
        int("batch.prefill_tokens") + int("batch.decode_tokens")
    );

    let snapshots = &span.events[1..];
    if !rich {
        assert!(snapshots.is_empty());
        assert!(!span.attributes.contains_key("sampling.rich_probability"));
        return;
    }
    assert_eq!(span.attr("sampling.rich_probability").float(), 1.0);
    // One snapshot per running request, running-but-unscheduled ones included.
    assert_eq!(snapshots.len() as u64, int("queue.running_depth"));
    assert_eq!(snapshots.len(), expected.running.len());
    for (event, want) in snapshots.iter().zip(&expected.running) {
        assert_eq!(event.name, "step.REQUEST_SNAPSHOT");
        let a = &event.attributes;
        let mut names: BTreeSet<&str> = [
            "step.id",
            "request.id",
            "request.phase",
            "request.num_prompt_tokens",
            "request.num_computed_tokens",
            "request.num_output_tokens",
            "request.num_preemptions",
            "request.scheduled_tokens_this_step",
            "kv.blocks_allocated_gpu",
            "kv.blocks_cached_gpu",
        ]
        .into_iter()
        .collect();
        if want.effective_prompt_len.is_some() {
            names.insert("request.effective_prompt_len");
        }
        assert_eq!(a.keys().map(String::as_str).collect::<BTreeSet<_>>(), names);
        let int = |name: &str| a[name].int() as u64;
        assert_eq!(int("step.id"), s.step_id);
        // Requests added without a client id are known by the engine's decimal id.
        assert_eq!(a["request.id"].str(), want.id.to_string());
        // PREFILL exactly while the request has no output token.
        let phase = a["request.phase"].str();
        assert_eq!(phase == "PREFILL", int("request.num_output_tokens") == 0);
        assert_eq!(phase, if want.is_prefill { "PREFILL" } else { "DECODE" });
        assert_eq!(
            int("request.num_prompt_tokens"),
            u64::from(want.num_prompt_tokens)
        );
        assert_eq!(
            int("request.num_computed_tokens"),
            u64::from(want.num_computed_tokens)
        );
        assert_eq!(
            int("request.num_output_tokens"),
            u64::from(want.num_output_tokens)
        );
        assert_eq!(
            int("request.num_preemptions"),
            u64::from(want.num_preemptions)
        );
        assert_eq!(
            int("request.scheduled_tokens_this_step"),
            u64::from(want.scheduled_tokens)
        );
        // The KV cache manager's own count at the emission point.
        assert_eq!(
            int("kv.blocks_allocated_gpu"),
            u64::from(want.kv_blocks_allocated)
        );
        assert_eq!(
            int("kv.blocks_cached_gpu"),
            u64::from(want.kv_blocks_cached)
        );
        if let Some(len) = want.effective_prompt_len {
            assert_eq!(int("request.effective_prompt_len"), u64::from(len));
        }
    }
}

/// Runs the mixed workload at 1.0 / 1.0 into `otlp` and checks every span against the engine.
fn end_to_end(otlp: OtlpConfig, wait: impl Fn(usize) -> Vec<CollectedSpan>) -> Vec<CollectedSpan> {
    let (engine_config, requests) = mixed_workload();
    let config = StepTracingConfig {
        otlp: Some(otlp),
        service_name: "stepscope-test".into(),
        ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
    };
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let (steps, finished) = run_engine(engine_config, &requests, observer, SEED, 1000);
    assert_eq!(finished, requests.len());
    assert!(handle.flush());
    let spans = wait(steps.len());
    let metrics = handle.shutdown();
    assert_eq!(metrics.steps_seen, steps.len() as u64);
    assert_eq!(metrics.steps_rich_sampled, steps.len() as u64);
    assert_eq!(metrics.spans_exported, steps.len() as u64);
    assert_eq!(metrics.spans_export_failed + metrics.records_dropped(), 0);
    assert_eq!(metrics.policy.calls, 2 * steps.len() as u64);
    assert_eq!(
        metrics.snapshots_emitted,
        steps.iter().map(|s| s.running.len() as u64).sum::<u64>()
    );

    assert_eq!(spans.len(), steps.len(), "one span per step at rate 1.0");
    let expected = expected_by_step(&steps);
    for span in &spans {
        check_span(span, expected[&span.step_id()], true);
        assert_eq!(span.attr("policy.name").str(), "builtin:default");
        // ... and ends before the next step starts.
        if let Some(next) = expected.get(&(span.step_id() + 1)) {
            assert!(span.end_time_unix_nano <= next.summary.ts_start_ns);
        }
    }
    // The workload exercised what it is meant to.
    let snapshot_attr = |name: &str| {
        spans
            .iter()
            .flat_map(|s| &s.events[1..])
            .filter(|e| e.attributes.contains_key(name))
            .count()
    };
    assert!(
        snapshot_attr("request.effective_prompt_len") > 0,
        "a partial prefix hit"
    );
    let phases: BTreeSet<&str> = spans
        .iter()
        .flat_map(|s| &s.events[1..])
        .map(|e| e.attributes["request.phase"].str())
        .collect();
    assert_eq!(phases, ["DECODE", "PREFILL"].into_iter().collect());
    spans
}

#[test]
fn grpc_export_to_a_real_collector_matches_the_engine() {
    let collector = GrpcCollector::start();
    let otlp = OtlpConfig {
        endpoint: collector.endpoint.clone(),
        protocol: OtlpProtocol::Grpc,
        headers: vec![("x-test".into(), "1".into())],
        tls: Default::default(),
    };
    end_to_end(otlp, |n| collector.wait_for(n));
}

#[test]
fn http_protobuf_export_matches_the_engine_and_names_the_scope() {
    let collector = HttpCollector::start();
    // The flag form without a path: `/v1/traces` is appended.
    let args = match Cli::try_parse_from([
        "stepscope",
        "serve",
        "--otlp-traces-endpoint",
        &collector.base,
        "--otlp-protocol",
        "http",
    ]) {
        Ok(Cli {
            command: Command::Serve(serve),
        }) => serve.step_tracing,
        other => panic!("{other:?}"),
    };
    let config = StepTracingConfig::resolve(args.settings(), SEED, |_| None).expect("config");
    let otlp = config.otlp.expect("otlp");
    assert_eq!(otlp.endpoint, collector.endpoint);
    let spans = end_to_end(otlp, |n| collector.wait_for(n));
    for span in &spans {
        assert_eq!(span.scope.as_deref(), Some("stepscope.scheduler.step"));
        assert_eq!(span.service_name.as_deref(), Some("stepscope-test"));
    }
    assert!(collector.paths().iter().all(|p| p == "/v1/traces"));
}

#[test]
fn a_rich_step_with_256_running_requests_keeps_all_256_snapshots() {
    let engine_config = EngineConfig {
        block_size: 16,
        num_kv_blocks: 600,
        max_num_seqs: 256,
        max_num_batched_tokens: 4096,
        ..EngineConfig::default()
    };
    let requests: Vec<TestRequest> = (0..256)
        .map(|i| request(distinct_prompt(i, 8, TEST_VOCAB), 3, 0))
        .collect();
    let collector = GrpcCollector::start();
    let run = |max_events_per_span: u32| {
        let config = StepTracingConfig {
            otlp: Some(OtlpConfig {
                endpoint: collector.endpoint.clone(),
                protocol: OtlpProtocol::Grpc,
                headers: Vec::new(),
                tls: Default::default(),
            }),
            max_events_per_span,
            ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
        };
        let (observer, mut handle) = StepTracer::start(config).expect("tracer");
        let (steps, _) = run_engine(engine_config.clone(), &requests, observer, SEED, 2);
        assert_eq!(steps.len(), 2);
        assert!(steps.iter().all(|s| s.running.len() == 256));
        handle.shutdown()
    };

    let metrics = run(DEFAULT_MAX_EVENTS_PER_SPAN);
    let spans = collector.wait_for(2);
    assert_eq!(spans.len(), 2);
    assert_eq!(metrics.span_events_dropped, 0);
    assert_eq!(metrics.snapshots_emitted, 512);
    for span in &spans {
        let snapshots: BTreeSet<i64> = span.events[1..]
            .iter()
            .filter(|e| e.name == "step.REQUEST_SNAPSHOT")
            .map(|e| decimal_id(&e.attributes["request.id"]))
            .collect();
        assert_eq!(snapshots, (1..=256).collect(), "every request, once");
        assert_eq!(span.events.len(), 257);
        assert_eq!(span.dropped_events_count, 0);
    }

    // The trap the raised limit avoids: the SDK's default of 128 events loses 129 of 257.
    let metrics = run(128);
    let spans = collector.wait_for(4);
    assert_eq!(metrics.span_events_dropped, 2 * 129);
    assert!(
        spans[2..]
            .iter()
            .all(|s| s.events.len() == 128 && s.dropped_events_count == 129)
    );
}

#[test]
fn pressure_policy_exports_only_preempting_or_kv_heavy_steps() {
    // 8 requests that outgrow a 24-block pool: KV usage climbs and requests get preempted.
    let engine_config = EngineConfig {
        block_size: 16,
        num_kv_blocks: 24,
        max_num_seqs: 8,
        max_num_batched_tokens: 512,
        ..EngineConfig::default()
    };
    let requests: Vec<TestRequest> = (0..8)
        .map(|i| request(distinct_prompt(i, 40, TEST_VOCAB), 40, 0))
        .collect();
    let collector = GrpcCollector::start();
    let config = StepTracingConfig {
        policy: PolicySource::File(guest("pressure")),
        policy_params: PolicyParams {
            args: vec![("rich_top_k".into(), "3".into())],
            ..PolicyParams::rates(0.0, 0.0)
        },
        // This test is about the policy's answers: an unoptimised build on a loaded machine must
        // not have the step budget hand its steps to the default (rate 0) policy.
        policy_budget: crate::policy::budget::BudgetConfig::OFF,
        otlp: Some(OtlpConfig {
            endpoint: collector.endpoint.clone(),
            protocol: OtlpProtocol::Grpc,
            headers: Vec::new(),
            tls: Default::default(),
        }),
        ..StepTracingConfig::enabled_with_rates(0.0, 0.0, SEED)
    };
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let (steps, finished) = run_engine(engine_config, &requests, observer, SEED, 5000);
    assert_eq!(finished, 8);
    assert!(handle.flush());

    let reason = |s: &ExpectedStep| {
        if s.summary.num_preempted > 0 {
            Some("preemption")
        } else if s.summary.kv_usage_ratio > 0.9 {
            Some("kv_usage")
        } else {
            None
        }
    };
    let triggered: BTreeMap<u64, &str> = steps
        .iter()
        .filter_map(|s| reason(s).map(|r| (s.summary.step_id, r)))
        .collect();
    assert!(
        triggered.values().any(|r| *r == "preemption"),
        "no preemption"
    );
    assert!(
        triggered.values().any(|r| *r == "kv_usage"),
        "no KV pressure"
    );
    assert!(triggered.len() < steps.len(), "every step triggered");

    let spans = collector.wait_for(triggered.len());
    let metrics = handle.shutdown();
    let exported: BTreeMap<u64, &str> = spans
        .iter()
        .map(|s| (s.step_id(), s.attr("policy.reason").str()))
        .collect();
    assert_eq!(
        exported, triggered,
        "exactly the triggered steps, with their reason"
    );
    assert_eq!(spans.len(), triggered.len());
    assert_eq!(metrics.steps_batch_sampled, triggered.len() as u64);

    let expected = expected_by_step(&steps);
    for span in &spans {
        let want = expected[&span.step_id()];
        assert_eq!(
            span.attr("policy.name").str(),
            guest("pressure").display().to_string()
        );
        assert_eq!(span.attr("policy.rich_top_k").str(), "3");
        assert_eq!(span.attr("sampling.rich_probability").float(), 1.0);
        // The rich plan covers the 3 requests holding the most KV blocks.
        let mut by_blocks: Vec<(u32, usize, u64)> = want
            .running
            .iter()
            .enumerate()
            .map(|(i, r)| (r.kv_blocks_allocated, i, r.id))
            .collect();
        by_blocks.sort_by_key(|&(blocks, i, _)| (std::cmp::Reverse(blocks), i));
        let top: Vec<i64> = by_blocks
            .iter()
            .take(3)
            .map(|&(_, _, id)| id as i64)
            .collect();
        let got: Vec<i64> = span.events[1..]
            .iter()
            .map(|e| decimal_id(&e.attributes["request.id"]))
            .collect();
        assert_eq!(got, top, "step {}", span.step_id());
        let batch = &span.events[0].attributes;
        assert_eq!(
            batch["batch.num_preempted"].int() as u32,
            want.summary.num_preempted
        );
    }
}

#[test]
fn an_unreachable_collector_drops_and_counts_but_never_blocks_steps() {
    use crate::engine::Engine;
    use crate::testing::deterministic_runner::DeterministicRunner;
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let endpoint = match protocol {
            OtlpProtocol::Grpc => format!("http://127.0.0.1:{port}"),
            OtlpProtocol::HttpProtobuf => format!("http://127.0.0.1:{port}/v1/traces"),
        };
        let config = StepTracingConfig {
            otlp: Some(OtlpConfig {
                endpoint,
                protocol,
                headers: Vec::new(),
                tls: Default::default(),
            }),
            queue_capacity: 4,
            export_batch_size: 2,
            export_interval: Duration::from_millis(5),
            export_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_millis(300),
            ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
        };
        let (observer, mut handle) = StepTracer::start(config).expect("tracer");
        let engine_config = EngineConfig {
            num_kv_blocks: 128,
            max_num_seqs: 8,
            seed: SEED,
            ..EngineConfig::default()
        };
        let runner = DeterministicRunner::new(128, 16, TEST_VOCAB, 4096)
            .with_step_delay(Duration::from_micros(500));
        let engine =
            Engine::start(engine_config, Box::new(runner), Box::new(observer)).expect("engine");
        let mut receivers = Vec::new();
        for i in 0..24 {
            let (_, rx) = engine
                .add_request(distinct_prompt(i, 24, TEST_VOCAB), greedy(12))
                .expect("add");
            receivers.push(rx);
        }
        let mut finished = 0;
        for mut rx in receivers {
            while let Some(output) = rx.blocking_recv() {
                if output.finish_reason.is_some() {
                    finished += 1;
                    break;
                }
            }
        }
        assert_eq!(finished, 24, "{protocol:?}: every request finished");
        let stats = engine.stats();
        engine.shutdown().expect("engine shutdown");
        let m = handle.shutdown();
        eprintln!("{protocol:?}: {m:?}");
        assert_eq!(m.steps_seen, stats.num_steps, "{protocol:?}");
        assert_eq!(m.steps_batch_sampled, m.steps_seen, "{protocol:?}");
        assert_eq!(m.spans_exported, 0, "{protocol:?}");
        assert!(
            m.spans_export_failed > 0 && m.export_errors > 0,
            "{protocol:?}: {m:?}"
        );
        // Every sampled step is accounted for: queued then failed, or dropped at the queue.
        assert_eq!(
            m.steps_batch_sampled,
            m.records_queued + m.records_dropped(),
            "{protocol:?}: {m:?}"
        );
        assert_eq!(
            m.records_queued, m.spans_export_failed,
            "{protocol:?}: {m:?}"
        );
    }
}

#[test]
fn json_lines_file_reads_back_with_every_name_and_the_step_summaries() {
    let path = temp_path("jsonl-roundtrip.jsonl");
    let (engine_config, requests) = mixed_workload();
    let config = StepTracingConfig {
        step_tracing_file: Some(path.clone()),
        ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
    };
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    let (steps, finished) = run_engine(engine_config, &requests, observer, SEED, 1000);
    assert_eq!(finished, requests.len());
    let metrics = handle.shutdown();
    assert_eq!(metrics.jsonl_lines_written, steps.len() as u64);

    let text = std::fs::read_to_string(&path).expect("trace file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), steps.len());
    let expected = expected_by_step(&steps);
    let mut saw_effective = false;
    for line in &lines {
        assert_eq!(line["name"], "scheduler.step");
        assert_eq!(line["scope"], "stepscope.scheduler.step");
        assert_eq!(line["policy.name"], "builtin:default");
        assert!(
            line["policy.digest"]
                .as_str()
                .unwrap_or("")
                .starts_with("sha256:")
        );
        assert_eq!(line["sampling.batch_probability"], 1.0);
        assert_eq!(line["sampling.rich_probability"], 1.0);
        let step_id = line["step.id"].as_u64().expect("step.id");
        let want = expected[&step_id];
        assert_eq!(line["start_time_unix_nano"], want.summary.ts_start_ns);
        let events = line["events"].as_array().expect("events");
        assert_eq!(events[0]["name"], "step.BATCH_SUMMARY");
        let batch = events[0]["attributes"].as_object().expect("attributes");
        assert_eq!(
            batch.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            record::BATCH_SUMMARY_ATTRIBUTES.into_iter().collect()
        );
        // Span-level, as on the OTLP span: the batch numbers, the OpenInference kind, and an
        // end after the batch was decided (the whole step).
        for name in record::BATCH_SUMMARY_ATTRIBUTES {
            assert_eq!(line[name], batch[name], "{name}");
        }
        assert_eq!(line["openinference.span.kind"], "CHAIN");
        let end = line["end_time_unix_nano"].as_u64().expect("end time");
        // The whole step: after the batch was decided, and strictly after when a forward pass
        // ran (the engine's step times are monotonic durations from one wall-clock read).
        if want.summary.scheduled_tokens > 0 {
            assert!(end > want.summary.ts_end_ns, "step {step_id}");
        } else {
            assert!(end >= want.summary.ts_end_ns, "step {step_id}");
        }
        assert_eq!(events.len(), 1 + want.running.len());
        for (event, req) in events[1..].iter().zip(&want.running) {
            assert_eq!(event["name"], "step.REQUEST_SNAPSHOT");
            let a = &event["attributes"];
            assert_eq!(a["request.id"], req.id.to_string());
            assert_eq!(a["step.id"], step_id);
            for name in [
                "request.phase",
                "request.num_prompt_tokens",
                "request.num_computed_tokens",
                "request.num_output_tokens",
                "request.num_preemptions",
                "request.scheduled_tokens_this_step",
                "kv.blocks_allocated_gpu",
                "kv.blocks_cached_gpu",
            ] {
                assert!(a.get(name).is_some(), "{name} missing");
            }
            assert_eq!(a["kv.blocks_allocated_gpu"], req.kv_blocks_allocated);
            if let Some(len) = req.effective_prompt_len {
                assert_eq!(a["request.effective_prompt_len"], len);
                saw_effective = true;
            } else {
                assert!(a.get("request.effective_prompt_len").is_none());
            }
        }
    }
    assert!(saw_effective);

    // `policy replay` gets back exactly the summaries the policy saw.
    let file = std::io::BufReader::new(std::fs::File::open(&path).expect("open"));
    let summaries = jsonl::read_step_summaries(file, SEED).expect("read back");
    let want: Vec<_> = steps.iter().map(|s| s.summary).collect();
    // `StepSummary` (generated) has no `PartialEq`; `{:?}` prints every field exactly.
    assert_eq!(format!("{summaries:?}"), format!("{want:?}"));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn every_flag_travels_from_the_command_line_into_the_running_tracer() {
    let file = temp_path("flags.jsonl");
    let recorded = temp_path("flags-recorded.jsonl");
    let pressure = guest("pressure");
    let cli = Cli::try_parse_from([
        "stepscope",
        "serve",
        "--step-tracing-enabled",
        "--step-tracing-sample-rate",
        "0.25",
        "--step-tracing-rich-subsample-rate",
        "0.5",
        "--step-tracing-policy",
        pressure.to_str().expect("utf-8 path"),
        "--step-tracing-policy-arg",
        "kv_usage_threshold=0.99",
        "--step-tracing-policy-arg",
        "rich_top_k=2",
        "--step-tracing-policy-fuel",
        "5000000",
        "--step-tracing-policy-memory-mib",
        "32",
        "--step-tracing-policy-deadline-ms",
        "7",
        "--step-tracing-policy-configure-deadline-ms",
        "900",
        "--step-tracing-policy-budget-us",
        "400",
        "--step-tracing-policy-budget-share",
        "0.1",
        "--otlp-traces-endpoint",
        "http://127.0.0.1:9/",
        "--otlp-protocol",
        "http",
        "--step-tracing-file",
        file.to_str().expect("utf-8 path"),
        "--record-steps",
        recorded.to_str().expect("utf-8 path"),
        "--enable-journey-tracing",
        "--journey-tracing-sample-rate",
        "0.75",
    ])
    .expect("parse");
    let Command::Serve(serve) = cli.command else {
        panic!("not serve")
    };
    let env: HashMap<&str, &str> = [
        (ENV_SERVICE_NAME, "svc-under-test"),
        (ENV_OTLP_TRACES_HEADERS, "x-tenant=t1"),
        // Overridden by the flags.
        (ENV_OTLP_TRACES_ENDPOINT, "http://elsewhere:4317"),
        (ENV_OTLP_PROTOCOL, "grpc"),
    ]
    .into_iter()
    .collect();
    let config = StepTracingConfig::resolve(serve.step_tracing.settings(), 1234, |name| {
        env.get(name).map(|v| v.to_string())
    })
    .expect("config");
    let expected = StepTracingConfig {
        step_tracing_enabled: true,
        policy_params: PolicyParams {
            sample_rate: 0.25,
            rich_subsample_rate: 0.5,
            journey_sample_rate: 0.75,
            args: vec![
                ("kv_usage_threshold".into(), "0.99".into()),
                ("rich_top_k".into(), "2".into()),
            ],
        },
        policy: PolicySource::File(pressure.clone()),
        policy_limits: PolicyLimits {
            fuel_per_call: 5_000_000,
            memory_bytes: 32 << 20,
            call_deadline: Duration::from_millis(7),
            configure_deadline: Duration::from_millis(900),
            ..PolicyLimits::default()
        },
        policy_budget: crate::policy::budget::BudgetConfig {
            floor: Duration::from_micros(400),
            share: 0.1,
        },
        seed: 1234,
        otlp: Some(OtlpConfig {
            endpoint: "http://127.0.0.1:9/v1/traces".into(),
            protocol: OtlpProtocol::HttpProtobuf,
            headers: vec![("x-tenant".into(), "t1".into())],
            tls: Default::default(),
        }),
        service_name: "svc-under-test".into(),
        step_tracing_file: Some(file.clone()),
        record_steps: Some(recorded.clone()),
        journey_sample_rate: Some(0.75),
        ..StepTracingConfig::default()
    };
    assert_eq!(config, expected);

    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    assert!(observer.is_enabled());
    assert_eq!(
        handle.config(),
        &expected,
        "the tracer runs with the parsed config"
    );
    let policy = handle.policy().expect("running policy").clone();
    assert_eq!(policy.name, pressure.display().to_string());
    assert_eq!(
        policy.limits, expected.policy_limits,
        "fuel, memory and deadlines reach the module"
    );
    assert_eq!(
        policy.params,
        vec![
            ("sample_rate".to_string(), "0.25".to_string()),
            ("rich_subsample_rate".to_string(), "0.5".to_string()),
            ("journey_sample_rate".to_string(), "0.75".to_string()),
            ("kv_usage_threshold".to_string(), "0.99".to_string()),
            ("rich_top_k".to_string(), "2".to_string()),
        ]
    );

    // And the running tracer acts on them: with no KV pressure the pressure policy samples at
    // the 0.25 base rate with the seed's draws, rich at 0.5, at most 2 snapshots, into the file.
    let (engine_config, requests) = mixed_workload();
    let (steps, _) = run_engine(engine_config, &requests, observer, 1234, 1000);
    let metrics = handle.shutdown();
    assert!(
        steps
            .iter()
            .all(|s| s.summary.kv_usage_ratio <= 0.99 && s.summary.num_preempted == 0)
    );
    let sampled: BTreeSet<u64> = steps
        .iter()
        .map(|s| s.summary.step_id)
        .filter(|&id| step_draws(1234, id).0 < 0.25)
        .collect();
    let rich: BTreeSet<u64> = sampled
        .iter()
        .copied()
        .filter(|&id| step_draws(1234, id).1 < 0.5)
        .collect();
    let text = std::fs::read_to_string(&file).expect("trace file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let got: BTreeSet<u64> = lines.iter().filter_map(|l| l["step.id"].as_u64()).collect();
    assert_eq!(got, sampled);
    let got_rich: BTreeSet<u64> = lines
        .iter()
        .filter(|l| l.get("sampling.rich_probability").is_some())
        .filter_map(|l| l["step.id"].as_u64())
        .collect();
    assert_eq!(got_rich, rich);
    for line in &lines {
        assert_eq!(line["sampling.batch_probability"], 0.25);
        assert_eq!(line["policy.reason"], "base_rate");
        assert!(line["events"].as_array().map_or(0, Vec::len) <= 3);
    }
    // The collector at port 9 is not there: those spans are counted as failed, not lost.
    assert_eq!(metrics.records_queued, sampled.len() as u64);
    assert_eq!(metrics.spans_export_failed, sampled.len() as u64);
    // --record-steps got every step the tracer saw, sampled or not, in order.
    let recorded_ids: Vec<u64> = std::fs::read_to_string(&recorded)
        .expect("recording")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["step.id"]
                .as_u64()
                .expect("id")
        })
        .collect();
    let all: Vec<u64> = steps.iter().map(|s| s.summary.step_id).collect();
    assert_eq!(recorded_ids, all);
    assert_eq!(metrics.steps_recorded, all.len() as u64);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&recorded);
}

#[test]
fn disabled_tracing_loads_nothing_and_counts_nothing() {
    let cli = Cli::try_parse_from(["stepscope", "serve"]).expect("parse");
    let Command::Serve(serve) = cli.command else {
        panic!("not serve")
    };
    let config =
        StepTracingConfig::resolve(serve.step_tracing.settings(), 0, |_| None).expect("config");
    let (observer, mut handle) = StepTracer::start(config).expect("tracer");
    assert!(!observer.is_enabled() && !handle.is_enabled());
    assert!(handle.policy().is_none());
    let (engine_config, requests) = mixed_workload();
    let (steps, finished) = run_engine(engine_config, &requests, observer, 0, 1000);
    assert!(!steps.is_empty());
    assert_eq!(finished, requests.len());
    assert!(handle.flush());
    assert_eq!(handle.shutdown(), TracerMetricsSnapshot::default());
}
