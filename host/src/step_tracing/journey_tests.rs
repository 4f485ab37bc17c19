//! Request journeys end to end in one process: a real engine (deterministic runner, a KV pool
//! small enough to preempt), the tracer with journeys and steps at rate 1.0 writing the
//! JSON-lines file and the `--record-steps` file, and `llm_request` halves sent as the server
//! sends them. The file alone must rebuild every tree: `llm_request` → `llm_core` (in the caller's
//! trace when it sent a `traceparent`), lifecycle events in order, one `PREEMPTED` per preemption,
//! `scheduler.step` naming real steps, snapshots carrying `request.trace_id`, and step links that
//! resolve to `llm_core` spans.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value as Json;

use super::test_support::{TEST_VOCAB, distinct_prompt};
use super::*;
use crate::engine::journey::JourneyTicket;
use crate::engine::{Engine, EngineConfig, FinishReason, SamplingParams};
use crate::policy::random::journey_draw;
use crate::policy::{
    GUEST_COMPONENT_DIR, PolicyCounters, PolicyModule, PolicyRuntime, PolicySource,
};
use crate::testing::DeterministicRunner;
use crate::trace_context::TraceParent;

const SEED: u64 = 5;
const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("stepscope-{}-{name}", std::process::id()))
}

fn lines(path: &PathBuf) -> Vec<Json> {
    std::fs::read_to_string(path)
        .expect("trace file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn server_half(external: &str, arrived: Stamp, outcome: RequestOutcome) -> RequestSpanRecord {
    RequestSpanRecord {
        info: RequestInfo {
            operation: "text_completion",
            request_id: external.to_string(),
            response_id: format!("cmpl-{external}"),
            model: "deterministic".into(),
            max_tokens: Some(24),
            temperature: 0.0,
            top_p: 1.0,
            n: 1,
        },
        input_tokens: 40,
        output_tokens: 24,
        queue_time_s: None,
        arrived,
        handoff: Some(arrived),
        first_response: None,
        end: Stamp::now(),
        outcome,
    }
}

struct Run {
    lines: Vec<Json>,
    recorded: Vec<Json>,
    metrics: TracerMetricsSnapshot,
    /// External id → (engine id, final num_preemptions, finish reason).
    finals: BTreeMap<String, (u64, u32, FinishReason)>,
}

/// Runs `n` requests (every third with a sampled `traceparent`, the last aborted after its
/// first token) through an engine traced at journey rate `rate`.
fn run(rate: f64, n: usize, kv_blocks: usize, max_tokens: usize) -> Run {
    run_with(
        PolicySource::BuiltinDefault,
        rate,
        n,
        (kv_blocks, max_tokens),
    )
}

fn run_with(
    policy: PolicySource,
    rate: f64,
    n: usize,
    (kv_blocks, max_tokens): (usize, usize),
) -> Run {
    let tag = format!("{rate}-{}", matches!(policy, PolicySource::File(_)));
    let file = temp_path(&format!("journeys-{tag}.jsonl"));
    let record = temp_path(&format!("journeys-{tag}-all.jsonl"));
    let config = StepTracingConfig {
        policy,
        step_tracing_file: Some(file.clone()),
        record_steps: Some(record.clone()),
        journey_sample_rate: Some(rate),
        ..StepTracingConfig::enabled_with_rates(1.0, 1.0, SEED)
    };
    let (observer, mut tracer) = StepTracer::start(config).expect("tracer");
    let sink = tracer.journey_sink().expect("journeys on");
    let engine_config = EngineConfig {
        block_size: 16,
        num_kv_blocks: kv_blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        seed: SEED,
        ..EngineConfig::default()
    };
    let runner = DeterministicRunner::new(kv_blocks, 16, TEST_VOCAB, 4096)
        .with_step_delay(std::time::Duration::from_micros(500));
    let engine =
        Engine::start(engine_config, Box::new(runner), Box::new(observer)).expect("engine");
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    };
    let mut pending = Vec::new();
    for i in 0..n {
        let external = format!("req-{i}");
        let parent =
            (i.is_multiple_of(3)).then(|| TraceParent::parse(CALLER, Some("vendor=1")).unwrap());
        let ticket = JourneyTicket::new(parent, 1);
        let arrived = Stamp::now();
        let request = engine
            .validate(distinct_prompt(i, 40, TEST_VOCAB), params.clone())
            .expect("valid")
            .with_external_id(Arc::from(external.as_str()))
            .with_journey(Arc::clone(&ticket));
        let (id, rx) = engine.submit(request).expect("submit");
        pending.push((external, id, rx, ticket, arrived));
    }
    let mut finals = BTreeMap::new();
    let last = pending.len() - 1;
    // The last request first: it is aborted at its first token, while it still runs.
    let mut order: Vec<_> = pending.into_iter().enumerate().collect();
    order.rotate_right(1);
    for (i, (external, id, mut rx, ticket, arrived)) in order {
        let mut outcome = RequestOutcome::Departed;
        while let Some(output) = rx.blocking_recv() {
            if i == last && output.finish_reason.is_none() {
                engine.abort(id);
                outcome = RequestOutcome::Aborted("client disconnected".into());
            }
            if let Some(reason) = output.finish_reason {
                finals.insert(external.clone(), (id, output.num_preemptions, reason));
                break;
            }
        }
        let sink = sink.clone();
        let half = server_half(&external, arrived, outcome);
        ticket.when_traced(move |decision| sink.send(decision, half));
    }
    engine.shutdown().expect("engine shutdown");
    let metrics = tracer.shutdown();
    let run = Run {
        lines: lines(&file),
        recorded: lines(&record),
        metrics,
        finals,
    };
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&record);
    run
}

