"""Issue 5, hardening: pipes and Ctrl-C end quietly, prompts of any length and any bytes, loaders
that check every header number before trusting it, and memory that stays flat over long runs."""
import gc
import itertools
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from llama2_cython import export
import run
import runq
from run import _run
from runq import _runq
from tests.helpers import REPO, TESTDATA, run_cli
from llama2_cython import formats

TOK = TESTDATA / "tok512.bin"
MODELS = {"run": TESTDATA / "tiny_mha.bin", "runq": TESTDATA / "tiny_mha_q80.bin"}
MODULES = {"run": _run, "runq": _runq}  # the extensions: all their names
# big enough that generating its whole context takes seconds: Ctrl-C must land mid-generation
BIG = dict(dim=256, hidden_dim=768, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=512, seq_len=4096)


def popen(module, args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def stderr_lines(data):
    return [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    weights = export.random_model(BIG, seed=1, shared=False)
    # BOS (1) ends a generation: its logit is 0 while the others spread over +-50, so it never
    # comes and the whole context is generated
    weights["wcls"][1] = 0.0
    weights["rms_final_weight"][:] = 1.0
    export.write_v1(folder / "big.bin", BIG, weights, False)
    export.write_v2(folder / "big_q80.bin", BIG, weights, False)
    return {"run": folder / "big.bin", "runq": folder / "big_q80.bin"}


# ----------------------------------------------------------------------------
# 1. terminal and shell

def closed_pipe_run(argv):
    """Runs argv with stdout a pipe whose reader has already gone (`| head` that exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(argv, cwd=REPO, stdout=w, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(w)
    return proc


@pytest.mark.parametrize("module", ["run", "runq"])
def test_closed_pipe_ends_quietly(module):
    """A reader that went away: status 141 as a C program killed by SIGPIPE, nothing on stderr
    (no BrokenPipe traceback, no 'Exception ignored' from the flush at exit)."""
    for mode in (["-n", "0"], ["-m", "chat", "-i", "hi", "-y", ""]):
        proc = closed_pipe_run([sys.executable, "-m", module, MODELS[module], "-z", TOK, *mode])
        assert proc.returncode == 141 and proc.stderr == b"", proc.stderr


@pytest.mark.parametrize("module", ["run", "runq"])
def test_head_in_a_shell_pipeline(module, big_models):
    """`python -m run m.bin | head -c 100` prints 100 bytes and no message."""
    cmd = f"{sys.executable} -m {module} {big_models[module]} -z {TOK} -n 0 | head -c 100"
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout) == 100
    assert proc.stderr == b"", proc.stderr


def test_run_cuda_without_gpu_is_one_line_even_into_a_closed_pipe():
    proc = closed_pipe_run([sys.executable, "run_cuda.py", MODELS["run"], "-z", TOK])
    if proc.returncode == 0:
        pytest.skip("a GPU is here")
    assert proc.returncode in (1, 141), proc.stderr
    assert len(stderr_lines(proc.stderr)) <= 1 and b"Traceback" not in proc.stderr


def interrupt(proc, wait_for):
    """Reads stdout until wait_for shows, sends SIGINT; returns (stderr, seconds to exit)."""
    seen = b""
    while wait_for not in seen:
        chunk = proc.stdout.read1(4096)
        assert chunk, f"ended before {wait_for!r}: {proc.stderr.read()!r}"
        seen += chunk
    time.sleep(0.5)  # a person's Ctrl-C comes after the prompt is shown
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return err, time.monotonic() - start


@pytest.mark.parametrize("module", ["run", "runq"])
def test_ctrl_c_mid_generation(module, big_models):
    """SIGINT while the forward pass runs (nogil C): stops within a token, status 130, one line."""
    proc = popen(module, [big_models[module], "-z", TOK, "-n", "0", "-t", "1", "-s", "7"])
    err, seconds = interrupt(proc, b" ")
    assert proc.returncode == 130, err
    assert stderr_lines(err) == [f"{module}: interrupted"]
    assert seconds < 3  # the whole 4096-token context takes far longer


@pytest.mark.parametrize("module", ["run", "runq"])
def test_ctrl_c_in_chat_waiting_for_input(module):
    proc = popen(module, [MODELS[module], "-z", TOK, "-m", "chat"], stdin=subprocess.PIPE)
    err, seconds = interrupt(proc, b"Enter system prompt (optional): ")
    assert proc.returncode == 130 and stderr_lines(err) == [f"{module}: interrupted"], err


@pytest.mark.parametrize("module", ["run", "runq"])
def test_chat_ends_at_end_of_input(module):
    proc = run_cli(module, [MODELS[module], "-z", TOK, "-m", "chat", "-s", "1"], stdin=b"sys\nhello\n")
    assert proc.returncode == 0 and proc.stderr == b""
    # the tiny context (96) may fill up in the first answer: then there is only one "User: "
    assert proc.stdout.count(b"User: ") >= 1 and proc.stdout.endswith(b"\n")
    proc = run_cli(module, [MODELS[module], "-z", TOK, "-m", "chat"], stdin=b"")
    assert proc.returncode == 0 and proc.stderr == b""


def prose(n):
    words = "once upon a time there was a little girl named Lily who loved to play outside".split()
    return " ".join(words[i % len(words)] for i in range(n))


@pytest.mark.parametrize("module", ["run", "runq"])
def test_long_prompts(module):
    """No fixed buffers: a 10 kB prompt (far past seq_len = 96 tokens: cut off by steps, as in
    run.c) and a 3 kB chat line and system prompt."""
    prompt = prose(2000)[:10000]
    proc = run_cli(module, [MODELS[module], "-z", TOK, "-n", "0", "-i", prompt])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt[:100].encode())  # the prompt is echoed, then cut off
    line = prose(600)[:3000].encode()
    proc = run_cli(module, [MODELS[module], "-z", TOK, "-m", "chat", "-n", "0", "-y", line.decode()],
                   stdin=line + b"\n" + line + b"\n")
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("module", ["run", "runq"])
def test_non_utf8_prompt_is_raw_bytes(module):
    """argv bytes that are not UTF-8 reach the tokenizer as they are, like run.c's char*."""
    raw = b"a\xff\xfe b"
    argv = [sys.executable.encode(), b"-m", module.encode(), bytes(MODELS[module]), b"-z", bytes(TOK),
            b"-n", b"12", b"-t", b"0", b"-i", raw]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tokens = MODULES[module].Tokenizer(str(TOK), 512).encode(raw)
    # byte fallback, no replacement characters
    assert any(tokens[i:i + 2] == [0xFF + 3, 0xFE + 3] for i in range(len(tokens)))
    # the same bytes through the chat line (stdin) and the system prompt (argv)
    argv = argv[:6] + [b"-m", b"chat", b"-y", raw]
    proc = subprocess.run(argv, cwd=REPO, input=raw + b"\n", capture_output=True, timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------
# 2. validation before trust

def v1_like(path, **changes):
    """The bytes of a v1/v2 file with some header ints changed."""
    data = bytearray(path.read_bytes())
    for name, value in changes.items():
        struct.pack_into("i", data, 8 + 4 * formats.CONFIG_FIELDS.index(name), value)
    return bytes(data)


@pytest.mark.parametrize("module", ["run", "runq"])
def test_seq_len_over_the_limit_is_named(tmp_path, module):
    source = TESTDATA / ("tiny_mha.v1.bin" if module == "run" else "tiny_mha_q80.bin")
    for seq_len in (formats.MAX_SEQ_LEN + 1, 2**31 - 1):
        path = tmp_path / "m.bin"
        path.write_bytes(v1_like(source, seq_len=seq_len))
        with pytest.raises(MODULES[module].LlamaError, match=r"m\.bin: bad header: seq_len = \d+ is over"):
            MODULES[module].Transformer(str(path))
    path.write_bytes(v1_like(source, seq_len=formats.MAX_SEQ_LEN))  # at the limit: fine
    MODULES[module].Transformer(str(path))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("module", ["run", "runq"])
def test_huge_vocab_with_a_small_tokenizer_is_refused_before_allocating(module):
    mod = MODULES[module]
    before = rss_bytes()
    for vocab_size in (513 * 1000, 2**31 - 1):
        with pytest.raises(mod.LlamaError, match=r"tok512\.bin: file is \d+ bytes, too small"):
            mod.Tokenizer(str(TOK), vocab_size)
    assert rss_bytes() - before < 8 << 20


@pytest.mark.parametrize("module", ["run", "runq"])
def test_absurd_max_token_length_is_capped(tmp_path, module):
    mod = MODULES[module]
    good = mod.Tokenizer(str(TOK), 512)
    for header in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF):
        path = tmp_path / "tok.bin"
        path.write_bytes(struct.pack("I", header) + TOK.read_bytes()[4:])
        tok = mod.Tokenizer(str(path), 512)
        assert tok.max_token_length == max(len(tok.piece(i)) for i in range(512))
        assert tok.encode("Once upon a time, a big dog") == good.encode("Once upon a time, a big dog")


# ----------------------------------------------------------------------------
# 4. long runs

def test_rss_flat_over_long_generation():
    model = run.Model(str(TESTDATA / "tiny_mha.bin"), str(TOK))
    for text in model.generate("Once", steps=0, seed=1):  # warm-up
        pass
    before, pieces = rss_bytes(), 0
    for seed in range(2, 32):  # 30 runs of the whole 96-token context: ~2800 tokens
        pieces += sum(1 for _ in model.generate("Once upon a time", steps=0, seed=seed))
    assert pieces > 1000
    assert rss_bytes() - before < 3 << 20


@pytest.mark.parametrize("module", ["run", "runq"])
def test_objects_created_and_dropped_do_not_leak(module):
    mod = MODULES[module]

    def cycle(n):
        for i in range(n):
            t = mod.Transformer(str(MODELS[module]))
            tok = mod.Tokenizer(str(TOK), 512)
            s = mod.Sampler(512, 1.0, 0.9, i + 1)
            t.forward(tok.encode("hi")[1], 0)
            del t, tok, s
        gc.collect()

    cycle(5)  # warm-up
    before = rss_bytes()
    cycle(50)
    assert rss_bytes() - before < 3 << 20


def greedy_tokens(transformer, n):
    token, out = 1, []
    for pos in range(n):
        token = int(np.argmax(transformer.forward(token, pos)))
        out.append(token)
    return out


@pytest.mark.parametrize("module", ["run", "runq"])
def test_two_models_in_one_process_are_independent(module):
    mod = MODULES[module]
    suffix = ".bin" if module == "run" else "_q80.bin"
    alone = {name: greedy_tokens(mod.Transformer(str(TESTDATA / (name + suffix))), 40)
             for name in ("tiny_mha", "tiny_gqa")}
    a = mod.Transformer(str(TESTDATA / ("tiny_mha" + suffix)))
    b = mod.Transformer(str(TESTDATA / ("tiny_gqa" + suffix)))
    ta = tb = 1
    got = {"tiny_mha": [], "tiny_gqa": []}
    for pos in range(40):  # interleaved, token by token
        ta = int(np.argmax(a.forward(ta, pos)))
        tb = int(np.argmax(b.forward(tb, pos)))
        got["tiny_mha"].append(ta)
        got["tiny_gqa"].append(tb)
    assert got == alone
    if module == "run":
        ma = run.Model(str(TESTDATA / "tiny_mha.bin"), str(TOK))
        mb = run.Model(str(TESTDATA / "tiny_gqa.bin"), str(TOK))
        first = ["".join(m.generate("Once", steps=40, seed=3)) for m in (ma, mb)]
        ga, gb = ma.generate("Once", steps=40, seed=3), mb.generate("Once", steps=40, seed=3)
        mixed = ["", ""]
        for pa, pb in itertools.zip_longest(ga, gb, fillvalue=""):
            mixed[0] += pa
            mixed[1] += pb
        assert mixed == first


@pytest.mark.parametrize("module", ["run", "runq"])
def test_ctrl_c_in_chat_waiting_for_user(module):
    proc = popen(module, [MODELS[module], "-z", TOK, "-m", "chat", "-y", "be brief"],
                 stdin=subprocess.PIPE)
    err, seconds = interrupt(proc, b"User: ")
    assert proc.returncode == 130 and stderr_lines(err) == [f"{module}: interrupted"], (err, proc.stdout)
