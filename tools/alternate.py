"""Compare builds of the port on one decode, alternating: the way to tell a 2% change from the
noise of a shared machine, where `make bench` (fresh processes, minutes apart) moves by 10-20%.

Each build is a directory holding the sources with their extensions built in place (a git
worktree after `make runomp`, say). One long-lived process per build decodes 32 positions at a
time (`Transformer.forward`, the engine the command line runs: the same forward_batch, the same
choice of threads), cycling over positions 0-255 as a 256-token decode does; one more process
runs numpy's sgemv over the same weight matrices, 32 passes at a time. A round gives every
process its turn, in an order that rotates from round to round, with a pause before each turn so
that the threads of the one before go idle. Every figure is the median over the rounds: tok/s,
and the ratio of each build's weight bandwidth to numpy's in the same round.

    python -m tools.alternate DIR [DIR ...] [--program run|runq] [--shape 110M] [--rounds 20]

The same directory twice (an A/A run) shows how far apart two identical builds land.

The big shapes (7B, 13B: runq only) decode a random Q8_0 file (bench.big_shape), fewer
positions a turn, and numpy's sgemv streams two layers' matrices of the shape in fp32 (the
whole model would be 27 GB at 7B; two layers, 1.6 GB at 7B, are far beyond any cache): the
ratio compares bandwidths, the int8 file's bytes per token against numpy's fp32 bytes. With
--packed, runq decodes the same random values from a file with packed matrices.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools import bench

CHUNK = 32
CYCLE = 256  # positions, as bench.py's decode
WORKER = r"""
import sys, time
kind, model, chunk, cycle = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "numpy":
    from tools import bench
    import numpy as np
    matrices = (bench.layer_matrices(bench.SHAPES[model], 2) if model in bench.BIG
                else bench.matmul_weights(model))
    vectors = {m.shape[1]: np.ones(m.shape[1], dtype=np.float32) for m in matrices}
    def step():
        for m in matrices:
            m @ vectors[m.shape[1]]
else:
    transformer = __import__(kind).Transformer(model)
    pos = 0
    def step():
        global pos
        transformer.forward(3 + pos % 1000, pos)
        pos = (pos + 1) % cycle
for _ in range(4):  # page faults, thread start-up
    step()
print("ready", flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    for _ in range(chunk):
        step()
    print(time.perf_counter() - start, flush=True)
"""


def worker(kind, model, cwd, env):
    proc = subprocess.Popen([sys.executable, "-c", WORKER, kind, str(model), str(CHUNK), str(CYCLE)],
                            cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        sys.exit(f"alternate: the {kind} worker in {cwd} did not start")
    return proc


def turn(proc):
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+", type=Path, help="directories with the extensions built")
    ap.add_argument("--program", choices=["run", "runq"], default="run")
    ap.add_argument("--shape", choices=sorted(bench.SHAPES), default="110M")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--packed", action="store_true",
                    help="the big shapes from a file with packed matrices (export.py --packed)")
    args = ap.parse_args()
    for build in args.builds:
        if not (build / args.program).is_dir():
            sys.exit(f"alternate: {build} has no {args.program} package")
    if args.shape in bench.BIG:
        if args.program != "runq":
            sys.exit(f"alternate: the {args.shape} shape is for runq only")
        global CHUNK
        CHUNK = 4  # tokens a turn (about a second at 7B)
        model, _ = bench.big_shape(args.shape, args.packed)
        nbytes = bench.file_decode_bytes(model)
        fp32 = args.shape  # the numpy worker makes its own matrices
        fp32_bytes = sum(m.nbytes for m in bench.layer_matrices(bench.SHAPES[args.shape], 2))
    else:
        fp32, q80, _ = bench.model_files(args.shape, args.program == "runq")
        fp32_bytes = sum(m.nbytes for m in bench.matmul_weights(fp32))
        model, nbytes = (q80, bench.q80_bytes(q80, fp32_bytes)) if args.program == "runq" else (fp32, fp32_bytes)
    # numpy imported by a build's Transformer must not spin BLAS threads beside the decode
    quiet_blas = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    procs = {"numpy": worker("numpy", fp32, bench.REPO, os.environ)}
    for i, build in enumerate(args.builds, 1):  # a build given twice (an A/A run shows the noise)
        name = str(build) if args.builds.count(build) == 1 else f"{build} ({i})"
        procs[name] = worker(args.program, model, build.resolve(), quiet_blas)
    names = list(procs)
    tok_s = {name: [] for name in names[1:]}
    ratios = {name: [] for name in names[1:]}
    try:
        for r in range(args.rounds):
            seconds = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                time.sleep(0.15)
                seconds[name] = turn(procs[name])
            numpy_gbps = CHUNK * fp32_bytes / seconds["numpy"] / 1e9
            for name in names[1:]:
                tok_s[name].append(CHUNK / seconds[name])
                ratios[name].append(CHUNK * nbytes / seconds[name] / 1e9 / numpy_gbps)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    print(f"{args.program} {args.shape}, {args.rounds} rounds of {CHUNK} tokens, medians:")
    print("| build | tok/s | ratio to numpy's sgemv |")
    print("| --- | --- | --- |")
    for name in names[1:]:
        print(f"| {name} | {statistics.median(tok_s[name]):.1f} | {statistics.median(ratios[name]):.3f} |")


if __name__ == "__main__":
    main()
