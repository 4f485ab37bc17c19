// Prefill attention on the tensor cores (flash-attention-2 style), for the entries of a step that
// bring many new tokens (a prompt or a long prefill chunk); decode tokens and short chunks keep
// the paged kernel of attention.cu, which the host gives the remaining tokens as a list.
//
// Rows: an entry of n new tokens has n * G query rows, G = num_heads / num_kv_heads, ordered
// token-major (row = token * G + head within the KV head's group), so that the query heads
// sharing a KV head are stacked as rows and read each key once. One thread block takes a tile of
// PREFILL_ROWS = 16 * PREFILL_NWARPS consecutive rows of one entry for one KV head (blockIdx.y);
// the host lists the tiles as (entry's first token in the step, entry's token count, tile's first
// row), largest keys first. Each warp owns 16 rows, holds their queries as mma A fragments
// (converted once to act_t with scale * log2(e) folded in) and its 16 x D output accumulator in
// f32 registers.
//
// The block walks key tiles of BN keys (64; 16 for head_dim 256, whose 16 x 256 f32 accumulator
// takes half the registers) from key 0 up to the tile's largest context (its last row's: an
// entry's tokens are consecutive positions). K and V tiles are copied from the paged cache
// (through the entry's block table) into shared memory with cp.async, keys past the range
// zero-filled; the V copy of a tile and the K copy of the next overlap the score and softmax
// work. Per key tile, each warp computes S = Q·Kᵀ (16 x BN) with mma.sync.m16n8k16 (K fragments
// by ldmatrix), masks keys at or past each row's context (causal), updates the running max and
// sum of each row in f32 (exp2), rounds P to act_t and accumulates O += P·V with mma.sync (V
// fragments by ldmatrix.trans; the S accumulator layout is P's A fragment as it is). The row sum
// adds the rounded P, the weights V is actually multiplied by. A warp skips the key tiles past
// all its rows' contexts (the causal triangle; a warp whose rows all lie past a ragged tile's end
// computes nothing), and masks only the key tiles that reach past its shortest context. At the
// end O / sum is written in act_t, like the paged kernel's output.
//
// Precision: Q is rounded to act_t (scores then carry about one act_t rounding of |q|·|k|),
// P is rounded to act_t, everything else is f32. Needs compute capability 8.0+ (mma.sync for
// bf16, cp.async, ldmatrix); the host uses it only there.
//
// Shared memory: K and V tiles, 2 * BN * (D + 8) act_t (rows padded by 16 bytes, so that
// ldmatrix and cp.async are free of bank conflicts); 34 816 bytes for D = 128, under the 48 KiB
// a launch gets without opting in.
//
// Cache layout per layer: [num_blocks][num_kv_heads][block_size][head_dim] act_t.
#include "common.cuh"

#define PREFILL_NWARPS 4
// Query rows per thread block (PREFILL_ATTENTION_ROWS in runner/step.rs).
#define PREFILL_ROWS 64

