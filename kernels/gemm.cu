// Skinny GEMM for decode-sized batches: y[m, n] (+)= sum_k x[m, k] * w[n, k], with 16-bit `x`
// (row-major [m, k]) and `w` (the Hugging Face [out, in] layout), f32 `y` and f32 accumulation,
// on the tensor cores (mma.sync m16n8k16, compute capability 8.0+).
//
// Decode reads every weight once per step for a handful of tokens, so this kernel is built to
// stream `w` at full memory bandwidth rather than to reuse it: one thread block per 16 * RT
// output rows holds every token (m <= 8 * MT), and its NWARPS warps split k between them (warp
// w takes 32-wide chunks w, w + NWARPS, ...), each with U chunks of weights in flight at once.
// Each lane loads 16 bytes (8 consecutive k) of a weight row and of a token row per chunk; the
// two mma of a chunk use a permuted k order (the same for both operands, so the dot products are
// unchanged) that lets those 16-byte loads be the mma fragments as they are, with no shuffle or
// shared-memory staging. The warps' partial sums are added in a fixed tree order (deterministic:
// the same inputs give bit-identical outputs) and written once, by warp 0.
//
// The SILU variant computes the gate/up projection and SwiGLU at once: `w` holds [gate; up]
// (2 * n rows), each block takes 16 gate rows and the 16 matching up rows, and writes
// act[m, n] = silu(gate) * up in the 16-bit type instead of y (one launch and the f32 gate|up
// round trip saved).
//
// Requires k % 8 == 0 (16-byte rows); any m <= 8 * MT and any n (tails are masked).
// The host (host/src/backend/cuda/gemm.rs) times this kernel against cuBLAS for each shape at
// start-up and uses whichever is faster, after checking that the two agree.
#include "common.cuh"

#define GEMM_NWARPS 8

// 16 bytes of weights: read once per step, so kept out of L1 (L2 still caches them).
__device__ __forceinline__ uint4 load_stream(const act_t* p) {
#if defined(STEPSCOPE_EMU) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
    // (Before 8.0 the kernel is never launched; this keeps the file compiling for any GPU.)
    return *reinterpret_cast<const uint4*>(p);
#else
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#endif
}

template <int RT, int MT, int U, bool SILU>
__device__ __forceinline__ void skinny_gemm_impl(
    float* __restrict__ y,          // [m, n] f32 (unless SILU)
    act_t* __restrict__ act,        // [m, n] (SILU only)
    const act_t* __restrict__ w,    // [n, k] ([2n, k] with SILU)
    const act_t* __restrict__ x,    // [m, k]
    int m, int n, int k, int accumulate)
{
    static_assert(!SILU || RT == 2, "the SILU variant pairs one gate and one up row tile");
    // Shared memory: the tree reduction, [NWARPS / 2][RT * MT * 4][32] f32.
    extern __shared__ float4 smem_f4[];
    float* red = reinterpret_cast<float*>(smem_f4);
    constexpr int NACC = RT * MT * 4;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2;
    const int q = lane & 3;
    const int n0 = blockIdx.x * 16 * (SILU ? 1 : RT);

    float acc[RT][MT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.0f;

    // Row pointers of this lane (rows past n and tokens past m read nothing).
    const act_t* wrow[RT][2];
    bool wok[RT][2];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = SILU ? n0 + g + 8 * h : n0 + r * 16 + g + 8 * h;
            wok[r][h] = row < n;
            // With SILU, tile 1 is the up projection: the same features, n rows further.
            const int wr = SILU && r == 1 ? row + n : row;
            wrow[r][h] = w + (size_t)(wok[r][h] ? wr : 0) * k + q * 8;
        }
    const act_t* xrow[MT];
    bool xok[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        const int tok = j * 8 + g;
        xok[j] = tok < m;
        xrow[j] = x + (size_t)(xok[j] ? tok : 0) * k + q * 8;
    }

    const uint4 zero = {0u, 0u, 0u, 0u};
    const int nchunks = (k + 31) / 32;
    for (int c0 = warp; c0 < nchunks; c0 += GEMM_NWARPS * U) {
        // Issue every weight load of the U chunks before using any of them.
        uint4 a[U][RT][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * GEMM_NWARPS;
            const bool kin = c < nchunks && c * 32 + q * 8 < k;
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    a[u][r][h] = (kin && wok[r][h]) ? load_stream(wrow[r][h] + c * 32) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * GEMM_NWARPS;
            const bool kin = c < nchunks && c * 32 + q * 8 < k;
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                const uint4 b = (kin && xok[j])
                    ? *reinterpret_cast<const uint4*>(xrow[j] + c * 32) : zero;
#pragma unroll
                for (int r = 0; r < RT; ++r) {
                    // Chunk-local k of this lane's 8 values: 8q .. 8q+7. The first mma takes
                    // words 0 and 1 (k 8q..8q+3) as its logical k 2q, 2q+1, 2q+8, 2q+9; the
                    // second takes words 2 and 3.
                    mma_16816(acc[r][j], a[u][r][0].x, a[u][r][1].x, a[u][r][0].y, a[u][r][1].y,
                              b.x, b.y);
                    mma_16816(acc[r][j], a[u][r][0].z, a[u][r][1].z, a[u][r][0].w, a[u][r][1].w,
                              b.z, b.w);
                }
            }
        }
    }

    // Tree reduction over the warps: the upper half adds into the lower half, halving each time.
