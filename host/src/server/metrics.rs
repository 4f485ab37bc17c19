//! `GET /metrics`: Prometheus text (format 0.0.4) with the `prometheus-client` crate.
//!
//! vLLM's series come under vLLM's names and labels, so its dashboards, autoscalers and
//! gateways read stepscope as they read vLLM: every `vllm:*` series (except
//! `vllm:cache_config_info`) carries `model_name` (the first served name) and `engine="0"`,
//! added by a labelled sub-registry. They are renamed, not duplicated: stepscope serves no
//! `stepscope_*` copy of a series vLLM has. What the HTTP layer sees per request lives in
//! [`RequestSeries`] (updated by its trackers); what the engine and the step tracer already
//! count is read at scrape time by the collectors in [`collector`](super::collector), so
//! nothing is counted twice. Series vLLM has no counterpart for (KV blocks, steps, rejected
//! requests, step tracing, policies) keep `stepscope_*` names. Counters get `_total` from the
//! encoder; every series has help text, so `promtool check metrics` passes.

use std::borrow::Cow;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::engine::EngineHandle;
use crate::step_tracing::TracerMetrics;

use super::collector::{CacheSettings, EngineSeries, StatsCollector};
use super::request_stats::{ParentRequest, RequestSeries};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, &'static str)>;

/// What the `vllm:*` series are labelled and sized with.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsIdentity {
    /// `model_name`: the first served model name, as vLLM reports it.
    pub model_name: String,
    /// Upper end of the token-count histograms' buckets.
    pub max_model_len: usize,
    pub cache: CacheSettings,
}

impl MetricsIdentity {
    /// Labelled `model_name`, sized from `engine`, with vLLM's default cache settings.
    pub fn for_model(model_name: &str, engine: &EngineHandle) -> Self {
        Self {
            model_name: model_name.to_string(),
            max_model_len: engine.max_model_len(),
            cache: CacheSettings {
                gpu_memory_utilization: 0.9,
            },
        }
    }
}

/// The server's metrics registry.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    requests: Arc<RequestSeries>,
    rejected: Family<Labels, Counter>,
}

impl ServerMetrics {
    /// Registers everything; `tracer` gives the step tracer's and policy's live counters.
    pub fn new(
        engine: EngineHandle,
        tracer: Arc<TracerMetrics>,
        tracing: TracingInfo,
        identity: MetricsIdentity,
    ) -> Self {
        let mut registry = Registry::default();
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "stepscope_requests_rejected",
            "Generation requests refused before running, by reason (error code)",
            rejected.clone(),
        );
        registry.register_collector(Box::new(StatsCollector::new(
            engine.clone(),
            tracer,
            tracing,
            identity.cache,
        )));
        let vllm = registry.sub_registry_with_labels(
            [
                (Cow::Borrowed("model_name"), Cow::Owned(identity.model_name)),
                (Cow::Borrowed("engine"), Cow::Borrowed("0")),
            ]
            .into_iter(),
        );
        vllm.register_collector(Box::new(EngineSeries::new(engine)));
        let requests = Arc::new(RequestSeries::register(vllm, identity.max_model_len));
        Self {
            registry,
            requests,
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

    /// One prompt of a client request with `n` choices and its `max_tokens` field.
    pub fn parent_request(&self, n: usize, max_tokens_param: Option<u64>) -> Arc<ParentRequest> {
        ParentRequest::new(self.requests.clone(), n, max_tokens_param)
    }
}

/// Where the collector reads the active policy (for `stepscope_step_tracing_info` and the
/// `stepscope_policy_*` series); `switch` is `None` when step tracing is disabled.
#[derive(Debug, Clone, Default)]
pub struct TracingInfo {
    pub switch: Option<Arc<crate::step_tracing::PolicySwitch>>,
}
