//! The step tracer's counters: plain atomics written by the step loop and the exporter thread,
//! read by `/metrics` (through [`TracerHandle::metrics`](super::TracerHandle::metrics)) and tests.
//!
//! Accounting identities (after [`TracerHandle::shutdown`](super::TracerHandle::shutdown)):
//! `steps_batch_sampled = records_queued + records_dropped_queue_full + records_dropped_closed`;
//! with a collector, `records_queued = spans_exported + spans_export_failed`; with a file,
//! `records_queued = jsonl_lines_written + jsonl_write_failures`. Journey spans add to both
//! sides: `records_queued + journey_spans_queued = spans_exported + spans_export_failed`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::{PolicyCounters, PolicyCountersSnapshot};

/// Counters of one step tracer.
#[derive(Debug, Default)]
pub struct TracerMetrics {
    /// Steps shown to the tracer (every engine step while tracing is on).
    pub(crate) steps_seen: AtomicU64,
    /// Steps the policy batch-sampled (each produced a record).
    pub(crate) steps_batch_sampled: AtomicU64,
    /// Steps the policy rich-sampled and planned successfully.
    pub(crate) steps_rich_sampled: AtomicU64,
    /// Steps the policy rich-sampled whose `plan-rich` faulted: traced with the batch summary
    /// only, marked `policy.rich_fault` (the fault itself is counted by kind in `policy`).
    pub(crate) steps_rich_faulted: AtomicU64,
    /// Snapshots in queued records.
    pub(crate) snapshots_emitted: AtomicU64,
    /// Records handed to the exporter thread.
    pub(crate) records_queued: AtomicU64,
    /// Records dropped because the queue was full (the step loop never waits).
    pub(crate) records_dropped_queue_full: AtomicU64,
    /// Records dropped because the exporter thread had stopped.
    pub(crate) records_dropped_closed: AtomicU64,
    /// Spans the collector accepted.
    pub(crate) spans_exported: AtomicU64,
    /// Spans lost by the OTLP exporter (collector unreachable, error, timeout, shutdown deadline).
    pub(crate) spans_export_failed: AtomicU64,
    /// Failed OTLP export calls.
    pub(crate) export_errors: AtomicU64,
    /// Span events the SDK dropped at its per-span limit (0 unless the limit is too low).
    pub(crate) span_events_dropped: AtomicU64,
    /// Lines written to the JSON-lines file.
    pub(crate) jsonl_lines_written: AtomicU64,
    /// Lines that could not be written (a failed flush of the buffer counts once).
    pub(crate) jsonl_write_failures: AtomicU64,
    /// Lines written to the `--record-steps` file (one per step).
    pub(crate) steps_recorded: AtomicU64,
    /// Steps not recorded: queue full or closed, or the write failed.
    pub(crate) record_write_failures: AtomicU64,
    /// Client requests whose journey was traced / not traced (one decision each).
    pub(crate) journeys_traced: AtomicU64,
    pub(crate) journeys_untraced: AtomicU64,
    /// `llm_request` and `llm_core` spans handed to the exporter thread.
    pub(crate) journey_spans_queued: AtomicU64,
    /// Journey spans lost because the queue was full or closed.
    pub(crate) journey_spans_dropped: AtomicU64,
    policy: Arc<PolicyCounters>,
}

/// A point-in-time copy of [`TracerMetrics`] (field meanings as there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TracerMetricsSnapshot {
    pub steps_seen: u64,
    pub steps_batch_sampled: u64,
    pub steps_rich_sampled: u64,
    pub steps_rich_faulted: u64,
    pub snapshots_emitted: u64,
    pub records_queued: u64,
    pub records_dropped_queue_full: u64,
    pub records_dropped_closed: u64,
    pub spans_exported: u64,
    pub spans_export_failed: u64,
    pub export_errors: u64,
    pub span_events_dropped: u64,
    pub jsonl_lines_written: u64,
    pub jsonl_write_failures: u64,
    pub steps_recorded: u64,
    pub record_write_failures: u64,
    pub journeys_traced: u64,
    pub journeys_untraced: u64,
    pub journey_spans_queued: u64,
    pub journey_spans_dropped: u64,
    /// The policy runtime's counters (calls, faults by kind, back-off skips).
    pub policy: PolicyCountersSnapshot,
}

impl TracerMetricsSnapshot {
    /// Records lost before reaching the exporter thread.
    pub fn records_dropped(&self) -> u64 {
        self.records_dropped_queue_full + self.records_dropped_closed
    }
}

#[inline]
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[inline]
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl TracerMetrics {
    pub(crate) fn new(policy: Arc<PolicyCounters>) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> TracerMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TracerMetricsSnapshot {
            steps_seen: get(&self.steps_seen),
            steps_batch_sampled: get(&self.steps_batch_sampled),
            steps_rich_sampled: get(&self.steps_rich_sampled),
            steps_rich_faulted: get(&self.steps_rich_faulted),
            snapshots_emitted: get(&self.snapshots_emitted),
            records_queued: get(&self.records_queued),
            records_dropped_queue_full: get(&self.records_dropped_queue_full),
            records_dropped_closed: get(&self.records_dropped_closed),
            spans_exported: get(&self.spans_exported),
            spans_export_failed: get(&self.spans_export_failed),
            export_errors: get(&self.export_errors),
            span_events_dropped: get(&self.span_events_dropped),
            jsonl_lines_written: get(&self.jsonl_lines_written),
            jsonl_write_failures: get(&self.jsonl_write_failures),
            steps_recorded: get(&self.steps_recorded),
            record_write_failures: get(&self.record_write_failures),
            journeys_traced: get(&self.journeys_traced),
            journeys_untraced: get(&self.journeys_untraced),
            journey_spans_queued: get(&self.journey_spans_queued),
            journey_spans_dropped: get(&self.journey_spans_dropped),
            policy: self.policy.snapshot(),
        }
    }
}
