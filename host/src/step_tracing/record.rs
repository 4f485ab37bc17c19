//! What crosses from the step loop to the exporter thread, and the attribute names it becomes.
//!
//! The engine thread copies a sampled step into a [`StepRecord`]: the policy's
//! [`StepSummary`] (plain numbers, `Copy`), the sampling probabilities and the policy's extra
//! attributes, and for a rich step one [`SnapshotRow`] of plain numbers per chosen request. No
//! string is formatted and no OpenTelemetry type is built on the step loop; the exporter thread
//! turns a record into a span ([`otlp`](super::otlp)) and a JSON line ([`jsonl`](super::jsonl)).
//! The names below are the contract users' dashboards depend on (see `docs/ARCHITECTURE.md`,
//! "The export path"): keep them exactly.

use std::sync::Arc;

use crate::engine::StepView;
use crate::policy::random::step_draws;
use crate::policy::{FaultKind, SnapshotAttributes, StepSummary};
use crate::trace_context::{SpanId, TraceId};

/// Instrumentation scope of every step span.
pub const SCOPE_NAME: &str = "stepscope.scheduler.step";
/// Name of the span of a traced step.
pub const SPAN_NAME: &str = "scheduler.step";
/// The batch-summary event (one per traced step).
pub const EVENT_BATCH_SUMMARY: &str = "step.BATCH_SUMMARY";
/// The per-request snapshot event (one per chosen running request of a rich step).
pub const EVENT_REQUEST_SNAPSHOT: &str = "step.REQUEST_SNAPSHOT";

/// The 16 attributes of `step.BATCH_SUMMARY`, in order.
pub const BATCH_SUMMARY_ATTRIBUTES: [&str; 16] = [
    "step.id",
    "step.ts_start_ns",
    "step.ts_end_ns",
    "step.duration_us",
    "queue.running_depth",
    "queue.waiting_depth",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
    "batch.scheduled_tokens",
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.num_finished",
    "batch.num_preempted",
    "kv.usage_gpu_ratio",
    "kv.blocks_total_gpu",
    "kv.blocks_free_gpu",
];

/// `step.REQUEST_SNAPSHOT` attributes that are always present.
pub const SNAPSHOT_ALWAYS: [&str; 2] = ["step.id", "request.id"];
pub const ATTR_PHASE: &str = "request.phase";
pub const ATTR_NUM_PROMPT_TOKENS: &str = "request.num_prompt_tokens";
pub const ATTR_NUM_COMPUTED_TOKENS: &str = "request.num_computed_tokens";
pub const ATTR_NUM_OUTPUT_TOKENS: &str = "request.num_output_tokens";
pub const ATTR_NUM_PREEMPTIONS: &str = "request.num_preemptions";
pub const ATTR_SCHEDULED_TOKENS: &str = "request.scheduled_tokens_this_step";
pub const ATTR_KV_BLOCKS_ALLOCATED: &str = "kv.blocks_allocated_gpu";
pub const ATTR_KV_BLOCKS_CACHED: &str = "kv.blocks_cached_gpu";
pub const ATTR_EFFECTIVE_PROMPT_LEN: &str = "request.effective_prompt_len";
/// On the snapshot of a request whose journey is traced: its trace id (hex).
pub const ATTR_TRACE_ID: &str = "request.trace_id";

