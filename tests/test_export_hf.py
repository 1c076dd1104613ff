"""Issue 12, `export.py --hf` converts right or refuses: each config.json key that llama2.c's
format cannot represent (in the transformers 4.x and 5.x layouts), configs that lie or have the
wrong types, and safetensors files whose tensors do not match the config exactly are refused with
one line naming the key or tensor, before anything big is allocated. The folders are made here:
config.json by hand, the .safetensors files with the safetensors package or byte by byte."""
import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2_cython import export
from tests.test_export import hf_tensors

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "testdata"
MODEL = export.read_model(TESTDATA / "tiny_gqa.bin")  # 3 layers, GQA, separate classifier
TIED = export.read_model(TESTDATA / "tiny_mha.bin")  # classifier shared with the embeddings


def config_4x(config, shared):
    """config.json as transformers 4.x saves a LlamaForCausalLM's."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": config["dim"], "intermediate_size": config["hidden_dim"],
            "num_hidden_layers": config["n_layers"], "num_attention_heads": config["n_heads"],
            "num_key_value_heads": config["n_kv_heads"], "vocab_size": config["vocab_size"],
            "max_position_embeddings": config["seq_len"], "tie_word_embeddings": shared,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
            "head_dim": config["dim"] // config["n_heads"], "torch_dtype": "float32",
            "transformers_version": "4.57.1"}


def config_5x(config, shared):
    """transformers 5.x: the RoPE base (and any scaling) in rope_parameters."""
    hf = config_4x(config, shared)
    del hf["rope_theta"], hf["rope_scaling"], hf["torch_dtype"]
    hf.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32",
              transformers_version="5.0.0")
    return hf


def safetensors_bytes(tensors, edit=None):
    """A .safetensors file (F32) written byte by byte; edit(header) may spoil the header."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        data = np.ascontiguousarray(tensor, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if edit:
        edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def make_folder(folder, model=MODEL, hf=None, tensors=None, edit=None):
    """A Hugging Face folder of model (config.json in the 4.x layout unless hf is given)."""
    config, weights, shared = model
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_4x(config, shared) if hf is None else hf))
    tensors = hf_tensors(config, weights, shared) if tensors is None else tensors
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors, edit))
    return folder


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60, **kwargs)


def refused(folder, tmp_path, **kwargs):
    """The one line export.py --hf folder printed, having refused it."""
    out = tmp_path / "out.bin"
    proc = cli(out, "--hf", folder, **kwargs)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("export.py: error: ")
    assert not out.exists()
    return lines[0]


# ---------------------------------------------------------------------------- right

@pytest.mark.parametrize("layout", [config_4x, config_5x])
@pytest.mark.parametrize("model, fixture", [(MODEL, "tiny_gqa.bin"), (TIED, "tiny_mha.bin")])
def test_both_config_layouts_convert_right(tmp_path, layout, model, fixture):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    config, weights, shared = model
    folder = make_folder(tmp_path / "hf", model, hf=layout(config, shared))
    safetensors_numpy.save_file(hf_tensors(config, weights, shared),
                                str(folder / "model.safetensors"))
    proc = cli(tmp_path / "out.bin", "--hf", folder)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.bin").read_bytes() == (TESTDATA / fixture).read_bytes()


def test_minimal_config_and_old_rope_buffers_convert_right(tmp_path):
    """Absent keys take LlamaConfig's defaults; the rotary_emb.inv_freq buffers older
    transformers saved are accepted when they hold base-10000 frequencies."""
    config, weights, shared = MODEL
    hf = {key: value for key, value in config_4x(config, shared).items()
          if key not in ("architectures", "hidden_act", "attention_bias", "mlp_bias", "head_dim",
                         "rms_norm_eps", "rope_theta", "rope_scaling", "num_key_value_heads")}
    hf["num_key_value_heads"] = None if config["n_kv_heads"] == config["n_heads"] \
        else config["n_kv_heads"]
    head_size = config["dim"] // config["n_heads"]
    tensors = hf_tensors(config, weights, shared)
    for i in range(config["n_layers"]):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = \
            1.0 / 10000.0 ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size)
    folder = make_folder(tmp_path / "hf", hf=hf, tensors=tensors)
    proc = cli(tmp_path / "out.bin", "--hf", folder)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.bin").read_bytes() == (TESTDATA / "tiny_gqa.bin").read_bytes()


