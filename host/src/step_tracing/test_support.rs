//! Test helpers for step tracing: in-process OTLP receivers (the `fake-opentelemetry-collector`
//! gRPC server, and a minimal OTLP/HTTP-protobuf server decoding requests with prost), a common
//! span shape both convert into, and an engine driver that records, at every step, what the
//! engine itself says (summary, per-request numbers, KV blocks) for the assertions to compare.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as ProtoKeyValue, any_value};
use prost::Message;

use crate::engine::{
    EngineConfig, EngineCore, RequestPhase, SamplingParams, StepObserver, StepView,
};
use crate::policy::StepSummary;
use crate::testing::DeterministicRunner;

use super::StepTracerObserver;
use super::record::{sat_u32, step_summary};

/// An attribute value as received.
#[derive(Debug, Clone, PartialEq)]
pub enum TestValue {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    Other(String),
}

impl TestValue {
    pub fn int(&self) -> i64 {
        match self {
            TestValue::Int(v) => *v,
            other => panic!("not an int: {other:?}"),
        }
    }

    pub fn float(&self) -> f64 {
        match self {
            TestValue::Float(v) => *v,
            other => panic!("not a float: {other:?}"),
        }
    }

    pub fn str(&self) -> &str {
        match self {
            TestValue::Str(v) => v,
            other => panic!("not a string: {other:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CollectedEvent {
    pub name: String,
    pub time_unix_nano: u64,
    pub attributes: BTreeMap<String, TestValue>,
}

/// A span as a receiver got it.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedSpan {
    /// Instrumentation scope (`None` where the receiver does not report it).
    pub scope: Option<String>,
    /// `service.name` of the resource (`None` where not reported).
    pub service_name: Option<String>,
    pub name: String,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub attributes: BTreeMap<String, TestValue>,
    pub events: Vec<CollectedEvent>,
    pub dropped_events_count: u32,
}

impl CollectedSpan {
    pub fn attr(&self, name: &str) -> &TestValue {
        self.attributes
            .get(name)
            .unwrap_or_else(|| panic!("span has no attribute {name}: {:?}", self.attributes))
    }

    pub fn step_id(&self) -> u64 {
        self.attr("step.id").int() as u64
    }
}

fn proto_value(value: &Option<AnyValue>) -> TestValue {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::IntValue(v)) => TestValue::Int(*v),
        Some(any_value::Value::DoubleValue(v)) => TestValue::Float(*v),
        Some(any_value::Value::StringValue(v)) => TestValue::Str(v.clone()),
        Some(any_value::Value::BoolValue(v)) => TestValue::Bool(*v),
        other => TestValue::Other(format!("{other:?}")),
    }
}

fn proto_attrs(attrs: &[ProtoKeyValue]) -> BTreeMap<String, TestValue> {
    attrs
        .iter()
        .map(|kv| (kv.key.clone(), proto_value(&kv.value)))
        .collect()
}

/// Every span of an OTLP export request, with scope and service name.
pub fn spans_of_request(request: &ExportTraceServiceRequest) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let service_name = rs.resource.as_ref().and_then(|r| {
            r.attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .map(|kv| match proto_value(&kv.value) {
                    TestValue::Str(s) => s,
                    other => format!("{other:?}"),
                })
        });
        for ss in &rs.scope_spans {
            let scope = ss.scope.as_ref().map(|s| s.name.clone());
            for span in &ss.spans {
                out.push(CollectedSpan {
                    scope: scope.clone(),
                    service_name: service_name.clone(),
                    name: span.name.clone(),
                    start_time_unix_nano: span.start_time_unix_nano,
                    end_time_unix_nano: span.end_time_unix_nano,
                    attributes: proto_attrs(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|e| CollectedEvent {
                            name: e.name.clone(),
                            time_unix_nano: e.time_unix_nano,
                            attributes: proto_attrs(&e.attributes),
                        })
                        .collect(),
                    dropped_events_count: span.dropped_events_count,
                });
            }
        }
    }
    out
}

