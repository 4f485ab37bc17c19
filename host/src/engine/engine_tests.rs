//! Engine-level tests: `EngineCore` driven with the deterministic runner (which reads K/V back
//! through the block tables, so any wrong block, prefix hit or recompute changes the tokens).
//! Property tests over random arrival and length mixes under small block budgets; prefix-cache,
//! LRU-eviction and preemption tests; failure paths.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::config::{EngineConfig, EngineError};
use super::core::{EngineCore, StepOutput};
use super::model_runner::{BatchLimits, Logits, ModelBatch, ModelRunner, ModelRunnerError};
use super::observer::StepView;
use super::request::{FinishReason, RequestId, RequestOutput, RequestPhase, TokenLogprobs};
use super::sampler::token_logprobs;
use super::sampling_params::SamplingParams;
use crate::testing::deterministic_runner::{
    DeterministicRunner, RunnerCounters, reference_greedy_output, reference_logits,
};

const VOCAB: usize = 61;
const RUNNER_MAX_MODEL_LEN: usize = 256;
const RUNNER_SEED: u64 = 11;

/// One running request as the tracer saw it: (id, phase, computed tokens, scheduled tokens,
/// kv blocks (allocated, cached), cached tokens).
type Snapshot = (RequestId, RequestPhase, usize, usize, (usize, usize), usize);

/// What the checking observer saw, plus any rule it saw broken.
#[derive(Debug, Default)]
struct StepLog {
    step_ids: Vec<u64>,
    violations: Vec<String>,
    /// Per step, one snapshot per running request.
    snapshots: Vec<Vec<Snapshot>>,
    max_scheduled_tokens: usize,
    max_scheduled_reqs: usize,
}

/// An observer that checks the per-step rules and records what the tracer would see.
fn checking_observer(
    config: &EngineConfig,
    log: Arc<Mutex<StepLog>>,
) -> impl FnMut(&StepView<'_>) + Send + 'static {
    let budget = config.max_num_batched_tokens;
    let prompt_logits_budget = config.max_prompt_logprobs_tokens;
    let max_seqs = config.max_num_seqs;
    let block_size = config.block_size;
    move |step: &StepView<'_>| {
        let mut log = log.lock().unwrap();
        let mut violations = Vec::new();
        if let Some(&last) = log.step_ids.last()
            && step.id != last + 1
        {
            violations.push(format!("step id {} after {last}", step.id));
        }
        if log.step_ids.is_empty() && step.id != 1 {
            violations.push(format!("first step id is {}", step.id));
        }
        let b = step.batch;
        if b.scheduled_tokens > budget {
            violations.push(format!(
                "step {}: {} tokens > budget {budget}",
                step.id, b.scheduled_tokens
            ));
        }
        let prompt_logits_rows: usize = step
            .scheduled()
            .iter()
            .filter(|s| s.prompt_logits)
            .map(|s| s.num_tokens)
            .sum();
        if prompt_logits_rows > prompt_logits_budget {
            violations.push(format!(
                "step {}: {prompt_logits_rows} prompt logits rows > {prompt_logits_budget}",
                step.id
            ));
        }
        if step.scheduled().len() > max_seqs || step.queue.running_depth > max_seqs {
            violations.push(format!("step {}: more than {max_seqs} sequences", step.id));
        }
        if b.prefill_tokens + b.decode_tokens != b.scheduled_tokens
            || b.num_prefill_reqs + b.num_decode_reqs != step.scheduled().len()
            || b.num_preempted != step.preempted_request_ids().len()
        {
            violations.push(format!("step {}: inconsistent summary {b:?}", step.id));
        }
        if step.ts_end_ns < step.ts_start_ns || step.kv.blocks_free > step.kv.blocks_total {
            violations.push(format!("step {}: bad timestamps or kv numbers", step.id));
        }
        let running = step.running_requests();
        if running.len() != step.queue.running_depth
            || step.waiting_requests().len() != step.queue.waiting_depth
        {
            violations.push(format!(
                "step {}: queue depths disagree with the iterators",
                step.id
            ));
        }
        let mut snapshot = Vec::new();
        let mut scheduled_sum = 0;
        for r in running {
            scheduled_sum += r.scheduled_tokens_this_step();
            let (allocated, cached) = r.kv_blocks();
            if allocated * block_size < r.num_computed_tokens() + r.scheduled_tokens_this_step()
                || cached > allocated
            {
                violations.push(format!(
                    "step {}: request {} has too few blocks",
                    step.id,
                    r.id()
                ));
            }
            if (r.phase() == RequestPhase::Prefill) != (r.num_output_tokens() == 0) {
                violations.push(format!(
                    "step {}: request {} has the wrong phase",
                    step.id,
                    r.id()
                ));
            }
            snapshot.push((
                r.id(),
                r.phase(),
                r.num_computed_tokens(),
                r.scheduled_tokens_this_step(),
                (allocated, cached),
                r.num_cached_tokens(),
            ));
        }
        if scheduled_sum != b.scheduled_tokens {
            violations.push(format!(
                "step {}: per-request tokens {scheduled_sum} != {}",
                step.id, b.scheduled_tokens
            ));
        }
        let per_view: Vec<(u64, usize)> = step
            .running_requests()
            .filter(|r| r.scheduled_tokens_this_step() > 0)
            .map(|r| (r.id(), r.scheduled_tokens_this_step()))
            .collect();
        let per_output: Vec<(u64, usize)> = step
            .scheduled()
            .iter()
            .map(|s| (s.request_id, s.num_tokens))
            .collect();
        if per_view != per_output {
            violations.push(format!(
                "step {}: request views {per_view:?} disagree with the scheduler output {per_output:?}",
                step.id
            ));
        }
        log.max_scheduled_tokens = log.max_scheduled_tokens.max(b.scheduled_tokens);
        log.max_scheduled_reqs = log.max_scheduled_reqs.max(step.scheduled().len());
        log.snapshots.push(snapshot);
        log.step_ids.push(step.id);
        log.violations.extend(violations);
    }
}

