"""Issue 12, writers that never lose data: export.py, tokenizer.py and train.py write a temporary
file beside the target and rename it over the target once complete (llama2_cython.files). An error,
a full disk, `ulimit -f`, Ctrl-C or SIGTERM part-way leaves the old file intact and no temporary
file behind, with one line on stderr naming the file and the usual status."""
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llama2_cython import export
from llama2_cython.cli import Terminated
from llama2_cython.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "testdata"
OLD = b"the user's old file\n"


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def one_line(stderr):
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------------- atomic_write

def test_complete_write_replaces_the_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    target.chmod(0o640)
    with atomic_write(target) as fh:
        fh.write(b"new")
        assert target.read_bytes() == OLD  # not before the end
        assert len(leftovers(tmp_path)) == 1
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the old file's permissions are kept
    assert leftovers(tmp_path) == []


def test_new_file_gets_the_usual_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.bin") as fh:
            fh.write(b"x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644  # not mkstemp's 0600


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyboardInterrupt(),
                                   Terminated(signal.SIGTERM)])
def test_failure_part_way_leaves_the_old_file(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    with pytest.raises(type(error)) as raised:
        with atomic_write(target) as fh:
            fh.write(b"half of the new")
            raise error
    assert target.read_bytes() == OLD
    assert leftovers(tmp_path) == []
    assert raised.value.__notes__ == [f"{target} left as it was"]


def test_failure_leaves_no_new_file(tmp_path):
    with pytest.raises(KeyboardInterrupt) as raised:
        with atomic_write(tmp_path / "new.bin") as fh:
            fh.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert raised.value.__notes__ == [f"{tmp_path / 'new.bin'} not written"]


def test_symlink_is_written_through(tmp_path):
    (tmp_path / "real.bin").write_bytes(OLD)
    (tmp_path / "link.bin").symlink_to("real.bin")
    with atomic_write(tmp_path / "link.bin") as fh:
        fh.write(b"new")
    assert (tmp_path / "link.bin").is_symlink()
    assert (tmp_path / "real.bin").read_bytes() == b"new"


def test_errors_name_the_target(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        with atomic_write(tmp_path / "missing" / "out.bin"):
            pass
    assert raised.value.filename == str(tmp_path / "missing" / "out.bin")
    with pytest.raises(IsADirectoryError) as raised:
        with atomic_write(tmp_path):
            pass
    assert raised.value.filename == str(tmp_path)
    # a device cannot be replaced: it is written directly, and its errors name it
    with pytest.raises(OSError) as raised:
        with atomic_write("/dev/full") as fh:
            fh.write(b"x" * 100000)
    assert (raised.value.filename, raised.value.strerror) == ("/dev/full", os.strerror(28))
    with atomic_write(os.devnull) as fh:
        fh.write(b"gone")
    assert Path(os.devnull).is_char_device()


# ---------------------------------------------------------------------------- the CLIs

def export_cli(*args, **kwargs):
    kwargs = dict(dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE), **kwargs)
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], timeout=60,
                          **kwargs)


def tokenizer_cli(*args, **kwargs):
    kwargs = dict(dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE), **kwargs)
    return subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *map(str, args)], timeout=60,
                          **kwargs)


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))


def test_export_under_ulimit_f_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(OLD)
    proc = export_cli(out, "--version", 1, "--bin", TESTDATA / "tiny_mha.bin",
                      preexec_fn=limit_file_size)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1] == \
        f"export.py: error: {out}: {os.strerror(27)}"  # EFBIG, File too large
    assert out.read_bytes() == OLD and leftovers(tmp_path) == []


def test_export_to_a_full_disk_names_the_file():
    proc = export_cli("/dev/full", "--version", 1, "--bin", TESTDATA / "tiny_mha.bin")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1] == \
        f"export.py: error: /dev/full: {os.strerror(28)}"


def test_failed_in_place_conversion_keeps_the_only_copy(tmp_path):
    model = tmp_path / "model.bin"
    original = (TESTDATA / "tiny_mha.bin").read_bytes()
    model.write_bytes(original)
    proc = export_cli(model, "--version", 1, "--bin", model, preexec_fn=limit_file_size)
    assert proc.returncode == 1
    assert model.read_bytes() == original and leftovers(tmp_path) == []
    ok = export_cli(model, "--version", 1, "--bin", model)
    assert ok.returncode == 0, ok.stderr
    assert model.read_bytes() == (TESTDATA / "tiny_mha.v1.bin").read_bytes()


MAPPED_READER = """
import mmap, sys
with open(sys.argv[1], "rb") as fh:
    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
print("mapped", flush=True)
sys.stdin.readline()
assert mapped[:] == open(sys.argv[2], "rb").read()  # every page, after the export
print("intact", flush=True)
"""


