//! The x86 int8 kernels of [`super`]: one tile kernel per format (a const generic) and per
//! instruction set (AVX2 `vpmaddubsw` + `vpmaddwd`, AVX-512 VNNI `vpdpbusd`), reading the 8-row
//! interleaved groups of [`pack_rows`](crate::model::quant::pack_rows).

use std::arch::x86_64::*;

use super::*;

/// Formats as const-generic codes, so each kernel is compiled per format without branches.
const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;
const Q5_0: u8 = 3;
const Q6_K: u8 = 4;
const Q4_K: u8 = 5;

/// Bytes of one 8-row group's packed 32-element block (for Q4_K, a sub-block's scales,
/// minima and nibbles; its super-block's header comes before every 8 of them).
const fn packed_block_bytes(f: u8) -> usize {
    PACK_ROWS
        * match f {
            Q8_0 => 34,
            Q4_0 => 18,
            Q5_0 => 22,
            Q6_K => 28,
            Q4_K => Q4_K_SUB_BYTES,
            _ => 20,
        }
}

/// Bytes of one 8-row group's packed Q4_K super-block.
const Q4_K_PACKED_SUPER: usize = Q4_K_PACKED_SUPER_HEADER + QK_K / QK * PACK_ROWS * Q4_K_SUB_BYTES;

/// Where 32-element block `b` starts in a packed group.
#[inline(always)]
const fn packed_block_at(f: u8, b: usize) -> usize {
    if f == Q4_K {
        b / 8 * Q4_K_PACKED_SUPER + Q4_K_PACKED_SUPER_HEADER + b % 8 * packed_block_bytes(f)
    } else {
        b * packed_block_bytes(f)
    }
}

/// Bytes of one packed 8-row group `nb` 32-element blocks wide.
const fn packed_group_bytes(f: u8, nb: usize) -> usize {
    if f == Q4_K {
        nb / 8 * Q4_K_PACKED_SUPER
    } else {
        nb * packed_block_bytes(f)
    }
}

/// Whether the format adds a minimum times the activations' sum (instead of an offset seed).
const fn has_min(f: u8) -> bool {
    f == Q4_1 || f == Q4_K
}

/// Integer accumulator chains per activation row in a tile.
const CHAINS: usize = 2;

const fn header_bytes(f: u8) -> usize {
    match f {
        Q4_1 => 32,
        Q5_0 => 48,
        Q6_K => 96,
        _ => 16,
    }
}