struct Harness {
    core: EngineCore,
    /// The runner's counters, when it is a plain `DeterministicRunner`.
    counters: Option<Arc<RunnerCounters>>,
    log: Arc<Mutex<StepLog>>,
    /// Tokens and final output of every request.
    streams: HashMap<RequestId, (Vec<u32>, Option<RequestOutput>)>,
    /// `prompt_logprobs` of every request that got some (from exactly one output).
    prompt_logprobs: HashMap<RequestId, Vec<TokenLogprobs>>,
}

impl Harness {
    fn new(config: EngineConfig) -> Self {
        let runner = DeterministicRunner::new(
            config.num_kv_blocks,
            config.block_size,
            VOCAB,
            RUNNER_MAX_MODEL_LEN,
        )
        .with_seed(RUNNER_SEED);
        let counters = runner.counters();
        let mut h = Self::with_runner(config, Box::new(runner));
        h.counters = Some(counters);
        h
    }

    fn with_runner(config: EngineConfig, runner: Box<dyn ModelRunner>) -> Self {
        let log = Arc::new(Mutex::new(StepLog::default()));
        let observer = checking_observer(&config, Arc::clone(&log));
        let core = EngineCore::new(config, runner, Box::new(observer)).unwrap();
        Self {
            core,
            counters: None,
            log,
            streams: HashMap::new(),
            prompt_logprobs: HashMap::new(),
        }
    }

    fn add(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        self.core.add_request(id, prompt, params)?;
        self.streams.insert(id, (Vec::new(), None));
        Ok(())
    }

    fn collect(&mut self, outputs: Vec<RequestOutput>) {
        for output in outputs {
            let stream = self
                .streams
                .get_mut(&output.request_id)
                .expect("output for an unknown request");
            assert!(
                stream.1.is_none(),
                "output after the final one for request {}",
                output.request_id
            );
            stream.0.extend(&output.new_token_ids);
            if !output.prompt_logprobs.is_empty() {
                let earlier = self
                    .prompt_logprobs
                    .insert(output.request_id, output.prompt_logprobs.clone());
                assert!(earlier.is_none(), "prompt_logprobs sent twice");
            }
            if output.is_finished() {
                stream.1 = Some(output);
            }
        }
    }

    fn step(&mut self) -> StepOutput {
        let before = self.core.scheduler().scheduler_step();
        let mut out = self.core.step();
        assert_eq!(
            out.step_id,
            before + 1,
            "scheduler_step increments by exactly 1"
        );
        assert!(
            out.model_error.is_none(),
            "model error: {:?}",
            out.model_error
        );
        self.core.check_invariants().unwrap();
        self.collect(std::mem::take(&mut out.outputs));
        out
    }

