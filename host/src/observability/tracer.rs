//! The step-loop half of the tracer: [`StepTracerObserver`], the engine's [`StepObserver`].
//!
//! Per step, on the engine thread: build the policy's [`StepSummary`] from the [`StepView`],
//! call `decide` once; for a batch-sampled step copy it into a [`StepRecord`]; for a rich step
//! fill the reusable request-view columns (every running request, scheduled or not), call
//! `plan-rich` once, and copy the chosen rows. The record goes to the exporter thread with
//! `try_send` on a bounded queue: a full queue drops it (counted), the step never waits. A
//! policy fault (counted by the runtime) leaves the step untraced. Before the policy call, a
//! policy hot-swapped in through the [`PolicySwitch`] (one relaxed atomic load when none is
//! pending) replaces the running one; the old instance is dropped on a short-lived thread. With
//! tracing disabled the observer holds nothing and `on_step` is a single branch.

use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};

use crate::engine::{RequestPhase, StepObserver, StepView};
use crate::policy::{PolicyOutcome, PolicyRuntime, RequestViews, StepSummary};

use super::exporter::ExportMessage;
use super::metrics::{TracerMetrics, add, bump};
use super::record::{PolicyIdentity, RichRecord, SnapshotRow, StepRecord, sat_u32, step_summary};
use super::swap::PolicySwitch;

/// The engine's step observer for step tracing (see the module doc).
pub struct StepTracerObserver {
    active: Option<Box<ActiveTracer>>,
}

impl std::fmt::Debug for StepTracerObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepTracerObserver")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

pub(crate) struct ActiveTracer {
    runtime: PolicyRuntime,
    /// `policy.name` / `policy.digest` of `runtime`.
    identity: Arc<PolicyIdentity>,
    /// Where hot-swapped policies arrive.
    switch: Arc<PolicySwitch>,
    seed: u64,
    /// `--record-steps`: every step's summary also goes to the exporter thread.
    record_steps: bool,
    queue: SyncSender<ExportMessage>,
    metrics: Arc<TracerMetrics>,
    /// Request-view columns, reused from one rich step to the next.
    views: RequestViews,
    /// `request.effective_prompt_len` per view row (not a policy column).
    effective_prompt_len: Vec<Option<u32>>,
}

impl StepTracerObserver {
    /// The observer of a disabled tracer: does nothing, at the cost of one branch per step.
    pub fn disabled() -> Self {
        Self { active: None }
    }

