"""Vocabulary-parallel sampling (`fastsampler.distributed`) on 2 and 4 gloo processes on the CPU: every rank returns
the same result, equal to `fastsampler.reference.sample` on the gathered logits except at the reference's near-ties
(`reference.diagnose`, reported), with bounded exchanges and no tensor of the vocabulary's size exchanged.

The processes start once per world size and run every case of the file (starting them dominates the time)."""

from __future__ import annotations

import math
import pathlib
import pickle
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, Phase, given, settings

from fastsampler import SamplingParams, distributed, reference
from fastsampler._batch import ids_to_bitmask
from fastsampler.layout import TILE

from .strategies import batches

WORLD_SIZES = (2, 4)


# ------------------------------------------------------------------------------------------------------- cases
def _hypothesis_batches(n: int) -> list[dict[str, Any]]:
    """``n`` random batches mixing every feature (tests/strategies.py), widths across several 4096-id tiles."""
    out: list[dict[str, Any]] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batches(5, [7, 111, 4100, 9000]))
    def collect(batch: dict[str, Any]) -> None:
        out.append(batch)

    collect()
    return out


def _case(logits: np.ndarray, params: Any, name: str, ragged: bool = False, **kw: Any) -> dict[str, Any]:
    return {"name": name, "logits": logits, "params": params, "ragged": ragged, "kw": kw}


def _cases() -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    cases = []
    for j, bt in enumerate(_hypothesis_batches(40)):
        logits, params = bt.pop("logits"), bt.pop("params")
        cases.append(_case(logits, params, f"hypothesis-{j}", ragged=bool(j % 2), **bt))
    v = 9001  # several tiles; the last shard is ragged or padded
    x = (rng.standard_normal((6, v)) * 3).astype(np.float32)
    lp = {"logprobs": True, "top_logprobs": 20}
    # top-N spanning shards: the best logits spread over the whole vocabulary, every mode
    spread = x.copy()
    spread[:, rng.choice(v, 40, replace=False)] += 12.0
    cases.append(_case(spread, [SamplingParams(seed=s, logprobs_mode=m, top_k=30, **lp) for s, m in
                                enumerate(["raw", "processed", "final", "raw", "processed", "final"])],
                       "top-N spanning shards", ragged=True, steps=np.arange(6)))
    # selections beyond the gathered top lists: large top-k and min_keep, top-p / typical over thousands of tokens,
    # Mirostat v1 with k above 100
    flat = (rng.standard_normal((6, v)) * 0.3).astype(np.float32)
    cases.append(_case(flat, [SamplingParams(seed=1, top_k=3000, **lp), SamplingParams(seed=2, top_p=0.9),
                              SamplingParams(seed=3, typical_p=0.5, min_keep=2),
                              SamplingParams(seed=4, min_p=0.9, min_keep=150),
                              SamplingParams(seed=5, mirostat_mode=1, mirostat_target=12.0),
                              SamplingParams(seed=6, mirostat_mode=2, mirostat_target=12.0, **lp)],
                       "large selections", steps=np.arange(6)))
    # the extended samplers on a wide row: XTC, epsilon, eta, top-n-sigma, dynamic temperature, DRY
    hist = [[int(t) for t in rng.choice([3, 4, 5, 8000, 8001], 12)] for _ in range(6)]
    cases.append(_case(x * 0.4, [SamplingParams(seed=1, xtc_probability=1.0, xtc_threshold=0.003, **lp),
                                 SamplingParams(seed=2, epsilon_cutoff=3e-4, min_keep=3),
                                 SamplingParams(seed=3, eta_cutoff=0.01, logprobs=True, logprobs_mode="final"),
                                 SamplingParams(seed=4, top_n_sigma=1.5, temperature=0.7),
                                 SamplingParams(seed=5, dynatemp_range=0.5, dynatemp_exponent=1.3, top_k=80, **lp),
                                 SamplingParams(seed=6, dry_multiplier=2.0, dry_base=2.0, dry_allowed_length=1,
                                                temperature=0.0, **lp)],
                       "extended samplers", ragged=True, output_token_ids=hist, steps=np.arange(6)))
    # a shard with every token masked (allowed ids in the first 100 only), and a shard whose logits are all -inf
    masked = x.copy()
    masked[1, 2000:] = -np.inf
    cases.append(_case(masked, [SamplingParams(seed=1, allowed_token_ids=list(range(100)), **lp),
                                SamplingParams(seed=2, top_p=0.8, **lp), SamplingParams(seed=3, top_k=5),
                                SamplingParams(temperature=0.0, banned_token_ids=list(range(50, v)), **lp),
                                SamplingParams(seed=4, min_p=0.05, logprobs=True, top_logprobs=3,
                                               logprobs_mode="final"),
                                SamplingParams(seed=5, xtc_probability=1.0, xtc_threshold=0.01)],
                       "fully masked shard", steps=np.arange(6)))
    # invalid rows: NaN / +inf on one rank only; a NaN beyond vocab_size (padding) is never read
    bad = x.copy()
    bad[0, 10] = np.nan
    bad[1, v - 5] = np.inf
    bad[2, :] = -np.inf
    bad[3, v - 1] = np.nan  # padding: vocab_size = v - 1
    cases.append(_case(bad, SamplingParams(seed=9, top_p=0.9, logprobs=True, top_logprobs=4), "invalid rows",
                       vocab_size=v - 1, steps=np.arange(6)))
    # sliced output counts, a prompt bitmask and a token bitmask over the whole vocabulary, EOS ids, no seed
    counts = rng.integers(-1, 3, size=(6, v)).astype(np.int32)
    bm = ids_to_bitmask([rng.choice(v, 5000, replace=False) for _ in range(6)], v)
    pm = ids_to_bitmask([rng.choice(v, 30, replace=False) for _ in range(6)], v)
    pen = SamplingParams(seed=3, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.2, min_tokens=2,
                         **lp)
    cases.append(_case(x, pen, "sliced counts and bitmasks", output_counts=counts, token_bitmask=bm, prompt_mask=pm,
                       eos_token_ids=[5, 8000], steps=np.array([0, 1, 2, 3, 4, 5])))
    cases.append(_case(x, SamplingParams(top_k=50, **lp), "unseeded: rank 0's seeds"))
    return cases


