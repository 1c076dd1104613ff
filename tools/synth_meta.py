"""Writes a synthetic Meta Llama 2 checkpoint folder: params.json and consolidated.NN.pth shards
that torch.load reads (weights_only=True) as it reads Meta's own, made without PyTorch and a block
of rows at a time, so that a 7B- or 70B-shaped folder takes little memory to write (only disk).

    python -m tools.synth_meta OUT_DIR --preset 7b [--n-layers 2] [--shards 2] [--seed 1]
    python -m tools.synth_meta OUT_DIR --dim 64 --n-layers 2 --n-heads 4 --vocab 256 ...

The weights are seeded random bfloat16: matrices (the embedding table too) normal with standard
deviation 1/sqrt(fan_in), the norms 1 + N(0, 0.1^2), so that activations stay finite at 7B. The
same seed gives the same model whatever the number of shards (each weight comes from its own
stream, split the way Meta's model-parallel ranks split it). A shard is what torch.save writes:
a zip (stored, every record's data at a multiple of 64 bytes) of ARCHIVE/data.pkl (pickle
protocol 2: an OrderedDict of torch._utils._rebuild_tensor_v2 calls whose storages are persistent
ids ('storage', torch.BFloat16Storage, key, 'cpu', numel)), ARCHIVE/data/KEY for each storage,
ARCHIVE/byteorder and ARCHIVE/version. --fuse-qkv puts each layer's wq, wk and wv in one storage,
as three views of it at different offsets.
"""
import argparse
import contextlib
import json
import math
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama2_cython import LlamaError  # noqa: E402
from llama2_cython.cli import run_command  # noqa: E402
from llama2_cython.files import atomic_write  # noqa: E402
from llama2_cython.meta import SPLIT_AXIS, META_NAMES, LAYERED, meta_hidden_dim  # noqa: E402

# Meta's published shapes; params_vocab: what its params.json says of vocab_size (-1: "take it
# from the tokenizer"); max_seq_len is not in Meta's params.json
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, multiple_of=32,
                 ffn_dim_multiplier=None, vocab=256, rope_theta=None, norm_eps=1e-5, shards=1,
                 vocab_in_params=False),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, multiple_of=256,
               ffn_dim_multiplier=None, vocab=32000, rope_theta=None, norm_eps=1e-5, shards=1,
               vocab_in_params=False),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=None, multiple_of=256,
                ffn_dim_multiplier=None, vocab=32000, rope_theta=None, norm_eps=1e-5, shards=2,
                vocab_in_params=False),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                ffn_dim_multiplier=1.3, vocab=32000, rope_theta=None, norm_eps=1e-5, shards=8,
                vocab_in_params=False),
    "codellama-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, multiple_of=256,
                         ffn_dim_multiplier=1.0, vocab=32016, rope_theta=1e6, norm_eps=1e-5,
                         shards=1, vocab_in_params=True),
}
BLOCK = 1 << 22  # values generated at a time
ALIGN = 64  # torch.save's alignment of each record's data
ZIP_EXTRA_PAD = b"FB"  # the id of the extra field torch pads local headers with
LOCAL_HEADER_SIZE = 30
ZIP64_LOCAL_EXTRA = 20  # the extra field zipfile adds to a zip64 entry's local header


# ---------------------------------------------------------------------------- the pickle

