//! CUDA graphs: [`Graphs`] owns the captured decode steps, keyed by (tokens, logits rows,
//! attention splits), with the buffer generation they were captured against and whether graphs
//! are on at all. [`CudaModelRunner::enqueue_prepared`] replays a pure decode step of a shape
//! seen before as a graph captured the first time (every launch parameter depends only on the
//! key and the buffers' addresses; the per-step data is read from the metadata buffer), and
//! enqueues every other step eagerly. A buffer reallocation drops every graph; a failed capture
//! turns graphs off for the runner. [`CudaModelRunner::set_cuda_graphs`] turns them on or off
//! on a built runner, and [`CudaModelRunner::cuda_graph_launches`] counts the steps that ran as
//! graphs (for the tests and the benchmark, which compare graphs with eager launches).

use std::collections::HashMap;

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::super::CudaError;
use super::CudaModelRunner;
use super::step::StepPtrs;

/// Largest decode batch replayed as a CUDA graph, and how many shapes are kept.
const MAX_GRAPH_TOKENS: usize = 512;
const MAX_GRAPHS: usize = 64;

/// A captured CUDA graph. cudarc leaves `CudaGraph` `!Send` (it holds raw handles); the driver
/// allows launching an executable graph from any thread with the context current, which every
/// entry point of the runner makes sure of, and the runner uses its graphs only through
/// `&mut self`.
pub(super) struct SendGraph(CudaGraph);

// SAFETY: see above; the graph is only ever used by one thread at a time (through `&mut self`).
unsafe impl Send for SendGraph {}

/// The captured graphs of one runner.
pub(super) struct Graphs {
    /// Captured decode steps by (tokens, logits rows, attention splits).
    by_shape: HashMap<(usize, usize, usize), SendGraph>,
    /// The buffers' generation the graphs were captured against.
    generation: u64,
    /// Replay pure decode steps as graphs (off after a failed capture).
    pub(super) enabled: bool,
    /// Steps run as a graph (captured or replayed) since the runner was built.
    launches: u64,
}

impl Graphs {
    pub(super) fn new(enabled: bool) -> Self {
        Graphs {
            by_shape: HashMap::new(),
            generation: 0,
            enabled,
            launches: 0,
        }
    }
}

impl CudaModelRunner {
    /// Turns the replay of pure decode steps as CUDA graphs on or off (what
    /// [`super::CudaOptions::cuda_graphs`] sets at construction), keeping everything else: the
    /// GEMM plan, the kernels, the KV cache. Tests and benchmarks compare graphs with eager
    /// launches on one runner, so that nothing but the graphs differs. Graphs already captured
    /// stay (they are dropped when the buffers they were captured against are reallocated);
    /// turning graphs on after a failed capture tries capturing again.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.enabled = on;
    }

    /// Whether pure decode steps are replayed as CUDA graphs (false after a failed capture).
    pub fn cuda_graphs(&self) -> bool {
        self.graphs.enabled
    }

    /// Steps run as CUDA graphs (captured or replayed) since the runner was built: a test can
    /// check that the decode steps it meant to replay did not fall back to eager launches.
    pub fn cuda_graph_launches(&self) -> u64 {
        self.graphs.launches
    }

    /// Uploads the prepared step and enqueues its forward, as a graph or eagerly; returns the
    /// number of logits rows.
    pub(super) fn enqueue_prepared(&mut self) -> Result<usize, CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        let t = self.host.ids.len();
        let r = self.host.logit_rows.len();
        if t == 0 {
            return Ok(0);
        }
        let p = self.upload_and_size(t, r)?;
        // A pure decode step (one token per entry) of a shape seen before replays a CUDA graph:
        // every launch parameter depends only on (t, r), the attention split count and the
        // buffers' addresses, and the per-step data is read from the metadata buffer.
        let graphable = self.graphs.enabled && t == self.host.num_entries && t <= MAX_GRAPH_TOKENS;
        if graphable {
            match self.replay_or_capture(t, r, &p) {
                Ok(()) => return Ok(r),
                Err(e) => {
                    tracing::warn!("CUDA graphs disabled for this runner: {e}");
                    self.graphs.enabled = false;
                    self.graphs.by_shape.clear();
                }
            }
        }
        self.enqueue_kernels(t, r, &p)?;
        Ok(r)
    }

    fn replay_or_capture(&mut self, t: usize, r: usize, p: &StepPtrs) -> Result<(), CudaError> {
        if self.graphs.generation != self.bufs.generation {
            self.graphs.by_shape.clear();
            self.graphs.generation = self.bufs.generation;
        }
        let key = (t, r, p.attn_splits);
        if let Some(g) = self.graphs.by_shape.get(&key) {
            g.0.launch()
                .map_err(|e| CudaError::driver("cuGraphLaunch", e))?;
            self.graphs.launches += 1;
            return Ok(());
        }
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| CudaError::driver("cuStreamBeginCapture", e))?;
        let enqueued = self.enqueue_kernels(t, r, p);
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| CudaError::driver("cuStreamEndCapture", e));
        enqueued?;
        let graph = graph?.ok_or_else(|| CudaError::Driver {
            call: "cuStreamEndCapture",
            message: "empty graph".into(),
        })?;
        graph
            .launch()
            .map_err(|e| CudaError::driver("cuGraphLaunch", e))?;
        self.graphs.launches += 1;
        if self.graphs.by_shape.len() >= MAX_GRAPHS {
            self.graphs.by_shape.clear();
        }
        self.graphs.by_shape.insert(key, SendGraph(graph));
        Ok(())
    }
}
