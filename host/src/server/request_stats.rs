//! vLLM's per-request Prometheus series, observed by the HTTP layer as each choice runs.
//!
//! [`RequestSeries`] holds the histograms and the `vllm:request_success` counter, named and
//! bucketed as vLLM v1's `PrometheusStatLogger` does; they are registered in the registry that
//! carries the `model_name` and `engine` labels. A [`RequestTracker`] follows one choice (one
//! engine request, as vLLM counts them): time to first token and inter-token gaps as tokens
//! arrive, then, when it is dropped (finished, or abandoned by its client: `abort`), the
//! request's end-to-end, queue, prefill, decode and inference times, its token counts and its
//! finish reason. A [`ParentRequest`] is one prompt of a client request with its `n` choices:
//! when its last choice is done it observes `n` and the largest choice's generation tokens.
//!
//! Times are as vLLM defines them: queue = admitted − handed to the engine, prefill = first
//! token − admitted, decode = last token − first token, inference = last token − admitted,
//! end-to-end = done − received by the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::FinishReason;

const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Inter-token latency and time per output token.
const TOKEN_GAP_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// End-to-end, queue, prefill, decode and inference times.
const REQUEST_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const N_BUCKETS: [f64; 5] = [1.0, 2.0, 5.0, 10.0, 20.0];

/// vLLM's `build_1_2_5_buckets(max_value)`: 1, 2, 5, 10, 20, 50, … up to `max_value`.
pub fn buckets_1_2_5(max_value: usize) -> Vec<f64> {
    let mut buckets = Vec::new();
    let mut power = 1usize;
    loop {
        for mantissa in [1usize, 2, 5] {
            match mantissa.checked_mul(power) {
                Some(value) if value <= max_value => buckets.push(value as f64),
                _ => return buckets,
            }
        }
        power = match power.checked_mul(10) {
            Some(p) => p,
            None => return buckets,
        };
    }
}

type ReasonLabel = Vec<(&'static str, &'static str)>;

/// The per-request `vllm:*` series.
#[derive(Debug)]
pub struct RequestSeries {
    ttft: Histogram,
    inter_token: Histogram,
    time_per_output_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    inference: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    max_num_generation_tokens: Histogram,
    params_max_tokens: Histogram,
    params_n: Histogram,
    success: Family<ReasonLabel, Counter>,
}

impl RequestSeries {
    /// Registers every series in `registry` (the one labelled with `model_name` and `engine`);
    /// token-count buckets go up to `max_model_len`, as vLLM's do.
    pub fn register(registry: &mut Registry, max_model_len: usize) -> Self {
        let tokens = buckets_1_2_5(max_model_len.max(1));
        let latency = || Histogram::new(REQUEST_LATENCY_BUCKETS);
        let series = Self {
            ttft: Histogram::new(TTFT_BUCKETS),
            inter_token: Histogram::new(TOKEN_GAP_BUCKETS),
            time_per_output_token: Histogram::new(TOKEN_GAP_BUCKETS),
            e2e: latency(),
            queue: latency(),
            prefill: latency(),
            decode: latency(),
            inference: latency(),
            prompt_tokens: Histogram::new(tokens.iter().copied()),
            generation_tokens: Histogram::new(tokens.iter().copied()),
            max_num_generation_tokens: Histogram::new(tokens.iter().copied()),
            params_max_tokens: Histogram::new(tokens.iter().copied()),
            params_n: Histogram::new(N_BUCKETS),
            success: Family::default(),
        };
        for reason in FinishReason::ALL {
            drop(
                series
                    .success
                    .get_or_create(&vec![("finished_reason", reason.as_str())]),
            );
        }
        let histograms: [(&str, &str, &Histogram); 13] = [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds",
                &series.ttft,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds",
                &series.inter_token,
            ),
            (
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time per output token (decode time / (generation tokens - 1)) per request, in seconds",
                &series.time_per_output_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds",
                &series.e2e,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request",
                &series.queue,
            ),
            (
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request",
                &series.prefill,
            ),
            (
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request",
                &series.decode,
            ),
            (
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request",
                &series.inference,
            ),
            (
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed",
                &series.prompt_tokens,
            ),
            (
                "vllm:request_generation_tokens",
                "Number of generation tokens processed",
                &series.generation_tokens,
            ),
            (
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens",
                &series.max_num_generation_tokens,
            ),
            (
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter",
                &series.params_max_tokens,
            ),
            (
                "vllm:request_params_n",
                "Histogram of the n request parameter",
                &series.params_n,
            ),
        ];
        for (name, help, histogram) in histograms {
            registry.register(name, help, histogram.clone());
        }
        registry.register(
            "vllm:request_success",
            "Count of successfully processed requests (each of a request's n choices counts; abort: the client went away)",
            series.success.clone(),
        );
        series
    }
}

/// One prompt of a client request, shared by its `n` choices' trackers.
#[derive(Debug)]
pub struct ParentRequest {
    series: Arc<RequestSeries>,
    n: usize,
    /// The request's `max_tokens` (or `max_completion_tokens`) field, when it set one.
    max_tokens_param: Option<u64>,
    max_generation_tokens: AtomicU64,
}

impl ParentRequest {
    pub fn new(series: Arc<RequestSeries>, n: usize, max_tokens_param: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            series,
            n,
            max_tokens_param,
            max_generation_tokens: AtomicU64::new(0),
        })
    }
}

