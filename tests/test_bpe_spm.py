"""llama2_cython/bpe.py on sentencepiece-style tokenizer.json files (Llama 2, TinyLlama): against
`tokenizers` on files made here the way transformers' LlamaConverter makes them, from run.c's
tokenizer format (testdata/tok512.bin; Llama 2's tokenizer.bin from ../shared/fixtures), and
against run.c's own ids (encode_golden.json); and its refusals of what it does not implement."""
import json
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama2_cython import LlamaError, bpe
from tests.helpers import SHARED, TESTDATA
from tests.test_bpe import (CORPUS, RANDOM_SETTINGS, assert_refused_in_one_line,
                             assert_round_trip, shared)

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, processors)

MARK = "\u2581"
SPM_TEXTS = CORPUS + [
    " ", "  ", "\u2581", "\u2581x \u2581 y\u2581", "<s>", "</s></s>", "<s>hi", " <s> hi",
    "a<s>b</s>c", "<unk>x<unk>", "x <unk> ", "<s", "</s", "a  b   c    d", "\n\n", " \n ",
    "Hello", " Hello", "日本\U0001F600", "\x00", "x" * 1000, " " * 300 + "y", "é" * 500,
    "<|user|>\nHi there</s>\n<|assistant|>\n"]
SPM_FRAGMENTS = ["<s>", "</s>", "<unk>", MARK, " ", "  ", "\n", "\t", "the", " the", "Mia",
                 "ball", "é", "😀", "日本", "\u200d", "x"]
SPM_RANDOM = st.lists(st.one_of(st.sampled_from(SPM_FRAGMENTS),
                                st.characters(blacklist_categories=("Cs",)),
                                st.characters(max_codepoint=0x7f)), max_size=40).map("".join)
ENCODE = json.loads((TESTDATA / "encode_golden.json").read_text())

# Each layout: how transformers writes a Llama tokenizer.json (sentencepiece's BPE converted)
#   legacy:   LlamaConverter with legacy=True (TinyLlama's and Llama 2's HF files): the normalizer
#             puts "▁" in front of each piece of text between special tokens and for each space
#   first:    legacy=False (newer files): Metaspace, "▁" in front of the text's start only
#   always:   transformers 5's LlamaTokenizer with legacy=True: Metaspace in front of every piece
#   noprefix: add_prefix_space=False: spaces become "▁", nothing in front, the decoder strips none
#   split:    an older sentencepiece-like BPE: Metaspace split at every "▁", Metaspace decoder, no
#             byte fallback (a missing character is <unk>, one per run)
LAYOUTS = ["legacy", "first", "always", "noprefix", "split"]


def read_run_c_tokenizer(path):
    """(pieces, scores) of run.c's tokenizer format, as sentencepiece spells the pieces."""
    data = path.read_bytes()
    offset = 4
    pieces, scores = [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length].decode("utf-8").replace(" ", MARK))
        scores.append(score)
        offset += 8 + length
    pieces[:3] = ["<unk>", "<s>", "</s>"]  # run.c's are "<unk>", "\n<s>\n", "\n</s>\n"
    return pieces, scores


def is_byte_piece(piece):
    return len(piece) == 6 and piece.startswith("<0x")


def spm_merges(pieces, scores):
    """Every split of a normal piece into two normal pieces, the best-scored merged piece first
    (LlamaConverter's order)."""
    normal = {p: i for i, p in enumerate(pieces) if i >= 3 and not is_byte_piece(p)}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], normal[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def make_spm_json(path, source, layout):
    """A tokenizer.json at path from run.c's tokenizer file source, in one of LAYOUTS; returns
    tokenizers' Tokenizer read back from it."""
    pieces, scores = read_run_c_tokenizer(source)
    if layout == "split":
        kept = [i for i, p in enumerate(pieces) if not is_byte_piece(p)]
        pieces, scores = [pieces[i] for i in kept], [scores[i] for i in kept]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, spm_merges(pieces, scores), unk_token="<unk>",
                               fuse_unk=True, byte_fallback=layout != "split"))
    steps = [decoders.Replace(MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if layout != "noprefix":
        steps.append(decoders.Strip(" ", 1, 0))
    if layout == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(MARK),
                                               normalizers.Replace(" ", MARK)])
    elif layout == "noprefix":
        tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", MARK)])
    elif layout == "split":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(MARK, prepend_scheme="always", split=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(MARK, prepend_scheme=layout, split=False)
    if layout == "split":
        tok.decoder = decoders.Metaspace(MARK, prepend_scheme="always")
    else:
        tok.decoder = decoders.Sequence(steps)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


def check_same(ours, reference, texts):
    """ours gives tokenizers' ids for each text (with and without BOS) and its decode of them
    (keeping and skipping special tokens)."""
    for text in texts:
        for add in (True, False):
            assert ours.encode(text, add) == reference.encode(text, add_special_tokens=add).ids, \
                (add, text)
        ids = reference.encode(text).ids
        for skip in (False, True):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), \
                (skip, text)


