"""llama2_cython/bpe.py against the libraries it stands in for: `tokenizers` (tokenizer.json files:
small ones trained here, SmolLM's and GPT-2's from ../shared/fixtures) and tiktoken (Meta's
Llama 3 tokenizer.model), id for id and character for character; and its refusals of files it
cannot read exactly."""
import base64
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2_cython import LlamaError, bpe
from tests.helpers import REPO, SHARED

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (Regex, Tokenizer, decoders, models, pre_tokenizers,  # noqa: E402
                        processors, trainers)

HF = SHARED / "hf_tokenizers"

CORPUS = [
    "",
    "Hello world",
    "Hello, world! How's it going? I'm fine; you're great, we'll see, they'd know, I've been.",
    "DON'T SHOUT, WE'LL HEAR. She'S, HE'LL, It'D, You'Re, I'Ve, 'M, 'll 'LL 'lL",
    "x'ſ Iſ x'ſx 'Sam 'LLama 'REe 'vex 'Dd 'Tt 'mM",
    "Crème brûlée, naïve café, Ångström, façade, jalapeño, Øresund, Łódź, ß ẞ",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Αλφαβητάρι",
    "我能吞下玻璃而不伤身体。日本語のテキスト、ひらがなとカタカナ。한국어 문장입니다.",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني. ١٢٣٤٥",
    "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती. १२३",
    "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ ๑๒๓",
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 👨🏿‍💻 ok",
    "def f(x):\n\tif x:\n\t\treturn x  # comment\n    else:\n        return {'a': [1, 2]}\n",
    "line one\r\nline two\r\n\r\nthree   \n\n\n  four\t\t\n   \n",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\n",
    " \t \r\n \u00a0\u3000x\u2028y\x85z\x1c\x1d q",
    "7 42 123 1234 12345 123456 1234567 12345678 123456789 1234567890",
    "abc123def 4x4 3.14159 v2.0.1 0xFF 1e10 -5 +7 ١٢٣ ៣៤ ½ ² Ⅻ",
    "special <|im_end|> in text <|im_start|>user\nhi<|im_end|>\n<|eot_id|> and <|begin_of_text|>x",
    "<|endoftext|><|endoftext|>a<|eot_id|><|eot_id|>",
    "lone combining marks: \u0301 a\u0301 \u0308\u0308 e\u0301\u0302 \u200d \ufe0f",
    "punctuation!!! ??? ... --- === ***...\n\n!!\r\n",
    "tabs\tand\ttabs\t\t\tand spaces    x",
    "mixed: hello世界мир123abcΣς",
    "new in Unicode 15/16: \U00031350\U00031351 \U000105c0 \U00011bf0\U00011bf1 x\U0001e4f0",
    "control \x00\x01\x04\x06\x7f chars",
]

FRAGMENTS = ["'s", "'T", "'ll", "'RE", "DON'T", " ", "  ", "\n", "\r\n", "\t", "\u00a0", "123",
             "4567", "é", "ſ", "😀", "👍🏽", "\u200d", "\u0301", "<|im_end|>", "<|eot_id|>",
             "<|endoftext|>", "<|bos|>", "hello", "Привет", "中文", "١٢٣", "!?", "..."]
# a bounded, repeatable stream of random strings: runs of fragments and any valid characters
RANDOM_TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS),
                                 st.characters(blacklist_categories=("Cs",)),
                                 st.characters(max_codepoint=0x7f)), max_size=40).map("".join)
RANDOM_SETTINGS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck))


def shared(*parts):
    path = HF.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} comes from ../shared/fixtures, which is absent")
    return path


def check_same(ours, encode_ref, decode_ref, texts):
    """ours.encode and decode give the reference's ids and text for every text (tokenizers'
    decode skips special tokens unless told not to; ours keeps them unless told to skip)."""
    for text in texts:
        ids = encode_ref(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == decode_ref(ids), text


def keep_specials(reference):
    return lambda ids: reference.decode(ids, skip_special_tokens=False)


# -- tokenizer.json files trained here -----------------------------------------------------------

def train_tiny(path, variant):
    """A small byte-level BPE trained by `tokenizers` on CORPUS, saved as path: "llama3" (Llama 3's
    Split + ByteLevel without regex, ignore_merges, BOS from TemplateProcessing) or "smollm"
    (Digits + ByteLevel with GPT-2's regex, no post-processor)."""
    tok = Tokenizer(models.BPE(ignore_merges=variant == "llama3"))
    if variant == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(bpe.LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|bos|>", "<|eot_id|>", "<|im_end|>"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    if variant == "llama3":
        # as Llama 3.1's tokenizer.json: ByteLevel (offsets only), then the BOS template
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])])
    tok.add_tokens(["hello world", "plain"])  # added, not special, normalized
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


