//! Reads a step-trace JSON-lines file (`--step-tracing-file`, or `--record-steps`, whose every
//! line has probability 1) into [`TraceFile`]: one [`TracedStep`] per `scheduler.step` line,
//! with the batch numbers, the probabilities the policy recorded, its `reason`, and the
//! request snapshots of rich steps; one [`TracedRequest`] per `llm_request` journey span (its
//! latencies, token counts and `sampling.journey_probability`). `llm_core` spans and recorded
//! arrivals sharing the file are counted, not kept. Malformed lines are an error naming the
//! line, with one exception: a last line that stops mid-JSON without its newline (the writer
//! was killed, or is still writing) is left out and reported in
//! [`TraceFile::truncated_last_line`], so the trace of a crashed server can still be read.

use std::io::BufRead;
use std::path::Path;

use serde_json::Value as Json;
use thiserror::Error;

use crate::step_tracing::journey::{
    ATTR_JOURNEY_PROBABILITY, GEN_AI_LATENCY_E2E, GEN_AI_LATENCY_TIME_IN_QUEUE,
    GEN_AI_LATENCY_TTFT, GEN_AI_USAGE_INPUT_TOKENS, GEN_AI_USAGE_OUTPUT_TOKENS, SPAN_LLM_CORE,
    SPAN_LLM_REQUEST,
};
use crate::step_tracing::record::{
    ATTR_KV_BLOCKS_ALLOCATED, ATTR_NUM_COMPUTED_TOKENS, ATTR_PHASE, EVENT_BATCH_SUMMARY,
    EVENT_REQUEST_SNAPSHOT, SPAN_BATCH_PROBABILITY, SPAN_LAST_STEP_DURATION_US, SPAN_NAME,
    SPAN_POLICY_DEGRADED, SPAN_POLICY_NAME, SPAN_RICH_PROBABILITY, SPAN_STEP_ID,
};

/// Why a trace file could not be read.
#[derive(Debug, Error)]
pub enum TraceLoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {what}")]
    Malformed {
        path: String,
        line: usize,
        what: String,
    },
    #[error("{path} holds no `scheduler.step` line: not a step trace (or nothing was sampled)")]
    NoSteps { path: String },
}

/// One request as a rich step snapshotted it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub request_id: String,
    /// `request.phase` (`PREFILL`, `DECODE`), when the policy kept it.
    pub phase: Option<String>,
    pub num_computed_tokens: Option<u64>,
    pub kv_blocks_allocated: Option<u64>,
}

/// One traced step.
#[derive(Debug, Clone, PartialEq)]
pub struct TracedStep {
    pub step_id: u64,
    /// Span start and end (Unix ns): `schedule()` began; the whole step was over.
    pub start_ns: u64,
    pub end_ns: u64,
    /// `sampling.batch_probability`: the chance this step was traced (1 in a `--record-steps`
    /// file).
    pub batch_probability: f64,
    /// `sampling.rich_probability`, on rich steps.
    pub rich_probability: Option<f64>,
    pub running_depth: u64,
    pub waiting_depth: u64,
    pub num_prefill_reqs: u64,
    pub num_decode_reqs: u64,
    pub scheduled_tokens: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub num_preempted: u64,
    pub num_finished: u64,
    pub kv_usage: f64,
    /// `step.duration_us`: the scheduler's share of this step.
    pub schedule_us: u64,
    /// `step.last_step_duration_us`: the whole previous step.
    pub last_step_duration_us: u64,
    pub policy: String,
    /// The policy's `reason` attribute, if it gave one.
    pub reason: Option<String>,
    pub degraded: bool,
    pub snapshots: Vec<Snapshot>,
}

impl TracedStep {
    /// Requests in the batch (prefill and decode).
    pub fn batch_size(&self) -> u64 {
        self.num_prefill_reqs + self.num_decode_reqs
    }
}

