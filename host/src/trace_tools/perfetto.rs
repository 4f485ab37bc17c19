//! `stepscope trace perfetto`: a step trace as Chrome's trace event format (JSON), which the
//! Perfetto UI and `chrome://tracing` open.
//!
//! One process, "stepscope engine". Thread 1, "steps", holds each traced step as a complete
//! (`X`) slice from its start to its end, with its batch numbers as arguments, and the policy's
//! decision as an instant (`i`) event with its probability and reason. Counter (`C`) events
//! carry KV usage and the queue depths at each traced step. Every snapshotted request gets its
//! own thread, named after the request id, with one slice per step that snapshotted it (its
//! phase, computed tokens and blocks). Timestamps are microseconds from the first traced step,
//! non-decreasing on every track; untraced steps are simply absent.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::load::TraceFile;

/// The engine's process id and its steps' thread id.
const PID: u64 = 1;
const STEPS_TID: u64 = 1;
/// Request tracks start here.
const FIRST_REQUEST_TID: u64 = 1000;

/// The trace event document for `trace`.
pub fn export(trace: &TraceFile) -> Value {
    let origin = trace.steps.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let us = |ns: u64| (ns.saturating_sub(origin)) as f64 / 1000.0;
    let mut events = vec![
        json!({"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
               "args": {"name": "stepscope engine"}}),
        json!({"name": "thread_name", "ph": "M", "pid": PID, "tid": STEPS_TID,
               "args": {"name": "steps"}}),
        json!({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": STEPS_TID,
               "args": {"sort_index": 0}}),
    ];
    let mut request_tids: BTreeMap<&str, u64> = BTreeMap::new();
    let mut timed = Vec::new();
    for step in &trace.steps {
        let (start, end) = (us(step.start_ns), us(step.end_ns));
        timed.push(json!({
            "name": format!("step {}", step.step_id),
            "cat": "step",
            "ph": "X",
            "ts": start,
            "dur": (end - start).max(0.0),
            "pid": PID,
            "tid": STEPS_TID,
            "args": {
                "step.id": step.step_id,
                "batch.num_prefill_reqs": step.num_prefill_reqs,
                "batch.num_decode_reqs": step.num_decode_reqs,
                "batch.scheduled_tokens": step.scheduled_tokens,
                "batch.prefill_tokens": step.prefill_tokens,
                "batch.decode_tokens": step.decode_tokens,
                "batch.num_preempted": step.num_preempted,
                "batch.num_finished": step.num_finished,
                "kv.usage_gpu_ratio": step.kv_usage,
                "sampling.batch_probability": step.batch_probability,
            },
        }));
        timed.push(json!({
            "name": format!("policy: {}", step.reason.as_deref().unwrap_or("sampled")),
            "cat": "policy",
            "ph": "i",
            "s": "t",
            "ts": start,
            "pid": PID,
            "tid": STEPS_TID,
            "args": {
                "policy": step.policy,
                "reason": step.reason,
                "batch_probability": step.batch_probability,
                "rich_probability": step.rich_probability,
                "degraded": step.degraded,
            },
        }));
        timed.push(
            json!({"name": "kv_usage", "ph": "C", "ts": start, "pid": PID,
                          "args": {"kv_usage": step.kv_usage}}),
        );
        timed.push(json!({"name": "queue", "ph": "C", "ts": start, "pid": PID,
                          "args": {"running": step.running_depth, "waiting": step.waiting_depth}}));
        for snapshot in &step.snapshots {
            let next = FIRST_REQUEST_TID + request_tids.len() as u64;
            let tid = *request_tids
                .entry(snapshot.request_id.as_str())
                .or_insert(next);
            timed.push(json!({
                "name": snapshot.phase.as_deref().unwrap_or("snapshot"),
                "cat": "request",
                "ph": "X",
                "ts": start,
                "dur": (end - start).max(0.0),
                "pid": PID,
                "tid": tid,
                "args": {
                    "request.id": snapshot.request_id,
                    "step.id": step.step_id,
                    "request.num_computed_tokens": snapshot.num_computed_tokens,
                    "kv.blocks_allocated_gpu": snapshot.kv_blocks_allocated,
                },
            }));
        }
    }
    for (request, tid) in &request_tids {
        events.push(
            json!({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid,
                           "args": {"name": format!("request {request}")}}),
        );
    }
    // Steps are in file order, which is step order; a stable sort keeps each track monotonic
    // even if a clock was stepped back between two traced steps.
    timed.sort_by(|a, b| {
        let ts = |v: &Value| v["ts"].as_f64().unwrap_or(0.0);
        ts(a).total_cmp(&ts(b))
    });
    events.extend(timed);
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"producer": "stepscope trace perfetto", "steps": trace.steps.len()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace_tools::load::{Snapshot, TracedStep};

    fn step(id: u64, start_ns: u64, snapshots: Vec<Snapshot>) -> TracedStep {
        TracedStep {
            step_id: id,
            start_ns,
            end_ns: start_ns + 2_000,
            batch_probability: 0.5,
            rich_probability: None,
            running_depth: 2,
            waiting_depth: 1,
            num_prefill_reqs: 1,
            num_decode_reqs: 1,
            scheduled_tokens: 9,
            prefill_tokens: 8,
            decode_tokens: 1,
            num_preempted: 0,
            num_finished: 0,
            kv_usage: 0.25,
            schedule_us: 1,
            last_step_duration_us: 2,
            policy: "builtin:default".into(),
            reason: Some("base_rate".into()),
            degraded: false,
            snapshots,
        }
    }

    #[test]
    fn steps_counters_decisions_and_one_track_per_request() {
        let snap = |id: &str| Snapshot {
            request_id: id.into(),
            phase: Some("DECODE".into()),
            num_computed_tokens: Some(5),
            kv_blocks_allocated: Some(1),
        };
        let trace = TraceFile {
            steps: vec![
                step(3, 10_000, vec![snap("a"), snap("b")]),
                step(7, 30_000, vec![snap("b")]),
            ],
            ..TraceFile::default()
        };
        let doc = export(&trace);
        let events = doc["traceEvents"].as_array().unwrap();
        let of = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!(of("X"), 2 + 3);
        assert_eq!(of("i"), 2);
        assert_eq!(of("C"), 4);
        let names: Vec<&str> = events
            .iter()
            .filter(|e| e["name"] == "thread_name")
            .filter_map(|e| e["args"]["name"].as_str())
            .collect();
        assert_eq!(names, ["steps", "request a", "request b"]);
        let step7 = events.iter().find(|e| e["name"] == "step 7").unwrap();
        assert_eq!(
            (step7["ts"].as_f64(), step7["dur"].as_f64()),
            (Some(20.0), Some(2.0))
        );
        assert_eq!(step7["args"]["sampling.batch_probability"], 0.5);
    }
}