@pytest.fixture(scope="module", params=["llama3", "smollm"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tokenizer.json"
    reference = train_tiny(path, request.param)
    return bpe.load(path), reference, request.param


def test_tiny_trained_tokenizers_match(tiny):
    ours, reference, variant = tiny
    texts = CORPUS + ["hello world plain hello worlds", "plainer<|bos|>plain"]
    for add in (True, False):
        for text in texts:
            assert ours.encode(text, add) == reference.encode(text, add_special_tokens=add).ids
    check_same(ours, lambda t: reference.encode(t).ids, keep_specials(reference), texts)
    assert ours.vocab_size == reference.get_vocab_size()
    assert ours.bos_id == (reference.token_to_id("<|bos|>") if variant == "llama3" else None)
    assert ours.encode("x")[0] == ours.bos_id if variant == "llama3" else ours.encode("") == []


def assert_round_trip(ours, reference, text):
    """text's ids are the reference's, and so is their decode."""
    ids = reference.encode(text).ids
    assert ours.encode(text) == ids
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)


@RANDOM_SETTINGS
@given(text=RANDOM_TEXT)
def test_tiny_random_strings(tiny, text):
    ours, reference, _ = tiny
    assert_round_trip(ours, reference, text)


def test_tiny_decode_random_ids(tiny):
    """Random ids make invalid UTF-8: our replacement characters are Rust's from_utf8_lossy."""
    ours, reference, _ = tiny
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 12))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                reference.decode(ids, skip_special_tokens=skip), ids
        assert b"".join(ours.piece(i) for i in ids).decode("utf-8", "replace") == ours.decode(ids)


def test_long_runs_take_the_heap_path(tiny):
    """Pre-tokens past _LONG_PIECE parts are merged by the heap, in the same order."""
    ours, reference, _ = tiny
    rng = random.Random(3)
    for text in ("=" * 3000, " " * 3000 + "x", "é" * 1000,
                 "".join(rng.choice("=-+*/#!?.,;:é😀") for _ in range(3000))):
        assert ours.encode(text) == reference.encode(text).ids


def test_unicode_classes_match_tokenizers():
    """\\p{L}, \\p{N} and \\s of our regexes against tokenizers' Oniguruma, at every code
    point."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    letters, numbers, spaces = bpe._unicode_classes()
    for ours, theirs in ((letters, r"\p{L}"), (numbers, r"\p{N}"), (spaces, r"\s")):
        split = pre_tokenizers.Split(Regex(f"[^{theirs}]+"), behavior="removed")
        expected = "".join(piece for piece, _ in split.pre_tokenize_str(every))
        found = "".join(bpe.re.findall(f"[{ours}]+", every))
        assert found == expected, theirs


def reference_splits(text):
    """tokenizers' pieces of text under GPT-2's and Llama 3's regexes and the Digits split."""
    out = {}
    for name, pattern in (("gpt2", bpe.GPT2_PATTERN), ("llama3", bpe.LLAMA3_PATTERN)):
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        out[name] = [piece for piece, _ in split.pre_tokenize_str(text)]
    out["digit"] = [p for p, _ in pre_tokenizers.Digits(True).pre_tokenize_str(text)]
    out["digits"] = [p for p, _ in pre_tokenizers.Digits(False).pre_tokenize_str(text)]
    return out


def our_splits(text):
    out = {name: bpe._regex(name).findall(text) for name in ("gpt2", "llama3")}
    for name in ("digit", "digits"):
        out[name] = [piece for piece in bpe._regex(name).split(text) if piece]
    return out


def test_pre_tokenizer_splits_match_tokenizers():
    """The pieces themselves, not only the ids (a different split can give the same ids)."""
    for text in CORPUS + ["x'\u017fx 'Sam 'LLama 'REe", "a\u1c89b \U00016d70\U00016d71\U00016d72z"]:
        assert our_splits(text) == reference_splits(text), text


