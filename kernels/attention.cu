// Paged attention over a flattened batch that mixes prefill chunks and decode tokens.
//
// One thread block per (token, KV head, slice of up to 8 query heads sharing that KV head):
// the token at absolute position p attends causally to the keys at positions 0..p of its
// request, read through the request's block table (its own new K/V were written to the cache by
// kv_cache_write just before). Each warp walks chunks of 32 keys (warp w takes chunks w,
// w + NWARPS, ...): every lane loads one key (16-byte vector loads, all in flight at once) and
// computes its scores for the query heads of the slice, and stages that key's value row in
// shared memory; an online softmax (running max and sum per head) then accumulates P·V, each
// lane owning head_dim/32 output dimensions. The warps' partial results are merged at the end.
//
// Split keys (flash-decoding): when a step has too few (token, KV head) pairs to fill the GPU,
// the host passes num_splits > 1 and blockIdx.z also selects one of num_splits consecutive
// ranges of each token's keys (the range length is derived from the token's own context on the
// device; the host keys captured CUDA graphs by the split count). Each block then writes its
// unnormalised partial result with its running max and sum to `part`, and attention_combine
// merges the ranges in a fixed order (deterministic).
//
// Token list: when the host gives the entries with many new tokens to the tensor-core kernel of
// prefill_attention.cu, this kernel takes the others, listed in `tokens` (blockIdx.x indexes
// the list, and the split's partial results); a null `tokens` means every token of the step
// (grid.x = tokens; pure decode steps, the ones captured as CUDA graphs, always pass null).
//
// Cache layout per layer: [num_blocks][num_kv_heads][block_size][head_dim] act_t.
#include "common.cuh"

#define ATTN_MAX_GROUP 8
// Fewest keys in one range of a split attention (ATTENTION_MIN_SPLIT in runner.rs).
#define ATTN_MIN_SPLIT 64

template <int DPL>
__device__ __forceinline__ void load_v(const act_t* row, int lane, int head_dim, float* vf) {
    // `row` points at this lane's first dimension (lane * DPL).
    if (DPL * 32 == head_dim && DPL == 2) {
        const unsigned int w = *reinterpret_cast<const unsigned int*>(row);
        vf[0] = act_lo(w); vf[1] = act_hi(w);
    } else if (DPL * 32 == head_dim && DPL == 4) {
        const uint2 w = *reinterpret_cast<const uint2*>(row);
        vf[0] = act_lo(w.x); vf[1] = act_hi(w.x); vf[2] = act_lo(w.y); vf[3] = act_hi(w.y);
    } else if (DPL * 32 == head_dim && DPL == 8) {
        const uint4 w = *reinterpret_cast<const uint4*>(row);
        unpack8(w, vf);
    } else {
#pragma unroll
        for (int i = 0; i < DPL; ++i) vf[i] = (lane * DPL + i < head_dim) ? act_to_float(row[i]) : 0.0f;
    }
}

template <int D, int NWARPS>
__device__ __forceinline__ void paged_attention_impl(
    act_t* __restrict__ out,                       // [num_tokens, num_heads * D]
    const float* __restrict__ qkv,                 // [num_tokens, row_stride], rotated q first
    const act_t* __restrict__ k_cache,
    const act_t* __restrict__ v_cache,
    const int* __restrict__ context_lens,          // [num_tokens]: position + 1
    const int* __restrict__ block_table_offsets,   // [num_tokens]: start of its block table
    const int* __restrict__ block_tables,          // all requests' block tables, concatenated
    int row_stride,
    int num_heads,
    int num_kv_heads,
    int block_size,
    float scale,
    float* __restrict__ part,                      // [grid.x, num_heads, num_splits, D + 2]
    int num_splits,
    const int* __restrict__ tokens)                // [grid.x] tokens to attend, or null: all
{
    static_assert(D % 8 == 0, "head_dim must be a multiple of 8");
    constexpr int DPL = (D + 31) / 32;   // output dimensions per lane
    constexpr int VSTRIDE = D + 8;       // padded value row in shared memory, in act_t
    extern __shared__ float4 smem_f4[];
    float* smem = reinterpret_cast<float*>(smem_f4);

    const int t = tokens ? tokens[blockIdx.x] : blockIdx.x;
    const int kvh = blockIdx.y;
    const int group = num_heads / num_kv_heads;
    const int gmax = min(group, ATTN_MAX_GROUP);
    const int num_slices = (group + ATTN_MAX_GROUP - 1) / ATTN_MAX_GROUP;
    const int split = blockIdx.z / num_slices;
    const int g0 = (blockIdx.z - split * num_slices) * ATTN_MAX_GROUP;
    const int ng = min(ATTN_MAX_GROUP, group - g0);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int head0 = kvh * group + g0;  // first query head of this block

    // Shared memory: q [gmax][D] f32, then a region used first for the per-warp value rows
    // [NWARPS][32][VSTRIDE] act_t and afterwards for the merge [NWARPS][gmax][D + 2] f32.
    float* q_s = smem;
    float* region = smem + gmax * D;
    act_t* v_s = reinterpret_cast<act_t*>(region) + warp * 32 * VSTRIDE;

    const float* q_row = qkv + (size_t)t * row_stride + (size_t)head0 * D;
    for (int i = threadIdx.x; i < ng * D; i += blockDim.x) q_s[i] = q_row[i] * scale;
    __syncthreads();

    const int L = context_lens[t];
    int k_begin = 0, k_end = L;
    if (num_splits > 1) {
        const int even = (L + num_splits - 1) / num_splits;
        const int per = max(ATTN_MIN_SPLIT, (even + 31) / 32 * 32);
        k_begin = min(L, split * per);
        k_end = min(L, k_begin + per);
    }
    const int* bt = block_tables + block_table_offsets[t];

    float m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP], acc[ATTN_MAX_GROUP][DPL];
