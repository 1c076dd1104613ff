"""Shared paths and helpers for test_all.py and tests/.

Our own fixtures are copied into testdata/; files from other projects (tokenizer.bin, the
stories260K models) are read from ../shared/fixtures and their tests skip when it is absent.
"""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent
TESTDATA = REPO / "testdata"
SHARED = REPO.parent / "shared" / "fixtures"
SHARED_ONLY = ("tokenizer.bin", "stories260K.bin", "stories260K_q80.bin")


def fixture_path(name):
    """Where a fixture named in golden.json lives: testdata/ or ../shared/fixtures."""
    if name in SHARED_ONLY:
        path = SHARED / name
        if not path.exists():
            pytest.skip(f"{name} comes from ../shared/fixtures, which is absent")
        return path
    return TESTDATA / name


def c_logits(model, prog):
    """The logits C's forward() gave for logits/README.json's tokens (16 positions x vocab)."""
    name = f"{model}.{prog}.npy"
    if model.startswith("stories"):  # made from another project's model: kept in ../shared only
        path = SHARED / "logits" / name
        if not path.exists():
            pytest.skip(f"logits/{name} comes from ../shared/fixtures, which is absent")
        return np.load(path)
    return np.load(TESTDATA / "logits" / name)


def golden_cases(prog=None):
    cases = json.loads((TESTDATA / "golden.json").read_text())
    return [c for c in cases if prog is None or c["prog"] == prog]


def golden_outputs(case):
    """The stdout bytes the C reference printed; non-robust cases have an -Ofast variant too."""
    outputs = [base64.b64decode(case["stdout_b64"])]
    if not case["robust"] and "stdout_b64_fastmath" in case:
        outputs.append(base64.b64decode(case["stdout_b64_fastmath"]))
    return outputs


def golden_argv(case):
    """The case's command line with fixture names resolved to paths."""
    argv = [str(fixture_path(case["model"]))]
    args = case["args"]
    for i, arg in enumerate(args):
        argv.append(str(fixture_path(arg)) if i > 0 and args[i - 1] == "-z" else arg)
    return argv


def run_cli(module, args, stdin=b"", timeout=120, env=None):
    """`python -m module args...` from the repo root; returns the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, cwd=REPO,
                          capture_output=True, timeout=timeout, env=env)


def assert_one_line_error(proc):
    """Bad input: non-zero exit, one line on stderr, no traceback, nothing on stdout."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err