@RANDOM_SETTINGS
@given(text=RANDOM_TEXT)
def test_pre_tokenizer_splits_random(text):
    assert our_splits(text) == reference_splits(text)


def test_encode_and_decode_refuse_bad_arguments(tiny):
    ours = tiny[0]
    for call, message in ((lambda: ours.encode(b"bytes"), "takes a str"),
                          (lambda: ours.encode("ok \ud800 no"),
                           "lone surrogate U\\+D800 at index 3"),
                          (lambda: ours.decode([1, ours.vocab_size]), "out of range"),
                          (lambda: ours.decode([-1]), "out of range"),
                          (lambda: ours.decode(["a"]), "not an integer"),
                          (lambda: ours.piece(1.5), "not an integer")):
        with pytest.raises(LlamaError, match=message):
            call()


# -- refused files -------------------------------------------------------------------------------

def good_doc():
    """A minimal tokenizer.json that loads: the 256 bytes, two merges, one special token."""
    vocab = {c: i for i, c in enumerate(bpe.BYTE_CHARS)}
    vocab["ab"] = 256
    vocab["abc"] = 257
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": 258, "content": "<|end|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": ["a b", "ab c"]},
    }


def test_minimal_doc_loads(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(good_doc()))
    tok = bpe.load(path)
    assert tok.encode("abc ab<|end|>") == [257, bpe.CHAR_BYTES["Ġ"], 256, 258]
    assert tok.decode([257, 258]) == "abc<|end|>"
    assert tok.decode([257, 258], skip_special_tokens=True) == "abc"
    assert tok.piece(bpe.CHAR_BYTES["Ġ"]) == b" " and tok.vocab_size == 259
    assert tok.bos_id is None and tok.eos_ids == ()


def test_suffix_template_and_missing_bytes_match_tokenizers(tmp_path):
    """Cases the real files do not have: a token after the text; bytes without a token, dropped
    or made <unk> (one per run with fuse_unk), with the bytes around them still merging."""
    texts = ["abc", "a\x04b", "a\x04\x04\x06bc", "\x04", "x <|end|> ab\x04c", ""]
    for unk, fuse in ((None, False), ("<unk>", False), ("<unk>", True)):
        doc = good_doc()
        tokens = [c for b, c in enumerate(bpe.BYTE_CHARS) if b not in (4, 6)]
        tokens += ["<unk>", "ab", "abc"]
        doc["model"]["vocab"] = {token: i for i, token in enumerate(tokens)}
        doc["model"]["merges"] = [["a", "b"], ["ab", "c"]]
        doc["model"]["unk_token"], doc["model"]["fuse_unk"] = unk, fuse
        doc["added_tokens"][0]["id"] = 257
        doc["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|end|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|end|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|end|>": {"id": "<|end|>", "ids": [257], "tokens": ["<|end|>"]}}}
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(doc))
        ours, reference = bpe.load(path), Tokenizer.from_file(str(path))
        for text in texts:
            assert ours.encode(text) == reference.encode(text).ids, (unk, fuse, text)
        assert ours.bos_id == 257 and ours.encode("") == [257, 257]


def set_path(doc, keys, value):
    for key in keys[:-1]:
        doc = doc[key]
    doc[keys[-1]] = value


