"""`fastsampler.distributed.Sampler` on 2 and 4 gloo processes on the CPU: requests with every feature join and leave
over ten steps, every rank returns the same result, equal to a single-device `fastsampler.Sampler(backend=
"reference")` fed the gathered logits (near-ties of `reference.diagnose` excused and reported), and each rank holds
the vocabulary-sized state of its own slice only.

The processes start once per world size and run both layouts (an engine's padded slices, a ragged last slice)."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsampler
from fastsampler import SamplingParams, distributed, reference
from fastsampler._batch import mask_words

WORLD_SIZES = (2, 4)
V = 9001  # three 4096-id tiles; 9001 = 2 x 4500 + 1 and 4 x 2250 + 1: the last slice is padded (or ragged)
SLOTS = 12
EOS = [2, 8999]  # one EOS id in the last slice
HISTORY = 64
STEPS = 10
STOP = [4000, 4500]  # request C's stop ids, boosted in its logits so that they win once allowed


# ------------------------------------------------------------------------------------------------------ the run
def _requests() -> dict[str, tuple[SamplingParams, list[int]]]:
    """Request key -> (params, prompt). Every feature of the pipeline appears in some request."""
    lp = {"logprobs": True, "top_logprobs": 5}
    rng = np.random.default_rng(3)
    prompt = lambda n: [int(t) for t in rng.integers(0, V, n)]
    return {
        "A": (SamplingParams(seed=1, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3,
                             logprobs_mode="processed", **lp), prompt(12)),
        "B": (SamplingParams(seed=2, top_k=40, logit_bias={5: 3.0, 4600: -1.0, 8001: 9.0},
                             allowed_token_ids=list(range(0, V, 3)), logprobs_mode="final", **lp), prompt(3)),
        "C": (SamplingParams(seed=3, stop_token_ids=STOP, min_tokens=3, top_p=0.95), prompt(4)),
        "D": (SamplingParams(seed=4, mirostat_mode=1, mirostat_target=3.0, logprobs=True), []),
        "E": (SamplingParams(seed=5, mirostat_mode=2, mirostat_target=4.0, logprobs=True, top_logprobs=3,
                             logprobs_mode="final"), prompt(5)),
        "F": (SamplingParams(seed=6, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                             dry_sequence_breakers=[[7]], temperature=0.9, **lp), [100, 200, 300] * 4 + [100, 200]),
        "G": (SamplingParams(seed=7, xtc_probability=1.0, xtc_threshold=0.02, top_n_sigma=2.0, **lp), prompt(6)),
        "H": (SamplingParams(seed=8, no_repeat_ngram_size=2, bad_words_ids=[[10, 11], [12]], frequency_penalty=1.0,
                             penalty_last_n=4, ignore_eos=True), [10, 11, 10, 12]),
        "I": (SamplingParams(seed=9, n=2, logprobs=True, top_logprobs=20, logprobs_mode="raw", top_k=2000), prompt(2)),
        "J": (SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2), prompt(3)),  # unseeded: rank 0's seed
        "K": (SamplingParams(seed=11, allowed_token_ids=list(range(300)), **lp), []),  # later slices all masked
        "L": (SamplingParams(seed=12, top_p=0.9, min_p=0.05, banned_token_ids=list(range(2300)), **lp), prompt(8)),
        "M": (SamplingParams(seed=13, typical_p=0.7, eta_cutoff=0.002, dynatemp_range=0.5, dynatemp_exponent=1.5,
                             logprobs=True, logprobs_mode="final"), prompt(3)),
    }


# step -> (keys added, keys removed) before that step's draw
EVENTS = {0: ("ABCDEF", ""), 2: ("GH", ""), 4: ("IJ", "BD"), 6: ("KL", "A"), 8: ("M", "C")}
BITMASK_STEP = 5  # this step also passes a token bitmask (a grammar's)


def _schedule() -> list[dict[str, Any]]:
    """Per step: the requests added and removed, the order of the rows (sample keys, ``I0`` / ``I1`` for the two
    samples of I), the gathered logits ``(B, V)`` and the step's token bitmask."""
    rng = np.random.default_rng(11)
    reqs = _requests()
    live: list[str] = []
    out = []
    for step in range(STEPS):
        add, rem = EVENTS.get(step, ("", ""))
        live = [k for k in live if k[0] not in rem]
        for k in add:
            live += [f"{k}{i}" for i in range(reqs[k][0].n)] if reqs[k][0].n > 1 else [k]
        order = live[::-1] if step % 2 else list(live)  # rows in another order than the slots every other step
        x = (rng.standard_normal((len(order), V)) * 2.5).astype(np.float32)
        for r, k in enumerate(order):
            if k == "C":
                x[r, STOP] += 15.0
            if k == "F":  # 300 extends the prompt's repeat: DRY's penalty (hundreds) must remove it
                x[r, 300] += 20.0
            if k == "H":  # 12 is a bad word, 11 after 10 too: the history rules must ban them
                x[r, [11, 12]] += 20.0
        bm = None
        if step == BITMASK_STEP:
            bits = rng.random((len(order), V)) < 0.8
            bits[:, :300] = True
            words = np.zeros((len(order), mask_words(V) * 32), dtype=bool)
            words[:, :V] = bits
            bm = np.packbits(words.reshape(len(order), -1, 32)[:, :, ::-1], axis=2).view(">u4")[..., 0]
            bm = bm.astype(np.uint32).view(np.int32)
        out.append({"add": add, "remove": rem, "order": order, "logits": x, "bitmask": bm})
    return out


