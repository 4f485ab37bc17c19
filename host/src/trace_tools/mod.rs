//! Looking at step traces: `stepscope trace summary | report | perfetto`.
//!
//! A trace file (`--step-tracing-file`, or `--record-steps`) is read by [`load`] into traced
//! steps with the probabilities their policy recorded. [`estimate`] turns a sample into
//! population estimates (Horvitz–Thompson totals, Hájek means, 95% intervals); [`summary`]
//! applies them to the step quantities operators ask about; [`report`] draws an offline HTML
//! page with `plotters` charts; [`perfetto`] writes Chrome's trace event JSON for the Perfetto
//! UI. Nothing here touches the engine: it reads files the tracer wrote.

pub mod estimate;
pub mod load;
pub mod perfetto;
pub mod report;
pub mod summary;

pub use load::{TraceFile, TraceLoadError};
pub use summary::Summary;