/// Span attributes (on every step span).
pub const SPAN_STEP_ID: &str = "step.id";
/// Wall time of the previous whole engine step, in µs (the `last-step-duration-us` the policy
/// saw; with the batch summary it rebuilds the whole step summary for `policy replay`).
pub const SPAN_LAST_STEP_DURATION_US: &str = "step.last_step_duration_us";
pub const SPAN_BATCH_PROBABILITY: &str = "sampling.batch_probability";
/// Only on rich spans.
pub const SPAN_RICH_PROBABILITY: &str = "sampling.rich_probability";
pub const SPAN_POLICY_NAME: &str = "policy.name";
pub const SPAN_POLICY_DIGEST: &str = "policy.digest";
/// `true` on a step the built-in default decided because the configured policy went over its
/// step budget (`policy.name` is then the default's); absent otherwise.
pub const SPAN_POLICY_DEGRADED: &str = "policy.degraded";
/// The fault kind (`trap`, `malformed`, …) when the policy's `plan-rich` failed on a step it
/// had rich-sampled: the batch summary is kept, no snapshots are emitted; absent otherwise.
pub const SPAN_POLICY_RICH_FAULT: &str = "policy.rich_fault";
/// OpenInference's span kind, by which LLM-observability tools (Arize Phoenix, …) classify a
/// span; a step is a `CHAIN`.
pub const SPAN_OPENINFERENCE_KIND: &str = "openinference.span.kind";
pub const OPENINFERENCE_KIND_CHAIN: &str = "CHAIN";

/// One chosen running request of a rich step: its id and plain numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    /// `request.id`: the id the client knows the request by (`chatcmpl-…`, or its
    /// `X-Request-Id`), not the engine's integer.
    pub request_id: Arc<str>,
    /// PREFILL while the request has no output token.
    pub is_prefill: bool,
    pub num_prompt_tokens: u32,
    pub num_computed_tokens: u32,
    pub num_output_tokens: u32,
    pub num_preemptions: u32,
    pub scheduled_tokens: u32,
    pub kv_blocks_allocated: u32,
    pub kv_blocks_cached: u32,
    /// `Some(prompt - cached)` whenever not all of the prompt came from the prefix cache (a
    /// miss included).
    pub effective_prompt_len: Option<u32>,
    /// The request's traced journey: its trace (`request.trace_id`) and `llm_core` span, which
    /// the step span links to.
    pub journey: Option<(TraceId, SpanId)>,
}

/// The snapshots of a rich step.
#[derive(Debug, Clone, PartialEq)]
pub struct RichRecord {
    /// `sampling.rich_probability`.
    pub probability: f64,
    /// Which optional attributes every snapshot carries.
    pub attributes: SnapshotAttributes,
    pub rows: Vec<SnapshotRow>,
}

/// The policy that sampled a step: `policy.name` and `policy.digest` on its span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyIdentity {
    /// `builtin:default`, the file path, or the name given to an uploaded policy.
    pub name: Arc<str>,
    /// `sha256:<hex>` of the component.
    pub digest: Arc<str>,
}

/// A sampled step, as queued for the exporter thread.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// The policy that decided this step (it changes at a hot swap).
    pub policy: Arc<PolicyIdentity>,
    /// The numbers the policy saw (those of `step.BATCH_SUMMARY`, plus the draws).
    pub summary: StepSummary,
    /// `sampling.batch_probability`.
    pub batch_probability: f64,
    /// The policy's extra attributes (decide's, then plan-rich's), without the prefix.
    pub extra: Vec<(String, String)>,
    pub rich: Option<RichRecord>,
    /// `policy.degraded`: the built-in default decided in place of a degraded policy.
    pub degraded: bool,
    /// `policy.rich_fault`: the step was rich-sampled but `plan-rich` faulted (`rich` is `None`).
    pub rich_fault: Option<FaultKind>,
    /// When the whole step (forward pass, sampling, update) was over, Unix ns: the span's end.
    /// `None` when the engine did not report it; the span then ends at `ts_end_ns`.
    pub ts_step_end_ns: Option<u64>,
}

impl StepRecord {
    /// The span's end: the step's end, never before the batch was decided.
    pub fn span_end_ns(&self) -> u64 {
        let decided = self.summary.ts_end_ns.max(self.summary.ts_start_ns);
        self.ts_step_end_ns.map_or(decided, |end| end.max(decided))
    }
}

