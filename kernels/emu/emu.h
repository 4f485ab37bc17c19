// Minimal CUDA-on-CPU emulation: one std::thread per CUDA thread, real barriers for
// __syncthreads/__syncwarp and warp shuffles. Only for checking kernel logic.
//
// Warp-collective operations (shuffles, mma, ldmatrix) exchange values through per-warp slots:
// each lane writes its slot, waits on the warp barrier once and reads the others'. The slots are
// double-buffered by a per-thread phase that every collective operation flips (all lanes of a
// warp run the same sequence of them), so one barrier per operation suffices: a lane can write a
// slot again only two operations later, after a barrier that every lane reaches only once it has
// read that slot.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include <functional>
#include <memory>
using std::min; using std::max;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct WarpCtx { std::barrier<>* bar; uint32_t buf[2][32]; uint32_t ma[2][32][4]; uint32_t mb[2][32][2]; const void* addr[2][32]; };
inline thread_local WarpCtx* t_warp;
inline thread_local unsigned t_phase;  // flipped by every warp-collective operation
inline thread_local std::barrier<>* t_block;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline void __syncthreads() { t_block->arrive_and_wait(); }
inline void __syncwarp() { t_warp->bar->arrive_and_wait(); }
template <class T> T shfl_src(T v, int src) {
    uint32_t bits; memcpy(&bits, &v, 4);
    unsigned lane = threadIdx.x % 32;
    const unsigned ph = t_phase ^= 1;
    t_warp->buf[ph][lane] = bits;
    t_warp->bar->arrive_and_wait();
    uint32_t r = t_warp->buf[ph][src & 31];
    T out; memcpy(&out, &r, 4); return out;
}
template <class T> T __shfl_sync(unsigned, T v, int src) { return shfl_src(v, src); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) { return shfl_src(v, (int)((threadIdx.x % 32) ^ m)); }
extern float4 smem_f4[];

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, warp-collective: every lane hands in its
// fragments (the PTX ISA's layout, g = lane / 4, q = lane % 4), the 16x16 A and 16x8 B are
// rebuilt from all 32 lanes, and each lane gets its own four D values back.
#define STEPSCOPE_EMU 1
inline float emu_bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
inline float emu_bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
inline void emu_mma_16816(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned ph = t_phase ^= 1;
    WarpCtx* w = t_warp;
    w->ma[ph][lane][0] = a0; w->ma[ph][lane][1] = a1; w->ma[ph][lane][2] = a2; w->ma[ph][lane][3] = a3;
    w->mb[ph][lane][0] = b0; w->mb[ph][lane][1] = b1;
    w->bar->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, q = l % 4;
        for (int r = 0; r < 4; ++r) {
            const int row = g + 8 * (r % 2), kw = q + 4 * (r / 2);
            A[row][2 * kw] = emu_bf16_lo(w->ma[ph][l][r]);
            A[row][2 * kw + 1] = emu_bf16_hi(w->ma[ph][l][r]);
        }
        for (int r = 0; r < 2; ++r) {
            const int kw = q + 4 * r;
            B[2 * kw][g] = emu_bf16_lo(w->mb[ph][l][r]);
            B[2 * kw + 1][g] = emu_bf16_hi(w->mb[ph][l][r]);
        }
    }
    const int g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * q + (i % 2);
        float s = d[i];
        for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
        d[i] = s;
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, warp-collective: lane i hands in the address
// of row i % 8 of 8x8 matrix i / 8 (eight 16-bit values); lane (g = lane / 4, q = lane % 4)
// gets, for each matrix m, register m = {M[g][2q], M[g][2q+1]} (low half first), or with .trans
// {M[2q][g], M[2q+1][g]}.
inline void emu_ldmatrix_x4(unsigned* r, const void* row, bool trans) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned ph = t_phase ^= 1;
    WarpCtx* w = t_warp;
    w->addr[ph][lane] = row;
    w->bar->arrive_and_wait();
    const int g = lane / 4, q = lane % 4;
    for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* p = static_cast<const uint16_t*>(w->addr[ph][m * 8 + g]);
            lo = p[2 * q]; hi = p[2 * q + 1];
        } else {
            lo = static_cast<const uint16_t*>(w->addr[ph][m * 8 + 2 * q])[g];
            hi = static_cast<const uint16_t*>(w->addr[ph][m * 8 + 2 * q + 1])[g];
        }
        r[m] = (unsigned)lo | ((unsigned)hi << 16);
    }
}

inline void launch(Dim3 grid, unsigned block, const std::function<void()>& body) {
    gridDim = grid; blockDim = {block, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bb(block);
        unsigned nw = (block + 31) / 32;
        std::vector<std::unique_ptr<std::barrier<>>> wb;
        std::vector<WarpCtx> wc(nw);
        for (unsigned w = 0; w < nw; ++w) { wb.emplace_back(new std::barrier<>(std::min(32u, block - 32 * w))); wc[w].bar = wb.back().get(); }
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t) ts.emplace_back([&, t] {
            threadIdx = {t, 0, 0}; blockIdx = {x, y, z}; t_block = &bb; t_warp = &wc[t / 32];
            body();
        });
        for (auto& t : ts) t.join();
    }
}
