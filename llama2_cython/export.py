#!/usr/bin/env python3
"""Write llama2.c model files: convert between the formats run.c and runq.c read, or export a
llama2.c train.py checkpoint, a Hugging Face Llama folder or Meta's own Llama 2 / Code Llama
folder. NumPy only; torch is imported only for --checkpoint.

    python export.py OUT.bin --version {0,1,2} (--bin IN.bin | --checkpoint ckpt.pt | --hf DIR |
                     --meta-llama DIR [--seq-len N]) [--group-size N] [--packed]

The formats (little-endian; [wcls] is there only when the classifier is not shared with the
token embedding table):
  v0 (legacy, run.c): 7 int32 config values (vocab_size negated when wcls is separate), then fp32
     token_embedding_table, rms_att_weight, wq, wk, wv, wo, rms_ffn_weight, w1, w2, w3,
     rms_final_weight, freq_cis_real, freq_cis_imag (seq_len x head_size/2 each), [wcls].
  v1 (fp32): a 256-byte header: uint32 magic "ak42", int32 version, the 7 int32 config values,
     uint8 shared classifier; then fp32 rms_att_weight, rms_ffn_weight, rms_final_weight,
     token_embedding_table, wq, wk, wv, wo, w1, w2, w3, [wcls].
  v2 (Q8_0, runq.c): the v1 header with int32 group_size after the shared byte; fp32 norms as
     in v1; then token_embedding_table, wq, wk, wv, wo, w1, w2, w3, [wcls], quantized one layer's
     matrix at a time: its int8 values, then one fp32 scale per group of group_size values.
  v3: v1's (group_size 0) or v2's tensors after a header that also holds the RoPE base and
     scaling and the RMSNorm epsilon (llama2_cython/formats.py); written instead of v1 or v2 for
     a model that run.c's constants would compute wrongly, and for --packed: v2's norms and
     token_embedding_table, then wq, wk, wv, wo, w1, w2, w3, wcls (the table again when shared)
     in runq's packed layout (layout 1, formats.py).
A Q8_0 file converted to Q8_0 with its own group size keeps its int8 values and scales as they
are (--packed from a v2 file, and back, only moves bytes).
"""
import argparse
import glob
import json
import math
import numbers
import os
import re
import struct
import sys

import numpy as np

from llama2_cython import LlamaError, formats
from llama2_cython.cli import run_command
from llama2_cython.files import atomic_write
from llama2_cython.meta import LAYERED, META_NAMES, MetaLlamaSource

# the format's rules (header layouts, checks, sizes) are llama2_cython.formats', shared with run
# and runq; what is here is how the tensors are laid out and converted
MAGIC = formats.MAGIC
HEADER_SIZE = formats.HEADER_SIZE
CONFIG_KEYS = formats.CONFIG_FIELDS
NORMS = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")
MATRICES = ("token_embedding_table", "wq", "wk", "wv", "wo", "w1", "w2", "w3")  # then [wcls]
V0_ORDER = ("token_embedding_table", "rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight",
            "w1", "w2", "w3", "rms_final_weight")

# Where each weight lives in a train.py state_dict and in a Hugging Face Llama; "{}" is the layer.
# llama2.c's train.py (model.py) names its weights as Meta's model.py does
CHECKPOINT_NAMES = META_NAMES
HF_NAMES = {
    "token_embedding_table": "model.embed_tokens.weight",
    "rms_att_weight": "model.layers.{}.input_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight",
    "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight",
    "wo": "model.layers.{}.self_attn.o_proj.weight",
    "rms_ffn_weight": "model.layers.{}.post_attention_layernorm.weight",
    "w1": "model.layers.{}.mlp.gate_proj.weight",
    "w2": "model.layers.{}.mlp.down_proj.weight",
    "w3": "model.layers.{}.mlp.up_proj.weight",
    "rms_final_weight": "model.norm.weight",
    "wcls": "lm_head.weight",
}
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
INT32_MAX = 2**31 - 1  # the header's config values are int32
ROPE_ROWS = 4096  # v0's RoPE tables are computed and written this many positions at a time


# bad input: the project's one error type (the CLI prints its message as one line, status 1)
ExportError = LlamaError


def _silent(message):
    pass


# ---------------------------------------------------------------------------- shapes and checks

