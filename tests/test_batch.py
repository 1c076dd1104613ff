"""The batched forward (forward_batch, issue 11), which the command line and the API run, against
itself one token at a time and against C's forward(): a prompt fed together leaves the logits and
the KV cache that feeding it one token at a time leaves, bit for bit on both builds. Against C's
forward() (forward(reference=True)), bit for bit when built with IEEE flags (the exact build);
under -Ofast, to rounding (f32dot.h says why). Shapes: GQA and MQA, dims that are not multiples of
16, runq with group sizes that cut rows, prompts shorter and longer than a pass (128 tokens)."""
import os

import numpy as np
import pytest

from llama2_cython import export
from tests.helpers import BUILDS, TESTDATA, in_build, run_cli
from tests.test_runq import fp32_weights, write_v2

SIZES = [1, 2, 7, 8, 9, 16, 17, 33, 40]
FP32_SHAPES = {
    "gqa_separate": dict(dim=48, hidden_dim=128, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=100, seq_len=40),
    "mqa_shared": dict(dim=64, hidden_dim=96, n_layers=1, n_heads=8, n_kv_heads=1, vocab_size=300, seq_len=40),
    "odd_dims": dict(dim=72, hidden_dim=200, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=97, seq_len=40),
}


def check(build, prog, model, vocab_size):
    tokens = [int(t) for t in np.random.default_rng(7).integers(vocab_size, size=40)]
    for n, *results in in_build(build, "prefill_vs_forward", prog=prog, model=str(model),
                                tokens=tokens, sizes=SIZES):
        for same_as_engine, same_as_c, diff_from_c in zip(results[::3], results[1::3], results[2::3]):
            # a token's logits are the same bits whatever else goes through the engine with it
            assert same_as_engine, (n, diff_from_c)
            # and C's forward()'s: bit for bit with IEEE flags, to rounding under -Ofast
            if build == "exact":
                assert same_as_c, (n, diff_from_c)
            else:
                assert diff_from_c < 1e-5, (n, diff_from_c)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("shape", sorted(FP32_SHAPES))
def test_run_prefill_is_forward_token_by_token(tmp_path, shape, build):
    config = FP32_SHAPES[shape]
    shared = shape.endswith("shared")
    path = tmp_path / "model.bin"
    export.write_v0(path, config, export.random_model(config, seed=3, shared=shared), shared)
    check(build, "run", path, config["vocab_size"])


# a prompt longer than a pass (MAX_BATCH, 128 tokens) goes through in several, the later ones
# attending to the KV cache the earlier ones wrote
LONG_SHAPE = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, seq_len=300)
LONG_SIZES = [127, 128, 129, 200, 257]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("prog", ["run", "runq"])
def test_prompt_longer_than_a_pass(tmp_path, prog, build):
    weights = export.random_model(LONG_SHAPE, seed=9, shared=False)
    path = tmp_path / "model.bin"
    if prog == "run":
        export.write_v0(path, LONG_SHAPE, weights, False)
    else:
        write_v2(path, LONG_SHAPE, {name: np.asarray(w) for name, w in weights.items()}, 32, False)  # the SIMD kernels
    tokens = [int(t) for t in np.random.default_rng(13).integers(LONG_SHAPE["vocab_size"], size=260)]
    rows = in_build(build, "prefill_vs_forward", prog=prog, model=str(path), tokens=tokens, sizes=LONG_SIZES)
    assert [n for n, *results in rows if not all(results[0::3])] == []  # as the engine token by token
    if build == "exact":
        assert [n for n, *results in rows if not all(results[1::3])] == []  # as C's forward()
    else:  # to rounding, relative to the logit scale
        assert [n for n, *results in rows if max(results[2::3]) >= 1e-5] == []


@pytest.fixture(scope="module")
def gqa_weights():
    import runq
    source = runq.Transformer(str(TESTDATA / "tiny_gqa_q80.bin"))
    return source.config, fp32_weights(source), source.shared_classifier


# tiny_gqa: dim 96, hidden_dim 256; 48 cuts w2's rows, 128 is longer than dim
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("group_size", [32, 48, 128])
def test_runq_prefill_is_forward_token_by_token(tmp_path, gqa_weights, group_size, build):
    config, weights, shared = gqa_weights
    path = tmp_path / "model_q80.bin"
    write_v2(path, config, weights, group_size, shared)
    check(build, "runq", path, config["vocab_size"])


@pytest.mark.parametrize("prog, model", [("run", "tiny_gqa.bin"), ("runq", "tiny_gqa_q80.bin")])
def test_output_does_not_depend_on_threads(prog, model):
    # decode picks one thread or all as it measures (team.pxi), and OMP_NUM_THREADS sets all:
    # which thread computes which rows must not change a bit of the output
    args = [TESTDATA / model, "-z", TESTDATA / "tok512.bin", "-n", "120", "-t", "1.0", "-p", "0.95",
            "-s", "7", "-i", "Once upon a time"]
    outputs = {}
    for threads in ("1", "2", "3"):
        proc = run_cli(prog, args, env=dict(os.environ, OMP_NUM_THREADS=threads))
        assert proc.returncode == 0, proc.stderr
        outputs[threads] = proc.stdout
    assert outputs["1"] == outputs["2"] == outputs["3"]


# runq's int8 matmuls fix their float arithmetic in q8matmul.h, so that a (row, token) gets the same
# bits whatever the batch (tests/test_q8matmul.py checks the kernels under both builds' flags). Here
# forward_batch against forward() bit for bit, for every batch size up to MAX_BATCH and past
# it. Group sizes: 32 (the SIMD paths, with an odd number of groups in w2's rows), 64 (SIMD for
# n = dim, w2's rows of 352 cut: ragged) and 48 (w2's rows ragged, the others on the plain path);
# the vocabulary ends in a short block of rows.
# On both builds against the engine one token at a time; on the exact build against C's forward()
# too (under -Ofast forward()'s fp32 steps compile differently from forward_batch's: see check).
BATCH_SIZES = list(range(1, 18)) + [33]
Q80_SHAPE = dict(dim=192, hidden_dim=352, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=301, seq_len=40)


@pytest.fixture(scope="module")
def q80_shape_weights():
    weights = export.random_model(Q80_SHAPE, seed=5, shared=False)
    return {name: np.asarray(w) for name, w in weights.items()}


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("group_size", [32, 64, 48])
def test_runq_batch_is_forward_bit_for_bit(tmp_path, q80_shape_weights, group_size, build):
    path = tmp_path / "model_q80.bin"
    write_v2(path, Q80_SHAPE, q80_shape_weights, group_size, False)
    tokens = [int(t) for t in np.random.default_rng(11).integers(Q80_SHAPE["vocab_size"], size=34)]
    rows = in_build(build, "prefill_vs_forward", prog="runq", model=str(path), tokens=tokens,
                    sizes=BATCH_SIZES)
    differ = [n for n, *results in rows
              if not all(results[0::3]) or (build == "exact" and not all(results[1::3]))]
    assert differ == []  # the batch sizes whose logits differ
