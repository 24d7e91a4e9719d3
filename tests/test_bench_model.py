"""The GPU cost model (``python -m fastsampler.bench --model``): end to end on a small case, record-only == executed
launch lists, and its parts (SASS loop finding, roofline, goals, load / store discovery).

The model records under the Triton interpreter and compiles in a subprocess without it, so the end-to-end tests run
it as a command (the same in a CPU session, where conftest sets ``TRITON_INTERPRET=1``, and a GPU one).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.backend_checks import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
MODEL_COLUMNS = ["scenario", "batch", "dtype", "vocab", "launches", "hbm_bytes_per_row", "full_row_reads",
                 "max_instr_per_id", "model_us", "goal_us"]


def _env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _sass_available() -> tuple[bool, str]:
    """Whether this triton can compile for sm_90 and disassemble (its nvidia backend and cuobjdump)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return False, "triton's nvidia backend is not installed"
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        return False, "triton ships no cuobjdump here"
    return True, ""


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def test_model_end_to_end(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "fastsampler.bench", "--model", "--scenarios", "plain,topk_topp_minp",
           "--batch-sizes", "1", "--vocab-sizes", "8192", "--dtypes", "fp32", "--out", str(out),
           "--model-cache", str(tmp_path / "cache"), "--no-measure", "--no-progress"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topk_topp_minp" in proc.stdout and "goal us" in proc.stdout

    header, rows = _read(out / "model.csv")
    assert header == MODEL_COLUMNS
    assert [(r["scenario"], r["batch"], r["dtype"], r["vocab"]) for r in rows] == [
        ("plain", "1", "fp32", "8192"), ("topk_topp_minp", "1", "fp32", "8192")]
    row_bytes = 8192 * 4
    for r in rows:
        assert int(r["launches"]) > 0
        assert float(r["hbm_bytes_per_row"]) >= row_bytes  # at least one read of the logits row
        assert int(r["full_row_reads"]) >= 1
        assert float(r["model_us"]) > 0
        assert float(r["goal_us"]) == 15.0
    plain, trunc = rows
    assert float(trunc["hbm_bytes_per_row"]) > float(plain["hbm_bytes_per_row"])  # thresholds read the row again

    lheader, launches = _read(out / "model_launches.csv")
    assert {"scenario", "batch", "dtype", "kernel", "grid", "bytes", "instr_per_id", "regs", "spills",
            "est_us"} <= set(lheader)
    triton_rows = [x for x in launches if x["kind"] == "triton"]
    assert triton_rows and all(float(x["est_us"]) > 0 for x in launches if x["note"] != "host sync")
    for r in rows:  # the per-launch file adds up to the per-case one
        mine = [x for x in launches if x["scenario"] == r["scenario"]]
        assert math.isclose(sum(float(x["est_us"]) for x in mine), float(r["model_us"]), rel_tol=1e-2)
        assert sum(1 for x in mine if x["note"] != "host sync") == int(r["launches"])

    ok, why = _sass_available()
    if not ok:
        pytest.skip(f"SASS part skipped: {why}")
    for x in triton_rows:
        assert x["regs"] and int(x["regs"]) > 0, x
        assert x["spills"] != ""
    assert any(x["instr_per_id"] and float(x["instr_per_id"]) > 0 for x in triton_rows)
    assert all(float(r["max_instr_per_id"]) > 0 for r in rows)
    assert list((tmp_path / "cache").glob("*.sass"))
    # a second run reads every compiled specialisation from the cache
    proc = subprocess.run(cmd[:5] + ["plain"] + cmd[6:], env=_env(), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " 0 compiled now" in proc.stdout


_RECORD_VS_EXECUTE = textwrap.dedent("""
    import json, sys
    from fastsampler.bench.record import launch_signature, record_step
    out = {}
    for scenario in sys.argv[1].split(","):
        rec = record_step(scenario, 2, "fp32", 4096, execute=False)
        run = record_step(scenario, 2, "fp32", 4096, execute=True)
        out[scenario] = [launch_signature(rec) == launch_signature(run), len(rec.triton), len(rec.torch_ops),
                         [x.kernel for x in rec.triton] == [x.kernel for x in run.triton]]
    print(json.dumps(out))
""")


def test_record_only_equals_executed_launches(tmp_path):
    # record-only skips the kernels; the launch list (kernels, grids, constexprs, argument shapes / dtypes /
    # scalars, and the torch ops with their bytes) must be what an executed step launches
    scenarios = "plain,full"
    proc = subprocess.run([sys.executable, "-c", _RECORD_VS_EXECUTE, scenarios], env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for scenario, (same, n_triton, n_torch, same_kernels) in res.items():
        assert n_triton > 0 and n_torch >= 0, scenario  # the Triton step runs no torch op on the device
        assert same_kernels and same, f"{scenario}: record-only launches differ from the executed step"


SASS = """
\t\tFunction : _demo_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                         /* 0x0000000000007919 */
        /*0020*/                   LDG.E R2, desc[UR4][R2.64] ;                 /* 0x0000000402027981 */
        /*0030*/                   LDG.E R4, desc[UR4][R8.64] ;                 /* 0x0000000408047981 */
        /*0040*/                   LDG.E R5, desc[UR4][R6.64] ;                 /* 0x0000000406057981 */
        /*0050*/                   ISETP.NE.AND P1, PT, R5, RZ, PT ;            /* 0x000000ff0500720c */
        /*0060*/               @P1 BRA 0x40 ;                                   /* 0xfffffffc00d41947 */
        /*0070*/               @P0 BRA 0x20 ;                                   /* 0xffffffa800e80947 */
        /*0080*/                   STG.E desc[UR4][R2.64], R4 ;                 /* 0x0000000402007986 */
        /*0090*/              @!P2 EXIT ;                                       /* 0x000000000000a94d */
        /*00a0*/                   EXIT ;                                       /* 0x000000000000794d */
        /*00b0*/                   MUFU.RCP R4, R4 ;                            /* 0x0000000400047308 */
        /*00c0*/                   RET.REL.NODEC R2 0x0 ;                       /* 0xffffff3c02007950 */
        /*00d0*/                   BRA 0xd0;                                    /* 0xfffffffc00fc7947 */
"""


def test_parse_sass_finds_the_id_loop():
    from fastsampler.bench.sass import parse_sass

    res = parse_sass(SASS)
    assert res["total_instr"] == 14
    assert res["main_instr"] == 11  # reachable from the entry: no subroutine, no trailing self-branch
    # [header, body, global loads, own global loads, own instructions]: the loop 0x20..0x70 holds 0x40..0x60
    assert res["loops"] == [[0x20, 6, 3, 2, 3], [0x40, 3, 1, 1, 3]]
    assert res["id_loops"] == [[0x20, 6, 3, 2, 3]]  # most own instructions, then own loads; the nested one once
    assert res["loop_body"] == 6


def test_roofline_and_goals():
    from fastsampler.bench.roofline import GPUS, estimate, goal_us

    h200 = GPUS["h200"]
    assert h200.issue_rate == pytest.approx(132 * 4 * 32 * 1.98e9)
    big = estimate(1e9, 0.0, 10_000, h200)  # memory bound at the full bandwidth
    assert big.bound == "memory" and big.total_us == pytest.approx(1e9 / 4.8e12 * 1e6 + 1.0)
    one = estimate(1e6, 0.0, 1, h200)  # one program: one SM's share of the bandwidth x the factor
    assert one.memory_us == pytest.approx(1e6 / (4.8e12 / 132 * h200.per_sm_bw_factor) * 1e6)
    assert estimate(0, 1e9, 1, h200).compute_us == pytest.approx(132 * estimate(0, 1e9, 10_000, h200).compute_us)
    assert estimate(0, 0, 1, h200, graph=False).total_us == h200.launch_us_stream
    assert GPUS["h100"].hbm_bytes_per_s == 3.35e12
    assert [goal_us("plain", b) for b in (1, 64, 256)] == [15.0, 9.7, 39.0]
    assert goal_us("topk_topp_minp", 64) == pytest.approx(14.55) and goal_us("full", 256) == 78.0
    assert goal_us("greedy", 256) == 39.0 and goal_us("mirostat_v1", 64) == pytest.approx(19.4)
    assert goal_us("typical", 1) == 15.0 and math.isnan(goal_us("plain", 8))


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the module is skipped
    triton = None

if triton is not None:
    @triton.jit
    def _demo_helper(p, offs):
        return tl.load(p + offs)

    @triton.jit
    def _demo_kernel(x_ptr, idx_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        i = tl.load(idx_ptr + offs)  # data: a store at out_ptr + i is not a store to idx_ptr
        v = _demo_helper(x_ptr, offs)  # a load inside a helper is a load of the caller's x_ptr
        q = out_ptr + i
        tl.store(q, v, mask=offs < n)


def test_pointer_access_follows_helpers():
    from fastsampler.bench.access import pointer_access

    acc = pointer_access(__name__, "_demo_kernel", ("x_ptr", "idx_ptr", "out_ptr"))
    assert acc == {"x_ptr": {"load"}, "idx_ptr": {"load"}, "out_ptr": {"store"}}
