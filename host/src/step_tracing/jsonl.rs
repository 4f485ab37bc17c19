//! The JSON-lines sink (`--step-tracing-file`): one JSON object per traced step, for users
//! without a collector, and the reader `policy replay` uses to get the step summaries back.
//!
//! A line mirrors the OTLP span: its name and scope, start/end times, the span attributes as
//! top-level keys (`step.id`, `step.last_step_duration_us`, `sampling.batch_probability`,
//! `sampling.rich_probability` on rich steps, `policy.name`, `policy.digest`, `policy.*`
//! extras), and `events`, each `{"name", "time_unix_nano", "attributes"}` with the same
//! attribute names and values as the OTLP events:
//!
//! ```json
//! {"name":"scheduler.step","scope":"stepscope.scheduler.step","start_time_unix_nano":…,
//!  "end_time_unix_nano":…,"step.id":12,…,"policy.name":"builtin:default",…,
//!  "events":[{"name":"step.BATCH_SUMMARY","time_unix_nano":…,"attributes":{"step.id":12,…}},
//!            {"name":"step.REQUEST_SNAPSHOT","time_unix_nano":…,"attributes":{…}}]}
//! ```
//!
//! The batch summary plus `step.last_step_duration_us` is the whole policy step summary except
//! the two draws, which [`read_step_summaries`] recomputes from the seed and the step id. Lines
//! are written by hand (no intermediate JSON tree, our static names unescaped, numbers through
//! itoa / ryu) because this runs for every traced step, ~2 650 attributes for 240 snapshots.

use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use thiserror::Error;

use super::config::StepTracingError;
use super::journey::JourneySpan;
use super::metrics::bump;
use super::otlp::extra_key;
use super::record::{
    ATTR_EFFECTIVE_PROMPT_LEN, ATTR_KV_BLOCKS_ALLOCATED, ATTR_KV_BLOCKS_CACHED,
    ATTR_NUM_COMPUTED_TOKENS, ATTR_NUM_OUTPUT_TOKENS, ATTR_NUM_PREEMPTIONS, ATTR_NUM_PROMPT_TOKENS,
    ATTR_PHASE, ATTR_SCHEDULED_TOKENS, ATTR_TRACE_ID,
};
use super::record::{
    AttrValue, BATCH_SUMMARY_ATTRIBUTES, EVENT_BATCH_SUMMARY, EVENT_REQUEST_SNAPSHOT, SCOPE_NAME,
    SPAN_BATCH_PROBABILITY, SPAN_LAST_STEP_DURATION_US, SPAN_NAME, SPAN_POLICY_DEGRADED,
    SPAN_POLICY_DIGEST, SPAN_POLICY_NAME, SPAN_POLICY_RICH_FAULT, SPAN_RICH_PROBABILITY,
    SPAN_STEP_ID, StepRecord, batch_summary_attributes, sat_i64, snapshot_attributes,
};
use super::record::{OPENINFERENCE_KIND_CHAIN, SPAN_OPENINFERENCE_KIND, step_links};
use crate::policy::random::step_draws;
use crate::policy::{RecordedStep, RequestArrival, RequestViews, StepSummary};
use crate::trace_context::{SpanId, TraceId};
use std::sync::atomic::AtomicU64;

pub(crate) struct JsonlSink {
    path: PathBuf,
    writer: BufWriter<File>,
    line: Vec<u8>,
}

impl JsonlSink {
    /// Creates (truncates) the file.
    pub(crate) fn create(path: &Path) -> Result<Self, StepTracingError> {
        let file = File::create(path).map_err(|source| StepTracingError::File {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: BufWriter::with_capacity(1 << 16, file),
            line: Vec::with_capacity(4096),
        })
    }

    /// Writes one step span (ids `ids`) as a line, counting it in `written` or `failures`.
    pub(crate) fn write(
        &mut self,
        record: &StepRecord,
        ids: (TraceId, SpanId),
        written: &AtomicU64,
        failures: &AtomicU64,
    ) {
        self.line.clear();
        render_line(&mut self.line, record, ids);
        self.write_buffered(written, failures);
    }

    /// Writes one journey span as a line.
    pub(crate) fn write_journey(
        &mut self,
        span: &JourneySpan,
        written: &AtomicU64,
        failures: &AtomicU64,
    ) {
        self.line.clear();
        self.line
            .extend_from_slice(super::journey::render_json(span).as_bytes());
        self.write_buffered(written, failures);
    }

