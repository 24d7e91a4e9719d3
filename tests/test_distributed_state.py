"""`distributed.Sampler`'s `sampling_probs`, `export` / `restore` and `whole_state`, on 2 gloo processes: a request
exported on every rank and restored into another `distributed.Sampler` continues exactly as it would have; one
moved to a single-device `fastsampler.Sampler` (`whole_state`) or from one (a `SlotState` restored on every rank)
continues as the single-device reference does; the ranks' `sampling_probs` slices are the single-device
distribution."""

from __future__ import annotations

import pathlib
import pickle
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsampler
from fastsampler import SamplingParams, distributed

from .test_distributed_sampler import EOS, HISTORY, V, _differs, _requests

WORLD = 2
SLOTS = 16
KEYS = "ABCDEFGHKLM"  # every feature; (I has n = 2 and J no seed: covered by the Sampler test)
BEFORE, AFTER = 3, 3  # steps before the export, steps after the restore


def _logits(step: int) -> np.ndarray:
    rng = np.random.default_rng(100 + step)
    return (rng.standard_normal((len(KEYS), V)) * 2.5).astype(np.float32)


def _local(x: np.ndarray, start: int, width: int) -> torch.Tensor:
    out = np.full((x.shape[0], width), np.nan, dtype=np.float32)  # padding: garbage, never read
    real = x[:, start:start + width]
    out[:, :real.shape[1]] = real
    return torch.from_numpy(out)


