"""Issue 12, sampling at the edges (the sampler sections of run.pyx and runq.pyx): an infinite
temperature samples uniformly as run.c built with -O3 does (with -Ofast the division by inf gave
NaN logits and <unk> forever), and a top-p cut-off that leaves no candidate picks the nucleus's
one token instead of reading before the array (run.c's bug). And the fast samplers of
sampling.pxi, greedy 16 logits at a time and top-p without qsort, take run.c's token on every
kind of distribution."""
import subprocess
import sys

import numpy as np
import pytest

import run
import runq
from tests.helpers import REPO, TESTDATA, in_build
from tests.test_f32dot import cpu_flags

MODULES = {"run": run, "runq": runq}
ENGINES = {"run": run._run, "runq": runq._runq}  # their compiled modules (sample_topp_of)
MODELS = {"run": TESTDATA / "tiny_mha.bin", "runq": TESTDATA / "tiny_mha_q80.bin"}
MASK = (1 << 64) - 1


def random_u32(state):
    """run.c's xorshift64*: (new state, 32-bit output)."""
    state ^= state >> 12
    state ^= (state << 25) & MASK
    state ^= state >> 27
    return state, ((state * 0x2545F4914F6CDD1D) & MASK) >> 32


def uniform_tokens(seed, count):
    """Tokens drawn uniformly from 512 with run.c's coin: every probability is exactly 1/512,
    so sample_mult returns floor(coin * 512), the top 9 of the coin's 24 bits."""
    state, tokens = seed, []
    for _ in range(count):
        state, value = random_u32(state)
        tokens.append(value >> 23)
    return tokens


HUGE = [float("inf"), 1e39, 3.4e38, 1e38]  # 1e39 is inf as a float32; the others are finite


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES)
@pytest.mark.parametrize("temperature", HUGE)
def test_huge_temperature_samples_uniformly(module, temperature):
    logits = np.random.default_rng(0).normal(0, 5, 512).astype(np.float32)
    for topp in (0.0, 1.0):  # both mean plain multinomial sampling
        sampler = module.Sampler(512, temperature, topp, 42)
        got = [sampler.sample(logits.copy()) for _ in range(200)]
        assert got == uniform_tokens(42, 200)


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES)
def test_infinite_temperature_with_top_p(module):
    """All 512 tokens equally likely: the nucleus of top-p 0.9 has 461 of them; which ones
    depends on how qsort orders ties, so only the spread is checked."""
    logits = np.random.default_rng(1).normal(0, 5, 512).astype(np.float32)
    sampler = module.Sampler(512, float("inf"), 0.9, 7)
    got = [sampler.sample(logits.copy()) for _ in range(3000)]
    assert all(0 <= t < 512 for t in got)
    assert len(set(got)) > 400
    assert max(np.bincount(got)) < 30  # no token drawn far more than its share (~6.5)


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES)
def test_top_p_without_candidates_gives_the_most_likely_token(module):
    """Nearly flat logits and top-p below 1/n: no probability reaches the cut-off (1 - topp) /
    (n - 1), and the nucleus is the single most likely token. run.c returned probindex[-1]."""
    logits = np.zeros(512, np.float32)
    logits[137] = 1e-3
    for seed in range(1, 20):
        assert module.Sampler(512, 1.0, 1e-4, seed).sample(logits.copy()) == 137
    assert module.Sampler(1, 1.0, 0.5, 3).sample(np.zeros(1, np.float32)) == 0  # n - 1 = 0


def printable(piece):
    """safe_printf's test: whole pieces, or single bytes that are printable or white space."""
    return bool(piece) and (len(piece) > 1 or 0x20 <= piece[0] <= 0x7E or piece[0] in b" \t\n\v\f\r")


