// Rotary position embedding, Hugging Face Llama convention ("rotate_half"): within each head,
// element i pairs with element i + head_dim/2. Applied in place to the query and key heads at
// the start of each fused q|k|v row. Angles are formed in f32 (position * inv_freq, as
// transformers does), their cosine and sine taken in f64 and rounded to f32, matching the CPU
// backend's table bit for bit. `inv_freq` already holds any rope scaling (linear, llama3).
#include "common.cuh"

// grid: (num_tokens), block: any.
extern "C" __global__ void rotary_embedding(
    float* __restrict__ qkv,            // [num_tokens, row_stride]
    const int* __restrict__ positions,  // [num_tokens]
    const float* __restrict__ inv_freq, // [head_dim / 2]
    int num_rot_heads,                  // query heads + key heads
    int head_dim,
    int row_stride)
{
    const int half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    float* row = qkv + (size_t)blockIdx.x * row_stride;
    for (int idx = threadIdx.x; idx < num_rot_heads * half; idx += blockDim.x) {
        const int h = idx / half;
        const int i = idx - h * half;
        const double angle = (double)__fmul_rn(pos, inv_freq[i]);
        const float c = (float)cos(angle);
        const float s = (float)sin(angle);
        float* v = row + h * head_dim;
        const float x1 = v[i];
        const float x2 = v[i + half];
        v[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
        v[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
}
