//! Step tracing end to end (named so apart from the `tracing` logging crate): configuration, the step-loop observer, the exporter thread, and
//! the OTLP and JSON-lines sinks.
//!
//! [`StepTracer::start`] turns a [`StepTracingConfig`] (built by
//! [`StepTracingConfig::from_settings`] from the typed [`StepTracingSettings`] the CLI makes of
//! its flags, plus the `OTEL_*` variables) into a [`StepTracerObserver`] to hand
//! to [`Engine::start`](crate::engine::Engine::start) and a [`TracerHandle`] for metrics, flush
//! and shutdown. On the engine thread the observer calls the policy's `decide` once per step (and
//! `plan-rich` once per rich step) and copies a sampled step into a compact [`record::StepRecord`] that it
//! `try_send`s into a bounded queue; a full queue drops the record and counts it. The exporter
//! thread builds the spans (scope `stepscope.scheduler.step`, span `scheduler.step`, events
//! `step.BATCH_SUMMARY` and `step.REQUEST_SNAPSHOT`, with the step's own timestamps) and the JSON
//! lines, and exports over OTLP gRPC or HTTP/protobuf. Span limit: the SDK's 128 events per span
//! is raised to the large constant [`DEFAULT_MAX_EVENTS_PER_SPAN`] (65 537), not
//! `max_num_seqs + 1`, so no rich step loses snapshots whatever the engine's configuration.
//! [`PolicySwitch`] (from [`TracerHandle::policy_switch`]) replaces the policy of a running
//! tracer: see [`swap`]. A slow or absent collector costs dropped spans (counted in [`TracerMetrics`]), never a
//! blocked step. With tracing disabled the observer's per-step cost is a single branch.

mod config;
mod exporter;
mod http_client;
pub mod journey;
pub mod jsonl;
mod metrics;
mod otlp;
pub mod record;
pub mod swap;
mod tls;
mod tracer;

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod journey_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tracer_tests;

use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;
use std::time::Instant;

pub use config::{
    DEFAULT_MAX_EVENTS_PER_SPAN, ENV_OTLP_PROTOCOL, ENV_OTLP_TRACES_ENDPOINT,
    ENV_OTLP_TRACES_HEADERS, ENV_SERVICE_NAME, OtlpProtocol, StepTracingConfig, StepTracingError,
    StepTracingSettings,
};
pub use journey::{JourneySink, RequestInfo, RequestOutcome, RequestSpanRecord, Stamp};
pub use metrics::{TracerMetrics, TracerMetricsSnapshot};
pub use record::PolicyIdentity;
pub use swap::{ActivePolicy, PolicyOrigin, PolicySwitch};
pub use tracer::StepTracerObserver;

use crate::policy::budget::StepBudget;
use crate::policy::{PolicyCounters, PolicyLimits, PolicyModule, PolicyRuntime, PolicySource};
use exporter::{ExportMessage, ExporterThread, ShutdownDeadline};
use jsonl::JsonlSink;
use otlp::OtlpSink;

/// Name of the exporter thread.
pub const EXPORTER_THREAD_NAME: &str = "stepscope-trace-export";

/// Starts step tracers.
#[derive(Debug)]
pub struct StepTracer;

