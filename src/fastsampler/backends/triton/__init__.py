"""Triton kernels of the sampling pipeline (docs/semantics.md §3 and §7).

One file per stage: `philox` (counter-based noise), `penalties` (stages A–D: the processed logits ``z`` computed in
registers from the raw logits and the CSR logit bias), `stats` (the row passes: statistics, typical-p entropy, kept-set
weights, the token race per chunk), `select` (radix selects of exact value thresholds, one program per row),
`mirostat` (Mirostat v1's threshold), `draw` (the tile race and the step's outputs), `logprobs` (ranks and top-N),
`probs` (the kept distribution and mask) and `backend` (the host orchestration, the backend-module interface of
``fastsampler._api``).
"""