# ----------------------------------------------------------------------------------------------------- workers
def _layout(width: int, world: int, ragged: bool) -> list[tuple[int, int]]:
    """(start, width) per rank: equal slices with the last one padded (an engine's layout), or a ragged last one."""
    w = -(-width // world)
    if ragged:
        return [(r * w, max(0, min(w, width - r * w))) for r in range(world)]
    return [(r * w, w) for r in range(world)]


def _worker(rank: int, world: int, init: str, cases: list[dict[str, Any]], out_dir: str, backend: str = "gloo"
            ) -> None:
    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(dev)
    if backend == "gloo-sync-free":  # the path of every device but the CPU: nothing read back
        distributed.SYNC_FREE = True
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    sizes: list[int] = []
    all_gather = dist.all_gather

    def spy(tensor_list: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kw: Any) -> Any:
        sizes.append(tensor.numel())  # what every collective of the module carries, counted independently
        return all_gather(tensor_list, tensor, *args, **kw)

    dist.all_gather = spy
    results = []
    for case in cases:
        x = case["logits"]
        b, width = x.shape
        start, w = _layout(width, world, case["ragged"])[rank]
        padded = np.full((b, w), np.nan, dtype=x.dtype)  # padding beyond the logits: garbage, never read
        real = x[:, start:start + w]
        padded[:, : real.shape[1]] = real
        kw = dict(case["kw"])
        vocab = kw.pop("vocab_size", width)
        if "output_counts" in kw:
            c = np.zeros((b, w), dtype=np.int32)
            c[:, : real.shape[1]] = kw["output_counts"][:, start:start + w]
            kw["output_counts"] = torch.from_numpy(c)
        for name in ("token_bitmask", "prompt_mask", "output_counts"):
            if name in kw:
                kw[name] = torch.as_tensor(kw[name]).to(dev)
        stats = distributed.ExchangeStats()
        sizes.clear()
        out = distributed.sample(torch.from_numpy(padded).to(dev), case["params"], vocab_start=start,
                                 vocab_size=vocab, stats=stats, **kw)
        results.append({"out": out.numpy(), "stats": stats, "sizes": list(sizes)})
    with open(pathlib.Path(out_dir) / f"{rank}.pkl", "wb") as fh:
        pickle.dump(results, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cases() -> list[dict[str, Any]]:
    return _cases()


_RUNS: dict[tuple[int, str], list[list[dict[str, Any]]]] = {}


def _run(world: int, cases: list[dict[str, Any]], backend: str = "gloo") -> list[list[dict[str, Any]]]:
    """Every rank's results for every case (the processes run once per world size and process-group backend)."""
    key = (world, backend)
    if key not in _RUNS:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, str(pathlib.Path(d) / "init"), cases, d, backend), nprocs=world,
                     join=True)
            _RUNS[key] = []
            for r in range(world):
                with open(pathlib.Path(d) / f"{r}.pkl", "rb") as fh:
                    _RUNS[key].append(pickle.load(fh))
    return _RUNS[key]


