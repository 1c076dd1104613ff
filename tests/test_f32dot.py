"""f32dot.h, the products of forward_batch (which decodes and takes prompts): the order of each sum
is what the header says on every CPU, and does not depend on the batch or the tile.

The extension is built for one CPU, so here a small C program including the header
(tests/f32dot_check.c) is compiled with each set of flags that this CPU can run, and its products
(all rows and vectors at once, then one row and one vector at a time) are compared:
  - the IEEE build (make run's -O3): numpy's sequential float32 sum of the float32 products, which
    is run.c's loop, bit for bit;
  - fast-math builds with FMA, AVX2 or AVX-512: one result, bit for bit, whatever the vector width;
  - every build: batched products equal one-at-a-time products bit for bit, and all are within
    rounding of the float64 dot product."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# flags, the CPU features (/proc/cpuinfo) they need
BUILDS = {"ieee": (["-O3"], set()),
          "fast-sse": (["-Ofast"], set()),
          "fast-avx2": (["-Ofast", "-march=haswell"], {"avx2", "fma", "bmi2", "movbe"}),
          "fast-avx512": (["-Ofast", "-march=skylake-avx512"], {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"})}
# (n, d, B): columns with and without a tail of fewer than 16, row counts that are and are not
# multiples of the tiles, batch sizes around the tile's 4 vectors; rows long enough to go in
# chunks of columns (f32dot.h's F32_LONG_ROW) with the 8 groups of vectors or more that takes
SHAPES = [(16, 4, 1), (100, 13, 7), (96, 8, 16), (773, 5, 9), (4, 3, 2), (300, 17, 33), (128, 37, 2),
          (64, 48, 1), (4100, 9, 37)]


def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the extension and this check")
    flags, out = cpu_flags(), {}
    directory = tmp_path_factory.mktemp("f32dot")
    for name, (cflags, needs) in BUILDS.items():
        if needs <= flags:
            exe = directory / name
            subprocess.run(["gcc", *cflags, "-Wall", "-Werror", "-I", str(REPO),
                            str(REPO / "tests" / "f32dot_check.c"), "-o", str(exe)], check=True)
            out[name] = exe
    return out


def products(exe, n, d, B, seed=3):
    raw = subprocess.run([str(exe), str(n), str(d), str(B), str(seed)], capture_output=True,
                         check=True).stdout
    values = np.frombuffer(raw, dtype=np.float32).reshape(6, B, d)
    return values[0], values[1]


def padded_products(exe, n, d, B, seed=3):
    """f32_matmul_rows over all rows at once with x's vectors f32_token_stride apart and the
    outputs d + 5 apart."""
    raw = subprocess.run([str(exe), str(n), str(d), str(B), str(seed)], capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, dtype=np.float32).reshape(6, B, d)[5]


def scores(exe, n, d, B, seed=3):
    """f32_scores of each x against w's rows as keys, on whole rows, then on their first halves
    (stride n), and f32_matmul_rows on those halves as a matrix of their own."""
    raw = subprocess.run([str(exe), str(n), str(d), str(B), str(seed)], capture_output=True,
                         check=True).stdout
    values = np.frombuffer(raw, dtype=np.float32).reshape(6, B, d)
    return values[2], values[3], values[4]


def inputs(n, d, B, seed=3):
    """f32dot_check's pseudo-random w (d, n) and x (B, n), made the same way here."""
    state = seed | 1
    mask = (1 << 64) - 1
    values = []
    for _ in range(n * d + n * B):
        state ^= state >> 12
        state ^= (state << 25) & mask
        state ^= state >> 27
        bits = ((state * 0x2545F4914F6CDD1D) & mask) >> 32
        v = np.float32(bits >> 8) / np.float32(8388608.0) - np.float32(1.0)
        if bits & 15 == 0:
            v = v * np.float32(1024.0)
        elif bits & 15 == 1:
            v = v / np.float32(4096.0)
        values.append(v)
    values = np.array(values, dtype=np.float32)
    return values[:n * d].reshape(d, n), values[n * d:].reshape(B, n)


@pytest.mark.parametrize("n, d, B", SHAPES)
def test_batched_equals_one_at_a_time(programs, n, d, B):
    for name, exe in programs.items():
        together, alone = products(exe, n, d, B)
        assert np.array_equal(together, alone), name
        assert np.array_equal(together, padded_products(exe, n, d, B)), name
        w, x = inputs(n, d, B)
        exact = x.astype(np.float64) @ w.T.astype(np.float64)
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
        assert np.all(np.abs(together - exact) <= 1e-5 * scale + 1e-30), name


@pytest.mark.parametrize("n, d, B", SHAPES)
def test_ieee_build_sums_in_runc_order(programs, n, d, B):
    w, x = inputs(n, d, B)
    # run.c's `val += w[i * n + j] * x[j]`, j in order: cumsum adds one term after another
    expected = np.stack([np.cumsum(w * x[b], axis=1, dtype=np.float32)[:, -1] for b in range(B)])
    together, _ = products(programs["ieee"], n, d, B)
    assert np.array_equal(together, expected)


@pytest.mark.parametrize("n, d, B", SHAPES)
def test_fma_builds_agree_whatever_the_vector_width(programs, n, d, B):
    fma = [name for name in ("fast-avx2", "fast-avx512") if name in programs]
    if len(fma) < 2:
        pytest.skip(f"this CPU runs {fma or 'no FMA build'}: nothing to compare")
    first = products(programs[fma[0]], n, d, B)[0]
    assert np.array_equal(first, products(programs[fma[1]], n, d, B)[0])
    for mine, theirs in zip(scores(programs[fma[0]], n, d, B), scores(programs[fma[1]], n, d, B)):
        assert np.array_equal(mine, theirs)


@pytest.mark.parametrize("n, d, B", SHAPES)
def test_attention_scores_are_the_products(programs, n, d, B):
    # forward_batch's scores (16 keys at a time on AVX-512) are the products of q and each key as
    # a one-row matrix, bit for bit, whatever the key's stride; in the IEEE build, in run.c's order
    for name, exe in programs.items():
        together, _ = products(exe, n, d, B)
        whole, halves, halves_as_matrix = scores(exe, n, d, B)
        assert np.array_equal(whole, together), name
        assert np.array_equal(halves, halves_as_matrix), name
    w, x = inputs(n, d, B)
    half = (n + 1) // 2
    expected = np.stack([np.cumsum(w[:, :half] * x[b, :half], axis=1, dtype=np.float32)[:, -1]
                         for b in range(B)])
    assert np.array_equal(scores(programs["ieee"], n, d, B)[1], expected)
