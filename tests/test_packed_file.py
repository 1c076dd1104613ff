"""Packed Q8_0 files (v3 with layout 1, export.py --packed): on AVX-512 VNNI runq multiplies the
matrices where they lie in the mapped file, and every other build (the exact one among them)
unpacks them into rows at load; either way a packed file gives the logits of the v2 file it was
packed from, bit for bit. export.py's NumPy packing is held to q8matmul.h's C
(tests/q8pack_check.c), and packing a v2 file only moves its bytes."""
import base64
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from llama2_cython import export, formats
from tests.helpers import (BUILDS, REPO, TESTDATA, assert_one_line_error, golden_argv, golden_cases,
                           in_build, run_cli)
from tests.test_q8matmul import TARGETS, cpu_flags

FIXTURE = TESTDATA / "tiny_gqa_q80.packed.v3.bin"  # tiny_gqa_q80.bin packed (group size 32)
TOKENS = [1, 7, 300, 42, 5, 99, 256, 3]


# ---------------------------------------------------------------------------- the layout

def q8pack(tmp_path, march, mode, d, n, gs, data):
    """tests/q8pack_check.c built with march, run on data (see its top)."""
    exe = tmp_path / f"q8pack_check{len(march)}"
    if not exe.exists():
        subprocess.run(["gcc", "-O2", *march, "-I", str(REPO), str(REPO / "tests" / "q8pack_check.c"),
                        "-o", str(exe)], check=True)
    return subprocess.run([str(exe), mode, str(d), str(n), str(gs)], input=data, capture_output=True,
                          check=True).stdout


# rows past a block of 16 (d % 16), a last chunk of 32 columns (n % 64 with group size 32)
SHAPES = [(1, 32, 32), (16, 64, 64), (17, 96, 32), (40, 128, 64), (33, 160, 32), (500, 96, 32),
          (8, 4096, 64)]


def test_numpy_packing_is_q8matmul_h(tmp_path):
    if shutil.which("gcc") is None or sys.platform != "linux":
        pytest.skip("the check program is built with gcc on Linux")
    vnni = TARGETS[2]
    vector = cpu_flags() is not None and vnni[2] <= cpu_flags()  # q8_pack_block can run here
    rng = np.random.default_rng(3)
    for d, n, gs in SHAPES:
        q = rng.integers(-128, 128, (d, n), dtype=np.int8)  # -128 too: a file may hold it
        scales = rng.standard_normal(d * n // gs).astype(np.float32)
        values, packed_scales = export.pack_q80(q, scales, gs)
        assert (values.size, packed_scales.size) == formats.packed_size(d, n, gs)
        packed = values.tobytes() + packed_scales.astype("<f4").tobytes()
        rows = q.tobytes() + scales.astype("<f4").tobytes()
        assert q8pack(tmp_path, [], "plain", d, n, gs, rows) == packed, (d, n, gs)
        if vector:
            assert q8pack(tmp_path, vnni[0], "vector", d, n, gs, rows) == packed, (d, n, gs)
        assert q8pack(tmp_path, [], "unpack", d, n, gs, packed) == rows, (d, n, gs)
        back_q, back_scales = export.unpack_q80(np.frombuffer(packed, np.uint8), d, n, gs)
        assert np.array_equal(back_q, q) and np.array_equal(back_scales, scales)


# ---------------------------------------------------------------------------- runq, both builds

# MHA and GQA, tied and untied, group sizes 32 and 64; vocab 500 and kv_dim 8 end in a partial
# block of 16 rows, dim 96 and hidden 160 or 224 in a half chunk of 32 columns
MODELS = {
    "mha_tied_gs32": (dict(dim=96, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=4,
                           vocab_size=500, seq_len=32), True, 32),
    "gqa_untied_gs64": (dict(dim=128, hidden_dim=320, n_layers=2, n_heads=16, n_kv_heads=1,
                             vocab_size=500, seq_len=32), False, 64),
    "gqa_tied_gs64": (dict(dim=128, hidden_dim=192, n_layers=2, n_heads=8, n_kv_heads=2,
                           vocab_size=512, seq_len=32), True, 64),
    "mha_untied_gs32": (dict(dim=64, hidden_dim=224, n_layers=3, n_heads=4, n_kv_heads=4,
                             vocab_size=512, seq_len=32), False, 32),
}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """[v2 file, the same packed] of every model of MODELS."""
    folder = tmp_path_factory.mktemp("twins")
    pairs = []
    for name, (config, shared, group_size) in MODELS.items():
        v2, packed = folder / f"{name}_q80.bin", folder / f"{name}.packed.bin"
        export.write_v2(v2, config, export.random_model(config, seed=7, shared=shared), shared,
                        group_size, back_off=False)
        export.write_model(packed, 2, export.FileSource(v2), group_size, packed=True)
        pairs.append([str(v2), str(packed)])
    return pairs


@pytest.mark.parametrize("build", BUILDS)
def test_packed_twin_gives_the_v2_logits(twins, build):
    kernel = in_build(build, "int8_kernel")
    for (v2, _), same in zip(twins, in_build(build, "packed_twin", pairs=twins, tokens=TOKENS)):
        assert same.pop("packed") == [kernel == "avx512vnni"] * 2 + [False], v2
        assert all(same.values()), (v2, same)


@pytest.mark.parametrize("build", BUILDS)
def test_cli_prints_the_same_from_the_packed_fixture(build):
    # every runq golden case of tiny_gqa_q80.bin (chat mode among them), run on its packed twin:
    # the v2 file's stdout in the same build, and C's where that build prints C's
    cases = [c for c in golden_cases("runq") if c["model"] == "tiny_gqa_q80.bin"]
    assert len(cases) >= 5
    for case in cases:
        argv = golden_argv(case)
        got = run_cli("runq", [FIXTURE, *argv[1:]], stdin=case["stdin"].encode(), build=build)
        assert got.returncode == case["returncode"], got.stderr
        expected = run_cli("runq", argv, stdin=case["stdin"].encode(), build=build).stdout
        assert got.stdout == expected, case["name"]
        if build == "exact" or case["robust"]:
            assert got.stdout == base64.b64decode(case["stdout_b64"]), case["name"]


def test_generate_batch_from_a_packed_file():
    import runq
    prompts, tok = ["Once upon a time", "The dog", "A"], str(TESTDATA / "tok512.bin")
    results = []
    for model in (TESTDATA / "tiny_gqa_q80.bin", FIXTURE):
        texts = [""] * len(prompts)
        for i, text in runq.Model(str(model), tok).generate_batch(prompts, steps=30, temperature=0.8,
                                                                 seed=[1, 2, 3]):
            texts[i] += text
        results.append(texts)
    assert results[0] == results[1] and all(results[0])


def test_other_programs_refuse_a_packed_file_in_one_line():
    for argv in ([sys.executable, "-m", "run", FIXTURE],
                 [sys.executable, "run_cuda.py", FIXTURE, "-z", TESTDATA / "tok512.bin"]):
        proc = subprocess.run(list(map(str, argv)), cwd=REPO, capture_output=True, timeout=120,
                              env={**os.environ, "RUN_CUDA_EMULATOR": "1"})
        assert "is a version 3 (int8 Q8_0) file: run it with runq" in assert_one_line_error(proc)


# ---------------------------------------------------------------------------- the header

def refusal(tmp_path, data, prog="runq"):
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(data))
    return assert_one_line_error(run_cli(prog, [path]))


