//! The engine core: the step loop that ties scheduler, step observer, model runner and sampler.
//!
//! [`EngineCore::step`] runs one step: `schedule()` → step observer (the tracing hook) →
//! post-schedule update → model runner `forward` → sampling → `update_from_output` (append tokens,
//! stop rules, free finished requests' blocks, cache newly-full blocks). It is single-threaded and
//! synchronous; [`api`](super::api) runs it on its own thread behind a channel. A failing forward
//! pass finishes the step's requests with `error` (and is reported in the [`StepOutput`]); a
//! panicking observer is disabled and logged, the engine keeps going.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use super::config::{EngineConfig, EngineError, RequestLimits};
use super::journey::{JourneyArrival, JourneyLog, JourneyTicket};
use super::model_runner::{ModelRunner, ModelRunnerError};
use super::observer::{NoopStepObserver, StepObserver, StepView};
use super::request::{Request, RequestId, RequestOutput, request_rng, unix_time_ns};
use super::sampler::Sampler;
use super::sampling_params::SamplingParams;
use super::scheduler::Scheduler;

/// Engine-wide numbers for `/metrics` and the CLI.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    /// `1 - free / total` KV blocks.
    pub kv_usage_ratio: f64,
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// Whether prompts are looked up in the prefix cache (`--enable-prefix-caching`).
    pub prefix_caching_enabled: bool,
    /// Prefix-cache lookups at admission, in tokens.
    pub prefix_cache_queries: u64,
    /// Prefix-cache hits at admission, in tokens.
    pub prefix_cache_hits: u64,
    pub num_preemptions_total: u64,
    /// Prompt tokens of requests that produced their first token.
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    /// Tokens computed by forward passes (prefill, recomputation and decode).
    pub computed_tokens_total: u64,
    pub num_requests_finished_total: u64,
    /// `scheduler_step`: steps run so far.
    pub num_steps: u64,
    /// Tokens scheduled per non-empty step.
    pub step_tokens: super::StepTokenHistogram,
    pub model_errors_total: u64,
}

/// What one step produced.
#[derive(Debug)]
pub struct StepOutput {
    pub step_id: u64,
    /// One entry per request that got a token or finished this step.
    pub outputs: Vec<RequestOutput>,
    /// Set when the forward pass failed (the step's requests then finished with `error`).
    pub model_error: Option<ModelRunnerError>,
}

/// The engine core. Not thread-safe by itself; see [`Engine`](super::api::Engine) for the thread.
pub struct EngineCore {
    scheduler: Scheduler,
    runner: Box<dyn ModelRunner>,
    observer: Box<dyn StepObserver>,
    observer_failed: bool,
    sampler: Sampler,
    seed: u64,
    last_step_duration_us: u64,
    /// When the previous step's span ended (Unix ns): the next step never starts before it.
    last_step_end_ns: u64,
    model_errors_total: u64,
}

