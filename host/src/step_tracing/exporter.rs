//! The exporter thread (`stepscope-trace-export`): drains the bounded record queue, writes
//! JSON lines, builds OTLP spans and exports them in batches, off the step loop.
//!
//! The thread polls the queue every [`POLL_INTERVAL`] rather than blocking on it, so that the
//! step loop's `try_send` never has to wake it (a futex syscall, and on a busy machine a
//! context switch, per sampled step); the handle unparks it for flush and shutdown.
//! Spans are exported when [`StepTracingConfig::export_batch_size`] are pending, when the
//! oldest pending one has waited [`StepTracingConfig::export_interval`], on a flush request,
//! and at shutdown. [`TracerHandle::shutdown`](super::TracerHandle::shutdown) first sets a
//! deadline (now + `shutdown_timeout`), then queues a shutdown message behind the records
//! already queued: everything before it is written and exported (or, past the deadline,
//! counted as failed), the exporter and the file are flushed and closed, and the thread ends.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::config::StepTracingConfig;
use super::journey::{JourneySpan, RequestSpanRecord, core_span, request_span};
use super::jsonl::JsonlSink;
use super::metrics::TracerMetrics;
use super::otlp::OtlpSink;
use super::record::StepRecord;
use crate::engine::journey::{JourneyDecision, JourneyLog};
use crate::trace_context::{SpanId, SpanIdSource, TraceId};

/// How often the exporter thread looks at the queue when it is idle.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What the step loop and the handle send to the exporter thread.
pub(crate) enum ExportMessage {
    Record(StepRecord),
    /// A step for the `--record-steps` file (every step, sampled or not).
    Recorded(StepRecord),
    /// A request arrival for the `--record-steps` file (what `decide-request` was given).
    RecordedArrival(Box<crate::policy::RequestArrival>),
    /// A traced request's finished `llm_core` journey.
    CoreSpan(Box<JourneyLog>),
    /// A traced request's `llm_request` (the server's half).
    RequestSpan(Box<(Arc<JourneyDecision>, RequestSpanRecord)>),
    /// Export and flush everything queued before this message, then acknowledge.
    Flush(Sender<()>),
    /// Like `Flush`, then close the sinks and end the thread.
    Shutdown(Sender<()>),
}

/// Set once by the handle when shutting down: exports must finish by then.
#[derive(Debug, Default)]
pub(crate) struct ShutdownDeadline(OnceLock<Instant>);

impl ShutdownDeadline {
    pub(crate) fn set(&self, deadline: Instant) {
        let _ = self.0.set(deadline);
    }

    fn get(&self) -> Option<Instant> {
        self.0.get().copied()
    }
}

pub(crate) struct ExporterThread {
    pub(crate) rx: Receiver<ExportMessage>,
    pub(crate) otlp: Option<OtlpSink>,
    pub(crate) jsonl: Option<JsonlSink>,
    /// `--record-steps`.
    pub(crate) recorder: Option<JsonlSink>,
    pub(crate) metrics: Arc<TracerMetrics>,
    pub(crate) deadline: Arc<ShutdownDeadline>,
    pub(crate) batch_size: usize,
    pub(crate) interval: Duration,
    /// Most records processed after the shutdown message (the queue's capacity).
    pub(crate) drain_limit: usize,
    /// The trace and span ids of step spans (each step span is a trace of its own).
    pub(crate) ids: SpanIdSource,
}

impl ExporterThread {
    pub(crate) fn new(
        rx: Receiver<ExportMessage>,
        config: &StepTracingConfig,
        sinks: (Option<OtlpSink>, Option<JsonlSink>, Option<JsonlSink>),
        metrics: Arc<TracerMetrics>,
        deadline: Arc<ShutdownDeadline>,
    ) -> Self {
        Self {
            rx,
            otlp: sinks.0,
            jsonl: sinks.1,
            recorder: sinks.2,
            metrics,
            deadline,
            batch_size: config.export_batch_size.max(1),
            interval: config.export_interval,
            drain_limit: config.queue_capacity.max(1),
            ids: SpanIdSource::default(),
        }
    }

