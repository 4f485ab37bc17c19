//! Fault kinds and the counters the runtime keeps (read by `/metrics` and the tracer).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a policy call produced no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The call ran out of fuel (an endless or too-slow computation).
    Timeout,
    /// The instance hit its memory cap.
    Memory,
    /// Any other trap (`unreachable`, out-of-bounds access, a panic in the guest, …).
    Trap,
    /// The answer broke the contract (bad index, oversized list or string, bad probability…).
    Malformed,
    /// Re-creating the instance failed (instantiation or `configure` error).
    Instantiate,
    /// The guest waited on something that never happens in the sandbox (a clock deadline, a
    /// poll with nothing ready): the call traps instead of blocking the engine.
    Blocked,
    /// A host call asked for more than one call may have (random bytes, host resources, table
    /// elements).
    HostLimit,
}

/// How many fault kinds there are.
const NUM_KINDS: usize = 7;

impl FaultKind {
    pub const ALL: [FaultKind; NUM_KINDS] = [
        FaultKind::Timeout,
        FaultKind::Memory,
        FaultKind::Trap,
        FaultKind::Malformed,
        FaultKind::Instantiate,
        FaultKind::Blocked,
        FaultKind::HostLimit,
    ];

    /// Stable label, used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Timeout => "timeout",
            FaultKind::Memory => "memory",
            FaultKind::Trap => "trap",
            FaultKind::Malformed => "malformed",
            FaultKind::Instantiate => "instantiate",
            FaultKind::Blocked => "blocked",
            FaultKind::HostLimit => "host_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters shared between the step loop (writer) and metrics readers.
#[derive(Debug, Default)]
pub struct PolicyCounters {
    calls: AtomicU64,
    skipped_backoff: AtomicU64,
    instantiations: AtomicU64,
    recycles: AtomicU64,
    faults: [AtomicU64; NUM_KINDS],
    call_nanos_total: AtomicU64,
    degradations: AtomicU64,
    recoveries: AtomicU64,
    fallback_steps: AtomicU64,
    degraded: AtomicU64,
}

/// A point-in-time copy of [`PolicyCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCountersSnapshot {
    /// Guest calls made (decide + plan-rich).
    pub calls: u64,
    /// Steps that went untraced because the policy was backing off after a fault.
    pub skipped_backoff: u64,
    /// Instances created (the first one included).
    pub instantiations: u64,
    /// Instances retired with their memory near the cap (not faults).
    pub recycles: u64,
    /// Faults by kind, indexed like [`FaultKind::ALL`].
    pub faults: [u64; NUM_KINDS],
    /// Total time spent in guest calls, in nanoseconds.
    pub call_nanos_total: u64,
    /// Times the policy went over its step budget and was set aside (see `policy::budget`).
    pub degradations: u64,
    /// Times a degraded policy was trusted again.
    pub recoveries: u64,
    /// Steps the built-in default answered for a degraded policy.
    pub fallback_steps: u64,
    /// Whether the policy is degraded now.
    pub degraded: bool,
}

impl PolicyCountersSnapshot {
    pub fn faults_of(&self, kind: FaultKind) -> u64 {
        self.faults[kind.index()]
    }

    pub fn total_faults(&self) -> u64 {
        self.faults.iter().sum()
    }
}

impl PolicyCounters {
    pub(crate) fn record_call(&self, nanos: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.call_nanos_total.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn record_fault(&self, kind: FaultKind) {
        self.faults[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_skip(&self) {
        self.skipped_backoff.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_recycle(&self) {
        self.recycles.fetch_add(1, Ordering::Relaxed);
    }

    /// A change of standing under the step budget.
    pub fn record_degraded(&self, degraded: bool) {
        let counter = if degraded {
            &self.degradations
        } else {
            &self.recoveries
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.degraded.store(u64::from(degraded), Ordering::Relaxed);
    }

    /// A step the built-in default answered for a degraded policy.
    pub fn record_fallback_step(&self) {
        self.fallback_steps.fetch_add(1, Ordering::Relaxed);
    }

    /// A hot swap replaced the policy: the new one starts in good standing.
    pub fn clear_degraded(&self) {
        self.degraded.store(0, Ordering::Relaxed);
    }

    pub(crate) fn record_instantiation(&self) {
        self.instantiations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> PolicyCountersSnapshot {
        let mut faults = [0; NUM_KINDS];
        for (slot, counter) in faults.iter_mut().zip(&self.faults) {
            *slot = counter.load(Ordering::Relaxed);
        }
        PolicyCountersSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            skipped_backoff: self.skipped_backoff.load(Ordering::Relaxed),
            instantiations: self.instantiations.load(Ordering::Relaxed),
            recycles: self.recycles.load(Ordering::Relaxed),
            faults,
            call_nanos_total: self.call_nanos_total.load(Ordering::Relaxed),
            degradations: self.degradations.load(Ordering::Relaxed),
            recoveries: self.recoveries.load(Ordering::Relaxed),
            fallback_steps: self.fallback_steps.load(Ordering::Relaxed),
            degraded: self.degraded.load(Ordering::Relaxed) != 0,
        }
    }
}
