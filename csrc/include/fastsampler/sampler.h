// The per-row sampling pipeline of docs/semantics.md §2 on raw pointers, float32 inside, templated on the input type
// (float, fp16_t, bf16_t). Framework-free: no pybind11 / torch headers.
//
// sample_row runs the stages of a row in the order of docs/semantics.md §2, each a function on the row's RowState:
//   1. pass1_tile, tile by tile (4096 ids, the race tiles), software-prefetching the next tile: the input converted to
//      float32 into the row buffer z; raw statistics when raw logprobs are asked for; the sparse stage A-C edits (CSR
//      bias, penalties on the tokens that occurred, allowed-mask words that are not all ones, EOS ids); temperature
//      (§3 A-D); then, while the tile is in L1, its max, finite count, sum of exp(z - tile max) (and, for typical, the
//      entropy sum), and the 16 lane maxima. scan_head then collects the head, the top values of the row.
//   2. Truncation (§3 E: apply_top_k, apply_top_p, apply_min_p, apply_typical, apply_eta, apply_xtc, or
//      apply_mirostat_v1 / _v2): every rule is a value threshold on z (typical: a band |z - c0| <= s*; XTC: an upper
//      bound); no sort of the vocabulary. Then the dynamic temperature of the kept set (apply_dynamic_temperature):
//      T' from its entropy, and the scale rho = T / T' that the weights, the race and the outputs apply to z - shift.
//      - top-k <= 112 / Mirostat v1: the head, collected by a streaming filter whose threshold starts at the k-th
//        largest lane maximum (a lower bound of the k-th largest value), so only about k elements are ever buffered.
//        Larger k: the same filter over the row.
//      - top-p after top-k: an exact walk over the head. top-p over the full vocabulary and typical: pass 1 keeps
//        exp(z - tile max) and an exact set E (per tile, the elements at or above its smallest lane maximum); E plus a
//        1-in-64 subsample estimate the boundary; one pass computes exact masses above four thresholds placed around
//        the estimate (± 1.5 and ± 4 standard errors) and compresses the candidates of the inner bracket; a few
//        multi-threshold levels over the candidates resolve the boundary exactly (ties kept together). A wrong guess
//        only costs a second, cheaper collection pass (MassSelect, select.h).
//   3. kept_tile_weights (from the head or the bracket pass when available, else a masked exp pass), then the draw
//      (§3 F): race_tiles with Philox stream 1, and the token race inside the winning tile with stream 0 (16-lane
//      Philox, noise only for 64-id blocks holding kept tokens that can still win).
//   4. Outputs: the kept mask or the sampling distribution instead of the draw; or the token, the Mirostat mu update
//      and the logprobs (raw / processed / final, §6), top-N and rank.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastsampler/layout.h"
#include "fastsampler/philox.h"
#include "fastsampler/select.h"
#include "fastsampler/simd.h"

namespace fastsampler {

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
  // (B, dry_k) DRY penalties or null (docs/semantics.md §3 C): row r subtracts dry_vals[r, j] from the logit of
  // dry_ids[r, j] after the frequency and presence penalties; ids ascending, unused entries kDryPad
  const int32_t* dry_ids = nullptr;
  const float* dry_vals = nullptr;
  int64_t dry_k = 0;
  int64_t n_top = 0;
  // (B,) token ids in [0, vocab) or null: the rows' tokens are these (no draw, no argmax) and the outputs -- logprob,
  // rank, top-N, Mirostat update -- are theirs (scoring, speculative verification); final-mode logprobs are defined
  // for kept tokens only
  const int64_t* forced = nullptr;
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
  std::vector<float> z;         // the row after stages A-D (docs/semantics.md §3 A-D)
  std::vector<float> tile_exp;  // exp(z - tile max), kept by pass 1 for a mass selection
  // mass_select's buffers (see MassBuffers)
  std::vector<float> cand_key, cand_w, cand_id, resolve_key, resolve_w, tmp_key, tmp_w, exact_key, exact_w, exact_id;
  std::vector<float> tile_max, tile_sum;      // per tile: max of z, sum of exp(z - tile max)
  std::vector<float> lane_max, raw_lane_max;  // per tile: the 16 lane maxima of z and of the input
  std::vector<float> tile_exact_lo;           // per tile: its smallest finite lane maximum (the exact set's bound)
  std::vector<double> tile_w;                 // kept tile weights, then tile entropy sums or bracket masses
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
    const auto bufs = float_buffers(*this);
    for (int i = 0; i < kRowBuffers; ++i) grow(*bufs[i], need);
    const size_t nt = static_cast<size_t>(ntiles);
    grow(tile_max, nt);
    grow(tile_sum, nt);
    grow(lane_max, nt * simd::kLanes);
    grow(tile_exact_lo, nt);
    grow(raw_lane_max, nt * simd::kLanes);
    grow(tile_w, nt * 5);  // kept tile weights + 4 rows of threshold masses (mass_select)
  }
  // Bytes allocated by the buffers.
  int64_t bytes() const {
    size_t b = 0;
    for (const std::vector<float>* v : float_buffers(*this)) b += v->capacity() * sizeof(float);
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
      for (std::vector<float>* v : float_buffers(*this)) std::vector<float>().swap(*v);
      std::vector<double>().swap(tile_w);
      for (TopSel* t : {&sel, &sel_raw, &head}) std::vector<Entry>().swap(t->buf);
    }
    sync();
  }

  MassBuffers mass_buffers() {
    return {cand_key.data(), cand_w.data(),    cand_id.data(), resolve_key.data(), resolve_w.data(), tmp_key.data(),
            tmp_w.data(),    exact_key.data(), exact_w.data(), exact_id.data(),    tile_w.data()};
  }

 private:
  static constexpr int kRowBuffers = 12;  // the first float buffers: a row's length each
  template <class Self>
  static auto float_buffers(Self& s) -> std::array<decltype(&s.z), 17> {
    return {&s.z,         &s.tile_exp, &s.cand_key, &s.cand_w,       &s.cand_id,      &s.resolve_key,
            &s.resolve_w, &s.tmp_key,  &s.tmp_w,    &s.exact_key,    &s.exact_w,      &s.exact_id,
            &s.tile_max,  &s.tile_sum, &s.lane_max, &s.raw_lane_max, &s.tile_exact_lo};
  }
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

// Kept-set predicate: z >= lo (finite), z <= hi (XTC's cut), and for typical |z - c0| <= s.
struct Keep {
  float lo = -kInf;
  float hi = kInf;
  bool band = false;
  float c0 = 0.0f, s = kInf;
  inline mask_t mask(vf z) const {
    mask_t m = gt(z, set1(-kInf)) & ge(z, set1(lo));
    if (hi < kInf) m &= le(z, set1(hi));
    if (band) m &= le(vabs(z - set1(c0)), set1(s));
    return m;
  }
  inline bool test(float z) const {
    if (!(z > -kInf) || !(z >= lo) || !(z <= hi)) return false;
    return !band || std::fabs(z - c0) <= s;
  }
  bool truncates() const { return lo > -kInf || hi < kInf || band; }
  bool operator==(const Keep& o) const { return lo == o.lo && hi == o.hi && band == o.band && c0 == o.c0 && s == o.s; }
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
  // from the bottom: the (nfinite - k + 1)-th smallest; negate into a scratch row on the fly
  const int64_t k2 = nfinite - k + 1;
  float* neg = s.tmp_key.data();
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

// One row: its parameters, statistics, thresholds and kept weights, read and written by the stages of sample_row in
// the order of docs/semantics.md §2. Stages copy what their hot loops read into locals: z's float stores could
// otherwise alias the float fields here.
struct RowState {
  RowState(const BatchArgs& args, int64_t row, Scratch& scratch) : a(args), r(row), s(scratch) {}
  const BatchArgs& a;
  const int64_t r;
  Scratch& s;
  const void* x = nullptr;  // the input row, of the element type sample_row is instantiated for
  int64_t vs = 0;           // vocab_size: the columns read
  int64_t vp = 0;           // vs rounded up to whole vectors (z's padding lanes are -inf)
  int64_t ntiles = 0;
  float* z = nullptr;
  const float* fp = nullptr;    // the row's float parameters (FCol)
  const int32_t* ip = nullptr;  // the row's int parameters (ICol)

  // parameters and state (docs/semantics.md §3)
  bool greedy = false;
  float scale = 1.0f;   // 1 / temperature; 1 for greedy rows
  bool dyn = false;     // dynamic temperature (docs/semantics.md §3 E): the kept set's own, after truncation
  float nsigma = 0.0f;  // top-nσ, in the min-p stage (docs/semantics.md §3 E item 3); 0: off
  float eta = 0.0f;     // eta over the survivors (§3 E item 5); 0: off
  float xtc_p = 0.0f;   // XTC (§3 E item 6); 0: off
  bool kept_mode = false;
  bool probs_mode = false;  // a (B, V) output (probabilities or the kept mask) instead of the draw
  bool want_lp = false;
  int lp_mode = MODE_RAW;
  int64_t ntop_row = 0;
  bool need_raw = false;  // raw logprobs: statistics of the input itself
  int miro = 0;
  float mu_in = 0.0f;
  float rep = 1.0f, freq = 0.0f, pres = 0.0f;
  bool penal = false;  // some penalty applies and the history to apply it to is given
  bool ban_eos = false;
  const int32_t* allowed = nullptr;  // the row's allowed-mask words, or null
  const int32_t* prompt = nullptr;   // the row's prompt-mask words, or null
  const int32_t* cnt32 = nullptr;    // the row's output counts (one of the two), or null
  const int16_t* cnt16 = nullptr;
  int64_t bias_next = 0, bias_end = 0;  // the row's logit-bias entries (CSR) not applied yet
  int64_t dry_next = 0, dry_end = 0;    // the row's DRY entries (in dry_ids / dry_vals) not applied yet
  int64_t min_keep = 1;

  // how pass 1 runs, decided before it
  int64_t head_k = 0;             // the head's size
  bool use_head = false;          // collect the head (top values) after pass 1
  bool fuse_entropy = false;      // typical without an earlier rule: the entropy sums come with pass 1
  bool want_tent = false;         // pass 1 sums exp(z - tmax) (z - tmax) per tile (fuse_entropy, eta alone)
  bool dyn_pass1 = false;         // a dynamic temperature and no rule: pass 1 takes the sums of softmax(l) for T'
  bool moments = false;           // pass 1 gathers the mean and variance of the finite z (top-nσ)
  bool store_e = false;           // keep exp(z - tile max) and the exact set E for a full-row mass selection
  bool edits = false;             // some stage A-C edit applies to the row
  bool raw_is_z = false;          // the raw statistics equal z's (no edits, temperature 1 or greedy)
  bool raw_pass = false;          // raw statistics from the input in the conversion sweep
  bool single_tile_draw = false;  // one tile and nothing reads the kept mass: the draw needs no weights
  bool skip_exp = false;          // pass 1 leaves the tile sums out (computed later only if needed)

  // statistics
  bool bad = false;  // a NaN or +inf in the input or in z (docs/semantics.md §5)
  int64_t nfinite = 0;
  double raw_sum = 0.0;  // sum of exp(x - raw_max) over the input
  float raw_max = -kInf;
  float M = -kInf;          // max of z
  double S = 0.0;           // sum of exp(z - M)
  bool have_stats = false;  // the tile sums and S are computed
  int64_t n_exact = 0;      // size of the exact set E (store_e)
  float* tmax = nullptr;    // per tile: max of z
  float* tsum = nullptr;    // per tile: sum of exp(z - tmax)
  double* tent = nullptr;   // per tile: sum of exp(z - tmax) (z - tmax) (want_tent)
  double* dsw = nullptr;    // per tile: sum of exp(T (z - tmax)) (dyn_pass1)
  double* dswd = nullptr;   // per tile: sum of exp(T (z - tmax)) T (z - tmax) (dyn_pass1)
  // count, mean and sum of squared deviations of the finite z, merged tile by tile (moments)
  double mom_n = 0.0, mom_mean = 0.0, mom_m2 = 0.0;
  float mom_shift = kInf;   // the last tile's mean: the next tile's shift (+inf: none yet)
  float* ebuf = nullptr;    // exp(z - tmax) per element (store_e)
  float* tile_r = nullptr;  // per tile: every element >= it is in E (store_e)

