//! The OTLP sink, on the exporter thread: records become OpenTelemetry spans, exported in
//! batches over gRPC (tonic) or HTTP/protobuf (hyper), over TLS for `https://` endpoints.
//!
//! Spans are built with the SDK's tracer (so the SDK's span limits, ids and scope apply): one
//! root span `scheduler.step` per record, in scope `stepscope.scheduler.step`, with explicit
//! start and end times (the step's `ts_start_ns` and the end of the whole step: forward pass,
//! sampling and update), span attributes (`step.id`, the sampling probabilities, `policy.name`,
//! `policy.digest`, the policy's `policy.*` extras, `openinference.span.kind = CHAIN`, and the
//! 16 batch-summary numbers again, so backends that filter and chart on span attributes can use
//! them) and the `step.BATCH_SUMMARY` / `step.REQUEST_SNAPSHOT` events timed at the emission
//! point. The span limit on events is raised to
//! [`StepTracingConfig::max_events_per_span`] (default 65 537, a large constant rather than
//! `max_num_seqs + 1`, which the tracer does not know), so a rich step never loses snapshots to
//! the SDK's default of 128. Ended spans are collected by a small span processor and handed to
//! the OTLP exporter by this thread itself, on a current-thread tokio runtime it owns, so every
//! export is bounded in time and its outcome is counted (exported or failed, per span).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Event, Span as _, SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{
    Protocol, SpanExporter as OtlpSpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};

use super::config::{OtlpConfig, OtlpProtocol, StepTracingConfig, StepTracingError};
use super::http_client::LastTransportError;
use super::metrics::{TracerMetrics, add, bump};
use super::record::{
    AttrValue, EVENT_BATCH_SUMMARY, EVENT_REQUEST_SNAPSHOT, SCOPE_NAME, SPAN_BATCH_PROBABILITY,
    SPAN_LAST_STEP_DURATION_US, SPAN_NAME, SPAN_POLICY_DEGRADED, SPAN_POLICY_DIGEST,
    SPAN_POLICY_NAME, SPAN_POLICY_RICH_FAULT, SPAN_RICH_PROBABILITY, SPAN_STEP_ID, StepRecord,
    batch_summary_attributes, sat_i64, snapshot_attributes,
};
use super::record::{OPENINFERENCE_KIND_CHAIN, SPAN_OPENINFERENCE_KIND};

/// The attribute key of a policy extra (see [`crate::policy::extra_attribute_key`]).
pub(crate) use crate::policy::extra_attribute_key as extra_key;

/// Collects ended spans for the exporter thread.
#[derive(Debug, Default)]
struct CollectingProcessor {
    ended: Arc<Mutex<Vec<SpanData>>>,
}

impl SpanProcessor for CollectingProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

pub(crate) struct OtlpSink {
    /// Always `Some` until drop (an `Option` so `Drop` can shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    exporter: OtlpSpanExporter,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    ended: Arc<Mutex<Vec<SpanData>>>,
    export_timeout: Duration,
    /// Why the last HTTP/protobuf request failed (the exporter's own error says only "network
    /// error"); `None` for gRPC, whose errors carry their cause.
    transport_error: Option<LastTransportError>,
}