macro_rules! group_kernel {
    ($groups:ident, $groups_f:ident, $tile:ident, $features:literal, $codes:ident, $dot:ident, $q8_seeded:literal) => {
        /// Multiplies the packed groups by every activation row into `dst`.
        ///
        /// # Safety
        /// The CPU must have the enabled features.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $groups(
            format: BlockFormat,
            acts: &QuantizedActs,
            span: RowSpan,
            groups: &[u8],
            dst: &mut [f32],
        ) {
            // SAFETY: same features; the format code matches `format`.
            unsafe {
                match format {
                    BlockFormat::Q8_0 => $groups_f::<Q8_0>(acts, span, groups, dst),
                    BlockFormat::Q4_0 => $groups_f::<Q4_0>(acts, span, groups, dst),
                    BlockFormat::Q4_1 => $groups_f::<Q4_1>(acts, span, groups, dst),
                    BlockFormat::Q5_0 => $groups_f::<Q5_0>(acts, span, groups, dst),
                    BlockFormat::Q6_K => $groups_f::<Q6_K>(acts, span, groups, dst),
                    BlockFormat::Q4_K => $groups_f::<Q4_K>(acts, span, groups, dst),
                    _ => unreachable!("half formats take the f32 path"),
                }
            }
        }

        /// The groups kernel for one format.
        ///
        /// # Safety
        /// As the dispatching function.
        #[target_feature(enable = $features)]
        unsafe fn $groups_f<const F: u8>(
            acts: &QuantizedActs,
            span: RowSpan,
            groups: &[u8],
            dst: &mut [f32],
        ) {
            let (m, nb) = (span.len, acts.k / QK);
            let group_bytes = packed_group_bytes(F, nb);
            let ng = groups.len() / group_bytes;
            assert!(groups.len() == ng * group_bytes && dst.len() >= ng * PACK_ROWS * m);
            let end = span.start + m;
            assert!(acts.qs.len() >= end * acts.k && acts.d.len() >= end * nb);
            assert!(acts.seed.len() >= end * nb && acts.sum.len() >= end * nb);
            let mut res = [[0f32; PACK_ROWS]; MR];
            for g in 0..ng {
                let gp = groups[g * group_bytes..].as_ptr();
                let mut i = 0;
                while i < m {
                    let mr = if m - i >= MR { MR } else { 1 };
                    // SAFETY: the group holds `nb` packed blocks; rows i..i + mr exist.
                    unsafe {
                        if mr == MR {
                            $tile::<F, MR>(acts, span.start + i, gp, &mut res);
                        } else {
                            $tile::<F, 1>(acts, span.start + i, gp, &mut res);
                        }
                    }
                    for (a, res_a) in res.iter().enumerate().take(mr) {
                        for (l, v) in res_a.iter().enumerate() {
                            dst[(g * PACK_ROWS + l) * m + i + a] = *v;
                        }
                    }
                    i += mr;
                }
            }
        }

        /// One tile: `res[a][l] = x_{i0 + a} · w_l` for `R` activation rows and the 8 rows
        /// of the group at `gp`.
        ///
        /// # Safety
        /// `gp` points at a whole packed group of format `F` for `acts.k` columns, and
        /// rows `i0..i0 + R` exist in `acts` (the caller asserted the lengths).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const F: u8, const R: usize>(
            acts: &QuantizedActs,
            i0: usize,
            gp: *const u8,
            res: &mut [[f32; PACK_ROWS]; MR],
        ) {
            let nb = acts.k / QK;
            let xp = acts.qs.as_ptr();
            let mut acc = [_mm256_setzero_ps(); R];
            let low = _mm256_set1_epi8(0x0F);
            for b in 0..nb {
                // SAFETY: see the function's contract.
                unsafe {
                    let blk = gp.add(packed_block_at(F, b));
                    let (dw, mw) = if F == Q4_K {
                        // d·sc and −dmin·m of the 8 rows (exact in f32).
                        let sup = gp.add(b / 8 * Q4_K_PACKED_SUPER);
                        let bytes = |at: usize| {
                            let b = _mm_loadl_epi64(blk.add(at).cast());
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))
                        };
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(sup.cast()));
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(16).cast()));
                        let min = _mm256_mul_ps(dmin, bytes(8));
                        (
                            _mm256_mul_ps(d, bytes(0)),
                            _mm256_sub_ps(_mm256_setzero_ps(), min),
                        )
                    } else if F == Q4_1 {
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16).cast())),
                        )
                    } else {
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                            _mm256_setzero_ps(),
                        )
                    };
                    // Q6_K: the 8 rows' scales of each 16-element half, d·sc (exact in f32).
                    let half_scales = if F == Q6_K {
                        let sc = |at: usize| {
                            let bytes = _mm_loadl_epi64(blk.add(at).cast());
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
                        };
                        [_mm256_mul_ps(dw, sc(16)), _mm256_mul_ps(dw, sc(24))]
                    } else {
                        [dw, dw]
                    };
                    let qs = blk.add(header_bytes(F));
                    // codes[u]: 4 weights of each of the 8 rows, at columns 4u..4u + 4.
                    let mut codes = [_mm256_setzero_si256(); 8];
                    if F == Q8_0 {
                        for (t, c) in codes.iter_mut().enumerate() {
                            *c = $codes(_mm256_loadu_si256(qs.add(32 * t).cast()));
                        }
                    } else {
                        for t in 0..4 {
                            let raw = _mm256_loadu_si256(qs.add(32 * t).cast());
                            codes[t] = _mm256_and_si256(raw, low);
                            codes[t + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                        }
                        if F == Q5_0 {
                            or_high_bit::<4>(&mut codes, _mm256_loadu_si256(blk.add(16).cast()));
                        }
                        if F == Q6_K {
                            or_high_bit::<4>(&mut codes, _mm256_loadu_si256(blk.add(32).cast()));
                            or_high_bit::<5>(&mut codes, _mm256_loadu_si256(blk.add(64).cast()));
                        }
                    }
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let ab = (i0 + r) * nb + b;
                        let xb = xp.add(ab * QK).cast::<i32>();
                        let [seed_lo, seed_hi] = if has_min(F) || (F == Q8_0 && !$q8_seeded) {
                            [0, 0]
                        } else {
                            *acts.seed.as_ptr().add(ab)
                        };
                        // Independent chains hide the dot product's latency; Q6_K's halves
                        // (code vectors 0..4 and 4..8) get CHAINS each.
                        let mut chains = [_mm256_setzero_si256(); 2 * CHAINS];
                        chains[0] = _mm256_set1_epi32(seed_lo);
                        chains[CHAINS] = _mm256_set1_epi32(seed_hi);
                        for (u, c) in codes.iter().enumerate() {
                            let xv = _mm256_set1_epi32(xb.add(u).read_unaligned());
                            let ch = if F == Q6_K { (u / 4) * CHAINS } else { 0 } + u % CHAINS;
                            chains[ch] = $dot::<F>(chains[ch], *c, xv);
                        }
                        let halves = if F == Q6_K { 2 } else { 1 };
                        let dx = _mm256_broadcast_ss(&*acts.d.as_ptr().add(ab));
                        for (h, half) in chains.chunks_exact(CHAINS).take(halves).enumerate() {
                            let mut p = half[0];
                            for ch in &half[1..] {
                                p = _mm256_add_epi32(p, *ch);
                            }
                            *acc_r = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(p),
                                _mm256_mul_ps(half_scales[h], dx),
                                *acc_r,
                            );
                        }
                        if has_min(F) {
                            let s = _mm256_broadcast_ss(&*acts.sum.as_ptr().add(ab));
                            *acc_r = _mm256_fmadd_ps(mw, s, *acc_r);
                        }
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                // SAFETY: `res[r]` holds 8 floats.
                unsafe { _mm256_storeu_ps(res[r].as_mut_ptr(), *acc_r) };
            }
        }
    };
}

