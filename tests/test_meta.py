"""Meta's original Llama 2 checkpoints read without PyTorch: llama2_cython.torchzip against
torch.load on files torch.save wrote (views, shared storages, strides, every float dtype),
MetaLlamaSource against llama2.c export.py's rule for joining the shards (torch.cat of
torch.load's tensors), tools/synth_meta.py's files as torch.load reads them, the refusals (a
pickle that calls os.system is refused and not run), and the memory a read takes."""
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llama2_cython import LlamaError, torchzip
from llama2_cython.meta import MetaLlamaSource
from tools import synth_meta

ROOT = Path(__file__).resolve().parents[1]

# run.c's names -> Meta's, written out here again (not taken from the module under test)
META = {
    "token_embedding_table": "tok_embeddings.weight",
    "rms_att_weight": "layers.{}.attention_norm.weight",
    "wq": "layers.{}.attention.wq.weight",
    "wk": "layers.{}.attention.wk.weight",
    "wv": "layers.{}.attention.wv.weight",
    "wo": "layers.{}.attention.wo.weight",
    "rms_ffn_weight": "layers.{}.ffn_norm.weight",
    "w1": "layers.{}.feed_forward.w1.weight",
    "w2": "layers.{}.feed_forward.w2.weight",
    "w3": "layers.{}.feed_forward.w3.weight",
    "rms_final_weight": "norm.weight",
    "wcls": "output.weight",
}
PER_LAYER = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")

# The folders the source is tested on: params.json's content, the shard count, the hidden_dim
# Meta's model.py makes of it (worked out by hand: int(2 * 4 * dim / 3), times
# ffn_dim_multiplier, rounded up to multiple_of) and the vocabulary.
CASES = {
    "1-shard MHA": dict(params={"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2,
                                "norm_eps": 1e-05, "vocab_size": -1},
                        shards=1, hidden=192, vocab=96),
    "2-shard MHA": dict(params={"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2,
                                "norm_eps": 1e-06, "vocab_size": -1},
                        shards=2, hidden=192, vocab=96),
    # 170 * 1.3 = 221.0 -> 224
    "2-shard GQA ffn_dim_multiplier": dict(
        params={"dim": 64, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "n_heads": 8,
                "n_kv_heads": 2, "n_layers": 3, "norm_eps": 1e-05, "vocab_size": 96},
        shards=2, hidden=224, vocab=96),
    # Code Llama: RoPE base 1e6, 32016 tokens (here with vocab_size -1 in params.json)
    "Code Llama": dict(params={"dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 16,
                               "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05,
                               "rope_theta": 1000000, "vocab_size": -1},
                       shards=1, hidden=96, vocab=32016),
}


def head_size(params):
    return params["dim"] // params["n_heads"]


def full_shapes(case):
    """Meta's name -> full shape, for a CASES entry."""
    p = case["params"]
    dim, hidden, vocab = p["dim"], case["hidden"], case["vocab"]
    kv_dim = p.get("n_kv_heads", p["n_heads"]) * head_size(p)
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,),
              "output.weight": (vocab, dim), "rope.freqs": (head_size(p) // 2,)}
    for i in range(p["n_layers"]):
        shapes.update({
            f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,),
            f"layers.{i}.attention.wq.weight": (dim, dim),
            f"layers.{i}.attention.wk.weight": (kv_dim, dim),
            f"layers.{i}.attention.wv.weight": (kv_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim)})
    return shapes


def meta_axis(name, embedding_axis=1):
    """How Meta's model-parallel code splits a tensor: None (a copy in each shard) or an axis."""
    if name.startswith("tok_embeddings."):
        return embedding_axis
    if name.endswith((".attention.wo.weight", ".feed_forward.w2.weight")):
        return 1
    return None if name.endswith("norm.weight") or name == "rope.freqs" else 0


