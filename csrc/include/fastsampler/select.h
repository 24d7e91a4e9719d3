// Selection without sorting the vocabulary.
//
// TopSel: streaming top-k by (value desc, id asc). Elements pass a vector compare against the current k-th best value
// (tau) and only the few that beat it enter a small buffer, compacted with nth_element when full. Elements arrive in id
// order, so an element equal to tau can never enter: the filter `value > tau` is exact.
//
// resolve_mass_desc: the largest key v such that the mass of {key >= v} reaches a target, over candidate arrays (key,
// weight): K thresholds per level give cumulative masses with masked vector sums; the boundary bucket is compressed out
// and refined until a few candidates remain, which are then ordered exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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
    vf tot = set1(0.0f);
    double macc[K] = {0}, mtot = 0.0;
    int64_t since = 0;
    for (int64_t i = 0; i < n16; i += kLanes) {
      vf kv = load(key + i), wv = load(w + i);
      tot = tot + wv;
      for (int j = 0; j < K; ++j) acc[j] = mask_add(acc[j], ge(kv, set1(t[j])), wv);
      if (++since == 256) {
        for (int j = 0; j < K; ++j) {
          macc[j] += hsum(acc[j]);
          acc[j] = set1(0.0f);
        }
        mtot += hsum(tot);
        tot = set1(0.0f);
        since = 0;
      }
    }
    for (int j = 0; j < K; ++j) macc[j] += hsum(acc[j]);
    mtot += hsum(tot);
    // bucket b: [t[b], t[b-1]) with t[-1] = +inf, and b = K: [-inf, t[K-1])
    int b = K;
    for (int j = 0; j < K; ++j) {
      if (above + macc[j] >= target) {
        b = j;
        break;
      }
    }
    const float bl = b < K ? t[b] : -kInf;
    const float bh = b > 0 ? t[b - 1] : kInf;
    const double new_above = above + (b > 0 ? macc[b - 1] : 0.0);
    int64_t m = 0;
    for (int64_t i = 0; i < n16; i += kLanes) {
      vf kv = load(key + i);
      mask_t sel = ge(kv, set1(bl)) & lt(kv, set1(bh));
      if (b == K) sel &= gt(kv, set1(-kInf));
      vf wv = load(w + i);
      compress(tk + m, sel, kv);
      m += compress(tw + m, sel, wv);
    }
    (void)mtot;
    if (m == n) break;  // no progress (should not happen); finish exactly
    std::copy(tk, tk + m, key);
    std::copy(tw, tw + m, w);
    n = m;
    above = new_above;
    if (n == 0) return bl;  // cannot happen with consistent sums; be safe
  }
  // exact: order candidates by key desc and walk the groups of equal keys. A NaN key would break the sort's strict weak
  // order (and stall the walk): rank it as -inf.
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

}  // namespace fastsampler