class _Pickle:
    """data.pkl, opcode by opcode, as torch.save's pickler lays out a state_dict of tensors
    (without its memo, which only makes the stream shorter)."""

    def __init__(self):
        self.out = bytearray(pickle.PROTO + bytes([2]))

    def global_(self, module, name):
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")

    def int_(self, n):
        if 0 <= n < 1 << 8:
            self.out += pickle.BININT1 + struct.pack("<B", n)
        elif 0 <= n < 1 << 16:
            self.out += pickle.BININT2 + struct.pack("<H", n)
        elif -(1 << 31) <= n < 1 << 31:
            self.out += pickle.BININT + struct.pack("<i", n)
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += pickle.LONG1 + bytes([len(data)]) + data

    def str_(self, text):
        data = text.encode("utf-8")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    def tuple_(self, items):
        """A tuple of ints."""
        if not items:
            self.out += pickle.EMPTY_TUPLE
            return
        if len(items) > 3:
            self.out += pickle.MARK
        for n in items:
            self.int_(n)
        self.out += {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(items),
                                                                               pickle.TUPLE)

    def ordered_dict(self):
        self.global_("collections", "OrderedDict")
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE

    def tensor(self, key, numel, offset, shape, stride, storage="BFloat16Storage"):
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += pickle.MARK
        self.out += pickle.MARK  # the persistent id ('storage', type, key, location, numel)
        self.str_("storage")
        self.global_("torch", storage)
        self.str_(key)
        self.str_("cpu")
        self.int_(numel)
        self.out += pickle.TUPLE + pickle.BINPERSID
        self.int_(offset)
        self.tuple_(shape)
        self.tuple_(stride)
        self.out += pickle.NEWFALSE  # requires_grad
        self.ordered_dict()  # backward_hooks
        self.out += pickle.TUPLE + pickle.REDUCE


def state_dict_pickle(entries):
    """data.pkl of an OrderedDict {name: tensor}; entries: (name, key, numel, offset, shape,
    stride), in order."""
    p = _Pickle()
    p.ordered_dict()
    for start in range(0, len(entries), 1000):  # SETITEMS in batches, as pickle does
        p.out += pickle.MARK
        for name, key, numel, offset, shape, stride in entries[start:start + 1000]:
            p.str_(name)
            p.tensor(key, numel, offset, shape, stride)
        p.out += pickle.SETITEMS
    p.out += pickle.STOP
    return bytes(p.out)


# ---------------------------------------------------------------------------- the zip

