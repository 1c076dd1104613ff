"""Hugging Face tokenizers in the engines (-z, Model's tokenizer_path): a tokenizer.json, Meta's
tiktoken tokenizer.model or a folder holding either, run with small random-weight models whose
vocab_size is the tokenizer's (SmolLM 49152, Llama 3 128256, GPT-2 padded to 50304). What
`python -m run` / `runq` print is held to a reference: the prompt's ids from `tokenizers` or
tiktoken, the greedy continuation from tests/reference.py's forward (runq: its own forward, int8),
the text from the reference library's decode. The tokenizers live in ../shared/fixtures; their
tests skip without it."""
import base64
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import run
import runq
from llama2_cython import LlamaError, bpe, export
from llama2_cython.hf_tokenizer import tokenizer_kind
from tests.helpers import REPO, SHARED, TESTDATA, assert_one_line_error, run_cli
from tests.reference import ReferenceTransformer

tokenizers = pytest.importorskip("tokenizers")

HF = SHARED / "hf_tokenizers"
PACKAGES = {"run": run, "runq": runq}
STEPS = 24
# <|im_end|> is SmolLM's EOS: in a prompt, it is text. 𝔘 takes tokens of one byte (\x94, \x98),
# which run.c's printable filter would drop
SMOL_PROMPT = "Hi<|im_end|>\nOnce upon a time, Zoë 𝔘"
LLAMA3_PROMPT = "Once upon a time, Zoë 𝔘"


def shared(*parts):
    path = HF.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} comes from ../shared/fixtures, which is absent")
    return path


def tiny_config(vocab_size):
    return dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab_size,
                seq_len=48)


class TinyModel:
    """Random weights for vocab_size tokens, written as v1 (run) and Q8_0 v2 (runq)."""

    def __init__(self, folder, vocab_size, seed, shared=True, edit=None):
        self.config = tiny_config(vocab_size)
        self.weights = export.random_model(self.config, seed=seed, shared=shared)
        if edit:
            edit(self.weights)
        self.paths = {"run": folder / "model.bin", "runq": folder / "model_q80.bin"}
        export.write_v1(self.paths["run"], self.config, self.weights, shared)
        export.write_v2(self.paths["runq"], self.config, self.weights, shared, group_size=16)

    def forward(self, prog):
        """forward(token, pos) -> logits: the float64 reference for run, runq's own for runq."""
        if prog == "run":
            return ReferenceTransformer(self.config, self.weights).forward
        return runq.Transformer(str(self.paths["runq"])).forward


def greedy(forward, prompt_ids, steps, eos_ids=()):
    """generate()'s loop with argmax sampling: the ids fed after the first, up to a sampled EOS.
    Asserts that every choice is clear (a near tie could go either way in float32)."""
    out, token = [], prompt_ids[0]
    for pos in range(steps):
        logits = np.asarray(forward(token, pos), dtype=np.float64)
        if pos < len(prompt_ids) - 1:
            token = prompt_ids[pos + 1]
        else:
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 1e-4 * np.abs(logits).max(), "a near tie: pick another seed"
            token = int(np.argmax(logits))
            if token in eos_ids:
                break
        out.append(token)
    return out


def printed(prompt_ids, fed, bos_id):
    """The ids whose pieces a run prints: all but the BOS it starts from."""
    return ([] if prompt_ids[0] == bos_id else prompt_ids[:1]) + fed


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    shared("smollm", "tokenizer.json")
    return TinyModel(tmp_path_factory.mktemp("smol"), 49152, seed=11)


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    shared("llama3", "tokenizer.model")
    return TinyModel(tmp_path_factory.mktemp("llama3"), 128256, seed=5)


@pytest.fixture(scope="module")
def smol_reference():
    return tokenizers.Tokenizer.from_file(str(shared("smollm", "tokenizer.json")))


