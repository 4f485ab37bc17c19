//! The engine core: requests, the paged KV cache manager with prefix caching, the
//! continuous-batching scheduler, the sampler, and the step loop, run on its own thread.
//!
//! vLLM-v1 style: each step the [`Scheduler`] spends a token budget over running requests first
//! (one token per decode, chunked prefill for long prompts) and then admits waiting requests,
//! reusing the KV blocks of cached prefixes; when KV blocks run out it preempts the newest running
//! request, which recomputes later. [`EngineCore::step`] shows every decided batch to a
//! [`StepObserver`] (the step tracer) before the post-schedule update, runs the [`ModelRunner`],
//! samples, and applies stop rules. [`Engine::start`] runs the core on the `stepscope-engine`
//! thread behind an [`EngineHandle`] that streams [`RequestOutput`]s, and whose [`Heartbeat`]
//! tells a stalled step loop from an idle one. Tests and benchmarks drive it with the
//! deterministic runner of [`crate::testing`]; the scheduler's CPU cost per step is measured by
//! [`crate::bench::scheduler`].

pub mod api;
pub mod block_pool;
pub mod config;
pub mod core;
pub mod hashing;
pub mod heartbeat;
pub mod journey;
pub mod kv_cache_manager;
pub mod model_runner;
pub mod observer;
pub mod request;
pub mod sampler;
pub mod sampling_params;
pub mod scheduler;
pub mod step_tokens;

#[cfg(test)]
mod engine_tests;

pub use self::core::EngineCore;
pub use api::{Engine, EngineHandle};
pub use config::{DEFAULT_MAX_PROMPT_LOGPROBS_TOKENS, EngineConfig, EngineError};
pub use heartbeat::Liveness;
pub use observer::{NoopStepObserver, StepObserver, StepView};
pub use request::{FinishReason, RequestOutput, RequestPhase, TokenLogprobs};
pub use sampling_params::{MAX_LOGPROBS, SamplingParams};
pub use step_tokens::StepTokenHistogram;