    fn run_to_completion(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if !self.core.has_unfinished_requests() {
                return;
            }
            self.step();
        }
        panic!("requests still unfinished after {max_steps} steps (livelock?)");
    }

    fn tokens(&self, id: RequestId) -> &[u32] {
        &self.streams[&id].0
    }

    fn final_output(&self, id: RequestId) -> &RequestOutput {
        self.streams[&id].1.as_ref().expect("request finished")
    }

    fn expected(&self, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
        reference_greedy_output(
            RUNNER_SEED,
            VOCAB,
            prompt,
            params,
            self.core.limits().max_request_len(),
        )
    }

    fn assert_all_blocks_free(&self) {
        let kv = self.core.scheduler().kv_cache();
        assert_eq!(kv.num_free_blocks(), kv.num_total_blocks(), "blocks leaked");
        assert_eq!(kv.num_requests_with_blocks(), 0);
        self.core.check_invariants().unwrap();
    }

    fn assert_no_violations(&self) {
        let log = self.log.lock().unwrap();
        assert!(log.violations.is_empty(), "{:#?}", log.violations);
    }
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((seed * 7919 + i * 104_729 + 3) % VOCAB as u64) as u32)
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

/// One generated request: when it arrives and what it asks.
#[derive(Debug, Clone)]
struct RequestSpec {
    arrival_step: usize,
    prefix_family: u64,
    prefix_len: usize,
    suffix_len: usize,
    max_tokens: usize,
    ignore_eos: bool,
    prompt_logprobs: bool,
}

impl RequestSpec {
    fn prompt(&self, index: usize) -> Vec<u32> {
        let mut tokens = prompt(1000 + self.prefix_family, self.prefix_len);
        tokens.extend(prompt(index as u64, self.suffix_len));
        tokens
    }

    fn params(&self) -> SamplingParams {
        SamplingParams {
            ignore_eos: self.ignore_eos,
            eos_token_ids: vec![0],
            prompt_logprobs: self.prompt_logprobs.then_some(1),
            ..SamplingParams::greedy(self.max_tokens)
        }
    }
}

prop_compose! {
    fn request_spec()(
        arrival_step in 0usize..25,
        prefix_family in 0u64..3,
        prefix_len in 0usize..24,
        suffix_len in 1usize..20,
        max_tokens in 1usize..24,
        ignore_eos in any::<bool>(),
        prompt_logprobs in prop::bool::weighted(0.2),
    ) -> RequestSpec {
        RequestSpec {
            arrival_step,
            prefix_family,
            prefix_len,
            suffix_len,
            max_tokens,
            ignore_eos,
            prompt_logprobs,
        }
    }
}

