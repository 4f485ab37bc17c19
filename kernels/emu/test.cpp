// Checks the kernels' logic on the CPU (no GPU): kernels/emu/emu.h runs every CUDA thread as a
// std::thread with real barriers for __syncthreads/__syncwarp and the warp shuffles, and this file
// compares each kernel against a straightforward reference (attention in f64 over the paged
// cache, for every head size and several GQA groupings, block sizes and context lengths; the
// tensor-core prefill attention on steps that mix it with the paged kernel, per element within a
// derived rounding bound, and a mutated causal mask that the check must catch).
// Tolerances: attention, RMSNorm and SiLU-and-multiply compute in f32 and round once, to the
// 16-bit output, so each element must be within one bf16 rounding of the double-precision
// reference (2^-8·|ref|) plus a small allowance for the f32 arithmetic: 2^-16 of |ref|, for
// attention of the weighted mean |v| (its sums err relative to that, and cancellation makes
// |ref| far smaller); they print their worst err/bound ratio. The attention check is shown to
// be able to fail: the exact answer with one key in 64 dropped must be rejected in every case.
// Built and run by the Rust test `kernels_behave_on_the_cpu_emulator` (host/src/backend/cuda/
// tests.rs), which copies the kernels to k/ with `extern __shared__` turned into `extern` (the
// emulator's shared memory is a static array). bf16 only (the f16 path uses PTX instructions).
#include "emu.h"
#include "k/common.cuh"
#include "k/attention.cu"
#include "k/rmsnorm.cu"
#include "k/kv_cache.cu"
#include "k/activation.cu"
#include "k/sampling.cu"
#include "k/embedding.cu"
#include "k/elementwise.cu"
#include "k/gemm.cu"
#include "k/prefill_attention.cu"
#include <cstdio>
#include <random>
float4 smem_f4[8192];

