"""The Hugging Face families of issue 20, each from its own config.json made small: Llama 3.2 1B
and Llama 3.1 8B (llama3 RoPE scaling, factors 32 and 8, 128,256 tokens), SmolLM2 (rope_theta
100000, 3 query heads per kv head, tied, 49,152 tokens) and TinyLlama 1.1B (Llama 2's constants,
8 query heads per kv head). Each keeps its real vocabulary, RoPE, epsilon, tying and head ratio;
the widths and depth shrink so that transformers' LlamaForCausalLM (the reference) runs in a
moment. export.py --hf converts each and run and runq give transformers' logits."""
import json

import numpy as np
import pytest
import torch
import transformers

from llama2_cython import formats
from tests.helpers import BUILDS, SHARED, in_build
from tests.test_model_params import convert, random_weights, scaled_error

CONFIGS = SHARED / "hf_tokenizers"

# SmolLM2-135M's config.json as its model card gives it (no copy of the file is in the fixtures)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    max_position_embeddings=8192, bos_token_id=0, eos_token_id=0,
                    rope_scaling=None, architectures=["LlamaForCausalLM"], model_type="llama")

FAMILIES = {  # name: the config.json (a fixture's path, or the values), and the file version
    "llama 3.2 1B": ("llama3/Llama-3.2-1B/config.json", 3),
    "llama 3.1 8B": ("llama3/Llama-3.1-8B/config.json", 3),
    "smollm2 135M": (SMOLLM2_135M, 3),
    "tinyllama 1.1B": ("tinyllama/config.json", None),  # Llama 2's constants: v1 and v2 files
}

HEAD_DIM = 8  # the small models' head size (RoPE needs it even)


def small_config(full):
    """full's config.json with 2 layers, head size 8 and at most 8 kv heads, the same number of
    query heads per kv head, and everything else (vocabulary, RoPE, epsilon, tying) kept."""
    config = {k: v for k, v in full.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    per_kv = full["num_attention_heads"] // full["num_key_value_heads"]
    kv_heads = min(full["num_key_value_heads"], max(1, 8 // per_kv))
    config.update(num_hidden_layers=2, num_key_value_heads=kv_heads,
                  num_attention_heads=kv_heads * per_kv, head_dim=HEAD_DIM,
                  hidden_size=kv_heads * per_kv * HEAD_DIM, intermediate_size=96,
                  max_position_embeddings=64)
    return config


def tokens_for(vocab_size):
    """Positions that reach across the whole vocabulary, its last ids included."""
    rng = np.random.default_rng(vocab_size)
    return [int(t) for t in rng.integers(0, vocab_size, 14)] + [vocab_size - 1, vocab_size - 2, 0, 1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, tokens, transformers' logits, fp32 file, Q8_0 file, expected file version)."""
    source, version = FAMILIES[request.param]
    if isinstance(source, str):
        if not (CONFIGS / source).exists():
            pytest.skip(f"{CONFIGS / source} is not here (../shared/fixtures)")
        full = json.loads((CONFIGS / source).read_text())
    else:
        full = source
    folder = tmp_path_factory.mktemp("family")
    config = transformers.LlamaConfig(**small_config(full))
    model = random_weights(config)  # large enough for attention and RoPE to matter
    model.save_pretrained(folder)
    tokens = tokens_for(config.vocab_size)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].numpy()
    fp32, q80 = folder / "model.bin", folder / "model_q80.bin"
    convert(folder, fp32, 1)
    convert(folder, q80, 2)
    return request.param, tokens, logits, fp32, q80, version


def logits(build, prog, model, tokens):
    out = model.parent / f"{prog}-{build}.npy"
    return np.load(in_build(build, "logits_npy", prog=prog, model=str(model), tokens=tokens,
                            out=str(out)))


@pytest.mark.parametrize("build", BUILDS)
def test_fp32_logits_are_transformers(family, build):
    name, tokens, expected, fp32, _, _ = family
    assert scaled_error(logits(build, "run", fp32, tokens), expected) < 1e-5, name


@pytest.mark.parametrize("build", BUILDS)
def test_int8_logits_are_transformers_within_quantization(family, build):
    name, tokens, expected, _, q80, _ = family
    assert scaled_error(logits(build, "runq", q80, tokens), expected) < 0.1, name


def test_the_files_keep_what_the_family_needs(family):
    """v3 only where run.c's constants would be wrong; the vocabulary and tying as config.json."""
    name, _, _, fp32, q80, version = family
    config = json.loads((fp32.parent / "config.json").read_text())
    for path, upstream in ((fp32, 1), (q80, 2)):
        header = formats.parse_header(path.read_bytes()[:formats.HEADER_SIZE], path)
        assert header.version == (version or upstream), name
        assert header.config["vocab_size"] == config["vocab_size"]
        assert header.shared_classifier == config["tie_word_embeddings"]
