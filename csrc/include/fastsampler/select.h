// Selection without sorting the vocabulary.
//
// TopSel: streaming top-k by (value desc, id asc). Elements pass a vector compare against the current k-th best value
// (tau) and only the few that beat it enter a small buffer, compacted with nth_element when full. Elements arrive in id
// order, so an element equal to tau can never enter: the filter `value > tau` is exact.
//
// resolve_mass_desc: the largest key v such that the mass of {key >= v} reaches a target, over candidate arrays (key,
// weight): K thresholds per level give cumulative masses with masked vector sums; the boundary bucket is compressed out
// and refined until a few candidates remain, which are then ordered exactly.
//
// MassSelect: the same quantile over a whole row of z without collecting it (top-p and typical-p over the full
// vocabulary, docs/semantics.md §3 E): an estimate from an exact set of heavy elements and a subsample, exact masses at
// thresholds bracketing it, and resolve_mass_desc over the candidates of the bracket that holds the boundary.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastsampler/layout.h"
#include "fastsampler/simd.h"

namespace fastsampler {

struct Entry {
  float v;
  int32_t id;
};

inline bool entry_better(const Entry& a, const Entry& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }

struct TopSel {
  // finish() orders up to this many entries by counting ranks (n^2 / 16 branch-free vector compares) instead of
  // nth_element + sort, whose data-dependent branches mispredict on every new row: the common case, since seeded
  // filters let only about 1.2 k elements through
  static constexpr int64_t kRankSortMax = 160;

  std::vector<Entry> buf;
  int64_t k = 0, cap = 0, n = 0;
  float tau = -simd::kInf;

  void reset(int64_t k_) {
    k = k_;
    cap = std::max<int64_t>(2 * k, k + 256);
    if (static_cast<int64_t>(buf.size()) < cap) {
      // exactly cap entries (no geometric growth): the Scratch holding it stays within its bound
      std::vector<Entry> grown(static_cast<size_t>(cap));
      buf.swap(grown);
    }
    n = 0;
    tau = -simd::kInf;
  }
  void compact() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + n, entry_better);
    n = k;
    // worst of the kept k
    float w = buf[0].v;
    for (int64_t i = 1; i < k; ++i) w = std::min(w, buf[i].v);
    tau = w;
  }
  inline void push(float v, int32_t id) {
    buf[n].v = v;
    buf[n].id = id;
    if (++n == cap) compact();
  }
  // Scan keys[0, n16) (n16 a multiple of 16), ids id0 + i; `pred(i)` gives the mask of eligible lanes of vector i.
  template <class Pred>
  void scan(const float* keys, int64_t n16, int32_t id0, Pred pred) {
    using namespace simd;
    auto one = [&](int64_t i) {
      vf v = load(keys + i);
      mask_t m = gt(v, set1(tau));
      if (!m) return;
      m &= pred(i);
      while (m) {
        const int l = ctz(m);
        m &= m - 1;
        const float val = keys[i + l];
        if (val > tau) push(val, id0 + static_cast<int32_t>(i + l));
      }
    };
    int64_t i = 0;
    // four vectors per test: after the first few hundred elements almost nothing passes
    for (; i + 4 * kLanes <= n16; i += 4 * kLanes) {
      vf a = vmax(vmax(load(keys + i), load(keys + i + kLanes)),
                  vmax(load(keys + i + 2 * kLanes), load(keys + i + 3 * kLanes)));
      if (!gt(a, set1(tau))) continue;
      for (int q = 0; q < 4; ++q) one(i + q * kLanes);
    }
    for (; i < n16; i += kLanes) one(i);
  }
  // Sorted best-first, at most k entries.
  void finish() {
    if (n <= kRankSortMax) {
      rank_sort();
      return;
    }
    if (n > k) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + n, entry_better);
      n = k;
    }
    std::sort(buf.begin(), buf.begin() + n, entry_better);
  }

 private:
  // The first min(n, k) entries in entry_better order: an entry's rank is the number of entries with a greater value,
  // or an equal value (-0 == +0, as for entry_better) and a lower id. The entries are distinct (by id), so the ranks
  // are a permutation. Ids are below 2^24, exact in float32 lanes.
  void rank_sort() {
    using namespace simd;
    alignas(64) float val[kRankSortMax + kLanes], ids[kRankSortMax + kLanes];
    Entry out[kRankSortMax];
    const int64_t n16 = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = 0; i < n; ++i) {
      val[i] = buf[i].v;
      ids[i] = static_cast<float>(buf[i].id);
    }
    for (int64_t i = n; i < n16; ++i) {  // -inf ranks below every entry (entries are > tau)
      val[i] = -kInf;
      ids[i] = 0.0f;
    }
    for (int64_t i = 0; i < n; ++i) {
      const vf vi = set1(val[i]), di = set1(ids[i]);
      int64_t rank = 0;
      for (int64_t j = 0; j < n16; j += kLanes) {
        const vf v = load(val + j);
        rank += popcount(gt(v, vi) | (eq(v, vi) & lt(load(ids + j), di)));
      }
      if (rank < k) out[rank] = buf[i];
    }
    n = std::min(n, k);
    std::copy(out, out + n, buf.begin());
  }
};