fn engine_config() -> impl Strategy<Value = EngineConfig> {
    (
        prop::sample::select(vec![1usize, 2, 4, 8]),
        12usize..100,
        1usize..8,
        1usize..48,
        any::<bool>(),
        1usize..12,
    )
        .prop_map(
            |(
                block_size,
                capacity_tokens,
                max_num_seqs,
                max_num_batched_tokens,
                enable_prefix_caching,
                max_prompt_logprobs_tokens,
            )| {
                EngineConfig {
                    block_size,
                    num_kv_blocks: capacity_tokens.div_ceil(block_size),
                    max_num_seqs,
                    max_num_batched_tokens,
                    max_prompt_logprobs_tokens,
                    enable_prefix_caching,
                    seed: 5,
                    ..EngineConfig::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random arrivals and lengths under a small block budget, some requests with
    /// `prompt_logprobs`: every request finishes with exactly the reference tokens (preempted ones
    /// included), no step breaks the token budget, the prompt logits budget or max-seqs, ref counts match holders after every step, and no block leaks.
    #[test]
    fn random_workloads_finish_correctly_without_leaks(
        config in engine_config(),
        specs in prop::collection::vec(request_spec(), 1..12),
    ) {
        let mut h = Harness::new(config.clone());
        let last_arrival = specs.iter().map(|s| s.arrival_step).max().unwrap_or(0);
        let mut accepted = Vec::new();
        let mut step = 0;
        loop {
            for (index, spec) in specs.iter().enumerate().filter(|(_, s)| s.arrival_step == step) {
                let prompt = spec.prompt(index);
                let params = spec.params();
                match h.add(index as RequestId, prompt.clone(), params.clone()) {
                    Ok(()) => accepted.push((index as RequestId, prompt, params)),
                    Err(EngineError::PromptExceedsKvCapacity { .. }) => {
                        prop_assert!(prompt.len() > config.num_kv_blocks * config.block_size);
                    }
                    Err(other) => prop_assert!(false, "unexpected refusal: {other}"),
                }
            }
            if step > last_arrival && !h.core.has_unfinished_requests() {
                break;
            }
            prop_assert!(step < 20_000, "livelock: requests unfinished after {step} steps");
            h.step();
            step += 1;
        }
        h.assert_no_violations();
        h.assert_all_blocks_free();
        let mut preemptions = 0;
        for (id, prompt, params) in &accepted {
            let output = h.final_output(*id);
            prop_assert!(matches!(output.finish_reason, Some(FinishReason::Stop | FinishReason::Length)));
            let expected = h.expected(prompt, params);
            prop_assert_eq!(h.tokens(*id), expected.as_slice(), "request {}", id);
            prop_assert_eq!(output.num_output_tokens, h.tokens(*id).len());
            preemptions += u64::from(output.num_preemptions);
        }
        let stats = h.core.stats();
        prop_assert_eq!(stats.num_preemptions_total, preemptions);
        prop_assert_eq!(stats.num_requests_finished_total, accepted.len() as u64);
        prop_assert_eq!(stats.num_running + stats.num_waiting, 0);
        let log = h.log.lock().unwrap();
        prop_assert!(log.max_scheduled_tokens <= config.max_num_batched_tokens);
        prop_assert!(log.max_scheduled_reqs <= config.max_num_seqs);
    }
}

#[test]
fn cache_salts_separate_prefix_caches() {
    let config = EngineConfig {
        block_size: 4,
        num_kv_blocks: 64,
        ..EngineConfig::default()
    };
    let mut h = Harness::new(config);
    let prompt_ids = prompt(3, 13); // 3 full blocks.
    let salted = |salt: Option<&str>| SamplingParams {
        cache_salt: salt.map(str::to_string),
        ..greedy(2)
    };
    let runs = [
        (1, Some("tenant-a"), 0),
        (2, Some("tenant-b"), 0), // another salt: no hit
        (3, None, 0),             // unsalted: no hit either
        (4, Some("tenant-a"), 12),
        (5, None, 12),
    ];
    for (id, salt, cached) in runs {
        h.add(id, prompt_ids.clone(), salted(salt)).unwrap();
        h.run_to_completion(100);
        assert_eq!(h.final_output(id).num_cached_tokens, cached, "request {id}");
        // The salt changes what is cached, never what is computed.
        assert_eq!(h.tokens(id), h.expected(&prompt_ids, &greedy(2)).as_slice());
    }
    let empty = SamplingParams {
        cache_salt: Some(String::new()),
        ..greedy(2)
    };
    assert!(h.add(6, prompt_ids, empty).is_err());
}

#[test]
fn shared_prefix_of_k_full_blocks_is_served_from_the_cache() {
    let config = EngineConfig {
        block_size: 4,
        num_kv_blocks: 64,
        ..EngineConfig::default()
    };
    let mut h = Harness::new(config);
    let shared = prompt(1, 12); // k = 3 full blocks.
    let first: Vec<u32> = shared.iter().copied().chain([5, 6]).collect();
    let second: Vec<u32> = shared.iter().copied().chain([7, 8, 9]).collect();
    h.add(1, first.clone(), greedy(3)).unwrap();
    h.run_to_completion(100);
    assert_eq!(h.final_output(1).num_cached_tokens, 0);

    let steps_before = h.log.lock().unwrap().snapshots.len();
    h.add(2, second.clone(), greedy(3)).unwrap();
    h.run_to_completion(100);
    let output = h.final_output(2);
    assert_eq!(output.num_cached_tokens, 3 * 4);
    assert_eq!(h.tokens(2), h.expected(&second, &greedy(3)).as_slice());
    assert_eq!(h.tokens(1), h.expected(&first, &greedy(3)).as_slice());

    // At its admission step the tracer sees 12 computed tokens, 3 scheduled, and 3 of its 4
    // blocks cached; effective_prompt_len is 15 - 12.
    let log = h.log.lock().unwrap();
    let admission = &log.snapshots[steps_before];
    assert_eq!(
        admission,
        &vec![(2, RequestPhase::Prefill, 12, 3, (4, 3), 12)]
    );
    drop(log);
    let stats = h.core.stats();
    assert_eq!(
        stats.prefix_cache_queries,
        (first.len() + second.len()) as u64
    );
    assert_eq!(stats.prefix_cache_hits, 12);
    h.assert_all_blocks_free();
    h.assert_no_violations();
    // The runner computed 14 + 2 tokens for the first request, only 3 + 2 for the second.
    assert_eq!(stats.computed_tokens_total, (14 + 2) + (3 + 2));
    let counters = h.counters.as_ref().unwrap();
    assert_eq!(
        counters.tokens_computed.load(Ordering::Relaxed),
        stats.computed_tokens_total
    );
}

#[test]
fn identical_prompt_of_whole_blocks_still_computes_its_last_token() {
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks: 64,
        ..EngineConfig::default()
    });
    let p = prompt(2, 8);
    h.add(1, p.clone(), greedy(2)).unwrap();
    h.run_to_completion(100);
    h.add(2, p.clone(), greedy(2)).unwrap();
    h.run_to_completion(100);
    // Only the first block may come from the cache: the last token must be computed.
    assert_eq!(h.final_output(2).num_cached_tokens, 4);
    assert_eq!(h.tokens(2), h.tokens(1));
    assert_eq!(h.tokens(2), h.expected(&p, &greedy(2)).as_slice());
}

#[test]
fn same_prefix_in_the_same_step_is_computed_twice_then_cached_once() {
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks: 64,
        ..EngineConfig::default()
    });
    let p = prompt(3, 13);
    h.add(1, p.clone(), greedy(4)).unwrap();
    h.add(2, p.clone(), greedy(4)).unwrap();
    h.run_to_completion(100);
    h.add(3, p.clone(), greedy(4)).unwrap();
    h.run_to_completion(100);
    assert_eq!(h.final_output(1).num_cached_tokens, 0);
    assert_eq!(
        h.final_output(2).num_cached_tokens,
        0,
        "blocks are cached only after their forward pass"
    );
    assert_eq!(h.final_output(3).num_cached_tokens, 12);
    for id in 1..=3 {
        assert_eq!(h.tokens(id), h.expected(&p, &greedy(4)).as_slice());
    }
    h.assert_all_blocks_free();
}

