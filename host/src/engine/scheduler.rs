//! The continuous-batching scheduler (vLLM v1 style, first come first served).
//!
//! Each [`schedule`](Scheduler::schedule) call is one scheduler step: `scheduler_step` goes up by
//! one (the first step is 1; empty steps count). The step spends a token budget
//! (`max_num_batched_tokens`) over at most `max_num_seqs` running requests. Running requests go
//! first, in admission order: a decoding request gets its one token, an unfinished prefill gets
//! the next chunk the remaining budget allows (chunked prefill). When the KV pool cannot hold a
//! running request's new tokens, the newest running request is preempted: its blocks are freed,
//! `num_computed_tokens` drops to 0 and it goes back to the front of the waiting queue, to
//! recompute its prompt and output tokens later. If no request was preempted, waiting requests are
//! then admitted in order, each taking its prefix-cache hit and then as much as the budget allows.
//! A request with `prompt_logprobs` gets a logits row per prompt position it computes, so its
//! prompt chunks also spend a second budget, `max_prompt_logprobs_tokens` per step (over all such
//! requests): that bounds the step's logits at `max_num_seqs + max_prompt_logprobs_tokens` rows.
//! A running request with none of it left waits for the next step; a waiting one stops admission.
//!
//! No livelock: a prompt longer than the whole pool is refused at admission
//! ([`EngineError::PromptExceedsKvCapacity`]) and a request stops with `length` once prompt plus
//! output reaches the pool's capacity (see [`RequestLimits::max_request_len`]), so a request alone
//! in the running queue always fits; the oldest running request never gets preempted by a newer one.
//!
//! A step is: `schedule()` → (step observer) → [`update_after_schedule`](Scheduler::update_after_schedule)
//! (advances `num_computed_tokens`) → forward pass → [`update_from_output`](Scheduler::update_from_output)
//! (appends sampled tokens, applies stop rules, caches full blocks, frees finished requests).

use std::collections::VecDeque;

use super::block_pool::BlockId;
use super::config::{EngineConfig, EngineError, RequestLimits};
use super::hashing::IdHashMap;
use super::journey::{JourneyEventKind, JourneyLog};
use super::kv_cache_manager::KvCacheManager;
use super::model_runner::{BatchEntry, ModelBatch};
use super::request::{
    FinishReason, Request, RequestId, RequestOutput, RequestPhase, RequestStatus,
};

/// One request's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledRequest {
    pub request_id: RequestId,
    /// Index in the running queue (valid until the step's `update_from_output`).
    pub running_index: usize,
    /// Position of the first token computed this step (`num_computed_tokens` before the step).
    pub start_position: usize,
    /// Tokens computed this step.
    pub num_tokens: usize,
    /// Whether this step computes the request's last known token, so a token is sampled.
    pub needs_logits: bool,
    /// Whether the forward pass returns logits for every position computed this step (the
    /// request's `prompt_logprobs`), not only the last one.
    pub prompt_logits: bool,
    /// The request's phase when scheduled (PREFILL while it has no output token).
    pub phase: RequestPhase,
}

/// Per-step counts for the `step.BATCH_SUMMARY` event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchSummary {
    /// Scheduled requests without output tokens.
    pub num_prefill_reqs: usize,
    /// Scheduled requests with output tokens (including preempted ones recomputing).
    pub num_decode_reqs: usize,
    /// `prefill_tokens + decode_tokens`.
    pub scheduled_tokens: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Requests that finished (or were aborted) since the previous step.
    pub num_finished: usize,
    /// Requests preempted while building this step.
    pub num_preempted: usize,
}

/// What `schedule()` decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// `scheduler_step` of this step (1 for the first).
    pub step_id: u64,
    /// Scheduled requests, in running-queue order.
    pub scheduled: Vec<ScheduledRequest>,
    pub summary: BatchSummary,
    pub preempted_request_ids: Vec<RequestId>,
    /// Requests that finished since the previous step.
    pub finished_request_ids: Vec<RequestId>,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    /// Number of logits rows the model must return: one per request with `needs_logits`, or
    /// one per computed position for a request with `prompt_logits`.
    pub fn num_logits_rows(&self) -> usize {
        self.scheduled
            .iter()
            .map(|s| {
                if s.prompt_logits {
                    s.num_tokens
                } else {
                    usize::from(s.needs_logits)
                }
            })
            .sum()
    }
}