def _layout(world: int, ragged: bool) -> list[tuple[int, int]]:
    w = -(-V // world)
    return [(r * w, max(0, min(w, V - r * w)) if ragged else w) for r in range(world)]


def _worker(rank: int, world: int, init: str, schedule: list[dict[str, Any]], out_dir: str,
            sync_free: bool = False) -> None:
    torch.set_num_threads(1)
    if sync_free:  # the path of every device but the CPU: nothing read back
        distributed.SYNC_FREE = True
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    reqs = _requests()
    results = {}
    for ragged in (False, True):
        start, width = _layout(world, ragged)[rank]
        s = distributed.Sampler(V, SLOTS, vocab_start=start, local_size=width, eos_token_ids=EOS,
                                history_len=HISTORY)
        slots: dict[str, int] = {}
        steps, seeds = [], {}
        for st in schedule:
            for k in st["remove"]:
                s.remove([v for kk, v in slots.items() if kk[0] == k])
                slots = {kk: v for kk, v in slots.items() if kk[0] != k}
            for k in st["add"]:
                params, prompt = reqs[k]
                got = s.add(params, prompt)
                seeds[k] = s.seed_of(got[0])
                slots.update({f"{k}{i}": v for i, v in enumerate(got)} if len(got) > 1 else {k: got[0]})
            x = st["logits"]
            local = np.full((x.shape[0], width), np.nan, dtype=np.float32)  # padding: garbage, never read
            real = x[:, start:start + width]
            local[:, :real.shape[1]] = real
            bm = None if st["bitmask"] is None else torch.from_numpy(st["bitmask"])
            stats = distributed.ExchangeStats()
            out = s.sample(torch.from_numpy(local), [slots[k] for k in st["order"]], token_bitmask=bm, stats=stats)
            steps.append({"out": out.numpy(), "bytes": stats.bytes_sent, "largest": stats.largest})
        counts = {k: s.output_counts_of(v).numpy() for k, v in slots.items()}
        results[ragged] = {"steps": steps, "seeds": seeds, "counts": counts, "slots": dict(slots),
                           "counts_shape": tuple(s._tables.counts.shape), "bytes_per_slot": s.state_bytes_per_slot,
                           "width": width, "start": start}
    with open(pathlib.Path(out_dir) / f"{rank}.pkl", "wb") as fh:
        pickle.dump(results, fh)
    dist.destroy_process_group()


_RUNS: dict[tuple[int, bool], list[dict[bool, Any]]] = {}


def _run(world: int, schedule: list[dict[str, Any]], sync_free: bool = False) -> list[dict[bool, Any]]:
    key = (world, sync_free)
    if key not in _RUNS:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, str(pathlib.Path(d) / "init"), schedule, d, sync_free), nprocs=world,
                     join=True)
            _RUNS[key] = []
            for r in range(world):
                with open(pathlib.Path(d) / f"{r}.pkl", "rb") as fh:
                    _RUNS[key].append(pickle.load(fh))
    return _RUNS[key]


