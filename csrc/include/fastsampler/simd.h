// Sixteen-lane float / uint32 vectors for the CPU kernels: AVX-512 intrinsics when the compiler targets AVX-512
// (-march=native on such a machine), a portable array-of-16 path otherwise (which compilers vectorise for AVX2 / NEON
// where they can). Also the fast exp / log used by the kernels (Cephes-style polynomials, ~1e-7 relative error).
//
// Framework-free: no pybind11 / torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(FASTSAMPLER_NO_SIMD)
#include <immintrin.h>
#define FASTSAMPLER_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(FASTSAMPLER_NO_SIMD)
#include <immintrin.h>
#define FASTSAMPLER_AVX2 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FS_INLINE inline __attribute__((always_inline))
#else
#define FS_INLINE inline
#endif

namespace fastsampler {
namespace simd {

constexpr int kLanes = 16;
using mask_t = uint32_t;  // low 16 bits used
constexpr mask_t kAll = 0xFFFFu;
constexpr float kInf = std::numeric_limits<float>::infinity();

FS_INLINE int popcount(mask_t m) { return __builtin_popcount(m); }
FS_INLINE int ctz(mask_t m) { return __builtin_ctz(m); }

FS_INLINE float bf16_to_float(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

FS_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      man &= 0x3FFu;
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (man << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Input element types: float, and 16-bit formats carried as uint16_t bit patterns.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

FS_INLINE float to_float(float x) { return x; }
FS_INLINE float to_float(bf16_t x) { return bf16_to_float(x.bits); }
FS_INLINE float to_float(fp16_t x) { return fp16_to_float(x.bits); }

// -----------------------------------------------------------------------------------------------
// scalar helpers
FS_INLINE float scalar_exp(float x) { return std::exp(x); }

#ifdef FASTSAMPLER_AVX512
// ================================================================================================
// AVX-512
struct vf {
  __m512 v;
};
struct vu {
  __m512i v;
};

FS_INLINE vf load(const float* p) { return {_mm512_loadu_ps(p)}; }
FS_INLINE vf load(const bf16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
FS_INLINE vf load(const fp16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
FS_INLINE void store(float* p, vf a) { _mm512_storeu_ps(p, a.v); }
FS_INLINE vf set1(float x) { return {_mm512_set1_ps(x)}; }
FS_INLINE vf operator+(vf a, vf b) { return {_mm512_add_ps(a.v, b.v)}; }
FS_INLINE vf operator-(vf a, vf b) { return {_mm512_sub_ps(a.v, b.v)}; }
FS_INLINE vf operator*(vf a, vf b) { return {_mm512_mul_ps(a.v, b.v)}; }
FS_INLINE vf operator/(vf a, vf b) { return {_mm512_div_ps(a.v, b.v)}; }
FS_INLINE vf vmax(vf a, vf b) { return {_mm512_max_ps(a.v, b.v)}; }
// acc + (m ? a : 0)
FS_INLINE vf mask_add(vf acc, mask_t m, vf a) {
  return {_mm512_mask_add_ps(acc.v, static_cast<__mmask16>(m), acc.v, a.v)};
}
FS_INLINE vf vmin(vf a, vf b) { return {_mm512_min_ps(a.v, b.v)}; }
FS_INLINE vf vabs(vf a) { return {_mm512_abs_ps(a.v)}; }
FS_INLINE vf fmadd(vf a, vf b, vf c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
FS_INLINE mask_t gt(vf a, vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
FS_INLINE mask_t ge(vf a, vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
FS_INLINE mask_t le(vf a, vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ); }
FS_INLINE mask_t lt(vf a, vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
FS_INLINE mask_t eq(vf a, vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
FS_INLINE mask_t unord(vf a, vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q); }
// m ? a : b
FS_INLINE vf select(mask_t m, vf a, vf b) { return {_mm512_mask_blend_ps(static_cast<__mmask16>(m), b.v, a.v)}; }
FS_INLINE vf maskz(mask_t m, vf a) { return {_mm512_maskz_mov_ps(static_cast<__mmask16>(m), a.v)}; }
FS_INLINE float hmax(vf a) { return _mm512_reduce_max_ps(a.v); }
FS_INLINE float hsum(vf a) { return _mm512_reduce_add_ps(a.v); }
// Writes the selected lanes contiguously at dst; dst must have room for 16 floats. Returns the count.
FS_INLINE int compress(float* dst, mask_t m, vf a) {
  _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(static_cast<__mmask16>(m), a.v));
  return popcount(m);
}

// exp for any input; -inf and very negative give 0, large positive saturate to +inf
FS_INLINE vf vexp(vf x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f);
  const __m512 lo = _mm512_set1_ps(-87.3365447504f);
  __mmask16 under = _mm512_cmp_ps_mask(x.v, lo, _CMP_LT_OQ);
  __m512 xc = _mm512_min_ps(_mm512_max_ps(x.v, lo), hi);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 y = _mm512_scalef_ps(p, n);
  return {_mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y)};
}

// natural log for positive normal inputs
FS_INLINE vf vlog(vf x) {
  __m512 e = _mm512_getexp_ps(x.v);
  __m512 m = _mm512_getmant_ps(x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
  __m512 res = _mm512_add_ps(f, y);
  return {_mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), res)};
}

// ------------------------------------------------------------------ uint32 lanes (Philox)
FS_INLINE vu uset1(uint32_t x) { return {_mm512_set1_epi32(static_cast<int>(x))}; }
FS_INLINE vu uiota(uint32_t base) {
  return {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)),
                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
}
FS_INLINE vu uxor(vu a, vu b) { return {_mm512_xor_si512(a.v, b.v)}; }
// (hi, lo) of the 64-bit products a * b per lane, a a constant
FS_INLINE void mulhilo(uint32_t a, vu b, vu& hi, vu& lo) {
  const __m512i av = _mm512_set1_epi32(static_cast<int>(a));
  __m512i pe = _mm512_mul_epu32(b.v, av);
  __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(b.v, 32), av);
  hi.v = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo.v = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}
FS_INLINE void ustore(uint32_t* p, vu a) { _mm512_storeu_si512(p, a.v); }
FS_INLINE vu uload(const uint32_t* p) { return {_mm512_loadu_si512(p)}; }
// Lanes r >= 2^31
FS_INLINE mask_t uhigh(vu r) { return _mm512_movepi32_mask(r.v); }
FS_INLINE vu unot(vu a) { return {_mm512_xor_si512(a.v, _mm512_set1_epi32(-1))}; }
FS_INLINE vu uselect(mask_t m, vu a, vu b) { return {_mm512_mask_blend_epi32(static_cast<__mmask16>(m), b.v, a.v)}; }
// float(2 * a + 1) * 2^-33 for a < 2^31
FS_INLINE vf uniform_half(vu a) {
  __m512i t = _mm512_add_epi32(_mm512_slli_epi32(a.v, 1), _mm512_set1_epi32(1));
  return {_mm512_mul_ps(_mm512_cvtepu32_ps(t), _mm512_set1_ps(1.16415321826934814453125e-10f))};
}
// The exponent of float(a) (a rounded to nearest): floor(log2 a) for a >= 1 except where the rounding reaches the next
// power of two (then at most 2^-23 above log2 a); -inf for a = 0.
FS_INLINE vf ulog2(vu a) { return {_mm512_getexp_ps(_mm512_cvtepu32_ps(a.v))}; }
// out[q] lane m = in[m & 3] lane (4 q + m / 4): four vectors of Philox words (lane l of word j is variate 4 l + j) into
// id order, in registers.
FS_INLINE void transpose4x16(const vf in[4], vf out[4]) {
  // pairs (in[0], in[1]) and (in[2], in[3]), interleaved per variate: lanes 4 h .. 4 h + 7
  const __m512i i01lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i i01hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 a0 = _mm512_permutex2var_ps(in[0].v, i01lo, in[1].v);
  const __m512 a1 = _mm512_permutex2var_ps(in[0].v, i01hi, in[1].v);
  const __m512 b0 = _mm512_permutex2var_ps(in[2].v, i01lo, in[3].v);
  const __m512 b1 = _mm512_permutex2var_ps(in[2].v, i01hi, in[3].v);
  // two (word 0, word 1) pairs from a, then two (word 2, word 3) pairs from b, per variate
  const __m512i ilo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
  out[0].v = _mm512_permutex2var_ps(a0, ilo, b0);
  out[1].v = _mm512_permutex2var_ps(a0, ihi, b0);
  out[2].v = _mm512_permutex2var_ps(a1, ilo, b1);
  out[3].v = _mm512_permutex2var_ps(a1, ihi, b1);
}
// Bits -> mask of 16 lanes from 16 bits
FS_INLINE mask_t bits16(uint32_t w) { return w & 0xFFFFu; }
// Bit j set where p[j] > 0, for 32 consecutive output counts (a negative count is treated as 0,
// docs/semantics.md §3 B, C)
FS_INLINE uint32_t positive32(const int32_t* p) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 16);
  return static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(a, zero)) |
         (static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(b, zero)) << 16);
}
FS_INLINE uint32_t positive32(const int16_t* p) {
  __m512i a = _mm512_loadu_si512(p);
  return static_cast<uint32_t>(_mm512_cmpgt_epi16_mask(a, _mm512_setzero_si512()));
}

