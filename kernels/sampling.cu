// Logits processing on the device: greedy argmax per row (the first index on ties, as
// torch.argmax and the CPU sampler), so a greedy step copies back one id per row instead of a
// whole row of logits.
#include "common.cuh"

// grid: (num_rows), block: a power of two, at most 1024.
extern "C" __global__ void argmax_rows(
    unsigned int* __restrict__ out,     // [num_rows]
    const float* __restrict__ logits,   // [num_rows, vocab]
    int vocab)
{
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = STEPSCOPE_NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > bv || bi == 0x7fffffff) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const int oi = best_i[threadIdx.x + s];
            const float mv = best_v[threadIdx.x];
            const int mi = best_i[threadIdx.x];
            if (ov > mv || (ov == mv && oi < mi) || (mi == 0x7fffffff)) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = (unsigned int)(best_i[0] == 0x7fffffff ? 0 : best_i[0]);
}