impl OtlpSink {
    /// Builds the exporter (refusing bad settings now, not at the first export).
    pub(crate) fn new(
        config: &StepTracingConfig,
        otlp: &OtlpConfig,
    ) -> Result<Self, StepTracingError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("stepscope-trace-export")
            .build()
            .map_err(|e| StepTracingError::Otlp(format!("tokio runtime: {e}")))?;
        // tonic's lazy channel must be created inside a runtime.
        let built = {
            let _guard = runtime.enter();
            build_exporter(otlp, config.export_timeout)
        };
        let (mut exporter, transport_error) = match built {
            Ok(built) => built,
            Err(error) => {
                // Dropping a runtime blocks, which panics if the caller is async code.
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let ended = Arc::new(Mutex::new(Vec::new()));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(CollectingProcessor {
                ended: Arc::clone(&ended),
            })
            .with_max_events_per_span(config.max_events_per_span)
            .with_resource(resource)
            .build();
        let scope = InstrumentationScope::builder(SCOPE_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = provider.tracer_with_scope(scope);
        Ok(Self {
            runtime: Some(runtime),
            exporter,
            provider,
            tracer,
            ended,
            export_timeout: config.export_timeout,
            transport_error,
        })
    }

    /// Builds and ends the span of one record (it waits in the processor until `export`).
    pub(crate) fn add(&mut self, record: &StepRecord) {
        let policy = &record.policy;
        let s = &record.summary;
        let start = unix_time(s.ts_start_ns);
        let emitted = unix_time(s.ts_end_ns.max(s.ts_start_ns));
        let end = unix_time(record.span_end_ns());
        let batch = batch_summary_attributes(s);
        let mut attributes = Vec::with_capacity(8 + batch.len() + record.extra.len());
        attributes.push(KeyValue::new(SPAN_STEP_ID, sat_i64(s.step_id)));
        attributes.push(KeyValue::new(
            SPAN_OPENINFERENCE_KIND,
            OPENINFERENCE_KIND_CHAIN,
        ));
        // `step.id` is already there.
        attributes.extend(
            batch
                .iter()
                .filter(|(name, _)| *name != SPAN_STEP_ID)
                .map(|&(name, value)| key_value(name, value)),
        );
        attributes.push(KeyValue::new(
            SPAN_LAST_STEP_DURATION_US,
            sat_i64(s.last_step_duration_us),
        ));
        attributes.push(KeyValue::new(
            SPAN_BATCH_PROBABILITY,
            record.batch_probability,
        ));
        if let Some(rich) = &record.rich {
            attributes.push(KeyValue::new(SPAN_RICH_PROBABILITY, rich.probability));
        }
        attributes.push(KeyValue::new(
            SPAN_POLICY_NAME,
            Value::String(Arc::clone(&policy.name).into()),
        ));
        attributes.push(KeyValue::new(
            SPAN_POLICY_DIGEST,
            Value::String(Arc::clone(&policy.digest).into()),
        ));
        if record.degraded {
            attributes.push(KeyValue::new(SPAN_POLICY_DEGRADED, true));
        }
        if let Some(kind) = record.rich_fault {
            attributes.push(KeyValue::new(SPAN_POLICY_RICH_FAULT, kind.as_str()));
        }
        for (key, value) in &record.extra {
            attributes.push(KeyValue::new(extra_key(key), value.clone()));
        }

        let snapshots = record.rich.as_ref().map_or(0, |rich| rich.rows.len());
        let mut events = Vec::with_capacity(1 + snapshots);
        events.push(Event::new(
            EVENT_BATCH_SUMMARY,
            emitted,
            batch
                .into_iter()
                .map(|(name, value)| key_value(name, value))
                .collect(),
            0,
        ));
        if let Some(rich) = &record.rich {
            for row in &rich.rows {
                let mut attrs = Vec::with_capacity(11);
                snapshot_attributes(s.step_id, row, rich.attributes, |name, value| {
                    attrs.push(key_value(name, value))
                });
                events.push(Event::new(EVENT_REQUEST_SNAPSHOT, emitted, attrs, 0));
            }
        }
        let mut span = self
            .tracer
            .span_builder(SPAN_NAME)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .with_events(events)
            .start_with_context(&self.tracer, &Context::new());
        span.end_with_timestamp(end);
    }

    /// Spans built and not yet exported.
    pub(crate) fn pending(&self) -> usize {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Exports what is pending, within the export timeout and before `deadline` (past it, the
    /// spans are counted as failed without an attempt).
    pub(crate) fn export(&mut self, metrics: &TracerMetrics, deadline: Option<Instant>) {
        let batch = std::mem::take(&mut *self.ended.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let dropped_events: u64 = batch
            .iter()
            .map(|s| u64::from(s.events.dropped_count))
            .sum();
        add(&metrics.span_events_dropped, dropped_events);
        let mut timeout = self.export_timeout;
        if let Some(deadline) = deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        let outcome = match &self.runtime {
            _ if timeout.is_zero() => Err("the shutdown deadline has passed".to_string()),
            None => Err("the exporter is shut down".to_string()),
            Some(runtime) => {
                let exporter = &self.exporter;
                runtime.block_on(async {
                    match tokio::time::timeout(timeout, exporter.export(batch)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err(format!("timed out after {timeout:?}")),
                    }
                })
            }
        };
        match outcome {
            Ok(()) => add(&metrics.spans_exported, n),
            Err(mut error) => {
                if let Some(cause) = self.transport_error.as_ref().and_then(|e| e.take()) {
                    error = format!("{error} ({cause})");
                }
                add(&metrics.spans_export_failed, n);
                bump(&metrics.export_errors);
                let errors = metrics
                    .export_errors
                    .load(std::sync::atomic::Ordering::Relaxed);
                // Log the 1st, 2nd, 4th, 8th… failure, not every one.
                if errors.is_power_of_two() {
                    tracing::warn!(spans = n, errors, %error, "step trace export failed; spans dropped");
                }
            }
        }
    }

    pub(crate) fn shutdown(self) {
        let _ = self.provider.shutdown();
        if let Some(runtime) = &self.runtime {
            let _guard = runtime.enter();
            let _ = self
                .exporter
                .shutdown_with_timeout(Duration::from_millis(100));
        }
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The exporter for `otlp`, and (HTTP/protobuf) where its client records failures' causes.
fn build_exporter(
    otlp: &OtlpConfig,
    timeout: Duration,
) -> Result<(OtlpSpanExporter, Option<LastTransportError>), StepTracingError> {
    let mut transport_error = None;
    let built = match otlp.protocol {
        OtlpProtocol::Grpc => {
            let mut headers = http::HeaderMap::new();
            for (key, value) in &otlp.headers {
                let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(key.as_bytes()),
                    http::HeaderValue::from_str(value),
                ) else {
                    return Err(StepTracingError::Otlp(format!("invalid header `{key}`")));
                };
                headers.append(name, value);
            }
            let builder = OtlpSpanExporter::builder()
                .with_tonic()
                .with_endpoint(otlp.endpoint.clone())
                .with_protocol(Protocol::Grpc)
                .with_timeout(timeout)
                .with_metadata(tonic_metadata(headers));
            if is_https(otlp) {
                builder
                    .with_tls_config(super::tls::tonic_config(&otlp.tls)?)
                    .build()
            } else {
                builder.build()
            }
        }
        OtlpProtocol::HttpProtobuf => {
            let (client, last_error) = super::http_client::build(otlp, timeout)?;
            transport_error = Some(last_error);
            OtlpSpanExporter::builder()
                .with_http()
                .with_endpoint(otlp.endpoint.clone())
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(timeout)
                .with_headers(otlp.headers.iter().cloned().collect())
                .with_shared_http_client(client)
                .build()
        }
    };
    built
        .map(|exporter| (exporter, transport_error))
        .map_err(|e| StepTracingError::Otlp(format!("{}: {e}", otlp.endpoint)))
}

fn is_https(otlp: &OtlpConfig) -> bool {
    otlp.endpoint.starts_with("https://")
}

fn tonic_metadata(
    headers: http::HeaderMap,
) -> opentelemetry_otlp::tonic_types::metadata::MetadataMap {
    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers)
}

fn unix_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn key_value(name: &'static str, value: AttrValue) -> KeyValue {
    match value {
        AttrValue::Int(v) => KeyValue::new(name, v),
        AttrValue::Float(v) => KeyValue::new(name, v),
        AttrValue::Str(v) => KeyValue::new(name, v),
        AttrValue::Text(v) => KeyValue::new(name, v.to_owned()),
    }
}
