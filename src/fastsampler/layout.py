"""The batch layout every backend reads, written once: parameter columns, flag bits and the constants of the
random-number definition.

The numpy reference, the C++ extension (`fastsampler.backends.cpu`, which checks its own numbers against these at
import) and the Triton kernels (`fastsampler.backends.triton.columns`) all take their numbers from here. The packed
tensors themselves are described in `fastsampler._batch`; the semantics of every value in docs/semantics.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "F_TEMPERATURE", "F_TOP_P", "F_MIN_P", "F_TYPICAL_P", "F_FREQ", "F_PRES", "F_REP", "F_MIRO_TAU", "F_MIRO_ETA",
    "F_EPSILON", "F_ETA", "F_NSIGMA", "F_XTC_P", "F_XTC_T", "F_DYN_RANGE", "F_DYN_EXP", "NF", "I_TOP_K", "I_MIN_KEEP",
    "I_MIRO_MODE", "I_MIN_TOKENS", "I_IGNORE_EOS", "I_LOGPROBS", "I_TOP_LOGPROBS", "I_LOGPROBS_MODE", "NI",
    "MODE_RAW", "MODE_PROCESSED", "MODE_FINAL", "LOGPROBS_MODES", "TILE", "STREAM_TOKEN", "STREAM_TILE",
    "STREAM_VERIFY", "STREAM_XTC", "MIROSTAT_M", "MAX_TOP_LOGPROBS", "COUNT_MAX", "MAX_COLUMNS", "BatchFlags",
    "FLAG_NAMES", "ALL_GREEDY_BIT", "flags_to_int", "int_to_flags", "combine_bits", "EXTENSION_KEYS",
    "check_extension_layout",
]

# float parameter columns of ``fparams`` (B, NF) float32. F_XTC_P is XTC's effective probability: 0 when the
# request's xtc_threshold is above 0.5 (XTC off), so a kernel tests F_XTC_P > 0 alone.
(F_TEMPERATURE, F_TOP_P, F_MIN_P, F_TYPICAL_P, F_FREQ, F_PRES, F_REP, F_MIRO_TAU, F_MIRO_ETA, F_EPSILON, F_ETA,
 F_NSIGMA, F_XTC_P, F_XTC_T, F_DYN_RANGE, F_DYN_EXP) = range(16)
NF = 16
# int parameter columns of ``iparams`` (B, NI) int32
I_TOP_K, I_MIN_KEEP, I_MIRO_MODE, I_MIN_TOKENS, I_IGNORE_EOS, I_LOGPROBS, I_TOP_LOGPROBS, I_LOGPROBS_MODE = range(8)
NI = 8

# ``iparams[:, I_LOGPROBS_MODE]``: the index of `SamplingParams.logprobs_mode` in LOGPROBS_MODES
LOGPROBS_MODES = ("raw", "processed", "final")
MODE_RAW, MODE_PROCESSED, MODE_FINAL = 0, 1, 2

# the random-number definition (docs/semantics.md §7): ids per tile of the two-level race, and the Philox streams
# (token noise, tile noise; speculative verification's two uniforms, §11; XTC's coin, §3 E)
TILE = 4096
STREAM_TOKEN = 0
STREAM_TILE = 1
STREAM_VERIFY = 2
STREAM_XTC = 3

MIROSTAT_M = 100  # Mirostat v1 estimates the Zipf exponent from the 100 most probable tokens (docs/semantics.md §3)
MAX_TOP_LOGPROBS = 20  # the largest `SamplingParams.top_logprobs`
COUNT_MAX = 32767  # output counts are int16 and saturate here
# logits may have at most this many columns: the kernels carry token ids in float32 lanes, exact up to 2^24
MAX_COLUMNS = (1 << 24) - 1


@dataclass(frozen=True)
class BatchFlags:
    """What the rows of a batch use; known on the host from the params alone.

    A flag that is False is a promise the kernels rely on (they compile the feature out: no argmax without
    ``any_greedy``, no token race with ``all_greedy``), so a caller that cannot tell must set the ``any_*`` flag and
    leave ``all_greedy`` False. As an int (`flags_to_int`), bit ``i`` is the ``i``-th field."""

    any_greedy: bool = False
    all_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    any_typical: bool = False
    any_min_keep: bool = False  # some row has min_keep > 1
    any_mirostat: bool = False
    any_penalty: bool = False  # repetition / frequency / presence on some row
    any_logprobs: bool = False
    any_eos_rule: bool = False  # some row bans EOS (min_tokens > 0 or ignore_eos)
    any_mirostat_v1: bool = False  # some row uses Mirostat v1 (mirostat_mode == 1)
    any_mirostat_v2: bool = False  # some row uses Mirostat v2 (mirostat_mode == 2)
    # (any_min_p covers every threshold of the min-p stage: min-p, epsilon, top-n-sigma)
    any_eta: bool = False  # some row uses eta_cutoff (rule 5, over the survivors after typical-p)
    any_nsigma: bool = False  # some row uses top_n_sigma (the mean and standard deviation of the finite z)
    any_xtc: bool = False  # some row may apply XTC (F_XTC_P > 0)
    any_dynatemp: bool = False  # some row uses dynamic temperature (F_DYN_RANGE > 0)
    any_dry: bool = False  # some row has DRY penalties (PackedBatch.dry_ids / dry_vals)

    @property
    def any_truncation(self) -> bool:
        return (self.any_top_k or self.any_top_p or self.any_min_p or self.any_typical or self.any_mirostat
                or self.any_eta or self.any_xtc)


FLAG_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BatchFlags))
ALL_GREEDY_BIT = 1 << FLAG_NAMES.index("all_greedy")
_FLAGS_OF_BITS: dict[int, BatchFlags] = {}


def flags_to_int(flags: BatchFlags) -> int:
    """Encode `BatchFlags` as an int, bit ``i`` = the ``i``-th field (declaration order)."""
    return sum(1 << i for i, name in enumerate(FLAG_NAMES) if getattr(flags, name))


def int_to_flags(bits: int) -> BatchFlags:
    """Inverse of `flags_to_int` (the instances are cached: `BatchFlags` is frozen)."""
    flags = _FLAGS_OF_BITS.get(bits)
    if flags is None:
        flags = BatchFlags(**{name: bool((bits >> i) & 1) for i, name in enumerate(FLAG_NAMES)})
        if 0 <= bits < 1 << len(FLAG_NAMES):
            _FLAGS_OF_BITS[bits] = flags
    return flags


def combine_bits(bits: Sequence[int]) -> int:
    """The flag bits of a batch from its rows' bits: every flag is an OR over rows, except ``all_greedy`` (an AND,
    and False for an empty batch). The one place where per-request flags become a batch's."""
    bor, band = 0, -1
    for x in bits:
        bor |= x
        band &= x
    return (bor & ~ALL_GREEDY_BIT) | (band & ALL_GREEDY_BIT if bits else 0)


