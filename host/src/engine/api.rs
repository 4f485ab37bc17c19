//! The engine's thread API: [`Engine::start`] runs an [`EngineCore`] on its own thread
//! (`stepscope-engine`) and returns a cheap-to-clone [`EngineHandle`].
//!
//! `add_request` validates synchronously (prompt, parameters, the waiting-queue bound; or in two
//! halves, `validate` then `submit`, the only check a request gets) and returns
//! the request id with a tokio unbounded receiver of [`RequestOutput`]s: one per generated token,
//! the last one carrying the finish reason. The engine thread blocks on its command channel while
//! it has nothing to do and otherwise steps continuously, taking new commands between steps.
//! Aborting a request, or dropping its receiver (noticed between steps, or when a send fails),
//! frees its blocks. `abort_all` aborts every request the engine holds (a drain deadline).
//! `shutdown` refuses new requests, lets in-flight ones finish, and joins the thread; dropping
//! every handle does the same without joining. `liveness` reads the thread's [`Heartbeat`]: a
//! step loop that stopped completing steps while work is pending is `Stalled`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::config::{EngineConfig, EngineError, RequestLimits};
use super::core::{EngineCore, EngineStats};
use super::hashing::IdHashMap;
use super::heartbeat::{Heartbeat, Liveness};
use super::journey::JourneyTicket;
use super::model_runner::ModelRunner;
use super::observer::StepObserver;
use super::request::{FinishReason, RequestId, RequestOutput};
use super::sampling_params::SamplingParams;

/// Name of the engine thread.
pub const ENGINE_THREAD_NAME: &str = "stepscope-engine";

/// Starts engines.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Validates `config` against `runner`, then runs the engine on its own thread.
    pub fn start(
        config: EngineConfig,
        runner: Box<dyn ModelRunner>,
        observer: Box<dyn StepObserver>,
    ) -> Result<EngineHandle, EngineError> {
        let vocab_size = runner.vocab_size();
        let core = EngineCore::new(config, runner, observer)?;
        let limits = *core.limits();
        let shared = Arc::new(SharedState {
            stats: Mutex::new(core.stats()),
            pending_fresh: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            heartbeat: Heartbeat::new(),
        });
        let (commands, command_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(ENGINE_THREAD_NAME.into())
            .spawn(move || EngineLoop::new(core, command_rx, thread_shared).run())
            .map_err(|e| EngineError::Spawn(e.to_string()))?;
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                commands,
                shared,
                limits,
                vocab_size,
                next_request_id: AtomicU64::new(1),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }
}

/// A handle on a running engine. Clones share the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

/// A prompt and sampling parameters that passed [`EngineHandle::validate`], ready for
/// [`EngineHandle::submit`]. Only what the checks do not look at can change afterwards: the seed
/// and the default EOS ids.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    prompt_token_ids: Vec<u32>,
    params: SamplingParams,
    /// The id the client knows the request by; `None`: the engine's decimal id.
    external_id: Option<Arc<str>>,
    /// The client request's journey ticket, when journey tracing is on.
    journey: Option<Arc<JourneyTicket>>,
}

impl PartialEq for ValidRequest {
    fn eq(&self, other: &Self) -> bool {
        let same_journey = match (&self.journey, &other.journey) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.prompt_token_ids == other.prompt_token_ids
            && self.params == other.params
            && self.external_id == other.external_id
            && same_journey
    }
}

impl ValidRequest {
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_token_ids
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The same request known to the client (and on step snapshots, `request.id`) as `id`.
    pub fn with_external_id(mut self, id: Arc<str>) -> Self {
        self.external_id = Some(id);
        self
    }

    /// The same request, part of the client request whose journey `ticket` decides.
    pub fn with_journey(mut self, ticket: Arc<JourneyTicket>) -> Self {
        self.journey = Some(ticket);
        self
    }

