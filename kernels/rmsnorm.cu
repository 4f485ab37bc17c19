// RMSNorm (Llama): out = w * (x / sqrt(mean(x^2) + eps)), f32 in, act_t out (the next GEMM's
// input). `rows` (nullable) selects which rows of x to normalise: the final norm runs only on
// the rows that need logits.
#include "common.cuh"

// grid: (num_out_rows), block: a multiple of 32, at most 1024.
extern "C" __global__ void rms_norm(
    act_t* __restrict__ out,          // [num_out_rows, dim]
    const float* __restrict__ x,      // [*, dim]
    const int* __restrict__ rows,     // [num_out_rows] or null (identity)
    const float* __restrict__ weight, // [dim]
    int dim,
    float eps)
{
    __shared__ float scratch[32];
    const int r = rows ? rows[blockIdx.x] : (int)blockIdx.x;
    const float* src = x + (size_t)r * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(src[i], src[i], ss);
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    act_t* dst = out + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = float_to_act(weight[i] * (src[i] * inv));
}