#[test]
fn evicted_blocks_are_reused_least_recently_used_first() {
    // 8 blocks of 4 tokens.
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks: 8,
        ..EngineConfig::default()
    });
    let a = prompt(10, 9); // 2 full blocks cached, 1 partial.
    let b = prompt(20, 9);
    let c = prompt(30, 21); // 6 blocks.
    h.add(1, a.clone(), greedy(1)).unwrap();
    h.run_to_completion(100);
    h.add(2, b.clone(), greedy(1)).unwrap();
    h.run_to_completion(100);
    let pool = h.core.scheduler().kv_cache().pool();
    assert_eq!(pool.num_cached_hashes(), 4);
    assert_eq!(pool.num_evictions(), 0);
    // C needs 6 blocks. The 4 free blocks without cached content go first, then the least
    // recently used cached ones: exactly a's two blocks are evicted, b's stay cached.
    h.add(3, c.clone(), greedy(1)).unwrap();
    h.step();
    assert_eq!(h.core.scheduler().kv_cache().pool().num_evictions(), 2);
    h.run_to_completion(100);
    // b is still cached, a is not.
    h.add(4, b.clone(), greedy(1)).unwrap();
    h.add(5, a.clone(), greedy(1)).unwrap();
    h.run_to_completion(100);
    assert_eq!(h.final_output(4).num_cached_tokens, 8);
    assert_eq!(h.final_output(5).num_cached_tokens, 0);
    assert_eq!(h.tokens(4), h.tokens(2));
    assert_eq!(h.tokens(5), h.tokens(1));
    assert_eq!(h.tokens(3), h.expected(&c, &greedy(1)).as_slice());
    h.assert_all_blocks_free();
}

#[test]
fn prefix_caching_can_be_disabled() {
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks: 64,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    });
    let p = prompt(4, 14);
    h.add(1, p.clone(), greedy(2)).unwrap();
    h.run_to_completion(100);
    h.add(2, p.clone(), greedy(2)).unwrap();
    h.run_to_completion(100);
    assert_eq!(h.final_output(2).num_cached_tokens, 0);
    assert_eq!(h.core.stats().prefix_cache_queries, 0);
    assert_eq!(h.tokens(2), h.tokens(1));
}