/// One request's `llm_request` journey span: what the API side measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TracedRequest {
    /// `sampling.journey_probability`: the chance this request's journey was traced.
    pub journey_probability: f64,
    /// `gen_ai.latency.e2e`, seconds from arrival to the answer's end.
    pub e2e_s: f64,
    /// `gen_ai.latency.time_to_first_token`, when a first token came.
    pub ttft_s: Option<f64>,
    /// `gen_ai.latency.time_in_queue`, when the request was scheduled.
    pub queue_s: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The span's status is `ERROR` (aborted: client gone, server stopping, model failure).
    pub failed: bool,
}

/// A trace file, steps in file order.
#[derive(Debug, Clone, Default)]
pub struct TraceFile {
    pub steps: Vec<TracedStep>,
    /// `llm_request` journey spans, in file order.
    pub requests: Vec<TracedRequest>,
    /// Journey spans (`llm_request`, `llm_core`) in the file.
    pub journey_spans: u64,
    /// Other lines (recorded arrivals).
    pub other_lines: u64,
    /// The number of the last line when it was cut short (no newline, JSON ending early) and
    /// left out.
    pub truncated_last_line: Option<usize>,
}

impl TraceFile {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self, TraceLoadError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| TraceLoadError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(std::io::BufReader::new(file), &shown)
    }

    /// Reads a trace from `reader` (`path` names it in errors).
    pub fn parse(mut reader: impl BufRead, path: &str) -> Result<Self, TraceLoadError> {
        let mut trace = TraceFile::default();
        let mut line = String::new();
        for index in 0.. {
            line.clear();
            let read = reader
                .read_line(&mut line)
                .map_err(|source| TraceLoadError::Io {
                    path: path.to_string(),
                    source,
                })?;
            if read == 0 {
                break;
            }
            let malformed = |what: String| TraceLoadError::Malformed {
                path: path.to_string(),
                line: index + 1,
                what,
            };
            if line.trim().is_empty() {
                continue;
            }
            let json: Json = match serde_json::from_str(&line) {
                Ok(json) => json,
                Err(e)
                    if !line.ends_with('\n')
                        && e.classify() == serde_json::error::Category::Eof =>
                {
                    trace.truncated_last_line = Some(index + 1);
                    break;
                }
                Err(e) => return Err(malformed(format!("not JSON: {e}"))),
            };
            match json.get("name").and_then(Json::as_str) {
                Some(SPAN_NAME) => trace.steps.push(step(&json).map_err(malformed)?),
                Some(SPAN_LLM_REQUEST) => {
                    trace.journey_spans += 1;
                    trace.requests.push(request(&json).map_err(malformed)?);
                }
                Some(SPAN_LLM_CORE) => trace.journey_spans += 1,
                _ => trace.other_lines += 1,
            }
        }
        if trace.steps.is_empty() {
            return Err(TraceLoadError::NoSteps {
                path: path.to_string(),
            });
        }
        Ok(trace)
    }
}

fn request(line: &Json) -> Result<TracedRequest, String> {
    let float = |key: &str| line.get(key).and_then(Json::as_f64);
    let int = |key: &str| {
        line.get(key)
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("{SPAN_LLM_REQUEST}: `{key}` missing or not an integer"))
    };
    let probability = float(ATTR_JOURNEY_PROBABILITY).ok_or(format!(
        "{SPAN_LLM_REQUEST}: `{ATTR_JOURNEY_PROBABILITY}` missing"
    ))?;
    if !(probability > 0.0 && probability <= 1.0) {
        return Err(format!(
            "`{ATTR_JOURNEY_PROBABILITY}` is {probability}: a traced journey's must be in (0, 1]"
        ));
    }
    let seconds = |key: &str| match float(key) {
        Some(v) if v.is_finite() && v >= 0.0 => Ok(Some(v)),
        None if line.get(key).is_none() => Ok(None),
        _ => Err(format!(
            "{SPAN_LLM_REQUEST}: `{key}` is not a duration in seconds"
        )),
    };
    Ok(TracedRequest {
        journey_probability: probability,
        e2e_s: seconds(GEN_AI_LATENCY_E2E)?.ok_or(format!(
            "{SPAN_LLM_REQUEST}: `{GEN_AI_LATENCY_E2E}` missing"
        ))?,
        ttft_s: seconds(GEN_AI_LATENCY_TTFT)?,
        queue_s: seconds(GEN_AI_LATENCY_TIME_IN_QUEUE)?,
        input_tokens: int(GEN_AI_USAGE_INPUT_TOKENS)?,
        output_tokens: int(GEN_AI_USAGE_OUTPUT_TOKENS)?,
        failed: line.get("status").and_then(Json::as_str) == Some("ERROR"),
    })
}