def test_bad_packed_files_are_refused(tmp_path):
    data = bytearray(FIXTURE.read_bytes())
    header = formats.parse_header(data, "fixture")
    assert (header.version, header.layout, header.group_size) == (3, 1, 32)
    assert len(data) == header.file_size()

    layout2 = data.copy()
    struct.pack_into("<i", layout2, formats.V3_LAYOUT_OFFSET, 2)
    assert "bad header: layout = 2 (0 rows, 1 packed" in refusal(tmp_path, layout2)
    # the field is among the bytes that a v3 reader without it refuses when they are not 0
    assert formats.V3_LAYOUT_OFFSET >= formats.V3_PARAMS_OFFSET + formats.V3_PARAMS.size
    later = data.copy()
    later[formats.V3_LAYOUT_OFFSET + 4] = 1
    assert "v3 bytes that must be 0 are not" in refusal(tmp_path, later)
    for group_size in (16, 128):  # a file of the right size for it, so the group size is the fault
        other = data.copy()
        struct.pack_into("<i", other, 37, group_size)
        assert f"group_size = {group_size}: packed matrices need a group size of 32 or 64" in \
            refusal(tmp_path, other)
    for cut in (1, 1024, len(data) - formats.packed_start(header)):
        message = refusal(tmp_path, data[:-cut])
        assert f"file is {len(data) - cut} bytes but its v3 header" in message
        assert f"needs {len(data)}" in message and "packed matrices" in message
    fp32 = bytearray((TESTDATA / "tiny_gqa_llama3.v3.bin").read_bytes())
    struct.pack_into("<i", fp32, formats.V3_LAYOUT_OFFSET, 1)  # layout 1 says Q8_0
    assert "group_size = 0: packed matrices need a group size" in refusal(tmp_path, fp32, "run")


# ---------------------------------------------------------------------------- export.py

def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "export.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_packing_a_v2_file_only_moves_its_bytes(tmp_path):
    packed, back = tmp_path / "packed.bin", tmp_path / "back.bin"
    proc = cli(packed, "--packed", "--bin", TESTDATA / "tiny_gqa_q80.bin")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "(version 3)" in proc.stdout
    assert "copied wcls (512, 96)'s Q8_0 values and scales in the packed layout" in proc.stderr
    assert packed.read_bytes() == FIXTURE.read_bytes()
    proc = cli(back, "--version", 2, "--bin", packed)
    assert proc.returncode == 0, proc.stderr
    assert back.read_bytes() == (TESTDATA / "tiny_gqa_q80.bin").read_bytes()
    # the values are the file's: the same as the packed file's dequantized, the int8 values as stored
    source, copy = export.FileSource(TESTDATA / "tiny_gqa_q80.bin"), export.FileSource(FIXTURE)
    for key, layer in (("wk", 1), ("wcls", None), ("token_embedding_table", None)):
        assert np.array_equal(source.tensor(key, layer), copy.tensor(key, layer))
        assert all(np.array_equal(a, b) for a, b in zip(source.q80(key, layer), copy.q80(key, layer)))