BAD_DOCS = [
    (("model", "type"), "WordPiece", "model type 'WordPiece' is not supported"),
    (("model", "vocab"), [["a", 1]], "model.vocab is a list, expected object"),
    (("model", "merges"), "a b", "model.merges is a string, expected list"),
    (("model", "merges"), ["a b c"], "model.merges\\[0\\] = 'a b c' is not a pair"),
    (("model", "merges"), [["a", 7]], "is not a pair of tokens"),
    (("model", "merges"), ["x yz"], "'yz' is not in the vocabulary"),
    (("model", "dropout"), 0.1, "BPE dropout is random"),
    (("model", "dropout"), [0.1], "model.dropout is a list, expected number or null"),
    (("model", "byte_fallback"), True, "model.byte_fallback = true is not supported"),
    (("model", "ignore_merges"), "yes", "model.ignore_merges is a string, expected boolean"),
    (("model", "continuing_subword_prefix"), "##", "continuing_subword_prefix is set"),
    (("model", "end_of_word_suffix"), "</w>", "end_of_word_suffix is set"),
    (("model", "unk_token"), "<unk>", "unk_token '<unk>' is not in the vocabulary"),
    (("model", "vocab", "a"), "65", "model.vocab\\['a'\\] is a string, expected number"),
    (("model", "vocab", "ab"), 300, "are not 0..257 without gaps"),
    (("normalizer",), {"type": "NFC"}, "normalizer is not null"),
    (("truncation",), {"max_length": 5}, "truncation is not null"),
    (("pre_tokenizer",), None, "pre_tokenizer is null"),
    (("pre_tokenizer",), {"type": "Metaspace"}, "pre-tokenizer 'Metaspace' is not supported"),
    (("pre_tokenizer",), {"type": ["ByteLevel"]}, "pre_tokenizer.type is a list, expected string"),
    (("pre_tokenizer", "add_prefix_space"), True, "add_prefix_space = true is not supported"),
    (("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [{"type": "Digits"}]},
     "does not end in ByteLevel"),
    (("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "use_regex": False}]}, "is not one we implement"),
    (("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": bpe.LLAMA3_PATTERN}, "behavior": "Removed"},
        {"type": "ByteLevel", "use_regex": False}]}, "only \"Isolated\" is supported"),
    (("pre_tokenizer",), {"type": "Sequence", "pretokenizers": "ByteLevel"},
     "pre_tokenizer.pretokenizers is a string, expected list"),
    (("decoder",), {"type": "WordPiece"}, "decoder 'WordPiece' is not supported"),
    (("decoder",), None, "decoder None is not supported"),
    (("post_processor",), {"type": "RobertaProcessing"}, "'RobertaProcessing' is not supported"),
    (("post_processor",), {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "B"}}],
                           "special_tokens": {}}, "only one sequence, \"A\", is supported"),
    (("post_processor",), {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}], "special_tokens": {}},
     "special token '<s>' is not in special_tokens"),
    (("post_processor",), {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
        "special_tokens": {"<s>": {"ids": [9999]}}}, "not an id below 259"),
    (("added_tokens",), {"id": 258}, "added_tokens is a object, expected list"),
    (("added_tokens", 0, "id"), "258", "added_tokens\\[0\\].id is a string, expected number"),
    (("added_tokens", 0, "id"), 300, "has id 300 where tokenizers would give 258"),
    (("added_tokens", 0, "lstrip"), True, "added_tokens\\[0\\].lstrip = true is not supported"),
    (("added_tokens", 0, "single_word"), True, "single_word = true is not supported"),
    (("added_tokens", 0, "content"), "", "empty or repeated content"),
]


@pytest.mark.parametrize("keys,value,message", BAD_DOCS, ids=[f"{'.'.join(map(str, k))}={v!r}"[:60]
                                                               for k, v, _ in BAD_DOCS])
def test_bad_tokenizer_json_is_one_line(tmp_path, keys, value, message):
    assert_refused_in_one_line(good_doc(), keys, value, message, tmp_path)


def assert_refused_in_one_line(doc, keys, value, message, tmp_path):
    """doc with the value at keys, written as a tokenizer.json: bpe.load refuses it in one line
    naming the file and saying message."""
    set_path(doc, keys, value)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LlamaError, match=message) as info:
        bpe.load(path)
    text = str(info.value)
    assert text.startswith(str(path) + ": ") and "\n" not in text


TIKTOKEN_LINES = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(256)]
BAD_TIKTOKEN = [
    (TIKTOKEN_LINES[:10] + ["SGVsbG8="], "line 11 is not \"base64-token rank\""),
    (TIKTOKEN_LINES[:10] + ["SGVsb 10"], "line 11 is not \"base64-token rank\""),
    (TIKTOKEN_LINES[:10] + ["SGVsbG8= 1x"], "line 11 is not"),
    (TIKTOKEN_LINES[:10] + ["SGVsbG8= 12"],
     "line 11: rank 12 of b'Hello' is not the line's index 10"),
    (TIKTOKEN_LINES[:10] + [TIKTOKEN_LINES[3].split()[0] + " 10"],
     "the token is empty or repeated"),
    (TIKTOKEN_LINES[:200], "no rank for the single byte 200"),
    (["\x00\x01binary sentencepiece"], "a sentencepiece tokenizer.model goes through"),
]