@pytest.fixture(scope="module")
def llama3_reference():
    """tiktoken with Meta's ranks and Llama 3's regex; BOS 128000 in front, as HF's template."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for line in shared("llama3", "tokenizer.model").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("llama3", pat_str=bpe.LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|begin_of_text|>": 128000})


def folder_with(tmp_path, tokenizer_file, **configs):
    """A model folder: tokenizer_file linked in, the configs written beside it."""
    tmp_path.mkdir(exist_ok=True)
    os.symlink(tokenizer_file, tmp_path / tokenizer_file.name)
    for name, value in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    return tmp_path


# -- the command line: prompt ids, greedy text, stops --------------------------------------------

FORMS = {"folder": (), "tokenizer.json": ("tokenizer.json",)}


@pytest.mark.parametrize("prog, form", [("run", "folder"), ("run", "tokenizer.json"),
                                        ("runq", "folder")])
def test_smollm_run_prints_reference_text(smol, smol_reference, prog, form):
    prompt_ids = smol_reference.encode(SMOL_PROMPT).ids
    assert prompt_ids[0] != 1 and 2 in prompt_ids  # no BOS; the EOS id inside the prompt
    fed = greedy(smol.forward(prog), prompt_ids, STEPS, eos_ids=(2,))
    assert len(fed) == STEPS  # nothing stopped it: the prompt's EOS is text
    proc = run_cli(prog, [smol.paths[prog], "-z", shared("smollm", *FORMS[form]), "-i", SMOL_PROMPT,
                          "-n", STEPS, "-t", 0])
    assert proc.returncode == 0 and proc.stderr.startswith(b"achieved tok/s"), proc.stderr
    expected = smol_reference.decode(printed(prompt_ids, fed, None), skip_special_tokens=False)
    assert proc.stdout.decode("utf-8", "replace") == expected + "\n"
    assert proc.stdout.startswith(SMOL_PROMPT.encode())  # its first token printed too (no BOS)


@pytest.mark.parametrize("prog, form", [("run", "tokenizer.model"), ("runq", "folder")])
def test_llama3_run_prints_reference_bytes(llama3_model, llama3_reference, prog, form, tmp_path):
    model_file = shared("llama3", "tokenizer.model")
    if form == "folder":  # with the Instruct model's tokenizer_config.json beside it
        tokenizer = folder_with(tmp_path / "llama3", model_file)
        shutil.copy(shared("llama3", "Llama-3.2-1B-Instruct", "tokenizer_config.json"), tokenizer)
    else:
        tokenizer = model_file  # no config: Meta's special-token names
    prompt_ids = [128000] + llama3_reference.encode_ordinary(LLAMA3_PROMPT)
    fed = greedy(llama3_model.forward(prog), prompt_ids, STEPS, eos_ids=(128001, 128009))
    proc = run_cli(prog, [llama3_model.paths[prog], "-z", tokenizer, "-i", LLAMA3_PROMPT,
                          "-n", STEPS, "-t", 0])
    assert proc.returncode == 0, proc.stderr
    # raw bytes, as tiktoken gives them: a piece may be part of a UTF-8 character
    assert proc.stdout == llama3_reference.decode_bytes(printed(prompt_ids, fed, 128000)) + b"\n"


@pytest.mark.parametrize("prog", ["run", "runq"])
def test_generation_stops_at_a_sampled_eos(smol, smol_reference, prog, tmp_path):
    """The model's EOS ids (generation_config.json) end the text when sampled, unprinted: a token
    of the greedy continuation is made an EOS id (with one it never samples). On the command line
    the fourth; in generate() and generate_batch the first, which leaves the prompt alone."""
    prompt_ids = smol_reference.encode(SMOL_PROMPT).ids
    fed = greedy(smol.forward(prog), prompt_ids, STEPS)
    generated = fed[len(prompt_ids) - 1:]
    assert generated[3] not in generated[:3] and 100 not in fed

    def stops_at(k):
        folder = folder_with(tmp_path / str(k), shared("smollm", "tokenizer.json"),
                             generation_config={"eos_token_id": [100, generated[k]]})
        cut = printed(prompt_ids, fed[:len(prompt_ids) - 1 + k], None)
        return folder, smol_reference.decode(cut, skip_special_tokens=False)

    folder, expected = stops_at(3)
    proc = run_cli(prog, [smol.paths[prog], "-z", folder, "-i", SMOL_PROMPT, "-n", STEPS,
                          "-t", 0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("utf-8", "replace") == expected + "\n"

    folder, expected = stops_at(0)
    assert expected == SMOL_PROMPT
    m = PACKAGES[prog].Model(str(smol.paths[prog]), str(folder))
    assert "".join(m.generate(SMOL_PROMPT, steps=STEPS, temperature=0)) == expected
    texts = ["", ""]
    for i, piece in m.generate_batch([SMOL_PROMPT, SMOL_PROMPT], steps=STEPS, temperature=0):
        texts[i] += piece
    assert texts == [expected, expected]


@pytest.mark.parametrize("layout", ["legacy", "first"])
def test_sentencepiece_style_prints_run_cs_text(layout, tmp_path):
    """A Llama-2-style tokenizer.json (TinyLlama's kind: "\u2581" marks, byte fallback, a decoder
    that drops the text's first space) made from tok512.bin: the text printed is tokenizers'
    decode of the printed ids, which drops the first space as run.c drops the one after BOS; with
    tok512.bin itself run prints the same text."""
    from tests.test_bpe_spm import make_spm_json
    reference = make_spm_json(tmp_path / "tokenizer.json", TESTDATA / "tok512.bin", layout)
    model = TinyModel(tmp_path, 512, seed=3)
    prompt = "Once upon a time"
    prompt_ids = reference.encode(prompt).ids
    assert prompt_ids[0] == 1
    fed = greedy(model.forward("run"), prompt_ids, STEPS)
    expected = reference.decode(fed, skip_special_tokens=True)
    assert not expected.startswith(" ") and reference.id_to_token(fed[0]).startswith("\u2581")
    # the pieces' bytes ("\u2581" a space, <0xNN> the byte): tokenizers' decode where they are
    # UTF-8 (it makes each byte of an invalid run a U+FFFD, as printing raw bytes cannot)
    pieces = [bytes([int(t[3:5], 16)]) if len(t) == 6 and t.startswith("<0x") else
              t.replace("\u2581", " ").encode() for t in map(reference.id_to_token, fed)]
    expected_bytes = b"".join(pieces)[1:]
    outputs = []
    for tokenizer in (tmp_path / "tokenizer.json", TESTDATA / "tok512.bin"):
        proc = run_cli("run", [model.paths["run"], "-z", tokenizer, "-i", prompt, "-n", STEPS,
                               "-t", 0])
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == expected_bytes + b"\n"
    try:
        assert expected_bytes.decode("utf-8") == expected
    except UnicodeDecodeError:
        pass
    # run.c prints the same pieces but a single byte that is neither printable nor space
    shown = [p for p in pieces if len(p) > 1 or 32 <= p[0] < 127 or p in b"\t\n\v\f\r"]
    assert outputs[1] == b"".join(shown)[1:] + b"\n"
    m = run.Model(str(model.paths["run"]), str(tmp_path / "tokenizer.json"))
    text = "".join(m.generate(prompt, steps=STEPS, temperature=0))
    assert text == expected_bytes.decode("utf-8", "replace")


def gpt2_tokenizer_json(folder):
    """OpenAI's encoder.json and vocab.bpe, read by tokenizers and saved as a tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers
    reference = tokenizers.Tokenizer(models.BPE.from_file(
        str(shared("gpt2", "encoder.json")), str(shared("gpt2", "vocab.bpe"))))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.save(str(folder / "tokenizer.json"))
    return reference


def test_ids_past_the_tokenizer_print_nothing(tmp_path):
    """GPT-2's 50257 tokens with a model padded to 50304 rows (as nanoGPT pads): an id without a
    token prints nothing and decodes to nothing, as `tokenizers` drops it; the run goes on."""
    reference = gpt2_tokenizer_json(tmp_path)
    pad = 50300
    prompt_ids = reference.encode("Once upon a time").ids

    def favour_pad(weights):  # the pad row outscores the first greedy token wherever it wins
        first = greedy(ReferenceTransformer(tiny_config(50304), weights).forward, prompt_ids,
                       len(prompt_ids) + 1)[-1]
        weights["wcls"][pad] = 2 * weights["wcls"][first]

    model = TinyModel(tmp_path, 50304, seed=4, shared=False, edit=favour_pad)
    fed = greedy(model.forward("run"), prompt_ids, STEPS)
    assert pad in fed
    proc = run_cli("run", [model.paths["run"], "-z", tmp_path / "tokenizer.json",
                           "-i", "Once upon a time", "-n", STEPS, "-t", 0])
    assert proc.returncode == 0, proc.stderr
    text = reference.decode(printed(prompt_ids, fed, None), skip_special_tokens=False)
    assert proc.stdout.decode("utf-8", "replace") == text + "\n"
    m = run.Model(str(model.paths["run"]), str(tmp_path))
    assert m.decode([pad]) == ""
    assert m.decode(fed) == reference.decode(fed, skip_special_tokens=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.decode([50304])


# -- the Python API ------------------------------------------------------------------------------

TEXTS = ["Hello world", SMOL_PROMPT, "<|im_start|>user\nHi<|im_end|>\n", "  spaces\n\n", "",
         "Crème brûlée 😀 123456"]


@pytest.mark.parametrize("prog", ["run", "runq"])
def test_api_matches_tokenizers(smol, smol_reference, prog):
    m = PACKAGES[prog].Model(str(smol.paths[prog]), str(shared("smollm")))
    for text in TEXTS:
        ids = smol_reference.encode(text).ids
        assert m.encode(text) == ids and m.encode(text.encode()) == ids
        assert m.encode(text, bos=False) == \
            smol_reference.encode(text, add_special_tokens=False).ids
        assert m.decode(ids) == smol_reference.decode(ids, skip_special_tokens=False)
    rng = np.random.default_rng(0)
    for _ in range(20):  # random ids: split UTF-8 characters, special tokens
        ids = [int(i) for i in rng.integers(0, 49152, rng.integers(1, 8))]
        assert m.decode(ids) == smol_reference.decode(ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="eos=True"):
        m.encode("x", eos=True)

    prompt_ids = smol_reference.encode(SMOL_PROMPT).ids
    fed = greedy(smol.forward(prog), prompt_ids, STEPS, eos_ids=(2,))
    expected = smol_reference.decode(printed(prompt_ids, fed, None), skip_special_tokens=False)
    assert "".join(m.generate(SMOL_PROMPT, steps=STEPS, temperature=0)) == expected
    texts = ["", ""]
    for i, piece in m.generate_batch([SMOL_PROMPT, "Hello world"], steps=STEPS, temperature=0):
        texts[i] += piece
    assert texts == [expected, "".join(m.generate("Hello world", steps=STEPS, temperature=0))]
    for generate in (lambda: list(m.generate("")), lambda: list(m.generate_batch(["a", None]))):
        with pytest.raises(LlamaError, match="the prompt is empty and .* adds no BOS token"):
            generate()


def test_api_llama3_bos_and_sampling(llama3_model, llama3_reference):
    """Llama 3 puts BOS in front (the first token, never printed): an empty prompt is BOS alone,
    from which a sampled run starts."""
    m = run.Model(str(llama3_model.paths["run"]), str(shared("llama3", "tokenizer.model")))
    ids = m.encode(LLAMA3_PROMPT)
    assert ids == [128000] + llama3_reference.encode_ordinary(LLAMA3_PROMPT)
    assert m.encode(LLAMA3_PROMPT, bos=False) == ids[1:]
    assert m.decode(ids) == "<|begin_of_text|>" + LLAMA3_PROMPT
    text = "".join(m.generate("", steps=8, temperature=1.0, topp=0.9, seed=7))  # BOS alone
    assert text and "<|begin_of_text|>" not in text
    assert "".join(m.generate(LLAMA3_PROMPT, steps=STEPS, seed=7)).startswith(LLAMA3_PROMPT)


# -- what is read as what, and bad input -----------------------------------------------------------

def test_tokenizer_bin_is_still_run_cs(tmp_path):
    """llama2.c's tokenizer.bin goes to run.c's Tokenizer, even when its max_token_length header
    byte looks like JSON's "{" (123) or a protobuf's first byte (10)."""
    tok512 = (TESTDATA / "tok512.bin").read_bytes()
    expected = run.Tokenizer(str(TESTDATA / "tok512.bin"), 512).encode("Once upon a time")
    for header in (123, 10, 32):
        path = tmp_path / f"tok{header}.bin"
        path.write_bytes(struct.pack("<I", header) + tok512[4:])
        assert tokenizer_kind(path) == "llama2.c"
        for package in (run, runq):
            tokenizer = package.load_tokenizer(str(path), 512)
            assert isinstance(tokenizer, package.Tokenizer)
            assert tokenizer.encode("Once upon a time") == expected
    assert tokenizer_kind(TESTDATA / "tok512.model") == "sentencepiece"


def cli_error(args, prog="run"):
    return assert_one_line_error(run_cli(prog, args))


def test_bad_tokenizers_are_one_line(tmp_path):
    tiny = TESTDATA / "tiny_mha.bin"  # vocab 512
    err = cli_error([tiny, "-z", TESTDATA / "tok512.model"])
    assert "tok512.model is a sentencepiece model" in err and "tokenizer.py -t" in err
    (tmp_path / "empty").mkdir()
    err = cli_error([tiny, "-z", tmp_path / "empty"])
    assert "the folder holds neither tokenizer.json nor tokenizer.model" in err
    (tmp_path / "sp").mkdir()
    shutil.copy(TESTDATA / "tok512.model", tmp_path / "sp" / "tokenizer.model")
    assert "sentencepiece" in cli_error([tiny, "-z", tmp_path / "sp"])
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    assert "WordPiece" in cli_error([tiny, "-z", bad_json])
    bad_tiktoken = tmp_path / "tokenizer.model"
    bad_tiktoken.write_text("IQ== 0\nnot-base64 x\n")
    assert "line 2" in cli_error([tiny, "-z", bad_tiktoken])
    err = cli_error([TESTDATA / "tiny_mha_q80.bin", "-z", shared("smollm")], prog="runq")
    assert "tokenizer has 49152 tokens, more than the model's vocab_size 512" in err


def test_bad_prompts_and_modes_are_one_line(smol, tmp_path):
    model, folder = smol.paths["run"], shared("smollm")
    assert "the prompt is empty" in cli_error([model, "-z", folder])
    assert "not UTF-8 (byte 1)" in assert_one_line_error(subprocess.run(
        [sys.executable, "-m", "run", str(model), "-z", str(folder), "-i", b"a\xffb"],
        cwd=REPO, capture_output=True, timeout=120))
    # chat needs the model's chat template (tests/test_chat_template.py chats in SmolLM's)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "tokenizer.json", bare)
    assert "no chat template" in cli_error([smol.paths["runq"], "-z", bare, "-m", "chat"],
                                           prog="runq")


# -- run_cuda.py ---------------------------------------------------------------------------------

def test_run_cuda_emulated(tmp_path):
    """run_cuda takes run's tokenizer path: a small tokenizer.json trained here, its model run on
    the emulated GPU, prints what run's API generates."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time there was a little cat. " * 4, *TEXTS], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = TinyModel(tmp_path, tok.get_vocab_size(), seed=2)
    expected = "".join(run.Model(str(model.paths["run"]), str(tmp_path)).generate(
        "Once upon a time", steps=12, temperature=0))
    env = {**os.environ, "RUN_CUDA_EMULATOR": "1"}
    proc = subprocess.run([sys.executable, "run_cuda.py", str(model.paths["run"]), "-z",
                           str(tmp_path), "-i", "Once upon a time", "-n", "12", "-t", "0"],
                          cwd=REPO, capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("utf-8", "replace") == expected + "\n"
