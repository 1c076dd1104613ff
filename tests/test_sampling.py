"""Issue 12, sampling at the edges (the sampler sections of run.pyx and runq.pyx): an infinite
temperature samples uniformly as run.c built with -O3 does (with -Ofast the division by inf gave
NaN logits and <unk> forever), and a top-p cut-off that leaves no candidate picks the nucleus's
one token instead of reading before the array (run.c's bug)."""
import subprocess
import sys

import numpy as np
import pytest

import run
import runq
from tests.helpers import REPO, TESTDATA

MODULES = {"run": run, "runq": runq}
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