@pytest.fixture(scope="module", params=LAYOUTS)
def tok512(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.json"
    reference = make_spm_json(path, TESTDATA / "tok512.bin", request.param)
    return bpe.load(path), reference, request.param


def test_tok512_matches_tokenizers(tok512):
    ours, reference, layout = tok512
    check_same(ours, reference, SPM_TEXTS)
    assert (ours.vocab_size, ours.bos_id, ours.eos_ids) == (reference.get_vocab_size(), 1, ())
    assert ours.encode("") == [1] and ours.encode("", False) == []


@RANDOM_SETTINGS
@given(text=SPM_RANDOM)
def test_tok512_random_strings(tok512, text):
    ours, reference, _ = tok512
    assert_round_trip(ours, reference, text)


def test_tok512_decode_random_ids(tok512):
    """Random ids: byte tokens that are not UTF-8 (one U+FFFD per byte, as ByteFallback), special
    tokens kept or skipped, "▁" at the start stripped by Strip or by the Metaspace decoder."""
    ours, reference, _ = tok512
    rng = random.Random(5)
    for _ in range(1000):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 10))]
        for skip in (False, True):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), ids


def test_tok512_pieces(tok512):
    """piece(): "▁" a space, <0xNN> the byte; joined they are the text with the space the
    normalizer or Metaspace put in front (which decode() strips)."""
    ours, reference, layout = tok512
    assert ours.piece(1) == b"<s>" and ours.piece(2) == b"</s>" and ours.piece(0) == b"<unk>"
    if layout != "split":
        assert [ours.piece(i) for i in range(3, 259)] == [bytes([b]) for b in range(256)]
    the = reference.token_to_id(MARK + "the")
    assert ours.piece(the) == b" the"
    for text in CORPUS[1:] + ["日本\U0001F600 x"]:
        ids = ours.encode(text, add_special_tokens=False)
        joined = b"".join(ours.piece(i) for i in ids)
        if layout == "split":  # no byte fallback: compare with what tokenizers' tokens say
            expected = "".join(reference.encode(text, add_special_tokens=False).tokens)
            assert joined.decode() == expected.replace(MARK, " ")
        else:
            prefix = "" if layout == "noprefix" or text.startswith(" ") and layout != "legacy" \
                else " "
            assert joined.decode() == prefix + text


def test_long_runs_take_the_heap_path(tok512):
    """Chunks past _LONG_PIECE parts (no "▁" to cut at) are merged by the heap, in order."""
    ours, reference, _ = tok512
    rng = random.Random(3)
    for text in ("x" * 3000, " " * 3000, "é" * 1000, "the" * 1000,
                 "".join(rng.choice("the cat é😀\n") for _ in range(3000))):
        assert ours.encode(text) == reference.encode(text).ids


def test_run_c_ids_for_tok512(tmp_path):
    """run.c's encode (encode_golden.json) gives the legacy layout's ids: the same dummy "▁" in
    front and the same merges by score. Only text holding "<s>" or "</s>" differs: HF's files
    take them for the special tokens, run.c for characters."""
    check_run_c_goldens(tmp_path, TESTDATA / "tok512.bin", ENCODE["tok512"])


def check_run_c_goldens(folder, source, golden):
    make_spm_json(folder / "tokenizer.json", source, "legacy")
    ours = bpe.load(folder)
    checked = 0
    for case in golden["cases"]:
        text = case["text"]
        ids = ([1] if case["bos"] else []) + ours.encode(text, False) + ([2] if case["eos"] else [])
        if "<s>" in text or "</s>" in text:
            assert ids != case["ids"], text
            continue
        assert ids == case["ids"], text
        checked += 1
    assert checked >= 35


# -- Llama 2's 32000 pieces (../shared/fixtures/tokenizer.bin) ------------------------------------