def write_torch_folder(torch, folder, case, seed=0, views=False, embedding_axis=1):
    """The folder as Meta's code would save it, with torch: full bf16 tensors split into the
    shards with torch.chunk. views: save the chunks as they are, views into the full tensor's
    storage (offsets, strides), instead of copies."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(case["params"]))
    gen = torch.Generator().manual_seed(seed)
    shards = [{} for _ in range(case["shards"])]
    for name, shape in full_shapes(case).items():
        full = torch.randn(shape, generator=gen).to(torch.bfloat16)
        axis = meta_axis(name, embedding_axis)
        pieces = ([full] * case["shards"] if axis is None
                  else torch.chunk(full, case["shards"], dim=axis))
        for shard, piece in zip(shards, pieces):
            shard[name] = piece if views or axis is None else piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def llama2c_join(torch, folder, embedding_axis=1):
    """llama2.c export.py's load_meta_model: torch.load every consolidated.*.pth (sorted), then
    per tensor: shard 0's when there is one shard or it is a vector, else torch.cat of the
    shards' on axis 1 for tok_embeddings, wo and w2, on axis 0 for the rest."""
    paths = sorted(Path(folder).glob("consolidated.*.pth"))
    loaded = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    joined = {}
    for name in loaded[0]:
        tensors = [shard[name] for shard in loaded]
        if len(tensors) == 1 or tensors[0].ndim == 1:
            joined[name] = tensors[0]
            continue
        axis = 1 if (name.startswith("tok_embeddings.") or name.endswith(".attention.wo.weight")
                     or name.endswith(".feed_forward.w2.weight")) else 0
        if name.startswith("tok_embeddings."):
            axis = embedding_axis
        joined[name] = torch.cat(tensors, dim=axis)
    return {name: t.to(torch.float32).numpy() for name, t in joined.items()}


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def assert_source_matches(src, expected, n_layers):
    for key, name in META.items():
        for layer in range(n_layers) if key in PER_LAYER else (None,):
            got = src.tensor(key, layer)
            want = expected[name.format(layer)]
            assert got.dtype == np.float32 and got.flags.c_contiguous, (key, layer)
            assert got.shape == want.shape, (key, layer)
            assert np.array_equal(bits(got), bits(want)), (key, layer)


