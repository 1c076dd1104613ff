"""Issue 12, long inputs: encode merges in O(n log n) (a heap of pairs on a linked list) and must
give exactly the tokens of run.c's quadratic loop, written out plainly here as the reference:
checked on many random strings, with both tokenizers and with made-up vocabularies full of tied
and extreme scores. A 1 MB prompt is answered, and Ctrl-C stops a long encode at once."""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo import corpus
import run
import runq
from tests.helpers import REPO, SHARED, TESTDATA

MODULES = [run, runq]
ENCODE = json.loads((TESTDATA / "encode_golden.json").read_text())


class QuadraticEncoder:
    """run.c's encode() as it is written: code points (or their bytes + 3) after the dummy prefix,
    then the best pair merged, one merge per scan of the whole sequence."""

    def __init__(self, path, vocab_size):
        data = open(path, "rb").read()
        offset = 4
        self.pieces, self.scores = [], []
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, offset)
            piece = data[offset + 8:offset + 8 + length]
            offset += 8 + length
            self.pieces.append(piece.split(b"\0")[0])  # C strings
            self.scores.append(np.float32(score))
        self.ids = {}
        for i, piece in enumerate(self.pieces):
            self.ids.setdefault(piece, i)

    def code_point(self, data):
        if data in self.ids:
            return [self.ids[data]]
        return [byte + 3 for byte in data]  # byte fallback

    def encode(self, text, bos=True, eos=False):
        text = text.split(b"\0")[0]
        tokens = [1] if bos else []
        if text:
            tokens += self.code_point(b" ")
        code_point = bytearray()
        for i, byte in enumerate(text):
            if byte & 0xC0 != 0x80:
                code_point.clear()
            code_point.append(byte)
            following = text[i + 1] if i + 1 < len(text) else 0
            if following & 0xC0 == 0x80 and len(code_point) < 4:
                continue
            tokens += self.code_point(bytes(code_point))
            code_point.clear()
        vocab_size = len(self.pieces)
        while True:
            best_score, best_id, best_idx = np.float32(-1e10), -1, -1
            for i in range(len(tokens) - 1):
                if tokens[i] >= vocab_size or tokens[i + 1] >= vocab_size:
                    continue
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]], -1)
                if merged != -1 and self.scores[merged] > best_score:
                    best_score, best_id, best_idx = self.scores[merged], merged, i
            if best_idx == -1:
                break
            tokens[best_idx:best_idx + 2] = [best_id]
        if eos:
            tokens.append(2)
        return tokens


TOKENIZERS = {"tok512": (TESTDATA / "tok512.bin", 512),
              "llama32000": (SHARED / "tokenizer.bin", 32000)}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizers(request):
    """(reference, run's Tokenizer, runq's Tokenizer) for one vocabulary."""
    path, vocab_size = TOKENIZERS[request.param]
    if not path.exists():
        pytest.skip(f"{path.name} comes from ../shared/fixtures, which is absent")
    return (QuadraticEncoder(path, vocab_size),
            *(module.Tokenizer(str(path), vocab_size) for module in MODULES))


def test_reference_gives_the_goldens(tokenizers):
    """The plain loop above is run.c's: it gives the token ids run.c printed."""
    reference = tokenizers[0]
    vocab = next(v for v in ENCODE.values() if v["vocab_size"] == len(reference.pieces))
    for case in vocab["cases"]:
        ids = reference.encode(case["text"].encode("utf-8", "surrogateescape"), bool(case["bos"]),
                               bool(case["eos"]))
        assert ids == case["ids"], case["text"]


WORDS = sorted(corpus.vocabulary(0, 200)) + ["the", "The", "  ", "\n", "é", "ünïcödé", "日本語",
                                               "🦙", "aaaa", "abab", "000", "\t"]
no_nul = st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"\x01"))
words = st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join).map(str.encode)
glued = st.lists(st.sampled_from(WORDS), max_size=60).map("".join).map(str.encode)
repeats = st.text(alphabet="ab e", max_size=120).map(str.encode)  # many tied pairs
unicode = st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")) \
    .map(lambda b: b.replace(b"\0", b"\x01"))