// The bucket of descending thresholds th[0, n) that holds a mass target: bucket b is [th[b], th[b - 1]) with
// th[-1] = +inf, and b = n is [-inf, th[n - 1]); b is the first threshold whose cumulative mass (base + mass[b])
// reaches the target. above: the mass of the buckets before it.
struct Bucket {
  int b;
  float lo, hi;
  double above;
};
inline Bucket boundary_bucket(const float* th, const double* mass, int n, double base, double target) {
  int b = n;
  for (int j = 0; j < n; ++j) {
    if (base + mass[j] >= target) {
      b = j;
      break;
    }
  }
  return {b, b < n ? th[b] : -simd::kInf, b > 0 ? th[b - 1] : simd::kInf, base + (b > 0 ? mass[b - 1] : 0.0)};
}

// The exact end of resolve_mass_desc: order the candidates by key desc and walk the groups of equal keys. A NaN key
// would break the sort's strict weak order (and stall the walk): rank it as -inf.
inline float resolve_exact(float* key, const float* w, int64_t n, double above, double target) {
  using namespace simd;
  for (int64_t i = 0; i < n; ++i)
    if (!(key[i] == key[i])) key[i] = -kInf;
  std::vector<int32_t> ord(n);
  for (int64_t i = 0; i < n; ++i) ord[i] = static_cast<int32_t>(i);
  std::sort(ord.begin(), ord.end(), [&](int32_t a, int32_t b) { return key[a] > key[b]; });
  double cum = above;
  float last = n > 0 ? key[ord[0]] : -kInf;
  for (int64_t i = 0; i < n;) {
    const float kv = key[ord[i]];
    int64_t j = i;
    do {
      cum += w[ord[j++]];  // at least one candidate per group: the walk always advances
    } while (j < n && key[ord[j]] == kv);
    last = kv;
    if (cum >= target) return kv;
    i = j;
  }
  return last;
}