/// Running totals since the scheduler started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    pub num_preemptions_total: u64,
    /// Prompt tokens of requests that produced their first token.
    pub prompt_tokens_total: u64,
    /// Output tokens generated.
    pub generation_tokens_total: u64,
    /// Tokens computed by forward passes (prefill chunks, recomputation and decode).
    pub computed_tokens_total: u64,
    pub num_requests_finished_total: u64,
    /// Tokens scheduled per non-empty step (`vllm:iteration_tokens_total`).
    pub step_tokens: super::step_tokens::StepTokenHistogram,
}

/// Request queues, the KV cache manager, and the scheduling policy.
#[derive(Debug)]
pub struct Scheduler {
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    max_prompt_logprobs_tokens: usize,
    limits: RequestLimits,
    kv: KvCacheManager,
    /// Admitted requests, oldest admission first.
    running: Vec<Request>,
    /// Requests to admit, front first (preempted ones are put back at the front).
    waiting: VecDeque<Request>,
    /// Ids of all unfinished requests.
    live_ids: IdHashMap<RequestId, ()>,
    scheduler_step: u64,
    finished_since_last_step: Vec<RequestId>,
    /// Waiting requests never admitted yet (the queue bound applies to these).
    num_fresh_waiting: usize,
    /// Fresh requests that left that state (admitted, or finished while waiting), ever.
    num_fresh_resolved_total: u64,
    counters: SchedulerCounters,
    computed_blocks_scratch: Vec<BlockId>,
    /// Journeys of traced requests freed since the engine last took them.
    finished_journeys: Vec<JourneyLog>,
}

impl Scheduler {
    /// A scheduler for a validated config (`limits` from [`EngineConfig::validate`]).
    pub fn new(config: &EngineConfig, limits: RequestLimits) -> Self {
        Self {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_prompt_logprobs_tokens: config.max_prompt_logprobs_tokens,
            limits,
            kv: KvCacheManager::new(
                config.num_kv_blocks,
                config.block_size,
                config.enable_prefix_caching,
            ),
            running: Vec::with_capacity(config.max_num_seqs),
            waiting: VecDeque::new(),
            live_ids: IdHashMap::default(),
            scheduler_step: 0,
            finished_since_last_step: Vec::new(),
            num_fresh_waiting: 0,
            num_fresh_resolved_total: 0,
            counters: SchedulerCounters::default(),
            computed_blocks_scratch: Vec::new(),
            finished_journeys: Vec::new(),
        }
    }

    /// Queues a request (already checked against [`RequestLimits::validate_request`]).
    pub fn add_request(&mut self, mut request: Request) -> Result<(), EngineError> {
        if self.live_ids.contains_key(&request.id) {
            return Err(EngineError::DuplicateRequestId(request.id));
        }
        if self.num_fresh_waiting >= self.limits.max_waiting_requests {
            return Err(EngineError::QueueFull {
                max_waiting_requests: self.limits.max_waiting_requests,
            });
        }
        self.live_ids.insert(request.id, ());
        self.num_fresh_waiting += 1;
        // The next step is the first to see it waiting.
        request.journey_event(JourneyEventKind::Queued, self.scheduler_step + 1);
        self.waiting.push_back(request);
        Ok(())
    }