#elif defined(FASTSAMPLER_AVX2)
// ================================================================================================
// AVX2 (2 x 8 lanes)
struct vf {
  __m256 lo, hi;
};
struct vu {
  __m256i lo, hi;
};

FS_INLINE mask_t mbits(__m256 lo, __m256 hi) {
  return static_cast<mask_t>(_mm256_movemask_ps(lo)) | (static_cast<mask_t>(_mm256_movemask_ps(hi)) << 8);
}
FS_INLINE __m256 mvec(uint32_t m8) {  // 8 mask bits -> lane mask
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m8)), sel), sel));
}
FS_INLINE vf load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
FS_INLINE __m256 bf16x8(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
FS_INLINE vf load(const bf16_t* p) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  return {bf16x8(q), bf16x8(q + 8)};
}
FS_INLINE vf load(const fp16_t* p) {
#ifdef __F16C__
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
#else
  alignas(32) float b[kLanes];
  for (int i = 0; i < kLanes; ++i) b[i] = fp16_to_float(p[i].bits);
  return load(b);
#endif
}
FS_INLINE void store(float* p, vf a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
FS_INLINE vf set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
FS_INLINE vf operator+(vf a, vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
FS_INLINE vf operator-(vf a, vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
FS_INLINE vf operator*(vf a, vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
FS_INLINE vf operator/(vf a, vf b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
FS_INLINE vf vmax(vf a, vf b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
FS_INLINE vf vmin(vf a, vf b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
FS_INLINE vf vabs(vf a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
FS_INLINE vf fmadd(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
#define FS_CMP2(NAME, IMM) \
  FS_INLINE mask_t NAME(vf a, vf b) { return mbits(_mm256_cmp_ps(a.lo, b.lo, IMM), _mm256_cmp_ps(a.hi, b.hi, IMM)); }
FS_CMP2(gt, _CMP_GT_OQ)
FS_CMP2(ge, _CMP_GE_OQ)
FS_CMP2(le, _CMP_LE_OQ)
FS_CMP2(lt, _CMP_LT_OQ)
FS_CMP2(eq, _CMP_EQ_OQ)
FS_CMP2(unord, _CMP_UNORD_Q)
#undef FS_CMP2
FS_INLINE vf select(mask_t m, vf a, vf b) {
  return {_mm256_blendv_ps(b.lo, a.lo, mvec(m & 0xFFu)), _mm256_blendv_ps(b.hi, a.hi, mvec((m >> 8) & 0xFFu))};
}
FS_INLINE vf maskz(mask_t m, vf a) {
  return {_mm256_and_ps(a.lo, mvec(m & 0xFFu)), _mm256_and_ps(a.hi, mvec((m >> 8) & 0xFFu))};
}
FS_INLINE vf mask_add(vf acc, mask_t m, vf a) { return acc + maskz(m, a); }
FS_INLINE float hmax(vf a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
FS_INLINE float hsum(vf a) {
  __m256 m = _mm256_add_ps(a.lo, a.hi);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
FS_INLINE int compress(float* dst, mask_t m, vf a) {
  alignas(32) float b[kLanes];
  store(b, a);
  int n = 0;
  while (m) {
    dst[n++] = b[ctz(m)];
    m &= m - 1;
  }
  return n;
}
FS_INLINE __m256 pow2i(__m256i n) {  // 2^n for n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
FS_INLINE __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i n1 = _mm256_srai_epi32(ni, 1);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, pow2i(n1)), pow2i(_mm256_sub_epi32(ni, n1)));
  return _mm256_andnot_ps(under, y);
}
FS_INLINE __m256 log8(__m256 x) {
  __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xFF)), _mm256_set1_epi32(127)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
  __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}
FS_INLINE vf vexp(vf x) { return {exp8(x.lo), exp8(x.hi)}; }
FS_INLINE vf vlog(vf x) { return {log8(x.lo), log8(x.hi)}; }

// ------------------------------------------------------------------ uint32 lanes (Philox)
FS_INLINE vu uset1(uint32_t x) {
  __m256i v = _mm256_set1_epi32(static_cast<int>(x));
  return {v, v};
}
FS_INLINE vu uiota(uint32_t base) {
  __m256i b = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return {b, _mm256_add_epi32(b, _mm256_set1_epi32(8))};
}
FS_INLINE vu uxor(vu a, vu b) { return {_mm256_xor_si256(a.lo, b.lo), _mm256_xor_si256(a.hi, b.hi)}; }
FS_INLINE void mulhilo8(__m256i av, __m256i b, __m256i& hi, __m256i& lo) {
  __m256i pe = _mm256_mul_epu32(b, av);
  __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(b, 32), av);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}
FS_INLINE void mulhilo(uint32_t a, vu b, vu& hi, vu& lo) {
  const __m256i av = _mm256_set1_epi32(static_cast<int>(a));
  mulhilo8(av, b.lo, hi.lo, lo.lo);
  mulhilo8(av, b.hi, hi.hi, lo.hi);
}
FS_INLINE void ustore(uint32_t* p, vu a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 8), a.hi);
}
FS_INLINE vu uload(const uint32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
FS_INLINE mask_t uhigh(vu r) { return mbits(_mm256_castsi256_ps(r.lo), _mm256_castsi256_ps(r.hi)); }
FS_INLINE vu unot(vu a) {
  const __m256i o = _mm256_set1_epi32(-1);
  return {_mm256_xor_si256(a.lo, o), _mm256_xor_si256(a.hi, o)};
}
FS_INLINE vu uselect(mask_t m, vu a, vu b) {
  return {_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b.lo), _mm256_castsi256_ps(a.lo), mvec(m & 0xFFu))),
          _mm256_castps_si256(
              _mm256_blendv_ps(_mm256_castsi256_ps(b.hi), _mm256_castsi256_ps(a.hi), mvec((m >> 8) & 0xFFu)))};
}
// (a + 0.5) 2^-32 for a < 2^31 (a converted as a signed int: exact sign, 24-bit rounding)
FS_INLINE vf uniform_half(vu a) {
  const __m256 s = _mm256_set1_ps(2.3283064365386962890625e-10f), h = _mm256_set1_ps(1.16415321826934814453125e-10f);
  return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(a.lo), s, h), _mm256_fmadd_ps(_mm256_cvtepi32_ps(a.hi), s, h)};
}
// The exponent of float(a) for a < 2^31 (converted as a signed int, rounded to nearest): floor(log2 a) for a >= 1
// except where the rounding reaches the next power of two (then at most 2^-23 above log2 a); -127 for a = 0.
FS_INLINE __m256 ulog2_8(__m256i a) {
  const __m256i bits = _mm256_castps_si256(_mm256_cvtepi32_ps(a));
  return _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xFF)), _mm256_set1_epi32(127)));
}
FS_INLINE vf ulog2(vu a) { return {ulog2_8(a.lo), ulog2_8(a.hi)}; }
// out[q] lane m = in[m & 3] lane (4 q + m / 4) (through memory on this path)
FS_INLINE void transpose4x16(const vf in[4], vf out[4]) {
  alignas(32) float a[4][kLanes], b[4 * kLanes];
  for (int j = 0; j < 4; ++j) store(a[j], in[j]);
  for (int l = 0; l < kLanes; ++l)
    for (int j = 0; j < 4; ++j) b[4 * l + j] = a[j][l];
  for (int q = 0; q < 4; ++q) out[q] = load(b + q * kLanes);
}
FS_INLINE mask_t bits16(uint32_t w) { return w & 0xFFFFu; }
// Bit j set where p[j] > 0, for 32 consecutive output counts (a negative count is treated as 0,
// docs/semantics.md §3 B, C)
FS_INLINE uint32_t positive32(const int32_t* p) {
  uint32_t m = 0;
  for (int q = 0; q < 4; ++q) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * q));
    __m256i g = _mm256_cmpgt_epi32(v, _mm256_setzero_si256());
    m |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(g))) << (8 * q);
  }
  return m;
}
FS_INLINE uint32_t positive32(const int16_t* p) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  // 16-bit lanes of all ones / zeros, packed to bytes: (a0-7, b0-7, a8-15, b8-15) per 128-bit half
  const __m256i g = _mm256_packs_epi16(_mm256_cmpgt_epi16(a, zero), _mm256_cmpgt_epi16(b, zero));
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_permute4x64_epi64(g, _MM_SHUFFLE(3, 1, 2, 0))));
}

