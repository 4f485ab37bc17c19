//! Request journeys, the tracer's half: which journeys are traced, and the `llm_request` and
//! `llm_core` spans.
//!
//! With `--enable-journey-tracing`, the engine asks the tracer once per client request, on the
//! engine thread, whether its journey is traced. A policy built against contract 0.2 answers
//! through `decide-request` (given [`JourneySampler::arrival`], whose `random` is the
//! reproducible [`journey_draw`] of `--seed` and the engine's request id); the built-in default
//! applies OpenTelemetry's ParentBased sampler over a rate: a request whose incoming
//! `traceparent` is sampled is always traced, one whose `traceparent` is not sampled never is,
//! and any other when its draw falls below `--journey-tracing-sample-rate`. For a 0.1 policy,
//! which has no `decide-request`, the host applies that same rule itself
//! ([`JourneySampler::by_rate`]). An untraced request costs that one decision.
//! A traced request yields two spans in one trace, in the caller's trace when it sent one:
//! `llm_request` (scope `stepscope.api`, kind SERVER, from the server's [`RequestSpanRecord`],
//! sent through a [`JourneySink`]) and its child `llm_core` (scope `stepscope.scheduler`, one per
//! choice, from the engine's [`JourneyLog`]). Both become a [`JourneySpan`] on the exporter
//! thread, which the OTLP and JSON-lines sinks render alike. The names below are the fork's
//! journey contract (`docs/ARCHITECTURE.md`, "Request journeys"): keep them exactly.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};

use serde_json::{Map, Value as Json};

use crate::engine::FinishReason;
use crate::engine::journey::{
    JourneyArrival, JourneyDecision, JourneyEvent, JourneyEventKind, JourneyLog,
};
use crate::policy::random::journey_draw;
use crate::policy::{RequestArrival, extra_attribute_key};
use crate::trace_context::{SpanId, SpanIdSource, TraceId};

use super::exporter::ExportMessage;
use super::metrics::{TracerMetrics, bump};

pub const SCOPE_API: &str = "stepscope.api";
pub const SCOPE_SCHEDULER: &str = "stepscope.scheduler";
pub const SPAN_LLM_REQUEST: &str = "llm_request";
pub const SPAN_LLM_CORE: &str = "llm_core";

pub const EVENT_ARRIVED: &str = "api.ARRIVED";
pub const EVENT_HANDOFF_TO_CORE: &str = "api.HANDOFF_TO_CORE";
pub const EVENT_FIRST_RESPONSE_FROM_CORE: &str = "api.FIRST_RESPONSE_FROM_CORE";
pub const EVENT_DEPARTED: &str = "api.DEPARTED";
pub const EVENT_ABORTED: &str = "api.ABORTED";

/// `sampling.journey_probability`, on both spans.
pub const ATTR_JOURNEY_PROBABILITY: &str = "sampling.journey_probability";
/// On `llm_core`: the id the client knows the request (choice) by, as on step snapshots.
pub const ATTR_REQUEST_ID: &str = "request.id";
/// On `api.ABORTED`: why (`client disconnected`, an error message, …).
pub const ATTR_ABORT_REASON: &str = "abort.reason";

/// Journey event attributes (every `journey.*` event carries all but the last two).
pub const ATTR_PHASE: &str = "phase";
pub const ATTR_PREFILL_DONE: &str = "prefill_done_tokens";
pub const ATTR_PREFILL_TOTAL: &str = "prefill_total_tokens";
pub const ATTR_DECODE_DONE: &str = "decode_done_tokens";
pub const ATTR_DECODE_MAX: &str = "decode_max_tokens";
pub const ATTR_NUM_PREEMPTIONS: &str = "num_preemptions";
pub const ATTR_SCHEDULER_STEP: &str = "scheduler.step";
pub const ATTR_TS_MONOTONIC: &str = "ts.monotonic";
/// On `journey.SCHEDULED`: `FIRST` or `RESUME`.
pub const ATTR_SCHEDULE_KIND: &str = "schedule.kind";
/// On `journey.FINISHED`: `stopped`, `length`, `aborted` or `error`.
pub const ATTR_FINISH_STATUS: &str = "finish.status";

