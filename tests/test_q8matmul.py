"""q8matmul.h, runq's int8 matmul kernels: each path (AVX-512 VNNI, AVX2, plain C) checked by a
small C program (tests/q8matmul_check.c) compiled for each -march whose path this CPU can run.

The extension is built with one -march, so it runs one path; the check program runs the others.
With IEEE flags each path must give its reference's numbers bit for bit (runq.c's loop on the plain
path, the fused float step on the SIMD paths), and with the fast build's flags (-Ofast) as with
IEEE ones, a row times T tokens at once must give what it gives one token at a time: the property
forward_batch's equality with forward() rests on."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runq
from tests.helpers import assert_one_line_error, in_build, run_cli

REPO = Path(__file__).resolve().parent.parent
# the target flags, the path they select, the CPU flags (/proc/cpuinfo) it needs
V3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
TARGETS = [(["-march=x86-64"], "plain", set()),
           (["-march=x86-64-v3"], "avx2", V3),
           (["-march=x86-64-v4", "-mavx512vnni"], "avx512vnni",
            V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"})]
FLAGS = {"exact": ["-O3", "-ffp-contract=off"], "fast": ["-Ofast", "-fopenmp"]}


def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_amx(cpu):
    """Whether /proc/cpuinfo lists AMX-INT8 (Linux lists it only where it supports the tiles)."""
    return cpu is not None and {"amx_tile", "amx_int8"} <= cpu


def check(tmp_path, march, flags):
    """Build and run the check program: (path, values compared, differing from one token at a
    time, differing from the reference, values compared from the packed layout, differing,
    values compared from the AMX kernel, differing, the kernel chosen for 2 or more tokens)."""
    if shutil.which("gcc") is None or sys.platform != "linux":
        pytest.skip("the check program is built with gcc on Linux")
    exe = tmp_path / "q8matmul_check"
    subprocess.run(["gcc", *FLAGS[flags], *march, "-I", str(REPO),
                    str(REPO / "tests" / "q8matmul_check.c"), "-o", str(exe), "-lm"], check=True)
    counts, chosen = subprocess.run([str(exe), flags], capture_output=True, text=True,
                                    check=True).stdout.splitlines()
    path, *counts = counts.split()
    return (path, *map(int, counts), chosen)


@pytest.mark.parametrize("flags", sorted(FLAGS))
@pytest.mark.parametrize("march, kernel, needs", TARGETS, ids=[t[1] for t in TARGETS])
def test_path(march, kernel, needs, flags, tmp_path):
    cpu = cpu_flags()
    if cpu is None or not needs <= cpu:
        pytest.skip(f"this CPU cannot run the {kernel} path")
    (path, compared, differ_alone, differ, compared_packed, differ_packed, compared_amx, differ_amx,
     chosen) = check(tmp_path, march, flags)
    assert path == kernel
    assert compared > 100_000
    assert differ_alone == 0  # T tokens at once == one at a time, bit for bit
    assert differ == 0  # == the reference, bit for bit (checked with the exact flags only)
    # the packed layout (AVX-512 VNNI only) == the file's layout, bit for bit
    assert (compared_packed > 50_000) == (kernel == "avx512vnni")
    assert differ_packed == 0
    # AMX, on the real tiles, where the CPU has them: chosen, and == AVX-512 VNNI bit for bit
    amx = kernel == "avx512vnni" and cpu_has_amx(cpu)
    assert chosen == ("amx+" if amx else "") + kernel
    assert (compared_amx > 30_000) == amx
    assert differ_amx == 0


def emulated_amx_check(tmp_path, flags, *defines):
    """check() of the AVX-512 VNNI path built with AMX emulated (Q8_AMX_EMULATE) and defines:
    (the kernel chosen, its name, values differing from one token at a time, from the reference
    and from the packed layout, values compared from the packed layout and from AMX, differing)."""
    march, kernel, needs = TARGETS[-1]
    cpu = cpu_flags()
    if cpu is None or not needs <= cpu:
        pytest.skip("the AMX kernel is built on the AVX-512 VNNI path, which this CPU cannot run")
    (path, _, differ_alone, differ, compared_packed, differ_packed, compared_amx, differ_amx,
     chosen) = check(tmp_path, [*march, "-DQ8_AMX_EMULATE", *defines], flags)
    assert path == kernel
    return chosen, kernel, (differ_alone, differ, differ_packed), compared_packed, compared_amx, differ_amx


@pytest.mark.parametrize("flags", sorted(FLAGS))
def test_amx_emulated(flags, tmp_path):
    # the AMX kernel's logic on emulated tiles (Intel's definitions of the instructions, in C):
    # chosen, its self-check passed, and == AVX-512 VNNI bit for bit for T = 2 .. 40, gs 32 and
    # 64, rows and columns that are not whole blocks, extreme values (and == the reference, exact)
    chosen, kernel, differing, _, compared_amx, differ_amx = emulated_amx_check(tmp_path, flags)
    assert chosen == "amx+" + kernel
    assert differing == (0, 0, 0)
    assert compared_amx > 30_000
    assert differ_amx == 0


@pytest.mark.parametrize("flags", sorted(FLAGS))
def test_amx_that_fails_its_self_check_is_not_used(flags, tmp_path):
    # emulated tiles that get one sum wrong: the self-check against AVX-512 VNNI catches it, the
    # kernel's name says so, and every product stays on VNNI (no AMX value to compare)
    chosen, kernel, differing, compared_packed, compared_amx, differ_amx = emulated_amx_check(
        tmp_path, flags, "-DQ8_AMX_EMULATE_FAULT")
    assert chosen == kernel + " (AMX failed its self-check: not used)"
    assert differing == (0, 0, 0)
    assert compared_packed > 50_000
    assert (compared_amx, differ_amx) == (0, 0)


def test_builds_say_which_path():
    # the fast build (-march=native) takes the path the check program takes on this CPU with
    # -march=native; the exact build (no -march) takes the plain loop, runq.c's arithmetic
    if shutil.which("gcc") is None or sys.platform != "linux":
        pytest.skip("the check program is built with gcc on Linux")
    native = subprocess.run(["gcc", "-march=native", "-E", "-P", "-x", "c", "-I", str(REPO), "-"],
                            input='#include "q8matmul.h"\nkernel=Q8_KERNEL\n', capture_output=True,
                            text=True, check=True).stdout
    assert f'kernel="{runq.INT8_KERNEL}"' in native.replace(" ", "")
    assert in_build("exact", "int8_kernel") == "plain"


def test_batch_kernel_choice_and_override(monkeypatch, tmp_path):
    # chosen at run time: AMX on the AVX-512 VNNI build of a CPU with AMX-INT8, else the build's
    # kernel; LLAMA2_INT8_KERNEL=<the build's kernel> keeps AMX off; another value is refused
    amx = runq.INT8_KERNEL == "avx512vnni" and cpu_has_amx(cpu_flags())
    monkeypatch.delenv("LLAMA2_INT8_KERNEL", raising=False)
    assert in_build("fast", "int8_batch_kernel") == ("amx+" if amx else "") + runq.INT8_KERNEL
    assert in_build("exact", "int8_batch_kernel") == "plain"
    for value in ("auto", ""):
        monkeypatch.setenv("LLAMA2_INT8_KERNEL", value)
        assert in_build("fast", "int8_batch_kernel") == ("amx+" if amx else "") + runq.INT8_KERNEL
    monkeypatch.setenv("LLAMA2_INT8_KERNEL", runq.INT8_KERNEL)
    assert in_build("fast", "int8_batch_kernel") == runq.INT8_KERNEL
    model = REPO / "testdata" / "tiny_gqa_q80.bin"
    proc = run_cli("runq", [model, "-n", "4"], env={**os.environ, "LLAMA2_INT8_KERNEL": "amx"})
    err = assert_one_line_error(proc)
    assert "LLAMA2_INT8_KERNEL='amx'" in err


@pytest.mark.parametrize("shape, group_size", [
    # dim 96 is 3 groups of 32 (not a multiple of 64), hidden_dim 224 is 7, vocab 500 is not
    # made of blocks of 16 rows
    (dict(dim=96, hidden_dim=224, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=500, seq_len=48), 32),
    (dict(dim=128, hidden_dim=320, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=500, seq_len=48), 64),
])
def test_amx_through_runq(shape, group_size, monkeypatch, tmp_path):
    # on a CPU with AMX-INT8 the real tiles run forward_prompt's products (2 or more tokens),
    # and the logits are bit for bit those of forward() one token at a time (AVX-512 VNNI)
    monkeypatch.delenv("LLAMA2_INT8_KERNEL", raising=False)
    kernel = in_build("fast", "int8_batch_kernel")
    if not kernel.startswith("amx+"):
        pytest.skip(f"runq does not use AMX on this CPU (int8_batch_kernel() is {kernel!r}); "
                    "test_amx_emulated checks the AMX kernel under emulation")
    from llama2_cython import export
    from tests.test_runq import write_v2
    path = tmp_path / "model_q80.bin"
    write_v2(path, shape, export.random_model(shape, seed=7, shared=False), group_size, False)
    tokens = [(37 * i + 11) % shape["vocab_size"] for i in range(45)]
    rows = in_build("fast", "prefill_vs_forward", prog="runq", model=str(path), tokens=tokens,
                    sizes=[2, 3, 16, 17, 31, 45])
    for row in rows:  # [n, prompt == forward(), ..., next forward() == forward(), ...]
        assert row[1], row
        assert len(row) == 4 or row[4], row