    /// Writes a request arrival (`--record-steps` with journeys on) as a line named
    /// [`ARRIVAL_LINE`]: the fields `decide-request` was given.
    pub(crate) fn write_arrival(&mut self, arrival: &RequestArrival, failures: &AtomicU64) {
        self.line.clear();
        let line = serde_json::json!({
            "name": ARRIVAL_LINE,
            "request_id": arrival.request_id,
            "prompt_tokens": arrival.prompt_tokens,
            "max_tokens": arrival.max_tokens,
            "temperature": arrival.temperature,
            "num_choices": arrival.num_choices,
            "parent_sampled": arrival.parent_sampled,
            "running_depth": arrival.running_depth,
            "waiting_depth": arrival.waiting_depth,
            "kv_usage_ratio": arrival.kv_usage_ratio,
            "random": arrival.random,
        });
        self.line.extend_from_slice(line.to_string().as_bytes());
        self.write_buffered(&AtomicU64::new(0), failures);
    }

    fn write_buffered(&mut self, written: &AtomicU64, failures: &AtomicU64) {
        self.line.push(b'\n');
        match self.writer.write_all(&self.line) {
            Ok(()) => bump(written),
            Err(error) => {
                bump(failures);
                let failures = failures.load(std::sync::atomic::Ordering::Relaxed);
                if failures.is_power_of_two() {
                    tracing::warn!(path = %self.path.display(), %error, failures, "cannot write step trace line");
                }
            }
        }
    }

    pub(crate) fn flush(&mut self, failures: &AtomicU64) {
        if let Err(error) = self.writer.flush() {
            // Counted once per failed flush (how many buffered lines it lost is unknown).
            bump(failures);
            tracing::warn!(path = %self.path.display(), %error, "cannot flush the step trace file");
        }
    }
}

/// Renders one record, whose span has ids `(trace_id, span_id)`, as a JSON object (no trailing
/// newline).
pub(crate) fn render_line(out: &mut Vec<u8>, record: &StepRecord, ids: (TraceId, SpanId)) {
    let policy = &record.policy;
    let s = &record.summary;
    out.extend_from_slice(b"{\"name\":");
    push_str(out, SPAN_NAME);
    out.extend_from_slice(b",\"scope\":");
    push_str(out, SCOPE_NAME);
    out.extend_from_slice(b",\"kind\":\"INTERNAL\"");
    push_field(out, "trace_id", AttrValue::TraceId(ids.0));
    out.extend_from_slice(b",\"span_id\":\"");
    let _ = write!(out, "{}", ids.1);
    out.extend_from_slice(b"\",\"parent_span_id\":null,\"links\":[");
    for (i, (trace_id, span_id)) in step_links(record).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(
            out,
            "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
        );
    }
    out.push(b']');
    push_field(
        out,
        "start_time_unix_nano",
        AttrValue::Int(sat_i64(s.ts_start_ns)),
    );
    push_field(
        out,
        "end_time_unix_nano",
        AttrValue::Int(sat_i64(record.span_end_ns())),
    );
    push_field(out, SPAN_STEP_ID, AttrValue::Int(sat_i64(s.step_id)));
    push_field(
        out,
        SPAN_LAST_STEP_DURATION_US,
        AttrValue::Int(sat_i64(s.last_step_duration_us)),
    );
    push_field(
        out,
        SPAN_BATCH_PROBABILITY,
        AttrValue::Float(record.batch_probability),
    );
    if let Some(rich) = &record.rich {
        push_field(
            out,
            SPAN_RICH_PROBABILITY,
            AttrValue::Float(rich.probability),
        );
    }
    out.push(b',');
    push_str(out, SPAN_POLICY_NAME);
    out.push(b':');
    push_str(out, &policy.name);
    out.push(b',');
    push_str(out, SPAN_POLICY_DIGEST);
    out.push(b':');
    push_str(out, &policy.digest);
    if record.degraded {
        out.push(b',');
        push_str(out, SPAN_POLICY_DEGRADED);
        out.extend_from_slice(b":true");
    }
    if let Some(kind) = record.rich_fault {
        out.push(b',');
        push_str(out, SPAN_POLICY_RICH_FAULT);
        out.push(b':');
        push_str(out, kind.as_str());
    }
    for (key, value) in &record.extra {
        out.push(b',');
        push_str(out, &extra_key(key));
        out.push(b':');
        push_str(out, value);
    }
    out.push(b',');
    push_str(out, SPAN_OPENINFERENCE_KIND);
    out.push(b':');
    push_str(out, OPENINFERENCE_KIND_CHAIN);
    // The batch numbers as span attributes too (as on the OTLP span; `step.id` is there).
    for (name, value) in batch_summary_attributes(s) {
        if name != SPAN_STEP_ID {
            push_field(out, name, value);
        }
    }
    out.extend_from_slice(b",\"events\":[");
    let time = sat_i64(s.ts_end_ns.max(s.ts_start_ns));
    push_event_head(out, EVENT_BATCH_SUMMARY, time);
    for (i, (name, value)) in batch_summary_attributes(s).into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_attr(out, name, value);
    }
    out.extend_from_slice(b"}}");
    if let Some(rich) = &record.rich {
        for row in &rich.rows {
            out.push(b',');
            push_event_head(out, EVENT_REQUEST_SNAPSHOT, time);
            let mut first = true;
            snapshot_attributes(s.step_id, row, rich.attributes, |name, value| {
                if !first {
                    out.push(b',');
                }
                first = false;
                push_attr(out, name, value);
            });
            out.extend_from_slice(b"}}");
        }
    }
    out.extend_from_slice(b"]}");
}