    pub(crate) fn run(mut self) {
        // When the oldest record not yet exported or flushed arrived.
        let mut oldest: Option<Instant> = None;
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(ExportMessage::Record(record)) => {
                        self.process(&record);
                        oldest.get_or_insert_with(Instant::now);
                        self.export_if_full();
                    }
                    Ok(ExportMessage::Recorded(record)) => {
                        self.record(&record);
                        oldest.get_or_insert_with(Instant::now);
                    }
                    Ok(ExportMessage::RecordedArrival(arrival)) => {
                        if let Some(recorder) = &mut self.recorder {
                            recorder.write_arrival(&arrival, &self.metrics.record_write_failures);
                        }
                        oldest.get_or_insert_with(Instant::now);
                    }
                    Ok(message @ (ExportMessage::CoreSpan(_) | ExportMessage::RequestSpan(_))) => {
                        self.journey(message);
                        oldest.get_or_insert_with(Instant::now);
                        self.export_if_full();
                    }
                    Ok(ExportMessage::Flush(ack)) => {
                        self.flush();
                        oldest = None;
                        let _ = ack.send(());
                    }
                    Ok(ExportMessage::Shutdown(ack)) => {
                        self.finish();
                        let _ = ack.send(());
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.finish();
                        return;
                    }
                }
            }
            if oldest.is_some_and(|since| since.elapsed() >= self.interval) {
                self.flush();
                oldest = None;
            }
            // Polling instead of blocking in `recv`: a sender only pays a syscall to wake a
            // blocked receiver, so the step loop's `try_send` stays a few atomic operations.
            // The handle unparks the thread for flush and shutdown.
            std::thread::park_timeout(POLL_INTERVAL);
        }
    }

    /// A step span's ids: a trace of its own.
    fn step_ids(&mut self) -> (TraceId, SpanId) {
        (self.ids.trace_id(), self.ids.span_id())
    }

    fn process(&mut self, record: &StepRecord) {
        let ids = self.step_ids();
        if let Some(jsonl) = &mut self.jsonl {
            jsonl.write(
                record,
                ids,
                &self.metrics.jsonl_lines_written,
                &self.metrics.jsonl_write_failures,
            );
        }
        if let Some(otlp) = &mut self.otlp {
            otlp.add(record, ids);
        }
    }

    fn record(&mut self, record: &StepRecord) {
        let ids = self.step_ids();
        if let Some(recorder) = &mut self.recorder {
            recorder.write(
                record,
                ids,
                &self.metrics.steps_recorded,
                &self.metrics.record_write_failures,
            );
        }
    }

    /// A journey span, to the same sinks as the step spans.
    fn journey(&mut self, message: ExportMessage) {
        let span: JourneySpan = match message {
            ExportMessage::CoreSpan(log) => core_span(&log),
            ExportMessage::RequestSpan(half) => request_span(&half.0, &half.1),
            _ => return,
        };
        if let Some(jsonl) = &mut self.jsonl {
            jsonl.write_journey(
                &span,
                &self.metrics.jsonl_lines_written,
                &self.metrics.jsonl_write_failures,
            );
        }
        if let Some(otlp) = &mut self.otlp {
            otlp.add_journey(&span);
        }
    }

    /// Exports once a batch's worth of spans is pending.
    fn export_if_full(&mut self) {
        if self
            .otlp
            .as_ref()
            .is_some_and(|o| o.pending() >= self.batch_size)
        {
            self.export();
        }
    }

    fn export(&mut self) {
        if let Some(otlp) = &mut self.otlp {
            otlp.export(&self.metrics, self.deadline.get());
        }
    }

    fn flush(&mut self) {
        self.export();
        if let Some(jsonl) = &mut self.jsonl {
            jsonl.flush(&self.metrics.jsonl_write_failures);
        }
        if let Some(recorder) = &mut self.recorder {
            recorder.flush(&self.metrics.record_write_failures);
        }
    }

    fn finish(mut self) {
        // Records queued before the shutdown message were received before it; records the
        // step loop queued after it (at most a queue's worth) are processed too.
        for _ in 0..self.drain_limit {
            let Ok(message) = self.rx.try_recv() else {
                break;
            };
            if let ExportMessage::Recorded(record) = &message {
                self.record(record);
            }
            if let (ExportMessage::RecordedArrival(arrival), Some(recorder)) =
                (&message, &mut self.recorder)
            {
                recorder.write_arrival(arrival, &self.metrics.record_write_failures);
            }
            if matches!(
                message,
                ExportMessage::CoreSpan(_) | ExportMessage::RequestSpan(_)
            ) {
                self.journey(message);
            } else if let ExportMessage::Record(record) = message {
                self.process(&record);
                self.export_if_full();
            }
        }
        self.flush();
        if let Some(otlp) = self.otlp.take() {
            otlp.shutdown();
        }
    }
}