impl Drop for ParentRequest {
    fn drop(&mut self) {
        self.series.params_n.observe(self.n as f64);
        self.series
            .max_num_generation_tokens
            .observe(*self.max_generation_tokens.get_mut() as f64);
    }
}

/// What the engine has said about a choice so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChoiceProgress {
    pub num_prompt_tokens: usize,
    pub num_output_tokens: usize,
    /// How long it waited before its first admission (`None` until admitted).
    pub queue_time: Option<Duration>,
}

/// Times one choice and records it when dropped.
#[derive(Debug)]
pub struct RequestTracker {
    parent: Arc<ParentRequest>,
    /// When the server received the client request.
    arrival: Instant,
    /// When this choice was handed to the engine.
    handoff: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    progress: ChoiceProgress,
    finish: Option<FinishReason>,
}

impl RequestTracker {
    /// Starts timing a choice of `parent` received at `arrival` and handed off now.
    pub fn new(parent: Arc<ParentRequest>, arrival: Instant) -> Self {
        Self {
            parent,
            arrival,
            handoff: Instant::now(),
            first_token: None,
            last_token: None,
            progress: ChoiceProgress::default(),
            finish: None,
        }
    }

    /// Records an engine output with `num_tokens` new tokens, maybe a finish reason, and the
    /// choice's counts so far.
    pub fn on_output(
        &mut self,
        num_tokens: usize,
        finish: Option<FinishReason>,
        progress: ChoiceProgress,
    ) {
        let now = Instant::now();
        let series = &self.parent.series;
        if num_tokens > 0 {
            match self.last_token {
                None => {
                    series
                        .ttft
                        .observe(now.duration_since(self.arrival).as_secs_f64());
                    self.first_token = Some(now);
                }
                Some(last) => {
                    let gap = now.duration_since(last).as_secs_f64() / num_tokens as f64;
                    for _ in 0..num_tokens {
                        series.inter_token.observe(gap);
                    }
                }
            }
            self.last_token = Some(now);
        }
        self.progress = progress;
        if finish.is_some() {
            self.finish = finish;
        }
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        let series = &self.parent.series;
        let reason = self.finish.unwrap_or(FinishReason::Abort);
        let p = self.progress;
        series.e2e.observe(self.arrival.elapsed().as_secs_f64());
        series
            .success
            .get_or_create(&vec![("finished_reason", reason.as_str())])
            .inc();
        series.prompt_tokens.observe(p.num_prompt_tokens as f64);
        series.generation_tokens.observe(p.num_output_tokens as f64);
        if let Some(max_tokens) = self.parent.max_tokens_param {
            series.params_max_tokens.observe(max_tokens as f64);
        }
        self.parent
            .max_generation_tokens
            .fetch_max(p.num_output_tokens as u64, Ordering::Relaxed);
        let Some(queue) = p.queue_time else {
            return; // never admitted: no phase times
        };
        series.queue.observe(queue.as_secs_f64());
        let admitted = self.handoff + queue;
        if let (Some(first), Some(last)) = (self.first_token, self.last_token) {
            let secs = |later: Instant, earlier: Instant| {
                later.saturating_duration_since(earlier).as_secs_f64()
            };
            let decode = secs(last, first);
            series.prefill.observe(secs(first, admitted));
            series.decode.observe(decode);
            series.inference.observe(secs(last, admitted));
            if p.num_output_tokens > 1 {
                series
                    .time_per_output_token
                    .observe(decode / (p.num_output_tokens - 1) as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_are_vllms_1_2_5_series() {
        assert_eq!(buckets_1_2_5(100), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        assert_eq!(buckets_1_2_5(2048).last(), Some(&2000.0));
        assert_eq!(buckets_1_2_5(1), [1.0]);
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_choice_records_its_phases_and_its_parent_records_n_once() {
        let mut registry = Registry::default();
        let series = Arc::new(RequestSeries::register(&mut registry, 2048));
        let parent = ParentRequest::new(series.clone(), 2, Some(8));
        let progress = |output, queue| ChoiceProgress {
            num_prompt_tokens: 5,
            num_output_tokens: output,
            queue_time: queue,
        };
        let mut a = RequestTracker::new(parent.clone(), Instant::now());
        a.on_output(1, None, progress(1, Some(Duration::ZERO)));
        a.on_output(
            2,
            Some(FinishReason::Length),
            progress(3, Some(Duration::ZERO)),
        );
        let b = RequestTracker::new(parent, Instant::now()); // dropped unanswered: an abort
        drop(a);
        let before_parent = text(&registry);
        assert!(before_parent.contains("vllm:request_params_n_count 0"));
        drop(b);
        let out = text(&registry);
        for line in [
            "vllm:request_success_total{finished_reason=\"length\"} 1",
            "vllm:request_success_total{finished_reason=\"abort\"} 1",
            "vllm:e2e_request_latency_seconds_count 2",
            "vllm:request_prefill_time_seconds_count 1",
            "vllm:request_time_per_output_token_seconds_count 1",
            "vllm:inter_token_latency_seconds_count 2",
            "vllm:request_params_n_count 1",
            "vllm:request_params_n_sum 2.0",
            "vllm:request_max_num_generation_tokens_sum 3.0",
            "vllm:request_params_max_tokens_count 2",
            "vllm:request_generation_tokens_sum 3.0",
            "vllm:request_prompt_tokens_bucket{le=\"5.0\"} 2",
        ] {
            assert!(out.contains(line), "{line} missing:\n{out}");
        }
    }
}