/// `llm_request` attributes: the OTel GenAI semantic conventions (as vLLM's request span),
/// and OpenInference's, by which Phoenix and other LLM tools classify the span.
pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
pub const GEN_AI_REQUEST_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
pub const GEN_AI_REQUEST_TEMPERATURE: &str = "gen_ai.request.temperature";
pub const GEN_AI_REQUEST_TOP_P: &str = "gen_ai.request.top_p";
pub const GEN_AI_REQUEST_N: &str = "gen_ai.request.n";
pub const GEN_AI_REQUEST_ID: &str = "gen_ai.request.id";
pub const GEN_AI_RESPONSE_ID: &str = "gen_ai.response.id";
pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub const GEN_AI_LATENCY_TIME_IN_QUEUE: &str = "gen_ai.latency.time_in_queue";
pub const GEN_AI_LATENCY_TTFT: &str = "gen_ai.latency.time_to_first_token";
pub const GEN_AI_LATENCY_E2E: &str = "gen_ai.latency.e2e";
pub const OPENINFERENCE_KIND_LLM: &str = "LLM";
pub const LLM_MODEL_NAME: &str = "llm.model_name";
pub const LLM_TOKEN_COUNT_PROMPT: &str = "llm.token_count.prompt";
pub const LLM_TOKEN_COUNT_COMPLETION: &str = "llm.token_count.completion";
pub const LLM_TOKEN_COUNT_TOTAL: &str = "llm.token_count.total";

/// Decides which journeys are traced (see the module doc).
#[derive(Debug)]
pub(crate) struct JourneySampler {
    rate: f64,
    seed: u64,
    ids: SpanIdSource,
}

impl JourneySampler {
    pub(crate) fn new(rate: f64, seed: u64) -> Self {
        Self {
            rate,
            seed,
            ids: SpanIdSource::default(),
        }
    }

    /// The ParentBased rule over the rate, decided by the host (for a 0.1 policy).
    pub(crate) fn by_rate(&mut self, arrival: &JourneyArrival<'_>) -> Option<JourneyDecision> {
        let probability = match arrival.parent {
            Some(parent) if parent.sampled => 1.0,
            Some(_) => return None,
            None if journey_draw(self.seed, arrival.request_id) < self.rate => self.rate,
            None => return None,
        };
        Some(self.traced(arrival, probability, Vec::new()))
    }

    /// What `decide-request` is given for `arrival`.
    pub(crate) fn arrival(&self, arrival: &JourneyArrival<'_>) -> RequestArrival {
        let sat = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        RequestArrival {
            request_id: arrival.request_id,
            prompt_tokens: sat(arrival.num_prompt_tokens),
            max_tokens: sat(arrival.max_tokens),
            temperature: f64::from(arrival.temperature),
            num_choices: arrival.num_choices,
            parent_sampled: arrival.parent.map(|p| p.sampled),
            running_depth: sat(arrival.running_depth),
            waiting_depth: sat(arrival.waiting_depth),
            kv_usage_ratio: arrival.kv_usage_ratio,
            random: journey_draw(self.seed, arrival.request_id),
        }
    }

    /// The ids of a journey decided traced with `probability` (in the caller's trace when it
    /// sent a `traceparent`).
    pub(crate) fn traced(
        &mut self,
        arrival: &JourneyArrival<'_>,
        probability: f64,
        extra: Vec<(String, String)>,
    ) -> JourneyDecision {
        let parent = arrival.parent.cloned();
        JourneyDecision {
            trace_id: parent
                .as_ref()
                .map_or_else(|| self.ids.trace_id(), |p| p.trace_id),
            request_span_id: self.ids.span_id(),
            parent,
            probability,
            extra,
        }
    }
}

/// A moment of a request's life on the server: wall clock and monotonic clock, in ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    pub unix_ns: u64,
    pub monotonic_ns: u64,
}

impl Stamp {
    pub fn now() -> Self {
        Self {
            unix_ns: crate::engine::request::unix_time_ns(),
            monotonic_ns: crate::engine::journey::monotonic_ns(),
        }
    }

    /// Seconds from `earlier` to `self` (0 if the clock went back).
    pub fn seconds_since(self, earlier: Stamp) -> f64 {
        self.monotonic_ns.saturating_sub(earlier.monotonic_ns) as f64 / 1e9
    }
}

/// How the server's side of a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The whole answer was sent.
    Departed,
    /// The client went away, or the answer was an error: why.
    Aborted(String),
}

/// What `llm_request` says of the request itself, known once its body is parsed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestInfo {
    /// `gen_ai.operation.name`: `chat`, `text_completion` or `generate`.
    pub operation: &'static str,
    /// `gen_ai.request.id`: the client's `X-Request-Id`, or else the response id.
    pub request_id: String,
    /// `gen_ai.response.id`.
    pub response_id: String,
    pub model: String,
    pub max_tokens: Option<u64>,
    pub temperature: f64,
    pub top_p: f64,
    pub n: u32,
}

