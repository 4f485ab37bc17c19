// SwiGLU: from fused rows [gate (inter) | up (inter)] in f32, writes silu(gate) * up as act_t
// (the down projection's input).
#include "common.cuh"

// grid-stride over num_tokens * inter.
extern "C" __global__ void silu_and_mul(
    act_t* __restrict__ out,            // [num_tokens, inter]
    const float* __restrict__ gate_up,  // [num_tokens, 2 * inter]
    int num_tokens,
    int inter)
{
    const size_t n = (size_t)num_tokens * inter;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / inter;
        const size_t i = idx - t * inter;
        const float g = gate_up[t * 2 * inter + i];
        const float u = gate_up[t * 2 * inter + inter + i];
        out[idx] = float_to_act(silu_mul(g, u));
    }
}
