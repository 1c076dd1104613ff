"""run.pyx against references: C logits, the NumPy forward, v0 == v1, and the Python API."""
import json
import subprocess
import sys

import numpy as np
import pytest

from llama2_cython import export
import run
from tests.helpers import BUILDS, REPO, TESTDATA, c_logits, fixture_path, in_build, run_cli
from tests.reference import ReferenceTransformer

LOGIT_TOKENS = json.loads((TESTDATA / "logits" / "README.json").read_text())["tokens"]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("model", ["tiny_mha", "tiny_gqa", "stories260K"])
def test_logits_match_c(model, build):
    """forward() at 16 positions against C's forward() (gcc -O2). The exact build sums in C's
    order with the same libm, so its logits are C's to the bit; -Ofast reorders the sums."""
    expected = c_logits(model, "run")
    got = np.array(in_build(build, "logits", prog="run", model=str(fixture_path(model + ".bin")),
                            tokens=LOGIT_TOKENS), dtype=np.float32)
    if build == "exact":
        np.testing.assert_array_equal(got, expected)
    else:
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("model", ["tiny_mha", "tiny_gqa"])
def test_v1_file_gives_v0_output(model):
    v0 = run.Transformer(str(TESTDATA / f"{model}.bin"))
    v1 = run.Transformer(str(TESTDATA / f"{model}.v1.bin"))
    assert (v0.version, v1.version) == (0, 1)
    assert v0.config == v1.config and v0.shared_weights == v1.shared_weights
    for name, tensor in v0.weights.items():
        np.testing.assert_array_equal(v1.weights[name], tensor, err_msg=name)
    for pos, tok in enumerate(LOGIT_TOKENS):
        np.testing.assert_array_equal(v1.forward(tok, pos), v0.forward(tok, pos))
    args = ["-z", TESTDATA / "tok512.bin", "-t", "0.9", "-s", "11", "-n", "60", "-i", "A fox"]
    out0 = run_cli("run", [TESTDATA / f"{model}.bin", *args])
    out1 = run_cli("run", [TESTDATA / f"{model}.v1.bin", *args])
    assert out0.returncode == out1.returncode == 0
    assert out1.stdout == out0.stdout and len(out0.stdout) > 20


SHAPES = {
    "mha_shared": dict(dim=32, hidden_dim=88, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=70, seq_len=24),
    "gqa_separate": dict(dim=48, hidden_dim=128, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=100, seq_len=20),
    "mqa_shared": dict(dim=64, hidden_dim=96, n_layers=1, n_heads=8, n_kv_heads=1, vocab_size=300, seq_len=16),
    "one_head_separate": dict(dim=16, hidden_dim=40, n_layers=2, n_heads=1, n_kv_heads=1, vocab_size=33, seq_len=12),
}


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_forward_matches_numpy_reference(tmp_path, shape, version):
    config = SHAPES[shape]
    shared = shape.endswith("shared")
    weights = export.random_model(config, seed=len(shape), shared=shared)
    path = tmp_path / "model.bin"
    (export.write_v0 if version == 0 else export.write_v1)(path, config, weights, shared)
    transformer = run.Transformer(str(path))
    assert transformer.config == config and transformer.shared_weights == shared
    reference = ReferenceTransformer(config, weights)
    rng = np.random.default_rng(0)
    for pos in range(config["seq_len"]):
        token = int(rng.integers(config["vocab_size"]))
        expected = reference.forward(token, pos)
        got = transformer.forward(token, pos)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_weights_are_mapped_not_copied():
    transformer = run.Transformer(str(TESTDATA / "tiny_gqa.bin"))
    weights = transformer.weights
    assert not weights["wq"].flags.owndata and not weights["wq"].flags.writeable
    assert weights["wcls"].shape == weights["token_embedding_table"].shape
    assert not np.shares_memory(weights["wcls"], weights["token_embedding_table"])  # separate
    shared = run.Transformer(str(TESTDATA / "tiny_mha.bin")).weights
    assert np.shares_memory(shared["wcls"], shared["token_embedding_table"])


def test_api_generate_is_what_the_cli_prints():
    model = run.Model(str(TESTDATA / "tiny_gqa.bin"), str(TESTDATA / "tok512.bin"))
    text = "".join(model.generate("Once upon a time", steps=50, temperature=0.8, topp=0.9, seed=5))
    proc = run_cli("run", [TESTDATA / "tiny_gqa.bin", "-z", TESTDATA / "tok512.bin", "-n", "50",
                           "-t", "0.8", "-p", "0.9", "-s", "5", "-i", "Once upon a time"])
    assert proc.stdout.decode("utf-8", "replace") == text + "\n"
    assert text.startswith("Once upon a time")


def test_api_forward_encode_decode():
    model = run.Model(str(TESTDATA / "tiny_mha.bin"), str(TESTDATA / "tok512.bin"))
    ids = model.encode("Mia had a red ball.")
    assert ids[0] == 1 and all(0 <= i < 512 for i in ids)
    assert model.decode(ids[1:]) == " Mia had a red ball."
    assert model.decode([1] + ids[1:]).startswith("\n<s>\n")
    logits = model.forward(ids[0], 0)
    assert logits.shape == (512,) and logits.dtype == np.float32
    expected = c_logits("tiny_mha", "run")[0]  # BOS at position 0
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError):
        model.forward(512, 0)
    with pytest.raises(ValueError):
        model.forward(1, 96)


def xorshift_coins(seed, n):
    """run.c's random_f32() sequence: xorshift64* then the top 24 bits of the high word."""
    state, mask = seed, (1 << 64) - 1
    for _ in range(n):
        state ^= state >> 12
        state ^= (state << 25) & mask
        state ^= state >> 27
        yield np.float32(((state * 0x2545F4914F6CDD1D) & mask) >> 32 >> 8) / np.float32(16777216.0)


def test_multinomial_sampling_follows_run_c_rng():
    logits = np.linspace(-3, 3, 50).astype(np.float32)
    probs = np.exp(logits - logits.max())
    cdf = np.cumsum(probs / probs.sum(), dtype=np.float32)
    sampler = run.Sampler(50, 1.0, 1.0, 1234)  # topp 1: plain multinomial
    for coin in xorshift_coins(1234, 200):
        expected = min(int(np.searchsorted(cdf, coin, side="right")), 49)
        assert sampler.sample(logits.copy()) == expected


def test_greedy_and_topp_sampling():
    logits = np.linspace(-2, 2, 512).astype(np.float32)
    assert run.Sampler(512, 0.0, 0.9, 1).sample(logits.copy()) == 511
    # top-p 0.05 keeps only the few most likely tokens
    picks = {run.Sampler(512, 1.0, 0.05, seed).sample(logits.copy()) for seed in range(1, 60)}
    assert picks and min(picks) >= 500


def test_module_and_package_entry_points():
    proc = subprocess.run([sys.executable, "-c", "import run; print(run.Transformer.__name__)"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.strip() == "Transformer"
    proc = run_cli("run", [])
    assert proc.returncode == 1 and b"Usage:" in proc.stderr and b"Traceback" not in proc.stderr
