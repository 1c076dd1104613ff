"""run and runq at Llama 2's sizes: what loading costs in memory, the int arithmetic at 70B's
shapes, and models larger than the machine's memory."""
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

import run
import runq
from llama2_cython import formats
from tests.helpers import REPO, TESTDATA
from tests.reference import ReferenceTransformer
from tests.test_runq import dequantize_groups, quantize_groups
from tools.bench import SHAPES, write_random_q80, write_tokenizer

LLAMA2_70B = dict(dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                  seq_len=4096)
MAGIC = 0x616B3432


def sparse_model(path, config, version, group_size=64):
    """A v1 or v2 file with config's header and weights that are all holes (zeros): its size
    is right, it takes no disk, and nothing reads its weights here."""
    extra = struct.pack("<i", group_size) if version == 2 else b""
    head = struct.pack("<Ii7iB", MAGIC, version, *config.values(), False) + extra
    header = formats.parse_header(head.ljust(256, b"\0"), str(path))
    with open(path, "wb") as f:
        f.write(head.ljust(256, b"\0"))
        f.truncate(header.file_size())
    return header


def data_offset(array, base):
    return array.__array_interface__["data"][0] - base


def test_llama2_70b_header_passes_the_checks_and_maps_to_the_right_offsets(tmp_path, monkeypatch, capfd):
    """70B's shapes pass the header checks, and the pointers into the file that the C code makes
    (read back through the `weights` views) are where Python's integers put them: element
    offsets there pass 2^31 (w1's last layer starts 18.5 G values in), so an int product in
    memory_map_weights would show. The weights are holes; nothing reads them."""
    monkeypatch.setattr(formats, "physical_memory", lambda: 16 << 30)  # a 16 GiB machine, anywhere
    c = LLAMA2_70B
    L, dim, hidden = c["n_layers"], c["dim"], c["hidden_dim"]
    kv_dim = dim // c["n_heads"] * c["n_kv_heads"]

    header = sparse_model(tmp_path / "70b_q80.bin", c, 2)
    formats.check_header(header, "70b")
    formats.check_kv_cache_fits(c, "70b")
    transformer = runq.Transformer(str(tmp_path / "70b_q80.bin"))
    assert not transformer.packed  # 70 GB of packed copy do not fit in 16 GiB: it runs from the file
    w = transformer.weights
    base = w["rms_att_weight"].__array_interface__["data"][0] - 256
    offset = 256 + 4 * (2 * L * dim + dim)
    for name, count, rows, cols in formats.quantized_tensors(c, False):
        q, s = w[name]
        q, s = (q[None], s[None]) if count == 1 else (q, s)
        assert q.shape == (count, rows, cols)
        step = rows * cols + 4 * (rows * cols // 64)  # a layer's values, then its scales
        for layer in {0, 1 % count, count - 1}:
            assert data_offset(q[layer], base) == offset + layer * step, (name, layer)
            assert data_offset(s[layer], base) == offset + layer * step + rows * cols, (name, layer)
        offset += count * step
    assert offset == header.file_size() == transformer.file_size

    header = sparse_model(tmp_path / "70b.bin", c, 1)
    formats.check_header(header, "70b")
    transformer = run.Transformer(str(tmp_path / "70b.bin"))
    w = transformer.weights
    base = w["rms_att_weight"].__array_interface__["data"][0] - 256
    sizes = dict(rms_att_weight=L * dim, rms_ffn_weight=L * dim, rms_final_weight=dim,
                 token_embedding_table=c["vocab_size"] * dim, wq=L * dim * dim, wk=L * kv_dim * dim,
                 wv=L * kv_dim * dim, wo=L * dim * dim, w1=L * hidden * dim, w2=L * dim * hidden,
                 w3=L * hidden * dim, wcls=c["vocab_size"] * dim)
    offset = 256
    for name, size in sizes.items():  # v1's order
        assert data_offset(w[name], base) == offset, name
        assert w[name].size == size
        offset += 4 * size
    assert offset == header.file_size()

    # both files are larger than the (faked) memory: one warning line each, naming both sizes
    warnings = capfd.readouterr().err.splitlines()
    assert len(warnings) == 2
    for line, size in zip(warnings, (os.path.getsize(tmp_path / "70b_q80.bin"), header.file_size())):
        assert re.fullmatch(r"(run|runq): warning: .* is [0-9.]+ GB, more than this machine's 17.2 GB "
                            r"of memory: every token will be read from disk", line), line
        assert f"{size / 1e9:.1f} GB" in line


# Llama 2 70B's width, 2 layers (1 for fp32: 3.4 GB a layer), a small vocabulary
WIDE = dict(LLAMA2_70B, n_layers=2, vocab_size=256, seq_len=8)
WIDE_TOKENS = [1, 200]


class RowChunks:
    """A big matrix from a file, multiplied in float64 a few thousand rows at a time (a whole
    70B-width matrix in float64 would take 1.9 GB); int8 ones through runq's arithmetic."""

    def __init__(self, values, scales=None, group_size=0):
        self.values, self.scales, self.group_size = values, scales, group_size

    def __matmul__(self, x):
        rows, cols = self.values.shape
        if self.scales is not None:  # quantize x as runq does
            q, s = quantize_groups(x, self.group_size)
            x = dequantize_groups(q, s, self.group_size)
        out = np.empty(rows)
        per_row = cols // self.group_size if self.scales is not None else 0
        for r0 in range(0, rows, 2048):
            block = np.asarray(self.values[r0:r0 + 2048], dtype=np.float64)
            if self.scales is not None:
                scales = np.asarray(self.scales[r0 * per_row:(r0 + len(block)) * per_row], dtype=np.float64)
                block *= np.repeat(scales, self.group_size).reshape(block.shape)
            out[r0:r0 + len(block)] = block @ x
        return out


def lazy_reference(config, norms, embedding, layers, classifier):
    """tests/reference.py's forward on weights it reads from the file as it goes."""
    reference = ReferenceTransformer(config, dict(norms, token_embedding_table=embedding))
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        reference.w[name] = [layer[name] for layer in layers]
    reference.w["wcls"] = classifier
    return reference


def q80_file_tensors(path, config, group_size=64):
    """The tensors of a v2 file without a shared classifier, as memory maps, at offsets computed
    here (not by runq)."""
    L, dim = config["n_layers"], config["dim"]
    norms = np.memmap(path, np.float32, "r", 256, (2 * L * dim + dim,))
    out = dict(rms_att_weight=norms[:L * dim].reshape(L, dim),
               rms_ffn_weight=norms[L * dim:2 * L * dim].reshape(L, dim), rms_final_weight=norms[2 * L * dim:])
    offset = 256 + 4 * norms.size
    layers = [{} for _ in range(L)]
    for name, count, rows, cols in formats.quantized_tensors(config, False):
        for layer in range(count):
            q = np.memmap(path, np.int8, "r", offset, (rows, cols))
            s = np.memmap(path, np.float32, "r", offset + rows * cols, (rows * cols // group_size,))
            offset += rows * cols + 4 * s.size
            if name == "token_embedding_table":
                out[name] = dequantize_groups(np.asarray(q).ravel(), np.asarray(s), group_size).reshape(q.shape)
            elif name == "wcls":
                out[name] = RowChunks(q, s, group_size)
            else:
                layers[layer][name] = RowChunks(q, s, group_size)
    return out, layers


def test_70b_width_runs_right_in_runq(tmp_path):
    """Two layers of Llama 2 70B's width (hidden_dim 28672, grouped-query 64/8 heads): the
    engine (packed where it can be) and forward() both give what a NumPy forward pass reading the
    file at offsets of its own computes."""
    path = tmp_path / "wide_q80.bin"
    write_random_q80(path, WIDE, seed=3)
    transformer = runq.Transformer(str(path))
    # packed on AVX-512 VNNI, unless the machine has no room for the copy (runq then skips it)
    assert transformer.packed <= (runq.INT8_KERNEL == "avx512vnni")
    if runq.INT8_KERNEL == "avx512vnni" and 2 * path.stat().st_size < formats.available_memory():
        assert transformer.packed
    plain = transformer.with_new_state()
    tensors, layers = q80_file_tensors(path, WIDE)
    norms = {k: v for k, v in tensors.items() if k.startswith("rms")}
    reference = lazy_reference(WIDE, norms, tensors["token_embedding_table"], layers, tensors["wcls"])
    for pos, token in enumerate(WIDE_TOKENS):
        expected = reference.forward(token, pos)
        scale = np.abs(expected).max()
        got = transformer.forward(token, pos)
        assert np.isfinite(got).all() and scale > 0
        # activations that sit on a rounding edge may quantize a step apart (see test_runq.py)
        assert np.abs(got - expected).max() < 1e-2 * scale
        np.testing.assert_allclose(plain.forward(token, pos, reference=True), got, rtol=0, atol=1e-4 * scale)


def test_70b_width_runs_right_in_run(tmp_path):
    """One layer of Llama 2 70B's width in fp32 (3.4 GB): run's engine and forward() give what
    NumPy computes from the file in float64."""
    config = dict(WIDE, n_layers=1)
    c = config
    dim, hidden, vocab = c["dim"], c["hidden_dim"], c["vocab_size"]
    kv_dim = dim // c["n_heads"] * c["n_kv_heads"]
    shapes = dict(rms_att_weight=(1, dim), rms_ffn_weight=(1, dim), rms_final_weight=(dim,),
                  token_embedding_table=(vocab, dim), wq=(1, dim, dim), wk=(1, kv_dim, dim),
                  wv=(1, kv_dim, dim), wo=(1, dim, dim), w1=(1, hidden, dim), w2=(1, dim, hidden),
                  w3=(1, hidden, dim), wcls=(vocab, dim))
    path = tmp_path / "wide.bin"
    rng = np.random.default_rng(4)
    with open(path, "wb") as f:  # v1, tensor by tensor
        f.write(struct.pack("<Ii7iB", MAGIC, 1, *config.values(), False).ljust(256, b"\0"))
        for name, shape in shapes.items():
            if name.startswith("rms"):
                f.write((1 + 0.1 * rng.standard_normal(shape)).astype(np.float32).tobytes())
                continue
            std = 1.0 if name in ("token_embedding_table", "wcls") else shape[-1] ** -0.5
            for _ in range(shape[0] if len(shape) == 3 else 1):
                rows = rng.standard_normal(shape[-2:], dtype=np.float32)
                rows *= np.float32(std)
                f.write(rows.tobytes())
    offset, views = 256, {}
    for name, shape in shapes.items():
        views[name] = np.memmap(path, np.float32, "r", offset, shape)
        offset += 4 * int(np.prod(shape))
    assert offset == os.path.getsize(path)
    norms = {k: np.asarray(v) for k, v in views.items() if k.startswith("rms")}
    layers = [{name: RowChunks(views[name][0]) for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}]
    reference = lazy_reference(config, norms, np.asarray(views["token_embedding_table"]), layers,
                               RowChunks(views["wcls"]))
    transformer = run.Transformer(str(path))
    plain = transformer.with_new_state()
    for pos, token in enumerate(WIDE_TOKENS):
        expected = reference.forward(token, pos)
        scale = np.abs(expected).max()
        got = transformer.forward(token, pos)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(plain.forward(token, pos, reference=True), got, rtol=0, atol=1e-5 * scale)


# VmHWM, the peak of this process's memory since it started: ru_maxrss starts from the peak of the
# process that forked it (pytest's, often larger than the load's)
PROBE_START = r"""
import sys
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
import runq, numpy
before = status("VmRSS")
t = runq.Transformer(sys.argv[1])
"""
LOAD_PROBE = PROBE_START + r"""
peak = status("VmHWM")
after = status("VmRSS")
for pos in range(8):
    t.forward(1 + pos, pos)
print(before, peak, after, status("VmRSS"), t.packed)
"""


def test_runq_holds_about_the_file_while_loading_and_after(tmp_path):
    """Resident memory at most the file's size plus 5% (and a few MB of buffers), at every moment
    of loading (the peak) and after: the packed copy is made while the file's pages are handed
    back, and no fp32 copy of the embedding table is made (runq.c's takes 98 MB at this shape)."""
    path = tmp_path / "110M_q80.bin"
    write_random_q80(path, SHAPES["110M"], seed=1)
    size = os.path.getsize(path)
    # a fresh process: the peak (VmHWM) is this load's, not that of earlier tests
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    before, peak, after, decoded, packed = proc.stdout.split()
    slack = 1.05 * size + 24e6  # run and batch states, page tables, the interpreter's own growth
    assert int(peak) - int(before) < slack, (int(peak) - int(before), size)
    assert int(after) - int(before) < slack
    assert int(decoded) - int(before) < slack  # 8 positions of KV cache: 0.6 MB
    assert packed == str(runq.INT8_KERNEL == "avx512vnni")


DECODE_PROBE = PROBE_START + r"""
tokens = numpy.random.default_rng(0).permutation(t.config["vocab_size"])[:int(sys.argv[2])]
for pos, token in enumerate(tokens):
    t.forward(int(token), pos)
print(before, status("VmHWM"), status("VmRSS"), t.packed)
"""
# Llama 3's vocabulary on a small model, the classifier tied: the embedding table is 90% of the file
TIED = dict(dim=512, hidden_dim=1536, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=128256, seq_len=1024)


def test_tied_classifier_decode_holds_about_the_file(tmp_path):
    """With the classifier tied to the embedding table, the packed copy holds the table, and
    decode reads each token's embedding row from it: resident memory stays within the file's size
    plus 5% through 1000 positions of different tokens. Read from the file, the rows faulted the
    file's pages back in beside the copy, and more around each (a whole 2 MB folio on Linux 6.18):
    the table again."""
    path = tmp_path / "tied_q80.bin"
    write_random_q80(path, TIED, seed=1, shared=True)
    size = os.path.getsize(path)
    positions = 1000
    proc = subprocess.run([sys.executable, "-c", DECODE_PROBE, str(path), str(positions)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    before, peak, after, packed = proc.stdout.split()
    kv_cache = 2 * TIED["n_layers"] * positions * TIED["dim"] * 4
    slack = 1.05 * size + kv_cache + 24e6  # as above
    assert int(peak) - int(before) < slack, (int(peak) - int(before), size)
    assert int(after) - int(before) < slack
    assert packed == str(runq.INT8_KERNEL == "avx512vnni")


def test_fp32_model_larger_than_memory_runs_with_a_warning(monkeypatch, capfd):
    """A model file larger than the machine's memory (faked here) is mapped as it is read, not
    refused: one warning line names both sizes, and the logits are the same."""
    path = TESTDATA / "tiny_gqa.bin"
    expected = run.Transformer(str(path)).forward(5, 0)
    assert capfd.readouterr().err == ""
    size = os.path.getsize(path)
    monkeypatch.setattr(formats, "physical_memory", lambda: size - 1)
    transformer = run.Transformer(str(path))
    np.testing.assert_array_equal(transformer.forward(5, 0), expected)
    err = capfd.readouterr().err
    assert err == (f"run: warning: {path} is {size / 1e9:.1f} GB, more than this machine's "
                   f"{(size - 1) / 1e9:.1f} GB of memory: every token will be read from disk\n")


def test_cli_warns_once_and_prints_the_same(tmp_path):
    """The same through `python -m run`: the warning is one line on stderr, stdout unchanged."""
    model, tok = TESTDATA / "tiny_gqa.bin", TESTDATA / "tok512.bin"
    argv = [str(model), "-z", str(tok), "-n", "20", "-t", "0", "-i", "Once"]
    size = os.path.getsize(model)
    normal = subprocess.run([sys.executable, "-m", "run", *argv], cwd=REPO, capture_output=True, check=True)
    faked = subprocess.run([sys.executable, "-c", "import sys; from llama2_cython import formats; "
                            f"formats.physical_memory = lambda: {size - 1}; import run; sys.exit(run.main(sys.argv))",
                            *argv], cwd=REPO, capture_output=True)
    assert faked.returncode == 0, faked.stderr
    assert faked.stdout == normal.stdout
    lines, normal_lines = faked.stderr.decode().splitlines(), normal.stderr.decode().splitlines()
    assert lines[0] == (f"run: warning: {model} is {size / 1e9:.1f} GB, more than this machine's "
                        f"{(size - 1) / 1e9:.1f} GB of memory: "
                        f"every token will be read from disk")
    assert len(lines) == len(normal_lines) + 1 and lines[1].startswith("achieved tok/s")


@pytest.mark.skipif(runq.INT8_KERNEL != "avx512vnni", reason="the packed copy is made on AVX-512 VNNI only")
def test_packed_copy_is_made_while_it_fits_and_given_up_only_when_it_does_not(tmp_path, monkeypatch):
    """The copy is not given up for being more than half of the machine's memory (13B on 24 GB):
    only when the memory the kernel says is available cannot hold it, and then the logits are
    the same, read from the file."""
    path = tmp_path / "model_q80.bin"
    config = dict(dim=256, hidden_dim=768, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, seq_len=16)
    write_random_q80(path, config, seed=2)
    size = os.path.getsize(path)
    expected = runq.Transformer(str(path), pack=False).forward(7, 0)
    monkeypatch.setattr(formats, "physical_memory", lambda: int(1.5 * size))  # the copy is 2/3 of it
    packed = runq.Transformer(str(path))
    assert packed.packed
    np.testing.assert_array_equal(packed.forward(7, 0), expected)
    monkeypatch.setattr(formats, "physical_memory", lambda: size // 2)  # no room for the copy
    unpacked = runq.Transformer(str(path))
    assert not unpacked.packed
    np.testing.assert_array_equal(unpacked.forward(7, 0), expected)


BATCH_PROBE = PROBE_START + r"""
model = runq.Model(sys.argv[1], sys.argv[2])
loaded = status("VmRSS")
for _ in range(12):
    for _ in model.generate_batch(["a b c"] * 16, steps=8, temperature=0.0):
        pass
print(loaded, status("VmHWM"))
"""
# 110M's width and vocabulary, one layer: forward_batch's buffers are 11 MB a batch state
WIDE = dict(dim=768, hidden_dim=2048, n_layers=1, n_heads=12, n_kv_heads=12, vocab_size=32000, seq_len=256)


def test_generate_batch_holds_one_batch_state(tmp_path):
    """generate_batch gives its sequences a run state each and one batch state between them. With
    a batch state each, allocated and freed 16 at a time in every call, glibc handed the freed
    memory out again dirty (calloc then writes every byte): here the process peaked 200 MB above
    the loaded model (50 MB with one), and at 110M it grew by some 75 MB a call, without end."""
    path, tokenizer = tmp_path / "wide_q80.bin", tmp_path / "tok32000.bin"
    write_random_q80(path, WIDE, seed=1)
    write_tokenizer(tokenizer, WIDE["vocab_size"])
    proc = subprocess.run([sys.executable, "-c", BATCH_PROBE, str(path), str(tokenizer)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    loaded, peak = (int(v) for v in proc.stdout.split())
    assert peak - loaded < 110e6, (loaded, peak)
