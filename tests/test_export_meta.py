"""`export.py --meta-llama DIR` (issue 19): Meta's own checkpoint folders (params.json and
consolidated.NN.pth, bfloat16, split across model-parallel shards), written here by
tools/synth_meta.py in each of Meta's layouts, convert to v0 (where it can hold the model), v1 and
v2 (v3 where run.c's constants would be wrong) with the tensors MetaLlamaSource joins, and the
converted models give the logits of transformers' LlamaForCausalLM loaded with the same weights."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from llama2_cython import export, formats
from llama2_cython.meta import MetaLlamaSource
from tests.helpers import REPO
from tools.synth_meta import write_meta_folder

TOKENS = [1, 7, 250, 3, 99, 31, 140, 2, 64, 200, 5, 17, 180, 77, 12, 9]
KINDS = {  # name: synth_meta's arguments
    "one shard, MHA": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab=256, shards=1),
    "two shards": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab=256, shards=2,
                       fuse_qkv=True),
    "two shards, GQA, ffn_dim_multiplier": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                multiple_of=48, ffn_dim_multiplier=1.3,
                                                vocab=256, shards=2),
    "code llama (rope_theta 1e6, 32016 tokens)": dict(dim=64, n_layers=2, n_heads=4,
                                                      multiple_of=32, vocab=32016,
                                                      rope_theta=1e6, shards=1,
                                                      vocab_in_params=False),
    "llama 2 chat (norm_eps 1e-6)": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32,
                                         vocab=256, norm_eps=1e-6, shards=2),
}


def convert(folder, out, version):
    return subprocess.run([sys.executable, str(REPO / "export.py"), str(out), "--version",
                           str(version), "--meta-llama", str(folder), "--seq-len", "64"],
                          capture_output=True, text=True)


def permute_for_hf(w, n_heads):
    """Meta's wq / wk rows (interleaved rotary pairs) in Hugging Face's order (halves)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def transformers_logits(source):
    """LlamaForCausalLM with the source's weights: its logits for TOKENS."""
    c = source.config
    config = transformers.LlamaConfig(
        hidden_size=c["dim"], intermediate_size=c["hidden_dim"], num_hidden_layers=c["n_layers"],
        num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
        vocab_size=c["vocab_size"], max_position_embeddings=c["seq_len"],
        rms_norm_eps=c["norm_eps"], rope_theta=c["rope_theta"], tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    hf = {"model.embed_tokens.weight": source.tensor("token_embedding_table"),
          "model.norm.weight": source.tensor("rms_final_weight"),
          "lm_head.weight": source.tensor("wcls")}
    for key, name in export.HF_NAMES.items():
        for i in range(c["n_layers"]) if key in export.LAYERED else ():
            tensor = source.tensor(key, i)
            if key in ("wq", "wk"):
                tensor = permute_for_hf(tensor, c["n_heads" if key == "wq" else "n_kv_heads"])
            hf[name.format(i)] = tensor
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()})
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.fixture(scope="module", params=sorted(KINDS))
def meta(request, tmp_path_factory):
    """(kind, folder, the source over it, transformers' logits)."""
    folder = tmp_path_factory.mktemp("meta")
    write_meta_folder(folder, seed=3, **KINDS[request.param])
    source = MetaLlamaSource(folder, seq_len=64)
    return request.param, folder, source, transformers_logits(source)


def scaled_error(got, expected):
    return np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()


def test_converts_to_every_version_with_the_joined_tensors(meta, tmp_path):
    kind, folder, source, _ = meta
    llama2 = formats.is_llama2(*export.model_params(source.config))
    for version in (0, 1, 2):
        out = tmp_path / f"v{version}.bin"
        proc = convert(folder, out, version)
        if version == 0 and not llama2:
            assert proc.returncode == 1 and "version 0 cannot hold" in proc.stderr, proc.stderr
            assert not out.exists()
            continue
        assert proc.returncode == 0, proc.stderr
        header = formats.parse_header(out.read_bytes()[:formats.HEADER_SIZE], out)
        assert header.version == (version if llama2 else 3), kind
        assert (header.rope.theta, header.norm_eps) == (source.config["rope_theta"],
                                                        formats.float32(source.config["norm_eps"]))
        config, weights, shared = export.read_model(out)
        assert not shared and config["seq_len"] == 64
        for key, array in weights.items():
            expected = (np.stack([source.tensor(key, i) for i in range(config["n_layers"])])
                        if key in export.LAYERED else source.tensor(key))
            if version < 2 or key in export.NORMS:  # fp32: the same values, bit for bit
                assert array.tobytes() == expected.astype(np.float32).tobytes(), (kind, key)
            else:  # Q8_0: within half a quantization step of each value's group
                assert np.abs(array - expected).max() <= np.abs(expected).max() / 127, (kind, key)


def test_logits_are_transformers(meta, tmp_path):
    import run
    import runq
    kind, folder, _, expected = meta
    for version, engine, tolerance in ((1, run, 1e-5), (2, runq, 0.1)):
        out = tmp_path / f"v{version}.bin"
        assert convert(folder, out, version).returncode == 0
        transformer = engine.Transformer(str(out))
        got = [transformer.forward(token, pos) for pos, token in enumerate(TOKENS)]
        assert scaled_error(got, expected) < tolerance, (kind, version)


@pytest.mark.parametrize("args, word", [
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", str(2**21)], "seq_len"),
])
def test_bad_arguments_are_one_line(tmp_path, args, word):
    write_meta_folder(tmp_path / "meta", seed=1)
    proc = subprocess.run([sys.executable, str(REPO / "export.py"), str(tmp_path / "out.bin"),
                           "--meta-llama", str(tmp_path / "meta"), *args],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert word in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out.bin").exists()


def test_a_missing_shard_writes_nothing(tmp_path):
    write_meta_folder(tmp_path / "meta", seed=1, shards=2)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    (tmp_path / "meta" / "consolidated.02.pth").write_bytes(b"")
    proc = convert(tmp_path / "meta", tmp_path / "out.bin", 2)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.bin").exists()