/// Parses the fake collector's `format!("{:?}", Option<AnyValue>)` attribute strings, e.g.
/// `Some(AnyValue { value: Some(IntValue(5)) })`.
fn debug_value(text: &str) -> TestValue {
    let scalar = |prefix: &str| {
        text.find(prefix).map(|start| {
            let rest = &text[start + prefix.len()..];
            rest[..rest.find(')').unwrap_or(rest.len())].to_string()
        })
    };
    if let Some(v) = scalar("IntValue(") {
        return v
            .parse()
            .map_or(TestValue::Other(text.into()), TestValue::Int);
    }
    if let Some(v) = scalar("DoubleValue(") {
        return v
            .parse()
            .map_or(TestValue::Other(text.into()), TestValue::Float);
    }
    if let Some(v) = scalar("BoolValue(") {
        return v
            .parse()
            .map_or(TestValue::Other(text.into()), TestValue::Bool);
    }
    if let Some(start) = text.find("StringValue(\"") {
        // A Debug-quoted string: scan to the closing unescaped quote.
        let quoted = &text[start + "StringValue(".len()..];
        let mut end = None;
        let mut escaped = false;
        for (i, c) in quoted.char_indices().skip(1) {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        if let Some(end) = end
            && let Ok(v) = serde_json::from_str::<String>(&quoted[..=end])
        {
            return TestValue::Str(v);
        }
    }
    TestValue::Other(text.to_string())
}

fn debug_attrs(attrs: &BTreeMap<String, String>) -> BTreeMap<String, TestValue> {
    attrs
        .iter()
        .map(|(k, v)| (k.clone(), debug_value(v)))
        .collect()
}

/// Converts a span received by `fake-opentelemetry-collector` (which drops scope and resource).
pub fn from_fake(span: &fake_opentelemetry_collector::ExportedSpan) -> CollectedSpan {
    CollectedSpan {
        scope: None,
        service_name: None,
        name: span.name.clone(),
        start_time_unix_nano: span.start_time_unix_nano,
        end_time_unix_nano: span.end_time_unix_nano,
        attributes: debug_attrs(&span.attributes),
        events: span
            .events
            .iter()
            .map(|e| CollectedEvent {
                name: e.name.clone(),
                time_unix_nano: e.time_unix_nano,
                attributes: debug_attrs(&e.attributes),
            })
            .collect(),
        dropped_events_count: span.dropped_events_count,
    }
}

/// The in-process gRPC collector (`fake-opentelemetry-collector`), drained continuously so its
/// 64-span channel never stalls an export.
pub struct GrpcCollector {
    pub endpoint: String,
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    /// Runs the server and the drain task; both end when the collector is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl GrpcCollector {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("test runtime");
        let mut server = runtime
            .block_on(fake_opentelemetry_collector::FakeCollectorServer::start())
            .expect("fake collector");
        let endpoint = server.endpoint();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&spans);
        runtime.spawn(async move {
            loop {
                let batch = server.exported_spans(1, Duration::from_millis(20)).await;
                sink.lock()
                    .expect("collector lock")
                    .extend(batch.iter().map(from_fake));
            }
        });
        Self {
            endpoint,
            spans,
            _runtime: runtime,
        }
    }

    /// Waits (up to 20 s) until at least `n` spans arrived; returns all received so far.
    pub fn wait_for(&self, n: usize) -> Vec<CollectedSpan> {
        wait_for(&self.spans, n)
    }
}

fn wait_for(spans: &Mutex<Vec<CollectedSpan>>, n: usize) -> Vec<CollectedSpan> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = spans.lock().expect("collector lock").clone();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A minimal OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, answered `200`.
pub struct HttpCollector {
    /// The traces URL (`http://127.0.0.1:PORT/v1/traces`).
    pub endpoint: String,
    /// The base URL (`http://127.0.0.1:PORT`).
    pub base: String,
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl HttpCollector {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (sink, path_sink) = (Arc::clone(&spans), Arc::clone(&paths));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (sink, path_sink) = (Arc::clone(&sink), Arc::clone(&path_sink));
                std::thread::spawn(move || serve_connection(stream, &sink, &path_sink));
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}/v1/traces"),
            base: format!("http://127.0.0.1:{port}"),
            spans,
            paths,
        }
    }

    pub fn wait_for(&self, n: usize) -> Vec<CollectedSpan> {
        wait_for(&self.spans, n)
    }

    /// Request paths seen.
    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().expect("lock").clone()
    }
}