// A shared-memory address of act_t data: the 32-bit shared-window address on the GPU (computed
// once per pointer and then offset, so that no 64-bit generic address is kept per use), a plain
// pointer on the CPU emulator.
#if defined(STEPSCOPE_EMU) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
typedef act_t* sptr_t;
__device__ __forceinline__ sptr_t to_sptr(act_t* p) { return p; }
__device__ __forceinline__ sptr_t sptr_add(sptr_t p, int elems) { return p + elems; }
#else
typedef unsigned sptr_t;
__device__ __forceinline__ sptr_t to_sptr(act_t* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ sptr_t sptr_add(sptr_t p, int elems) { return p + 2u * (unsigned)elems; }
#endif

// 16 bytes global -> shared, asynchronous (8.0+); zeros when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(sptr_t dst, const act_t* src, bool valid) {
#if defined(STEPSCOPE_EMU)
    if (valid) memcpy(dst, src, 16); else memset(dst, 0, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
    // (Before 8.0 the kernel is never launched; this keeps the file compiling for any GPU.)
    const uint4 zero = {0u, 0u, 0u, 0u};
    *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : zero;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(STEPSCOPE_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(STEPSCOPE_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
#endif
}

// Four 8x8 act_t matrices from shared memory: lane i gives the address of row i % 8 of matrix
// i / 8; r[m] = {M[g][2q], M[g][2q+1]}, or with TRANS {M[2q][g], M[2q+1][g]} (g = lane / 4,
// q = lane % 4): the mma B fragment of a row-major [n][k] (TRANS: [k][n]) operand.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, sptr_t row) {
#if defined(STEPSCOPE_EMU)
    emu_ldmatrix_x4(r, row, TRANS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
    }
#else
    __trap();
#endif
}

__device__ __forceinline__ unsigned pack_act2(float lo, float hi) {
    return (unsigned)float_to_act(lo) | ((unsigned)float_to_act(hi) << 16);
}

// Copies keys [k0, k0 + BN) of KV head `kvh` (zeros at and past `k_end`) into a [BN][D + 8]
// shared tile: each thread copies the 16-byte piece `c` of keys i0, i0 + RPP, ... (RPP keys per
// pass of the block; with D = 80 or 96 a few threads idle). `dst` is this thread's first piece.
template <int D, int BN>
__device__ __forceinline__ void load_kv_tile(sptr_t dst, const act_t* __restrict__ cache,
                                             const int* __restrict__ bt, int k0, int k_end,
                                             int kvh, int num_kv_heads, int block_size) {
    constexpr int CHUNKS = D / 8;  // 16-byte pieces per key
    constexpr int RPP = PREFILL_NWARPS * 32 / CHUNKS;
    const int i0 = threadIdx.x / CHUNKS;
    const int c = threadIdx.x - i0 * CHUNKS;
    if (i0 >= RPP) return;
#pragma unroll
    for (int i = i0, pass = 0; pass < (BN + RPP - 1) / RPP; i += RPP, ++pass) {
        if (BN % RPP != 0 && i >= BN) break;
        const int j = k0 + i;
        const bool valid = j < k_end;
        const act_t* src = cache;
        if (valid) {
            const int bi = j / block_size;
            const int s = j - bi * block_size;
            src = cache + (((size_t)bt[bi] * num_kv_heads + kvh) * block_size + s) * D + c * 8;
        }
        cp_async16(sptr_add(dst, pass * RPP * (D + 8)), src, valid);
    }
}

template <int D, int BN>
__device__ __forceinline__ void prefill_attention_impl(
    act_t* __restrict__ out,                       // [num_tokens, num_heads * D]
    const float* __restrict__ qkv,                 // [num_tokens, row_stride], rotated q first
    const act_t* __restrict__ k_cache,
    const act_t* __restrict__ v_cache,
    const int* __restrict__ context_lens,          // [num_tokens]: position + 1
    const int* __restrict__ block_table_offsets,   // [num_tokens]: start of its block table
    const int* __restrict__ block_tables,          // all requests' block tables, concatenated
    const int* __restrict__ tiles,                 // [num_tiles][3]: first token, tokens, row
    int row_stride,
    int num_heads,
    int num_kv_heads,
    int block_size,
    float scale)
{
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    static_assert(BN % 16 == 0, "key tile must be a multiple of 16");
    static_assert(PREFILL_ROWS == 16 * PREFILL_NWARPS, "16 rows per warp");
    constexpr int KS = D / 16;     // k-steps of S = Q·Kᵀ
    constexpr int NT = BN / 8;     // n8 tiles of S (keys)
    constexpr int DT = D / 8;      // n8 tiles of O (dimensions)
    constexpr int STRIDE = D + 8;  // shared row, in act_t
    extern __shared__ float4 smem_f4[];
    act_t* k_s = reinterpret_cast<act_t*>(smem_f4);
    act_t* v_s = k_s + BN * STRIDE;

    const int t0 = tiles[3 * blockIdx.x];
    const int n_tokens = tiles[3 * blockIdx.x + 1];
    const int r0 = tiles[3 * blockIdx.x + 2];
    const int kvh = blockIdx.y;
    const int group = num_heads / num_kv_heads;
    const int nrows = min(PREFILL_ROWS, n_tokens * group - r0);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2;
    const int q = lane & 3;

    // This lane's rows g and g + 8 of the warp's 16; rows past the tile's end repeat its last
    // row (computed, never written).
    int tok[2], head[2], ctx[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int er = r0 + min(warp * 16 + g + 8 * h, nrows - 1);
        tok[h] = t0 + er / group;
        head[h] = kvh * group + er % group;
        ctx[h] = context_lens[tok[h]];
    }
    // Contexts grow with the row (consecutive positions): the block's keys end at its last row's
    // context, the warp's span its first and last rows' contexts.
    const int k_end = context_lens[t0 + (r0 + nrows - 1) / group];
    const bool warp_has_rows = warp * 16 < nrows;
    const int warp_lo = context_lens[t0 + (r0 + min(warp * 16, nrows - 1)) / group];
    const int warp_hi = context_lens[t0 + (r0 + min(warp * 16 + 15, nrows - 1)) / group];
    const int* bt = block_tables + block_table_offsets[t0];

    // Queries as A fragments, scaled so that the softmax can use exp2.
    unsigned qf[KS][4];
    {
        const float qs = scale * 1.4426950408889634f;
        const float* qrow0 = qkv + (size_t)tok[0] * row_stride + (size_t)head[0] * D + 2 * q;
        const float* qrow1 = qkv + (size_t)tok[1] * row_stride + (size_t)head[1] * D + 2 * q;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const int d = ks * 16;
            qf[ks][0] = pack_act2(qrow0[d] * qs, qrow0[d + 1] * qs);
            qf[ks][1] = pack_act2(qrow1[d] * qs, qrow1[d + 1] * qs);
            qf[ks][2] = pack_act2(qrow0[d + 8] * qs, qrow0[d + 9] * qs);
            qf[ks][3] = pack_act2(qrow1[d + 8] * qs, qrow1[d + 9] * qs);
        }
    }

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[i][c] = 0.0f;
    float m[2] = {STEPSCOPE_NEG_INF, STEPSCOPE_NEG_INF};
    float l[2] = {0.0f, 0.0f};  // this lane's share of the row sums (the quad adds them at the end)

    // ldmatrix row addresses of this lane (see ldmatrix_x4): K as [key][dim] for the B fragments
    // of two key n8 tiles per call; V as [key][dim], transposed, for two dimension n8 tiles.
    const int lm = lane / 8, lr = lane % 8;
    const sptr_t k_frag = to_sptr(k_s + ((lm >> 1) * 8 + lr) * STRIDE + (lm & 1) * 8);
    const sptr_t v_frag = to_sptr(v_s + ((lm & 1) * 8 + lr) * STRIDE + (lm >> 1) * 8);
    // This thread's first piece of the K and V tiles (see load_kv_tile).
    const sptr_t k_dst = to_sptr(k_s + (threadIdx.x / (D / 8)) * STRIDE + (threadIdx.x % (D / 8)) * 8);
    const sptr_t v_dst = to_sptr(v_s + (threadIdx.x / (D / 8)) * STRIDE + (threadIdx.x % (D / 8)) * 8);

    const int nkb = (k_end + BN - 1) / BN;
    load_kv_tile<D, BN>(k_dst, k_cache, bt, 0, k_end, kvh, num_kv_heads, block_size);
    cp_async_commit();
    for (int kb = 0; kb < nkb; ++kb) {
        const int k0 = kb * BN;
        cp_async_wait<0>();
        __syncthreads();  // K[kb] is in; every warp is done with V[kb - 1]
        load_kv_tile<D, BN>(v_dst, v_cache, bt, k0, k_end, kvh, num_kv_heads, block_size);
        cp_async_commit();

        const bool active = warp_has_rows && k0 < warp_hi;
        float s[NT][4];
        if (active) {
#pragma unroll
            for (int i = 0; i < NT; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[i][c] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    unsigned b[4];
                    ldmatrix_x4<false>(b, sptr_add(k_frag, np * 16 * STRIDE + ks * 16));
                    mma_16816(s[2 * np], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b[0], b[1]);
                    mma_16816(s[2 * np + 1], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with K[kb]
        if (kb + 1 < nkb)
            load_kv_tile<D, BN>(k_dst, k_cache, bt, k0 + BN, k_end, kvh, num_kv_heads, block_size);
        cp_async_commit();

        unsigned p[NT / 2][4];  // P as A fragments, one per 16 keys
        if (active) {
            if (k0 + BN > warp_lo) {  // some key of this tile is at or past a row's context
#pragma unroll
                for (int i = 0; i < NT; ++i)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const int j = k0 + i * 8 + 2 * q + (c & 1);
                        if (j >= ctx[c >> 1]) s[i][c] = STEPSCOPE_NEG_INF;
                    }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = STEPSCOPE_NEG_INF;
#pragma unroll
                for (int i = 0; i < NT; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * h], s[i][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(STEPSCOPE_FULL_MASK, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(STEPSCOPE_FULL_MASK, mx, 2));
                // Finite: key 0 is valid for every row, so m is finite from the first tile on.
                const float m_new = fmaxf(m[h], mx);
                const float alpha = exp2f(m[h] - m_new);
                m[h] = m_new;
                l[h] *= alpha;
#pragma unroll
                for (int i = 0; i < DT; ++i) {
                    o[i][2 * h] *= alpha;
                    o[i][2 * h + 1] *= alpha;
                }
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    const act_t p0 = float_to_act(exp2f(s[i][2 * h] - m_new));
                    const act_t p1 = float_to_act(exp2f(s[i][2 * h + 1] - m_new));
                    l[h] += act_to_float(p0) + act_to_float(p1);
                    // S tile i holds keys 8i..8i+7: registers 0/1 (keys +0..7) or 2/3 (+8..15)
                    // of the A fragment of keys 16 * (i / 2).., rows g (h = 0) or g + 8.
                    p[i / 2][(i & 1) * 2 + h] = (unsigned)p0 | ((unsigned)p1 << 16);
                }
            }
        }
        cp_async_wait<1>();
        __syncthreads();  // V[kb] is in (K[kb + 1] may still be in flight)
        if (active) {
#pragma unroll
            for (int kk = 0; kk < NT / 2; ++kk) {
#pragma unroll
                for (int dp = 0; dp < DT / 2; ++dp) {
                    unsigned b[4];
                    ldmatrix_x4<true>(b, sptr_add(v_frag, kk * 16 * STRIDE + dp * 16));
                    mma_16816(o[2 * dp], p[kk][0], p[kk][1], p[kk][2], p[kk][3], b[0], b[1]);
                    mma_16816(o[2 * dp + 1], p[kk][0], p[kk][1], p[kk][2], p[kk][3], b[2], b[3]);
                }
            }
        }
    }

    // Normalise and write rows g and g + 8 (two dimensions per 32-bit store).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = l[h];
        sum += __shfl_xor_sync(STEPSCOPE_FULL_MASK, sum, 1);
        sum += __shfl_xor_sync(STEPSCOPE_FULL_MASK, sum, 2);
        const float inv = 1.0f / sum;
        if (warp * 16 + g + 8 * h < nrows) {
            unsigned* dst = reinterpret_cast<unsigned*>(
                out + (size_t)tok[h] * num_heads * D + (size_t)head[h] * D + 2 * q);
#pragma unroll
            for (int i = 0; i < DT; ++i) dst[i * 4] = pack_act2(o[i][2 * h] * inv, o[i][2 * h + 1] * inv);
        }
    }
}

// Grid: (number of tiles, num_kv_heads), block: PREFILL_NWARPS * 32 threads, shared memory:
// 2 * BN * (D + 8) * sizeof(act_t) bytes. Launch bounds: ptxas (NVRTC 12.9) spilled a few bytes
// for head_dim 16 on sm_90 (f16) without a minimum of blocks per SM, and for head_dim 256 with
// any minimum; 0 leaves the minimum unset (no .minnctapersm), so both are spill-free on sm_80
// and sm_90, bf16 and f16.
#define STEPSCOPE_DEFINE_PREFILL_ATTENTION(D, BN)                                              \
    extern "C" __global__ void __launch_bounds__(PREFILL_NWARPS * 32, (D) > 128 ? 0 : 1) prefill_attention_d##D( \
        act_t* __restrict__ out, const float* __restrict__ qkv,                                \
        const act_t* __restrict__ k_cache, const act_t* __restrict__ v_cache,                  \
        const int* __restrict__ context_lens, const int* __restrict__ block_table_offsets,     \
        const int* __restrict__ block_tables, const int* __restrict__ tiles, int row_stride,   \
        int num_heads, int num_kv_heads, int block_size, float scale) {                        \
        prefill_attention_impl<D, BN>(out, qkv, k_cache, v_cache, context_lens,                \
                                      block_table_offsets, block_tables, tiles, row_stride,    \
                                      num_heads, num_kv_heads, block_size, scale);             \
    }

// Head sizes (every one of attention.cu's that is a multiple of 16) and key tiles; must match
// PREFILL_ATTENTION_HEAD_DIMS and prefill_attention_key_tile() in host/src/backend/cuda/nvrtc.rs.
STEPSCOPE_DEFINE_PREFILL_ATTENTION(16, 64)
STEPSCOPE_DEFINE_PREFILL_ATTENTION(32, 64)
STEPSCOPE_DEFINE_PREFILL_ATTENTION(64, 64)
STEPSCOPE_DEFINE_PREFILL_ATTENTION(80, 64)
STEPSCOPE_DEFINE_PREFILL_ATTENTION(96, 64)
STEPSCOPE_DEFINE_PREFILL_ATTENTION(128, 64)
STEPSCOPE_DEFINE_PREFILL_ATTENTION(256, 16)