texts = st.one_of(no_nul, words, glued, repeats, unicode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, bos=st.booleans(), eos=st.booleans())
def test_same_tokens_as_the_quadratic_loop(tokenizers, text, bos, eos):
    reference, *ported = tokenizers
    expected = reference.encode(text, bos, eos)
    for tokenizer in ported:
        assert tokenizer.encode(text, bos, eos) == expected


def test_long_text_same_tokens_as_the_quadratic_loop(tokenizers):
    reference, *ported = tokenizers
    text = " ".join(corpus.stories(3, 12)).encode()[:3000] + " 🦙 ééé aaaaaaa".encode()
    expected = reference.encode(text)
    for tokenizer in ported:
        assert tokenizer.encode(text) == expected


def write_tokenizer(path, pieces, scores):
    with open(path, "wb") as fh:
        fh.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores):
            fh.write(struct.pack("<fi", score, len(piece)) + piece)


SCORES = [0.0, 0.0, 1.0, -1.0, 2.5, -1e10, -9.9e9, -2e10, float("inf"), float("-inf")]


@settings(max_examples=300, deadline=None)
@given(merges=st.lists(st.text(alphabet="ab c", min_size=2, max_size=5), unique=True, max_size=25),
       score_picks=st.lists(st.sampled_from(SCORES), min_size=25, max_size=25),
       text=st.text(alphabet="ab cd", max_size=60).map(str.encode))
def test_made_up_vocabularies_with_tied_and_extreme_scores(merges, score_picks, text):
    """Every tie must break leftmost, and scores at or below -1e10 never merge, as in run.c.
    The single characters are pieces (d is not: it falls back to its byte token)."""
    bytes_pieces = [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + bytes_pieces + [b"a", b"b", b"c", b" "] \
        + [m.encode() for m in merges]
    scores = [0.0] * 263 + score_picks[:len(merges)]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tok.bin")
        write_tokenizer(path, pieces, scores)
        expected = QuadraticEncoder(path, len(pieces)).encode(text)
        for module in MODULES:
            assert module.Tokenizer(path, len(pieces)).encode(text) == expected


# ---------------------------------------------------------------------------- long prompts

def test_megabyte_chat_line_is_answered(tmp_path):
    """A 1 MB user line (hours for the quadratic loop) is encoded and answered within the
    timeout; the prompt then runs until the context is full, as in run.c."""
    line = (" ".join(corpus.stories(5, 4000)).encode() * 2)[:1 << 20]
    for module, model in (("run", "tiny_mha.bin"), ("runq", "tiny_mha_q80.bin")):
        proc = subprocess.run([sys.executable, "-m", module, TESTDATA / model, "-z",
                               TESTDATA / "tok512.bin", "-m", "chat", "-y", ""],
                              input=line + b"\n", cwd=REPO, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(b"User: Assistant: ")


class Alarm(Exception):
    pass


def raise_alarm(signum, frame):
    raise Alarm


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_signal_stops_a_long_encode(module):
    """A signal handler runs while encode works, not after it: the alarm goes off 10 ms into a
    4 MB encode (which takes far longer) and encode raises; had it only been seen after encode
    returned, `ids` would have been assigned."""
    tokenizer = module.Tokenizer(str(TESTDATA / "tok512.bin"), 512)
    text = (" ".join(corpus.stories(9, 2000)).encode() * 16)[:4 << 20]
    ids = None
    previous = signal.signal(signal.SIGALRM, raise_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        ids = tokenizer.encode(text)
        signal.pause()  # not reached when encode is interrupted
    except Alarm:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert ids is None
    assert tokenizer.encode(b"after") == QuadraticEncoder(TESTDATA / "tok512.bin", 512) \
        .encode(b"after")


def test_ctrl_c_during_a_long_chat_line_exits_130():
    line = (" ".join(corpus.stories(5, 8000)).encode() * 2)[:2 << 20]
    proc = subprocess.Popen([sys.executable, "-m", "run", TESTDATA / "tiny_mha.bin", "-z",
                             TESTDATA / "tok512.bin", "-m", "chat", "-y", ""], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(6) == b"User: "
    proc.stdin.write(line + b"\n")
    proc.stdin.flush()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines() == ["run: interrupted"]
