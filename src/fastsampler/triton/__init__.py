"""Triton kernels of the sampling pipeline (docs/semantics.md §3 and §7).

One file per stage: `philox` (counter-based noise), `penalties` (stages A–D: the processed logits ``z`` computed in
registers from the raw logits), `stats` (row statistics and per-tile weights), `select` (radix select of exact value
thresholds), `draw` (the two-level exponential race), `logprobs` (top-N gather and ranks), `probs` (the kept
distribution) and `backend` (the host orchestration, the backend-module interface of ``fastsampler._api``).
"""