/// Runs the same workload under a pool of `num_kv_blocks`; returns tokens per request and stats.
fn run_workload(
    num_kv_blocks: usize,
    params: impl Fn(RequestId) -> SamplingParams,
) -> (HashMap<RequestId, Vec<u32>>, u64, Harness) {
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: 32,
        seed: 99,
        ..EngineConfig::default()
    });
    for id in 0..8u64 {
        let len = 10 + (id as usize * 7) % 21;
        h.add(id, prompt(id, len), params(id)).unwrap();
    }
    h.run_to_completion(10_000);
    h.assert_no_violations();
    h.assert_all_blocks_free();
    let tokens = (0..8).map(|id| (id, h.tokens(id).to_vec())).collect();
    let preemptions = h.core.stats().num_preemptions_total;
    (tokens, preemptions, h)
}

#[test]
fn greedy_output_is_identical_with_and_without_preemption() {
    let params = |id: RequestId| greedy(25 + id as usize * 3);
    let (large, large_preemptions, _) = run_workload(512, params);
    let (tiny, tiny_preemptions, h) = run_workload(20, params);
    assert_eq!(large_preemptions, 0);
    assert!(tiny_preemptions > 0, "the tiny pool must force preemption");
    assert_eq!(large, tiny);
    for id in 0..8u64 {
        let len = 10 + (id as usize * 7) % 21;
        assert_eq!(
            tiny[&id],
            h.expected(&prompt(id, len), &params(id)),
            "request {id}"
        );
    }
    // Some request was preempted and still finished by length.
    let preempted: Vec<_> = (0..8)
        .filter(|id| h.final_output(*id).num_preemptions > 0)
        .collect();
    assert!(!preempted.is_empty());
    for id in preempted {
        assert_eq!(h.final_output(id).finish_reason, Some(FinishReason::Length));
    }
}

#[test]
fn seeded_sampling_is_identical_with_and_without_preemption() {
    let params = |id: RequestId| SamplingParams {
        temperature: 0.9,
        top_k: Some(20),
        top_p: 0.95,
        seed: id.is_multiple_of(2).then_some(id * 1000),
        ..greedy(30)
    };
    let (large, _, _) = run_workload(512, params);
    let (tiny, tiny_preemptions, _) = run_workload(20, params);
    assert!(tiny_preemptions > 0);
    assert_eq!(large, tiny);
    // Sampling is not greedy here: at least one request differs from the greedy reference.
    let h = Harness::new(EngineConfig::default());
    assert!(
        (0..8u64)
            .any(|id| large[&id]
                != h.expected(&prompt(id, 10 + (id as usize * 7) % 21), &greedy(30)))
    );
}

#[test]
fn length_is_capped_by_max_model_len_and_by_the_pool() {
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks: 4,
        max_model_len: Some(12),
        ..EngineConfig::default()
    });
    // A prompt of exactly max_model_len yields one token.
    h.add(1, prompt(1, 12), greedy(50)).unwrap();
    assert!(matches!(
        h.add(2, prompt(2, 13), greedy(50)),
        Err(EngineError::PromptTooLong {
            prompt_len: 13,
            max_model_len: 12
        })
    ));
    h.run_to_completion(100);
    assert_eq!(h.tokens(1).len(), 1);
    assert_eq!(h.final_output(1).finish_reason, Some(FinishReason::Length));

    // The pool (16 tokens) is below max_model_len (256): a long generation stops at 16 tokens
    // instead of preempting itself forever; a longer prompt is refused.
    let mut h = Harness::new(EngineConfig {
        block_size: 4,
        num_kv_blocks: 4,
        ..EngineConfig::default()
    });
    h.add(1, prompt(1, 10), greedy(100)).unwrap();
    h.add(2, prompt(2, 16), greedy(100)).unwrap();
    assert!(matches!(
        h.add(3, prompt(3, 17), greedy(100)),
        Err(EngineError::PromptExceedsKvCapacity {
            prompt_len: 17,
            kv_capacity_tokens: 16
        })
    ));
    h.run_to_completion(1000);
    assert_eq!(h.tokens(1).len(), 6);
    assert_eq!(h.tokens(2).len(), 1);
    assert_eq!(
        h.tokens(1),
        h.expected(&prompt(1, 10), &greedy(100)).as_slice()
    );
    h.assert_all_blocks_free();
}

