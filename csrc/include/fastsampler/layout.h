// The packed-parameter layout shared with the Python side (fastsampler._batch): the columns of the (B, NF) float32
// and (B, NI) int32 parameter arrays, the logprobs modes, and the constants both sides must agree on. The extension
// exports them as LAYOUT, which the package compares with its own at import.
#pragma once

#include <cstdint>
#include <limits>

namespace fastsampler {

enum FCol {
  F_TEMPERATURE = 0,
  F_TOP_P,
  F_MIN_P,
  F_TYPICAL_P,
  F_FREQ,
  F_PRES,
  F_REP,
  F_MIRO_TAU,
  F_MIRO_ETA,
  F_EPSILON,
  F_ETA,
  F_NSIGMA,
  F_XTC_P,  // XTC's effective probability: 0 when XTC is off (fastsampler.layout)
  F_XTC_T,
  F_DYN_RANGE,
  F_DYN_EXP,
  NF
};
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

// The id of an unused DRY table entry (fastsampler._batch.DRY_PAD): larger than every token id.
constexpr int32_t kDryPad = std::numeric_limits<int32_t>::max();
// The Philox stream of XTC's coin (docs/semantics.md §7).
constexpr int64_t kStreamXtc = 3;
// Ids per tile of the two-level race (docs/semantics.md §3 F).
constexpr int64_t kTile = 4096;
// The most probable tokens Mirostat v1 fits its Zipf exponent on (docs/semantics.md §3 E).
constexpr int64_t kMirostatM = 100;
// The widest top-N logprob output a row may ask for (docs/semantics.md §6).
constexpr int64_t kMaxTopLogprobs = 20;
// Where a Sampler's int16 output counts saturate (docs/semantics.md §3 C).
constexpr int32_t kCountMax = std::numeric_limits<int16_t>::max();

}  // namespace fastsampler
