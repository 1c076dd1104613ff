"""Decode speed of `python -m run` (and `python -m runq`) against numpy's sgemv bandwidth.

Writes random-weight models in the stories15M and stories110M shapes with export.py (cached in
build/bench/), times decode with the command line exactly as a user runs it (the tok/s that run
reports on stderr, best of --repeats), and in the same run measures how fast numpy's sgemv
(matrix @ vector) streams the very same weight matrices, sustained over as many passes as
decode has tokens. Decode reads every weight once per token, so tok/s x weight bytes = GB/s,
and GB/s / numpy's GB/s says how close to memory-bound the port is.

    python -m tools.bench [--shapes 15M 110M] [--programs run runq run_cuda] [--repeats 7] [--steps 256]

With run_cuda (on an NVIDIA GPU with PyCUDA), the ratio is the fraction of the GPU's memory
bandwidth that the weights stream at.

Then prefill, for run and runq: the tok/s at which a 128-token prompt goes through the model
together (what the command line reports for it), against the same program's decode tok/s and
against the FLOP rate of numpy's sgemm multiplying the same 128 x dim activations by the same
weight matrices (a prompt is compute-bound, decode is memory-bound).

Last, batched decode through the Python API (Model.generate_batch): the aggregate tok/s of 1, 4,
8 and 16 sequences decoded together, and the bandwidth at which their passes stream the weights
against numpy's sgemv.
"""
import argparse
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import run
from llama2_cython import export

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "bench"
SHAPES = {
    "15M": dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": dict(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, seq_len=1024),
}
# the acceptance targets of the issues (../shared/NOTES.md has the C figures they come from)
TARGETS = {("run", "110M"): ("ratio", 0.95), ("run", "15M"): ("tok/s", 750.0),
           ("runq", "110M"): ("ratio", 0.45), ("run_cuda", "110M"): ("tok/s", 1500.0)}
# prefill of a 128-token prompt (issue 11): x its decode tok/s, and x numpy's sgemm FLOP rate
PREFILL_TARGETS = {("run", "110M"): (8.0, 0.6), ("runq", "110M"): (4.0, 0.6)}
PROMPT_TOKENS = 128


def write_tokenizer(path, vocab_size):
    """A tokenizer with vocab_size pieces in llama2.c's format: the 3 specials, the 256 byte
    pieces, then made-up word pieces (decoding speed does not depend on what they say)."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    pieces += [b" w%d" % i for i in range(vocab_size - len(pieces))]
    with open(path, "wb") as f:
        f.write(struct.pack("I", max(map(len, pieces))))
        for i, piece in enumerate(pieces):
            f.write(struct.pack("fi", -float(i), len(piece)) + piece)


def model_files(name, with_q80):
    """The cached fp32 (and Q8_0) model files of a shape, written once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    config = SHAPES[name]
    fp32, q80, tok = CACHE / f"{name}.bin", CACHE / f"{name}_q80.bin", CACHE / "tok32000.bin"
    weights = None
    if not fp32.exists() or (with_q80 and not q80.exists()):
        print(f"writing random {name} model files in {CACHE} ...", file=sys.stderr)
        weights = export.random_model(config, seed=0, shared=True)
        export.write_v0(fp32, config, weights, True)
        if with_q80:
            export.write_v2(q80, config, weights, True)
    if not tok.exists():
        write_tokenizer(tok, 32000)
    return fp32, q80, tok


