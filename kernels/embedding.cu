// Embedding gather: out[t, :] = table[ids[t], :] (act_t table, f32 rows).
#include "common.cuh"

// grid: (num_tokens), block: any.
extern "C" __global__ void embedding_gather(
    float* __restrict__ out,            // [num_tokens, hidden]
    const act_t* __restrict__ table,    // [vocab, hidden]
    const unsigned int* __restrict__ ids,
    int hidden)
{
    const size_t row = (size_t)ids[blockIdx.x] * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = act_to_float(table[row + i]);
}