/// The span links of a step: the `llm_core` span of every snapshotted request whose journey is
/// traced.
pub fn step_links(record: &StepRecord) -> impl Iterator<Item = (TraceId, SpanId)> + '_ {
    record
        .rich
        .iter()
        .flat_map(|rich| rich.rows.iter().filter_map(|row| row.journey))
}

/// Saturating `usize` → `u32` (queue depths and token counts fit; never wrap if they don't).
#[inline]
pub(crate) fn sat_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// Saturating `u64` → `i64` for OpenTelemetry integer attributes.
#[inline]
pub(crate) fn sat_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The policy's step summary for a step: the `step.BATCH_SUMMARY` numbers, the previous step's
/// duration, and the two draws of `random::step_draws(seed, step_id)`.
pub fn step_summary(step: &StepView<'_>, seed: u64) -> StepSummary {
    let (random_batch, random_rich) = step_draws(seed, step.id);
    StepSummary {
        step_id: step.id,
        ts_start_ns: step.ts_start_ns,
        ts_end_ns: step.ts_end_ns,
        duration_us: step.duration_us,
        last_step_duration_us: step.last_step_duration_us,
        running_depth: sat_u32(step.queue.running_depth),
        waiting_depth: sat_u32(step.queue.waiting_depth),
        num_prefill_reqs: sat_u32(step.batch.num_prefill_reqs),
        num_decode_reqs: sat_u32(step.batch.num_decode_reqs),
        scheduled_tokens: sat_u32(step.batch.scheduled_tokens),
        prefill_tokens: sat_u32(step.batch.prefill_tokens),
        decode_tokens: sat_u32(step.batch.decode_tokens),
        num_finished: sat_u32(step.batch.num_finished),
        num_preempted: sat_u32(step.batch.num_preempted),
        kv_blocks_total: sat_u32(step.kv.blocks_total),
        kv_blocks_free: sat_u32(step.kv.blocks_free),
        kv_usage_ratio: step.kv.usage_ratio,
        random_batch,
        random_rich,
    }
}

