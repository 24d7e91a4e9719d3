// The per-row sampling pipeline of docs/semantics.md §2-§3 on raw pointers, float32 inside, templated on the input type
// (float, fp16_t, bf16_t). Framework-free: no pybind11 / torch headers.
//
// Per row:
//   1. Pass 1 over the logits, tile by tile (4096 ids, the race tiles), software-prefetching the
//   next tile: convert
//      to float32 into a row buffer z; raw statistics when raw logprobs are asked for; the sparse stage A-C edits (CSR
//      bias, penalties on the tokens that occurred, allowed-mask words that are not all ones, EOS ids); temperature;
//      then, while the tile is in L1, its max, finite count, sum of exp(z - tile max) (and, for typical, the entropy
//      sum), and the 16 lane maxima.
//   2. Truncation: every rule is a value threshold on z (typical: a band |z - c0| <= s*); no sort
//   of the
//      vocabulary.
//      - top-k <= 112 / mirostat v1: a "head" of the top values, collected by a streaming filter
//      whose threshold
//        starts at the k-th largest lane maximum (a lower bound of the k-th largest value), so only about k elements
//        are ever buffered. Larger k: the same filter over the row.
//      - top-p after top-k: an exact walk over the head. top-p over the full vocabulary and
//      typical: pass 1 keeps
//        exp(z - tile max) and an exact set E (per tile, the elements at or above its smallest lane maximum); E plus a
//        1-in-64 subsample estimate the boundary; one pass computes exact masses above four thresholds placed around
//        the estimate (± 1.5 and ± 4 standard errors) and compresses the candidates of the inner bracket; a few
//        multi-threshold levels over the candidates resolve the boundary exactly (ties kept together). A wrong guess
//        only costs a second, cheaper collection pass.
//   3. Kept tile weights (from the head or the bracket pass when available, else a masked exp
//   pass), the tile
//      race with Philox stream 1, the token race inside the winning tile with stream 0 (16-lane Philox, noise only for
//      64-id blocks holding kept tokens that can still win).
//   4. Logprobs (raw / processed / final), top-N and rank; the mirostat mu update; or the sampling
//   distribution.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastsampler/philox.h"
#include "fastsampler/select.h"
#include "fastsampler/simd.h"

namespace fastsampler {

// Parameter columns (match fastsampler/_batch.py).
enum FCol { F_TEMPERATURE = 0, F_TOP_P, F_MIN_P, F_TYPICAL_P, F_FREQ, F_PRES, F_REP, F_MIRO_TAU, F_MIRO_ETA, NF };
enum ICol {
  I_TOP_K = 0,
  I_MIN_KEEP,
  I_MIRO_MODE,
  I_MIN_TOKENS,
  I_IGNORE_EOS,
  I_LOGPROBS,
  I_TOP_LOGPROBS,
  I_LOGPROBS_MODE,
  NI
};
enum LogprobsMode { MODE_RAW = 0, MODE_PROCESSED = 1, MODE_FINAL = 2 };

// Ids per tile of the two-level race (docs/semantics.md §3 F).
constexpr int64_t kTile = 4096;
// The most probable tokens Mirostat v1 fits its Zipf exponent on (docs/semantics.md §3 E).
constexpr int64_t kMirostatM = 100;
// The widest top-N logprob output a row may ask for (docs/semantics.md §6).
constexpr int64_t kMaxTopLogprobs = 20;
// Where a Sampler's int16 output counts saturate (docs/semantics.md §3 C).
constexpr int32_t kCountMax = std::numeric_limits<int16_t>::max();
constexpr int64_t kHead = 128;  // top values collected during pass 1 (top-k, top-p, mirostat v1 fast paths)

struct BatchArgs {
  // logits (B, V) with row stride (elements); columns >= vocab are padding
  const void* logits = nullptr;
  int64_t B = 0, V = 0, row_stride = 0, vocab = 0;
  const float* fparams = nullptr;    // (B, NF)
  const int32_t* iparams = nullptr;  // (B, NI)
  const int64_t* seeds = nullptr;    // (B,)
  const int64_t* steps = nullptr;    // (B,)
  const int64_t* seqs = nullptr;     // (B,)
  const float* mu_in = nullptr;      // (B,)
  const int32_t* allowed = nullptr;  // (B, allowed_stride) words or null
  int64_t allowed_stride = 0;
  const int32_t* prompt = nullptr;  // (B, prompt_stride) words or null
  int64_t prompt_stride = 0;
  const void* counts = nullptr;  // (B, counts_stride) int16 / int32 or null
  int counts_bytes = 4;
  int64_t counts_stride = 0;
  const int32_t* bias_indptr = nullptr;  // (B + 1,) or null
  const int32_t* bias_ids = nullptr;
  const float* bias_vals = nullptr;
  const int32_t* eos = nullptr;
  int64_t n_eos = 0;
  int64_t n_top = 0;
  // outputs (sample)
  int64_t* tokens = nullptr;
  uint8_t* valid = nullptr;
  float* logprobs = nullptr;
  int64_t* top_ids = nullptr;  // (B, n_top)
  float* top_lps = nullptr;    // (B, n_top)
  int64_t* ranks = nullptr;
  float* mu_out = nullptr;
  // output (sampling_probs): (B, V) float32; when set, the draw is skipped
  float* probs = nullptr;
  // output (kept_mask): (B, V), 1 exactly on the kept set S (docs/semantics.md §3 E), 0 elsewhere (greedy rows: the
  // argmax only; invalid rows and padding columns: 0); when set, the draw is skipped
  uint8_t* kept = nullptr;
};

// Bytes held by the Scratch of every thread (all element types), for fastsampler._C.scratch_bytes().
inline std::atomic<int64_t>& scratch_bytes_counter() {
  static std::atomic<int64_t> bytes{0};
  return bytes;
}

// A thread keeps its Scratch between batches, so steady-state decoding allocates nothing, unless it holds more than
// this when a batch ends; then it frees it. A row of V ids needs about 64 bytes per id (12 float32 row buffers: 48; the
// selection buffer of a k-th value: up to 16 when min_keep reaches V; tile arrays: under 1), so 80 bytes per id at V =
// 2^18 = 262144 (20 MiB) keeps the buffers of every current vocabulary (Llama 3: 128256, Gemma: 262144) while a one-off
// call on a larger row does not pin its memory (V = 2^24 needs about 1 GiB). See docs/cpu.md.
constexpr int64_t kScratchCapBytes = int64_t{80} << 18;

// Per-thread scratch, grown on demand (to the exact size a row needs) and kept between calls while it stays within
// kScratchCapBytes; its size is reported to scratch_bytes_counter().
struct Scratch {
  std::vector<float> z, e, ck, cw, tk, tw, ci, ck2, cw2, ek, ew, ei;
  std::vector<float> tile_max, tile_sum, lane_max, raw_lane_max, tile_r;
  std::vector<double> tile_w;
  TopSel sel, sel_raw, head;
  int64_t counted = 0;  // bytes this Scratch has added to scratch_bytes_counter()

  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { scratch_bytes_counter().fetch_sub(counted, std::memory_order_relaxed); }

  // Every buffer is checked on its own: after a failed allocation (bad_alloc, reported as a failed row) the next call
  // still finds each one large enough or grows it.
  void ensure(int64_t vp, int64_t ntiles) {
    const size_t need = static_cast<size_t>(vp + 2 * simd::kLanes);
    for (std::vector<float>* v : {&z, &ck, &cw, &tk, &tw, &ci, &ck2, &cw2, &e, &ek, &ew, &ei}) grow(*v, need);
    const size_t nt = static_cast<size_t>(ntiles);
    grow(tile_max, nt);
    grow(tile_sum, nt);
    grow(lane_max, nt * simd::kLanes);
    grow(tile_r, nt);
    grow(raw_lane_max, nt * simd::kLanes);
    grow(tile_w, nt * 5);  // kept tile weights + 4 rows of threshold masses (mass_select)
  }
  // Bytes allocated by the buffers.
  int64_t bytes() const {
    size_t b = 0;
    for (const std::vector<float>* v : {&z, &e, &ck, &cw, &tk, &tw, &ci, &ck2, &cw2, &ek, &ew, &ei, &tile_max,
                                        &tile_sum, &lane_max, &raw_lane_max, &tile_r})
      b += v->capacity() * sizeof(float);
    b += tile_w.capacity() * sizeof(double);
    b += (sel.buf.capacity() + sel_raw.buf.capacity() + head.buf.capacity()) * sizeof(Entry);
    return static_cast<int64_t>(b);
  }
  // Brings scratch_bytes_counter() up to date with this Scratch's size.
  void sync() {
    const int64_t b = bytes();
    if (b != counted) {
      scratch_bytes_counter().fetch_add(b - counted, std::memory_order_relaxed);
      counted = b;
    }
  }
  // At the end of a batch, on the owning thread: frees everything when above kScratchCapBytes.
  void trim() {
    if (bytes() > kScratchCapBytes) {
      for (std::vector<float>* v : {&z, &e, &ck, &cw, &tk, &tw, &ci, &ck2, &cw2, &ek, &ew, &ei, &tile_max, &tile_sum,
                                    &lane_max, &raw_lane_max, &tile_r})
        std::vector<float>().swap(*v);
      std::vector<double>().swap(tile_w);
      for (TopSel* t : {&sel, &sel_raw, &head}) std::vector<Entry>().swap(t->buf);
    }
    sync();
  }

