// KV-cache write: the (already rotated) keys and the values of each new token go to its slot
// of the paged cache. Cache layout per layer: [num_blocks][num_kv_heads][block_size][head_dim]
// act_t, the block ids being the engine's. slot_mapping[t] = block_id * block_size + slot.
#include "common.cuh"

// grid: (num_tokens), block: any.
extern "C" __global__ void kv_cache_write(
    act_t* __restrict__ k_cache,
    act_t* __restrict__ v_cache,
    const float* __restrict__ qkv,          // [num_tokens, row_stride]: q | k | v
    const int* __restrict__ slot_mapping,    // [num_tokens]
    int q_dim,
    int num_kv_heads,
    int head_dim,
    int block_size,
    int row_stride)
{
    const int slot = slot_mapping[blockIdx.x];
    const int block = slot / block_size;
    const int s = slot - block * block_size;
    const int kv_dim = num_kv_heads * head_dim;
    const float* k = qkv + (size_t)blockIdx.x * row_stride + q_dim;
    const float* v = k + kv_dim;
    for (int idx = threadIdx.x; idx < kv_dim; idx += blockDim.x) {
        const int h = idx / head_dim;
        const int d = idx - h * head_dim;
        const size_t dst = (((size_t)block * num_kv_heads + h) * block_size + s) * head_dim + d;
        k_cache[dst] = float_to_act(k[idx]);
        v_cache[dst] = float_to_act(v[idx]);
    }
}
