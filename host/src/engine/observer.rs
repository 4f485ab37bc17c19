//! The step hook: what the step tracer sees of each scheduler step.
//!
//! [`EngineCore::step`](super::core::EngineCore::step) calls [`StepObserver::on_step`] once per
//! step, after the batch is decided and before the post-schedule update (so `num_computed_tokens`
//! still has its value from before the step). A [`StepView`] holds the step's numbers for the
//! `step.BATCH_SUMMARY` event by value and borrows the scheduler for the rest: the running and
//! waiting queues are iterated in place, each [`RequestView`] reading its request's fields (and its
//! KV metrics) only when asked. Observers only read; nothing they do changes the engine.

use super::journey::{JourneyArrival, JourneyDecision, JourneyLog};
use super::kv_cache_manager::KvCacheManager;
use super::request::{Request, RequestId, RequestPhase};
use super::scheduler::{BatchSummary, ScheduledRequest, Scheduler, SchedulerOutput};
use crate::trace_context::{SpanId, TraceId};

/// Called once per engine step with a read-only view of it.
pub trait StepObserver: Send {
    /// At the step's emission point: the batch is decided, nothing has run yet.
    fn on_step(&mut self, step: &StepView<'_>);

    /// When step `step_id` is over (forward pass, sampling and update done), at wall clock
    /// `ts_end_ns` (Unix ns). Called after every `on_step` that returned normally.
    fn on_step_end(&mut self, _step_id: u64, _ts_end_ns: u64) {}

    /// A client request with journey tracing on arrived (its first choice): whether its journey
    /// is traced, and with which ids. Called once per client request; the default traces none.
    fn decide_journey(&mut self, _arrival: &JourneyArrival<'_>) -> Option<JourneyDecision> {
        None
    }

    /// A traced request was freed: its `llm_core` journey is complete.
    fn on_journey_end(&mut self, _journey: JourneyLog) {}
}

/// The default observer: does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopStepObserver;

impl StepObserver for NoopStepObserver {
    fn on_step(&mut self, _step: &StepView<'_>) {}
}

/// Any `FnMut(&StepView)` closure is an observer (handy in tests).
impl<F> StepObserver for F
where
    F: FnMut(&StepView<'_>) + Send,
{
    fn on_step(&mut self, step: &StepView<'_>) {
        self(step)
    }
}

/// Queue depths after scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepths {
    /// `queue.running_depth`: requests in the running queue, scheduled or not.
    pub running_depth: usize,
    /// `queue.waiting_depth`: waiting requests, preempted ones included.
    pub waiting_depth: usize,
}

/// KV pool occupancy after scheduling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvSummary {
    /// `kv.usage_gpu_ratio`: `1 - blocks_free / blocks_total`.
    pub usage_ratio: f64,
    /// `kv.blocks_total_gpu`.
    pub blocks_total: usize,
    /// `kv.blocks_free_gpu` (cached-but-free blocks count as free).
    pub blocks_free: usize,
}

/// One scheduler step, as the step tracer sees it.
#[derive(Debug, Clone, Copy)]
pub struct StepView<'a> {
    /// `step.id`: `scheduler_step`, 1 for the first step, +1 per `schedule()`, empty steps included.
    pub id: u64,
    /// `step.ts_start_ns`: wall clock (Unix ns) when `schedule()` began.
    pub ts_start_ns: u64,
    /// `step.ts_end_ns`: wall clock (Unix ns) when the batch was decided.
    pub ts_end_ns: u64,
    /// `step.duration_us`: `ts_end_ns - ts_start_ns`, in µs (the scheduler's share of the step).
    pub duration_us: u64,
    /// Wall time of the previous whole step (schedule, observer, forward, sample, update), in µs;
    /// 0 for the first step.
    pub last_step_duration_us: u64,
    pub queue: QueueDepths,
    pub batch: BatchSummary,
    pub kv: KvSummary,
    scheduler: &'a Scheduler,
    output: &'a SchedulerOutput,
}

impl<'a> StepView<'a> {
    pub(super) fn new(
        scheduler: &'a Scheduler,
        output: &'a SchedulerOutput,
        ts_start_ns: u64,
        duration_ns: u64,
        last_step_duration_us: u64,
    ) -> Self {
        let kv = scheduler.kv_cache();
        Self {
            id: output.step_id,
            ts_start_ns,
            ts_end_ns: ts_start_ns.saturating_add(duration_ns),
            duration_us: duration_ns / 1_000,
            last_step_duration_us,
            queue: QueueDepths {
                running_depth: scheduler.num_running(),
                waiting_depth: scheduler.num_waiting(),
            },
            batch: output.summary,
            kv: KvSummary {
                usage_ratio: kv.usage_ratio(),
                blocks_total: kv.num_total_blocks(),
                blocks_free: kv.num_free_blocks(),
            },
            scheduler,
            output,
        }
    }