/// A typed attribute value, shared by the OTLP and JSON-lines renderings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrValue<'a> {
    Int(i64),
    Float(f64),
    Str(&'static str),
    /// Text that lives as long as the record (a request id).
    Text(&'a str),
    /// A trace id, written as 32 hex digits.
    TraceId(TraceId),
}

/// The 16 `step.BATCH_SUMMARY` attributes of a summary, in [`BATCH_SUMMARY_ATTRIBUTES`] order.
pub fn batch_summary_attributes(s: &StepSummary) -> [(&'static str, AttrValue<'static>); 16] {
    use AttrValue::{Float, Int};
    let n = |v: u32| Int(i64::from(v));
    let values = [
        Int(sat_i64(s.step_id)),
        Int(sat_i64(s.ts_start_ns)),
        Int(sat_i64(s.ts_end_ns)),
        Int(sat_i64(s.duration_us)),
        n(s.running_depth),
        n(s.waiting_depth),
        n(s.num_prefill_reqs),
        n(s.num_decode_reqs),
        n(s.scheduled_tokens),
        n(s.prefill_tokens),
        n(s.decode_tokens),
        n(s.num_finished),
        n(s.num_preempted),
        Float(s.kv_usage_ratio),
        n(s.kv_blocks_total),
        n(s.kv_blocks_free),
    ];
    let mut out = [("", Int(0)); 16];
    for (slot, (name, value)) in out
        .iter_mut()
        .zip(BATCH_SUMMARY_ATTRIBUTES.iter().zip(values))
    {
        *slot = (name, value);
    }
    out
}

/// The attributes of one `step.REQUEST_SNAPSHOT` event, calling `push` for each.
pub fn snapshot_attributes<'a>(
    step_id: u64,
    row: &'a SnapshotRow,
    chosen: SnapshotAttributes,
    mut push: impl FnMut(&'static str, AttrValue<'a>),
) {
    use AttrValue::{Int, Str, Text};
    let n = |v: u32| Int(i64::from(v));
    push("step.id", Int(sat_i64(step_id)));
    push("request.id", Text(&row.request_id));
    if chosen.contains(SnapshotAttributes::PHASE) {
        push(
            ATTR_PHASE,
            Str(if row.is_prefill { "PREFILL" } else { "DECODE" }),
        );
    }
    if chosen.contains(SnapshotAttributes::NUM_PROMPT_TOKENS) {
        push(ATTR_NUM_PROMPT_TOKENS, n(row.num_prompt_tokens));
    }
    if chosen.contains(SnapshotAttributes::NUM_COMPUTED_TOKENS) {
        push(ATTR_NUM_COMPUTED_TOKENS, n(row.num_computed_tokens));
    }
    if chosen.contains(SnapshotAttributes::NUM_OUTPUT_TOKENS) {
        push(ATTR_NUM_OUTPUT_TOKENS, n(row.num_output_tokens));
    }
    if chosen.contains(SnapshotAttributes::NUM_PREEMPTIONS) {
        push(ATTR_NUM_PREEMPTIONS, n(row.num_preemptions));
    }
    if chosen.contains(SnapshotAttributes::SCHEDULED_TOKENS) {
        push(ATTR_SCHEDULED_TOKENS, n(row.scheduled_tokens));
    }
    if chosen.contains(SnapshotAttributes::KV_BLOCKS_ALLOCATED) {
        push(ATTR_KV_BLOCKS_ALLOCATED, n(row.kv_blocks_allocated));
    }
    if chosen.contains(SnapshotAttributes::KV_BLOCKS_CACHED) {
        push(ATTR_KV_BLOCKS_CACHED, n(row.kv_blocks_cached));
    }
    if chosen.contains(SnapshotAttributes::EFFECTIVE_PROMPT_LEN)
        && let Some(len) = row.effective_prompt_len
    {
        push(ATTR_EFFECTIVE_PROMPT_LEN, n(len));
    }
    if let Some((trace_id, _)) = row.journey {
        push(ATTR_TRACE_ID, AttrValue::TraceId(trace_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_summary_has_the_sixteen_names_in_order() {
        let summary = crate::policy::devkit::synthetic::step_summary(0, 3);
        let attrs = batch_summary_attributes(&summary);
        let names: Vec<&str> = attrs.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, BATCH_SUMMARY_ATTRIBUTES);
        assert_eq!(attrs[0].1, AttrValue::Int(3));
        assert!(matches!(attrs[13].1, AttrValue::Float(_)));
    }

    #[test]
    fn snapshot_attributes_follow_the_chosen_flags() {
        let row = SnapshotRow {
            request_id: Arc::from("chatcmpl-9"),
            is_prefill: true,
            num_prompt_tokens: 100,
            num_computed_tokens: 32,
            num_output_tokens: 0,
            num_preemptions: 1,
            scheduled_tokens: 16,
            kv_blocks_allocated: 3,
            kv_blocks_cached: 2,
            effective_prompt_len: Some(68),
            journey: None,
        };
        let mut names = Vec::new();
        snapshot_attributes(5, &row, SnapshotAttributes::all(), |n, _| names.push(n));
        assert_eq!(names.len(), 11);
        let mut names = Vec::new();
        let none = SnapshotAttributes::empty();
        snapshot_attributes(5, &row, none, |n, _| names.push(n));
        assert_eq!(names, SNAPSHOT_ALWAYS);
        let mut names = Vec::new();
        let mut values = Vec::new();
        snapshot_attributes(5, &row, none, |_, v| values.push(v));
        assert_eq!(values[1], AttrValue::Text("chatcmpl-9"));
        let no_epl = SnapshotRow {
            effective_prompt_len: None,
            ..row.clone()
        };
        snapshot_attributes(5, &no_epl, SnapshotAttributes::all(), |n, _| names.push(n));
        assert!(!names.contains(&ATTR_EFFECTIVE_PROMPT_LEN));
    }
}