    pub(crate) fn active(
        (runtime, identity, switch): (PolicyRuntime, Arc<PolicyIdentity>, Arc<PolicySwitch>),
        (seed, record_steps): (u64, bool),
        queue: SyncSender<ExportMessage>,
        metrics: Arc<TracerMetrics>,
    ) -> Self {
        Self {
            active: Some(Box::new(ActiveTracer {
                runtime,
                identity,
                switch,
                seed,
                record_steps,
                queue,
                metrics,
                views: empty_views(),
                effective_prompt_len: Vec::new(),
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.active.is_some()
    }
}

impl StepObserver for StepTracerObserver {
    #[inline]
    fn on_step(&mut self, step: &StepView<'_>) {
        if let Some(active) = self.active.as_deref_mut() {
            active.on_step(step);
        }
    }
}

impl ActiveTracer {
    fn on_step(&mut self, step: &StepView<'_>) {
        bump(&self.metrics.steps_seen);
        if let Some(pending) = self.switch.take_pending() {
            let old = std::mem::replace(&mut self.runtime, pending.runtime);
            self.identity = pending.identity;
            // Tearing down an instance (a Python one holds tens of MB) is not the step's job.
            let spawned = std::thread::Builder::new()
                .name("stepscope-policy-drop".into())
                .spawn(move || drop(old));
            if let Err(error) = spawned {
                tracing::debug!(%error, "dropping the old policy on the engine thread");
            }
        }
        let summary = step_summary(step, self.seed);
        if self.record_steps {
            self.record(summary);
        }
        let decision = match self.runtime.decide(&summary) {
            PolicyOutcome::Answer(decision) if decision.emit_batch => decision,
            _ => return,
        };
        let mut extra = decision.extra;
        let rich = if decision.emit_rich {
            match self.plan_rich(step, &summary, decision.rich_probability, &mut extra) {
                Some(rich) => Some(rich),
                // The runtime counted the fault; the step goes untraced.
                None => return,
            }
        } else {
            None
        };
        bump(&self.metrics.steps_batch_sampled);
        let snapshots = rich.as_ref().map_or(0, |rich| rich.rows.len() as u64);
        if rich.is_some() {
            bump(&self.metrics.steps_rich_sampled);
        }
        let record = StepRecord {
            policy: Arc::clone(&self.identity),
            summary,
            batch_probability: decision.batch_probability,
            extra,
            rich,
        };
        match self.queue.try_send(ExportMessage::Record(record)) {
            Ok(()) => {
                bump(&self.metrics.records_queued);
                add(&self.metrics.snapshots_emitted, snapshots);
            }
            Err(TrySendError::Full(_)) => bump(&self.metrics.records_dropped_queue_full),
            Err(TrySendError::Disconnected(_)) => bump(&self.metrics.records_dropped_closed),
        }
    }

    /// Queues the step for the `--record-steps` file (a full queue loses it, counted).
    fn record(&mut self, summary: StepSummary) {
        let record = StepRecord {
            policy: Arc::clone(&self.identity),
            summary,
            batch_probability: 1.0,
            extra: Vec::new(),
            rich: None,
        };
        if self
            .queue
            .try_send(ExportMessage::Recorded(record))
            .is_err()
        {
            bump(&self.metrics.record_write_failures);
        }
    }

    /// Fills the columns, asks the policy, copies the chosen rows; `None` on a policy fault.
    fn plan_rich(
        &mut self,
        step: &StepView<'_>,
        summary: &StepSummary,
        probability: f64,
        extra: &mut Vec<(String, String)>,
    ) -> Option<RichRecord> {
        let views = &mut self.views;
        clear_views(views);
        self.effective_prompt_len.clear();
        for request in step.running_requests() {
            let (allocated, cached) = request.kv_blocks();
            views.request_id.push(request.id());
            views
                .is_prefill
                .push(u8::from(request.phase() == RequestPhase::Prefill));
            views
                .num_prompt_tokens
                .push(sat_u32(request.num_prompt_tokens()));
            views
                .num_computed_tokens
                .push(sat_u32(request.num_computed_tokens()));
            views
                .num_output_tokens
                .push(sat_u32(request.num_output_tokens()));
            views.num_preemptions.push(request.num_preemptions());
            views
                .scheduled_tokens
                .push(sat_u32(request.scheduled_tokens_this_step()));
            views.kv_blocks_allocated.push(sat_u32(allocated));
            views.kv_blocks_cached.push(sat_u32(cached));
            views
                .num_cached_tokens
                .push(sat_u32(request.num_cached_tokens()));
            self.effective_prompt_len
                .push(request.effective_prompt_len().map(sat_u32));
        }
        let selection = self.runtime.plan_rich(summary, &self.views).answer()?;
        let views = &self.views;
        // The runtime validated every index against the column length.
        let rows = selection
            .requests
            .iter()
            .filter_map(|&index| {
                let i = index as usize;
                Some(SnapshotRow {
                    request_id: *views.request_id.get(i)?,
                    is_prefill: *views.is_prefill.get(i)? != 0,
                    num_prompt_tokens: *views.num_prompt_tokens.get(i)?,
                    num_computed_tokens: *views.num_computed_tokens.get(i)?,
                    num_output_tokens: *views.num_output_tokens.get(i)?,
                    num_preemptions: *views.num_preemptions.get(i)?,
                    scheduled_tokens: *views.scheduled_tokens.get(i)?,
                    kv_blocks_allocated: *views.kv_blocks_allocated.get(i)?,
                    kv_blocks_cached: *views.kv_blocks_cached.get(i)?,
                    effective_prompt_len: *self.effective_prompt_len.get(i)?,
                })
            })
            .collect();
        if !selection.extra.is_empty() {
            extra.retain(|(key, _)| !selection.extra.iter().any(|(k, _)| k == key));
            extra.extend(selection.extra);
        }
        Some(RichRecord {
            probability,
            attributes: selection.attributes,
            rows,
        })
    }
}

fn empty_views() -> RequestViews {
    RequestViews {
        request_id: Vec::new(),
        is_prefill: Vec::new(),
        num_prompt_tokens: Vec::new(),
        num_computed_tokens: Vec::new(),
        num_output_tokens: Vec::new(),
        num_preemptions: Vec::new(),
        scheduled_tokens: Vec::new(),
        kv_blocks_allocated: Vec::new(),
        kv_blocks_cached: Vec::new(),
        num_cached_tokens: Vec::new(),
    }
}

fn clear_views(views: &mut RequestViews) {
    views.request_id.clear();
    views.is_prefill.clear();
    views.num_prompt_tokens.clear();
    views.num_computed_tokens.clear();
    views.num_output_tokens.clear();
    views.num_preemptions.clear();
    views.scheduled_tokens.clear();
    views.kv_blocks_allocated.clear();
    views.kv_blocks_cached.clear();
    views.num_cached_tokens.clear();
}
