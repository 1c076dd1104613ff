"""Meta's original Llama 2 and Code Llama checkpoints, read a tensor at a time without PyTorch.

Meta ships a model as a folder: params.json (the model's arguments) and consolidated.NN.pth, one
torch.save file per model-parallel rank (7B: 1, 13B: 2, 34B: 4, 70B: 8), bfloat16. Each shard
holds every weight's slice for its rank, under Meta's names (tok_embeddings.weight,
layers.{i}.attention.wq.weight, ...): the column-parallel layers (wq, wk, wv, w1, w3, output)
are split along their output rows, the row-parallel ones (wo, w2) and the embedding table along
their input columns, and the norms are copied to every shard. MetaLlamaSource joins them back as
llama2.c's export.py does (torch.cat on those axes, the norms from shard 0) and gives each of
run.c's weights as a float32 array, one at a time:

    with MetaLlamaSource("llama-2-7b") as src:
        src.config                       # dim, hidden_dim, ..., rope_theta, norm_eps
        src.tensor("wq", layer=0)        # (dim, dim) float32, C-contiguous
        src.tensor("wcls")               # output.weight: Meta's classifier is separate

Meta's wq and wk already have the interleaved (even, odd) rotary pairs that run.c's RoPE rotates:
nothing is permuted (unlike Hugging Face's copies). rope.freqs, a table of RoPE frequencies that
older checkpoints carry, is not needed and not read.

Everything is checked before a weight is read: params.json's keys and types, the shards'
numbering, that every shard has every tensor and nothing else, and that each tensor's shards
join to the shape params.json implies (hidden_dim from multiple_of and ffn_dim_multiplier as
Meta's model.py computes it). Bad input raises llama2_cython.LlamaError with one line.
"""
import json
import math
import os
import re

import numpy as np

from llama2_cython import LlamaError, formats, torchzip

