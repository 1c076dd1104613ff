"""Models that run.c's constants compute wrongly (issue 19): another RoPE base (Code Llama's 1e6),
another RMSNorm epsilon (1e-6), Llama 3's and the linear RoPE scaling. export.py --hf writes them
as v3 files; run, runq and run_cuda (on the emulator) must give the logits of transformers'
LlamaForCausalLM, which is the reference here: a random model of each kind is saved with
save_pretrained, converted with the command line, and compared position by position."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from llama2_cython import formats
from llama2_cython import export
from tests.helpers import BUILDS, REPO, SHARED, TESTDATA, assert_one_line_error, in_build, run_cli

TOKENS = [3, 200, 17, 99, 5, 250, 42, 42, 7, 131, 64, 12, 180, 2, 77, 151, 9, 33, 240, 1] * 2
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=256, max_position_embeddings=64)
KINDS = {  # name: (config.json's extra keys, whether lm_head is tied to the embeddings)
    "code llama (rope_theta 1e6)": (dict(rope_theta=1e6, rms_norm_eps=1e-5,
                                         num_key_value_heads=4), False),
    "llama 2 chat (rms_norm_eps 1e-6)": (dict(rms_norm_eps=1e-6, num_key_value_heads=2), False),
    "llama 3.1 (llama3 scaling, tied)": (dict(
        rope_theta=500000.0, num_key_value_heads=2, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)), True),
    "linear scaling": (dict(rope_scaling=dict(rope_type="linear", factor=4.0),
                            num_key_value_heads=1), False),
}


def random_weights(config, seed=0):
    """LlamaForCausalLM(config) with norms near 1 and matrices of about unit gain (1/sqrt(fan_in))."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif parameter.dim() == 2:
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
    return model


def random_llama(folder, extra, tied, seed=0):
    """A LlamaForCausalLM with weights large enough that attention tells positions apart (with
    the default init's 0.02 every position looks alike, and RoPE is invisible), saved in folder.
    Its logits for TOKENS."""
    config = transformers.LlamaConfig(**SIZES, **extra, tie_word_embeddings=tied,
                                      bos_token_id=1, eos_token_id=2)
    model = random_weights(config, seed)
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    return logits


def convert(folder, out, version):
    proc = subprocess.run([sys.executable, str(REPO / "export.py"), str(out), "--version",
                           str(version), "--hf", str(folder)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module", params=sorted(KINDS))
def model(request, tmp_path_factory):
    """(kind, transformers' logits, the v3 fp32 file, the v3 Q8_0 file); config.json is beside
    them."""
    folder = tmp_path_factory.mktemp("hf")
    extra, tied = KINDS[request.param]
    logits = random_llama(folder, extra, tied)
    fp32, q80 = folder / "model.bin", folder / "model_q80.bin"
    convert(folder, fp32, 1)
    convert(folder, q80, 2)
    return request.param, logits, fp32, q80


def scaled_error(got, expected):
    return np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("build", BUILDS)
def test_fp32_logits_are_transformers(model, build):
    kind, expected, fp32, _ = model
    got = in_build(build, "logits", prog="run", model=str(fp32), tokens=TOKENS)
    assert scaled_error(got, expected) < 1e-5, kind


@pytest.mark.parametrize("build", BUILDS)
def test_int8_logits_are_transformers_within_quantization(model, build):
    kind, expected, _, q80 = model
    got = in_build(build, "logits", prog="runq", model=str(q80), tokens=TOKENS)
    assert scaled_error(got, expected) < 0.1, kind


def test_engines_agree(model):
    """The batched engine (prompts, decode) and run.c's forward() with the file's parameters."""
    import run
    import runq
    kind, expected, fp32, q80 = model
    for engine, path in ((run, fp32), (runq, q80)):
        transformer = engine.Transformer(str(path))
        prompt = transformer.forward_prompt(TOKENS)
        alone = [transformer.forward(token, pos, reference=True) for pos, token in enumerate(TOKENS)]
        np.testing.assert_allclose(prompt, alone[-1], rtol=0, atol=1e-5 * np.abs(alone[-1]).max())


def test_cuda_kernels_on_the_emulator(model, monkeypatch):
    monkeypatch.setenv("RUN_CUDA_EMULATOR", "1")
    import run_cuda
    kind, expected, fp32, _ = model
    transformer = run_cuda.CudaTransformer(str(fp32))
    n = 12  # the emulator runs every CUDA thread as a fiber: a few positions are enough
    got = [transformer.forward(token, pos) for pos, token in enumerate(TOKENS[:n])]
    assert scaled_error(got, expected[:n]) < 1e-5, kind


def test_the_parameters_matter(model, tmp_path):
    """The comparison can fail: the same weights with run.c's constants give logits 10 times
    further from transformers' than the tolerance (RMSNorm's epsilon matters least: 8e-4)."""
    import run
    kind, expected, fp32, _ = model
    data = bytearray(fp32.read_bytes())
    struct.pack_into("<i", data, 4, 1)  # a v1 file: run.c's RoPE and epsilon
    data[formats.V3_PARAMS_OFFSET:formats.V3_PARAMS_OFFSET + formats.V3_PARAMS.size] = \
        bytes(formats.V3_PARAMS.size)
    (tmp_path / "v1.bin").write_bytes(data)
    transformer = run.Transformer(str(tmp_path / "v1.bin"))
    got = [transformer.forward(token, pos) for pos, token in enumerate(TOKENS)]
    assert scaled_error(got, expected) > 1e-4, kind


def test_the_header_says_what_config_json_says(model):
    kind, _, fp32, q80 = model
    hf = json.loads((fp32.parent / "config.json").read_text())
    rope = hf["rope_parameters"]  # transformers 5.x's layout
    scaling = {} if rope["rope_type"] == "default" else rope
    for path, group_size in ((fp32, 0), (q80, 32)):  # 64 backed off to divide hidden 96
        head = path.read_bytes()[:formats.HEADER_SIZE]
        header = formats.parse_header(head, path)
        assert (header.version, header.group_size) == (3, group_size)
        assert header.rope.theta == rope["rope_theta"]
        assert header.norm_eps == formats.float32(hf["rms_norm_eps"])
        assert header.rope.scaling == scaling.get("rope_type", "none")
        assert header.rope.factor == scaling.get("factor", 1.0)
        assert header.rope.low_freq_factor == scaling.get("low_freq_factor", 0.0)
        assert header.rope.original_max_position == scaling.get("original_max_position_embeddings", 0)


def test_v3_files_convert_between_versions_exactly(model, tmp_path):
    """--bin keeps the parameters: v3 fp32 -> v3 fp32 is the same bytes, and v0 refuses."""
    kind, _, fp32, _ = model
    subprocess.run([sys.executable, str(REPO / "export.py"), str(tmp_path / "again.bin"),
                    "--version", "1", "--bin", str(fp32)], check=True, capture_output=True)
    assert (tmp_path / "again.bin").read_bytes() == fp32.read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "export.py"), str(tmp_path / "v0.bin"),
                           "--version", "0", "--bin", str(fp32)], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()  # what was read, then why nothing is written
    assert proc.returncode == 1 and "version 0 cannot hold" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "v0.bin").exists()


