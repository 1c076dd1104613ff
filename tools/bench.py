"""Decode speed of `python -m run` (and `python -m runq`) against numpy's sgemv bandwidth.

Writes random-weight models in the stories15M and stories110M shapes with export.py (cached in
build/bench/), times decode with the command line exactly as a user runs it (the tok/s that run
reports on stderr), and in the same rounds measures how fast numpy's sgemv (matrix @ vector)
streams the very same weight matrices, sustained over as many passes as decode has tokens.
Decode reads every weight once per token, so tok/s x weight bytes = GB/s, and GB/s / numpy's
GB/s says how close to memory-bound the port is. Every figure is the median of --repeats rounds;
a round times the yardstick (numpy, in a process of its own) and then each program once, so that
a slow spell of a shared machine falls on both sides of a ratio, and a ratio is the median of the
rounds' own ratios.

    python -m tools.bench [--shapes 15M 110M] [--programs run runq run_cuda] [--repeats 5]
                          [--steps 256] [--c-run PATH_TO_LLAMA2C_RUN]

With run_cuda (on an NVIDIA GPU with PyCUDA), the ratio is the fraction of the GPU's memory
bandwidth that the weights stream at.

Then prefill, for run and runq: the tok/s at which a 128-token prompt goes through the model
together (what the command line reports for it), against the same program's decode tok/s and
against the FLOP rate of numpy's sgemm multiplying the same 128 x dim activations by the same
weight matrices (a prompt is compute-bound, decode is memory-bound).

Then batched decode through the Python API (Model.generate_batch): the aggregate tok/s of 1, 4,
8 and 16 sequences decoded together, and the bandwidth at which their passes stream the weights
against numpy's sgemv.

Last, decode while another program keeps one core busy, against the same decode on one thread
under the same load (what the port's choice of threads, team.pxi, can at best reach).

The big shapes (--shapes SmolLM-360M 1B 7B 13B: SmolLM 360M's, with a 49152-token vocabulary,
and Llama 3.2 1B's, with 128256, both with the classifier tied to the embedding table and their
RoPE in a v3 file; Llama 2's; by hand, not in CI) run on random Q8_0 files written straight into
BENCH_BIG_DIR (default build/bench, beside the small ones; 0.4, 1.3, 7 and 14 GB). Their
yardsticks stream two layers' matrices of the shape in fp32 (1.6 GB at 7B, far past any cache),
and every round also loads the model in a process of its own: load time and peak resident
memory during the load, resident memory after it, and the peak of the decode's process. Each
round also decodes with the command line's default sampling (temperature 1, top-p 0.9), against
the greedy decode: what sampling costs a token. runq alone at 7B and 13B (an fp32 7B would be
27 GB); at SmolLM-360M and 1B, run too (when among --programs), on an fp32 file of the same
weights (1.4 and 4.9 GB): its decode, and its 128-token prompt against numpy's sgemm. Fewer
rounds and steps by default (3 and 32). With --packed, runq's files have their matrices packed
(export.py --packed; the same random values), which runq maps with no copy.
"""
import argparse
import contextlib
import copy
import functools
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import run
from llama2_cython import export, formats
from llama2_cython.formats import NORM_EPS, Rope, is_llama2, quantized_tensors

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "bench"
SHAPES = {
    "15M": dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": dict(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, seq_len=1024),
    # from Q8_0 files written directly (big_shape()): SmolLM 360M's and Llama 3.2 1B's shapes, and
    # Llama 2's
    "SmolLM-360M": dict(dim=960, hidden_dim=2560, n_layers=32, n_heads=15, n_kv_heads=5, vocab_size=49152,
                        seq_len=2048),
    "1B": dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, seq_len=2048),
    "7B": dict(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, seq_len=4096),
    "13B": dict(dim=5120, hidden_dim=13824, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, seq_len=4096),
}
BIG = ("SmolLM-360M", "1B", "7B", "13B")
# what a big shape's file says besides its config (big_shape): SmolLM and Llama 3.2 1B tie the
# classifier to the embedding table and rotate with another RoPE (v3 files); Llama 2's are v2 files
BIG_MODELS = {"SmolLM-360M": dict(shared=True, rope=Rope(theta=100000.0)),
              "1B": dict(shared=True, rope=Rope(theta=500000.0, scaling="llama3", factor=32.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position=8192))}