def weight_shapes(config):
    """The shape of every weight, in run.c's TransformerWeights names (wcls included)."""
    dim, hidden, layers = config["dim"], config["hidden_dim"], config["n_layers"]
    kv_dim = config["n_kv_heads"] * (dim // config["n_heads"])
    vocab = config["vocab_size"]
    return {
        "token_embedding_table": (vocab, dim),
        "rms_att_weight": (layers, dim),
        "wq": (layers, dim, dim),
        "wk": (layers, kv_dim, dim),
        "wv": (layers, kv_dim, dim),
        "wo": (layers, dim, dim),
        "rms_ffn_weight": (layers, dim),
        "w1": (layers, hidden, dim),
        "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim),
        "rms_final_weight": (dim,),
        "wcls": (vocab, dim),
    }


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_config(config, where):
    """The config as a dict of the 7 ints run.c can use (formats.check_config's rules); the
    error names `where`."""
    try:
        cfg = {key: config[key] for key in CONFIG_KEYS}
    except KeyError as e:
        raise ExportError(f"{where}: no {e.args[0]}") from None
    formats.check_config(cfg, where)
    return {key: int(value) for key, value in cfg.items()}


def _check_weights(config, weights, shared):
    for name, shape in weight_shapes(config).items():
        if name == "wcls" and shared:
            continue
        if name not in weights:
            raise ExportError(f"weights: no {name}")
        if np.shape(weights[name]) != shape:
            raise ExportError(f"weights: {name} has shape {np.shape(weights[name])}, "
                              f"the config says {shape}")


def _tensor_names(shared):
    """The matrices that v2 quantizes, in file order."""
    return MATRICES if shared else MATRICES + ("wcls",)


# ---------------------------------------------------------------------------- Q8_0

def choose_group_size(config, group_size=64, back_off=True):
    """A Q8_0 group size dividing every matmul row length (dim and hidden_dim; every quantized
    tensor is a whole number of rows, so its size follows). runq.c computes wrong numbers when a
    group straddles two rows (llama2.c PR #532: stories42M, hidden 1376, group 64). With back_off,
    halve group_size until it divides (upstream export.py checked dim only); else refuse it."""
    rows = (config["dim"], config["hidden_dim"])
    if group_size < 1:
        raise ExportError(f"group size {group_size} must be positive")
    if back_off:
        while any(n % group_size for n in rows):
            group_size //= 2  # 1 divides everything, so this ends
    elif any(n % group_size for n in rows):
        fits = choose_group_size(config, group_size)
        raise ExportError(f"group size {group_size} does not divide both dim {rows[0]} and "
                          f"hidden_dim {rows[1]} (runq would compute wrong numbers); try {fits}")
    return group_size


def quantize_q80(w, group_size):
    """Q8_0: each run of group_size consecutive values (row-major) becomes int8 values q and one
    float32 scale = max|x| / 127, with x ~= q * scale. Rounds half to even, like the torch.round
    of upstream's export.py, so the files agree byte for byte.
    Returns (q shaped like w, scales (one per group), largest absolute error)."""
    w = np.asarray(w, dtype=np.float32)
    if group_size < 1 or w.size % group_size:
        raise ExportError(f"{w.size} values do not split into groups of {group_size}")
    x = w.reshape(-1, group_size)
    scale = np.abs(x).max(axis=1) / np.float32(127.0)
    # An all-zero group has scale 0: divide it by 1 instead, its values stay 0.
    q = x / np.where(scale > 0, scale, np.float32(1.0))[:, None]
    np.round(q, out=q)
    q = q.astype(np.int8)
    error = float(np.abs(q * scale[:, None] - x).max())
    return q.reshape(w.shape), scale, error


def _dequantize(q, scale, shape):
    group_size = q.size // scale.size
    return (q.reshape(-1, group_size) * scale[:, None]).reshape(shape)


# ---------------------------------------------------------------------------- model parameters

# A config dict holds the 7 ints of CONFIG_KEYS and, for a model that run.c's constants do not
# compute, any of: "rope_theta" (float), "norm_eps" (float), "rope_scaling" (None, or a dict as
# transformers writes it: {"rope_type": "linear", "factor": F} or {"rope_type": "llama3",
# "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}).
# Absent keys mean run.c's values. Such a model is written as v3 (formats.py).

def model_params(config, where="config", scaling_key="rope_scaling"):
    """(formats.Rope, norm_eps) of a config dict (see above), checked; float32 as stored. The
    messages start with where and call the scaling dict scaling_key."""
    def number(key, default):
        value = config.get(key, default)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ExportError(f"{where}: {key} is {_show(value)}, not a number")
        return formats.float32(value)

    theta, eps = number("rope_theta", formats.ROPE_THETA), number("norm_eps", formats.NORM_EPS)
    scaling = config.get("rope_scaling")
    if scaling is None:
        rope = formats.Rope(theta)
    else:
        if not isinstance(scaling, dict):
            raise ExportError(f"{where}: {scaling_key} is {_show(scaling)}, not a JSON object")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear" and set(scaling) <= {"rope_type", "type", "factor"}:
            rope = formats.Rope(theta, "linear", number_in(scaling, "factor", where, scaling_key))
        elif kind == "llama3" and set(scaling) <= {"rope_type", "type", "factor", "low_freq_factor",
                                                    "high_freq_factor",
                                                    "original_max_position_embeddings"}:
            original = scaling.get("original_max_position_embeddings")
            if not _is_int(original):
                raise ExportError(f"{where}: {scaling_key}.original_max_position_embeddings is "
                                  f"{_show(original)}, not an integer")
            rope = formats.Rope(theta, "llama3", number_in(scaling, "factor", where, scaling_key),
                                number_in(scaling, "low_freq_factor", where, scaling_key),
                                number_in(scaling, "high_freq_factor", where, scaling_key),
                                original)
        else:
            raise ExportError(f"{where}: {scaling_key} {_show(scaling)} is not one that run and "
                              f"runq compute (linear or llama3, with their parameters only)")
    if rope.scaling == "none" and rope.theta == formats.ROPE_THETA:
        rope = formats.Rope()
    formats.check_model_params(config, rope, eps, where)
    return rope, eps


def number_in(mapping, key, where, mapping_key):
    value = mapping.get(key)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ExportError(f"{where}: {mapping_key}.{key} is {_show(value)}, not a number")
    return formats.float32(value)


def params_config(rope, norm_eps):
    """The config keys (see model_params) that give rope and norm_eps; none for run.c's."""
    keys = {}
    if rope.theta != formats.ROPE_THETA:
        keys["rope_theta"] = rope.theta
    if norm_eps != formats.NORM_EPS:
        keys["norm_eps"] = norm_eps
    if rope.scaling == "linear":
        keys["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.scaling == "llama3":
        keys["rope_scaling"] = {"rope_type": "llama3", "factor": rope.factor,
                                "low_freq_factor": rope.low_freq_factor,
                                "high_freq_factor": rope.high_freq_factor,
                                "original_max_position_embeddings": rope.original_max_position}
    return keys


# ---------------------------------------------------------------------------- sources
# The writers read their input a tensor at a time from a source, so that converting a model takes
# memory for its largest tensor, not for the model (Llama 2 7B is 27 GB in float32). A source has
#   .config  the config dict (the 7 ints, and the model parameters above)
#   .shared  whether the classifier is the token embedding table
#   .tensor(key, layer=None)  one weight as a float32 array: key is run.c's name (weight_shapes),
#            layer the layer of the per-layer ones (LAYERED), whose shape then has no layer axis.


class ArraySource:
    """Weights that are already arrays: (config, weights, shared) as read_model gives them."""

    def __init__(self, config, weights, shared):
        _check_weights(_check_config(config, "config"), weights, shared)
        self.config, self.weights, self.shared = config, weights, shared

    def tensor(self, key, layer=None):
        array = self.weights["token_embedding_table" if key == "wcls" and self.shared else key]
        return array if layer is None else array[layer]


class FileSource:
    """A llama2.c model file of any version, mapped: each tensor is read (and, from v2,
    dequantized) when asked for."""

    def __init__(self, path, log=None):
        with open(path, "rb") as fh:
            header = formats.parse_header(fh.read(HEADER_SIZE), path)
            formats.check_header(header, path)
            formats.check_file_size(header, os.fstat(fh.fileno()).st_size, path)
        self.header = header
        self.config = dict(header.config, **params_config(header.rope, header.norm_eps))
        self.shared = header.shared_classifier
        self._data = np.memmap(path, np.uint8, mode="r")
        self._offsets = {}  # key: (offset of layer 0, bytes per layer)
        # a Q8_0 file's group size: q80() gives its tensors as stored
        self.group_size = header.group_size if header.quantized else 0
        offset = header.size
        shapes = weight_shapes(header.config)
        if header.version == 0:
            order = list(V0_ORDER) + ["freq_cis"] + ([] if self.shared else ["wcls"])
        else:
            order = list(NORMS) + list(_tensor_names(self.shared and not header.layout))
        head_size = header.config["dim"] // header.config["n_heads"]
        for key in order:
            if key == "freq_cis":
                offset += 2 * header.config["seq_len"] * (head_size // 2) * 4
                continue
            shape = shapes[key]
            count = shape[0] if key in LAYERED else 1
            values = math.prod(shape) // count
            size = values + 4 * (values // header.group_size) if header.quantized and key not in NORMS \
                else 4 * values
            if header.layout and key not in NORMS and key != "token_embedding_table":
                if key == "wq":  # the packed matrices start aligned (formats.packed_start)
                    offset = formats.packed_start(header)
                values, scales = formats.packed_size(*shape[-2:], header.group_size)
                size = values + 4 * scales
            self._offsets[key] = (offset, size)
            offset += count * size
        (log or _silent)(f"read {path}: version {header.version}, {header.describe()}, "
                         f"{'shared' if self.shared else 'separate'} classifier")

    def _raw(self, key, layer):
        """(bytes of the tensor, its shape without the layer axis)."""
        shape = weight_shapes(self.header.config)[key]
        if key in LAYERED:
            shape = shape[1:]
        offset, size = self._offsets[key]
        return self._data[offset + (layer or 0) * size:][:size], shape

    def tensor(self, key, layer=None):
        if key == "wcls" and self.shared and not self.header.layout:
            key = "token_embedding_table"
        if self.header.quantized and key not in NORMS:
            q, scale = self.q80(key, layer)
            return _dequantize(q, scale, q.shape)
        raw, shape = self._raw(key, layer)
        return raw.view("<f4").astype(np.float32).reshape(shape)

    def q80(self, key, layer=None):
        """A Q8_0 file's matrix as stored, in rows: (int8 values shaped like the matrix, float32
        scales, one per group of group_size values), unpacked from a packed file."""
        if key == "wcls" and self.shared and not self.header.layout:
            key = "token_embedding_table"
        raw, shape = self._raw(key, layer)
        if self.header.layout and key != "token_embedding_table":
            return unpack_q80(raw, *shape, self.group_size)
        values = math.prod(shape)
        scale = raw[values:].view("<f4").astype(np.float32)
        return raw[:values].view(np.int8).reshape(shape), scale


def gather(source):
    """(config, weights, shared) with every weight of source in memory, stacked over layers."""
    cfg = _check_config(source.config, "config")
    weights = {}
    for key, shape in weight_shapes(cfg).items():
        if key == "wcls" and source.shared:
            weights[key] = weights["token_embedding_table"]
            continue
        out = np.empty(shape, np.float32)
        if key in LAYERED:
            for layer in range(cfg["n_layers"]):
                out[layer] = source.tensor(key, layer)
        else:
            out[...] = source.tensor(key)
        weights[key] = out
    return dict(source.config), weights, source.shared


def read_model(path, log=None):
    """Read a llama2.c model file, v0 to v3, into (config, weights, shared): weights are
    float32 arrays named and shaped like run.c's TransformerWeights (see weight_shapes), Q8_0 ones
    dequantized; weights["wcls"] is weights["token_embedding_table"] when shared. A v3 file's
    model parameters are in config (see model_params)."""
    return gather(FileSource(path, log))


# ---------------------------------------------------------------------------- writing

def _write(fh, array, dtype):
    """Stream one tensor's bytes to the file without an intermediate bytes copy."""
    fh.write(memoryview(np.ascontiguousarray(array, dtype=dtype)).cast("B"))


def _config_ints(cfg):
    return [cfg[key] for key in CONFIG_KEYS]


def header_bytes(version, cfg, shared, group_size=0, rope=formats.Rope(), norm_eps=formats.NORM_EPS,
                 packed=False):
    """The 256 header bytes of a v1, v2 or v3 file (for writers of their own: tools/bench.py);
    packed: v3's layout 1."""
    head = struct.pack("<Ii7iB", MAGIC, version, *_config_ints(cfg), shared)
    if version >= 2:
        head += struct.pack("<i", group_size)
    if version == 3:
        head += b"\0" * (formats.V3_PARAMS_OFFSET - len(head)) + formats.pack_v3_params(rope, norm_eps)
        head += formats.V3_LAYOUT.pack(int(packed))
    return head + b"\0" * (HEADER_SIZE - len(head))


def rope_tables(config, start=0, stop=None):
    """v0's freq_cis_real and freq_cis_imag tables (rows start..stop, default all seq_len),
    computed in float32 in model.py's order. run.c skips them (it computes RoPE itself);
    upstream's files, written with torch's cos and sin, can differ from these in the last bit."""
    head_size = config["dim"] // config["n_heads"]
    inv = 1.0 / (10000.0 ** (np.arange(0, head_size, 2)[: head_size // 2].astype(np.float32)
                             / head_size))
    positions = np.arange(start, config["seq_len"] if stop is None else stop).astype(np.float32)
    angles = np.outer(positions, inv).astype(np.float32)
    return np.cos(angles), np.sin(angles)


QUANTIZE_VALUES = 1 << 22  # values quantized at a time: temporaries stay a few times 16 MB


def _q80_slices(array, group_size):
    """(int8 values, scales, largest absolute error) of each slice of QUANTIZE_VALUES values of a
    tensor, in order."""
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    if flat.size % group_size:
        raise ExportError(f"{flat.size} values do not split into groups of {group_size}")
    step = max(group_size, QUANTIZE_VALUES // group_size * group_size)
    for start in range(0, flat.size, step):
        yield quantize_q80(flat[start:start + step], group_size)


def _write_q80(fh, array, group_size):
    """One tensor as Q8_0 (its int8 values, then its scales), quantized a slice of groups at a
    time; returns the largest absolute error."""
    scales, error = [], 0.0
    for q, scale, piece_error in _q80_slices(array, group_size):
        _write(fh, q, np.int8)
        scales.append(scale)
        error = max(error, piece_error)
    _write(fh, np.concatenate(scales) if scales else np.empty(0, np.float32), "<f4")
    return error


# runq's packed layout (formats.py's layout 1; q8matmul.h's q8_pack_block defines it): each block
# of 16 rows is a chunk of 1024 bytes per 64 columns, whose 64-byte vector k holds bytes 4k ..
# 4k + 3 of the chunk's columns for rows 0 .. 15 in turn, as w + 128; the padding rows and columns
# are 0 (128). The scales follow per block: 16 floats a group, one per row (0 past the last row).
PACK_ROWS = 1 << 12  # rows packed at a time (a multiple of 16): temporaries a few times 16 MB


def _packed_values(q):
    """The packed layout's int8 bytes (as uint8) of q (rows, cols), whole blocks of 16 rows."""
    rows, cols = q.shape
    padded = np.zeros((-(-rows // 16) * 16, -(-cols // 64) * 64), np.uint8)
    padded[:rows, :cols] = q.view(np.uint8)
    padded ^= 0x80
    # (block, row in block, chunk, 4-byte lane, byte) -> (block, chunk, lane, row in block, byte)
    lanes = padded.reshape(padded.shape[0] // 16, 16, padded.shape[1] // 64, 16, 4)
    return lanes.transpose(0, 2, 3, 1, 4).reshape(-1)


def _packed_scales(scale, rows, group_size):
    """The packed layout's scales of a matrix whose rows have scale.size // rows groups."""
    groups = scale.size // rows
    padded = np.zeros((-(-rows // 16) * 16, groups), np.float32)
    padded[:rows] = np.reshape(scale, (rows, groups))
    return padded.reshape(-1, 16, groups).transpose(0, 2, 1).reshape(-1)


def pack_q80(q, scale, group_size):
    """(int8 values as uint8, float32 scales) of Q8_0 q (rows, cols) and its scales (one per
    group of group_size values, row-major) in runq's packed layout."""
    q = np.asarray(q, np.int8)
    values = np.concatenate([_packed_values(q[r:r + PACK_ROWS])
                             for r in range(0, q.shape[0], PACK_ROWS)])
    return values, _packed_scales(scale, q.shape[0], group_size)


def unpack_q80(data, rows, cols, group_size):
    """(int8 values (rows, cols), float32 scales) of a matrix stored packed in data (uint8: its
    values, then its scales): pack_q80's inverse, the padding dropped."""
    nbytes, nscales = formats.packed_size(rows, cols, group_size)
    blocks, groups = -(-rows // 16), cols // group_size
    lanes = np.asarray(data[:nbytes], np.uint8).reshape(blocks, -(-cols // 64), 16, 16, 4)
    q = (lanes.transpose(0, 3, 1, 2, 4).reshape(blocks * 16, -1)[:rows, :cols] ^ 0x80).view(np.int8)
    scale = np.asarray(data[nbytes:nbytes + 4 * nscales]).view("<f4").reshape(blocks, groups, 16)
    scale = scale.transpose(0, 2, 1).reshape(blocks * 16, groups)[:rows]
    return q, scale.astype(np.float32).reshape(-1)


def _write_packed(fh, q, scale, group_size):
    """One matrix in the packed layout, PACK_ROWS rows of values at a time, then its scales."""
    for r in range(0, q.shape[0], PACK_ROWS):
        _write(fh, _packed_values(q[r:r + PACK_ROWS]), np.uint8)
    _write(fh, _packed_scales(scale, q.shape[0], group_size), "<f4")


def _q80(source, key, layer, shape, group_size):
    """(int8 values shaped like the matrix, scales, largest absolute error) of one matrix: as
    stored where source is a Q8_0 file of this group size (error 0: nothing is requantized),
    else quantized."""
    if getattr(source, "group_size", 0) == group_size:
        q, scale = source.q80(key, layer)
        return q, scale, 0.0
    pieces = list(_q80_slices(_checked(source, key, layer, {key: shape}), group_size))
    q = np.concatenate([p[0] for p in pieces]).reshape(shape[-2:])
    return q, np.concatenate([p[1] for p in pieces]), max(p[2] for p in pieces)


def _checked(source, key, layer, shapes):
    """source's tensor, which must have the config's shape."""
    tensor = source.tensor(key, layer)
    shape = shapes[key][1:] if key in LAYERED else shapes[key]
    if np.shape(tensor) != shape:
        where = f"{key} of layer {layer}" if key in LAYERED else key
        raise ExportError(f"weights: {where} has shape {np.shape(tensor)}, the config says {shape}")
    return tensor


def _each(source, key, cfg, shapes):
    """The pieces of weight key in file order: each layer's, or the whole tensor."""
    for layer in (range(cfg["n_layers"]) if key in LAYERED else (None,)):
        yield _checked(source, key, layer, shapes)


# The writers replace path only with a complete file (llama2_cython.files.atomic_write): an error,
# Ctrl-C or kill part-way leaves the old file as it was.

def write_model(path, version, source, group_size=64, *, back_off=True, packed=False, log=None):
    """Write source (see sources above) as a llama2.c file: version 0 (legacy, run.c), 1 (fp32)
    or 2 (Q8_0, with group_size backed off as choose_group_size says, or refused with
    back_off=False). A model that run.c's constants would compute wrongly (model_params) is
    written as v3 with the tensors of v1 or v2; version 0 cannot hold it and refuses. packed
    (version 2 only): v3 with the matrices in runq's packed layout (layout 1: group size 32 or
    64). Reads and writes one tensor at a time. Returns the group size used (0 for fp32)."""
    log = log or _silent
    cfg = _check_config(source.config, "config")
    rope, norm_eps = model_params(source.config)
    shared = source.shared
    shapes = weight_shapes(cfg)
    llama2 = formats.is_llama2(rope, norm_eps)
    if version == 0 and not llama2:
        raise ExportError(f"version 0 cannot hold this model ({formats.describe_model(rope, norm_eps)}: "
                          f"run.c would compute it with base 10000 and epsilon 1e-5); write "
                          f"--version 1 or 2, which write it as version 3")
    if packed and version != 2:
        raise ExportError(f"version {version} cannot be packed: the packed layout is Q8_0's "
                          f"(version 2)")
    group_size = choose_group_size(cfg, group_size, back_off) if version == 2 else 0
    if packed:
        formats.check_packable(cfg, group_size, "--packed")
    file_version = version if llama2 and not packed else 3
    if packed:
        log("packed matrices: writing version 3 (layout 1), which upstream's runq.c refuses")
    elif file_version == 3:
        log(f"{formats.describe_model(rope, norm_eps)}: writing version 3 "
            f"({'Q8_0' if group_size else 'fp32'} tensors), which upstream's run.c/runq.c refuse")
    max_error = 0.0
    with atomic_write(path) as fh:
        if version == 0:
            header = _config_ints(cfg)
            if not shared:
                header[CONFIG_KEYS.index("vocab_size")] *= -1
            fh.write(struct.pack("<7i", *header))
            for key in V0_ORDER:
                for piece in _each(source, key, cfg, shapes):
                    _write(fh, piece, "<f4")
                log(f"wrote {key} {shapes[key]}")
            # all of freq_cis_real, then all of freq_cis_imag, a block of rows at a time: seq_len
            # can be large, and nothing else is sized by it
            for part in (0, 1):
                for start in range(0, cfg["seq_len"], ROPE_ROWS):
                    _write(fh, rope_tables(cfg, start, min(start + ROPE_ROWS, cfg["seq_len"]))[part],
                           "<f4")
            if not shared:
                _write(fh, _checked(source, "wcls", None, shapes), "<f4")
                log(f"wrote wcls {shapes['wcls']}")
            return 0
        fh.write(header_bytes(file_version, cfg, shared, group_size, rope, norm_eps, packed))
        for key in NORMS:
            for piece in _each(source, key, cfg, shapes):
                _write(fh, piece, "<f4")
        for key in _tensor_names(shared and not packed):
            if not group_size:
                for piece in _each(source, key, cfg, shapes):
                    _write(fh, piece, "<f4")
                log(f"wrote {key} {shapes[key]}")
                continue
            copied = getattr(source, "group_size", 0) == group_size  # a Q8_0 file's, as they are
            in_rows = not packed or key == "token_embedding_table"
            if not in_rows and key == "wq":  # the packed matrices start aligned
                fh.write(b"\0" * formats.packed_padding(cfg, group_size))
            error = 0.0
            for layer in (range(cfg["n_layers"]) if key in LAYERED else (None,)):
                if in_rows and not copied:
                    piece_error = _write_q80(fh, _checked(source, key, layer, shapes), group_size)
                else:
                    q, scale, piece_error = _q80(source, key, layer, shapes[key], group_size)
                    if in_rows:
                        _write(fh, q, np.int8)
                        _write(fh, scale, "<f4")
                    else:
                        _write_packed(fh, q, scale, group_size)
                error = max(error, piece_error)
            layout = "" if in_rows else " in the packed layout"
            if copied:
                log(f"copied {key} {shapes[key]}'s Q8_0 values and scales{layout}")
            else:
                log(f"quantized {key} {shapes[key]} to Q8_0{layout} with max error {error:g}")
            max_error = max(max_error, error)
    if group_size:
        log(f"max quantization group error across all weights: {max_error:g}")
        log(f"group size: {group_size}")
    return group_size


def write_v0(path, config, weights, shared, log=None):
    """Write the legacy format that upstream run.c reads (version 0)."""
    write_model(path, 0, ArraySource(config, weights, shared), log=log)


def write_v1(path, config, weights, shared, log=None):
    """Write version 1: all weights in float32 after a 256-byte header (v3 for a model that
    run.c's constants do not compute)."""
    write_model(path, 1, ArraySource(config, weights, shared), log=log)


def write_v2(path, config, weights, shared, group_size=64, *, back_off=True, log=None):
    """Write version 2 (Q8_0, for runq; v3 for a model that run.c's constants do not compute),
    with group_size backed off as choose_group_size says (or refused, with back_off=False).
    Returns the group size used."""
    return write_model(path, 2, ArraySource(config, weights, shared), group_size,
                       back_off=back_off, log=log)


# ---------------------------------------------------------------------------- making weights

def random_model(config, seed=0, shared=True):
    """Seeded random float32 weights at the scale of the test fixtures (norm weights ~1, matrices
    with std 4/sqrt(fan_in)), made directly in float32 so that big shapes are quick and take no
    more memory than the model."""
    cfg = _check_config(config, "config")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if name == "wcls" and shared:
            weights[name] = weights["token_embedding_table"]
            continue
        array = rng.standard_normal(shape, dtype=np.float32)
        if name in NORMS:
            array *= np.float32(0.1)
            array += np.float32(1.0)
        elif name not in ("token_embedding_table", "wcls"):
            array *= np.float32(4.0 / math.sqrt(shape[-1]))
        weights[name] = array
    return weights


class NamedSource:
    """A source whose tensors a function gives by their name in a checkpoint: names maps run.c's
    keys to them ("{}" for the layer), load(name) gives one as an array (any float dtype)."""

    def __init__(self, config, shared, names, load, log=None):
        self.config, self.shared, self._names, self._load = config, shared, names, load
        self._log = log or _silent

    def tensor(self, key, layer=None):
        name = self._names[key].format(layer)
        tensor = np.asarray(self._load(name), dtype=np.float32)
        shape = weight_shapes(_check_config(self.config, "config"))[key]
        shape = shape[1:] if key in LAYERED else shape
        if tensor.shape != shape:
            raise ExportError(f"{name} has shape {tensor.shape}, the config says {shape}")
        if layer in (None, self.config["n_layers"] - 1):
            self._log(f"read {key}")
        return tensor


def state_dict_source(state_dict, model_args, log=None, convert=np.asarray):
    """A source (see sources above) over a llama2.c train.py checkpoint's 'model' state_dict and
    its 'model_args'; convert(value) makes a state_dict value a NumPy array, when it is asked for.
    hidden_dim comes from w1's shape: model_args has only multiple_of, from which model.py derives
    it."""
    prefix = "_orig_mod."  # torch.compile'd models save their keys under this prefix
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}

    def load(name):
        if name not in state:
            raise ExportError(f"checkpoint: no tensor {name}")
        return convert(state[name])

    if not isinstance(model_args, dict):
        raise ExportError(f"checkpoint: model_args is {type(model_args).__name__}, not a dict")
    try:
        config = dict(dim=model_args["dim"],
                      hidden_dim=load(CHECKPOINT_NAMES["w1"].format(0)).shape[0],
                      n_layers=model_args["n_layers"], n_heads=model_args["n_heads"],
                      n_kv_heads=model_args.get("n_kv_heads") or model_args["n_heads"],
                      vocab_size=model_args["vocab_size"], seq_len=model_args["max_seq_len"])
    except KeyError as e:
        raise ExportError(f"checkpoint: model_args has no {e.args[0]}") from None
    cfg = _check_config(config, "checkpoint")
    # model.py ties output.weight to tok_embeddings.weight; the state_dict holds both.
    shared = ("output.weight" not in state
              or np.array_equal(load("output.weight"), load("tok_embeddings.weight")))
    return NamedSource(cfg, shared, CHECKPOINT_NAMES, load, log)


def weights_from_state_dict(state_dict, model_args, log=None):
    """(config, weights, shared) from a llama2.c train.py checkpoint's 'model' state_dict (as
    NumPy arrays) and its 'model_args'."""
    return gather(state_dict_source(state_dict, model_args, log))


def checkpoint_source(path, log=None):
    """A source over a llama2.c train.py checkpoint (.pt); needs PyTorch. The file is mapped
    (torch.load's mmap), so each tensor is read when the writer asks for it."""
    try:
        import torch
    except ImportError:
        raise ExportError("--checkpoint needs PyTorch (pip install torch)") from None
    try:
        # weights_only: no pickled code runs
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state_dict, model_args = checkpoint["model"], checkpoint["model_args"]
    except OSError:
        raise  # the CLI reports file errors as such
    except Exception as e:  # torch.load fails in many ways on files that are not checkpoints
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch's messages run to pages
        raise ExportError(f"{path}: not a llama2.c checkpoint ({type(e).__name__}: {first_line})") from None
    return state_dict_source(state_dict, model_args, log,
                             lambda tensor: tensor.detach().to(torch.float32).numpy())


def load_checkpoint(path, log=None):
    """(config, weights, shared) from a llama2.c train.py checkpoint (.pt); needs PyTorch."""
    return gather(checkpoint_source(path, log))


# ---------------------------------------------------------------------------- Hugging Face

# config.json's sizes, as run.c's Config names them
HF_SIZES = {"hidden_size": "dim", "intermediate_size": "hidden_dim",
            "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
            "num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size",
            "max_position_embeddings": "seq_len"}
# the config.json sizes that make each weight's (per-layer) shape
HF_SHAPE_KEYS = {
    "token_embedding_table": "[vocab_size, hidden_size]",
    "rms_att_weight": "[hidden_size]",
    "wq": "[hidden_size, hidden_size]",
    "wk": "[num_key_value_heads * head_dim, hidden_size]",
    "wv": "[num_key_value_heads * head_dim, hidden_size]",
    "wo": "[hidden_size, hidden_size]",
    "rms_ffn_weight": "[hidden_size]",
    "w1": "[intermediate_size, hidden_size]",
    "w2": "[hidden_size, intermediate_size]",
    "w3": "[intermediate_size, hidden_size]",
    "rms_final_weight": "[hidden_size]",
    "wcls": "[vocab_size, hidden_size]",
}
ROPE_THETA = formats.ROPE_THETA  # run.c's RoPE base
RMS_NORM_EPS = 1e-5  # run.c's RMSNorm epsilon
# tensors that older transformers saved and that hold nothing but base-10000 RoPE frequencies,
# compared within two units in the last place of their dtype
HF_INV_FREQ = "model.layers.{}.self_attn.rotary_emb.inv_freq"
INV_FREQ_RTOL = {"F64": 3e-7, "F32": 3e-7, "F16": 2e-3, "BF16": 1.6e-2}
MAX_JSON_BYTES = 100_000_000  # the safetensors format's own limit for its header


def _show(value):
    """A config value as config.json spells it, on one short line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_json(path, what):
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise ExportError(f"{path}: {os.path.getsize(path)} bytes, too big for a {what}")
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path}: {what} is not JSON ({reason})") from None


def _hf_config(config_path):
    """(run.c config, tied classifier) from a Hugging Face Llama config.json, in either the
    transformers 4.x layout (top-level rope_theta, rope_scaling) or the 5.x one
    (rope_parameters). Everything that llama2.c's format cannot represent is refused, naming the
    key, and the sizes are checked as JSON integers before anything is allocated."""
    hf = _read_json(config_path, "config.json")
    if not isinstance(hf, dict):
        raise ExportError(f"{config_path}: {_show(hf)} is not a JSON object")

    def refuse(key, reason):
        raise ExportError(f"{config_path}: {key} is {_show(hf_value(key))}: {reason}")

    def hf_value(key):
        value = hf
        for part in key.split("."):
            value = value[part]
        return value

    if "model_type" not in hf:
        raise ExportError(f"{config_path}: no model_type, not a transformers config.json")
    if hf["model_type"] != "llama":
        refuse("model_type", "not llama (llama2.c's format holds Llama models only)")
    if "architectures" in hf and hf["architectures"] not in (None, ["LlamaForCausalLM"]):
        refuse("architectures", 'not ["LlamaForCausalLM"]')

    sizes = {}
    for key, name in HF_SIZES.items():
        value = hf.get(key)
        if value is None and key == "num_key_value_heads":
            value = sizes["n_heads"]  # no grouped-query attention
        elif key not in hf:
            raise ExportError(f"{config_path}: no {key}")
        elif not _is_int(value) or not 0 < value <= INT32_MAX:
            refuse(key, f"not a positive integer (at most {INT32_MAX})")
        sizes[name] = value
    cfg = _check_config(sizes, config_path)
    head_size = cfg["dim"] // cfg["n_heads"]
    if hf.get("head_dim") not in (None, head_size):
        refuse("head_dim", f"run.c's head size is hidden_size / num_attention_heads = {head_size}")
    if head_size % 2:
        raise ExportError(f"{config_path}: the head size hidden_size / num_attention_heads = "
                          f"{head_size} is odd; RoPE rotates pairs")

    # what the model computes beyond run.c's fixed Llama 2: each would give other logits
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # two names of x * sigmoid(x)
        refuse("hidden_act", "run.c's feed-forward is SwiGLU, with silu")
    for key, part in (("attention_bias", "attention"), ("mlp_bias", "feed-forward")):
        if hf.get(key, False) is not False:
            refuse(key, f"run.c's {part} has no biases")
    # RMSNorm epsilon, RoPE base and scaling: run.c's are written as v1/v2, others as v3
    eps = hf.get("rms_norm_eps", RMS_NORM_EPS)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        refuse("rms_norm_eps", "not a number")
    theta, scaling = hf.get("rope_theta", ROPE_THETA), hf.get("rope_scaling")
    if "rope_parameters" in hf:  # transformers 5.x: the base and any scaling live here
        rope = hf["rope_parameters"]
        if not isinstance(rope, dict):
            refuse("rope_parameters", "not a JSON object")
        if "rope_theta" in hf and hf["rope_theta"] != rope.get("rope_theta", ROPE_THETA):
            refuse("rope_theta", "not rope_parameters.rope_theta")
        if scaling is not None:
            refuse("rope_scaling", "beside rope_parameters (which of the two?)")
        theta = rope.get("rope_theta", ROPE_THETA)
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        where = "rope_parameters"
    else:
        where = "rope_scaling"
    if not isinstance(theta, numbers.Real) or isinstance(theta, bool):
        refuse("rope_theta" if where == "rope_scaling" else "rope_parameters.rope_theta",
               "not a number")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        extra = sorted(set(scaling) - {"rope_type", "type"})
        if extra:
            refuse(f"{where}.{extra[0]}", "a parameter of no RoPE scaling (rope_type default)")
        scaling = None
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in \
            ("linear", "llama3"):
        key = "rope_type" if "rope_type" in scaling else "type"
        refuse(f"{where}.{key}", "run and runq compute no RoPE scaling but linear and llama3")
    rope, norm_eps = model_params(dict(rope_theta=theta, norm_eps=eps, rope_scaling=scaling),
                                  config_path, where)
    if hf.get("quantization_config") is not None:
        refuse("quantization_config", "quantized checkpoints are not read, only float tensors")
    tied = hf.get("tie_word_embeddings", False)  # LlamaConfig's default
    if not isinstance(tied, bool):
        refuse("tie_word_embeddings", "not true or false")
    return dict(cfg, **params_config(rope, norm_eps)), tied


def _safetensors_index(path):
    """{tensor name: (path, absolute offset, dtype, shape)} from a .safetensors file's header
    (8-byte little-endian length, then JSON), every entry checked: a float dtype, a shape of
    non-negative integers, data_offsets that hold exactly that many bytes inside the file and
    overlap no other tensor's. Read here rather than with the safetensors package: its NumPy
    API cannot give bf16 tensors, the usual dtype of Llama checkpoints."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or not 0 < length <= min(size - 8, MAX_JSON_BYTES):
            raise ExportError(f"{path}: not a safetensors file (header length {length} in a "
                              f"file of {size} bytes)")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, RecursionError):
            raise ExportError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_start, data_size = 8 + length, size - 8 - length
    spans, index = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict):
            raise ExportError(f"{where} is {_show(info)}, not a tensor's description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"{where} has dtype {_show(dtype)}, not one of "
                              f"{', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise ExportError(f"{where} has shape {_show(shape)}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise ExportError(f"{where} has data_offsets {_show(offsets)}, not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise ExportError(f"{where} has data_offsets {_show(offsets)}, outside the "
                              f"{data_size} bytes of data in the file")
        nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != nbytes:
            raise ExportError(f"{where} has data_offsets {_show(offsets)} ({end - begin} bytes) "
                              f"for shape {shape} in {dtype} ({nbytes} bytes)")
        if begin < end:
            spans.append((begin, end, name))
        index[name] = (path, data_start + begin, dtype, tuple(shape))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ExportError(f"{path}: tensors {first} and {second} overlap")
    return index


def _hf_tensors(folder, cfg, tied):
    """The safetensors index of folder's *.safetensors files, checked against the config: every
    tensor it needs there, with its shape; nothing else (a bias, another layer) but base-10000
    RoPE frequencies; lm_head.weight exactly when the classifier is not tied."""
    files = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "*.safetensors")))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors files")
    index = {}
    for path in files:
        for name, entry in _safetensors_index(path).items():
            if name in index:
                raise ExportError(f"{folder}: tensor {name} is in both {index[name][0]} and {path}")
            index[name] = entry

    shapes = weight_shapes(cfg)
    expected = {}  # tensor name: (its key in run.c, its shape)
    for key, name in HF_NAMES.items():
        if key not in LAYERED and not (key == "wcls" and tied):
            expected[name] = key, shapes[key]
    # layer by layer, so that a config claiming 10^9 layers stops at the first missing tensor
    for i in range(cfg["n_layers"]):
        for key in LAYERED:
            name = HF_NAMES[key].format(i)
            if name not in index:
                raise ExportError(f"{folder}: no tensor {name} in the *.safetensors files "
                                  f"(config.json: num_hidden_layers {cfg['n_layers']})")
            expected[name] = key, shapes[key][1:]
    for name, (key, expected_shape) in expected.items():
        if name not in index:
            raise ExportError(f"{folder}: no tensor {name} in the *.safetensors files")
        path, _, _, shape = index[name]
        if shape != tuple(expected_shape):
            raise ExportError(f"{path}: tensor {name} has shape {list(shape)}, but config.json's "
                              f"{HF_SHAPE_KEYS[key]} is {list(expected_shape)}")
    head_size = cfg["dim"] // cfg["n_heads"]
    inv_freq = {HF_INV_FREQ.format(i) for i in range(cfg["n_layers"])}
    for name in sorted(set(index) - set(expected)):
        path = index[name][0]
        if name == HF_NAMES["wcls"] and tied:
            if not _same_values(index, name, HF_NAMES["token_embedding_table"]):
                raise ExportError(f"{path}: tensor {name} differs from the embedding table, but "
                                  f"config.json has tie_word_embeddings true")
        elif name in inv_freq:
            # old transformers saved the base's frequencies (before any scaling)
            theta = cfg.get("rope_theta", ROPE_THETA)
            inv = 1.0 / (theta ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size))
            got, rtol = _load_safetensor(index, name), INV_FREQ_RTOL[index[name][2]]
            if got.shape != inv.shape or not np.allclose(got, inv, rtol=rtol, atol=0):
                raise ExportError(f"{path}: tensor {name} holds other RoPE frequencies than "
                                  f"config.json's base {theta:g}")
        elif name.endswith(".bias"):
            raise ExportError(f"{path}: tensor {name} is a bias; run.c's layers have none")
        elif re.match(r"model\.layers\.\d+\.", name):
            raise ExportError(f"{path}: tensor {name} is not part of config.json's "
                              f"num_hidden_layers {cfg['n_layers']} Llama layers")
        else:
            raise ExportError(f"{path}: tensor {name} has no place in a llama2.c model")
    return index


def _load_safetensor(index, name):
    path, offset, dtype, shape = index[name]
    raw = np.fromfile(path, SAFETENSORS_DTYPES[dtype], math.prod(shape), offset=offset)
    if raw.size != math.prod(shape):  # the file shrank since its header was read
        raise ExportError(f"{path}: truncated at tensor {name}")
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.astype(np.float32).reshape(shape)


def _same_values(index, first, second, block=1 << 24):
    """Whether two tensors of the index hold the same float32 values, compared a block of bytes
    at a time (the embedding table and its copy can be gigabytes each)."""
    (path1, offset1, dtype1, shape1), (path2, offset2, dtype2, shape2) = index[first], index[second]
    if shape1 != shape2:
        return False
    raw1 = np.memmap(path1, SAFETENSORS_DTYPES[dtype1], "r", offset1, (math.prod(shape1),))
    raw2 = np.memmap(path2, SAFETENSORS_DTYPES[dtype2], "r", offset2, (math.prod(shape2),))
    step = max(1, block // raw1.itemsize)

    def widened(raw, dtype):
        return (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)

    return all(np.array_equal(widened(raw1[i:i + step], dtype1).view(np.uint32),
                              widened(raw2[i:i + step], dtype2).view(np.uint32))
               for i in range(0, raw1.size, step))


def _unpermute(w, n_heads):
    """Undo the permutation HF's convert_llama_weights_to_hf.py applies to each head's wq / wk
    rows: it moves the interleaved (even, odd) rotary pairs that run.c's RoPE rotates into two
    halves. w is one layer's (n_heads * head_size, dim)."""
    rows, cols = w.shape
    halves = w.reshape(n_heads, 2, rows // n_heads // 2, cols)
    return np.ascontiguousarray(halves.transpose(0, 2, 1, 3)).reshape(rows, cols)


class HFSource(NamedSource):
    """A source over a Hugging Face Llama folder: config.json and *.safetensors (float32, float16
    or bfloat16). Converts exactly what transformers' LlamaForCausalLM computes, or refuses
    (ExportError naming the key or tensor) before reading any weight; each tensor is read from
    its file when asked for, wq and wk with HF's rotary permutation undone."""

    def __init__(self, folder, log=None):
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise ExportError(f"{folder}: no config.json, not a Hugging Face model folder")
        cfg, tied = _hf_config(config_path)
        index = _hf_tensors(folder, cfg, tied)
        super().__init__(cfg, tied, HF_NAMES, lambda name: _load_safetensor(index, name), log)

    def tensor(self, key, layer=None):
        tensor = super().tensor(key, layer)
        if key in ("wq", "wk"):
            tensor = _unpermute(tensor, self.config["n_heads" if key == "wq" else "n_kv_heads"])
        return tensor


def load_hf(folder, log=None):
    """(config, weights, shared) from a Hugging Face Llama folder, all in memory (HFSource)."""
    return gather(HFSource(folder, log))


# ---------------------------------------------------------------------------- CLI

def _message(error):
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a llama2.c model file: version 0 (legacy, run.c), 1 (float32) or "
                    "2 (Q8_0, runq.c).")
    parser.add_argument("filepath", help="the output file")
    parser.add_argument("--version", type=int, choices=(0, 1, 2),
                        help="the format to write (default 0; 2 with --packed)")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="Q8_0 group size for version 2; must divide dim and hidden_dim "
                             "(default: a Q8_0 --bin file's own, whose values are then copied as "
                             "they are; else 64, halved until it does)")
    parser.add_argument("--packed", action="store_true",
                        help="version 2's Q8_0 matrices in the layout runq multiplies on AVX-512 "
                             "VNNI, written as version 3: runq maps them with no copy at load "
                             "(group size 32 or 64; upstream's runq.c refuses the file)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bin", metavar="IN.bin", help="a llama2.c model file of any version")
    source.add_argument("--checkpoint", metavar="CKPT.pt",
                        help="a llama2.c train.py checkpoint (needs torch)")
    source.add_argument("--hf", metavar="DIR",
                        help="a Hugging Face Llama folder (config.json, *.safetensors)")
    source.add_argument("--meta-llama", metavar="DIR",
                        help="Meta's Llama 2 / Code Llama folder (params.json, consolidated.*.pth)")
    parser.add_argument("--seq-len", type=int, metavar="N",
                        help="the context length to write for --meta-llama (default 2048, as "
                             "upstream's export.py; Llama 2 was trained with 4096)")
    args = parser.parse_args(argv)
    if args.version is None:
        args.version = 2 if args.packed else 0
    if args.packed and args.version != 2:
        parser.error("--packed applies to --version 2 only (Q8_0)")
    if args.group_size is not None and args.version != 2:
        parser.error("--group-size applies to --version 2 only")
    if args.seq_len is not None and not args.meta_llama:
        parser.error("--seq-len applies to --meta-llama only (the other sources say theirs)")
    if args.seq_len is not None and args.seq_len <= 0:
        parser.error(f"--seq-len {args.seq_len}: the context length must be positive")

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    try:
        source_path = args.bin or args.checkpoint or args.hf or args.meta_llama
        if not os.path.exists(source_path):
            raise ExportError(f"{source_path}: no such file or directory")
        out_dir = os.path.dirname(os.path.abspath(args.filepath))
        if not os.path.isdir(out_dir):  # say so before a long conversion, not after it
            raise ExportError(f"{out_dir}: no such directory")
        if args.bin:
            source = FileSource(args.bin, progress)
        elif args.checkpoint:
            source = checkpoint_source(args.checkpoint, progress)
        elif args.hf:
            source = HFSource(args.hf, progress)
        else:
            source = MetaLlamaSource(args.meta_llama, progress, seq_len=args.seq_len)
        # one tensor at a time from the source to the file
        group_size = args.group_size
        if group_size is None:
            group_size = getattr(source, "group_size", 0) or 64
        write_model(args.filepath, args.version, source, group_size,
                    back_off=args.group_size is None, packed=args.packed, log=progress)
        llama2 = formats.is_llama2(*model_params(source.config))
        written = args.version if llama2 and not args.packed else 3
    except (ExportError, OSError) as e:
        print(f"export.py: error: {_message(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"export.py: error: out of memory converting {source_path}", file=sys.stderr)
        return 1
    print(f"wrote {args.filepath} (version {written})")
    return 0


def command(argv=None):
    """The command line: `python export.py` in the repo, `llama2-export` once installed."""
    return run_command(os.path.basename(sys.argv[0]) or "export.py", main, argv)


if __name__ == "__main__":
    sys.exit(command())