def one_line_refusal(call, *args, **kwargs):
    """The LlamaError message call raises: one line."""
    with pytest.raises(LlamaError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message, message
    return message


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# ---------------------------------------------------------------------------- torchzip

def torch_saved_state(torch):
    """A state_dict as torch.save writes it, with every kind of tensor torchzip must read."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=gen).to(torch.bfloat16)
    other = torch.randn(5, 4, generator=gen)
    from collections import OrderedDict
    return OrderedDict([
        ("base", base),
        ("rows", base[2:5]),  # a view at an offset into base's storage
        ("transposed", base.t()),  # non-contiguous: strides (1, 8)
        ("every_other", base[1:, ::3]),  # offset and gaps
        ("half", torch.randn(3, 7, generator=gen).to(torch.float16)),
        ("float", other),
        ("float_column", other[:, 2]),  # a non-contiguous vector
        ("double", torch.randn(4, generator=gen, dtype=torch.float64)),
        ("scalar", torch.tensor(2.5, dtype=torch.bfloat16)),
        ("empty", torch.zeros(0, 3, dtype=torch.bfloat16)),
        ("broadcast", torch.randn(3, generator=gen).to(torch.bfloat16).expand(4, 3)),  # stride 0
        ("specials", torch.tensor([float("inf"), -0.0, float("nan"), 1e-40, -3e38],
                                  dtype=torch.bfloat16)),
    ])


@pytest.mark.parametrize("root", ["OrderedDict", "dict"])
def test_torchzip_reads_what_torch_load_reads(torch, tmp_path, root):
    state = torch_saved_state(torch)
    if root == "dict":
        state = dict(state)
    path = tmp_path / "state.pth"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    with torchzip.TorchCheckpoint(path) as ckpt:
        tensors = ckpt.state_dict()
        assert list(tensors) == list(loaded)
        for name, tensor in tensors.items():
            want = loaded[name].to(torch.float32).numpy()
            assert tensor.shape == tuple(loaded[name].shape), name
            assert tensor.dtype == str(loaded[name].dtype).replace("torch.", ""), name
            assert tensor.stride == loaded[name].stride(), name
            assert tensor.storage_offset == loaded[name].storage_offset(), name
            got = tensor.numpy()
            assert got.dtype == np.float32 and got.flags.c_contiguous, name
            assert np.array_equal(bits(got), bits(want)), name
        # base and its views share one storage, read from one record
        assert {tensors[n].storage.key for n in ("base", "rows", "transposed",
                                                 "every_other")} == {tensors["base"].storage.key}
        assert tensors["transposed"].is_contiguous() is False
        assert tensors["rows"].is_contiguous() is True


@pytest.mark.parametrize("protocol", [2, 4])
def test_torchzip_reads_a_modules_state_dict(torch, tmp_path, protocol):
    """model.state_dict() pickles with a _metadata attribute (BUILD on the OrderedDict), and
    torch.save may be asked for another pickle protocol."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    state = module.state_dict()
    torch.save(state, tmp_path / "m.pth", pickle_protocol=protocol)
    with torchzip.TorchCheckpoint(tmp_path / "m.pth") as ckpt:
        tensors = ckpt.state_dict()
        assert list(tensors) == list(state)
        for name, tensor in tensors.items():
            assert np.array_equal(bits(tensor.numpy()), bits(state[name].float().numpy()))
        assert tensors._metadata == dict(state._metadata)


def test_torchzip_reads_in_blocks_that_fit_its_chunk(torch, tmp_path, monkeypatch):
    """A contiguous tensor is read a block of rows at a time: the blocks join up exactly."""
    gen = torch.Generator().manual_seed(2)
    state = {"m": torch.randn(37, 11, generator=gen).to(torch.bfloat16),
             "h": torch.randn(9, 5, 3, generator=gen).to(torch.float16)}
    torch.save(state, tmp_path / "s.pth")
    monkeypatch.setattr(torchzip, "CHUNK_BYTES", 50)  # 2 rows of m, 1 of h at a time
    with torchzip.TorchCheckpoint(tmp_path / "s.pth") as ckpt:
        for name, tensor in ckpt.state_dict().items():
            assert np.array_equal(bits(tensor.numpy()), bits(state[name].float().numpy()))


def test_torchzip_does_not_import_torch(tmp_path):
    synth_meta.write_meta_folder(tmp_path / "m", shards=2, fuse_qkv=True)
    code = ("import sys; from llama2_cython.meta import MetaLlamaSource\n"
            f"s = MetaLlamaSource({str(tmp_path / 'm')!r})\n"
            "s.tensor('wq', 0); s.tensor('token_embedding_table'); s.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def zip_bytes(records, compress=zipfile.ZIP_STORED):
    """A zip of {name: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return buffer.getvalue()


def malicious_pickle(module, name, argument):
    """A pickle that calls module.name(argument), as an attack on torch.load would."""
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode()
            + pickle.BINUNICODE + struct.pack("<I", len(argument)) + argument.encode()
            + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"),
                                         ("builtins", "eval"), ("subprocess", "getoutput")])
def test_a_pickle_that_runs_a_command_is_refused_not_run(tmp_path, module, name):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    path = tmp_path / "evil.pth"
    path.write_bytes(zip_bytes({"evil/data.pkl": malicious_pickle(module, name, command),
                                "evil/version": b"3\n"}))
    # the same payload does run in a plain pickle.loads: the test would see it
    message = one_line_refusal(torchzip.TorchCheckpoint, path)
    assert message.startswith(str(path)) and f"{module}.{name}" in message, message
    assert not marker.exists()
    # as a shard of a Meta folder too
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(CASES["1-shard MHA"]["params"]))
    (folder / "consolidated.00.pth").write_bytes(path.read_bytes())
    message = one_line_refusal(MetaLlamaSource, folder)
    assert f"{module}.{name}" in message and "consolidated.00.pth" in message
    assert not marker.exists()


def test_pickle_opcodes_no_state_dict_uses_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    # INST calls a class or function named by the opcode itself, with the marked arguments
    inst = (pickle.PROTO + b"\x02" + pickle.MARK + pickle.BINUNICODE
            + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode()
            + pickle.INST + b"os\nsystem\n" + pickle.STOP)
    path.write_bytes(zip_bytes({"e/data.pkl": inst}))
    assert "opcode INST" in one_line_refusal(torchzip.TorchCheckpoint, path)
    assert not marker.exists()
    # a byte array that claims 2^62 bytes
    huge = pickle.PROTO + b"\x05" + pickle.BYTEARRAY8 + struct.pack("<Q", 1 << 62) + pickle.STOP
    path.write_bytes(zip_bytes({"e/data.pkl": huge}))
    assert "not a pickle" in one_line_refusal(torchzip.TorchCheckpoint, path)
    # an OrderedDict given an attribute other than _metadata (it would shadow dict.items)
    build = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"collections\nOrderedDict\n"
             + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.EMPTY_DICT + pickle.BINUNICODE
             + struct.pack("<I", 5) + b"items" + pickle.NONE + pickle.SETITEM + pickle.BUILD
             + pickle.STOP)
    path.write_bytes(zip_bytes({"e/data.pkl": build}))
    assert "other state than _metadata" in one_line_refusal(torchzip.TorchCheckpoint, path)


def test_the_malicious_pickle_would_run(tmp_path):
    """The payload of the test above is live: plain pickle runs it (so its marker not being
    there means the refusal, not a broken payload)."""
    marker = tmp_path / "ran"
    pickle.loads(malicious_pickle("builtins", "eval", f"open({str(marker)!r}, 'w').close()"))
    assert marker.exists()


def synth_shard(tmp_path, **kwargs):
    folder = tmp_path / "synth"
    synth_meta.write_meta_folder(folder, **kwargs)
    return folder / "consolidated.00.pth"


def rewrite_zip(src, dst, edit=None, compress=None):
    """dst: src's records (names and bytes) in a new zip, edit(name, data) -> data or None."""
    with zipfile.ZipFile(src) as z:
        records = {info.filename: z.read(info) for info in z.infolist()}
    out = {}
    for name, data in records.items():
        data = edit(name, data) if edit else data
        if data is not None:
            out[name] = data
    dst.write_bytes(zip_bytes(out, compress or zipfile.ZIP_STORED))
    return dst


def test_torchzip_refusals(tmp_path):
    shard = synth_shard(tmp_path)
    data = shard.read_bytes()
    bad = tmp_path / "bad.pth"

    def refusal(content=None, path=bad):
        if content is not None:
            path.write_bytes(content)
        message = one_line_refusal(torchzip.TorchCheckpoint, path)
        assert message.startswith(str(path)), message
        return message

    assert "not a zip" in refusal(b"\x80\x02}q\x00.")  # a bare pickle (torch's legacy format)
    assert "not a zip" in refusal(b"")
    assert "truncated" in refusal(data[:len(data) // 2])  # a shard cut short
    assert "no data.pkl" in refusal(zip_bytes({"a/version": b"3\n"}))
    # a storage shorter than data.pkl says: a truncated data record
    rewrite_zip(shard, bad, lambda n, d: d[:len(d) - 2] if n.endswith("/data/3") else d)
    assert "storage 3 has 8190 bytes in the zip, but data.pkl says it holds 4096 bfloat16 " \
           "values (8192 bytes): a truncated" in refusal()
    # a storage missing from the zip
    rewrite_zip(shard, bad, lambda n, d: None if n.endswith("/data/5") else d)
    assert "data.pkl names storage data/5, which is not in the zip" in refusal()
    # stored compressed
    rewrite_zip(shard, bad, compress=zipfile.ZIP_DEFLATED)
    assert "compressed" in refusal()
    # big-endian
    rewrite_zip(shard, bad, lambda n, d: b"big" if n.endswith("/byteorder") else d)
    assert "byteorder" in refusal()


def entries_pickle(entries, storage="BFloat16Storage", tweak=b""):
    """A data.pkl built by synth_meta's pickle writer, with tweak bytes before STOP."""
    p = synth_meta._Pickle()
    p.ordered_dict()
    p.out += pickle.MARK
    for name, key, numel, offset, shape, stride in entries:
        p.str_(name)
        p.tensor(key, numel, offset, shape, stride, storage)
    p.out += pickle.SETITEMS + tweak + pickle.STOP
    return bytes(p.out)


def test_torchzip_refuses_tensors_outside_their_storage(tmp_path):
    path = tmp_path / "t.pth"
    storage = np.arange(12, dtype="<u2").tobytes()

    def refusal(entries, **kwargs):
        path.write_bytes(zip_bytes({"t/data.pkl": entries_pickle(entries, **kwargs),
                                    "t/data/0": storage}))
        return one_line_refusal(torchzip.TorchCheckpoint, path)

    # the extent of (offset, size, stride) past the storage's 12 elements
    assert "reaches element 12" in refusal([("a", "0", 12, 1, (3, 4), (4, 1))])
    assert "reaches element 13" in refusal([("a", "0", 12, 0, (4, 3), (1, 5))])  # 3 + 2 * 5
    # data.pkl claims more elements than the record holds
    assert "24 bytes in the zip" in refusal([("a", "0", 13, 0, (13,), (1,))])
    # a storage type a state_dict of floats has no use for
    assert "torch.LongStorage" in refusal([("a", "0", 3, 0, (3,), (1,))],
                                          storage="LongStorage")
    # BUILD on a tensor, which would set its offset past the checks
    p = entries_pickle([("a", "0", 12, 0, (3,), (1,))])[:-2]  # drop SETITEMS, STOP
    # the dict, MARK, 'a', tensor on the stack: BUILD the tensor with (None, {...})
    evil = (p + pickle.NONE + pickle.EMPTY_DICT + pickle.BINUNICODE + struct.pack("<I", 14)
            + b"storage_offset" + pickle.BININT + struct.pack("<i", 10**6) + pickle.SETITEM
            + pickle.TUPLE2 + pickle.BUILD + pickle.SETITEMS + pickle.STOP)
    path.write_bytes(zip_bytes({"t/data.pkl": evil, "t/data/0": storage}))
    message = one_line_refusal(torchzip.TorchCheckpoint, path)
    assert "BUILD on a Tensor" in message, message
    # a state_dict whose values are not tensors
    p = synth_meta._Pickle()
    p.out += pickle.EMPTY_DICT + pickle.BINUNICODE + struct.pack("<I", 1) + b"x"
    p.int_(3)
    p.out += pickle.SETITEM + pickle.STOP
    path.write_bytes(zip_bytes({"t/data.pkl": bytes(p.out)}))
    with torchzip.TorchCheckpoint(path) as ckpt:
        message = one_line_refusal(ckpt.state_dict)
    assert "not a tensor" in message


def test_torchzip_reads_the_legacy_rebuild(tmp_path):
    """torch._utils._rebuild_tensor(storage, offset, size, stride), of older torch."""
    values = np.array([1.5, -2.0, 3.25, 0.5, 7.0, -1.0], np.float32)
    p = synth_meta._Pickle()
    p.out += pickle.EMPTY_DICT + pickle.BINUNICODE + struct.pack("<I", 1) + b"w"
    p.global_("torch._utils", "_rebuild_tensor")
    p.out += pickle.MARK + pickle.MARK
    p.str_("storage")
    p.global_("torch", "FloatStorage")
    p.str_("0")
    p.str_("cpu")
    p.int_(6)
    p.out += pickle.TUPLE + pickle.BINPERSID
    p.int_(1)
    p.tuple_((2, 2))
    p.tuple_((1, 2))
    p.out += pickle.TUPLE + pickle.REDUCE + pickle.SETITEM + pickle.STOP
    path = tmp_path / "legacy.pth"
    path.write_bytes(zip_bytes({"x/data.pkl": bytes(p.out), "x/data/0": values.tobytes()}))
    with torchzip.TorchCheckpoint(path) as ckpt:
        got = ckpt.state_dict()["w"].numpy()
    np.testing.assert_array_equal(got, [[-2.0, 0.5], [3.25, 7.0]])


def local_data_offsets(path):
    """Each record's data offset, from its local header."""
    offsets = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as fh:
        for info in z.infolist():
            fh.seek(info.header_offset)
            head = fh.read(30)
            name_length, extra_length = struct.unpack("<HH", head[26:30])
            offsets[info.filename] = info.header_offset + 30 + name_length + extra_length
    return offsets


# ---------------------------------------------------------------------------- synth_meta

@pytest.mark.parametrize("shards,fuse", [(1, False), (2, False), (2, True)])
def test_synth_meta_files_are_what_torch_load_reads(torch, tmp_path, shards, fuse):
    folder = tmp_path / "m"
    synth_meta.write_meta_folder(folder, shards=shards, fuse_qkv=fuse, n_kv_heads=2, seed=3)
    params = json.loads((folder / "params.json").read_text())
    assert params == {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2,
                      "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    for i in range(shards):
        path = folder / f"consolidated.{i:02d}.pth"
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        assert all(t.dtype == torch.bfloat16 for t in loaded.values())
        assert loaded["layers.1.attention.wk.weight"].shape == (32 // shards, 64)
        assert loaded["tok_embeddings.weight"].shape == (256, 64 // shards)
        wq, wk, wv = (loaded[f"layers.0.attention.{w}.weight"] for w in ("wq", "wk", "wv"))
        same = wq.untyped_storage().data_ptr() == wk.untyped_storage().data_ptr() \
            == wv.untyped_storage().data_ptr()
        assert same is fuse
        if fuse:
            assert wk.storage_offset() == wq.numel()
            assert wv.storage_offset() == wq.numel() + wk.numel()
        with torchzip.TorchCheckpoint(path) as ckpt:
            tensors = ckpt.state_dict()
            assert list(tensors) == list(loaded)
            for name, tensor in tensors.items():
                assert np.array_equal(bits(tensor.numpy()), bits(loaded[name].float().numpy()))
        # every record's data starts at a multiple of 64 bytes, as in torch.save's files
        assert all(offset % 64 == 0 for offset in local_data_offsets(path).values())
    # and so does torch.save's own
    torch.save({"a": torch.ones(3)}, tmp_path / "t.pth")
    assert all(offset % 64 == 0 for offset in local_data_offsets(tmp_path / "t.pth").values())


def test_synth_meta_zip64_records_stay_aligned(torch, tmp_path, monkeypatch):
    """Records past 2 GiB (a 70B shard's) get zipfile's zip64 extra field in their local header,
    which the alignment must count: tried here with zipfile's limit lowered to 3000 bytes."""
    folder = tmp_path / "m"
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 3000)
    synth_meta.write_meta_folder(folder, n_layers=1, shards=2)
    monkeypatch.undo()
    path = folder / "consolidated.01.pth"
    with zipfile.ZipFile(path) as z:
        assert sum(info.file_size > 3000 for info in z.infolist()) > 5
    assert all(offset % 64 == 0 for offset in local_data_offsets(path).values())
    loaded = torch.load(path, weights_only=True)
    with torchzip.TorchCheckpoint(path) as ckpt:
        for name, tensor in ckpt.state_dict().items():
            assert np.array_equal(bits(tensor.numpy()), bits(loaded[name].float().numpy()))


def test_synth_meta_weights_do_not_depend_on_the_shards(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    synth_meta.write_meta_folder(one, shards=1, seed=5, n_layers=1, vocab=64)
    synth_meta.write_meta_folder(two, shards=2, seed=5, n_layers=1, vocab=64, fuse_qkv=True)
    with MetaLlamaSource(one) as a, MetaLlamaSource(two) as b:
        assert a.config == b.config
        for key in META:
            layer = 0 if key in PER_LAYER else None
            assert np.array_equal(a.tensor(key, layer), b.tensor(key, layer)), key
        wq = a.tensor("wq", 0)
        assert abs(wq.std() * math.sqrt(64) - 1) < 0.1  # 1/sqrt(fan_in)
        assert abs(a.tensor("rms_att_weight", 0).mean() - 1) < 0.1


def test_synth_meta_cli(tmp_path):
    run = [sys.executable, str(ROOT / "tools" / "synth_meta.py")]
    ok = subprocess.run(run + [str(tmp_path / "c"), "--preset", "codellama-7b", "--dim", "32",
                               "--n-heads", "2", "--n-layers", "1", "--multiple-of", "16",
                               "--vocab", "48", "--shards", "2", "--quiet"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "", ok.stderr
    params = json.loads((tmp_path / "c" / "params.json").read_text())
    assert params["rope_theta"] == 1e6 and params["vocab_size"] == 48
    assert params["ffn_dim_multiplier"] == 1.0
    bad = subprocess.run(run + [str(tmp_path / "d"), "--dim", "64", "--shards", "3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "3 shards" in bad.stderr


# ---------------------------------------------------------------------------- MetaLlamaSource

@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("writer", ["torch", "synth"])
def test_source_gives_llama2c_export_joined_tensors(torch, tmp_path, name, writer):
    case = CASES[name]
    folder = tmp_path / "model"
    if writer == "torch":
        # the GQA case saves its shards as views into the full tensors (offsets, strides)
        write_torch_folder(torch, folder, case, views="GQA" in name)
    else:
        p = case["params"]
        synth_meta.write_meta_folder(
            folder, dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads"), multiple_of=p["multiple_of"],
            ffn_dim_multiplier=p.get("ffn_dim_multiplier"), vocab=case["vocab"],
            rope_theta=p.get("rope_theta"), norm_eps=p["norm_eps"], shards=case["shards"],
            vocab_in_params=p["vocab_size"] != -1, seed=7)
    expected = llama2c_join(torch, folder)
    lines = []
    with MetaLlamaSource(folder, log=lines.append) as src:
        p = case["params"]
        assert src.config == dict(
            dim=p["dim"], hidden_dim=case["hidden"], n_layers=p["n_layers"],
            n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads", p["n_heads"]),
            vocab_size=case["vocab"], seq_len=2048, rope_theta=float(p.get("rope_theta", 1e4)),
            norm_eps=p["norm_eps"])
        assert isinstance(src.config["rope_theta"], float)
        assert src.shared is False
        assert_source_matches(src, expected, p["n_layers"])
    assert lines and all("\n" not in line for line in lines)


def test_source_reads_llama3_shards_split_by_vocabulary(torch, tmp_path):
    """Llama 3's model-parallel embedding splits the rows (the vocabulary), not the columns."""
    case = dict(CASES["2-shard MHA"], vocab=128)
    folder = write_torch_folder(torch, tmp_path / "m", case, embedding_axis=0)
    with MetaLlamaSource(folder) as src:
        assert src.config["vocab_size"] == 128
        assert_source_matches(src, llama2c_join(torch, folder, embedding_axis=0), 2)


def test_source_seq_len(tmp_path):
    folder = tmp_path / "m"
    synth_meta.write_meta_folder(folder, max_seq_len=4096)
    with MetaLlamaSource(folder) as src:
        assert src.config["seq_len"] == 4096
    with MetaLlamaSource(folder, seq_len=512) as src:  # the argument wins
        assert src.config["seq_len"] == 512
    synth_meta.write_meta_folder(folder)
    with MetaLlamaSource(folder) as src:
        assert src.config["seq_len"] == 2048  # llama2.c export.py's
    with pytest.raises(ValueError):
        MetaLlamaSource(folder, seq_len=0)


def test_source_interface_misuse(tmp_path):
    synth_meta.write_meta_folder(tmp_path / "m")
    src = MetaLlamaSource(tmp_path / "m")
    with pytest.raises(ValueError):
        src.tensor("wq")  # no layer
    with pytest.raises(ValueError):
        src.tensor("wq", 2)  # 2 layers: 0 and 1
    with pytest.raises(ValueError):
        src.tensor("wcls", 0)
    with pytest.raises(ValueError):
        src.tensor("freq_cis_real")
    src.close()
    with pytest.raises(ValueError):
        src.tensor("wcls")


# refusals: each one line naming the file and what is wrong

def synth_folder(tmp_path, **kwargs):
    folder = tmp_path / "m"
    synth_meta.write_meta_folder(folder, **kwargs)
    return folder


def edit_params(folder, **changes):
    params = json.loads((folder / "params.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del params[key]
        else:
            params[key] = value
    (folder / "params.json").write_text(json.dumps(params))


def test_source_refuses_missing_or_misnumbered_shards(tmp_path):
    folder = synth_folder(tmp_path, shards=2)
    os.rename(folder / "consolidated.01.pth", folder / "consolidated.02.pth")
    message = one_line_refusal(MetaLlamaSource, folder)
    assert "no shard 1 (consolidated.01.pth)" in message, message
    for path in folder.glob("*.pth"):
        path.unlink()
    assert "no consolidated.NN.pth" in one_line_refusal(MetaLlamaSource, folder)
    assert "not a folder" in one_line_refusal(MetaLlamaSource, folder / "params.json")
    assert "no such folder" in one_line_refusal(MetaLlamaSource, folder / "nothing")


def test_source_refuses_a_truncated_shard(tmp_path):
    folder = synth_folder(tmp_path, shards=2)
    data = (folder / "consolidated.01.pth").read_bytes()
    (folder / "consolidated.01.pth").write_bytes(data[:-1000])
    message = one_line_refusal(MetaLlamaSource, folder)
    assert "consolidated.01.pth" in message and "truncated" in message


@pytest.mark.parametrize("change,words", [
    ({"dim": 64.0}, "dim is 64.0: not a positive integer"),
    ({"n_layers": "2"}, 'n_layers is "2": not a positive integer'),
    ({"n_heads": [4]}, "n_heads is [4]: not a positive integer"),
    ({"n_heads": True}, "n_heads is true: not a positive integer"),
    ({"n_kv_heads": 0}, "n_kv_heads is 0: not a positive integer"),
    # too big for a float (or for llama2.c's int32 header), shown cut short
    ({"n_layers": 10**400}, "n_layers is 1" + "0" * 56 + "...: not a positive integer (at most "
                            "2147483647)"),
    ({"dim": 2**31}, "dim is 2147483648: not a positive integer"),
    ({"multiple_of": ...}, "no multiple_of"),
    ({"norm_eps": "1e-5"}, 'norm_eps is "1e-5": not a positive number'),
    ({"rope_theta": -1}, "rope_theta is -1: not a positive number"),
    ({"ffn_dim_multiplier": True}, "ffn_dim_multiplier is true: not a positive number"),
    ({"vocab_size": 0}, "vocab_size is 0"),
    ({"vocab_size": 100}, "vocab_size is 100, but tok_embeddings.weight has 256 rows"),
    ({"max_seq_len": 1.5}, "max_seq_len is 1.5"),
    ({"sliding_window": 4096}, "sliding_window is 4096: not a parameter"),
    ({"use_scaled_rope": True}, "use_scaled_rope is true"),
    ({"multiple_of": 256}, "give a hidden_dim of 256, but layers.0.feed_forward.w1.weight has 192"),
    ({"ffn_dim_multiplier": 1.3}, "give a hidden_dim of 224"),
    ({"dim": 128, "n_heads": 8}, "dim is 128, but tok_embeddings.weight makes [256, 64]"),
    ({"n_kv_heads": 2}, "tensor layers.0.attention.wk.weight makes [64, 64], but params.json's "
                        "[n_kv_heads * head size, dim] is [32, 64]"),
    ({"n_heads": 3}, "n_heads = 3 does not divide dim = 64"),
    ({"n_layers": 3}, "no tensor layers.2.attention_norm.weight (params.json: n_layers 3)"),
    ({"n_layers": 1}, "tensor layers.1.attention_norm.weight is not part of params.json's "
                      "n_layers 1"),
])
def test_source_refuses_bad_params(tmp_path, change, words):
    folder = synth_folder(tmp_path)
    edit_params(folder, **change)
    message = one_line_refusal(MetaLlamaSource, folder)
    assert words in message, message
    assert str(folder) in message


def test_source_refuses_a_missing_or_broken_params_json(tmp_path):
    folder = synth_folder(tmp_path)
    (folder / "params.json").write_text("{dim: 64")
    assert "not JSON" in one_line_refusal(MetaLlamaSource, folder)
    (folder / "params.json").write_text("[64]")
    assert "not a JSON object" in one_line_refusal(MetaLlamaSource, folder)
    (folder / "params.json").unlink()
    assert "no params.json" in one_line_refusal(MetaLlamaSource, folder)


def test_source_refuses_shards_that_disagree(torch, tmp_path):
    case = CASES["2-shard MHA"]
    folder = write_torch_folder(torch, tmp_path / "m", case)
    path = folder / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)

    def refusal(state):
        torch.save(state, path)
        return one_line_refusal(MetaLlamaSource, folder)

    # a piece of another shape than shard 0's
    message = refusal({**shard, "layers.1.attention.wq.weight": torch.zeros(16, 64)})
    assert "consolidated.01.pth: tensor layers.1.attention.wq.weight has shape [16, 64], but" \
           in message and "[32, 64] (it is split evenly on axis 0)" in message, message
    # a norm of another size
    message = refusal({**shard, "norm.weight": torch.zeros(32)})
    assert "norm.weight has shape [32]" in message and "the same in every shard" in message
    # a matrix where a vector goes
    assert "not a vector" in refusal({**shard, "norm.weight": torch.zeros(64, 1)})
    # a tensor missing from one shard
    assert "consolidated.01.pth: no tensor output.weight" in refusal(
        {k: v for k, v in shard.items() if k != "output.weight"})
    # extra tensors
    message = refusal({**shard, "layers.0.attention.bias": torch.zeros(3)})
    assert "tensor layers.0.attention.bias has no place in a Llama 2 layer" in message, message
    message = refusal({**shard, "attention.bias": torch.zeros(3)})
    assert "tensor attention.bias has no place in a Llama 2 model" in message
    # a broadcast view: more elements than its storage holds
    message = refusal({**shard, "norm.weight": torch.ones(1).expand(64)})
    assert "norm.weight has 64 elements, more than the 1 of its storage" in message, message
    # a non-tensor in the state_dict
    assert "not a tensor" in refusal({**shard, "step": 3})
    # a norm that differs between shards: found when it is read
    torch.save({**shard, "layers.0.ffn_norm.weight": shard["layers.0.ffn_norm.weight"] + 1}, path)
    with MetaLlamaSource(folder) as src:
        src.tensor("rms_ffn_weight", 1)
        message = one_line_refusal(src.tensor, "rms_ffn_weight", 0)
    assert "consolidated.01.pth: tensor layers.0.ffn_norm.weight differs from" in message


# ---------------------------------------------------------------------------- memory

def test_reading_a_tensor_takes_its_float32_size_and_its_bf16_pieces(tmp_path):
    """Peak memory (NumPy's allocations, as tracemalloc sees them) of reading one weight: the
    float32 result and at most one bf16 block besides, whether the shards split its rows or its
    columns."""
    folder = synth_folder(tmp_path, dim=512, n_heads=8, n_layers=1, vocab=4096, shards=2,
                          multiple_of=256)
    with MetaLlamaSource(folder) as src:
        for key in ("token_embedding_table", "wcls"):  # 4096 x 512: columns split, rows split
            size = 4096 * 512 * 4
            tracemalloc.start()
            try:
                array = src.tensor(key)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert array.nbytes == size
            # a shard's bf16 piece: half the values at half the bytes each
            assert size <= peak <= size + size // 4 + (1 << 20), (key, peak)
