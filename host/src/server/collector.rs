//! The scrape-time half of `/metrics`: `prometheus-client` [`Collector`]s that read the
//! engine's numbers (`EngineHandle::stats`: queue depths, KV blocks, prefix-cache queries and
//! hits, preemptions, token totals, tokens per step) and the step tracer's and policy runtime's
//! counters (`TracerMetrics::snapshot`) each time `/metrics` is scraped.
//!
//! [`EngineSeries`] writes the engine's numbers under vLLM's names (`vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`, `vllm:iteration_tokens_total`, …); it is registered where the
//! registry adds the `model_name` and `engine` labels. [`StatsCollector`] writes what vLLM has
//! no series for under `stepscope_*` names, and `vllm:cache_config_info` (labelled `engine` and
//! the cache settings only, as vLLM's). Gauges are sampled values, counters are the components'
//! own monotonic totals; nothing here keeps state of its own.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::engine::{EngineHandle, StepTokenHistogram};
use crate::policy::FaultKind;
use crate::step_tracing::TracerMetrics;

use super::metrics::TracingInfo;

/// Reads the engine's and the tracer's counters at scrape time.
#[derive(Debug)]
pub struct StatsCollector {
    engine: EngineHandle,
    tracer: Arc<TracerMetrics>,
    tracing: TracingInfo,
    cache: CacheSettings,
}

/// Cache settings `vllm:cache_config_info` reports that the engine's stats do not carry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSettings {
    /// `--gpu-memory-utilization` (reported as given; it sizes the pool on CUDA only).
    pub gpu_memory_utilization: f64,
}

impl StatsCollector {
    pub fn new(
        engine: EngineHandle,
        tracer: Arc<TracerMetrics>,
        tracing: TracingInfo,
        cache: CacheSettings,
    ) -> Self {
        Self {
            engine,
            tracer,
            tracing,
            cache,
        }
    }
}

type FmtResult = Result<(), std::fmt::Error>;

/// The engine's numbers under vLLM's names (registered with the `model_name` and `engine`
/// labels).
#[derive(Debug)]
pub struct EngineSeries {
    engine: EngineHandle,
}

impl EngineSeries {
    pub fn new(engine: EngineHandle) -> Self {
        Self { engine }
    }
}

impl Collector for EngineSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let s = self.engine.stats();
        let e = &mut encoder;
        encode_all(
            e,
            [
                (
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches",
                    s.num_running as f64,
                ),
                (
                    "vllm:num_requests_waiting",
                    "Number of requests waiting to be processed (preempted ones included)",
                    s.num_waiting as f64,
                ),
                (
                    "vllm:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage (1 - free / total blocks)",
                    s.kv_usage_ratio,
                ),
            ]
            .map(|(name, help, value)| (name, help, ConstGauge::new(value))),
        )?;
        encode_all(
            e,
            [
                (
                    "vllm:prefix_cache_queries",
                    "Prefix cache queries, in terms of number of queried tokens",
                    s.prefix_cache_queries,
                ),
                (
                    "vllm:prefix_cache_hits",
                    "Prefix cache hits, in terms of number of cached tokens",
                    s.prefix_cache_hits,
                ),
                (
                    "vllm:num_preemptions",
                    "Cumulative number of preemption from the engine",
                    s.num_preemptions_total,
                ),
                (
                    "vllm:prompt_tokens",
                    "Number of prefill tokens processed (prompts of requests that produced their first token)",
                    s.prompt_tokens_total,
                ),
                (
                    "vllm:generation_tokens",
                    "Number of generation tokens processed",
                    s.generation_tokens_total,
                ),
            ]
            .map(|(name, help, value)| (name, help, ConstCounter::new(value))),
        )?;
        StepTokens(s.step_tokens).encode(e.encode_descriptor(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step",
            None,
            MetricType::Histogram,
        )?)
    }
}

/// A histogram read from the engine at scrape time.
struct StepTokens(StepTokenHistogram);

impl EncodeMetric for StepTokens {
    fn encode(&self, mut encoder: MetricEncoder) -> FmtResult {
        let buckets: Vec<(f64, u64)> = self.0.bucket_counts().collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum as f64, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Encodes one unlabelled series per `(name, help, value)`.
fn encode_all<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    series: impl IntoIterator<Item = (&'static str, &'static str, M)>,
) -> FmtResult {
    for (name, help, metric) in series {
        metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)?;
    }
    Ok(())
}