fn push_event_head(out: &mut Vec<u8>, name: &'static str, time: i64) {
    out.extend_from_slice(b"{\"name\":\"");
    out.extend_from_slice(name.as_bytes());
    out.push(b'"');
    push_field(out, "time_unix_nano", AttrValue::Int(time));
    out.extend_from_slice(b",\"attributes\":{");
}

/// `,"name":value`.
fn push_field(out: &mut Vec<u8>, name: &'static str, value: AttrValue) {
    out.push(b',');
    push_attr(out, name, value);
}

/// `"name":value` for one of our attribute names (static, plain ASCII: written as is, without
/// an escaping pass; this runs ~11 times per snapshot).
fn push_attr(out: &mut Vec<u8>, name: &'static str, value: AttrValue) {
    debug_assert!(
        name.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    );
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    match value {
        // serde_json writes numbers with itoa / ryu; writing into a Vec cannot fail.
        AttrValue::Int(v) => {
            let _ = serde_json::to_writer(&mut *out, &v);
        }
        // Non-finite floats become `null`.
        AttrValue::Float(v) => {
            let _ = serde_json::to_writer(&mut *out, &v);
        }
        AttrValue::Str(v) => {
            debug_assert!(
                v.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            );
            out.push(b'"');
            out.extend_from_slice(v.as_bytes());
            out.push(b'"');
        }
        // A client's request id: escaped.
        AttrValue::Text(v) => {
            let _ = serde_json::to_writer(&mut *out, v);
        }
        AttrValue::TraceId(id) => {
            let _ = write!(out, "\"{id}\"");
        }
    }
}