/// The server's half of a traced journey: what `llm_request` is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpanRecord {
    pub info: RequestInfo,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Longest wait in the engine's queue among the request's choices.
    pub queue_time_s: Option<f64>,
    pub arrived: Stamp,
    pub handoff: Option<Stamp>,
    pub first_response: Option<Stamp>,
    pub end: Stamp,
    pub outcome: RequestOutcome,
}

/// Where the server sends `llm_request` halves: the tracer's queue (a full queue drops the
/// span, counted; the server never waits).
#[derive(Debug, Clone)]
pub struct JourneySink {
    pub(crate) queue: SyncSender<ExportMessage>,
    pub(crate) metrics: Arc<TracerMetrics>,
}

impl JourneySink {
    /// Queues the `llm_request` span of a traced journey.
    pub fn send(&self, decision: Arc<JourneyDecision>, record: RequestSpanRecord) {
        let message = ExportMessage::RequestSpan(Box::new((decision, record)));
        queue_journey_span(&self.queue, &self.metrics, message);
    }
}

/// Queues a journey span for the exporter thread, counting it as queued or dropped.
pub(crate) fn queue_journey_span(
    queue: &SyncSender<ExportMessage>,
    metrics: &TracerMetrics,
    message: ExportMessage,
) {
    match queue.try_send(message) {
        Ok(()) => bump(&metrics.journey_spans_queued),
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            bump(&metrics.journey_spans_dropped)
        }
    }
}

/// A typed attribute value of a journey span.
#[derive(Debug, Clone, PartialEq)]
pub enum SpanValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Cow<'static, str>),
}

impl SpanValue {
    fn text(value: &str) -> Self {
        Self::Str(Cow::Owned(value.to_string()))
    }

    fn to_json(&self) -> Json {
        match self {
            Self::Int(v) => Json::from(*v),
            Self::Float(v) => serde_json::Number::from_f64(*v).map_or(Json::Null, Json::Number),
            Self::Bool(v) => Json::Bool(*v),
            Self::Str(v) => Json::String(v.to_string()),
        }
    }
}

/// One event of a journey span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanEventOut {
    pub name: &'static str,
    pub time_unix_ns: u64,
    pub attributes: Vec<(&'static str, SpanValue)>,
}

/// A journey span, ready for either sink.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneySpan {
    pub name: &'static str,
    pub scope: &'static str,
    /// SERVER (`llm_request`) or INTERNAL.
    pub server: bool,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The parent is the caller's span (from `traceparent`).
    pub parent_is_remote: bool,
    pub tracestate: Option<Arc<str>>,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(Cow<'static, str>, SpanValue)>,
    pub events: Vec<SpanEventOut>,
    /// The span's status is an error, with this message.
    pub error: Option<String>,
}

fn sat_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn finish_status(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stopped",
        FinishReason::Length => "length",
        FinishReason::Abort => "aborted",
        FinishReason::Error => "error",
    }
}

