"""The batch layout of `fastsampler.layout` as Triton constexprs: where the kernels take column numbers from.

A kernel indexes ``fparams`` / ``iparams`` rows with these (``row * NF + F_TEMPERATURE``); they are the same
numbers the numpy reference and the C++ extension read, never retyped."""

from __future__ import annotations

import triton.language as tl

from ... import layout

F_TEMPERATURE: tl.constexpr = tl.constexpr(layout.F_TEMPERATURE)
F_TOP_P: tl.constexpr = tl.constexpr(layout.F_TOP_P)
F_MIN_P: tl.constexpr = tl.constexpr(layout.F_MIN_P)
F_TYPICAL_P: tl.constexpr = tl.constexpr(layout.F_TYPICAL_P)
F_FREQ: tl.constexpr = tl.constexpr(layout.F_FREQ)
F_PRES: tl.constexpr = tl.constexpr(layout.F_PRES)
F_REP: tl.constexpr = tl.constexpr(layout.F_REP)
F_MIRO_TAU: tl.constexpr = tl.constexpr(layout.F_MIRO_TAU)
F_MIRO_ETA: tl.constexpr = tl.constexpr(layout.F_MIRO_ETA)
F_EPSILON: tl.constexpr = tl.constexpr(layout.F_EPSILON)
F_ETA: tl.constexpr = tl.constexpr(layout.F_ETA)
F_NSIGMA: tl.constexpr = tl.constexpr(layout.F_NSIGMA)
F_XTC_P: tl.constexpr = tl.constexpr(layout.F_XTC_P)
F_XTC_T: tl.constexpr = tl.constexpr(layout.F_XTC_T)
F_DYN_RANGE: tl.constexpr = tl.constexpr(layout.F_DYN_RANGE)
F_DYN_EXP: tl.constexpr = tl.constexpr(layout.F_DYN_EXP)
NF: tl.constexpr = tl.constexpr(layout.NF)
I_TOP_K: tl.constexpr = tl.constexpr(layout.I_TOP_K)
I_MIN_KEEP: tl.constexpr = tl.constexpr(layout.I_MIN_KEEP)
I_MIRO_MODE: tl.constexpr = tl.constexpr(layout.I_MIRO_MODE)
I_MIN_TOKENS: tl.constexpr = tl.constexpr(layout.I_MIN_TOKENS)
I_IGNORE_EOS: tl.constexpr = tl.constexpr(layout.I_IGNORE_EOS)
I_LOGPROBS: tl.constexpr = tl.constexpr(layout.I_LOGPROBS)
I_TOP_LOGPROBS: tl.constexpr = tl.constexpr(layout.I_TOP_LOGPROBS)
I_LOGPROBS_MODE: tl.constexpr = tl.constexpr(layout.I_LOGPROBS_MODE)
NI: tl.constexpr = tl.constexpr(layout.NI)
MODE_RAW: tl.constexpr = tl.constexpr(layout.MODE_RAW)
MODE_PROCESSED: tl.constexpr = tl.constexpr(layout.MODE_PROCESSED)
MODE_FINAL: tl.constexpr = tl.constexpr(layout.MODE_FINAL)