impl std::fmt::Debug for EngineCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCore")
            .field("scheduler", &self.scheduler)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl EngineCore {
    /// Validates `config` against the runner and builds the engine.
    pub fn new(
        config: EngineConfig,
        runner: Box<dyn ModelRunner>,
        observer: Box<dyn StepObserver>,
    ) -> Result<Self, EngineError> {
        let limits = config.validate(runner.max_model_len(), runner.vocab_size())?;
        Ok(Self {
            scheduler: Scheduler::new(&config, limits),
            runner,
            observer,
            observer_failed: false,
            sampler: Sampler::new(),
            seed: config.seed,
            last_step_duration_us: 0,
            last_step_end_ns: 0,
            model_errors_total: 0,
        })
    }

    /// An engine with the no-op observer.
    pub fn without_observer(
        config: EngineConfig,
        runner: Box<dyn ModelRunner>,
    ) -> Result<Self, EngineError> {
        Self::new(config, runner, Box::new(NoopStepObserver))
    }

    pub fn limits(&self) -> &RequestLimits {
        self.scheduler.limits()
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Validates and queues a request under the caller's id.
    pub fn add_request(
        &mut self,
        request_id: RequestId,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        self.scheduler
            .limits()
            .validate_request(&prompt_token_ids, &params)?;
        self.queue_validated((request_id, None, None), prompt_token_ids, params)
    }

    /// Like [`add_request`](Self::add_request), for a request of the client request whose
    /// journey `ticket` decides (benchmarks and tests drive journeys without the server).
    pub fn add_request_in_journey(
        &mut self,
        request_id: RequestId,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        ticket: &JourneyTicket,
    ) -> Result<(), EngineError> {
        self.scheduler
            .limits()
            .validate_request(&prompt_token_ids, &params)?;
        self.queue_validated((request_id, None, Some(ticket)), prompt_token_ids, params)
    }

    /// Queues a request that [`EngineHandle::validate`](super::EngineHandle::validate) checked
    /// against these same limits already (the engine thread's path: no second check).
    /// `ids`: the engine's id, the id the client knows the request by when it has another, and
    /// the client request's journey ticket when journey tracing is on.
    pub(super) fn queue_validated(
        &mut self,
        (request_id, external_id, journey): (RequestId, Option<Arc<str>>, Option<&JourneyTicket>),
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        let rng = request_rng(params.seed, self.seed, request_id);
        let mut request = Request::new(request_id, prompt_token_ids, params, rng);
        if let Some(external_id) = external_id {
            request = request.with_external_id(external_id);
        }
        if let Some(ticket) = journey {
            let log = self.decide_journey(ticket, &request);
            request = request.with_journey(log);
        }
        self.scheduler.add_request(request)
    }

    /// The journey of a request of `ticket`: decided by the observer for the client request's
    /// first choice, reused for the others.
    fn decide_journey(
        &mut self,
        ticket: &JourneyTicket,
        request: &Request,
    ) -> Option<Box<JourneyLog>> {
        let observer = &mut self.observer;
        let observer_failed = &mut self.observer_failed;
        let scheduler = &self.scheduler;
        let decision = ticket.decide_once(|| {
            if *observer_failed {
                return None;
            }
            let kv = scheduler.kv_cache();
            let arrival = JourneyArrival {
                request_id: request.id(),
                external_id: request.external_id(),
                num_prompt_tokens: request.num_prompt_tokens(),
                max_tokens: request.params.max_tokens,
                temperature: request.params.temperature,
                num_choices: ticket.num_choices(),
                parent: ticket.parent(),
                running_depth: scheduler.num_running(),
                waiting_depth: scheduler.num_waiting(),
                kv_usage_ratio: kv.usage_ratio(),
                step_id: scheduler.scheduler_step(),
            };
            match catch_unwind(AssertUnwindSafe(|| observer.decide_journey(&arrival))) {
                Ok(decision) => decision,
                Err(_) => {
                    *observer_failed = true;
                    tracing::error!("step observer panicked; it is disabled from now on");
                    None
                }
            }
        })?;
        Some(Box::new(JourneyLog::new(decision, request)))
    }

    /// Hands the journeys of freed traced requests to the observer.
    fn end_journeys(&mut self) {
        if !self.scheduler.has_finished_journeys() {
            return;
        }
        let journeys = self.scheduler.take_finished_journeys();
        if self.observer_failed {
            return;
        }
        let observer = &mut self.observer;
        let delivered = catch_unwind(AssertUnwindSafe(|| {
            for journey in journeys {
                observer.on_journey_end(journey);
            }
        }));
        if delivered.is_err() {
            self.observer_failed = true;
            tracing::error!("step observer panicked; it is disabled from now on");
        }
    }

    /// Aborts a request and frees its blocks; its final output, or `None` if unknown.
    pub fn abort_request(&mut self, request_id: RequestId) -> Option<RequestOutput> {
        let output = self.scheduler.abort_request(request_id);
        self.end_journeys();
        output
    }

    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished_requests()
    }

    /// Runs one step.
    pub fn step(&mut self) -> StepOutput {
        // Step times are one wall-clock read at the start plus monotonic durations, and steps
        // never overlap: the wall clock can be coarse, slewed or stepped back by NTP, and a
        // span must neither end before its batch was decided nor after the next step began.
        let ts_start_ns = unix_time_ns().max(self.last_step_end_ns);
        let started = Instant::now();
        let scheduled = self.scheduler.schedule();
        let schedule_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);

        if !self.observer_failed {
            let view = StepView::new(
                &self.scheduler,
                &scheduled,
                ts_start_ns,
                schedule_ns,
                self.last_step_duration_us,
            );
            let observer = &mut self.observer;
            if catch_unwind(AssertUnwindSafe(|| observer.on_step(&view))).is_err() {
                self.observer_failed = true;
                tracing::error!(
                    step_id = scheduled.step_id,
                    "step observer panicked; it is disabled from now on"
                );
            }
        }

        self.scheduler.update_after_schedule(&scheduled);
        let mut model_error = None;
        let outputs = if scheduled.is_empty() {
            self.scheduler.update_from_output(&scheduled, Some(&[]))
        } else {
            let batch = self.scheduler.model_batch(&scheduled);
            let forward = self.runner.forward(&batch);
            drop(batch);
            let sampled = forward.and_then(|logits| {
                logits.check_shape(scheduled.num_logits_rows(), self.runner.vocab_size())?;
                Ok(self.sampler.sample_step(
                    &logits,
                    &scheduled.scheduled,
                    self.scheduler.running_mut(),
                ))
            });
            match sampled {
                Ok(sampled) => self
                    .scheduler
                    .update_from_output(&scheduled, Some(&sampled)),
                Err(error) => {
                    self.model_errors_total += 1;
                    tracing::error!(step_id = scheduled.step_id, %error, "forward pass failed; finishing the step's requests with an error");
                    model_error = Some(error);
                    self.scheduler.update_from_output(&scheduled, None)
                }
            }
        };
        let step_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_step_duration_us = step_ns / 1_000;
        self.end_journeys();
        let ts_end_ns = unix_time_ns().max(ts_start_ns.saturating_add(step_ns));
        self.last_step_end_ns = ts_end_ns;
        if !self.observer_failed {
            let observer = &mut self.observer;
            let step_id = scheduled.step_id;
            if catch_unwind(AssertUnwindSafe(|| {
                observer.on_step_end(step_id, ts_end_ns)
            }))
            .is_err()
            {
                self.observer_failed = true;
                tracing::error!(
                    step_id,
                    "step observer panicked; it is disabled from now on"
                );
            }
        }
        StepOutput {
            step_id: scheduled.step_id,
            outputs,
            model_error,
        }
    }

    pub fn stats(&self) -> EngineStats {
        let kv = self.scheduler.kv_cache();
        let counters = self.scheduler.counters();
        EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_usage_ratio: kv.usage_ratio(),
            kv_blocks_total: kv.num_total_blocks(),
            kv_blocks_free: kv.num_free_blocks(),
            block_size: kv.block_size(),
            prefix_caching_enabled: kv.prefix_caching_enabled(),
            prefix_cache_queries: kv.prefix_cache_queries(),
            prefix_cache_hits: kv.prefix_cache_hits(),
            num_preemptions_total: counters.num_preemptions_total,
            prompt_tokens_total: counters.prompt_tokens_total,
            generation_tokens_total: counters.generation_tokens_total,
            computed_tokens_total: counters.computed_tokens_total,
            num_requests_finished_total: counters.num_requests_finished_total,
            num_steps: self.scheduler.scheduler_step(),
            step_tokens: counters.step_tokens,
            model_errors_total: self.model_errors_total,
        }
    }

    /// Checks every scheduler and KV-cache invariant (valid between steps); for tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.scheduler.check_invariants()
    }
}