class ShardWriter:
    """One consolidated.NN.pth: records written in torch.save's way (stored, each one's data
    starting at a multiple of 64 bytes, padded with an "FB" extra field in its local header).
    A record may be written in pieces between begin() and end()."""

    def __init__(self, fh, archive):
        self.zip = zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.archive = archive
        self.entry = None

    def begin(self, name, size):
        info = zipfile.ZipInfo(f"{self.archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for an entry opened so
        header = self.zip.start_dir + LOCAL_HEADER_SIZE + len(info.filename.encode("utf-8")) \
            + (ZIP64_LOCAL_EXTRA if zip64 else 0)
        pad = -header % ALIGN
        if pad and pad < 4:  # an extra field takes 4 bytes at least
            pad += ALIGN
        if pad:
            info.extra = ZIP_EXTRA_PAD + struct.pack("<H", pad - 4) + b"Z" * (pad - 4)
        self.entry = self.zip.open(info, "w", force_zip64=zip64)
        if self.zip.fp.tell() % ALIGN:
            raise RuntimeError(f"{info.filename}: data at {self.zip.fp.tell()}, not aligned")

    def write(self, data):
        self.entry.write(memoryview(data).cast("B") if isinstance(data, np.ndarray) else data)

    def end(self):
        self.entry.close()
        self.entry = None

    def record(self, name, data):
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def close(self):
        self.zip.close()


# ---------------------------------------------------------------------------- the model

def to_bf16(x):
    """float32 -> bfloat16 bits, rounded to nearest even."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")


def check_shape_args(a):
    """One line for sizes no Llama can have, or that the shards cannot split evenly."""
    for key in ("dim", "n_layers", "n_heads", "multiple_of", "vocab", "shards"):
        if a[key] < 1:
            raise LlamaError(f"--{key.replace('_', '-')} {a[key]} must be positive")
    kv = a["n_kv_heads"] or a["n_heads"]
    if a["dim"] % a["n_heads"] or (a["dim"] // a["n_heads"]) % 2:
        raise LlamaError(f"--n-heads {a['n_heads']} must divide --dim {a['dim']} into an even "
                         f"head size")
    if kv < 1 or a["n_heads"] % kv:
        raise LlamaError(f"--n-kv-heads {kv} must divide --n-heads {a['n_heads']}")
    hidden = meta_hidden_dim(a["dim"], a["multiple_of"], a["ffn_dim_multiplier"])
    kv_dim = kv * (a["dim"] // a["n_heads"])
    for what, n in (("dim", a["dim"]), ("hidden_dim", hidden), ("the vocabulary", a["vocab"]),
                    ("n_kv_heads * head size", kv_dim)):
        if n % a["shards"]:
            raise LlamaError(f"{a['shards']} shards cannot split {what} {n} evenly")
    return hidden, kv_dim


def tensor_plan(a, hidden, kv_dim):
    """(Meta's name, full shape, split axis or None, kind) in the order written; kind is
    'matrix', 'norm' or 'freqs'."""
    dim = a["dim"]
    full = {"token_embedding_table": (a["vocab"], dim), "rms_att_weight": (dim,),
            "wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
            "rms_ffn_weight": (dim,), "w1": (hidden, dim), "w2": (dim, hidden),
            "w3": (hidden, dim), "rms_final_weight": (dim,), "wcls": (a["vocab"], dim)}

    def item(key, layer=None):
        kind = "norm" if key.startswith("rms_") else "matrix"
        return META_NAMES[key].format(layer), full[key], SPLIT_AXIS[key], kind

    plan = [item("token_embedding_table")]
    for i in range(a["n_layers"]):
        plan += [item(key, i) for key in LAYERED]
    plan += [item("rms_final_weight"), item("wcls")]
    plan.append(("rope.freqs", ((dim // a["n_heads"]) // 2,), None, "freqs"))
    return plan


def blocks(index, name, shape, kind, a):
    """The full tensor as float32 row blocks, from its own seeded stream."""
    rng = np.random.default_rng([a["seed"], index])
    if kind == "freqs":
        head_size = a["dim"] // a["n_heads"]
        theta = a["rope_theta"] or 10000.0
        yield 1.0 / (theta ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size))
        return
    if kind == "norm":
        x = rng.standard_normal(shape, dtype=np.float32)
        yield x * np.float32(0.1) + np.float32(1.0)
        return
    rows, cols = shape
    scale = np.float32(1.0 / math.sqrt(cols))
    step = max(1, BLOCK // cols)
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= scale
        yield x


def write_tensor(writers, index, name, shape, axis, kind, a):
    """Streams a tensor's shards to the open records of writers, a row block at a time."""
    n = len(writers)
    row = 0  # of the full tensor, at the block's start
    for block in blocks(index, name, shape, kind, a):
        if axis is None:
            data = to_bf16(block)
            for w in writers:
                w.write(data)
        elif axis == 1:
            width = shape[1] // n
            for i, w in enumerate(writers):
                w.write(to_bf16(block[:, i * width:(i + 1) * width]))
        else:  # rows: shard i has rows i * per .. (i + 1) * per; a block may span two
            per = shape[0] // n
            r = 0
            while r < len(block):
                shard = (row + r) // per
                stop = min(len(block), (shard + 1) * per - row)
                writers[shard].write(to_bf16(block[r:stop]))
                r = stop
            row += len(block)


def write_meta_folder(folder, log=None, **args):
    """Writes params.json and the shards into folder (made if missing). args: dim, n_layers,
    n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, vocab, rope_theta, norm_eps, shards,
    vocab_in_params, seed, fuse_qkv, max_seq_len (None: not in params.json)."""
    log = log or (lambda message: None)
    a = dict(PRESETS["tiny"], seed=0, fuse_qkv=False, max_seq_len=None)
    a.update(args)
    hidden, kv_dim = check_shape_args(a)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = {"dim": a["dim"], "multiple_of": a["multiple_of"]}
    if a["ffn_dim_multiplier"] is not None:
        params["ffn_dim_multiplier"] = a["ffn_dim_multiplier"]
    params.update(n_heads=a["n_heads"])
    if a["n_kv_heads"] is not None:
        params["n_kv_heads"] = a["n_kv_heads"]
    params.update(n_layers=a["n_layers"], norm_eps=a["norm_eps"])
    if a["rope_theta"] is not None:
        params["rope_theta"] = a["rope_theta"]
    if a["max_seq_len"] is not None:
        params["max_seq_len"] = a["max_seq_len"]
    params["vocab_size"] = a["vocab"] if a["vocab_in_params"] else -1
    with atomic_write(folder / "params.json") as fh:
        fh.write(json.dumps(params).encode())

    n = a["shards"]
    plan = tensor_plan(a, hidden, kv_dim)
    # each shard's storages: (key, [(plan index, shard shape)...]) and the pickle's entries
    storages, entries = [], []
    for index, (name, shape, axis, kind) in enumerate(plan):
        piece = list(shape)
        if axis is not None:
            piece[axis] //= n
        stride = [math.prod(piece[d + 1:]) for d in range(len(piece))]
        fused = a["fuse_qkv"] and name.endswith((".wk.weight", ".wv.weight"))
        if fused:  # a view further into the storage of this layer's wq
            key, members = storages[-1]
            offset = sum(math.prod(p) for _, p in members)
            members.append((index, piece))
        else:
            key, offset = str(len(storages)), 0
            storages.append((key, [(index, piece)]))
        entries.append([name, key, None, offset, tuple(piece), tuple(stride)])
    numel = {key: sum(math.prod(p) for _, p in members) for key, members in storages}
    for entry in entries:
        entry[2] = numel[entry[1]]
    data_pkl = state_dict_pickle([tuple(e) for e in entries])

    names = [f"consolidated.{i:02d}.pth" for i in range(n)]
    with contextlib.ExitStack() as stack:
        writers = []
        for name in names:
            fh = stack.enter_context(atomic_write(folder / name))
            writers.append(ShardWriter(fh, name[:-len(".pth")]))
        for w in writers:
            w.record("data.pkl", data_pkl)
            w.record(".format_version", b"1")
            w.record(".storage_alignment", b"64")
            w.record("byteorder", b"little")
        for key, members in storages:
            for w in writers:
                w.begin(f"data/{key}", numel[key] * 2)
            for index, _ in members:
                write_tensor(writers, index, *plan[index], a)
            for w in writers:
                w.end()
            log(f"wrote {', '.join(plan[i][0] for i, _ in members)}")
        for w in writers:
            w.record("version", b"3\n")
            w.close()
    log(f"wrote {folder}: {json.dumps(params)}, {n} shard{'s' if n > 1 else ''}")
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(prog="synth_meta", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the folder to write (made if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="Meta's shapes to start from (default tiny)")
    for flag, kind in (("--dim", int), ("--n-layers", int), ("--n-heads", int),
                       ("--n-kv-heads", int), ("--multiple-of", int),
                       ("--ffn-dim-multiplier", float), ("--vocab", int),
                       ("--rope-theta", float), ("--norm-eps", float), ("--shards", int),
                       ("--max-seq-len", int)):
        parser.add_argument(flag, type=kind, help="overrides the preset's")
    parser.add_argument("--vocab-in-params", action=argparse.BooleanOptionalAction,
                        help="params.json's vocab_size is the vocabulary's (else -1, as Llama 2's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="each layer's wq, wk, wv as views of one storage")
    parser.add_argument("--quiet", action="store_true")
    args = vars(parser.parse_args(argv))
    folder, preset, quiet = args.pop("folder"), args.pop("preset"), args.pop("quiet")
    settings = dict(PRESETS[preset])
    settings.update({k: v for k, v in args.items() if v is not None})
    write_meta_folder(folder, log=None if quiet else print, **settings)
    return 0


if __name__ == "__main__":
    sys.exit(run_command("synth_meta", main))
