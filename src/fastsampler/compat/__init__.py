"""Drop-in modules with the names, signatures and return conventions of other sampling libraries.

- `fastsampler.compat.flashinfer`: the functions of ``flashinfer.sampling`` (``sampling_from_logits``,
  ``top_k_top_p_sampling_from_probs``, ``top_p_renorm_probs``, ...) on fastsampler's backends, for engines that call
  them today (see ``docs/compat.md``).

Each module loads on first use (``import fastsampler.compat.flashinfer``); this package imports nothing itself.
"""
