// The history rules of docs/semantics.md §3 A (no_repeat_ngram_size, bad_words_ids) as an allowed-token bitmask.
//
// A row's history is a ring: token j of its prompt + output sits at ring[j % L], `total` tokens were written, and
// the last min(total, L) of them are the history. The bans only read the history: O(L n) for the n-gram rule,
// O(P M) for P bad words of up to M tokens, never the vocabulary (the mask is (B, W) words, all ones but the bans).
#pragma once

#include <algorithm>
#include <cstdint>
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

}  // namespace fastsampler
