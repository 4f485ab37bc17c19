//! The OTLP sink, on the exporter thread: records become OpenTelemetry spans, exported in
//! batches over gRPC (tonic) or HTTP/protobuf (hyper), over TLS for `https://` endpoints.
//!
//! Spans are built as the SDK's `SpanData` directly, so their ids are ours (the JSON-lines file
//! carries the same ones) and each kind has its scope: one root span `scheduler.step` per
//! record, in scope `stepscope.scheduler.step` (linked to the `llm_core` spans of the traced
//! requests it snapshots), with explicit
//! start and end times (the step's `ts_start_ns` and the end of the whole step: forward pass,
//! sampling and update), span attributes (`step.id`, the sampling probabilities, `policy.name`,
//! `policy.digest`, the policy's `policy.*` extras, `openinference.span.kind = CHAIN`, and the
//! 16 batch-summary numbers again, so backends that filter and chart on span attributes can use
//! them) and the `step.BATCH_SUMMARY` / `step.REQUEST_SNAPSHOT` events timed at the emission
//! point. The span limit on events is raised to
//! [`StepTracingConfig::max_events_per_span`] (default 65 537, a large constant rather than
//! `max_num_seqs + 1`, which the tracer does not know), so a rich step never loses snapshots to
//! the SDK's default of 128. Ended spans are collected by a small span processor and handed to
//! the OTLP exporter by this thread itself (journey spans, [`JourneySpan`], go the same way), on a current-thread tokio runtime it owns, so every
//! export is bounded in time and its outcome is counted (exported or failed, per span).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId as OtelSpanId, SpanKind, Status, TraceFlags,
    TraceId as OtelTraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{
    Protocol, SpanExporter as OtlpSpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};

use super::config::{OtlpConfig, OtlpProtocol, StepTracingConfig, StepTracingError};
use super::http_client::LastTransportError;
use super::journey::{JourneySpan, SpanValue};
use super::metrics::{TracerMetrics, add, bump};
use super::record::{
    AttrValue, EVENT_BATCH_SUMMARY, EVENT_REQUEST_SNAPSHOT, SCOPE_NAME, SPAN_BATCH_PROBABILITY,
    SPAN_LAST_STEP_DURATION_US, SPAN_NAME, SPAN_POLICY_DEGRADED, SPAN_POLICY_DIGEST,
    SPAN_POLICY_NAME, SPAN_POLICY_RICH_FAULT, SPAN_RICH_PROBABILITY, SPAN_STEP_ID, StepRecord,
    batch_summary_attributes, sat_i64, snapshot_attributes,
};
use super::record::{OPENINFERENCE_KIND_CHAIN, SPAN_OPENINFERENCE_KIND, step_links};
use crate::trace_context::{SpanId, TraceId};

/// The attribute key of a policy extra (see [`crate::policy::extra_attribute_key`]).
pub(crate) use crate::policy::extra_attribute_key as extra_key;

pub(crate) struct OtlpSink {
    /// Always `Some` until drop (an `Option` so `Drop` can shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    exporter: OtlpSpanExporter,
    /// Built spans waiting for the next export.
    ended: Mutex<Vec<SpanData>>,
    /// Scopes of the three kinds of spans.
    scopes: Scopes,
    /// The per-span limit on events (beyond it, events are dropped and counted).
    max_events_per_span: usize,
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
        let scope = |name: &'static str| {
            InstrumentationScope::builder(name)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        };
        Ok(Self {
            runtime: Some(runtime),
            exporter,
            ended: Mutex::new(Vec::new()),
            scopes: Scopes {
                step: scope(SCOPE_NAME),
                api: scope(super::journey::SCOPE_API),
                scheduler: scope(super::journey::SCOPE_SCHEDULER),
            },
            max_events_per_span: config.max_events_per_span as usize,
            export_timeout: config.export_timeout,
            transport_error,
        })
    }

    /// Builds the span of one record, with ids `(trace_id, span_id)` (it waits until `export`).
    pub(crate) fn add(&mut self, record: &StepRecord, (trace_id, span_id): (TraceId, SpanId)) {
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
        let links = step_links(record)
            .map(|(trace, span)| Link::with_context(span_context(trace, span, None, true)))
            .collect();
        let span = SpanData {
            span_context: span_context(trace_id, span_id, None, false),
            parent_span_id: OtelSpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: SPAN_NAME.into(),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: self.limit_events(events),
            links: {
                let mut span_links = SpanLinks::default();
                span_links.links = links;
                span_links
            },
            status: Status::Unset,
            instrumentation_scope: self.scopes.step.clone(),
        };
        self.push(span);
    }

    /// Builds a journey span (`llm_request` or `llm_core`).
    pub(crate) fn add_journey(&mut self, span: &JourneySpan) {
        let events = span
            .events
            .iter()
            .map(|event| {
                let attributes = event
                    .attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(*k, span_value(v)))
                    .collect();
                Event::new(event.name, unix_time(event.time_unix_ns), attributes, 0)
            })
            .collect();
        let data = SpanData {
            span_context: span_context(
                span.trace_id,
                span.span_id,
                span.tracestate.as_deref(),
                false,
            ),
            parent_span_id: span
                .parent_span_id
                .map_or(OtelSpanId::INVALID, |id| OtelSpanId::from_bytes(id.0)),
            parent_span_is_remote: span.parent_is_remote,
            span_kind: if span.server {
                SpanKind::Server
            } else {
                SpanKind::Internal
            },
            name: span.name.into(),
            start_time: unix_time(span.start_unix_ns),
            end_time: unix_time(span.end_unix_ns),
            attributes: span
                .attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), span_value(v)))
                .collect(),
            dropped_attributes_count: 0,
            events: self.limit_events(events),
            links: SpanLinks::default(),
            status: match &span.error {
                Some(message) => Status::error(message.clone()),
                None => Status::Unset,
            },
            instrumentation_scope: if span.server {
                self.scopes.api.clone()
            } else {
                self.scopes.scheduler.clone()
            },
        };
        self.push(data);
    }

    /// A span's events, cut at the per-span limit (the rest counted as dropped at export).
    fn limit_events(&self, mut events: Vec<Event>) -> SpanEvents {
        let dropped = events.len().saturating_sub(self.max_events_per_span);
        events.truncate(self.max_events_per_span);
        let mut span_events = SpanEvents::default();
        span_events.events = events;
        span_events.dropped_count = u32::try_from(dropped).unwrap_or(u32::MAX);
        span_events
    }

    fn push(&self, span: SpanData) {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(span);
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
        AttrValue::TraceId(id) => KeyValue::new(name, id.to_string()),
    }
}

fn span_value(value: &SpanValue) -> Value {
    match value {
        SpanValue::Int(v) => Value::I64(*v),
        SpanValue::Float(v) => Value::F64(*v),
        SpanValue::Bool(v) => Value::Bool(*v),
        SpanValue::Str(v) => Value::String(v.clone().into()),
    }
}

/// A sampled span context with our ids (and the caller's `tracestate`, when it is valid).
fn span_context(
    trace_id: TraceId,
    span_id: SpanId,
    tracestate: Option<&str>,
    remote: bool,
) -> SpanContext {
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        OtelTraceId::from_bytes(trace_id.0),
        OtelSpanId::from_bytes(span_id.0),
        TraceFlags::SAMPLED,
        remote,
        state,
    )
}

/// The span scopes: steps, `llm_request`, `llm_core`.
struct Scopes {
    step: InstrumentationScope,
    api: InstrumentationScope,
    scheduler: InstrumentationScope,
}