#pragma unroll
    for (int g = 0; g < ATTN_MAX_GROUP; ++g) {
        m[g] = STEPSCOPE_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[g][i] = 0.0f;
    }

    for (int c0 = k_begin + warp * 32; c0 < k_end; c0 += NWARPS * 32) {
        const int j = c0 + lane;
        const bool valid = j < k_end;
        float sc[ATTN_MAX_GROUP];
#pragma unroll
        for (int g = 0; g < ATTN_MAX_GROUP; ++g) sc[g] = 0.0f;
        if (valid) {
            const int bi = j / block_size;
            const int s = j - bi * block_size;
            const size_t off = (((size_t)bt[bi] * num_kv_heads + kvh) * block_size + s) * D;
            const uint4* kp = reinterpret_cast<const uint4*>(k_cache + off);
            const uint4* vp = reinterpret_cast<const uint4*>(v_cache + off);
            uint4* vs = reinterpret_cast<uint4*>(v_s + lane * VSTRIDE);
#pragma unroll
            for (int p = 0; p < D / 8; ++p) vs[p] = vp[p];
#pragma unroll
            for (int p = 0; p < D / 8; ++p) {
                float kf[8];
                unpack8(kp[p], kf);
#pragma unroll
                for (int g = 0; g < ATTN_MAX_GROUP; ++g) {
                    if (g < ng) {
                        const float4 a = *reinterpret_cast<const float4*>(q_s + g * D + p * 8);
                        const float4 b = *reinterpret_cast<const float4*>(q_s + g * D + p * 8 + 4);
                        float d = sc[g];
                        d = fmaf(a.x, kf[0], d); d = fmaf(a.y, kf[1], d);
                        d = fmaf(a.z, kf[2], d); d = fmaf(a.w, kf[3], d);
                        d = fmaf(b.x, kf[4], d); d = fmaf(b.y, kf[5], d);
                        d = fmaf(b.z, kf[6], d); d = fmaf(b.w, kf[7], d);
                        sc[g] = d;
                    }
                }
            }
        }
        __syncwarp();

        // Online softmax: rescale what was accumulated, turn scores into weights.
#pragma unroll
        for (int g = 0; g < ATTN_MAX_GROUP; ++g) {
            if (g < ng) {
                const float s = valid ? sc[g] : STEPSCOPE_NEG_INF;
                const float m_new = fmaxf(m[g], warp_max(s));  // finite: lane 0 is valid
                const float alpha = expf(m[g] - m_new);
                const float p = valid ? expf(s - m_new) : 0.0f;
                l[g] = l[g] * alpha + warp_sum(p);
#pragma unroll
                for (int i = 0; i < DPL; ++i) acc[g][i] *= alpha;
                m[g] = m_new;
                sc[g] = p;
            }
        }

        // P·V over the chunk's valid keys, values read from shared memory.
        const int nvalid = min(32, k_end - c0);
#pragma unroll 4
        for (int jj = 0; jj < nvalid; ++jj) {
            float vf[DPL];
            load_v<DPL>(v_s + jj * VSTRIDE + lane * DPL, lane, D, vf);
#pragma unroll
            for (int g = 0; g < ATTN_MAX_GROUP; ++g) {
                if (g < ng) {
                    const float p = __shfl_sync(STEPSCOPE_FULL_MASK, sc[g], jj);
#pragma unroll
                    for (int i = 0; i < DPL; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
                }
            }
        }
        __syncwarp();  // the next chunk overwrites this warp's value rows
    }

    // Merge the warps' partial softmax states.
    __syncthreads();
    float* comb = region;
#pragma unroll
    for (int g = 0; g < ATTN_MAX_GROUP; ++g) {
        if (g < ng) {
            float* c = comb + (size_t)(warp * gmax + g) * (D + 2);
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane * DPL + i;
                if (d < D) c[d] = acc[g][i];
            }
            if (lane == 0) {
                c[D] = m[g];
                c[D + 1] = l[g];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) {
        const int g = idx / D;
        const int d = idx - g * D;
        float mx = STEPSCOPE_NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, comb[(size_t)(w * gmax + g) * (D + 2) + D]);
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) {
            const float* c = comb + (size_t)(w * gmax + g) * (D + 2);
            const float e = c[D + 1] > 0.0f ? expf(c[D] - mx) : 0.0f;
            num = fmaf(e, c[d], num);
            den = fmaf(e, c[D + 1], den);
        }
        if (num_splits > 1) {
            // Unnormalised, relative to this range's max; an empty range has den = 0.
            float* p = part + ((size_t)(blockIdx.x * num_heads + head0 + g) * num_splits + split) * (D + 2);
            p[d] = num;
            if (d == 0) {
                p[D] = mx;
                p[D + 1] = den;
            }
        } else {
            // (The token is read again here rather than kept in a register through the loop.)
            const int t_out = tokens ? tokens[blockIdx.x] : blockIdx.x;
            out[(size_t)t_out * num_heads * D + (size_t)(head0 + g) * D + d] = float_to_act(num / den);
        }
    }
}

