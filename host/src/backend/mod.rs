//! Model backends: implementations of the engine's `ModelRunner` trait for a device. `cpu` is
//! the default (f32, rayon-parallel, paged KV cache in host memory); `cuda` runs on an NVIDIA GPU
//! (bf16 weights, cuBLAS, our NVRTC-compiled kernels).

pub mod cpu;
pub mod cuda;