#pragma unroll
    for (int half = GEMM_NWARPS / 2; half > 0; half /= 2) {
        if (warp >= half && warp < 2 * half) {
            float* dst = red + (size_t)(warp - half) * NACC * 32;
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int j = 0; j < MT; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) dst[((r * MT + j) * 4 + i) * 32 + lane] = acc[r][j][i];
        }
        __syncthreads();
        if (warp < half) {
            const float* src = red + (size_t)warp * NACC * 32;
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int j = 0; j < MT; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[r][j][i] += src[((r * MT + j) * 4 + i) * 32 + lane];
        }
        __syncthreads();
    }

    if (warp != 0) return;
    if constexpr (SILU) {
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = n0 + g + 8 * (i >> 1);
                const int tok = j * 8 + 2 * q + (i & 1);
                if (col < n && tok < m)
                    act[(size_t)tok * n + col] = float_to_act(silu_mul(acc[0][j][i], acc[1][j][i]));
            }
    } else {
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int j = 0; j < MT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = n0 + r * 16 + g + 8 * (i >> 1);
                    const int tok = j * 8 + 2 * q + (i & 1);
                    if (row < n && tok < m) {
                        float* dst = y + (size_t)tok * n + row;
                        *dst = accumulate ? *dst + acc[r][j][i] : acc[r][j][i];
                    }
                }
    }
}

// Grid: (ceil(n / (16 * RT))), block: GEMM_NWARPS * 32 threads,
// shared memory: GEMM_NWARPS / 2 * RT * MT * 4 * 32 * 4 bytes.
#define STEPSCOPE_DEFINE_SKINNY_GEMM(RT, MT, U)                                               \
    extern "C" __global__ void __launch_bounds__(GEMM_NWARPS * 32) skinny_gemm_r##RT##_m##MT( \
        float* __restrict__ y, const act_t* __restrict__ w, const act_t* __restrict__ x,      \
        int m, int n, int k, int accumulate) {                                                \
        skinny_gemm_impl<RT, MT, U, false>(y, nullptr, w, x, m, n, k, accumulate);            \
    }

// Grid: (ceil(n / 16)) for n = intermediate size, block and shared memory as RT = 2.
#define STEPSCOPE_DEFINE_SKINNY_GEMM_SILU(MT, U)                                              \
    extern "C" __global__ void __launch_bounds__(GEMM_NWARPS * 32) skinny_gemm_silu_m##MT(    \
        act_t* __restrict__ act, const act_t* __restrict__ w, const act_t* __restrict__ x,    \
        int m, int n, int k) {                                                                \
        skinny_gemm_impl<2, MT, U, true>(nullptr, act, w, x, m, n, k, 0);                     \
    }

// Names must match SKINNY_GEMM_FUNCTIONS in host/src/backend/cuda/nvrtc.rs.
STEPSCOPE_DEFINE_SKINNY_GEMM(1, 1, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM(1, 2, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM(1, 4, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM(1, 8, 2)
STEPSCOPE_DEFINE_SKINNY_GEMM(2, 1, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM(2, 2, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM(2, 4, 2)
STEPSCOPE_DEFINE_SKINNY_GEMM(2, 8, 2)
STEPSCOPE_DEFINE_SKINNY_GEMM_SILU(1, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM_SILU(2, 4)
STEPSCOPE_DEFINE_SKINNY_GEMM_SILU(4, 2)
STEPSCOPE_DEFINE_SKINNY_GEMM_SILU(8, 2)