# the big shapes that run (fp32) decodes too, when it is among --programs: their fp32 files are 1.4
# and 4.9 GB (7B's would be 27)
FP32_BIG = ("SmolLM-360M", "1B")
# where the big shapes' files go (BENCH_BIG_DIR): 7 and 14 GB at 7B and 13B
BIG_DIR = Path(os.environ.get("BENCH_BIG_DIR", CACHE))
# the acceptance targets of the issues (../shared/NOTES.md has the C figures they come from)
# (issue 13: fp32 at numpy's bandwidth and at least run.c's speed, int8 at 0.8 of the bandwidth on
# its bytes). The 15M figure stands in for run.c when --c-run is not given: run.c's decode in
# NOTES.md, measured on another machine of this kind.
TARGETS = {("run", "110M"): ("ratio", 1.0), ("run", "15M"): ("run.c", 784.0),
           ("runq", "110M"): ("ratio", 0.8), ("run_cuda", "110M"): ("tok/s", 1500.0)}
# prefill of a 128-token prompt (issue 21): llama.cpp's pp128 on this machine kind (NOTES.md: 2
# threads, Intel Xeon with AMX), in tok/s, twice that for int8 where the CPU has AMX tiles; fp32
# also meets its target at numpy's sgemm FLOP rate (a ratio of 1.0), whatever the CPU
PREFILL_TARGETS = {("run", "110M"): (945.0, 1.0), ("runq", "110M"): (2011.0, None),
                   ("runq", "7B"): (42.9, None), ("runq", "13B"): (19.1, None)}
AMX_PREFILL_FACTOR = 2.0