@pytest.mark.parametrize("prog", MODULES)
@pytest.mark.parametrize("temperature", ["inf", "1e39"])
def test_cli_infinite_temperature_prints_uniform_tokens(prog, temperature):
    proc = subprocess.run([sys.executable, "-m", prog, MODELS[prog], "-z", TESTDATA / "tok512.bin",
                           "-t", temperature, "-p", "1", "-s", "42", "-n", "60"],
                          cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tokenizer = MODULES[prog].Tokenizer(str(TESTDATA / "tok512.bin"), 512)
    expected, token = b"", 1
    for next_token in uniform_tokens(42, 60):
        if next_token == 1:  # BOS ends the generation
            break
        piece = tokenizer.decode(token, next_token)
        expected += piece if printable(piece) else b""
        token = next_token
    assert proc.stdout == expected + b"\n"
    assert b"<unk>" not in proc.stdout


# ----------------------------------------------------------------------------
# greedy: sample() at temperature 0 takes sampling.pxi's sample_argmax_fast, which must return
# run.c's sample_argmax's index (the first of the largest) for every row of logits

def argmax_cases(rng):
    """(name, float32 values) of many kinds: every length around the 16-value steps, the largest
    first, last, tied, at a step's edge, and values no softmax gives."""
    for n in (1, 2, 15, 16, 17, 31, 32, 33, 48, 511, 32000, 128256):
        yield f"normal {n}", rng.standard_normal(n).astype(np.float32)
    rising = np.arange(1000, dtype=np.float32)  # a larger value in every step: the slow path
    yield "rising", rising
    yield "falling", rising[::-1].copy()  # the first is the largest
    tied = np.round(rng.standard_normal(32000)).astype(np.float32)
    yield "tied", tied  # the first of many equal largest
    yield "all equal", np.full(100, np.float32(-3))
    for position in (0, 1, 15, 16, 17, 31999):
        values = rng.standard_normal(32000).astype(np.float32)
        values[position] = 10
        values[position + 1 if position < 31999 else 3] = 10  # tied with a later (or earlier) one
        yield f"largest at {position}", values
    odd = rng.standard_normal(100).astype(np.float32)
    odd[[5, 50]] = np.inf
    yield "infinity", odd
    yield "all -infinity", np.full(40, -np.inf, np.float32)
    low = np.full(40, np.float32(-1e38))
    low[33] = -np.inf
    yield "-infinity among the lowest", low


def nan_cases(rng):
    """Rows with NaN, as JSON-safe lists (in_build's argmax): C's > is false beside a NaN, so
    run.c's loop passes over them, and an all-NaN row (or one that starts with NaN) gives 0."""
    values = [float(v) for v in rng.standard_normal(100).astype(np.float32)]
    with_nan = list(values)
    for i in (3, 40, 99):
        with_nan[i] = "nan"
    first_nan = ["nan"] + values[1:]
    return [with_nan, first_nan, ["nan"] * 40, values[:20] + ["nan"] * 20 + ["inf"] + values[:3]]


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES)
def test_fast_argmax_takes_what_run_c_takes(engine):
    rng = np.random.default_rng(5)
    for name, values in argmax_cases(rng):
        expected = engine.sample_argmax_of(values, reference=True)
        assert engine.sample_argmax_of(values) == expected, name
        finite = values[np.isfinite(values)]
        if len(finite) == len(values):
            assert expected == int(np.argmax(values)), name  # numpy's too: the first largest


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES)
def test_greedy_sampler_takes_the_first_largest(module):
    logits = np.random.default_rng(6).standard_normal(32000).astype(np.float32)
    logits[[7000, 20000]] = logits.max() + 1
    assert module.Sampler(32000, 0.0, 0.9, 1).sample(logits) == 7000


# flags, the CPU features they need, and the path of argmax.h they select
ARGMAX_BUILDS = {"ieee": (["-O3"], set(), "plain"),
                 "ieee-avx": (["-O3", "-mavx"], {"avx"}, "avx"),
                 "ieee-avx512": (["-O3", "-mavx512f"], {"avx512f"}, "avx512"),
                 "fast": (["-Ofast"], set(), "plain"),
                 "fast-avx2": (["-Ofast", "-march=haswell"], {"avx2", "fma", "bmi2", "movbe"}, "avx"),
                 "fast-avx512": (["-Ofast", "-march=skylake-avx512"],
                                 {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}, "avx512")}


@pytest.mark.parametrize("build", ARGMAX_BUILDS)
def test_every_argmax_path_takes_what_run_c_takes(build, tmp_path):
    """The extension is built for one CPU: tests/argmax_check.c holds each path of argmax.h that
    this CPU can run (plain, AVX, AVX-512; IEEE and fast-math) to run.c's loop on 20000 rows."""
    flags, needs, path = ARGMAX_BUILDS[build]
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
    exe = tmp_path / "argmax_check"
    subprocess.run(["gcc", *flags, "-Wall", "-Werror", "-I", str(REPO), str(REPO / "tests" / "argmax_check.c"),
                    "-o", str(exe), "-lm"], check=True)
    chosen, compared, differ = subprocess.run([str(exe)], capture_output=True, text=True,
                                              check=True).stdout.split()
    assert (chosen, int(compared), int(differ)) == (path, 20000, 0)