@pytest.fixture(scope="module")
def schedule() -> list[dict[str, Any]]:
    return _schedule()


# ------------------------------------------------------------------------------------------------------- checks
def _differs(got: Any, ref: Any, r: int) -> str | None:
    tol = lambda a, b: np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-5,
                                   atol=1e-5, equal_nan=True)
    if got.tokens[r] != ref.tokens[r] or got.valid[r] != ref.valid[r]:
        return f"token {got.tokens[r]} vs {ref.tokens[r]}"
    if not tol(got.logprobs[r], ref.logprobs[r]) or got.ranks[r] != ref.ranks[r]:
        return f"logprob/rank {got.logprobs[r]}/{got.ranks[r]} vs {ref.logprobs[r]}/{ref.ranks[r]}"
    n = min(got.top_logprob_ids.shape[1], ref.top_logprob_ids.shape[1])
    if not np.array_equal(got.top_logprob_ids[r, :n], ref.top_logprob_ids[r, :n]) or not tol(
            got.top_logprobs[r, :n], ref.top_logprobs[r, :n]):
        return f"top-N {got.top_logprob_ids[r]} vs {ref.top_logprob_ids[r]}"
    if not tol(got.mirostat_mu[r], ref.mirostat_mu[r]):
        return f"mu {got.mirostat_mu[r]} vs {ref.mirostat_mu[r]}"
    gs, rs = got.stopped, ref.stopped
    if (gs is None) != (rs is None) or (gs is not None and bool(gs[r]) != bool(rs[r])):
        return f"stopped {gs} vs {rs}"
    return None


