// The history rules of docs/semantics.md §3 A (no_repeat_ngram_size, bad_words_ids) as an allowed-token bitmask, and
// DRY's penalties (§3 C) as a sparse per-row table.
//
// A row's history is a ring: token j of its prompt + output sits at ring[j % L], `total` tokens were written, and
// the last min(total, L) of them are the history. The bans only read the history: O(L n) for the n-gram rule,
// O(P M) for P bad words of up to M tokens, never the vocabulary (the mask is (B, W) words, all ones but the bans).
// DRY reads its window of the history: O(n log n) for a window of n tokens (the Z-algorithm on the reversed window
// gives every repeat length in O(n); sorting the candidates, the log).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace fastsampler {

constexpr int64_t kWild = -3;  // a bad-word prefix position that matches anything (fastsampler._history.WILD)

struct HistoryArgs {
  const int32_t* ring = nullptr;  // (S, L)
  int64_t L = 0;
  const int64_t* total = nullptr;  // (S,)
  const int64_t* ngram = nullptr;  // (S,)
  const int64_t* bad = nullptr;    // (S, P, M), or null
  int64_t P = 0, M = 0;
  const int64_t* rows = nullptr;  // (B,) slot of each row
  int64_t B = 0;
  int32_t* out = nullptr;  // (B, W)
  int64_t W = 0;
};

namespace detail {

inline void ban(int32_t* words, int64_t W, int64_t t) {
  if (t >= 0 && (t >> 5) < W) words[t >> 5] &= static_cast<int32_t>(~(uint32_t{1} << (t & 31)));
}

}  // namespace detail

