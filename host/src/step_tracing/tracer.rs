//! The step-loop half of the tracer: [`StepTracerObserver`], the engine's [`StepObserver`].
//!
//! Per step, on the engine thread: build the policy's [`StepSummary`] from the [`StepView`],
//! call `decide` once; for a batch-sampled step copy it into a [`StepRecord`]; for a rich step
//! fill the reusable request-view columns (every running request, scheduled or not), call
//! `plan-rich` once, and copy the chosen rows. The record waits for the step's end
//! ([`StepObserver::on_step_end`], which gives the span its end time) and then goes to the
//! exporter thread with `try_send` on a bounded queue: a full queue drops it (counted), the step never waits. A
//! fault in `decide` (counted by the runtime) leaves the step untraced; a fault in `plan-rich`
//! keeps the step's batch summary, without snapshots, its span marked `policy.rich_fault`
//! (counted too), so heavy steps are not dropped from the batch stream. Before the policy call, a
//! policy hot-swapped in through the [`PolicySwitch`] (one relaxed atomic load when none is
//! pending) replaces the running one; the old instance is dropped on a short-lived thread. With
//! tracing disabled the observer holds nothing and `on_step` is a single branch.
//!
//! The policy's cost per step is watched by a [`StepBudget`]: while the policy is degraded
//! (too slow), a built-in default instance with the same rates answers the steps instead (their
//! spans carry `policy.degraded = true`), and the policy answers only its probe steps.

use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};

use crate::engine::journey::{JourneyArrival, JourneyDecision, JourneyLog};
use crate::engine::{RequestPhase, StepObserver, StepView};
use crate::policy::budget::{Route, StepBudget, Transition, thread_cpu_time};
use crate::policy::{
    FaultKind, PolicyOutcome, PolicyRuntime, RequestViews, StepSummary, extra_attribute_key,
};

use super::exporter::ExportMessage;
use super::journey::{JourneySampler, queue_journey_span};
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
    /// The built-in default with the server's rates, answering for a degraded policy.
    fallback: PolicyRuntime,
    /// `policy.name` / `policy.digest` of `fallback`.
    fallback_identity: Arc<PolicyIdentity>,
    /// The policy's cost per step against its budget.
    budget: StepBudget,
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
    /// Wall time of the policy's calls in the current step.
    policy_cost: std::time::Duration,
    /// The current step's record (and its snapshot count), sent when the step ends.
    pending: Option<(StepRecord, u64)>,
    /// `--step-tracing-enabled`: steps are traced (the tracer may run for journeys alone).
    trace_steps: bool,
    /// `--enable-journey-tracing`: decides which request journeys are traced.
    journeys: Option<JourneySampler>,
}

impl StepTracerObserver {
    /// The observer of a disabled tracer: does nothing, at the cost of one branch per step.
    pub fn disabled() -> Self {
        Self { active: None }
    }