@pytest.mark.parametrize("prog", MODULES)
def test_fast_argmax_with_nan_in_the_exact_build(prog):
    """NaN, in the IEEE build (make run's flags), where C's comparisons with NaN are defined: the
    fast build assumes there is none."""
    fast, reference = in_build("exact", "argmax", prog=prog, cases=nan_cases(np.random.default_rng(7)))
    assert fast == reference
    assert reference[1:3] == [0, 0]


# ----------------------------------------------------------------------------
# top-p: sample() draws with sampling.pxi's sample_topp_fast, which must return the token of run.c's
# sample_topp (qsort and all) for every distribution, topp and coin

def softmax32(logits):
    e = np.exp(logits - logits.max())
    return (e / e.sum()).astype(np.float32)


def distributions(n, rng):
    """(name, float32 probabilities of n tokens) of many kinds, ties included."""
    normal = rng.standard_normal(n)
    yield "flat", softmax32(0.5 * normal)  # nearly every token a candidate
    yield "spread", softmax32(2 * normal)
    yield "peaked", softmax32(8 * normal)  # a few candidates
    one_hot = np.zeros(n)
    one_hot[rng.integers(n)] = 30
    yield "one token", softmax32(one_hot)
    yield "tied everywhere", softmax32(np.round(2 * normal))  # a few distinct values
    yield "uniform", np.full(n, np.float32(1 / n))
    top = 3 * normal
    top[rng.choice(n, 4, replace=False)] = top.max() + 1  # 4 tokens tied for the top
    yield "tied top", softmax32(top)
    tail = 3 * normal
    low = tail < np.median(tail)
    tail[low] = np.round(tail[low])  # the tail tied, the head distinct
    yield "tied tail", softmax32(tail)
    yield "unnormalized", (0.5 * softmax32(normal)).astype(np.float32)  # the sum never reaches topp
    # float32's own rounding ties some probabilities of a flat distribution over many tokens
    yield "rounding ties", softmax32(0.01 * normal)


TOPPS = [1e-4, 0.05, 0.5, 0.9, 0.99, float(np.float32(1 - 2 ** -24))]  # the last: just under 1


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES)
@pytest.mark.parametrize("n", [512, 32000, 49152, 128256])
def test_fast_top_p_draws_what_run_c_draws(engine, n):
    rng = np.random.default_rng(n)
    coins = np.float32([0.0, 0.5, 1 - 2 ** -24, rng.random()])
    drawn = set()
    for name, probabilities in distributions(n, rng):
        for topp in TOPPS:
            for coin in coins:
                expected = engine.sample_topp_of(probabilities, topp, coin, reference=True)
                assert engine.sample_topp_of(probabilities, topp, coin) == expected, (name, topp, coin)
                drawn.add(expected)
    assert len(drawn) > 20  # many different tokens were drawn


@pytest.mark.parametrize("prog", MODULES)
def test_fast_top_p_draws_what_run_c_draws_in_the_exact_build(prog):
    """The same in the IEEE build (make run's flags): no fast-math there, on either side."""
    for n in (32000, 128256):
        fast, reference = in_build("exact", "top_p", prog=prog, n=n, seed=n)
        assert fast == reference and len(set(reference)) > 10


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES)
def test_fast_top_p_edges(engine):
    """What sample_topp does with probabilities no softmax gives (NaN, infinity, negative), a
    single token, and an empty nucleus, the fast path does too."""
    p = softmax32(np.random.default_rng(3).standard_normal(1000))
    odd = [p.copy() for _ in range(3)]
    odd[0][10] = np.nan
    odd[1][20] = np.inf
    odd[2][30] = -0.5
    cases = [(q, topp, coin) for q in odd for topp in (0.5, 0.9) for coin in (0.1, 0.7)]
    cases += [(np.ones(1, np.float32), 0.5, 0.3), (np.full(1000, np.float32(1e-3)), 1e-4, 0.2)]
    for probabilities, topp, coin in cases:
        coin = np.float32(coin)
        assert (engine.sample_topp_of(probabilities, topp, coin)
                == engine.sample_topp_of(probabilities, topp, coin, reference=True))