# run.c's TransformerWeights names -> Meta's tensor names ("{}" is the layer)
META_NAMES = {
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
LAYERED = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")
# The axis along which the shards' slices of each weight are joined; None: a copy in each shard.
# (The embedding table is split along its columns in Llama 2; Llama 3's shards split it along
# its rows instead, which _embedding_axis tells from the shapes.)
SPLIT_AXIS = {
    "token_embedding_table": 1, "rms_att_weight": None, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
    "rms_ffn_weight": None, "w1": 0, "w2": 1, "w3": 0, "rms_final_weight": None, "wcls": 0,
}
IGNORED = ("rope.freqs",)  # RoPE frequencies, recomputed by run.c
DEFAULT_SEQ_LEN = 2048  # what llama2.c's export.py writes for Meta's models (params.json has none)
ROPE_THETA = 10000.0  # Meta's model.py's default base
MAX_PARAMS_BYTES = 1 << 20
INT32_MAX = 2**31 - 1  # llama2.c's header holds int32 sizes
SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def _silent(message):
    pass


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _show(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def meta_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """The feed-forward size that Meta's model.py builds for dim: 2/3 of 4 * dim, times
    ffn_dim_multiplier when there is one, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def weight_shapes(config):
    """Each weight's full shape (per layer, without the layer axis, for the layered ones)."""
    dim, hidden, vocab = config["dim"], config["hidden_dim"], config["vocab_size"]
    kv_dim = config["n_kv_heads"] * (dim // config["n_heads"])
    return {
        "token_embedding_table": (vocab, dim), "rms_att_weight": (dim,), "wq": (dim, dim),
        "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim), "rms_ffn_weight": (dim,),
        "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim), "rms_final_weight": (dim,),
        "wcls": (vocab, dim),
    }


# what params.json's numbers say, as run.c's shapes spell them, for the messages
SHAPE_WORDS = {
    "token_embedding_table": "[vocab_size, dim]", "rms_att_weight": "[dim]", "wq": "[dim, dim]",
    "wk": "[n_kv_heads * head size, dim]", "wv": "[n_kv_heads * head size, dim]",
    "wo": "[dim, dim]", "rms_ffn_weight": "[dim]", "w1": "[hidden_dim, dim]",
    "w2": "[dim, hidden_dim]", "w3": "[hidden_dim, dim]", "rms_final_weight": "[dim]",
    "wcls": "[vocab_size, dim]",
}


class MetaLlamaSource:
    """The weights of a Meta Llama 2 / Code Llama folder as run.c names them, one at a time.

    config: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (ints),
    rope_theta, norm_eps (floats). seq_len is the argument when given, else params.json's
    max_seq_len when it has one (Meta's have none), else 2048 like llama2.c's export.py.
    shared: False (Meta's classifier, output.weight, is a tensor of its own).
    tensor(key, layer) reads one weight. Keeps the shards open until close() or the end of a
    with block."""

    shared = False

    def __init__(self, folder, log=None, *, seq_len=None):
        if seq_len is not None and not (_is_int(seq_len) and seq_len > 0):
            raise ValueError(f"seq_len must be a positive int, not {seq_len!r}")
        self.folder = os.fspath(folder)
        self._log = log or _silent
        self._shards = []
        try:
            params = self._read_params()
            paths = self._shard_paths()
            for path in paths:
                self._shards.append(torchzip.TorchCheckpoint(path))
                self._log(f"opened {path}")
            self._dicts = [shard.state_dict() for shard in self._shards]
            self._paths = paths
            self._check_names(params["n_layers"])
            self._axes = dict(SPLIT_AXIS)
            self.config = self._make_config(params, seq_len)
            self._check_shapes()
        except BaseException:
            self.close()
            raise
        self._log(f"{self.folder}: {len(paths)} shard{'s' if len(paths) > 1 else ''}, "
                  + ", ".join(f"{k}={v}" for k, v in self.config.items()))

    # ------------------------------------------------------------------------ params.json

    def _read_params(self):
        if not os.path.isdir(self.folder):
            raise LlamaError(f"{self.folder}: " + ("not a folder" if os.path.exists(self.folder)
                                                   else "no such folder"))
        path = self._params_path = os.path.join(self.folder, "params.json")
        if not os.path.isfile(path):
            raise LlamaError(f"{self.folder}: no params.json, not a Meta Llama folder")
        if os.path.getsize(path) > MAX_PARAMS_BYTES:
            raise LlamaError(f"{path}: {os.path.getsize(path)} bytes, too big for a params.json")
        try:
            with open(path, "rb") as fh:
                params = json.loads(fh.read())
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LlamaError(f"{path}: not JSON ({reason})") from None
        if not isinstance(params, dict):
            raise LlamaError(f"{path}: {_show(params)} is not a JSON object")

        def refuse(key, reason):
            raise LlamaError(f"{path}: {key} is {_show(params[key])}: {reason}")

        for key in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps"):
            if key not in params:
                raise LlamaError(f"{path}: no {key}")
        out = {}
        for key in ("dim", "n_layers", "n_heads", "multiple_of", "n_kv_heads", "max_seq_len",
                    "max_batch_size"):
            value = params.get(key)
            if value is None and key in ("n_kv_heads", "max_seq_len", "max_batch_size"):
                out[key] = None
            elif not _is_int(value) or not 0 < value <= INT32_MAX:
                refuse(key, f"not a positive integer (at most {INT32_MAX})")
            else:
                out[key] = value
        vocab = params.get("vocab_size", -1)
        if not _is_int(vocab) or not (vocab == -1 or 0 < vocab <= INT32_MAX):
            refuse("vocab_size", "not a positive integer or -1 (take it from the embeddings)")
        out["vocab_size"] = vocab
        for key, default in (("norm_eps", None), ("rope_theta", ROPE_THETA),
                             ("ffn_dim_multiplier", None)):
            value = params.get(key, default)
            if value is None and key == "ffn_dim_multiplier":
                out[key] = None
            elif not _is_number(value) or value <= 0:
                refuse(key, "not a positive number")
            else:
                out[key] = float(value)
        if params.get("use_scaled_rope", False) is not False:
            refuse("use_scaled_rope", "Llama 3.1's RoPE scaling; run.c has none")
        known = set(out) | {"use_scaled_rope"}
        for key in params:
            if key not in known:
                refuse(key, "not a parameter of Meta's Llama 2 or Code Llama (run.c could "
                            "not compute what it changes)")
        return out

    # ------------------------------------------------------------------------ the shards

    def _shard_paths(self):
        """consolidated.00.pth, 01, ... sorted by number, which must run from 0 without gaps."""
        numbered = {}
        for name in os.listdir(self.folder):
            match = SHARD.fullmatch(name)
            if match:
                number = int(match.group(1))
                if number in numbered:
                    raise LlamaError(f"{self.folder}: both {numbered[number]} and {name} are "
                                     f"shard {number}")
                numbered[number] = name
        if not numbered:
            raise LlamaError(f"{self.folder}: no consolidated.NN.pth files, not a Meta Llama "
                             f"folder")
        for number in range(len(numbered)):
            if number not in numbered:
                raise LlamaError(f"{self.folder}: no shard {number} (consolidated."
                                 f"{number:02d}.pth), but there are {len(numbered)} shards up "
                                 f"to {numbered[max(numbered)]}")
        return [os.path.join(self.folder, numbered[n]) for n in range(len(numbered))]

    def _check_names(self, n_layers):
        """Every shard has each tensor of n_layers layers, and nothing else but IGNORED."""
        expected = set()
        for i in range(n_layers):  # layer by layer: a params.json claiming 10^9 stops at once
            for key in LAYERED:
                name = META_NAMES[key].format(i)
                self._require(name, f"(params.json: n_layers {n_layers})")
                expected.add(name)
        for key, name in META_NAMES.items():
            if key not in LAYERED:
                self._require(name, "")
                expected.add(name)
        for path, tensors in zip(self._paths, self._dicts):
            for name in tensors:
                if name in expected or name in IGNORED:
                    continue
                layer = re.match(r"layers\.(\d+)\.", name)
                if layer and int(layer.group(1)) < n_layers:
                    raise LlamaError(f"{path}: tensor {name} has no place in a Llama 2 layer")
                if layer:
                    raise LlamaError(f"{path}: tensor {name} is not part of params.json's "
                                     f"n_layers {n_layers} Llama 2 layers")
                raise LlamaError(f"{path}: tensor {name} has no place in a Llama 2 model")

    def _require(self, name, note):
        for path, tensors in zip(self._paths, self._dicts):
            if name not in tensors:
                raise LlamaError(f"{path}: no tensor {name} {note}".rstrip())

    def _pieces(self, key, layer=None):
        name = META_NAMES[key].format(layer)
        return name, [tensors[name] for tensors in self._dicts]

    def _joined_shape(self, key, layer=None):
        """The shape the shards' pieces of a weight join to, the pieces checked alike."""
        name, pieces = self._pieces(key, layer)
        ndim = 1 if key.startswith("rms_") else 2
        first = pieces[0]
        for path, piece in zip(self._paths, pieces):
            if piece.ndim != ndim:
                raise LlamaError(f"{path}: tensor {name} has shape {list(piece.shape)}, not "
                                 f"{'a vector' if ndim == 1 else 'a matrix'}")
            if piece.shape != first.shape:
                how = ("the same in every shard" if self._axes[key] is None
                       else f"split evenly on axis {self._axes[key]}")
                raise LlamaError(f"{path}: tensor {name} has shape {list(piece.shape)}, but "
                                 f"{self._paths[0]}'s is {list(first.shape)} (it is {how})")
        for path, piece in zip(self._paths, pieces):
            if piece.numel > piece.storage.numel:  # e.g. a stride-0 (expanded) view
                raise LlamaError(f"{path}: tensor {name} has {piece.numel} elements, more than "
                                 f"the {piece.storage.numel} of its storage: not a weight")
        shape = list(first.shape)
        if self._axes[key] is not None:
            shape[self._axes[key]] *= len(pieces)
        return tuple(shape)

    def _embedding_axis(self, dim):
        """1 for Llama 2's shards (the embedding table's columns split), 0 for Llama 3's
        (its rows split: each shard's piece has all dim columns)."""
        _, pieces = self._pieces("token_embedding_table")
        if len(pieces) > 1 and pieces[0].ndim == 2 and pieces[0].shape[1] == dim:
            return 0
        return 1

    def _make_config(self, params, seq_len):
        where = self._params_path
        dim, n_heads = params["dim"], params["n_heads"]
        n_kv_heads = params["n_kv_heads"] or n_heads
        self._axes["token_embedding_table"] = self._embedding_axis(dim)
        vocab, columns = self._joined_shape("token_embedding_table")
        if columns != dim:
            raise LlamaError(f"{where}: dim is {dim}, but tok_embeddings.weight makes "
                             f"[{vocab}, {columns}]")
        if params["vocab_size"] not in (-1, vocab):
            raise LlamaError(f"{where}: vocab_size is {params['vocab_size']}, but "
                             f"tok_embeddings.weight has {vocab} rows")
        hidden = self._joined_shape("w1", 0)[0]
        implied = meta_hidden_dim(dim, params["multiple_of"], params["ffn_dim_multiplier"])
        if hidden != implied:
            raise LlamaError(
                f"{where}: dim {dim}, multiple_of {params['multiple_of']} and ffn_dim_multiplier "
                f"{_show(params['ffn_dim_multiplier'])} give a hidden_dim of {implied}, but "
                f"layers.0.feed_forward.w1.weight has {hidden} rows")
        if seq_len is None:
            seq_len = params["max_seq_len"] or DEFAULT_SEQ_LEN
        config = dict(dim=dim, hidden_dim=hidden, n_layers=params["n_layers"], n_heads=n_heads,
                      n_kv_heads=n_kv_heads, vocab_size=vocab, seq_len=seq_len)
        formats.check_config(config, where)
        config.update(rope_theta=params["rope_theta"], norm_eps=params["norm_eps"])
        return config

    def _check_shapes(self):
        shapes = weight_shapes(self.config)
        n = len(self._shards)
        for key, shape in shapes.items():
            for layer in range(self.config["n_layers"]) if key in LAYERED else (None,):
                joined = self._joined_shape(key, layer)
                if joined != shape:
                    name = META_NAMES[key].format(layer)
                    over = f" over {n} shards" if n > 1 and self._axes[key] is not None else ""
                    raise LlamaError(
                        f"{self._paths[0]}: tensor {name} makes {list(joined)}{over}, but "
                        f"params.json's {SHAPE_WORDS[key]} is {list(shape)}")

    # ------------------------------------------------------------------------ the interface

    def tensor(self, key, layer=None):
        """run.c's weight `key` (of layer `layer` for the per-layer ones) as a new float32
        C-contiguous array, its shards joined; a norm's copies in the other shards are checked
        to be the same as shard 0's."""
        if key not in META_NAMES:
            raise ValueError(f"unknown weight {key!r}; one of {', '.join(META_NAMES)}")
        if key in LAYERED:
            if not (_is_int(layer) and 0 <= layer < self.config["n_layers"]):
                raise ValueError(f"{key} needs a layer in 0..{self.config['n_layers'] - 1}, "
                                 f"not {layer!r}")
        elif layer is not None:
            raise ValueError(f"{key} has no layers")
        if not self._shards:
            raise ValueError(f"{self.folder}: the source is closed")
        name, pieces = self._pieces(key, layer)
        out = np.empty(weight_shapes(self.config)[key], np.float32)
        axis = self._axes[key]
        if axis is None:
            pieces[0].read_into(out)
            for path, piece in zip(self._paths[1:], pieces[1:]):
                if not np.array_equal(piece.numpy().view(np.uint32), out.view(np.uint32)):
                    raise LlamaError(f"{path}: tensor {name} differs from {self._paths[0]}'s "
                                     f"(a norm is the same in every shard)")
        else:
            step = pieces[0].shape[axis]
            for i, piece in enumerate(pieces):
                index = [slice(None)] * out.ndim
                index[axis] = slice(i * step, (i + 1) * step)
                piece.read_into(out[tuple(index)])
        return out

    def close(self):
        for shard in self._shards:
            shard.close()
        self._shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