#else
// ================================================================================================
// portable
struct vf {
  float v[kLanes];
};
struct vu {
  uint32_t v[kLanes];
};

template <typename T>
FS_INLINE vf load(const T* p) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = to_float(p[i]);
  return r;
}
FS_INLINE void store(float* p, vf a) { std::memcpy(p, a.v, sizeof(a.v)); }
FS_INLINE vf set1(float x) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = x;
  return r;
}
#define FS_BINOP(NAME, EXPR)                          \
  inline vf NAME(vf a, vf b) {                        \
    vf r;                                             \
    for (int i = 0; i < kLanes; ++i) r.v[i] = (EXPR); \
    return r;                                         \
  }
FS_BINOP(operator+, a.v[i] + b.v[i])
FS_BINOP(operator-, a.v[i] - b.v[i])
FS_BINOP(operator*, a.v[i] * b.v[i])
FS_BINOP(operator/, a.v[i] / b.v[i])
FS_BINOP(vmax, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
FS_BINOP(vmin, a.v[i] < b.v[i] ? a.v[i] : b.v[i])
#undef FS_BINOP
FS_INLINE vf vabs(vf a) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = std::fabs(a.v[i]);
  return r;
}
FS_INLINE vf fmadd(vf a, vf b, vf c) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
#define FS_CMP(NAME, EXPR)                                   \
  inline mask_t NAME(vf a, vf b) {                           \
    mask_t m = 0;                                            \
    for (int i = 0; i < kLanes; ++i) m |= mask_t(EXPR) << i; \
    return m;                                                \
  }