def _worker(rank: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    reqs = _requests()
    width = -(-V // WORLD)
    start = rank * width
    make = lambda: distributed.Sampler(V, SLOTS, vocab_start=start, local_size=width, eos_token_ids=EOS,
                                       history_len=HISTORY)
    s = make()
    slots = [s.add(*reqs[k])[0] for k in KEYS]
    # a single-device reference Sampler on the gathered logits, the same requests (every rank runs it alike)
    single = fastsampler.Sampler(V, SLOTS, eos_token_ids=EOS, backend="reference", history_len=HISTORY)
    single_slots = [single.add(*reqs[k])[0] for k in KEYS]
    for step in range(BEFORE):
        s.sample(_local(_logits(step), start, width), slots)
        single.sample(torch.from_numpy(_logits(step)), single_slots)
    x = _logits(BEFORE)
    probs = s.sampling_probs(_local(x, start, width), slots).numpy()
    steps_now = [s.step_of(sl) for sl in slots]
    # export on every rank; restore into a second distributed Sampler (slots taken in another order)
    states = [s.export(sl) for sl in slots]
    s2 = make()
    s2.add(SamplingParams(seed=99))  # (slot 0 taken: the restored slots differ from the exported ones)
    slots2 = [s2.restore(st) for st in states]
    # every rank's states joined: the single-device state of each slot
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, states)
    whole = [distributed.whole_state([gathered[r][i] for r in range(WORLD)]) for i in range(len(KEYS))]
    # a single-device export restored on every rank (each takes its slice)
    s3 = make()
    slots3 = [s3.restore(single.export(sl)) for sl in single_slots]
    outs: dict[str, list[Any]] = {"s": [], "s2": [], "s3": []}
    for step in range(BEFORE, BEFORE + AFTER):
        x = _logits(step)
        outs["s"].append(s.sample(_local(x, start, width), slots).numpy())
        outs["s2"].append(s2.sample(_local(x, start, width), slots2).numpy())
        outs["s3"].append(s3.sample(_local(x, start, width), slots3).numpy())
    res = {"verify": _verify_runs(rank, start, width, make, reqs), "probs": probs, "start": start,
           "steps_now": steps_now, "whole": whole, "outs": outs,
           "counts": [s.output_counts_of(sl).numpy() for sl in slots],
           "counts2": [s2.output_counts_of(sl).numpy() for sl in slots2]}
    with open(pathlib.Path(out_dir) / f"{rank}.pkl", "wb") as fh:
        pickle.dump(res, fh)
    dist.destroy_process_group()


VKEYS = "ABCEFM"  # requests verified (penalties, bias and top-k, stop ids, Mirostat v2, DRY, typical / eta)
K = 3


def _verify_inputs(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits ``(B, K + 1, V)`` peaked at a planted token per position, drafts that plant them for the first two
    positions and a random id after, and a draft distribution ``(B, K, V)``."""
    rng = np.random.default_rng(500 + step)
    b = len(VKEYS)
    x = (rng.standard_normal((b, K + 1, V)) * 1.5).astype(np.float32)
    planted = rng.integers(0, V, (b, K + 1))
    for i in range(b):
        for j in range(K + 1):
            x[i, j, planted[i, j]] += 9.0
    drafts = planted[:, :K].copy()
    drafts[:, 2] = rng.integers(0, V, b)
    q = rng.random((b, K, V)).astype(np.float32) ** 8
    for i in range(b):
        for j in range(K):
            q[i, j, drafts[i, j]] += 50.0
    return x, drafts, q / q.sum(2, keepdims=True)


def _verify_runs(rank: int, start: int, width: int, make: Any, reqs: dict[str, Any]) -> dict[str, Any]:
    """``Sampler.verify`` on this rank for each method (two rounds each) and what the slots hold after."""
    out: dict[str, Any] = {}
    for method, with_q in (("match", False), ("rejection", False), ("rejection", True)):
        s = make()
        slots = [s.add(*reqs[k])[0] for k in VKEYS]
        got = []
        for rnd in range(2):
            x, drafts, q = _verify_inputs(rnd)
            loc = torch.from_numpy(np.ascontiguousarray(
                np.pad(x, ((0, 0), (0, 0), (0, max(0, start + width - V))), constant_values=np.nan)
                [:, :, start:start + width]))
            ql = None
            if with_q:
                ql = torch.from_numpy(np.ascontiguousarray(
                    np.pad(q, ((0, 0), (0, 0), (0, max(0, start + width - V))))[:, :, start:start + width]))
            got.append(s.verify(loc, drafts, slots, draft_probs=ql, method=method).numpy())
        out[f"{method}{'-q' if with_q else ''}"] = {"outs": got, "steps": [s.step_of(sl) for sl in slots],
                                                    "counts": [s.output_counts_of(sl).numpy() for sl in slots]}
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(str(pathlib.Path(d) / "init"), d), nprocs=WORLD, join=True)
        out = []
        for r in range(WORLD):
            with open(pathlib.Path(d) / f"{r}.pkl", "rb") as fh:
                out.append(pickle.load(fh))
    return out


def _single_after(states: list[Any]) -> tuple[fastsampler.Sampler, list[int]]:
    single = fastsampler.Sampler(V, SLOTS, eos_token_ids=EOS, backend="reference", history_len=HISTORY)
    return single, [single.restore(st) for st in states]


def test_restored_requests_continue_exactly(runs: list[dict[str, Any]]) -> None:
    """Exported on every rank and restored into another distributed Sampler, every request's next steps are
    bit-identical to the original's, and so are its counts."""
    for r in range(WORLD):
        for a, b in zip(runs[r]["outs"]["s"], runs[r]["outs"]["s2"], strict=True):
            for fa, fb in zip(a, b, strict=True):
                assert (fa is None and fb is None) or np.array_equal(fa, fb, equal_nan=True)
        for ca, cb in zip(runs[r]["counts"], runs[r]["counts2"], strict=True):
            assert np.array_equal(ca, cb)


def test_whole_state_continues_on_one_device(runs: list[dict[str, Any]]) -> None:
    """`whole_state` gives the single-device state: restored into a reference `fastsampler.Sampler`, its next steps
    equal the distributed Sampler's (every rank's), and its counts are the ranks' slices joined."""
    whole = runs[0]["whole"]
    single, slots = _single_after(whole)
    assert [single.step_of(s) for s in slots] == runs[0]["steps_now"]
    for i, step in enumerate(range(BEFORE, BEFORE + AFTER)):
        ref = single.sample(torch.from_numpy(_logits(step)), slots).numpy()
        for r in range(WORLD):
            bad = [f"row {k}: {why}" for k in range(len(KEYS)) if (why := _differs(runs[r]["outs"]["s"][i], ref, k))]
            assert not bad, f"step {step} rank {r}: " + "; ".join(bad)
    joined = [np.concatenate([runs[r]["counts"][k] for r in range(WORLD)])[:V] for k in range(len(KEYS))]
    for k, s in enumerate(slots):
        assert np.array_equal(single.output_counts_of(s).numpy(), joined[k])


def test_single_device_state_restores_on_every_rank(runs: list[dict[str, Any]]) -> None:
    """A single-device `SlotState` restored on every rank (each its slice) continues as the single-device Sampler
    it came from: the same outputs as the distributed Sampler that ran all along."""
    for r in range(WORLD):
        for i, (a, b) in enumerate(zip(runs[r]["outs"]["s"], runs[r]["outs"]["s3"], strict=True)):
            bad = [f"row {k}: {why}" for k in range(len(KEYS)) if (why := _differs(b, a, k))]
            assert not bad, f"step {BEFORE + i} rank {r}: " + "; ".join(bad)


def test_sampling_probs_slices_are_the_distribution(runs: list[dict[str, Any]]) -> None:
    """The ranks' `sampling_probs` slices, joined, are the single-device reference's distribution (padding columns
    zero), and nothing advanced."""
    single, slots = _single_after(runs[0]["whole"])
    want = single.sampling_probs(torch.from_numpy(_logits(BEFORE)), slots).numpy()
    got = np.concatenate([runs[r]["probs"] for r in range(WORLD)], axis=1)
    assert not got[:, V:].any()
    np.testing.assert_allclose(got[:, :V], want, rtol=1e-5, atol=1e-7)
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("case", ["match", "rejection", "rejection-q"])
def test_verify_matches_single_device(runs: list[dict[str, Any]], case: str) -> None:
    """`distributed.Sampler.verify` emits what a single-device reference `Sampler.verify` emits on the gathered
    logits (and the gathered draft distribution), every rank alike, over two rounds: tokens, counts of accepted
    drafts, logprobs, top-N, stops, and the slots' steps and counts after."""
    reqs = _requests()
    method = case.split("-")[0]
    single = fastsampler.Sampler(V, SLOTS, eos_token_ids=EOS, backend="reference", history_len=HISTORY)
    slots = [single.add(*reqs[k])[0] for k in VKEYS]
    accepted = 0
    for rnd in range(2):
        x, drafts, q = _verify_inputs(rnd)
        ref = single.verify(torch.from_numpy(x), drafts, slots,
                            draft_probs=torch.from_numpy(q) if case.endswith("-q") else None, method=method).numpy()
        accepted += int(ref.num_accepted.sum())
        for r in range(WORLD):
            got = runs[r]["verify"][case]["outs"][rnd]
            np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=f"round {rnd} rank {r}")
            np.testing.assert_array_equal(got.num_accepted, ref.num_accepted)
            np.testing.assert_array_equal(got.num_tokens, ref.num_tokens)
            np.testing.assert_array_equal(got.stopped, ref.stopped)
            np.testing.assert_array_equal(got.ranks, ref.ranks)
            np.testing.assert_array_equal(got.top_logprob_ids, ref.top_logprob_ids)
            np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.top_logprobs, ref.top_logprobs, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.mirostat_mu, ref.mirostat_mu, rtol=1e-5, atol=1e-5)
    assert accepted > 0  # (the planted drafts are accepted: the positions after them run too)
    for r in range(WORLD):
        res = runs[r]["verify"][case]
        assert res["steps"] == [single.step_of(sl) for sl in slots]
        lo = runs[r]["start"]
        for c, sl in zip(res["counts"], slots, strict=True):
            want = single.output_counts_of(sl).numpy()[lo:lo + c.shape[0]]
            assert np.array_equal(c[:want.shape[0]], want)


