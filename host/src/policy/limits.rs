//! Resource limits a policy instance runs under: CPU (fuel and a wall-clock deadline per call),
//! memory and structure (linear memories, tables, instances, host resources), and the sizes of
//! what one host call may produce. Every value here is documented in the README's "Policy
//! sandbox limits" table; change both together.

use std::time::Duration;

/// Bounds applied to every policy call and instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLimits {
    /// Fuel (roughly, Wasm instructions) one call may burn before it traps as a timeout.
    /// A decision of the default policy costs about 100; 20 million is a few milliseconds.
    /// 0 (the default) disables fuel metering: the wall-clock deadline bounds every call, and
    /// Python and JavaScript guests run 10–25% faster without the metering.
    pub fuel_per_call: u64,
    /// Wall-clock deadline of one `decide` or `plan-rich` call (epoch interruption). Time the
    /// guest spends inside host calls counts too, which fuel cannot see.
    pub call_deadline: Duration,
    /// Wall-clock deadline of instantiation plus `configure` (language runtimes start up here).
    pub configure_deadline: Duration,
    /// Cap on the instance's linear memory, in bytes: all its memories together.
    pub memory_bytes: usize,
    /// Longest back-off, in steps, before a faulty policy is instantiated again.
    pub max_backoff_steps: u64,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: DEFAULT_FUEL_PER_CALL,
            call_deadline: Duration::from_millis(DEFAULT_CALL_DEADLINE_MS),
            configure_deadline: Duration::from_millis(DEFAULT_CONFIGURE_DEADLINE_MS),
            memory_bytes: 64 << 20,
            max_backoff_steps: 1024,
        }
    }
}

/// Default of [`PolicyLimits::fuel_per_call`]: no fuel metering (the deadline is the bound).
pub const DEFAULT_FUEL_PER_CALL: u64 = 0;
/// Default of [`PolicyLimits::call_deadline`], in milliseconds.
pub const DEFAULT_CALL_DEADLINE_MS: u64 = 10;
/// Default of [`PolicyLimits::configure_deadline`], in milliseconds.
pub const DEFAULT_CONFIGURE_DEADLINE_MS: u64 = 2_000;

/// Answer bounds: what a well-formed policy answer may contain.
pub(crate) const MAX_EXTRA_ATTRIBUTES: usize = 4;
pub(crate) const MAX_EXTRA_KEY_BYTES: usize = 32;
pub(crate) const MAX_EXTRA_VALUE_BYTES: usize = 128;

/// Structural limits of one instance (a store). Python and JavaScript components link dozens
/// of core instances and tables, so these leave them room while bounding what a hostile
/// component can make the host allocate outside the memory cap.
/// Core and component instances per store.
pub(crate) const MAX_INSTANCES: usize = 256;
/// Linear memories per store (their sizes together stay under the memory cap).
pub(crate) const MAX_MEMORIES: usize = 16;
/// Tables per store.
pub(crate) const MAX_TABLES: usize = 256;
/// Elements of all tables of a store together (8 to 16 bytes of host memory each).
pub(crate) const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Live host resources (WASI pollables, streams, …) one instance may hold.
pub(crate) const MAX_HOST_RESOURCES: usize = 4_096;
/// Largest `get-random-bytes` / `get-insecure-random-bytes` answer.
pub(crate) const MAX_RANDOM_BYTES: u64 = 64 << 10;
