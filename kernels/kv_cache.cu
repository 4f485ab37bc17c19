// RoPE and KV-cache write, fused (one launch per layer instead of two): each new token's query
// and key heads are rotated in place in its fused q|k|v row, and its rotated keys and its values
// go to its slot of the paged cache.
//
// Rotary position embedding, Hugging Face Llama convention ("rotate_half"): within each head,
// element i pairs with element i + head_dim/2. Angles are formed in f32 (position * inv_freq, as
// transformers does), their cosine and sine taken in f64 and rounded to f32, matching the CPU
// backend's table bit for bit. `inv_freq` already holds any rope scaling (linear, llama3).
//
// Cache layout per layer: [num_blocks][num_kv_heads][block_size][head_dim] act_t, the block ids
// being the engine's. slot_mapping[t] = block_id * block_size + slot.
#include "common.cuh"

// grid: (num_tokens), block: any.
extern "C" __global__ void rotary_kv_cache_write(
    float* __restrict__ qkv,                // [num_tokens, row_stride]: q | k | v
    act_t* __restrict__ k_cache,
    act_t* __restrict__ v_cache,
    const int* __restrict__ positions,      // [num_tokens]
    const int* __restrict__ slot_mapping,   // [num_tokens]
    const float* __restrict__ inv_freq,     // [head_dim / 2]
    int num_heads,
    int num_kv_heads,
    int head_dim,
    int block_size,
    int row_stride)
{
    const int half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    float* row = qkv + (size_t)blockIdx.x * row_stride;
    const int slot = slot_mapping[blockIdx.x];
    const int block = slot / block_size;
    const int s = slot - block * block_size;
    // Start of KV head h's row for this token in the cache.
    auto cache_row = [&](int h) {
        return (((size_t)block * num_kv_heads + h) * block_size + s) * head_dim;
    };
    for (int idx = threadIdx.x; idx < (num_heads + num_kv_heads) * half; idx += blockDim.x) {
        const int h = idx / half;
        const int i = idx - h * half;
        const double angle = (double)__fmul_rn(pos, inv_freq[i]);
        const float c = (float)cos(angle);
        const float sn = (float)sin(angle);
        float* v = row + h * head_dim;
        const float x1 = v[i];
        const float x2 = v[i + half];
        const float r1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, sn));
        const float r2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, sn));
        v[i] = r1;
        v[i + half] = r2;
        if (h >= num_heads) {
            const size_t dst = cache_row(h - num_heads);
            k_cache[dst + i] = float_to_act(r1);
            k_cache[dst + i + half] = float_to_act(r2);
        }
    }
    const float* v = row + (num_heads + num_kv_heads) * head_dim;
    for (int idx = threadIdx.x; idx < num_kv_heads * head_dim; idx += blockDim.x) {
        const int h = idx / head_dim;
        const int d = idx - h * head_dim;
        v_cache[cache_row(h) + d] = float_to_act(v[idx]);
    }
}
