"""Property-based fuzzing of the loaders (hypothesis): mutated header ints, truncations and corrupt
bytes of v0/v1/v2/v3 model files (v3 with packed matrices too) and of the tokenizer. Each case
loads in a forked child (fuzz.check), so a segfault is a failure, not a dead pytest; a LlamaError
or ValueError is a clean refusal."""
import random

import pytest

from hypothesis import given, settings, strategies as st

from tools import fuzz

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("target", ["v0", "v1", "v2", "v3", "v3q", "v3p", "tokenizer"])
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3))
def test_mutated_files_load_cleanly(tmp_path_factory, target, seed, rounds):
    rng = random.Random(seed)
    data = (fuzz.TESTDATA / fuzz.SOURCES[target]).read_bytes()
    for _ in range(rounds):
        data = fuzz.mutate(data, target, rng)
    path = tmp_path_factory.mktemp("fuzz") / "case.bin"
    path.write_bytes(data)
    assert fuzz.check(path, target, forward=False) is None


@pytest.mark.parametrize("target", ["v0", "v1", "v2", "v3", "v3q", "v3p"])
@SETTINGS
@given(field=st.integers(0, 15), value=st.sampled_from(fuzz.INTERESTING) | st.integers(-2**31, 2**31 - 1))
def test_header_int_mutations(tmp_path_factory, target, field, value):
    import struct
    data = bytearray((fuzz.TESTDATA / fuzz.SOURCES[target]).read_bytes())
    offsets = fuzz.HEADER_OFFSETS[target]
    struct.pack_into("i", data, offsets[field % len(offsets)], value)
    path = tmp_path_factory.mktemp("fuzz") / "case.bin"
    path.write_bytes(bytes(data))
    assert fuzz.check(path, target, forward=False) is None


@pytest.mark.parametrize("target", ["v0", "v1", "v2", "v3", "v3q", "v3p", "tokenizer"])
@SETTINGS
@given(fraction=st.floats(0, 1))
def test_truncated_files(tmp_path_factory, target, fraction):
    data = (fuzz.TESTDATA / fuzz.SOURCES[target]).read_bytes()
    path = tmp_path_factory.mktemp("fuzz") / "case.bin"
    path.write_bytes(data[:int(len(data) * fraction)])
    assert fuzz.check(path, target, forward=False) is None


def test_fuzz_entry_point_runs(tmp_path):
    assert fuzz.main(["--seconds", "2", "--target", "tokenizer", "--seed", "1",
                      "--out", str(tmp_path)]) == 0