impl StepTracer {
    /// Loads the policy, opens the sinks and starts the exporter thread. With neither steps
    /// (`step_tracing_enabled`) nor journeys (`journey_sample_rate`) traced, it loads nothing
    /// and returns a no-op observer.
    ///
    /// Errors: a policy file that is unreadable, not a policy component, or refuses its
    /// parameters; an OTLP exporter that cannot be built; a trace file that cannot be created.
    pub fn start(
        config: StepTracingConfig,
    ) -> Result<(StepTracerObserver, TracerHandle), StepTracingError> {
        let counters = Arc::new(PolicyCounters::default());
        let metrics = Arc::new(TracerMetrics::new(Arc::clone(&counters)));
        if !config.step_tracing_enabled && config.journey_sample_rate.is_none() {
            return Ok((
                StepTracerObserver::disabled(),
                TracerHandle {
                    config,
                    policy: None,
                    switch: None,
                    metrics,
                    control: None,
                    thread: None,
                    deadline: Arc::default(),
                },
            ));
        }
        let loading = Instant::now();
        let module = PolicyModule::load(&config.policy, config.policy_limits)?;
        let mut params = config.policy_params.clone();
        // One source for the journey rate: the policy's `journey_sample_rate` is the flag's.
        if let Some(rate) = config.journey_sample_rate {
            params.journey_sample_rate = rate;
        }
        let runtime =
            PolicyRuntime::new(module.clone(), params.to_configure(), Arc::clone(&counters))?;
        let policy = Arc::new(PolicyIdentity {
            name: Arc::from(module.name()),
            digest: Arc::from(module.digest()),
        });
        let switch = Arc::new(PolicySwitch::new(
            &module,
            params.clone(),
            config.seed,
            counters,
            u64::try_from(loading.elapsed().as_millis()).unwrap_or(u64::MAX),
        ));
        let jsonl = match &config.step_tracing_file {
            Some(path) => Some(JsonlSink::create(path)?),
            None => None,
        };
        let recorder = match &config.record_steps {
            Some(path) => Some(JsonlSink::create(path)?),
            None => None,
        };
        let otlp = match &config.otlp {
            Some(otlp) => Some(OtlpSink::new(&config, otlp)?),
            None => None,
        };
        if otlp.is_none() && jsonl.is_none() && recorder.is_none() {
            tracing::warn!(
                "step tracing is enabled without --otlp-traces-endpoint (or OTEL_EXPORTER_OTLP_*) \
                 or --step-tracing-file: steps are sampled and counted but not exported"
            );
        }
        let (queue, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let deadline = Arc::new(ShutdownDeadline::default());
        let thread = ExporterThread::new(
            rx,
            &config,
            (otlp, jsonl, recorder),
            Arc::clone(&metrics),
            Arc::clone(&deadline),
        );
        let thread = std::thread::Builder::new()
            .name(EXPORTER_THREAD_NAME.into())
            .spawn(move || thread.run())
            .map_err(|e| StepTracingError::Spawn(e.to_string()))?;
        tracing::info!(
            policy = %policy.name,
            digest = %policy.digest,
            sample_rate = config.policy_params.sample_rate,
            rich_subsample_rate = config.policy_params.rich_subsample_rate,
            otlp = config.otlp.as_ref().map(|o| o.endpoint.as_str()).unwrap_or("-"),
            journeys = ?config.journey_sample_rate,
            steps = config.step_tracing_enabled,
            "step tracing on"
        );
        // The built-in default, with the server's rates, stands in for a policy over its budget.
        let fallback_module =
            PolicyModule::load(&PolicySource::BuiltinDefault, config.policy_limits)?;
        let fallback_identity = Arc::new(PolicyIdentity {
            name: Arc::from(fallback_module.name()),
            digest: Arc::from(fallback_module.digest()),
        });
        let fallback = PolicyRuntime::new(
            fallback_module,
            params.rates_only().to_configure(),
            Arc::default(),
        )?;
        let observer = StepTracerObserver::active(
            (runtime, Arc::clone(&policy), Arc::clone(&switch)),
            (
                fallback,
                fallback_identity,
                StepBudget::new(config.policy_budget),
            ),
            (
                config.seed,
                config.record_steps.is_some(),
                config.step_tracing_enabled,
            ),
            config.journey_sample_rate,
            queue.clone(),
            Arc::clone(&metrics),
        );
        Ok((
            observer,
            TracerHandle {
                config,
                policy: Some(RunningPolicy {
                    name: policy.name.to_string(),
                    digest: policy.digest.to_string(),
                    params: params.to_configure(),
                    limits: module.limits(),
                }),
                switch: Some(switch),
                metrics,
                control: Some(queue),
                thread: Some(thread),
                deadline,
            },
        ))
    }
}

/// The policy a running tracer uses.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningPolicy {
    /// `builtin:default` or the file path.
    pub name: String,
    /// `sha256:<hex>` of the component.
    pub digest: String,
    /// What `configure` received.
    pub params: Vec<(String, String)>,
    /// The fuel and memory bounds the module was loaded with.
    pub limits: PolicyLimits,
}

/// Owns the exporter thread: metrics, flush, shutdown. Dropping it shuts down. `flush`,
/// `shutdown` and drop block the caller (bounded by the export and shutdown timeouts): from
/// async code, call them through `spawn_blocking`.
#[derive(Debug)]
pub struct TracerHandle {
    config: StepTracingConfig,
    policy: Option<RunningPolicy>,
    switch: Option<Arc<PolicySwitch>>,
    metrics: Arc<TracerMetrics>,
    control: Option<SyncSender<ExportMessage>>,
    thread: Option<JoinHandle<()>>,
    deadline: Arc<ShutdownDeadline>,
}

impl TracerHandle {
    /// The configuration the tracer runs with.
    pub fn config(&self) -> &StepTracingConfig {
        &self.config
    }

    pub fn is_enabled(&self) -> bool {
        self.policy.is_some()
    }

    /// The policy the tracer started with (`None` when tracing is disabled).
    pub fn policy(&self) -> Option<&RunningPolicy> {
        self.policy.as_ref()
    }

    /// Hot swap of the running policy (`None` when tracing is disabled).
    pub fn policy_switch(&self) -> Option<Arc<PolicySwitch>> {
        self.switch.clone()
    }

    /// Where the server sends `llm_request` spans (`None` unless journey tracing is on).
    pub fn journey_sink(&self) -> Option<JourneySink> {
        self.config.journey_sample_rate?;
        Some(JourneySink {
            queue: self.control.clone()?,
            metrics: Arc::clone(&self.metrics),
        })
    }

    /// The live counters (for `/metrics`).
    pub fn metrics_handle(&self) -> Arc<TracerMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Writes and exports every record queued so far; returns once done (each export is
    /// bounded by the export timeout). `false` if the exporter thread is gone.
    pub fn flush(&self) -> bool {
        let Some(control) = &self.control else {
            return !self.is_enabled();
        };
        let (ack, done) = mpsc::channel();
        if control.send(ExportMessage::Flush(ack)).is_err() {
            return false;
        }
        self.wake_exporter();
        done.recv().is_ok()
    }

    /// Exports what is queued (within `shutdown_timeout`; later spans count as failed),
    /// flushes and closes the sinks, and joins the exporter thread. Records the step loop
    /// produces afterwards are dropped and counted. Later calls return at once.
    pub fn shutdown(&mut self) -> TracerMetricsSnapshot {
        if let Some(control) = self.control.take() {
            self.deadline
                .set(Instant::now() + self.config.shutdown_timeout);
            let (ack, done) = mpsc::channel();
            if control.send(ExportMessage::Shutdown(ack)).is_ok() {
                self.wake_exporter();
                let _ = done.recv();
            }
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the step trace exporter thread panicked");
        }
        self.metrics.snapshot()
    }
}

impl TracerHandle {
    fn wake_exporter(&self) {
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

impl Drop for TracerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