# ------------------------------------------------------------------------------------------------------- checks
def _ref_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    kw = dict(case["kw"])
    if "output_counts" in kw:
        kw["output_counts"] = torch.from_numpy(kw["output_counts"])
    for name in ("token_bitmask", "prompt_mask"):
        if name in kw:
            kw[name] = torch.from_numpy(kw[name])
    return kw


def _fields(out: Any) -> list[np.ndarray]:
    return [np.asarray(f) for f in out]


def _mismatches(got: Any, ref: Any, near: np.ndarray) -> list[str]:
    """Rows where ``got`` and the reference differ (near-tie rows excused)."""
    bad = []
    tol = lambda a, b: np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-5,
                                   atol=1e-5, equal_nan=True)
    for r in range(len(ref.tokens)):
        if near[r]:
            continue
        diffs = []
        if got.tokens[r] != ref.tokens[r] or got.valid[r] != ref.valid[r]:
            diffs.append(f"token {got.tokens[r]} vs {ref.tokens[r]}")
        elif not tol(got.logprobs[r], ref.logprobs[r]) or got.ranks[r] != ref.ranks[r]:
            diffs.append(f"logprob/rank {got.logprobs[r]}/{got.ranks[r]} vs {ref.logprobs[r]}/{ref.ranks[r]}")
        elif not np.array_equal(got.top_logprob_ids[r], ref.top_logprob_ids[r]) or not tol(got.top_logprobs[r],
                                                                                             ref.top_logprobs[r]):
            diffs.append(f"top-N {got.top_logprob_ids[r]} vs {ref.top_logprob_ids[r]}")
        elif not tol(got.mirostat_mu[r], ref.mirostat_mu[r]):
            diffs.append(f"mu {got.mirostat_mu[r]} vs {ref.mirostat_mu[r]}")
        if diffs:
            bad.append(f"row {r}: {'; '.join(diffs)}")
    return bad


def _nccl_worlds() -> list[Any]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [pytest.param(w, marks=pytest.mark.skipif(n < w, reason=f"NCCL needs {w} CUDA devices, {n} here"))
            for w in WORLD_SIZES]


