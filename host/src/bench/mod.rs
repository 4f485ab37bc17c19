//! `stepscope bench …`: measurements printed side by side in one run.
//!
//! Timed numbers live here, never in tests (the machine is shared and noisy). Each benchmark
//! measures its variants in the same process, one after another, and prints ratios.

pub mod budget;
#[cfg(test)]
mod cuda;
#[cfg(test)]
mod cuda_tracing;
pub mod model;
pub mod policy;
pub mod scheduler;
pub mod server_path;
pub mod step_tracing;

pub use crate::latency::{LatencyStats, format_ns};
