//! Per-op timing for benchmarks: [`Profiler`] owns the CUDA events recorded after each kernel
//! and GEMM while a profiled step runs. [`CudaModelRunner::profile_step`] runs one step eagerly
//! with the events on and sums the device time per op kind; outside it, marking costs one
//! borrow check per op.

use std::cell::RefCell;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::engine::model_runner::{ModelBatch, ModelRunner, ModelRunnerError};

use super::super::CudaError;
use super::{CudaModelRunner, backend_err};

/// Events recorded after each op while set (only during [`CudaModelRunner::profile_step`]).
#[derive(Default)]
pub(super) struct Profiler {
    events: RefCell<Option<Vec<(&'static str, CudaEvent)>>>,
}

impl Profiler {
    /// Records an event labelled `label` on `stream`, when profiling.
    pub(super) fn mark(&self, stream: &CudaStream, label: &'static str) -> Result<(), CudaError> {
        if let Some(events) = self.events.borrow_mut().as_mut() {
            let ev = stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| CudaError::driver("cuEventRecord", e))?;
            events.push((label, ev));
        }
        Ok(())
    }
}

impl CudaModelRunner {
    /// Runs one step (eagerly, with full logits) recording a CUDA event after every kernel and
    /// GEMM; returns the device time per op kind in milliseconds, in first-seen order, summed
    /// over layers. For benchmarks: the events themselves add a little time.
    pub fn profile_step(
        &mut self,
        batch: &ModelBatch<'_>,
    ) -> Result<Vec<(&'static str, f64)>, ModelRunnerError> {
        let use_graphs = std::mem::replace(&mut self.graphs.enabled, false);
        *self.prof.events.borrow_mut() = Some(Vec::new());
        let ran = self.forward(batch);
        self.graphs.enabled = use_graphs;
        let events = self.prof.events.borrow_mut().take().unwrap_or_default();
        ran?;
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for pair in events.windows(2) {
            let ms = pair[0]
                .1
                .elapsed_ms(&pair[1].1)
                .map_err(|e| backend_err(CudaError::driver("cuEventElapsedTime", e)))?;
            match out.iter_mut().find(|(l, _)| *l == pair[1].0) {
                Some((_, t)) => *t += f64::from(ms),
                None => out.push((pair[1].0, f64::from(ms))),
            }
        }
        Ok(out)
    }

    /// Marks the end of op `label` for [`CudaModelRunner::profile_step`].
    pub(super) fn mark(&self, label: &'static str) -> Result<(), CudaError> {
        self.prof.mark(&self.stream, label)
    }
}