// Merges the key ranges of a split attention. grid: (grid.x of paged_attention, num_heads),
// block: any.
extern "C" __global__ void attention_combine(
    act_t* __restrict__ out,          // [num_tokens, num_heads * head_dim]
    const float* __restrict__ part,   // [grid.x, num_heads, num_splits, head_dim + 2]
    int num_heads,
    int head_dim,
    int num_splits,
    const int* __restrict__ tokens)   // as paged_attention's
{
    const int t = tokens ? tokens[blockIdx.x] : blockIdx.x;
    const size_t stride = head_dim + 2;
    const float* p = part + (size_t)(blockIdx.x * num_heads + blockIdx.y) * num_splits * stride;
    float mx = STEPSCOPE_NEG_INF;
    for (int s = 0; s < num_splits; ++s)
        if (p[s * stride + head_dim + 1] > 0.0f) mx = fmaxf(mx, p[s * stride + head_dim]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float* q = p + s * stride;
            const float e = q[head_dim + 1] > 0.0f ? expf(q[head_dim] - mx) : 0.0f;
            num = fmaf(e, q[d], num);
            den = fmaf(e, q[head_dim + 1], den);
        }
        out[(size_t)t * num_heads * head_dim + (size_t)blockIdx.y * head_dim + d] =
            float_to_act(num / den);
    }
}

#define STEPSCOPE_DEFINE_ATTENTION(D, NWARPS)                                                  \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_attention_d##D(           \
        act_t* __restrict__ out, const float* __restrict__ qkv,                                \
        const act_t* __restrict__ k_cache, const act_t* __restrict__ v_cache,                  \
        const int* __restrict__ context_lens, const int* __restrict__ block_table_offsets,     \
        const int* __restrict__ block_tables, int row_stride, int num_heads, int num_kv_heads, \
        int block_size, float scale, float* __restrict__ part, int num_splits,                 \
        const int* __restrict__ tokens) {                                                      \
        paged_attention_impl<D, NWARPS>(out, qkv, k_cache, v_cache, context_lens,              \
                                        block_table_offsets, block_tables, row_stride,         \
                                        num_heads, num_kv_heads, block_size, scale, part,      \
                                        num_splits, tokens);                                   \
    }

// Head sizes served (the host refuses others at start-up with a clear error). The warp count
// must match attention_warps() in host/src/backend/cuda/kernels.rs.
STEPSCOPE_DEFINE_ATTENTION(16, 4)
STEPSCOPE_DEFINE_ATTENTION(32, 4)
STEPSCOPE_DEFINE_ATTENTION(64, 4)
STEPSCOPE_DEFINE_ATTENTION(80, 4)
STEPSCOPE_DEFINE_ATTENTION(96, 4)
STEPSCOPE_DEFINE_ATTENTION(128, 4)
STEPSCOPE_DEFINE_ATTENTION(256, 2)