#[test]
fn stop_and_eos_tokens_end_requests() {
    let mut h = Harness::new(EngineConfig::default());
    let p = prompt(5, 6);
    let free_run = h.expected(&p, &greedy(10));
    let eos = SamplingParams {
        eos_token_ids: vec![free_run[2]],
        ignore_eos: false,
        ..greedy(10)
    };
    let stop = SamplingParams {
        stop_token_ids: vec![free_run[3]],
        ..greedy(10)
    };
    let ignored = SamplingParams {
        eos_token_ids: vec![free_run[2]],
        ..greedy(10)
    };
    h.add(1, p.clone(), eos).unwrap();
    h.add(2, p.clone(), stop).unwrap();
    h.add(3, p.clone(), ignored).unwrap();
    h.run_to_completion(100);
    let first_at = |t: u32| free_run.iter().position(|&x| x == t).unwrap() + 1;
    assert_eq!(h.tokens(1), &free_run[..first_at(free_run[2])]);
    assert_eq!(h.final_output(1).finish_reason, Some(FinishReason::Stop));
    assert_eq!(h.tokens(2), &free_run[..first_at(free_run[3])]);
    assert_eq!(h.final_output(2).finish_reason, Some(FinishReason::Stop));
    assert_eq!(h.tokens(3), free_run.as_slice());
    assert_eq!(h.final_output(3).finish_reason, Some(FinishReason::Length));
}

#[test]
fn invalid_requests_are_refused_by_the_core() {
    let mut h = Harness::new(EngineConfig {
        max_waiting_requests: 2,
        ..EngineConfig::default()
    });
    assert_eq!(
        h.core.add_request(1, vec![], greedy(1)),
        Err(EngineError::EmptyPrompt)
    );
    assert!(matches!(
        h.core.add_request(1, vec![VOCAB as u32], greedy(1)),
        Err(EngineError::InvalidTokenId { .. })
    ));
    assert!(matches!(
        h.core.add_request(
            1,
            vec![1],
            SamplingParams {
                top_p: 2.0,
                ..greedy(1)
            }
        ),
        Err(EngineError::InvalidSamplingParams { name: "top_p", .. })
    ));
    h.add(1, vec![1], greedy(1)).unwrap();
    assert_eq!(
        h.core.add_request(1, vec![1], greedy(1)),
        Err(EngineError::DuplicateRequestId(1))
    );
    h.add(2, vec![1], greedy(1)).unwrap();
    assert!(matches!(
        h.core.add_request(3, vec![1], greedy(1)),
        Err(EngineError::QueueFull { .. })
    ));
}

/// Fails every forward pass from the `fail_from`-th on.
struct FailingRunner {
    inner: DeterministicRunner,
    calls: usize,
    fail_from: usize,
}

impl ModelRunner for FailingRunner {
    fn limits(&self) -> BatchLimits {
        self.inner.limits()
    }

    fn forward(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError> {
        self.calls += 1;
        if self.calls >= self.fail_from {
            return Err(ModelRunnerError::Backend("injected failure".into()));
        }
        self.inner.forward(batch)
    }
}

#[test]
fn a_failing_forward_pass_finishes_its_requests_with_error_and_frees_blocks() {
    let config = EngineConfig {
        block_size: 4,
        num_kv_blocks: 32,
        ..EngineConfig::default()
    };
    let runner = FailingRunner {
        inner: DeterministicRunner::new(32, 4, VOCAB, RUNNER_MAX_MODEL_LEN),
        calls: 0,
        fail_from: 3,
    };
    let mut h = Harness::with_runner(config, Box::new(runner));
    h.add(1, prompt(1, 9), greedy(10)).unwrap();
    h.add(2, prompt(2, 5), greedy(10)).unwrap();
    h.step();
    h.step();
    let mut out = h.core.step();
    assert!(out.model_error.is_some());
    h.collect(std::mem::take(&mut out.outputs));
    assert_eq!(h.final_output(1).finish_reason, Some(FinishReason::Error));
    assert_eq!(h.final_output(2).finish_reason, Some(FinishReason::Error));
    assert_eq!(h.tokens(1).len(), 2);
    assert_eq!(h.core.stats().model_errors_total, 1);
    h.assert_all_blocks_free();
}

#[test]
fn a_panicking_observer_is_disabled_and_the_engine_keeps_going() {
    let mut calls = 0;
    let observer = move |_: &StepView<'_>| {
        calls += 1;
        assert!(calls < 2, "observer bug");
    };
    let config = EngineConfig::default();
    let runner = DeterministicRunner::new(
        config.num_kv_blocks,
        config.block_size,
        VOCAB,
        RUNNER_MAX_MODEL_LEN,
    )
    .with_seed(RUNNER_SEED);
    let mut core = EngineCore::new(config, Box::new(runner), Box::new(observer)).unwrap();
    core.add_request(1, prompt(1, 5), greedy(4)).unwrap();
    let mut tokens = Vec::new();
    while core.has_unfinished_requests() {
        for output in core.step().outputs {
            tokens.extend(output.new_token_ids);
        }
    }
    let h = Harness::new(EngineConfig::default());
    assert_eq!(tokens, h.expected(&prompt(1, 5), &greedy(4)));
}

