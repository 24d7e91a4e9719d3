"""`fastsampler.compat.flashinfer`: FlashInfer's documented sampling semantics (names and argument order, per-row
scalar or tensor parameters, ``indices``, ``seed`` / ``offset``, renorm sums, mask values), tokens equal to the
reference under the documented seed mapping, and frequency tests against the expected renormalised distribution."""

from __future__ import annotations

import functools
import inspect
import pathlib
import re

import numpy as np
import pytest
import torch

from fastsampler import SamplingParams, reference
from fastsampler.compat import flashinfer as fi
from tests.backend_checks import interpreted, unavailable

F32 = torch.float32
# the Triton interpreter evaluates log(0) of masked ids in numpy, which warns; nothing is wrong
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

# FlashInfer 0.6.18's positional parameters, in order (what an engine may pass positionally)
SIGNATURES = {
    "sampling_from_logits": ["logits", "indices", "deterministic", "generator", "check_nan", "seed", "offset"],
    "sampling_from_probs": ["probs", "indices", "deterministic", "generator", "check_nan", "seed", "offset",
                            "return_valid"],
    "top_p_sampling_from_probs": ["probs", "top_p", "indices", "deterministic", "generator", "check_nan", "seed",
                                  "offset", "return_valid"],
    "top_k_sampling_from_probs": ["probs", "top_k", "indices", "deterministic", "generator", "check_nan", "seed",
                                  "offset", "return_valid"],
    "min_p_sampling_from_probs": ["probs", "min_p", "indices", "deterministic", "generator", "check_nan", "seed",
                                  "offset", "return_valid"],
    "top_k_top_p_sampling_from_logits": ["logits", "top_k", "top_p", "indices", "filter_apply_order",
                                         "deterministic", "generator", "check_nan", "seed", "offset"],
    "top_k_top_p_sampling_from_probs": ["probs", "top_k", "top_p", "indices", "filter_apply_order", "deterministic",
                                        "generator", "check_nan", "seed", "offset", "return_valid"],
    "top_p_renorm_probs": ["probs", "top_p", "is_deterministic"],
    "top_k_renorm_probs": ["probs", "top_k"],
    "top_k_mask_logits": ["logits", "top_k"],
    "softmax": ["logits", "temperature", "enable_pdl"],
}


def _logits(b: int, v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32))


def _mapped(seed: int, offset: int, n: int) -> dict:
    """The documented mapping of (seed, offset) to the reference's per-row (seeds, steps, seqs)."""
    return {"seeds": np.full(n, (seed ^ (offset >> 32)) % 2**64, dtype=np.uint64),
            "steps": np.full(n, offset & 0xFFFFFFFF, dtype=np.int64), "seqs": np.arange(n)}


def _assert_tokens(got: torch.Tensor, x: np.ndarray, params, rng: dict) -> None:
    """``got`` equals the reference's tokens on every row not at a near-tie (and those are few)."""
    d = reference.diagnose(x, params, **rng)
    want = d["output"].tokens
    ok = ~d["near_tie"]
    bad = np.flatnonzero((got.cpu().numpy() != want) & ok)
    assert bad.size == 0, f"{bad.size} mismatch(es) at rows {bad[:8].tolist()}: got {got[bad[:8]].tolist()}, " \
                          f"want {want[bad[:8]].tolist()}"
    assert ok.mean() > 0.9, d["reasons"]


BACKENDS = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(bool(unavailable("cpu")), reason=unavailable("cpu"))),
    pytest.param("triton", id="triton", marks=[pytest.mark.interpreter,
                                               pytest.mark.skipif(bool(unavailable("triton")),
                                                                  reason=unavailable("triton"))]),
]


