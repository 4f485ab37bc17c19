//! Resource limits a policy instance runs under.

/// Bounds applied to every policy call and instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLimits {
    /// Fuel (roughly, Wasm instructions) one call may burn before it traps as a timeout.
    /// A decision of the default policy costs about 100; 20 million is a few milliseconds.
    /// 0 disables the bound (no fuel metering at all): only for trusted policies and benchmarks.
    pub fuel_per_call: u64,
    /// Cap on the instance's linear memory, in bytes.
    pub memory_bytes: usize,
    /// Longest back-off, in steps, before a faulty policy is instantiated again.
    pub max_backoff_steps: u64,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: 20_000_000,
            memory_bytes: 64 << 20,
            max_backoff_steps: 1024,
        }
    }
}

/// Answer bounds: what a well-formed policy answer may contain.
pub(crate) const MAX_EXTRA_ATTRIBUTES: usize = 4;
pub(crate) const MAX_EXTRA_KEY_BYTES: usize = 32;
pub(crate) const MAX_EXTRA_VALUE_BYTES: usize = 128;
