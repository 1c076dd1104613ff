"""What main and the Python API do at the edges (issue 12, class 4 and 5): write errors that are
not a closed pipe, a closed stdin in chat, and API arguments the command line would refuse; and the
one error type that run, runq and the tools share."""
import math
import struct
import subprocess
import sys

import pytest

from llama2_cython import export
import llama2_cython
import run
import runq
from tests.helpers import REPO, TESTDATA

TOK = TESTDATA / "tok512.bin"
MODELS = {"run": TESTDATA / "tiny_mha.bin", "runq": TESTDATA / "tiny_mha_q80.bin"}
PACKAGES = {"run": run, "runq": runq}


def shell(module, redirect, *args):
    """`python -m module model -z tok ... REDIRECT` through the shell, for its redirections."""
    command = [sys.executable, "-m", module, str(MODELS[module]), "-z", str(TOK), *args]
    return subprocess.run(" ".join(map(repr, command)) + " " + redirect, shell=True, cwd=REPO,
                          capture_output=True, timeout=60)


@pytest.mark.parametrize("module", ["run", "runq"])
@pytest.mark.parametrize("redirect, reason", [(">/dev/full", "No space left on device"),
                                              (">&-", "Bad file descriptor")])
def test_write_error_is_one_line_not_a_quiet_pipe(module, redirect, reason):
    proc = subprocess.run(f"{sys.executable} -m {module} {MODELS[module]} -z {TOK} -n 20 {redirect}",
                          shell=True, cwd=REPO, stderr=subprocess.PIPE, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.splitlines() == [f"{module}: error writing standard output: {reason}"]


@pytest.mark.parametrize("module", ["run", "runq"])
def test_chat_with_stdin_closed_ends_cleanly(module):
    proc = subprocess.run(f"{sys.executable} -m {module} {MODELS[module]} -z {TOK} -m chat <&-",
                          shell=True, cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout == b"Enter system prompt (optional): User: \n"


@pytest.mark.parametrize("module", ["run", "runq"])
def test_api_refuses_what_the_command_line_refuses(module):
    model = PACKAGES[module].Model(str(MODELS[module]), str(TOK))
    with pytest.raises(TypeError, match="token must be an integer"):
        model.forward(5.7, 0)  # would silently run token 5
    with pytest.raises(TypeError, match="pos must be an integer"):
        model.forward(5, 1.5)
    with pytest.raises(TypeError, match="steps must be an integer"):
        list(model.generate("a", steps=2.5))
    for name in ("temperature", "topp"):
        with pytest.raises(ValueError, match=f"{name} must be a number"):
            list(model.generate("a", **{name: math.nan}))
    for text in (b"a\0b", "a\0b"):
        with pytest.raises(ValueError, match="NUL"):
            model.encode(text)
        with pytest.raises(ValueError, match="NUL"):
            list(model.generate(text, steps=4))
    assert model.forward(5, 0).shape == (512,)  # the refusals left the model usable
    assert model.decode(model.encode("Once upon a time", bos=False)) == " Once upon a time"


def test_one_error_type_for_run_runq_and_the_tools():
    assert run.LlamaError is runq.LlamaError is llama2_cython.LlamaError
    assert issubclass(export.ExportError, llama2_cython.LlamaError)
    for package, model in ((run, MODELS["runq"]), (runq, MODELS["run"])):
        with pytest.raises(llama2_cython.LlamaError, match="run it with"):
            package.Transformer(str(model))


def under_address_limit(module, model, kbytes):
    """`python -m module model` with its address space limited (ulimit -v), from the repo root."""
    return subprocess.run(f"ulimit -v {kbytes}; exec {sys.executable} -m {module} {model} -z {TOK} -n 8",
                          shell=True, cwd=REPO, capture_output=True, timeout=60)


@pytest.mark.parametrize("module", ["run", "runq"])
def test_kv_cache_that_does_not_fit_is_one_line_naming_file_and_size(tmp_path, module):
    # a real header with a context long enough that the KV cache cannot be allocated under the
    # limit: 2 layers x 2^20 positions x 64 floats x 2 x 4 bytes = 1 GiB
    source = MODELS[module].read_bytes()
    data = bytearray(source if module == "runq" else (TESTDATA / "tiny_mha.v1.bin").read_bytes())
    data[8 + 4 * 6:8 + 4 * 7] = (1 << 20).to_bytes(4, "little")
    path = tmp_path / "long.bin"
    path.write_bytes(bytes(data))
    proc = under_address_limit(module, path, 700_000)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines() == [f"{module}: {path}: out of memory: malloc failed for the run state, "
                                f"whose KV cache alone is {1 << 30} bytes"]


def test_model_that_cannot_be_mapped_is_one_line_naming_file_and_size(tmp_path):
    # a v1 header whose weights take 1.2 GB: a sparse file of that size, mapped under a 700 MB limit
    config = dict(dim=1024, hidden_dim=4096, n_layers=24, n_heads=16, n_kv_heads=16, vocab_size=512,
                  seq_len=64)
    from llama2_cython import formats
    header = formats.Header(1, config, True)
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<Ii7iB", formats.MAGIC, 1, *config.values(), 1).ljust(256, b"\0"))
        f.truncate(header.file_size())
    proc = under_address_limit("run", path, 700_000)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines() == [f"run: couldn't map {path} ({header.file_size()} bytes) into memory: "
                                f"Cannot allocate memory"]


@pytest.mark.parametrize("module", ["run", "runq"])
def test_ctrl_c_while_opening_a_fifo_tokenizer_is_one_line(tmp_path, module):
    import os
    import signal
    import time
    fifo = tmp_path / "tok.fifo"
    os.mkfifo(fifo)  # nobody writes to it: opening it waits
    proc = subprocess.Popen([sys.executable, "-m", module, str(MODELS[module]), "-z", str(fifo)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.decode().split() == [f"{module}:", "interrupted"]