def int8_kernel():
    """The int8 kernel runq runs prompts with here, as a process of its own reports it."""
    proc = subprocess.run([sys.executable, "-c", "import runq; print(runq.int8_batch_kernel())"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def prefill_target(prog, name, tok_s, flop_ratio, kernel):
    """(met, text) for issue 21's prefill target of prog at shape name, or None without one."""
    if (prog, name) not in PREFILL_TARGETS:
        return None
    target, ratio = PREFILL_TARGETS[prog, name]
    if prog == "runq" and "amx" in kernel:
        target *= AMX_PREFILL_FACTOR
    ok = tok_s >= target or (ratio is not None and flop_ratio >= ratio)
    return ok, f"tok/s >= {target:g}" + (f" or ratio >= {ratio:g}" if ratio is not None else "")
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


def write_random_q80(path, config, seed=0, group_size=64, shared=False, rope=Rope(), norm_eps=NORM_EPS,
                     packed=False, fp32=False):
    """A Q8_0 file of random weights in config's shape, written tensor by tensor (a 7B model in
    fp32 would take 27 GB of memory): uniform int8 values with one random scale per group,
    matrices at about 1/sqrt(fan_in) (uniform int8 times 0.01 overflows to NaN at 7B), the
    embedding at about 1, norms about 1. v2 for run.c's RoPE and epsilon, else v3. shared: the
    classifier is the embedding table (else a separate one, as Llama 2's), scaled as a matrix:
    at about 1 each token's logit for itself (dim times the square) outweighed the rest, and a
    decode repeated its first token forever (or stopped at once on BOS). packed: the same values
    with the matrices packed (what export.py --packed makes of the v2 file; v3). fp32: the same
    weights dequantized (each value times its scale, in float32), in a file for run (v1, or v3)."""
    cfg = export._check_config(config, "config")
    rng = np.random.default_rng(seed)
    L, dim = cfg["n_layers"], cfg["dim"]
    int8_std = 127 / 3 ** 0.5  # of uniform integers in [-127, 127]
    version = 3 if packed or not is_llama2(rope, norm_eps) else 1 if fp32 else 2
    tensors = quantized_tensors(cfg, shared)
    if packed and shared:  # a packed file holds the classifier packed: the embedding table again
        tensors.append(("wcls", *tensors[0][1:]))
    with export.atomic_write(path) as fh:
        fh.write(export.header_bytes(version, cfg, shared, 0 if fp32 else group_size, rope, norm_eps,
                                     packed=packed))
        for count in (L, L, 1):  # rms_att_weight, rms_ffn_weight, rms_final_weight
            fh.write((1 + 0.1 * rng.standard_normal(count * dim)).astype("<f4").tobytes())
        embedding_rng = copy.deepcopy(rng)  # as it is before it draws the embedding table
        for name, count, rows, cols in tensors:
            std = 1.0 if name in ("token_embedding_table", "wcls") and not shared else cols ** -0.5
            draw = embedding_rng if name == "wcls" and shared else rng
            if packed and name == "wq":
                fh.write(b"\0" * formats.packed_padding(cfg, group_size))
            for _ in range(count):
                q = draw.integers(-127, 128, rows * cols, dtype=np.int8)
                scales = draw.uniform(0.5, 1.5, rows * cols // group_size) * (std / int8_std)
                scales = scales.astype("<f4")
                if packed and name != "token_embedding_table":
                    export._write_packed(fh, q.reshape(rows, cols), scales, group_size)
                elif fp32:
                    groups = q.reshape(-1, group_size)
                    step = (1 << 22) // group_size  # groups at a time: temporaries of 16 MB
                    for start in range(0, len(groups), step):
                        fh.write((groups[start:start + step].astype("<f4") * scales[start:start + step, None])
                                 .tobytes())
                else:
                    fh.write(q.tobytes())
                    fh.write(scales.tobytes())


def big_shape(name, packed=False, fp32=False):
    """The cached random Q8_0 file of a big shape (written once into BIG_DIR), its matrices
    packed or not (or with fp32, the fp32 file of the same weights), and a tokenizer of its
    vocabulary's size."""
    BIG_DIR.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    vocab_size = SHAPES[name]["vocab_size"]
    kind = "fp32" if fp32 else "Q8_0 (packed)" if packed else "Q8_0"
    model = BIG_DIR / (f"{name}.bin" if fp32 else f"{name}_q80{'_packed' if packed else ''}.bin")
    tok = CACHE / f"tok{vocab_size}.bin"
    if not model.exists():
        print(f"writing a random {name} {kind} file in {BIG_DIR} ...", file=sys.stderr, flush=True)
        write_random_q80(model, SHAPES[name], packed=packed, fp32=fp32, **BIG_MODELS.get(name, {}))
    if not tok.exists():
        write_tokenizer(tok, vocab_size)
    return model, tok


def layer_matrices(config, layers):
    """fp32 matrices in the shapes of `layers` layers of config (random): the big shapes'
    yardsticks stream these instead of the whole model in fp32 (27 GB at 7B)."""
    rng = np.random.default_rng(1)
    L, dim, hidden = config["n_layers"], config["dim"], config["hidden_dim"]
    kv_dim = config["n_kv_heads"] * (dim // config["n_heads"])
    shapes = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden)]
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(layers) for shape in shapes]


def matmul_weights(path):
    """The matrices decode multiplies with, one after the other, as numpy views of the file."""
    w = run.Transformer(str(path)).weights
    layers = zip(*(w[k] for k in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")))
    return [m for layer in layers for m in layer] + [w["wcls"]]


def numpy_sgemv_gbps(matrices, passes):
    """GB/s of numpy's sgemv over the matrices in decode's order, sustained like a decode: one run
    of `passes` passes (one pass per token)."""
    vectors = {m.shape[1]: np.random.default_rng(0).standard_normal(m.shape[1], dtype=np.float32)
               for m in matrices}
    nbytes = sum(m.nbytes for m in matrices)
    for m in matrices:  # warm the page cache, as decode's first (untimed) token does
        m @ vectors[m.shape[1]]
    t0 = time.perf_counter()
    for _ in range(passes):
        for m in matrices:
            m @ vectors[m.shape[1]]
    return nbytes * passes / (time.perf_counter() - t0) / 1e9


def numpy_sgemm_gflops(matrices, rows):
    """GFLOP/s of numpy's sgemm multiplying a (rows, n) block by each matrix in turn (one pass,
    after a warm-up pass): what a prompt of `rows` tokens fed together asks of each layer."""
    blocks = {m.shape[1]: np.random.default_rng(0).standard_normal((rows, m.shape[1]), dtype=np.float32)
              for m in matrices}
    flops = sum(2 * rows * m.size for m in matrices)
    for m in matrices:
        blocks[m.shape[1]] @ m.T
    t0 = time.perf_counter()
    for m in matrices:
        blocks[m.shape[1]] @ m.T
    return flops / (time.perf_counter() - t0) / 1e9


def numpy_yardstick(kind, model, count):
    """numpy_sgemv_gbps(matmul_weights(model), count) (kind "sgemv") or numpy_sgemm_gflops of the
    layers' matrices (kind "sgemm", count rows), measured in a process of its own. In this one,
    numpy's BLAS threads would keep spinning after their last product, for a good fraction of a
    second, on the cores the next program measured needs: a 15M prompt right after the sgemm
    yardstick went 8x slower than alone."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--yardstick", kind, str(model), str(count)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    return float(proc.stdout)


def prefill_tok_s(command, model, tokenizer):
    """The rate at which command feeds a prompt of PROMPT_TOKENS tokens together, as it reports it
    on stderr. The prompt is bytes that no piece merges: BOS, the dummy prefix, 127 byte tokens;
    the last of them goes one at a time and is not counted."""
    prompt = "a" * (PROMPT_TOKENS - 1)
    proc = subprocess.run([*command, str(model), "-z", str(tokenizer), "-n", str(PROMPT_TOKENS + 2),
                           "-t", "0", "-i", prompt], cwd=REPO, capture_output=True, text=True, check=True)
    found = re.search(r"after a prompt of (\d+) tokens fed together at ([0-9.]+) tok/s", proc.stderr)
    assert int(found.group(1)) == PROMPT_TOKENS, proc.stderr
    return float(found.group(2))


def q80_bytes(q80, fp32_bytes):
    """The bytes of int8 weights a runq decode reads per token: int8 values plus one float32
    scale per group."""
    with open(q80, "rb") as f:
        group_size = struct.unpack_from("i", f.read(64), 37)[0]
    return fp32_bytes // 4 + fp32_bytes // group_size


def file_decode_bytes(path):
    """The bytes of a v1/v2/v3 file that a decode reads per token: every matrix but the token
    embedding table (one row of it): int8 values and float32 scales, or float32 values."""
    from llama2_cython.formats import parse_header
    with open(path, "rb") as f:
        header = parse_header(f.read(256), str(path))
    tensors = quantized_tensors(header.config, header.shared_classifier)
    if header.shared_classifier:  # the embedding table is the classifier too
        tensors.append(("wcls", *tensors[0][1:]))
    per_value = 1 + 4 / header.group_size if header.quantized else 4
    return sum(count * rows * cols * per_value for name, count, rows, cols in tensors
               if name != "token_embedding_table")


def batched_tok_s(model, sequences, steps):
    """Aggregate tok/s of `sequences` greedy sequences of `steps` positions decoded together
    (Model.generate_batch); each pass of the batch reads the weights once."""
    t0 = time.perf_counter()
    for _ in model.generate_batch(["a"] * sequences, steps=steps, temperature=0.0):
        pass
    return sequences * steps / (time.perf_counter() - t0)


def decode_tok_s(command, model, tokenizer, steps, env=None):
    """The `achieved tok/s` that command (a run-like CLI) reports for a greedy run."""
    proc = subprocess.run([*command, str(model), "-z", str(tokenizer), "-n", str(steps), "-t", "0"],
                          cwd=REPO, capture_output=True, text=True, check=True, env=env)
    return float(re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr).group(1))


@contextlib.contextmanager
def busy_core():
    """Another program keeping one core busy meanwhile (a Python loop)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def rounds(repeats, yardstick, *measures):
    """Medians over `repeats` rounds, each taking the yardstick and then every measure once, so
    that a slow spell of a shared machine falls on both sides of a ratio: (median of the
    yardstick, [median of each measure], [median of each measure's ratio to the yardstick in its
    own round])."""
    taken = [[yardstick(), *(measure() for measure in measures)] for _ in range(repeats)]
    ys = [row[0] for row in taken]
    columns = list(zip(*(row[1:] for row in taken))) if measures else []
    return (statistics.median(ys), [statistics.median(c) for c in columns],
            [statistics.median(v / y for v, y in zip(c, ys)) for c in columns])


def load_probe(model):
    """(seconds, peak RSS bytes, RSS bytes after, packed) of runq.Transformer(model), in a fresh
    process (--load-probe)."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--load-probe", str(model)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    seconds, peak, after, packed = proc.stdout.split()
    return float(seconds), int(peak), int(after), packed == "True"


def rss_bytes(field="VmRSS"):
    """This process's resident memory now, or with "VmHWM" its peak since it started (unlike
    ru_maxrss, which starts from the peak of the process that forked it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run_with_peak_rss(argv):
    """(stderr, peak RSS bytes) of a command run to its end (its own rusage, from wait4)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, stderr=stderr)
    return stderr, usage.ru_maxrss * 1024


def big_decode(model, tokenizer, steps, sampling=("-t", "0"), program="runq"):
    """(tok/s, peak RSS bytes) of `python -m runq` (or program) decoding steps tokens (greedily
    by default)."""
    stderr, peak = run_with_peak_rss([*COMMANDS[program], str(model), "-z", str(tokenizer), "-n", str(steps),
                                      *sampling])
    return float(re.search(r"achieved tok/s: ([0-9.]+)", stderr).group(1)), peak


def layer_flops(config):
    """A prompt token's FLOPs in the layers' matrices (2 x rows x columns each), what numpy's sgemm
    yardstick counts: the classifier runs for the prompt's last token only."""
    return 2 * sum(count * rows * cols for _, count, rows, cols in quantized_tensors(config, True)[1:])


def big_shapes(names, repeats, steps, packed=False):
    """The big shapes' rows for runq (see the docstring)."""
    kernel = int8_kernel()
    print(f"\nBig shapes (runq on random Q8_0 files{', packed' if packed else ''}; numpy's "
          f"yardsticks on two layers in fp32; int8 kernel: {kernel}):")
    print("| shape | file | load s | peak RSS in load | RSS after load | packed | decode tok/s | GB/s | "
          "numpy sgemv GB/s | ratio | decode peak RSS | top-p 0.9 tok/s | x greedy | 128-token prompt tok/s | "
          "GFLOP/s | numpy sgemm GFLOP/s | ratio | prompt target |")
    print("| --- " * 18 + "|")
    failed = False
    for name in names:
        q80, tok = big_shape(name, packed)
        file_bytes = os.path.getsize(q80)
        nbytes = file_decode_bytes(q80)
        c = SHAPES[name]
        flops_per_token = layer_flops(c)
        taken = []
        for _ in range(repeats):
            load = load_probe(q80)
            gbps = numpy_yardstick("sgemv", name, 8)
            decode = big_decode(q80, tok, steps)
            sampled = big_decode(q80, tok, steps, ("-t", "1", "-p", "0.9", "-s", "1"))
            gflops = numpy_yardstick("sgemm", name, PROMPT_TOKENS)
            prefill = prefill_tok_s(COMMANDS["runq"], q80, tok)
            taken.append((load, gbps, decode, gflops, prefill, sampled))
        med = statistics.median
        load_s, load_peak, load_after = (med(t[0][i] for t in taken) for i in range(3))
        was_packed = all(t[0][3] for t in taken)
        gbps, gflops = med(t[1] for t in taken), med(t[3] for t in taken)
        tok_s, decode_peak = med(t[2][0] for t in taken), med(t[2][1] for t in taken)
        ratio = med(t[2][0] * nbytes / 1e9 / t[1] for t in taken)
        prefill = med(t[4] for t in taken)
        sampled, sampled_ratio = med(t[5][0] for t in taken), med(t[5][0] / t[2][0] for t in taken)
        flop_ratio = med(t[4] * flops_per_token / 1e9 / t[3] for t in taken)
        target = prefill_target("runq", name, prefill, flop_ratio, kernel)
        failed |= bool(target) and not target[0]
        print(f"| {name} | {file_bytes / 1e9:.2f} GB | {load_s:.2f} | {load_peak / 1e9:.2f} GB | "
              f"{load_after / 1e9:.2f} GB | {was_packed} | {tok_s:.2f} | {tok_s * nbytes / 1e9:.1f} | "
              f"{gbps:.1f} | {ratio:.2f} | {decode_peak / 1e9:.2f} GB | {sampled:.2f} | {sampled_ratio:.2f} | "
              f"{prefill:.1f} | "
              f"{prefill * flops_per_token / 1e9:.0f} | {gflops:.0f} | {flop_ratio:.2f} | "
              f"{verdict(*target) if target else ''} |", flush=True)
    return failed


def big_fp32_shapes(names, repeats, steps):
    """run (fp32) at the big shapes whose fp32 file is written too (FP32_BIG): decode against the
    same yardstick as runq's rows, with the same weights (the Q8_0 file's, dequantized), and the
    128-token prompt against numpy's sgemm on the shape's layers."""
    print("\nBig shapes in fp32 (run on the same random weights, dequantized; numpy's yardsticks as above):")
    print("| shape | file | decode tok/s | GB/s | numpy sgemv GB/s | ratio | decode peak RSS | top-p 0.9 tok/s | "
          "x greedy | 128-token prompt tok/s | GFLOP/s | numpy sgemm GFLOP/s | ratio |")
    print("| --- " * 13 + "|")
    med = statistics.median
    for name in names:
        model, tok = big_shape(name, fp32=True)
        nbytes = file_decode_bytes(model)
        flops_per_token = layer_flops(SHAPES[name])
        taken = []
        for _ in range(repeats):
            gbps = numpy_yardstick("sgemv", name, 8)
            decode = big_decode(model, tok, steps, program="run")
            sampled = big_decode(model, tok, steps, ("-t", "1", "-p", "0.9", "-s", "1"), program="run")
            gflops = numpy_yardstick("sgemm", name, PROMPT_TOKENS)
            prefill = prefill_tok_s(COMMANDS["run"], model, tok)
            taken.append((gbps, decode, sampled, gflops, prefill))
        gbps, tok_s, peak = med(t[0] for t in taken), med(t[1][0] for t in taken), med(t[1][1] for t in taken)
        ratio = med(t[1][0] * nbytes / 1e9 / t[0] for t in taken)
        sampled, sampled_ratio = med(t[2][0] for t in taken), med(t[2][0] / t[1][0] for t in taken)
        gflops, prefill = med(t[3] for t in taken), med(t[4] for t in taken)
        flop_ratio = med(t[4] * flops_per_token / 1e9 / t[3] for t in taken)
        print(f"| {name} | {os.path.getsize(model) / 1e9:.2f} GB | {tok_s:.2f} | {tok_s * nbytes / 1e9:.1f} | "
              f"{gbps:.1f} | {ratio:.2f} | {peak / 1e9:.2f} GB | {sampled:.2f} | {sampled_ratio:.2f} | "
              f"{prefill:.1f} | {prefill * flops_per_token / 1e9:.0f} | {gflops:.0f} | {flop_ratio:.2f} |", flush=True)


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


def verdict(ok, text):
    return f"{text}: {'met' if ok else 'MISSED'}"


def main():
    if sys.argv[1:2] == ["--yardstick"]:  # numpy_yardstick()'s process
        kind, model, count = sys.argv[2:]
        if model in BIG:
            matrices = layer_matrices(SHAPES[model], 2)
        else:
            matrices = matmul_weights(model) if kind == "sgemv" else matmul_weights(model)[:-1]
        if kind == "sgemv":
            print(numpy_sgemv_gbps(matrices, int(count)))
        else:
            print(numpy_sgemm_gflops(matrices, int(count)))
        return
    if sys.argv[1:2] == ["--load-probe"]:  # load_probe()'s process
        import runq
        start = time.perf_counter()
        transformer = runq.Transformer(sys.argv[2])
        seconds = time.perf_counter() - start
        print(seconds, rss_bytes("VmHWM"), rss_bytes(), transformer.packed)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["15M", "110M"], choices=sorted(SHAPES))
    ap.add_argument("--programs", nargs="+", default=["run", "runq"], choices=sorted(COMMANDS),
                    help="run_cuda compares with the GPU's memory bandwidth instead of numpy's")
    ap.add_argument("--repeats", type=int, help="default 5 (3 for the big shapes)")
    ap.add_argument("--steps", type=int, help="default 256 (32 for the big shapes)")
    ap.add_argument("--packed", action="store_true",
                    help="the big shapes from files with packed matrices (export.py --packed)")
    ap.add_argument("--c-run", metavar="BINARY",
                    help="llama2.c's run built with `make runomp`: decoded in the same rounds, for "
                         "issue 13's 15M target (without it, NOTES.md's run.c figure stands in)")
    args = ap.parse_args()
    big = [name for name in args.shapes if name in BIG]
    args.shapes = [name for name in args.shapes if name not in BIG]
    big_failed = False
    if big:
        print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cpus; "
              f"medians of {args.repeats or 3} rounds, {args.steps or 32} decode steps")
        big_failed = big_shapes(big, args.repeats or 3, args.steps or 32, args.packed)
        fp32_big = [name for name in big if name in FP32_BIG]
        if fp32_big and "run" in args.programs:
            big_fp32_shapes(fp32_big, args.repeats or 3, args.steps or 32)
        if not args.shapes:
            return 1 if big_failed else 0
    args.repeats = args.repeats or 5
    args.steps = args.steps or 256
    try:
        gpu = gpu_peak_gbps() if "run_cuda" in args.programs else None
    except ImportError as e:
        sys.exit(f"bench: run_cuda needs PyCUDA and a GPU ({e})")
    commands = dict(COMMANDS)
    if args.c_run:
        commands["run.c"] = [os.path.abspath(args.c_run)]

    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cpus, "
          f"{args.steps} steps; medians of {args.repeats} rounds, each round timing the yardstick "
          f"and then each program once" + (f"; GPU: {gpu[0]}" if gpu else ""))
    print("\nDecode:")
    print("| program | shape | weights/token | tok/s | GB/s | numpy sgemv (GPU peak) GB/s | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    decode = {}
    for name in args.shapes:
        fp32, q80, tok = model_files(name, "runq" in args.programs)
        matrices = matmul_weights(fp32)
        fp32_bytes = sum(m.nbytes for m in matrices)
        programs = args.programs + (["run.c"] if args.c_run and "run" in args.programs else [])
        models = {prog: (q80, q80_bytes(q80, fp32_bytes)) if prog == "runq" else (fp32, fp32_bytes)
                  for prog in programs}
        measures = [functools.partial(decode_tok_s, commands[prog], models[prog][0], tok, args.steps)
                    for prog in programs]
        # numpy's sgemv, unless only the GPU runs: its peak is a figure, not a measurement
        yardstick = ((lambda: gpu[1]) if programs == ["run_cuda"]
                     else functools.partial(numpy_yardstick, "sgemv", fp32, args.steps - 1))
        numpy_gbps, tok_s_all, per_round = rounds(args.repeats, yardstick, *measures)
        for prog, tok_s in zip(programs, tok_s_all):
            decode[prog, name] = tok_s
        for prog, tok_s, tok_s_per_gbps in zip(programs, tok_s_all, per_round):
            nbytes = models[prog][1]
            reference = gpu[1] if prog == "run_cuda" else numpy_gbps
            gbps = tok_s * nbytes / 1e9
            # each round's own ratio (the program against the yardstick just before it), median
            ratio = tok_s_per_gbps * nbytes / 1e9 * (numpy_gbps / reference)
            text = ""
            if (prog, name) in TARGETS:
                kind, target = TARGETS[prog, name]
                if kind == "run.c":
                    target, source = decode.get(("run.c", name), target), (
                        "run.c in these rounds" if ("run.c", name) in decode else "run.c in NOTES.md")
                    ok, text = tok_s >= target, f"tok/s >= {target:.0f} ({source})"
                else:
                    value = ratio if kind == "ratio" else tok_s
                    ok, text = value >= target, f"{kind} >= {target:g}"
                failed |= not ok
                text = verdict(ok, text)
            print(f"| {prog} | {name} | {nbytes / 1e6:.0f} MB | {tok_s:.1f} | {gbps:.1f} | "
                  f"{reference:.1f} | {ratio:.2f} | {text} |", flush=True)

    cpu_programs = [p for p in args.programs if p in ("run", "runq")]
    kernel = int8_kernel() if "runq" in cpu_programs else ""
    if cpu_programs:
        print(f"\nPrefill of a {PROMPT_TOKENS}-token prompt (fp32: f32dot.h; int8: {kernel or '-'}):")
        print("| program | shape | prefill tok/s | x decode | GFLOP/s | numpy sgemm GFLOP/s | ratio | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes if cpu_programs else []:
        fp32, q80, tok = model_files(name, "runq" in cpu_programs)
        layers = matmul_weights(fp32)[:-1]  # the classifier runs for the last prompt token only
        flops_per_token = sum(2 * m.size for m in layers)
        measures = [functools.partial(prefill_tok_s, COMMANDS[prog], q80 if prog == "runq" else fp32, tok)
                    for prog in cpu_programs]
        sgemm, tok_s_all, per_round = rounds(args.repeats, functools.partial(numpy_yardstick, "sgemm", fp32,
                                                                             PROMPT_TOKENS), *measures)
        for prog, tok_s, tok_s_per_gflops in zip(cpu_programs, tok_s_all, per_round):
            gflops = tok_s * flops_per_token / 1e9
            flop_ratio = tok_s_per_gflops * flops_per_token / 1e9  # each round's own, median
            speedup = tok_s / decode[prog, name]
            text = ""
            target = prefill_target(prog, name, tok_s, flop_ratio, kernel)
            if target:
                failed |= not target[0]
                text = verdict(*target)
            print(f"| {prog} | {name} | {tok_s:.1f} | {speedup:.1f} | {gflops:.1f} | {sgemm:.1f} | "
                  f"{flop_ratio:.2f} | {text} |", flush=True)

    if cpu_programs:
        print("\nBatched decode (Model.generate_batch, greedy, 64 positions a sequence):")
        print("| program | shape | sequences | aggregate tok/s | x one sequence | weights GB/s | numpy sgemv GB/s | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes if cpu_programs else []:
        fp32, q80, tok = model_files(name, "runq" in cpu_programs)
        matrices = matmul_weights(fp32)
        fp32_bytes = sum(m.nbytes for m in matrices)
        for prog in cpu_programs:
            package = run if prog == "run" else __import__("runq")
            model = package.Model(str(q80 if prog == "runq" else fp32), str(tok))
            nbytes = fp32_bytes if prog == "run" else q80_bytes(q80, fp32_bytes)
            counts = (1, 4, 8, 16)
            numpy_gbps, tok_s_all, _ = rounds(args.repeats, functools.partial(numpy_yardstick, "sgemv", fp32, 63),
                                              *(functools.partial(batched_tok_s, model, k, 64) for k in counts))
            one = tok_s_all[0]
            for sequences, tok_s in zip(counts, tok_s_all):
                text = ""
                if sequences == 8 and name == "110M":
                    ok = tok_s >= 4 * one
                    failed |= not ok
                    text = verdict(ok, "x one >= 4")
                print(f"| {prog} | {name} | {sequences} | {tok_s:.1f} | {tok_s / one:.1f} | "
                      f"{tok_s / sequences * nbytes / 1e9:.1f} | {numpy_gbps:.1f} | {text} |", flush=True)
    if cpu_programs:
        print(f"\nDecode with one core busy (another program spinning), OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, against the same decode on one thread:")
        print("| program | shape | tok/s | one thread, busy | ratio | idle tok/s |")
        print("| --- | --- | --- | --- | --- | --- |")
    for name in args.shapes if cpu_programs else []:
        fp32, q80, tok = model_files(name, "runq" in cpu_programs)
        one_thread = dict(os.environ, OMP_NUM_THREADS="1")
        with busy_core():
            for prog in cpu_programs:
                model = q80 if prog == "runq" else fp32
                alone, (tok_s,), (ratio,) = rounds(
                    args.repeats, functools.partial(decode_tok_s, COMMANDS[prog], model, tok, args.steps, one_thread),
                    functools.partial(decode_tok_s, COMMANDS[prog], model, tok, args.steps))
                print(f"| {prog} | {name} | {tok_s:.1f} | {alone:.1f} | {ratio:.2f} | "
                      f"{decode[prog, name]:.1f} |", flush=True)
    return 1 if failed or big_failed else 0


if __name__ == "__main__":
    sys.exit(main())