/// ORs bit `BIT` of each code in: bit `t` of each byte of `h` belongs to code vector `t`'s
/// byte there (see `quant::pack_rows`) and moves to bit `BIT`. Within a 16-bit lane the
/// shifts (left by up to `BIT`, right by up to `7 − BIT`) bring no other byte's bit to `BIT`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn or_high_bit<const BIT: i32>(codes: &mut [__m256i; 8], h: __m256i) {
    let mask = _mm256_set1_epi8(1 << BIT);
    for (t, c) in (0i32..).zip(codes.iter_mut()) {
        let shift = BIT - t;
        let moved = if shift >= 0 {
            _mm256_sll_epi16(h, _mm_cvtsi32_si128(shift))
        } else {
            _mm256_srl_epi16(h, _mm_cvtsi32_si128(-shift))
        };
        *c = _mm256_or_si256(*c, _mm256_and_si256(moved, mask));
    }
}

/// For VNNI, Q8_0's signed weights become unsigned codes (w + 128).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn codes_vnni(w: __m256i) -> __m256i {
    _mm256_xor_si256(w, _mm256_set1_epi8(-128))
}

/// AVX2 keeps Q8_0's signed bytes (see [`dot_avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn codes_avx2(w: __m256i) -> __m256i {
    w
}

/// `acc + Σ codes·x` per 32-bit lane with AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
fn dot_vnni<const F: u8>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, x)
}

/// `acc + Σ w·x` per 32-bit lane with AVX2. Q8_0's signed weights go through `sign` so
/// `maddubs` (unsigned × signed) never saturates; they carry no offset, so the AVX2 Q8_0
/// tile starts from zero instead of the −128·Σx seed.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_avx2<const F: u8>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if F == Q8_0 {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones))
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
    }
}

group_kernel!(
    groups_avx2,
    groups_avx2_f,
    tile_avx2,
    "avx2,fma,f16c",
    codes_avx2,
    dot_avx2,
    false
);
group_kernel!(
    groups_vnni,
    groups_vnni_f,
    tile_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    codes_vnni,
    dot_vnni,
    true
);