fn extra_attributes(
    decision: &JourneyDecision,
) -> impl Iterator<Item = (Cow<'static, str>, SpanValue)> + '_ {
    decision
        .extra
        .iter()
        .map(|(k, v)| (Cow::Owned(extra_attribute_key(k)), SpanValue::text(v)))
}

fn core_event(event: &JourneyEvent) -> SpanEventOut {
    use SpanValue::{Int, Str};
    let n = |v: u32| Int(i64::from(v));
    let mut attributes = vec![
        (ATTR_PHASE, Str(Cow::Borrowed(event.phase.as_str()))),
        (ATTR_PREFILL_DONE, n(event.prefill_done_tokens)),
        (ATTR_PREFILL_TOTAL, n(event.prefill_total_tokens)),
        (ATTR_DECODE_DONE, n(event.decode_done_tokens)),
        (ATTR_DECODE_MAX, n(event.decode_max_tokens)),
        (ATTR_NUM_PREEMPTIONS, n(event.num_preemptions)),
        (ATTR_SCHEDULER_STEP, Int(sat_i64(event.step))),
        (ATTR_TS_MONOTONIC, Int(sat_i64(event.ts_monotonic_ns))),
    ];
    match event.kind {
        JourneyEventKind::Scheduled { resume } => attributes.push((
            ATTR_SCHEDULE_KIND,
            Str(Cow::Borrowed(if resume { "RESUME" } else { "FIRST" })),
        )),
        JourneyEventKind::Finished(reason) => attributes.push((
            ATTR_FINISH_STATUS,
            Str(Cow::Borrowed(finish_status(reason))),
        )),
        _ => {}
    }
    SpanEventOut {
        name: event.kind.name(),
        time_unix_ns: event.ts_unix_ns,
        attributes,
    }
}

/// `llm_core` of one engine request (choice), child of `llm_request`.
pub(crate) fn core_span(log: &JourneyLog) -> JourneySpan {
    let decision = &log.decision;
    let start = log.events.first().map_or(0, |e| e.ts_unix_ns);
    let end = log.events.last().map_or(start, |e| e.ts_unix_ns).max(start);
    let error = log.events.iter().find_map(|e| match e.kind {
        JourneyEventKind::Finished(FinishReason::Error) => {
            Some("the model failed on this request".to_string())
        }
        _ => None,
    });
    let mut attributes = vec![
        (
            Cow::Borrowed(ATTR_REQUEST_ID),
            SpanValue::text(&log.request_id),
        ),
        (
            Cow::Borrowed(ATTR_JOURNEY_PROBABILITY),
            SpanValue::Float(decision.probability),
        ),
    ];
    attributes.extend(extra_attributes(decision));
    JourneySpan {
        name: SPAN_LLM_CORE,
        scope: SCOPE_SCHEDULER,
        server: false,
        trace_id: decision.trace_id,
        span_id: log.core_span_id,
        parent_span_id: Some(decision.request_span_id),
        parent_is_remote: false,
        tracestate: decision.parent.as_ref().and_then(|p| p.tracestate.clone()),
        start_unix_ns: start,
        end_unix_ns: end,
        attributes,
        events: log.events.iter().map(core_event).collect(),
        error,
    }
}

/// `llm_request`: the server's side, in the caller's trace when it sent a `traceparent`.
pub(crate) fn request_span(decision: &JourneyDecision, record: &RequestSpanRecord) -> JourneySpan {
    use SpanValue::{Float, Int, Str};
    let stamp_event = |name: &'static str, stamp: Stamp| SpanEventOut {
        name,
        time_unix_ns: stamp.unix_ns,
        attributes: vec![(ATTR_TS_MONOTONIC, Int(sat_i64(stamp.monotonic_ns)))],
    };
    let mut events = vec![stamp_event(EVENT_ARRIVED, record.arrived)];
    events.extend(
        record
            .handoff
            .map(|s| stamp_event(EVENT_HANDOFF_TO_CORE, s)),
    );
    events.extend(
        record
            .first_response
            .map(|s| stamp_event(EVENT_FIRST_RESPONSE_FROM_CORE, s)),
    );
    let error = match &record.outcome {
        RequestOutcome::Departed => {
            events.push(stamp_event(EVENT_DEPARTED, record.end));
            None
        }
        RequestOutcome::Aborted(reason) => {
            let mut event = stamp_event(EVENT_ABORTED, record.end);
            event
                .attributes
                .push((ATTR_ABORT_REASON, SpanValue::text(reason)));
            events.push(event);
            Some(reason.clone())
        }
    };
    let total = record.input_tokens + record.output_tokens;
    let info = &record.info;
    let b = Cow::Borrowed;
    let mut attributes = vec![
        (b("openinference.span.kind"), Str(b(OPENINFERENCE_KIND_LLM))),
        (b(GEN_AI_OPERATION_NAME), Str(b(info.operation))),
        (b(GEN_AI_REQUEST_MODEL), SpanValue::text(&info.model)),
        (b(GEN_AI_REQUEST_TEMPERATURE), Float(info.temperature)),
        (b(GEN_AI_REQUEST_TOP_P), Float(info.top_p)),
        (b(GEN_AI_REQUEST_N), Int(i64::from(info.n))),
        (b(GEN_AI_REQUEST_ID), SpanValue::text(&info.request_id)),
        (b(GEN_AI_RESPONSE_ID), SpanValue::text(&info.response_id)),
        (
            b(GEN_AI_USAGE_INPUT_TOKENS),
            Int(sat_i64(record.input_tokens)),
        ),
        (
            b(GEN_AI_USAGE_OUTPUT_TOKENS),
            Int(sat_i64(record.output_tokens)),
        ),
        (b(LLM_MODEL_NAME), SpanValue::text(&info.model)),
        (b(LLM_TOKEN_COUNT_PROMPT), Int(sat_i64(record.input_tokens))),
        (
            b(LLM_TOKEN_COUNT_COMPLETION),
            Int(sat_i64(record.output_tokens)),
        ),
        (b(LLM_TOKEN_COUNT_TOTAL), Int(sat_i64(total))),
        (b(ATTR_JOURNEY_PROBABILITY), Float(decision.probability)),
        (
            b(GEN_AI_LATENCY_E2E),
            Float(record.end.seconds_since(record.arrived)),
        ),
    ];
    if let Some(max_tokens) = info.max_tokens {
        attributes.push((b(GEN_AI_REQUEST_MAX_TOKENS), Int(sat_i64(max_tokens))));
    }
    if let Some(queue) = record.queue_time_s {
        attributes.push((b(GEN_AI_LATENCY_TIME_IN_QUEUE), Float(queue)));
    }
    if let Some(first) = record.first_response {
        attributes.push((
            b(GEN_AI_LATENCY_TTFT),
            Float(first.seconds_since(record.arrived)),
        ));
    }
    attributes.extend(extra_attributes(decision));
    JourneySpan {
        name: SPAN_LLM_REQUEST,
        scope: SCOPE_API,
        server: true,
        trace_id: decision.trace_id,
        span_id: decision.request_span_id,
        parent_span_id: decision.parent.as_ref().map(|p| p.parent_span_id),
        parent_is_remote: decision.parent.is_some(),
        tracestate: decision.parent.as_ref().and_then(|p| p.tracestate.clone()),
        start_unix_ns: record.arrived.unix_ns,
        end_unix_ns: record.end.unix_ns.max(record.arrived.unix_ns),
        attributes,
        events,
        error,
    }
}

