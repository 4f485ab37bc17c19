//! The engine thread's heartbeat: is the step loop making progress?
//!
//! The engine thread marks itself idle just before it blocks waiting for a command (it has no
//! request to step), and busy, with a beat, as it wakes; after every completed step it beats
//! again. [`Heartbeat::liveness`] reads that from any thread: an idle engine is healthy however
//! long ago its last step was; a busy one (requests waiting or running) is [`Liveness::Stalled`]
//! once its last beat is older than the caller's bound, e.g. because a step never returns (a model
//! runner or step observer that blocks). The caller passes `now`, so tests decide the time
//! instead of sleeping. `GET /health` answers 503 for a stalled engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Progress marks shared between the engine thread and its handles.
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    /// When the engine thread last made progress (completed a step, or woke up with work to do),
    /// in nanoseconds since `epoch`.
    last_beat_ns: AtomicU64,
    /// The engine thread is blocked waiting for a command: nothing is pending.
    idle: AtomicBool,
}

/// What [`Heartbeat::liveness`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The engine waits for work.
    Idle,
    /// Work is pending and the last step completed (or the work arrived) this long ago, within
    /// the bound.
    Busy { since_beat: Duration },
    /// Work is pending and no step completed within the bound.
    Stalled { since_beat: Duration },
}

impl Heartbeat {
    /// A heartbeat that beats now, busy (the engine thread has not reached its first wait yet).
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_beat_ns: AtomicU64::new(0),
            idle: AtomicBool::new(false),
        }
    }

    /// The engine thread made progress now.
    pub fn beat(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_beat_ns.store(ns, Ordering::Release);
    }

    /// The engine thread is about to block waiting for a command.
    pub fn going_idle(&self) {
        self.idle.store(true, Ordering::Release);
    }

    /// The engine thread woke up with a command: it is busy, and that counts as progress.
    pub fn woke_up(&self) {
        self.beat();
        self.idle.store(false, Ordering::Release);
    }

    /// Whether the engine is idle, busy, or stalled (busy with no beat for longer than `bound`)
    /// at `now`.
    pub fn liveness(&self, now: Instant, bound: Duration) -> Liveness {
        if self.idle.load(Ordering::Acquire) {
            return Liveness::Idle;
        }
        let last = self.epoch + Duration::from_nanos(self.last_beat_ns.load(Ordering::Acquire));
        let since_beat = now.saturating_duration_since(last);
        if since_beat > bound {
            Liveness::Stalled { since_beat }
        } else {
            Liveness::Busy { since_beat }
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::engine::observer::StepView;
    use crate::engine::{Engine, EngineConfig, SamplingParams};
    use crate::testing::deterministic_runner::DeterministicRunner;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn idle_is_healthy_and_busy_goes_stale_past_the_bound() {
        let heartbeat = Heartbeat::new();
        heartbeat.beat();
        let now = Instant::now();
        assert!(matches!(
            heartbeat.liveness(now, HOUR),
            Liveness::Busy { .. }
        ));
        assert!(matches!(
            heartbeat.liveness(now + 2 * HOUR, HOUR),
            Liveness::Stalled { since_beat } if since_beat > HOUR
        ));
        heartbeat.going_idle();
        assert_eq!(heartbeat.liveness(now + 2 * HOUR, HOUR), Liveness::Idle);
        heartbeat.woke_up();
        let woke = Instant::now();
        assert!(matches!(
            heartbeat.liveness(woke, HOUR),
            Liveness::Busy { .. }
        ));
    }

    /// An engine whose step observer blocks (as a policy stuck in a host call would) is stalled
    /// once its bound passes, and healthy again once the step completes and the work is done.
    /// The test moves `now` instead of sleeping.
    #[test]
    fn a_blocked_step_stalls_the_engine_until_it_returns() {
        let (entered_tx, entered_rx) = mpsc::channel::<u64>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        // Blocks in the second step until released.
        let observer = move |step: &StepView<'_>| {
            if step.id == 2 {
                entered_tx.send(step.id).unwrap();
                release_rx.recv().unwrap();
            }
        };
        let config = EngineConfig {
            block_size: 4,
            num_kv_blocks: 64,
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            ..EngineConfig::default()
        };
        let runner = DeterministicRunner::new(config.num_kv_blocks, config.block_size, 97, 256);
        let engine = Engine::start(config, Box::new(runner), Box::new(observer)).unwrap();
        let bound = Duration::from_secs(5);
        wait_for_idle(&engine, bound);

        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(4)
        };
        let (_, mut outputs) = engine.add_request(vec![1, 2, 3], params).unwrap();
        assert_eq!(entered_rx.recv().unwrap(), 2);
        // Inside the blocked step: busy, and stalled as soon as the bound has passed.
        let now = Instant::now();
        assert!(matches!(engine.liveness(now, HOUR), Liveness::Busy { .. }));
        assert!(matches!(
            engine.liveness(now + bound + Duration::from_secs(1), bound),
            Liveness::Stalled { .. }
        ));
        assert!(engine.num_pending() >= 1);

        release_tx.send(()).unwrap();
        while let Some(output) = outputs.blocking_recv() {
            if output.is_finished() {
                break;
            }
        }
        // Finished: the engine goes back to waiting, healthy at any later time.
        wait_for_idle(&engine, bound);
        assert_eq!(
            engine.liveness(Instant::now() + 10 * HOUR, bound),
            Liveness::Idle
        );
        drop(release_tx);
        engine.shutdown().unwrap();
    }

    /// Waits (polling, up to a generous minute) until the engine thread blocks for commands.
    fn wait_for_idle(engine: &crate::engine::EngineHandle, bound: Duration) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while engine.liveness(Instant::now(), bound) != Liveness::Idle {
            assert!(Instant::now() < deadline, "the engine never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