/// Encodes one series with a label per `(label value, value)`.
fn encode_labelled(
    e: &mut DescriptorEncoder,
    (name, help, label): (&str, &str, &str),
    values: impl IntoIterator<Item = (&'static str, u64)>,
) -> FmtResult {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (label_value, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&[(label, label_value)])?)?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let s = self.engine.stats();
        let e = &mut encoder;
        encode_all(
            e,
            [
                (
                    "stepscope_kv_cache_blocks_free",
                    "KV blocks free (cached-but-unreferenced blocks included)",
                    ConstGauge::new(s.kv_blocks_free as f64),
                ),
                (
                    "stepscope_num_kv_blocks",
                    "KV blocks in the pool (--num-kv-blocks)",
                    ConstGauge::new(s.kv_blocks_total as f64),
                ),
            ],
        )?;
        let cache_labels = [
            ("block_size", s.block_size.to_string()),
            ("cache_dtype", "auto".to_string()),
            (
                "enable_prefix_caching",
                if s.prefix_caching_enabled {
                    "True"
                } else {
                    "False"
                }
                .to_string(),
            ),
            ("engine", "0".to_string()),
            (
                "gpu_memory_utilization",
                self.cache.gpu_memory_utilization.to_string(),
            ),
            ("num_cpu_blocks", "None".to_string()),
            ("num_gpu_blocks", s.kv_blocks_total.to_string()),
        ];
        let mut info = e.encode_descriptor(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig (value is always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(info.encode_family(&cache_labels)?)?;
        encode_all(
            e,
            [
                (
                    "stepscope_computed_tokens",
                    "Tokens computed by forward passes (prefill, recomputation, decode)",
                    s.computed_tokens_total,
                ),
                ("stepscope_engine_steps", "Scheduler steps run", s.num_steps),
                (
                    "stepscope_engine_requests_finished",
                    "Requests the engine finished (any reason)",
                    s.num_requests_finished_total,
                ),
                (
                    "stepscope_model_errors",
                    "Failed forward passes",
                    s.model_errors_total,
                ),
            ]
            .map(|(name, help, value)| (name, help, ConstCounter::new(value))),
        )?;
        self.encode_tracer(e)
    }
}

impl StatsCollector {
    fn encode_tracer(&self, e: &mut DescriptorEncoder) -> FmtResult {
        let t = self.tracer.snapshot();
        let switch = self.tracing.switch.as_deref();
        let active = switch.map(|s| s.active());
        let labels = [
            ("enabled", if switch.is_some() { "true" } else { "false" }),
            ("policy", active.as_ref().map_or("", |a| a.name.as_str())),
            ("digest", active.as_ref().map_or("", |a| a.digest.as_str())),
        ];
        let mut info = e.encode_descriptor(
            "stepscope_step_tracing_info",
            "Step tracing configuration and the active policy (value is always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        if let (Some(switch), Some(active)) = (switch, &active) {
            let loaded = ConstGauge::new(active.loaded_at_unix_ms as f64 / 1000.0);
            loaded.encode(e.encode_descriptor(
                "stepscope_policy_loaded_timestamp_seconds",
                "When the active step-tracing policy became active (Unix time)",
                None,
                MetricType::Gauge,
            )?)?;
            encode_all(
                e,
                [
                    (
                        "stepscope_policy_swaps",
                        "Step-tracing policies swapped in at run time (admin API or SIGHUP)",
                        ConstCounter::new(switch.swaps()),
                    ),
                    (
                        "stepscope_policy_swaps_refused",
                        "Policy swaps refused (the active policy was kept)",
                        ConstCounter::new(switch.refused()),
                    ),
                ],
            )?;
        }
        let p = t.policy;
        encode_all(
            e,
            [
                (
                    "stepscope_step_tracing_steps_seen",
                    "Steps shown to the step tracer",
                    t.steps_seen,
                ),
                (
                    "stepscope_step_tracing_steps_batch_sampled",
                    "Steps whose batch summary was traced",
                    t.steps_batch_sampled,
                ),
                (
                    "stepscope_step_tracing_steps_rich_sampled",
                    "Steps traced with per-request snapshots",
                    t.steps_rich_sampled,
                ),
                (
                    "stepscope_step_tracing_steps_rich_faulted",
                    "Rich-sampled steps whose plan-rich call faulted (traced without snapshots)",
                    t.steps_rich_faulted,
                ),
                (
                    "stepscope_step_tracing_snapshots",
                    "Request snapshots emitted",
                    t.snapshots_emitted,
                ),
                (
                    "stepscope_step_tracing_records_queued",
                    "Trace records handed to the exporter thread",
                    t.records_queued,
                ),
                (
                    "stepscope_step_tracing_spans_exported",
                    "Spans the OTLP collector accepted",
                    t.spans_exported,
                ),
                (
                    "stepscope_step_tracing_export_failures",
                    "Spans lost by the OTLP exporter (error, timeout, unreachable)",
                    t.spans_export_failed,
                ),
                (
                    "stepscope_step_tracing_export_errors",
                    "Failed OTLP export calls",
                    t.export_errors,
                ),
                (
                    "stepscope_step_tracing_jsonl_lines_written",
                    "Lines written to the step-tracing file",
                    t.jsonl_lines_written,
                ),
                (
                    "stepscope_step_tracing_jsonl_write_failures",
                    "Lines that could not be written to the step-tracing file",
                    t.jsonl_write_failures,
                ),
                (
                    "stepscope_step_tracing_steps_recorded",
                    "Steps written to the --record-steps file",
                    t.steps_recorded,
                ),
                (
                    "stepscope_step_tracing_record_failures",
                    "Steps lost to the --record-steps file (queue full, or a failed write)",
                    t.record_write_failures,
                ),
                (
                    "stepscope_step_tracing_journeys_traced",
                    "Client requests whose journey was traced (llm_request and llm_core spans)",
                    t.journeys_traced,
                ),
                (
                    "stepscope_step_tracing_journeys_untraced",
                    "Client requests whose journey was decided not to be traced",
                    t.journeys_untraced,
                ),
                (
                    "stepscope_step_tracing_journey_spans_queued",
                    "Journey spans handed to the exporter thread",
                    t.journey_spans_queued,
                ),
                (
                    "stepscope_step_tracing_journey_spans_dropped",
                    "Journey spans lost because the exporter queue was full or closed",
                    t.journey_spans_dropped,
                ),
                (
                    "stepscope_policy_calls",
                    "Policy guest calls (decide and plan-rich)",
                    p.calls,
                ),
                (
                    "stepscope_policy_instantiations",
                    "Policy instances created (the first one included)",
                    p.instantiations,
                ),
                (
                    "stepscope_policy_recycles",
                    "Policy instances retired with linear memory near the cap (replaced, not faults)",
                    p.recycles,
                ),
                (
                    "stepscope_policy_skipped_backoff",
                    "Steps left untraced while a faulty policy backs off",
                    p.skipped_backoff,
                ),
                (
                    "stepscope_policy_degradations",
                    "Times the policy's p99 cost per step passed its budget and the built-in default took over",
                    p.degradations,
                ),
                (
                    "stepscope_policy_recoveries",
                    "Times a degraded policy came back within its budget",
                    p.recoveries,
                ),
                (
                    "stepscope_policy_fallback_steps",
                    "Steps the built-in default decided for a degraded policy (policy.degraded = true)",
                    p.fallback_steps,
                ),
            ]
            .map(|(name, help, value)| (name, help, ConstCounter::new(value))),
        )?;
        encode_all(
            e,
            [(
                "stepscope_policy_degraded",
                "1 while the policy is over its step budget and the built-in default decides steps",
                ConstGauge::new(f64::from(u8::from(p.degraded))),
            )],
        )?;
        encode_all(
            e,
            [(
                "stepscope_policy_call_seconds",
                "Time spent in policy guest calls",
                ConstCounter::new(p.call_nanos_total as f64 / 1e9),
            )],
        )?;
        encode_labelled(
            e,
            (
                "stepscope_step_tracing_records_dropped",
                "Trace records dropped before export, by reason",
                "reason",
            ),
            [
                ("queue_full", t.records_dropped_queue_full),
                ("closed", t.records_dropped_closed),
            ],
        )?;
        encode_labelled(
            e,
            (
                "stepscope_policy_faults",
                "Policy calls that gave no usable answer, by kind",
                "kind",
            ),
            FaultKind::ALL.map(|kind| (kind.as_str(), p.faults_of(kind))),
        )
    }
}