    /// The id of the current (last) step; 0 before the first `schedule()`.
    pub fn scheduler_step(&self) -> u64 {
        self.scheduler_step
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn kv_cache(&self) -> &KvCacheManager {
        &self.kv
    }

    /// The running queue, oldest admission first.
    pub fn running(&self) -> &[Request] {
        &self.running
    }

    /// The waiting queue, next to admit first.
    pub fn waiting(&self) -> &VecDeque<Request> {
        &self.waiting
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_unfinished_requests(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// How many requests ever left the fresh-waiting state (first admission or finished while
    /// waiting). The engine handle uses it to keep its queue bound exact.
    pub fn num_fresh_resolved_total(&self) -> u64 {
        self.num_fresh_resolved_total
    }

    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }

    /// The journeys of traced requests freed since the last call.
    pub fn take_finished_journeys(&mut self) -> Vec<JourneyLog> {
        std::mem::take(&mut self.finished_journeys)
    }

    /// Whether a traced request was freed since the last [`take_finished_journeys`](Self::take_finished_journeys).
    pub fn has_finished_journeys(&self) -> bool {
        !self.finished_journeys.is_empty()
    }

    /// The running queue, for the sampler to draw each scheduled request's token.
    pub(super) fn running_mut(&mut self) -> &mut [Request] {
        &mut self.running
    }

    /// Decides the next step's batch. See the module doc for the policy.
    pub fn schedule(&mut self) -> SchedulerOutput {
        self.scheduler_step += 1;
        let mut out = SchedulerOutput {
            step_id: self.scheduler_step,
            scheduled: Vec::with_capacity(self.running.len()),
            finished_request_ids: std::mem::take(&mut self.finished_since_last_step),
            ..SchedulerOutput::default()
        };
        let mut budget = self.max_num_batched_tokens;
        let mut prompt_logits_budget = self.max_prompt_logprobs_tokens;

        // Running requests first.
        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let request = &self.running[index];
            let mut num_new_tokens =
                (request.num_tokens() - request.num_computed_tokens).min(budget);
            let prompt_logits = request.needs_prompt_logits(request.num_computed_tokens);
            if prompt_logits {
                num_new_tokens = num_new_tokens.min(prompt_logits_budget);
            }
            if num_new_tokens == 0 {
                index += 1;
                continue;
            }
            let mut scheduled = true;
            while !self
                .kv
                .allocate_slots(&self.running[index], num_new_tokens, &[])
            {
                let victim_was_current = self.running.len() == index + 1;
                self.preempt_newest_running(&mut out);
                if victim_was_current {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            self.record_scheduled(&mut out, index, num_new_tokens, prompt_logits);
            budget -= num_new_tokens;
            if prompt_logits {
                prompt_logits_budget -= num_new_tokens;
            }
            index += 1;
        }

        // Then waiting requests, unless this step had to preempt.
        if out.preempted_request_ids.is_empty() {
            while budget > 0 && self.running.len() < self.max_num_seqs {
                let Some(request) = self.waiting.front_mut() else {
                    break;
                };
                let mut hit_blocks = std::mem::take(&mut self.computed_blocks_scratch);
                let num_hit_tokens = self.kv.get_computed_blocks(request, &mut hit_blocks);
                let mut num_new_tokens = (request.num_tokens() - num_hit_tokens).min(budget);
                let prompt_logits = request.needs_prompt_logits(num_hit_tokens);
                if prompt_logits {
                    num_new_tokens = num_new_tokens.min(prompt_logits_budget);
                }
                let admitted = num_new_tokens > 0
                    && self.kv.allocate_slots(request, num_new_tokens, &hit_blocks);
                self.computed_blocks_scratch = hit_blocks;
                if !admitted {
                    break;
                }
                let Some(mut request) = self.waiting.pop_front() else {
                    break;
                };
                if !request.was_admitted() {
                    request.num_cached_tokens = Some(num_hit_tokens);
                    request.queue_time = Some(request.arrived.elapsed());
                    self.num_fresh_waiting -= 1;
                    self.num_fresh_resolved_total += 1;
                }
                if request.reads_prefix_cache() {
                    self.kv
                        .record_prefix_cache_query(request.num_tokens(), num_hit_tokens);
                }
                request.status = RequestStatus::Running;
                request.num_computed_tokens = num_hit_tokens;
                let resume = request.num_preemptions > 0;
                request.journey_event(JourneyEventKind::Scheduled { resume }, self.scheduler_step);
                self.running.push(request);
                self.record_scheduled(
                    &mut out,
                    self.running.len() - 1,
                    num_new_tokens,
                    prompt_logits,
                );
                budget -= num_new_tokens;
                if prompt_logits {
                    prompt_logits_budget -= num_new_tokens;
                }
            }
        }

        out.summary.num_finished = out.finished_request_ids.len();
        out.summary.num_preempted = out.preempted_request_ids.len();
        out
    }

    /// Records `num_tokens` of running request `running_index` in the step's output;
    /// `prompt_logits` is its [`Request::needs_prompt_logits`] at its computed position (already
    /// decided when its budget was).
    fn record_scheduled(
        &mut self,
        out: &mut SchedulerOutput,
        running_index: usize,
        num_tokens: usize,
        prompt_logits: bool,
    ) {
        let request = &mut self.running[running_index];
        let start_position = request.num_computed_tokens;
        let phase = request.phase();
        out.scheduled.push(ScheduledRequest {
            request_id: request.id,
            running_index,
            start_position,
            num_tokens,
            needs_logits: start_position + num_tokens == request.num_tokens(),
            prompt_logits,
            phase,
        });
        let summary = &mut out.summary;
        summary.scheduled_tokens += num_tokens;
        match phase {
            RequestPhase::Prefill => {
                summary.num_prefill_reqs += 1;
                summary.prefill_tokens += num_tokens;
            }
            RequestPhase::Decode => {
                summary.num_decode_reqs += 1;
                summary.decode_tokens += num_tokens;
            }
        }
    }

    fn preempt_newest_running(&mut self, out: &mut SchedulerOutput) {
        let Some(mut victim) = self.running.pop() else {
            return;
        };
        self.kv.free(victim.id);
        victim.journey_event(JourneyEventKind::Preempted, self.scheduler_step);
        victim.status = RequestStatus::Preempted;
        victim.num_computed_tokens = 0;
        victim.num_preemptions += 1;
        self.counters.num_preemptions_total += 1;
        tracing::debug!(
            request_id = victim.id,
            num_tokens = victim.num_tokens(),
            num_preemptions = victim.num_preemptions,
            "preempted request to free KV blocks"
        );
        out.preempted_request_ids.push(victim.id);
        self.waiting.push_front(victim);
    }

    /// The post-schedule update: the scheduled tokens count as computed from here on.
    pub fn update_after_schedule(&mut self, out: &SchedulerOutput) {
        let mut step_tokens = 0;
        for s in &out.scheduled {
            let request = &mut self.running[s.running_index];
            debug_assert_eq!(request.id, s.request_id);
            request.num_computed_tokens += s.num_tokens;
            step_tokens += s.num_tokens;
        }
        self.counters.computed_tokens_total += step_tokens as u64;
        if step_tokens > 0 {
            self.counters.step_tokens.observe(step_tokens);
        }
    }

    /// The step's forward batch: each scheduled request's new tokens and block table.
    pub fn model_batch(&self, out: &SchedulerOutput) -> ModelBatch<'_> {
        let entries = out
            .scheduled
            .iter()
            .map(|s| {
                let request = &self.running[s.running_index];
                BatchEntry {
                    request_id: s.request_id,
                    token_ids: &request.token_ids
                        [s.start_position..s.start_position + s.num_tokens],
                    start_position: s.start_position,
                    block_table: self.kv.block_table(s.request_id),
                    needs_logits: s.needs_logits,
                    all_logits: s.prompt_logits,
                }
            })
            .collect();
        ModelBatch { entries }
    }

    /// Applies a step's results. `sampled[i]` is the token sampled for `out.scheduled[i]` (`None`
    /// when it needed no logits). `sampled == None` means the forward pass failed: every
    /// scheduled request finishes with `error` and none of its new blocks is cached. Returns one
    /// output per request that got a token or finished; finished requests release their blocks.
    pub fn update_from_output(
        &mut self,
        out: &SchedulerOutput,
        sampled: Option<&[Option<u32>]>,
    ) -> Vec<RequestOutput> {
        let mut outputs = Vec::with_capacity(out.scheduled.len());
        let mut any_finished = false;
        let max_len = self.limits.max_request_len();
        for (i, s) in out.scheduled.iter().enumerate() {
            let request = &mut self.running[s.running_index];
            debug_assert_eq!(request.id, s.request_id);
            let Some(sampled) = sampled else {
                request.finish(FinishReason::Error);
                any_finished = true;
                outputs.push(RequestOutput::from_request(request, Vec::new()));
                continue;
            };
            // Only tokens computed this step can fill a block.
            let block_size = self.kv.block_size();
            if (s.start_position + s.num_tokens) / block_size > s.start_position / block_size {
                self.kv.cache_full_blocks(request);
            }
            let Some(token) = sampled.get(i).copied().flatten() else {
                continue;
            };
            request.token_ids.push(token);
            self.counters.generation_tokens_total += 1;
            if request.num_output_tokens() == 1 {
                self.counters.prompt_tokens_total += request.num_prompt_tokens as u64;
                request.journey_event(JourneyEventKind::FirstToken, out.step_id);
            }
            if let Some(reason) = request.check_stop(max_len) {
                request.finish(reason);
                any_finished = true;
            }
            let mut output = RequestOutput::from_request(request, vec![token]);
            output.logprobs.extend(request.sampled_logprobs.take());
            output.prompt_logprobs = std::mem::take(&mut request.prompt_logprobs);
            outputs.push(output);
        }
        if any_finished {
            for mut request in self.running.extract_if(.., |r| r.is_finished()) {
                if let Some(reason) = request.status.finish_reason() {
                    request.journey_event(JourneyEventKind::Finished(reason), out.step_id);
                }
                self.finished_journeys
                    .extend(request.journey.take().map(|log| *log));
                self.kv.free(request.id);
                self.live_ids.remove(&request.id);
                self.finished_since_last_step.push(request.id);
                self.counters.num_requests_finished_total += 1;
            }
        }
        outputs
    }

    /// Aborts a request wherever it is, freeing its blocks. Returns its final output, or `None`
    /// for an unknown (or already finished) id. Only call between steps.
    pub fn abort_request(&mut self, request_id: RequestId) -> Option<RequestOutput> {
        let mut request = if let Some(pos) = self.running.iter().position(|r| r.id == request_id) {
            let request = self.running.remove(pos);
            self.kv.free(request_id);
            request
        } else {
            let pos = self.waiting.iter().position(|r| r.id == request_id)?;
            let request = self.waiting.remove(pos)?;
            if request.status == RequestStatus::Waiting {
                self.num_fresh_waiting -= 1;
                self.num_fresh_resolved_total += 1;
            }
            request
        };
        // Between steps: the next step is the first to count it finished.
        let step = self.scheduler_step + 1;
        request.journey_event(JourneyEventKind::Finished(FinishReason::Abort), step);
        self.finished_journeys
            .extend(request.journey.take().map(|log| *log));
        request.finish(FinishReason::Abort);
        self.live_ids.remove(&request_id);
        self.finished_since_last_step.push(request_id);
        self.counters.num_requests_finished_total += 1;
        Some(RequestOutput::from_request(&request, Vec::new()))
    }

    /// Checks the KV cache manager's invariants and the queues' consistency with it. Valid
    /// between steps.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        if self.running.len() > self.max_num_seqs {
            return Err(format!(
                "{} running requests > max_num_seqs {}",
                self.running.len(),
                self.max_num_seqs
            ));
        }
        let block_size = self.kv.block_size();
        let mut holders = 0;
        for r in &self.running {
            if r.status != RequestStatus::Running {
                return Err(format!(
                    "running request {} has status {:?}",
                    r.id, r.status
                ));
            }
            let (allocated, _) = self.kv.per_request_kv_metrics(r.id);
            if allocated > 0 {
                holders += 1;
            }
            if allocated * block_size < r.num_computed_tokens
                || r.num_computed_tokens >= r.num_tokens()
            {
                return Err(format!(
                    "running request {}: {} blocks, {} computed of {} tokens",
                    r.id,
                    allocated,
                    r.num_computed_tokens,
                    r.num_tokens()
                ));
            }
        }
        if holders != self.kv.num_requests_with_blocks() {
            return Err(format!(
                "{} requests hold blocks but only {holders} running ones do",
                self.kv.num_requests_with_blocks()
            ));
        }
        let mut fresh = 0;
        for r in &self.waiting {
            match r.status {
                RequestStatus::Waiting => fresh += 1,
                RequestStatus::Preempted => {}
                status => return Err(format!("waiting request {} has status {status:?}", r.id)),
            }
            if r.num_computed_tokens != 0 || self.kv.per_request_kv_metrics(r.id).0 != 0 {
                return Err(format!(
                    "waiting request {} holds blocks or computed tokens",
                    r.id
                ));
            }
        }
        if fresh != self.num_fresh_waiting {
            return Err(format!(
                "{fresh} fresh waiting requests but the count says {}",
                self.num_fresh_waiting
            ));
        }
        if self.live_ids.len() != self.running.len() + self.waiting.len() {
            return Err(format!(
                "{} live ids for {} running + {} waiting",
                self.live_ids.len(),
                self.running.len(),
                self.waiting.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::RequestRng;
    use crate::engine::sampling_params::SamplingParams;

    fn scheduler(config: EngineConfig) -> Scheduler {
        let limits = config.validate(1 << 20, 1000).unwrap();
        Scheduler::new(&config, limits)
    }

    fn add(s: &mut Scheduler, id: RequestId, prompt_len: usize, max_tokens: usize) {
        let prompt = (0..prompt_len as u32)
            .map(|t| (t * 7 + id as u32) % 1000)
            .collect();
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        };
        s.add_request(Request::new(id, prompt, params, RequestRng::new(id)))
            .unwrap();
    }

    /// One full step with token `1` sampled for every request that needs it.
    fn step(s: &mut Scheduler) -> SchedulerOutput {
        let out = s.schedule();
        s.update_after_schedule(&out);
        let sampled: Vec<Option<u32>> = out
            .scheduled
            .iter()
            .map(|e| e.needs_logits.then_some(1))
            .collect();
        s.update_from_output(&out, Some(&sampled));
        s.check_invariants().unwrap();
        out
    }

    #[test]
    fn steps_count_from_one_including_empty_ones() {
        let mut s = scheduler(EngineConfig::default());
        assert_eq!(s.scheduler_step(), 0);
        assert_eq!(step(&mut s).step_id, 1);
        assert!(step(&mut s).is_empty());
        add(&mut s, 1, 4, 1);
        let out = step(&mut s);
        assert_eq!(out.step_id, 3);
        assert_eq!(out.summary.num_prefill_reqs, 1);
        assert!(!s.has_unfinished_requests());
        assert_eq!(step(&mut s).summary.num_finished, 1);
    }

    #[test]
    fn chunked_prefill_then_decode_within_the_budget() {
        let mut s = scheduler(EngineConfig {
            max_num_batched_tokens: 8,
            block_size: 4,
            ..Default::default()
        });
        add(&mut s, 1, 20, 3);
        add(&mut s, 2, 3, 3);
        let chunks: Vec<Vec<(RequestId, usize, RequestPhase)>> = (0..6)
            .map(|_| {
                let out = step(&mut s);
                assert!(out.summary.scheduled_tokens <= 8);
                out.scheduled
                    .iter()
                    .map(|e| (e.request_id, e.num_tokens, e.phase))
                    .collect()
            })
            .collect();
        use RequestPhase::{Decode, Prefill};
        assert_eq!(chunks[0], vec![(1, 8, Prefill)]);
        assert_eq!(chunks[1], vec![(1, 8, Prefill)]);
        // Request 1 finishes its prompt (4 tokens) and request 2 gets the rest of the budget.
        assert_eq!(chunks[2], vec![(1, 4, Prefill), (2, 3, Prefill)]);
        assert_eq!(chunks[3], vec![(1, 1, Decode), (2, 1, Decode)]);
        assert_eq!(chunks[4], vec![(1, 1, Decode), (2, 1, Decode)]);
        assert!(chunks[5].is_empty());
    }

    #[test]
    fn prompt_logprobs_chunks_spend_their_own_budget() {
        let mut s = scheduler(EngineConfig {
            max_num_batched_tokens: 64,
            max_prompt_logprobs_tokens: 10,
            block_size: 4,
            ..Default::default()
        });
        add(&mut s, 1, 3, 6);
        for (id, prompt_len) in [(2, 25), (3, 12)] {
            let prompt = (0..prompt_len).map(|t| t * 3 + id).collect();
            let params = SamplingParams {
                ignore_eos: true,
                prompt_logprobs: Some(1),
                ..SamplingParams::greedy(2)
            };
            s.add_request(Request::new(id.into(), prompt, params, RequestRng::new(1)))
                .unwrap();
        }
        let mut chunks: Vec<Vec<(RequestId, usize)>> = Vec::new();
        while s.has_unfinished_requests() {
            let out = step(&mut s);
            let rows: usize = out
                .scheduled
                .iter()
                .filter(|e| e.prompt_logits)
                .map(|e| e.num_tokens)
                .sum();
            assert!(
                rows <= 10,
                "step {}: {rows} prompt logits rows",
                out.step_id
            );
            chunks.push(
                out.scheduled
                    .iter()
                    .filter(|e| e.prompt_logits)
                    .map(|e| (e.request_id, e.num_tokens))
                    .collect(),
            );
            // The plain request is never held back by the others' prompt logits.
            if chunks.len() <= 6 {
                assert_eq!(out.scheduled[0].request_id, 1, "step {}", out.step_id);
            }
            assert!(chunks.len() < 50, "no progress");
        }
        assert_eq!(chunks[0], vec![(2, 10)]);
        assert_eq!(chunks[1], vec![(2, 10)]);
        // Request 2's last 5 prompt tokens, then request 3 admitted with the 5 rows left.
        assert_eq!(chunks[2], vec![(2, 5), (3, 5)]);
        assert_eq!(chunks[3], vec![(3, 7)]);
        assert!(chunks[4..].iter().all(Vec::is_empty));
    }

    #[test]
    fn max_num_seqs_bounds_the_running_queue() {
        let mut s = scheduler(EngineConfig {
            max_num_seqs: 2,
            ..Default::default()
        });
        for id in 1..=5 {
            add(&mut s, id, 3, 2);
        }
        let out = step(&mut s);
        assert_eq!(out.scheduled.len(), 2);
        assert_eq!(s.num_running(), 2);
        assert_eq!(s.num_waiting(), 3);
    }

    #[test]
    fn preemption_takes_the_newest_and_requeues_it_first() {
        // 4 blocks of 4 tokens; two requests of 8 prompt tokens (2 blocks each) fill the pool.
        let mut s = scheduler(EngineConfig {
            num_kv_blocks: 4,
            block_size: 4,
            ..Default::default()
        });
        add(&mut s, 1, 8, 6);
        add(&mut s, 2, 8, 6);
        add(&mut s, 3, 2, 1);
        step(&mut s); // Both prompts; each now has 9 tokens, 8 of them in its 2 blocks.
        assert_eq!(s.num_running(), 2);
        // Request 1's next decode needs a third block: request 2 (newest) is preempted.
        let out = step(&mut s);
        assert_eq!(out.preempted_request_ids, vec![2]);
        assert_eq!(out.summary.num_preempted, 1);
        assert_eq!(
            out.scheduled
                .iter()
                .map(|e| e.request_id)
                .collect::<Vec<_>>(),
            vec![1]
        );
        let requeued = &s.waiting()[0];
        assert_eq!(
            (requeued.id(), requeued.status()),
            (2, RequestStatus::Preempted)
        );
        assert_eq!(
            (requeued.num_computed_tokens(), requeued.num_preemptions()),
            (0, 1)
        );
        assert_eq!(requeued.num_output_tokens(), 1);
        assert_eq!(s.waiting()[1].id(), 3);
        while s.has_unfinished_requests() {
            step(&mut s);
        }
        assert_eq!(s.counters().num_preemptions_total, 1);
        assert_eq!(s.kv_cache().num_free_blocks(), 4);
    }

    #[test]
    fn abort_frees_blocks_everywhere() {
        let mut s = scheduler(EngineConfig {
            max_num_seqs: 1,
            block_size: 4,
            ..Default::default()
        });
        add(&mut s, 1, 9, 10);
        add(&mut s, 2, 9, 10);
        step(&mut s);
        assert_eq!(s.kv_cache().per_request_kv_metrics(1).0, 3);
        let out = s.abort_request(1).unwrap();
        assert_eq!(out.finish_reason, Some(FinishReason::Abort));
        assert_eq!(s.kv_cache().per_request_kv_metrics(1), (0, 0));
        assert_eq!(
            s.abort_request(2).unwrap().finish_reason,
            Some(FinishReason::Abort)
        );
        assert_eq!(s.abort_request(2), None);
        s.check_invariants().unwrap();
        assert_eq!(
            s.kv_cache().num_free_blocks(),
            s.kv_cache().num_total_blocks()
        );
        assert_eq!(step(&mut s).summary.num_finished, 2);
        assert_eq!(s.num_fresh_resolved_total(), 2);
    }

    #[test]
    fn duplicate_ids_and_queue_bound_are_refused() {
        let mut s = scheduler(EngineConfig {
            max_waiting_requests: 2,
            ..Default::default()
        });
        add(&mut s, 1, 3, 1);
        let dup = Request::new(1, vec![1], SamplingParams::greedy(1), RequestRng::new(0));
        assert_eq!(s.add_request(dup), Err(EngineError::DuplicateRequestId(1)));
        add(&mut s, 2, 3, 1);
        let third = Request::new(3, vec![1], SamplingParams::greedy(1), RequestRng::new(0));
        assert_eq!(
            s.add_request(third),
            Err(EngineError::QueueFull {
                max_waiting_requests: 2
            })
        );
    }
}