def matmul_weights(path):
    """The matrices decode multiplies with, one after the other, as numpy views of the file."""
    w = run.Transformer(str(path)).weights
    layers = zip(*(w[k] for k in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")))
    return [m for layer in layers for m in layer] + [w["wcls"]]


def numpy_sgemv_gbps(matrices, repeats, passes):
    """GB/s of numpy's sgemv over the matrices in decode's order, sustained like a decode: the
    best of `repeats` runs of `passes` passes each (one pass per token)."""
    vectors = {m.shape[1]: np.random.default_rng(0).standard_normal(m.shape[1], dtype=np.float32)
               for m in matrices}
    nbytes = sum(m.nbytes for m in matrices)
    for m in matrices:  # warm the page cache, as decode's first (untimed) token does
        m @ vectors[m.shape[1]]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(passes):
            for m in matrices:
                m @ vectors[m.shape[1]]
        best = min(best, (time.perf_counter() - t0) / passes)
    return nbytes / best / 1e9


def numpy_sgemm_gflops(matrices, rows, repeats):
    """GFLOP/s of numpy's sgemm multiplying a (rows, n) block by each matrix in turn, best of
    repeats passes: what a prompt of `rows` tokens fed together asks of each layer."""
    blocks = {m.shape[1]: np.random.default_rng(0).standard_normal((rows, m.shape[1]), dtype=np.float32)
              for m in matrices}
    flops = sum(2 * rows * m.size for m in matrices)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in matrices:
            blocks[m.shape[1]] @ m.T
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def prefill_tok_s(command, model, tokenizer, repeats):
    """The best rate at which command feeds a prompt of PROMPT_TOKENS tokens together, as it
    reports it on stderr. The prompt is bytes that no piece merges: BOS, the dummy prefix, 127 byte
    tokens; the last of them goes through forward() and is not counted."""
    best = 0.0
    prompt = "a" * (PROMPT_TOKENS - 1)
    for _ in range(repeats):
        proc = subprocess.run([*command, str(model), "-z", str(tokenizer), "-n", str(PROMPT_TOKENS + 2),
                               "-t", "0", "-i", prompt], cwd=REPO, capture_output=True, text=True,
                              check=True)
        found = re.search(r"after a prompt of (\d+) tokens fed together at ([0-9.]+) tok/s", proc.stderr)
        assert int(found.group(1)) == PROMPT_TOKENS, proc.stderr
        best = max(best, float(found.group(2)))
    return best


def q80_bytes(q80, fp32_bytes):
    """The bytes of int8 weights a runq decode reads per token: int8 values plus one float32
    scale per group."""
    with open(q80, "rb") as f:
        group_size = struct.unpack_from("i", f.read(64), 37)[0]
    return fp32_bytes // 4 + fp32_bytes // group_size


def batched_tok_s(package, model, tokenizer, sequences, steps, repeats):
    """Aggregate tok/s of `sequences` greedy sequences of `steps` positions decoded together
    (Model.generate_batch), best of repeats; each pass of the batch reads the weights once."""
    m = package.Model(str(model), str(tokenizer))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in m.generate_batch(["a"] * sequences, steps=steps, temperature=0.0):
            pass
        best = max(best, sequences * steps / (time.perf_counter() - t0))
    return best


def decode_tok_s(command, model, tokenizer, steps, repeats):
    """The best `achieved tok/s` that command (a run-like CLI) reports over repeats greedy runs."""
    best = 0.0
    for _ in range(repeats):
        proc = subprocess.run([*command, str(model), "-z", str(tokenizer), "-n", str(steps),
                               "-t", "0"], cwd=REPO, capture_output=True, text=True, check=True)
        best = max(best, float(re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr).group(1)))
    return best


def gpu_peak_gbps():
    """(the GPU's name, its memory bandwidth in GB/s from the memory clock and bus width)."""
    import pycuda.autoinit  # noqa: F401  (a context on the first GPU)
    import pycuda.driver as cuda
    device = cuda.Context.get_device()
    clock_khz = device.get_attribute(cuda.device_attribute.MEMORY_CLOCK_RATE)
    bus_bits = device.get_attribute(cuda.device_attribute.GLOBAL_MEMORY_BUS_WIDTH)
    return device.name(), 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


COMMANDS = {"run": [sys.executable, "-m", "run"], "runq": [sys.executable, "-m", "runq"],
            "run_cuda": [sys.executable, "run_cuda.py"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["15M", "110M"], choices=sorted(SHAPES))
    ap.add_argument("--programs", nargs="+", default=["run", "runq"], choices=sorted(COMMANDS),
                    help="run_cuda compares with the GPU's memory bandwidth instead of numpy's")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()
    try:
        gpu = gpu_peak_gbps() if "run_cuda" in args.programs else None
    except ImportError as e:
        sys.exit(f"bench: run_cuda needs PyCUDA and a GPU ({e})")

    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cpus, "
          f"{args.steps} steps, best of {args.repeats}" + (f", GPU: {gpu[0]}" if gpu else ""))
    print("\nDecode:")
    print("| program | shape | weights/token | tok/s | GB/s | numpy sgemv (GPU peak) GB/s | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    decode = {}
    for name in args.shapes:
        fp32, q80, tok = model_files(name, "runq" in args.programs)
        matrices = matmul_weights(fp32)
        fp32_bytes = sum(m.nbytes for m in matrices)
        cpu_programs = [p for p in args.programs if p != "run_cuda"]
        numpy_gbps = numpy_sgemv_gbps(matrices, args.repeats, args.steps - 1) if cpu_programs else None
        for prog in args.programs:
            model, nbytes, reference = fp32, fp32_bytes, numpy_gbps
            if prog == "runq":
                model, nbytes = q80, q80_bytes(q80, fp32_bytes)
            elif prog == "run_cuda":
                reference = gpu[1]
            tok_s = decode_tok_s(COMMANDS[prog], model, tok, args.steps, args.repeats)
            decode[prog, name] = tok_s
            gbps = tok_s * nbytes / 1e9
            ratio = gbps / reference
            target = TARGETS.get((prog, name))
            verdict = ""
            if target:
                value = ratio if target[0] == "ratio" else tok_s
                ok = value >= target[1]
                failed |= not ok
                verdict = f"{target[0]} >= {target[1]:g}: {'met' if ok else 'MISSED'}"
            print(f"| {prog} | {name} | {nbytes / 1e6:.0f} MB | {tok_s:.1f} | {gbps:.1f} | "
                  f"{reference:.1f} | {ratio:.2f} | {verdict} |", flush=True)

    cpu_programs = [p for p in args.programs if p in ("run", "runq")]
    if cpu_programs:
        print(f"\nPrefill of a {PROMPT_TOKENS}-token prompt:")
        print("| program | shape | prefill tok/s | x decode | GFLOP/s | numpy sgemm GFLOP/s | ratio | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes if cpu_programs else []:
        fp32, q80, tok = model_files(name, "runq" in cpu_programs)
        layers = matmul_weights(fp32)[:-1]  # the classifier runs for the last prompt token only
        sgemm = numpy_sgemm_gflops(layers, PROMPT_TOKENS, args.repeats)
        flops_per_token = sum(2 * m.size for m in layers)
        for prog in cpu_programs:
            tok_s = prefill_tok_s(COMMANDS[prog], q80 if prog == "runq" else fp32, tok, args.repeats)
            gflops = tok_s * flops_per_token / 1e9
            speedup = tok_s / decode[prog, name]
            verdict = ""
            target = PREFILL_TARGETS.get((prog, name))
            if target:
                ok = speedup >= target[0] and gflops / sgemm >= target[1]
                failed |= not ok
                verdict = (f"x decode >= {target[0]:g}, ratio >= {target[1]:g}: "
                           f"{'met' if ok else 'MISSED'}")
            print(f"| {prog} | {name} | {tok_s:.1f} | {speedup:.1f} | {gflops:.1f} | {sgemm:.1f} | "
                  f"{gflops / sgemm:.2f} | {verdict} |", flush=True)

    if cpu_programs:
        print("\nBatched decode (Model.generate_batch, greedy, 64 positions a sequence):")
        print("| program | shape | sequences | aggregate tok/s | x one sequence | weights GB/s | numpy sgemv GB/s | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes if cpu_programs else []:
        fp32, q80, tok = model_files(name, "runq" in cpu_programs)
        matrices = matmul_weights(fp32)
        fp32_bytes = sum(m.nbytes for m in matrices)
        numpy_gbps = numpy_sgemv_gbps(matrices, args.repeats, 63)
        for prog in cpu_programs:
            package = run if prog == "run" else __import__("runq")
            model = q80 if prog == "runq" else fp32
            nbytes = fp32_bytes if prog == "run" else q80_bytes(q80, fp32_bytes)
            one = None
            for sequences in (1, 4, 8, 16):
                tok_s = batched_tok_s(package, model, tok, sequences, 64, args.repeats)
                one = one or tok_s
                verdict = ""
                if sequences == 8 and name == "110M":
                    ok = tok_s >= 4 * one
                    failed |= not ok
                    verdict = f"x one >= 4: {'met' if ok else 'MISSED'}"
                print(f"| {prog} | {name} | {sequences} | {tok_s:.1f} | {tok_s / one:.1f} | "
                      f"{tok_s / sequences * nbytes / 1e9:.1f} | {numpy_gbps:.1f} | {verdict} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