def test_export_over_a_mapped_model_spares_its_reader(tmp_path):
    """A running `python -m run` maps its model: overwriting it in place would SIGBUS the reader
    (pages past the new end) or change its weights under it; renaming gives a new inode."""
    model = tmp_path / "model.bin"
    model.write_bytes((TESTDATA / "tiny_gqa.bin").read_bytes())
    reader = subprocess.Popen([sys.executable, "-c", MAPPED_READER, model, TESTDATA / "tiny_gqa.bin"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "mapped\n"
        proc = export_cli(model, "--version", 0, "--bin", TESTDATA / "tiny_mha.bin")
        assert proc.returncode == 0, proc.stderr
        out, _ = reader.communicate("go\n", timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert reader.returncode == 0 and out == "intact\n"
    assert model.read_bytes() == (TESTDATA / "tiny_mha.bin").read_bytes()


# export.py's CLI with every tensor write slowed down, so that a signal lands mid-file
SLOW_EXPORT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from llama2_cython import export
from llama2_cython.cli import run_command
write = export._write
def slow_write(fh, array, dtype):
    write(fh, array, dtype)
    fh.flush()
    print("wrote a tensor", flush=True)
    time.sleep(0.2)
export._write = slow_write
sys.exit(run_command("export.py", export.main, sys.argv[2:]))
"""


@pytest.mark.parametrize("signum, status, what", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signal_part_way_keeps_the_old_file(tmp_path, signum, status, what):
    out = tmp_path / "out.bin"
    out.write_bytes(OLD)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, ROOT, out, "--version", "1",
                             "--bin", TESTDATA / "tiny_mha.bin"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"wrote a tensor\n"
    [temporary] = leftovers(tmp_path)
    assert (tmp_path / temporary).stat().st_size > 0  # the signal comes part-way through
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status
    assert err.decode().strip().splitlines()[-1] == f"export.py: {what}: {out} left as it was"
    assert "Traceback" not in err.decode()
    assert out.read_bytes() == OLD and leftovers(tmp_path) == []


def test_sigkill_leaves_the_old_file(tmp_path):
    """SIGKILL cannot be caught: the temporary file stays, but the target is never partial."""
    out = tmp_path / "out.bin"
    out.write_bytes(OLD)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, ROOT, out, "--version", "1",
                             "--bin", TESTDATA / "tiny_mha.bin"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"wrote a tensor\n"
    proc.kill()
    proc.wait()
    assert out.read_bytes() == OLD
    assert len(leftovers(tmp_path)) == 1


def test_stdout_on_a_full_disk_is_one_line(tmp_path):
    with open("/dev/full", "wb") as full:
        proc = export_cli(tmp_path / "out.bin", "--version", 1, "--bin",
                          TESTDATA / "tiny_mha.bin", stdout=full)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1] == \
        f"export.py: error writing standard output: {os.strerror(28)}"
    assert "Traceback" not in proc.stderr.decode()
    assert (tmp_path / "out.bin").read_bytes() == (TESTDATA / "tiny_mha.v1.bin").read_bytes()


def test_tokenizer_writes_safely():
    pytest.importorskip("sentencepiece")
    proc = tokenizer_cli("-t", TESTDATA / "tok512.model", "-o", "/dev/full")
    assert proc.returncode == 1
    assert one_line(proc.stderr) == f"tokenizer.py: error: /dev/full: {os.strerror(28)}"


def test_tokenizer_stdout_on_a_full_disk_is_one_line(tmp_path):
    pytest.importorskip("sentencepiece")
    with open("/dev/full", "wb") as full:
        proc = tokenizer_cli("-t", TESTDATA / "tok512.model", "-o", tmp_path / "t.bin",
                             stdout=full)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == f"tokenizer.py: error writing standard output: {os.strerror(28)}"
    assert (tmp_path / "t.bin").read_bytes() == (TESTDATA / "tok512.bin").read_bytes()


def test_tokenizer_under_ulimit_f_keeps_the_old_file(tmp_path):
    pytest.importorskip("sentencepiece")
    out = tmp_path / "t.bin"
    out.write_bytes(OLD)
    proc = tokenizer_cli("-t", TESTDATA / "tok512.model", "-o", out,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))
    assert proc.returncode == 1
    assert one_line(proc.stderr) == f"tokenizer.py: error: {out}: {os.strerror(27)}"
    assert out.read_bytes() == OLD and leftovers(tmp_path) == []


def test_train_sigterm_keeps_the_old_model(tmp_path):
    """SIGTERM while train.py trains: one line, 143, the last run's model files as they were,
    no temporary files."""
    pytest.importorskip("torch")
    pytest.importorskip("sentencepiece")
    for name in ("stories_demo.bin", "stories_demo_q80.bin"):
        (tmp_path / name).write_bytes(OLD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "demo.train", "--out", str(tmp_path),
                             "--stories", "2000", "--steps", "100000", "--eval-every", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        for line in proc.stdout:
            if line.startswith(b"step "):  # training has begun
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143
    assert one_line(err) == "train.py: terminated"
    for name in ("stories_demo.bin", "stories_demo_q80.bin"):
        assert (tmp_path / name).read_bytes() == OLD
    assert (tmp_path / "stories_tok.bin").stat().st_size > 0  # finished before the signal
    assert leftovers(tmp_path) == []


def test_v0_rope_tables_written_in_blocks(tmp_path):
    """v0's freq_cis tables go out a block of positions at a time (seq_len can be large): the
    bytes are those of the whole tables."""
    config = dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=8,
                  seq_len=2 * export.ROPE_ROWS + 5)
    export.write_v0(tmp_path / "m.bin", config, export.random_model(config), True)
    real, imag = export.rope_tables(config)
    data = (tmp_path / "m.bin").read_bytes()
    tables = real.nbytes + imag.nbytes
    assert data[-tables:] == real.astype("<f4").tobytes() + imag.astype("<f4").tobytes()
    assert export.read_model(tmp_path / "m.bin")[0] == config