def test_state_errors() -> None:
    """Errors say what was expected: another slice, another vocabulary, no rank's states, slices with a gap."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            s = distributed.Sampler(8, 2, vocab_start=0, local_size=8)
            st = s.export(s.add(SamplingParams(seed=1, presence_penalty=0.5), [1, 2])[0])
            other = distributed.Sampler(9, 2, vocab_start=0, local_size=9)
            with pytest.raises(ValueError, match="slice"):
                other.restore(st)
            single = fastsampler.Sampler(9, 1, backend="reference")
            with pytest.raises(ValueError, match="vocab_size=8"):
                s.restore(single.export(single.add(SamplingParams(seed=2))[0]))
            with pytest.raises(TypeError, match="ShardSlotState"):
                s.restore("state")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="non-empty"):
                distributed.whole_state([])
            with pytest.raises(ValueError, match="contiguous from id 0"):
                distributed.whole_state([st, st])
            w = distributed.whole_state([st])
            assert w.prompt_mask.tolist() == [0b110] and w.seed == 1
            slot = s.restore(st)
            with pytest.raises(ValueError, match="3-D"):
                s.verify(torch.zeros(1, 8), [[1]], [slot])
            with pytest.raises(ValueError, match="takes no draft_probs"):
                s.verify(torch.zeros(1, 2, 8), [[1]], [slot], draft_probs=torch.ones(1, 1, 8), method="match")
            with pytest.raises(ValueError, match=r"this rank's slice, shape \(1, 1, 8\)"):
                s.verify(torch.zeros(1, 2, 8), [[1]], [slot], draft_probs=torch.ones(1, 1, 9))
            with pytest.raises(ValueError, match="non-negative"):
                s.verify(torch.zeros(1, 2, 8), [[1]], [slot], draft_probs=-torch.ones(1, 1, 8))
            with pytest.raises(ValueError, match="method must be"):
                s.verify(torch.zeros(1, 2, 8), [[1]], [slot], method="greedy")
        finally:
            dist.destroy_process_group()
