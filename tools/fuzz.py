"""Fuzzes the loaders: mutated headers, truncations and corrupt bytes of the test files, each
loaded in a forked child so that a crash is caught. A crash saves its file and is reported.

    python -m tools.fuzz --seconds 60 --target v0
"""
import argparse
import multiprocessing
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO / "testdata"
SOURCES = {"v0": "tiny_mha.bin", "v1": "tiny_mha.v1.bin", "v2": "tiny_mha_q80.bin",
           "v3": "tiny_gqa_llama3.v3.bin", "v3q": "tiny_gqa_llama3_q80.v3.bin",
           "v3p": "tiny_gqa_q80.packed.v3.bin", "tokenizer": "tok512.bin"}
# where each kind of file keeps its header's numbers: the 7 config ints; v2's group size; v3's
# RoPE and RMSNorm fields (floats and ints alike get int32 values written over them) and layout
HEADER_OFFSETS = {"v0": [4 * i for i in range(7)], "v1": [8 + 4 * i for i in range(7)],
                  "v2": [8 + 4 * i for i in range(7)] + [37],
                  "v3": [8 + 4 * i for i in range(7)] + [37] + [48 + 4 * i for i in range(7)]}
HEADER_OFFSETS["v3q"] = HEADER_OFFSETS["v3"]
HEADER_OFFSETS["v3p"] = HEADER_OFFSETS["v3"] + [76]  # packed matrices (layout 1)
QUANTIZED = ("v2", "v3q", "v3p")  # loaded by runq
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 64, 96, 255, 256, 511, 512, 513, 1 << 16, 1 << 20, (1 << 20) + 1,
               1 << 30, 2**31 - 1, -2**31]


def mutate(data, target, rng):
    """One random mutation of data: header ints, a truncation, random bytes, or an extension."""
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # header ints
        for _ in range(rng.randint(1, 3)):
            offset = rng.choice(HEADER_OFFSETS[target]) if target != "tokenizer" else 0
            if target == "tokenizer" and rng.random() < 0.5:
                offset = rng.randrange(0, len(data) - 4)  # a piece's score or length
            value = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randint(-2**31, 2**31 - 1)
            struct.pack_into("i", data, offset, value)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 2:  # random bytes
        for _ in range(rng.randint(1, 16)):
            if data:
                data[rng.randrange(min(len(data), 300 if rng.random() < 0.7 else len(data)))] = rng.randrange(256)
    else:  # extend
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(data)


def load(path, target, forward=True):
    """Loads path as target; returns normally when it is refused cleanly or works."""
    if target in QUANTIZED:
        from runq import _runq as mod
    else:
        from run import _run as mod
    try:
        if target == "tokenizer":
            tok = mod.Tokenizer(str(path), 512)
            tok.encode("Once upon a time, \xe9\u4e2d \U0001f600 x")
            for i in range(512):
                tok.decode(1, i)
        else:
            t = mod.Transformer(str(path))
            if not forward:  # a forked child of a process whose OpenMP pool runs may hang in one
                return
            t.forward(1, 0)
            t.forward(t.config["vocab_size"] - 1, t.config["seq_len"] - 1)
    except (mod.LlamaError, ValueError):
        pass


def _child(path, target, forward):
    try:
        load(path, target, forward)
    except BaseException as e:  # anything but a clean refusal is a finding
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        os._exit(3)
    os._exit(0)


def check(path, target, timeout=60, forward=True):
    """None when loading path is clean, else a word on what went wrong (in a forked child)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(str(path), target, forward))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "hang"
    if proc.exitcode == 0:
        return None
    return "exception" if proc.exitcode == 3 else f"signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit {proc.exitcode}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--target", choices=sorted(SOURCES), action="append",
                        help="file kind to fuzz (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default="fuzz-crashes", help="folder for reproducing files")
    args = parser.parse_args(argv)
    targets = args.target or sorted(SOURCES)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    originals = {t: (TESTDATA / SOURCES[t]).read_bytes() for t in targets}
    deadline = time.monotonic() + args.seconds
    runs, found = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() < deadline:
            target = targets[runs % len(targets)]
            data = originals[target]
            for _ in range(rng.randint(1, 3)):
                data = mutate(data, target, rng)
            path = Path(tmp) / f"case.{target}.bin"
            path.write_bytes(data)
            problem = check(path, target)
            runs += 1
            if problem:
                found += 1
                out = Path(args.out)
                out.mkdir(exist_ok=True)
                keep = out / f"{target}-{seed}-{runs}.bin"
                keep.write_bytes(data)
                print(f"fuzz: {target}: {problem}: reproduce with {keep}", flush=True)
    print(f"fuzz: {runs} cases in {args.seconds:g} s (seed {seed}), {found} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