fn named<'a>(lines: &'a [Json], name: &str) -> Vec<&'a Json> {
    lines.iter().filter(|l| l["name"] == name).collect()
}

fn event_names(span: &Json) -> Vec<&str> {
    span["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect()
}

#[test]
fn every_traced_request_is_a_tree_joined_to_its_steps() {
    let run = run(1.0, 12, 24, 24);
    let requests = named(&run.lines, "llm_request");
    let cores = named(&run.lines, "llm_core");
    let steps = named(&run.lines, "scheduler.step");
    assert_eq!(requests.len(), 12);
    assert_eq!(cores.len(), 12);
    assert_eq!(run.metrics.journeys_traced, 12);
    assert_eq!(run.metrics.journey_spans_queued, 24);
    assert_eq!(run.metrics.journey_spans_dropped, 0);
    let real_steps: BTreeSet<u64> = named(&run.recorded, "scheduler.step")
        .iter()
        .map(|l| l["step.id"].as_u64().expect("step.id"))
        .collect();
    let caller = TraceParent::parse(CALLER, None).unwrap();
    let total_preemptions: u32 = run.finals.values().map(|f| f.1).sum();
    assert!(
        total_preemptions > 0,
        "the KV pool is small enough to preempt"
    );

    let mut core_by_span = BTreeMap::new();
    for core in &cores {
        let external = core["request.id"].as_str().expect("request.id");
        let (_, preemptions, reason) = run.finals[external];
        let request = requests
            .iter()
            .find(|r| r["gen_ai.request.id"] == external)
            .expect("its llm_request");
        // One tree: llm_request → llm_core, in one trace.
        assert_eq!(core["trace_id"], request["trace_id"]);
        assert_eq!(core["parent_span_id"], request["span_id"]);
        assert_eq!(core["scope"], "stepscope.scheduler");
        assert_eq!(request["scope"], "stepscope.api");
        assert_eq!(request["kind"], "SERVER");
        assert_eq!(request["openinference.span.kind"], "LLM");
        let i: usize = external["req-".len()..].parse().unwrap();
        if i.is_multiple_of(3) {
            assert_eq!(request["trace_id"], caller.trace_id.to_string());
            assert_eq!(request["parent_span_id"], caller.parent_span_id.to_string());
            assert_eq!(request["sampling.journey_probability"], 1.0);
        } else {
            assert_ne!(request["trace_id"], caller.trace_id.to_string());
            assert_eq!(request["parent_span_id"], Json::Null);
        }
        // Lifecycle order, one PREEMPTED per preemption, one SCHEDULED per admission.
        let names = event_names(core);
        assert_eq!(
            names.first(),
            Some(&"journey.QUEUED"),
            "{external}: {names:?}"
        );
        assert_eq!(
            names.last(),
            Some(&"journey.FINISHED"),
            "{external}: {names:?}"
        );
        let count = |n: &str| names.iter().filter(|&&x| x == n).count();
        assert_eq!(
            count("journey.PREEMPTED"),
            preemptions as usize,
            "{external}"
        );
        let events = core["events"].as_array().unwrap();
        let kinds: Vec<&str> = events
            .iter()
            .filter(|e| e["name"] == "journey.SCHEDULED")
            .map(|e| e["attributes"]["schedule.kind"].as_str().unwrap())
            .collect();
        if reason != FinishReason::Abort || names.contains(&"journey.SCHEDULED") {
            assert_eq!(kinds.len(), 1 + preemptions as usize, "{external}");
            assert_eq!(kinds[0], "FIRST");
            assert!(kinds[1..].iter().all(|k| *k == "RESUME"));
        }
        let mut previous = (0, 0);
        for event in events {
            let a = &event["attributes"];
            let step = a["scheduler.step"].as_u64().unwrap();
            assert!(
                real_steps.contains(&step),
                "{external}: step {step} never ran"
            );
            let mono = a["ts.monotonic"].as_u64().unwrap();
            assert!((step, mono) >= previous, "{external}: events out of order");
            previous = (step, mono);
            for key in [
                "phase",
                "prefill_done_tokens",
                "prefill_total_tokens",
                "decode_done_tokens",
                "decode_max_tokens",
                "num_preemptions",
            ] {
                assert!(a.get(key).is_some(), "{external}: {key}");
            }
        }
        let finished = &events.last().unwrap()["attributes"];
        let status = match reason {
            FinishReason::Abort => "aborted",
            FinishReason::Length => "length",
            FinishReason::Stop => "stopped",
            FinishReason::Error => "error",
        };
        assert_eq!(finished["finish.status"], status, "{external}");
        assert_eq!(finished["num_preemptions"], preemptions);
        core_by_span.insert(
            core["span_id"].as_str().unwrap().to_string(),
            (
                core["trace_id"].as_str().unwrap().to_string(),
                external.to_string(),
            ),
        );
        let api_events = event_names(request);
        if i == 11 {
            assert_eq!(status, "aborted");
            assert_eq!(api_events.last(), Some(&"api.ABORTED"));
        } else {
            assert_eq!(
                api_events,
                ["api.ARRIVED", "api.HANDOFF_TO_CORE", "api.DEPARTED"]
            );
        }
    }

    // Steps link to the llm_core spans of the requests they snapshot, whose trace ids they carry.
    let mut links = 0;
    for step in &steps {
        assert_eq!(step["parent_span_id"], Json::Null);
        assert_eq!(step["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(step["span_id"].as_str().unwrap().len(), 16);
        let step_links = step["links"].as_array().expect("links");
        let snapshots: Vec<&Json> = step["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "step.REQUEST_SNAPSHOT")
            .collect();
        assert_eq!(
            step_links.len(),
            snapshots.len(),
            "every snapshotted request is traced"
        );
        for (link, snapshot) in step_links.iter().zip(&snapshots) {
            let (trace, external) = &core_by_span[link["span_id"].as_str().unwrap()];
            assert_eq!(link["trace_id"], trace.as_str());
            assert_eq!(snapshot["attributes"]["request.trace_id"], trace.as_str());
            assert_eq!(snapshot["attributes"]["request.id"], external.as_str());
            links += 1;
        }
    }
    assert!(links > 0);
    // Replay still reads the step spans alone from the shared file.
    let file = temp_path("journeys-replay.jsonl");
    std::fs::write(
        &file,
        run.lines
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let summaries = jsonl::read_step_summaries(
        std::io::BufReader::new(std::fs::File::open(&file).unwrap()),
        SEED,
    )
    .expect("read back");
    assert_eq!(summaries.len(), steps.len());
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_rate_decides_from_the_seed_and_untraced_requests_leave_nothing() {
    let run = run(0.5, 40, 512, 2);
    let traced: BTreeSet<String> = named(&run.lines, "llm_core")
        .iter()
        .map(|c| c["request.id"].as_str().unwrap().to_string())
        .collect();
    let requests: BTreeSet<String> = named(&run.lines, "llm_request")
        .iter()
        .map(|c| c["gen_ai.request.id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(traced, requests, "both spans or neither");
    let expected: BTreeSet<String> = run
        .finals
        .iter()
        .filter(|(external, (id, _, _))| {
            let i: usize = external["req-".len()..].parse().unwrap();
            // A sampled caller is always traced; the others follow the draw.
            i.is_multiple_of(3) || journey_draw(SEED, *id) < 0.5
        })
        .map(|(external, _)| external.clone())
        .collect();
    assert_eq!(traced, expected);
    assert!(traced.len() < 40 && traced.len() > 13, "{}", traced.len());
    assert_eq!(run.metrics.journeys_traced, traced.len() as u64);
    assert_eq!(run.metrics.journeys_untraced, 40 - traced.len() as u64);
    // Untraced requests' snapshots carry no trace id and their steps no link to them.
    for step in named(&run.lines, "scheduler.step") {
        for event in step["events"].as_array().unwrap() {
            if event["name"] == "step.REQUEST_SNAPSHOT" {
                let a = &event["attributes"];
                let id = a["request.id"].as_str().unwrap();
                assert_eq!(a.get("request.trace_id").is_some(), traced.contains(id));
            }
        }
    }
    for request in named(&run.lines, "llm_request") {
        let p = request["sampling.journey_probability"].as_f64().unwrap();
        assert!(p == 0.5 || p == 1.0);
    }
}

fn traced_ids(run: &Run) -> BTreeSet<String> {
    named(&run.lines, "llm_core")
        .iter()
        .map(|c| c["request.id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_0_1_policy_gets_the_hosts_rule_and_replay_covers_decide_request() {
    let v01 = std::path::Path::new(GUEST_COMPONENT_DIR).join("default-v01.wasm");
    let new = run(0.5, 40, 512, 2);
    let old = run_with(PolicySource::File(v01.clone()), 0.5, 40, (512, 2));
    // The 0.2 default's decide-request and the host's rule for a 0.1 policy agree.
    assert_eq!(traced_ids(&new), traced_ids(&old));
    assert_eq!(old.metrics.policy.total_faults(), 0);

    // Every arrival was recorded with what decide-request was given; replaying them through
    // the default gives the same decisions, and a 0.1 policy says the host decides.
    let recorded: String = new.recorded.iter().map(|l| format!("{l}\n")).collect();
    let arrivals = jsonl::read_recorded_arrivals(std::io::Cursor::new(recorded)).unwrap();
    assert_eq!(arrivals.len(), 40);
    let replay_with = |source: &PolicySource| {
        let module = PolicyModule::load(source, Default::default()).unwrap();
        let params = crate::policy::PolicyParams {
            journey_sample_rate: 0.5,
            ..Default::default()
        };
        let mut runtime = PolicyRuntime::new(
            module,
            params.to_configure(),
            Arc::new(PolicyCounters::default()),
        )
        .unwrap();
        crate::policy::devkit::replay::replay_arrivals(&mut runtime, &arrivals)
    };
    let replayed = replay_with(&PolicySource::BuiltinDefault);
    assert_eq!(replayed.traced, traced_ids(&new).len() as u64);
    assert_eq!(replayed.faults, 0);
    assert!(replay_with(&PolicySource::File(v01)).no_decide_request);
}
