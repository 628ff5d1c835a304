"""The GPU compile check itself: it must compile real specialisations, and it must fail
on a spilling one. Runs in subprocesses: under TRITON_INTERPRET=1 (set for this test
session) @triton.jit builds interpreter functions, which cannot be compiled."""

import os
import subprocess
import sys
import textwrap

import pytest


def _run(args, code=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", textwrap.dedent(code)] if code else [
        sys.executable, "-m", "t2i_kernels.aot", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_aot_compiles_shipped_specialisations_for_sm80_and_sm90():
    result = _run(["--only", "vq", "--match", "fp16 D=64", "--arch", "80", "90"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| _vq")]
    assert len(rows) == 6 and all(row.rstrip().endswith("| ok |") for row in rows)
    assert {"sm_80", "sm_90"} <= {cell.strip() for row in rows for cell in row.split("|")}


@pytest.mark.slow
def test_aot_reports_spills_and_the_jit_specialisation():
    result = _run([], code="""
        import torch
        from t2i_kernels import aot, vq
        bad = dict(vq.vq_config(64, torch.float32), BLOCK_D=64, SINGLE_D=True, num_stages=1,
                   num_warps=4)  # tf32x3 with z held in registers: known to spill
        launches = []
        with aot.recording(lambda k, g, a, kw: launches.append(aot.Launch("vq", "bad", k, a, kw))):
            vq.vq_lookup_fwd(torch.empty(256, 64), torch.empty(512, 64), config=bad)
        src, options = aot.specialise(launches[0], 80)
        print(src.signature["stride_zd"] == "constexpr", src.signature["z_ptr"], options)
        report = aot.compile_one(launches[0], 80)
        print(report.ok, report.spill_bytes > 0, report.has_dot, report.tensor_core_ops > 0)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # contiguous z: the JIT turns stride 1 into a constant, exactly as a GPU launch would
    assert lines[0] == "True *fp32 {'num_warps': 4, 'num_stages': 1}", lines
    assert lines[1] == "False True True True", lines  # not ok: it spills; it has tensor cores