  // truncation (docs/semantics.md §3 E)
  Keep keep;          // the kept set S
  int64_t nsurv = 0;  // survivors of the rules so far, when nsurv_known
  bool nsurv_known = true;
  int64_t nh = 0;  // the head: its first nh entries, value desc, id asc, complete above hlast (or all: hall)
  const Entry* hd = nullptr;
  float hlast = -kInf;
  bool hall = false;
  bool have_tw = false;  // tw holds the kept tile weights of tw_keep (from a mass selection)
  Keep tw_keep;
  bool kept_in_head = false;  // the kept set is the head entries [head_from, nkept_head)
  int64_t head_from = 0;      // (from 0 unless XTC cut the top)
  int64_t nkept_head = 0;

  // kept weights and the draw (docs/semantics.md §3 F), on z' = z rho: rho = T / T' with a dynamic temperature
  // (apply_dynamic_temperature), else 1 (z' = z exactly); the kept-set predicate keep still tests z. rho always
  // multiplies a difference z - shift: a product z rho rounded on its own would not cancel against a shifted maximum
  // where a fused multiply-add keeps it exact (and the race's scores stay small next to their noise)
  float rho = 1.0f;
  double S_kept = 0.0;   // mass of the kept set, relative to exp(shift rho)
  float shift = -kInf;   // weights are exp((z - shift) rho)
  double* tw = nullptr;  // kept tile weights
  int64_t token = -1;
};

// ------------------------------------------------------------------------------------------------------------------
// The row's parameters, and how pass 1 runs

template <typename T>
inline void read_params(RowState& st) {
  const BatchArgs& a = st.a;
  const int64_t r = st.r;
  st.x = static_cast<const T*>(a.logits) + r * a.row_stride;
  st.vs = a.vocab;
  st.vp = round16(st.vs);
  st.ntiles = (st.vs + kTile - 1) / kTile;
  st.s.ensure(st.vp, st.ntiles);
  st.z = st.s.z.data();
  st.fp = a.fparams + r * NF;
  st.ip = a.iparams + r * NI;
  const float* fp = st.fp;
  const int32_t* ip = st.ip;
  const float temp = fp[F_TEMPERATURE];
  st.greedy = temp == 0.0f;
  st.dyn = !st.greedy && fp[F_DYN_RANGE] > 0.0f;
  st.scale = st.greedy ? 1.0f : 1.0f / temp;
  st.kept_mode = a.kept != nullptr;
  st.probs_mode = a.probs != nullptr || st.kept_mode;
  st.want_lp = !st.probs_mode && ip[I_LOGPROBS] != 0;
  st.lp_mode = ip[I_LOGPROBS_MODE];
  st.ntop_row = st.want_lp ? std::min<int64_t>(std::max(ip[I_TOP_LOGPROBS], 0), a.n_top) : 0;
  st.need_raw = st.want_lp && st.lp_mode == MODE_RAW;
  st.miro = ip[I_MIRO_MODE];
  const bool rules = !st.greedy && st.miro == 0;  // truncation rules apply (Mirostat replaces them)
  st.eta = rules && fp[F_ETA] > 0.0f ? fp[F_ETA] : 0.0f;
  st.nsigma = rules && fp[F_NSIGMA] > 0.0f ? fp[F_NSIGMA] : 0.0f;
  st.xtc_p = rules && fp[F_XTC_P] > 0.0f ? fp[F_XTC_P] : 0.0f;
  st.mu_in = a.mu_in[r];
  st.rep = fp[F_REP];
  st.freq = fp[F_FREQ];
  st.pres = fp[F_PRES];
  st.penal = (st.rep != 1.0f || st.freq != 0.0f || st.pres != 0.0f) && (a.prompt != nullptr || a.counts != nullptr);
  st.ban_eos = a.n_eos > 0 && (ip[I_IGNORE_EOS] != 0 || a.steps[r] < static_cast<int64_t>(ip[I_MIN_TOKENS]));
  st.allowed = a.allowed ? a.allowed + r * a.allowed_stride : nullptr;
  st.prompt = a.prompt ? a.prompt + r * a.prompt_stride : nullptr;
  if (a.counts && a.counts_bytes == 4) st.cnt32 = static_cast<const int32_t*>(a.counts) + r * a.counts_stride;
  if (a.counts && a.counts_bytes == 2) st.cnt16 = static_cast<const int16_t*>(a.counts) + r * a.counts_stride;
  st.bias_next = a.bias_indptr ? a.bias_indptr[r] : 0;
  st.bias_end = a.bias_indptr ? a.bias_indptr[r + 1] : 0;
  st.dry_next = a.dry_ids ? r * a.dry_k : 0;
  st.dry_end = a.dry_ids ? (r + 1) * a.dry_k : 0;
  st.min_keep = std::max(ip[I_MIN_KEEP], 1);
}

inline void plan_pass1(RowState& st) {
  const float* fp = st.fp;
  const int32_t* ip = st.ip;
  const int32_t top_k = ip[I_TOP_K];
  // the head serves top-k up to kHead and Mirostat v1's top kMirostatM
  st.head_k = st.miro == 1 ? round16(kMirostatM) : (top_k > 0 ? std::max<int64_t>(top_k, st.min_keep) + 16 : 0);
  st.use_head = !st.greedy && st.head_k > 0 && st.head_k <= kHead;
  if (st.use_head) st.s.head.reset(st.head_k);
  // (the min-p stage's rules are all listed: each may truncate before typical)
  const bool no_rule_before_typical = !st.greedy && st.miro == 0 && top_k <= 0 && fp[F_TOP_P] >= 1.0f &&
                                      fp[F_MIN_P] <= 0.0f && fp[F_EPSILON] <= 0.0f && st.nsigma <= 0.0f;
  st.fuse_entropy = no_rule_before_typical && fp[F_TYPICAL_P] < 1.0f;
  // eta with no earlier rule: its survivors are the whole row, whose entropy sums come with pass 1 too
  st.want_tent = st.fuse_entropy || (no_rule_before_typical && st.eta > 0.0f);
  // a dynamic temperature over every finite token: the entropy sums of T' come with pass 1 (in place of the tile sums,
  // unless logprobs read them)
  st.dyn_pass1 = st.dyn && no_rule_before_typical && fp[F_TYPICAL_P] >= 1.0f && st.eta <= 0.0f && st.xtc_p <= 0.0f;
  st.moments = st.nsigma > 0.0f;
  // rows whose top-p / typical goes through the full-row mass selection keep exp(z - tile max) from pass 1
  st.store_e = st.fuse_entropy || (!st.greedy && st.miro == 0 && fp[F_TOP_P] < 1.0f && top_k <= 0);
  st.edits = st.bias_next < st.bias_end || st.penal || st.allowed || st.ban_eos ||
             (st.dry_next < st.dry_end && st.a.dry_ids[st.dry_next] != kDryPad);
  st.raw_is_z = !st.edits && st.scale == 1.0f;
  st.raw_pass = st.need_raw && !st.raw_is_z;
  // The softmax statistics (tile sums, S) are needed by processed logprobs (or raw ones that equal them), mirostat,
  // typical, untruncated draws and full-row top-p. Greedy rows never need them otherwise; top-k rows served by the head
  // compute them lazily, only if top-k turns out not to truncate.
  const bool lp_needs_stats = st.want_lp && (st.lp_mode == MODE_PROCESSED || (st.lp_mode == MODE_RAW && st.raw_is_z));
  // A row of one tile whose draw needs no weights: the tile race has a single entrant, and nothing else reads the kept
  // mass (Mirostat's update, final logprobs, the probabilities).
  st.single_tile_draw = st.ntiles == 1 && !st.probs_mode && st.miro == 0 && !(st.want_lp && st.lp_mode == MODE_FINAL);
  st.skip_exp =
      !lp_needs_stats && !st.want_tent &&
      ((st.greedy && !st.probs_mode) || (st.use_head && top_k > 0 && st.miro == 0 && fp[F_TYPICAL_P] >= 1.0f) ||
       (st.single_tile_draw && !st.store_e) || st.dyn_pass1);
  st.tmax = st.s.tile_max.data();
  st.tsum = st.s.tile_sum.data();
  st.tent = st.s.tile_w.data() + st.ntiles;
  st.dsw = st.s.tile_w.data() + 2 * st.ntiles;  // (no mass selection in a row without rules)
  st.dswd = st.s.tile_w.data() + 3 * st.ntiles;
  st.ebuf = st.s.tile_exp.data();
  st.tile_r = st.s.tile_exact_lo.data();
}

// ------------------------------------------------------------------------------------------------------------------
// Pass 1: stages A-D and the tile statistics, one tile at a time (docs/semantics.md §3 A-D)

// Software prefetch of the next tile (of the input, or of the output counts): one cache line per vector step. Passed by
// value: a cursor behind a reference would be reloaded after every vector store in the loop (intrinsic stores may
// alias anything).
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  inline void step() {
    if (p < end) {
      __builtin_prefetch(p);
      p += 64;
    }
  }
};

// What a tile's sweep over z gathers: lane maxima, a NaN / +inf flag, the finite count.
struct TileStats {
  vf mx = set1(-kInf);
  mask_t badz = 0;
  int64_t nf = 0;
};

// Folds a tile's raw statistics (maximum rm, sum of exp(x - rm)) into the row's.
inline void merge_raw(RowState& st, float rm, double ts) {
  if (rm > st.raw_max) {
    st.raw_sum = st.raw_sum * std::exp(static_cast<double>(st.raw_max) - rm) + ts;
    st.raw_max = rm;
  } else {
    st.raw_sum += ts * std::exp(static_cast<double>(rm) - st.raw_max);
  }
}

// Sum of exp(x - rm) over a tile of the input (still in L1) or of z; lanes from i1 on are -inf.
template <typename T>
inline double raw_tile_sum(const T* x, int64_t i0, int64_t i1, int64_t e16, float rm) {
  vf acc = set1(0.0f), acc1 = set1(0.0f);
  const vf vrm = set1(rm);
  int64_t j = i0;
  for (; j + 2 * kLanes <= i1; j += 2 * kLanes) {
    acc = acc + vexp(load(x + j) - vrm);
    acc1 = acc1 + vexp(load(x + j + kLanes) - vrm);
  }
  for (; j < e16; j += kLanes) acc = acc + vexp((j + kLanes <= i1 ? load(x + j) : load_tail(x + j, i1 - j)) - vrm);
  return hsum(acc + acc1);
}

// A row with no stage A-C edits: convert, scale and take the statistics in one sweep.
template <typename T>
inline void convert_scale_tile(RowState& st, const T* x, int64_t t, int64_t i0, int64_t i1, int64_t e16, Prefetch pf,
                               TileStats& ts) {
  float* z = st.z;
  const vf vscale = set1(st.scale), ninf = set1(-kInf);
  vf rmx = set1(-kInf), mx = ts.mx;
  mask_t badm = 0, badz = 0;
  int64_t nf = 0;
  for (int64_t i = i0; i < e16; i += kLanes) {
    pf.step();
    vf u = i + kLanes <= i1 ? load(x + i) : load_tail(x + i, i1 - i);
    badm |= unord(u, u) | eq(u, set1(kInf));
    rmx = vmax(rmx, u);
    vf v = u * vscale;
    badz |= eq(v, set1(kInf));
    store(z + i, v);
    mx = vmax(mx, v);
    nf += popcount(gt(v, ninf));
  }
  ts.mx = mx;
  ts.badz = badz;
  ts.nf = nf;
  if (badm || badz) st.bad = true;
  if (st.need_raw) store(st.s.raw_lane_max.data() + t * kLanes, rmx);
  const float rm = hmax(rmx);
  if (st.raw_pass && rm > -kInf && !st.bad) merge_raw(st, rm, raw_tile_sum(x, i0, i1, e16, rm));
}