/// A JSON string literal, escaped (for names and values that come from outside).
fn push_str(out: &mut Vec<u8>, text: &str) {
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The non-blank lines of a JSON-lines file, parsed, with their 1-based line numbers.
fn json_lines(reader: impl BufRead) -> impl Iterator<Item = Result<(usize, Json), JsonlReadError>> {
    reader.lines().enumerate().filter_map(|(index, line)| {
        let line_no = index + 1;
        let line = match line {
            Ok(line) if line.trim().is_empty() => return None,
            Ok(line) => line,
            Err(source) => {
                return Some(Err(JsonlReadError::Io {
                    line: line_no,
                    source,
                }));
            }
        };
        Some(
            serde_json::from_str(&line)
                .map(|json| (line_no, json))
                .map_err(|source| JsonlReadError::Json {
                    line: line_no,
                    source,
                }),
        )
    })
}

/// The `name` of a recorded request arrival's line.
pub const ARRIVAL_LINE: &str = "journey.ARRIVAL";

/// Reads back the request arrivals of a `--record-steps` file (recorded with journey tracing
/// on), in file order; other lines are skipped.
pub fn read_recorded_arrivals(reader: impl BufRead) -> Result<Vec<RequestArrival>, JsonlReadError> {
    let mut out = Vec::new();
    for line in json_lines(reader) {
        let (line_no, json) = line?;
        if json.get("name").and_then(Json::as_str) != Some(ARRIVAL_LINE) {
            continue;
        }
        let malformed = |what: &str| JsonlReadError::Malformed {
            line: line_no,
            what: format!("{ARRIVAL_LINE}: {what}"),
        };
        let int = |key: &str| {
            json.get(key)
                .and_then(Json::as_u64)
                .ok_or_else(|| malformed(key))
        };
        let small = |key: &str| int(key).map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        let float = |key: &str| {
            json.get(key)
                .and_then(Json::as_f64)
                .ok_or_else(|| malformed(key))
        };
        out.push(RequestArrival {
            request_id: int("request_id")?,
            prompt_tokens: small("prompt_tokens")?,
            max_tokens: small("max_tokens")?,
            temperature: float("temperature")?,
            num_choices: small("num_choices")?,
            parent_sampled: json.get("parent_sampled").and_then(Json::as_bool),
            running_depth: small("running_depth")?,
            waiting_depth: small("waiting_depth")?,
            kv_usage_ratio: float("kv_usage_ratio")?,
            random: float("random")?,
        });
    }
    Ok(out)
}

/// Why a trace file could not be read back.
#[derive(Debug, Error)]
pub enum JsonlReadError {
    #[error("line {line}: {source}")]
    Io { line: usize, source: std::io::Error },
    #[error("line {line}: not JSON: {source}")]
    Json {
        line: usize,
        source: serde_json::Error,
    },
    #[error("line {line}: {what}")]
    Malformed { line: usize, what: String },
}

/// Reads back the step summaries of a `--step-tracing-file` written with `seed` (the draws are
/// recomputed from it), in file order. Blank lines are skipped.
pub fn read_step_summaries(
    reader: impl BufRead,
    seed: u64,
) -> Result<Vec<StepSummary>, JsonlReadError> {
    Ok(read_recorded_steps(reader, seed)?
        .into_iter()
        .map(|step| step.summary)
        .collect())
}

/// Like [`read_step_summaries`], with each rich line's `step.REQUEST_SNAPSHOT` events turned back
/// into request-view columns (attributes the recording policy left out read as 0). A policy
/// sees integer request ids: each distinct `request.id` string gets the next integer, from 1, in
/// file order (an older file's integer ids are kept as they are).
pub fn read_recorded_steps(
    reader: impl BufRead,
    seed: u64,
) -> Result<Vec<RecordedStep>, JsonlReadError> {
    let mut out = Vec::new();
    let mut request_ids = RequestIdMap::default();
    for line in json_lines(reader) {
        let (line_no, json) = line?;
        // Journey spans share the file; only step spans hold steps.
        if json
            .get("name")
            .and_then(Json::as_str)
            .is_some_and(|name| name != SPAN_NAME)
        {
            continue;
        }
        let summary = summary_from_line(&json, seed).map_err(|what| JsonlReadError::Malformed {
            line: line_no,
            what,
        })?;
        out.push(RecordedStep {
            summary,
            requests: views_from_line(&json, &mut request_ids),
        });
    }
    Ok(out)
}

/// Integer ids for the `request.id` strings of a recording, in order of first appearance.
#[derive(Default)]
struct RequestIdMap {
    ids: std::collections::HashMap<String, u64>,
}

impl RequestIdMap {
    fn id_of(&mut self, value: Option<&Json>) -> u64 {
        match value {
            Some(Json::String(text)) => {
                let next = self.ids.len() as u64 + 1;
                *self.ids.entry(text.clone()).or_insert(next)
            }
            Some(other) => other.as_u64().unwrap_or(0),
            None => 0,
        }
    }
}

/// The request views of a line's snapshot events; `None` when it has none.
fn views_from_line(json: &Json, request_ids: &mut RequestIdMap) -> Option<RequestViews> {
    let snapshots: Vec<&Json> = json
        .get("events")?
        .as_array()?
        .iter()
        .filter(|e| e.get("name").and_then(Json::as_str) == Some(EVENT_REQUEST_SNAPSHOT))
        .filter_map(|e| e.get("attributes"))
        .collect();
    if snapshots.is_empty() {
        return None;
    }
    let column = |name: &str| -> Vec<u32> {
        snapshots
            .iter()
            .map(|a| {
                a.get(name)
                    .and_then(Json::as_u64)
                    .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX))
            })
            .collect()
    };
    let phase = |a: &&Json| a.get(ATTR_PHASE).and_then(Json::as_str) == Some("PREFILL");
    Some(RequestViews {
        request_id: snapshots
            .iter()
            .map(|a| request_ids.id_of(a.get("request.id")))
            .collect(),
        is_prefill: snapshots.iter().map(|a| u8::from(phase(a))).collect(),
        num_prompt_tokens: column(ATTR_NUM_PROMPT_TOKENS),
        num_computed_tokens: column(ATTR_NUM_COMPUTED_TOKENS),
        num_output_tokens: column(ATTR_NUM_OUTPUT_TOKENS),
        num_preemptions: column(ATTR_NUM_PREEMPTIONS),
        scheduled_tokens: column(ATTR_SCHEDULED_TOKENS),
        kv_blocks_allocated: column(ATTR_KV_BLOCKS_ALLOCATED),
        kv_blocks_cached: column(ATTR_KV_BLOCKS_CACHED),
        // Not an event attribute: recovered from `request.effective_prompt_len` (prompt -
        // cached, present whenever not all of the prompt was cached), else 0.
        num_cached_tokens: snapshots
            .iter()
            .map(|a| {
                let prompt = a.get(ATTR_NUM_PROMPT_TOKENS).and_then(Json::as_u64);
                let effective = a.get(ATTR_EFFECTIVE_PROMPT_LEN).and_then(Json::as_u64);
                match (prompt, effective) {
                    (Some(p), Some(e)) => u32::try_from(p.saturating_sub(e)).unwrap_or(u32::MAX),
                    _ => 0,
                }
            })
            .collect(),
        // Not recorded on snapshots: 0 (the time in the system and max_tokens are unknown to
        // a replay); a snapshot with `request.trace_id` belonged to a traced journey.
        time_since_arrival_us: vec![0; snapshots.len()],
        max_tokens: vec![0; snapshots.len()],
        journey_traced: snapshots
            .iter()
            .map(|a| u8::from(a.get(ATTR_TRACE_ID).is_some()))
            .collect(),
    })
}

