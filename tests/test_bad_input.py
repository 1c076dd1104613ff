"""Bad model files, tokenizer files and flags: one clear line on stderr, a non-zero exit, never a
traceback, a crash or a giant allocation."""
import struct

import pytest

from tests.helpers import TESTDATA, assert_one_line_error, run_cli

TOK = TESTDATA / "tok512.bin"
GOOD = TESTDATA / "tiny_mha.bin"
HEADER = dict(dim=64, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, seq_len=96)


def v0_header(**changes):
    fields = {**HEADER, **changes}
    return struct.pack("7i", *fields.values())


def v1_header(version=1, **changes):
    fields = {**HEADER, **changes}
    head = struct.pack("Ii7iB", 0x616B3432, version, *fields.values(), 1)
    return head + b"\0" * (256 - len(head))


def weights_of(path):
    return path.read_bytes()[28:]


def write(tmp_path, data, name="model.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_MODELS = {
    "empty": lambda: b"",
    "short header": lambda: b"\x40\0\0\0" * 3,
    "truncated": lambda: GOOD.read_bytes()[:-4],
    "one byte too many": lambda: GOOD.read_bytes() + b"\0",
    "zero dim": lambda: v0_header(dim=0) + weights_of(GOOD),
    "negative layers": lambda: v0_header(n_layers=-2) + weights_of(GOOD),
    "zero vocab": lambda: v0_header(vocab_size=0) + weights_of(GOOD),
    "heads do not divide dim": lambda: v0_header(n_heads=5) + weights_of(GOOD),
    "kv heads do not divide heads": lambda: v0_header(n_kv_heads=3) + weights_of(GOOD),
    "odd head size": lambda: v0_header(dim=60, n_heads=4) + weights_of(GOOD),
    "huge dims": lambda: v0_header(dim=1 << 30, hidden_dim=1 << 30, n_heads=1, n_kv_heads=1) + weights_of(GOOD),
    "v1 seq_len 2^30": lambda: v1_header(seq_len=1 << 30) + (TESTDATA / "tiny_mha.v1.bin").read_bytes()[256:],
    "v1 truncated header": lambda: v1_header()[:100],
    "unknown version": lambda: v1_header(version=7) + b"\0" * 1024,
    "v2 file given to run": lambda: (TESTDATA / "tiny_mha_q80.bin").read_bytes(),
    "text file": lambda: b"this is not a model, just some text that is long enough\n" * 20,
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_file(tmp_path, case):
    path = write(tmp_path, BAD_MODELS[case]())
    err = assert_one_line_error(run_cli("run", [path, "-z", TOK, "-n", "4"]))
    assert str(path) in err


def test_missing_model_and_directory(tmp_path):
    err = assert_one_line_error(run_cli("run", [tmp_path / "nope.bin", "-z", TOK]))
    assert "nope.bin" in err
    assert_one_line_error(run_cli("run", [tmp_path, "-z", TOK]))


def test_huge_kv_cache_is_refused_with_the_field_named(tmp_path):
    path = write(tmp_path, v1_header(seq_len=1 << 30) + (TESTDATA / "tiny_mha.v1.bin").read_bytes()[256:])
    assert "seq_len" in assert_one_line_error(run_cli("run", [path, "-z", TOK]))


def tokenizer_bytes(pieces, max_len=None):
    out = struct.pack("I", max_len if max_len is not None else max(len(p) for p in pieces))
    for i, piece in enumerate(pieces):
        out += struct.pack("fi", -float(i), len(piece)) + piece
    return out


def tok512_pieces():
    data, pieces, offset = TOK.read_bytes(), [], 4
    while offset < len(data):
        _, length = struct.unpack_from("fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    return pieces


BAD_TOKENIZERS = {
    "missing": None,
    "empty": lambda: b"",
    "header only": lambda: struct.pack("I", 10),
    "too few pieces for the model": lambda: tokenizer_bytes(tok512_pieces()[:300]),
    "piece length past the end": lambda: struct.pack("I", 10) + struct.pack("fi", 0.0, 1 << 30) + b"abc",
    "negative piece length": lambda: struct.pack("I", 10) + struct.pack("fi", 0.0, -5) + b"abc",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZERS))
def test_bad_tokenizer(tmp_path, case):
    path = tmp_path / "tok.bin"
    if BAD_TOKENIZERS[case]:
        path.write_bytes(BAD_TOKENIZERS[case]())
    err = assert_one_line_error(run_cli("run", [GOOD, "-z", path, "-n", "4"]))
    assert "tok.bin" in err


def test_tokenizer_without_space_piece_does_not_crash(tmp_path):
    """run.c segfaults here (the dummy prefix lookup gives -1); we fall back to the byte token."""
    pieces = [b"<unk>" if p == b" " else p for p in tok512_pieces()]
    assert b" " not in pieces
    path = tmp_path / "nospace.bin"
    path.write_bytes(tokenizer_bytes(pieces))
    proc = run_cli("run", [GOOD, "-z", path, "-n", "20", "-t", "0", "-i", "a cat"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b" a cat")  # the byte token <0x20> decodes to the space


def test_understated_max_token_length_is_safe(tmp_path):
    """run.c sizes its merge buffer from the header's max_token_length and overflows it."""
    path = tmp_path / "tok.bin"
    path.write_bytes(tokenizer_bytes(tok512_pieces(), max_len=1))
    good = run_cli("run", [GOOD, "-z", TOK, "-n", "30", "-t", "0", "-i", "Once upon a time"])
    proc = run_cli("run", [GOOD, "-z", path, "-n", "30", "-t", "0", "-i", "Once upon a time"])
    assert proc.returncode == 0 and proc.stdout == good.stdout


BAD_FLAGS = {
    "-t abc": ["-t", "abc"],
    "-t nan": ["-t", "nan"],
    "-p empty": ["-p", ""],
    "-n 1.5": ["-n", "1.5"],
    "-n 2^40": ["-n", str(1 << 40)],
    "-s word": ["-s", "seed"],
    "missing value": ["-n"],
    "unknown flag": ["-q", "1"],
    "long flag": ["-temp", "1"],
    "not a flag": ["t", "1"],
    "bad mode": ["-m", "poem"],
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags(case):
    proc = run_cli("run", [GOOD, "-z", TOK, *BAD_FLAGS[case]])
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and proc.stdout == b""
    assert err.startswith("run: ") and "Usage:" in err  # what is wrong, then run.c's usage text


def test_flag_values_clamped_like_run_c():
    """run.c clamps out-of-range values rather than refusing them: negative temperature is
    greedy, a top-p outside [0, 1] is 0.9, negative steps mean the whole context."""
    greedy = run_cli("run", [GOOD, "-z", TOK, "-t", "0", "-n", "10"])
    clamped = run_cli("run", [GOOD, "-z", TOK, "-t", "-1", "-p", "7", "-n", "10"])
    assert clamped.returncode == 0 and clamped.stdout == greedy.stdout
    whole = run_cli("run", [GOOD, "-z", TOK, "-t", "0", "-n", "-3"])
    assert whole.stdout == run_cli("run", [GOOD, "-z", TOK, "-t", "0", "-n", "0"]).stdout
