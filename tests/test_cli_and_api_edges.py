"""What main and the Python API do at the edges (issue 12, class 4 and 5): write errors that are
not a closed pipe, a closed stdin in chat, and API arguments the command line would refuse; and the
one error type that run, runq and the tools share."""
import math
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