    /// The same request with a fixed seed offset by `offset` (so that the choices of one prompt
    /// differ; offset 0 keeps it).
    pub fn with_seed_offset(&self, offset: u64) -> Self {
        let mut request = self.clone();
        request.params.seed = request.params.seed.map(|seed| seed.wrapping_add(offset));
        request
    }

    /// Fills in the model's EOS ids when the parameters name none.
    pub fn with_default_eos(mut self, eos_token_ids: &[u32]) -> Self {
        if self.params.eos_token_ids.is_empty() {
            self.params.eos_token_ids = eos_token_ids.to_vec();
        }
        self
    }
}

#[derive(Debug)]
struct HandleInner {
    commands: Sender<Command>,
    shared: Arc<SharedState>,
    limits: RequestLimits,
    vocab_size: usize,
    next_request_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// State the engine thread publishes for handles.
#[derive(Debug)]
struct SharedState {
    stats: Mutex<EngineStats>,
    /// Requests accepted by `add_request` and not yet admitted or finished (in the channel, or
    /// fresh in the waiting queue). The waiting-queue bound applies to this.
    pending_fresh: AtomicUsize,
    shutting_down: AtomicBool,
    heartbeat: Heartbeat,
}

enum Command {
    Add {
        request_id: RequestId,
        external_id: Option<Arc<str>>,
        prompt_token_ids: Vec<u32>,
        /// Boxed: the command channel moves the small variants too.
        params: Box<SamplingParams>,
        journey: Option<Arc<JourneyTicket>>,
        outputs: UnboundedSender<RequestOutput>,
    },
    Abort(RequestId),
    AbortAll,
    Shutdown,
}

impl EngineHandle {
    /// Queues a request. Errors: shutting down, invalid prompt or parameters, waiting queue full.
    pub fn add_request(
        &self,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(RequestId, UnboundedReceiver<RequestOutput>), EngineError> {
        if self.inner.shared.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        self.submit(self.validate(prompt_token_ids, params)?)
    }

    /// Checks a prompt and its sampling parameters against the engine's limits (not the queue
    /// bound, which [`submit`](Self::submit) checks). This is the one place a request is
    /// validated: the engine thread takes a [`ValidRequest`] as it is.
    pub fn validate(
        &self,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<ValidRequest, EngineError> {
        self.inner
            .limits
            .validate_request(&prompt_token_ids, &params)?;
        Ok(ValidRequest {
            prompt_token_ids,
            params,
            external_id: None,
            journey: None,
        })
    }

    /// Queues a validated request. Errors: shutting down, waiting queue full.
    pub fn submit(
        &self,
        request: ValidRequest,
    ) -> Result<(RequestId, UnboundedReceiver<RequestOutput>), EngineError> {
        let ValidRequest {
            prompt_token_ids,
            params,
            external_id,
            journey,
        } = request;
        let inner = &*self.inner;
        if inner.shared.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        let max_waiting_requests = inner.limits.max_waiting_requests;
        let reserved =
            inner
                .shared
                .pending_fresh
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max_waiting_requests).then_some(n + 1)
                });
        if reserved.is_err() {
            return Err(EngineError::QueueFull {
                max_waiting_requests,
            });
        }
        let request_id = inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (outputs, receiver) = unbounded_channel();
        let command = Command::Add {
            request_id,
            external_id,
            prompt_token_ids,
            params: Box::new(params),
            journey,
            outputs,
        };
        if inner.commands.send(command).is_err() {
            inner.shared.pending_fresh.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::EngineStopped);
        }
        Ok((request_id, receiver))
    }

    /// Aborts a request (a no-op for unknown or finished ids). Its receiver gets a last output
    /// with `finish_reason == Some(Abort)` if it is still open.
    pub fn abort(&self, request_id: RequestId) {
        // If the engine thread is gone there is nothing left to abort.
        let _ = self.inner.commands.send(Command::Abort(request_id));
    }

    /// Aborts every request the engine holds, running or waiting (those already sent and not
    /// yet taken in too): each open receiver gets a last output with `finish_reason ==
    /// Some(Abort)`, and every block returns to the pool. From then on new requests are refused
    /// (`ShuttingDown`), and one that raced past that check is aborted as it arrives. For a
    /// drain that ran out of time: what is left is `shutdown`.
    pub fn abort_all(&self) {
        self.inner
            .shared
            .shutting_down
            .store(true, Ordering::Release);
        let _ = self.inner.commands.send(Command::AbortAll);
    }

    /// The engine's numbers as of its last step.
    pub fn stats(&self) -> EngineStats {
        *self
            .inner
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What requests are checked against (resolved `max_model_len`, KV capacity, vocabulary).
    pub fn limits(&self) -> RequestLimits {
        self.inner.limits
    }

    /// The resolved `max_model_len`.
    pub fn max_model_len(&self) -> usize {
        self.inner.limits.max_model_len
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// Whether the step loop is idle, busy, or stalled: busy with no step completed for longer
    /// than `bound` at `now`.
    pub fn liveness(&self, now: Instant, bound: Duration) -> Liveness {
        self.inner.shared.heartbeat.liveness(now, bound)
    }

    /// Requests accepted and not finished: running, waiting, or not yet taken in by the engine.
    pub fn num_pending(&self) -> usize {
        let stats = self.stats();
        let fresh = self.inner.shared.pending_fresh.load(Ordering::Acquire);
        stats.num_running + stats.num_waiting.max(fresh)
    }

    /// Whether `shutdown` was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shared.shutting_down.load(Ordering::Acquire)
    }

    /// Refuses new requests, lets every in-flight request finish, and joins the engine thread.
    /// Blocks the caller (from async code, call it through `spawn_blocking`). Later calls, from
    /// any clone, return at once.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        self.inner
            .shared
            .shutting_down
            .store(true, Ordering::Release);
        let _ = self.inner.commands.send(Command::Shutdown);
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match thread {
            Some(thread) => thread.join().map_err(|_| EngineError::ThreadPanicked),
            None => Ok(()),
        }
    }
}