def _compare(schedule: list[dict[str, Any]], res: dict[str, Any]) -> tuple[list[str], list[str], set[str]]:
    """Replay the schedule on a single-device reference `Sampler` with the gathered logits and compare rank 0's
    outputs step by step. A row that differs at a near-tie of `reference.diagnose` is excused, and its request is
    left out from then on (its state has diverged). Returns (failures, excused, diverged keys)."""
    reqs = _requests()
    ref = fastsampler.Sampler(V, SLOTS, eos_token_ids=EOS, backend="reference", history_len=HISTORY)
    slots: dict[str, int] = {}
    outputs: dict[str, list[int]] = {}
    failures, excused, diverged = [], [], set()
    for step, (st, got) in enumerate(zip(schedule, res["steps"], strict=True)):
        for k in st["remove"]:
            ref.remove([v for kk, v in slots.items() if kk[0] == k])
            slots = {kk: v for kk, v in slots.items() if kk[0] != k}
        for k in st["add"]:
            params, prompt = reqs[k]
            got_slots = ref.add(params.replace(seed=res["seeds"][k]), prompt)
            keys = [f"{k}{i}" for i in range(len(got_slots))] if len(got_slots) > 1 else [k]
            slots.update(zip(keys, got_slots, strict=True))
            outputs.update({kk: [] for kk in keys})
        order = st["order"]
        sl = [slots[k] for k in order]
        bm = None if st["bitmask"] is None else torch.from_numpy(st["bitmask"])
        steps_before = [ref.step_of(s) for s in sl]
        mu_before = [ref.mirostat_mu_of(s) for s in sl]
        out = ref.sample(torch.from_numpy(st["logits"]), sl, token_bitmask=bm).numpy()
        g = got["out"]
        diag = None
        for r, k in enumerate(order):
            if k in diverged:
                continue
            why = _differs(g, out, r)
            if why is None:
                continue
            if diag is None:  # the reference's near-ties for this step, from the same state as functional inputs
                plist = [reqs[kk[0]][0].replace(seed=res["seeds"][kk[0]]) for kk in order]
                diag = reference.diagnose(
                    st["logits"], plist, prompt_token_ids=[reqs[kk[0]][1] for kk in order],
                    output_token_ids=[outputs[kk] for kk in order], steps=steps_before,
                    seqs=[int(kk[1:]) if len(kk) > 1 else 0 for kk in order], mirostat_mu=mu_before,
                    eos_token_ids=EOS, token_bitmask=bm)
            if diag["near_tie"][r]:
                excused.append(f"step {step} {k}: {why} ({diag['reasons'][r][0]})")
                diverged.add(k)
            else:
                failures.append(f"step {step} {k}: {why}")
        for r, k in enumerate(order):
            if out.valid[r]:
                outputs[k].append(int(out.tokens[r]))
    # this rank's slice of the counts is the single-device counts' slice (zero in the padding)
    lo = res["start"]
    for k, s in slots.items():
        if k not in diverged:
            mine = res["counts"][k]
            want = ref.output_counts_of(s).numpy()[lo:lo + mine.shape[0]]
            if not np.array_equal(mine[:want.shape[0]], want) or mine[want.shape[0]:].any():
                failures.append(f"counts of {k} on the slice at {lo} differ from the single-device counts")
    return failures, excused, diverged


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sampler_matches_single_device(world: int, schedule: list[dict[str, Any]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every rank returns the same outputs, equal to a single-device reference `Sampler` on the gathered logits at
    every step (near-ties excused and reported), with padded slices and with a ragged last slice; each rank's counts
    are its slice of the single-device counts."""
    runs = _run(world, schedule)
    report, failures, rows = [], [], 0
    for ragged in (False, True):
        name = "ragged" if ragged else "padded"
        for step in range(STEPS):
            ref_out = runs[0][ragged]["steps"][step]["out"]
            rows += len(ref_out.tokens)
            for r in range(1, world):
                for a, b in zip(ref_out, runs[r][ragged]["steps"][step]["out"], strict=True):
                    assert (a is None and b is None) or np.array_equal(a, b, equal_nan=True), \
                        f"{name} step {step}: rank {r} differs from rank 0"
        for r in range(world):
            fails, excused, _ = _compare(schedule, runs[r][ragged])
            failures += [f"{name} rank {r}: {m}" for m in fails]
            if r == 0:
                report += [f"{name}: {m}" for m in excused]
    with capsys.disabled():
        print(f"\n[world {world}] {rows} rows per rank, {len(report)} near-tie rows excused" + "".join(
            f"\n  {line}" for line in report))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sampler_state_is_sharded(world: int, schedule: list[dict[str, Any]]) -> None:
    """Each rank's counts table has its slice's columns only (``(max_slots, V_local)`` int16), its bitmasks the
    slice's words, and the stop ids were drawn once allowed (after ``min_tokens``) and reported as stopped."""
    runs = _run(world, schedule)
    for ragged in (False, True):
        for r in range(world):
            res = runs[r][ragged]
            w = res["width"]
            assert res["counts_shape"] == (SLOTS, w)
            assert res["bytes_per_slot"] == 2 * w + 2 * 4 * mask_words(w)  # counts, prompt and allowed bits
            assert w < V
        out = runs[0][ragged]["steps"]
        c_rows = [(s, st["order"].index("C")) for s, st in enumerate(schedule) if "C" in st["order"]]
        drawn = [int(out[s]["out"].tokens[r]) for s, r in c_rows]
        assert all(t not in STOP for t in drawn[:3]) and any(t in STOP for t in drawn[3:]), drawn
        assert all(bool(out[s]["out"].stopped[r]) == (int(out[s]["out"].tokens[r]) in STOP) for s, r in c_rows)


def test_sampler_sync_free_is_identical(schedule: list[dict[str, Any]]) -> None:
    """The steps that read nothing back (`distributed.SYNC_FREE`, the path off the CPU) return and store exactly
    what the CPU's path does, over the whole schedule (the unseeded request J excepted: its seed is fresh)."""
    base, free = _run(2, schedule), _run(2, schedule, sync_free=True)
    for ragged in (False, True):
        for r in range(2):
            a_run, b_run = base[r][ragged], free[r][ragged]
            for step, st in enumerate(schedule):
                keep = [i for i, k in enumerate(st["order"]) if k != "J"]
                for a, b in zip(a_run["steps"][step]["out"], b_run["steps"][step]["out"], strict=True):
                    assert (a is None and b is None) or np.array_equal(np.asarray(a)[keep], np.asarray(b)[keep],
                                                                       equal_nan=True), f"step {step} rank {r}"
            for k, c in a_run["counts"].items():
                if k != "J":
                    assert np.array_equal(c, b_run["counts"][k]), k


def test_sampler_step_reads_nothing_back() -> None:
    """A step on the path off the CPU never reads device data back to the host: run on the ``meta`` device (no
    data: any read-back raises), with every rule, a token bitmask and min_tokens bans, steps, `sampling_probs` and
    `verify` (each method) complete."""
    import fastsampler._history as history

    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        saved = (distributed._check_layout, history._triton_dry, distributed.SYNC_FREE)
        try:
            # (the layout check at construction reads its one exchange back; the DRY table takes its torch form)
            distributed._check_layout = lambda ex, start, width, b, vocab, dev: [[start, width, b]]
            history._triton_dry = lambda n: False
            distributed.SYNC_FREE = True
            s = distributed.Sampler(V, 2 * SLOTS, "meta", vocab_start=0, local_size=V, eos_token_ids=EOS,
                                    history_len=HISTORY)
            slots = []
            for params, prompt in _requests().values():
                if params.seed is None:  # (an unseeded request broadcasts rank 0's seed at `add`)
                    params = params.replace(seed=0)
                slots += s.add(params, prompt)
            for _ in range(2):
                bm = torch.full((len(slots), mask_words(V)), -1, dtype=torch.int32, device="meta")
                out = s.sample(torch.empty(len(slots), V, device="meta"), slots, token_bitmask=bm)
                assert out.tokens.device.type == "meta" and out.tokens.shape == (len(slots),)
            probs = s.sampling_probs(torch.empty(len(slots), V, device="meta"), slots)
            assert probs.device.type == "meta" and probs.shape == (len(slots), V)
            drafts = [[1, 2]] * len(slots)
            for kw in ({"method": "match"}, {"method": "rejection"},
                       {"draft_probs": torch.empty(len(slots), 2, V, device="meta")}):
                ver = s.verify(torch.empty(len(slots), 3, V, device="meta"), drafts, slots, **kw)
                assert ver.tokens.device.type == "meta" and ver.tokens.shape == (len(slots), 3)
        finally:
            distributed._check_layout, history._triton_dry, distributed.SYNC_FREE = saved
            dist.destroy_process_group()


def test_sampler_refuses() -> None:
    """Errors say what was expected: a batch of the wrong width, a request the history cannot serve."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            with pytest.raises(ValueError, match="contiguous from id 0"):
                distributed.Sampler(8, 2, vocab_start=3, local_size=5)
            s = distributed.Sampler(8, 2, vocab_start=0, local_size=8)
            slot = s.add(SamplingParams(seed=1))
            with pytest.raises(ValueError, match=r"shape \(1, 8\)"):
                s.sample(torch.zeros(1, 7), slot)
            with pytest.raises(ValueError, match="history_len"):
                s.add(SamplingParams(no_repeat_ngram_size=2))
            with pytest.raises(ValueError, match="not in use"):
                s.remove(1)
        finally:
            dist.destroy_process_group()


def test_doc_example_runs() -> None:
    """docs/distributed.md's `distributed.Sampler` example runs as written, as a script (it starts its processes)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "docs" / "distributed.md").read_text()
    section = text[text.index("## `distributed.Sampler`"):]
    section = section[:section.index("\n## ", 1)]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    with tempfile.TemporaryDirectory() as d:
        script = pathlib.Path(d) / "example.py"
        script.write_text(block)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["0", "1", "2", "3"], res.stdout