def _dev(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------- the API
@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_follows_flashinfer(name: str) -> None:
    sig = inspect.signature(getattr(fi, name))
    positional = [p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == SIGNATURES[name]
    extra = [p.name for p in sig.parameters.values() if p.kind is not p.POSITIONAL_OR_KEYWORD]
    assert extra == ["backend"]  # ours, keyword-only


def test_compat_doc_example_runs() -> None:
    """docs/compat.md's example runs as written."""
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "compat.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(doc), "exec"), {})


def test_aliases_and_version() -> None:
    assert fi.top_k_renorm_prob is fi.top_k_renorm_probs and fi.top_p_renorm_prob is fi.top_p_renorm_probs
    assert fi.FLASHINFER_VERSION == "0.6.18"
    assert set(SIGNATURES) <= set(fi.__all__)


# ------------------------------------------------------------------------------------- tokens equal the reference
CASES = {  # name -> (function, positional parameters, from probs, the reference's params)
    "logits": (fi.sampling_from_logits, (), False, SamplingParams()),
    "probs": (fi.sampling_from_probs, (), True, SamplingParams()),
    "top_p": (fi.top_p_sampling_from_probs, (0.7,), True, SamplingParams(top_p=0.7)),
    "top_k": (fi.top_k_sampling_from_probs, (5,), True, SamplingParams(top_k=5)),
    "min_p": (fi.min_p_sampling_from_probs, (0.2,), True, SamplingParams(min_p=0.2)),
    "top_k_top_p_logits": (fi.top_k_top_p_sampling_from_logits, (8, 0.6), False, SamplingParams(top_k=8, top_p=0.6)),
    "top_k_top_p_probs": (fi.top_k_top_p_sampling_from_probs, (8, 0.6), True, SamplingParams(top_k=8, top_p=0.6)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_tokens_equal_reference(case: str, backend: str) -> None:
    fn, args, from_probs, params = CASES[case]
    b, v = (4, 40) if interpreted(backend) else (64, 300)
    x = _logits(b, v, seed=11)
    inp = x.softmax(-1) if from_probs else x
    ref_x = torch.log(inp).numpy() if from_probs else x.numpy()  # the pipeline of *_from_probs: log(p)
    for seed, offset in ((5, 0), (2**64 - 3, (7 << 32) + 9))[: 1 if interpreted(backend) else 2]:
        got = fn(inp.to(_dev(backend)), *args, seed=seed, offset=offset, backend=backend)
        assert got.dtype == torch.int32 and got.shape == (b,)
        _assert_tokens(got, ref_x, params, _mapped(seed, offset, b))


def test_backends_agree_on_cpu_tensors() -> None:
    """The same seed gives the same tokens on the C++ backend and the reference (Triton: `test_tokens_equal_reference`,
    and the CUDA test below)."""
    x = _logits(16, 100, seed=3)
    runs = ["cpu", "reference"]
    got = {b: fi.top_k_top_p_sampling_from_logits(x.to(_dev(b)), 20, 0.9, seed=1, offset=2, backend=b).cpu()
           for b in runs}
    d = reference.diagnose(x.numpy(), SamplingParams(top_k=20, top_p=0.9), **_mapped(1, 2, 16))
    ok = torch.from_numpy(~d["near_tie"])
    for b in runs:
        assert torch.equal(got[b][ok], got["cpu"][ok]), b


@pytest.mark.interpreter
@pytest.mark.skipif(bool(unavailable("triton")), reason=unavailable("triton") or "-")
def test_renorm_mask_softmax_on_triton_equal_cpu() -> None:
    """The kept-set functions on the Triton backend (its kept-mask and probability kernels) give the C++ results."""
    dev = _dev("triton")
    x = _logits(3, 40, seed=12)
    x[1, :4] = x[1].max()  # a tie at the top
    p = x.softmax(-1)
    k, top_p = torch.tensor([3, 1, 0]), torch.tensor([0.5, 0.3, 1.0])
    for fn, inp, arg in ((fi.top_k_renorm_probs, p, k), (fi.top_p_renorm_probs, p, top_p),
                         (fi.top_k_mask_logits, x, k), (fi.softmax, x, torch.tensor([0.5, 0.0, 2.0]))):
        got = fn(inp.to(dev), arg.to(dev), backend="triton").cpu()
        torch.testing.assert_close(got, fn(inp, arg, backend="cpu"), atol=1e-6, rtol=1e-5, msg=fn.__name__)
    got = fi.top_k_top_p_sampling_from_probs(p.to(dev), k.to(dev), top_p.to(dev), filter_apply_order="joint",
                                             seed=3, offset=5, backend="triton").cpu()
    assert torch.equal(got, fi.top_k_top_p_sampling_from_probs(p, k, top_p, filter_apply_order="joint", seed=3,
                                                               offset=5, backend="cpu"))


def test_joint_order_is_the_intersection() -> None:
    """``joint``: top-k and top-p both measured on the whole row; the reference draws from their intersection."""
    x = _logits(48, 64, seed=5)
    k, p = 10, 0.5
    got = fi.top_k_top_p_sampling_from_logits(x, k, p, filter_apply_order="joint", seed=4, offset=1)
    kept = (_kept_top_k(x.softmax(-1).double().numpy(), k) & _kept_top_p(x.softmax(-1).double().numpy(), p))
    masked = np.where(kept, x.numpy(), -np.inf)
    _assert_tokens(got, masked, SamplingParams(), _mapped(4, 1, 48))
    first = fi.top_k_top_p_sampling_from_logits(x, k, p, seed=4, offset=1)  # top_k_first: top-p over the top k
    _assert_tokens(first, x.numpy(), SamplingParams(top_k=k, top_p=p), _mapped(4, 1, 48))


# ------------------------------------------------------------------------------- per-row parameters and indices
PARAM_CASES = {  # function, name of the per-row argument, scalar, (B,) values for the per-row test
    "top_p": (fi.top_p_sampling_from_probs, 0.6, [0.1, 0.5, 0.9, 1.0]),
    "top_k": (fi.top_k_sampling_from_probs, 7, [1, 3, 0, 50]),
    "min_p": (fi.min_p_sampling_from_probs, 0.3, [0.0, 0.05, 0.5, 1.0]),
}


@pytest.mark.parametrize("which", sorted(PARAM_CASES))
def test_scalar_and_tensor_parameters_agree(which: str) -> None:
    fn, scalar, values = PARAM_CASES[which]
    probs = _logits(32, 80, seed=2).softmax(-1)
    dtype = torch.int64 if which == "top_k" else F32
    a = fn(probs, scalar, seed=9, offset=3)
    b = fn(probs, torch.full((32,), scalar, dtype=dtype), seed=9, offset=3)
    assert torch.equal(a, b)
    np_scalar = np.int64(scalar) if which == "top_k" else np.float32(scalar)  # numpy scalars are scalars too
    assert torch.equal(a, fn(probs, np_scalar, seed=np.uint64(9), offset=np.int32(3)))
    # per-row values: each row as the reference draws it with that row's own params
    col = torch.tensor(values * 8, dtype=dtype)
    got = fn(probs, col, seed=9, offset=3)
    params = [SamplingParams(**{which: v if v or which != "top_k" else -1}) for v in col.tolist()]
    _assert_tokens(got, torch.log(probs).numpy(), params, _mapped(9, 3, 32))


def test_scalar_and_tensor_parameters_agree_renorm_mask_softmax() -> None:
    x = _logits(12, 50, seed=8)
    p = x.softmax(-1)
    assert torch.equal(fi.top_k_renorm_probs(p, 6), fi.top_k_renorm_probs(p, torch.full((12,), 6, dtype=torch.int32)))
    assert torch.equal(fi.top_p_renorm_probs(p, 0.4), fi.top_p_renorm_probs(p, torch.full((12,), 0.4)))
    assert torch.equal(fi.top_k_mask_logits(x, 6), fi.top_k_mask_logits(x, torch.full((12,), 6)))
    assert torch.equal(fi.softmax(x, 0.7), fi.softmax(x, torch.full((12,), 0.7)))
    assert torch.equal(fi.top_k_top_p_sampling_from_logits(x, 6, 0.4, seed=1, offset=1),
                       fi.top_k_top_p_sampling_from_logits(x, torch.full((12,), 6), torch.full((12,), 0.4), seed=1,
                                                           offset=1))


@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_indices_map_output_rows_to_input_rows(idtype: torch.dtype) -> None:
    x = _logits(3, 60, seed=4)
    idx = torch.tensor([2, 0, 0, 1, 2, 2], dtype=idtype)
    for fn, args, inp in ((fi.sampling_from_logits, (), x), (fi.top_p_sampling_from_probs, (0.8,), x.softmax(-1)),
                          (fi.top_k_top_p_sampling_from_logits, (torch.tensor([5, 5, 1, 5, 5, 60]), 0.9), x)):
        got = fn(inp, *args, indices=idx, seed=6, offset=0)
        assert got.dtype == idtype and got.shape == (6,)
        assert torch.equal(got, fn(inp[idx.long()], *args, seed=6, offset=0).to(idtype))  # gathered rows, same draw
    # a row with top_k = 1 takes the argmax of its input row
    got = fi.top_k_sampling_from_probs(x.softmax(-1), torch.tensor([1, 1, 1, 1, 1, 1]), indices=idx, seed=1, offset=0)
    assert torch.equal(got.long(), x.argmax(-1)[idx.long()])
    # several samples of one prompt are independent draws (distinct seq per output row)
    many = fi.sampling_from_logits(torch.zeros(1, 1000), indices=torch.zeros(64, dtype=idtype), seed=3, offset=0)
    assert many.unique().numel() > 55


# ----------------------------------------------------------------------------------------------- seeds and offsets
def test_seed_offset_reproducible_and_distinct() -> None:
    p = _logits(256, 500, seed=1, scale=0.5).softmax(-1)
    a = fi.sampling_from_probs(p, seed=12345, offset=0)
    assert torch.equal(a, fi.sampling_from_probs(p, seed=12345, offset=0))
    for seed, offset in ((67890, 0), (12345, 4), (12345, 1 << 32)):
        assert (fi.sampling_from_probs(p, seed=seed, offset=offset) == a).float().mean() < 0.2
    # int64 / uint64 tensors of length 1 or batch_size mean the same as the ints
    s64 = torch.tensor([12345])
    assert torch.equal(a, fi.sampling_from_probs(p, seed=s64, offset=torch.tensor([0])))
    assert torch.equal(a, fi.sampling_from_probs(p, seed=s64.expand(256).clone(), offset=torch.zeros(256).long()))
    big = 2**64 - 5
    want = fi.sampling_from_probs(p, seed=big, offset=7)
    assert torch.equal(want, fi.sampling_from_probs(p, seed=big - 2**64, offset=7))  # the int64 bit pattern
    assert torch.equal(want, fi.sampling_from_probs(p, seed=torch.tensor([big], dtype=torch.uint64),
                                                    offset=torch.tensor([7], dtype=torch.uint64)))
    # per-row tensors: row i with (seed_i, offset_i) as the reference draws it
    seeds = torch.arange(256) * 1000003
    offs = torch.arange(256) << 30
    got = fi.sampling_from_probs(p, seed=seeds, offset=offs)
    rng = {"seeds": (seeds ^ (offs >> 32)).numpy().astype(np.uint64), "steps": (offs & 0xFFFFFFFF).numpy(),
           "seqs": np.arange(256)}
    _assert_tokens(got, torch.log(p).numpy(), SamplingParams(), rng)


def test_generator_and_default_generator() -> None:
    x = _logits(64, 300, seed=6, scale=0.3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = fi.sampling_from_logits(x, generator=g1)
    assert torch.equal(a, fi.sampling_from_logits(x, generator=g2))
    assert (fi.sampling_from_logits(x, generator=g1) == a).float().mean() < 0.2  # the generator advanced
    torch.manual_seed(7)
    b = fi.top_p_sampling_from_probs(x.softmax(-1), 0.9)
    torch.manual_seed(7)
    assert torch.equal(b, fi.top_p_sampling_from_probs(x.softmax(-1), 0.9))
    # the generator gives each output row a 64-bit seed, with step 0 and seq = row
    g3 = torch.Generator().manual_seed(5)
    seeds = torch.empty(64, dtype=torch.int64).random_(-(1 << 63), None, generator=g3)
    rng = {"seeds": seeds.numpy().astype(np.uint64), "steps": np.zeros(64, dtype=np.int64), "seqs": np.arange(64)}
    _assert_tokens(a, x.numpy(), SamplingParams(), rng)


# ---------------------------------------------------------------------------------------------- renorm and mask
def _kept_top_k(p: np.ndarray, k: int) -> np.ndarray:
    kth = -np.sort(-p, axis=-1)[:, min(k, p.shape[1]) - 1: min(k, p.shape[1])]
    return p >= kth


def _kept_top_p(p: np.ndarray, top_p: float, tol: float = 0.0) -> np.ndarray:
    """Tokens whose mass strictly above them (in value order) is below ``top_p``, plus their ties; with ``tol`` the
    rows where that cut is within ``tol`` of flipping are returned as None instead."""
    q = p / p.sum(axis=-1, keepdims=True)
    if top_p >= 1:
        return q > 0
    order = np.argsort(-q, axis=-1, kind="stable")
    qs = np.take_along_axis(q, order, axis=-1)
    before = np.cumsum(qs, axis=-1) - qs
    cut = (before < np.float32(top_p)).sum(axis=-1) - 1  # last kept position
    boundary = qs[np.arange(len(q)), cut]
    if tol and np.any(np.abs(before - np.float32(top_p)).min(axis=-1) < tol):
        return None
    return q >= boundary[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 10, 64, 0, 300])
def test_top_k_renorm_probs(k: int, dtype: torch.dtype) -> None:
    p = _logits(40, 257, seed=k, scale=3.0).softmax(-1).to(dtype)  # V = 257: one past a power of two
    p[0, :5] = p[0].max()  # a tie at the top: all five kept for k = 1
    out = fi.top_k_renorm_probs(p, k)
    assert out.dtype == dtype and out.shape == p.shape
    pn = p.double().numpy()
    kept = _kept_top_k(pn, k) if 0 < k < 257 else np.ones_like(pn, dtype=bool)
    want = np.where(kept, pn, 0) / np.where(kept, pn, 0).sum(-1, keepdims=True)
    assert not np.any((out.float().numpy() > 0) & ~kept)
    # kept values are nonzero unless they underflow in the output dtype (tiny fp16 / bf16 probabilities)
    np.testing.assert_array_equal(out.float().numpy() > 0, torch.from_numpy(want).to(dtype).float().numpy() > 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(out.double().numpy(), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(out.double().sum(-1).numpy(), 1.0, atol=1e-5 if dtype == F32 else 2e-2)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
def test_top_p_renorm_probs(top_p: float) -> None:
    p = _logits(64, 333, seed=int(top_p * 10), scale=1.5).softmax(-1)
    out = fi.top_p_renorm_probs(p, top_p)
    kept = _kept_top_p(p.double().numpy(), top_p, tol=1e-5)
    assert kept is not None, "a row's cut is within float32 rounding of top_p: pick another seed"
    np.testing.assert_array_equal(out.numpy() > 0, kept)
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, atol=1e-5)
    want = np.where(kept, p.numpy(), 0) / np.where(kept, p.numpy(), 0).sum(-1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-7)
    # per-row top_p
    col = torch.linspace(0.1, 1.0, 64)
    out = fi.top_p_renorm_probs(p, col)
    for i in range(0, 64, 9):
        assert torch.equal(out[i], fi.top_p_renorm_probs(p[i:i + 1], float(col[i]))[0])


def test_renorm_ties_and_invalid_rows() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.4, 0.2, 0.2, 0.2], [float("nan"), 0.5, 0.5, 0.0], [0.0] * 4])
    out = fi.top_p_renorm_probs(p, 0.6)  # the boundary token's ties are kept
    assert out[0].tolist() == [0.5, 0.25, 0.25, 0.0] and out[1].tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert out[2:].eq(0).all()  # invalid rows: all zero
    out = fi.top_k_renorm_probs(p, 2)
    assert out[0].tolist() == [0.5, 0.25, 0.25, 0.0] and out[1].tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert out[2:].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_mask_logits(dtype: torch.dtype) -> None:
    x = _logits(30, 129, seed=3).to(dtype)
    x[1, 7:20] = float("-inf")
    x[2, :] = float("-inf")
    x[2, :3] = 1.0  # three finite, tied: k = 2 keeps all three
    k = torch.tensor([5, 100, 2] + [1, 17, 0, 129, 500, -1, 64] * 3 + [3, 3, 3, 3, 3, 3])
    out = fi.top_k_mask_logits(x, k)
    assert out.dtype == dtype and out.shape == x.shape
    xn = x.float().numpy()
    for i, ki in enumerate(k.tolist()):
        fin = np.sort(xn[i][np.isfinite(xn[i])])[::-1]
        kept = xn[i] >= fin[min(ki, fin.size) - 1] if 0 < ki < 129 else np.ones(129, dtype=bool)
        kept &= np.isfinite(xn[i]) | (ki <= 0) | (ki >= 129)
        got = out[i].float().numpy()
        np.testing.assert_array_equal(got[kept], xn[i][kept], err_msg=f"row {i} k {ki}")  # kept values unchanged
        assert np.all(got[~kept] == -np.inf), f"row {i} k {ki}"
    # softmax of the mask is top_k_renorm_probs of the softmax
    torch.testing.assert_close(torch.softmax(out[:, :].float(), -1), fi.top_k_renorm_probs(x.float().softmax(-1), k),
                               atol=1e-6, rtol=1e-5)


def test_softmax() -> None:
    x = _logits(8, 77, seed=2)
    torch.testing.assert_close(fi.softmax(x), torch.softmax(x, -1), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fi.softmax(x, 0.5, True), torch.softmax(x / 0.5, -1), atol=1e-7, rtol=1e-5)
    t = torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0, 3.0, 0.25, 1.0])
    out = fi.softmax(x.half(), t)
    assert out.dtype == F32
    want = torch.softmax(x.half().float() / t.clamp_min(1e-30)[:, None], -1)
    want[3] = torch.nn.functional.one_hot(x.half()[3].float().argmax(), 77).float()  # temperature 0: one-hot
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ invalid rows
def test_invalid_rows_give_token_zero_and_valid_false() -> None:
    p = _logits(6, 50, seed=1).softmax(-1)
    p[1] = float("nan")
    p[3] = 0.0
    p[4, 7] = -0.1  # a negative probability
    for fn, args in ((fi.sampling_from_probs, ()), (fi.top_k_sampling_from_probs, (5,)),
                     (fi.top_p_sampling_from_probs, (0.9,)), (fi.min_p_sampling_from_probs, (0.1,)),
                     (fi.top_k_top_p_sampling_from_probs, (5, 0.9))):
        tokens, valid = fn(p, *args, seed=1, offset=0, return_valid=True)
        assert valid.tolist() == [True, False, True, False, False, True]
        assert tokens[~valid].eq(0).all() and tokens.dtype == torch.int32
    x = torch.log(p)
    assert fi.sampling_from_logits(x, seed=1, offset=0)[1].item() == 0
    with pytest.raises(ValueError, match="probs contains NaN"):
        fi.sampling_from_probs(p, check_nan=True)
    with pytest.raises(ValueError, match="logits contains NaN"):
        fi.top_k_top_p_sampling_from_logits(x, 5, 0.9, check_nan=True)


