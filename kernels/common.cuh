// Shared by every kernel file (the host prepends it to each .cu before compiling with NVRTC).
//
// No CUDA headers are included: the kernels need only NVRTC's built-in types (uint4, float4,
// ...), so start-up compilation works wherever libnvrtc is, without a CUDA toolkit.
//
// `act_t` is the 16-bit type of weights, the KV cache and GEMM inputs: bf16 by default, f16 when
// compiled with -DSTEPSCOPE_ACT_F16. Both are stored as raw 16-bit words and converted with
// round-to-nearest-even, exactly as torch does. Residual stream, norms, RoPE, softmax and GEMM
// outputs stay in f32.

#pragma once

typedef unsigned short act_t;

#define STEPSCOPE_WARP 32
#define STEPSCOPE_FULL_MASK 0xffffffffu
#define STEPSCOPE_NEG_INF __int_as_float(0xff800000)

#ifdef STEPSCOPE_ACT_F16

__device__ __forceinline__ float act_to_float(act_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

__device__ __forceinline__ act_t float_to_act(float f) {
    act_t v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

#else  // bf16

__device__ __forceinline__ float act_to_float(act_t v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ act_t float_to_act(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    act_t v;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        return (act_t)((u >> 16) | 0x0040u);  // quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (act_t)(u >> 16);
#endif
}

#endif

// The two 16-bit values packed in a 32-bit word (low half first in memory).
__device__ __forceinline__ float act_lo(unsigned int w) { return act_to_float((act_t)(w & 0xffffu)); }
__device__ __forceinline__ float act_hi(unsigned int w) { return act_to_float((act_t)(w >> 16)); }

// Unpacks 8 consecutive act_t values loaded as one 16-byte vector.
__device__ __forceinline__ void unpack8(const uint4 raw, float* out) {
    out[0] = act_lo(raw.x); out[1] = act_hi(raw.x);
    out[2] = act_lo(raw.y); out[3] = act_hi(raw.y);
    out[4] = act_lo(raw.z); out[5] = act_hi(raw.z);
    out[6] = act_lo(raw.w); out[7] = act_hi(raw.w);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = STEPSCOPE_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(STEPSCOPE_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = STEPSCOPE_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(STEPSCOPE_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block; `scratch` holds at least 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % STEPSCOPE_WARP;
    const int warp = threadIdx.x / STEPSCOPE_WARP;
    const int nwarps = (blockDim.x + STEPSCOPE_WARP - 1) / STEPSCOPE_WARP;
    v = warp_sum(v);
    __syncthreads();  // `scratch` may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// SwiGLU's elementwise step, silu(gate) * up (shared by silu_and_mul and the fused skinny GEMM,
// so both round the same value).
__device__ __forceinline__ float silu_mul(float g, float u) {
    return g / (1.0f + expf(-g)) * u;
}

// Tensor cores (compute capability 8.0+; used by gemm.cu and prefill_attention.cu).
#ifdef STEPSCOPE_ACT_F16
#define STEPSCOPE_MMA_TYPE "f16"
#else
#define STEPSCOPE_MMA_TYPE "bf16"
#endif

// d += A (16x16, row) * B (16x8, col) in act_t with f32 accumulation (mma.sync m16n8k16): the
// PTX fragment layout, with g = lane / 4, q = lane % 4:
// a0 = A[g][2q..2q+1], a1 = A[g+8][2q..], a2 = A[g][2q+8..], a3 = A[g+8][2q+8..];
// b0 = B[2q..2q+1][g], b1 = B[2q+8..][g]; d0, d1 = D[g][2q, 2q+1], d2, d3 = D[g+8][2q, 2q+1].
// (kernels/emu/emu.h emulates it for the CPU checks.)
__device__ __forceinline__ void mma_16816(float* d, unsigned a0, unsigned a1, unsigned a2,
                                          unsigned a3, unsigned b0, unsigned b1) {
#ifdef STEPSCOPE_EMU
    emu_mma_16816(d, a0, a1, a2, a3, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." STEPSCOPE_MMA_TYPE "." STEPSCOPE_MMA_TYPE ".f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    // Older GPUs have no m16n8k16 for these types; the host never launches the kernels that use
    // it there.
    __trap();
#endif
}