// Candidates: key[0, n) and w[0, n), with room for 16 extra elements; tmp arrays of the same capacity. above: mass of
// elements with keys above every candidate. Returns the largest candidate key v with above + mass(key >= v) >= target
// (the smallest key when the target is never reached). Terminates for any input: the refinement runs at most 12 levels,
// NaN keys are ranked as -inf in the final walk, which advances by at least one candidate per step, and a NaN weight or
// target only means the target is never reached (the smallest key is returned).
inline float resolve_mass_desc(float* key, float* w, int64_t n, double above, double target, float* tk, float* tw) {
  using namespace simd;
  constexpr int K = 15;
  for (int level = 0; level < 12 && n > 48; ++level) {
    // pad to a multiple of 16
    const int64_t n16 = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = n; i < n16; ++i) {
      key[i] = -kInf;
      w[i] = 0.0f;
    }
    vf vmx = set1(-kInf), vmn = set1(kInf);
    for (int64_t i = 0; i < n16; i += kLanes) {
      vf kv = load(key + i);
      vmx = vmax(vmx, kv);
      vmn = vmin(vmn, select(gt(kv, set1(-kInf)), kv, set1(kInf)));
    }
    const float kmax = hmax(vmx), kmin = -hmax(set1(0.0f) - vmn);
    if (!(kmax > kmin)) break;
    float t[K];
    const float delta = (kmax - kmin) / (K + 1);
    for (int j = 0; j < K; ++j) t[j] = kmax - (j + 1) * delta;
    vf acc[K];
    for (int j = 0; j < K; ++j) acc[j] = set1(0.0f);
    double macc[K] = {0};
    int64_t since = 0;
    for (int64_t i = 0; i < n16; i += kLanes) {
      vf kv = load(key + i), wv = load(w + i);
      for (int j = 0; j < K; ++j) acc[j] = mask_add(acc[j], ge(kv, set1(t[j])), wv);
      if (++since == 256) {
        for (int j = 0; j < K; ++j) {
          macc[j] += hsum(acc[j]);
          acc[j] = set1(0.0f);
        }
        since = 0;
      }
    }
    for (int j = 0; j < K; ++j) macc[j] += hsum(acc[j]);
    const Bucket bk = boundary_bucket(t, macc, K, above, target);
    const int b = bk.b;
    const float bl = bk.lo, bh = bk.hi;
    const double new_above = bk.above;
    int64_t m = 0;
    for (int64_t i = 0; i < n16; i += kLanes) {
      vf kv = load(key + i);
      mask_t sel = ge(kv, set1(bl)) & lt(kv, set1(bh));
      if (b == K) sel &= gt(kv, set1(-kInf));
      vf wv = load(w + i);
      compress(tk + m, sel, kv);
      m += compress(tw + m, sel, wv);
    }
    if (m == n) break;  // no progress (should not happen); finish exactly
    std::copy(tk, tk + m, key);
    std::copy(tw, tw + m, w);
    n = m;
    above = new_above;
    if (n == 0) return bl;  // cannot happen with consistent sums; be safe
  }
  return resolve_exact(key, w, n, above, target);
}

inline int64_t round16(int64_t n) { return (n + simd::kLanes - 1) / simd::kLanes * simd::kLanes; }

