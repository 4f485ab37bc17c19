//! stepscope: an LLM inference server whose scheduler is observable step by step.
//!
//! At every scheduler step the host asks a sandboxed WebAssembly policy whether to trace the
//! step and what to put in the trace. See `docs/ARCHITECTURE.md` for the whole picture; each module's doc
//! says what it owns.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod latency;
pub mod launch;
pub mod model;
pub mod policy;
pub mod server;
pub mod splitmix;
pub mod step_tracing;
pub mod testing;
pub mod textgen;
pub mod trace_context;
pub mod trace_tools;