#[test]
fn config_is_checked_against_the_runner() {
    let runner = DeterministicRunner::new(8, 4, VOCAB, 64);
    let config = EngineConfig {
        max_model_len: Some(65),
        ..EngineConfig::default()
    };
    let err = EngineCore::without_observer(config, Box::new(runner)).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidConfig {
                field: "max_model_len",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn prompt_logprobs_cover_every_prompt_token_once_chunked_preempted_and_uncached() {
    // Chunks of at most 8 tokens, and a pool of 20 blocks of 4 for 8 requests: prompts are
    // computed in pieces and some requests are preempted and recomputed.
    let with_prompt_logprobs = |id: RequestId| SamplingParams {
        prompt_logprobs: id.is_multiple_of(2).then_some(3),
        ..greedy(20 + id as usize)
    };
    let (tokens, preemptions, h) = run_workload(20, with_prompt_logprobs);
    assert!(preemptions > 0, "the pool must force preemption");
    for id in 0..8u64 {
        let len = 10 + (id as usize * 7) % 21;
        let prompt_ids = prompt(id, len);
        assert_eq!(
            tokens[&id],
            h.expected(&prompt_ids, &with_prompt_logprobs(id))
        );
        if id % 2 == 1 {
            assert!(!h.prompt_logprobs.contains_key(&id), "request {id}");
            continue;
        }
        // One entry per prompt token after the first: its log-probability given the tokens
        // before it, with the 3 most likely, exactly as the runner's logits give them.
        let got = &h.prompt_logprobs[&id];
        assert_eq!(got.len(), len - 1, "request {id}");
        for (i, entry) in got.iter().enumerate() {
            let position = i + 1;
            let logits = reference_logits(RUNNER_SEED, VOCAB, &prompt_ids[..position]);
            assert_eq!(
                *entry,
                token_logprobs(&logits, prompt_ids[position], 3),
                "request {id} position {position}"
            );
        }
    }
}

#[test]
fn prompt_logprobs_bypass_the_prefix_cache_reads() {
    let config = EngineConfig {
        block_size: 4,
        num_kv_blocks: 64,
        ..EngineConfig::default()
    };
    let mut h = Harness::new(config);
    let prompt_ids = prompt(5, 13);
    h.add(1, prompt_ids.clone(), greedy(2)).unwrap();
    h.run_to_completion(100);
    let queries = h.core.stats().prefix_cache_queries;
    let asking = SamplingParams {
        prompt_logprobs: Some(0),
        ..greedy(2)
    };
    h.add(2, prompt_ids.clone(), asking).unwrap();
    h.run_to_completion(100);
    assert_eq!(h.final_output(2).num_cached_tokens, 0);
    assert_eq!(h.prompt_logprobs[&2].len(), 12);
    assert_eq!(
        h.core.stats().prefix_cache_queries,
        queries,
        "not a cache query"
    );
    // Its blocks are still cached for others.
    h.add(3, prompt_ids.clone(), greedy(2)).unwrap();
    h.run_to_completion(100);
    assert_eq!(h.final_output(3).num_cached_tokens, 12);
    assert_eq!(h.tokens(2), h.tokens(3));
    let too_many = SamplingParams {
        prompt_logprobs: Some(21),
        ..greedy(2)
    };
    assert!(h.add(4, prompt_ids, too_many).is_err());
}