 private:
  // exactly n elements (no geometric growth, which could overshoot the cap); contents are scratch
  template <class Vec>
  static void grow(Vec& v, size_t n) {
    if (v.size() < n) {
      Vec fresh(n);
      v.swap(fresh);
    }
  }
};

namespace detail {

using namespace simd;

inline int64_t round16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Kept-set predicate: z >= lo (finite), and for typical |z - c0| <= s.
struct Keep {
  float lo = -kInf;
  bool band = false;
  float c0 = 0.0f, s = kInf;
  inline mask_t mask(vf z) const {
    mask_t m = gt(z, set1(-kInf)) & ge(z, set1(lo));
    if (band) m &= le(vabs(z - set1(c0)), set1(s));
    return m;
  }
  inline bool test(float z) const {
    if (!(z > -kInf) || !(z >= lo)) return false;
    return !band || std::fabs(z - c0) <= s;
  }
  bool truncates() const { return lo > -kInf || band; }
};

// Count of z >= lo (finite) over [0, n16).
inline int64_t count_ge(const float* z, int64_t n16, float lo) {
  int64_t c = 0;
  const vf l = set1(lo), ninf = set1(-kInf);
  for (int64_t i = 0; i < n16; i += kLanes) {
    vf v = load(z + i);
    c += popcount(ge(v, l) & gt(v, ninf));
  }
  return c;
}

// k-th largest finite value with multiplicity (1 <= k <= nfinite).
inline float kth_largest(Scratch& s, const float* z, int64_t n16, int64_t k, int64_t nfinite) {
  if (k <= nfinite / 2 + 1) {
    s.sel.reset(k);
    s.sel.scan(z, n16, 0, [](int64_t) { return kAll; });
    s.sel.finish();
    return s.sel.buf[k - 1].v;
  }
  // from the bottom: the (nfinite - k + 1)-th smallest; negate into the candidate buffer on the fly
  const int64_t k2 = nfinite - k + 1;
  float* neg = s.tk.data();
  for (int64_t i = 0; i < n16; i += kLanes) {
    vf v = load(z + i);
    // -inf (masked) must stay out: map to -inf after negation
    store(neg + i, select(gt(v, set1(-kInf)), set1(0.0f) - v, set1(-kInf)));
  }
  s.sel.reset(k2);
  s.sel.scan(neg, n16, 0, [](int64_t) { return kAll; });
  s.sel.finish();
  return -s.sel.buf[k2 - 1].v;
}

// A value t with #{v >= t} >= k (as high as 16 bisection steps get it), or -inf when fewer than k values are finite. n
// is a multiple of 16. Used to seed streaming top-k filters from lane maxima, branch-free.
inline float lower_bound_kth(const float* v, int64_t n, int64_t k) {
  vf mn = set1(kInf), mx = set1(-kInf);
  int64_t nfin = 0;
  for (int64_t i = 0; i < n; i += kLanes) {
    vf a = load(v + i);
    const mask_t f = gt(a, set1(-kInf));
    nfin += popcount(f);
    mn = select(f, vmin(mn, a), mn);
    mx = vmax(mx, a);
  }
  if (nfin < k) return -kInf;
  float lo = -hmax(set1(0.0f) - mn), hi = hmax(mx);
  for (int it = 0; it < 16 && lo < hi; ++it) {
    const float mid = lo + 0.5f * (hi - lo);
    if (!(mid > lo)) break;
    int64_t c = 0;
    for (int64_t i = 0; i < n; i += kLanes) c += popcount(ge(load(v + i), set1(mid)));
    if (c >= k)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// tw[tile of id[j]] += w[j] for the candidates with key[j] >= v; ids ascending (collected in order), branch-free.
inline void add_tile_weights(double* tw, const float* key, const float* w, const float* id, int64_t n, float v) {
  const vf vv = set1(v);
  for (int64_t j = 0; j < n;) {
    const int64_t t = static_cast<int64_t>(id[j]) / kTile;
    const float lim = static_cast<float>((t + 1) * kTile);
    int64_t e = j + 1;  // id[j] is in tile t: the walk always advances
    while (e < n && id[e] < lim) ++e;
    vf acc = set1(0.0f);
    int64_t q = j;
    for (; q + kLanes <= e; q += kLanes) acc = mask_add(acc, ge(load(key + q), vv), load(w + q));
    double sum = hsum(acc);
    for (; q < e; ++q) sum += key[q] >= v ? w[q] : 0.0f;
    tw[t] += sum;
    j = e;
  }
}

// Mass selection on keys derived from z: the largest key value v with mass(key >= v) >= frac * total mass, over the
// elements selected by `pred`; weights exp(z - M). keyf maps a vector of z to keys; kmax bounds the keys above. Writes
// the total mass of the selected elements to *total. When *have_tw is set on return, s.tile_w holds the per-tile masses
// of {pred, key >= result} (weights exp(z - M)).
template <class KeyF, class PredF>
float mass_select(Scratch& s, const float* z, int64_t n16, float M, KeyF keyf, PredF pred, float kmax, int64_t nsel,
                  double frac, double* total, bool* have_tw, bool key_is_z = false, double known_total = -1.0,
                  const float* ebuf = nullptr, const float* tmax = nullptr, int64_t n_exact = -1,
                  const float* tile_r = nullptr) {
  float* ck = s.ck.data();
  float* cw = s.cw.data();
  const vf vM = set1(M);
  *have_tw = false;
  if (nsel <= 8192) {
    int64_t m = 0;
    double tot = 0.0;
    for (int64_t i = 0; i < n16; i += kLanes) {
      vf v = load(z + i);
      mask_t sel = pred(v);
      if (!sel) continue;
      vf w = maskz(sel, vexp(v - vM));
      tot += hsum(w);
      compress(ck + m, sel, keyf(v));
      m += compress(cw + m, sel, w);
    }
    *total = tot;
    return resolve_mass_desc(ck, cw, m, 0.0, frac * tot, s.tk.data(), s.tw.data());
  }
  if (n16 >= 64 * kLanes) {
    // 1. a subsample: one element in 64 (with the threshold of its tile when pass 1 collected an
    // exact set)
    float* zs = ck;
    float* rs = s.tw.data();
    int64_t ns = 0;
    for (int64_t i = 0; i + 64 <= n16; i += 64) {
      rs[ns] = tile_r ? tile_r[i / kTile] : kInf;
      zs[ns++] = z[i + (((i >> 6) * 7) & 63)];
    }
    for (int64_t i = ns; i < round16(ns); ++i) {
      zs[i] = -kInf;
      rs[i] = kInf;
    }
    alignas(64) static const float kIota[kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vf iota = load(kIota);
    // 2. the exact set E of heavy elements, so the sample only has to estimate the light rest.
    // Either pass 1
    //    collected it (every element at or above its tile's smallest lane maximum: about the top 1% of each tile,
    //    gathered while the tile was in L1), or a pass collects every selected element >= T2, T2 about the 32nd largest
    //    sampled value. Rmax: every element >= Rmax is in E.
    float* ek = s.ek.data();
    float* ew = s.ew.data();
    float* ei = s.ei.data();
    int64_t ne = 0;
    float Rmax = kInf;
    if (n_exact >= 0) {
      ne = n_exact;
      Rmax = -kInf;
      const int64_t ntl = (n16 + kTile - 1) / kTile;
      for (int64_t t = 0; t < ntl; ++t)
        if (tile_r[t] < kInf) Rmax = std::max(Rmax, tile_r[t]);  // +inf: a tile with nothing finite
    } else {
      float* zsel = s.tk.data();
      for (int64_t i = 0; i < round16(ns); i += kLanes) {
        vf v = load(zs + i);
        store(zsel + i, select(pred(v), v, set1(-kInf)));
      }
      float T2 = lower_bound_kth(zsel, round16(ns), 32);
      if (T2 > -kInf) {
        const vf vT2 = set1(T2);
        for (int64_t i = 0; i < n16; i += kLanes) {
          vf v = load(z + i);
          const mask_t me = pred(v) & ge(v, vT2);  // branch-free: the pattern is unpredictable on new rows
          compress(ek + ne, me, v);
          ne += compress(ei + ne, me, iota + set1(static_cast<float>(i)));
        }
        Rmax = T2;
        for (int64_t i = 0; i < ns; ++i) rs[i] = T2;
      }
    }
    double emass = 0.0;
    for (int64_t i = ne; i < round16(ne); ++i) ek[i] = -kInf;
    for (int64_t i = 0; i < ne; i += kLanes) {
      vf v = load(ek + i);
      vf w = maskz(pred(v) & gt(v, set1(-kInf)),
                   vexp(v - vM));  // E from pass 1 ignores pred: weight 0 then
      store(ew + i, w);
      emass += hsum(w);
      store(ek + i, keyf(v));
    }
    if (key_is_z && known_total > 0.0 && ne > 0 && emass >= frac * known_total) {
      // the boundary may lie in E: resolve there, no further pass, when E holds everything above it
      const double target = frac * known_total;
      std::copy(ek, ek + ne, s.ck2.data());
      std::copy(ew, ew + ne, s.cw2.data());
      const float v = resolve_mass_desc(s.ck2.data(), s.cw2.data(), ne, 0.0, target, s.tk.data(), s.cw.data());
      if (v >= Rmax) {
        double* tw = s.tile_w.data();
        const int64_t ntl = (n16 + kTile - 1) / kTile;
        for (int64_t t = 0; t < ntl; ++t) tw[t] = 0.0;
        add_tile_weights(tw, ek, ew, ei, ne, v);
        *total = known_total;
        *have_tw = true;
        return v;
      }
    }
    // 3. the estimate: E exactly (weight 1/32) and the sampled elements below T2 (weight 1)
    float* sk = s.ck2.data();
    float* sw = s.cw2.data();
    int64_t m = 0;
    double stot = 0.0, stot2 = 0.0;
    const vf inv32 = set1(1.0f / 64.0f);
    for (int64_t i = 0; i < ns; i += kLanes) {
      vf v = load(zs + i);
      mask_t sel = pred(v) & gt(v, set1(-kInf)) & lt(v, load(rs + i));
      if (!sel) continue;
      vf w = maskz(sel, vexp(v - vM));
      stot += hsum(w);
      stot2 += hsum(w * w);  // Poisson sampling variance (E is exact)
      compress(sk + m, sel, keyf(v));
      m += compress(sw + m, sel, w);
    }
    for (int64_t i = 0; i < ne; i += kLanes) {
      const mask_t sel = static_cast<mask_t>(ne - i >= kLanes ? kAll : ((1u << (ne - i)) - 1u));
      vf w = maskz(sel, load(ew + i)) * inv32;
      stot += hsum(w);
      compress(sk + m, sel, load(ek + i));
      m += compress(sw + m, sel, w);
    }
    // 2. exact masses at four thresholds placed at frac -4, -1.5, +1.5, +4 standard errors of the
    // sample's mass
    //    fraction (Poisson sampling of the non-head part), candidates inside the inner bracket
    if (m >= 64 && stot > 0.0) {
      const double se = std::max(1e-3, std::sqrt(stot2) / stot);
      constexpr int NT = 4;
      const double cs[NT] = {-4.0, -1.5, 1.5, 4.0};
      float th[NT];
      for (int j = 0; j < NT; ++j) {
        const double f = cs[j] < 0 ? std::max(frac + cs[j] * se, 0.25 * frac)
                                   : std::min(frac + cs[j] * se, frac + 0.75 * (1.0 - frac));
        if (f <= 0.0) {
          th[j] = kInf;
        } else if (f >= 1.0) {
          th[j] = -kInf;
        } else {
          std::copy(sk, sk + m, ck);
          std::copy(sw, sw + m, cw);
          th[j] = resolve_mass_desc(ck, cw, m, 0.0, f * stot, s.tk.data(), s.tw.data());
        }
        if (j > 0) th[j] = std::min(th[j], th[j - 1]);
      }
      // keep the brackets non-empty when one heavy element spans several quantiles: move the outer thresholds to the
      // neighbouring distinct sample keys
      for (int64_t i = m; i < round16(m); ++i) sk[i] = -kInf;
      auto next_above = [&](float t) {
        vf best = set1(kInf);
        for (int64_t i = 0; i < m; i += kLanes) {
          vf kv = load(sk + i);
          best = select(gt(kv, set1(t)), vmin(best, kv), best);
        }
        return -hmax(set1(0.0f) - best);
      };
      auto next_below = [&](float t) {
        vf best = set1(-kInf);
        for (int64_t i = 0; i < m; i += kLanes) {
          vf kv = load(sk + i);
          best = select(lt(kv, set1(t)), vmax(best, kv), best);
        }
        return hmax(best);
      };
      if (th[1] <= th[2] && th[2] < kInf) th[1] = next_above(th[2]);
      if (th[0] <= th[1] && th[1] < kInf) th[0] = next_above(th[1]);
      if (th[3] >= th[2] && th[2] > -kInf) th[3] = next_below(th[2]);
      const int64_t ntl = (n16 + kTile - 1) / kTile;
      double* tmass = s.tile_w.data() + ntl;  // (NT, ntl) per-tile masses of key >= th[j]
      float* ci = s.ci.data();
      vf vth[NT];
      for (int j = 0; j < NT; ++j) vth[j] = set1(th[j]);
      double mj[NT] = {0, 0, 0, 0}, tot = 0.0;
      int64_t nc = 0;
      for (int64_t i0 = 0, t = 0; i0 < n16; i0 += kTile, ++t) {
        const int64_t i1 = std::min(n16, i0 + kTile);
        vf acc[NT] = {set1(0.0f), set1(0.0f), set1(0.0f), set1(0.0f)};
        vf a_t = set1(0.0f);
        // weights from pass 1's exp(z - m_t) when kept, scaled to exp(z - M)
        const vf tsc = set1(ebuf && tmax[t] > -kInf ? std::exp(tmax[t] - M) : 0.0f);
        for (int64_t i = i0; i < i1; i += kLanes) {
          vf v = load(z + i);
          mask_t sel = pred(v);
          if (!sel) continue;
          vf w = maskz(sel, ebuf ? load(ebuf + i) * tsc : vexp(v - vM));
          vf kv = keyf(v);
          a_t = a_t + w;
          mask_t mk[NT];
          for (int j = 0; j < NT; ++j) {
            mk[j] = ge(kv, vth[j]) & sel;
            acc[j] = mask_add(acc[j], mk[j], w);
          }
          const mask_t mc = mk[2] & ~mk[1];  // branch-free compress
          compress(ck + nc, mc, kv);
          compress(ci + nc, mc, iota + set1(static_cast<float>(i)));
          nc += compress(cw + nc, mc, w);
        }
        for (int j = 0; j < NT; ++j) {
          tmass[j * ntl + t] = hsum(acc[j]);
          mj[j] += tmass[j * ntl + t];
        }
        tot += hsum(a_t);
      }
      const double target = frac * tot;
      int b = NT;
      for (int j = 0; j < NT; ++j) {
        if (mj[j] >= target) {
          b = j;
          break;
        }
      }
      const float bl = b < NT ? th[b] : -kInf;
      const float bh = b > 0 ? th[b - 1] : kInf;
      if (b != 2) {  // outside the inner bracket: collect the right one
        nc = 0;
        const vf vbl = set1(bl), vbh = set1(bh);
        for (int64_t i = 0; i < n16; i += kLanes) {
          vf v = load(z + i);
          mask_t sel = pred(v);
          if (!sel) continue;
          vf kv = keyf(v);
          const mask_t mc = sel & ge(kv, vbl) & lt(kv, vbh);
          compress(ck + nc, mc, kv);
          compress(ci + nc, mc, iota + set1(static_cast<float>(i)));
          nc += compress(cw + nc, mc,
                         v);  // z for now; the weights are computed on the compacted array
        }
        for (int64_t i = 0; i < nc; i += kLanes) store(cw + i, vexp(load(cw + i) - vM));
      }
      const double above = b > 0 ? mj[b - 1] : 0.0;
      std::copy(ck, ck + nc, s.ck2.data());
      std::copy(cw, cw + nc, s.cw2.data());
      const float v =
          nc > 0 ? resolve_mass_desc(s.ck2.data(), s.cw2.data(), nc, above, target, s.tk.data(), s.tw.data()) : bh;
      double* tw = s.tile_w.data();
      tmass = s.tile_w.data() + ntl;
      for (int64_t t = 0; t < ntl; ++t) tw[t] = b > 0 ? tmass[(b - 1) * ntl + t] : 0.0;
      add_tile_weights(tw, ck, cw, ci, nc, v);
      *total = tot;
      *have_tw = nc > 0;
      if (nc > 0) return v;
    }
  }
  constexpr int K = 15;
  constexpr float kDelta = 0.5f;
  float t[K];
  for (int j = 0; j < K; ++j) t[j] = kmax - (j + 1) * kDelta;
  double macc[K] = {0};
  double tot = 0.0;
  for (int64_t i0 = 0; i0 < n16; i0 += kTile) {
    const int64_t i1 = std::min(n16, i0 + kTile);
    vf acc[K];
    for (int j = 0; j < K; ++j) acc[j] = set1(0.0f);
    vf vt = set1(0.0f);
    for (int64_t i = i0; i < i1; i += kLanes) {
      vf v = load(z + i);
      mask_t sel = pred(v);
      if (!sel) continue;
      vf w = maskz(sel, vexp(v - vM));
      vf kv = keyf(v);
      vt = vt + w;
      for (int j = 0; j < K; ++j) acc[j] = mask_add(acc[j], ge(kv, set1(t[j])), w);
    }
    for (int j = 0; j < K; ++j) macc[j] += hsum(acc[j]);
    tot += hsum(vt);
  }
  *total = tot;
  const double target = frac * tot;
  int b = K;
  for (int j = 0; j < K; ++j) {
    if (macc[j] >= target) {
      b = j;
      break;
    }
  }
  const float bl = b < K ? t[b] : -kInf;
  const float bh = b > 0 ? t[b - 1] : kInf;
  const double above = b > 0 ? macc[b - 1] : 0.0;
  int64_t m = 0;
  for (int64_t i = 0; i < n16; i += kLanes) {
    vf v = load(z + i);
    mask_t sel = pred(v);
    if (!sel) continue;
    vf kv = keyf(v);
    sel &= ge(kv, set1(bl)) & lt(kv, set1(bh));
    if (!sel) continue;
    vf w = vexp(v - vM);
    compress(ck + m, sel, kv);
    m += compress(cw + m, sel, w);
  }
  return resolve_mass_desc(ck, cw, m, above, target, s.tk.data(), s.tw.data());
}

// max(count, 0) as float32 for the n <= 16 output counts at p (lanes from n on: 0); counts rows hold at least
// vocab_size entries, so nothing past the row is read
template <typename C>
inline vf counts16(const C* p, int64_t n) {
  alignas(64) float buf[kLanes];
  if (n == kLanes) {
    for (int j = 0; j < kLanes; ++j) buf[j] = static_cast<float>(std::max<int32_t>(p[j], 0));
  } else {
    for (int j = 0; j < kLanes; ++j) buf[j] = j < n ? static_cast<float>(std::max<int32_t>(p[j], 0)) : 0.0f;
  }
  return load(buf);
}

template <typename T>
inline vf load_tail(const T* p, int64_t n) {  // n < 16 valid elements, the rest -inf
  alignas(64) float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? to_float(p[i]) : -kInf;
  return load(buf);
}

}  // namespace detail

// Run one row. Thread-safe given a per-thread Scratch.
template <typename T>
void sample_row(const BatchArgs& a, int64_t r, Scratch& s) {
  using namespace simd;
  using namespace detail;
  const T* x = static_cast<const T*>(a.logits) + r * a.row_stride;
  const int64_t vs = a.vocab;
  const int64_t vp = round16(vs);
  const int64_t ntiles = (vs + kTile - 1) / kTile;
  s.ensure(vp, ntiles);
  float* z = s.z.data();

  const float* fp = a.fparams + r * NF;
  const int32_t* ip = a.iparams + r * NI;
  const float temp = fp[F_TEMPERATURE];
  const bool greedy = temp == 0.0f;
  const float scale = greedy ? 1.0f : 1.0f / temp;
  const bool kept_mode = a.kept != nullptr;
  const bool probs_mode = a.probs != nullptr || kept_mode;  // a (B, V) output instead of the draw
  const bool want_lp = !probs_mode && ip[I_LOGPROBS] != 0;
  const int lp_mode = ip[I_LOGPROBS_MODE];
  const int64_t ntop_row = want_lp ? std::min<int64_t>(std::max(ip[I_TOP_LOGPROBS], 0), a.n_top) : 0;
  const bool need_raw = want_lp && lp_mode == MODE_RAW;
  const int miro = ip[I_MIRO_MODE];
  const float mu_in = a.mu_in[r];
  const float rep = fp[F_REP], freq = fp[F_FREQ], pres = fp[F_PRES];
  const bool penal = (rep != 1.0f || freq != 0.0f || pres != 0.0f) && (a.prompt != nullptr || a.counts != nullptr);
  const bool ban_eos = a.n_eos > 0 && (ip[I_IGNORE_EOS] != 0 || a.steps[r] < static_cast<int64_t>(ip[I_MIN_TOKENS]));
  const int32_t* allowed = a.allowed ? a.allowed + r * a.allowed_stride : nullptr;
  const int32_t* prompt = a.prompt ? a.prompt + r * a.prompt_stride : nullptr;
  const int32_t* cnt32 =
      (a.counts && a.counts_bytes == 4) ? static_cast<const int32_t*>(a.counts) + r * a.counts_stride : nullptr;
  const int16_t* cnt16 =
      (a.counts && a.counts_bytes == 2) ? static_cast<const int16_t*>(a.counts) + r * a.counts_stride : nullptr;
  int64_t bptr = a.bias_indptr ? a.bias_indptr[r] : 0;
  const int64_t bend = a.bias_indptr ? a.bias_indptr[r + 1] : 0;

  // -------------------------------------------------------------------------------------------
  // pass 1
  bool bad = false;
  int64_t nfinite = 0;
  double raw_sum = 0.0;
  float raw_max = -kInf;
  // the head (top values, collected during pass 1) serves top-k up to kHead and mirostat v1's top 100
  const int64_t head_k =
      miro == 1 ? 112 : (ip[I_TOP_K] > 0 ? std::max<int64_t>(ip[I_TOP_K], std::max(ip[I_MIN_KEEP], 1)) + 16 : 0);
  const bool use_head = !greedy && head_k > 0 && head_k <= kHead;
  if (use_head) s.head.reset(head_k);
  float* tmax = s.tile_max.data();
  float* tsum = s.tile_sum.data();
  // typical without an earlier rule: the entropy sums come with pass 1
  const bool fuse_entropy =
      !greedy && miro == 0 && fp[F_TYPICAL_P] < 1.0f && ip[I_TOP_K] <= 0 && fp[F_TOP_P] >= 1.0f && fp[F_MIN_P] <= 0.0f;
  double* tent = s.tile_w.data() + ntiles;
  // rows whose top-p / typical goes through the full-row mass selection keep exp(z - tile max) from pass 1
  const bool store_e = fuse_entropy || (!greedy && miro == 0 && fp[F_TOP_P] < 1.0f && ip[I_TOP_K] <= 0);
  float* ebuf = s.e.data();
  float* tile_r = s.tile_r.data();
  int64_t n_exact = 0;
  alignas(64) static const float kIota16[kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vf iota16 = load(kIota16);
  const vf vscale = set1(scale);
  const bool edits = (a.bias_indptr && a.bias_indptr[r] < a.bias_indptr[r + 1]) || penal || allowed || ban_eos;
  // raw statistics equal z's when nothing edits the row and the temperature is 1 (or greedy)
  const bool raw_is_z = !edits && scale == 1.0f;
  const bool raw_pass = need_raw && !raw_is_z;
  // The softmax statistics (tile sums, S) are needed by processed logprobs (or raw ones that equal them), mirostat,
  // typical, untruncated draws and full-row top-p. Greedy rows never need them otherwise; top-k rows served by the head
  // compute them lazily, only if top-k turns out not to truncate.
  const bool lp_needs_stats = want_lp && (lp_mode == MODE_PROCESSED || (lp_mode == MODE_RAW && raw_is_z));
  // A row of one tile whose draw needs no weights: the tile race has a single entrant, and nothing else reads the kept
  // mass (Mirostat's update, final logprobs, the probabilities).
  const bool single_tile_draw = ntiles == 1 && !probs_mode && miro == 0 && !(want_lp && lp_mode == MODE_FINAL);
  const bool skip_exp = !lp_needs_stats && ((greedy && !probs_mode) ||
                                            (use_head && ip[I_TOP_K] > 0 && miro == 0 && fp[F_TYPICAL_P] >= 1.0f) ||
                                            (single_tile_draw && !store_e && !fuse_entropy));
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t i0 = t * kTile;
    const int64_t i1 = std::min(vs, i0 + kTile);
    const int64_t e16 = std::min(vp, i0 + kTile);  // end of the tile's vectors in z
    vf mx = set1(-kInf);
    mask_t badz = 0;
    int64_t nf = 0;
    const vf ninf = set1(-kInf);
    const char* pf = reinterpret_cast<const char*>(x + std::min(i0 + kTile, vs - 1));
    const char* pf_end = reinterpret_cast<const char*>(x + std::min(i0 + 2 * kTile, vs));
    if (!edits) {
      // no stage A-C edits on this row: convert, scale and take the statistics in one sweep
      vf rmx = set1(-kInf);
      mask_t badm = 0;
      int64_t i = i0;
      for (; i < e16; i += kLanes) {
        if (pf < pf_end) {
          __builtin_prefetch(pf);
          pf += 64;
        }
        vf u = i + kLanes <= i1 ? load(x + i) : load_tail(x + i, i1 - i);
        badm |= unord(u, u) | eq(u, set1(kInf));
        rmx = vmax(rmx, u);
        vf v = u * vscale;
        badz |= eq(v, set1(kInf));
        store(z + i, v);
        mx = vmax(mx, v);
        nf += popcount(gt(v, ninf));
      }
      if (badm || badz) bad = true;
      if (need_raw) store(s.raw_lane_max.data() + t * kLanes, rmx);
      const float rm = hmax(rmx);
      if (raw_pass && rm > -kInf && !bad) {  // raw statistics from the input (still in L1)
        vf acc = set1(0.0f), acc1 = set1(0.0f);
        const vf vrm = set1(rm);
        int64_t j = i0;
        for (; j + 2 * kLanes <= i1; j += 2 * kLanes) {
          acc = acc + vexp(load(x + j) - vrm);
          acc1 = acc1 + vexp(load(x + j + kLanes) - vrm);
        }
        for (; j < e16; j += kLanes)
          acc = acc + vexp((j + kLanes <= i1 ? load(x + j) : load_tail(x + j, i1 - j)) - vrm);
        const double ts = hsum(acc + acc1);
        if (rm > raw_max) {
          raw_sum = raw_sum * std::exp(static_cast<double>(raw_max) - rm) + ts;
          raw_max = rm;
        } else {
          raw_sum += ts * std::exp(static_cast<double>(rm) - raw_max);
        }
      }
    } else {
      // convert
      mask_t badm = 0;
      {
        int64_t i = i0;
        for (; i + kLanes <= i1; i += kLanes) {
          vf v = load(x + i);
          badm |= unord(v, v) | eq(v, set1(kInf));
          store(z + i, v);
        }
        if (i < i1) {
          vf v = load_tail(x + i, i1 - i);
          badm |= unord(v, v) | eq(v, set1(kInf));
          store(z + i, v);
        }
      }
      if (badm) bad = true;
      if (need_raw) {  // statistics of the input itself (z holds it until the edits)
        vf rmx = set1(-kInf), rmx1 = set1(-kInf);
        int64_t i = i0;
        for (; i + 2 * kLanes <= e16; i += 2 * kLanes) {
          rmx = vmax(rmx, load(z + i));
          rmx1 = vmax(rmx1, load(z + i + kLanes));
        }
        for (; i < e16; i += kLanes) rmx = vmax(rmx, load(z + i));
        rmx = vmax(rmx, rmx1);
        store(s.raw_lane_max.data() + t * kLanes, rmx);
        const float rm = hmax(rmx);
        if (rm > -kInf) {
          vf acc = set1(0.0f), acc1 = set1(0.0f);
          const vf vrm = set1(rm);
          int64_t j = i0;
          for (; j + 2 * kLanes <= e16; j += 2 * kLanes) {
            acc = acc + vexp(load(z + j) - vrm);
            acc1 = acc1 + vexp(load(z + j + kLanes) - vrm);
          }
          for (; j < e16; j += kLanes) acc = acc + vexp(load(z + j) - vrm);
          const double ts = hsum(acc + acc1);
          if (rm > raw_max) {
            raw_sum = raw_sum * std::exp(static_cast<double>(raw_max) - rm) + ts;
            raw_max = rm;
          } else {
            raw_sum += ts * std::exp(static_cast<double>(rm) - raw_max);
          }
        }
      }
      // stage A: bias
      while (bptr < bend && a.bias_ids[bptr] < i1) {
        const int32_t id = a.bias_ids[bptr];
        z[id] += a.bias_vals[bptr];
        ++bptr;
      }
      // stages B, C: penalties on the tokens that occurred
      if (penal) {
        const int64_t w0 = i0 >> 5, w1 = (i1 + 31) >> 5;
        for (int64_t wd = w0; wd < w1; ++wd) {
          uint32_t bits = prompt ? static_cast<uint32_t>(prompt[wd]) : 0u;
          uint32_t cbits = 0;
          const int64_t base = wd << 5;
          const int64_t lim = std::min<int64_t>(32, i1 - base);
          // a token counts as generated when its count is > 0: a negative count is treated as 0 (docs/semantics.md §3
          // B, C). Counts rows hold at least vocab_size entries: a full word is in bounds.
          if (lim == 32) {
            if (cnt32)
              cbits = positive32(cnt32 + base);
            else if (cnt16)
              cbits = positive32(cnt16 + base);
          } else if (cnt32) {
            for (int64_t j = 0; j < lim; ++j) cbits |= static_cast<uint32_t>(cnt32[base + j] > 0) << j;
          } else if (cnt16) {
            for (int64_t j = 0; j < lim; ++j) cbits |= static_cast<uint32_t>(cnt16[base + j] > 0) << j;
          }
          bits |= cbits;
          if (lim < 32) bits &= (1u << lim) - 1u;
          // 16 ids at a time, the same float32 operations as one id at a time: the rows of a long generation have most
          // of the vocabulary penalised, where a loop over ids mispredicts
          for (int h = 0; h < 2; ++h) {
            const mask_t pm = (bits >> (16 * h)) & kAll;
            if (!pm) continue;
            const mask_t cm = (cbits >> (16 * h)) & kAll;
            const int64_t b16 = base + 16 * h;  // z has 2 vectors of room beyond the row
            vf l = load(z + b16);
            if (rep != 1.0f) {
              const vf vr = set1(rep);
              l = select(pm, select(gt(l, set1(0.0f)), l / vr, l * vr), l);
            }
            if (cm) {  // count > 0 here; max(count, 0) in any case (§3 C)
              const int64_t n = std::min<int64_t>(kLanes, i1 - b16);
              const vf c = cnt32 ? counts16(cnt32 + b16, n) : counts16(cnt16 + b16, n);
              l = select(cm, l - fmadd(c, set1(freq), set1(pres)), l);
            }
            store(z + b16, l);
          }
        }
      }
      // stage A: allowed mask, EOS
      if (allowed) {
        const int64_t w0 = i0 >> 5, w1 = (i1 + 31) >> 5;
        for (int64_t wd = w0; wd < w1; ++wd) {
          uint32_t off = ~static_cast<uint32_t>(allowed[wd]);
          while (off) {
            const int j = __builtin_ctz(off);
            off &= off - 1;
            const int64_t id = (wd << 5) + j;
            if (id < i1) z[id] = -kInf;
          }
        }
      }
      if (ban_eos) {
        for (int64_t e = 0; e < a.n_eos; ++e) {
          const int64_t id = a.eos[e];
          if (id >= i0 && id < i1) z[id] = -kInf;
        }
      }
      // stage D and tile statistics
      const char* pc = nullptr;  // the next tile's output counts, when the penalties read them
      const char* pc_end = nullptr;
      if (penal && (cnt32 || cnt16)) {
        const char* c0 = cnt32 ? reinterpret_cast<const char*>(cnt32) : reinterpret_cast<const char*>(cnt16);
        pc = c0 + std::min(i0 + kTile, vs) * a.counts_bytes;
        pc_end = c0 + std::min(i0 + 2 * kTile, vs) * a.counts_bytes;
      }
      if (scale != 1.0f) {
        for (int64_t i = i0; i < e16; i += kLanes) {
          if (pf < pf_end) {
            __builtin_prefetch(pf);
            pf += 64;
          }
          if (pc < pc_end) {
            __builtin_prefetch(pc);
            pc += 64;
          }
          vf v = load(z + i) * vscale;
          badz |= unord(v, v) | eq(v, set1(kInf));
          store(z + i, v);
          mx = vmax(mx, v);
          nf += popcount(gt(v, ninf));
        }
      } else {
        for (int64_t i = i0; i < e16; i += kLanes) {
          if (pf < pf_end) {
            __builtin_prefetch(pf);
            pf += 64;
          }
          if (pc < pc_end) {
            __builtin_prefetch(pc);
            pc += 64;
          }
          vf v = load(z + i);
          badz |= unord(v, v) | eq(v, set1(kInf));
          mx = vmax(mx, v);
          nf += popcount(gt(v, ninf));
        }
      }
    }  // edits
    if (badz) bad = true;
    nfinite += nf;
    store(s.lane_max.data() + t * kLanes,
          mx);  // 16 maxima of distinct elements: seeds the head's filter
    if (store_e && !bad) {
      // the exact set for the mass selection: this tile's elements >= its smallest finite lane maximum
      const float rt = -hmax(select(gt(mx, ninf), set1(0.0f) - mx, ninf));
      tile_r[t] = rt;
      if (rt < kInf) {
        const vf vr = set1(rt);
        for (int64_t i = i0; i < e16; i += kLanes) {
          vf v = load(z + i);
          const mask_t me = ge(v, vr);
          compress(s.ek.data() + n_exact, me, v);
          n_exact += compress(s.ei.data() + n_exact, me, iota16 + set1(static_cast<float>(i)));
        }
      }
    }
    const float m = hmax(mx);
    tmax[t] = m;
    if (m > -kInf && !bad && !skip_exp) {
      const vf vm = set1(m);
      vf acc0 = set1(0.0f), acc1 = set1(0.0f);
      int64_t i = i0;
      if (fuse_entropy) {  // also sum exp(z - m) (z - m) for the entropy (typical)
        // a term whose weight is 0 contributes 0 (0 ln 0 = 0, docs/semantics.md §3 E item 4): its z - m may be -inf (a
        // finite z more than FLT_MAX below m), and 0 * -inf would be NaN
        vf accb = set1(0.0f);
        for (; i < e16; i += kLanes) {
          vf d = load(z + i) - vm;
          vf e = vexp(d);
          store(ebuf + i, e);
          acc0 = acc0 + e;
          accb = mask_add(accb, gt(e, set1(0.0f)), e * d);
        }
        tent[t] = hsum(accb);
      } else if (store_e) {  // keep exp(z - m_t) for the mass selection
        for (; i < e16; i += kLanes) {
          vf e = vexp(load(z + i) - vm);
          store(ebuf + i, e);
          acc0 = acc0 + e;
        }
      }
      for (; i + 2 * kLanes <= e16; i += 2 * kLanes) {
        acc0 = acc0 + vexp(load(z + i) - vm);
        acc1 = acc1 + vexp(load(z + i + kLanes) - vm);
      }
      for (; i < e16; i += kLanes) acc0 = acc0 + vexp(load(z + i) - vm);
      tsum[t] = hsum(acc0 + acc1);
    } else {
      tsum[t] = 0.0f;
      if (fuse_entropy) tent[t] = 0.0;
    }
  }
  // padding lanes of the last vector are -inf (load_tail); nothing else beyond vs is read

  float M = -kInf;
  for (int64_t t = 0; t < ntiles; ++t) M = std::max(M, tmax[t]);
  if (use_head && !bad && M > -kInf) {
    // the head_k-th largest of the per-tile lane maxima (maxima of distinct elements) is a lower bound of the head_k-th
    // largest value: start the filter there, so only about head_k elements ever enter the buffer
    const int64_t nl = ntiles * kLanes;
    float seed;
    if (nl >= 2 * head_k) {
      seed = lower_bound_kth(s.lane_max.data(), nl, head_k);
    } else {
      // short rows have too few tile lane maxima for a useful bound (with as many maxima as head_k, their smallest lets
      // most of the row through the filter): take lane maxima of smaller groups of vectors instead, at least 4 head_k
      // of them, so that only about 1.2 head_k elements pass (1.4 head_k with 2 head_k maxima)
      alignas(64) float gmax[2 * (4 * kHead / kLanes + 1) * kLanes];
      const int64_t nvec = vp / kLanes;
      const int64_t want = (4 * head_k + kLanes - 1) / kLanes;
      const int64_t gv = std::max<int64_t>(1, nvec / want);
      int64_t ng = 0;
      for (int64_t g0 = 0; g0 < nvec; g0 += gv, ++ng) {
        vf m = set1(-kInf);
        for (int64_t q = g0; q < std::min(nvec, g0 + gv); ++q) m = vmax(m, load(z + q * kLanes));
        store(gmax + ng * kLanes, m);
      }
      seed = lower_bound_kth(gmax, ng * kLanes, head_k);
    }
    if (seed > -kInf) s.head.tau = std::nextafter(seed, -kInf);
    s.head.scan(z, vp, 0, [](int64_t) { return kAll; });
  }
  const bool invalid = bad || !(M > -kInf);
  const int64_t ntop_out = a.n_top;
  auto write_invalid = [&]() {
    if (kept_mode) {
      std::fill(a.kept + r * a.V, a.kept + (r + 1) * a.V, uint8_t{0});
      return;
    }
    if (probs_mode) {
      std::fill(a.probs + r * a.V, a.probs + (r + 1) * a.V, 0.0f);
      return;
    }
    a.tokens[r] = -1;
    a.valid[r] = 0;
    a.logprobs[r] = std::numeric_limits<float>::quiet_NaN();
    a.ranks[r] = -1;
    for (int64_t j = 0; j < ntop_out; ++j) {
      a.top_ids[r * ntop_out + j] = -1;
      a.top_lps[r * ntop_out + j] = std::numeric_limits<float>::quiet_NaN();
    }
    a.mu_out[r] = mu_in;
  };
  if (invalid) {
    write_invalid();
    return;
  }
  double S = 0.0;
  bool have_stats = !skip_exp;
  auto ensure_stats = [&]() {
    if (have_stats) return;
    have_stats = true;
    for (int64_t t = 0; t < ntiles; ++t) {
      const float m = tmax[t];
      tsum[t] = 0.0f;
      if (!(m > -kInf)) continue;
      const int64_t i0 = t * kTile, e16 = std::min(vp, i0 + kTile);
      vf acc = set1(0.0f);
      for (int64_t i = i0; i < e16; i += kLanes) acc = acc + vexp(load(z + i) - set1(m));
      tsum[t] = hsum(acc);
    }
    S = 0.0;
    for (int64_t t = 0; t < ntiles; ++t)
      if (tmax[t] > -kInf) S += static_cast<double>(tsum[t]) * std::exp(static_cast<double>(tmax[t]) - M);
  };
  for (int64_t t = 0; t < ntiles; ++t)
    if (tmax[t] > -kInf) S += static_cast<double>(tsum[t]) * std::exp(static_cast<double>(tmax[t]) - M);
  if (need_raw && raw_is_z) {
    raw_max = M;
    raw_sum = S;
  }

  // -------------------------------------------------------------------------------------------
  // truncation
  Keep keep;
  int64_t token = -1;
  double S_kept = S;  // mass of the kept set, relative to shift
  float shift = M;    // weights exp(z - shift)
  double* tw = s.tile_w.data();
  bool kept_in_head = false;
  bool have_tw = false;  // tw already holds the kept tile weights of tw_keep (from a mass selection)
  Keep tw_keep;          // the kept set is the first nkept_head entries of the head
  int64_t nkept_head = 0;
  const int64_t min_keep = std::max(ip[I_MIN_KEEP], 1);
  if (greedy) {
    // the first tile holding M, then its first element equal to M (bounded walks: M is one of them)
    int64_t tb = 0;
    while (tb + 1 < ntiles && tmax[tb] != M) ++tb;
    const int64_t iend = std::min(vs, tb * kTile + kTile) - 1;
    int64_t i = tb * kTile;
    while (i < iend && z[i] != M) ++i;
    token = i;
  } else {
    int64_t nsurv = nfinite;
    int64_t nh = 0;
    const Entry* hd = nullptr;
    float hlast = -kInf;
    bool hall = false;
    // every element with a value >= v is in the head
    auto head_covers = [&](float v) { return use_head && (hall || v > hlast); };
    bool nsurv_known = true;
    auto ensure_nsurv = [&]() {
      if (!nsurv_known) {
        nsurv = count_ge(z, vp, keep.lo);
        nsurv_known = true;
      }
    };
    auto raise_lo = [&](float thr) {
      if (thr > keep.lo) {
        keep.lo = thr;
        nsurv_known = false;
      }
    };
    // the head: the top kHead values (value desc, id asc) of pass 1, complete above its last value
    if (use_head) {
      s.head.finish();
      nh = s.head.n;
      hd = s.head.buf.data();
      hlast = nh ? hd[nh - 1].v : -kInf;
      hall = nh < head_k;
    }
    auto kth = [&](int64_t k) -> float {
      return (use_head && k <= nh) ? hd[k - 1].v : kth_largest(s, z, vp, k, nfinite);
    };
    if (miro == 0) {
      const int32_t top_k = ip[I_TOP_K];
      if (top_k > 0) {
        const int64_t k = std::max<int64_t>(top_k, min_keep);
        if (k < nfinite) raise_lo(kth(k));
      }
      const float top_p = fp[F_TOP_P];
      if (top_p < 1.0f) {
        const float lo = keep.lo;
        bool done = false;
        float thr = lo;
        const bool bounded = lo > -kInf;
        if (use_head && (!bounded || head_covers(lo))) {
          // walk the head in order; exact while the tie groups walked are complete
          int64_t ns = nh;
          if (!bounded) ensure_stats();
          double tot = S;
          if (bounded) {
            ns = 0;
            tot = 0.0;
            while (ns < nh && hd[ns].v >= lo) tot += std::exp(static_cast<double>(hd[ns++].v) - M);
          }
          const double target = static_cast<double>(top_p) * tot;
          double cum = 0.0;
          for (int64_t i = 0; i < ns;) {
            const float v = hd[i].v;
            int64_t j = i;
            const double w = std::exp(static_cast<double>(v) - M);
            do {  // hd[i] itself, then its ties: the walk always advances
              cum += w;
              ++j;
            } while (j < ns && hd[j].v == v);
            if (!bounded && !head_covers(v)) break;  // this group may continue beyond the head
            thr = v;
            if (cum >= target) {
              done = true;
              break;
            }
            i = j;
          }
          if (bounded && !done) done = true;  // never reached (rounding): keep every survivor (thr = last)
          if (done) {
            nsurv = bounded ? ns : nfinite;
            nsurv_known = true;
          }
        }
        bool htw = false;
        if (!done) {
          ensure_nsurv();
          ensure_stats();
          double tot = 0.0;
          thr = mass_select(
              s, z, vp, M, [](vf v) { return v; }, [lo](vf v) { return gt(v, set1(-kInf)) & ge(v, set1(lo)); }, M,
              nsurv, static_cast<double>(top_p), &tot, &htw, true, lo > -kInf ? -1.0 : S, store_e ? ebuf : nullptr,
              tmax, store_e ? n_exact : -1, store_e ? tile_r : nullptr);
        }
        const int64_t mk = std::min(min_keep, nsurv);
        if (mk > 1) {
          const float k2 = kth(mk);
          if (k2 < thr) {
            thr = k2;
            htw = false;
          }
        }
        raise_lo(thr);
        if (htw) tw_keep = keep;
        have_tw = htw;
      }
      const float min_p = fp[F_MIN_P];
      if (min_p > 0.0f) {
        float thr = static_cast<float>(static_cast<double>(M) + std::log(static_cast<double>(min_p)));
        if (min_keep > 1) {
          ensure_nsurv();
          const int64_t mk = std::min(min_keep, nsurv);
          if (mk > 1) thr = std::min(thr, kth(mk));
        }
        raise_lo(thr);
      }
      const float typ = fp[F_TYPICAL_P];
      if (typ < 1.0f) {
        ensure_nsurv();
        const float lo = keep.lo;
        // entropy of q over the survivors
        const vf vM = set1(M), vlo = set1(lo), ninf = set1(-kInf);
        double sw = 0.0, swz = 0.0;
        if (fuse_entropy && !(lo > -kInf)) {
          // A = sum_t e^{m_t - M} (B_t + (m_t - M) s_t) with B_t = sum exp(z - m_t)(z - m_t)
          for (int64_t t = 0; t < ntiles; ++t) {
            if (!(tmax[t] > -kInf)) continue;
            const double sc = std::exp(static_cast<double>(tmax[t]) - M);
            sw += sc * tsum[t];
            swz += sc * (tent[t] + (static_cast<double>(tmax[t]) - M) * tsum[t]);
          }
        }
        for (int64_t i0 = 0; i0 < vp && !(fuse_entropy && !(lo > -kInf)); i0 += kTile) {
          const int64_t i1 = std::min(vp, i0 + kTile);
          vf a0 = set1(0.0f), a1 = set1(0.0f);
          for (int64_t i = i0; i < i1; i += kLanes) {
            vf v = load(z + i);
            mask_t sel = gt(v, ninf) & ge(v, vlo);
            if (!sel) continue;
            vf d = v - vM;
            vf w = vexp(d);
            a0 = mask_add(a0, sel, w);
            // q = 0 contributes 0 to H (0 ln 0 = 0, docs/semantics.md §3 E item 4); d = z - M may be -inf for a finite
            // z (z - M below -FLT_MAX), and 0 * -inf would make H NaN
            a1 = mask_add(a1, sel & gt(w, set1(0.0f)), w * d);
          }
          sw += hsum(a0);
          swz += hsum(a1);
        }
        const double H = std::log(sw) - swz / sw;
        const float c0 = static_cast<float>(static_cast<double>(M) + std::log(sw) - H);
        const vf vc0 = set1(c0);
        double tot = 0.0;
        bool htw = false;
        float v = mass_select(
            s, z, vp, M, [vc0](vf u) { return set1(0.0f) - vabs(u - vc0); },
            [lo](vf u) { return gt(u, set1(-kInf)) & ge(u, set1(lo)); }, 0.0f, nsurv, static_cast<double>(typ), &tot,
            &htw, false, -1.0, store_e ? ebuf : nullptr, tmax, store_e ? n_exact : -1, store_e ? tile_r : nullptr);
        float sstar = -v;
        const int64_t mk = std::min(min_keep, nsurv);
        if (mk > 1) {
          // mk-th smallest |z - c0| among the survivors
          float* key = s.tk.data();
          for (int64_t i = 0; i < vp; i += kLanes) {
            vf u = load(z + i);
            mask_t sel = gt(u, ninf) & ge(u, vlo);
            store(key + i, select(sel, set1(0.0f) - vabs(u - vc0), ninf));
          }
          s.sel.reset(mk);
          s.sel.scan(key, vp, 0, [](int64_t) { return kAll; });
          s.sel.finish();
          // a survivor whose |z - c0| overflows to +inf (key -inf) never enters the selection: fewer than mk entries
          // means the mk-th smallest score is +inf (keep every survivor)
          const float s2 = s.sel.n >= mk ? -s.sel.buf[mk - 1].v : kInf;
          if (s2 > sstar) {
            sstar = s2;
            htw = false;
          }
        }
        keep.band = true;
        keep.c0 = c0;
        keep.s = sstar;
        if (htw) tw_keep = keep;
        have_tw = htw;
      }
    } else if (miro == 2) {
      // keep ln q = (z - M) - ln S >= -mu ln 2: the shift is added last, so ln S survives a large M
      float thr = static_cast<float>(M + (std::log(S) - static_cast<double>(mu_in) * 0.69314718055994530942));
      if (!(thr <= M)) thr = M;  // none kept (or NaN mu): keep the argmax
      raise_lo(thr);
    } else {                                                     // mirostat v1
      const int64_t m = std::min<int64_t>(kMirostatM, nfinite);  // nh >= m
      double kf = std::numeric_limits<double>::quiet_NaN();
      if (m >= 2) {
        double sum_tb = 0.0, sum_tt = 0.0;
        for (int64_t i = 0; i + 1 < m; ++i) {
          const double ti = std::log((i + 2.0) / (i + 1.0));
          const double bi = static_cast<double>(hd[i].v) - static_cast<double>(hd[i + 1].v);
          sum_tb += ti * bi;
          sum_tt += ti * ti;
        }
        const double sh = sum_tb / sum_tt;
        const double eps = sh - 1.0;
        const double N = static_cast<double>(vs);
        const double two_mu = std::pow(2.0, static_cast<double>(mu_in));
        const double base = std::fabs(eps) < 1e-6 ? two_mu / std::log(N) : (eps * two_mu) / (1.0 - std::pow(N, -eps));
        if (sh != 0.0)
          kf = (base < 0.0) ? std::numeric_limits<double>::quiet_NaN() : std::pow(base, 1.0 / sh);
        else
          kf = base > 1.0 ? std::numeric_limits<double>::infinity() : (base == 1.0 ? 1.0 : 0.0);
      }
      const double N = static_cast<double>(vs);
      if (!std::isfinite(kf)) kf = N;
      kf = std::floor(kf);
      kf = std::min(std::max(kf, 1.0), N);
      const int64_t k = static_cast<int64_t>(kf);
      if (k < nfinite) raise_lo(kth(k));
    }

    // kept tile weights
    kept_in_head = !keep.band && keep.lo > -kInf && head_covers(keep.lo);
    if (have_tw && keep.lo == tw_keep.lo && keep.band == tw_keep.band && keep.c0 == tw_keep.c0 && keep.s == tw_keep.s &&
        !kept_in_head) {
      S_kept = 0.0;
      for (int64_t t = 0; t < ntiles; ++t) S_kept += tw[t];
      if (!(S_kept > 0.0)) have_tw = false;
    } else {
      have_tw = false;
    }
    if (kept_mode) {
      // the kept mask needs no weights
    } else if (have_tw) {
      // from the mass selection
    } else if (kept_in_head) {
      for (int64_t t = 0; t < ntiles; ++t) tw[t] = 0.0;
      S_kept = 0.0;
      for (int64_t i = 0; i < nh && hd[i].v >= keep.lo; ++i) {
        const double w = std::exp(static_cast<double>(hd[i].v) - M);
        tw[hd[i].id / kTile] += w;
        S_kept += w;
        nkept_head = i + 1;
      }
    } else if (keep.truncates()) {
      for (int attempt = 0; attempt < 2; ++attempt) {
        const vf vsh = set1(shift);
        S_kept = 0.0;
        for (int64_t t = 0; t < ntiles; ++t) {
          tw[t] = 0.0;
          if (!(tmax[t] >= keep.lo)) continue;
          const int64_t i0 = t * kTile, e16 = std::min(vp, i0 + kTile);
          vf acc = set1(0.0f);
          for (int64_t i = i0; i < e16; i += kLanes) {
            vf v = load(z + i);
            mask_t km = keep.mask(v);
            if (!km) continue;
            acc = mask_add(acc, km, vexp(v - vsh));
          }
          tw[t] = hsum(acc);
          S_kept += tw[t];
        }
        if (S_kept > 0.0 || attempt == 1) break;
        // every kept weight underflowed relative to M: shift by the kept maximum
        float mk = -kInf;
        for (int64_t i = 0; i < vp; ++i)
          if (keep.test(z[i])) mk = std::max(mk, z[i]);
        shift = mk;
      }
    } else if (single_tile_draw && !have_stats) {
      tw[0] = 1.0;  // any positive weight: the only tile wins the race
    } else {
      ensure_stats();
      S_kept = S;
      for (int64_t t = 0; t < ntiles; ++t)
        tw[t] = tmax[t] > -kInf ? static_cast<double>(tsum[t]) * std::exp(static_cast<double>(tmax[t]) - M) : 0.0;
    }

    // race
    if (!probs_mode) {
      const uint64_t seed = static_cast<uint64_t>(a.seeds[r]);
      const PhiloxKey key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
      const uint32_t step = static_cast<uint32_t>(a.steps[r]);
      const uint32_t seq = static_cast<uint32_t>(a.seqs[r]);
      int64_t tbest = ntiles == 1 && tw[0] > 0.0 ? 0 : -1;  // a single tile needs no race
      double sbest = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < ntiles && ntiles > 1; ++t) {
        if (!(tw[t] > 0.0)) continue;
        const double sc = std::log(tw[t]) - std::log(exp_noise(philox_word(key, t, step, seq, 1)));
        if (tbest < 0 || sc > sbest) {
          sbest = sc;
          tbest = t;
        }
      }
      if (tbest < 0) {  // cannot happen for a valid row; defensive
        write_invalid();
        return;
      }
      const int64_t i0 = tbest * kTile, e16 = std::min(vp, i0 + kTile);
      if (kept_in_head) {
        // the words of the kept head entries in the winning tile, 16 counters at a time; the head is in value order, so
        // the best score comes early and neg_log_noise_bound (no logarithm) rules out most of the rest: a token whose
        // bound is below the best score cannot win
        int32_t hid[kHead];  // positions in the head
        uint32_t hw[kHead];  // their words
        int64_t nr = 0;
        for (int64_t i = 0; i < nkept_head; ++i)
          if (hd[i].id / kTile == tbest) hid[nr++] = static_cast<int32_t>(i);
        alignas(64) uint32_t c0s[kLanes], sel[kLanes];
        alignas(64) uint32_t wv[4][kLanes];
        for (int64_t j0 = 0; j0 < nr; j0 += kLanes) {
          const int64_t n = std::min<int64_t>(kLanes, nr - j0);
          for (int64_t l = 0; l < kLanes; ++l) {
            const uint32_t id = l < n ? static_cast<uint32_t>(hd[hid[j0 + l]].id) : 0u;
            c0s[l] = id >> 2;
            sel[l] = id & 3u;
          }
          vu words[4];
          philox16(key, uload(c0s), step, seq, 0, words);
          for (int w = 0; w < 4; ++w) ustore(wv[w], words[w]);
          for (int64_t l = 0; l < n; ++l) hw[j0 + l] = wv[sel[l]][l];
        }
        double best = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < nr; ++j) {
          const Entry& h = hd[hid[j]];
          const double v = static_cast<double>(h.v);
          if (token >= 0 && v + neg_log_noise_bound(hw[j]) < best) continue;
          const double sc = v - std::log(exp_noise(hw[j]));
          if (token < 0 || sc > best || (sc == best && h.id < token)) {
            best = sc;
            token = h.id;
          }
        }
      }
      // Per-lane running best (score, id); ties go to the lower id. -ln E <= 22.87 for every 32-bit word, so a 64-id
      // block whose kept maximum is below (best so far - 24) cannot win and gets no Philox: starting with the block
      // that holds the tile's kept maximum, peaked rows skip most of the tile. In the other blocks
      // neg_log_noise_bound16 bounds each token's score from its word without a logarithm; only blocks where a kept
      // token's bound reaches the best score so far get the exact noise, a few blocks per row (a token passes with
      // probability about e^(z - best), about one in the whole row beyond the first block).
      vf bsc = set1(-kInf), bid = set1(-1.0f);
      alignas(64) static const float kIota[kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      const vf iota = load(kIota);
      constexpr float kNoiseMax = 24.0f;
      float best_lb = -kInf;  // a score some kept token already reached
      int64_t first = -1;     // the block holding the tile's kept maximum
      if (!kept_in_head) {
        float tmk = tmax[tbest];  // the tile's kept maximum: its maximum when nothing is cut
        if (keep.truncates()) {
          vf mxk = set1(-kInf);
          for (int64_t i = i0; i < e16; i += kLanes) {
            vf v = load(z + i);
            mxk = vmax(mxk, select(keep.mask(v), v, set1(-kInf)));
          }
          tmk = hmax(mxk);
        }
        for (int64_t i = i0; i < e16 && first < 0; i += kLanes) {
          vf v = load(z + i);
          if (eq(v, set1(tmk)) & keep.mask(v)) first = i0 + (i - i0) / 64 * 64;
        }
      }
      auto race_block = [&](int64_t b0) {
        const int64_t b1 = std::min(e16, b0 + 64);
        const int nq = static_cast<int>((b1 - b0) / kLanes);
        mask_t km[4] = {0, 0, 0, 0};
        vf zq[4];
        vf bm = set1(-kInf);
        for (int q = 0; q < nq; ++q) {
          zq[q] = load(z + b0 + q * kLanes);
          km[q] = keep.mask(zq[q]);
          bm = vmax(bm, select(km[q], zq[q], set1(-kInf)));
        }
        const float blk_max = hmax(bm);
        if (!(blk_max > -kInf) || blk_max + kNoiseMax < best_lb) return;
        vu words[4];
        philox16(key, uiota(static_cast<uint32_t>(b0 >> 2)), step, seq, 0, words);
        vf wq[4], idq[4];
        if (best_lb > -kInf) {
          for (int w = 0; w < 4; ++w) wq[w] = neg_log_noise_bound16(words[w]);
          transpose4x16(wq, idq);
          mask_t cand = 0;
          for (int q = 0; q < nq; ++q) cand |= ge(zq[q] + idq[q], set1(best_lb)) & km[q];
          if (!cand) return;
        }
        for (int w = 0; w < 4; ++w) wq[w] = neg_log_noise16(words[w]);
        transpose4x16(wq, idq);
        for (int q = 0; q < nq; ++q) {
          if (!km[q]) continue;
          vf sc = zq[q] + idq[q];
          vf ids = iota + set1(static_cast<float>(b0 + q * kLanes));
          const mask_t up = (gt(sc, bsc) | (eq(sc, bsc) & lt(ids, bid))) & km[q];
          bsc = select(up, sc, bsc);
          bid = select(up, ids, bid);
        }
        best_lb = std::max(best_lb, hmax(bsc));
      };
      if (first >= 0) race_block(first);
      for (int64_t b0 = i0; b0 < e16 && !kept_in_head; b0 += 64)
        if (b0 != first) race_block(b0);
      if (!kept_in_head) {
        alignas(64) float sv[kLanes], iv[kLanes];
        store(sv, bsc);
        store(iv, bid);
        float bestv = -kInf;
        for (int l = 0; l < kLanes; ++l) {
          if (iv[l] < 0.0f) continue;
          const int64_t id = static_cast<int64_t>(iv[l]);
          if (token < 0 || sv[l] > bestv || (sv[l] == bestv && id < token)) {
            bestv = sv[l];
            token = id;
          }
        }
      }
      if (token < 0) {
        write_invalid();
        return;
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // outputs
  if (kept_mode) {
    // the kept set itself, not derived from probabilities (a kept token may have probability 0 in float32, e.g. z =
    // -200 next to z = 0)
    uint8_t* km_out = a.kept + r * a.V;
    std::fill(km_out, km_out + a.V, uint8_t{0});
    if (greedy) {
      km_out[token] = 1;
      return;
    }
    for (int64_t i = 0; i < vs; i += kLanes) {
      const mask_t km = keep.mask(load(z + i));
      const int64_t n = std::min<int64_t>(kLanes, vs - i);
      for (int64_t j = 0; j < n; ++j) km_out[i + j] = static_cast<uint8_t>((km >> j) & 1u);
    }
    return;
  }
  if (probs_mode) {
    float* pr = a.probs + r * a.V;
    std::fill(pr, pr + a.V, 0.0f);
    if (greedy) {
      pr[token] = 1.0f;
      return;
    }
    const float inv = static_cast<float>(1.0 / S_kept);
    const vf vsh = set1(shift), vinv = set1(inv);
    alignas(64) float buf[kLanes];
    for (int64_t i = 0; i < vp; i += kLanes) {
      vf v = load(z + i);
      mask_t km = keep.mask(v);
      if (!km) continue;
      vf p = maskz(km, vexp(v - vsh) * vinv);
      if (i + kLanes <= vs) {
        store(pr + i, p);
      } else {
        store(buf, p);
        for (int64_t j = i; j < vs; ++j) pr[j] = buf[j - i];
      }
    }
    return;
  }

  a.tokens[r] = token;
  a.valid[r] = 1;
  // mirostat update
  if (miro != 0 && !greedy) {
    const double qx = std::exp(static_cast<double>(z[token]) - shift) / S_kept;
    const double surprise = -std::log2(qx);
    a.mu_out[r] = static_cast<float>(static_cast<double>(mu_in) - fp[F_MIRO_ETA] * (surprise - fp[F_MIRO_TAU]));
  } else {
    a.mu_out[r] = mu_in;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int64_t* tid = a.top_ids + r * ntop_out;
  float* tlp = a.top_lps + r * ntop_out;
  for (int64_t j = 0; j < ntop_out; ++j) {
    tid[j] = -1;
    tlp[j] = nan;
  }
  if (!want_lp) {
    a.logprobs[r] = nan;
    a.ranks[r] = -1;
    return;
  }
  // fill entries after `have` with the lowest ids whose logprob is -inf
  auto pad_neg_inf = [&](int64_t have, auto is_neg_inf) {
    int64_t j = have;
    for (int64_t t = 0; t < vs && j < ntop_row; ++t) {
      if (is_neg_inf(t)) {
        tid[j] = t;
        tlp[j] = -kInf;
        ++j;
      }
    }
  };
  // log-softmax as (v - max) - ln(sum): the shift first, so ln(sum) is not absorbed by a large max (docs/semantics.md
  // §6)
  auto lp_of = [](float v, double m, double log_sum) {
    return static_cast<float>((static_cast<double>(v) - m) - log_sum);
  };
  if (lp_mode == MODE_RAW) {
    const double log_raw = std::log(raw_sum);
    const float xt = to_float(x[token]);
    a.logprobs[r] = lp_of(xt, raw_max, log_raw);
    // one pass over the input: the rank, and the raw top-N through a filter seeded with the N-th largest raw lane
    // maximum (a lower bound of the N-th largest value)
    int64_t c = 0;
    TopSel& sr = s.sel_raw;
    if (ntop_row > 0) {
      sr.reset(ntop_row);
      const float seed = lower_bound_kth(s.raw_lane_max.data(), ntiles * kLanes, ntop_row);
      if (seed > -kInf) sr.tau = std::nextafter(seed, -kInf);
    }
    {
      const vf vx = set1(xt);
      int64_t i = 0;
      for (; i + kLanes <= vs; i += kLanes) {
        const vf v = load(x + i);
        c += popcount(gt(v, vx));
        if (ntop_row > 0) {
          mask_t m = gt(v, set1(sr.tau));
          while (m) {
            const int l = ctz(m);
            m &= m - 1;
            const float val = to_float(x[i + l]);
            if (val > sr.tau) sr.push(val, static_cast<int32_t>(i + l));
          }
        }
      }
      for (; i < vs; ++i) {
        const float val = to_float(x[i]);
        c += val > xt;
        if (ntop_row > 0 && val > sr.tau) sr.push(val, static_cast<int32_t>(i));
      }
    }
    a.ranks[r] = 1 + c;
    if (ntop_row > 0) {
      s.sel_raw.finish();
      const int64_t have = std::min<int64_t>(s.sel_raw.n, ntop_row);
      for (int64_t j = 0; j < have; ++j) {
        tid[j] = s.sel_raw.buf[j].id;
        tlp[j] = lp_of(s.sel_raw.buf[j].v, raw_max, log_raw);
      }
      if (have < ntop_row) pad_neg_inf(have, [&](int64_t t) { return !(to_float(x[t]) > -kInf); });
    }
    return;
  }
  if (lp_mode == MODE_PROCESSED || greedy) {
    if (lp_mode == MODE_FINAL) {  // greedy, final: the argmax has logprob 0, the rest -inf
      a.logprobs[r] = 0.0f;
      a.ranks[r] = 1;
      if (ntop_row > 0) {
        tid[0] = token;
        tlp[0] = 0.0f;
        pad_neg_inf(1, [&](int64_t t) { return t != token; });
      }
      return;
    }
    const float zt = z[token];
    const double log_s = std::log(S);
    a.logprobs[r] = lp_of(zt, M, log_s);
    int64_t c = 0;
    const vf vx = set1(zt);
    for (int64_t i = 0; i < vp; i += kLanes) c += popcount(gt(load(z + i), vx));
    a.ranks[r] = 1 + c;
    if (ntop_row > 0) {
      s.sel.reset(ntop_row);
      s.sel.scan(z, vp, 0, [](int64_t) { return kAll; });
      s.sel.finish();
      const int64_t have = std::min<int64_t>(s.sel.n, ntop_row);
      for (int64_t j = 0; j < have; ++j) {
        tid[j] = s.sel.buf[j].id;
        tlp[j] = lp_of(s.sel.buf[j].v, M, log_s);
      }
      if (have < ntop_row) pad_neg_inf(have, [&](int64_t t) { return !(z[t] > -kInf); });
    }
    return;
  }
  // final
  const double log_sk = std::log(S_kept);
  const float zt = z[token];
  a.logprobs[r] = lp_of(zt, static_cast<double>(shift), log_sk);
  int64_t c = 0;
  const vf vx = set1(zt);
  for (int64_t i = 0; i < vp; i += kLanes) {
    vf v = load(z + i);
    c += popcount(gt(v, vx) & keep.mask(v));
  }
  a.ranks[r] = 1 + c;
  if (ntop_row > 0) {
    s.sel.reset(ntop_row);
    s.sel.scan(z, vp, 0, [&](int64_t i) { return keep.mask(load(z + i)); });
    s.sel.finish();
    const int64_t have = std::min<int64_t>(s.sel.n, ntop_row);
    for (int64_t j = 0; j < have; ++j) {
      tid[j] = s.sel.buf[j].id;
      tlp[j] = lp_of(s.sel.buf[j].v, static_cast<double>(shift), log_sk);
    }
    if (have < ntop_row) pad_neg_inf(have, [&](int64_t t) { return !keep.test(z[t]); });
  }
}

}  // namespace fastsampler