/// The engine thread's state.
struct EngineLoop {
    core: EngineCore,
    commands: Receiver<Command>,
    shared: Arc<SharedState>,
    outputs: IdHashMap<RequestId, UnboundedSender<RequestOutput>>,
    draining: bool,
    /// `abort_all` was called: requests arriving later are aborted at once.
    aborting: bool,
    /// `core.scheduler().num_fresh_resolved_total()` already subtracted from `pending_fresh`.
    fresh_resolved_reported: u64,
}

impl EngineLoop {
    fn new(core: EngineCore, commands: Receiver<Command>, shared: Arc<SharedState>) -> Self {
        Self {
            core,
            commands,
            shared,
            outputs: IdHashMap::default(),
            draining: false,
            aborting: false,
            fresh_resolved_reported: 0,
        }
    }

    fn run(mut self) {
        tracing::debug!("engine thread started");
        loop {
            if !self.core.has_unfinished_requests() {
                if self.draining {
                    break;
                }
                // Idle: block until a command arrives (or every handle is gone).
                self.shared.heartbeat.going_idle();
                let command = self.commands.recv();
                self.shared.heartbeat.woke_up();
                match command {
                    Ok(command) => self.handle(command),
                    Err(_) => break,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.draining = true;
                        break;
                    }
                }
            }
            self.abort_abandoned_requests();
            if self.core.has_unfinished_requests() {
                let step = self.core.step();
                self.shared.heartbeat.beat();
                // Publish first, so whoever receives an output sees stats at least that fresh.
                self.publish();
                for output in step.outputs {
                    self.deliver(output);
                }
            }
            self.publish();
        }
        // An `Add` that passed the handle's check just before shutdown began and arrived after
        // the loop stopped: end its stream as aborted rather than leave it without a last output.
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Add {
                request_id,
                outputs,
                ..
            } = command
            {
                self.shared.pending_fresh.fetch_sub(1, Ordering::AcqRel);
                let _ = outputs.send(RequestOutput::never_started(
                    request_id,
                    FinishReason::Abort,
                ));
            }
        }
        self.publish();
        tracing::debug!("engine thread stopped");
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Add {
                request_id,
                external_id,
                prompt_token_ids,
                params,
                journey,
                outputs,
            } => {
                match self.core.queue_validated(
                    (request_id, external_id, journey.as_deref()),
                    prompt_token_ids,
                    *params,
                ) {
                    Ok(()) => {
                        self.outputs.insert(request_id, outputs);
                        if self.aborting
                            && let Some(output) = self.core.abort_request(request_id)
                        {
                            self.deliver(output);
                        }
                    }
                    Err(error) => {
                        // The handle validated the request; only the scheduler's own refusals
                        // (a duplicate id, its queue bound) can land here.
                        tracing::error!(request_id, %error, "engine refused a request the handle accepted");
                        self.shared.pending_fresh.fetch_sub(1, Ordering::AcqRel);
                        let _ = outputs.send(RequestOutput::never_started(
                            request_id,
                            FinishReason::Error,
                        ));
                    }
                }
            }
            Command::Abort(request_id) => {
                if let Some(output) = self.core.abort_request(request_id) {
                    self.deliver(output);
                }
            }
            Command::AbortAll => {
                self.aborting = true;
                // Commands are handled in order, so every request added before this is known.
                let mut request_ids: Vec<RequestId> = self.outputs.keys().copied().collect();
                request_ids.sort_unstable();
                tracing::debug!(requests = request_ids.len(), "aborting every request");
                for request_id in request_ids {
                    match self.core.abort_request(request_id) {
                        Some(output) => self.deliver(output),
                        None => {
                            self.outputs.remove(&request_id);
                        }
                    }
                }
            }
            Command::Shutdown => self.draining = true,
        }
    }

    /// Sends an output to its request's receiver; a closed receiver aborts the request.
    fn deliver(&mut self, output: RequestOutput) {
        let request_id = output.request_id;
        let finished = output.is_finished();
        let Some(sender) = self.outputs.get(&request_id) else {
            return;
        };
        let delivered = sender.send(output).is_ok();
        if finished {
            self.outputs.remove(&request_id);
        } else if !delivered {
            self.outputs.remove(&request_id);
            self.core.abort_request(request_id);
        }
    }

    /// Aborts requests whose receiver was dropped.
    fn abort_abandoned_requests(&mut self) {
        if !self.outputs.values().any(UnboundedSender::is_closed) {
            return;
        }
        let abandoned: Vec<RequestId> = self
            .outputs
            .iter()
            .filter(|(_, sender)| sender.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for request_id in abandoned {
            self.outputs.remove(&request_id);
            self.core.abort_request(request_id);
        }
    }

    fn publish(&mut self) {
        let resolved = self.core.scheduler().num_fresh_resolved_total();
        let newly_resolved = resolved - self.fresh_resolved_reported;
        if newly_resolved > 0 {
            self.shared
                .pending_fresh
                .fetch_sub(newly_resolved as usize, Ordering::AcqRel);
            self.fresh_resolved_reported = resolved;
        }
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.core.stats();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::engine::observer::{NoopStepObserver, StepView};
    use crate::testing::deterministic_runner::{DeterministicRunner, reference_greedy_output};

    const VOCAB: usize = 97;
    const MAX_MODEL_LEN: usize = 512;

    fn config() -> EngineConfig {
        EngineConfig {
            block_size: 4,
            num_kv_blocks: 128,
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            ..EngineConfig::default()
        }
    }

    fn start(config: EngineConfig, delay: Option<Duration>) -> EngineHandle {
        let mut runner = DeterministicRunner::new(
            config.num_kv_blocks,
            config.block_size,
            VOCAB,
            MAX_MODEL_LEN,
        );
        if let Some(delay) = delay {
            runner = runner.with_step_delay(delay);
        }
        Engine::start(config, Box::new(runner), Box::new(NoopStepObserver)).unwrap()
    }

    fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        }
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| (seed * 31 + i * 7) % VOCAB as u32)
            .collect()
    }

    /// Reads a stream to its end: all tokens, and the final output.
    fn drain(rx: &mut UnboundedReceiver<RequestOutput>) -> (Vec<u32>, RequestOutput) {
        let mut tokens = Vec::new();
        loop {
            let output = rx
                .blocking_recv()
                .expect("stream ended without a final output");
            tokens.extend(&output.new_token_ids);
            if output.is_finished() {
                return (tokens, output);
            }
        }
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn requests_stream_their_tokens_and_complete() {
        let engine = start(config(), None);
        let mut streams = Vec::new();
        for i in 0..6 {
            let p = prompt(i, 5 + i as usize * 3);
            let (id, rx) = engine
                .add_request(p.clone(), greedy(10 + i as usize))
                .unwrap();
            streams.push((id, p, 10 + i as usize, rx));
        }
        let limits = engine.limits();
        for (id, p, max_tokens, mut rx) in streams {
            let (tokens, last) = drain(&mut rx);
            assert_eq!(last.request_id, id);
            assert_eq!(last.finish_reason, Some(FinishReason::Length));
            assert_eq!(last.num_prompt_tokens, p.len());
            assert_eq!(last.num_output_tokens, max_tokens);
            let expected = reference_greedy_output(
                0,
                VOCAB,
                &p,
                &greedy(max_tokens),
                limits.max_request_len(),
            );
            assert_eq!(tokens, expected);
        }
        engine.shutdown().unwrap();
        let stats = engine.stats();
        assert_eq!((stats.num_running, stats.num_waiting), (0, 0));
        assert_eq!(stats.num_requests_finished_total, 6);
        assert_eq!(
            stats.generation_tokens_total,
            (10..16).sum::<usize>() as u64
        );
        assert_eq!(stats.kv_blocks_free, stats.kv_blocks_total);
    }

    #[test]
    fn abort_frees_the_blocks_and_ends_the_stream() {
        let engine = start(config(), Some(Duration::from_millis(1)));
        let (id, mut rx) = engine.add_request(prompt(1, 30), greedy(10_000)).unwrap();
        let first = rx.blocking_recv().unwrap();
        assert_eq!(first.new_token_ids.len(), 1);
        assert!(engine.stats().kv_blocks_free < engine.stats().kv_blocks_total);
        engine.abort(id);
        let (_, last) = drain(&mut rx);
        assert_eq!(last.finish_reason, Some(FinishReason::Abort));
        assert!(
            rx.blocking_recv().is_none(),
            "nothing after the final output"
        );
        wait_until("blocks to be freed", || {
            let stats = engine.stats();
            stats.kv_blocks_free == stats.kv_blocks_total && stats.num_running == 0
        });
        engine.abort(id); // Unknown by now: a no-op.
        engine.abort(12345);
        engine.shutdown().unwrap();
    }

    #[test]
    fn abort_all_ends_running_and_waiting_requests_and_frees_everything() {
        let engine = start(
            EngineConfig {
                max_num_seqs: 2,
                max_waiting_requests: 2,
                ..config()
            },
            Some(Duration::from_millis(1)),
        );
        let mut streams = Vec::new();
        // Two run (each has produced a token), two wait, and the waiting queue is full.
        for i in 0..4 {
            let (_, mut rx) = engine.add_request(prompt(i, 12), greedy(10_000)).unwrap();
            if i < 2 {
                rx.blocking_recv().unwrap();
            }
            streams.push(rx);
        }
        assert!(matches!(
            engine.add_request(prompt(9, 4), greedy(1)),
            Err(EngineError::QueueFull { .. })
        ));
        engine.abort_all();
        for (i, rx) in streams.iter_mut().enumerate() {
            let (_, last) = drain(rx);
            assert_eq!(last.finish_reason, Some(FinishReason::Abort), "request {i}");
            assert!(
                rx.blocking_recv().is_none(),
                "request {i}: output after the last"
            );
        }
        wait_until("every block to be free", || {
            let stats = engine.stats();
            stats.kv_blocks_free == stats.kv_blocks_total
                && stats.num_running == 0
                && stats.num_waiting == 0
        });
        // The waiting queue's count is back to zero.
        assert_eq!(engine.inner.shared.pending_fresh.load(Ordering::Acquire), 0);
        engine.shutdown().unwrap();
    }

    #[test]
    fn a_validated_request_is_submitted_as_it_is() {
        let engine = start(config(), None);
        assert_eq!(
            engine.validate(vec![], greedy(1)).unwrap_err(),
            EngineError::EmptyPrompt
        );
        let seeded = SamplingParams {
            seed: Some(7),
            ..greedy(3)
        };
        let first = engine.validate(prompt(1, 8), seeded).unwrap();
        let second = first.with_seed_offset(1);
        assert_eq!(second.params().seed, Some(8));
        assert_eq!(second.prompt_token_ids(), first.prompt_token_ids());
        for request in [first.clone(), second] {
            let (_, mut rx) = engine.submit(request).unwrap();
            let (tokens, last) = drain(&mut rx);
            assert_eq!(
                (tokens.len(), last.finish_reason),
                (3, Some(FinishReason::Length))
            );
        }
        engine.abort_all();
        assert_eq!(engine.submit(first).unwrap_err(), EngineError::ShuttingDown);
        engine.shutdown().unwrap();
    }

    #[test]
    fn after_abort_all_new_requests_are_refused() {
        let engine = start(config(), Some(Duration::from_millis(1)));
        let (_, mut rx) = engine.add_request(prompt(1, 8), greedy(10_000)).unwrap();
        rx.blocking_recv().unwrap();
        engine.abort_all();
        assert_eq!(
            engine.add_request(prompt(2, 8), greedy(3)).unwrap_err(),
            EngineError::ShuttingDown
        );
        let (_, last) = drain(&mut rx);
        assert_eq!(last.finish_reason, Some(FinishReason::Abort));
        engine.shutdown().unwrap();
    }

    #[test]
    fn a_dropped_receiver_aborts_its_request() {
        let engine = start(config(), Some(Duration::from_millis(1)));
        let (_, mut rx) = engine.add_request(prompt(2, 20), greedy(10_000)).unwrap();
        rx.blocking_recv().unwrap();
        drop(rx);
        wait_until("the abandoned request to be aborted", || {
            let stats = engine.stats();
            stats.num_running == 0 && stats.kv_blocks_free == stats.kv_blocks_total
        });
        engine.shutdown().unwrap();
    }

    #[test]
    fn invalid_requests_get_errors() {
        let engine = start(
            EngineConfig {
                max_model_len: Some(64),
                max_num_seqs: 1,
                max_waiting_requests: 1,
                ..config()
            },
            Some(Duration::from_millis(1)),
        );
        assert_eq!(engine.max_model_len(), 64);
        assert_eq!(engine.vocab_size(), VOCAB);
        assert!(matches!(
            engine.add_request(vec![], greedy(1)),
            Err(EngineError::EmptyPrompt)
        ));
        assert!(matches!(
            engine.add_request(vec![1; 65], greedy(1)),
            Err(EngineError::PromptTooLong {
                prompt_len: 65,
                max_model_len: 64
            })
        ));
        assert!(matches!(
            engine.add_request(vec![VOCAB as u32], greedy(1)),
            Err(EngineError::InvalidTokenId { .. })
        ));
        let bad_temperature = SamplingParams {
            temperature: -0.5,
            ..greedy(1)
        };
        let err = engine.add_request(vec![1], bad_temperature).unwrap_err();
        assert!(
            err.is_invalid_request() && err.to_string().contains("temperature"),
            "{err}"
        );
        assert!(matches!(
            engine.add_request(vec![1], greedy(0)),
            Err(EngineError::InvalidSamplingParams {
                name: "max_tokens",
                ..
            })
        ));

        // Queue bound: one request runs (max_num_seqs = 1), one waits, the next is refused.
        let (running_id, mut running) = engine.add_request(prompt(3, 8), greedy(10_000)).unwrap();
        running.blocking_recv().unwrap();
        let (_, mut waiting) = engine.add_request(prompt(4, 8), greedy(2)).unwrap();
        let err = engine.add_request(prompt(5, 8), greedy(2)).unwrap_err();
        assert_eq!(
            err,
            EngineError::QueueFull {
                max_waiting_requests: 1
            }
        );
        assert!(!err.is_invalid_request());
        // Once the runner is aborted the waiting one runs, and the queue has room again.
        engine.abort(running_id);
        assert_eq!(
            drain(&mut waiting).1.finish_reason,
            Some(FinishReason::Length)
        );
        let (_, mut again) = engine.add_request(prompt(5, 8), greedy(2)).unwrap();
        assert_eq!(drain(&mut again).0.len(), 2);

        engine.shutdown().unwrap();
        assert_eq!(
            engine.add_request(vec![1], greedy(1)).unwrap_err(),
            EngineError::ShuttingDown
        );
    }

    #[test]
    fn shutdown_drains_in_flight_requests() {
        let engine = start(config(), Some(Duration::from_millis(1)));
        let receivers: Vec<_> = (0..4)
            .map(|i| engine.add_request(prompt(i, 10), greedy(20)).unwrap().1)
            .collect();
        let clone = engine.clone();
        engine.shutdown().unwrap();
        clone.shutdown().unwrap(); // Joined already: returns at once.
        for mut rx in receivers {
            let (tokens, last) = drain(&mut rx);
            assert_eq!(
                (tokens.len(), last.finish_reason),
                (20, Some(FinishReason::Length))
            );
        }
        assert!(clone.is_shutting_down());
    }

    #[test]
    fn the_observer_sees_every_step_from_the_engine_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let observer = move |step: &StepView<'_>| {
            let name = std::thread::current().name().map(str::to_owned);
            sink.lock()
                .unwrap()
                .push((step.id, name, step.batch.scheduled_tokens));
        };
        let config = config();
        let runner = DeterministicRunner::new(
            config.num_kv_blocks,
            config.block_size,
            VOCAB,
            MAX_MODEL_LEN,
        );
        let engine = Engine::start(config, Box::new(runner), Box::new(observer)).unwrap();
        let (_, mut rx) = engine.add_request(prompt(9, 12), greedy(5)).unwrap();
        drain(&mut rx);
        engine.shutdown().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len() as u64, engine.stats().num_steps);
        for (i, (id, thread, _)) in seen.iter().enumerate() {
            assert_eq!(*id, i as u64 + 1);
            assert_eq!(thread.as_deref(), Some(ENGINE_THREAD_NAME));
        }
        assert_eq!(seen.iter().map(|s| s.2).sum::<usize>(), 12 + 4);
    }

    #[test]
    fn an_invalid_config_is_refused_at_start() {
        let runner = DeterministicRunner::new(8, 4, VOCAB, MAX_MODEL_LEN);
        let config = EngineConfig {
            max_num_seqs: 0,
            ..config()
        };
        let err = Engine::start(config, Box::new(runner), Box::new(NoopStepObserver)).unwrap_err();
        assert!(matches!(
            err,
            EngineError::InvalidConfig {
                field: "max_num_seqs",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn streams_can_be_awaited_from_async_code() {
        let engine = start(config(), None);
        let (_, mut rx) = engine.add_request(prompt(7, 9), greedy(4)).unwrap();
        let mut tokens = Vec::new();
        while let Some(output) = rx.recv().await {
            tokens.extend(output.new_token_ids);
        }
        assert_eq!(tokens.len(), 4);
        let handle = engine.clone();
        tokio::task::spawn_blocking(move || handle.shutdown())
            .await
            .unwrap()
            .unwrap();
    }
}
