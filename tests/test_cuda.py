"""The GPU path: cuda/*.cu and run_cuda.py.

Anywhere nvcc is installed: every kernel file compiles the way PyCUDA's SourceModule compiles it.
Without PyCUDA or a GPU: run_cuda.py says which in one line. With both: CudaTransformer's logits
match run.Transformer's, and run_cuda.py prints what the C reference and `python -m run` print.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import export
from conftest import (REPO, TESTDATA, assert_one_line_error, fixture_path, golden_argv,
                      golden_cases, golden_outputs, run_cli)
from tests.reference import ReferenceTransformer

KERNEL_FILES = sorted((REPO / "cuda").glob("*.cu"))
LOGIT_TOKENS = json.loads((TESTDATA / "logits" / "README.json").read_text())["tokens"]
TOKENIZER = TESTDATA / "tok512.bin"


def gpu_available():
    """Whether PyCUDA imports and sees a CUDA device."""
    try:
        import pycuda.driver as cuda
        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # not installed, no driver (ImportError), or cuInit failed (pycuda's Error)
        return False


def run_cuda_cli(args, stdin=b""):
    """`python run_cuda.py args...` from the repo root; the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "run_cuda.py", *map(str, args)], input=stdin, cwd=REPO,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def run_cuda():
    """The run_cuda module, for tests that need PyCUDA, a GPU and the built CPU package."""
    if not gpu_available():
        pytest.skip("needs PyCUDA and a CUDA GPU")
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    import run_cuda
    return run_cuda


# ----------------------------------------------------------------------------
# without a GPU

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda path: path.name)
def test_kernel_compiles(tmp_path, path, arch):
    """As SourceModule does it: the file inside extern "C" { }, nvcc --cubin, cuda/ included."""
    (tmp_path / "kernel.cu").write_text('extern "C" {\n%s\n}\n' % path.read_text())
    proc = subprocess.run(["nvcc", "--cubin", f"-arch={arch}", f"-I{REPO / 'cuda'}", "kernel.cu"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (proc.stdout + proc.stderr).strip()  # SourceModule would warn about any output
    assert (tmp_path / "kernel.cubin").stat().st_size > 0


def test_import_needs_no_pycuda():
    code = "import sys, run_cuda; assert 'pycuda' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if "No module named 'run" in proc.stderr:
        pytest.skip("the CPU package `run` is not built")
    assert proc.returncode == 0, proc.stderr


def test_without_gpu_says_what_is_missing():
    if gpu_available():
        pytest.skip("PyCUDA and a GPU are present")
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    proc = run_cuda_cli([TESTDATA / "tiny_mha.bin", "-z", TOKENIZER])
    err = assert_one_line_error(proc)
    assert err.startswith("run_cuda: ") and ("PyCUDA" in err or "GPU" in err), err
    assert proc.stdout == b""


# ----------------------------------------------------------------------------
# with a GPU

@pytest.mark.parametrize("model", ["tiny_mha", "tiny_gqa", "tiny_gqa.v1", "stories260K"])
def test_logits_match_cpu(run_cuda, model):
    import run
    path = str(fixture_path(model + ".bin"))
    cuda_model, cpu_model = run_cuda.CudaTransformer(path), run.Transformer(path)
    assert cuda_model.config == cpu_model.config
    for pos, token in enumerate(LOGIT_TOKENS):
        expected = cpu_model.forward(token, pos)
        got = cuda_model.forward(token, pos)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


SHAPES = {
    # dim, hidden_dim and head_size not multiples of 4: the kernels' scalar paths
    "scalar_loads": dict(dim=30, hidden_dim=50, n_layers=2, n_heads=5, n_kv_heads=1,
                         vocab_size=70, seq_len=24),
    "multi_query": dict(dim=64, hidden_dim=96, n_layers=1, n_heads=8, n_kv_heads=1,
                        vocab_size=300, seq_len=16),
    # more positions than the attention block has threads
    "long_context": dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         vocab_size=40, seq_len=1100),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shapes_match_reference(run_cuda, tmp_path, shape):
    """Against the float64 NumPy forward: over 1000 positions float32 sums in any order drift by
    ~1e-4 of the largest logit (the CPU port's too)."""
    config = SHAPES[shape]
    weights = export.random_model(config, seed=3, shared=False)
    path = tmp_path / "model.bin"
    export.write_v0(path, config, weights, False)
    cuda_model, reference = run_cuda.CudaTransformer(str(path)), ReferenceTransformer(config, weights)
    tokens = np.random.default_rng(0).integers(config["vocab_size"], size=config["seq_len"])
    for pos, token in enumerate(tokens.tolist()):
        expected = reference.forward(token, pos)
        got = cuda_model.forward(token, pos)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=3e-4 * np.abs(expected).max(),
                                   err_msg=f"pos {pos}")


def test_refuses_a_context_too_long_for_shared_memory(run_cuda, tmp_path):
    config = dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=40,
                  seq_len=100_000)
    path = tmp_path / "model.bin"
    export.write_v0(path, config, export.random_model(config), True)
    with pytest.raises(ValueError, match="seq_len 100000"):
        run_cuda.CudaTransformer(str(path))
    assert_one_line_error(run_cuda_cli([path, "-z", TOKENIZER]))


@pytest.mark.parametrize("case", [case for case in golden_cases("run") if case["robust"]],
                         ids=lambda case: case["name"])
def test_golden_stdout(run_cuda, case):
    """Byte for byte what C's run printed: greedy, seeded sampling and chat."""
    proc = run_cuda_cli(golden_argv(case), stdin=case["stdin"].encode())
    assert proc.returncode == case["returncode"], proc.stderr.decode()
    assert proc.stdout in golden_outputs(case)


@pytest.mark.parametrize("args, stdin", [
    (["-t", "0.9", "-p", "0.8", "-s", "123", "-n", "96", "-i", "A cat"], b""),
    (["-t", "1.1", "-p", "0", "-s", "9", "-n", "0"], b""),
    (["-m", "chat", "-t", "0.8", "-s", "5", "-n", "110", "-y", "Be brief."],
     b"Hi there\nTell me a story\n"),
], ids=["topp", "multinomial", "chat"])
@pytest.mark.parametrize("model", ["tiny_mha", "tiny_gqa"])
def test_matches_cpu_port(run_cuda, model, args, stdin):
    argv = [TESTDATA / f"{model}.bin", "-z", TOKENIZER, *args]
    expected = run_cli("run", argv, stdin=stdin)
    got = run_cuda_cli(argv, stdin=stdin)
    assert got.returncode == expected.returncode == 0, got.stderr.decode()
    assert got.stdout == expected.stdout and len(got.stdout) > 20