@pytest.fixture(scope="module", params=["legacy", "first"])
def llama2(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama2") / "tokenizer.json"
    reference = make_spm_json(path, fixture("tokenizer.bin"), request.param)
    return bpe.load(path), reference, request.param


def fixture(name):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{name} comes from ../shared/fixtures, which is absent")
    return path


def test_llama2_matches_tokenizers(llama2):
    ours, reference, layout = llama2
    check_same(ours, reference, SPM_TEXTS)
    assert (ours.vocab_size, ours.bos_id) == (32000, 1)
    assert ours.encode("Hello world") == [1, 15043, 3186]
    assert ours.encode(" Hello", False) == ([29871, 15043] if layout == "legacy" else [15043])
    assert ours.encode("a<s>b", False) == ([263, 1, 289] if layout == "legacy" else [263, 1, 29890])


@RANDOM_SETTINGS
@given(text=SPM_RANDOM)
def test_llama2_random_strings(llama2, text):
    ours, reference, _ = llama2
    assert_round_trip(ours, reference, text)


def test_run_c_ids_for_llama2(tmp_path):
    check_run_c_goldens(tmp_path, fixture("tokenizer.bin"), ENCODE["llama32000"])


def test_tinyllama_folder(tmp_path):
    """TinyLlama-1.1B-Chat's layout: Llama 2's vocabulary, legacy false (Metaspace "first"), its
    configs beside it (eos 2); its chat prompt encodes as tokenizers encodes it."""
    configs = shared("tinyllama")
    reference = make_spm_json(tmp_path / "tokenizer.json", fixture("tokenizer.bin"), "first")
    for name in ("tokenizer_config.json", "config.json"):
        (tmp_path / name).write_bytes((configs / name).read_bytes())
    ours = bpe.load(tmp_path)
    assert (ours.bos_id, ours.eos_ids) == (1, (2,))
    prompt = "<|system|>\nYou are terse.</s>\n<|user|>\nHello world</s>\n<|assistant|>\n"
    ids = ours.encode(prompt)
    assert ids == reference.encode(prompt).ids
    assert ids[:2] == [1, 529] and ids.count(2) == 2
    assert ours.decode(ids) == "<s> " + prompt
    assert ours.decode(ids, skip_special_tokens=True) == prompt.replace("</s>", "")


# -- cases the generated files do not have --------------------------------------------------------

def spm_doc():
    """A small sentencepiece-style tokenizer.json: the legacy layout over a handful of pieces."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        [MARK, "a", "b", "c", "x", "y", MARK + "a", MARK + "b", "ab", "a" + MARK, "a" + MARK + "b",
         MARK + MARK, "xy", MARK + "xy"]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, c in enumerate(["<unk>", "<s>", "</s>"])],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": MARK},
            {"type": "Replace", "pattern": {"String": " "}, "content": MARK}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": MARK}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)},
                  # "a" + "▁b" joins across a "▁": no cut after an "a"
                  "merges": ["▁ ▁", "▁ a", "a b", "x y", "▁ xy", "▁ b", "a ▁b", "a ▁"]},
    }


def test_merges_across_the_mark_keep_the_word_whole(tmp_path):
    """A merge that joins a part ending in "a" to one starting with "▁" (a "▁" inside a token):
    the words are not cut after an "a", and ids stay tokenizers'."""
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spm_doc()))
    ours, reference = bpe.load(path), Tokenizer.from_file(str(path))
    texts = ["a b", "xa b", "ab ab", "a  b", "ba b a b", "xy a b xy", "a", " b a", "c a b"]
    for text in texts + [" ".join(random.Random(n).choice("ab xy c") for _ in range(40))
                         for n in range(30)]:
        assert ours.encode(text) == reference.encode(text).ids, text
    across = spm_doc()["model"]["vocab"]["a" + MARK + "b"]
    assert across in ours.encode("xa b") and across in ours.encode("ca b c")


def test_normalized_special_token(tmp_path):
    """"<s>" with normalized true under the Prepend normalizer: tokenizers looks for "▁<s>"."""
    doc = spm_doc()
    doc["added_tokens"][1]["normalized"] = True
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    ours, reference = bpe.load(path), Tokenizer.from_file(str(path))
    check_same(ours, reference, ["<s>", "a<s>b", "a <s> b", "\u2581<s>", "<s><s> <s>"])
    assert ours.encode("a <s>", False) == [265, 1]  # "▁a", "▁<s>"