fn step(line: &Json) -> Result<TracedStep, String> {
    let batch = line
        .get("events")
        .and_then(Json::as_array)
        .and_then(|events| {
            events
                .iter()
                .find(|e| e.get("name").and_then(Json::as_str) == Some(EVENT_BATCH_SUMMARY))
        })
        .and_then(|e| e.get("attributes"))
        .ok_or(format!("no {EVENT_BATCH_SUMMARY} event"))?;
    let int = |key: &str| {
        batch
            .get(key)
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("{EVENT_BATCH_SUMMARY}: `{key}` missing or not an integer"))
    };
    let top_int = |key: &str| {
        line.get(key)
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("`{key}` missing or not an integer"))
    };
    let probability = line
        .get(SPAN_BATCH_PROBABILITY)
        .and_then(Json::as_f64)
        .ok_or(format!("`{SPAN_BATCH_PROBABILITY}` missing"))?;
    if !(probability > 0.0 && probability <= 1.0) {
        return Err(format!(
            "`{SPAN_BATCH_PROBABILITY}` is {probability}: a traced step's must be in (0, 1]"
        ));
    }
    let snapshots = line
        .get("events")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("name").and_then(Json::as_str) == Some(EVENT_REQUEST_SNAPSHOT))
        .filter_map(|e| e.get("attributes"))
        .map(|a| Snapshot {
            request_id: match a.get("request.id") {
                Some(Json::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            },
            phase: a.get(ATTR_PHASE).and_then(Json::as_str).map(str::to_string),
            num_computed_tokens: a.get(ATTR_NUM_COMPUTED_TOKENS).and_then(Json::as_u64),
            kv_blocks_allocated: a.get(ATTR_KV_BLOCKS_ALLOCATED).and_then(Json::as_u64),
        })
        .collect();
    let start_ns = top_int("start_time_unix_nano")?;
    Ok(TracedStep {
        step_id: top_int(SPAN_STEP_ID)?,
        start_ns,
        end_ns: top_int("end_time_unix_nano")?.max(start_ns),
        batch_probability: probability,
        rich_probability: line.get(SPAN_RICH_PROBABILITY).and_then(Json::as_f64),
        running_depth: int("queue.running_depth")?,
        waiting_depth: int("queue.waiting_depth")?,
        num_prefill_reqs: int("batch.num_prefill_reqs")?,
        num_decode_reqs: int("batch.num_decode_reqs")?,
        scheduled_tokens: int("batch.scheduled_tokens")?,
        prefill_tokens: int("batch.prefill_tokens")?,
        decode_tokens: int("batch.decode_tokens")?,
        num_preempted: int("batch.num_preempted")?,
        num_finished: int("batch.num_finished")?,
        kv_usage: batch
            .get("kv.usage_gpu_ratio")
            .and_then(Json::as_f64)
            .ok_or("kv.usage_gpu_ratio missing")?,
        schedule_us: int("step.duration_us")?,
        last_step_duration_us: line
            .get(SPAN_LAST_STEP_DURATION_US)
            .and_then(Json::as_u64)
            .unwrap_or(0),
        policy: line
            .get(SPAN_POLICY_NAME)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        reason: line
            .get("policy.reason")
            .and_then(Json::as_str)
            .map(str::to_string),
        degraded: line
            .get(SPAN_POLICY_DEGRADED)
            .and_then(Json::as_bool)
            .unwrap_or(false),
        snapshots,
    })
}