def test_each_program_refuses_the_others_v3_file(model):
    kind, _, fp32, q80 = model
    for prog, path, word in (("runq", fp32, "run it with run"), ("run", q80, "run it with runq")):
        proc = run_cli(prog, [path, "-n", "2"])
        assert word in assert_one_line_error(proc)


def test_llama2_models_keep_upstreams_formats(tmp_path):
    """run.c's constants, spelled out in config.json, give v1 and v2 files, not v3."""
    random_llama(tmp_path, dict(rope_theta=10000.0, rms_norm_eps=1e-5), False)
    for version in (1, 2):
        convert(tmp_path, tmp_path / "out.bin", version)
        head = (tmp_path / "out.bin").read_bytes()[:formats.HEADER_SIZE]
        assert formats.parse_header(head, "out.bin").version == version


BAD_V3 = {  # (offset, struct format, value): a word of the message
    (48, "<f", 0.0): "rope_theta",
    (48, "<f", float("inf")): "rope_theta",
    (52, "<f", -1e-5): "norm_eps",
    (52, "<f", float("nan")): "norm_eps",
    (56, "<i", 3): "rope_scaling",
    (60, "<f", 2.0): "scaling parameters",
    (100, "<i", 1): "must be 0",
    (41, "<B", 1): "must be 0",
    (37, "<i", -1): "group_size",
}


@pytest.mark.parametrize("patch", sorted(BAD_V3, key=str), ids=str)
def test_bad_v3_headers_are_refused(tmp_path, patch):
    """One line naming the field, before anything is mapped."""
    config = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=256,
                  seq_len=32, rope_theta=1e6)
    weights = export.random_model(config)
    path = tmp_path / "model.bin"
    export.write_v1(path, config, weights, True)
    tokenizer = TESTDATA / "tok512.bin"
    assert run_cli("run", [path, "-z", tokenizer, "-n", "2"]).returncode == 0
    data = bytearray(path.read_bytes())
    offset, fmt, value = patch
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(data)
    proc = run_cli("run", [path, "-z", tokenizer, "-n", "2"])
    line = assert_one_line_error(proc)
    assert str(path) in line and BAD_V3[patch] in line, line


# config.json of real models (../shared/fixtures/hf_tokenizers: Meta's and TinyLlama's, read
# from there): what the export would write in the header
REAL_CONFIGS = {
    "llama3/Llama-3.2-1B": (formats.Rope(500000.0, "llama3", 32.0, 1.0, 4.0, 8192), 1e-5,
                            dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                                 vocab_size=128256, seq_len=131072), True),
    "llama3/Llama-3.1-8B": (formats.Rope(500000.0, "llama3", 8.0, 1.0, 4.0, 8192), 1e-5,
                            dict(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                                 vocab_size=128256, seq_len=131072), False),
    "tinyllama": (formats.Rope(), 1e-5, dict(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32,
                                             n_kv_heads=4, vocab_size=32000, seq_len=2048), False),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_read_as_transformers_reads_them(name):
    path = SHARED / "hf_tokenizers" / name / "config.json"
    if not path.exists():
        pytest.skip(f"needs {path}")
    rope, eps, sizes, tied = REAL_CONFIGS[name]
    config, got_tied = export._hf_config(str(path))
    assert {key: config[key] for key in sizes} == sizes and got_tied == tied
    assert export.model_params(config) == (rope, formats.float32(eps))