def test_normalized_added_tokens(tmp_path):
    """An added token with normalized true is looked for as its content normalized (with the
    "▁" in front) and decoded as that; one not normalized is found in the raw text."""
    path = tmp_path / "tokenizer.json"
    reference = make_spm_json(path, TESTDATA / "tok512.bin", "legacy")
    reference.add_tokens([AddedToken("hello world", normalized=True),
                          AddedToken("x\u2581y", normalized=False), "plain"])
    reference.save(str(path))
    ours = bpe.load(path)
    texts = ["hello world", "say hello world", "hello worlds", "hello\u2581world", "ax\u2581yb",
             "x y", "plain plainer", " hello world"]
    check_same(ours, reference, texts + SPM_TEXTS[:12])
    assert ours.encode("say hello world", False)[-1] == 512
    assert ours.decode([512, 513]) == reference.decode([512, 513]) == "hello worldx y"


@pytest.mark.parametrize("scheme,split", [("first", True), ("never", False), ("never", True)])
def test_other_metaspace_options(tmp_path, scheme, split):
    path = tmp_path / "tokenizer.json"
    reference = make_spm_json(path, TESTDATA / "tok512.bin", "first")
    reference.pre_tokenizer = pre_tokenizers.Metaspace(MARK, prepend_scheme=scheme, split=split)
    reference.decoder = decoders.Metaspace(MARK, prepend_scheme=scheme, split=split)
    reference.save(str(path))
    check_same(bpe.load(path), reference, SPM_TEXTS)


def set_path(doc, keys, value):
    for key in keys[:-1]:
        doc = doc[key]
    doc[keys[-1]] = value


METASPACE = {"type": "Metaspace", "replacement": MARK, "prepend_scheme": "first", "split": False}
BAD_SPM_DOCS = [
    (("normalizer",), {"type": "NFKC"}, "normalizer 'NFKC' is not supported"),
    (("normalizer", "normalizers", 1, "pattern"), {"Regex": " +"},
     "only a non-empty String pattern is supported"),
    (("normalizer", "normalizers", 0, "prepend"), 5, "prepend is a number, expected string"),
    (("pre_tokenizer",), METASPACE, "a normalizer and a pre_tokenizer together"),
    (("pre_tokenizer",), {"type": "ByteLevel"},
     "pre-tokenizer 'ByteLevel' is not supported with a sentencepiece-style decoder"),
    (("decoder",), {"type": "CTC"}, "decoder 'CTC' is not supported"),
    (("decoder",), None, "decoder None is not supported"),
    (("decoder", "decoders", 3, "stop"), 1, "stop is not 0: not supported"),
    (("decoder", "decoders", 3, "content"), "  ", "is not one character"),
    (("decoder", "decoders", 0), {"type": "Replace", "pattern": {"Regex": "x"}, "content": ""},
     "only a non-empty String pattern"),
    (("decoder",), {"type": "Metaspace", "replacement": "__", "prepend_scheme": "always"},
     "replacement '__' is not one character"),
    (("decoder",), {"type": "Metaspace", "replacement": MARK, "prepend_scheme": "sometimes"},
     "prepend_scheme 'sometimes' is not always, first or never"),
    (("decoder",), {"type": "Metaspace", "replacement": MARK, "add_prefix_space": False},
     "add_prefix_space false contradicts prepend_scheme 'always'"),
    (("model", "ignore_merges"), True, "model.ignore_merges = true is not supported"),
    (("model", "byte_fallback"), "yes", "model.byte_fallback is a string, expected boolean"),
    (("model", "vocab", "<0x41>"), 9999, "are not 0..272 without gaps"),
]


@pytest.mark.parametrize("keys,value,message", BAD_SPM_DOCS,
                         ids=[f"{'.'.join(map(str, k))}={v!r}"[:60] for k, v, _ in BAD_SPM_DOCS])
def test_bad_spm_json_is_one_line(tmp_path, keys, value, message):
    assert_refused_in_one_line(spm_doc(), keys, value, message, tmp_path)


def test_missing_byte_token_and_clashing_added_tokens_are_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    doc = spm_doc()
    vocab = doc["model"]["vocab"]
    del vocab["<0x41>"]
    doc["model"]["vocab"] = {p: i for i, p in enumerate(sorted(vocab, key=vocab.get))}
    path.write_text(json.dumps(doc))
    with pytest.raises(LlamaError, match="byte_fallback is true but the vocabulary has no <0x41>"):
        bpe.load(path)
    doc = spm_doc()
    doc["added_tokens"] += [
        {"id": 273, "content": " c", "normalized": True},
        {"id": 274, "content": "\u2581c", "normalized": True}]
    path.write_text(json.dumps(doc))
    with pytest.raises(LlamaError, match="normalizes to '▁▁c', empty or another token's"):
        bpe.load(path)
