// Philox4x32-10 (Random123 definition) and the exponential noise of docs/semantics.md §7.
//
// Variate j of a row: word (j & 3) of Philox4x32-10(key = (seed lo32, seed hi32), counter = (j >> 2, step, seq,
// stream)); token noise: j = token id, stream 0; tile noise: j = tile index, stream 1. E = -ln((r + 0.5) 2^-32) if r <
// 2^31, else -log1p(-((~r) + 0.5) 2^-32). The race uses -ln E.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastsampler/simd.h"

namespace fastsampler {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxKey {
  uint32_t k0, k1;
};

inline void philox4x32_10(PhiloxKey key, const uint32_t ctr_in[4], uint32_t out[4]) {
  uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The 32-bit word of variate j.
inline uint32_t philox_word(PhiloxKey key, uint64_t j, uint32_t step, uint32_t seq, uint32_t stream) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(j >> 2), step, seq, stream};
  uint32_t out[4];
  philox4x32_10(key, ctr, out);
  return out[j & 3];
}

// Exponential variate from a word, float64 (both branches keep full relative precision).
inline double exp_noise(uint32_t r) {
  constexpr double kScale = 2.3283064365386962890625e-10;  // 2^-32
  if (r < 0x80000000u) return -std::log((static_cast<double>(r) + 0.5) * kScale);
  return -std::log1p(-(static_cast<double>(~r) + 0.5) * kScale);
}

// Philox4x32-10 of the 16 counters (c0[l], step, seq, stream): word j of counter l in lane l of out[j].
inline void philox16(PhiloxKey key, simd::vu c0, uint32_t step, uint32_t seq, uint32_t stream, simd::vu out[4]) {
  using namespace simd;
  vu c1 = uset1(step), c2 = uset1(seq), c3 = uset1(stream);
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    vu hi0, lo0, hi1, lo1;
    mulhilo(kPhiloxM0, c0, hi0, lo0);
    mulhilo(kPhiloxM1, c2, hi1, lo1);
    c0 = uxor(uxor(hi1, c1), uset1(k0));
    c1 = lo1;
    c2 = uxor(uxor(hi0, c3), uset1(k1));
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// -ln E of 16 words, float32 (the race's token noise; lane for lane, the same operations whatever the words' order).
inline simd::vf neg_log_noise16(simd::vu r) {
  using namespace simd;
  const vf one = set1(1.0f);
  mask_t hi = uhigh(r);
  vf u = uniform_half(uselect(hi, unot(r), r));  // (a + 0.5) 2^-32 in (0, 0.5]
  vf t = one - u;                                // high branch: E = -log1p(-u) = ln(t) * u / (t - 1)
  vf lg = vlog(select(hi, t, u));
  vf tm1 = t - one;
  mask_t exact_one = eq(tm1, set1(0.0f));
  // avoid 0/0 in lanes where t == 1 (those take E = u)
  vf safe = select(exact_one, set1(-1.0f), tm1);
  vf e_hi = select(exact_one, u, (lg * u) / safe);
  vf e = select(hi, e_hi, set1(0.0f) - lg);
  return set1(0.0f) - vlog(e);
}

// An upper bound of -ln E for a word r, valid for neg_log_noise16's float32 values and for -std::log(exp_noise(r)),
// computed without a logarithm (docs/semantics.md §7; -ln E increases with r). Below 2^31, E >= ln 2, so -ln E <= -ln
// ln 2 = 0.3665. Above, with c = ~r, E = -ln u >= 1 - u = (c + 0.5) 2^-32, so -ln E <= 32 ln 2 - ln(c + 0.5) <= (32 -
// floor(log2 c)) ln 2 (33 ln 2 for c = 0). kNoiseBoundSlack covers the rounding of the computed noise (under 1e-5) and
// of the bound.
constexpr float kNoiseBoundSlack = 1e-3f;
constexpr float kLn2f = 0.693147180559945309f;
constexpr float kNoiseLowBound = 0.36651292058166435f + kNoiseBoundSlack;

inline simd::vf neg_log_noise_bound16(simd::vu r) {
  using namespace simd;
  // float(c)'s exponent may round up to the next power of two: at most 2^-23 above log2 c, within the slack
  const vf e = vmax(ulog2(unot(r)), set1(-1.0f));
  const vf hi_bound = (set1(32.0f) - e) * set1(kLn2f) + set1(kNoiseBoundSlack);
  return select(uhigh(r), hi_bound, set1(kNoiseLowBound));
}

inline double neg_log_noise_bound(uint32_t r) {
  if (r < 0x80000000u) return kNoiseLowBound;
  const uint32_t c = ~r;
  const int e = c ? 31 - __builtin_clz(c) : -1;
  return (32 - e) * static_cast<double>(kLn2f) + kNoiseBoundSlack;
}

// -ln E for 64 consecutive variates j = 4 * c0base + 0 .. 63 (16 counters c0base .. c0base + 15), float32, written in
// id order to out[64].
inline void neg_log_noise64(PhiloxKey key, uint32_t c0base, uint32_t step, uint32_t seq, uint32_t stream,
                            float out[64]) {
  using namespace simd;
  vu words[4];
  philox16(key, uiota(c0base), step, seq, stream, words);
  vf nle[4], ids[4];
  for (int w = 0; w < 4; ++w) nle[w] = neg_log_noise16(words[w]);
  transpose4x16(nle, ids);
  for (int q = 0; q < 4; ++q) store(out + q * kLanes, ids[q]);
}

}  // namespace fastsampler