/// A journey span as one JSON line (the step spans' shape: name, scope, ids as hex, times, the
/// span attributes as top-level keys, `events`).
pub(crate) fn render_json(span: &JourneySpan) -> String {
    let mut line = Map::new();
    line.insert("name".into(), Json::from(span.name));
    line.insert("scope".into(), Json::from(span.scope));
    line.insert(
        "kind".into(),
        Json::from(if span.server { "SERVER" } else { "INTERNAL" }),
    );
    line.insert("trace_id".into(), Json::from(span.trace_id.to_string()));
    line.insert("span_id".into(), Json::from(span.span_id.to_string()));
    line.insert(
        "parent_span_id".into(),
        span.parent_span_id
            .map_or(Json::Null, |id| Json::from(id.to_string())),
    );
    line.insert("links".into(), Json::Array(Vec::new()));
    line.insert(
        "start_time_unix_nano".into(),
        Json::from(span.start_unix_ns),
    );
    line.insert("end_time_unix_nano".into(), Json::from(span.end_unix_ns));
    if let Some(error) = &span.error {
        line.insert("status".into(), Json::from("ERROR"));
        line.insert("status_message".into(), Json::from(error.as_str()));
    }
    for (key, value) in &span.attributes {
        line.insert(key.to_string(), value.to_json());
    }
    let events = span
        .events
        .iter()
        .map(|event| {
            let attributes: Map<String, Json> = event
                .attributes
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.to_json()))
                .collect();
            serde_json::json!({
                "name": event.name,
                "time_unix_nano": event.time_unix_ns,
                "attributes": attributes,
            })
        })
        .collect();
    line.insert("events".into(), Json::Array(events));
    Json::Object(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace_context::TraceParent;

    fn arrival(request_id: u64, parent: Option<&TraceParent>) -> JourneyArrival<'_> {
        JourneyArrival {
            request_id,
            external_id: "chatcmpl-1",
            num_prompt_tokens: 10,
            max_tokens: 5,
            temperature: 1.0,
            num_choices: 1,
            parent,
            running_depth: 0,
            waiting_depth: 0,
            kv_usage_ratio: 0.0,
            step_id: 0,
        }
    }

    #[test]
    fn the_sampler_follows_its_rate_and_the_parent() {
        let mut sampler = JourneySampler::new(0.3, 11);
        let traced = (1..=20_000)
            .filter(|&id| sampler.by_rate(&arrival(id, None)).is_some())
            .count();
        assert!((5_400..6_600).contains(&traced), "{traced}");
        let d = sampler.by_rate(&arrival(
            (1..).find(|&id| journey_draw(11, id) < 0.3).unwrap(),
            None,
        ));
        assert_eq!(d.unwrap().probability, 0.3);
        let sampled = TraceParent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .unwrap();
        let mut never = JourneySampler::new(0.0, 11);
        let d = never.by_rate(&arrival(1, Some(&sampled))).unwrap();
        assert_eq!((d.trace_id, d.probability), (sampled.trace_id, 1.0));
        let unsampled = TraceParent {
            sampled: false,
            ..sampled
        };
        let mut always = JourneySampler::new(1.0, 11);
        assert!(always.by_rate(&arrival(1, Some(&unsampled))).is_none());
        assert!(always.by_rate(&arrival(1, None)).is_some());
    }
}