FS_CMP(gt, a.v[i] > b.v[i])
FS_CMP(ge, a.v[i] >= b.v[i])
FS_CMP(le, a.v[i] <= b.v[i])
FS_CMP(lt, a.v[i] < b.v[i])
FS_CMP(eq, a.v[i] == b.v[i])
FS_CMP(unord, a.v[i] != a.v[i] || b.v[i] != b.v[i])
#undef FS_CMP
FS_INLINE vf select(mask_t m, vf a, vf b) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = ((m >> i) & 1) ? a.v[i] : b.v[i];
  return r;
}
FS_INLINE vf maskz(mask_t m, vf a) { return select(m, a, set1(0.0f)); }
FS_INLINE vf mask_add(vf acc, mask_t m, vf a) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = ((m >> i) & 1) ? acc.v[i] + a.v[i] : acc.v[i];
  return r;
}
FS_INLINE float hmax(vf a) {
  float m = a.v[0];
  for (int i = 1; i < kLanes; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
FS_INLINE float hsum(vf a) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += a.v[i];
  return s;
}
FS_INLINE int compress(float* dst, mask_t m, vf a) {
  int n = 0;
  for (int i = 0; i < kLanes; ++i)
    if ((m >> i) & 1) dst[n++] = a.v[i];
  return n;
}
// Same Cephes polynomials as the AVX-512 path, written lane by lane without calls so that compilers vectorise them
// (AVX2 / NEON); the exponent is applied with integer bit arithmetic.
FS_INLINE float exp_lane(float x) {
  const bool under = x < -87.3365447504f;
  float xc = x < -87.3365447504f ? -87.3365447504f : (x > 88.3762626647949f ? 88.3762626647949f : x);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n as two factors (n may be 128 near the top of the range)
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float f1, f2;
  std::memcpy(&f1, &b1, 4);
  std::memcpy(&f2, &b2, 4);
  const float y = p * f1 * f2;
  return under ? 0.0f : y;
}
FS_INLINE float log_lane(float x) {  // positive normal x
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 127);
  const uint32_t mb = (bits & 0x007FFFFFu) | 0x3F800000u;  // mantissa in [1, 2)
  float m;
  std::memcpy(&m, &mb, 4);
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292E-2f;
  y = y * f - 1.1514610310E-1f;
  y = y * f + 1.1676998740E-1f;
  y = y * f - 1.2420140846E-1f;
  y = y * f + 1.4249322787E-1f;
  y = y * f - 1.6668057665E-1f;
  y = y * f + 2.0000714765E-1f;
  y = y * f - 2.4999993993E-1f;
  y = y * f + 3.3333331174E-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return f + y + e * 0.693359375f;
}
FS_INLINE vf vexp(vf x) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = exp_lane(x.v[i]);
  return r;
}
FS_INLINE vf vlog(vf x) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = log_lane(x.v[i]);
  return r;
}
FS_INLINE vu uset1(uint32_t x) {
  vu r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = x;
  return r;
}
FS_INLINE vu uiota(uint32_t base) {
  vu r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = base + static_cast<uint32_t>(i);
  return r;
}
FS_INLINE vu uxor(vu a, vu b) {
  vu r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] ^ b.v[i];
  return r;
}
FS_INLINE void mulhilo(uint32_t a, vu b, vu& hi, vu& lo) {
  for (int i = 0; i < kLanes; ++i) {
    uint64_t p = static_cast<uint64_t>(a) * b.v[i];
    hi.v[i] = static_cast<uint32_t>(p >> 32);
    lo.v[i] = static_cast<uint32_t>(p);
  }
}
FS_INLINE void ustore(uint32_t* p, vu a) { std::memcpy(p, a.v, sizeof(a.v)); }
FS_INLINE vu uload(const uint32_t* p) {
  vu r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
FS_INLINE mask_t uhigh(vu r) {
  mask_t m = 0;
  for (int i = 0; i < kLanes; ++i) m |= mask_t(r.v[i] >> 31) << i;
  return m;
}
FS_INLINE vu unot(vu a) {
  vu r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = ~a.v[i];
  return r;
}
FS_INLINE vu uselect(mask_t m, vu a, vu b) {
  vu r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = ((m >> i) & 1) ? a.v[i] : b.v[i];
  return r;
}
FS_INLINE vf uniform_half(vu a) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<float>(2u * a.v[i] + 1u) * 1.16415321826934814453125e-10f;
  return r;
}
// floor(log2 a) for a >= 1; -1 for a = 0
FS_INLINE vf ulog2(vu a) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] ? static_cast<float>(31 - __builtin_clz(a.v[i])) : -1.0f;
  return r;
}
// out[q] lane m = in[m & 3] lane (4 q + m / 4)
FS_INLINE void transpose4x16(const vf in[4], vf out[4]) {
  for (int q = 0; q < 4; ++q)
    for (int m = 0; m < kLanes; ++m) out[q].v[m] = in[m & 3].v[4 * q + (m >> 2)];
}
FS_INLINE mask_t bits16(uint32_t w) { return w & 0xFFFFu; }
// Bit j set where p[j] > 0, for 32 consecutive output counts (a negative count is treated as 0,
// docs/semantics.md §3 B, C)
template <typename C>
FS_INLINE uint32_t positive32(const C* p) {
  uint32_t m = 0;
  for (int j = 0; j < 32; ++j) m |= static_cast<uint32_t>(p[j] > 0) << j;
  return m;
}
#endif

// Fast scalar exp consistent with the vector one (used for a handful of values).
FS_INLINE float exp1(float x) {
  vf r = vexp(set1(x));
  float out[kLanes];
  store(out, r);
  return out[0];
}

}  // namespace simd
}  // namespace fastsampler