# ---------------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument() -> None:
    p = torch.full((4, 10), 0.1)
    cases = [
        (lambda: fi.sampling_from_probs(p[0]), r"probs must be \(batch_size, vocab_size\), got shape \(10,\)"),
        (lambda: fi.sampling_from_logits(p.long()), "logits must be float32, float16, bfloat16 or float64"),
        (lambda: fi.sampling_from_logits(p.numpy()), "logits must be a torch.Tensor"),
        (lambda: fi.top_p_sampling_from_probs(p, 1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (lambda: fi.top_p_sampling_from_probs(p, 0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (lambda: fi.top_p_sampling_from_probs(p, torch.tensor([0.5, 0.5, 2.0, 0.5])), "top_p values must be in"),
        (lambda: fi.min_p_sampling_from_probs(p, -0.1), r"min_p must be in \[0, 1\]"),
        (lambda: fi.top_k_sampling_from_probs(p, 2.5), "top_k must be an int"),
        (lambda: fi.top_k_sampling_from_probs(p, torch.full((4,), 2.0)), "top_k must be a scalar or an integer"),
        (lambda: fi.top_k_renorm_probs(p, torch.full((4, 10), 2)), "top_k must be a scalar or a 1-D tensor"),
        (lambda: fi.top_p_renorm_probs(p, torch.tensor(0.5)), "top_p must be a scalar or a 1-D tensor"),
        (lambda: fi.top_p_renorm_probs(p, torch.tensor([0.5])), r"top_p must have one value per output row"),
        (lambda: fi.sampling_from_probs(p, seed=1), "seed and offset must be given together"),
        (lambda: fi.sampling_from_probs(p, seed=1, offset=torch.tensor([0])), "both be ints or both be tensors"),
        (lambda: fi.sampling_from_probs(p, seed=torch.tensor([1], dtype=torch.int32), offset=torch.tensor([0])),
         "seed tensor must be int64 or uint64"),
        (lambda: fi.sampling_from_probs(p, seed=torch.tensor([1, 2]), offset=torch.tensor([0])),
         "seed tensor must be 1-D of length 1 or 4"),
        (lambda: fi.sampling_from_probs(p, seed=2**64, offset=0), r"seed must be in \[-2\*\*63, 2\*\*64\)"),
        (lambda: fi.sampling_from_probs(p, seed=1.5, offset=0), "seed must be an int"),
        (lambda: fi.sampling_from_probs(p, indices=torch.tensor([0.0])), "indices must be an int32 or int64"),
        (lambda: fi.sampling_from_probs(p, indices=torch.tensor([0, 4])), r"indices must be in \[0, 4\)"),
        (lambda: fi.top_k_top_p_sampling_from_probs(p, 2, 0.5, filter_apply_order="top_p_first"),
         "filter_apply_order must be 'top_k_first' or 'joint'"),
        (lambda: fi.softmax(p, 0.0), r"temperature must be in \(0, inf\]"),
        (lambda: fi.softmax(p, float("inf")), "temperature must be finite"),
        (lambda: fi.softmax(p, torch.tensor([1.0, -1.0, 1.0, 1.0])), "temperature values must be in"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_empty_batch() -> None:
    p = torch.zeros(0, 5)
    assert fi.sampling_from_probs(p).shape == (0,)
    tokens, valid = fi.top_p_sampling_from_probs(p, 0.5, return_valid=True)
    assert tokens.shape == valid.shape == (0,)
    assert fi.top_k_renorm_probs(p, 2).shape == (0, 5) and fi.softmax(p).shape == (0, 5)


# ---------------------------------------------------------------------------------------------- frequency tests
def _distribution(kind: str, v: int) -> np.ndarray:
    g = np.random.default_rng(v + len(kind))
    if kind == "normal1":
        x = g.standard_normal(v)
    elif kind == "normal5":
        x = g.standard_normal(v) * 5
    else:  # gumbel: a nearly flat row with a few peaks
        x = g.gumbel(0.0, 0.1, v) + np.where(g.random(v) < 0.02, 3.0, 0.0)
    return x.astype(np.float32)


def _chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square goodness of fit, the cells of smallest expectation pooled until each expects 5 or more."""
    from scipy import stats

    order = np.argsort(expected)
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(counts[order], expected[order], strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    obs[-1] += acc_o
    exp[-1] += acc_e
    return float(stats.chisquare(obs, exp).pvalue) if len(exp) > 1 else 1.0


FREQ = {  # name -> (function, args, input from probs, expected kept set of the probabilities q)
    "probs": (fi.sampling_from_probs, (), True, lambda q: q > 0),
    "logits": (fi.sampling_from_logits, (), False, lambda q: q > 0),
    "top_p_0.1": (fi.top_p_sampling_from_probs, (0.1,), True, lambda q: _kept_top_p(q[None], 0.1, 1e-5)[0]),
    "top_p_0.5": (fi.top_p_sampling_from_probs, (0.5,), True, lambda q: _kept_top_p(q[None], 0.5, 1e-5)[0]),
    "top_p_0.9": (fi.top_p_sampling_from_probs, (0.9,), True, lambda q: _kept_top_p(q[None], 0.9, 1e-5)[0]),
    "top_k_10": (fi.top_k_sampling_from_probs, (10,), True, lambda q: _kept_top_k(q[None], 10)[0]),
    "top_k_100": (fi.top_k_sampling_from_probs, (100,), True, lambda q: _kept_top_k(q[None], 100)[0]),
    "min_p_0.05": (fi.min_p_sampling_from_probs, (0.05,), True, lambda q: q >= np.float32(0.05) * q.max()),
    "top_k_top_p": (fi.top_k_top_p_sampling_from_logits, (50, 0.8), False,
                    lambda q: _kept_top_p(np.where(_kept_top_k(q[None], 50), q, 0), 0.8, 1e-5)[0]),
    "joint": (functools.partial(fi.top_k_top_p_sampling_from_probs, filter_apply_order="joint"), (50, 0.8), True,
              lambda q: _kept_top_k(q[None], 50)[0] & _kept_top_p(q[None], 0.8, 1e-5)[0]),
}


@pytest.mark.parametrize(("case", "kind", "v"), [
    ("probs", "normal1", 1024), ("probs", "normal5", 111), ("logits", "gumbel", 1024),
    ("top_p_0.1", "normal1", 1024), ("top_p_0.5", "normal5", 1024), ("top_p_0.9", "gumbel", 111),
    ("top_k_10", "normal1", 1024), ("top_k_100", "gumbel", 1024), ("min_p_0.05", "normal1", 1024),
    ("top_k_top_p", "normal1", 1024), ("joint", "normal1", 1024),
])
def test_sampling_frequencies(case: str, kind: str, v: int, device: torch.device) -> None:
    """131072 draws of one row (``indices`` of zeros, 4 calls at different offsets) against the renormalised
    distribution FlashInfer documents: never a token outside the kept set, cosine similarity > 0.99 as the FlashInfer
    tests ask, and a chi-square goodness of fit (p > 1e-4; the draws are seeded, so the test is deterministic). On the
    C++ backend here, natively on Triton where CUDA is present."""
    fn, args, from_probs, kept_of = FREQ[case]
    x = _distribution(kind, v)
    if case == "probs":
        x[np.random.default_rng(1).permutation(v)[: v // 2]] = -np.inf  # half the vocabulary at probability 0
    q = np.exp(x.astype(np.float64) - x.max())
    q /= q.sum()
    kept = kept_of(q)
    assert kept is not None, "a cut within rounding of flipping: pick another distribution"
    expect = np.where(kept, q, 0.0)
    expect /= expect.sum()
    t = torch.from_numpy(x)[None]
    inp = (torch.softmax(t, -1) if from_probs else t).to(device)
    counts = np.zeros(v)
    chunk, calls = 32768, 4
    idx = torch.zeros(chunk, dtype=torch.int32, device=device)
    for c in range(calls):
        s = fn(inp, *args, indices=idx, seed=2024, offset=c << 32)
        counts += np.bincount(s.long().cpu().numpy(), minlength=v)
    assert counts[~kept].sum() == 0, f"{int(counts[~kept].sum())} draws outside the kept set"
    freq = counts / counts.sum()
    cos = float(freq @ expect / np.linalg.norm(freq) / np.linalg.norm(expect))
    assert cos > 0.99, cos
    pval = _chi_square_p(counts[kept], expect[kept] * counts.sum())
    assert pval > 1e-4, f"chi-square p = {pval:.3g} over {int(kept.sum())} kept tokens"


# ------------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_run_on_triton_and_match_the_cpu() -> None:
    """CUDA inputs (parameters, indices and seed / offset as device tensors, no host sync) give the CPU's tokens."""
    x = _logits(64, 5000, seed=7)
    dev = torch.device("cuda")
    idx = torch.arange(64).flip(0)
    k = torch.randint(0, 100, (64,))
    p = torch.rand(64) * 0.9 + 0.1
    seed, off = torch.arange(64) * 7919, torch.arange(64) << 31
    want = fi.top_k_top_p_sampling_from_logits(x, k, p, idx, seed=seed, offset=off)
    got = fi.top_k_top_p_sampling_from_logits(x.to(dev), k.to(dev), p.to(dev), idx.to(dev), seed=seed.to(dev),
                                              offset=off.to(dev))
    assert got.device.type == "cuda" and got.dtype == torch.int64
    assert (got.cpu() == want).float().mean() > 0.98  # equal except at float32 near-ties
    pr = x.softmax(-1)
    torch.testing.assert_close(fi.top_k_renorm_probs(pr.to(dev), k.to(dev)).cpu(), fi.top_k_renorm_probs(pr, k))
    torch.testing.assert_close(fi.top_p_renorm_probs(pr.to(dev), p.to(dev)).cpu(), fi.top_p_renorm_probs(pr, p),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fi.softmax(x.to(dev), 0.7).cpu(), fi.softmax(x, 0.7), atol=1e-6, rtol=1e-5)
    assert torch.equal(fi.top_k_mask_logits(x.to(dev), k.to(dev)).cpu(), fi.top_k_mask_logits(x, k))
    g = torch.Generator(device=dev).manual_seed(3)
    a = fi.sampling_from_logits(x.to(dev), generator=g)
    assert a.device.type == "cuda" and torch.equal(a, fi.sampling_from_logits(
        x.to(dev), generator=torch.Generator(device=dev).manual_seed(3)))
