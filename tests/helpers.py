"""Paths and helpers that test_all.py and tests/ share.

Our own fixtures are copied into testdata/; files from other projects (tokenizer.bin, the
stories260K models) are read from ../shared/fixtures and their tests skip when it is absent.

Two builds are tested (testdata/README.md says which test uses which):
- "fast": the user's in-place build (run/_run*.so, runq/_runq*.so; `make runomp` by default).
- "exact": `make run`'s IEEE flags, built by `make exact` into build/exact as a package tree.
A build that is missing fails the tests that need it; it is never skipped.
"""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO / "testdata"
SHARED = REPO.parent / "shared" / "fixtures"
SHARED_ONLY = ("tokenizer.bin", "stories260K.bin", "stories260K_q80.bin")
BUILDS = ("fast", "exact")
EXACT_ROOT = REPO / "build" / "exact"


def build_root(build):
    """The directory whose run/ and runq/ packages are the given build."""
    if build == "fast":
        return REPO
    if not (EXACT_ROOT / ".built").exists():
        pytest.fail("the exact build is missing: run `make exact` (make test does)")
    return EXACT_ROOT


def in_build(build, function, **kwargs):
    """tests/in_build.py's function(**kwargs), called in a process of its own whose `run` and
    `runq` are the given build's (one process cannot hold two builds: each extension registers
    itself under its own name, run._run or runq._runq)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "in_build.py"), str(build_root(build)),
                           function], input=json.dumps(kwargs).encode(), capture_output=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{function} in the {build} build failed:\n{proc.stderr.decode()}")
    return json.loads(proc.stdout)


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


def run_cli(module, args, stdin=b"", timeout=120, env=None, build="fast"):
    """`python -m module args...` from the root of a build (the repo for the fast one; relative
    paths in args are then relative to it); returns the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin,
                          cwd=build_root(build), capture_output=True, timeout=timeout, env=env)


def assert_one_line_error(proc):
    """Bad input: non-zero exit, one line on stderr, no traceback, nothing on stdout."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err