def test_sentencepiece_model_is_not_read_as_tiktoken(tmp_path):
    """A Llama 2 folder's tokenizer.model is a sentencepiece protobuf (here the demo's): binary."""
    (tmp_path / "tokenizer.model").write_bytes((REPO / "demo" / "stories_tok.model").read_bytes())
    with pytest.raises(LlamaError, match="is not ASCII: not a tiktoken ranks file") as info:
        bpe.load(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("lines,message", BAD_TIKTOKEN)
def test_bad_tiktoken_file_is_one_line(tmp_path, lines, message):
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LlamaError, match=message) as info:
        bpe.load(path)
    assert str(info.value).startswith(str(path) + ": ") and "\n" not in str(info.value)


def test_bad_files_and_configs_are_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b'{"model": ')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    good = tmp_path / "good"
    good.mkdir()
    (good / "tokenizer.json").write_text(json.dumps(good_doc()))
    cases = [(tmp_path / "tokenizer.json", None, "not JSON"), (tmp_path, None, "not JSON"),
             (tmp_path / "list.json", None, "not a JSON object but a list"),
             (tmp_path / "latin1.json", None, "not UTF-8 text"),
             (tmp_path / "deep.json", None, "nested too deeply"),
             (tmp_path / "empty", None, "holds neither tokenizer.json nor tokenizer.model"),
             (tmp_path / "missing.json", None, "no such file"),
             (good, tmp_path / "nothing", "no such file or folder")]
    for n, (name, content, message) in enumerate([
            ("config.json", {"eos_token_id": "2"}, "eos_token_id is a string, expected number"),
            ("generation_config.json", {"eos_token_id": [1, 999]}, "999 is not an id below 259"),
            ("tokenizer_config.json", {"eos_token": ["<|end|>"]}, "eos_token is a list"),
            ("tokenizer_config.json", {"eos_token": "</s>"}, "eos_token '</s>' is not a token")]):
        folder = tmp_path / f"config{n}"
        folder.mkdir()
        (folder / name).write_text(json.dumps(content))
        cases.append((good / "tokenizer.json", folder, message))
    for path, config, message in cases:
        with pytest.raises(LlamaError, match=message) as info:
            bpe.load(path, config=config)
        assert "\n" not in str(info.value)


def test_eos_from_configs(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(good_doc()))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|end|>"}}))
    assert bpe.load(tmp_path).eos_ids == (258,)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [256, 258]}))
    assert bpe.load(tmp_path).eos_ids == (256, 258)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 257}))
    assert bpe.load(tmp_path / "tokenizer.json").eos_ids == (257,)


# -- the real files in ../shared/fixtures --------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    folder = shared("smollm")
    return bpe.load(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_smollm_matches_tokenizers(smollm):
    ours, reference = smollm
    assert ours.encode("Hello world") == [19556, 905]
    assert ours.encode("<|im_start|>user\nHi<|im_end|>\n") == [1, 4093, 198, 26843, 2, 198]
    assert (ours.vocab_size, ours.bos_id, ours.eos_ids) == (49152, None, (2,))
    for add in (True, False):
        for text in CORPUS:
            assert ours.encode(text, add) == reference.encode(text, add_special_tokens=add).ids
    check_same(ours, lambda t: reference.encode(t).ids, keep_specials(reference), CORPUS)
    rng = random.Random(11)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 10))] + [2]
        assert ours.decode(ids, True) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)


@RANDOM_SETTINGS
@given(text=RANDOM_TEXT)
def test_smollm_random_strings(smollm, text):
    ours, reference = smollm
    assert_round_trip(ours, reference, text)


def test_gpt2_matches_tokenizers(tmp_path):
    """OpenAI's encoder.json and vocab.bpe, read by tokenizers and saved as a tokenizer.json."""
    reference = Tokenizer(models.BPE.from_file(str(shared("gpt2", "encoder.json")),
                                               str(shared("gpt2", "vocab.bpe"))))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.save(str(tmp_path / "tokenizer.json"))
    ours = bpe.load(tmp_path)
    assert ours.encode("Hello world") == [15496, 995] and ours.encode(" the") == [262]
    assert ours.vocab_size == 50257
    check_same(ours, lambda t: reference.encode(t).ids, keep_specials(reference), CORPUS)


