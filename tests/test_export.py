"""export.py and tokenizer.py: byte-exact conversions against the fixture files, Q8_0 group
sizes, Hugging Face and train.py checkpoint imports, the CLIs and their errors."""
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2_cython import export
from llama2_cython import tokenizer

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "testdata"
SHARED = ROOT.parent / "shared" / "fixtures"  # files that may not be committed (stories260K)
MODELS = ["tiny_mha", "tiny_gqa"]
GROUP_SIZES = {"tiny_mha": 64, "tiny_gqa": 32}


def same_bytes(a, b):
    return Path(a).read_bytes() == Path(b).read_bytes()


def cli(script, *args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def assert_clean_failure(result):
    """Exit status 1 and one line on stderr, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error" in result.stderr


def assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name], tensor, err_msg=name)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return (request.param, *export.read_model(TESTDATA / f"{request.param}.bin"))


# ---------------------------------------------------------------------------- file formats

@pytest.mark.parametrize("source", ["{}.bin", "{}.v1.bin"])
def test_v0_v1_round_trips_are_byte_exact(model, source, tmp_path):
    name, expected_config, expected_weights, expected_shared = model
    config, weights, shared = export.read_model(TESTDATA / source.format(name))
    assert (config, shared) == (expected_config, expected_shared)
    assert_same_weights(weights, expected_weights)
    assert (weights["wcls"] is weights["token_embedding_table"]) == shared
    export.write_v0(tmp_path / "v0.bin", config, weights, shared)
    export.write_v1(tmp_path / "v1.bin", config, weights, shared)
    assert same_bytes(tmp_path / "v0.bin", TESTDATA / f"{name}.bin")
    assert same_bytes(tmp_path / "v1.bin", TESTDATA / f"{name}.v1.bin")


def test_v2_export_matches_fixture(model, tmp_path):
    name, config, weights, shared = model
    assert export.write_v2(tmp_path / "q.bin", config, weights, shared) == GROUP_SIZES[name]
    assert same_bytes(tmp_path / "q.bin", TESTDATA / f"{name}_q80.bin")


def test_v2_reads_back_dequantized(model):
    name, config, weights, shared = model
    got_config, got, got_shared = export.read_model(TESTDATA / f"{name}_q80.bin")
    assert (got_config, got_shared) == (config, shared)
    for key, tensor in weights.items():
        if key in export.NORMS:
            np.testing.assert_array_equal(got[key], tensor)
        else:  # within half a quantization step of each group (a step <= max|w| / 127)
            assert got[key].dtype == np.float32 and got[key].shape == tensor.shape
            assert np.abs(got[key] - tensor).max() <= np.abs(tensor).max() / 254 * 1.001, key


@pytest.mark.skipif(not (SHARED / "stories260K.bin").exists(), reason="no ../shared fixtures")
def test_stories260k_v2_uses_group_size_4(tmp_path):
    config, weights, shared = export.read_model(SHARED / "stories260K.bin")
    assert (config["dim"], config["hidden_dim"]) == (64, 172)
    assert export.write_v2(tmp_path / "q.bin", config, weights, shared) == 4
    assert same_bytes(tmp_path / "q.bin", SHARED / "stories260K_q80.bin")


# ---------------------------------------------------------------------------- Q8_0

@pytest.mark.parametrize("dim, hidden_dim, expected", [
    (64, 172, 4),     # stories260K
    (512, 1376, 32),  # stories42M: upstream's 64 divides dim but not hidden_dim
    (96, 256, 32),
    (768, 2048, 64),
    (63, 170, 1),
])
def test_group_size_backs_off_to_a_divisor_of_every_row(dim, hidden_dim, expected):
    config = dict(dim=dim, hidden_dim=hidden_dim)
    assert export.choose_group_size(config) == expected
    assert export.choose_group_size(config, expected, back_off=False) == expected
    if expected < 64:
        with pytest.raises(export.ExportError, match="try"):
            export.choose_group_size(config, 64, back_off=False)


def test_write_v2_backs_off_or_refuses(tmp_path):
    config = dict(dim=64, hidden_dim=172, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32,
                  seq_len=8)
    weights = export.random_model(config, seed=3)
    assert export.write_v2(tmp_path / "q.bin", config, weights, True, 64) == 4
    _, got, _ = export.read_model(tmp_path / "q.bin")
    for key in ("w1", "w2"):
        assert np.abs(got[key] - weights[key]).max() <= np.abs(weights[key]).max() / 254 * 1.001
    with pytest.raises(export.ExportError, match="does not divide"):
        export.write_v2(tmp_path / "bad.bin", config, weights, True, 8, back_off=False)
    assert not (tmp_path / "bad.bin").exists()


def test_quantize_q80():
    w = np.array([[0.0, 0.0, 0.0, 0.0], [0.5, 1.5, -2.5, 127.0]], dtype=np.float32)
    with np.errstate(all="raise"):  # the all-zero group must not divide by zero
        q, scale, error = export.quantize_q80(w, 4)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert q.tolist() == [[0, 0, 0, 0], [0, 2, -2, 127]]  # halves round to even, as torch.round
    np.testing.assert_array_equal(scale, np.float32([0.0, 1.0]))
    assert error == pytest.approx(np.abs(q * scale[:, None] - w).max())
    with pytest.raises(export.ExportError):
        export.quantize_q80(w, 3)


# ---------------------------------------------------------------------------- making weights

def test_random_model_is_seeded_and_writable(tmp_path):
    config = dict(dim=48, hidden_dim=128, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=64,
                  seq_len=16)
    weights = export.random_model(config, seed=5, shared=False)
    assert_same_weights(export.random_model(config, seed=5, shared=False), weights)
    for name, shape in export.weight_shapes(config).items():
        assert weights[name].shape == shape and weights[name].dtype == np.float32
    assert weights["wcls"] is not weights["token_embedding_table"]
    shared = export.random_model(config, seed=5)
    assert shared["wcls"] is shared["token_embedding_table"]
    export.write_v1(tmp_path / "m.bin", config, weights, False)
    assert_same_weights(export.read_model(tmp_path / "m.bin")[1], weights)


def test_writers_check_shapes(model, tmp_path):
    _, config, weights, shared = model
    bad = dict(weights, wk=weights["w1"])
    for write in (export.write_v0, export.write_v1, export.write_v2):
        with pytest.raises(export.ExportError, match="wk"):
            write(tmp_path / "bad.bin", config, bad, shared)
    assert not (tmp_path / "bad.bin").exists()


# ---------------------------------------------------------------------------- checkpoints

def train_py_checkpoint(config, weights):
    """(state_dict, model_args) as llama2.c's train.py saves them (the state_dict as numpy)."""
    state = {"tok_embeddings.weight": weights["token_embedding_table"],
             "norm.weight": weights["rms_final_weight"],
             # model.py ties the two: the state_dict holds the same values twice
             "output.weight": weights["wcls"].copy()}
    for i in range(config["n_layers"]):
        for key, torch_name in export.CHECKPOINT_NAMES.items():
            if key in export.LAYERED:
                state[torch_name.format(i)] = weights[key][i]
    state = {"_orig_mod." + k: v for k, v in state.items()}  # as torch.compile saves them
    model_args = dict(dim=config["dim"], n_layers=config["n_layers"], n_heads=config["n_heads"],
                      n_kv_heads=config["n_kv_heads"], vocab_size=config["vocab_size"],
                      multiple_of=32, max_seq_len=config["seq_len"], dropout=0.0)
    return state, model_args


def test_checkpoint_state_dict_mapping(model):
    name, config, weights, shared = model
    state, model_args = train_py_checkpoint(config, weights)
    got_config, got, got_shared = export.weights_from_state_dict(state, model_args)
    assert (got_config, got_shared) == (config, shared)
    assert_same_weights(got, weights)
    del state["_orig_mod.layers.1.attention.wk.weight"]
    with pytest.raises(export.ExportError, match="layers.1.attention.wk.weight"):
        export.weights_from_state_dict(state, model_args)


def test_checkpoint_cli_exports_the_fixture(model, tmp_path):
    """A real torch.save'd checkpoint through `export.py --checkpoint` gives the fixture's bytes."""
    torch = pytest.importorskip("torch")
    name, config, weights, shared = model
    state, model_args = train_py_checkpoint(config, weights)
    checkpoint = {"model": {k: torch.from_numpy(v.copy()) for k, v in state.items()},
                  "model_args": model_args, "iter_num": 0, "best_val_loss": 1.0}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    out = tmp_path / "out.bin"
    proc = subprocess.run([sys.executable, "export.py", str(out), "--version", "0", "--checkpoint",
                           str(tmp_path / "ckpt.pt")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (TESTDATA / f"{name}.bin").read_bytes()


# ---------------------------------------------------------------------------- Hugging Face

def hf_permute(w, n_heads):
    """What HF's convert_llama_weights_to_hf.py does to wq and wk."""
    rows, cols = w.shape
    pairs = w.reshape(n_heads, rows // n_heads // 2, 2, cols)
    return pairs.transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_tensors(config, weights, shared):
    tensors = {"model.embed_tokens.weight": weights["token_embedding_table"],
               "model.norm.weight": weights["rms_final_weight"]}
    if not shared:
        tensors["lm_head.weight"] = weights["wcls"]
    for i in range(config["n_layers"]):
        for key, hf_name in export.HF_NAMES.items():
            if key in export.LAYERED:
                tensors[hf_name.format(i)] = weights[key][i]
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = hf_permute(weights["wq"][i],
                                                                         config["n_heads"])
        tensors[f"model.layers.{i}.self_attn.k_proj.weight"] = hf_permute(weights["wk"][i],
                                                                         config["n_kv_heads"])
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def write_hf_config(folder, config, shared):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config["dim"], "intermediate_size": config["hidden_dim"],
        "num_hidden_layers": config["n_layers"], "num_attention_heads": config["n_heads"],
        "num_key_value_heads": config["n_kv_heads"], "vocab_size": config["vocab_size"],
        "max_position_embeddings": config["seq_len"], "tie_word_embeddings": shared,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "torch_dtype": "float32"}))


def write_bf16_safetensors(path, tensors):
    """A .safetensors file by hand: safetensors' NumPy API has no bfloat16."""
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = (tensor.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_hf_folder_exports_back_to_the_original(model, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    name, config, weights, shared = model
    write_hf_config(tmp_path / "hf", config, shared)
    safetensors_numpy.save_file(hf_tensors(config, weights, shared),
                                str(tmp_path / "hf" / "model.safetensors"))
    got_config, got, got_shared = export.load_hf(tmp_path / "hf")
    assert (got_config, got_shared) == (config, shared)
    assert_same_weights(got, weights)
    result = cli("export.py", tmp_path / "out.bin", "--hf", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert same_bytes(tmp_path / "out.bin", TESTDATA / f"{name}.bin")


def test_hf_bf16_in_two_shards(tmp_path):
    config, weights, shared = export.read_model(TESTDATA / "tiny_gqa.bin")
    bf16 = {k: (w.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, w in weights.items()}
    tensors = hf_tensors(config, bf16, shared)
    names = sorted(tensors)
    write_hf_config(tmp_path, config, shared)
    write_bf16_safetensors(tmp_path / "model-00001-of-00002.safetensors",
                           {n: tensors[n] for n in names[:10]})
    write_bf16_safetensors(tmp_path / "model-00002-of-00002.safetensors",
                           {n: tensors[n] for n in names[10:]})
    got_config, got, got_shared = export.load_hf(tmp_path)
    assert (got_config, got_shared) == (config, shared)
    assert_same_weights(got, bf16)


# ---------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("source, version, expected", [
    ("tiny_gqa.bin", 2, "tiny_gqa_q80.bin"),
    ("tiny_mha.v1.bin", 0, "tiny_mha.bin"),
    ("tiny_gqa.bin", 1, "tiny_gqa.v1.bin"),
])
def test_cli_converts(source, version, expected, tmp_path):
    result = cli("export.py", tmp_path / "out.bin", "--version", version,
                 "--bin", TESTDATA / source)
    assert result.returncode == 0, result.stderr
    assert same_bytes(tmp_path / "out.bin", TESTDATA / expected)
    if version == 2:
        assert "max quantization group error across all weights" in result.stderr


def test_cli_group_size(tmp_path):
    ok = cli("export.py", tmp_path / "out.bin", "--version", 2, "--group-size", 32,
             "--bin", TESTDATA / "tiny_gqa.bin")
    assert ok.returncode == 0, ok.stderr
    assert same_bytes(tmp_path / "out.bin", TESTDATA / "tiny_gqa_q80.bin")
    refused = cli("export.py", tmp_path / "bad.bin", "--version", 2, "--group-size", 64,
                  "--bin", TESTDATA / "tiny_gqa.bin")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "group size 64 does not divide" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad.bin").exists()


def test_cli_bad_inputs(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((TESTDATA / "tiny_mha.bin").read_bytes()[:1000])
    version9 = tmp_path / "v9.bin"
    version9.write_bytes(struct.pack("<Ii", export.MAGIC, 9) + bytes(300))
    out = tmp_path / "out.bin"
    for args in (["--bin", tmp_path / "missing.bin"], ["--bin", TESTDATA / "tok512.bin"],
                 ["--bin", truncated], ["--bin", version9], ["--hf", TESTDATA],
                 ["--hf", tmp_path / "missing"], ["--checkpoint", TESTDATA / "tok512.bin"]):
        assert_clean_failure(cli("export.py", out, *args))
    assert_clean_failure(cli("export.py", tmp_path / "no" / "dir.bin",
                             "--bin", TESTDATA / "tiny_mha.bin"))


# ---------------------------------------------------------------------------- tokenizer.py

def test_tokenizer_export_is_byte_exact(tmp_path):
    pytest.importorskip("sentencepiece")
    shutil.copy(TESTDATA / "tok512.model", tmp_path)
    result = cli("tokenizer.py", "-t", tmp_path / "tok512.model")
    assert result.returncode == 0, result.stderr
    assert same_bytes(tmp_path / "tok512.bin", TESTDATA / "tok512.bin")
    assert tokenizer.export_tokenizer(TESTDATA / "tok512.model", tmp_path / "o.bin") \
        == tmp_path / "o.bin"
    assert same_bytes(tmp_path / "o.bin", TESTDATA / "tok512.bin")


def test_tokenizer_bad_inputs(tmp_path):
    pytest.importorskip("sentencepiece")
    assert_clean_failure(cli("tokenizer.py", "-t", tmp_path / "missing.model"))
    assert_clean_failure(cli("tokenizer.py", "-t", TESTDATA / "tok512.bin",
                             "-o", tmp_path / "x.bin"))
    assert_clean_failure(cli("tokenizer.py", "-t", TESTDATA / "tok512.model",
                             "-o", tmp_path / "no" / "x.bin"))
