"""Comparison against the C reference: stdout of llama2.c's run / runq (golden.json) byte for
byte, and run.c's encode() token ids (encode_golden.json), for both tokenizers."""
import importlib
import json

import pytest

from conftest import TESTDATA, fixture_path, golden_argv, golden_cases, golden_outputs, run_cli


def built(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_golden_stdout(case):
    if not built(case["prog"]):
        pytest.skip(f"{case['prog']} is not built")
    proc = run_cli(case["prog"], golden_argv(case), stdin=case["stdin"].encode())
    assert proc.returncode == case["returncode"], proc.stderr.decode()
    assert proc.stdout in golden_outputs(case)


ENCODE = json.loads((TESTDATA / "encode_golden.json").read_text())


@pytest.mark.parametrize("prog", ["run", "runq"])
@pytest.mark.parametrize("vocab", sorted(ENCODE))
def test_encode(prog, vocab):
    if not built(prog):
        pytest.skip(f"{prog} is not built")
    module = importlib.import_module(prog)
    spec = ENCODE[vocab]
    tokenizer = module.Tokenizer(str(fixture_path(spec["tokenizer"])), spec["vocab_size"])
    for case in spec["cases"]:
        ids = tokenizer.encode(case["text"], bool(case["bos"]), bool(case["eos"]))
        assert ids == case["ids"], case["text"]
