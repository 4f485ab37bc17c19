//! `GET /metrics`: Prometheus text (format 0.0.4) with the `prometheus-client` crate.
//!
//! Two kinds of series. What only the HTTP layer sees (time to first token, inter-token latency,
//! end-to-end latency, requests finished by reason, requests rejected by reason) lives in
//! registered histograms and counters that [`RequestTracker`] updates. What the engine and the
//! step tracer already count (queue depths, KV blocks, prefix-cache queries and hits,
//! preemptions, token totals, tracer and policy counters) is read at scrape time by a
//! [`Collector`] from `EngineHandle::stats` and `TracerMetrics::snapshot`, so nothing is counted
//! twice. Names follow vLLM's (`vllm:num_requests_running` → `stepscope_num_requests_running`);
//! counters get `_total` from the encoder; every series has help text, so
//! `promtool check metrics` passes.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::{EngineHandle, FinishReason};
use crate::observability::TracerMetrics;
use crate::policy::FaultKind;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

type Labels = Vec<(&'static str, &'static str)>;

/// The server's metrics registry.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    finished: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
}

impl ServerMetrics {
    /// Registers everything; `tracer` gives the step tracer's and policy's live counters.
    pub fn new(engine: EngineHandle, tracer: Arc<TracerMetrics>, tracing: TracingInfo) -> Self {
        let mut registry = Registry::default();
        let ttft = Histogram::new(TTFT_BUCKETS);
        let itl = Histogram::new(ITL_BUCKETS);
        let e2e = Histogram::new(E2E_BUCKETS);
        let finished = Family::<Labels, Counter>::default();
        let rejected = Family::<Labels, Counter>::default();
        for reason in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Abort,
            FinishReason::Error,
        ] {
            drop(finished.get_or_create(&vec![("finished_reason", reason.as_str())]));
        }
        registry.register(
            "stepscope_time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            ttft.clone(),
        );
        registry.register(
            "stepscope_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            itl.clone(),
        );
        registry.register(
            "stepscope_e2e_request_latency_seconds",
            "Time from request arrival to its last token (or its abort)",
            e2e.clone(),
        );
        registry.register(
            "stepscope_request_success",
            "Requests finished, by finish reason (abort: the client went away)",
            finished.clone(),
        );
        registry.register(
            "stepscope_requests_rejected",
            "Generation requests refused before running, by reason (error code)",
            rejected.clone(),
        );
        registry.register_collector(Box::new(StatsCollector {
            engine,
            tracer,
            tracing,
        }));
        Self {
            registry,
            ttft,
            itl,
            e2e,
            finished,
            rejected,
        }
    }

    /// The Prometheus text of every series.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Counts a refused request.
    pub fn record_rejection(&self, reason: &'static str) {
        self.rejected.get_or_create(&vec![("reason", reason)]).inc();
    }
}

/// What the tracer runs (for the `stepscope_step_tracing_info` series).
#[derive(Debug, Clone, Default)]
pub struct TracingInfo {
    pub enabled: bool,
    pub policy_name: String,
    pub policy_digest: String,
}

/// Times one generation request and records it when dropped (finished, or abandoned by its
/// client: then it counts as `abort`).
#[derive(Debug)]
pub struct RequestTracker {
    metrics: Arc<ServerMetrics>,
    arrival: Instant,
    last_token: Option<Instant>,
    finish: Option<FinishReason>,
}

impl RequestTracker {
    /// Starts timing at `arrival` (when the request was received).
    pub fn new(metrics: Arc<ServerMetrics>, arrival: Instant) -> Self {
        Self {
            metrics,
            arrival,
            last_token: None,
            finish: None,
        }
    }

    /// Records an engine output with `num_tokens` new tokens and maybe a finish reason.
    pub fn on_output(&mut self, num_tokens: usize, finish: Option<FinishReason>) {
        let now = Instant::now();
        if num_tokens > 0 {
            match self.last_token {
                None => self
                    .metrics
                    .ttft
                    .observe(now.duration_since(self.arrival).as_secs_f64()),
                Some(last) => {
                    let gap = now.duration_since(last).as_secs_f64() / num_tokens as f64;
                    for _ in 0..num_tokens {
                        self.metrics.itl.observe(gap);
                    }
                }
            }
            self.last_token = Some(now);
        }
        if finish.is_some() {
            self.finish = finish;
        }
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        let reason = self.finish.unwrap_or(FinishReason::Abort);
        self.metrics
            .e2e
            .observe(self.arrival.elapsed().as_secs_f64());
        self.metrics
            .finished
            .get_or_create(&vec![("finished_reason", reason.as_str())])
            .inc();
    }
}

