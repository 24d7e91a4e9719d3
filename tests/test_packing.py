"""Packing a batch: layout of the packed tensors and the errors for bad input (named row, id, argument)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams
from fastsampler._batch import (
    bitmask_to_bool,
    ids_to_bitmask,
    pack_batch,
    seed_to_int64,
)
from fastsampler.layout import F_REP, F_TEMPERATURE, I_LOGPROBS_MODE, I_TOP_K


def test_bitmask_layout_round_trip() -> None:
    m = ids_to_bitmask([[0, 31, 32, 69], [], None], 70)
    assert m.dtype == np.int32 and m.shape == (3, 3)
    assert m[0].view(np.uint32).tolist() == [1 | (1 << 31), 1, 1 << 5]
    b = bitmask_to_bool(m, 70)
    assert np.nonzero(b[0])[0].tolist() == [0, 31, 32, 69] and not b[1:].any()


def test_packed_params_and_state() -> None:
    x = torch.zeros(2, 40)
    ps = [SamplingParams(temperature=0.5, top_k=3, seed=2**64 - 1, logprobs=True, logprobs_mode="final"),
          SamplingParams(repetition_penalty=1.5, seed=5, logit_bias={7: 1.0, 3: -2.0}, banned_token_ids=[1])]
    b = pack_batch(x, ps, output_token_ids=[[1, 1, 2], []], prompt_token_ids=[[4], [39]], steps=[3, 4],
                   eos_token_ids=[0])
    assert b.fparams[0, F_TEMPERATURE] == 0.5 and b.fparams[1, F_REP] == 1.5
    assert b.iparams[0, I_TOP_K] == 3 and b.iparams[0, I_LOGPROBS_MODE] == 2
    assert b.seeds.tolist() == [seed_to_int64(2**64 - 1), 5] == [-1, 5]
    assert b.output_counts[0, :3].tolist() == [0, 2, 1]
    assert bitmask_to_bool(b.prompt_mask.numpy(), 40)[1, 39]
    assert b.bias_indptr.tolist() == [0, 0, 2] and b.bias_ids.tolist() == [3, 7]
    allowed = bitmask_to_bool(b.allowed_mask.numpy(), 40)
    assert allowed[0].all() and not allowed[1, 1] and allowed[1, [0, 2]].all()
    assert b.flags.any_top_k and b.flags.any_penalty and not b.flags.any_mirostat and b.n_top == 0


def test_token_bitmask_is_anded_with_params_mask() -> None:
    x = torch.zeros(1, 64)
    tb = torch.from_numpy(ids_to_bitmask([[1, 2, 3]], 64))
    b = pack_batch(x, SamplingParams(banned_token_ids=[2]), token_bitmask=tb)
    assert np.nonzero(bitmask_to_bool(b.allowed_mask.numpy(), 64)[0])[0].tolist() == [1, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": SamplingParams(allowed_token_ids=[3, 12])}, "allowed_token_ids of row 0 holds token id 12"),
        ({"params": SamplingParams(banned_token_ids=[10])}, "banned_token_ids of row 0 holds token id 10"),
        ({"params": SamplingParams(logit_bias={11: 1.0})}, "logit_bias of row 0 holds token id 11"),
        ({"prompt_token_ids": [[1], [10]]}, "prompt_token_ids of row 1 holds token id 10"),
        ({"output_token_ids": [[-1], []]}, "output_token_ids of row 0 holds token id -1"),
        ({"output_token_ids": [[1]]}, "output_token_ids must hold batch_size=2 sequences, got 1"),
        ({"eos_token_ids": [10]}, "eos_token_ids holds token id 10"),
        ({"vocab_size": 11}, r"vocab_size must be an integer in \[1, 10\]"),
        ({"steps": [1, 2, 3]}, r"steps must have shape \(2,\)"),
        ({"token_bitmask": torch.zeros(2, 1, dtype=torch.int64)}, "token_bitmask must be int32"),
        ({"prompt_mask": torch.zeros(2, 2, dtype=torch.int32)}, r"prompt_mask must be int32 of shape \(2, 1\)"),
        ({"output_counts": torch.zeros(2, 10, dtype=torch.float32)}, "output_counts must be int16 or int32"),
        ({"params": [SamplingParams()]}, "params must be one SamplingParams or a sequence of batch_size=2"),
    ],
)
def test_packing_errors_name_the_argument(kwargs: dict, match: str) -> None:
    kw = {"params": SamplingParams()} | kwargs
    params = kw.pop("params")
    with pytest.raises(ValueError, match=match):
        fastsampler.sample(torch.zeros(2, 10), params, backend="reference", **kw)


def test_bad_logits_and_backend() -> None:
    with pytest.raises(ValueError, match="logits must be 2-D"):
        fastsampler.sample(torch.zeros(10), SamplingParams())
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64"):
        fastsampler.sample(torch.zeros(2, 10, dtype=torch.int32), SamplingParams())
    with pytest.raises(ValueError, match="backend must be one of"):
        fastsampler.sample(torch.zeros(2, 10), SamplingParams(), backend="gpu")
    with pytest.raises(TypeError, match=r"params\[1\] must be a SamplingParams"):
        fastsampler.sample(torch.zeros(2, 10), [SamplingParams(), {"top_k": 3}])


def test_numpy_in_numpy_out() -> None:
    out = fastsampler.sample(np.array([[0.0, 1.0]], dtype=np.float32), SamplingParams(temperature=0.0))
    assert isinstance(out.tokens, np.ndarray) and out.tokens.tolist() == [1]
    probs = fastsampler.sampling_probs(np.array([[0.0, 0.0]], dtype=np.float32), SamplingParams())
    assert isinstance(probs, np.ndarray) and probs.tolist() == [[0.5, 0.5]]


def test_unavailable_backend_raises_with_install_command_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # an import that fails (as without triton / without the built extension): sys.modules entry None -> ImportError
    monkeypatch.setitem(__import__("sys").modules, "fastsampler.backends.triton.backend", None)
    monkeypatch.setitem(__import__("sys").modules, "fastsampler.backends.cpu", None)
    x = torch.tensor([[0.0, 3.0, 1.0]])
    with pytest.raises(ImportError, match=r"backend='triton' is unavailable .*pip install"):
        fastsampler.sample(x, SamplingParams(temperature=0.0), backend="triton")
    with pytest.raises(ImportError, match=r"backend='cpu' is unavailable .*pip install"):
        fastsampler.sample(x, SamplingParams(temperature=0.0), backend="cpu")
    assert fastsampler.available_backends() == ["reference"]
    assert fastsampler.sample(x, SamplingParams(temperature=0.0)).tokens.tolist() == [1]  # auto: silent fallback


# ------------------------------------------------------------------------------------------------- host overhead
def _mixed_params() -> list[SamplingParams]:
    return [SamplingParams(seed=1, top_k=4, logit_bias={3: 1.0, 9: -2.0}, repetition_penalty=1.3),
            SamplingParams(seed=None, temperature=0.0, banned_token_ids=[2], logprobs=True, top_logprobs=3),
            SamplingParams(seed=7, mirostat_mode=2, allowed_token_ids=range(5, 30), frequency_penalty=0.5)]


def _fields(batch) -> list:
    names = ["fparams", "iparams", "steps", "seqs", "mirostat_mu", "allowed_mask", "prompt_mask", "output_counts",
             "bias_indptr", "bias_ids", "bias_vals", "eos_ids"]
    out = []
    for n in names:
        v = getattr(batch, n)
        out.append(None if v is None else np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v))
    return out


@pytest.mark.parametrize("state", ["lists", "tensors"])
def test_pack_host_matches_pack_batch(state: str) -> None:
    """`pack_host` (numpy, for the C++ backend) packs exactly what `pack_batch` does, flags and N included."""
    from fastsampler._batch import pack_host

    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ps = _mixed_params()
    kw: dict = {"eos_token_ids": [0, 1], "token_bitmask": torch.from_numpy(ids_to_bitmask([range(40)] * 3, 40))}
    if state == "lists":
        kw.update(prompt_token_ids=[[4], [], [5, 6]], output_token_ids=[[1, 1], [2], []], steps=[3, 4, 5])
    else:
        kw.update(prompt_mask=torch.from_numpy(ids_to_bitmask([[4], [], [5, 6]], 40)),
                  output_counts=torch.ones(3, 40, dtype=torch.int16), steps=torch.tensor([3, 4, 5]),
                  mirostat_mu=torch.full((3,), 6.0), seeds=torch.tensor([1, 2, 3]))
    a, h = pack_batch(x, ps, **kw), pack_host(x, ps, **kw)
    assert a.flags == h.flags and a.n_top == h.n_top == 3 and a.vocab_size == h.vocab_size
    for u, w in zip(_fields(a), _fields(h), strict=True):
        assert (u is None and w is None) or np.array_equal(u, w, equal_nan=True)
    if state == "tensors":
        assert h.seeds.tolist() == [1, 2, 3]
    else:  # a params seed of None draws a fresh seed per call; fixed seeds are kept
        assert h.seeds[0] == 1 and h.seeds[2] == 7
    with pytest.raises(ValueError, match="pack_host packs CPU logits"):
        pack_host(torch.zeros(1, 4, device="meta"), SamplingParams())


def test_param_cache_hands_out_copies_and_follows_the_objects() -> None:
    """Packed rows come from a per-params cache: a caller writing into one batch never changes the next one, and
    equal-looking lists of other objects, other lengths and single params all pack their own rows."""
    x = torch.zeros(3, 40)
    ps = _mixed_params()
    b1 = pack_batch(x, ps)
    b1.fparams.fill_(-1.0)
    b1.seeds.fill_(0)
    b2 = pack_batch(x, ps)
    assert b2.fparams[0, F_TEMPERATURE] == 1.0 and b2.seeds[0] == 1 and b2.seeds[2] == 7
    assert b2.fparams.numpy().flags.writeable
    ps2 = [ps[0].replace(top_k=9), *ps[1:]]
    assert pack_batch(x, ps2).iparams[0, I_TOP_K] == 9
    with pytest.raises(ValueError, match="params must be one SamplingParams or a sequence of batch_size=2"):
        pack_batch(x[:2], ps)
    one = pack_batch(x, ps[0])
    assert one.iparams[:, I_TOP_K].tolist() == [4, 4, 4] and one.bias_indptr.tolist() == [0, 2, 4, 6]
    assert pack_batch(x[:1], ps[0]).bias_indptr.tolist() == [0, 2]
    assert pack_batch(x, iter(ps)).iparams[:, I_TOP_K].tolist() == [4, -1, -1]  # an iterator is read once


def test_param_ids_outside_the_vocabulary_name_the_row_every_time() -> None:
    """The cached id bound (``max_id``) sends a batch with an out-of-vocabulary id to the per-row checks."""
    p = SamplingParams(logit_bias={50: 1.0})
    for _ in range(2):
        with pytest.raises(ValueError, match=r"logit_bias of row 1 holds token id 50, outside the vocabulary"):
            pack_batch(torch.zeros(2, 40), [SamplingParams(), p])
    assert pack_batch(torch.zeros(2, 60), [SamplingParams(), p]).bias_ids.tolist() == [50]


def test_cpu_packing_makes_no_copies() -> None:
    """On the CPU, host arrays become tensors sharing their memory, and tensor state is used as it is."""
    from fastsampler._batch import to_device

    arr = np.arange(6, dtype=np.int64)
    assert np.shares_memory(to_device(arr, torch.device("cpu")).numpy(), arr)
    x = torch.zeros(2, 40)
    counts = torch.zeros(2, 40, dtype=torch.int16)
    prompt = torch.zeros(2, 2, dtype=torch.int32)
    steps = torch.tensor([1, 2])
    b = pack_batch(x, SamplingParams(frequency_penalty=0.5), output_counts=counts, prompt_mask=prompt, steps=steps)
    for got, given in ((b.output_counts, counts), (b.prompt_mask, prompt), (b.steps, steps), (b.logits, x)):
        assert got.data_ptr() == given.data_ptr()


def test_backend_resolution_is_cached_but_follows_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastsampler import _api

    x = torch.tensor([[0.0, 3.0, 1.0]])
    first = _api._backend_of("auto", x.device, x.dtype)
    assert _api._backend_of("auto", x.device, x.dtype) == first
    monkeypatch.setitem(__import__("sys").modules, "fastsampler.backends.cpu", None)
    assert _api._backend_of("auto", x.device, x.dtype)[0] == "reference"


def test_cpu_threads_for_small_batches() -> None:
    from fastsampler.backends import cpu

    if not cpu.is_available()[0]:
        pytest.skip("the C++ backend is unavailable")
    assert cpu.threads_for(8, 1024) == 1 and cpu.threads_for(1, 1 << 20) == 1
    try:
        cpu.set_num_threads(2)
        assert cpu.threads_for(64, 4096) == 2
        cpu.set_num_threads(1)
        assert cpu.threads_for(64, 4096) == 1
    finally:
        cpu.set_num_threads(0)
    assert cpu.threads_for(64, 4096) == cpu.get_num_threads()