def test_tied_config_with_a_copy_of_the_embeddings_converts_right(tmp_path):
    """tie_word_embeddings true and an lm_head.weight equal to the embeddings: transformers ties
    them, and so does the export."""
    config, weights, shared = TIED
    tensors = hf_tensors(config, weights, shared)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    folder = make_folder(tmp_path / "hf", TIED, tensors=tensors)
    proc = cli(tmp_path / "out.bin", "--hf", folder)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.bin").read_bytes() == (TESTDATA / "tiny_mha.bin").read_bytes()


# ---------------------------------------------------------------------------- config.json

CONFIG, _, SHARED = MODEL
HEAD_SIZE = CONFIG["dim"] // CONFIG["n_heads"]
LAYERS = CONFIG["n_layers"]
# (layout, changes to config.json, the key the message must name)
REFUSED_KEYS = [
    # RoPE scalings that run and runq do not compute, and RoPE / RMSNorm values that are no model
    (config_4x, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    (config_5x, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "rope_parameters.rope_type"),
    (config_5x, {"rope_parameters": {"rope_theta": 10000.0, "factor": 2.0}},
     "rope_parameters.factor"),
    (config_5x, {"rope_parameters": [10000.0]}, "rope_parameters"),
    (config_4x, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling.original_max_position_embeddings"),
    (config_4x, {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta": 1}}, "rope_scaling"),
    (config_4x, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                  "high_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192}}, "high_freq_factor"),
    (config_4x, {"rope_theta": "large"}, "rope_theta"),
    (config_4x, {"rope_theta": -1.0}, "rope_theta"),
    (config_4x, {"rms_norm_eps": [1e-6]}, "rms_norm_eps"),
    (config_4x, {"rms_norm_eps": 0.0}, "norm_eps"),
    (config_4x, {"attention_bias": True}, "attention_bias"),
    (config_5x, {"mlp_bias": True}, "mlp_bias"),
    (config_4x, {"hidden_act": "gelu"}, "hidden_act"),
    (config_4x, {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type"),
    (config_5x, {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type"),
    (config_4x, {"architectures": ["Qwen2ForCausalLM"]}, "architectures"),
    (config_4x, {"head_dim": 2 * HEAD_SIZE}, "head_dim"),
    (config_4x, {"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    (config_4x, {"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    # wrong types and sizes
    (config_4x, {"hidden_size": "abc"}, "hidden_size"),
    (config_4x, {"hidden_size": float(CONFIG["dim"])}, "hidden_size"),
    (config_4x, {"vocab_size": True}, "vocab_size"),
    (config_4x, {"num_attention_heads": None}, "num_attention_heads"),
    (config_4x, {"intermediate_size": -192}, "intermediate_size"),
    (config_4x, {"hidden_size": 2**40, "num_attention_heads": 2**20}, "hidden_size"),
    (config_5x, {"max_position_embeddings": 2**31}, "max_position_embeddings"),
    # sizes that do not match the tensors
    (config_4x, {"num_hidden_layers": LAYERS - 1}, f"model.layers.{LAYERS - 1}."),
    (config_4x, {"num_hidden_layers": LAYERS + 1}, f"model.layers.{LAYERS}."),
    (config_4x, {"num_hidden_layers": 1000000000}, "num_hidden_layers"),
    (config_4x, {"intermediate_size": 1 << 30}, "intermediate_size"),
    (config_4x, {"vocab_size": 1000000}, "model.embed_tokens.weight"),
    (config_4x, {"tie_word_embeddings": True}, "lm_head.weight"),  # and it differs
]


@pytest.mark.parametrize("layout, changes, key", REFUSED_KEYS,
                         ids=[f"{layout.__name__}-{key}" for layout, _, key in REFUSED_KEYS])
def test_config_keys_llama2c_cannot_represent_are_refused(tmp_path, layout, changes, key):
    hf = dict(layout(CONFIG, SHARED), **changes)
    folder = make_folder(tmp_path / "hf", hf=hf)
    # one line naming the key, and no giant allocation on the way (4 GB of address space is far
    # more than the tiny model needs, far less than what a lying config asks for)
    line = refused(folder, tmp_path, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY)))
    assert key in line, line


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"llama"', "5", "{", "\xff\xfe", "[" * 100000])
def test_config_that_is_not_an_object_is_refused(tmp_path, text):
    folder = make_folder(tmp_path / "hf")
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    assert "config.json" in refused(folder, tmp_path)


def test_config_without_model_type_is_refused(tmp_path):
    hf = config_4x(CONFIG, SHARED)
    del hf["model_type"]
    assert "model_type" in refused(make_folder(tmp_path / "hf", hf=hf), tmp_path)


# ---------------------------------------------------------------------------- the tensors

def bias_tensors():
    config, weights, shared = MODEL
    tensors = hf_tensors(config, weights, shared)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(config["dim"], np.float32)
    return tensors


def extra_layer():
    config, weights, shared = MODEL
    tensors = hf_tensors(config, weights, shared)
    tensors[f"model.layers.{LAYERS}.input_layernorm.weight"] = np.ones(config["dim"], np.float32)
    return tensors


def without(name):
    config, weights, shared = MODEL
    tensors = hf_tensors(config, weights, shared)
    del tensors[name]
    return tensors


def transposed(name):
    config, weights, shared = MODEL
    tensors = hf_tensors(config, weights, shared)
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    return tensors


def other_rope_base():
    config, weights, shared = MODEL
    tensors = hf_tensors(config, weights, shared)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = \
        1.0 / 500000.0 ** (np.arange(0, HEAD_SIZE, 2, dtype=np.float32) / HEAD_SIZE)
    return tensors


NORM = "model.layers.0.input_layernorm.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
K_PROJ = "model.layers.2.self_attn.k_proj.weight"


def edit(name, **fields):
    def change(header):
        header[name].update(fields)
    return change


def overlap(header):
    header[NORM]["data_offsets"] = [header[Q_PROJ]["data_offsets"][0],
                                    header[Q_PROJ]["data_offsets"][0] + 4 * CONFIG["dim"]]


# (tensors, header edit, what the message must name)
REFUSED_TENSORS = [
    (bias_tensors, None, "model.layers.0.self_attn.q_proj.bias"),
    (extra_layer, None, f"model.layers.{LAYERS}.input_layernorm.weight"),
    (lambda: without("model.layers.1.mlp.down_proj.weight"), None, "mlp.down_proj"),
    (lambda: without("model.norm.weight"), None, "model.norm.weight"),
    (lambda: transposed(K_PROJ), None, K_PROJ),
    (other_rope_base, None, "rotary_emb.inv_freq"),
    (lambda: without("lm_head.weight"), None, "lm_head.weight"),
    (None, edit(NORM, shape=[float(CONFIG["dim"])]), NORM),
    (None, edit(NORM, shape=[-CONFIG["dim"]]), NORM),
    (None, edit(NORM, shape=None), NORM),
    (None, edit(NORM, dtype="I8"), NORM),
    (None, edit(NORM, dtype="F16"), NORM),  # the bytes no longer match the shape
    (None, edit(NORM, dtype=["F32"]), NORM),  # a list is no dtype (and no dict key)
    (None, edit(NORM, dtype={"F32": 1}), NORM),
    (None, edit(NORM, data_offsets=[-4 * CONFIG["dim"], 0]), NORM),
    (None, edit(NORM, data_offsets=[10**12, 10**12 + 4 * CONFIG["dim"]]), NORM),
    (None, edit(NORM, data_offsets=[0.0, 4.0 * CONFIG["dim"]]), NORM),
    (None, edit(NORM, data_offsets=[0]), NORM),
    (None, overlap, "overlap"),
    (None, lambda header: header.update({NORM: "F32"}), NORM),
]


@pytest.mark.parametrize("tensors, edit_header, name", REFUSED_TENSORS,
                         ids=[f"{i}-{name}" for i, (_, _, name) in enumerate(REFUSED_TENSORS)])
def test_tensors_that_do_not_match_the_config_are_refused(tmp_path, tensors, edit_header, name):
    folder = make_folder(tmp_path / "hf", tensors=tensors() if tensors else None, edit=edit_header)
    line = refused(folder, tmp_path)
    assert name in line, line


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    config, weights, shared = MODEL
    folder = make_folder(tmp_path / "hf")
    (folder / "extra.safetensors").write_bytes(
        safetensors_bytes({"model.norm.weight": weights["rms_final_weight"]}))
    assert "model.norm.weight" in refused(folder, tmp_path)


@pytest.mark.parametrize("data", [b"", b"\x01", struct.pack("<Q", 2**63) + b"{}",
                                  struct.pack("<Q", 8) + b"not json", struct.pack("<Q", 4) + b"[1] "])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, data):
    folder = make_folder(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes(data)
    assert "model.safetensors: not a safetensors file" in refused(folder, tmp_path)