# the numbers the C++ extension exports as ``_C.LAYOUT`` and must agree on
EXTENSION_KEYS: tuple[str, ...] = (
    "F_TEMPERATURE", "F_TOP_P", "F_MIN_P", "F_TYPICAL_P", "F_FREQ", "F_PRES", "F_REP", "F_MIRO_TAU", "F_MIRO_ETA",
    "F_EPSILON", "F_ETA", "F_NSIGMA", "F_XTC_P", "F_XTC_T", "F_DYN_RANGE", "F_DYN_EXP", "NF", "I_TOP_K", "I_MIN_KEEP",
    "I_MIRO_MODE", "I_MIN_TOKENS", "I_IGNORE_EOS", "I_LOGPROBS", "I_TOP_LOGPROBS", "I_LOGPROBS_MODE", "NI",
    "MODE_RAW", "MODE_PROCESSED", "MODE_FINAL", "TILE", "MIROSTAT_M", "MAX_TOP_LOGPROBS", "COUNT_MAX", "STREAM_XTC",
)


def check_extension_layout(exported: Mapping[str, int]) -> None:
    """Raise ``ImportError`` unless ``exported`` (an extension's ``LAYOUT``) has exactly the numbers of this module for
    every name in `EXTENSION_KEYS`: a backend built against another layout would read the wrong columns and sample
    wrong tokens without an error."""
    here = globals()
    wrong = [f"{k}: extension {exported.get(k, 'missing')}, Python {here[k]}" for k in EXTENSION_KEYS
             if exported.get(k) != here[k]]
    if wrong:
        raise ImportError("the C++ extension was built against another batch layout (" + "; ".join(wrong)
                          + "); rebuild it: pip install --no-build-isolation -e .")