// The input into z as float32 (lanes from i1 on: -inf), before the edits.
template <typename T>
inline void convert_tile(RowState& st, const T* x, int64_t i0, int64_t i1) {
  float* z = st.z;
  mask_t badm = 0;
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
  if (badm) st.bad = true;
}

// Raw statistics of the input, which z holds until the edits.
inline void raw_stats_of_z(RowState& st, int64_t t, int64_t i0, int64_t e16) {
  const float* z = st.z;
  vf rmx = set1(-kInf), rmx1 = set1(-kInf);
  int64_t i = i0;
  for (; i + 2 * kLanes <= e16; i += 2 * kLanes) {
    rmx = vmax(rmx, load(z + i));
    rmx1 = vmax(rmx1, load(z + i + kLanes));
  }
  for (; i < e16; i += kLanes) rmx = vmax(rmx, load(z + i));
  rmx = vmax(rmx, rmx1);
  store(st.s.raw_lane_max.data() + t * kLanes, rmx);
  const float rm = hmax(rmx);
  if (rm > -kInf) merge_raw(st, rm, raw_tile_sum(z, i0, e16, e16, rm));
}

// Stage A: the logit bias of the tile's ids (docs/semantics.md §3 A).
inline void apply_bias(RowState& st, int64_t i1) {
  const int32_t* ids = st.a.bias_ids;
  const float* vals = st.a.bias_vals;
  float* z = st.z;
  int64_t b = st.bias_next;
  while (b < st.bias_end && ids[b] < i1) {
    z[ids[b]] += vals[b];
    ++b;
  }
  st.bias_next = b;
}

// Stage C, DRY: the row's DRY penalties of the tile's ids, subtracted after the penalties (docs/semantics.md §3 C).
inline void apply_dry(RowState& st, int64_t i1) {
  const int32_t* ids = st.a.dry_ids;
  const float* vals = st.a.dry_vals;
  float* z = st.z;
  int64_t d = st.dry_next;
  while (d < st.dry_end && ids[d] < i1) {  // (padding, kDryPad, is never below i1)
    z[ids[d]] -= vals[d];
    ++d;
  }
  st.dry_next = d;
}