def tiktoken_reference(ours):
    """tiktoken with Meta's ranks, Llama 3's regex and the special tokens ours read."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for line in shared("llama3", "tokenizer.model").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    specials = {ours.piece(i).decode(): i for i in range(len(ranks), ours.vocab_size)}
    return tiktoken.Encoding("llama3", pat_str=bpe.LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


@pytest.fixture(scope="module")
def llama3_ours():
    config = shared("llama3", "Llama-3.2-1B-Instruct", "tokenizer_config.json")
    return bpe.load(shared("llama3", "tokenizer.model"), config=config)


@pytest.fixture(scope="module")
def llama3(llama3_ours):
    return llama3_ours, tiktoken_reference(llama3_ours)


def test_llama3_reference_ids(llama3_ours):
    """The fixture README's ids (found with tiktoken and Llama 3's regex)."""
    ours = llama3_ours
    assert ours.encode("Hello, world!") == [128000, 9906, 11, 1917, 0]
    assert ours.encode(" the", add_special_tokens=False) == [279]
    assert ours.encode("Once upon a time") == [128000, 12805, 5304, 264, 892]
    assert ours.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    assert (ours.vocab_size, ours.bos_id, ours.eos_ids) == (128256, 128000, (128009,))


def test_llama3_matches_tiktoken(llama3):
    ours, reference = llama3
    check_same(ours, lambda t: [128000] + reference.encode(t, allowed_special="all"),
               reference.decode, CORPUS)
    for text in CORPUS:
        assert ours.encode(text, False) == reference.encode(text, allowed_special="all")
    ids = ours.encode("a<|eot_id|>b<|reserved_special_token_247|>")
    assert ours.decode(ids, skip_special_tokens=True) == "ab"
    assert ours.piece(128009) == b"<|eot_id|>"


def test_llama3_chat_prompt(llama3_ours):
    """The fixture README's rendered Llama 3.2 prompt: 41 tokens."""
    ours = llama3_ours
    prompt = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
              "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHello world<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = ours.encode(prompt, add_special_tokens=False)
    assert len(ids) == 41 and ids[:5] == [128000, 128006, 9125, 128007, 271]
    assert ids[-9:] == [128007, 271, 9906, 1917, 128009, 128006, 78191, 128007, 271]
    assert ours.decode(ids) == prompt


@RANDOM_SETTINGS
@given(text=RANDOM_TEXT)
def test_llama3_random_strings(llama3, text):
    ours, reference = llama3
    ids = reference.encode(text, allowed_special="all")
    assert ours.encode(text, add_special_tokens=False) == ids
    assert ours.decode(ids) == reference.decode(ids)


def test_llama3_names_and_eos_by_config(llama3_ours):
    instruct = llama3_ours
    bare = bpe.load(shared("llama3", "tokenizer.model"))  # no config beside it: 3.1+ names
    assert [bare.piece(i) for i in range(128000, 128256)] == \
        [instruct.piece(i) for i in range(128000, 128256)]
    assert bare.eos_ids == (128001, 128009) and bare.bos_id == 128000
    base = bpe.load(shared("llama3", "tokenizer.model"), config=shared("llama3", "Llama-3.2-1B"))
    assert base.eos_ids == (128001,)
    v30 = bpe.load(shared("llama3", "tokenizer.model"),
                   config=shared("llama3", "Meta-Llama-3-8B-Instruct", "tokenizer_config.json"))
    assert v30.piece(128004) == b"<|reserved_special_token_2|>"
    assert len(v30.encode("<|finetune_right_pad_id|>", False)) > 1
    assert instruct.encode("<|finetune_right_pad_id|>", False) == [128004]


def test_llama3_as_hugging_face_converts_it(tmp_path, llama3_ours):
    """transformers' conversion of tokenizer.model to a tokenizer.json (how HF's Llama 3 files were
    made: every split of a token a merge, ignore_merges): tokenizers with it, ours with it and
    ours with the tiktoken file give the same ids."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer").TikTokenConverter
    specials = [llama3_ours.piece(i).decode() for i in range(128000, 128256)]
    reference = converter(vocab_file=str(shared("llama3", "tokenizer.model")),
                          extra_special_tokens=specials).converted()
    reference.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
    reference.save(str(tmp_path / "tokenizer.json"))
    ours = bpe.load(tmp_path / "tokenizer.json")
    assert (ours.vocab_size, ours.bos_id) == (128256, 128000)
    check_same(ours, lambda t: reference.encode(t).ids, keep_specials(reference), CORPUS)
    for text in CORPUS:
        assert ours.encode(text) == llama3_ours.encode(text)
