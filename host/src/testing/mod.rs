//! Test support shared by the unit tests and the in-process benchmarks; never used to serve.
//!
//! [`deterministic_runner`] is a model runner without a model that really goes through the paged
//! KV cache, so engine, tracing and server tests (and `bench scheduler`/`bench tracing`) can
//! check scheduling and caching exactly, without weights. The model tools only tests need are
//! compiled for tests alone: [`greedy`] (a greedy generation loop independent of the engine, the
//! reference for backend and fixture tests) and [`export`] (writes a loaded model back as a
//! Hugging Face directory, for loader round trips), and [`model_configs`] (geometries the CPU
//! and CUDA backend tests share). `host/tests/architecture.rs` checks that no
//! serving module imports this one outside its tests.

pub mod deterministic_runner;
#[cfg(test)]
pub mod export;
#[cfg(test)]
pub mod greedy;
#[cfg(test)]
pub mod model_configs;

pub use deterministic_runner::DeterministicRunner;
