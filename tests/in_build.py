"""`python tests/in_build.py ROOT FUNCTION`: calls FUNCTION of this file with the JSON keyword
arguments read from stdin, with ROOT first on sys.path so that `run` and `runq` are the packages of
the build there (conftest.in_build); writes the JSON result on stdout."""
import importlib
import json
import sys


def logits(prog, model, tokens):
    """forward() of prog at positions 0, 1, ... fed tokens: one list of floats per position
    (float32 values, which JSON carries exactly)."""
    transformer = importlib.import_module(prog).Transformer(model)
    return [transformer.forward(token, pos).tolist() for pos, token in enumerate(tokens)]


def encode(prog, tokenizer, vocab_size, cases):
    """prog's encode() of each case's text, with its bos and eos flags."""
    tok = importlib.import_module(prog).Tokenizer(tokenizer, vocab_size)
    return [tok.encode(case["text"], bool(case["bos"]), bool(case["eos"])) for case in cases]


if __name__ == "__main__":
    root, function = sys.argv[1:]
    sys.path.insert(0, root)
    json.dump(globals()[function](**json.load(sys.stdin)), sys.stdout)