// Row r's bans into out[r * W, (r + 1) * W), all ones first; `h` is a scratch buffer of at least L tokens.
inline void history_keep_row(const HistoryArgs& a, int64_t r, std::vector<int64_t>& h) {
  int32_t* words = a.out + r * a.W;
  std::fill(words, words + a.W, -1);
  const int64_t s = a.rows[r];
  const int32_t* ring = a.ring + s * a.L;
  const int64_t total = a.total[s];
  const int64_t len = std::min(total, a.L);  // tokens in the history, oldest first into h
  for (int64_t k = 0; k < len; ++k) h[k] = ring[(total - len + k) % a.L];
  const int64_t n = a.ngram[s];
  if (n == 1) {
    for (int64_t k = 0; k < len; ++k) detail::ban(words, a.W, h[k]);
  } else if (n > 1 && len >= n) {
    const int64_t* suffix = h.data() + len - n + 1;  // the last n - 1 tokens
    for (int64_t i = 0; i + n - 1 < len; ++i) {
      if (h[i] != suffix[0]) continue;
      if (std::equal(suffix, suffix + n - 1, h.data() + i)) detail::ban(words, a.W, h[i + n - 1]);
    }
  }
  if (a.bad != nullptr) {
    const int64_t* table = a.bad + s * a.P * a.M;
    for (int64_t p = 0; p < a.P; ++p) {
      const int64_t* w = table + p * a.M;
      const int64_t last = w[a.M - 1];
      if (last < 0) continue;  // an unused row of the table
      bool match = true;
      for (int64_t j = 0; j < a.M - 1 && match; ++j) {
        if (w[j] == kWild) continue;
        const int64_t k = len - (a.M - 1) + j;  // the history position this prefix token must equal
        match = k >= 0 && h[k] == w[j];
      }
      if (match) detail::ban(words, a.W, last);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// DRY (docs/semantics.md §3 C): the penalties of a row's candidates, from its history window alone

// DRY's exponent clamp: e <= floor(kDryMaxLog / ln base) when base > kDryBigBase (fastsampler._history)
constexpr double kDryMaxLog = 88.7228391;
constexpr double kDryBigBase = 1.000001;
// Repeat lengths are carried up to this (fastsampler._history.dry_table_torch packs them in 20 bits)
constexpr int64_t kDryMaxLen = (int64_t{1} << 20) - 1;

struct DryArgs {
  const int32_t* ring = nullptr;  // (S, L)
  int64_t L = 0;
  const int64_t* total = nullptr;  // (S,)
  const double* fd = nullptr;      // (S, 2): multiplier (0: no DRY), base
  const int64_t* idry = nullptr;   // (S, 2): allowed length, window (dry_penalty_last_n; -1: the whole history)
  const int64_t* brk = nullptr;    // (S, P, M) sequence breakers, left-aligned, -1 padding; or null
  int64_t P = 0, M = 0;
  const int64_t* rows = nullptr;  // (B,) slot of each row
  int64_t B = 0;
};

// Per-thread buffers of dry_row.
struct DryScratch {
  std::vector<int64_t> w, z;                      // the window, oldest first; Z values of its reverse
  std::vector<std::pair<int64_t, int64_t>> head;  // (first token, breaker) of the slot's breakers, sorted
  std::vector<int64_t> single;                    // one-token breakers, sorted
  std::vector<std::pair<int64_t, int64_t>> cand;  // (token, repeat length)
};

// Row r's penalties, ids ascending, into out (cleared first).
inline void dry_row(const DryArgs& a, int64_t r, DryScratch& s, std::vector<std::pair<int32_t, float>>& out) {
  out.clear();
  const int64_t slot = a.rows[r];
  const double mult = a.fd[2 * slot], base = a.fd[2 * slot + 1];
  const int64_t allowed = a.idry[2 * slot], last_n = a.idry[2 * slot + 1];
  const int64_t total = a.total[slot];
  const int64_t have = std::min(total, a.L);
  const int64_t n = !(mult > 0.0) ? 0 : (last_n < 0 ? have : std::min(have, last_n));
  if (n <= allowed) return;
  // the window w: the last n tokens, oldest first
  s.w.resize(static_cast<size_t>(n));
  const int32_t* ring = a.ring + slot * a.L;
  for (int64_t k = 0; k < n; ++k) s.w[k] = ring[(total - n + k) % a.L];
  const int64_t* w = s.w.data();
  // 1. the breaker limit rho: the newest position where some breaker's whole sequence starts, minus (its length - 1)
  //    (the longest breaker starting there)
  int64_t rho = n;
  s.head.clear();
  s.single.clear();
  const int64_t* table = a.brk ? a.brk + slot * a.P * a.M : nullptr;
  for (int64_t p = 0; table && p < a.P; ++p) {
    const int64_t* b = table + p * a.M;
    if (b[0] < 0) continue;  // an unused row of the table
    s.head.emplace_back(b[0], p);
    if (a.M == 1 || b[1] < 0) s.single.push_back(b[0]);
  }
  std::sort(s.head.begin(), s.head.end());
  std::sort(s.single.begin(), s.single.end());
  for (int64_t i = 0; i < n && !s.head.empty(); ++i) {
    const int64_t p = n - 1 - i;  // i tokens back from the newest
    auto it = std::lower_bound(s.head.begin(), s.head.end(), std::make_pair(w[p], int64_t{-1}));
    int64_t longest = 0;
    for (; it != s.head.end() && it->first == w[p]; ++it) {
      const int64_t* b = table + it->second * a.M;
      int64_t m = 1;
      while (m < a.M && b[m] >= 0) ++m;
      if (m - 1 > i || m <= longest) continue;  // runs past the newest token, or no longer than one found here
      if (std::equal(b + 1, b + m, w + p + 1)) longest = m;
    }
    if (longest > 0) {
      rho = i - (longest - 1);
      break;
    }
  }
  if (rho < allowed) return;
  // 2. repeat lengths: len(p) = Z[n - 1 - p] on the reversed window (how far w[..p] and w[..n-1] agree backwards)
  s.z.assign(static_cast<size_t>(n), 0);
  int64_t* z = s.z.data();
  auto rv = [&](int64_t i) { return w[n - 1 - i]; };
  z[0] = n;
  for (int64_t i = 1, l = 0, rr = 0; i < n; ++i) {  // [l, rr): the rightmost match window found so far
    int64_t k = i < rr ? std::min(rr - i, z[i - l]) : 0;
    while (i + k < n && rv(k) == rv(i + k)) ++k;
    z[i] = k;
    if (i + k > rr) {
      l = i;
      rr = i + k;
    }
  }
  // 3. candidates: the token after each position whose repeat length reaches the allowed length, not a one-token
  //    breaker; its length the largest such
  s.cand.clear();
  const int64_t cap = std::min(rho, kDryMaxLen);
  for (int64_t p = 0; p + 1 < n; ++p) {
    const int64_t len = std::min(z[n - 1 - p], cap);
    if (len < allowed) continue;
    const int64_t t = w[p + 1];
    if (!s.single.empty() && std::binary_search(s.single.begin(), s.single.end(), t)) continue;
    s.cand.emplace_back(t, len);
  }
  std::sort(s.cand.begin(), s.cand.end());
  // 4. penalties mult * base^e, e = L - allowed, clamped when base > kDryBigBase; float64, then float32
  const bool big = base > kDryBigBase;
  const double emax = big ? std::floor(kDryMaxLog / std::log(base)) : 0.0;
  for (size_t j = 0; j < s.cand.size(); ++j) {
    if (j + 1 < s.cand.size() && s.cand[j + 1].first == s.cand[j].first) continue;  // the longest of each token
    double e = static_cast<double>(s.cand[j].second - allowed);
    if (big) e = std::min(e, emax);
    const double pen = mult * std::pow(base, e);
    // what float32 rounds to +inf (from 2^128 - 2^103 on) is +inf, which masks the token; a plain cast of an
    // out-of-range double would be undefined
    const float pf = pen >= 0x1.ffffffp+127 ? std::numeric_limits<float>::infinity() : static_cast<float>(pen);
    out.emplace_back(static_cast<int32_t>(s.cand[j].first), pf);
  }
}

}  // namespace fastsampler
