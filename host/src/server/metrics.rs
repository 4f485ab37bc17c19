//! `GET /metrics`: Prometheus text (format 0.0.4) with the `prometheus-client` crate.
//!
//! Two kinds of series. What only the HTTP layer sees (time to first token, inter-token latency,
//! end-to-end latency, requests finished by reason, requests rejected by reason) lives in
//! registered histograms and counters that [`RequestTracker`] updates. What the engine and the
//! step tracer already count (queue depths, KV blocks, prefix-cache queries and hits,
//! preemptions, token totals, tracer and policy counters) is read at scrape time by the
//! collector in [`collector`](super::collector), so nothing is counted twice. Names follow
//! vLLM's (`vllm:num_requests_running` → `stepscope_num_requests_running`); counters get
//! `_total` from the encoder; every series has help text, so `promtool check metrics` passes.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::{EngineHandle, FinishReason};
use crate::step_tracing::TracerMetrics;

use super::collector::StatsCollector;

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
            "Requests finished, by finish reason (abort: the client went away); each of a request's n choices counts",
            finished.clone(),
        );
        registry.register(
            "stepscope_requests_rejected",
            "Generation requests refused before running, by reason (error code)",
            rejected.clone(),
        );
        registry.register_collector(Box::new(StatsCollector::new(engine, tracer, tracing)));
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

/// Where the collector reads the active policy (for `stepscope_step_tracing_info` and the
/// `stepscope_policy_*` series); `switch` is `None` when step tracing is disabled.
#[derive(Debug, Clone, Default)]
pub struct TracingInfo {
    pub switch: Option<Arc<crate::step_tracing::PolicySwitch>>,
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