/// Reads the engine's and the tracer's counters at scrape time.
#[derive(Debug)]
struct StatsCollector {
    engine: EngineHandle,
    tracer: Arc<TracerMetrics>,
    tracing: TracingInfo,
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> FmtResult {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> FmtResult {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

type FmtResult = Result<(), std::fmt::Error>;

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let stats = self.engine.stats();
        let e = &mut encoder;
        gauge(
            e,
            "stepscope_num_requests_running",
            "Requests in the running queue (holding KV blocks)",
            stats.num_running as f64,
        )?;
        gauge(
            e,
            "stepscope_num_requests_waiting",
            "Requests waiting for admission (preempted ones included)",
            stats.num_waiting as f64,
        )?;
        gauge(
            e,
            "stepscope_kv_cache_usage_ratio",
            "Fraction of KV blocks in use (1 - free / total)",
            stats.kv_usage_ratio,
        )?;
        gauge(
            e,
            "stepscope_kv_cache_blocks_free",
            "KV blocks free (cached-but-unreferenced blocks included)",
            stats.kv_blocks_free as f64,
        )?;
        gauge(
            e,
            "stepscope_num_kv_blocks",
            "KV blocks in the pool (--num-kv-blocks)",
            stats.kv_blocks_total as f64,
        )?;
        counter(
            e,
            "stepscope_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache at admission",
            stats.prefix_cache_queries,
        )?;
        counter(
            e,
            "stepscope_prefix_cache_hits",
            "Prompt tokens found in the prefix cache at admission",
            stats.prefix_cache_hits,
        )?;
        counter(
            e,
            "stepscope_num_preemptions",
            "Requests preempted (blocks freed, recomputed later)",
            stats.num_preemptions_total,
        )?;
        counter(
            e,
            "stepscope_prompt_tokens",
            "Prompt tokens of requests that produced their first token",
            stats.prompt_tokens_total,
        )?;
        counter(
            e,
            "stepscope_generation_tokens",
            "Tokens generated",
            stats.generation_tokens_total,
        )?;
        counter(
            e,
            "stepscope_computed_tokens",
            "Tokens computed by forward passes (prefill, recomputation, decode)",
            stats.computed_tokens_total,
        )?;
        counter(
            e,
            "stepscope_engine_steps",
            "Scheduler steps run",
            stats.num_steps,
        )?;
        counter(
            e,
            "stepscope_engine_requests_finished",
            "Requests the engine finished (any reason)",
            stats.num_requests_finished_total,
        )?;
        counter(
            e,
            "stepscope_model_errors",
            "Failed forward passes",
            stats.model_errors_total,
        )?;
        self.encode_tracer(e)
    }
}

impl StatsCollector {
    fn encode_tracer(&self, e: &mut DescriptorEncoder) -> FmtResult {
        let t = self.tracer.snapshot();
        let info = ConstGauge::new(1i64);
        let labels = [
            (
                "enabled",
                if self.tracing.enabled {
                    "true"
                } else {
                    "false"
                },
            ),
            ("policy", self.tracing.policy_name.as_str()),
            ("digest", self.tracing.policy_digest.as_str()),
        ];
        let mut desc = e.encode_descriptor(
            "stepscope_step_tracing_info",
            "Step tracing configuration (value is always 1)",
            None,
            MetricType::Gauge,
        )?;
        info.encode(desc.encode_family(&labels)?)?;
        counter(
            e,
            "stepscope_step_tracing_steps_seen",
            "Steps shown to the step tracer",
            t.steps_seen,
        )?;
        counter(
            e,
            "stepscope_step_tracing_steps_batch_sampled",
            "Steps whose batch summary was traced",
            t.steps_batch_sampled,
        )?;
        counter(
            e,
            "stepscope_step_tracing_steps_rich_sampled",
            "Steps traced with per-request snapshots",
            t.steps_rich_sampled,
        )?;
        counter(
            e,
            "stepscope_step_tracing_snapshots",
            "Request snapshots emitted",
            t.snapshots_emitted,
        )?;
        counter(
            e,
            "stepscope_step_tracing_records_queued",
            "Trace records handed to the exporter thread",
            t.records_queued,
        )?;
        let mut desc = e.encode_descriptor(
            "stepscope_step_tracing_records_dropped",
            "Trace records dropped before export, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in [
            ("queue_full", t.records_dropped_queue_full),
            ("closed", t.records_dropped_closed),
        ] {
            ConstCounter::new(value).encode(desc.encode_family(&[("reason", reason)])?)?;
        }
        counter(
            e,
            "stepscope_step_tracing_spans_exported",
            "Spans the OTLP collector accepted",
            t.spans_exported,
        )?;
        counter(
            e,
            "stepscope_step_tracing_export_failures",
            "Spans lost by the OTLP exporter (error, timeout, unreachable)",
            t.spans_export_failed,
        )?;
        counter(
            e,
            "stepscope_step_tracing_export_errors",
            "Failed OTLP export calls",
            t.export_errors,
        )?;
        counter(
            e,
            "stepscope_step_tracing_jsonl_lines_written",
            "Lines written to the step-tracing file",
            t.jsonl_lines_written,
        )?;
        counter(
            e,
            "stepscope_step_tracing_jsonl_write_failures",
            "Lines that could not be written to the step-tracing file",
            t.jsonl_write_failures,
        )?;
        let p = t.policy;
        counter(
            e,
            "stepscope_policy_calls",
            "Policy guest calls (decide and plan-rich)",
            p.calls,
        )?;
        let mut desc = e.encode_descriptor(
            "stepscope_policy_faults",
            "Policy calls that gave no usable answer, by kind",
            None,
            MetricType::Counter,
        )?;
        for kind in FaultKind::ALL {
            ConstCounter::new(p.faults_of(kind))
                .encode(desc.encode_family(&[("kind", kind.as_str())])?)?;
        }
        let seconds = ConstCounter::new(p.call_nanos_total as f64 / 1e9);
        seconds.encode(e.encode_descriptor(
            "stepscope_policy_call_seconds",
            "Time spent in policy guest calls",
            None,
            MetricType::Counter,
        )?)?;
        counter(
            e,
            "stepscope_policy_instantiations",
            "Policy instances created (the first one included)",
            p.instantiations,
        )?;
        counter(
            e,
            "stepscope_policy_skipped_backoff",
            "Steps left untraced while a faulty policy backs off",
            p.skipped_backoff,
        )
    }
}