// Stages B, C: repetition, frequency and presence penalties on the tile's tokens that occurred (docs/semantics.md §3 B,
// C), 32 ids (one prompt-mask word) at a time.
inline void apply_penalties(RowState& st, int64_t i0, int64_t i1) {
  float* z = st.z;
  const int32_t* prompt = st.prompt;
  const int32_t* cnt32 = st.cnt32;
  const int16_t* cnt16 = st.cnt16;
  const float rep = st.rep, freq = st.freq, pres = st.pres;
  const int64_t w0 = i0 >> 5, w1 = (i1 + 31) >> 5;
  for (int64_t wd = w0; wd < w1; ++wd) {
    uint32_t bits = prompt ? static_cast<uint32_t>(prompt[wd]) : 0u;
    uint32_t cbits = 0;
    const int64_t base = wd << 5;
    const int64_t lim = std::min<int64_t>(32, i1 - base);
    // a token counts as generated when its count is > 0: a negative count is treated as 0 (docs/semantics.md §3 B,
    // C). Counts rows hold at least vocab_size entries: a full word is in bounds.
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
    // 16 ids at a time, the same float32 operations as one id at a time: the rows of a long generation have most of
    // the vocabulary penalised, where a loop over ids mispredicts
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

// Stage A: the allowed mask (only words that are not all ones cost anything) and the EOS ban (docs/semantics.md §3 A).
inline void apply_masks(RowState& st, int64_t i0, int64_t i1) {
  float* z = st.z;
  if (const int32_t* allowed = st.allowed) {
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
  if (st.ban_eos) {
    for (int64_t e = 0; e < st.a.n_eos; ++e) {
      const int64_t id = st.a.eos[e];
      if (id >= i0 && id < i1) z[id] = -kInf;
    }
  }
}

// Stage D and the tile statistics, after the edits (docs/semantics.md §3 D). Prefetches the next tile's input and,
// when the penalties read them, its output counts.
inline void temperature_tile(RowState& st, int64_t i0, int64_t e16, Prefetch pf, TileStats& ts) {
  Prefetch pc;
  if (st.penal && (st.cnt32 || st.cnt16)) {
    const char* c0 = st.cnt32 ? reinterpret_cast<const char*>(st.cnt32) : reinterpret_cast<const char*>(st.cnt16);
    pc.p = c0 + std::min(i0 + kTile, st.vs) * st.a.counts_bytes;
    pc.end = c0 + std::min(i0 + 2 * kTile, st.vs) * st.a.counts_bytes;
  }
  float* z = st.z;
  const vf vscale = set1(st.scale), ninf = set1(-kInf);
  vf mx = ts.mx;
  mask_t badz = 0;
  int64_t nf = 0;
  if (st.scale != 1.0f) {
    for (int64_t i = i0; i < e16; i += kLanes) {
      pf.step();
      pc.step();
      vf v = load(z + i) * vscale;
      badz |= unord(v, v) | eq(v, set1(kInf));
      store(z + i, v);
      mx = vmax(mx, v);
      nf += popcount(gt(v, ninf));
    }
  } else {
    for (int64_t i = i0; i < e16; i += kLanes) {
      pf.step();
      pc.step();
      vf v = load(z + i);
      badz |= unord(v, v) | eq(v, set1(kInf));
      mx = vmax(mx, v);
      nf += popcount(gt(v, ninf));
    }
  }
  ts.mx = mx;
  ts.badz = badz;
  ts.nf = nf;
}

// The exact set for a mass selection: this tile's elements >= its smallest finite lane maximum.
inline void collect_exact_tile(RowState& st, int64_t t, int64_t i0, int64_t e16, vf mx) {
  const vf ninf = set1(-kInf);
  const float rt = -hmax(select(gt(mx, ninf), set1(0.0f) - mx, ninf));
  st.tile_r[t] = rt;
  if (!(rt < kInf)) return;
  const float* z = st.z;
  float* ek = st.s.exact_key.data();
  float* ei = st.s.exact_id.data();
  const vf vr = set1(rt), iota = lane_iota();
  int64_t n = st.n_exact;
  for (int64_t i = i0; i < e16; i += kLanes) {
    vf v = load(z + i);
    const mask_t me = ge(v, vr);
    compress(ek + n, me, v);
    n += compress(ei + n, me, iota + set1(static_cast<float>(i)));
  }
  st.n_exact = n;
}

// The sum of a vector's lanes in float64.
inline double hsum_d(vf a) {
  alignas(64) float buf[kLanes];
  store(buf, a);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += buf[l];
  return s;
}

// Sum of exp(z - m) over the tile (m its maximum), keeping exp(z - m) for a mass selection (keep_e) and the entropy
// sum (tent: typical, eta over the whole row) when asked to.
inline float tile_exp_sum(RowState& st, int64_t t, int64_t i0, int64_t e16, float m, bool tent, bool keep_e) {
  const float* z = st.z;
  float* ebuf = st.ebuf;
  const vf vm = set1(m);
  vf acc0 = set1(0.0f), acc1 = set1(0.0f);
  int64_t i = i0;
  if (tent) {  // also sum exp(z - m) (z - m) for the entropy
    // a term whose weight is 0 contributes 0 (0 ln 0 = 0, docs/semantics.md §3 E item 4): its z - m may be -inf (a
    // finite z more than FLT_MAX below m), and 0 * -inf would be NaN
    vf accb = set1(0.0f);
    for (; i < e16; i += kLanes) {
      vf d = load(z + i) - vm;
      vf e = vexp(d);
      if (keep_e) store(ebuf + i, e);
      acc0 = acc0 + e;
      accb = mask_add(accb, gt(e, set1(0.0f)), e * d);
    }
    st.tent[t] = hsum(accb);
  } else if (keep_e) {  // keep exp(z - m_t) for the mass selection
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
  return hsum(acc0 + acc1);
}

// Sums of z - c and (z - c)^2 over the tile's finite z (float32 lanes, added in float64).
inline void tile_dev_sums(const float* z, int64_t i0, int64_t e16, float c, double* sd, double* sdd) {
  const vf ninf = set1(-kInf), vc = set1(c);
  vf s1 = set1(0.0f), s2 = set1(0.0f), s2b = set1(0.0f);
  int64_t i = i0;
  for (; i + 2 * kLanes <= e16; i += 2 * kLanes) {
    vf v = load(z + i), u = load(z + i + kLanes);
    const mask_t fv = gt(v, ninf), fu = gt(u, ninf);
    vf d = v - vc, e = u - vc;
    s1 = mask_add(mask_add(s1, fv, d), fu, e);
    s2 = mask_add(s2, fv, d * d);
    s2b = mask_add(s2b, fu, e * e);
  }
  for (; i < e16; i += kLanes) {
    vf v = load(z + i);
    const mask_t fv = gt(v, ninf);
    vf d = v - vc;
    s1 = mask_add(s1, fv, d);
    s2 = mask_add(s2, fv, d * d);
  }
  *sd = hsum_d(s1);
  *sdd = hsum_d(s2) + hsum_d(s2b);
}

// The mean of the tile's finite z (float32 lanes, added in float64).
inline double tile_mean(const float* z, int64_t i0, int64_t e16, double n) {
  vf acc = set1(0.0f);
  for (int64_t i = i0; i < e16; i += kLanes) {
    vf v = load(z + i);
    acc = mask_add(acc, gt(v, set1(-kInf)), v);
  }
  return hsum_d(acc) / n;
}

// top-nσ: the tile's finite count, mean and sum of squared deviations, merged into the row's (Chan et al.'s pairwise
// update, in float64). One sweep of float32 sums around the previous tile's mean (logit tiles look alike); when the
// tile's mean is far from that shift (more than sqrt(3) standard deviations: the shifted sums would cancel), a mean
// sweep and the sums again around the tile's own mean; a float64 pass over the tile when float32 overflows (logits
// spanning more than about 1e19, e.g. after a large DRY penalty).
inline void tile_moments(RowState& st, int64_t i0, int64_t e16, int64_t nf) {
  if (nf == 0) return;
  const float* z = st.z;
  const double n = static_cast<double>(nf);
  double sd = 0.0, sdd = 0.0, mean = 0.0, m2 = 0.0;
  bool ok = false;
  for (int attempt = 0; attempt < 2 && !ok; ++attempt) {
    const float c = attempt == 0 && st.mom_shift < kInf ? st.mom_shift : static_cast<float>(tile_mean(z, i0, e16, n));
    if (!std::isfinite(c)) continue;  // (a float32 overflow: the next attempt, or float64)
    tile_dev_sums(z, i0, e16, c, &sd, &sdd);
    mean = static_cast<double>(c) + sd / n;
    m2 = sdd - sd * sd / n;
    ok = std::isfinite(mean) && std::isfinite(sdd) && sd * sd / n <= 3.0 * m2;
    if (attempt == 1) ok = ok || (std::isfinite(mean) && std::isfinite(sdd));  // (around its own mean: no cancellation)
  }
  if (!ok) {  // float64 over the tile
    double sum = 0.0;
    for (int64_t i = i0; i < e16; ++i)
      if (z[i] > -kInf) sum += z[i];
    mean = sum / n;
    m2 = 0.0;
    for (int64_t i = i0; i < e16; ++i)
      if (z[i] > -kInf) m2 += (z[i] - mean) * (z[i] - mean);
  }
  m2 = std::max(0.0, m2);
  st.mom_shift = static_cast<float>(mean);
  const double tot = st.mom_n + n;
  const double delta = mean - st.mom_mean;
  st.mom_mean += delta * (n / tot);
  st.mom_m2 += m2 + delta * delta * (st.mom_n * n / tot);
  st.mom_n = tot;
}

// A dynamic-temperature row without rules: the tile's sums of exp(T (z - m)) and of exp(T (z - m)) T (z - m) around its
// maximum m (softmax(l) with l = z T, docs/semantics.md §3 E), for T'.
inline void tile_dyn_sums(RowState& st, int64_t t, int64_t i0, int64_t e16, float m) {
  st.dsw[t] = 0.0;
  st.dswd[t] = 0.0;
  if (!(m > -kInf) || st.bad) return;
  const float* z = st.z;
  const vf vm = set1(m), va = set1(st.fp[F_TEMPERATURE]), zero = set1(0.0f);
  vf w0 = zero, w1 = zero, d0 = zero, d1 = zero;
  int64_t i = i0;
  for (; i + 2 * kLanes <= e16; i += 2 * kLanes) {
    vf d = (load(z + i) - vm) * va, e = (load(z + i + kLanes) - vm) * va;
    vf w = vexp(d), x = vexp(e);
    w0 = w0 + w;
    w1 = w1 + x;
    d0 = mask_add(d0, gt(w, zero), w * d);  // (0 ln 0 = 0: a masked z has d = -inf)
    d1 = mask_add(d1, gt(x, zero), x * e);
  }
  if (i < e16) {
    vf d = (load(z + i) - vm) * va;
    vf w = vexp(d);
    w0 = w0 + w;
    d0 = mask_add(d0, gt(w, zero), w * d);
  }
  st.dsw[t] = hsum_d(w0) + hsum_d(w1);
  st.dswd[t] = hsum_d(d0) + hsum_d(d1);
}

// A tile's statistics once z holds its final values: the bad flag, the finite count, the lane maxima, the exact set,
// the tile max and sum (and entropy sum), the moments.
inline void finish_tile(RowState& st, int64_t t, int64_t i0, int64_t e16, const TileStats& ts) {
  if (ts.badz) st.bad = true;
  st.nfinite += ts.nf;
  store(st.s.lane_max.data() + t * kLanes, ts.mx);  // 16 maxima of distinct elements: seeds the head's filter
  if (st.store_e && !st.bad) collect_exact_tile(st, t, i0, e16, ts.mx);
  const float m = hmax(ts.mx);
  st.tmax[t] = m;
  if (m > -kInf && !st.bad && !st.skip_exp) {
    st.tsum[t] = tile_exp_sum(st, t, i0, e16, m, st.want_tent, st.store_e);
  } else {
    st.tsum[t] = 0.0f;
    if (st.want_tent) st.tent[t] = 0.0;
  }
  if (st.moments && m > -kInf && !st.bad) tile_moments(st, i0, e16, ts.nf);
  if (st.dyn_pass1) tile_dyn_sums(st, t, i0, e16, m);
}

// One tile of pass 1: stages A-D into z, then, while the tile is in L1, its statistics.
template <typename T>
inline void pass1_tile(RowState& st, int64_t t) {
  const T* x = static_cast<const T*>(st.x);
  const int64_t i0 = t * kTile;
  const int64_t i1 = std::min(st.vs, i0 + kTile);
  const int64_t e16 = std::min(st.vp, i0 + kTile);  // end of the tile's vectors in z
  Prefetch pf{reinterpret_cast<const char*>(x + std::min(i0 + kTile, st.vs - 1)),
              reinterpret_cast<const char*>(x + std::min(i0 + 2 * kTile, st.vs))};
  TileStats ts;
  if (!st.edits) {
    convert_scale_tile(st, x, t, i0, i1, e16, pf, ts);
  } else {
    convert_tile(st, x, i0, i1);
    if (st.need_raw) raw_stats_of_z(st, t, i0, e16);
    apply_bias(st, i1);
    if (st.penal) apply_penalties(st, i0, i1);
    if (st.dry_next < st.dry_end) apply_dry(st, i1);
    apply_masks(st, i0, i1);
    temperature_tile(st, i0, e16, pf, ts);
  }
  finish_tile(st, t, i0, e16, ts);
}

// Sums of q and of q (z - M) (unnormalised, q = exp(z - M)) over the whole row, from the tiles' sums; the entropy of
// softmax(z) is ln sw - swz / sw.
inline void row_entropy_sums(const RowState& st, double* sw_out, double* swz_out) {
  double sw = 0.0, swz = 0.0;
  for (int64_t t = 0; t < st.ntiles; ++t) {
    if (!(st.tmax[t] > -kInf)) continue;
    const double sc = std::exp(static_cast<double>(st.tmax[t]) - st.M);
    sw += sc * st.tsum[t];
    swz += sc * (st.tent[t] + (static_cast<double>(st.tmax[t]) - st.M) * st.tsum[t]);
  }
  *sw_out = sw;
  *swz_out = swz;
}

// The head: the top head_k values of z through a streaming filter over the row. The head_k-th largest of the per-tile
// lane maxima (maxima of distinct elements) is a lower bound of the head_k-th largest value: the filter starts there,
// so only about head_k elements ever enter the buffer.
inline void scan_head(RowState& st) {
  const int64_t head_k = st.head_k;
  const int64_t nl = st.ntiles * kLanes;
  float seed;
  if (nl >= 2 * head_k) {
    seed = lower_bound_kth(st.s.lane_max.data(), nl, head_k);
  } else {
    // short rows have too few tile lane maxima for a useful bound (with as many maxima as head_k, their smallest lets
    // most of the row through the filter): take lane maxima of smaller groups of vectors instead, at least 4 head_k
    // of them, so that only about 1.2 head_k elements pass (1.4 head_k with 2 head_k maxima)
    alignas(64) float gmax[2 * (4 * kHead / kLanes + 1) * kLanes];
    const float* z = st.z;
    const int64_t nvec = st.vp / kLanes;
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
  if (seed > -kInf) st.s.head.tau = std::nextafter(seed, -kInf);
  st.s.head.scan(st.z, st.vp, 0, [](int64_t) { return kAll; });
}

// S = sum of exp(z - M) from the tile sums.
inline double row_mass(const RowState& st) {
  double S = 0.0;
  for (int64_t t = 0; t < st.ntiles; ++t)
    if (st.tmax[t] > -kInf) S += static_cast<double>(st.tsum[t]) * std::exp(static_cast<double>(st.tmax[t]) - st.M);
  return S;
}

// The tile sums and S, for rows whose pass 1 left them out.
inline void ensure_stats(RowState& st) {
  if (st.have_stats) return;
  st.have_stats = true;
  const float* z = st.z;
  for (int64_t t = 0; t < st.ntiles; ++t) {
    const float m = st.tmax[t];
    st.tsum[t] = 0.0f;
    if (!(m > -kInf)) continue;
    const int64_t i0 = t * kTile, e16 = std::min(st.vp, i0 + kTile);
    vf acc = set1(0.0f);
    for (int64_t i = i0; i < e16; i += kLanes) acc = acc + vexp(load(z + i) - set1(m));
    st.tsum[t] = hsum(acc);
  }
  st.S = row_mass(st);
}

// ------------------------------------------------------------------------------------------------------------------
// Truncation: every rule raises a value threshold on z, or (typical) sets a band (docs/semantics.md §3 E, §4)

// Every element with a value >= v is in the head.
inline bool head_covers(const RowState& st, float v) { return st.use_head && (st.hall || v > st.hlast); }

inline void ensure_nsurv(RowState& st) {
  if (!st.nsurv_known) {
    st.nsurv = count_ge(st.z, st.vp, st.keep.lo);
    st.nsurv_known = true;
  }
}

inline void raise_lo(RowState& st, float thr) {
  if (thr > st.keep.lo) {
    st.keep.lo = thr;
    st.nsurv_known = false;
  }
}

// The k-th largest value with multiplicity, from the head when it holds it.
inline float kth(RowState& st, int64_t k) {
  return (st.use_head && k <= st.nh) ? st.hd[k - 1].v : kth_largest(st.s, st.z, st.vp, k, st.nfinite);
}

inline MassBuffers mass_buffers(RowState& st) { return st.s.mass_buffers(); }

// What pass 1 kept for a full-row mass selection.
inline MassPrior mass_prior(const RowState& st, double known_total) {
  MassPrior p;
  p.known_total = known_total;
  p.tile_exp = st.store_e ? st.ebuf : nullptr;
  p.tile_max = st.tmax;
  p.n_exact = st.store_e ? st.n_exact : -1;
  p.tile_exact_lo = st.store_e ? st.tile_r : nullptr;
  return p;
}

// The head: the top kHead values (value desc, id asc) of pass 1, complete above its last value.
inline void start_truncation(RowState& st) {
  st.nsurv = st.nfinite;
  if (!st.use_head) return;
  st.s.head.finish();
  st.nh = st.s.head.n;
  st.hd = st.s.head.buf.data();
  st.hlast = st.nh ? st.hd[st.nh - 1].v : -kInf;
  st.hall = st.nh < st.head_k;
}

// top-k: keep z >= the max(k, min_keep)-th largest value.
inline void apply_top_k(RowState& st, int32_t top_k) {
  const int64_t k = std::max<int64_t>(top_k, st.min_keep);
  if (k < st.nfinite) raise_lo(st, kth(st, k));
}

// top-p by walking the head in order: exact while the tie groups walked are complete. Returns whether it found the
// cut (then *thr is it); a survivor set bounded by top-k always lies in the head.
inline bool top_p_in_head(RowState& st, float top_p, float* thr) {
  const float lo = st.keep.lo;
  const bool bounded = lo > -kInf;
  const Entry* hd = st.hd;
  const int64_t nh = st.nh;
  int64_t ns = nh;
  if (!bounded) ensure_stats(st);
  double tot = st.S;
  if (bounded) {
    ns = 0;
    tot = 0.0;
    while (ns < nh && hd[ns].v >= lo) tot += std::exp(static_cast<double>(hd[ns++].v) - st.M);
  }
  const double target = static_cast<double>(top_p) * tot;
  double cum = 0.0;
  bool done = false;
  for (int64_t i = 0; i < ns;) {
    const float v = hd[i].v;
    int64_t j = i;
    const double w = std::exp(static_cast<double>(v) - st.M);
    do {  // hd[i] itself, then its ties: the walk always advances
      cum += w;
      ++j;
    } while (j < ns && hd[j].v == v);
    if (!bounded && !head_covers(st, v)) break;  // this group may continue beyond the head
    *thr = v;
    if (cum >= target) {
      done = true;
      break;
    }
    i = j;
  }
  if (bounded && !done) done = true;  // never reached (rounding): keep every survivor (thr = last)
  if (done) {
    st.nsurv = bounded ? ns : st.nfinite;
    st.nsurv_known = true;
  }
  return done;
}

// top-p: from the head when it can, else a mass selection over the survivors; then lowered to keep min_keep.
inline void apply_top_p(RowState& st, float top_p) {
  const float lo = st.keep.lo;
  float thr = lo;
  bool done = false;
  if (st.use_head && (!(lo > -kInf) || head_covers(st, lo))) done = top_p_in_head(st, top_p, &thr);
  bool htw = false;
  if (!done) {
    ensure_nsurv(st);
    ensure_stats(st);
    MassSelect sel(
        mass_buffers(st), st.z, st.vp, st.M, [](vf v) { return v; },
        [lo](vf v) { return gt(v, set1(-kInf)) & ge(v, set1(lo)); });
    thr = sel.run(st.M, st.nsurv, static_cast<double>(top_p), true, mass_prior(st, lo > -kInf ? -1.0 : st.S));
    htw = sel.have_tw;
  }
  const int64_t mk = std::min(st.min_keep, st.nsurv);
  if (mk > 1) {
    const float k2 = kth(st, mk);
    if (k2 < thr) {
      thr = k2;
      htw = false;
    }
  }
  raise_lo(st, thr);
  if (htw) st.tw_keep = st.keep;
  st.have_tw = htw;
}

// The population standard deviation of the finite z (top-nσ), from the moments pass 1 merged.
inline double row_sigma(const RowState& st) { return std::sqrt(st.mom_m2 / st.mom_n); }

// The min-p stage (docs/semantics.md §3 E item 3): the largest of its active thresholds, capped at M (the maximum is
// always kept) and lowered to keep min_keep:
//   min-p    z >= M + ln(min_p)
//   epsilon  z >= M + ln S + ln(epsilon)                          (q >= epsilon in the whole distribution)
//   top-nσ   z >= M - nsigma σ                                    (σ the standard deviation of the finite z)
inline void apply_min_p(RowState& st) {
  const float min_p = st.fp[F_MIN_P], epsilon = st.fp[F_EPSILON];
  const double M = st.M;
  double t = -std::numeric_limits<double>::infinity();
  if (min_p > 0.0f) t = M + std::log(static_cast<double>(min_p));
  if (epsilon > 0.0f) {
    ensure_stats(st);  // S: the whole row's mass relative to M
    t = std::max(t, M + std::log(static_cast<double>(epsilon)) + std::log(st.S));
  }
  if (st.nsigma > 0.0f) t = std::max(t, M - static_cast<double>(st.nsigma) * row_sigma(st));
  float thr = static_cast<float>(std::min(t, M));
  if (st.min_keep > 1) {
    ensure_nsurv(st);
    const int64_t mk = std::min(st.min_keep, st.nsurv);
    if (mk > 1) thr = std::min(thr, kth(st, mk));
  }
  raise_lo(st, thr);
}

// Sums of q and of q (z - M) (unnormalised, q = exp(z - M)) over the survivors z >= lo, for the entropy.
inline void survivor_entropy_sums(const RowState& st, float lo, double* sw_out, double* swz_out) {
  double sw = 0.0, swz = 0.0;
  if (st.fuse_entropy && !(lo > -kInf)) {
    // from pass 1: A = sum_t e^{m_t - M} (B_t + (m_t - M) s_t) with B_t = sum exp(z - m_t)(z - m_t)
    row_entropy_sums(st, &sw, &swz);
  } else {
    const float* z = st.z;
    const vf vM = set1(st.M), vlo = set1(lo), ninf = set1(-kInf);
    for (int64_t i0 = 0; i0 < st.vp; i0 += kTile) {
      const int64_t i1 = std::min(st.vp, i0 + kTile);
      vf a0 = set1(0.0f), a1 = set1(0.0f);
      for (int64_t i = i0; i < i1; i += kLanes) {
        vf v = load(z + i);
        mask_t sel = gt(v, ninf) & ge(v, vlo);
        if (!sel) continue;
        vf d = v - vM;
        vf w = vexp(d);
        a0 = mask_add(a0, sel, w);
        // q = 0 contributes 0 to H (0 ln 0 = 0, docs/semantics.md §3 E item 4); d = z - M may be -inf for a finite z
        // (z - M below -FLT_MAX), and 0 * -inf would make H NaN
        a1 = mask_add(a1, sel & gt(w, set1(0.0f)), w * d);
      }
      sw += hsum(a0);
      swz += hsum(a1);
    }
  }
  *sw_out = sw;
  *swz_out = swz;
}

// The mk-th smallest typical score |z - c0| among the survivors z >= lo.
inline float typical_kth_score(RowState& st, int64_t mk, float lo, float c0) {
  const float* z = st.z;
  float* key = st.s.tmp_key.data();
  const vf vlo = set1(lo), vc0 = set1(c0), ninf = set1(-kInf);
  for (int64_t i = 0; i < st.vp; i += kLanes) {
    vf u = load(z + i);
    mask_t sel = gt(u, ninf) & ge(u, vlo);
    store(key + i, select(sel, set1(0.0f) - vabs(u - vc0), ninf));
  }
  TopSel& sel = st.s.sel;
  sel.reset(mk);
  sel.scan(key, st.vp, 0, [](int64_t) { return kAll; });
  sel.finish();
  // a survivor whose |z - c0| overflows to +inf (key -inf) never enters the selection: fewer than mk entries means the
  // mk-th smallest score is +inf (keep every survivor)
  return sel.n >= mk ? -sel.buf[mk - 1].v : kInf;
}

// typical-p: the band |z - c0| <= s* around c0 = M + ln(sw) - H (the score -ln q - H is |z - c0| up to the sign),
// s* from a mass selection on the keys -|z - c0|, raised to keep min_keep.
inline void apply_typical(RowState& st, float typ) {
  ensure_nsurv(st);
  const float lo = st.keep.lo;
  double sw = 0.0, swz = 0.0;
  survivor_entropy_sums(st, lo, &sw, &swz);
  const double H = std::log(sw) - swz / sw;
  const float c0 = static_cast<float>(static_cast<double>(st.M) + std::log(sw) - H);
  const vf vc0 = set1(c0);
  MassSelect sel(
      mass_buffers(st), st.z, st.vp, st.M, [vc0](vf u) { return set1(0.0f) - vabs(u - vc0); },
      [lo](vf u) { return gt(u, set1(-kInf)) & ge(u, set1(lo)); });
  float sstar = -sel.run(0.0f, st.nsurv, static_cast<double>(typ), false, mass_prior(st, -1.0));
  bool htw = sel.have_tw;
  const int64_t mk = std::min(st.min_keep, st.nsurv);
  if (mk > 1) {
    const float s2 = typical_kth_score(st, mk, lo, c0);
    if (s2 > sstar) {
      sstar = s2;
      htw = false;
    }
  }
  st.keep.band = true;
  st.keep.c0 = c0;
  st.keep.s = sstar;
  if (htw) st.tw_keep = st.keep;
  st.have_tw = htw;
}

// Mirostat v2: keep ln q = (z - M) - ln S >= -mu ln 2; the shift is added last, so ln S survives a large M.
inline void apply_mirostat_v2(RowState& st) {
  constexpr double kLn2 = 0.69314718055994530942;
  float thr = static_cast<float>(st.M + (std::log(st.S) - static_cast<double>(st.mu_in) * kLn2));
  if (!(thr <= st.M)) thr = st.M;  // none kept (or NaN mu): keep the argmax
  raise_lo(st, thr);
}

// Mirostat v1's k (docs/semantics.md §3 E) from the Zipf exponent of the head's top min(kMirostatM, n) values.
inline int64_t mirostat_v1_k(const RowState& st) {
  const int64_t m = std::min<int64_t>(kMirostatM, st.nfinite);  // nh >= m
  const Entry* hd = st.hd;
  const double N = static_cast<double>(st.vs);
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
    const double two_mu = std::pow(2.0, static_cast<double>(st.mu_in));
    const double base = std::fabs(eps) < 1e-6 ? two_mu / std::log(N) : (eps * two_mu) / (1.0 - std::pow(N, -eps));
    if (sh != 0.0)
      kf = (base < 0.0) ? std::numeric_limits<double>::quiet_NaN() : std::pow(base, 1.0 / sh);
    else
      kf = base > 1.0 ? std::numeric_limits<double>::infinity() : (base == 1.0 ? 1.0 : 0.0);
  }
  if (!std::isfinite(kf)) kf = N;
  kf = std::floor(kf);
  kf = std::min(std::max(kf, 1.0), N);
  return static_cast<int64_t>(kf);
}

inline void apply_mirostat_v1(RowState& st) {
  const int64_t k = mirostat_v1_k(st);
  if (k < st.nfinite) raise_lo(st, kth(st, k));
}

// The smallest float32 f with f >= t (t a float64 threshold): z >= t and z >= f agree for every float32 z.
inline float float_at_least(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, kInf);
  return f;
}

// The kept set lies in the head: a value prefix (no typical band) bounded by a threshold the head covers; XTC's upper
// bound hi only skips the head's first entries.
inline bool kept_set_in_head(const RowState& st) {
  return !st.keep.band && st.keep.lo > -kInf && head_covers(st, st.keep.lo);
}

// Softmax sums of a z (a > 0: 1 for z itself, T for the logits l = z T) over the kept set S: its maximum m (of z), its
// size n, sw = sum exp(a (z - m)) and swd = sum exp(a (z - m)) a (z - m); the entropy of softmax(a z) over S is
// ln sw - swd / sw.
struct KeptSums {
  float m = -kInf;
  int64_t n = 0;
  double sw = 0.0, swd = 0.0;
  double entropy() const { return std::log(sw) - swd / sw; }
};

// KeptSums from the head (kept_set_in_head).
inline KeptSums kept_sums_head(const RowState& st, float a) {
  KeptSums ks;
  const Entry* hd = st.hd;
  int64_t i = 0;
  while (i < st.nh && hd[i].v > st.keep.hi) ++i;
  if (i < st.nh) ks.m = hd[i].v;
  for (; i < st.nh && hd[i].v >= st.keep.lo; ++i) {
    const double d = static_cast<double>(a) * (static_cast<double>(hd[i].v) - ks.m);
    const double w = std::exp(d);
    ks.sw += w;
    if (w > 0.0) ks.swd += w * d;  // (0 ln 0 = 0)
    ++ks.n;
  }
  return ks;
}

// A tile's sums of exp(a (z - r)) and exp(a (z - r)) a (z - r) over the kept tokens of [i0, e16), around r; the
// kept count joins *n and, with kMax (a band or XTC's hi: the tile maximum may be out), the kept maximum *kmax. The
// predicate's optional parts are template flags, so the loop holds no branch.
template <bool kBand, bool kHi, bool kMax>
inline void kept_tile_sums(const RowState& st, int64_t i0, int64_t e16, float a, float r, double* sw, double* swd,
                           int64_t* n, float* kmax) {
  const float* z = st.z;
  const vf va = set1(a), vr = set1(r), ninf = set1(-kInf), zero = set1(0.0f);
  const vf lo = set1(st.keep.lo), hi = set1(st.keep.hi), c0 = set1(st.keep.c0), sb = set1(st.keep.s);
  // two sets of accumulators, every vector (in a band, empty vectors come at random and a skip would mispredict)
  struct Acc {
    vf w = set1(0.0f), wd = set1(0.0f), mx = set1(-kInf);
    int64_t n = 0;
  } p, q;
  auto one = [&](Acc& c, vf v) {
    mask_t km = gt(v, ninf) & ge(v, lo);  // (Keep::mask)
    if (kHi) km &= le(v, hi);
    if (kBand) km &= le(vabs(v - c0), sb);
    c.n += popcount(km);
    if (kMax) c.mx = vmax(c.mx, select(km, v, ninf));
    vf d = (v - vr) * va;
    vf w = vexp(d);
    c.w = mask_add(c.w, km, w);
    // a weight of 0 adds 0 (0 ln 0 = 0): its d may be -inf (z - r below -FLT_MAX), and 0 * -inf is NaN
    c.wd = mask_add(c.wd, km & gt(w, zero), w * d);
  };
  int64_t i = i0;
  for (; i + 2 * kLanes <= e16; i += 2 * kLanes) {
    one(p, load(z + i));
    one(q, load(z + i + kLanes));
  }
  if (i < e16) one(p, load(z + i));
  *sw = hsum_d(p.w) + hsum_d(q.w);
  *swd = hsum_d(p.wd) + hsum_d(q.wd);
  *n += p.n + q.n;
  if (kMax) *kmax = hmax(vmax(p.mx, q.mx));
}

// Adds sums (sw, swd) taken around r into the running sums around ks_r, moving to the larger reference:
// exp(a (z - r')) = c exp(a (z - r)) and a (z - r') = a (z - r) + g with g = a (r - r'), c = e^g.
inline void merge_sums(double a, float r, double sw, double swd, float* ks_r, double* ks_sw, double* ks_swd) {
  if (!(*ks_r > -kInf)) {
    *ks_r = r;
    *ks_sw = sw;
    *ks_swd = swd;
    return;
  }
  if (r > *ks_r) {
    const double g = a * (static_cast<double>(*ks_r) - r), c = std::exp(g);
    *ks_swd = c > 0.0 ? c * (*ks_swd + g * *ks_sw) : 0.0;
    *ks_sw *= c;
    *ks_r = r;
  } else {
    const double g = a * (static_cast<double>(r) - *ks_r), c = std::exp(g);
    swd = c > 0.0 ? c * (swd + g * sw) : 0.0;
    sw *= c;
  }
  *ks_sw += sw;
  *ks_swd += swd;
}

// KeptSums from a masked pass over the tiles that can hold kept tokens: one sweep per tile around an upper bound of its
// kept values (its maximum, lowered to typical's band top c0 + s and XTC's hi), again around the tile's kept maximum
// when that lies so far below the bound that the weights lose precision; merged in float64.
inline KeptSums kept_sums_pass(const RowState& st, float a) {
  const Keep keep = st.keep;
  const float top = keep.band ? std::min(keep.hi, keep.c0 + keep.s) : keep.hi;
  const bool hi = keep.hi < kInf;
  auto sums = keep.band ? (hi ? kept_tile_sums<true, true, true> : kept_tile_sums<true, false, true>)
                        : (hi ? kept_tile_sums<false, true, true> : kept_tile_sums<false, false, false>);
  KeptSums ks;
  float r = -kInf;  // the sums' reference
  for (int64_t t = 0; t < st.ntiles; ++t) {
    const float tm = st.tmax[t];
    if (!(tm > -kInf) || !(tm >= keep.lo) || (keep.band && tm - keep.c0 < -keep.s)) continue;  // nothing kept
    const int64_t i0 = t * kTile, e16 = std::min(st.vp, i0 + kTile);
    float ub = std::min(tm, top);
    double sw = 0.0, swd = 0.0;
    int64_t n = 0;
    float kmax = tm;  // (the tile maximum is kept unless a band or hi applies: then the sweep finds it)
    sums(st, i0, e16, a, ub, &sw, &swd, &n, &kmax);
    if (n == 0) continue;
    if (static_cast<double>(a) * (static_cast<double>(ub) - kmax) > 40.0) {
      ub = kmax;
      int64_t n2 = 0;
      sums(st, i0, e16, a, ub, &sw, &swd, &n2, &kmax);
    }
    ks.n += n;
    ks.m = std::max(ks.m, kmax);
    merge_sums(a, ub, sw, swd, &r, &ks.sw, &ks.swd);
  }
  if (ks.n > 0 && r != ks.m) {  // around the kept maximum
    const double g = static_cast<double>(a) * (static_cast<double>(r) - ks.m), c = std::exp(g);
    ks.swd = c * (ks.swd + g * ks.sw);
    ks.sw *= c;
  }
  return ks;
}

// The k-th largest kept value (1 <= k <= |S|): without typical's band the kept set is the top values.
inline float kth_kept(RowState& st, int64_t k) {
  if (!st.keep.band) return kth(st, k);
  const Keep keep = st.keep;
  const float* z = st.z;
  TopSel& sel = st.s.sel;
  sel.reset(k);
  sel.scan(z, st.vp, 0, [&](int64_t i) { return keep.mask(load(z + i)); });
  sel.finish();
  return sel.n >= k ? sel.buf[k - 1].v : -kInf;
}

// eta (docs/semantics.md §3 E item 5), over the survivors S of the earlier rules: keep
// z >= m + ln sw + ln min(eta, sqrt(eta) e^-H) (m = max_S z, sw = sum_S exp(z - m), H the entropy of softmax(z) over
// S), capped at m and lowered to the min(min_keep, |S|)-th largest survivor. A value threshold on top of typical's
// band. S's sums come from the head (top-k rows), from pass 1's entropy sums (no earlier rule), or a masked pass.
inline void apply_eta(RowState& st) {
  KeptSums ks;
  if (kept_set_in_head(st)) {
    ks = kept_sums_head(st, 1.0f);
  } else if (st.want_tent && !st.keep.truncates()) {  // (eta alone: nothing reused the entropy sums' buffer)
    ks.m = st.M;
    ks.n = st.nfinite;
    row_entropy_sums(st, &ks.sw, &ks.swd);
  } else {
    ks = kept_sums_pass(st, 1.0f);
  }
  if (ks.n == 0) return;
  const double le = std::log(static_cast<double>(st.eta));
  const double t = static_cast<double>(ks.m) + std::log(ks.sw) + std::min(le, 0.5 * le - ks.entropy());
  float thr = std::min(float_at_least(t), ks.m);
  const int64_t mk = std::min(st.min_keep, ks.n);
  if (mk > 1) thr = std::min(thr, kth_kept(st, mk));
  raise_lo(st, thr);
}

// XTC's decision over the kept set S (docs/semantics.md §3 E item 6): with A = {z in S : q >= theta} (q = softmax over
// S), returns a = min z over A when |A| >= 2 and at least min_keep tokens of S have z <= a; else +inf (no cut).
inline float xtc_cut(RowState& st, double ln_theta) {
  const Keep keep = st.keep;
  if (!keep.band && keep.lo > -kInf && head_covers(st, keep.lo)) {  // S is a prefix of the head
    const Entry* hd = st.hd;
    int64_t ns = 0;
    double sum = 0.0;
    while (ns < st.nh && hd[ns].v >= keep.lo) sum += std::exp(static_cast<double>(hd[ns++].v) - hd[0].v);
    const double thr = static_cast<double>(hd[0].v) + std::log(sum) + ln_theta;
    int64_t na = 0;
    while (na < ns && static_cast<double>(hd[na].v) >= thr) ++na;
    if (na < 2) return kInf;
    const float a = hd[na - 1].v;
    int64_t above = 0;
    while (hd[above].v > a) ++above;
    return ns - above >= st.min_keep ? a : kInf;
  }
  const float* z = st.z;
  const vf ninf = set1(-kInf);
  float mx = st.M;  // S holds M unless typical's band cut it
  if (keep.band) {
    vf m = ninf;
    for (int64_t i = 0; i < st.vp; i += kLanes) {
      vf v = load(z + i);
      m = vmax(m, select(keep.mask(v), v, ninf));
    }
    mx = hmax(m);
  }
  double sum = 0.0;
  const vf vmx = set1(mx);
  for (int64_t i0 = 0; i0 < st.vp; i0 += kTile) {
    const int64_t i1 = std::min(st.vp, i0 + kTile);
    vf acc = set1(0.0f);
    for (int64_t i = i0; i < i1; i += kLanes) {
      vf v = load(z + i);
      const mask_t km = keep.mask(v);
      if (km) acc = mask_add(acc, km, vexp(v - vmx));
    }
    sum += hsum_d(acc);
  }
  const vf vthr = set1(float_at_least(static_cast<double>(mx) + std::log(sum) + ln_theta));
  vf amin = set1(kInf);
  int64_t na = 0;
  for (int64_t i = 0; i < st.vp; i += kLanes) {
    vf v = load(z + i);
    const mask_t ma = keep.mask(v) & ge(v, vthr);
    if (!ma) continue;
    na += popcount(ma);
    amin = vmin(amin, select(ma, v, set1(kInf)));
  }
  if (na < 2) return kInf;
  const float a = -hmax(set1(0.0f) - amin);
  if (st.min_keep > 1) {
    const vf va = set1(a);
    int64_t below = 0;
    for (int64_t i = 0; i < st.vp; i += kLanes) {
      vf v = load(z + i);
      below += popcount(keep.mask(v) & le(v, va));
    }
    if (below < st.min_keep) return kInf;
  }
  return a;
}

// XTC: with the row's coin (word 0 of Philox stream 3) u < xtc_probability, keep only z <= xtc_cut.
inline void apply_xtc(RowState& st) {
  const uint64_t seed = static_cast<uint64_t>(st.a.seeds[st.r]);
  const PhiloxKey key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  const uint32_t w0 = philox_word(key, 0, static_cast<uint32_t>(st.a.steps[st.r]),
                                  static_cast<uint32_t>(st.a.seqs[st.r]), static_cast<uint32_t>(kStreamXtc));
  const double u = (static_cast<double>(w0) + 0.5) * 0x1p-32;
  if (!(u < static_cast<double>(st.xtc_p))) return;
  const float a = xtc_cut(st, std::log(static_cast<double>(st.fp[F_XTC_T])));
  if (a < kInf) st.keep.hi = a;
}

// The rules in their fixed order, or Mirostat instead of them (docs/semantics.md §3 E).
inline void truncate(RowState& st) {
  start_truncation(st);
  if (st.miro == 0) {
    const float* fp = st.fp;
    if (st.ip[I_TOP_K] > 0) apply_top_k(st, st.ip[I_TOP_K]);
    if (fp[F_TOP_P] < 1.0f) apply_top_p(st, fp[F_TOP_P]);
    if (fp[F_MIN_P] > 0.0f || fp[F_EPSILON] > 0.0f || st.nsigma > 0.0f) apply_min_p(st);
    if (fp[F_TYPICAL_P] < 1.0f) apply_typical(st, fp[F_TYPICAL_P]);
    if (st.eta > 0.0f) apply_eta(st);
    if (st.xtc_p > 0.0f) apply_xtc(st);
  } else if (st.miro == 2) {
    apply_mirostat_v2(st);
  } else {
    apply_mirostat_v1(st);
  }
}

// Dynamic temperature (docs/semantics.md §3 E, after the rules or Mirostat): T' from the entropy of softmax(l) over the
// kept set S (l = z T; from the head when S lies in it, else a masked pass), then rho = T / T': the draw, the final
// logprobs, the probabilities and the Mirostat update read z' = z rho on S, while the kept-set predicate keeps testing
// z. A kept z whose z' underflows to -inf leaves S (keep.lo rises past it); false when z' overflows to +inf, or
// nothing of S is left (the row is invalid, §5).
inline bool apply_dynamic_temperature(RowState& st) {
  const double T = st.fp[F_TEMPERATURE], delta = st.fp[F_DYN_RANGE], kappa = st.fp[F_DYN_EXP];
  const float a = static_cast<float>(T);
  KeptSums ks;
  if (st.dyn_pass1 && !st.keep.truncates()) {  // every finite token: from pass 1's sums
    ks.m = st.M;
    ks.n = st.nfinite;
    for (int64_t t = 0; t < st.ntiles; ++t) {
      if (!(st.tmax[t] > -kInf)) continue;
      const double g = T * (static_cast<double>(st.tmax[t]) - st.M), c = std::exp(g);
      ks.sw += c * st.dsw[t];
      if (c > 0.0) ks.swd += c * (st.dswd[t] + g * st.dsw[t]);
    }
  } else {
    ks = kept_set_in_head(st) ? kept_sums_head(st, a) : kept_sums_pass(st, a);
  }
  if (ks.n == 0) return false;
  double Tp = T;
  if (ks.n >= 2) {
    const double H = std::max(0.0, ks.entropy());  // (rounding may leave a peaked set a hair below 0)
    const double lo = std::max(0.0, T - delta), hi = T + delta;
    Tp = lo + (hi - lo) * std::pow(H / std::log(static_cast<double>(ks.n)), kappa);
  }
  Tp = std::max(Tp, 1.1754943508222875e-38);  // the smallest normal float32, as for T (§5)
  // (at least the smallest subnormal float32: a huge T' gives a nearly uniform draw, not 0 * -inf)
  const float rho = std::max(static_cast<float>(T / Tp), std::numeric_limits<float>::denorm_min());
  if (rho == 1.0f) return true;  // z' = z: every weight and statistic of the base temperature stands
  const float top = ks.m * rho;
  if (!(top < kInf) || !(top > -kInf)) return false;
  if (rho > 1.0f) {  // keep.lo rises to the smallest z whose z' stays finite (rounding is monotonic)
    float f = static_cast<float>(-std::numeric_limits<float>::max() / static_cast<double>(rho));
    while (!(f * rho > -kInf)) f = std::nextafter(f, kInf);
    while (std::nextafter(f, -kInf) * rho > -kInf) f = std::nextafter(f, -kInf);
    raise_lo(st, f);
  }
  st.rho = rho;
  st.shift = ks.m;     // the kept maximum
  st.have_tw = false;  // (a mass selection's tile weights are those of z)
  return true;
}

// ------------------------------------------------------------------------------------------------------------------
// Kept tile weights: W_t of docs/semantics.md §3 F, relative to exp(shift), and S_kept = sum W_t

// From the head, when it holds the whole kept set: its entries [head_from, nkept_head), lo <= v <= hi.
inline void kept_weights_from_head(RowState& st) {
  double* tw = st.tw;
  for (int64_t t = 0; t < st.ntiles; ++t) tw[t] = 0.0;
  st.S_kept = 0.0;
  const Entry* hd = st.hd;
  const float rho = st.rho;
  int64_t i = 0;
  while (i < st.nh && hd[i].v > st.keep.hi) ++i;  // cut by XTC
  st.head_from = i;
  if (i < st.nh) st.shift = hd[i].v;  // the kept maximum (M unless XTC cut the top)
  for (; i < st.nh && hd[i].v >= st.keep.lo; ++i) {
    const double w = std::exp(static_cast<double>(rho) * (static_cast<double>(hd[i].v) - st.shift));
    tw[hd[i].id / kTile] += w;
    st.S_kept += w;
  }
  st.nkept_head = i;
}

// Sum of exp((z - shift) rho) over the kept tokens of [i0, e16) (rho = 1 when not scaled).
template <bool kScaled>
inline double kept_tile_weight(const RowState& st, int64_t i0, int64_t e16) {
  const float* z = st.z;
  const Keep keep = st.keep;
  const vf vsh = set1(st.shift), vrho = set1(st.rho);
  vf acc = set1(0.0f);
  for (int64_t i = i0; i < e16; i += kLanes) {
    vf v = load(z + i);
    mask_t km = keep.mask(v);
    if (!km) continue;
    acc = mask_add(acc, km, vexp(kScaled ? (v - vsh) * vrho : v - vsh));
  }
  return hsum(acc);
}

// A masked exp pass over the tiles that can hold kept tokens; when every kept weight underflows relative to M, again
// shifted by the kept maximum.
inline void kept_weights_pass(RowState& st) {
  const float* z = st.z;
  double* tw = st.tw;
  const Keep keep = st.keep;
  const bool scaled = st.rho != 1.0f;
  for (int attempt = 0; attempt < 2; ++attempt) {
    double S_kept = 0.0;
    for (int64_t t = 0; t < st.ntiles; ++t) {
      tw[t] = 0.0;
      if (!(st.tmax[t] >= keep.lo)) continue;
      const int64_t i0 = t * kTile, e16 = std::min(st.vp, i0 + kTile);
      tw[t] = scaled ? kept_tile_weight<true>(st, i0, e16) : kept_tile_weight<false>(st, i0, e16);
      S_kept += tw[t];
    }
    st.S_kept = S_kept;
    if (S_kept > 0.0 || attempt == 1) break;
    float mk = -kInf;
    for (int64_t i = 0; i < st.vp; ++i)
      if (keep.test(z[i])) mk = std::max(mk, z[i]);
    st.shift = mk;
  }
}

inline void kept_tile_weights(RowState& st) {
  st.kept_in_head = kept_set_in_head(st);
  if (st.have_tw && st.keep == st.tw_keep && !st.kept_in_head) {  // from the mass selection
    st.S_kept = 0.0;
    for (int64_t t = 0; t < st.ntiles; ++t) st.S_kept += st.tw[t];
    if (!(st.S_kept > 0.0)) st.have_tw = false;
  } else {
    st.have_tw = false;
  }
  if (st.kept_mode || st.have_tw) return;  // the kept mask needs no weights
  if (st.kept_in_head) {
    kept_weights_from_head(st);
  } else if (st.keep.truncates()) {
    kept_weights_pass(st);
  } else if (st.single_tile_draw && !st.have_stats) {
    st.tw[0] = 1.0;  // any positive weight: the only tile wins the race
  } else if (st.rho != 1.0f) {
    kept_weights_pass(st);  // (the tile sums are those of z)
  } else {
    ensure_stats(st);
    st.S_kept = st.S;
    for (int64_t t = 0; t < st.ntiles; ++t)
      st.tw[t] =
          st.tmax[t] > -kInf ? static_cast<double>(st.tsum[t]) * std::exp(static_cast<double>(st.tmax[t]) - st.M) : 0.0;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The draw: a two-level exponential race (docs/semantics.md §3 F, §7)

struct RaceKey {
  PhiloxKey key;
  uint32_t step, seq;
};

// The winning tile (Philox stream 1), or -1 when no tile has weight (not for a valid row).
inline int64_t race_tiles(const RowState& st, const RaceKey& rk) {
  const double* tw = st.tw;
  int64_t tbest = st.ntiles == 1 && tw[0] > 0.0 ? 0 : -1;  // a single tile needs no race
  double sbest = -std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < st.ntiles && st.ntiles > 1; ++t) {
    if (!(tw[t] > 0.0)) continue;
    const double sc = std::log(tw[t]) - std::log(exp_noise(philox_word(rk.key, t, rk.step, rk.seq, 1)));
    if (tbest < 0 || sc > sbest) {
      sbest = sc;
      tbest = t;
    }
  }
  return tbest;
}

// The token race among the kept head entries in the winning tile: their words 16 counters at a time; the head is in
// value order, so the best score comes early and neg_log_noise_bound (no logarithm) rules out most of the rest: a token
// whose bound is below the best score cannot win.
inline void race_head(RowState& st, const RaceKey& rk, int64_t tbest) {
  const Entry* hd = st.hd;
  const double rho = st.rho;
  int32_t hid[kHead];  // positions in the head
  uint32_t hw[kHead];  // their words
  int64_t nr = 0;
  for (int64_t i = st.head_from; i < st.nkept_head; ++i)
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
    philox16(rk.key, uload(c0s), rk.step, rk.seq, 0, words);
    for (int w = 0; w < 4; ++w) ustore(wv[w], words[w]);
    for (int64_t l = 0; l < n; ++l) hw[j0 + l] = wv[sel[l]][l];
  }
  int64_t token = -1;
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < nr; ++j) {
    const Entry& h = hd[hid[j]];
    const double v = rho == 1.0 ? static_cast<double>(h.v) : rho * (static_cast<double>(h.v) - st.shift);  // z'
    if (token >= 0 && v + neg_log_noise_bound(hw[j]) < best) continue;
    const double sc = v - std::log(exp_noise(hw[j]));
    if (token < 0 || sc > best || (sc == best && h.id < token)) {
      best = sc;
      token = h.id;
    }
  }
  st.token = token;
}

// The token race inside a tile, 64 ids (16 Philox counters) a block. Per-lane running best (score, id); ties go to the
// lower id. -ln E <= 22.87 for every 32-bit word, so a block whose kept maximum is below (best so far - 24) cannot win
// and gets no Philox: starting with the block that holds the tile's kept maximum, peaked rows skip most of the tile. In
// the other blocks neg_log_noise_bound16 bounds each token's score from its word without a logarithm; only blocks where
// a kept token's bound reaches the best score so far get the exact noise, a few blocks per row (a token passes with
// probability about e^(z - best), about one in the whole row beyond the first block). With a dynamic temperature the
// scores are (z - shift) rho - ln E: z' - ln E up to the common shift.
struct TokenRace {
  static constexpr float kNoiseMax = 24.0f;
  const float* z;
  Keep keep;
  RaceKey rk;
  int64_t e16;  // the tile's end in z
  float rho, shift;
  vf bsc = set1(-kInf), bid = set1(-1.0f);
  vf iota = lane_iota();
  float best_lb = -kInf;  // a score some kept token already reached

  inline void block(int64_t b0) {
    const int64_t b1 = std::min(e16, b0 + 64);
    const int nq = static_cast<int>((b1 - b0) / kLanes);
    mask_t km[4] = {0, 0, 0, 0};
    vf zq[4];
    vf bm = set1(-kInf);
    for (int q = 0; q < nq; ++q) {
      zq[q] = load(z + b0 + q * kLanes);
      km[q] = keep.mask(zq[q]);
      if (rho != 1.0f) zq[q] = (zq[q] - set1(shift)) * set1(rho);
      bm = vmax(bm, select(km[q], zq[q], set1(-kInf)));
    }
    const float blk_max = hmax(bm);
    if (!(blk_max > -kInf) || blk_max + kNoiseMax < best_lb) return;
    vu words[4];
    philox16(rk.key, uiota(static_cast<uint32_t>(b0 >> 2)), rk.step, rk.seq, 0, words);
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
  }

  // the winner over the lanes (ties: the lower id), or -1
  int64_t winner() const {
    alignas(64) float sv[kLanes], iv[kLanes];
    store(sv, bsc);
    store(iv, bid);
    int64_t token = -1;
    float bestv = -kInf;
    for (int l = 0; l < kLanes; ++l) {
      if (iv[l] < 0.0f) continue;
      const int64_t id = static_cast<int64_t>(iv[l]);
      if (token < 0 || sv[l] > bestv || (sv[l] == bestv && id < token)) {
        bestv = sv[l];
        token = id;
      }
    }
    return token;
  }
};

// The first 64-id block of [i0, e16) holding the kept maximum of the tile (tmk: its maximum when nothing is cut).
inline int64_t kept_max_block(const RowState& st, int64_t i0, int64_t e16, float tmk) {
  const float* z = st.z;
  const Keep keep = st.keep;
  if (keep.truncates()) {
    vf mxk = set1(-kInf);
    for (int64_t i = i0; i < e16; i += kLanes) {
      vf v = load(z + i);
      mxk = vmax(mxk, select(keep.mask(v), v, set1(-kInf)));
    }
    tmk = hmax(mxk);
  }
  for (int64_t i = i0; i < e16; i += kLanes) {
    vf v = load(z + i);
    if (eq(v, set1(tmk)) & keep.mask(v)) return i0 + (i - i0) / 64 * 64;
  }
  return -1;
}

inline void race_tile(RowState& st, const RaceKey& rk, int64_t tbest) {
  const int64_t i0 = tbest * kTile, e16 = std::min(st.vp, i0 + kTile);
  const int64_t first = kept_max_block(st, i0, e16, st.tmax[tbest]);
  TokenRace race{st.z, st.keep, rk, e16, st.rho, st.shift};
  if (first >= 0) race.block(first);
  for (int64_t b0 = i0; b0 < e16; b0 += 64)
    if (b0 != first) race.block(b0);
  st.token = race.winner();
}

// The token of a sampled row; false when no kept token could be drawn (not for a valid row; defensive).
inline bool draw(RowState& st) {
  const uint64_t seed = static_cast<uint64_t>(st.a.seeds[st.r]);
  const RaceKey rk{{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
                   static_cast<uint32_t>(st.a.steps[st.r]),
                   static_cast<uint32_t>(st.a.seqs[st.r])};
  const int64_t tbest = race_tiles(st, rk);
  if (tbest < 0) return false;
  if (st.kept_in_head)
    race_head(st, rk, tbest);
  else
    race_tile(st, rk, tbest);
  return st.token >= 0;
}

// Greedy (docs/semantics.md §3 D): the first tile holding M, then its first element equal to M (bounded walks: M is
// one of them).
inline int64_t greedy_token(const RowState& st) {
  int64_t tb = 0;
  while (tb + 1 < st.ntiles && st.tmax[tb] != st.M) ++tb;
  const int64_t iend = std::min(st.vs, tb * kTile + kTile) - 1;
  int64_t i = tb * kTile;
  while (i < iend && st.z[i] != st.M) ++i;
  return i;
}

// ------------------------------------------------------------------------------------------------------------------
// Outputs

inline void write_invalid(const RowState& st) {
  const BatchArgs& a = st.a;
  const int64_t r = st.r;
  if (st.kept_mode) {
    std::fill(a.kept + r * a.V, a.kept + (r + 1) * a.V, uint8_t{0});
    return;
  }
  if (st.probs_mode) {
    std::fill(a.probs + r * a.V, a.probs + (r + 1) * a.V, 0.0f);
    return;
  }
  a.tokens[r] = -1;
  a.valid[r] = 0;
  a.logprobs[r] = std::numeric_limits<float>::quiet_NaN();
  a.ranks[r] = -1;
  for (int64_t j = 0; j < a.n_top; ++j) {
    a.top_ids[r * a.n_top + j] = -1;
    a.top_lps[r * a.n_top + j] = std::numeric_limits<float>::quiet_NaN();
  }
  a.mu_out[r] = st.mu_in;
}

// The kept set itself, not derived from probabilities (a kept token may have probability 0 in float32, e.g. z = -200
// next to z = 0).
inline void write_kept_mask(const RowState& st) {
  uint8_t* km_out = st.a.kept + st.r * st.a.V;
  std::fill(km_out, km_out + st.a.V, uint8_t{0});
  if (st.greedy) {
    km_out[st.token] = 1;
    return;
  }
  for (int64_t i = 0; i < st.vs; i += kLanes) {
    const mask_t km = st.keep.mask(load(st.z + i));
    const int64_t n = std::min<int64_t>(kLanes, st.vs - i);
    for (int64_t j = 0; j < n; ++j) km_out[i + j] = static_cast<uint8_t>((km >> j) & 1u);
  }
}

// The distribution drawn from: exp((z - shift) rho) / S_kept on the kept set.
inline void write_probs(const RowState& st) {
  float* pr = st.a.probs + st.r * st.a.V;
  std::fill(pr, pr + st.a.V, 0.0f);
  if (st.greedy) {
    pr[st.token] = 1.0f;
    return;
  }
  const float* z = st.z;
  const Keep keep = st.keep;
  const float inv = static_cast<float>(1.0 / st.S_kept);
  const vf vsh = set1(st.shift), vinv = set1(inv), vrho = set1(st.rho);
  alignas(64) float buf[kLanes];
  for (int64_t i = 0; i < st.vp; i += kLanes) {
    vf v = load(z + i);
    mask_t km = keep.mask(v);
    if (!km) continue;
    vf p = maskz(km, vexp((v - vsh) * vrho) * vinv);  // (exact for rho = 1)
    if (i + kLanes <= st.vs) {
      store(pr + i, p);
    } else {
      store(buf, p);
      for (int64_t j = i; j < st.vs; ++j) pr[j] = buf[j - i];
    }
  }
}

// mu <- mu - eta (-log2 q'[token] - tau) (docs/semantics.md §3 E, Update).
inline float updated_mu(const RowState& st) {
  if (st.miro == 0 || st.greedy) return st.mu_in;
  const double qx =
      std::exp(static_cast<double>(st.rho) * (static_cast<double>(st.z[st.token]) - st.shift)) / st.S_kept;
  const double surprise = -std::log2(qx);
  return static_cast<float>(static_cast<double>(st.mu_in) - st.fp[F_MIRO_ETA] * (surprise - st.fp[F_MIRO_TAU]));
}

// log-softmax as (v - max) - ln(sum): the shift first, so ln(sum) is not absorbed by a large max
// (docs/semantics.md §6); rho: the dynamic temperature's scale of v - m
inline float lp_of(float v, double m, double log_sum, double rho = 1.0) {
  return static_cast<float>(rho * (static_cast<double>(v) - m) - log_sum);
}

// The row's top-N outputs.
struct TopOut {
  int64_t* ids;
  float* lps;
  int64_t n;  // the row's top_logprobs
};

inline TopOut top_out(const RowState& st) {
  return {st.a.top_ids + st.r * st.a.n_top, st.a.top_lps + st.r * st.a.n_top, st.ntop_row};
}

// Entries from `have` on: the lowest ids whose logprob is -inf.
template <class IsNegInf>
inline void pad_neg_inf(const RowState& st, const TopOut& top, int64_t have, IsNegInf is_neg_inf) {
  int64_t j = have;
  for (int64_t t = 0; t < st.vs && j < top.n; ++t) {
    if (is_neg_inf(t)) {
      top.ids[j] = t;
      top.lps[j] = -kInf;
      ++j;
    }
  }
}

// The top-N of a selection made by sel (value desc, id asc) as logprobs; then the -inf padding.
template <class IsNegInf>
inline void write_top(const RowState& st, const TopOut& top, const TopSel& sel, double m, double log_sum,
                      IsNegInf is_neg_inf, double rho = 1.0) {
  const int64_t have = std::min<int64_t>(sel.n, top.n);
  for (int64_t j = 0; j < have; ++j) {
    top.ids[j] = sel.buf[j].id;
    top.lps[j] = lp_of(sel.buf[j].v, m, log_sum, rho);
  }
  if (have < top.n) pad_neg_inf(st, top, have, is_neg_inf);
}

// Raw logprobs (the input's log-softmax, docs/semantics.md §6): one pass over the input gives the rank, and the raw
// top-N through a filter seeded with the N-th largest raw lane maximum (a lower bound of the N-th largest value).
template <typename T>
inline void logprobs_raw(RowState& st, const TopOut& top) {
  const T* x = static_cast<const T*>(st.x);
  const int64_t vs = st.vs;
  const double log_raw = std::log(st.raw_sum);
  const float xt = to_float(x[st.token]);
  st.a.logprobs[st.r] = lp_of(xt, st.raw_max, log_raw);
  TopSel& sr = st.s.sel_raw;
  if (top.n > 0) {
    sr.reset(top.n);
    const float seed = lower_bound_kth(st.s.raw_lane_max.data(), st.ntiles * kLanes, top.n);
    if (seed > -kInf) sr.tau = std::nextafter(seed, -kInf);
  }
  int64_t c = 0;
  const vf vx = set1(xt);
  int64_t i = 0;
  for (; i + kLanes <= vs; i += kLanes) {
    const vf v = load(x + i);
    c += popcount(gt(v, vx));
    if (top.n > 0) {
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
    if (top.n > 0 && val > sr.tau) sr.push(val, static_cast<int32_t>(i));
  }
  st.a.ranks[st.r] = 1 + c;
  if (top.n > 0) {
    sr.finish();
    write_top(st, top, sr, st.raw_max, log_raw, [&](int64_t t) { return !(to_float(x[t]) > -kInf); });
  }
}

// Greedy rows' final logprobs: the argmax has logprob 0, the rest -inf.
inline void logprobs_greedy_final(RowState& st, const TopOut& top) {
  st.a.logprobs[st.r] = 0.0f;
  st.a.ranks[st.r] = 1;
  if (top.n > 0) {
    top.ids[0] = st.token;
    top.lps[0] = 0.0f;
    pad_neg_inf(st, top, 1, [&](int64_t t) { return t != st.token; });
  }
}

// Processed logprobs: the log-softmax of z (greedy rows: of l).
inline void logprobs_processed(RowState& st, const TopOut& top) {
  const float* z = st.z;
  const float zt = z[st.token];
  const double log_s = std::log(st.S);
  st.a.logprobs[st.r] = lp_of(zt, st.M, log_s);
  int64_t c = 0;
  const vf vx = set1(zt);
  for (int64_t i = 0; i < st.vp; i += kLanes) c += popcount(gt(load(z + i), vx));
  st.a.ranks[st.r] = 1 + c;
  if (top.n > 0) {
    TopSel& sel = st.s.sel;
    sel.reset(top.n);
    sel.scan(z, st.vp, 0, [](int64_t) { return kAll; });
    sel.finish();
    write_top(st, top, sel, st.M, log_s, [&](int64_t t) { return !(z[t] > -kInf); });
  }
}

// Final logprobs: z' - logsumexp(z' over S) on the kept set, -inf elsewhere. z' = z rho keeps z's order, so the rank
// and the top-N are taken on z.
inline void logprobs_final(RowState& st, const TopOut& top) {
  const float* z = st.z;
  const Keep keep = st.keep;
  const float rho = st.rho;
  const double log_sk = std::log(st.S_kept);
  const float zt = z[st.token];
  st.a.logprobs[st.r] = lp_of(zt, static_cast<double>(st.shift), log_sk, rho);
  int64_t c = 0;
  const vf vx = set1(zt);
  for (int64_t i = 0; i < st.vp; i += kLanes) {
    vf v = load(z + i);
    c += popcount(gt(v, vx) & keep.mask(v));
  }
  st.a.ranks[st.r] = 1 + c;
  if (top.n > 0) {
    TopSel& sel = st.s.sel;
    sel.reset(top.n);
    sel.scan(z, st.vp, 0, [&](int64_t i) { return keep.mask(load(z + i)); });
    sel.finish();
    write_top(st, top, sel, static_cast<double>(st.shift), log_sk, [&](int64_t t) { return !keep.test(z[t]); }, rho);
  }
}

// The token, the Mirostat update and the logprobs of a drawn (or greedy) row (docs/semantics.md §6).
template <typename T>
inline void write_sample(RowState& st) {
  const BatchArgs& a = st.a;
  const int64_t r = st.r;
  a.tokens[r] = st.token;
  a.valid[r] = 1;
  a.mu_out[r] = updated_mu(st);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t j = 0; j < a.n_top; ++j) {
    a.top_ids[r * a.n_top + j] = -1;
    a.top_lps[r * a.n_top + j] = nan;
  }
  if (!st.want_lp) {
    a.logprobs[r] = nan;
    a.ranks[r] = -1;
    return;
  }
  const TopOut top = top_out(st);
  if (st.lp_mode == MODE_RAW)
    logprobs_raw<T>(st, top);
  else if (st.greedy && st.lp_mode == MODE_FINAL)
    logprobs_greedy_final(st, top);
  else if (st.lp_mode == MODE_PROCESSED || st.greedy)
    logprobs_processed(st, top);
  else
    logprobs_final(st, top);
}

}  // namespace detail

// Run one row through the stages of docs/semantics.md §2. Thread-safe given a per-thread Scratch.
template <typename T>
void sample_row(const BatchArgs& a, int64_t r, Scratch& s) {
  using namespace detail;
  RowState st(a, r, s);
  read_params<T>(st);
  plan_pass1(st);
  for (int64_t t = 0; t < st.ntiles; ++t) pass1_tile<T>(st, t);  // stages A-D and the statistics
  for (int64_t t = 0; t < st.ntiles; ++t) st.M = std::max(st.M, st.tmax[t]);
  if (st.use_head && !st.bad && st.M > -kInf) scan_head(st);
  if (st.bad || !(st.M > -kInf)) {  // docs/semantics.md §5
    write_invalid(st);
    return;
  }
  st.have_stats = !st.skip_exp;
  st.S = row_mass(st);
  if (st.need_raw && st.raw_is_z) {
    st.raw_max = st.M;
    st.raw_sum = st.S;
  }
  st.S_kept = st.S;
  st.shift = st.M;
  st.tw = s.tile_w.data();
  if (st.greedy) {
    st.token = a.forced ? a.forced[r] : greedy_token(st);
  } else {
    truncate(st);
    if (st.dyn && !apply_dynamic_temperature(st)) {  // z' overflows (docs/semantics.md §5)
      write_invalid(st);
      return;
    }
    kept_tile_weights(st);
    if (a.forced && !st.probs_mode) {
      st.token = a.forced[r];
    } else if (!st.probs_mode && !draw(st)) {
      write_invalid(st);
      return;
    }
  }
  if (st.kept_mode)
    write_kept_mask(st);
  else if (st.probs_mode)
    write_probs(st);
  else
    write_sample<T>(st);
}

}  // namespace fastsampler