    /// Every running request, scheduled this step or not, oldest admission first.
    pub fn running_requests(&self) -> impl ExactSizeIterator<Item = RequestView<'a>> + 'a {
        let kv = self.scheduler.kv_cache();
        // `scheduled` is in running-queue order: walk it alongside the queue.
        let mut scheduled = self.output.scheduled.iter().peekable();
        self.scheduler
            .running()
            .iter()
            .enumerate()
            .map(move |(index, request)| {
                let scheduled_tokens = scheduled
                    .next_if(|s| s.running_index == index)
                    .map_or(0, |s| s.num_tokens);
                RequestView {
                    request,
                    kv,
                    scheduled_tokens,
                }
            })
    }

    /// Waiting requests (preempted ones included), next to admit first.
    pub fn waiting_requests(&self) -> impl ExactSizeIterator<Item = RequestView<'a>> + 'a {
        let kv = self.scheduler.kv_cache();
        self.scheduler
            .waiting()
            .iter()
            .map(move |request| RequestView {
                request,
                kv,
                scheduled_tokens: 0,
            })
    }

    /// The scheduled requests, in running-queue order.
    pub fn scheduled(&self) -> &'a [ScheduledRequest] {
        &self.output.scheduled
    }

    /// Requests preempted while building this step.
    pub fn preempted_request_ids(&self) -> &'a [RequestId] {
        &self.output.preempted_request_ids
    }
}

/// A request as of the step's emission point; each accessor reads it in place.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    request: &'a Request,
    kv: &'a KvCacheManager,
    /// From the step's scheduler output (0 when not scheduled).
    scheduled_tokens: usize,
}

impl<'a> RequestView<'a> {
    /// The engine's id (the `request-id` column a policy sees).
    pub fn id(&self) -> RequestId {
        self.request.id()
    }

    /// `request.id`: the id the client knows the request by.
    pub fn external_id(&self) -> &'a std::sync::Arc<str> {
        self.request.external_id()
    }

    /// `request.phase`: PREFILL while the request has no output token.
    pub fn phase(&self) -> RequestPhase {
        self.request.phase()
    }

    /// `request.num_prompt_tokens`.
    pub fn num_prompt_tokens(&self) -> usize {
        self.request.num_prompt_tokens()
    }

    /// `request.num_computed_tokens` (before this step's tokens).
    pub fn num_computed_tokens(&self) -> usize {
        self.request.num_computed_tokens()
    }

    /// `request.num_output_tokens`.
    pub fn num_output_tokens(&self) -> usize {
        self.request.num_output_tokens()
    }

    /// `request.num_preemptions`.
    pub fn num_preemptions(&self) -> u32 {
        self.request.num_preemptions()
    }

    /// `request.scheduled_tokens_this_step` (0 when running but unscheduled).
    pub fn scheduled_tokens_this_step(&self) -> usize {
        self.scheduled_tokens
    }

    /// `(kv.blocks_allocated_gpu, kv.blocks_cached_gpu)`, from `per_request_kv_metrics`.
    pub fn kv_blocks(&self) -> (usize, usize) {
        self.kv.per_request_kv_metrics(self.request.id())
    }

    /// Prompt tokens served by the prefix cache at the first admission.
    pub fn num_cached_tokens(&self) -> usize {
        self.request.num_cached_tokens()
    }

    /// `request.effective_prompt_len`: prompt − cached, whenever not all of the prompt was cached.
    pub fn effective_prompt_len(&self) -> Option<usize> {
        self.request.effective_prompt_len()
    }

    /// The request's `max_tokens`.
    pub fn max_tokens(&self) -> usize {
        self.request.params.max_tokens
    }

    /// How long ago the engine took the request in, as of `now`.
    pub fn time_since_arrival(&self, now: std::time::Instant) -> std::time::Duration {
        now.saturating_duration_since(self.request.arrived)
    }

    /// The trace and `llm_core` span of the request's journey, when it is traced.
    pub fn journey_span(&self) -> Option<(TraceId, SpanId)> {
        self.request
            .journey()
            .map(|log| (log.decision.trace_id, log.core_span_id))
    }
}