static uint16_t f2bf(float f) { uint32_t u = __float_as_uint(f); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
static float bf2f(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
static int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { printf("FAIL: " __VA_ARGS__); printf("\n"); fails++; } } while (0)

typedef void (*AttnFn)(act_t*, const float*, const act_t*, const act_t*, const int*, const int*, const int*, int, int, int, int, float, float*, int, const int*);

void test_attention(int D, AttnFn fn, int nwarps, int nh, int nkv, int bs, std::vector<int> ctx, unsigned seed, int splits = 1) {
    std::mt19937 rng(seed); std::uniform_real_distribution<float> U(-1, 1);
    int T = ctx.size();
    int group = nh / nkv;
    int row_stride = (nh + 2 * nkv) * D + 3;
    // block tables: each token its own request with shuffled blocks
    int nblocks = 0; std::vector<int> tables, offs;
    for (int L : ctx) { offs.push_back(tables.size()); int nb = (L + bs - 1) / bs; for (int i = 0; i < nb; ++i) tables.push_back(nblocks++); }
    std::vector<int> perm(nblocks); for (int i = 0; i < nblocks; ++i) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
    for (auto& b : tables) b = perm[b];
    size_t cache_elems = (size_t)nblocks * nkv * bs * D;
    std::vector<uint16_t> kc(cache_elems), vc(cache_elems);
    for (auto& x : kc) x = f2bf(U(rng) * 2); for (auto& x : vc) x = f2bf(U(rng));
    std::vector<float> qkv((size_t)T * row_stride); for (auto& x : qkv) x = U(rng);
    std::vector<uint16_t> out((size_t)T * nh * D, 0xffff);
    float scale = 1.0f / sqrtf((float)D);
    int gmax = std::min(group, 8);
    size_t smem = gmax * D * 4 + std::max((size_t)nwarps * 32 * (D + 8) * 2, (size_t)nwarps * gmax * (D + 2) * 4);
    CHECK(smem <= sizeof(smem_f4), "smem %zu", smem);
    memset(smem_f4, 0x7f, sizeof(smem_f4));  // garbage
    std::vector<float> part((size_t)T * nh * splits * (D + 2), 1e30f);  // garbage
    launch({(unsigned)T, (unsigned)nkv, (unsigned)((group + 7) / 8 * splits)}, nwarps * 32, [&] {
        fn(out.data(), qkv.data(), kc.data(), vc.data(), ctx.data(), offs.data(), tables.data(), row_stride, nh, nkv, bs, scale, part.data(), splits, nullptr);
    });
    if (splits > 1) launch({(unsigned)T, (unsigned)nh, 1}, 64, [&] { attention_combine(out.data(), part.data(), nh, D, splits, nullptr); });
    // Reference in double over the same 16-bit K and V (q is f32 in both). The kernel computes
    // in f32 and rounds once, to the 16-bit output, so every element must be within one bf16
    // rounding of the reference (half an ulp: at most 2^-8·|ref|) plus an allowance for the f32
    // arithmetic (q·scale, scores, exp, the online-softmax rescaling, the P·V sums, the merges).
    // Those err relative to the terms summed, s = Σ p_j·|v_j| / Σ p_j, not to |ref|, which
    // cancellation makes far smaller (outputs ~0.03 where s ~0.5): measured at most 3e-8·s
    // here; the allowance is 2^-16·s (1.5e-5·s). A kernel that drops key k misses
    // p_k·(v_k - ref) / Σ p, about s/L: the self-test below hands the checker the exact answer
    // with the keys j % 64 == 63 dropped (1.6%), rounded to bf16, and requires a rejection (the
    // former bound, 1e-2 absolute, let such a kernel through at a context of 1000).
    const double u_bf16 = 1.0 / 256, f32_slack = 1.0 / 65536;
    double maxerr = 0, worst = 0, worst_drop = 0;
    bool any_dropped = false;
    for (int t = 0; t < T; ++t) for (int h = 0; h < nh; ++h) {
        int kvh = h / group; int L = ctx[t];
        std::vector<double> s(L);
        std::vector<size_t> voff(L);
        double mx = -1e30;
        for (int j = 0; j < L; ++j) {
            int blk = tables[offs[t] + j / bs]; int sl = j % bs;
            size_t off = (((size_t)blk * nkv + kvh) * bs + sl) * D;
            voff[j] = off;
            double acc = 0; for (int d = 0; d < D; ++d) acc += (double)qkv[(size_t)t * row_stride + h * D + d] * scale * bf2f(kc[off + d]);
            s[j] = acc; mx = std::max(mx, acc);
        }
        double sum = 0, sum_drop = 0;
        for (int j = 0; j < L; ++j) { s[j] = exp(s[j] - mx); sum += s[j]; if (j % 64 != 63) sum_drop += s[j]; }
        any_dropped |= L >= 64;
        for (int d = 0; d < D; ++d) {
            double o = 0, a = 0, o_drop = 0;
            for (int j = 0; j < L; ++j) {
                double v = bf2f(vc[voff[j] + d]);
                o += s[j] * v; a += s[j] * fabs(v);
                if (j % 64 != 63) o_drop += s[j] * v;
            }
            o /= sum; a /= sum; o_drop /= sum_drop;
            double bound = u_bf16 * fabs(o) + f32_slack * a;
            double e = fabs((double)bf2f(out[(size_t)t * nh * D + h * D + d]) - o);
            maxerr = std::max(maxerr, e);
            worst = std::max(worst, e / bound);
            // What the checker says of a kernel that drops keys j % 64 == 63.
            worst_drop = std::max(worst_drop, fabs((double)bf2f(f2bf((float)o_drop)) - o) / bound);
        }
    }
    printf("attention D=%d nh=%d nkv=%d bs=%d T=%d splits=%d: max abs err %.2e, worst err/bound %.3f", D, nh, nkv, bs, T, splits, maxerr, worst);
    if (any_dropped) printf(" (one key in 64 dropped: %.1f)", worst_drop);
    printf("\n");
    CHECK(worst <= 1, "attention D=%d: error %.3f times the bound", D, worst);
    CHECK(!any_dropped || worst_drop > 1, "attention D=%d: the check passes a kernel that drops one key in 64", D);
}

typedef void (*PrefillFn)(act_t*, const float*, const act_t*, const act_t*, const int*, const int*, const int*, const int*, int, int, int, int, float);

// One entry of a step: n new tokens at positions start .. start + n - 1.
struct StepEntry { int start, n; };
static const int kPrefillMinTokens = 64;  // PREFILL_ATTENTION_MIN_TOKENS in runner/step.rs
static const int kPrefillRows = 64;       // PREFILL_ROWS in prefill_attention.cu

// A step of several entries as the runner lays it out: entries with at least kPrefillMinTokens
// new tokens go to the prefill kernel (tiles of 64 query rows, last tile first), the other tokens
// to the paged kernel through its token list (split over `splits` key ranges); both write the same
// output, checked element by element against attention in f64 over the paged cache (shuffled
// block tables). Returns the number of elements past the bound; `ctx_shift` is added to the
// context lengths the prefill kernel sees (a mutation: the check must catch it) and `extra_keys`
// keys past each entry's last token are in the cache (so that a shifted context reads real keys).
int test_prefill(const char* name, int D, PrefillFn fn, int bn, AttnFn paged, int paged_warps, int nh, int nkv,
                 int bs, std::vector<StepEntry> entries, unsigned seed, float qmag = 1.0f, int splits = 1,
                 int extra_keys = 0, int ctx_shift = 0) {
    std::mt19937 rng(seed); std::uniform_real_distribution<float> U(-1, 1);
    const int group = nh / nkv;
    const int row_stride = (nh + 2 * nkv) * D + 2;
    std::vector<int> tables, entry_off, ctx, offs, paged_tokens, tiles;
    int nblocks = 0, T = 0;
    for (auto& e : entries) {
        entry_off.push_back(tables.size());
        int nb = (e.start + e.n + extra_keys + bs - 1) / bs;
        for (int i = 0; i < nb; ++i) tables.push_back(nblocks++);
    }
    std::vector<int> perm(nblocks); for (int i = 0; i < nblocks; ++i) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
    for (auto& b : tables) b = perm[b];
    for (size_t ei = 0; ei < entries.size(); ++ei) {
        auto& e = entries[ei];
        const int t0 = T;
        for (int i = 0; i < e.n; ++i) { ctx.push_back(e.start + i + 1); offs.push_back(entry_off[ei]); T++; }
        if (e.n >= kPrefillMinTokens) {
            const int ntiles = (e.n * group + kPrefillRows - 1) / kPrefillRows;
            for (int j = ntiles - 1; j >= 0; --j) { tiles.push_back(t0); tiles.push_back(e.n); tiles.push_back(j * kPrefillRows); }
        } else {
            for (int i = 0; i < e.n; ++i) paged_tokens.push_back(t0 + i);
        }
    }
    const size_t cache_elems = (size_t)nblocks * nkv * bs * D;
    std::vector<uint16_t> kc(cache_elems), vc(cache_elems);
    for (auto& x : kc) x = f2bf(U(rng) * 2); for (auto& x : vc) x = f2bf(U(rng));
    std::vector<float> qkv((size_t)T * row_stride); for (auto& x : qkv) x = U(rng) * qmag;
    std::vector<uint16_t> out((size_t)T * nh * D, 0xffff);  // NaN: every element must be written
    const float scale = 1.0f / sqrtf((float)D);
    const int ntiles = tiles.size() / 3, npaged = paged_tokens.size();
    if (npaged > 0) {
        std::vector<float> part((size_t)npaged * nh * splits * (D + 2), 1e30f);
        const int gmax = std::min(group, 8);
        memset(smem_f4, 0x7f, sizeof(smem_f4));
        launch({(unsigned)npaged, (unsigned)nkv, (unsigned)((group + 7) / 8 * splits)}, paged_warps * 32, [&] {
            paged(out.data(), qkv.data(), kc.data(), vc.data(), ctx.data(), offs.data(), tables.data(), row_stride, nh, nkv, bs, scale, part.data(), splits, paged_tokens.data());
        });
        if (splits > 1) launch({(unsigned)npaged, (unsigned)nh, 1}, 64, [&] { attention_combine(out.data(), part.data(), nh, D, splits, paged_tokens.data()); });
    }
    if (ntiles > 0) {
        const size_t smem = (size_t)2 * bn * (D + 8) * 2;
        CHECK(smem <= sizeof(smem_f4) && smem <= 48 * 1024, "prefill smem %zu", smem);
        memset(smem_f4, 0xff, sizeof(smem_f4));  // NaN garbage
        std::vector<int> kctx = ctx; for (auto& c : kctx) c += ctx_shift;
        launch({(unsigned)ntiles, (unsigned)nkv, 1}, PREFILL_NWARPS * 32, [&] {
            fn(out.data(), qkv.data(), kc.data(), vc.data(), kctx.data(), offs.data(), tables.data(), tiles.data(), row_stride, nh, nkv, bs, scale);
        });
    }
    // Two references in f64 per (token, head), over the token's keys in the paged cache:
    // (A) with the query rounded to bf16 as the kernel does by design (q * scale * log2(e), then
    //     exp2), so that only the kernel's own arithmetic differs: bound
    //     u * |o| + u (1 + u) / (1 - u) * sum_j w_j |v_j - o| + 2^-20 * sum_j w_j |v_j|,
    //     u = 2^-8 (bf16's unit roundoff): one rounding of the output plus one of the weights
    //     (the kernel rounds P to bf16 and sums the rounded P: with p_j (1 + e_j), |e_j| <= u,
    //     o moves by sum_j w_j (e_j - e) (v_j - o) / (1 + e), e = sum_j w_j e_j), and f32 slack;
    // (B) test_attention's, exact queries: bound u * |o| + ((1 + u) / (1 - u) * e^(2 D) - 1) *
    //     sum_j w_j |v_j - o| + the f32 slack, where D is the row's largest score change from
    //     rounding the query (each weight then moves by at most that factor).
    // The paged kernel's tokens (f32 queries and weights) are held to (A)'s bound against (B).
    const double u = 1.0 / 256, ln2 = 0.6931471805599453;
    const float qs = scale * 1.4426950408889634f;
    double maxerr[3] = {0, 0, 0}, maxratio[3] = {0, 0, 0};
    int bad = 0;
    std::vector<char> is_paged(T, 0); for (int t : paged_tokens) is_paged[t] = 1;
    std::vector<double> se, sr, we, wr, oe(D), orr(D), spe(D), spr(D), mag(D);
    std::vector<size_t> koff;
    auto note = [&](int k, double err, double bound) {
        if (!(err <= bound)) bad++;  // NaN counts
        maxerr[k] = std::max(maxerr[k], std::isnan(err) ? 1e300 : err);
        maxratio[k] = std::max(maxratio[k], std::isnan(err) ? 1e300 : err / bound);
    };
    for (int t = 0; t < T; ++t) for (int h = 0; h < nh; ++h) {
        const int kvh = h / group, L = ctx[t];
        const float* qv = &qkv[(size_t)t * row_stride + h * D];
        se.assign(L, 0.0); sr.assign(L, 0.0); koff.resize(L);
        double mxe = -1e300, mxr = -1e300, dmax = 0;
        for (int j = 0; j < L; ++j) {
            koff[j] = (((size_t)tables[offs[t] + j / bs] * nkv + kvh) * bs + j % bs) * D;
            double acc = 0, accr = 0;
            for (int d = 0; d < D; ++d) {
                const double k = bf2f(kc[koff[j] + d]);
                acc += (double)qv[d] * scale * k;
                accr += (double)bf2f(f2bf(qv[d] * qs)) * k;  // log2 units
            }
            se[j] = acc; sr[j] = accr * ln2;
            dmax = std::max(dmax, fabs(se[j] - sr[j]));
            mxe = std::max(mxe, se[j]); mxr = std::max(mxr, sr[j]);
        }
        double sume = 0, sumr = 0;
        for (int j = 0; j < L; ++j) { se[j] = exp(se[j] - mxe); sume += se[j]; sr[j] = exp(sr[j] - mxr); sumr += sr[j]; }
        std::fill(oe.begin(), oe.end(), 0.0); std::fill(orr.begin(), orr.end(), 0.0);
        std::fill(spe.begin(), spe.end(), 0.0); std::fill(spr.begin(), spr.end(), 0.0); std::fill(mag.begin(), mag.end(), 0.0);
        for (int j = 0; j < L; ++j) for (int d = 0; d < D; ++d) {
            const double v = bf2f(vc[koff[j] + d]);
            oe[d] += se[j] / sume * v; orr[d] += sr[j] / sumr * v; mag[d] += se[j] / sume * fabs(v);
        }
        for (int j = 0; j < L; ++j) for (int d = 0; d < D; ++d) {
            const double v = bf2f(vc[koff[j] + d]);
            spe[d] += se[j] / sume * fabs(v - oe[d]); spr[d] += sr[j] / sumr * fabs(v - orr[d]);
        }
        const double grow = (1 + u) / (1 - u) * exp(2 * dmax) - 1;
        for (int d = 0; d < D; ++d) {
            const double got = bf2f(out[(size_t)t * nh * D + h * D + d]);
            const double slack = ldexp(mag[d], -20);
            if (is_paged[t]) {
                note(2, fabs(got - oe[d]), u * (fabs(oe[d]) + spe[d]) + slack);
            } else {
                note(0, fabs(got - orr[d]), u * fabs(orr[d]) + u * (1 + u) / (1 - u) * spr[d] + slack);
                note(1, fabs(got - oe[d]), u * fabs(oe[d]) + grow * spe[d] + slack);
            }
        }
    }
    printf("%s D=%d nh=%d nkv=%d bs=%d T=%d (%d prefill tiles, %d paged tokens, splits %d%s): prefill max err/bound %.3f (err %.1e) vs rounded-q ref, %.3f (%.1e) vs exact; paged %.3f (%.1e); %d past\n",
           name, D, nh, nkv, bs, T, ntiles, npaged, splits, ctx_shift ? ", MUTATED context" : "",
           maxratio[0], maxerr[0], maxratio[1], maxerr[1], maxratio[2], maxerr[2], bad);
    return bad;
}

typedef void (*GemmFn)(float*, const act_t*, const act_t*, int, int, int, int);

// Skinny GEMM against a double-precision reference: tails in m, n and k, both accumulate modes,
// and a guard region after y that must stay untouched.
void test_gemm(const char* name, GemmFn fn, int RT, int MT, int m, int n, int k, bool accumulate, unsigned seed) {
    std::mt19937 rng(seed); std::uniform_real_distribution<float> U(-1, 1);
    std::vector<uint16_t> w((size_t)n * k), x((size_t)m * k);
    for (auto& v : w) v = f2bf(U(rng)); for (auto& v : x) v = f2bf(U(rng));
    const int guard = 64;
    std::vector<float> y((size_t)m * n + guard), y0;
    for (auto& v : y) v = accumulate ? U(rng) * 4 : 12345.0f;
    for (int i = 0; i < guard; ++i) y[(size_t)m * n + i] = -777.0f;
    y0 = y;
    size_t smem = (size_t)GEMM_NWARPS / 2 * RT * MT * 4 * 32 * 4;
    CHECK(smem <= sizeof(smem_f4), "gemm smem %zu", smem);
    memset(smem_f4, 0x7f, sizeof(smem_f4));
    unsigned grid = (n + 16 * RT - 1) / (16 * RT);
    launch({grid, 1, 1}, GEMM_NWARPS * 32, [&] { fn(y.data(), w.data(), x.data(), m, n, k, accumulate ? 1 : 0); });
    double maxerr = 0, maxref = 0;
    for (int t = 0; t < m; ++t) for (int r = 0; r < n; ++r) {
        double ref = accumulate ? y0[(size_t)t * n + r] : 0.0;
        for (int i = 0; i < k; ++i) ref += (double)bf2f(w[(size_t)r * k + i]) * bf2f(x[(size_t)t * k + i]);
        maxerr = std::max(maxerr, fabs(ref - y[(size_t)t * n + r]));
        maxref = std::max(maxref, fabs(ref));
    }
    bool guard_ok = true;
    for (int i = 0; i < guard; ++i) guard_ok &= y[(size_t)m * n + i] == -777.0f;
    printf("%s m=%d n=%d k=%d acc=%d: max abs err %.2e (max |y| %.1f)\n", name, m, n, k, accumulate, maxerr, maxref);
    CHECK(maxerr <= 1e-5 * std::max(1.0, maxref) && guard_ok, "%s m=%d n=%d k=%d", name, m, n, k);
}

typedef void (*GemmSiluFn)(act_t*, const act_t*, const act_t*, int, int, int);

// The fused gate/up GEMM + SwiGLU against silu(gate) * up in double precision: every value within
// the 16-bit rounding of its reference; the guard after act untouched.
void test_gemm_silu(const char* name, GemmSiluFn fn, int MT, int m, int inter, int k, unsigned seed) {
    std::mt19937 rng(seed); std::uniform_real_distribution<float> U(-1, 1);
    std::vector<uint16_t> w((size_t)2 * inter * k), x((size_t)m * k);
    for (auto& v : w) v = f2bf(U(rng)); for (auto& v : x) v = f2bf(U(rng));
    const int guard = 32;
    std::vector<uint16_t> act((size_t)m * inter + guard, 0xffff);
    for (int i = 0; i < guard; ++i) act[(size_t)m * inter + i] = 0x1234;
    size_t smem = (size_t)GEMM_NWARPS / 2 * 2 * MT * 4 * 32 * 4;
    CHECK(smem <= sizeof(smem_f4), "gemm smem %zu", smem);
    memset(smem_f4, 0x7f, sizeof(smem_f4));
    unsigned grid = (inter + 15) / 16;
    launch({grid, 1, 1}, GEMM_NWARPS * 32, [&] { fn(act.data(), w.data(), x.data(), m, inter, k); });
    double maxerr = 0; bool ok = true;
    for (int t = 0; t < m; ++t) for (int r = 0; r < inter; ++r) {
        double g = 0, u = 0;
        for (int i = 0; i < k; ++i) {
            g += (double)bf2f(w[(size_t)r * k + i]) * bf2f(x[(size_t)t * k + i]);
            u += (double)bf2f(w[(size_t)(inter + r) * k + i]) * bf2f(x[(size_t)t * k + i]);
        }
        double ref = g / (1 + exp(-g)) * u;
        double err = fabs(bf2f(act[(size_t)t * inter + r]) - ref);
        ok &= err <= 4e-3 * fabs(ref) + 1e-4;  // half a bf16 ulp is up to 2^-8 relative
        maxerr = std::max(maxerr, err);
    }
    for (int i = 0; i < guard; ++i) ok &= act[(size_t)m * inter + i] == 0x1234;
    printf("%s m=%d inter=%d k=%d: max abs err %.2e\n", name, m, inter, k, maxerr);
    CHECK(ok, "%s m=%d inter=%d k=%d", name, m, inter, k);
}

void test_small() {
    std::mt19937 rng(1); std::uniform_real_distribution<float> U(-2, 2);
    // rms_norm with row selection
    int dim = 70, rows = 5;
    std::vector<float> x(rows * dim), w(dim); for (auto& v : x) v = U(rng); for (auto& v : w) v = U(rng);
    std::vector<int> sel = {3, 0};
    std::vector<uint16_t> out(2 * dim);
    launch({2, 1, 1}, 64, [&] { rms_norm(out.data(), x.data(), sel.data(), w.data(), dim, 1e-5f); });
    // f32 arithmetic, then one bf16 rounding of each output: within (2^-8 + 2^-16)·|ref| (the
    // f32 part of the error is a few ulps of |ref|: no sums with cancellation).
    const double u_bf16 = 1.0 / 256, f32_slack = 1.0 / 65536;
    double me = 0, worst = 0;
    for (int r = 0; r < 2; ++r) { double ss = 0; for (int i = 0; i < dim; ++i) ss += (double)x[sel[r]*dim+i]*x[sel[r]*dim+i]; double inv = 1/sqrt(ss/dim+1e-5);
        for (int i = 0; i < dim; ++i) { double ref = w[i]*(x[sel[r]*dim+i]*inv), e = fabs(bf2f(out[r*dim+i]) - ref);
            me = std::max(me, e); worst = std::max(worst, e / ((u_bf16 + f32_slack) * fabs(ref))); } }
    printf("rms_norm max err %.2e, worst err/bound %.3f\n", me, worst); CHECK(worst <= 1, "rms_norm");
    std::vector<uint16_t> out2(rows * dim);
    launch({(unsigned)rows, 1, 1}, 32, [&] { rms_norm(out2.data(), x.data(), nullptr, w.data(), dim, 1e-5f); });
    CHECK(out2[3*dim+5] == out[5], "rms_norm null rows");
    // rotary fused with the KV-cache write (GQA: 3 query heads, 2 KV heads)
    int D = 16, nh = 3, nkv = 2, stride = (nh + 2*nkv)*D + 5; int T = 4;
    std::vector<float> qkv(T*stride), orig; for (auto& v : qkv) v = U(rng); orig = qkv;
    std::vector<int> pos = {0, 5, 17, 1000}; std::vector<float> inv(D/2); for (int i = 0; i < D/2; ++i) inv[i] = 1.0f/powf(10000.f, 2.f*i/D);
    int bs = 4, nb = 6; std::vector<int> slots = {5*bs+3, 0, 2*bs+1, 4*bs};
    std::vector<uint16_t> kc(nb*nkv*bs*D, 0), vc(nb*nkv*bs*D, 0);
    launch({(unsigned)T, 1, 1}, 32, [&] { rotary_kv_cache_write(qkv.data(), kc.data(), vc.data(), pos.data(), slots.data(), inv.data(), nh, nkv, D, bs, stride); });
    me = 0;
    for (int t = 0; t < T; ++t) for (int h = 0; h < nh + 2*nkv; ++h) for (int i = 0; i < D/2; ++i) {
        float* o = &orig[t*stride + h*D]; float* n = &qkv[t*stride + h*D];
        if (h >= nh + nkv) { me = std::max(me, (double)fabs(o[i]-n[i]) + fabs(o[i+D/2]-n[i+D/2])); continue; }
        float a = pos[t] * inv[i]; double c = cos((double)a), s = sin((double)a);
        me = std::max(me, fabs(n[i] - (o[i]*c - o[i+D/2]*s)) + fabs(n[i+D/2] - (o[i+D/2]*c + o[i]*s)));
    }
    for (int t = 0; t < T; ++t) for (int i = (nh + 2*nkv)*D; i < stride; ++i) me = std::max(me, (double)fabs(orig[t*stride + i] - qkv[t*stride + i]));
    printf("rotary max err %.2e\n", me); CHECK(me < 1e-5, "rotary");
    bool ok = true; int written = 0;
    for (int t = 0; t < T; ++t) for (int h = 0; h < nkv; ++h) for (int d = 0; d < D; ++d) {
        int blk = slots[t] / bs, s = slots[t] % bs; size_t off = (((size_t)blk*nkv + h)*bs + s)*D + d;
        ok &= kc[off] == f2bf(qkv[t*stride + nh*D + h*D + d]); ok &= vc[off] == f2bf(qkv[t*stride + (nh+nkv)*D + h*D + d]);
        written += 2;
    }
    int nonzero = 0; for (size_t i = 0; i < kc.size(); ++i) nonzero += (kc[i] != 0) + (vc[i] != 0);
    ok &= nonzero <= written;  // nothing outside the tokens' slots
    CHECK(ok, "kv_cache_write"); printf("kv_cache_write %s\n", ok ? "ok" : "BAD");
    // silu
    int inter = 37; std::vector<float> gu(3*2*inter); for (auto& v : gu) v = U(rng)*4; std::vector<uint16_t> act(3*inter);
    launch({2, 1, 1}, 32, [&] { silu_and_mul(act.data(), gu.data(), 3, inter); });
    me = 0; worst = 0;  // as rms_norm: one bf16 rounding of an f32 result
    for (int t = 0; t < 3; ++t) for (int i = 0; i < inter; ++i) { double g = gu[t*2*inter+i], u = gu[t*2*inter+inter+i]; double ref = g/(1+exp(-g))*u;
        double e = fabs(bf2f(act[t*inter+i]) - ref); me = std::max(me, e / fabs(ref)); worst = std::max(worst, e / ((u_bf16 + f32_slack) * fabs(ref))); }
    printf("silu max rel err %.2e, worst err/bound %.3f\n", me, worst); CHECK(worst <= 1, "silu");
    // argmax with ties and vocab not a multiple
    int V = 3001; std::vector<float> lg(2*V); for (auto& v : lg) v = U(rng); lg[1234] = 9; lg[2999] = 9; lg[V + 7] = 5; lg[V+3000] = 5;
    std::vector<unsigned> ids(2);
    launch({2, 1, 1}, 256, [&] { argmax_rows(ids.data(), lg.data(), V); });
    printf("argmax %u %u\n", ids[0], ids[1]); CHECK(ids[0] == 1234 && ids[1] == 7, "argmax");
    // embedding
    int H = 40, vocab = 10; std::vector<uint16_t> tab(vocab*H); for (auto& v : tab) v = f2bf(U(rng)); std::vector<unsigned> tok = {7, 2, 7}; std::vector<float> emb(3*H);
    launch({3, 1, 1}, 32, [&] { embedding_gather(emb.data(), tab.data(), tok.data(), H); });
    CHECK(emb[2*H+3] == bf2f(tab[7*H+3]) && emb[H] == bf2f(tab[2*H]), "embedding");
    // bias add
    std::vector<float> bx(3*10, 1.0f), bb(7); for (int i = 0; i < 7; ++i) bb[i] = i;
    launch({1, 1, 1}, 32, [&] { bias_add(bx.data(), bb.data(), 3, 7, 10); });
    CHECK(bx[10+6] == 7 && bx[10+7] == 1 && bx[29] == 1 && bx[20] == 1, "bias_add");
}

int main() {
    test_small();
    test_gemm("skinny_gemm_r1_m1", skinny_gemm_r1_m1, 1, 1, 1, 16, 32, false, 11);
    test_gemm("skinny_gemm_r1_m1", skinny_gemm_r1_m1, 1, 1, 5, 40, 72, true, 12);
    test_gemm("skinny_gemm_r1_m2", skinny_gemm_r1_m2, 1, 2, 13, 33, 520, false, 13);
    test_gemm("skinny_gemm_r1_m4", skinny_gemm_r1_m4, 1, 4, 32, 100, 1032, true, 14);
    test_gemm("skinny_gemm_r1_m8", skinny_gemm_r1_m8, 1, 8, 57, 20, 264, false, 15);
    test_gemm("skinny_gemm_r2_m1", skinny_gemm_r2_m1, 2, 1, 8, 70, 1056, true, 16);
    test_gemm("skinny_gemm_r2_m2", skinny_gemm_r2_m2, 2, 2, 9, 48, 64, false, 17);
    test_gemm("skinny_gemm_r2_m4", skinny_gemm_r2_m4, 2, 4, 25, 31, 136, true, 18);
    test_gemm("skinny_gemm_r2_m8", skinny_gemm_r2_m8, 2, 8, 64, 64, 2056, false, 19);
    test_gemm_silu("skinny_gemm_silu_m1", skinny_gemm_silu_m1, 1, 1, 40, 64, 31);
    test_gemm_silu("skinny_gemm_silu_m2", skinny_gemm_silu_m2, 2, 11, 37, 136, 32);
    test_gemm_silu("skinny_gemm_silu_m4", skinny_gemm_silu_m4, 4, 32, 48, 520, 33);
    test_gemm_silu("skinny_gemm_silu_m8", skinny_gemm_silu_m8, 8, 50, 20, 72, 34);
    test_attention(16, paged_attention_d16, 4, 4, 2, 4, {1, 2, 5, 33, 64, 100, 129}, 1);
    test_attention(32, paged_attention_d32, 4, 3, 1, 4, {1, 7, 31, 32, 33, 150}, 2);
    test_attention(64, paged_attention_d64, 4, 9, 3, 16, {1, 16, 17, 200, 257}, 3);
    test_attention(80, paged_attention_d80, 4, 2, 2, 16, {3, 40, 129}, 4);
    test_attention(96, paged_attention_d96, 4, 12, 1, 8, {5, 70}, 5);      // group 12 -> 2 slices
    test_attention(128, paged_attention_d128, 4, 16, 8, 16, {1, 31, 512, 300}, 6);
    test_attention(128, paged_attention_d128, 4, 8, 8, 32, {1, 2, 3, 260}, 7);
    // Split keys (flash-decoding): contexts shorter than one range, empty ranges, many ranges.
    test_attention(64, paged_attention_d64, 4, 4, 2, 16, {1, 63, 64, 65, 300}, 21, 2);
    test_attention(128, paged_attention_d128, 4, 16, 8, 16, {531, 7, 200}, 22, 3);
    test_attention(96, paged_attention_d96, 4, 12, 1, 8, {5, 700}, 23, 8);  // 2 slices x 8 ranges
    test_attention(256, paged_attention_d256, 2, 8, 1, 16, {1000}, 24, 32);
    test_attention(256, paged_attention_d256, 2, 8, 1, 16, {1, 65, 140}, 8);
    // Prefill attention on the tensor cores (prefill_attention.cu), next to paged tokens.
    {
        // A 700-token prompt in chunks of 250 (GQA 2, head_dim 128, the later chunks starting
        // mid-block): each chunk a step.
        for (int c = 0; c < 700; c += 250)
            CHECK(test_prefill("prefill chunk", 128, prefill_attention_d128, 64, paged_attention_d128, 4, 2, 1, 16, {{c, std::min(250, 700 - c)}}, 40 + c) == 0, "prefill chunk at %d", c);
        // A chunk starting mid-block with a ragged last tile, next to decode tokens and a short
        // chunk (paged, split over 2 ranges); GQA 8 (8 rows of a tile per token).
        CHECK(test_prefill("prefill mixed", 64, prefill_attention_d64, 64, paged_attention_d64, 4, 8, 1, 16, {{49, 1}, {37, 100}, {5, 10}, {299, 1}}, 41, 1.0f, 2) == 0, "prefill mixed");
        // Two prefill entries, no GQA, larger scores (peaked softmax), block size 32.
        CHECK(test_prefill("prefill two entries", 128, prefill_attention_d128, 64, paged_attention_d128, 4, 2, 2, 32, {{130, 77}, {0, 64}, {3, 1}}, 42, 4.0f) == 0, "prefill two entries");
        // GQA 3: a token's rows straddle tiles.
        CHECK(test_prefill("prefill gqa3", 96, prefill_attention_d96, 64, paged_attention_d96, 4, 6, 2, 8, {{0, 65}}, 43) == 0, "prefill gqa3");
        CHECK(test_prefill("prefill", 80, prefill_attention_d80, 64, paged_attention_d80, 4, 2, 1, 16, {{20, 70}}, 44) == 0, "prefill d80");
        CHECK(test_prefill("prefill", 256, prefill_attention_d256, 16, paged_attention_d256, 2, 2, 1, 16, {{5, 70}}, 45) == 0, "prefill d256");
        CHECK(test_prefill("prefill", 32, prefill_attention_d32, 64, paged_attention_d32, 4, 4, 4, 4, {{3, 90}}, 46) == 0, "prefill d32");
        CHECK(test_prefill("prefill", 16, prefill_attention_d16, 64, paged_attention_d16, 4, 2, 1, 4, {{0, 64}}, 47) == 0, "prefill d16");
        // The check can fail: each row also attending to the key one past its position (an
        // off-by-one causal mask) must be caught.
        int caught = test_prefill("prefill mutation", 64, prefill_attention_d64, 64, paged_attention_d64, 4, 4, 2, 16, {{37, 100}}, 48, 1.0f, 1, 1, 1);
        CHECK(caught > 0, "an off-by-one causal mask went unnoticed");
    }
    printf("%s (%d failures)\n", fails ? "FAILED" : "ALL OK", fails);
    return fails != 0;
}