@pytest.mark.parametrize("source, args", [
    ("tiny_gqa.bin", ["--group-size", 32]),  # v0 fp32: quantized as tiny_gqa_q80.bin was
    ("tiny_gqa.v1.bin", ["--group-size", 32, "--version", 2]),
])
def test_packed_from_fp32_sources(tmp_path, source, args):
    out = tmp_path / "out.bin"
    proc = cli(out, "--packed", *args, "--bin", TESTDATA / source)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == FIXTURE.read_bytes()


def test_packed_tied_model_holds_its_classifier_packed(tmp_path):
    # a shared classifier: the embedding table in rows, and packed again as wcls
    v2, packed = tmp_path / "v2.bin", tmp_path / "packed.bin"
    assert cli(v2, "--version", 2, "--bin", TESTDATA / "tiny_mha.bin").returncode == 0
    assert cli(packed, "--packed", "--bin", v2).returncode == 0
    header = formats.parse_header(packed.read_bytes()[:256], "packed")
    assert header.shared_classifier and header.layout == 1 and header.group_size == 64
    source = export.FileSource(packed)
    assert np.array_equal(source.tensor("wcls"), source.tensor("token_embedding_table"))
    assert cli(tmp_path / "back.bin", "--version", 2, "--bin", packed).returncode == 0
    assert (tmp_path / "back.bin").read_bytes() == v2.read_bytes()


def test_packed_from_a_hugging_face_folder(tmp_path):
    from tests.test_export_hf import MODEL, make_folder
    folder = make_folder(tmp_path / "hf", MODEL)
    v2, packed, repacked = tmp_path / "v2.bin", tmp_path / "packed.bin", tmp_path / "repacked.bin"
    assert cli(v2, "--version", 2, "--hf", folder).returncode == 0
    assert cli(packed, "--packed", "--hf", folder).returncode == 0
    assert cli(repacked, "--packed", "--bin", v2).returncode == 0
    assert packed.read_bytes() == repacked.read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--version", 1], "--packed applies to --version 2 only"),
    (["--group-size", 16], "--packed: group_size = 16: packed matrices need a group size of 32 or 64"),
])
def test_packed_refusals(tmp_path, args, message):
    out = tmp_path / "out.bin"
    proc = cli(out, "--packed", *args, "--bin", TESTDATA / "tiny_gqa.bin")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_bench_writes_the_packed_twin_of_its_random_file(tmp_path):
    # tools/bench.py --packed writes the big shapes' packed files directly, with the same values
    from tools import bench
    config = MODELS["gqa_untied_gs64"][0]
    bench.write_random_q80(tmp_path / "v2.bin", config)
    bench.write_random_q80(tmp_path / "direct.bin", config, packed=True)
    assert cli(tmp_path / "packed.bin", "--packed", "--bin", tmp_path / "v2.bin").returncode == 0
    assert (tmp_path / "direct.bin").read_bytes() == (tmp_path / "packed.bin").read_bytes()


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from the peak of the process that forked it
# (pytest's, often larger than the load's), which would hide the load's peak
LOAD_PROBE = r"""
import sys
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
import runq, numpy
before, anon = status("VmRSS"), status("RssAnon")
t = runq.Transformer(sys.argv[1])
peak = status("VmHWM")
for pos in range(8):
    t.forward(1 + pos, pos)
print(before, peak, status("VmRSS"), status("RssAnon") - anon, t.packed)
"""


@pytest.mark.parametrize("build", BUILDS)
def test_a_packed_file_holds_about_the_file_while_loading_and_after(tmp_path, build):
    """Resident memory at most the file's size plus 5% at every moment of loading and after, in
    both builds: the fast one maps the file and copies nothing (on AVX-512 VNNI: no anonymous
    memory but buffers), the exact one unpacks it into rows while handing the file's pages back."""
    from tests.helpers import build_root
    from tools import bench
    path = tmp_path / "110M_packed.bin"
    bench.write_random_q80(path, bench.SHAPES["110M"], seed=1, packed=True)
    size = path.stat().st_size
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path)], cwd=build_root(build),
                          capture_output=True, text=True, check=True)
    before, peak, after, anon, packed = proc.stdout.split()
    slack = 1.05 * size + 24e6  # as test_big_models.py's for a v2 file
    assert int(peak) - int(before) < slack, (int(peak) - int(before), size)
    assert int(after) - int(before) < slack
    mapped = build == "fast" and in_build("fast", "int8_kernel") == "avx512vnni"
    assert packed == str(mapped)
    if mapped:
        assert int(anon) < 24e6, anon  # the run and batch states, the interpreter's growth
    else:
        assert int(anon) > 0.75 * size  # the rows (the embedding table is read from the file)