fn serve_connection(
    stream: TcpStream,
    sink: &Mutex<Vec<CollectedSpan>>,
    paths: &Mutex<Vec<String>>,
) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let mut content_length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                let value = value.trim();
                if name == "content-length" {
                    content_length = value.parse::<usize>().ok();
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size_line = String::new();
                if reader.read_line(&mut size_line).unwrap_or(0) == 0 {
                    return;
                }
                let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; size + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(len) = content_length {
            body.resize(len, 0);
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        paths.lock().expect("lock").push(path);
        let status = match ExportTraceServiceRequest::decode(body.as_slice()) {
            Ok(request) => {
                sink.lock()
                    .expect("lock")
                    .extend(spans_of_request(&request));
                "200 OK"
            }
            Err(_) => "400 Bad Request",
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// What the engine said about one running request at a step's emission point.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedRequest {
    pub id: u64,
    pub is_prefill: bool,
    pub num_prompt_tokens: u32,
    pub num_computed_tokens: u32,
    pub num_output_tokens: u32,
    pub num_preemptions: u32,
    pub scheduled_tokens: u32,
    /// From the KV cache manager (`per_request_kv_metrics`).
    pub kv_blocks_allocated: u32,
    pub kv_blocks_cached: u32,
    pub effective_prompt_len: Option<u32>,
}

/// What the engine said about one step.
#[derive(Debug, Clone)]
pub struct ExpectedStep {
    pub summary: StepSummary,
    pub running: Vec<ExpectedRequest>,
}

fn expected_step(view: &StepView<'_>, seed: u64) -> ExpectedStep {
    ExpectedStep {
        summary: step_summary(view, seed),
        running: view
            .running_requests()
            .map(|r| {
                let (allocated, cached) = r.kv_blocks();
                ExpectedRequest {
                    id: r.id(),
                    is_prefill: r.phase() == RequestPhase::Prefill,
                    num_prompt_tokens: sat_u32(r.num_prompt_tokens()),
                    num_computed_tokens: sat_u32(r.num_computed_tokens()),
                    num_output_tokens: sat_u32(r.num_output_tokens()),
                    num_preemptions: r.num_preemptions(),
                    scheduled_tokens: sat_u32(r.scheduled_tokens_this_step()),
                    kv_blocks_allocated: sat_u32(allocated),
                    kv_blocks_cached: sat_u32(cached),
                    effective_prompt_len: r.effective_prompt_len().map(sat_u32),
                }
            })
            .collect(),
    }
}

/// A request to run: prompt, parameters, and the step before which it is added (0: at once).
#[derive(Debug, Clone)]
pub struct TestRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub add_before_step: usize,
}

/// Distinct tokens for request `i` (no accidental prefix sharing).
pub fn distinct_prompt(i: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((i * 7919 + j * 31 + 1) % vocab) as u32)
        .collect()
}

pub const TEST_VOCAB: usize = 512;

/// Records what the engine says at each step, then shows the step to the tracer.
struct RecordingObserver {
    sink: Arc<Mutex<Vec<ExpectedStep>>>,
    tracer: StepTracerObserver,
    seed: u64,
}

impl StepObserver for RecordingObserver {
    fn on_step(&mut self, view: &StepView<'_>) {
        let expected = expected_step(view, self.seed);
        self.sink.lock().expect("lock").push(expected);
        self.tracer.on_step(view);
    }

    fn on_step_end(&mut self, step_id: u64, ts_end_ns: u64) {
        self.tracer.on_step_end(step_id, ts_end_ns);
    }
}

/// Runs a real `EngineCore` with the deterministic paged-KV runner until every request is
/// done (or `max_steps`), showing each step to `tracer` after recording what the engine says.
/// Returns the recorded steps and the number of finished requests.
pub fn run_engine(
    config: EngineConfig,
    requests: &[TestRequest],
    tracer: StepTracerObserver,
    seed: u64,
    max_steps: usize,
) -> (Vec<ExpectedStep>, usize) {
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let observer = RecordingObserver {
        sink: Arc::clone(&recorded),
        tracer,
        seed,
    };
    let runner =
        DeterministicRunner::new(config.num_kv_blocks, config.block_size, TEST_VOCAB, 4096);
    let mut core = EngineCore::new(
        EngineConfig { seed, ..config },
        Box::new(runner),
        Box::new(observer),
    )
    .expect("engine config");
    let mut finished = 0;
    let mut next_id = 1u64;
    let mut step = 0usize;
    loop {
        for request in requests.iter().filter(|r| r.add_before_step == step) {
            core.add_request(next_id, request.prompt.clone(), request.params.clone())
                .expect("add request");
            next_id += 1;
        }
        let pending_later = requests.iter().any(|r| r.add_before_step > step);
        if !core.has_unfinished_requests() && !pending_later {
            break;
        }
        if step >= max_steps {
            break;
        }
        let out = core.step();
        finished += out
            .outputs
            .iter()
            .filter(|o| o.finish_reason.is_some())
            .count();
        core.check_invariants().expect("engine invariants");
        step += 1;
    }
    drop(core);
    let steps = std::mem::take(&mut *recorded.lock().expect("lock"));
    (steps, finished)
}
