"""tools/alternate.py, the alternating comparison of builds behind the README's ratios: it runs
on this checkout's own build (both programs, the 15M shape, two rounds) and refuses a directory
without a build."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def alternate(*args):
    return subprocess.run([sys.executable, "-m", "tools.alternate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("program", ["run", "runq"])
def test_compares_a_build_with_numpy(program):
    proc = alternate(str(REPO), str(REPO), "--program", program, "--shape", "15M", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| (.+) \| ([0-9.]+) \| ([0-9.]+) \|$", proc.stdout, re.M)
    assert [row[0] for row in rows] == [f"{REPO} (1)", f"{REPO} (2)"]
    for _, tok_s, ratio in rows:
        assert float(tok_s) > 10 and 0.05 < float(ratio) < 20


def test_refuses_a_directory_without_a_build(tmp_path):
    proc = alternate(str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"alternate: {tmp_path} has no run package"