    pub(crate) fn active(
        (runtime, identity, switch): (PolicyRuntime, Arc<PolicyIdentity>, Arc<PolicySwitch>),
        (fallback, fallback_identity, budget): (PolicyRuntime, Arc<PolicyIdentity>, StepBudget),
        (seed, record_steps, trace_steps): (u64, bool, bool),
        journey_rate: Option<f64>,
        queue: SyncSender<ExportMessage>,
        metrics: Arc<TracerMetrics>,
    ) -> Self {
        Self {
            active: Some(Box::new(ActiveTracer {
                runtime,
                identity,
                fallback,
                fallback_identity,
                budget,
                switch,
                seed,
                record_steps,
                queue,
                metrics,
                views: empty_views(),
                effective_prompt_len: Vec::new(),
                policy_cost: std::time::Duration::ZERO,
                pending: None,
                trace_steps,
                journeys: journey_rate.map(|rate| JourneySampler::new(rate, seed)),
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

    #[inline]
    fn on_step_end(&mut self, step_id: u64, ts_end_ns: u64) {
        if let Some(active) = self.active.as_deref_mut() {
            active.on_step_end(step_id, ts_end_ns);
        }
    }

    fn decide_journey(&mut self, arrival: &JourneyArrival<'_>) -> Option<JourneyDecision> {
        let active = self.active.as_deref_mut()?;
        let journeys = active.journeys.as_mut()?;
        // A 0.2 policy decides (`decide-request`); a 0.1 one has no say: the host's rule.
        let policy_arrival = journeys.arrival(arrival);
        if active.record_steps
            && active
                .queue
                .try_send(ExportMessage::RecordedArrival(Box::new(policy_arrival)))
                .is_err()
        {
            bump(&active.metrics.record_write_failures);
        }
        let asked = active
            .runtime
            .decide_request(&policy_arrival, arrival.step_id);
        let decision = match asked {
            None => journeys.by_rate(arrival),
            Some(PolicyOutcome::Answer(answer)) if answer.trace => {
                Some(journeys.traced(arrival, answer.probability, answer.extra))
            }
            // Not traced, or a fault (counted by the runtime), or backing off after one.
            Some(_) => None,
        };
        bump(if decision.is_some() {
            &active.metrics.journeys_traced
        } else {
            &active.metrics.journeys_untraced
        });
        decision
    }

    fn on_journey_end(&mut self, journey: JourneyLog) {
        if let Some(active) = self.active.as_deref() {
            queue_journey_span(
                &active.queue,
                &active.metrics,
                ExportMessage::CoreSpan(Box::new(journey)),
            );
        }
    }
}

impl Drop for ActiveTracer {
    fn drop(&mut self) {
        // A step whose end never came (the engine stopped inside it) is still exported.
        if let Some((record, snapshots)) = self.pending.take() {
            self.send(record, snapshots);
        }
    }
}

impl ActiveTracer {
    fn on_step(&mut self, step: &StepView<'_>) {
        if let Some((record, snapshots)) = self.pending.take() {
            // The previous step never reported its end: send it as it is.
            self.send(record, snapshots);
        }
        if !self.trace_steps {
            return;
        }
        bump(&self.metrics.steps_seen);
        if let Some(pending) = self.switch.take_pending() {
            let old = std::mem::replace(&mut self.runtime, pending.runtime);
            self.identity = pending.identity;
            self.budget = StepBudget::new(self.budget.config());
            self.runtime.counters().clear_degraded();
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
        let route = self.budget.route(summary.last_step_duration_us);
        let degraded = route == Route::Fallback;
        if degraded {
            self.runtime.counters().record_fallback_step();
        }
        // CPU time costs ~0.5 µs a read: only when the budget asks for it (see policy::budget).
        let cpu_start = if !degraded && self.budget.wants_cpu_time() {
            thread_cpu_time()
        } else {
            None
        };
        let outcome = self.decide_and_plan(step, &summary, degraded);
        if !degraded {
            let cost = self.policy_cost;
            if !cost.is_zero() {
                let cpu =
                    cpu_start.and_then(|start| Some(thread_cpu_time()?.saturating_sub(start)));
                let transition = self.budget.record(route, cost, cpu);
                self.note_transition(transition);
            }
        }
        let Some((decision, planned, mut extra)) = outcome else {
            return;
        };
        let (rich, rich_fault, rich_faulted) = match planned {
            RichOutcome::NotSampled => (None, None, false),
            RichOutcome::Planned(rich, rich_extra) => (Some((rich, rich_extra)), None, false),
            RichOutcome::Faulted(kind) => (None, kind, true),
        };
        if let Some(rich_extra) = rich.as_ref().map(|(_, extra)| extra) {
            // plan-rich's extras win over decide's, compared as span attributes.
            extra.retain(|(key, _)| {
                !rich_extra
                    .iter()
                    .any(|(k, _)| extra_attribute_key(k) == extra_attribute_key(key))
            });
            extra.extend(rich_extra.iter().cloned());
        }
        let rich = rich.map(|(rich, _)| rich);
        bump(&self.metrics.steps_batch_sampled);
        let snapshots = rich.as_ref().map_or(0, |rich| rich.rows.len() as u64);
        if rich.is_some() {
            bump(&self.metrics.steps_rich_sampled);
        }
        if rich_faulted {
            bump(&self.metrics.steps_rich_faulted);
        }
        let policy = if degraded {
            &self.fallback_identity
        } else {
            &self.identity
        };
        let record = StepRecord {
            policy: Arc::clone(policy),
            summary,
            batch_probability: decision.batch_probability,
            extra,
            rich,
            degraded,
            rich_fault,
            ts_step_end_ns: None,
        };
        self.pending = Some((record, snapshots));
    }

    /// The step is over: its span ends now, and its record goes to the exporter thread.
    fn on_step_end(&mut self, step_id: u64, ts_end_ns: u64) {
        let Some((mut record, snapshots)) = self.pending.take() else {
            return;
        };
        if record.summary.step_id == step_id {
            record.ts_step_end_ns = Some(ts_end_ns);
        }
        self.send(record, snapshots);
    }

    /// Queues a record for the exporter thread; a full queue loses it (counted).
    fn send(&mut self, record: StepRecord, snapshots: u64) {
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
            degraded: false,
            rich_fault: None,
            ts_step_end_ns: None,
        };
        if self
            .queue
            .try_send(ExportMessage::Recorded(record))
            .is_err()
        {
            bump(&self.metrics.record_write_failures);
        }
    }

    /// Asks the policy (or, when `degraded`, the fallback) to decide and, for a rich step, to
    /// plan; `None` when the step goes untraced (not sampled, or a fault in `decide` the runtime
    /// counted). Returns the decision, the rich outcome and `decide`'s extra attributes, and
    /// leaves the policy's wall time for the step in `policy_cost`.
    fn decide_and_plan(
        &mut self,
        step: &StepView<'_>,
        summary: &StepSummary,
        degraded: bool,
    ) -> Option<(crate::policy::Decision, RichOutcome, ExtraAttributes)> {
        self.policy_cost = std::time::Duration::ZERO;
        let runtime = if degraded {
            &mut self.fallback
        } else {
            &mut self.runtime
        };
        let outcome = runtime.decide(summary);
        self.policy_cost += runtime.last_call();
        let mut decision = match outcome {
            PolicyOutcome::Answer(decision) if decision.emit_batch => decision,
            _ => return None,
        };
        let extra = std::mem::take(&mut decision.extra);
        let rich = if decision.emit_rich {
            self.plan_rich(step, summary, decision.rich_probability, degraded)
        } else {
            RichOutcome::NotSampled
        };
        Some((decision, rich, extra))
    }

    /// Logs and counts a change of the policy's standing under its budget.
    fn note_transition(&self, transition: Option<Transition>) {
        let counters = self.runtime.counters();
        match transition {
            None => {}
            Some(Transition::Degraded { p99, budget }) => {
                counters.record_degraded(true);
                tracing::warn!(
                    policy = %self.identity.name,
                    p99_us = p99.as_micros() as u64,
                    budget_us = budget.as_micros() as u64,
                    "step-tracing policy over its step budget: the built-in default decides \
                     steps until it is fast again (policy.degraded = true on their spans)"
                );
            }
            Some(Transition::Recovered { budget }) => {
                counters.record_degraded(false);
                tracing::info!(
                    policy = %self.identity.name,
                    budget_us = budget.as_micros() as u64,
                    "step-tracing policy back within its step budget"
                );
            }
        }
    }

    /// Fills the columns, asks the policy (or the fallback), copies the chosen rows. Returns the
    /// rows and plan-rich's extra attributes, or the fault (counted by the runtime).
    fn plan_rich(
        &mut self,
        step: &StepView<'_>,
        summary: &StepSummary,
        probability: f64,
        degraded: bool,
    ) -> RichOutcome {
        let views = &mut self.views;
        clear_views(views);
        self.effective_prompt_len.clear();
        // `request.id` per view row, borrowed from the step; only chosen rows are copied.
        let mut external_ids = Vec::with_capacity(step.running_requests().len());
        let now = std::time::Instant::now();
        for request in step.running_requests() {
            external_ids.push((request.external_id(), request.journey_span()));
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
            let waited = request.time_since_arrival(now).as_micros();
            views
                .time_since_arrival_us
                .push(u64::try_from(waited).unwrap_or(u64::MAX));
            views.max_tokens.push(sat_u32(request.max_tokens()));
            views
                .journey_traced
                .push(u8::from(request.journey_span().is_some()));
            self.effective_prompt_len
                .push(request.effective_prompt_len().map(sat_u32));
        }
        let runtime = if degraded {
            &mut self.fallback
        } else {
            &mut self.runtime
        };
        let outcome = runtime.plan_rich(summary, &mut self.views);
        self.policy_cost += runtime.last_call();
        let selection = match outcome {
            PolicyOutcome::Answer(selection) => selection,
            PolicyOutcome::Fault(kind) => return RichOutcome::Faulted(Some(kind)),
            PolicyOutcome::BackingOff => return RichOutcome::Faulted(None),
        };
        let views = &self.views;
        // The runtime validated every index against the column length.
        let rows = selection
            .requests
            .iter()
            .filter_map(|&index| {
                let i = index as usize;
                let (external_id, journey) = external_ids.get(i)?;
                Some(SnapshotRow {
                    request_id: Arc::clone(external_id),
                    journey: *journey,
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
        RichOutcome::Planned(
            RichRecord {
                probability,
                attributes: selection.attributes,
                rows,
            },
            selection.extra,
        )
    }
}

/// A policy's extra attributes: (key without the `policy.` prefix, value).
type ExtraAttributes = Vec<(String, String)>;

/// What came of a step's rich sampling.
enum RichOutcome {
    /// `decide` did not ask for snapshots.
    NotSampled,
    /// The chosen rows, and `plan-rich`'s extra attributes.
    Planned(RichRecord, ExtraAttributes),
    /// `decide` asked for snapshots but `plan-rich` faulted (the kind), or was skipped while the
    /// runtime backs off after an earlier fault (`None`): the batch summary alone is traced.
    Faulted(Option<FaultKind>),
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
        time_since_arrival_us: Vec::new(),
        max_tokens: Vec::new(),
        journey_traced: Vec::new(),
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
    views.time_since_arrival_us.clear();
    views.max_tokens.clear();
    views.journey_traced.clear();
}