@pytest.mark.parametrize("world", _nccl_worlds())
def test_matches_reference_nccl(world: int, cases: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """The same cases over NCCL, one CUDA device per rank, where the machine has them."""
    test_matches_reference(world, cases, capsys, backend="nccl")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_matches_reference(world: int, cases: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
                           backend: str = "gloo") -> None:
    """Every rank returns the same result, and it is the reference's on the gathered logits, and the single-device
    C++ backend's (near-ties excused and reported); the unseeded case is only checked for agreement between
    ranks."""
    import fastsampler

    runs = _run(world, cases, backend)
    report, failures, rows = [], [], 0
    for c, case in enumerate(cases):
        got = runs[0][c]["out"]
        for r in range(1, world):
            for a, b in zip(_fields(got), _fields(runs[r][c]["out"]), strict=True):
                assert np.array_equal(a, b, equal_nan=True), f"{case['name']}: rank {r} differs from rank 0"
        if case["name"].startswith("unseeded"):
            assert got.valid.all()
            continue
        kw = _ref_kwargs(case)
        diag = reference.diagnose(case["logits"], case["params"], **kw)
        ref = diag["output"]
        near = diag["near_tie"]
        rows += len(near)
        for r in np.nonzero(near)[0]:
            report.append(f"{case['name']} row {r}: {diag['reasons'][r][0]}")
        failures += [f"{case['name']} {m}" for m in _mismatches(got, ref, near)]
        if "cpu" in fastsampler.available_backends():  # the single-device C++ backend on the gathered logits
            cpu = fastsampler.sample(torch.from_numpy(case["logits"]).float(), case["params"], backend="cpu",
                                     **kw).numpy()
            failures += [f"{case['name']} (cpu backend) {m}" for m in _mismatches(got, cpu, near)]
    with capsys.disabled():
        print(f"\n[world {world}] {rows} rows, {len(report)} near-tie rows excused" + "".join(
            f"\n  {line}" for line in report))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_exchanges_are_bounded(world: int, cases: list[dict[str, Any]]) -> None:
    """No exchanged tensor has the vocabulary's size (for the wide cases), and the bytes per step stay within
    O(B × (V / 4096 + candidates + N)): the bound of docs/distributed.md."""
    runs = _run(world, cases)
    for c, case in enumerate(cases):
        b, v = case["logits"].shape
        for r in range(world):
            res = runs[r][c]
            st = res["stats"]
            assert max(res["sizes"]) == st.largest
            if v > 4096:
                assert st.largest < v, f"{case['name']}: a tensor of {st.largest} elements (V = {v}) was exchanged"
            # per row: statistics and counts (< 64 values), the tile weights, the top-N merge (2N + 1), the top lists
            # (Mirostat v1's 100, a top-k or min_keep up to 64) and at most four selections of 8 rounds x 512
            tiles = math.ceil(v / TILE) + 1
            bound = 8 * b * (64 + tiles + (2 * 20 + 1) + 100 + 64 + 4 * 8 * 512) + 8 * b + 24
            assert st.bytes_sent <= bound, f"{case['name']}: {st.bytes_sent} bytes > {bound}"


def test_sync_free_path_is_identical(cases: list[dict[str, Any]]) -> None:
    """The path that reads nothing back to the host (every device but the CPU takes it; `distributed.SYNC_FREE`
    forces it here) returns exactly what the CPU's path returns, on every case, and its exchanges stay within the
    bound: it runs every rule's exchanges its rows' parameters call for and every radix round of a selection."""
    world = 2
    base, free = _run(world, cases), _run(world, cases, "gloo-sync-free")
    for c, case in enumerate(cases):
        if case["name"].startswith("unseeded"):  # (fresh random seeds each run)
            continue
        for r in range(world):
            for a, b in zip(_fields(base[r][c]["out"]), _fields(free[r][c]["out"]), strict=True):
                assert np.array_equal(a, b, equal_nan=True), f"{case['name']}: rank {r} differs without read-backs"
        b, v = case["logits"].shape
        tiles = math.ceil(v / TILE) + 1
        bound = 8 * b * (64 + tiles + (2 * 20 + 1) + 100 + 64 + 4 * 8 * 512) + 8 * b + 24
        st = free[0][c]["stats"]
        assert st.bytes_sent <= bound, f"{case['name']}: {st.bytes_sent} bytes > {bound}"
        assert st.collectives >= base[0][c]["stats"].collectives


def test_top_n_equals_a_stable_sort() -> None:
    """The shard's top-N (`distributed._top_n`, no sort of the shard) is a stable descending sort's first N: ties in
    id order, ``-inf`` entries included, padded with ``(-inf, vocab)`` past the shard's width."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        w = int(torch.randint(1, 60, (1,), generator=g))
        lp = torch.randint(-4, 3, (3, w), generator=g).double()  # (few values: many ties)
        lp[torch.rand(3, w, generator=g) < 0.2] = -torch.inf
        n = int(torch.randint(1, 12, (1,), generator=g))
        gid = torch.arange(100, 100 + w)
        vals, ids = distributed._top_n(lp, gid, n, 999)
        sv, order = torch.sort(lp, dim=1, descending=True, stable=True)
        si = gid[order]
        if w < n:
            sv = torch.nn.functional.pad(sv, (0, n - w), value=-torch.inf)
            si = torch.nn.functional.pad(si, (0, n - w), value=999)
        assert torch.equal(vals, sv[:, :n]) and torch.equal(ids, si[:, :n]), (lp, n)


def test_token_noise_block_equals_the_noise() -> None:
    """The draw's noise of consecutive ids (`token_noise_block`, four ids per Philox call, any alignment) is the
    noise of docs/semantics.md §7 id by id."""
    from fastsampler._shard import noise, token_noise_block
    from fastsampler.layout import STREAM_TOKEN

    g = torch.Generator().manual_seed(1)
    seeds = torch.randint(-2**62, 2**62, (5,), generator=g)
    steps, seqs = torch.randint(0, 2**31, (5,), generator=g), torch.randint(0, 4, (5,), generator=g)
    first = torch.tensor([0, 1, 2, 3, 130001])
    for n in (1, 5, 4096):
        want = noise(seeds, steps, seqs, first[:, None] + torch.arange(n)[None], STREAM_TOKEN)
        assert torch.equal(token_noise_block(seeds, steps, seqs, first, n), want)


def test_refuses_gaps_between_slices() -> None:
    """The slices must be contiguous from id 0: a group of one whose slice starts at 5 is refused."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            with pytest.raises(ValueError, match="contiguous from id 0"):
                distributed.sample(torch.zeros(1, 4), SamplingParams(seed=0), vocab_start=5, vocab_size=9)
            with pytest.raises(ValueError, match="output_counts must be"):
                distributed.sample(torch.zeros(1, 4), SamplingParams(seed=0), vocab_start=0, vocab_size=4,
                                   output_counts=torch.zeros(1, 9, dtype=torch.int32))
        finally:
            dist.destroy_process_group()


def test_docstring_example() -> None:
    """`fastsampler.distributed.sample`'s example (a group of one process) runs as written."""
    import doctest

    res = doctest.testmod(distributed, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