// 0, 1, ..., 15: the lane offsets that turn a vector's first id into its ids (ids below 2^24 are exact in float32)
inline simd::vf lane_iota() {
  alignas(64) static const float kIota[simd::kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return simd::load(kIota);
}

// A value t with #{v >= t} >= k (as high as 16 bisection steps get it), or -inf when fewer than k values are finite. n
// is a multiple of 16. Used to seed streaming top-k filters from lane maxima, branch-free.
inline float lower_bound_kth(const float* v, int64_t n, int64_t k) {
  using namespace simd;
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
  using namespace simd;
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

// The row-sized buffers mass_select works in (each with room for 16 elements beyond the row).
struct MassBuffers {
  float* cand_key;     // candidates of the boundary bracket: keys (first the subsample's values) ...
  float* cand_w;       // ... their weights exp(z - M) ...
  float* cand_id;      // ... and ids (as float32)
  float* resolve_key;  // the subsample estimate, then copies that resolve_mass_desc reorders (add_tile_weights still
  float* resolve_w;    //   needs the candidates in id order)
  float* tmp_key;      // resolve_mass_desc's compaction output; the subsample's values before a collection pass
  float* tmp_w;        // the same, and first the subsample's exact-set thresholds
  float* exact_key;    // the exact set E: values, then keys
  float* exact_w;      // its weights
  float* exact_id;     // its ids
  double* tile_w;      // (5, ntiles): kept tile weights, then the tile masses above the four bracket thresholds
};

// What pass 1 left for a mass selection (docs/semantics.md §3 E: top-p and typical-p over the whole row).
struct MassPrior {
  double known_total = -1.0;             // the total mass of the selected elements when known (> 0), for key == z
  const float* tile_exp = nullptr;       // exp(z - tile max) per element, or null
  const float* tile_max = nullptr;       // the tiles' maxima
  int64_t n_exact = -1;                  // the size of the exact set E pass 1 put in exact_key / exact_id, or -1
  const float* tile_exact_lo = nullptr;  // per tile: every element >= it is in E (+inf: nothing finite)
};

// Mass selection on keys derived from z: the largest key value v with mass(key >= v) >= frac * total mass, over the
// elements selected by `pred`; weights exp(z - M). keyf maps a vector of z to keys; kmax bounds the keys above.
// key_is_z: keyf is the identity (the exact set E then resolves the boundary on its own when it holds it). After
// run(), total is the mass of the selected elements, and when have_tw is set, b.tile_w holds the per-tile masses of
// {pred, key >= result} (weights exp(z - M)).
template <class KeyF, class PredF>
class MassSelect {
 public:
  double total = 0.0;
  bool have_tw = false;

  MassSelect(const MassBuffers& b, const float* z, int64_t n16, float M, KeyF keyf, PredF pred)
      : b_(b), z_(z), n16_(n16), M_(M), vM_(simd::set1(M)), keyf_(keyf), pred_(pred) {}

  float run(float kmax, int64_t nsel, double frac, bool key_is_z, const MassPrior& prior) {
    have_tw = false;
    if (nsel <= 8192) return direct(frac);
    if (n16_ >= 64 * simd::kLanes) {
      float v;
      if (sampled(frac, key_is_z, prior, &v)) return v;
    }
    return coarse(kmax, frac);
  }

 private:
  using vf = simd::vf;
  using mask_t = simd::mask_t;
  static constexpr int kBrackets = 4;  // thresholds around the estimated boundary

  const MassBuffers b_;
  const float* z_;
  int64_t n16_;
  float M_;
  vf vM_;
  KeyF keyf_;
  PredF pred_;
  // the subsample, the exact set E and the estimate built from them
  int64_t ns_ = 0, ne_ = 0, m_ = 0;
  float rmax_ = simd::kInf;  // every selected element >= rmax_ is in E
  double emass_ = 0.0, stot_ = 0.0, stot2_ = 0.0;

  int64_t ntiles() const { return (n16_ + kTile - 1) / kTile; }

  // Few selected elements: collect them all and resolve exactly.
  float direct(double frac) {
    using namespace simd;
    float* ck = b_.cand_key;
    float* cw = b_.cand_w;
    int64_t m = 0;
    double tot = 0.0;
    for (int64_t i = 0; i < n16_; i += kLanes) {
      vf v = load(z_ + i);
      mask_t sel = pred_(v);
      if (!sel) continue;
      vf w = maskz(sel, vexp(v - vM_));
      tot += hsum(w);
      compress(ck + m, sel, keyf_(v));
      m += compress(cw + m, sel, w);
    }
    total = tot;
    return resolve_mass_desc(ck, cw, m, 0.0, frac * tot, b_.tmp_key, b_.tmp_w);
  }

  // The estimate from E and a 1-in-64 subsample, exact masses at four thresholds around it, and the candidates of the
  // bracket that holds the boundary. False when the estimate is unusable or the bracket is empty (then coarse()).
  bool sampled(double frac, bool key_is_z, const MassPrior& prior, float* out) {
    subsample(prior);
    exact_set(prior);
    weigh_exact_set();
    if (key_is_z && prior.known_total > 0.0 && ne_ > 0 && emass_ >= frac * prior.known_total &&
        boundary_in_exact_set(frac * prior.known_total, out)) {
      total = prior.known_total;
      return true;
    }
    estimate();
    if (!(m_ >= 64 && stot_ > 0.0)) return false;
    float th[kBrackets];
    bracket_thresholds(frac, th);
    return resolve_bracket(frac, th, prior, out);
  }

  // 1. one element in 64 (with the exact-set threshold of its tile when pass 1 collected E)
  void subsample(const MassPrior& prior) {
    float* zs = b_.cand_key;
    float* rs = b_.tmp_w;
    ns_ = 0;
    for (int64_t i = 0; i + 64 <= n16_; i += 64) {
      rs[ns_] = prior.tile_exact_lo ? prior.tile_exact_lo[i / kTile] : simd::kInf;
      zs[ns_++] = z_[i + (((i >> 6) * 7) & 63)];
    }
    for (int64_t i = ns_; i < round16(ns_); ++i) {
      zs[i] = -simd::kInf;
      rs[i] = simd::kInf;
    }
  }

  // 2. the exact set E of heavy elements, so the sample only has to estimate the light rest. Either pass 1 collected
  //    it (every element at or above its tile's smallest lane maximum: about the top 1% of each tile, gathered while
  //    the tile was in L1), or a pass collects every selected element >= T2, T2 about the 32nd largest sampled value.
  void exact_set(const MassPrior& prior) {
    using namespace simd;
    ne_ = 0;
    rmax_ = kInf;
    if (prior.n_exact >= 0) {
      ne_ = prior.n_exact;
      rmax_ = -kInf;
      for (int64_t t = 0; t < ntiles(); ++t)
        if (prior.tile_exact_lo[t] < kInf) rmax_ = std::max(rmax_, prior.tile_exact_lo[t]);  // +inf: nothing finite
      return;
    }
    const float* zs = b_.cand_key;
    float* zsel = b_.tmp_key;
    for (int64_t i = 0; i < round16(ns_); i += kLanes) {
      vf v = load(zs + i);
      store(zsel + i, select(pred_(v), v, set1(-kInf)));
    }
    const float T2 = lower_bound_kth(zsel, round16(ns_), 32);
    if (!(T2 > -kInf)) return;
    const vf vT2 = set1(T2), iota = lane_iota();
    float* const ek = b_.exact_key;  // in locals, see bracket_pass
    float* const eid = b_.exact_id;
    const float* const z = z_;
    const PredF pred = pred_;
    int64_t ne = 0;
    for (int64_t i = 0; i < n16_; i += kLanes) {
      vf v = load(z + i);
      const mask_t me = pred(v) & ge(v, vT2);  // branch-free: the pattern is unpredictable on new rows
      compress(ek + ne, me, v);
      ne += compress(eid + ne, me, iota + set1(static_cast<float>(i)));
    }
    ne_ = ne;
    rmax_ = T2;
    for (int64_t i = 0; i < ns_; ++i) b_.tmp_w[i] = T2;
  }

  // E's weights, and its values replaced by keys
  void weigh_exact_set() {
    using namespace simd;
    float* ek = b_.exact_key;
    emass_ = 0.0;
    for (int64_t i = ne_; i < round16(ne_); ++i) ek[i] = -kInf;
    for (int64_t i = 0; i < ne_; i += kLanes) {
      vf v = load(ek + i);
      vf w = maskz(pred_(v) & gt(v, set1(-kInf)), vexp(v - vM_));  // E from pass 1 ignores pred: weight 0 then
      store(b_.exact_w + i, w);
      emass_ += hsum(w);
      store(ek + i, keyf_(v));
    }
  }

  // The boundary may lie in E: resolve there, with no further pass, when E holds everything above it.
  bool boundary_in_exact_set(double target, float* out) {
    std::copy(b_.exact_key, b_.exact_key + ne_, b_.resolve_key);
    std::copy(b_.exact_w, b_.exact_w + ne_, b_.resolve_w);
    // tmp_w still holds the subsample's thresholds: cand_w is free
    const float v = resolve_mass_desc(b_.resolve_key, b_.resolve_w, ne_, 0.0, target, b_.tmp_key, b_.cand_w);
    if (!(v >= rmax_)) return false;
    double* tw = b_.tile_w;
    for (int64_t t = 0; t < ntiles(); ++t) tw[t] = 0.0;
    add_tile_weights(tw, b_.exact_key, b_.exact_w, b_.exact_id, ne_, v);
    have_tw = true;
    *out = v;
    return true;
  }

  // 3. the estimate: E exactly (weight 1/64) and the sampled elements below their exact-set threshold (weight 1)
  void estimate() {
    using namespace simd;
    const float* zs = b_.cand_key;
    const float* rs = b_.tmp_w;
    float* sk = b_.resolve_key;
    float* sw = b_.resolve_w;
    int64_t m = 0;
    double stot = 0.0, stot2 = 0.0;
    const vf inv64 = set1(1.0f / 64.0f);
    for (int64_t i = 0; i < ns_; i += kLanes) {
      vf v = load(zs + i);
      mask_t sel = pred_(v) & gt(v, set1(-kInf)) & lt(v, load(rs + i));
      if (!sel) continue;
      vf w = maskz(sel, vexp(v - vM_));
      stot += hsum(w);
      stot2 += hsum(w * w);  // Poisson sampling variance (E is exact)
      compress(sk + m, sel, keyf_(v));
      m += compress(sw + m, sel, w);
    }
    for (int64_t i = 0; i < ne_; i += kLanes) {
      const mask_t sel = static_cast<mask_t>(ne_ - i >= kLanes ? kAll : ((1u << (ne_ - i)) - 1u));
      vf w = maskz(sel, load(b_.exact_w + i)) * inv64;
      stot += hsum(w);
      compress(sk + m, sel, load(b_.exact_key + i));
      m += compress(sw + m, sel, w);
    }
    m_ = m;
    stot_ = stot;
    stot2_ = stot2;
  }

  // 4. thresholds at frac -4, -1.5, +1.5, +4 standard errors of the sample's mass fraction (Poisson sampling of the
  //    part outside E), descending
  void bracket_thresholds(double frac, float th[kBrackets]) {
    const double se = std::max(1e-3, std::sqrt(stot2_) / stot_);
    const double cs[kBrackets] = {-4.0, -1.5, 1.5, 4.0};
    for (int j = 0; j < kBrackets; ++j) {
      const double f = cs[j] < 0 ? std::max(frac + cs[j] * se, 0.25 * frac)
                                 : std::min(frac + cs[j] * se, frac + 0.75 * (1.0 - frac));
      if (f <= 0.0) {
        th[j] = simd::kInf;
      } else if (f >= 1.0) {
        th[j] = -simd::kInf;
      } else {
        std::copy(b_.resolve_key, b_.resolve_key + m_, b_.cand_key);
        std::copy(b_.resolve_w, b_.resolve_w + m_, b_.cand_w);
        th[j] = resolve_mass_desc(b_.cand_key, b_.cand_w, m_, 0.0, f * stot_, b_.tmp_key, b_.tmp_w);
      }
      if (j > 0) th[j] = std::min(th[j], th[j - 1]);
    }
    // keep the brackets non-empty when one heavy element spans several quantiles: move the outer thresholds to the
    // neighbouring distinct sample keys
    for (int64_t i = m_; i < round16(m_); ++i) b_.resolve_key[i] = -simd::kInf;
    if (th[1] <= th[2] && th[2] < simd::kInf) th[1] = sample_key_beyond(th[2], true);
    if (th[0] <= th[1] && th[1] < simd::kInf) th[0] = sample_key_beyond(th[1], true);
    if (th[3] >= th[2] && th[2] > -simd::kInf) th[3] = sample_key_beyond(th[2], false);
  }

  // the smallest sample key above t (above) or the largest below it
  float sample_key_beyond(float t, bool above) const {
    using namespace simd;
    vf best = set1(above ? kInf : -kInf);
    for (int64_t i = 0; i < m_; i += kLanes) {
      vf kv = load(b_.resolve_key + i);
      best = above ? select(gt(kv, set1(t)), vmin(best, kv), best) : select(lt(kv, set1(t)), vmax(best, kv), best);
    }
    return above ? -hmax(set1(0.0f) - best) : hmax(best);
  }

  // 5. one pass: exact per-tile masses above the four thresholds and the candidates of the inner bracket; a second
  //    collection pass when the boundary lies in another bracket; then the exact boundary among the candidates
  bool resolve_bracket(double frac, const float th[kBrackets], const MassPrior& prior, float* out) {
    const int64_t ntl = ntiles();
    double* tmass = b_.tile_w + ntl;  // (kBrackets, ntl) per-tile masses of key >= th[j]
    double mj[kBrackets] = {0, 0, 0, 0};
    double tot = 0.0;
    int64_t nc = bracket_pass(th, prior, tmass, mj, &tot);
    const double target = frac * tot;
    const Bucket bk = boundary_bucket(th, mj, kBrackets, 0.0, target);
    if (bk.b != 2) nc = collect(bk.lo, bk.hi, true);  // outside the inner bracket: collect the right one
    std::copy(b_.cand_key, b_.cand_key + nc, b_.resolve_key);
    std::copy(b_.cand_w, b_.cand_w + nc, b_.resolve_w);
    const float v =
        nc > 0 ? resolve_mass_desc(b_.resolve_key, b_.resolve_w, nc, bk.above, target, b_.tmp_key, b_.tmp_w) : bk.hi;
    double* tw = b_.tile_w;
    for (int64_t t = 0; t < ntl; ++t) tw[t] = bk.b > 0 ? tmass[(bk.b - 1) * ntl + t] : 0.0;
    add_tile_weights(tw, b_.cand_key, b_.cand_w, b_.cand_id, nc, v);
    total = tot;
    have_tw = nc > 0;
    *out = v;
    return nc > 0;
  }

  int64_t bracket_pass(const float th[kBrackets], const MassPrior& prior, double* tmass, double mj[kBrackets],
                       double* tot) {
    using namespace simd;
    const int64_t ntl = ntiles();
    const vf iota = lane_iota();
    vf vth[kBrackets];
    for (int j = 0; j < kBrackets; ++j) vth[j] = set1(th[j]);
    const float* ebuf = prior.tile_exp;
    // the output pointers in locals: the vector stores may alias any object (they are __may_alias__), so read through
    // b_ they were reloaded from this object after every store, as were z_ and the predicate's captures (top-p 0.9
    // over the full row, V = 128256, ran about 8 % faster with them in locals, docs/cpu.md)
    float* const ck = b_.cand_key;
    float* const cid = b_.cand_id;
    float* const cw = b_.cand_w;
    const float* const z = z_;  // and the row and the functors (a lambda's captures)
    const PredF pred = pred_;
    const KeyF keyf = keyf_;
    int64_t nc = 0;
    for (int64_t i0 = 0, t = 0; i0 < n16_; i0 += kTile, ++t) {
      const int64_t i1 = std::min(n16_, i0 + kTile);
      vf acc[kBrackets] = {set1(0.0f), set1(0.0f), set1(0.0f), set1(0.0f)};
      vf a_t = set1(0.0f);
      // weights from pass 1's exp(z - m_t) when kept, scaled to exp(z - M)
      const vf tsc = set1(ebuf && prior.tile_max[t] > -kInf ? std::exp(prior.tile_max[t] - M_) : 0.0f);
      for (int64_t i = i0; i < i1; i += kLanes) {
        vf v = load(z + i);
        mask_t sel = pred(v);
        if (!sel) continue;
        vf w = maskz(sel, ebuf ? load(ebuf + i) * tsc : vexp(v - vM_));
        vf kv = keyf(v);
        a_t = a_t + w;
        mask_t mk[kBrackets];
        for (int j = 0; j < kBrackets; ++j) {
          mk[j] = ge(kv, vth[j]) & sel;
          acc[j] = mask_add(acc[j], mk[j], w);
        }
        const mask_t mc = mk[2] & ~mk[1];  // branch-free compress
        compress(ck + nc, mc, kv);
        compress(cid + nc, mc, iota + set1(static_cast<float>(i)));
        nc += compress(cw + nc, mc, w);
      }
      for (int j = 0; j < kBrackets; ++j) {
        tmass[j * ntl + t] = hsum(acc[j]);
        mj[j] += tmass[j * ntl + t];
      }
      *tot += hsum(a_t);
    }
    return nc;
  }

  // The selected elements with lo <= key < hi into the candidate arrays (with their ids when with_ids); weights are
  // computed on the compacted array. Returns their count.
  int64_t collect(float lo, float hi, bool with_ids) {
    using namespace simd;
    const vf vlo = set1(lo), vhi = set1(hi), iota = lane_iota();
    float* const ck = b_.cand_key;  // in locals, see bracket_pass
    float* const cid = b_.cand_id;
    float* const cw = b_.cand_w;
    const float* const z = z_;
    const PredF pred = pred_;
    const KeyF keyf = keyf_;
    int64_t nc = 0;
    for (int64_t i = 0; i < n16_; i += kLanes) {
      vf v = load(z + i);
      mask_t sel = pred(v);
      if (!sel) continue;
      vf kv = keyf(v);
      const mask_t mc = sel & ge(kv, vlo) & lt(kv, vhi);
      compress(ck + nc, mc, kv);
      if (with_ids) compress(cid + nc, mc, iota + set1(static_cast<float>(i)));
      nc += compress(cw + nc, mc, v);  // z for now
    }
    for (int64_t i = 0; i < nc; i += kLanes) store(cw + i, vexp(load(cw + i) - vM_));
    return nc;
  }

  // Fallback: masses at 15 thresholds 0.5 apart below kmax in one pass, then the bucket that holds the boundary.
  float coarse(float kmax, double frac) {
    using namespace simd;
    constexpr int K = 15;
    constexpr float kDelta = 0.5f;
    float t[K];
    for (int j = 0; j < K; ++j) t[j] = kmax - (j + 1) * kDelta;
    double macc[K] = {0};
    double tot = 0.0;
    for (int64_t i0 = 0; i0 < n16_; i0 += kTile) {
      const int64_t i1 = std::min(n16_, i0 + kTile);
      vf acc[K];
      for (int j = 0; j < K; ++j) acc[j] = set1(0.0f);
      vf vt = set1(0.0f);
      for (int64_t i = i0; i < i1; i += kLanes) {
        vf v = load(z_ + i);
        mask_t sel = pred_(v);
        if (!sel) continue;
        vf w = maskz(sel, vexp(v - vM_));
        vf kv = keyf_(v);
        vt = vt + w;
        for (int j = 0; j < K; ++j) acc[j] = mask_add(acc[j], ge(kv, set1(t[j])), w);
      }
      for (int j = 0; j < K; ++j) macc[j] += hsum(acc[j]);
      tot += hsum(vt);
    }
    total = tot;
    const double target = frac * tot;
    const Bucket bk = boundary_bucket(t, macc, K, 0.0, target);
    const int64_t m = collect(bk.lo, bk.hi, false);
    return resolve_mass_desc(b_.cand_key, b_.cand_w, m, bk.above, target, b_.tmp_key, b_.tmp_w);
  }
};

}  // namespace fastsampler