fn summary_from_line(json: &Json, seed: u64) -> Result<StepSummary, String> {
    let events = json
        .get("events")
        .and_then(Json::as_array)
        .ok_or("no `events` list")?;
    let attrs = events
        .iter()
        .find(|e| e.get("name").and_then(Json::as_str) == Some(EVENT_BATCH_SUMMARY))
        .and_then(|e| e.get("attributes"))
        .ok_or_else(|| format!("no {EVENT_BATCH_SUMMARY} event"))?;
    let int = |name: &str| -> Result<u64, String> {
        attrs
            .get(name)
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("{EVENT_BATCH_SUMMARY} has no integer `{name}`"))
    };
    let small = |name: &str| -> Result<u32, String> {
        u32::try_from(int(name)?).map_err(|_| format!("`{name}` does not fit in 32 bits"))
    };
    debug_assert_eq!(BATCH_SUMMARY_ATTRIBUTES[13], "kv.usage_gpu_ratio");
    let step_id = int("step.id")?;
    let (random_batch, random_rich) = step_draws(seed, step_id);
    Ok(StepSummary {
        step_id,
        ts_start_ns: int("step.ts_start_ns")?,
        ts_end_ns: int("step.ts_end_ns")?,
        duration_us: int("step.duration_us")?,
        last_step_duration_us: json
            .get(SPAN_LAST_STEP_DURATION_US)
            .and_then(Json::as_u64)
            .unwrap_or(0),
        running_depth: small("queue.running_depth")?,
        waiting_depth: small("queue.waiting_depth")?,
        num_prefill_reqs: small("batch.num_prefill_reqs")?,
        num_decode_reqs: small("batch.num_decode_reqs")?,
        scheduled_tokens: small("batch.scheduled_tokens")?,
        prefill_tokens: small("batch.prefill_tokens")?,
        decode_tokens: small("batch.decode_tokens")?,
        num_finished: small("batch.num_finished")?,
        num_preempted: small("batch.num_preempted")?,
        kv_blocks_total: small("kv.blocks_total_gpu")?,
        kv_blocks_free: small("kv.blocks_free_gpu")?,
        kv_usage_ratio: attrs
            .get("kv.usage_gpu_ratio")
            .and_then(Json::as_f64)
            .ok_or("no number `kv.usage_gpu_ratio`")?,
        random_batch,
        random_rich,
    })
}
